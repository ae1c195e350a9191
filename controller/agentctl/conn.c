/* agentctl's connection to the controller or an agent: the address
 * defaults, connecting over unix:, tcp: or tls: (the TLS handshake with
 * our client certificate) or spawning --agent-cmd, closing (and reaping the
 * command), and the blocking request loop on top: frames sent and read with
 * poll() and a deadline on every wait, a signalfd that interrupts a wait,
 * a progress line for long answers, and answers sorted by request id. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agentctl.h"
#include "slotproto.h"

#define CHILD_GRACE_S 3.0

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ---- connection ------------------------------------------------------------ */

/* The controller's socket in $XDG_RUNTIME_DIR, else a per-user one in /tmp. */
static const char *builtin_controller_addr(void)
{
    static char addr[4200];
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (addr[0])
        return addr;
    if (xdg && *xdg)
        snprintf(addr, sizeof addr, "unix:%.4000s/slot-controller.sock", xdg);
    else
        snprintf(addr, sizeof addr, "unix:/tmp/slot-controller-%u.sock", (unsigned)getuid());
    return addr;
}

const char *default_controller_addr(void)
{
    const char *env = getenv("SLOT_CONTROLLER");
    return env && *env ? env : builtin_controller_addr();
}

static int spawn_agent_cmd(struct ctl *c)
{
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) < 0)
        return fail(c, "", "pipe: %s", strerror(errno));
    if (pipe2(out, O_CLOEXEC) < 0) {
        close(in[0]);
        close(in[1]);
        return fail(c, "", "pipe: %s", strerror(errno));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        return fail(c, "", "fork: %s", strerror(e));
    }
    if (pid == 0) {
        /* Ignored signals stay ignored across execve; the agent wants SIGPIPE back. */
        signal(SIGPIPE, SIG_DFL);
        if (dup2(in[0], 0) < 0 || dup2(out[1], 1) < 0)
            _exit(127);
        execl("/bin/sh", "sh", "-c", c->agent_cmd, (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    c->child = pid;
    c->wfd = in[1];
    c->rfd = out[0];
    set_nonblock(c->wfd);
    set_nonblock(c->rfd);
    return 0;
}

static int no_agent(struct ctl *c, const char *addr, int e)
{
    if (c->to_controller && (e == ENOENT || e == ECONNREFUSED)) {
        bool tcp = strncmp(addr, "tcp:", 4) == 0;
        bool dflt = !strcmp(addr, builtin_controller_addr());
        return fail(c, "",
                    "no controller at %s (%s). Start one with: slot-controller --config FILE%s%s%s "
                    "(or use --agent ADDR to talk to an agent directly)",
                    addr, e == ENOENT ? "ENOENT" : "ECONNREFUSED", dflt ? "" : " --listen ",
                    dflt ? "" : addr, tcp ? " --token-file F" : "");
    }
    if (c->to_controller)
        return fail(c, "", "cannot connect to the controller at %s: %s", addr, strerror(e));
    if (e == ENOENT || e == ECONNREFUSED)
        return fail(c, "", "no agent at %s (%s): start one with: slot-agent --listen %s%s", addr,
                    strerror(e), addr, strncmp(addr, "tcp:", 4) == 0 ? " --token-file F" : "");
    return fail(c, "", "cannot connect to %s: %s", addr, strerror(e));
}

/* connect(2) with a deadline: non-blocking connect, then poll for writability. */
static int connect_deadline(int fd, const struct sockaddr *sa, socklen_t len, double deadline)
{
    set_nonblock(fd);
    if (connect(fd, sa, len) == 0)
        return 0;
    if (errno != EINPROGRESS && errno != EAGAIN)
        return -1;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    for (;;) {
        int r = poll(&p, 1, ms_until(deadline));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        break;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
        return -1;
    if (soerr) {
        errno = soerr;
        return -1;
    }
    return 0;
}

static int connect_unix(struct ctl *c, const char *addr, double deadline)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    const char *path = addr + 5;
    if (!*path || strlen(path) >= sizeof sa.sun_path)
        return fail(c, "", "bad unix socket path in %s (empty or over %zu bytes)", addr,
                    sizeof sa.sun_path - 1);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    double retry_until = now_s() + c->wait_s;
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return fail(c, "", "socket: %s", strerror(errno));
        if (connect_deadline(fd, (struct sockaddr *)&sa, sizeof sa, deadline) == 0)
            return fd;
        int e = errno;
        close(fd);
        if ((e != ENOENT && e != ECONNREFUSED) || now_s() >= retry_until)
            return no_agent(c, addr, e);
        usleep(20000);
    }
}

static int connect_tcp(struct ctl *c, const char *addr, double deadline)
{
    char host[256];
    const char *hp = addr + 4;
    const char *colon = strrchr(hp, ':');
    if (!colon || colon == hp || !colon[1] || (size_t)(colon - hp) >= sizeof host)
        return fail(c, "", "bad address '%s': want %.3s:HOST:PORT", addr, addr);
    size_t hn = (size_t)(colon - hp);
    memcpy(host, hp, hn);
    host[hn] = 0;
    char *h = host;
    if (hn >= 2 && host[0] == '[' && host[hn - 1] == ']') { /* tcp:[::1]:PORT */
        host[hn - 1] = 0;
        h = host + 1;
    }
    double retry_until = now_s() + c->wait_s;
    for (;;) {
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        int g = getaddrinfo(h, colon + 1, &hints, &res);
        if (g)
            return fail(c, "", "%s: %s", addr, gai_strerror(g));
        int fd = -1, e = ECONNREFUSED;
        for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
            fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                e = errno;
                continue;
            }
            if (connect_deadline(fd, ai->ai_addr, ai->ai_addrlen, deadline) < 0) {
                e = errno;
                close(fd);
                fd = -1;
            }
        }
        freeaddrinfo(res);
        if (fd >= 0)
            return fd;
        if (e != ECONNREFUSED || now_s() >= retry_until)
            return no_agent(c, addr, e);
        usleep(20000);
    }
}

/* The TLS handshake on the connected socket, poll()ed until the deadline. */
static int tls_handshake(struct ctl *c, const char *addr, double deadline)
{
    struct sp_err e;
    c->tls = sp_tls_new(c->tls_ctx, c->rfd, c->tls_name, &e);
    if (!c->tls)
        return fail(c, sp_code_name(e.code), "TLS with %s: %s", addr, e.msg);
    for (;;) {
        int r = sp_tls_handshake(c->tls, &e);
        if (r == 1)
            return 0;
        if (r < 0)
            return fail(c, sp_code_name(e.code), "%s with the %s at %s: %s",
                        strncmp(e.msg, "TLS ", 4) ? "TLS handshake" : "connecting", c->peer, addr,
                        e.msg);
        struct pollfd p = {.fd = c->rfd, .events = peer_events(c)};
        int ms = ms_until(deadline);
        if (ms <= 0)
            return fail(c, sp_code_name(SP_TIMEOUT),
                        "TLS handshake with the %s at %s: no answer in time (is it a TLS port?)",
                        c->peer, addr);
        if (poll(&p, 1, ms) < 0 && errno != EINTR)
            return fail(c, "", "poll: %s", strerror(errno));
    }
}

int connect_peer(struct ctl *c)
{
    if (c->agent_cmd)
        return spawn_agent_cmd(c);
    const char *a = c->to_controller ? c->controller : c->agent;
    double deadline = now_s() + c->timeout_s + c->wait_s;
    bool tls = strncmp(a, "tls:", 4) == 0;
    int fd;
    if (tls) {
        /* Our certificate first: a missing file is said before any network. */
        struct sp_err e;
        c->tls_ctx = sp_tls_ctx_new(SP_TLS_CLIENT, c->tls_cert, c->tls_key, c->tls_ca, &e);
        if (!c->tls_ctx)
            return fail(c, sp_code_name(e.code),
                        "TLS for %s: %s (give --tls-cert, --tls-key and --tls-ca, or set "
                        "SLOT_TLS_CERT, SLOT_TLS_KEY and SLOT_TLS_CA)",
                        a, e.msg);
    }
    if (strncmp(a, "unix:", 5) == 0)
        fd = connect_unix(c, a, deadline);
    else if (tls || strncmp(a, "tcp:", 4) == 0)
        fd = connect_tcp(c, a, deadline);
    else
        return fail(c, "",
                    "%s address must be unix:PATH or tcp:HOST:PORT (or tls:HOST:PORT), got '%s'",
                    c->peer, a);
    if (fd < 0)
        return -1;
    c->rfd = c->wfd = fd;
    return tls ? tls_handshake(c, a, deadline) : 0;
}

/* Reap the --agent-cmd child, waiting at most `grace` seconds. Returns its
 * wait status, or -1 if it is still running. */
static int reap_child(struct ctl *c, double grace)
{
    double until = now_s() + grace;
    for (;;) {
        int st;
        pid_t r = waitpid(c->child, &st, WNOHANG);
        if (r == c->child) {
            c->child = 0;
            return st;
        }
        if (r < 0 && errno == ECHILD) {
            c->child = 0;
            return 0;
        }
        if (now_s() >= until)
            return -1;
        usleep(10000);
    }
}

void disconnect(struct ctl *c)
{
    if (c->have_msg) {
        msgpack_unpacked_destroy(&c->msg);
        c->have_msg = false;
    }
    if (c->wfd >= 0 && c->wfd != c->rfd)
        close(c->wfd);
    if (c->child > 0) {
        /* The agent exits on EOF once its answers are out; insist if it hangs. */
        if (reap_child(c, CHILD_GRACE_S) < 0) {
            kill(c->child, SIGTERM);
            if (reap_child(c, 1.0) < 0) {
                kill(c->child, SIGKILL);
                waitpid(c->child, NULL, 0);
                c->child = 0;
            }
        }
    }
    if (c->tls) {
        sp_tls_shutdown(c->tls);
        sp_tls_free(c->tls);
        c->tls = NULL;
    }
    sp_tls_ctx_free(c->tls_ctx);
    c->tls_ctx = NULL;
    if (c->rfd >= 0)
        close(c->rfd);
    c->rfd = c->wfd = -1;
}

/* Code for a lost connection: agent_lost means something else at the
 * controller (its agent died), so a lost controller connection has none. */
static const char *lost_code(const struct ctl *c)
{
    return c->to_controller ? "" : sp_code_name(SP_AGENT_LOST);
}

ssize_t peer_read(struct ctl *c)
{
    return c->tls ? sp_tls_reader_fill(&c->rd, c->tls) : sp_reader_fill(&c->rd, c->rfd);
}

const char *peer_error(const struct ctl *c, int e)
{
    return c->tls && *sp_tls_error(c->tls) ? sp_tls_error(c->tls) : strerror(e);
}

bool peer_pending(const struct ctl *c)
{
    return c->tls && sp_tls_pending(c->tls);
}

short peer_events(const struct ctl *c)
{
    /* TLS may need to write (its own records) before it can read on. */
    return c->tls && sp_tls_want(c->tls) == SP_TLS_WANT_WRITE ? POLLIN | POLLOUT : POLLIN;
}

/* Read what is there into the frame reader; notes EOF. */
static int fill(struct ctl *c)
{
    for (;;) {
        ssize_t n = peer_read(c);
        if (n > 0)
            return 0;
        if (n == 0) {
            c->eof = true;
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        /* A TLS alert (our certificate refused) says more than the reset. */
        if (c->tls && *sp_tls_error(c->tls))
            return fail(c, lost_code(c), "TLS with the %s: %s", c->peer, sp_tls_error(c->tls));
        if (errno == ECONNRESET) {
            c->eof = true;
            return 0;
        }
        return fail(c, lost_code(c), "reading from the %s: %s", c->peer, strerror(errno));
    }
}

int read_signal(struct ctl *c)
{
    struct signalfd_siginfo si;
    if (read(c->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        c->signo = (int)si.ssi_signo;
        c->interrupted = true;
        return 1;
    }
    return 0;
}

/* Send the queued frame. Reads meanwhile, so an agent answering early (a
 * refused frame) is heard instead of deadlocking on full buffers. */
static int send_queued(struct ctl *c, double deadline)
{
    while (sp_writer_pending(&c->wr)) {
        ssize_t left =
            c->tls ? sp_tls_writer_flush(&c->wr, c->tls) : sp_writer_flush(&c->wr, c->wfd);
        if (left == 0)
            break;
        short wev = POLLOUT;
        if (left < 0 && c->tls && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            left = 1;
            wev = sp_tls_want(c->tls) == SP_TLS_WANT_READ ? POLLIN : POLLOUT;
        }
        if (left < 0) {
            int e = errno;
            if (e == EPIPE || e == ECONNRESET) {
                /* The agent is gone or refused us: what it said, if
                 * anything, is read by the wait for the answer. */
                sp_writer_free(&c->wr);
                sp_writer_init(&c->wr, 0);
                /* A TLS server that refused our certificate sent an alert
                 * before it closed: read it, it says why. */
                if (c->tls && !c->eof && fill(c) < 0)
                    return -1;
                c->eof = c->eof || e == ECONNRESET;
                return 0;
            }
            return fail(c, lost_code(c), "sending to the %s: %s", c->peer, peer_error(c, errno));
        }
        if (peer_pending(c) && !c->eof) {
            if (fill(c) < 0)
                return -1;
            continue;
        }
        /* A signal stays queued in the signalfd until the answer is awaited. */
        struct pollfd p[2] = {{.fd = c->wfd, .events = wev},
                              {.fd = c->eof ? -1 : c->rfd, .events = POLLIN}};
        int r = poll(p, 2, ms_until(deadline));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(c, "", "poll: %s", strerror(errno));
        if (r == 0)
            return fail(c, sp_code_name(SP_TIMEOUT), "timed out sending to the %s", c->peer);
        if (p[1].revents && fill(c) < 0)
            return -1;
    }
    return 0;
}

static void release_msg(struct ctl *c)
{
    if (c->have_msg) {
        msgpack_unpacked_destroy(&c->msg);
        c->have_msg = false;
    }
}

/* Frame a request whose args map (if any) was packed into `args`. Returns
 * its id, 0 on failure. The previous frame is released: reading while
 * sending may move the reader's buffer under it. */
uint64_t send_request(struct ctl *c, const char *op, const struct sp_writer *args)
{
    release_msg(c);
    uint64_t id = ++c->next_id;
    msgpack_packer pk;
    struct sp_err err;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, id, op, args != NULL);
    if (args && sp_writer_append(&c->wr, args->buf + args->off, args->len - args->off, &err) < 0) {
        fail(c, sp_code_name(err.code), "%s", err.msg);
        return 0;
    }
    if (sp_writer_end_frame(&c->wr, &err) < 0) {
        fail(c, sp_code_name(err.code), "%s", err.msg);
        return 0;
    }
    if (send_queued(c, now_s() + c->timeout_s) < 0)
        return 0;
    return id;
}

/* A progress line on stderr while a long answer (an archive) is built and
 * arrives: the frame header tells its size. */
static void show_progress(struct ctl *c, bool force)
{
    double t = now_s();
    if (!force && t - c->progress_at < PROGRESS_EVERY_S)
        return;
    c->progress_at = t;
    size_t have = c->rd.len - c->rd.off;
    char got[32], total[32];
    if (have < 4) {
        fprintf(stderr, "\ragentctl: %s: waiting for the %s (%.1fs)\033[K", c->progress, c->peer,
                t - c->progress_start);
    } else {
        const unsigned char *h = (const unsigned char *)c->rd.buf + c->rd.off;
        uint64_t n = (uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 8 | h[3];
        fmt_bytes(got, sizeof got, have - 4 < n ? have - 4 : n);
        fmt_bytes(total, sizeof total, n);
        fprintf(stderr, "\ragentctl: %s: received %s of %s (%.1fs)\033[K", c->progress, got, total,
                t - c->progress_start);
    }
    c->progress_shown = true;
}

void end_progress(struct ctl *c)
{
    if (c->progress_shown)
        fputs("\r\033[K", stderr);
    c->progress = NULL;
    c->progress_shown = false;
}

/* Next frame into c->msg. 1 = frame, 0 = interrupted by a signal (c->signo),
 * -1 = error. The frame stays valid until the next receive or send. */
int recv_frame(struct ctl *c, double deadline)
{
    release_msg(c);
    for (;;) {
        const char *data;
        uint32_t len;
        struct sp_err err;
        int r = sp_reader_next(&c->rd, &data, &len, &err);
        if (r < 0)
            return fail(c, sp_code_name(err.code), "answer from the %s: %s", c->peer, err.msg);
        if (r > 0) {
            msgpack_unpacked_init(&c->msg);
            c->have_msg = true;
            if (sp_unpack(data, len, &c->msg, &err) < 0)
                return fail(c, sp_code_name(SP_INTERNAL), "bad frame from the %s: %s", c->peer,
                            err.msg);
            if (c->msg.data.type != MSGPACK_OBJECT_MAP)
                return fail(c, sp_code_name(SP_INTERNAL), "frame from the %s is not a map",
                            c->peer);
            return 1;
        }
        if (c->eof) {
            if (c->child > 0) {
                int st = reap_child(c, 0.5);
                if (st >= 0 && WIFEXITED(st) && WEXITSTATUS(st))
                    return fail(c, sp_code_name(SP_AGENT_LOST),
                                "the agent command exited with status %d: %s", WEXITSTATUS(st),
                                c->agent_cmd);
                if (st >= 0 && WIFSIGNALED(st))
                    return fail(c, sp_code_name(SP_AGENT_LOST),
                                "the agent command was killed by signal %d", WTERMSIG(st));
            }
            return fail(c, lost_code(c), "the %s closed the connection", c->peer);
        }
        if (peer_pending(c)) {
            if (fill(c) < 0)
                return -1;
            continue;
        }
        struct pollfd p[2] = {{.fd = c->rfd, .events = peer_events(c)},
                              {.fd = c->sigfd, .events = POLLIN}};
        int ms = ms_until(deadline);
        if (ms <= 0)
            return fail(c, sp_code_name(SP_TIMEOUT), "no answer from the %s in time", c->peer);
        if (c->progress) {
            show_progress(c, false);
            ms = ms > 200 ? 200 : ms;
        }
        int pr = poll(p, 2, ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            return fail(c, "", "poll: %s", strerror(errno));
        if (p[1].revents && read_signal(c))
            return 0;
        if (p[0].revents && fill(c) < 0)
            return -1;
    }
}

/* Sort the current frame for request id; FRAME_ERROR fills c->err. Id 0 is
 * the agent's answer to a frame it could not read, so it is ours too. */
enum frame_kind classify(struct ctl *c, uint64_t id, const msgpack_object **result)
{
    const msgpack_object *m = &c->msg.data;
    const msgpack_object *o = sp_map_get(m, "id");
    uint64_t rid = o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
    if (rid != id && rid != 0)
        return FRAME_OTHER;
    if (sp_map_get(m, "event"))
        return rid == id ? FRAME_EVENT : FRAME_OTHER;
    const msgpack_object *ok = sp_map_get(m, "ok");
    if (ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean) {
        const msgpack_object *r = sp_map_get(m, "result");
        if (!r || r->type != MSGPACK_OBJECT_MAP) {
            fail(c, sp_code_name(SP_INTERNAL), "answer from the %s without a result map", c->peer);
            return FRAME_ERROR;
        }
        *result = r;
        return FRAME_RESULT;
    }
    fail_from_answer(c, m);
    return FRAME_ERROR;
}

int fail_from_answer(struct ctl *c, const msgpack_object *m)
{
    const msgpack_object *e = sp_map_get(m, "error");
    const char *code = "internal", *msg = "(no message)";
    size_t cn = 8, mn = 12;
    struct sp_err err;
    if (e && e->type == MSGPACK_OBJECT_MAP) {
        sp_get_str(e, "code", false, &code, &cn, &err);
        sp_get_str(e, "message", false, &msg, &mn, &err);
    }
    fail(c, "", "%.*s", (int)mn, msg);
    snprintf(c->err.code, sizeof c->err.code, "%.*s", (int)cn, code);
    return -1;
}

/* Final result of a request without events; NULL with c->err set. */
const msgpack_object *wait_result(struct ctl *c, uint64_t id)
{
    double deadline = now_s() + c->timeout_s;
    for (;;) {
        int r = recv_frame(c, deadline);
        if (r < 0)
            return NULL;
        if (r == 0)
            continue; /* no signalfd outside exec: cannot happen */
        const msgpack_object *res = NULL;
        switch (classify(c, id, &res)) {
        case FRAME_RESULT: return res;
        case FRAME_ERROR: return NULL;
        default: break;
        }
    }
}

/* Until the peer closes the connection (frames are dropped); -1 with c->err
 * set when it stays open past the deadline. */
int wait_closed(struct ctl *c, double seconds)
{
    double deadline = now_s() + seconds;
    for (;;) {
        int r = recv_frame(c, deadline);
        if (r < 0 && c->eof)
            return 0;
        if (r < 0)
            return -1;
    }
}

void args_begin(struct args *a, uint32_t n)
{
    sp_writer_init(&a->w, 0);
    sp_writer_packer(&a->w, &a->pk);
    msgpack_pack_map(&a->pk, n);
}

const msgpack_object *call(struct ctl *c, const char *op, struct args *a)
{
    uint64_t id = send_request(c, op, a ? &a->w : NULL);
    if (a)
        sp_writer_free(&a->w);
    return id ? wait_result(c, id) : NULL;
}
