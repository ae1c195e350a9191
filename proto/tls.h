/* TLS 1.3 links (wolfSSL): contexts with mutual X.509 authentication,
 * non-blocking handshakes, and the frame reader/writer over a TLS stream.
 * Shared by the agent (static libwolfssl), the controller and agentctl.
 * Every failure becomes one line a user can act on. */
#ifndef SLOT_TLS_H
#define SLOT_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <time.h>

#include "slotproto.h"

enum sp_tls_role { SP_TLS_SERVER, SP_TLS_CLIENT };

/* What a non-blocking step waits for. */
enum { SP_TLS_WANT_READ = 1, SP_TLS_WANT_WRITE = 2 };

/* Extended key usage a peer's certificate must allow (when it names any):
 * agents serve (serverAuth), controllers and trainers connect
 * (clientAuth), so one agent's certificate cannot open another agent. */
struct sp_tls_ctx;
struct sp_tls;

/* A context: TLS 1.3 only, our certificate chain and key, and the CA that
 * peers must chain to. A server requires a client certificate; a client
 * checks the server's. Files are PEM. */
struct sp_tls_ctx *sp_tls_ctx_new(enum sp_tls_role role, const char *cert, const char *key,
                                  const char *ca, struct sp_err *err);
void sp_tls_ctx_free(struct sp_tls_ctx *x);
/* Reads the three files again if any changed (mtime, size) since the last
 * load; a broken new set is refused and the old one kept. Returns 1 when
 * reloaded, 0 unchanged, -1 with err. Connections already open keep their
 * keys: a renewal drops nothing. */
int sp_tls_ctx_reload(struct sp_tls_ctx *x, bool force, struct sp_err *err);
/* Replaces our certificate and key from PEM in memory (a renewal pushed
 * over an authenticated link); checks the pair first. */
int sp_tls_ctx_set_pem(struct sp_tls_ctx *x, const char *cert, size_t certn, const char *key,
                       size_t keyn, struct sp_err *err);
/* The subject CN and notAfter of the first certificate in a PEM buffer
 * (to vet a renewal before it replaces anything). 0 or -1 with err. */
int sp_tls_pem_info(const char *cert, size_t certn, char *cn, size_t cnn, time_t *not_after,
                    struct sp_err *err);
/* Our certificate's notAfter (0 if unknown) and subject CN. */
time_t sp_tls_ctx_not_after(const struct sp_tls_ctx *x);
const char *sp_tls_ctx_cn(const struct sp_tls_ctx *x);

/* One connection over a connected non-blocking socket (not closed by
 * sp_tls_free). A client may name the identity the server's certificate
 * must carry (CN or DNS SAN): the agent id, so that one agent's
 * certificate cannot stand in for another's. */
struct sp_tls *sp_tls_new(struct sp_tls_ctx *x, int fd, const char *expect_name,
                          struct sp_err *err);
void sp_tls_free(struct sp_tls *t);

/* Drives the handshake: 1 done, 0 in progress (wait for sp_tls_want()),
 * -1 failed with a one-line reason in err (SP_UNAUTHORIZED for certificate
 * problems, SP_BAD_REQUEST for protocol mismatches: plaintext peer, TLS
 * 1.2, not TLS at all). */
int sp_tls_handshake(struct sp_tls *t, struct sp_err *err);
int sp_tls_want(const struct sp_tls *t);
bool sp_tls_done(const struct sp_tls *t);

/* Same contract as sp_reader_fill / sp_writer_flush: bytes read (0 = the
 * peer closed), bytes left to write; -1 with errno (EAGAIN: wait for
 * sp_tls_want(), which may be WRITE for a read). A failure's one-line
 * reason is in sp_tls_error(). */
ssize_t sp_tls_reader_fill(struct sp_reader *r, struct sp_tls *t);
ssize_t sp_tls_writer_flush(struct sp_writer *w, struct sp_tls *t);
const char *sp_tls_error(const struct sp_tls *t);
/* Raw bytes, for relays that do not look at frames (slot-agent --attach):
 * like read(2)/write(2) on a non-blocking socket, with the same -1/EAGAIN
 * and 0 = closed rules as above. */
ssize_t sp_tls_read(struct sp_tls *t, void *buf, size_t n);
ssize_t sp_tls_write(struct sp_tls *t, const void *buf, size_t n);
/* Decrypted bytes are buffered inside TLS: read again without waiting for
 * the socket (a level-triggered watcher would not fire for them). */
bool sp_tls_pending(const struct sp_tls *t);
/* Best-effort close_notify; never blocks. */
void sp_tls_shutdown(struct sp_tls *t);

/* The peer certificate's subject CN (after the handshake), "" if none. */
const char *sp_tls_peer_cn(const struct sp_tls *t);
/* "TLSv1.3 TLS_AES_128_GCM_SHA256" */
const char *sp_tls_describe(const struct sp_tls *t);

/* Do these first bytes from a peer start a TLS handshake (a record of type
 * 22, version 3.x)? Lets a plaintext port say "this is TLS, connect with
 * tcp:" instead of reading a 22-million-byte frame length. */
bool sp_tls_looks_like_tls(const void *buf, size_t n);

#endif
