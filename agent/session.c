/* Sessions: a long-lived shell per session in a slot, started through the
 * same spawn path and isolation rungs as exec, with or without a terminal.
 *
 * The shell is an interactive bash (`-i`): interactive, because only an
 * interactive shell survives SIGINT and goes back to reading commands, which
 * is what interrupting a command must do while keeping cwd, variables and
 * functions. Before the session is ready the agent types one set-up line
 * that defines PROMPT_COMMAND: before every prompt bash prints the marker
 *
 *     ESC ] 6973 ; NONCE ; STATUS BEL
 *
 * (an OSC sequence, which terminals and a screen renderer ignore) with a
 * random per-session NONCE and the exit status of the command line. The end
 * of a session_exec is that marker: it comes after the command and all of
 * its foreground processes have finished, whatever they printed (no trailing
 * newline, text that looks like a prompt) and however they read stdin.
 *
 * Without a terminal, bash's stdin is a pipe from the agent, stdout and
 * stderr are pipes to it, and the marker goes to stderr. Each command is
 * sent as `eval -- 'CMD' </dev/null`: one input line whatever CMD holds (a
 * syntax error is exit status 2, not a shell waiting for a closing quote),
 * and, as for exec, stdin is /dev/null so a command that reads it cannot eat
 * the next command line (bash reads its input ahead). The marker arrives on
 * stderr after the command has exited, so everything it wrote to stdout is
 * already in that pipe: the agent drains stdout before answering.
 *
 * With a terminal (pty), the agent opens the pty pair itself and hands the
 * slave to the child as its three standard streams, exactly like the pipes
 * of exec (also through a slot's namespace box, as SCM_RIGHTS); the child,
 * already a session leader, makes it its controlling terminal (TIOCSCTTY)
 * before isolation and execve. No rung changes: only descriptors differ.
 * bash then has job control, so the foreground process group is the
 * terminal's (tcgetpgrp on the master) and a command is typed on the
 * terminal like a user would. Everything the pty prints passes through one
 * function (session_emit), where a screen renderer can be fed later.
 *
 * Output read while a session_exec runs belongs to it (bounded head + tail
 * like exec); any other output goes to the session's ring, read by
 * session_read, bounded by --session-buffer (oldest bytes dropped first and
 * counted). A pty session also keeps everything its terminal printed, by
 * offset, for readers that do not consume (transcript.c, session_log), and
 * a session_write may wait for the next marker: the line it typed has
 * finished (keywait.c). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "child.h"
#include "fdio.h"
#include "keywait.h"
#include "screen.h"
#include "session.h"
#include "transcript.h"

#define READ_CHUNK 65536
#define READY_SECONDS 10.0 /* the set-up line must come back by then */
#define GRACE_SECONDS 1.0  /* between the steps of interrupting a command */
#define DRAIN_SECONDS 2.0  /* output still open after the shell ended */
#define MARK_HEAD "\033]6973;"
#define NONCE_LEN 16
#define MARK_DIGITS 10

struct session_cmd {
    struct req *owner;
    struct outbuf ob[2]; /* stdout, stderr; with a pty [0] is the terminal */
    ev_timer timer;      /* the timeout, then the steps of interrupting */
    int stage;           /* 0 running, 1 SIGINT sent, 2-3 foreground killed, 4 shell killed */
    bool timed_out;
    double t_start;
    pid_t *before; /* the shell's children when it started: background jobs */
    size_t nbefore;
};

/* Output not read yet: a ring that grows up to its bound, then drops the
 * oldest bytes. */
struct ring {
    char *buf;
    size_t cap, alloc, head, len;
    uint64_t dropped; /* since the last read */
};

struct session {
    struct agent *ag;
    struct slot *slot;
    struct session *next; /* in slot->sessions */
    uint64_t id;
    pid_t pid;
    int status;     /* the shell's wait status once reaped */
    bool pty, bash; /* bash: session_exec works (the marker protocol) */
    bool alive;     /* the shell is not reaped yet */
    bool ready;     /* the set-up line came back */
    bool at_prompt; /* its last prompt's marker is in, no input sent since */
    unsigned iso_applied;
    int fds[2]; /* stdout, stderr read ends; pty: [0] is the master */
    ev_io io[2];
    int in_fd; /* the shell's input: its stdin pipe, or the master */
    ev_io in_w;
    char *wbuf; /* input not written yet */
    size_t wlen, woff;
    char prefix[sizeof MARK_HEAD + NONCE_LEN + 2]; /* marker up to STATUS */
    size_t plen;
    char mk[sizeof MARK_HEAD + NONCE_LEN + 2 + MARK_DIGITS]; /* bytes held while matching */
    size_t mk_len;
    struct ring ring;
    struct session_cmd *cmd;
    struct req *opener; /* session_open, until ready */
    struct req *reader; /* a long-polling session_read */
    ev_timer wait_w;    /* ready timeout, then the reader's wait */
    ev_timer end_w;     /* bound on waiting for EOF after the shell ended */
    unsigned cols, rows;
    struct screen *screen; /* pty: what the terminal shows (session_screen) */
    struct transcript log; /* pty: what it printed, by offset (session_log) */
    struct keywait kw;     /* a session_write waiting for the prompt */
    char tag[65];          /* the opener's name for it (the controller's tools) */
};

static void check_ended(struct session *ss);

/* ---- the ring ------------------------------------------------------------ */

static void ring_put(struct ring *r, const char *p, size_t n)
{
    if (n >= r->cap) {
        r->dropped += r->len + (n - r->cap);
        p += n - r->cap;
        n = r->cap;
        r->len = r->head = 0;
    } else if (r->len + n > r->cap) {
        size_t drop = r->len + n - r->cap;
        r->head = (r->head + drop) % (r->alloc ? r->alloc : 1);
        r->len -= drop;
        r->dropped += drop;
    }
    if (r->len + n > r->alloc) {
        /* Grow (idle sessions cost little): linearize into the new buffer. */
        size_t want = r->alloc ? r->alloc * 2 : 4096;
        while (want < r->len + n)
            want *= 2;
        if (want > r->cap)
            want = r->cap;
        char *nb = malloc(want);
        if (!nb) {
            r->dropped += n;
            return;
        }
        for (size_t i = 0; i < r->len; i++)
            nb[i] = r->buf[(r->head + i) % r->alloc];
        free(r->buf);
        r->buf = nb;
        r->alloc = want;
        r->head = 0;
    }
    size_t tail = (r->head + r->len) % r->alloc;
    size_t first = r->alloc - tail < n ? r->alloc - tail : n;
    memcpy(r->buf + tail, p, first);
    memcpy(r->buf, p + first, n - first);
    r->len += n;
}

/* Pack up to max of the oldest bytes as one bin and consume them. */
static void ring_pack_take(struct ring *r, msgpack_packer *pk, size_t max)
{
    size_t n = r->len < max ? r->len : max;
    msgpack_pack_bin(pk, n);
    size_t first = n ? (r->alloc - r->head < n ? r->alloc - r->head : n) : 0;
    if (first)
        msgpack_pack_bin_body(pk, r->buf + r->head, first);
    if (n > first)
        msgpack_pack_bin_body(pk, r->buf, n - first);
    if (n)
        r->head = (r->head + n) % r->alloc;
    r->len -= n;
}

/* ---- lookup -------------------------------------------------------------- */

struct session *session_find(struct agent *ag, uint64_t id, struct sp_err *err)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (struct session *ss = ag->slots[i].sessions; ss; ss = ss->next)
            if (ss->id == id)
                return ss;
    sp_errf(err, SP_NOT_FOUND, "session %llu does not exist (closed, or its slot was reset)",
            (unsigned long long)id);
    return NULL;
}

bool session_is_shell(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (struct session *ss = ag->slots[i].sessions; ss; ss = ss->next)
            if (ss->alive && ss->pid == pid)
                return true;
    return false;
}

/* ---- answers ------------------------------------------------------------- */

unsigned session_slot_index(const struct session *ss)
{
    return ss->slot->index;
}

static bool ended(const struct session *ss)
{
    return !ss->alive && ss->fds[0] < 0 && ss->fds[1] < 0;
}

static void answer_read(struct session *ss, struct req *rq, size_t max)
{
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 4);
    sp_pack_cstr(pk, "data");
    ring_pack_take(&ss->ring, pk, max);
    sp_pack_kv_bool(pk, "eof", ended(ss) && ss->ring.len == 0);
    sp_pack_kv_uint(pk, "dropped", ss->ring.dropped);
    sp_pack_kv_bool(pk, "alive", ss->alive);
    req_reply_end(rq);
    ss->ring.dropped = 0;
}

/* A long-polling reader gets what is there now (data, or the end). */
static void wake_reader(struct session *ss)
{
    struct req *rq = ss->reader;
    if (!rq || (ss->ring.len == 0 && !ended(ss)))
        return;
    ss->reader = NULL;
    ev_timer_stop(ss->ag->loop, &ss->wait_w);
    answer_read(ss, rq, rq->aux);
    req_finish(rq, NULL);
}

static int wait_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

static void pack_isolation(msgpack_packer *pk, unsigned applied)
{
    sp_pack_cstr(pk, "isolation");
    msgpack_pack_array(pk, (uint32_t)__builtin_popcount(applied));
    for (int r = 0; r < RUNG_COUNT; r++)
        if (applied & (1u << r))
            sp_pack_cstr(pk, rung_names[r]);
}

static void answer_open(struct session *ss, struct req *rq)
{
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 6);
    sp_pack_kv_uint(pk, "session", ss->id);
    sp_pack_kv_uint(pk, "slot", ss->slot->index);
    sp_pack_kv_int(pk, "pid", ss->pid);
    sp_pack_kv_bool(pk, "pty", ss->pty);
    sp_pack_kv_bool(pk, "exec", ss->bash);
    pack_isolation(pk, ss->iso_applied);
    req_reply_end(rq);
}

/* The command is over: exit_code from the marker, or the shell's end. */
static void cmd_finish(struct session *ss, int exit_code)
{
    struct session_cmd *c = ss->cmd;
    struct agent *ag = ss->ag;
    ss->cmd = NULL;
    ev_timer_stop(ag->loop, &c->timer);
    double ms = (agent_now_precise(ag) - c->t_start) * 1000.0;
    msgpack_packer *pk = req_reply_begin(c->owner);
    msgpack_pack_map(pk, ss->pty ? 8 : 11);
    sp_pack_kv_uint(pk, "session", ss->id);
    sp_pack_kv_int(pk, "exit_code", exit_code);
    static const char *const names[2][3] = {{"stdout", "stdout_truncated", "stdout_bytes"},
                                            {"stderr", "stderr_truncated", "stderr_bytes"}};
    static const char *const term[3] = {"output", "output_truncated", "output_bytes"};
    for (int k = 0; k < (ss->pty ? 1 : 2); k++) {
        const char *const *n = ss->pty ? term : names[k];
        const struct outbuf *ob = &c->ob[k];
        sp_pack_cstr(pk, n[0]);
        outbuf_pack(pk, ob);
        sp_pack_kv_bool(pk, n[1], ob->total > (uint64_t)ob->head_cap + ob->ring_cap);
        sp_pack_kv_uint(pk, n[2], ob->total);
    }
    sp_pack_kv_bool(pk, "timed_out", c->timed_out);
    sp_pack_kv_uint(pk, "duration_ms", ms > 0 ? (uint64_t)ms : 0);
    sp_pack_kv_bool(pk, "session_alive", ss->alive);
    req_reply_end(c->owner);
    req_finish(c->owner, NULL);
    outbuf_free(&c->ob[0]);
    outbuf_free(&c->ob[1]);
    free(c->before);
    free(c);
}

/* ---- output ---------------------------------------------------------------- */

/* Every byte the shell and its programs print, minus markers, comes here in
 * order; a pty session's screen is fed from here. */
static void session_emit(struct session *ss, int k, const char *p, size_t n)
{
    if (n == 0 || !ss->ready)
        return; /* before ready: bash's start-up notices and the set-up line */
    if (ss->screen)
        screen_feed(ss->screen, p, n);
    if (ss->pty)
        transcript_put(&ss->log, p, n);
    if (ss->cmd) {
        outbuf_append(&ss->cmd->ob[ss->pty ? 0 : k], p, n);
        return;
    }
    ring_put(&ss->ring, p, n);
    wake_reader(ss);
}

static void stream_close(struct session *ss, int k)
{
    if (ss->fds[k] < 0)
        return;
    ev_io_stop(ss->ag->loop, &ss->io[k]);
    if (k == (ss->pty ? 0 : 1) && ss->mk_len) {
        /* A marker cut short was output after all. */
        size_t n = ss->mk_len;
        ss->mk_len = 0;
        session_emit(ss, k, ss->mk, n);
    }
    if (ss->pty) {
        /* The master is also the input. */
        ev_io_stop(ss->ag->loop, &ss->in_w);
        ss->in_fd = -1;
    }
    close(ss->fds[k]);
    ss->fds[k] = -1;
}

/* Non-pty: stdout up to what is in the pipe now. */
static void drain_stdout(struct session *ss)
{
    char buf[READ_CHUNK];
    while (ss->fds[0] >= 0) {
        ssize_t n = read(ss->fds[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            stream_close(ss, 0);
            return;
        }
        session_emit(ss, 0, buf, (size_t)n);
    }
}

static void on_marker(struct session *ss, int status)
{
    ss->at_prompt = true;
    if (!ss->ready) {
        ss->ready = true;
        ev_timer_stop(ss->ag->loop, &ss->wait_w);
        struct req *rq = ss->opener;
        ss->opener = NULL;
        if (rq) {
            answer_open(ss, rq);
            req_finish(rq, NULL);
        }
        return;
    }
    keywait_prompt(&ss->kw);
    if (!ss->cmd)
        return; /* a prompt after input typed with session_write */
    if (!ss->pty)
        drain_stdout(ss);
    cmd_finish(ss, status);
}

/* Split stream k's bytes into output and markers. A marker is held back
 * while it may still be one; ESC starts it and appears nowhere else in its
 * fixed part, so a mismatch only has to give back what was held. */
static void scan(struct session *ss, int k, const char *p, size_t n)
{
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (ss->mk_len == 0) {
            if (c != '\033')
                continue;
            session_emit(ss, k, p + run, i - run);
            ss->mk[ss->mk_len++] = c;
            run = i + 1;
            continue;
        }
        bool ok;
        if (ss->mk_len < ss->plen) {
            ok = c == ss->prefix[ss->mk_len];
        } else if (c == '\a' && ss->mk_len > ss->plen) {
            int status = 0;
            for (size_t j = ss->plen; j < ss->mk_len; j++)
                status = status * 10 + (ss->mk[j] - '0');
            ss->mk_len = 0;
            run = i + 1;
            on_marker(ss, status);
            continue;
        } else {
            ok = c >= '0' && c <= '9' && ss->mk_len - ss->plen < MARK_DIGITS;
        }
        if (ok) {
            ss->mk[ss->mk_len++] = c;
            run = i + 1;
            continue;
        }
        size_t held = ss->mk_len;
        ss->mk_len = 0;
        session_emit(ss, k, ss->mk, held);
        run = i;
        if (c == '\033') {
            ss->mk[ss->mk_len++] = c;
            run = i + 1;
        }
    }
    session_emit(ss, k, p + run, n - run);
}

static void output_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct session *ss = w->data;
    int k = w == &ss->io[0] ? 0 : 1;
    char buf[READ_CHUNK];
    for (int i = 0; i < 4 && ss->fds[k] >= 0; i++) {
        ssize_t n = read(ss->fds[k], buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            /* EOF, or EIO from a master whose slave nobody holds any more */
            stream_close(ss, k);
            check_ended(ss);
            return;
        }
        if (k == (ss->pty ? 0 : 1))
            scan(ss, k, buf, (size_t)n);
        else
            session_emit(ss, k, buf, (size_t)n);
        if ((size_t)n < sizeof buf)
            return;
    }
}

/* ---- input ------------------------------------------------------------------- */

static void input_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct session *ss = w->data;
    while (ss->woff < ss->wlen) {
        ssize_t n = write(ss->in_fd, ss->wbuf + ss->woff, ss->wlen - ss->woff);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n < 0) {
            ss->woff = ss->wlen; /* the shell is gone: nobody reads it */
            break;
        }
        ss->woff += (size_t)n;
    }
    ss->woff = ss->wlen = 0;
    ev_io_stop(ss->ag->loop, w);
}

/* Queue n bytes of input, up to the bound when bounded; how many taken. */
static size_t queue_input(struct session *ss, const char *p, size_t n, bool bounded)
{
    size_t taken = 0;
    if (ss->woff == ss->wlen) {
        ss->woff = ss->wlen = 0;
        while (taken < n) {
            ssize_t k = write(ss->in_fd, p + taken, n - taken);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                break;
            taken += (size_t)k;
        }
    }
    size_t rest = n - taken;
    size_t pending = ss->wlen - ss->woff;
    uint64_t bound = ss->ag->opt.session_buffer;
    if (bounded && pending + rest > bound)
        rest = pending >= bound ? 0 : (size_t)(bound - pending);
    if (rest) {
        if (ss->woff) {
            memmove(ss->wbuf, ss->wbuf + ss->woff, pending);
            ss->wlen = pending;
            ss->woff = 0;
        }
        char *nb = realloc(ss->wbuf, ss->wlen + rest);
        if (!nb)
            return taken;
        ss->wbuf = nb;
        memcpy(ss->wbuf + ss->wlen, p + taken, rest);
        ss->wlen += rest;
        taken += rest;
        ev_io_start(ss->ag->loop, &ss->in_w);
    }
    return taken;
}

/* The terminal's own answers (cursor reports...) go back as typed input. */
static void screen_reply(const char *data, size_t len, void *ctx)
{
    queue_input(ctx, data, len, false);
}

int session_screen(struct session *ss, msgpack_packer *pk, bool history, struct sp_err *err)
{
    if (!ss->screen)
        return sp_errf(err, SP_BAD_REQUEST,
                       "session %llu has no terminal (opened with pty: false): use session_read",
                       (unsigned long long)ss->id);
    if (pk) {
        screen_pack(ss->screen, pk);
        sp_pack_kv_bool(pk, "alive", ss->alive);
        if (history)
            screen_pack_history(ss->screen, pk);
    }
    return 0;
}

int session_log(struct session *ss, msgpack_packer *pk, uint64_t offset, size_t max, bool lines,
                struct sp_err *err)
{
    if (!ss->pty)
        return sp_errf(err, SP_BAD_REQUEST,
                       "session %llu has no terminal (opened with pty: false): use session_read",
                       (unsigned long long)ss->id);
    if (pk)
        transcript_pack(&ss->log, pk, offset, max, lines);
    return 0;
}

int session_write(struct session *ss, const char *p, size_t n, size_t *taken, struct sp_err *err)
{
    if (ss->in_fd < 0 || !ss->alive)
        return sp_errf(err, SP_BAD_REQUEST, "session %llu has ended", (unsigned long long)ss->id);
    *taken = queue_input(ss, p, n, true);
    /* Whatever it typed, the next marker may be for it. */
    if (*taken)
        ss->at_prompt = false;
    return 0;
}

int session_write_wait(struct session *ss, struct req *rq, const char *p, size_t n, uint64_t min_ms,
                       uint64_t prompt_ms, struct sp_err *err)
{
    if (keywait_busy(&ss->kw))
        return sp_errf(err, SP_SLOT_BUSY, "session %llu: another session_write is waiting",
                       (unsigned long long)ss->id);
    size_t taken = 0;
    if (session_write(ss, p, n, &taken, err) < 0)
        return -1;
    return keywait_start(&ss->kw, rq, taken, min_ms, prompt_ms);
}

/* ---- the end of a shell ---------------------------------------------------------- */

static void check_ended(struct session *ss)
{
    if (!ended(ss))
        return;
    ev_timer_stop(ss->ag->loop, &ss->end_w);
    if (ss->opener) {
        struct req *rq = ss->opener;
        ss->opener = NULL;
        ev_timer_stop(ss->ag->loop, &ss->wait_w);
        struct sp_err err;
        sp_errf(&err, SP_INTERNAL, "the session's shell ended at start-up (status %d)",
                wait_code(ss->status));
        req_finish(rq, &err);
    }
    if (ss->cmd)
        cmd_finish(ss, wait_code(ss->status));
    keywait_ended(&ss->kw);
    wake_reader(ss);
}

static void end_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct session *ss = w->data;
    /* Something of the session still holds its output although the shell
     * is gone (the sweep kills such leftovers): stop waiting for it. */
    stream_close(ss, 0);
    stream_close(ss, 1);
    check_ended(ss);
}

bool session_child_exit(struct agent *ag, pid_t pid, int status)
{
    struct session *ss = NULL;
    for (unsigned i = 0; i < ag->nslots && !ss; i++)
        for (ss = ag->slots[i].sessions; ss; ss = ss->next)
            if (ss->alive && ss->pid == pid)
                break;
    if (!ss)
        return false;
    log_debug("session %llu: shell %d ended (status %d)", (unsigned long long)ss->id, (int)pid,
              wait_code(status));
    ss->alive = false;
    ss->status = status;
    if (ss->in_fd >= 0 && !ss->pty) {
        ev_io_stop(ag->loop, &ss->in_w);
        close(ss->in_fd);
        ss->in_fd = -1;
    }
    /* Its orphans came back to the agent: they are strays now. */
    proc_sweep_strays(ag);
    if (!ended(ss)) {
        ev_timer_set(&ss->end_w, DRAIN_SECONDS, 0.0);
        ev_timer_start(ag->loop, &ss->end_w);
    }
    check_ended(ss);
    return true;
}

/* ---- interrupting ------------------------------------------------------------- */

static pid_t fg_group(struct session *ss)
{
    if (ss->pty && ss->fds[0] >= 0) {
        pid_t pg = tcgetpgrp(ss->fds[0]);
        if (pg > 0)
            return pg;
    }
    return ss->pid;
}

/* Without job control bash starts background jobs with SIGINT and SIGQUIT
 * ignored: that, and being there before the command started, is how the
 * foreground is told from them (a foreground program may ignore SIGINT,
 * hardly both). */
static bool looks_background(const struct session *ss, pid_t pid)
{
    if (ss->cmd)
        for (size_t i = 0; i < ss->cmd->nbefore; i++)
            if (ss->cmd->before[i] == pid)
                return true;
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    if (file_read_str(path, buf, sizeof buf) < 0)
        return false;
    const char *p = strstr(buf, "SigIgn:");
    if (!p)
        return false;
    unsigned long long mask = strtoull(p + 7, NULL, 16);
    return ((mask >> (SIGINT - 1)) & 1) && ((mask >> (SIGQUIT - 1)) & 1);
}

static unsigned signal_foreground(struct session *ss, int sig)
{
    if (!ss->alive)
        return 0;
    pid_t fg = fg_group(ss);
    unsigned n = 0;
    if (ss->pty && fg != ss->pid && kill(-fg, sig) == 0)
        n++;
    pid_t *kids = NULL;
    size_t nk = proc_children(ss->pid, &kids);
    for (size_t i = 0; i < nk; i++) {
        bool fore = ss->pty ? getpgid(kids[i]) == fg : !looks_background(ss, kids[i]);
        if (!fore)
            continue;
        if (sig == SIGKILL)
            n += proc_kill_tree(kids[i]);
        else
            n += kill(kids[i], sig) == 0;
    }
    free(kids);
    return n;
}

static void cmd_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct session *ss = w->data;
    struct session_cmd *c = ss->cmd;
    if (!c || !ss->alive)
        return;
    switch (c->stage++) {
    case 0:
        /* Like ^C: the foreground group gets SIGINT. Without a terminal it
         * is the shell's own group; an interactive bash survives it and
         * abandons the command line (loops of builtins included). */
        c->timed_out = true;
        log_debug("session %llu: command timed out: SIGINT", (unsigned long long)ss->id);
        kill(-fg_group(ss), SIGINT);
        break;
    case 1:
    case 2:
        /* Twice: the first may find a child bash forked but not yet
         * exec'd, or a program not yet started on a loaded host. */
        log_debug("session %llu: still running: SIGKILL to the foreground",
                  (unsigned long long)ss->id);
        signal_foreground(ss, SIGKILL);
        break;
    default:
        /* The shell itself does not come back (it ignores SIGINT in a loop
         * of builtins): the session cannot be saved. */
        log_warn("session %llu: shell does not return from an interrupted command; killing it",
                 (unsigned long long)ss->id);
        proc_kill_tree(ss->pid);
        return;
    }
    ev_timer_set(w, GRACE_SECONDS, 0.0);
    ev_timer_start(loop, w);
}

int session_signal(struct session *ss, int sig, unsigned *n, pid_t *pgid, struct sp_err *err)
{
    if (!ss->alive)
        return sp_errf(err, SP_BAD_REQUEST, "session %llu has ended", (unsigned long long)ss->id);
    *pgid = fg_group(ss);
    if (ss->pty || sig == SIGINT)
        *n = kill(-*pgid, sig) == 0;
    else
        *n = signal_foreground(ss, sig);
    return 0;
}

int session_resize(struct session *ss, unsigned cols, unsigned rows, struct sp_err *err)
{
    if (!ss->pty)
        return sp_errf(err, SP_BAD_REQUEST, "session %llu has no terminal (opened with pty: false)",
                       (unsigned long long)ss->id);
    if (ss->fds[0] < 0)
        return sp_errf(err, SP_BAD_REQUEST, "session %llu has ended", (unsigned long long)ss->id);
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    /* The kernel sends SIGWINCH to the terminal's foreground group. */
    if (ioctl(ss->fds[0], TIOCSWINSZ, &ws) < 0)
        return sp_errf(err, SP_INTERNAL, "TIOCSWINSZ: %s", strerror(errno));
    ss->cols = cols;
    ss->rows = rows;
    if (ss->screen)
        screen_resize(ss->screen, rows, cols);
    return 0;
}

/* ---- commands ------------------------------------------------------------------ */

/* 'CMD' for the shell: every ' becomes '\'' (the only character special in
 * single quotes). */
static char *quote_line(const char *pre, const char *cmd, size_t len, const char *post,
                        size_t *out_len)
{
    size_t n = strlen(pre) + strlen(post) + 2 + len;
    for (size_t i = 0; i < len; i++)
        n += cmd[i] == '\'' ? 3 : 0;
    char *line = malloc(n + 1), *q = line;
    if (!line)
        return NULL;
    q = stpcpy(q, pre);
    *q++ = '\'';
    for (size_t i = 0; i < len; i++) {
        if (cmd[i] == '\'')
            q = stpcpy(q, "'\\''");
        else
            *q++ = cmd[i];
    }
    *q++ = '\'';
    q = stpcpy(q, post);
    *out_len = (size_t)(q - line);
    return line;
}

int session_exec(struct session *ss, struct req *rq, const char *cmd, size_t len,
                 uint64_t timeout_ms, uint64_t max_output, struct sp_err *err)
{
    struct agent *ag = ss->ag;
    unsigned long long id = (unsigned long long)ss->id;
    if (!ss->bash)
        return sp_errf(err, SP_BAD_REQUEST,
                       "session %llu does not run bash: use session_write and session_read", id);
    if (!ss->alive || ss->in_fd < 0)
        return sp_errf(err, SP_BAD_REQUEST, "session %llu has ended", id);
    if (ss->cmd)
        return sp_errf(err, SP_SLOT_BUSY, "session %llu is running a command", id);
    /* Bash prints one marker per prompt: after input from session_write a
     * marker may still be on its way, and would end this command early. */
    if (!ss->at_prompt)
        return sp_errf(err, SP_SLOT_BUSY,
                       "session %llu's shell is not back at its prompt after input written "
                       "with session_write (finish the line, or session_signal INT)",
                       id);
    if (memchr(cmd, 0, len))
        return sp_errf(err, SP_BAD_REQUEST, "args.cmd: contains a NUL byte");
    bool multiline = memchr(cmd, '\n', len) != NULL;
    if (ss->pty) {
        /* Control characters would be keys to the terminal (^C, ^D...). */
        for (size_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)cmd[i];
            if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f)
                return sp_errf(err, SP_BAD_REQUEST,
                               "args.cmd: control character 0x%02x; send keys with session_write",
                               c);
        }
        if (fg_group(ss) != ss->pid)
            return sp_errf(err, SP_SLOT_BUSY,
                           "a program runs in the foreground of session %llu's terminal "
                           "(use session_write, session_signal)",
                           id);
    }
    size_t line_len;
    char *line;
    if (ss->pty && !multiline) {
        /* Typed as a user would: the terminal shows the command line. */
        line = malloc(len + 1);
        if (line) {
            memcpy(line, cmd, len);
            line[len] = '\n';
            line_len = len + 1;
        }
    } else {
        line = quote_line("eval -- ", cmd, len, ss->pty ? "\n" : " </dev/null\n", &line_len);
    }
    struct session_cmd *c = calloc(1, sizeof *c);
    if (!line || !c) {
        free(line);
        free(c);
        return sp_errf(err, SP_INTERNAL, "out of memory");
    }
    c->owner = rq;
    c->t_start = agent_now_precise(ag);
    outbuf_init(&c->ob[0], max_output);
    outbuf_init(&c->ob[1], max_output);
    if (!ss->pty)
        c->nbefore = proc_children(ss->pid, &c->before);
    ss->cmd = c;
    ss->at_prompt = false;
    /* Output not read before the command stays readable by session_read;
     * what follows belongs to the command. */
    queue_input(ss, line, line_len, false);
    free(line);
    ev_now_update(ag->loop);
    ev_timer_init(&c->timer, cmd_timer_cb, (double)timeout_ms / 1000.0, 0.0);
    c->timer.data = ss;
    ev_timer_start(ag->loop, &c->timer);
    return OP_PENDING;
}

/* ---- reading --------------------------------------------------------------------- */

static void wait_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct session *ss = w->data;
    if (ss->opener) {
        struct req *rq = ss->opener;
        ss->opener = NULL;
        struct sp_err err;
        sp_errf(&err, SP_TIMEOUT, "the session's shell did not start within %.0f s", READY_SECONDS);
        req_finish(rq, &err);
        session_close(ss, NULL);
        return;
    }
    struct req *rq = ss->reader;
    ss->reader = NULL;
    if (rq) {
        answer_read(ss, rq, rq->aux);
        req_finish(rq, NULL);
    }
}

int session_read(struct session *ss, struct req *rq, size_t max, uint64_t wait_ms,
                 struct sp_err *err)
{
    if (ss->ring.len || ended(ss) || wait_ms == 0) {
        answer_read(ss, rq, max);
        return OP_DONE;
    }
    if (ss->reader && (!ss->reader->conn || !conn_peer_reading(ss->reader->conn))) {
        /* Its client is gone (or has shut down its side): it must not hold
         * the session's reads. It gets its (empty) answer now. */
        struct req *old = ss->reader;
        ss->reader = NULL;
        ev_timer_stop(ss->ag->loop, &ss->wait_w);
        uint64_t dropped = ss->ring.dropped;
        answer_read(ss, old, 0);
        ss->ring.dropped = dropped;
        req_finish(old, NULL);
    }
    if (ss->reader || ss->opener)
        return sp_errf(err, SP_SLOT_BUSY, "session %llu: another session_read is waiting",
                       (unsigned long long)ss->id);
    ss->reader = rq;
    rq->aux = max;
    ev_timer_set(&ss->wait_w, (double)wait_ms / 1000.0, 0.0);
    ev_timer_start(ss->ag->loop, &ss->wait_w);
    return OP_PENDING;
}

/* ---- open and close ----------------------------------------------------------------- */

static void session_unlink(struct session *ss)
{
    struct slot *s = ss->slot;
    for (struct session **pp = &s->sessions; *pp; pp = &(*pp)->next)
        if (*pp == ss) {
            *pp = ss->next;
            s->nsessions--;
            break;
        }
}

unsigned session_close(struct session *ss, const struct sp_err *why)
{
    struct agent *ag = ss->ag;
    unsigned n = 0;
    if (ss->alive) {
        /* Its whole tree: the shell is a subreaper, so even double-forked
         * leftovers are below it. */
        n = proc_kill_tree(ss->pid);
        ss->alive = false;
    }
    session_unlink(ss);
    struct sp_err def;
    if (!why) {
        sp_errf(&def, SP_CANCELLED, "session %llu was closed", (unsigned long long)ss->id);
        why = &def;
    }
    struct req *pending[3] = {ss->opener, ss->reader, ss->cmd ? ss->cmd->owner : NULL};
    ss->opener = ss->reader = NULL;
    for (int i = 0; i < 3; i++)
        if (pending[i])
            req_finish(pending[i], why);
    keywait_cancel(&ss->kw, why);
    if (ss->cmd) {
        ev_timer_stop(ag->loop, &ss->cmd->timer);
        outbuf_free(&ss->cmd->ob[0]);
        outbuf_free(&ss->cmd->ob[1]);
        free(ss->cmd->before);
        free(ss->cmd);
    }
    ev_timer_stop(ag->loop, &ss->wait_w);
    ev_timer_stop(ag->loop, &ss->end_w);
    ev_io_stop(ag->loop, &ss->in_w);
    for (int k = 0; k < 2; k++)
        if (ss->fds[k] >= 0) {
            ev_io_stop(ag->loop, &ss->io[k]);
            close(ss->fds[k]);
        }
    if (ss->in_fd >= 0 && !ss->pty)
        close(ss->in_fd);
    free(ss->wbuf);
    free(ss->ring.buf);
    transcript_free(&ss->log);
    screen_free(ss->screen);
    log_debug("session %llu: closed", (unsigned long long)ss->id);
    free(ss);
    return n;
}

unsigned sessions_close_slot(struct agent *ag, struct slot *s)
{
    (void)ag;
    struct sp_err why;
    sp_errf(&why, SP_CANCELLED, "slot %u was reset or released (or the agent is stopping)",
            s->index);
    unsigned n = 0;
    while (s->sessions)
        n += session_close(s->sessions, &why);
    return n;
}

void sessions_pack(msgpack_packer *pk, const struct slot *s)
{
    msgpack_pack_array(pk, s->nsessions);
    for (const struct session *ss = s->sessions; ss; ss = ss->next) {
        msgpack_pack_map(pk, 7);
        sp_pack_kv_uint(pk, "session", ss->id);
        sp_pack_kv_str(pk, "tag", ss->tag);
        sp_pack_kv_bool(pk, "pty", ss->pty);
        sp_pack_kv_int(pk, "pid", ss->pid);
        sp_pack_kv_bool(pk, "alive", ss->alive);
        sp_pack_kv_bool(pk, "running", ss->cmd != NULL);
        sp_pack_kv_uint(pk, "unread", ss->ring.len);
    }
}

/* The pty pair: the master stays with the agent, the slave goes to the
 * shell as its standard streams. */
static int open_pty(int *master, int *slave, const struct session_params *p, struct sp_err *err)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0)
        return sp_errf(err, SP_INTERNAL, "posix_openpt: %s", strerror(errno));
    if (unlockpt(m) < 0) {
        close(m);
        return sp_errf(err, SP_INTERNAL, "unlockpt: %s", strerror(errno));
    }
    /* TIOCGPTPEER opens the slave through the master, not by a name in
     * /dev/pts that could be swapped. */
    int sl = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (sl < 0) {
        char name[64];
        if (ptsname_r(m, name, sizeof name) == 0)
            sl = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    }
    if (sl < 0) {
        close(m);
        return sp_errf(err, SP_INTERNAL, "opening the pty slave: %s", strerror(errno));
    }
    struct winsize ws = {.ws_row = (unsigned short)p->rows, .ws_col = (unsigned short)p->cols};
    ioctl(m, TIOCSWINSZ, &ws);
    /* Like login and sshd: the terminal belongs to the user on it. */
    if (p->iso && (p->iso->want & (1u << RUNG_UID)) && fchown(sl, p->iso->uid, (gid_t)-1) < 0)
        log_warn("pty: chown to the slot user: %s", strerror(errno));
    *master = m;
    *slave = sl;
    return 0;
}

/* Landlock for a pty session: the slot's rules plus its terminal's name,
 * in a ruleset of its own (replacing the slot's shared one in p->iso for
 * this spawn; session_open puts the shared one back). */
static int pty_landlock(struct agent *ag, struct slot *s, const struct session_params *p,
                        int master, struct sp_err *err)
{
    if (!p->iso || p->iso->landlock_fd < 0)
        return 0;
    char name[64];
    if (ptsname_r(master, name, sizeof name) != 0)
        return sp_errf(err, SP_INTERNAL, "ptsname: %s", strerror(errno));
    struct sp_err lerr;
    int fd =
        landlock_ruleset(ag->iso.landlock_abi, s->ws_path, s->tmp_path, p->network, name, &lerr);
    if (fd < 0)
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "%s", lerr.msg);
    p->iso->landlock_fd = fd;
    return 0;
}

static void random_nonce(char *out)
{
    unsigned char r[NONCE_LEN / 2];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
        /* No entropy source: still unique per session, just guessable. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t v = (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32);
        memcpy(r, &v, sizeof r);
    }
    for (size_t i = 0; i < sizeof r; i++)
        snprintf(out + 2 * i, 3, "%02x", r[i]);
}

/* The shell's first input: quiet prompts, no history file, no `!`
 * expansion, and the marker before every prompt. $? survives it. */
static int send_setup(struct session *ss, const char *nonce)
{
    char line[512];
    int n = snprintf(line, sizeof line,
                     " PS1='%s'; PS2='%s'; unset HISTFILE; set +H; "
                     "__slot_prompt() { local s=$?; printf '\\033]6973;%s;%%d\\007' \"$s\"%s; "
                     "return $s; }; PROMPT_COMMAND=__slot_prompt\n",
                     ss->pty ? "$ " : "", ss->pty ? "> " : "", nonce, ss->pty ? "" : " >&2");
    if (n < 0 || (size_t)n >= sizeof line)
        return -1;
    queue_input(ss, line, (size_t)n, false);
    return 0;
}

static int spawn_shell(struct agent *ag, struct slot *s, struct session *ss,
                       const struct session_params *p, struct spawn *sp, struct sp_err *err)
{
    if (!p->box) {
        pid_t pid = child_spawn(sp);
        if (pid < 0)
            return sp_errf(err, SP_INTERNAL, "clone: %s", strerror(sp->child_errno));
        if (sp->child_errno) {
            int rung = p->iso ? p->iso->failed_rung : -1;
            if (rung >= 0)
                return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "isolation required: %s failed: %s",
                               rung_names[rung], strerror(sp->child_errno));
            return sp_errf(err, SP_NOT_FOUND, "cannot execute %s: %s", p->path,
                           strerror(sp->child_errno));
        }
        ss->pid = pid;
        ss->iso_applied = p->iso ? p->iso->applied : (1u << RUNG_CONTAINMENT);
        return 0;
    }
    /* Through the slot's box, waiting for the holder's answer here (a few
     * ms): answers come in request order, so only when no command's answer
     * is outstanding — which a slot-queued session_open guarantees. */
    if (exec_box_pending(ag, p->box))
        return sp_errf(err, SP_SLOT_BUSY, "a command of slot %u is still starting", s->index);
    if (ns_box_send(p->box, sp, false) < 0) {
        slots_box_lost(ag, s, p->box);
        return sp_errf(err, SP_INTERNAL, "namespaces: the slot's holder is gone: %s",
                       strerror(sp->child_errno));
    }
    struct box_result r;
    if (ns_box_recv(p->box, 0, &r) < 0) {
        slots_box_stop(ag, s);
        return sp_errf(err, SP_INTERNAL, "namespaces: the slot's holder did not answer");
    }
    if (r.pid < 0 || r.child_errno) {
        int ce = r.child_errno ? r.child_errno : EIO;
        if (r.failed_rung >= 0)
            return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "isolation required: %s failed: %s",
                           rung_names[r.failed_rung], strerror(ce));
        return sp_errf(err, SP_NOT_FOUND, "cannot execute %s: %s", p->path, strerror(ce));
    }
    ss->pid = r.pid;
    ss->iso_applied = r.applied & (p->iso->want | (1u << RUNG_NAMESPACES));
    return 0;
}

int session_open(struct agent *ag, struct slot *s, struct req *opener,
                 const struct session_params *p, struct sp_err *err)
{
    if (s->nsessions >= ag->opt.max_sessions)
        return sp_errf(err, SP_NO_CAPACITY,
                       "too many sessions: slot %u has %u (--max-sessions); close one", s->index,
                       s->nsessions);
    struct session *ss = calloc(1, sizeof *ss);
    if (!ss)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    ss->ag = ag;
    ss->slot = s;
    ss->fds[0] = ss->fds[1] = ss->in_fd = -1;
    ss->pty = p->pty;
    ss->bash = p->bash;
    ss->cols = p->cols;
    ss->rows = p->rows;
    if (p->tag)
        snprintf(ss->tag, sizeof ss->tag, "%.*s", (int)p->tag_len, p->tag);
    ss->ring.cap = (size_t)ag->opt.session_buffer;
    transcript_init(&ss->log, p->pty ? TRANSCRIPT_CAP : 0);
    keywait_init(&ss->kw, &ss->alive);
    char nonce[NONCE_LEN + 1];
    random_nonce(nonce);
    ss->plen = (size_t)snprintf(ss->prefix, sizeof ss->prefix, MARK_HEAD "%s;", nonce);

    int child[3] = {-1, -1, -1}, mine[3] = {-1, -1, -1};
    int shared_ll = p->iso ? p->iso->landlock_fd : -1;
    int rc = -1;
    if (p->pty) {
        ss->screen = screen_new(p->rows, p->cols, screen_reply, ss);
        if (!ss->screen) {
            sp_errf(err, SP_INTERNAL, "out of memory");
            goto fail;
        }
        if (open_pty(&mine[0], &child[0], p, err) < 0)
            goto fail;
        if (pty_landlock(ag, s, p, mine[0], err) < 0)
            goto fail;
        child[1] = child[2] = child[0];
    } else {
        int pp[3][2];
        for (int i = 0; i < 3; i++) {
            if (pipe2(pp[i], O_CLOEXEC) < 0) {
                sp_errf(err, SP_INTERNAL, "pipe: %s", strerror(errno));
                goto fail;
            }
            child[i] = pp[i][i == 0 ? 0 : 1];
            mine[i] = pp[i][i == 0 ? 1 : 0];
        }
    }
    struct spawn sp = {
        .stack = ag->child_stack,
        .path = p->path,
        .argv = p->argv,
        .envp = p->envp,
        .stdin_fd = child[0],
        .stdout_fd = child[1],
        .stderr_fd = child[2],
        .cwd_fd = p->cwd_fd,
        .cwd_path = p->box ? p->cwd_path : NULL,
        .iso = p->iso,
        .ctty = p->pty,
    };
    if (spawn_shell(ag, s, ss, p, &sp, err) < 0)
        goto fail;
    ss->alive = true;
    if (p->pty) {
        ss->fds[0] = ss->in_fd = mine[0];
    } else {
        ss->in_fd = mine[0];
        ss->fds[0] = mine[1];
        ss->fds[1] = mine[2];
    }
    mine[0] = mine[1] = mine[2] = -1;
    for (int k = 0; k < 2; k++) {
        if (ss->fds[k] < 0)
            continue;
        fcntl(ss->fds[k], F_SETFL, O_NONBLOCK);
        ev_io_init(&ss->io[k], output_cb, ss->fds[k], EV_READ);
        ss->io[k].data = ss;
        ev_io_start(ag->loop, &ss->io[k]);
    }
    fcntl(ss->in_fd, F_SETFL, O_NONBLOCK);
    ev_io_init(&ss->in_w, input_cb, ss->in_fd, EV_WRITE);
    ss->in_w.data = ss;
    ev_init(&ss->wait_w, wait_cb);
    ss->wait_w.data = ss;
    ev_init(&ss->end_w, end_cb);
    ss->end_w.data = ss;
    ss->id = ag->next_session_id++;
    ss->next = s->sessions;
    s->sessions = ss;
    s->nsessions++;
    log_debug("session %llu: slot %u pid %d%s", (unsigned long long)ss->id, s->index, (int)ss->pid,
              p->pty ? " (pty)" : "");
    rc = OP_DONE;
    if (p->bash && send_setup(ss, nonce) == 0) {
        ss->opener = opener;
        ev_timer_set(&ss->wait_w, READY_SECONDS, 0.0);
        ev_timer_start(ag->loop, &ss->wait_w);
        rc = OP_PENDING;
    } else {
        ss->bash = false;
        ss->ready = true;
        answer_open(ss, opener);
    }
fail:
    /* The child's ends (one pty slave shared by three) and, on failure, ours. */
    for (int i = 0; i < 3; i++) {
        if (child[i] >= 0 && (i == 0 || child[i] != child[0]))
            close(child[i]);
        if (mine[i] >= 0)
            close(mine[i]);
    }
    if (p->pty && p->iso && p->iso->landlock_fd >= 0 && p->iso->landlock_fd != shared_ll) {
        close(p->iso->landlock_fd);
        p->iso->landlock_fd = shared_ll;
    }
    if (rc < 0) {
        screen_free(ss->screen);
        free(ss);
    }
    return rc;
}
