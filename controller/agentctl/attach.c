/* agentctl attach SLOT: an interactive terminal into a slot, like `docker
 * exec -it`: a PTY session in the slot (session_open), the local terminal in
 * raw mode, keys sent as they come (session_write), output fetched with a
 * long-polling session_read that is always outstanding, and the window size
 * forwarded on SIGWINCH (session_resize). Ctrl-] detaches; the session's
 * shell ending (exit, Ctrl-D) ends it too. Either way the session is
 * closed, so nothing is left running in the slot. Works over every
 * connection agentctl makes, TLS included (peer_read, peer_pending). */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <termios.h>
#include <unistd.h>

#include "agentctl.h"

#define DETACH_KEY 0x1d /* Ctrl-] */
#define READ_WAIT_MS 1000
#define READ_MAX 65536

struct attach {
    struct ctl *c;
    const struct cmd *cmd;
    uint64_t session;
    uint64_t read_id; /* the outstanding session_read, 0 if none */
    bool done, eof;
    int rc;
};

static void winsize(unsigned *cols, unsigned *rows)
{
    struct winsize ws;
    *cols = 80;
    *rows = 24;
    if (ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col && ws.ws_row) {
        *cols = ws.ws_col;
        *rows = ws.ws_row;
    }
}

/* Send a session op without waiting; its id. */
static uint64_t send_op(struct attach *at, const char *op, const char *key, const void *data,
                        size_t len, uint64_t a, uint64_t b)
{
    struct args ar;
    bool two = !strcmp(op, "session_read") || !strcmp(op, "session_resize");
    uint32_t n = 1 + (key != NULL) + (two ? 2 : 0);
    const char *sent = slot_args(at->c, at->cmd, op, op, &ar, n, 0);
    sp_pack_kv_uint(&ar.pk, "session", at->session);
    if (key)
        sp_pack_kv_bin(&ar.pk, key, data, len);
    if (!strcmp(op, "session_read")) {
        sp_pack_kv_uint(&ar.pk, "max_bytes", a);
        sp_pack_kv_uint(&ar.pk, "wait_ms", b);
    } else if (!strcmp(op, "session_resize")) {
        sp_pack_kv_uint(&ar.pk, "cols", a);
        sp_pack_kv_uint(&ar.pk, "rows", b);
    }
    uint64_t id = send_request(at->c, sent, &ar.w);
    sp_writer_free(&ar.w);
    return id;
}

static void next_read(struct attach *at)
{
    if (!at->done && !at->read_id)
        at->read_id = send_op(at, "session_read", NULL, NULL, 0, READ_MAX, READ_WAIT_MS);
}

static void on_frame(struct attach *at, const msgpack_object *m)
{
    const msgpack_object *o = sp_map_get(m, "id");
    uint64_t id = o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
    const msgpack_object *ok = sp_map_get(m, "ok");
    bool good = ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean;
    if (!good) {
        fail_from_answer(at->c, m);
        at->done = true;
        at->rc = -1;
        return;
    }
    if (id != at->read_id)
        return; /* a write or resize went through */
    at->read_id = 0;
    const msgpack_object *r = sp_map_get(m, "result");
    const msgpack_object *d = r ? sp_map_get(r, "data") : NULL;
    if (d && (d->type == MSGPACK_OBJECT_BIN || d->type == MSGPACK_OBJECT_STR)) {
        const char *p = d->type == MSGPACK_OBJECT_BIN ? d->via.bin.ptr : d->via.str.ptr;
        size_t n = d->type == MSGPACK_OBJECT_BIN ? d->via.bin.size : d->via.str.size;
        if (write_all(at->c, STDOUT_FILENO, p, n) < 0) {
            at->done = true;
            return;
        }
    }
    const msgpack_object *eof = r ? sp_map_get(r, "eof") : NULL;
    if (eof && eof->type == MSGPACK_OBJECT_BOOLEAN && eof->via.boolean) {
        at->eof = at->done = true;
        return;
    }
    next_read(at);
}

/* Frames waiting in the reader; -1 when the connection failed. */
static int drain_frames(struct attach *at)
{
    struct ctl *c = at->c;
    ssize_t n = peer_read(c);
    if (n == 0)
        return fail(c, "agent_lost", "the %s closed the connection", c->peer);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        return fail(c, "agent_lost", "reading from the %s: %s", c->peer, peer_error(c, errno));
    const char *data;
    uint32_t len;
    struct sp_err err;
    int got;
    while ((got = sp_reader_next(&c->rd, &data, &len, &err)) == 1) {
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        if (sp_unpack(data, len, &u, &err) == 0 && u.data.type == MSGPACK_OBJECT_MAP)
            on_frame(at, &u.data);
        msgpack_unpacked_destroy(&u);
    }
    if (got < 0)
        return fail(c, sp_code_name(err.code), "answer from the %s: %s", c->peer, err.msg);
    return 0;
}

int cmd_attach(struct ctl *c, const struct cmd *cmd, int *status)
{
    unsigned cols, rows;
    winsize(&cols, &rows);
    struct args a;
    const char *op = slot_args(c, cmd, "session_open", "session_open", &a, 3, 0);
    sp_pack_kv_bool(&a.pk, "pty", true);
    sp_pack_kv_uint(&a.pk, "cols", cols);
    sp_pack_kv_uint(&a.pk, "rows", rows);
    const msgpack_object *r = call(c, op, &a);
    if (!r)
        return -1;
    struct attach at = {.c = c, .cmd = cmd, .session = get_u(r, "session")};
    bool tty = isatty(STDIN_FILENO);
    struct termios saved, raw;
    if (tty && tcgetattr(STDIN_FILENO, &saved) == 0) {
        raw = saved;
        cfmakeraw(&raw);
        tcsetattr(STDIN_FILENO, TCSANOW, &raw);
    } else
        tty = false;
    if (tty)
        fprintf(stderr, "[attached to %s; Ctrl-] detaches]\r\n",
                cmd->handle ? cmd->handle : "slot");
    sigset_t old;
    catch_signals(c, &old, true);
    next_read(&at);
    bool in_eof = false;
    while (!at.done) {
        struct pollfd p[3] = {{.fd = c->rfd, .events = peer_events(c)},
                              {.fd = c->sigfd, .events = POLLIN},
                              {.fd = in_eof ? -1 : STDIN_FILENO, .events = POLLIN}};
        /* Records TLS already decrypted: the socket will not wake us. */
        bool pending = peer_pending(c);
        if (poll(p, 3, pending ? 0 : 1000) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pending)
            p[0].revents |= POLLIN;
        if (p[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(c->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
                if (si.ssi_signo == SIGWINCH) {
                    winsize(&cols, &rows);
                    send_op(&at, "session_resize", NULL, NULL, 0, cols, rows);
                } else
                    break; /* INT, TERM, HUP: leave (the session is closed) */
            }
        }
        if (p[2].revents & (POLLIN | POLLHUP)) {
            char buf[4096];
            ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
            if (n <= 0)
                in_eof = true; /* keep showing output until the shell ends */
            else {
                char *k = memchr(buf, DETACH_KEY, (size_t)n);
                if (k && tty) {
                    if (k > buf)
                        send_op(&at, "session_write", "data", buf, (size_t)(k - buf), 0, 0);
                    break;
                }
                send_op(&at, "session_write", "data", buf, (size_t)n, 0, 0);
            }
        }
        if ((p[0].revents & (POLLIN | POLLHUP)) && drain_frames(&at) < 0) {
            at.rc = -1;
            break;
        }
    }
    release_signals(c, &old);
    if (tty)
        tcsetattr(STDIN_FILENO, TCSANOW, &saved);
    if (at.rc < 0)
        return -1;
    /* Close the session (also after its shell ended: it frees the slot's
     * count), waiting past answers still on the way. */
    struct args ca;
    op = slot_args(c, cmd, "session_close", "session_close", &ca, 1, 0);
    sp_pack_kv_uint(&ca.pk, "session", at.session);
    uint64_t id = send_request(c, op, &ca.w);
    sp_writer_free(&ca.w);
    if (id)
        wait_result(c, id);
    if (tty)
        fprintf(stderr, "[%s]\n", at.eof ? "session ended" : "detached");
    *status = 0;
    return 0;
}
