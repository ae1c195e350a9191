/* Listeners (TCP, TLS, Unix) and connections (sockets and stdio):
 * non-blocking reads into the frame reader, answers through a capped writer,
 * in-flight limits with back-pressure, and orderly close. A TLS connection
 * first runs its handshake in the loop, under a timeout and outside the
 * connection count; a peer speaking the wrong protocol on either kind of
 * TCP port gets one plaintext error frame. */
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "idem.h"
#include "tls.h"

#define MAX_INFLIGHT 4096
#define MAX_CONNS 4096
/* Connections still in their TLS handshake: a flood of them cannot fill
 * the table that authenticated connections use. */
#define MAX_HANDSHAKES 1024
/* Handshake failures logged per second; the rest are summed up. */
#define TLS_LOG_PER_SECOND 10

struct listener {
    struct agent *ag;
    ev_io w;
    int fd;
    bool tcp;
    bool tls;      /* tls:HOST:PORT */
    bool loopback; /* bound to 127.0.0.0/8 or ::1 */
    char *unix_path;
    char name[160];
    struct listener *next;
};

struct conn {
    struct agent *ag;
    int rfd, wfd;
    ev_io rw, ww;
    struct sp_reader rd;
    struct sp_writer wr;
    bool authed;
    bool tcp;
    bool is_stdio;
    bool eof;         /* peer finished sending */
    bool close_after; /* close once output is flushed */
    bool dead;
    bool in_read;   /* inside the read callback: defer frees */
    bool lingering; /* error sent, write side shut: discard input, then close */
    ev_timer linger_w;
    struct sp_tls *tls;    /* TLS link, or NULL for plaintext */
    bool handshaking;      /* TLS handshake not done yet */
    bool in_hs_table;      /* counted in ag->nhandshaking */
    bool counted;          /* counted in ag->nconns */
    bool first_checked;    /* plaintext: first bytes looked at (TLS client?) */
    bool read_wants_write; /* TLS read waits for the socket to be writable */
    ev_timer hs_w;         /* handshake timeout */
    char peer[64];         /* the peer's address, for handshake failure lines */
    unsigned inflight;
    struct req *reqs;
    struct conn *prev, *next;
    char name[96];
};

static void conn_close(struct conn *c, const char *why);
static int conn_handshake(struct conn *c);

/* Can the peer still be reading? A peer that finished sending may have
 * gone away entirely: what is written to it may never arrive. */
bool conn_peer_reading(const struct conn *c)
{
    return !c->eof && !c->dead && !c->close_after && !c->lingering;
}

bool conn_authed(const struct conn *c)
{
    return c->authed;
}

void conn_set_authed(struct conn *c, bool ok)
{
    c->authed = ok;
}

struct sp_writer *conn_writer(struct conn *c)
{
    return &c->wr;
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK))
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void conn_update_read(struct conn *c)
{
    bool want =
        !c->dead && !c->eof && (c->lingering || (!c->close_after && c->inflight < MAX_INFLIGHT));
    if (want && !ev_is_active(&c->rw)) {
        ev_io_start(c->ag->loop, &c->rw);
        /* Records TLS already holds would not wake a level-triggered
         * watcher: the socket may have nothing more to say. */
        if (c->tls && !c->handshaking && !c->lingering && sp_tls_pending(c->tls))
            ev_feed_event(c->ag->loop, &c->rw, EV_READ);
    } else if (!want && ev_is_active(&c->rw))
        ev_io_stop(c->ag->loop, &c->rw);
}

/* Closing rules once the peer has stopped sending: keep the connection until
 * every in-flight request is answered and flushed (a client may half-close),
 * then close; under --stdio that ends the agent. */
static void conn_check_done(struct conn *c)
{
    if (c->dead)
        return;
    size_t pending = sp_writer_pending(&c->wr);
    if (c->close_after && pending == 0 && !c->lingering) {
        if (c->is_stdio) {
            conn_close(c, "closed after error");
            return;
        }
        /* Closing with unread input would reset the connection and could
         * destroy the error answer in flight: shut our side, drain theirs for
         * a bounded time, then close. */
        if (c->tls && !c->handshaking)
            sp_tls_shutdown(c->tls);
        shutdown(c->wfd, SHUT_WR);
        c->lingering = true;
        ev_timer_start(c->ag->loop, &c->linger_w);
        conn_update_read(c);
        return;
    }
    if (c->eof && c->inflight == 0 && pending == 0)
        conn_close(c, "peer closed");
}

static void conn_flush(struct conn *c)
{
    if (c->dead)
        return;
    ssize_t left = c->tls ? sp_tls_writer_flush(&c->wr, c->tls) : sp_writer_flush(&c->wr, c->wfd);
    if (left < 0) {
        char why[600];
        snprintf(why, sizeof why, "write failed: %s",
                 c->tls ? sp_tls_error(c->tls) : strerror(errno));
        conn_close(c, why);
        return;
    }
    if (left > 0 && !ev_is_active(&c->ww))
        ev_io_start(c->ag->loop, &c->ww);
    else if (left == 0 && ev_is_active(&c->ww))
        ev_io_stop(c->ag->loop, &c->ww);
    if (left == 0)
        conn_check_done(c);
}

void conn_frame_done(struct conn *c)
{
    if (c->dead)
        return;
    if (c->wr.overflow) {
        log_warn("%s: dropped: client does not read its answers (%zu bytes queued)", c->name,
                 sp_writer_pending(&c->wr));
        c->ag->conns_dropped++;
        conn_close(c, "output buffer over its cap");
        return;
    }
    /* Writing at once costs one syscall per answer and keeps latency minimal;
     * a full socket falls back to the write watcher. */
    if (!ev_is_active(&c->ww))
        conn_flush(c);
}

void conn_req_add(struct conn *c, struct req *rq)
{
    rq->conn_prev = NULL;
    rq->conn_next = c->reqs;
    if (c->reqs)
        c->reqs->conn_prev = rq;
    c->reqs = rq;
    c->inflight++;
    if (c->inflight >= MAX_INFLIGHT)
        conn_update_read(c);
}

void conn_req_del(struct conn *c, struct req *rq)
{
    if (rq->conn_prev)
        rq->conn_prev->conn_next = rq->conn_next;
    else
        c->reqs = rq->conn_next;
    if (rq->conn_next)
        rq->conn_next->conn_prev = rq->conn_prev;
    rq->conn = NULL;
    c->inflight--;
    if (c->inflight == MAX_INFLIGHT / 2)
        conn_update_read(c);
    if (c->inflight == 0 && c->eof && !c->in_read)
        conn_check_done(c);
}

static void conn_free(struct conn *c)
{
    sp_tls_free(c->tls);
    sp_reader_free(&c->rd);
    sp_writer_free(&c->wr);
    free(c);
}

static void conn_close(struct conn *c, const char *why)
{
    if (c->dead)
        return;
    struct agent *ag = c->ag;
    c->dead = true;
    log_debug("%s: closing: %s", c->name, why);
    ev_io_stop(ag->loop, &c->rw);
    ev_io_stop(ag->loop, &c->ww);
    ev_timer_stop(ag->loop, &c->linger_w);
    ev_timer_stop(ag->loop, &c->hs_w);
    /* Requests still queued on slots are dropped (nobody to answer); running
     * commands keep running and can be attached again. Repeats waiting on a
     * key go first, so that none of them is picked to run a dropped first
     * request's key. */
    idem_conn_gone(ag, c);
    slot_drop_conn(ag, c);
    exec_conn_gone(ag, c);
    while (c->reqs) {
        struct req *rq = c->reqs;
        c->reqs = rq->conn_next;
        rq->conn = NULL;
        rq->conn_prev = rq->conn_next = NULL;
    }
    c->inflight = 0;
    if (c->prev)
        c->prev->next = c->next;
    else
        ag->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->counted)
        ag->nconns--;
    if (c->in_hs_table)
        ag->nhandshaking--;
    if (c->is_stdio) {
        /* stdout is the stream: leave fd 1 open but useless rather than let a
         * later open() reuse it. */
        log_info("stdio stream closed: shutting down");
        if (!ag->stopping)
            agent_shutdown(ag, "stdin closed");
    } else {
        /* Best effort: one close_notify, never waiting for the peer. */
        if (c->tls && !c->handshaking && !c->lingering)
            sp_tls_shutdown(c->tls);
        close(c->rfd);
    }
    if (!c->in_read)
        conn_free(c);
}

/* ---- TLS ----------------------------------------------------------------- */

const struct sp_tls *conn_tls(const struct conn *c)
{
    return c && c->tls && !c->handshaking ? c->tls : NULL;
}

void conn_tls_reload(struct agent *ag, bool force)
{
    if (!ag->tls)
        return;
    struct sp_err err;
    int rc = sp_tls_ctx_reload(ag->tls, force, &err);
    if (rc < 0) {
        log_warn("TLS: reloading the certificate files failed: %s", err.msg);
    } else if (rc > 0) {
        char when[40] = "?";
        time_t na = sp_tls_ctx_not_after(ag->tls);
        struct tm tm;
        if (na && gmtime_r(&na, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
        log_info("TLS: certificate reloaded (CN=%s, notAfter %s); open connections keep theirs",
                 sp_tls_ctx_cn(ag->tls), when);
    }
}

void conn_tls_log_flush(struct agent *ag)
{
    if (ag->tls_log_suppressed) {
        log_warn("%llu more failed TLS handshakes (at most %d are logged per second)",
                 (unsigned long long)ag->tls_log_suppressed, TLS_LOG_PER_SECOND);
        ag->tls_log_suppressed = 0;
    }
}

/* One warn line per failed handshake, at most TLS_LOG_PER_SECOND a second,
 * so a flood of bad clients cannot fill the log. */
static void tls_fail_log(struct agent *ag, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void tls_fail_log(struct agent *ag, const char *fmt, ...)
{
    double now = ev_now(ag->loop);
    if (now - ag->tls_log_window >= 1.0) {
        conn_tls_log_flush(ag);
        ag->tls_log_window = now;
        ag->tls_log_lines = 0;
    }
    if (ag->tls_log_lines >= TLS_LOG_PER_SECOND) {
        ag->tls_log_suppressed++;
        return;
    }
    ag->tls_log_lines++;
    char line[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log_warn("%s", line);
}

/* Queue one plaintext error frame and close once it is out (the linger
 * path drains what the peer still sends). */
static void conn_answer_close(struct conn *c, enum sp_code code, const char *msg)
{
    struct sp_err err;
    sp_errf(&err, code, "%s", msg);
    msgpack_packer pk;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_error(&pk, 0, &err);
    sp_writer_end_frame(&c->wr, &err);
    c->ag->errors++;
    c->close_after = true;
    conn_update_read(c);
    conn_flush(c);
}

static void tls_failed(struct conn *c, const char *why, bool linger)
{
    struct agent *ag = c->ag;
    ag->tls_failures++;
    tls_fail_log(ag, "%s from %s: TLS handshake failed: %s", c->name, c->peer, why);
    if (!linger) {
        conn_close(c, why);
        return;
    }
    /* The alert is on its way, but with TLS 1.3 the client may already be
     * sending requests: closing with those unread would reset the
     * connection and destroy the alert before it is read. Shut our side and
     * drain theirs for a bounded time, as after a plaintext error. */
    ev_timer_stop(ag->loop, &c->hs_w);
    ev_io_stop(ag->loop, &c->ww);
    shutdown(c->wfd, SHUT_WR);
    c->close_after = true;
    c->lingering = true;
    ev_timer_start(ag->loop, &c->linger_w);
    conn_update_read(c);
}

static void hs_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct conn *c = w->data;
    char why[96];
    snprintf(why, sizeof why, "no handshake within %.0f s (a silent or stalled client)",
             c->ag->opt.tls_handshake_timeout);
    tls_failed(c, why, false);
}

/* Drives the handshake. 1: done (read on), 0: waiting, -1: c is gone or
 * answered and closing. Never called inside the read loop (c->in_read is
 * false), so conn_close frees c at once. */
static int conn_handshake(struct conn *c)
{
    struct agent *ag = c->ag;
    if (!c->first_checked) {
        /* A plaintext client would otherwise meet a record-layer error: look
         * at its first bytes and answer in its own protocol. */
        unsigned char b[5];
        ssize_t n = recv(c->rfd, b, sizeof b, MSG_PEEK);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return 0;
        if (n <= 0) {
            /* Connect-and-close: port probes and health checks, not worth a
             * warning. */
            log_debug("%s from %s: closed before a TLS handshake", c->name, c->peer);
            conn_close(c, "closed before the TLS handshake");
            return -1;
        }
        c->first_checked = true;
        if (!sp_tls_looks_like_tls(b, (size_t)n)) {
            ag->tls_failures++;
            tls_fail_log(ag,
                         "%s from %s: a plaintext client on the TLS listener: answered with "
                         "an error",
                         c->name, c->peer);
            ev_timer_stop(ag->loop, &c->hs_w);
            sp_tls_free(c->tls);
            c->tls = NULL;
            c->handshaking = false;
            conn_answer_close(c, SP_BAD_REQUEST,
                              "this port speaks TLS (tls:): connect with TLS 1.3 and a client "
                              "certificate, or use the agent's tcp: listener");
            return -1;
        }
    }
    struct sp_err err;
    int rc = sp_tls_handshake(c->tls, &err);
    if (rc < 0) {
        tls_failed(c, err.msg, true);
        return -1;
    }
    if (rc == 0) {
        if (sp_tls_want(c->tls) == SP_TLS_WANT_WRITE)
            ev_io_start(ag->loop, &c->ww);
        else if (ev_is_active(&c->ww))
            ev_io_stop(ag->loop, &c->ww);
        return 0;
    }
    ev_timer_stop(ag->loop, &c->hs_w);
    if (ev_is_active(&c->ww) && sp_writer_pending(&c->wr) == 0)
        ev_io_stop(ag->loop, &c->ww);
    c->handshaking = false;
    c->in_hs_table = false;
    ag->nhandshaking--;
    ag->tls_handshakes++;
    if (ag->nconns >= MAX_CONNS) {
        log_warn("%s: refusing connection: too many connections", c->name);
        conn_close(c, "too many connections");
        return -1;
    }
    c->counted = true;
    ag->nconns++;
    log_debug("%s from %s: %s, client CN=%s", c->name, c->peer, sp_tls_describe(c->tls),
              sp_tls_peer_cn(c->tls));
    return 1;
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct conn *c = w->data;
    struct agent *ag = c->ag;
    if (c->lingering) {
        char sink[65536];
        for (int i = 0; i < 64; i++) {
            ssize_t n = read(c->rfd, sink, sizeof sink);
            if (n > 0)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            conn_close(c, "closed after error");
            return;
        }
        return;
    }
    if (c->handshaking && conn_handshake(c) <= 0)
        return;
    c->in_read = true;
    bool drained = false; /* the socket said EAGAIN: nothing TLS can hold back */
    /* Bounded work per wake-up so one busy client cannot starve the others. */
    for (int round = 0; round < 16 && !c->dead && !c->eof && !c->close_after; round++) {
        ssize_t n = c->tls ? sp_tls_reader_fill(&c->rd, c->tls) : sp_reader_fill(&c->rd, c->rfd);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                drained = true;
                if (c->tls && sp_tls_want(c->tls) == SP_TLS_WANT_WRITE) {
                    c->read_wants_write = true;
                    ev_io_start(ag->loop, &c->ww);
                }
                break;
            }
            if (errno == EINTR)
                continue;
            char why[600];
            snprintf(why, sizeof why, "read failed: %s",
                     c->tls && errno != ENOMEM ? sp_tls_error(c->tls) : strerror(errno));
            if (c->tls)
                log_info("%s: %s", c->name, why);
            conn_close(c, why);
            break;
        }
        if (!c->first_checked && !c->tls && !c->is_stdio && sp_reader_pending(&c->rd) > 0) {
            /* A TLS ClientHello read as a frame would announce a frame of
             * hundreds of megabytes: name it instead. */
            c->first_checked = true;
            size_t k = sp_reader_pending(&c->rd);
            if (sp_tls_looks_like_tls(c->rd.buf + c->rd.off, k < 3 ? k : 3)) {
                log_warn("%s: a TLS client on the plaintext listener: answered with an error",
                         c->name);
                c->rd.off = c->rd.len;
                struct sp_err e;
                sp_errf(&e, SP_BAD_REQUEST,
                        "this port speaks plaintext (tcp:), not TLS: connect with tcp:, or to "
                        "the agent's tls: listener");
                msgpack_packer pk;
                sp_writer_begin_frame(&c->wr);
                sp_writer_packer(&c->wr, &pk);
                sp_pack_error(&pk, 0, &e);
                sp_writer_end_frame(&c->wr, &e);
                ag->errors++;
                c->close_after = true;
                break;
            }
        }
        if (n == 0) {
            c->eof = true;
            if (sp_reader_pending(&c->rd) > 0)
                log_debug("%s: %zu bytes of an incomplete frame at EOF", c->name,
                          sp_reader_pending(&c->rd));
        }
        const char *data;
        uint32_t len;
        struct sp_err err;
        int r;
        while (!c->dead && !c->close_after &&
               (r = sp_reader_next(&c->rd, &data, &len, &err)) != 0) {
            if (r < 0) {
                log_warn("%s: %s", c->name, err.msg);
                msgpack_packer pk;
                sp_writer_begin_frame(&c->wr);
                sp_writer_packer(&c->wr, &pk);
                sp_pack_error(&pk, 0, &err);
                sp_writer_end_frame(&c->wr, &err);
                ag->errors++;
                c->close_after = true;
                break;
            }
            dispatch_frame(ag, c, data, len);
            if (c->inflight >= MAX_INFLIGHT)
                break;
        }
        if (c->inflight >= MAX_INFLIGHT)
            break;
        if (n == 0)
            break;
    }
    c->in_read = false;
    if (c->dead) {
        conn_free(c);
        return;
    }
    conn_update_read(c);
    /* Stopped early (round limit) with whole records still inside TLS:
     * come back for them, the socket will not say so. */
    if (c->tls && !drained && ev_is_active(&c->rw) && sp_tls_pending(c->tls))
        ev_feed_event(ag->loop, &c->rw, EV_READ);
    if (c->close_after)
        conn_flush(c);
    else
        conn_check_done(c);
}

static void linger_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    conn_close(w->data, "closed after error (linger timeout)");
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct conn *c = w->data;
    if (c->handshaking) {
        if (conn_handshake(c) == 1)
            ev_feed_event(loop, &c->rw, EV_READ);
        return;
    }
    if (c->read_wants_write) {
        c->read_wants_write = false;
        ev_feed_event(loop, &c->rw, EV_READ);
    }
    conn_flush(c);
}

/* counted: the connection takes a place in the table now (a TLS one does
 * when its handshake is done). */
static struct conn *conn_new(struct agent *ag, int rfd, int wfd, const char *name, bool counted)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->ag = ag;
    c->rfd = rfd;
    c->wfd = wfd;
    sp_reader_init(&c->rd, ag->opt.max_frame);
    /* Room for two maximal frames, so one large answer can queue behind
     * another; beyond that the client is not reading. */
    sp_writer_init(&c->wr, (size_t)ag->opt.max_frame * 2);
    snprintf(c->name, sizeof c->name, "%s", name);
    ev_io_init(&c->rw, conn_read_cb, rfd, EV_READ);
    ev_io_init(&c->ww, conn_write_cb, wfd, EV_WRITE);
    c->rw.data = c->ww.data = c;
    ev_timer_init(&c->linger_w, linger_cb, 2.0, 0.0);
    c->linger_w.data = c;
    ev_timer_init(&c->hs_w, hs_timeout_cb, ag->opt.tls_handshake_timeout, 0.0);
    c->hs_w.data = c;
    c->authed = ag->token_len == 0;
    c->next = ag->conns;
    if (ag->conns)
        ag->conns->prev = c;
    ag->conns = c;
    c->counted = counted;
    if (counted)
        ag->nconns++;
    ag->conns_total++;
    ev_io_start(ag->loop, &c->rw);
    return c;
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct listener *l = w->data;
    struct agent *ag = l->ag;
    /* Renewed files are picked up before the next handshake (a stat of
     * each, only when something connects). */
    if (l->tls)
        conn_tls_reload(ag, false);
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                log_warn("%s: accept: %s", l->name, strerror(errno));
            return;
        }
        if (ag->nconns >= MAX_CONNS || ag->stopping ||
            (l->tls && ag->nhandshaking >= MAX_HANDSHAKES)) {
            if (l->tls && !ag->stopping && ag->nconns < MAX_CONNS)
                tls_fail_log(ag, "%s: refusing connection: %u TLS handshakes in progress", l->name,
                             ag->nhandshaking);
            else
                log_warn("%s: refusing connection: %s", l->name,
                         ag->stopping ? "shutting down" : "too many connections");
            close(fd);
            continue;
        }
        if (l->tcp) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        char name[96];
        snprintf(name, sizeof name, "conn %llu (%.60s)", (unsigned long long)ag->conns_total + 1,
                 l->name);
        struct conn *c = conn_new(ag, fd, fd, name, !l->tls);
        if (!c) {
            close(fd);
            continue;
        }
        c->tcp = l->tcp;
        char abuf[INET6_ADDRSTRLEN] = "?";
        if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, abuf, sizeof abuf);
            snprintf(c->peer, sizeof c->peer, "%s:%u", abuf,
                     ntohs(((struct sockaddr_in *)&ss)->sin_port));
        } else if (ss.ss_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, abuf, sizeof abuf);
            snprintf(c->peer, sizeof c->peer, "[%s]:%u", abuf,
                     ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
        } else {
            snprintf(c->peer, sizeof c->peer, "a local socket");
        }
        if (l->tls) {
            struct sp_err err;
            c->tls = sp_tls_new(ag->tls, fd, NULL, &err);
            if (!c->tls) {
                log_warn("%s: %s", c->name, err.msg);
                conn_close(c, err.msg);
                continue;
            }
            c->handshaking = true;
            c->in_hs_table = true;
            ag->nhandshaking++;
            ev_timer_start(ag->loop, &c->hs_w);
        }
        log_debug("%s: accepted from %s", c->name, c->peer);
    }
}

int conn_open_stdio(struct agent *ag, struct sp_err *err)
{
    set_nonblock(0);
    set_nonblock(1);
    struct conn *c = conn_new(ag, 0, 1, "stdio", true);
    if (!c)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    c->is_stdio = true;
    return 0;
}

static int listen_unix(struct listener *l, const char *path, struct sp_err *err)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return sp_errf(err, SP_BAD_REQUEST, "unix socket path too long (max %zu): %s",
                       sizeof sa.sun_path - 1, path);
    strcpy(sa.sun_path, path);
    struct stat st;
    /* A stale socket from a previous run is replaced; anything else is not
     * ours to delete. */
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return sp_errf(err, SP_EXISTS, "%s exists and is not a socket", path);
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0) {
            close(probe);
            return sp_errf(err, SP_EXISTS, "another agent is listening on %s", path);
        }
        if (probe >= 0)
            close(probe);
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return sp_err_errno(err, errno, "socket");
    /* Bind under a temporary name and rename once listening, so a client
     * that sees the path never gets ECONNREFUSED from a half-made socket. */
    struct sockaddr_un tmp = {.sun_family = AF_UNIX};
    int tl = snprintf(tmp.sun_path, sizeof tmp.sun_path, "%s.%d~", path, (int)getpid());
    bool staged = tl > 0 && (size_t)tl < sizeof tmp.sun_path;
    if (!staged)
        tmp = sa;
    unlink(tmp.sun_path);
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&tmp, sizeof tmp);
    umask(old);
    if (rc < 0 || listen(fd, 512) < 0 || (staged && rename(tmp.sun_path, path) < 0)) {
        int e = errno;
        if (rc == 0)
            unlink(tmp.sun_path);
        close(fd);
        return sp_errf(err, SP_INTERNAL, "listen on unix:%s: %s", path, strerror(e));
    }
    l->fd = fd;
    l->unix_path = strdup(path);
    snprintf(l->name, sizeof l->name, "unix:%s", path);
    return 0;
}

/* Numeric addresses only (plus "localhost" and "*"): a static agent must not
 * need glibc's NSS modules at run time, which name lookups would load. */
static int listen_tcp(struct listener *l, const char *scheme, const char *hostport,
                      struct sp_err *err)
{
    char host[256];
    const char *colon = strrchr(hostport, ':');
    if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof host)
        return sp_errf(err, SP_BAD_REQUEST, "%s listener must be %s:HOST:PORT, got %s:%s", scheme,
                       scheme, scheme, hostport);
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = 0;
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    char *end;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port > 65535)
        return sp_errf(err, SP_BAD_REQUEST, "%s:%s: bad port", scheme, hostport);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sl;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (!strcmp(host, "localhost"))
        snprintf(host, sizeof host, "127.0.0.1");
    if (!strcmp(host, "*") || !strcmp(host, "0.0.0.0")) {
        s4->sin_family = AF_INET;
        s4->sin_addr.s_addr = htonl(INADDR_ANY);
        s4->sin_port = htons((uint16_t)port);
        sl = sizeof *s4;
    } else if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        sl = sizeof *s4;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        sl = sizeof *s6;
    } else {
        return sp_errf(err, SP_BAD_REQUEST,
                       "%s:%s: host must be a numeric IPv4/IPv6 address, localhost or *", scheme,
                       hostport);
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return sp_err_errno(err, errno, "socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0 || listen(fd, 512) < 0) {
        int e = errno;
        close(fd);
        return sp_errf(err, SP_INTERNAL, "listen on %s:%s: %s", scheme, hostport, strerror(e));
    }
    sl = sizeof ss;
    char abuf[INET6_ADDRSTRLEN] = "?";
    unsigned bound = (unsigned)port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &s4->sin_addr, abuf, sizeof abuf);
            bound = ntohs(s4->sin_port);
            l->loopback = (ntohl(s4->sin_addr.s_addr) >> 24) == 127;
        } else {
            inet_ntop(AF_INET6, &s6->sin6_addr, abuf, sizeof abuf);
            bound = ntohs(s6->sin6_port);
            l->loopback =
                IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr) ||
                (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr) && s6->sin6_addr.s6_addr[12] == 127);
        }
    }
    snprintf(l->name, sizeof l->name, ss.ss_family == AF_INET6 ? "%s:[%s]:%u" : "%s:%s:%u", scheme,
             abuf, bound);
    l->fd = fd;
    l->tcp = true;
    return 0;
}

int listeners_open(struct agent *ag, const char *const *specs, unsigned n, struct sp_err *err)
{
    for (unsigned i = 0; i < n; i++) {
        struct listener *l = calloc(1, sizeof *l);
        if (!l)
            return sp_errf(err, SP_INTERNAL, "out of memory");
        l->ag = ag;
        l->fd = -1;
        int rc;
        if (strncmp(specs[i], "unix:", 5) == 0)
            rc = listen_unix(l, specs[i] + 5, err);
        else if (strncmp(specs[i], "tcp:", 4) == 0)
            rc = listen_tcp(l, "tcp", specs[i] + 4, err);
        else if (strncmp(specs[i], "tls:", 4) == 0) {
            l->tls = true;
            rc = ag->tls ? listen_tcp(l, "tls", specs[i] + 4, err)
                         : sp_errf(err, SP_BAD_REQUEST,
                                   "%s: a tls: listener needs --tls-cert, --tls-key and --tls-ca",
                                   specs[i]);
        } else
            rc = sp_errf(err, SP_BAD_REQUEST,
                         "listener must be unix:PATH, tcp:HOST:PORT or tls:HOST:PORT, got '%s'",
                         specs[i]);
        if (rc < 0) {
            free(l);
            return -1;
        }
        const char *refuse = NULL;
        if (l->tcp && !l->tls && !l->loopback && !ag->opt.insecure)
            refuse = "a plaintext TCP listener on a non-loopback address lets anyone on the path "
                     "read the token and every command: listen with tls: (--tls-cert, --tls-key, "
                     "--tls-ca), or give --insecure";
        else if (l->tcp && !l->tls && ag->token_len == 0 && !ag->opt.insecure)
            refuse = "a TCP listener needs --token-file (or --insecure to accept anyone who can "
                     "reach the port)";
        if (refuse) {
            close(l->fd);
            free(l);
            return sp_errf(err, SP_UNAUTHORIZED, "%s: %s", specs[i], refuse);
        }
        if (l->tls)
            ag->tls_listen = true;
        ev_io_init(&l->w, accept_cb, l->fd, EV_READ);
        l->w.data = l;
        ev_io_start(ag->loop, &l->w);
        l->next = ag->listeners;
        ag->listeners = l;
        log_info("listening on %s%s", l->name,
                 l->tls ? (ag->token_len ? " (TLS 1.3, client certificate and token)"
                                         : " (TLS 1.3, client certificate; no token)")
                 : l->tcp && ag->token_len == 0 ? " (insecure: no token)"
                 : l->tcp && !l->loopback       ? " (insecure: plaintext)"
                                                : "");
    }
    return 0;
}

void listeners_close(struct agent *ag)
{
    while (ag->listeners) {
        struct listener *l = ag->listeners;
        ag->listeners = l->next;
        ev_io_stop(ag->loop, &l->w);
        close(l->fd);
        if (l->unix_path) {
            unlink(l->unix_path);
            free(l->unix_path);
        }
        free(l);
    }
}

void conns_close_all(struct agent *ag)
{
    while (ag->conns) {
        struct conn *c = ag->conns;
        if (c->tls && !c->handshaking)
            sp_tls_writer_flush(&c->wr, c->tls);
        else if (!c->tls)
            sp_writer_flush(&c->wr, c->wfd);
        bool stdio = c->is_stdio;
        c->is_stdio = false; /* no shutdown recursion; fds 0/1 stay open */
        if (stdio)
            c->rfd = -1;
        conn_close(c, "agent shutting down");
    }
}

/* Everything answered and written? Used to finish shutdown early. */
bool conns_idle(struct agent *ag)
{
    for (struct conn *c = ag->conns; c; c = c->next)
        if (c->inflight || sp_writer_pending(&c->wr))
            return false;
    return true;
}
