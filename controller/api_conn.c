/* The trainer API's transport: listeners (unix:, tcp:, tls:), accepting
 * trainer connections, TLS handshakes driven by the loop, reading frames
 * and handing each to api_dispatch (api.c, the ops), writing answers
 * (tconn_begin/end/error/flush), closing and freeing connections.
 * tcp: listeners are plaintext and loopback only unless --insecure; tls:
 * listeners speak TLS 1.3 and require client certificates. A peer speaking
 * the other protocol gets one plaintext error frame, then a lingering
 * close so that the frame is not lost to a reset. */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "ctl.h"
#include "tls.h"

#define CONN_WRITE_LIMIT (2ull * SP_DEFAULT_MAX_FRAME)
/* A TLS client has this long to finish its handshake. */
#define TLS_HANDSHAKE_S 10.0
/* Reads of one TLS connection per loop turn before the others get theirs. */
#define TLS_READS_PER_TURN 16
/* TLS failures logged per window; the rest are counted in one line. */
#define TLS_LOG_BURST 10
#define TLS_LOG_WINDOW_S 10.0
/* A refused peer has this long to read our last words and close. */
#define LINGER_S 2.0

static void tconn_free_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* ---- connections --------------------------------------------------------- */

/* api_conn.c's own part of a connection: its TLS state on a tls: listener. */
struct tconn_x {
    struct tconn t;
    ev_timer close_timer;
    struct listener *l;
    struct sp_tls *tls; /* tls: listener; NULL on unix: and tcp: */
    ev_timer hs_timer;  /* handshake deadline */
    bool handshaking;
    bool sniffed;          /* the first bytes were looked at (TLS or not) */
    bool read_wants_write; /* a TLS read waits for the socket to take bytes */
    bool lingering;        /* refused: waiting for the peer to close (tconn_linger) */
    char peer[64];         /* HOST:PORT, for log lines */
};

static struct tconn_x *tconn_x(struct tconn *t)
{
    return (struct tconn_x *)t;
}

/* One line per TLS failure, but under a flood of bad handshakes at most
 * TLS_LOG_BURST per window, and at the window's end one line with how many
 * were not shown. */
static struct {
    ev_tstamp window;
    unsigned shown, hidden;
    ev_timer summary;
} tls_log;

static void tls_log_summary(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    if (tls_log.hidden)
        log_warn("%u more failed TLS connections in the last %.0f s (not logged one by one)",
                 tls_log.hidden, ev_now(loop) - tls_log.window);
    tls_log.window = ev_now(loop);
    tls_log.shown = tls_log.hidden = 0;
}

static void tls_log_fail(struct ctl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tls_log_fail(struct ctl *c, const char *fmt, ...)
{
    ev_tstamp now = ev_now(c->loop);
    if (now - tls_log.window >= TLS_LOG_WINDOW_S && !tls_log.hidden) {
        tls_log.window = now;
        tls_log.shown = 0;
    }
    if (tls_log.shown >= TLS_LOG_BURST) {
        if (!tls_log.hidden++) {
            ev_timer_init(&tls_log.summary, tls_log_summary,
                          tls_log.window + TLS_LOG_WINDOW_S - now, 0);
            ev_timer_start(c->loop, &tls_log.summary);
        }
        return;
    }
    tls_log.shown++;
    char line[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log_warn("%s", line);
}

static void tconn_close(struct ctl *c, struct tconn *t, const char *why)
{
    if (t->closing)
        return;
    t->closing = true;
    log_debug("trainer connection %d closed: %s", t->fd, why);
    ev_io_stop(c->loop, &t->rio);
    ev_io_stop(c->loop, &t->wio);
    struct tconn_x *x = tconn_x(t);
    ev_timer_stop(c->loop, &x->hs_timer);
    if (x->tls && !x->handshaking)
        sp_tls_shutdown(x->tls); /* close_notify: the trainer sees an orderly end */
    /* Waiters go; commands of this trainer still running are cancelled;
     * leases stay, and when this was their owner's last connection, they
     * end after lease_grace unless the owner comes back. */
    struct waiter *w;
    while ((w = TAILQ_FIRST(&t->waiters)))
        sched_waiter_drop(c, w);
    struct preq *r;
    while ((r = TAILQ_FIRST(&t->reqs))) {
        TAILQ_REMOVE(&t->reqs, r, clink);
        r->conn = NULL;
        if (r->batch)
            r->batch->conn = NULL;
        if (r->is_command && r->slot && agent_reachable(r->ag))
            sched_cancel_slot(c, r->slot);
    }
    if (!c->stopping)
        sched_owner_gone(c, t->owner);
    ev_timer_init(&x->close_timer, tconn_free_cb, 0, 0);
    x->close_timer.data = t;
    ev_timer_start(c->loop, &x->close_timer);
}

static void tconn_free_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct tconn *t = w->data;
    struct ctl *c = t->ctl;
    LIST_REMOVE(t, link);
    c->nconns--;
    if (tconn_x(t)->tls)
        sp_tls_free(tconn_x(t)->tls);
    close(t->fd);
    sp_reader_free(&t->rd);
    sp_writer_free(&t->wr);
    free(t);
}

void tconn_flush(struct ctl *c, struct tconn *t)
{
    struct tconn_x *x = tconn_x(t);
    if (t->closing || x->handshaking)
        return;
    ssize_t left = x->tls ? sp_tls_writer_flush(&t->wr, x->tls) : sp_writer_flush(&t->wr, t->fd);
    if (left < 0 && x->tls && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        /* TLS may want to read first; the read watcher is always on. */
        left = sp_writer_pending(&t->wr) ? 1 : 0;
        if (sp_tls_want(x->tls) != SP_TLS_WANT_WRITE && !x->read_wants_write) {
            ev_io_stop(c->loop, &t->wio);
            return;
        }
    }
    if (left < 0) {
        tconn_close(c, t, x->tls && *sp_tls_error(x->tls) ? sp_tls_error(x->tls) : strerror(errno));
        return;
    }
    if (left > 0 || x->read_wants_write)
        ev_io_start(c->loop, &t->wio);
    else
        ev_io_stop(c->loop, &t->wio);
}

msgpack_packer *tconn_begin(struct tconn *t, msgpack_packer *pk)
{
    sp_writer_packer(&t->wr, pk);
    sp_writer_begin_frame(&t->wr);
    return pk;
}

void tconn_end(struct ctl *c, struct tconn *t)
{
    struct sp_err e;
    if (sp_writer_end_frame(&t->wr, &e) < 0) {
        log_warn("trainer connection %d dropped: %s", t->fd, e.msg);
        tconn_close(c, t, e.msg);
        return;
    }
    if (!ev_is_active(&t->wio))
        tconn_flush(c, t);
}

void tconn_error(struct ctl *c, struct tconn *t, uint64_t id, const struct sp_err *e)
{
    if (!t || t->closing)
        return;
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_error(&pk, id, e);
    tconn_end(c, t);
}

/* ---- reading and writing -------------------------------------------------- */

/* The frames read so far, dispatched; a framing error is answered and
 * closes the connection. */
static void tconn_dispatch_all(struct ctl *c, struct tconn *t)
{
    const char *data;
    uint32_t len;
    struct sp_err e;
    int got = 0;
    while (!t->closing && (got = sp_reader_next(&t->rd, &data, &len, &e)) == 1)
        api_dispatch(c, t, data, len);
    if (!t->closing && got < 0) {
        tconn_error(c, t, 0, &e);
        tconn_flush(c, t);
        tconn_close(c, t, e.msg);
    }
}

/* Our last words to a refused peer (a TLS alert, an error frame) are on
 * their way: end our side only and read what it still sends until it
 * closes (or LINGER_S). Closing at once would reset the connection, and a
 * reset can overtake those words: the peer would only see "reset". */
static void tconn_linger(struct ctl *c, struct tconn *t)
{
    struct tconn_x *x = tconn_x(t);
    if (x->tls) {
        sp_tls_free(x->tls);
        x->tls = NULL;
    }
    x->handshaking = false;
    x->lingering = true;
    shutdown(t->fd, SHUT_WR);
    ev_io_stop(c->loop, &t->wio);
    ev_io_start(c->loop, &t->rio);
    ev_timer_stop(c->loop, &x->hs_timer);
    ev_timer_set(&x->hs_timer, LINGER_S, 0);
    ev_timer_start(c->loop, &x->hs_timer);
}

static void linger_read(struct ctl *c, struct tconn *t)
{
    char junk[4096];
    for (int i = 0; i < 16; i++) {
        ssize_t n = recv(t->fd, junk, sizeof junk, MSG_DONTWAIT);
        if (n > 0)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        break;
    }
    tconn_close(c, t, "refused");
}

/* A peer that speaks the wrong protocol for this port: one plaintext error
 * frame it can show, then the connection ends. Its bytes are read first, so
 * that closing does not reset the connection under our answer. */
static void tconn_refuse(struct ctl *c, struct tconn *t, const char *answer)
{
    struct tconn_x *x = tconn_x(t);
    if (x->tls) {
        sp_tls_free(x->tls);
        x->tls = NULL;
    }
    x->handshaking = false;
    ev_timer_stop(c->loop, &x->hs_timer);
    struct sp_err e;
    sp_errf(&e, SP_BAD_REQUEST, "%s", answer);
    tconn_error(c, t, 0, &e);
    tconn_flush(c, t);
    tconn_linger(c, t);
}

static void tls_read(struct ctl *c, struct tconn *t)
{
    struct tconn_x *x = tconn_x(t);
    for (int i = 0; i < TLS_READS_PER_TURN && !t->closing; i++) {
        ssize_t n = sp_tls_reader_fill(&t->rd, x->tls);
        if (n == 0) {
            tconn_close(c, t, "EOF");
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                x->read_wants_write = sp_tls_want(x->tls) == SP_TLS_WANT_WRITE;
                if (x->read_wants_write)
                    ev_io_start(c->loop, &t->wio);
                break;
            }
            if (errno == EMSGSIZE) {
                /* A frame over the limit: answered too_large as in plaintext. */
                tconn_dispatch_all(c, t);
                if (!t->closing)
                    tconn_close(c, t, "frame over the limit");
                return;
            }
            const char *why = *sp_tls_error(x->tls) ? sp_tls_error(x->tls) : strerror(errno);
            if (errno == ECONNRESET || errno == EPIPE)
                log_debug("trainer connection from %s: %s", x->peer, why);
            else
                tls_log_fail(c, "trainer connection from %s (%s): TLS: %s", x->peer,
                             sp_tls_peer_cn(x->tls), why);
            tconn_close(c, t, why);
            return;
        }
        tconn_dispatch_all(c, t);
        if (!sp_tls_pending(x->tls))
            break;
    }
    if (t->closing)
        return;
    /* Records already decrypted: the socket will not say so. */
    if (sp_tls_pending(x->tls))
        ev_feed_event(c->loop, &t->rio, EV_READ);
    /* A write may have waited for this read (TLS wanted to read first). */
    if (sp_writer_pending(&t->wr) && !ev_is_active(&t->wio))
        tconn_flush(c, t);
}

static void tls_handshake_step(struct ctl *c, struct tconn *t)
{
    struct tconn_x *x = tconn_x(t);
    if (!x->sniffed) {
        /* A plaintext client on a TLS port would otherwise see the
         * connection fail without a word: tell it in its own framing. */
        unsigned char b[8];
        ssize_t n = recv(t->fd, b, sizeof b, MSG_PEEK);
        if (n == 0) {
            log_debug("trainer connection from %s: closed before its TLS handshake", x->peer);
            tconn_close(c, t, "EOF before the TLS handshake");
            return;
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                tconn_close(c, t, strerror(errno));
            return;
        }
        x->sniffed = true;
        if (n >= 3 ? !sp_tls_looks_like_tls(b, (size_t)n) : b[0] != 0x16) {
            tls_log_fail(c,
                         "trainer connection from %s: plaintext client on a tls: listener, "
                         "refused",
                         x->peer);
            tconn_refuse(c, t,
                         "this port speaks TLS: connect with tls:HOST:PORT and a client "
                         "certificate (agentctl --tls-cert/--tls-key/--tls-ca)");
            return;
        }
    }
    struct sp_err e;
    int r = sp_tls_handshake(x->tls, &e);
    if (r == 0) {
        if (sp_tls_want(x->tls) == SP_TLS_WANT_WRITE)
            ev_io_start(c->loop, &t->wio);
        else
            ev_io_stop(c->loop, &t->wio);
        return;
    }
    if (r < 0) {
        /* wolfSSL's own words already begin "TLS handshake failed". */
        tls_log_fail(c, "trainer connection from %s: %s%s", x->peer,
                     strncmp(e.msg, "TLS ", 4) ? "TLS handshake failed: " : "", e.msg);
        tconn_linger(c, t); /* the alert wolfSSL sent says why */
        return;
    }
    x->handshaking = false;
    ev_timer_stop(c->loop, &x->hs_timer);
    ev_io_stop(c->loop, &t->wio);
    log_debug("trainer connection %d from %s: %s, client certificate '%s'", t->fd, x->peer,
              sp_tls_describe(x->tls), sp_tls_peer_cn(x->tls));
    /* The client's first frame may have come with its Finished. */
    if (sp_tls_pending(x->tls))
        ev_feed_event(c->loop, &t->rio, EV_READ);
}

static void hs_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct tconn *t = w->data;
    if (tconn_x(t)->lingering) {
        tconn_close(t->ctl, t, "refused");
        return;
    }
    tls_log_fail(t->ctl, "trainer connection from %s: no TLS handshake within %.0f s, closed",
                 tconn_x(t)->peer, TLS_HANDSHAKE_S);
    tconn_close(t->ctl, t, "TLS handshake timed out");
}

static void tconn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct tconn *t = w->data;
    struct ctl *c = t->ctl;
    struct tconn_x *x = tconn_x(t);
    if (t->closing)
        return;
    if (x->lingering) {
        linger_read(c, t);
        return;
    }
    if (x->handshaking) {
        tls_handshake_step(c, t);
        return;
    }
    if (x->tls) {
        tls_read(c, t);
        return;
    }
    ssize_t n = sp_reader_fill(&t->rd, t->fd);
    if (n == 0) {
        tconn_close(c, t, "EOF");
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            tconn_close(c, t, strerror(errno));
        return;
    }
    size_t have = t->rd.len - t->rd.off;
    if (x->l->tcp && !x->sniffed && (have >= 3 || (have && t->rd.buf[t->rd.off] != 0x16))) {
        /* A TLS ClientHello would read as a 369 MB frame length. */
        x->sniffed = true;
        if (have >= 3 && sp_tls_looks_like_tls(t->rd.buf + t->rd.off, have)) {
            tls_log_fail(c,
                         "trainer connection from %s: TLS client on a plaintext tcp: "
                         "listener, refused",
                         x->peer);
            tconn_refuse(c, t,
                         "this port speaks plaintext msgpack, not TLS: connect with "
                         "tcp:HOST:PORT");
            return;
        }
    }
    tconn_dispatch_all(c, t);
}

static void tconn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct tconn *t = w->data;
    struct tconn_x *x = tconn_x(t);
    if (t->closing)
        return;
    if (x->lingering) {
        tconn_flush(t->ctl, t);
        return;
    }
    if (x->handshaking) {
        tls_handshake_step(t->ctl, t);
        return;
    }
    if (x->read_wants_write) {
        x->read_wants_write = false;
        tls_read(t->ctl, t);
    }
    tconn_flush(t->ctl, t);
}

/* The certificate files changed (a renewal rewrote them): new handshakes
 * use the new ones; connections already open keep theirs. */
static void api_tls_reload(struct ctl *c)
{
    static char last_err[sizeof((struct sp_err *)0)->msg];
    struct sp_err e;
    int r = sp_tls_ctx_reload(c->api_tls, false, &e);
    if (r > 0) {
        char until[32] = "?";
        time_t na = sp_tls_ctx_not_after(c->api_tls);
        struct tm tm;
        if (na && gmtime_r(&na, &tm))
            strftime(until, sizeof until, "%Y-%m-%dT%H:%M:%SZ", &tm);
        log_info("API certificate reloaded: '%s', valid until %s", sp_tls_ctx_cn(c->api_tls),
                 until);
        last_err[0] = 0;
    } else if (r < 0 && strcmp(last_err, e.msg)) {
        snprintf(last_err, sizeof last_err, "%s", e.msg);
        log_warn("API certificate files changed but cannot be used (the old ones stay): %s", e.msg);
    }
}

static void peer_name(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
        port = ntohs(s4->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
        port = ntohs(s6->sin6_port);
    } else {
        snprintf(out, cap, "unix");
        return;
    }
    snprintf(out, cap, ss->ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", host, port);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct listener *l = w->data;
    struct ctl *c = l->ctl;
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss = {0};
        socklen_t sl = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                log_warn("accept: %s", strerror(errno));
            return;
        }
        struct tconn_x *x = calloc(1, sizeof *x);
        if (!x)
            abort();
        struct tconn *t = &x->t;
        x->l = l;
        peer_name(&ss, x->peer, sizeof x->peer);
        ev_timer_init(&x->hs_timer, hs_timeout_cb, TLS_HANDSHAKE_S, 0);
        x->hs_timer.data = t;
        if (l->tls) {
            api_tls_reload(c);
            struct sp_err e;
            x->tls = sp_tls_new(c->api_tls, fd, NULL, &e);
            if (!x->tls) {
                tls_log_fail(c, "trainer connection from %s: %s", x->peer, e.msg);
                close(fd);
                free(x);
                continue;
            }
            x->handshaking = true;
            ev_timer_start(loop, &x->hs_timer);
        }
        t->ctl = c;
        t->fd = fd;
        t->authed = c->token_len == 0;
        /* Unique across restarts too: a rebuilt lease of a connection of
         * the previous controller must not find a new owner by chance. */
        snprintf(t->owner, sizeof t->owner, "conn-%06" PRIx64 "-%" PRIu64, c->instance & 0xffffff,
                 ++c->conn_seq);
        sp_reader_init(&t->rd, SP_DEFAULT_MAX_FRAME);
        sp_writer_init(&t->wr, CONN_WRITE_LIMIT);
        TAILQ_INIT(&t->reqs);
        TAILQ_INIT(&t->waiters);
        ev_io_init(&t->rio, tconn_read_cb, fd, EV_READ);
        ev_io_init(&t->wio, tconn_write_cb, fd, EV_WRITE);
        t->rio.data = t->wio.data = t;
        ev_io_start(loop, &t->rio);
        LIST_INSERT_HEAD(&c->conns, t, link);
        c->nconns++;
    }
}

/* ---- listeners ----------------------------------------------------------- */

static int listen_unix(const char *path, struct sp_err *err)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return sp_errf(err, SP_BAD_REQUEST, "socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return sp_err_errno(err, errno, "socket");
    /* A socket file nobody answers on is left over from a crash: replace it.
     * One that answers belongs to a running controller: refuse. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0) {
        close(probe);
        close(fd);
        return sp_errf(err, SP_EXISTS, "%s: another controller is listening there", path);
    }
    if (probe >= 0)
        close(probe);
    unlink(path);
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (rc < 0 || listen(fd, 512) < 0) {
        int e = errno;
        close(fd);
        return sp_err_errno(err, e, path);
    }
    return fd;
}

static bool is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family != AF_INET6)
        return false;
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(a))
        return true;
    return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
}

/* addr is the whole listen address (for messages); a plaintext listener
 * (loopback_only) may not face the network. */
static int listen_tcp(const char *addr, const char *hostport, bool loopback_only,
                      struct sp_err *err)
{
    const char *colon = strrchr(hostport, ':');
    if (!colon)
        return sp_errf(err, SP_BAD_REQUEST, "%s: expected HOST:PORT", addr);
    char host[256];
    snprintf(host, sizeof host, "%.*s", (int)(colon - hostport), hostport);
    char *h = host;
    size_t hn = strlen(host);
    if (hn >= 2 && host[0] == '[' && host[hn - 1] == ']') { /* [::1]:PORT */
        host[hn - 1] = 0;
        h++;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    int rc = getaddrinfo(*h ? h : NULL, colon + 1, &hints, &res);
    if (rc)
        return sp_errf(err, SP_BAD_REQUEST, "%s: %s", addr, gai_strerror(rc));
    if (loopback_only && !is_loopback(res->ai_addr)) {
        freeaddrinfo(res);
        return sp_errf(err, SP_BAD_REQUEST,
                       "%s: a plaintext listener on a non-loopback address shows the token and "
                       "every command to the network: listen on tls:%s instead, or give "
                       "--insecure",
                       addr, hostport);
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 512) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        freeaddrinfo(res);
        return sp_err_errno(err, e, addr);
    }
    freeaddrinfo(res);
    return fd;
}

/* The server context of the tls: listeners: the controller's API
 * certificate, and the CA that trainers' certificates must chain to. That
 * is trainer-ca.pem, which signs trainer.pem and nothing else: the
 * controller's client certificate (ca.pem's, to reach agents) is refused
 * here. The context's CA only verifies clients; trainers check api.pem
 * against ca.pem on their side. */
static int api_tls_open(struct ctl *c, const char *addr, struct sp_err *err)
{
    char *cert = NULL, *key = NULL, *ca = NULL;
    if (asprintf(&cert, "%s/tls/api.pem", c->state_dir) < 0 ||
        asprintf(&key, "%s/tls/api.key", c->state_dir) < 0 ||
        asprintf(&ca, "%s/tls/trainer-ca.pem", c->state_dir) < 0)
        abort();
    const char *fc = c->api_tls_cert ? c->api_tls_cert : cert;
    const char *fk = c->api_tls_key ? c->api_tls_key : key;
    const char *fa = c->api_tls_ca ? c->api_tls_ca : ca;
    struct sp_err e;
    c->api_tls = sp_tls_ctx_new(SP_TLS_SERVER, fc, fk, fa, &e);
    int rc = 0;
    if (!c->api_tls)
        rc = sp_errf(err, e.code,
                     "%s: %s (the controller's CAs make STATE/tls/api.pem, api.key and "
                     "trainer-ca.pem at start; a site PKI gives --tls-cert, --tls-key and "
                     "--tls-ca)",
                     addr, e.msg);
    else
        log_info("%s: API certificate '%s' (%s); trainers' certificates must chain to %s", addr,
                 sp_tls_ctx_cn(c->api_tls), fc, fa);
    free(cert);
    free(key);
    free(ca);
    return rc;
}

int api_listen(struct ctl *c, struct sp_err *err)
{
    c->listeners = calloc(c->listen.n, sizeof *c->listeners);
    for (size_t i = 0; i < c->listen.n; i++) {
        const char *a = c->listen.v[i];
        struct listener *l = &c->listeners[i];
        l->ctl = c;
        if (!strncmp(a, "unix:", 5)) {
            l->fd = listen_unix(a + 5, err);
            if (l->fd >= 0)
                l->path = strdup(a + 5);
        } else if (!strncmp(a, "tcp:", 4)) {
            if (!c->token_len && !c->insecure)
                return sp_errf(err, SP_BAD_REQUEST,
                               "%s: a TCP listener needs --token-file (or --insecure to accept "
                               "anyone who can reach the port)",
                               a);
            l->fd = listen_tcp(a, a + 4, !c->insecure, err);
            l->tcp = true;
        } else if (!strncmp(a, "tls:", 4)) {
            /* Client certificates authenticate; a token stays a second factor. */
            if (!c->api_tls && api_tls_open(c, a, err) < 0)
                return -1;
            l->fd = listen_tcp(a, a + 4, false, err);
            l->tcp = l->tls = true;
        } else
            return sp_errf(err, SP_BAD_REQUEST,
                           "listen address '%s': use unix:PATH, tls:HOST:PORT or "
                           "tcp:HOST:PORT",
                           a);
        if (l->fd < 0)
            return -1;
        c->nlisteners++;
        ev_io_init(&l->io, accept_cb, l->fd, EV_READ);
        l->io.data = l;
        ev_io_start(c->loop, &l->io);
        log_info("listening on %s%s", a,
                 l->tls                    ? " (TLS 1.3, client certificates required)"
                 : l->tcp && !c->token_len ? " (insecure: no token)"
                                           : "");
    }
    return 0;
}

void api_close_all(struct ctl *c)
{
    for (size_t i = 0; i < c->nlisteners; i++) {
        ev_io_stop(c->loop, &c->listeners[i].io);
        close(c->listeners[i].fd);
        if (c->listeners[i].path) {
            unlink(c->listeners[i].path);
            free(c->listeners[i].path);
        }
    }
    c->nlisteners = 0;
    struct tconn *t;
    LIST_FOREACH(t, &c->conns, link)
    {
        if (t == c->stop_conn)
            ev_io_stop(c->loop, &t->rio); /* its answer may still be flushing */
        else
            tconn_close(c, t, "controller stopping");
    }
}
