/* Listeners (TCP, Unix) and connections (sockets and stdio): non-blocking
 * reads into the frame reader, answers through a capped writer, in-flight
 * limits with back-pressure, and orderly close. */
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "idem.h"

#define MAX_INFLIGHT 4096
#define MAX_CONNS 4096

struct listener {
    struct agent *ag;
    ev_io w;
    int fd;
    bool tcp;
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
    unsigned inflight;
    struct req *reqs;
    struct conn *prev, *next;
    char name[96];
};

static void conn_close(struct conn *c, const char *why);

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
    if (want && !ev_is_active(&c->rw))
        ev_io_start(c->ag->loop, &c->rw);
    else if (!want && ev_is_active(&c->rw))
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
    ssize_t left = sp_writer_flush(&c->wr, c->wfd);
    if (left < 0) {
        char why[96];
        snprintf(why, sizeof why, "write failed: %s", strerror(errno));
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
    ag->nconns--;
    if (c->is_stdio) {
        /* stdout is the stream: leave fd 1 open but useless rather than let a
         * later open() reuse it. */
        log_info("stdio stream closed: shutting down");
        if (!ag->stopping)
            agent_shutdown(ag, "stdin closed");
    } else {
        close(c->rfd);
    }
    if (!c->in_read)
        conn_free(c);
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
    c->in_read = true;
    /* Bounded work per wake-up so one busy client cannot starve the others. */
    for (int round = 0; round < 16 && !c->dead && !c->eof && !c->close_after; round++) {
        ssize_t n = sp_reader_fill(&c->rd, c->rfd);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            char why[96];
            snprintf(why, sizeof why, "read failed: %s", strerror(errno));
            conn_close(c, why);
            break;
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
    (void)loop;
    (void)revents;
    conn_flush(w->data);
}

static struct conn *conn_new(struct agent *ag, int rfd, int wfd, const char *name)
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
    c->authed = ag->token_len == 0;
    c->next = ag->conns;
    if (ag->conns)
        ag->conns->prev = c;
    ag->conns = c;
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
    for (int i = 0; i < 64; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                log_warn("%s: accept: %s", l->name, strerror(errno));
            return;
        }
        if (ag->nconns >= MAX_CONNS || ag->stopping) {
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
        struct conn *c = conn_new(ag, fd, fd, name);
        if (!c) {
            close(fd);
            continue;
        }
        c->tcp = l->tcp;
        log_debug("%s: accepted", c->name);
    }
}

int conn_open_stdio(struct agent *ag, struct sp_err *err)
{
    set_nonblock(0);
    set_nonblock(1);
    struct conn *c = conn_new(ag, 0, 1, "stdio");
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
static int listen_tcp(struct listener *l, const char *hostport, struct sp_err *err)
{
    char host[256];
    const char *colon = strrchr(hostport, ':');
    if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof host)
        return sp_errf(err, SP_BAD_REQUEST, "tcp listener must be tcp:HOST:PORT, got tcp:%s",
                       hostport);
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
        return sp_errf(err, SP_BAD_REQUEST, "tcp:%s: bad port", hostport);
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
                       "tcp:%s: host must be a numeric IPv4/IPv6 address, localhost or *",
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
        return sp_errf(err, SP_INTERNAL, "listen on tcp:%s: %s", hostport, strerror(e));
    }
    sl = sizeof ss;
    char abuf[INET6_ADDRSTRLEN] = "?";
    unsigned bound = (unsigned)port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &s4->sin_addr, abuf, sizeof abuf);
            bound = ntohs(s4->sin_port);
        } else {
            inet_ntop(AF_INET6, &s6->sin6_addr, abuf, sizeof abuf);
            bound = ntohs(s6->sin6_port);
        }
    }
    snprintf(l->name, sizeof l->name, ss.ss_family == AF_INET6 ? "tcp:[%s]:%u" : "tcp:%s:%u", abuf,
             bound);
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
            rc = listen_tcp(l, specs[i] + 4, err);
        else
            rc = sp_errf(err, SP_BAD_REQUEST,
                         "listener must be unix:PATH or tcp:HOST:PORT, got '%s'", specs[i]);
        if (rc < 0) {
            free(l);
            return -1;
        }
        if (l->tcp && ag->token_len == 0 && !ag->opt.insecure) {
            close(l->fd);
            free(l);
            return sp_errf(err, SP_UNAUTHORIZED,
                           "%s: a TCP listener needs --token-file (or --insecure to accept "
                           "anyone who can reach the port)",
                           specs[i]);
        }
        ev_io_init(&l->w, accept_cb, l->fd, EV_READ);
        l->w.data = l;
        ev_io_start(ag->loop, &l->w);
        l->next = ag->listeners;
        ag->listeners = l;
        log_info("listening on %s%s", l->name,
                 l->tcp && ag->token_len == 0 ? " (insecure: no token)" : "");
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
