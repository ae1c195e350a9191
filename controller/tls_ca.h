/* The controller's small certificate authority (STATE/tls) and the TLS
 * identities it issues: its own client certificate (to reach agents), the
 * trainer API's server certificate, a client certificate for agentctl and
 * trainers, and one short-lived server certificate per agent, renewed over
 * the agent's link before it expires. A site with its own PKI names its
 * files in the configuration instead, and nothing is issued for that part. */
#ifndef CTL_TLS_CA_H
#define CTL_TLS_CA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "ctl.h"

/* The files the controller keeps (or was given). */
enum tls_file {
    TLS_CA_CERT,      /* STATE/tls/ca.pem (or tls.ca): agents, controller.pem, api.pem */
    TLS_CA_KEY,       /* STATE/tls/ca.key */
    TLS_CLIENT_CERT,  /* STATE/tls/controller.pem (or tls.cert): clientAuth, to reach agents */
    TLS_CLIENT_KEY,   /* STATE/tls/controller.key (or tls.key) */
    TLS_API_CERT,     /* STATE/tls/api.pem: serverAuth, the trainer API */
    TLS_API_KEY,      /* STATE/tls/api.key */
    TLS_TRAINER_CERT, /* STATE/tls/trainer.pem: clientAuth, for agentctl and trainers */
    TLS_TRAINER_KEY,  /* STATE/tls/trainer.key */
    /* STATE/tls/trainer-ca.pem: signs trainer.pem only, and is what the
     * trainer API checks clients against; agents trust ca.pem alone, so a
     * trainer's certificate cannot open an agent. */
    TLS_TRAINER_CA_CERT,
    TLS_TRAINER_CA_KEY, /* STATE/tls/trainer-ca.key */
    TLS_NFILES
};

/* A certificate and its key in PEM (key wiped by tls_pem_free). */
struct tls_pem {
    char *cert, *key;
    size_t certn, keyn;
    time_t not_before, not_after;
};
void tls_pem_free(struct tls_pem *p);

/* Create (or load) the CA and the controller's own identities, issuing
 * those missing or past 2/3 of their life; starts the renewal timer.
 * Called once at start, after the state directory exists. */
int tls_ca_init(struct ctl *c, struct sp_err *err);
void tls_ca_stop(struct ctl *c);
/* The path of one of the controller's files. */
const char *tls_file(const struct ctl *c, enum tls_file f);

/* Issue a certificate for cn signed by the CA (ca.pem): EKU serverAuth (server) or
 * clientAuth, DNS/IP SANs (strings; IP literals become IP SANs), valid
 * from a minute ago for lifetime_s. */
int tls_ca_issue(struct ctl *c, const char *cn, bool server, const char *const *sans, size_t nsans,
                 uint64_t lifetime_s, struct tls_pem *out, struct sp_err *err);

/* "30", "30s", "30m", "24h", "7d" -> seconds; -1 if malformed. */
int tls_parse_lifetime(const char *s, uint64_t *secs);

/* ---- agents ---------------------------------------------------------------- */

/* Do this profile's agents get certificates from the controller? (Its
 * links are TLS and it names no site PKI files.) */
bool tls_profile_issues(const struct profile *p);
/* Does the controller speak TLS to this profile's agents itself (nomad)? */
bool tls_profile_on(const struct profile *p);
/* Issue the agent's certificate (CN and DNS SAN = its id, serverAuth,
 * cert_lifetime) and, with files, write STATE/tls/agents/ID/{cert.pem,
 * key.pem,ca.pem} (0600). pem may be NULL when only the files are wanted. */
int tls_agent_issue(struct ctl *c, struct agent *ag, bool files, struct tls_pem *pem,
                    struct sp_err *err);
/* Where the agent's files are ({tls_cert} etc.): the issued ones, or the
 * profile's own (site PKI); "" when neither. */
void tls_agent_paths(const struct ctl *c, const struct agent *ag, char *cert, char *key, char *ca,
                     size_t cap);
/* The agent is gone: its files go too. */
void tls_agent_forget(struct ctl *c, struct agent *ag);
/* At start, once the agents of an earlier run are found: the files of
 * agents that are gone (a controller killed before it removed them). */
void tls_remove_stale(struct ctl *c);
/* The client context for links to this profile's agents (its CA: the
 * profile's tls.ca or ours); NULL with err. */
struct sp_tls_ctx *tls_client_ctx(struct ctl *c, struct profile *p, struct sp_err *err);
/* The name an agent's certificate must carry (NULL: chain only, with site
 * PKI files whose names the controller does not know). */
const char *tls_agent_expect(const struct agent *ag);

#endif
