/* The controller's CA (wolfCrypt certificate generation): EC P-256 keys,
 * ECDSA-SHA256 signatures, PEM files under STATE/tls. At start the CA is
 * loaded or made (10 years), and the controller's own identities are issued
 * when missing or past 2/3 of their life; per agent a server certificate
 * named by the agent id. A timer renews everything at 2/3 of its life: the
 * controller's files are rewritten (its client contexts reload them), and
 * each ready agent gets its new certificate over its link (op tls_renew),
 * so no connection and no lease is dropped. Keys never reach a log.
 *
 * Two CAs: ca.pem signs the agents', the controller's client and the API's
 * certificates; trainer-ca.pem signs only trainer.pem, and only the trainer
 * API trusts it. Agents trust ca.pem alone, so a trainer's certificate is
 * refused at an agent's handshake (the agent token is a second factor, not
 * the only one), and the controller's client certificate is refused by the
 * trainer API. */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/settings.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/random.h>

#include "tls.h"
#include "tls_ca.h"

#define CA_DAYS 3650
#define DER_MAX 4096
#define PEM_MAX 8192
#define TICK_S 1.0
#define RETRY_FIRST_S 5.0
#define RETRY_MAX_S 300.0
#define WARN_EVERY_S 3600.0
/* Issued certificates start this much in the past: clocks of agents on
 * other hosts may lag the controller's. */
#define BACKDATE_S 300

/* A CA of ours: its key and certificate (DER for issuing, PEM for the
 * agents' copies and for checking what it signed). */
enum { CA_MAIN, CA_TRAINER, CA_N };
struct ca {
    const char *name;   /* for logs: "CA", "trainer CA" */
    const char *issues; /* what a new one voids: for the error telling to remove it */
    enum tls_file cert, key;
    ecc_key ek;
    byte der[DER_MAX];
    int derlen;
    char *pem;
};

/* One of the controller's own identities, renewed in place. */
struct own {
    const char *name; /* controller, api, trainer */
    enum tls_file cert, key;
    bool server;
    int signer; /* CA_MAIN or CA_TRAINER */
    time_t not_before, not_after;
    ev_tstamp retry_at;
    double retry_delay;
    ev_tstamp warned_at;
};

struct tls_state {
    char *paths[TLS_NFILES];
    char *dir, *agents_dir;
    struct ca ca[CA_N];
    WC_RNG rng;
    struct own own[3];
    ev_timer tick;
    unsigned ticks;
};

static struct tls_state *ts(const struct ctl *c)
{
    return c->tls;
}

void tls_pem_free(struct tls_pem *p)
{
    if (p->key) {
        explicit_bzero(p->key, p->keyn);
        free(p->key);
    }
    free(p->cert);
    memset(p, 0, sizeof *p);
}

int tls_parse_lifetime(const char *s, uint64_t *secs)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || errno || *s == '-')
        return -1;
    uint64_t mult = 1;
    if (!strcmp(end, "s") || !*end)
        mult = 1;
    else if (!strcmp(end, "m"))
        mult = 60;
    else if (!strcmp(end, "h"))
        mult = 3600;
    else if (!strcmp(end, "d"))
        mult = 86400;
    else
        return -1;
    if (v == 0 || v > 100ull * 365 * 86400 / mult)
        return -1;
    *secs = v * mult;
    return 0;
}

/* ---- files ----------------------------------------------------------------- */

static char *slurp(const char *path, size_t *n)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 16384, len = 0;
    char *b = malloc(cap);
    ssize_t k;
    while (b && (k = read(fd, b + len, cap - len - 1)) > 0) {
        len += (size_t)k;
        if (len + 1 == cap)
            break; /* no PEM of ours is this large */
    }
    close(fd);
    if (!b)
        abort();
    b[len] = 0;
    if (n)
        *n = len;
    return b;
}

/* Write a file whole or not at all (a reader never sees half a key):
 * a temporary beside it, mode 0600, then rename. */
static int write_atomic(const char *path, const char *data, size_t n, struct sp_err *err)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return sp_err_errno(err, errno, tmp);
    size_t off = 0;
    while (off < n) {
        ssize_t k = write(fd, data + off, n - off);
        if (k < 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return sp_err_errno(err, e, tmp);
        }
        off += (size_t)k;
    }
    if (fsync(fd) < 0 || close(fd) < 0 || rename(tmp, path) < 0) {
        int e = errno;
        unlink(tmp);
        return sp_err_errno(err, e, path);
    }
    return 0;
}

/* "2026-12-08T13:19:09Z" for logs. */
static const char *utc(time_t t, char *buf, size_t cap)
{
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

static int crypto_err(struct sp_err *err, const char *what, int rc)
{
    return sp_errf(err, SP_INTERNAL, "tls: %s failed: %s (%d)", what, wc_GetErrorString(rc), rc);
}

/* ---- certificates ---------------------------------------------------------- */

/* A UTCTime (GeneralizedTime from 2050) with its tag and length, as the
 * Cert structure's date copies hold them. */
static int asn_time(time_t t, byte *out)
{
    struct tm tm;
    gmtime_r(&t, &tm);
    char s[20];
    int n;
    if (tm.tm_year + 1900 >= 2050) {
        n = snprintf(s, sizeof s, "%04d%02d%02d%02d%02d%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        out[0] = 0x18;
    } else {
        n = snprintf(s, sizeof s, "%02d%02d%02d%02d%02d%02dZ", tm.tm_year % 100, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        out[0] = 0x17;
    }
    out[1] = (byte)n;
    memcpy(out + 2, s, (size_t)n);
    return n + 2;
}

/* GeneralNames: dNSName [2] for names, iPAddress [7] for IP literals. */
static int alt_names(const char *const *sans, size_t n, byte *out, int cap)
{
    byte body[2048];
    int len = 0;
    for (size_t i = 0; i < n; i++) {
        byte ip[16];
        int tag, vl;
        const byte *v;
        if (inet_pton(AF_INET, sans[i], ip) == 1)
            tag = 0x87, v = ip, vl = 4;
        else if (inet_pton(AF_INET6, sans[i], ip) == 1)
            tag = 0x87, v = ip, vl = 16;
        else
            tag = 0x82, v = (const byte *)sans[i], vl = (int)strlen(sans[i]);
        if (vl > 127 || len + 2 + vl > (int)sizeof body)
            continue; /* a name this long is none we issue */
        body[len++] = (byte)tag;
        body[len++] = (byte)vl;
        memcpy(body + len, v, (size_t)vl);
        len += vl;
    }
    int hl = len < 128 ? 2 : len < 256 ? 3 : 4;
    if (hl + len > cap)
        return -1;
    out[0] = 0x30;
    if (hl == 2)
        out[1] = (byte)len;
    else if (hl == 3)
        out[1] = 0x81, out[2] = (byte)len;
    else
        out[1] = 0x82, out[2] = (byte)(len >> 8), out[3] = (byte)len;
    memcpy(out + hl, body, (size_t)len);
    return hl + len;
}

static char *to_pem(const byte *der, int n, int type, size_t *outn, struct sp_err *err)
{
    char *pem = malloc(PEM_MAX);
    if (!pem)
        abort();
    int k = wc_DerToPem(der, (word32)n, (byte *)pem, PEM_MAX - 1, type);
    if (k <= 0) {
        free(pem);
        crypto_err(err, "PEM encoding", k);
        return NULL;
    }
    pem[k] = 0;
    *outn = (size_t)k;
    return pem;
}

static void random_serial(struct tls_state *s, Cert *cert)
{
    wc_RNG_GenerateBlock(&s->rng, cert->serial, 16);
    cert->serial[0] &= 0x7f; /* positive */
    cert->serial[0] |= 0x01; /* and no leading zero byte */
    cert->serialSz = 16;
}

/* A new P-256 key and its PEM (SEC1). */
static int new_key(struct tls_state *s, ecc_key *key, char **pem, size_t *pemn, struct sp_err *err)
{
    int rc = wc_ecc_init(key);
    if (rc == 0)
        rc = wc_ecc_make_key_ex(&s->rng, 32, key, ECC_SECP256R1);
    if (rc != 0)
        return crypto_err(err, "EC key generation", rc);
    byte der[512];
    int n = wc_EccKeyToDer(key, der, sizeof der);
    if (n <= 0)
        return crypto_err(err, "EC key encoding", n);
    *pem = to_pem(der, n, ECC_PRIVATEKEY_TYPE, pemn, err);
    explicit_bzero(der, sizeof der);
    return *pem ? 0 : -1;
}

/* Sign cert (subject key `key`) with the CA; PEM out. */
static int sign(struct tls_state *s, Cert *cert, ecc_key *key, ecc_key *signer, char **pem,
                size_t *pemn, struct sp_err *err)
{
    byte *der = malloc(DER_MAX);
    if (!der)
        abort();
    cert->sigType = CTC_SHA256wECDSA;
    int rc = wc_MakeCert(cert, der, DER_MAX, NULL, key, &s->rng);
    if (rc > 0)
        rc = wc_SignCert(cert->bodySz, cert->sigType, der, DER_MAX, NULL, signer, &s->rng);
    if (rc <= 0) {
        free(der);
        return crypto_err(err, "signing a certificate", rc);
    }
    *pem = to_pem(der, rc, CERT_TYPE, pemn, err);
    free(der);
    return *pem ? 0 : -1;
}

static int issue_by(struct ctl *c, struct ca *a, const char *cn, bool server,
                    const char *const *sans, size_t nsans, uint64_t lifetime_s, struct tls_pem *out,
                    struct sp_err *err)
{
    struct tls_state *s = ts(c);
    memset(out, 0, sizeof *out);
    Cert *cert = calloc(1, sizeof *cert);
    if (!cert)
        abort();
    ecc_key key;
    int rc = -1;
    if (new_key(s, &key, &out->key, &out->keyn, err) < 0)
        goto out;
    wc_InitCert(cert);
    snprintf(cert->subject.commonName, CTC_NAME_SIZE, "%s", cn);
    snprintf(cert->subject.org, CTC_NAME_SIZE, "slot");
    random_serial(s, cert);
    int r = wc_SetIssuerBuffer(cert, a->der, a->derlen);
    if (r == 0)
        r = wc_SetAuthKeyIdFromCert(cert, a->der, a->derlen);
    if (r == 0)
        r = wc_SetSubjectKeyIdFromPublicKey(cert, NULL, &key);
    if (r == 0)
        r = wc_SetKeyUsage(cert, "digitalSignature");
    if (r == 0)
        r = wc_SetExtKeyUsage(cert, server ? "serverAuth" : "clientAuth");
    if (r != 0) {
        crypto_err(err, "certificate fields", r);
        goto out;
    }
    if (nsans) {
        int n = alt_names(sans, nsans, cert->altNames, CTC_MAX_ALT_SIZE);
        if (n < 0) {
            sp_errf(err, SP_INTERNAL, "tls: too many subject alternative names");
            goto out;
        }
        cert->altNamesSz = n;
    }
    time_t now = time(NULL);
    /* not_before is the issue time (renewals count from it); the
     * certificate's own starts earlier. */
    out->not_before = now;
    out->not_after = now + (time_t)lifetime_s;
    cert->beforeDateSz = asn_time(now - BACKDATE_S, cert->beforeDate);
    cert->afterDateSz = asn_time(out->not_after, cert->afterDate);
    rc = sign(s, cert, &key, &a->ek, &out->cert, &out->certn, err);
out:
    wc_ecc_free(&key);
    free(cert);
    if (rc < 0)
        tls_pem_free(out);
    return rc;
}

int tls_ca_issue(struct ctl *c, const char *cn, bool server, const char *const *sans, size_t nsans,
                 uint64_t lifetime_s, struct tls_pem *out, struct sp_err *err)
{
    return issue_by(c, &ts(c)->ca[CA_MAIN], cn, server, sans, nsans, lifetime_s, out, err);
}

/* Does this PEM certificate verify against the CA (its signature, and
 * valid now)? trainer.pem of a state directory from before trainer-ca.pem
 * was signed by ca.pem: it does not, and is issued again. */
static bool signed_by(const struct ca *a, const char *pem, size_t n)
{
    WOLFSSL_CERT_MANAGER *cm = wolfSSL_CertManagerNew();
    if (!cm)
        abort();
    bool ok =
        wolfSSL_CertManagerLoadCABuffer(cm, (const unsigned char *)a->pem, (long)strlen(a->pem),
                                        WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS &&
        wolfSSL_CertManagerVerifyBuffer(cm, (const unsigned char *)pem, (long)n,
                                        WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS;
    wolfSSL_CertManagerFree(cm);
    return ok;
}

/* notBefore and notAfter of a PEM certificate (0 when unreadable). */
static void pem_dates(const char *pem, size_t n, time_t *nb, time_t *na)
{
    *nb = *na = 0;
    byte *der = malloc(DER_MAX);
    Cert *cert = calloc(1, sizeof *cert);
    if (!der || !cert)
        abort();
    int k = wc_CertPemToDer((const byte *)pem, (int)n, der, DER_MAX, CERT_TYPE);
    struct tm b, a;
    if (k > 0 && wc_InitCert(cert) == 0 && wc_SetDatesBuffer(cert, der, k) == 0 &&
        wc_GetCertDates(cert, &b, &a) == 0) {
        *nb = timegm(&b);
        *na = timegm(&a);
        /* ours start BACKDATE_S before their issue */
        if (*na - *nb > 2 * BACKDATE_S)
            *nb += BACKDATE_S;
    }
    free(cert);
    free(der);
}

/* ---- the CA ------------------------------------------------------------------ */

static int ca_load(struct ctl *c, struct ca *a, struct sp_err *err)
{
    struct tls_state *s = ts(c);
    const char *kpath = s->paths[a->key], *cpath = s->paths[a->cert];
    size_t kn = 0, cn = 0;
    char *kp = slurp(kpath, &kn);
    char *cp = slurp(cpath, &cn);
    int rc = -1;
    if (!kp || !cp) {
        rc = 1; /* not there: make one */
        goto out;
    }
    byte der[512];
    int n = wc_KeyPemToDer((const byte *)kp, (int)kn, der, sizeof der, NULL);
    word32 idx = 0;
    if (n <= 0 || wc_ecc_init(&a->ek) != 0 ||
        wc_EccPrivateKeyDecode(der, &idx, &a->ek, (word32)n) != 0) {
        explicit_bzero(der, sizeof der);
        sp_errf(err, SP_BAD_REQUEST,
                "%s: not an EC private key in PEM; remove %s and %s to make "
                "a new %s (%s then issued again)",
                kpath, kpath, cpath, a->name, a->issues);
        goto out;
    }
    explicit_bzero(der, sizeof der);
    a->derlen = wc_CertPemToDer((const byte *)cp, (int)cn, a->der, DER_MAX, CERT_TYPE);
    if (a->derlen <= 0) {
        sp_errf(err, SP_BAD_REQUEST, "%s: not a PEM certificate", cpath);
        goto out;
    }
    time_t nb, na;
    pem_dates(cp, cn, &nb, &na);
    if (na && na < time(NULL))
        log_warn("tls: the %s in %s expired; remove it and its key %s to make a new one", a->name,
                 cpath, kpath);
    a->pem = cp;
    cp = NULL;
    rc = 0;
out:
    if (kp) {
        explicit_bzero(kp, kn);
        free(kp);
    }
    free(cp);
    return rc;
}

static int ca_make(struct ctl *c, struct ca *a, struct sp_err *err)
{
    struct tls_state *s = ts(c);
    char *kpem = NULL, *cpem = NULL;
    size_t kn = 0, cn = 0;
    Cert *cert = calloc(1, sizeof *cert);
    if (!cert)
        abort();
    int rc = -1;
    if (new_key(s, &a->ek, &kpem, &kn, err) < 0)
        goto out;
    wc_InitCert(cert);
    snprintf(cert->subject.commonName, CTC_NAME_SIZE, "slot-controller %s %.32s", a->name, c->name);
    snprintf(cert->subject.org, CTC_NAME_SIZE, "slot");
    random_serial(s, cert);
    cert->isCA = 1;
    cert->selfSigned = 1;
    cert->daysValid = CA_DAYS;
    int r = wc_SetSubjectKeyIdFromPublicKey(cert, NULL, &a->ek);
    if (r == 0)
        r = wc_SetKeyUsage(cert, "keyCertSign,cRLSign");
    if (r != 0) {
        crypto_err(err, "CA fields", r);
        goto out;
    }
    if (sign(s, cert, &a->ek, &a->ek, &cpem, &cn, err) < 0)
        goto out;
    a->derlen = wc_CertPemToDer((const byte *)cpem, (int)cn, a->der, DER_MAX, CERT_TYPE);
    if (a->derlen <= 0) {
        crypto_err(err, "reading the new CA", a->derlen);
        goto out;
    }
    /* The key first: a CA certificate without its key would be loaded
     * next time and fail. */
    if (write_atomic(s->paths[a->key], kpem, kn, err) < 0 ||
        write_atomic(s->paths[a->cert], cpem, cn, err) < 0)
        goto out;
    chmod(s->paths[a->cert], 0644); /* public */
    log_info("tls: made a new %s %s (EC P-256, %d days)", a->name, s->paths[a->cert], CA_DAYS);
    a->pem = cpem;
    cpem = NULL;
    rc = 0;
out:
    if (kpem) {
        explicit_bzero(kpem, kn);
        free(kpem);
    }
    free(cpem);
    free(cert);
    return rc;
}

/* ---- the controller's own identities ------------------------------------------ */

static void reload_client_ctxs(struct ctl *c)
{
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        struct sp_err e;
        if (p->tls_ctx && sp_tls_ctx_reload(p->tls_ctx, true, &e) < 0)
            log_warn("tls: profile %s: reloading the client certificate: %s", p->name, e.msg);
    }
}

static int own_issue(struct ctl *c, struct own *o, struct sp_err *err)
{
    struct tls_state *s = ts(c);
    char cn[CTC_NAME_SIZE];
    const char *sans[16];
    size_t n = 0;
    char host[256] = "";
    if (!strcmp(o->name, "controller"))
        snprintf(cn, sizeof cn, "slot-controller:%.45s", c->name);
    else if (!strcmp(o->name, "trainer"))
        snprintf(cn, sizeof cn, "slot-trainer:%.45s", c->name);
    else {
        snprintf(cn, sizeof cn, "slot-controller-api");
        sans[n++] = "localhost";
        sans[n++] = "127.0.0.1";
        sans[n++] = "::1";
        if (gethostname(host, sizeof host - 1) == 0 && *host && strcmp(host, "localhost"))
            sans[n++] = host;
        for (size_t i = 0; i < c->tls_api_names.n && n < 16; i++)
            sans[n++] = c->tls_api_names.v[i];
    }
    struct tls_pem pem;
    if (issue_by(c, &s->ca[o->signer], cn, o->server, sans, n, c->tls_lifetime_s, &pem, err) < 0)
        return -1;
    int rc = write_atomic(s->paths[o->key], pem.key, pem.keyn, err);
    if (rc == 0)
        rc = write_atomic(s->paths[o->cert], pem.cert, pem.certn, err);
    if (rc == 0) {
        o->not_before = pem.not_before;
        o->not_after = pem.not_after;
    }
    tls_pem_free(&pem);
    return rc;
}

static time_t renew_at(time_t nb, time_t na)
{
    return nb + (na - nb) * 2 / 3;
}

/* Renew one identity when due; failures retry with backoff and are logged
 * at most once an hour. */
static void own_check(struct ctl *c, struct own *o, ev_tstamp now)
{
    if (!ts(c)->paths[o->cert] || o->retry_at > now)
        return;
    if (o->not_after && time(NULL) < renew_at(o->not_before, o->not_after))
        return;
    struct sp_err e;
    if (own_issue(c, o, &e) < 0) {
        o->retry_delay = o->retry_delay ? o->retry_delay * 2 : RETRY_FIRST_S;
        if (o->retry_delay > RETRY_MAX_S)
            o->retry_delay = RETRY_MAX_S;
        o->retry_at = now + o->retry_delay;
        if (!o->warned_at || now - o->warned_at >= WARN_EVERY_S) {
            o->warned_at = now;
            log_warn("tls: renewing the %s certificate failed (retrying): %s", o->name, e.msg);
        }
        return;
    }
    o->retry_delay = 0;
    o->retry_at = 0;
    char t[32];
    log_info("tls: %s certificate renewed, valid until %s", o->name,
             utc(o->not_after, t, sizeof t));
    if (o->cert == TLS_CLIENT_CERT)
        reload_client_ctxs(c);
}

/* ---- agents -------------------------------------------------------------------- */

bool tls_profile_on(const struct profile *p)
{
    return strcmp(p->tls_mode, "off") != 0;
}

bool tls_profile_issues(const struct profile *p)
{
    if (!tls_profile_on(p) || p->tls_cert)
        return false;
    if (p->be == &backend_nomad)
        return true;
    /* exec: when its templates hand the files to an agent, or asked to */
    return p->be == &backend_exec && (p->tls_used || !strcmp(p->tls_mode, "on"));
}

const char *tls_agent_expect(const struct agent *ag)
{
    return ag->prof->tls_cert ? NULL : ag->id;
}

static void agent_dir(const struct ctl *c, const struct agent *ag, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", ts(c)->agents_dir, ag->id);
}

void tls_agent_paths(const struct ctl *c, const struct agent *ag, char *cert, char *key, char *ca,
                     size_t cap)
{
    const struct profile *p = ag->prof;
    *cert = *key = *ca = 0;
    if (p->tls_cert) {
        snprintf(cert, cap, "%s", p->tls_cert);
        snprintf(key, cap, "%s", p->tls_key ? p->tls_key : "");
        snprintf(ca, cap, "%s", p->tls_ca ? p->tls_ca : "");
        return;
    }
    if (!ts(c) || !ag->tls_files)
        return;
    char d[4096];
    agent_dir(c, ag, d, sizeof d);
    snprintf(cert, cap, "%s/cert.pem", d);
    snprintf(key, cap, "%s/key.pem", d);
    snprintf(ca, cap, "%s/ca.pem", d);
}

int tls_agent_issue(struct ctl *c, struct agent *ag, bool files, struct tls_pem *pem,
                    struct sp_err *err)
{
    struct tls_state *s = ts(c);
    if (!s)
        return sp_errf(err, SP_INTERNAL, "tls: the controller's CA is not set up");
    const char *san = ag->id;
    struct tls_pem tmp, *p = pem ? pem : &tmp;
    if (tls_ca_issue(c, ag->id, true, &san, 1, c->tls_lifetime_s, p, err) < 0)
        return -1;
    int rc = 0;
    if (files) {
        char d[4096], f[4200];
        agent_dir(c, ag, d, sizeof d);
        if (mkdir_p(d, 0700) < 0)
            rc = sp_err_errno(err, errno, d);
        snprintf(f, sizeof f, "%s/key.pem", d);
        if (rc == 0)
            rc = write_atomic(f, p->key, p->keyn, err);
        snprintf(f, sizeof f, "%s/cert.pem", d);
        if (rc == 0)
            rc = write_atomic(f, p->cert, p->certn, err);
        snprintf(f, sizeof f, "%s/ca.pem", d);
        if (rc == 0)
            rc = write_atomic(f, s->ca[CA_MAIN].pem, strlen(s->ca[CA_MAIN].pem), err);
        ag->tls_files = true; /* even half written: removed with the agent */
    }
    if (rc == 0) {
        ag->tls_issued = true;
        ag->tls_not_before = p->not_before;
        ag->tls_not_after = p->not_after;
    }
    if (p == &tmp)
        tls_pem_free(&tmp);
    return rc;
}

void tls_agent_forget(struct ctl *c, struct agent *ag)
{
    if (!ag->tls_files || !ts(c))
        return;
    ag->tls_files = false;
    char d[4096];
    agent_dir(c, ag, d, sizeof d);
    remove_tree_now(d);
}

void tls_remove_stale(struct ctl *c)
{
    struct tls_state *s = ts(c);
    DIR *d = s ? opendir(s->agents_dir) : NULL;
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.' || agent_find(c, de->d_name, strlen(de->d_name)))
            continue;
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", s->agents_dir, de->d_name);
        remove_tree_now(p);
    }
    closedir(d);
}

struct sp_tls_ctx *tls_client_ctx(struct ctl *c, struct profile *p, struct sp_err *err)
{
    if (p->tls_ctx)
        return p->tls_ctx;
    const char *ca = p->tls_ca ? p->tls_ca : tls_file(c, TLS_CA_CERT);
    const char *cert = tls_file(c, TLS_CLIENT_CERT), *key = tls_file(c, TLS_CLIENT_KEY);
    if (!ca || !cert || !key)
        return sp_errf(err, SP_INTERNAL, "tls: no client certificate for the controller"), NULL;
    p->tls_ctx = sp_tls_ctx_new(SP_TLS_CLIENT, cert, key, ca, err);
    return p->tls_ctx;
}

/* The answer to tls_renew: the agent's new notAfter. */
static void on_renewed(struct ctl *c, struct preq *r, const msgpack_object *resp,
                       const struct sp_err *err)
{
    struct agent *ag = r->ag;
    time_t na = (time_t)(intptr_t)r->ctx, nb = ag->tls_pending_nb;
    r->ctx = NULL;
    if (r->args)
        explicit_bzero(r->args, r->argsn); /* the key, kept for a resend */
    preq_free(c, r);
    ag->tls_renewing = false;
    ev_tstamp now = ev_now(c->loop);
    const msgpack_object *res = resp ? sp_map_get(resp, "result") : NULL;
    if (!res) {
        char why[400] = "";
        if (resp) {
            const msgpack_object *er = sp_map_get(resp, "error");
            const char *m = NULL;
            size_t ml = 0;
            struct sp_err e;
            if (er)
                sp_get_str(er, "message", false, &m, &ml, &e);
            if (m)
                snprintf(why, sizeof why, "%.*s", (int)(ml < 390 ? ml : 390), m);
            else
                snprintf(why, sizeof why, "an answer without a result");
        } else
            snprintf(why, sizeof why, "%.399s", err ? err->msg : "no answer");
        ag->tls_retry_delay = ag->tls_retry_delay ? ag->tls_retry_delay * 2 : RETRY_FIRST_S;
        if (ag->tls_retry_delay > RETRY_MAX_S)
            ag->tls_retry_delay = RETRY_MAX_S;
        ag->tls_retry_at = now + ag->tls_retry_delay;
        if (resp && (!ag->tls_warned_at || now - ag->tls_warned_at >= WARN_EVERY_S)) {
            ag->tls_warned_at = now;
            log_warn("agent %s: renewing its certificate failed (retrying in %.0f s): %s", ag->id,
                     ag->tls_retry_delay, why);
        }
        return;
    }
    uint64_t got = 0;
    struct sp_err e;
    sp_get_uint(res, "not_after", false, &got, &e);
    ag->tls_not_before = nb;
    ag->tls_not_after = got ? (time_t)got : na;
    ag->tls_retry_delay = 0;
    ag->tls_retry_at = 0;
    char t[32];
    log_info("agent %s: certificate renewed, valid until %s", ag->id,
             utc(ag->tls_not_after, t, sizeof t));
}

static void agent_renew(struct ctl *c, struct agent *ag)
{
    struct tls_pem pem;
    struct sp_err e;
    if (tls_ca_issue(c, ag->id, true, (const char *const[]){ag->id}, 1, c->tls_lifetime_s, &pem,
                     &e) < 0) {
        ag->tls_retry_at = ev_now(c->loop) + RETRY_MAX_S;
        log_warn("agent %s: %s", ag->id, e.msg);
        return;
    }
    struct preq *r = agent_req_new(ag, NULL, on_renewed);
    r->ctx = (void *)(intptr_t)pem.not_after;
    ag->tls_pending_nb = pem.not_before;
    msgpack_packer pk;
    agent_send_begin(ag, r, "tls_renew", &pk);
    msgpack_pack_map(&pk, 2);
    sp_pack_cstr(&pk, "cert");
    sp_pack_strn(&pk, pem.cert, pem.certn);
    sp_pack_cstr(&pk, "key");
    sp_pack_strn(&pk, pem.key, pem.keyn);
    ag->tls_renewing = true;
    agent_send_end(c, ag, r);
    tls_pem_free(&pem);
}

static bool agent_due(const struct agent *ag, ev_tstamp now)
{
    if (!ag->tls_issued || ag->tls_renewing || !ag->connected || ag->tls_retry_at > now ||
        (ag->state != AG_READY && ag->state != AG_DRAINING))
        return false;
    /* Found after a restart: its notAfter is unknown, so renew at once
     * (which also tells it). */
    if (!ag->tls_not_after)
        return true;
    return time(NULL) >= renew_at(ag->tls_not_before, ag->tls_not_after);
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct ctl *c = w->data;
    struct tls_state *s = ts(c);
    ev_tstamp now = ev_now(c->loop);
    for (int i = 0; i < 3; i++)
        own_check(c, &s->own[i], now);
    /* A site's own files change under us: look every 30 s (a stat each). */
    if (++s->ticks % 30 == 0 && (c->tls_cert || c->tls_ca)) {
        struct profile *q;
        TAILQ_FOREACH(q, &c->profiles, link)
        {
            struct sp_err e;
            if (q->tls_ctx && sp_tls_ctx_reload(q->tls_ctx, false, &e) < 0)
                log_warn("tls: profile %s: %s", q->name, e.msg);
        }
    }
    struct profile *p;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link)
    if (agent_due(ag, now))
        agent_renew(c, ag);
}

/* ---- start --------------------------------------------------------------------- */

const char *tls_file(const struct ctl *c, enum tls_file f)
{
    return ts(c) ? ts(c)->paths[f] : NULL;
}

static char *path_in(const char *dir, const char *name)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0)
        abort();
    return p;
}

int tls_ca_init(struct ctl *c, struct sp_err *err)
{
    struct tls_state *s = calloc(1, sizeof *s);
    if (!s)
        abort();
    c->tls = s;
    if (!c->tls_lifetime_s)
        c->tls_lifetime_s = 86400;
    s->dir = path_in(c->state_dir, "tls");
    s->agents_dir = path_in(s->dir, "agents");
    if (mkdir_p(s->agents_dir, 0700) < 0)
        return sp_err_errno(err, errno, s->agents_dir);
    chmod(s->dir, 0700);
    static const char *const names[TLS_NFILES] = {
        "ca.pem",  "ca.key",      "controller.pem", "controller.key", "api.pem",
        "api.key", "trainer.pem", "trainer.key",    "trainer-ca.pem", "trainer-ca.key"};
    for (int i = 0; i < TLS_NFILES; i++)
        s->paths[i] = path_in(s->dir, names[i]);
    /* A site's own client identity: nothing issued for it. */
    if (c->tls_cert) {
        free(s->paths[TLS_CLIENT_CERT]);
        free(s->paths[TLS_CLIENT_KEY]);
        s->paths[TLS_CLIENT_CERT] = strdup(c->tls_cert);
        s->paths[TLS_CLIENT_KEY] = c->tls_key ? strdup(c->tls_key) : NULL;
    }
    /* signed_by's certificate manager (reference counted: proto/tls.c
     * initialises too). */
    if (wolfSSL_Init() != WOLFSSL_SUCCESS)
        return sp_errf(err, SP_INTERNAL, "tls: wolfSSL_Init failed");
    int rc = wc_InitRng(&s->rng);
    if (rc != 0)
        return crypto_err(err, "random number generator", rc);
    const struct ca cas[CA_N] = {
        [CA_MAIN] = {.name = "CA",
                     .issues = "every agent certificate is",
                     .cert = TLS_CA_CERT,
                     .key = TLS_CA_KEY},
        [CA_TRAINER] = {.name = "trainer CA",
                        .issues = "trainer.pem is",
                        .cert = TLS_TRAINER_CA_CERT,
                        .key = TLS_TRAINER_CA_KEY},
    };
    memcpy(s->ca, cas, sizeof cas);
    for (int i = 0; i < CA_N; i++) {
        rc = ca_load(c, &s->ca[i], err);
        if (rc < 0 || (rc > 0 && ca_make(c, &s->ca[i], err) < 0))
            return -1;
    }
    /* With the site's CA, the controller's client context trusts it (the
     * agents' certificates chain there); our own CA still issues the API's
     * and trainers' certificates. */
    if (c->tls_ca) {
        free(s->paths[TLS_CA_CERT]);
        s->paths[TLS_CA_CERT] = strdup(c->tls_ca);
    }
    const struct own own[3] = {
        {"controller", TLS_CLIENT_CERT, TLS_CLIENT_KEY, false, CA_MAIN, 0, 0, 0, 0, 0},
        {"api", TLS_API_CERT, TLS_API_KEY, true, CA_MAIN, 0, 0, 0, 0, 0},
        {"trainer", TLS_TRAINER_CERT, TLS_TRAINER_KEY, false, CA_TRAINER, 0, 0, 0, 0, 0},
    };
    memcpy(s->own, own, sizeof own);
    for (int i = 0; i < 3; i++) {
        struct own *o = &s->own[i];
        if (o->cert == TLS_CLIENT_CERT && c->tls_cert) {
            o->retry_at = 1e300; /* the site renews its own */
            continue;
        }
        size_t n = 0;
        char *pem = slurp(s->paths[o->cert], &n);
        struct stat st;
        if (pem && stat(s->paths[o->key], &st) == 0)
            pem_dates(pem, n, &o->not_before, &o->not_after);
        bool current = o->not_after && time(NULL) < renew_at(o->not_before, o->not_after);
        /* Signed by another CA (a new CA voids what the old one issued;
         * trainer.pem from before trainer-ca.pem was signed by ca.pem):
         * issued again by its own. */
        bool ours = current && signed_by(&s->ca[o->signer], pem, n);
        free(pem);
        if (ours)
            continue;
        if (current)
            log_info("tls: %s is not signed by the controller's %s: issuing it again",
                     s->paths[o->cert], s->ca[o->signer].name);
        if (own_issue(c, o, err) < 0)
            return -1;
        char t[32];
        log_info("tls: issued %s (%s), valid until %s", s->paths[o->cert], o->name,
                 utc(o->not_after, t, sizeof t));
    }
    ev_timer_init(&s->tick, tick_cb, TICK_S, TICK_S);
    s->tick.data = c;
    ev_timer_start(c->loop, &s->tick);
    return 0;
}

void tls_ca_stop(struct ctl *c)
{
    if (ts(c))
        ev_timer_stop(c->loop, &ts(c)->tick);
}
