/* The life of a command: spawn with pipes, drain output into bounded
 * head + tail buffers (the child never blocks on a full pipe), stream events
 * to waiters, enforce wall-clock and idle timeouts, kill every leftover
 * process when the main one ends, and keep finished results for a while so
 * any connection can attach to them. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "child.h"
#include "exec.h"
#include "idem.h"
#include "quota.h"
#include "slotfs.h"
#include "session.h"
#include "warm/warm_wire.h"

_Static_assert(LIM_COUNT == WARM_LIMITS, "the warm shell's limits are isolate.h's");

#define RETAIN_MAX 1024
#define RETAIN_SECONDS 600.0
#define RETAIN_BYTES (64ull << 20)
#define DRAIN_SECONDS 2.0
#define READ_CHUNK 65536

static void exec_finish(struct exec *e);

/* ---- bounded output ----------------------------------------------------- */

void outbuf_init(struct outbuf *ob, uint64_t max_output)
{
    memset(ob, 0, sizeof *ob);
    ob->head_cap = (size_t)(max_output / 2);
    ob->ring_cap = (size_t)(max_output - ob->head_cap);
}

void outbuf_free(struct outbuf *ob)
{
    free(ob->head);
    free(ob->ring);
    ob->head = ob->ring = NULL;
}

static size_t outbuf_mem(const struct outbuf *ob)
{
    return ob->head_alloc + (ob->ring ? ob->ring_cap : 0);
}

void outbuf_append(struct outbuf *ob, const char *p, size_t n)
{
    if (ob->head_len < ob->head_cap) {
        size_t k = ob->head_cap - ob->head_len;
        if (k > n)
            k = n;
        if (ob->head_len + k > ob->head_alloc) {
            size_t want = ob->head_alloc ? ob->head_alloc : 4096;
            while (want < ob->head_len + k)
                want *= 2;
            if (want > ob->head_cap)
                want = ob->head_cap;
            char *h = realloc(ob->head, want);
            if (!h) {
                ob->total += n; /* out of memory: count, keep nothing */
                return;
            }
            ob->head = h;
            ob->head_alloc = want;
        }
        memcpy(ob->head + ob->head_len, p, k);
        ob->head_len += k;
        ob->total += k;
        p += k;
        n -= k;
    }
    if (n == 0 || ob->ring_cap == 0) {
        ob->total += n;
        return;
    }
    if (!ob->ring && !(ob->ring = malloc(ob->ring_cap))) {
        ob->total += n;
        return;
    }
    if (n > ob->ring_cap) {
        ob->total += n - ob->ring_cap;
        p += n - ob->ring_cap;
        n = ob->ring_cap;
    }
    size_t pos = (size_t)((ob->total - ob->head_cap) % ob->ring_cap);
    size_t first = ob->ring_cap - pos < n ? ob->ring_cap - pos : n;
    memcpy(ob->ring + pos, p, first);
    memcpy(ob->ring, p + first, n - first);
    ob->total += n;
}

/* First stream offset kept in the ring. */
static uint64_t outbuf_tail_start(const struct outbuf *ob)
{
    if (ob->total <= ob->head_cap)
        return ob->total;
    uint64_t after = ob->total - ob->head_cap;
    return after > ob->ring_cap ? ob->total - ob->ring_cap : ob->head_cap;
}

uint64_t outbuf_dropped(const struct outbuf *ob)
{
    return outbuf_tail_start(ob) - (ob->total < ob->head_cap ? ob->total : ob->head_cap);
}

/* Copy retained bytes of [from, to) (all inside the ring) into dst. */
static void outbuf_copy_ring(const struct outbuf *ob, uint64_t from, uint64_t to, char *dst)
{
    while (from < to) {
        size_t pos = (size_t)((from - ob->head_cap) % ob->ring_cap);
        size_t k = ob->ring_cap - pos;
        if (k > to - from)
            k = (size_t)(to - from);
        memcpy(dst, ob->ring + pos, k);
        dst += k;
        from += k;
    }
}

void outbuf_pack(msgpack_packer *pk, const struct outbuf *ob)
{
    uint64_t ts = outbuf_tail_start(ob);
    uint64_t tail = ob->total - ts;
    uint64_t dropped = outbuf_dropped(ob);
    char marker[64];
    int mlen = 0;
    if (dropped)
        mlen = snprintf(marker, sizeof marker, "\n[... %llu bytes dropped ...]\n",
                        (unsigned long long)dropped);
    size_t n = ob->head_len + (size_t)mlen + (size_t)tail;
    msgpack_pack_bin(pk, n);
    msgpack_pack_bin_body(pk, ob->head, ob->head_len);
    if (mlen)
        msgpack_pack_bin_body(pk, marker, (size_t)mlen);
    if (tail) {
        /* The ring may wrap: pack it in at most two pieces. */
        uint64_t from = ts;
        while (from < ob->total) {
            size_t pos = (size_t)((from - ob->head_cap) % ob->ring_cap);
            size_t k = ob->ring_cap - pos;
            if (k > ob->total - from)
                k = (size_t)(ob->total - from);
            msgpack_pack_bin_body(pk, ob->ring + pos, k);
            from += k;
        }
    }
}

/* ---- events ------------------------------------------------------------ */

static const char *const stream_names[2] = {"stdout", "stderr"};

static void send_chunk(struct req *rq, int k, uint64_t offset, const char *p, size_t n)
{
    msgpack_packer *pk = req_event_begin(rq, stream_names[k], 2);
    sp_pack_kv_bin(pk, "data", p, n);
    sp_pack_kv_uint(pk, "offset", offset);
    req_event_end(rq);
}

static void send_live(struct exec *e, int k, uint64_t offset, const char *p, size_t n)
{
    /* Output of a command still starting in a box waits for its "started"
     * event (exec_box_readable replays it), so events keep their order. */
    if (e->spawning)
        return;
    struct req *list[2] = {e->owner, e->attach};
    for (int i = 0; i < 2; i++) {
        for (struct req *rq = list[i]; rq; rq = (i == 0 ? NULL : rq->exec_next)) {
            if (!rq->stream)
                continue;
            uint64_t *off = k == 0 ? &rq->out_off : &rq->err_off;
            if (*off >= offset + n)
                continue;
            uint64_t skip = *off > offset ? *off - offset : 0;
            send_chunk(rq, k, offset + skip, p + skip, n - (size_t)skip);
            *off = offset + n;
        }
    }
}

void exec_replay(struct exec *e, struct req *rq)
{
    if (e->output_released)
        return;
    for (int k = 0; k < 2; k++) {
        const struct outbuf *ob = &e->ob[k];
        uint64_t *off = k == 0 ? &rq->out_off : &rq->err_off;
        /* An offset beyond what exists skips output still to come. */
        if (*off >= ob->total)
            continue;
        if (*off < ob->head_len) {
            send_chunk(rq, k, *off, ob->head + *off, ob->head_len - (size_t)*off);
            *off = ob->head_len;
        }
        uint64_t ts = outbuf_tail_start(ob);
        if (*off < ts)
            *off = ts;
        while (*off < ob->total) {
            size_t n = ob->total - *off > READ_CHUNK ? READ_CHUNK : (size_t)(ob->total - *off);
            char buf[READ_CHUNK];
            outbuf_copy_ring(ob, *off, *off + n, buf);
            send_chunk(rq, k, *off, buf, n);
            *off += n;
        }
    }
}

void exec_add_attach(struct exec *e, struct req *rq)
{
    rq->exec = e;
    rq->exec_next = e->attach;
    e->attach = rq;
}

/* ---- result ------------------------------------------------------------ */

void exec_pack_result(msgpack_packer *pk, const struct exec *e, bool with_output)
{
    int code = -1, sig = 0;
    if (WIFEXITED(e->status)) {
        code = WEXITSTATUS(e->status);
    } else if (WIFSIGNALED(e->status)) {
        sig = WTERMSIG(e->status);
        code = 128 + sig;
    }
    double end = e->finished ? e->t_end : agent_now_precise(e->ag);
    msgpack_pack_map(pk, e->disk_quota ? 19 : 18);
    sp_pack_kv_uint(pk, "exec_id", e->id);
    sp_pack_kv_bool(pk, "disk_quota", e->disk_quota);
    if (e->disk_quota)
        sp_pack_kv_str(pk, "reason", e->quota_why);
    sp_pack_kv_int(pk, "pid", e->pid);
    sp_pack_kv_int(pk, "exit_code", code);
    sp_pack_kv_int(pk, "signal", sig);
    for (int k = 0; k < 2; k++) {
        sp_pack_cstr(pk, stream_names[k]);
        if (with_output && !e->output_released)
            outbuf_pack(pk, &e->ob[k]);
        else
            msgpack_pack_bin(pk, 0);
    }
    for (int k = 0; k < 2; k++) {
        const struct outbuf *ob = &e->ob[k];
        sp_pack_kv_bool(pk, k == 0 ? "stdout_truncated" : "stderr_truncated",
                        ob->total > (uint64_t)ob->head_cap + ob->ring_cap);
    }
    sp_pack_kv_uint(pk, "stdout_bytes", e->ob[0].total);
    sp_pack_kv_uint(pk, "stderr_bytes", e->ob[1].total);
    sp_pack_kv_bool(pk, "timed_out", e->timed_out);
    sp_pack_kv_bool(pk, "idle_timed_out", e->idle_timed_out);
    sp_pack_kv_bool(pk, "cancelled", e->cancelled);
    double ms = (end - e->t_start) * 1000.0;
    sp_pack_kv_uint(pk, "duration_ms", ms > 0 ? (uint64_t)ms : 0);
    sp_pack_cstr(pk, "isolation");
    msgpack_pack_array(pk, (uint32_t)__builtin_popcount(e->iso_applied));
    for (int r = 0; r < RUNG_COUNT; r++)
        if (e->iso_applied & (1u << r))
            sp_pack_cstr(pk, rung_names[r]);
    sp_pack_kv_bool(pk, "network", e->network);
    sp_pack_kv_bool(pk, "warm", e->warm_used);
}

/* ---- lifecycle --------------------------------------------------------- */

static void list_del(struct exec **head, struct exec *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        *head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    e->next = e->prev = NULL;
}

static void list_push(struct exec **head, struct exec *e)
{
    e->prev = NULL;
    e->next = *head;
    if (*head)
        (*head)->prev = e;
    *head = e;
}

static void close_stream(struct exec *e, int k)
{
    if (e->fds[k] < 0)
        return;
    ev_io_stop(e->ag->loop, &e->io[k]);
    close(e->fds[k]);
    e->fds[k] = -1;
}

static void close_stdin(struct exec *e)
{
    if (e->in_fd < 0)
        return;
    ev_io_stop(e->ag->loop, &e->in_w);
    close(e->in_fd);
    e->in_fd = -1;
    free(e->in_buf);
    e->in_buf = NULL;
}

static void maybe_finish(struct exec *e)
{
    if (e->exited && e->fds[0] < 0 && e->fds[1] < 0 && !e->finished)
        exec_finish(e);
}

static void output_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct exec *e = w->data;
    int k = w == &e->io[0] ? 0 : 1;
    char buf[READ_CHUNK];
    /* A few reads per wake-up: fair to other commands, still drains fast. */
    for (int i = 0; i < 4 && e->fds[k] >= 0; i++) {
        ssize_t n = read(e->fds[k], buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            close_stream(e, k);
            break;
        }
        if (n == 0) {
            close_stream(e, k);
            break;
        }
        uint64_t off = e->ob[k].total;
        outbuf_append(&e->ob[k], buf, (size_t)n);
        e->last_output = ev_now(e->ag->loop);
        send_live(e, k, off, buf, (size_t)n);
        if ((size_t)n < sizeof buf)
            return;
    }
    maybe_finish(e);
}

static void stdin_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct exec *e = w->data;
    while (e->in_off < e->in_len) {
        ssize_t n = write(e->in_fd, e->in_buf + e->in_off, e->in_len - e->in_off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            break; /* EPIPE: the command does not want the rest */
        }
        e->in_off += (size_t)n;
    }
    close_stdin(e);
}

unsigned exec_kill(struct exec *e)
{
    if (e->exited)
        return 0;
    return proc_kill_tree(e->pid);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct exec *e = w->data;
    if (e->exited)
        return;
    e->timed_out = true;
    log_debug("exec %llu: timed out", (unsigned long long)e->id);
    exec_kill(e);
}

static void idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct exec *e = w->data;
    if (e->exited)
        return;
    double quiet = ev_now(loop) - e->last_output;
    if (quiet < e->idle_s) {
        w->repeat = e->idle_s - quiet;
        ev_timer_again(loop, w);
        return;
    }
    e->idle_timed_out = true;
    log_debug("exec %llu: idle for %.3f s", (unsigned long long)e->id, quiet);
    exec_kill(e);
}

static void drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct exec *e = w->data;
    /* Something still holds the pipes although the command ended and its
     * leftovers were killed: stop waiting for it. */
    log_warn("exec %llu: output still open %.0f s after exit; closing", (unsigned long long)e->id,
             DRAIN_SECONDS);
    proc_sweep_strays(e->ag);
    slots_box_sweep(e->ag, e->slot);
    close_stream(e, 0);
    close_stream(e, 1);
    maybe_finish(e);
}

/* Why a child did not get to execve: a required rung, or execve itself. */
static void spawn_error(struct sp_err *err, int ce, int rung, const char *path)
{
    if (rung >= 0)
        sp_errf(err, SP_ISOLATION_UNAVAILABLE, "isolation required: %s failed: %s",
                rung_names[rung], strerror(ce));
    else if (ce == ENOENT || ce == EACCES || ce == ENOTDIR || ce == ENOEXEC)
        sp_errf(err, SP_NOT_FOUND, "cannot execute %s: %s", path, strerror(ce));
    else
        sp_errf(err, SP_INTERNAL, "cannot execute %s: %s", path, strerror(ce));
}

struct exec *exec_start(struct agent *ag, struct slot *s, struct req *owner,
                        const struct exec_params *p, struct sp_err *err)
{
    int out[2] = {-1, -1}, errp[2] = {-1, -1}, in[2] = {-1, -1};
    struct exec *e = calloc(1, sizeof *e);
    if (!e)
        return sp_errf(err, SP_INTERNAL, "out of memory"), NULL;
    e->ag = ag;
    e->slot = s;
    e->fds[0] = e->fds[1] = e->in_fd = -1;
    s->disk.cmds++; /* its first count is its baseline (quota.c) */
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 ||
        (p->stdin_data && pipe2(in, O_CLOEXEC) < 0)) {
        sp_errf(err, SP_INTERNAL, "pipe: %s", strerror(errno));
        goto fail;
    }
    if (p->stdin_data && p->stdin_len) {
        e->in_buf = malloc(p->stdin_len);
        if (!e->in_buf) {
            sp_errf(err, SP_INTERNAL, "out of memory for stdin");
            goto fail;
        }
        memcpy(e->in_buf, p->stdin_data, p->stdin_len);
        e->in_len = p->stdin_len;
    }
    struct spawn sp = {
        .stack = ag->child_stack,
        .path = p->path,
        .argv = p->argv,
        .envp = p->envp,
        .stdin_fd = p->stdin_data ? in[0] : ag->devnull_fd,
        .stdout_fd = out[1],
        .stderr_fd = errp[1],
        .cwd_fd = p->cwd_fd,
        .cwd_path = p->box ? p->cwd_path : NULL,
        .iso = p->iso,
    };
    e->t_start = agent_now_precise(ag);
    pid_t pid = 0;
    int std[3] = {sp.stdin_fd, sp.stdout_fd, sp.stderr_fd};
    struct sp_err werr;
    const struct rlimit *lim = (p->iso->want & (1u << RUNG_RLIMITS)) ? p->iso->lim : NULL;
    if (p->warm && warm_send(ag, p->warm, p->cmd, p->cwd_path, p->box ? -1 : p->cwd_fd, p->envp,
                             lim, std, &e->warm_seq, &werr) == 0) {
        e->spawning = true;
        e->warm = p->warm;
        e->warm_used = true;
        e->iso_want = p->iso->want;
        ag->spawning++;
    } else if (p->box) {
        int ch = ns_box_send(p->box, &sp, true);
        if (ch < 0) {
            sp_errf(err, SP_INTERNAL, "namespaces: the slot's holder is gone: %s",
                    strerror(sp.child_errno));
            slots_box_lost(ag, s, p->box);
            goto fail;
        }
        e->spawning = true;
        e->box = p->box;
        e->box_ch = ch;
        e->iso_want = p->iso->want;
        ag->spawning++;
    } else if ((pid = child_spawn(&sp)) < 0) {
        sp_errf(err, SP_INTERNAL, "clone: %s", strerror(sp.child_errno));
        goto fail;
    }
    e->pid = pid;
    close(out[1]);
    close(errp[1]);
    out[1] = errp[1] = -1;
    if (in[0] >= 0) {
        close(in[0]);
        in[0] = -1;
    }
    if (sp.child_errno) {
        /* execve or isolation failed; the child exited 127 and is reaped as a
         * stray. */
        int ce = sp.child_errno;
        int rung = p->iso ? p->iso->failed_rung : -1;
        close(out[0]);
        close(errp[0]);
        if (in[1] >= 0)
            close(in[1]);
        free(e->in_buf);
        free(e);
        spawn_error(err, ce, rung, p->path);
        return NULL;
    }
    e->id = ag->next_exec_id++;
    e->detached = p->detach;
    e->network = p->network;
    e->keep_background = p->keep_background;
    e->iso_applied = p->iso ? p->iso->applied : (1u << RUNG_CONTAINMENT);
    e->owner = p->detach ? NULL : owner;
    if (e->owner)
        owner->exec = e;
    if (e->spawning && (p->detach || owner->stream))
        e->announce = owner;
    outbuf_init(&e->ob[0], p->max_output);
    outbuf_init(&e->ob[1], p->max_output);
    e->last_output = ev_now(ag->loop);
    for (int k = 0; k < 2; k++) {
        e->fds[k] = k == 0 ? out[0] : errp[0];
        fcntl(e->fds[k], F_SETFL, O_NONBLOCK);
        ev_io_init(&e->io[k], output_cb, e->fds[k], EV_READ);
        e->io[k].data = e;
        ev_io_start(ag->loop, &e->io[k]);
    }
    if (in[1] >= 0) {
        e->in_fd = in[1];
        fcntl(e->in_fd, F_SETFL, O_NONBLOCK);
        ev_io_init(&e->in_w, stdin_cb, e->in_fd, EV_WRITE);
        e->in_w.data = e;
        ev_io_start(ag->loop, &e->in_w);
    }
    /* Timeouts count from now, not from the loop's cached time. */
    ev_now_update(ag->loop);
    ev_timer_init(&e->timer, timer_cb, (double)p->timeout_ms / 1000.0, 0.0);
    e->timer.data = e;
    ev_timer_start(ag->loop, &e->timer);
    ev_init(&e->idle, idle_cb);
    e->idle.data = e;
    if (p->idle_timeout_ms) {
        e->idle_s = (double)p->idle_timeout_ms / 1000.0;
        e->idle.repeat = e->idle_s;
        ev_timer_again(ag->loop, &e->idle);
    }
    ev_init(&e->drain, drain_cb);
    e->drain.data = e;
    list_push(&ag->running, e);
    s->running++;
    s->execs++;
    ag->execs_started++;
    log_debug("exec %llu: slot %u pid %d %s", (unsigned long long)e->id, s->index, (int)pid,
              p->path);
    /* Through a box the pid comes later: see exec_box_readable. */
    if (!e->spawning && owner)
        idem_exec_started(owner, e);
    return e;
fail:
    for (int i = 0; i < 2; i++) {
        if (out[i] >= 0)
            close(out[i]);
        if (errp[i] >= 0)
            close(errp[i]);
        if (in[i] >= 0)
            close(in[i]);
    }
    free(e->in_buf);
    free(e);
    return NULL;
}

/* ---- commands started by a box holder ------------------------------------ */

/* The command never started: undo exec_start, failing requests attached to
 * it, and hand back the request that started it. */
static struct req *exec_undo(struct exec *e, const struct sp_err *err)
{
    struct agent *ag = e->ag;
    struct slot *s = e->slot;
    if (e->spawning) {
        e->spawning = false;
        ag->spawning--;
    }
    list_del(&ag->running, e);
    s->running--;
    s->execs--;
    ag->execs_started--;
    ev_timer_stop(ag->loop, &e->timer);
    ev_timer_stop(ag->loop, &e->idle);
    ev_timer_stop(ag->loop, &e->drain);
    close_stream(e, 0);
    close_stream(e, 1);
    close_stdin(e);
    while (e->attach) {
        struct req *rq = e->attach;
        e->attach = rq->exec_next;
        rq->exec = NULL;
        req_finish(rq, err);
    }
    struct req *rq = e->announce ? e->announce : e->owner;
    e->announce = e->owner = NULL;
    if (rq)
        rq->exec = NULL;
    outbuf_free(&e->ob[0]);
    outbuf_free(&e->ob[1]);
    free(e);
    return rq;
}

/* The command never started: undo exec_start and fail its request. */
static void exec_abort(struct exec *e, const struct sp_err *err)
{
    struct agent *ag = e->ag;
    struct slot *s = e->slot;
    struct req *rq = exec_undo(e, err);
    if (rq && rq->op->fn == op_template_build)
        template_build_failed(ag, rq, err); /* the slot it borrowed goes back */
    else if (rq)
        req_finish(rq, err);
    if (s->resetting && s->running == 0)
        reset_complete(ag, s);
}

/* The oldest command still starting through this box's holder (w NULL) or
 * through warm shell w (box NULL). */
/* ch: the box's channel, or -1 for either. */
static struct exec *oldest_starting(struct agent *ag, struct nsbox *box, int ch,
                                    struct warm_shell *w)
{
    struct exec *best = NULL;
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->spawning && e->warm == w && (w || (e->box == box && (ch < 0 || e->box_ch == ch))) &&
            (!best || e->id < best->id))
            best = e;
    return best;
}

static struct exec *oldest_spawning(struct agent *ag, struct nsbox *box, int ch)
{
    return oldest_starting(ag, box, ch, NULL);
}

void exec_box_gone(struct agent *ag, struct nsbox *box)
{
    struct sp_err err;
    sp_errf(&err, SP_CANCELLED,
            "the slot's namespace holder went away before the command "
            "started (slot reset or agent stopping)");
    struct exec *e;
    while ((e = oldest_spawning(ag, box, -1))) {
        struct sp_err qerr;
        if (e->disk_quota) /* stopped with its slot for the disk budget */
            sp_errf(&qerr, SP_CANCELLED, "stopped before it started: %s", e->quota_why);
        exec_abort(e, e->disk_quota ? &qerr : &err);
    }
    if (!ag->spawning)
        ag->nearly = 0;
}

/* A command started by a box holder or a warm shell has its pid: announce
 * it, and catch up with what happened while it was starting. */
static void exec_spawned(struct agent *ag, struct exec *e, pid_t pid, unsigned applied)
{
    e->pid = pid;
    e->iso_applied = applied;
    log_debug("exec %llu: slot %u pid %d (%s)", (unsigned long long)e->id, e->slot->index, (int)pid,
              e->warm_used ? "warm" : "box");
    /* Repeats of its request attach now, before an exit reaped early
     * (below) can finish it. */
    struct req *first = e->announce ? e->announce : e->owner;
    if (first)
        idem_exec_started(first, e);
    struct req *rq = e->announce;
    e->announce = NULL;
    if (rq && exec_announce(rq, e) == OP_DONE)
        req_finish(rq, NULL);
    else if (rq && rq == e->owner && rq->stream)
        exec_replay(e, rq);
    /* Attached while it was starting: what it wrote meanwhile (live output
     * waited for the pid, see send_live). */
    for (struct req *a = e->attach; a; a = a->exec_next)
        if (a->stream)
            exec_replay(e, a);
    int status = 0;
    bool exited = false;
    for (unsigned i = 0; i < ag->nearly; i++)
        if (ag->early[i].pid == pid) {
            status = ag->early[i].status;
            ag->early[i] = ag->early[--ag->nearly];
            exited = true;
            break;
        }
    if (exited)
        exec_on_child_exit(ag, pid, status);
    else if (e->timed_out || e->idle_timed_out || e->cancelled)
        exec_kill(e); /* asked for while it was starting */
}

void exec_box_readable(struct agent *ag, struct slot *s, int k, int ch)
{
    struct nsbox *box = &s->box[k];
    struct box_result r;
    if (ns_box_recv(box, ch, &r) < 0) {
        log_warn("slot %u: namespace holder stopped answering", s->index);
        slots_box_stop(ag, s);
        return;
    }
    struct exec *e = oldest_spawning(ag, box, ch);
    if (!e)
        return; /* its command was aborted meanwhile */
    e->spawning = false;
    ag->spawning--;
    if (r.pid < 0 || r.child_errno) {
        struct sp_err err;
        spawn_error(&err, r.child_errno ? r.child_errno : EIO, r.failed_rung, "the command");
        exec_abort(e, &err);
    } else {
        exec_spawned(ag, e, r.pid, r.applied & (e->iso_want | (1u << RUNG_NAMESPACES)));
    }
    if (!ag->spawning)
        ag->nearly = 0;
}

/* Answers of a warm shell's commands come as each is set up, in any order. */
static struct exec *warm_request(struct agent *ag, struct warm_shell *w, uint64_t seq)
{
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->spawning && e->warm == w && e->warm_seq == seq)
            return e;
    return NULL;
}

void exec_warm_readable(struct agent *ag, struct warm_shell *w)
{
    /* What one answer sets off (a finished request, the slot's next one) can
     * stop this very shell: then w is reset and its socket closed. */
    while (w->sock >= 0) {
        pid_t pid = -1;
        int en = 0;
        uint64_t seq = 0;
        int rc = warm_recv(ag, w, &seq, &pid, &en);
        if (rc == 1)
            break;
        if (rc == 2)
            continue;
        if (rc < 0) {
            warm_closed(ag, w); /* what never started runs cold */
            break;
        }
        warm_answered(ag, w);
        struct exec *e = warm_request(ag, w, seq);
        if (!e)
            continue; /* given up meanwhile (a reset): the reset kills it */
        e->spawning = false;
        e->warm = NULL;
        ag->spawning--;
        if (pid < 0) {
            struct sp_err err;
            if (en)
                spawn_error(&err, en, -1, "the command");
            else
                sp_errf(&err, SP_INTERNAL, "the command was killed before it started");
            exec_abort(e, &err);
            continue;
        }
        ag->warm.execs++;
        exec_spawned(ag, e, pid, w->applied & (e->iso_want | (1u << RUNG_NAMESPACES)));
    }
    if (!ag->spawning)
        ag->nearly = 0;
}

void exec_warm_gone(struct agent *ag, struct warm_shell *w, enum warm_gone how)
{
    struct sp_err err;
    if (how == WARM_UNKNOWN)
        sp_errf(&err, SP_INTERNAL,
                "the slot's warm shell was lost and whether the command started cannot be "
                "told; look before running it again");
    else
        sp_errf(&err, SP_CANCELLED,
                "the slot's warm shell went away before the command started (slot reset or "
                "agent stopping)");
    struct exec *e;
    while ((e = oldest_starting(ag, NULL, -1, w))) {
        struct sp_err qerr;
        if (e->disk_quota)
            sp_errf(&qerr, SP_CANCELLED, "stopped before it started: %s", e->quota_why);
        if (how != WARM_RETRY || e->disk_quota || e->cancelled || e->slot->resetting ||
            ag->stopping) {
            exec_abort(e, e->disk_quota ? &qerr : &err);
            continue;
        }
        /* It never ran: run its request again, the cold way. */
        struct req *rq = exec_undo(e, &err);
        if (!rq)
            continue;
        warm_rerun(ag, rq, true);
    }
    if (!ag->spawning)
        ag->nearly = 0;
}

static void retain_evict(struct agent *ag, struct exec *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        ag->finished = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        ag->finished_tail = e->prev;
    ag->nfinished--;
    ag->retained_bytes -= outbuf_mem(&e->ob[0]) + outbuf_mem(&e->ob[1]);
    outbuf_free(&e->ob[0]);
    outbuf_free(&e->ob[1]);
    free(e);
}

void exec_gc(struct agent *ag)
{
    double now = ev_now(ag->loop);
    while (ag->finished_tail && (ag->nfinished > RETAIN_MAX || ag->retained_bytes > RETAIN_BYTES ||
                                 now - ag->finished_tail->finished_at > RETAIN_SECONDS))
        retain_evict(ag, ag->finished_tail);
}

static void exec_finish(struct exec *e)
{
    struct agent *ag = e->ag;
    struct slot *s = e->slot;
    e->finished = true;
    /* A detached command ends with no request of its slot: count it. */
    quota_kick(ag, s);
    ev_timer_stop(ag->loop, &e->timer);
    ev_timer_stop(ag->loop, &e->idle);
    ev_timer_stop(ag->loop, &e->drain);
    close_stdin(e);
    list_del(&ag->running, e);
    ag->execs_finished++;
    if (e->timed_out || e->idle_timed_out)
        ag->execs_timed_out++;
    if (e->cancelled)
        ag->execs_cancelled++;
    hist_add(&ag->exec_lat, (uint64_t)((e->t_end - e->t_start) * 1e6));
    e->finished_at = ev_now(ag->loop);
    /* Retain before answering: an answer can close a connection, and attach
     * must find the result from then on. */
    e->prev = NULL;
    e->next = ag->finished;
    if (ag->finished)
        ag->finished->prev = e;
    else
        ag->finished_tail = e;
    ag->finished = e;
    ag->nfinished++;
    ag->retained_bytes += outbuf_mem(&e->ob[0]) + outbuf_mem(&e->ob[1]);
    while (e->attach) {
        struct req *rq = e->attach;
        e->attach = rq->exec_next;
        rq->exec = NULL;
        /* exec_attach streams (it had the output as events); a repeat of a
         * keyed exec without `stream` gets it in the result, as the first
         * run's requester did. */
        exec_pack_result(req_reply_begin(rq), e, !rq->stream);
        req_reply_end(rq);
        req_finish(rq, NULL);
    }
    s->running--;
    struct req *owner = e->owner;
    e->owner = NULL;
    if (owner && owner->op->fn == op_template_build) {
        owner->exec = NULL;
        template_build_done(ag, owner, e);
    } else if (owner) {
        owner->exec = NULL;
        bool delivered = owner->conn && conn_peer_reading(owner->conn);
        exec_pack_result(req_reply_begin(owner), e, !owner->stream);
        req_reply_end(owner);
        req_finish(owner, NULL);
        /* Its requester has the output; keeping it for a possible attach
         * would hold up to 2 x max_output per retained result. Results
         * nobody received (detached, connection lost or half-closed, so
         * possibly gone) keep theirs, and so do keyed ones: a repeat of the
         * request (its answer lost on the way) gets the same output. */
        if (delivered && !e->keyed) {
            ag->retained_bytes -= outbuf_mem(&e->ob[0]) + outbuf_mem(&e->ob[1]);
            for (int k = 0; k < 2; k++) {
                outbuf_free(&e->ob[k]);
                e->ob[k].head_len = e->ob[k].head_alloc = 0;
            }
            e->output_released = true;
        }
    }
    if (s->resetting && s->running == 0)
        reset_complete(ag, s);
    exec_gc(ag);
}

void exec_on_child_exit(struct agent *ag, pid_t pid, int status)
{
    if (session_child_exit(ag, pid, status))
        return;
    struct exec *e = ag->running;
    while (e && (e->pid != pid || e->exited))
        e = e->next;
    if (!e && ag->spawning) {
        /* Perhaps a command a box holder started whose pid the holder has
         * not told yet: keep its status for a while. */
        if (ag->nearly == sizeof ag->early / sizeof ag->early[0])
            memmove(ag->early, ag->early + 1, sizeof ag->early - sizeof ag->early[0]);
        else
            ag->nearly++;
        ag->early[ag->nearly - 1].pid = pid;
        ag->early[ag->nearly - 1].status = status;
    }
    if (!e && slotfs_guardian_pid(ag, pid)) {
        log_warn("the guardian of the slots' filesystems exited: a killed agent would leave "
                 "its mounts");
        ag->quota.guardian = 0; /* never signal a pid that is no longer it */
        return;
    }
    if (!e) {
        /* a box holder, a leftover, or an orphan adopted as PID 1 */
        if (!slots_box_exited(ag, pid) && !warm_exited(ag, pid))
            slots_forget_kept(ag, pid);
        return;
    }
    e->exited = true;
    e->status = status;
    e->t_end = agent_now_precise(ag);
    ev_timer_stop(ag->loop, &e->timer);
    ev_timer_stop(ag->loop, &e->idle);
    /* Leftovers: the group it led, and everything re-parented to us. */
    if (e->keep_background) {
        slots_keep_leftovers(ag, e->slot);
    } else {
        kill(-pid, SIGKILL);
        proc_sweep_strays(ag);
        slots_box_sweep(ag, e->slot);
    }
    if (e->fds[0] >= 0 || e->fds[1] >= 0) {
        ev_timer_set(&e->drain, DRAIN_SECONDS, 0.0);
        ev_timer_start(ag->loop, &e->drain);
    }
    maybe_finish(e);
}

bool exec_box_pending(struct agent *ag, struct nsbox *box)
{
    return oldest_spawning(ag, box, 0) != NULL;
}

bool exec_is_main_pid(struct agent *ag, pid_t pid)
{
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->pid == pid && !e->exited)
            return true;
    return false;
}

struct exec *exec_find(struct agent *ag, uint64_t id)
{
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->id == id)
            return e;
    for (struct exec *e = ag->finished; e; e = e->next)
        if (e->id == id)
            return e;
    return NULL;
}

unsigned exec_kill_slot(struct agent *ag, struct slot *s)
{
    unsigned n = 0;
    for (struct exec *e = ag->running; e; e = e->next) {
        if (e->slot != s || e->exited)
            continue;
        e->cancelled = true;
        n += exec_kill(e);
    }
    /* Sessions first: their shells are not strays to the sweep below. */
    n += sessions_close_slot(ag, s);
    warm_stop_slot(ag, s);
    n += proc_sweep_strays(ag);
    n += slots_kill_kept(s);
    n += cgroup_slot_kill(&ag->iso, s->index);
    n += slots_box_sweep(ag, s);
    /* Whatever hides in the slot's namespaces dies with them. */
    slots_box_stop(ag, s);
    return n;
}

void exec_kill_all(struct agent *ag)
{
    for (struct exec *e = ag->running; e; e = e->next) {
        if (e->exited)
            continue;
        e->cancelled = true;
        exec_kill(e);
    }
    for (unsigned i = 0; i < ag->nslots; i++) {
        sessions_close_slot(ag, &ag->slots[i]);
        warm_stop_slot(ag, &ag->slots[i]);
        slots_kill_kept(&ag->slots[i]);
        slots_box_stop(ag, &ag->slots[i]);
    }
    proc_sweep_strays(ag);
}

void exec_conn_gone(struct agent *ag, struct conn *c)
{
    for (struct exec *e = ag->running; e; e = e->next) {
        struct req **pp = &e->attach;
        while (*pp) {
            struct req *rq = *pp;
            if (rq->conn == c) {
                *pp = rq->exec_next;
                conn_req_del(c, rq);
                req_free(rq);
                continue;
            }
            pp = &rq->exec_next;
        }
    }
}

void exec_free_all(struct agent *ag)
{
    while (ag->running) {
        struct exec *e = ag->running;
        list_del(&ag->running, e);
        close_stream(e, 0);
        close_stream(e, 1);
        close_stdin(e);
        ev_timer_stop(ag->loop, &e->timer);
        ev_timer_stop(ag->loop, &e->idle);
        ev_timer_stop(ag->loop, &e->drain);
        while (e->attach) {
            struct req *rq = e->attach;
            e->attach = rq->exec_next;
            req_free(rq);
        }
        if (e->announce && e->announce != e->owner)
            req_free(e->announce);
        if (e->owner) {
            struct slot *s = e->slot;
            if (s->active == e->owner)
                s->active = NULL;
            req_free(e->owner);
        }
        outbuf_free(&e->ob[0]);
        outbuf_free(&e->ob[1]);
        free(e);
    }
    while (ag->finished_tail)
        retain_evict(ag, ag->finished_tail);
}
