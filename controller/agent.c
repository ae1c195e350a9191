/* Agents as the controller sees them: one framed stream per agent, the
 * requests in flight on it (matched by id), the hello/slots handshake that
 * makes an agent ready, and what happens when the stream goes away. An
 * agent that outlives its stream (a persistent backend) is reconnected: the
 * backend says whether it still runs, a new stream is opened with backoff
 * until the profile's reconnect_timeout, and every request without an
 * answer is sent again with its idempotency key, so the agent attaches it
 * to its first run instead of running it twice. Only when the agent itself
 * is gone (or the timeout passes) does every request in flight fail with
 * agent_lost and its leases vanish. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl.h"
#include "tls.h"
#include "tls_ca.h"

#define AGENT_WRITE_LIMIT (256u << 20)

#define RELINK_FIRST_DELAY 0.1
#define RELINK_MAX_DELAY 5.0
#define RELINK_HANDSHAKE_S 10.0
#define RELINK_TICK_S 1.0
/* A TLS handshake with an agent that says nothing for this long fails. */
#define TLS_HANDSHAKE_S 10.0

const char *agent_state_name(enum agent_state s)
{
    static const char *const n[] = {"starting", "ready", "draining", "stopping", "reconnecting"};
    return n[s];
}

/* Can a lost stream of this agent be opened again? Only an agent that
 * outlives its stream, of a backend that can attach to it. */
static bool can_relink(const struct agent *ag)
{
    const struct profile *p = ag->prof;
    return p->reconnect_timeout_ms && p->be && p->be->attach && p->be->persistent &&
           p->be->persistent(p);
}

static uint32_t hash_str(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h % CTL_AGENT_BUCKETS;
}

struct agent *agent_find(struct ctl *c, const char *id, size_t n)
{
    for (struct agent *a = c->agent_hash[hash_str(id, n)]; a; a = a->hnext)
        if (strlen(a->id) == n && !memcmp(a->id, id, n))
            return a;
    return NULL;
}

struct agent *agent_new(struct ctl *c, struct profile *p, const char *id)
{
    struct agent *ag = calloc(1, sizeof *ag);
    if (!ag)
        abort();
    ag->ctl = c;
    ag->prof = p;
    snprintf(ag->id, sizeof ag->id, "%s", id);
    ag->fd = -1;
    ag->err_fd = -1;
    ag->helper_fd = -1;
    ag->state = AG_STARTING;
    ag->started_at = ev_now(c->loop);
    ag->idle_since = ag->started_at;
    sp_reader_init(&ag->rd, SP_DEFAULT_MAX_FRAME);
    sp_writer_init(&ag->wr, AGENT_WRITE_LIMIT);
    ev_init(&ag->timer, NULL);
    ev_init(&ag->cw, NULL);
    ev_init(&ag->eio, NULL);
    ev_init(&ag->rio, NULL);
    ev_init(&ag->wio, NULL);
    ev_init(&ag->relink_timer, NULL);
    ev_init(&ag->tls_timer, NULL);
    uint32_t h = hash_str(ag->id, strlen(ag->id));
    ag->hnext = c->agent_hash[h];
    c->agent_hash[h] = ag;
    TAILQ_INSERT_TAIL(&p->agents, ag, link);
    return ag;
}

void agent_close_link(struct ctl *c, struct agent *ag)
{
    ev_io_stop(c->loop, &ag->rio);
    ev_io_stop(c->loop, &ag->wio);
    ev_timer_stop(c->loop, &ag->tls_timer);
    if (ag->tls) {
        if (!ag->tls_hs)
            sp_tls_shutdown(ag->tls);
        sp_tls_free(ag->tls);
        ag->tls = NULL;
    }
    ag->tls_hs = false;
    if (ag->fd >= 0) {
        close(ag->fd);
        ag->fd = -1;
    }
    ag->connected = false;
}

void agent_free(struct ctl *c, struct agent *ag)
{
    struct agent **pp = &c->agent_hash[hash_str(ag->id, strlen(ag->id))];
    while (*pp && *pp != ag)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = ag->hnext;
    TAILQ_REMOVE(&ag->prof->agents, ag, link);
    tpl_forget(ag);
    agent_close_link(c, ag);
    tls_agent_forget(c, ag);
    ev_io_stop(c->loop, &ag->eio);
    ev_timer_stop(c->loop, &ag->timer);
    ev_timer_stop(c->loop, &ag->relink_timer);
    ev_child_stop(c->loop, &ag->cw);
    if (ag->err_fd >= 0)
        close(ag->err_fd);
    sp_reader_free(&ag->rd);
    sp_writer_free(&ag->wr);
    for (uint32_t i = 0; i < ag->nslots; i++) {
        free(ag->slots[i].workspace);
        free(ag->slots[i].cwd_path);
    }
    free(ag->slots);
    free(ag->data_dir);
    free(ag);
}

void agent_stderr_append(struct agent *ag, const char *p, size_t n)
{
    if (n >= CTL_STDERR_TAIL) {
        p += n - (CTL_STDERR_TAIL - 1);
        n = CTL_STDERR_TAIL - 1;
    }
    if (ag->errlen + n >= CTL_STDERR_TAIL) {
        size_t drop = ag->errlen + n - (CTL_STDERR_TAIL - 1);
        memmove(ag->errtail, ag->errtail + drop, ag->errlen - drop);
        ag->errlen -= drop;
    }
    memcpy(ag->errtail + ag->errlen, p, n);
    ag->errlen += n;
    ag->errtail[ag->errlen] = 0;
}

void agent_stderr_tail(const struct agent *ag, char *out, size_t cap, int lines)
{
    /* Walk back over the last `lines` non-empty lines. */
    size_t end = ag->errlen, start = end;
    int seen = 0;
    while (start > 0 && seen < lines) {
        size_t e = start;
        while (e > 0 && ag->errtail[e - 1] == '\n')
            e--;
        size_t s = e;
        while (s > 0 && ag->errtail[s - 1] != '\n')
            s--;
        if (s == e)
            break;
        start = s;
        seen++;
    }
    size_t o = 0;
    for (size_t i = start; i < end && o + 3 < cap; i++) {
        if (ag->errtail[i] == '\n') {
            if (i + 1 < end && o + 3 < cap) {
                out[o++] = ';';
                out[o++] = ' ';
            }
        } else
            out[o++] = ag->errtail[i];
    }
    out[o] = 0;
}

/* ---- requests ------------------------------------------------------------ */

struct preq *agent_req_new(struct agent *ag, struct slot *s, preq_cb cb)
{
    struct preq *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->ag = ag;
    r->slot = s;
    r->cb = cb;
    r->aid = ++ag->next_id;
    ev_init(&r->timer, NULL);
    return r;
}

/* The envelope up to "args". An agent that can be reconnected gets a key
 * with every request (unique per controller run and agent), so that a
 * resend after a lost stream attaches to the first run; a resend of a
 * streamed exec also says how much output was passed on already. */
static void pack_head(struct agent *ag, struct preq *r, msgpack_packer *pk, bool resume)
{
    bool keyed = can_relink(ag), res = resume && (r->out_off || r->err_off);
    msgpack_pack_map(pk, 3 + keyed + res);
    sp_pack_kv_uint(pk, "id", r->aid);
    sp_pack_kv_str(pk, "op", r->op);
    if (keyed) {
        char key[48];
        snprintf(key, sizeof key, "%016llx.%llu", (unsigned long long)ag->ctl->instance,
                 (unsigned long long)r->aid);
        sp_pack_kv_str(pk, "key", key);
    }
    if (res) {
        sp_pack_cstr(pk, "resume");
        msgpack_pack_map(pk, 2);
        sp_pack_kv_uint(pk, "stdout", r->out_off);
        sp_pack_kv_uint(pk, "stderr", r->err_off);
    }
    sp_pack_cstr(pk, "args");
}

void agent_send_begin(struct agent *ag, struct preq *r, const char *op, msgpack_packer *pk)
{
    sp_writer_packer(&ag->wr, pk);
    sp_writer_begin_frame(&ag->wr);
    /* A preq sent again (stateful.c retries one) starts afresh. */
    free(r->args);
    r->args = NULL;
    r->out_off = r->err_off = 0;
    r->started_seen = false;
    r->op = op;
    pack_head(ag, r, pk, false);
    /* From the frame's start: a writer that compacts moves both. */
    r->args_at = ag->wr.len - ag->wr.frame_start;
}

static void stream_gone(struct ctl *c, struct agent *ag, const char *why);
static void lose(struct ctl *c, struct agent *ag, const char *why);

static void agent_flush(struct ctl *c, struct agent *ag)
{
    if (ag->fd < 0 || !ag->connected)
        return;
    ssize_t left =
        ag->tls ? sp_tls_writer_flush(&ag->wr, ag->tls) : sp_writer_flush(&ag->wr, ag->fd);
    if (left < 0 && ag->tls && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        /* TLS wants to read first: the read watcher runs, and flushes. */
        if (sp_tls_want(ag->tls) & SP_TLS_WANT_WRITE)
            ev_io_start(c->loop, &ag->wio);
        return;
    }
    if (left < 0) {
        char why[300];
        if (ag->tls)
            snprintf(why, sizeof why, "write to agent failed: %s", sp_tls_error(ag->tls));
        else
            snprintf(why, sizeof why, "write to agent failed: %s", strerror(errno));
        stream_gone(c, ag, why);
        return;
    }
    if (left > 0)
        ev_io_start(c->loop, &ag->wio);
    else
        ev_io_stop(c->loop, &ag->wio);
}

static void pending_add(struct ctl *c, struct agent *ag, struct preq *r)
{
    struct preq_bucket *b = &ag->pending[r->aid & 63];
    r->hnext = b->head;
    b->head = r;
    ag->npending++;
    ag->requests++;
    r->sent_at = ev_now(c->loop);
    if (r->slot) {
        if (r->slot->inflight++ == 0)
            ag->executing++;
        r->slot->last_used = r->sent_at;
    }
}

void agent_send_end(struct ctl *c, struct agent *ag, struct preq *r)
{
    struct sp_err e;
    /* Keep the packed args for a resend on another stream (one copy of
     * the request, freed with its answer). */
    size_t at = ag->wr.frame_start + r->args_at;
    if (can_relink(ag) && !r->link_req && !ag->wr.overflow && ag->wr.len >= at) {
        r->argsn = ag->wr.len - at;
        r->args = malloc(r->argsn ? r->argsn : 1);
        if (r->args)
            memcpy(r->args, ag->wr.buf + at, r->argsn);
    }
    if (ag->state == AG_RECONNECTING && !r->link_req) {
        /* No stream yet: the request waits with the others and goes out
         * with them, in order, once the agent answers on a new one. */
        sp_writer_abort_frame(&ag->wr);
        pending_add(c, ag, r);
        return;
    }
    if (sp_writer_end_frame(&ag->wr, &e) < 0) {
        /* The agent is not reading: lost rather than buffer more (a new
         * stream would only have to carry it all again). */
        pending_add(c, ag, r);
        lose(c, ag, "agent stopped reading (output queue full)");
        return;
    }
    pending_add(c, ag, r);
    /* Flush from the loop's next turn would batch better, but a direct write
     * keeps the added latency at one syscall. */
    if (!ev_is_active(&ag->wio))
        agent_flush(c, ag);
}

static struct preq *pending_take(struct agent *ag, uint64_t id, bool remove)
{
    struct preq **pp = &ag->pending[id & 63].head;
    while (*pp && (*pp)->aid != id)
        pp = &(*pp)->hnext;
    struct preq *r = *pp;
    if (r && remove) {
        *pp = r->hnext;
        ag->npending--;
        if (r->slot && --r->slot->inflight == 0)
            ag->executing--;
    }
    return r;
}

void preq_free(struct ctl *c, struct preq *r)
{
    ev_timer_stop(c->loop, &r->timer);
    if (r->conn)
        TAILQ_REMOVE(&r->conn->reqs, r, clink);
    free(r->ctx);
    free(r->args);
    free(r);
}

/* Note how much output of a streamed request was passed on (a resend asks
 * for the rest), and drop what a resumed stream repeats: a second
 * `started`, output below what was passed on already. */
static bool event_is_new(struct preq *r, const msgpack_object *ev)
{
    struct sp_err e;
    const char *name = NULL;
    size_t nl = 0, dl = 0;
    uint64_t off = 0;
    if (sp_get_str(ev, "event", true, &name, &nl, &e) < 0)
        return true;
    if (sp_str_eq(name, nl, "started")) {
        bool seen = r->started_seen;
        r->started_seen = true;
        return !seen;
    }
    bool out = sp_str_eq(name, nl, "stdout");
    if (!out && !sp_str_eq(name, nl, "stderr"))
        return true;
    if (sp_get_uint(ev, "offset", false, &off, &e) < 0)
        return true;
    const msgpack_object *d = sp_map_get(ev, "data");
    if (d && d->type == MSGPACK_OBJECT_BIN)
        dl = d->via.bin.size;
    else if (d && d->type == MSGPACK_OBJECT_STR)
        dl = d->via.str.size;
    uint64_t *have = out ? &r->out_off : &r->err_off;
    if (off + dl <= *have && dl)
        return false;
    if (off + dl > *have)
        *have = off + dl;
    return true;
}

static void handle_frame(struct ctl *c, struct agent *ag, const char *data, uint32_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err e;
    if (sp_unpack(data, len, &u, &e) < 0 || u.data.type != MSGPACK_OBJECT_MAP) {
        log_warn("agent %s: malformed frame: %s", ag->id, e.msg);
        msgpack_unpacked_destroy(&u);
        return;
    }
    const msgpack_object *root = &u.data;
    uint64_t id = 0;
    if (sp_get_uint(root, "id", true, &id, &e) < 0) {
        log_warn("agent %s: frame without id", ag->id);
        msgpack_unpacked_destroy(&u);
        return;
    }
    bool is_event = sp_map_get(root, "event") != NULL;
    struct preq *r = pending_take(ag, id, !is_event);
    if (!r) {
        if (id != 0)
            log_debug("agent %s: answer to unknown request %llu", ag->id, (unsigned long long)id);
        else {
            const msgpack_object *er = sp_map_get(root, "error");
            const char *m = NULL;
            size_t ml = 0;
            if (er)
                sp_get_str(er, "message", false, &m, &ml, &e);
            log_warn("agent %s: error without request: %.*s", ag->id, (int)ml, m ? m : "");
        }
    } else if (is_event) {
        if (event_is_new(r, root) && r->on_event)
            r->on_event(c, r, root, NULL);
    } else {
        if (ag->npending == 0)
            ag->idle_since = ev_now(c->loop);
        r->cb(c, r, root, NULL);
    }
    msgpack_unpacked_destroy(&u);
}

static void stream_gone_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    agent_lost(ag->ctl, ag, ag->lost_why);
}

/* The stream of a process we started ended: its exit status and last
 * stderr lines say more than the EOF and follow within milliseconds, so
 * wait a little for them (the process's exit calls agent_lost itself). */
static void stream_gone(struct ctl *c, struct agent *ag, const char *why)
{
    if (ag->pid > 0 && ev_is_active(&ag->cw) && ag->state != AG_STOPPING) {
        ev_io_stop(c->loop, &ag->rio);
        ev_io_stop(c->loop, &ag->wio);
        ag->connected = false;
        snprintf(ag->lost_why, sizeof ag->lost_why, "%.159s", why);
        ev_timer_stop(c->loop, &ag->timer);
        ev_timer_init(&ag->timer, stream_gone_cb, 1.0, 0);
        ag->timer.data = ag;
        ev_timer_start(c->loop, &ag->timer);
        return;
    }
    agent_lost(c, ag, why);
}

static void agent_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    uint64_t gen0 = ag->stream_gen;
    for (int rounds = 0; rounds < 16; rounds++) {
        ssize_t n =
            ag->tls ? sp_tls_reader_fill(&ag->rd, ag->tls) : sp_reader_fill(&ag->rd, ag->fd);
        if (n == 0) {
            stream_gone(c, ag, "the agent closed its stream");
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (ag->tls && (sp_tls_want(ag->tls) & SP_TLS_WANT_WRITE))
                    ev_io_start(c->loop, &ag->wio);
                break;
            }
            if (errno == EINTR)
                continue;
            char why[300];
            if (ag->tls)
                snprintf(why, sizeof why, "read from agent failed: %s", sp_tls_error(ag->tls));
            else
                snprintf(why, sizeof why, "read from agent failed: %s", strerror(errno));
            stream_gone(c, ag, why);
            return;
        }
        const char *data;
        uint32_t len;
        struct sp_err e;
        int got;
        /* A callback may lose the agent (its struct lives on until the
         * backend frees it from a later loop turn; fd < 0 says so). */
        uint64_t gen = ag->stream_gen;
        while ((got = sp_reader_next(&ag->rd, &data, &len, &e)) == 1) {
            handle_frame(c, ag, data, len);
            if (ag->fd < 0 || ag->stream_gen != gen)
                return;
        }
        if (got < 0) {
            agent_lost(c, ag, e.msg);
            return;
        }
        /* A TLS read returns one record at most: keep reading while
         * records come, within the round bound. */
        if (!ag->tls && (size_t)n < 65536)
            break;
    }
    if (!ag->tls || ag->fd < 0 || ag->stream_gen != gen0)
        return;
    /* A write that waited for TLS to read goes on now. */
    if (ag->wr.len > ag->wr.off && !ev_is_active(&ag->wio))
        agent_flush(c, ag);
    /* Records already decrypted inside TLS: the socket may stay quiet, so
     * the watcher would not fire for them. */
    if (ag->fd >= 0 && ag->tls && sp_tls_pending(ag->tls))
        ev_feed_event(loop, &ag->rio, EV_READ);
}

static void agent_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    agent_flush(ag->ctl, ag);
    /* A TLS read may have waited for the socket to take a write. */
    if (ag->tls && ag->fd >= 0 && ag->connected)
        agent_read_cb(loop, &ag->rio, EV_READ);
}

/* ---- handshake ----------------------------------------------------------- */

static void on_slots(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    struct agent *ag = r->ag;
    preq_free(c, r);
    if (!resp) {
        (void)err;
        return; /* agent_lost already ran */
    }
    const msgpack_object *res = sp_map_get(resp, "result"), *arr = NULL;
    struct sp_err e;
    if (!res || sp_get_array(res, "slots", true, &arr, &e) < 0) {
        agent_stop(c, ag, "agent answered 'slots' without slots");
        return;
    }
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *m = &arr->via.array.ptr[i];
        uint64_t idx = 0, gen = 0, at = 0;
        bool leased = false;
        const char *ws = NULL, *traj = NULL, *holder = NULL, *owner = NULL, *cwd = NULL;
        size_t wsl = 0, tl = 0, hl = 0, ol = 0, cwdl = 0;
        bool bound = false;
        if (m->type != MSGPACK_OBJECT_MAP || sp_get_uint(m, "slot", true, &idx, &e) < 0 ||
            idx >= ag->nslots)
            continue;
        sp_get_uint(m, "generation", false, &gen, &e);
        sp_get_bool(m, "leased", false, &leased, &e);
        sp_get_str(m, "workspace", false, &ws, &wsl, &e);
        sp_get_str(m, "cwd_path", false, &cwd, &cwdl, &e);
        sp_get_str(m, "trajectory_id", false, &traj, &tl, &e);
        sp_get_str(m, "holder", false, &holder, &hl, &e);
        sp_get_str(m, "owner", false, &owner, &ol, &e);
        sp_get_bool(m, "bound", false, &bound, &e);
        sp_get_uint(m, "leased_at", false, &at, &e);
        struct slot *s = &ag->slots[idx];
        free(s->workspace);
        s->workspace = ws ? strndup(ws, wsl) : NULL;
        free(s->cwd_path);
        /* An agent from before cwd_path: its commands see the host path. */
        s->cwd_path = cwd ? strndup(cwd, cwdl) : ws ? strndup(ws, wsl) : NULL;
        s->generation = gen;
        if (!leased)
            slot_set(s, SL_FREE);
        else if (holder && sp_str_eq(holder, hl, c->name) && tl <= CTL_TRAJ_MAX) {
            /* Ours, from before a controller restart: keep it. */
            slot_set(s, SL_LEASED);
            memcpy(s->traj, traj, tl);
            s->traj[tl] = 0;
            s->leased_at_ms = at;
            s->last_used = ev_now(c->loop);
            sched_lease_adopted(c, s, owner, ol, bound);
            stateful_adopt(s, sp_map_get(m, "sessions"));
            log_info("agent %s: slot %llu: lease of '%s' (generation %llu) rebuilt", ag->id,
                     (unsigned long long)idx, s->traj, (unsigned long long)gen);
        } else {
            slot_set(s, SL_FOREIGN);
            log_warn("agent %s: slot %llu is leased by '%.*s', not this controller; left alone",
                     ag->id, (unsigned long long)idx, (int)hl, holder ? holder : "");
        }
    }
    ev_timer_stop(c->loop, &ag->timer);
    ag->state = AG_READY;
    ag->idle_since = ev_now(c->loop);
    log_info("agent %s ready: %u slots, %u leases, at %s", ag->id, ag->nslots, ag->leased,
             ag->address);
    tpl_refresh(c, ag);
    sched_agent_ready(c, ag);
}

static void relink_hello(struct ctl *c, struct agent *ag, uint64_t instance, uint32_t nslots);
static void relink_give_up(struct ctl *c, struct agent *ag, const char *why);

static void on_hello(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    struct agent *ag = r->ag;
    preq_free(c, r);
    if (!resp) {
        (void)err;
        return;
    }
    const msgpack_object *res = sp_map_get(resp, "result");
    uint64_t nslots = 0;
    struct sp_err e;
    if (!res || sp_get_uint(res, "slots", true, &nslots, &e) < 0 || nslots == 0 || nslots > 65536) {
        const msgpack_object *er = sp_map_get(resp, "error");
        const char *m = "no slot count";
        size_t ml = strlen(m);
        if (er)
            sp_get_str(er, "message", false, &m, &ml, &e);
        char why[300];
        snprintf(why, sizeof why, "agent refused hello: %.*s", (int)ml, m);
        if (ag->state == AG_RECONNECTING) {
            relink_give_up(c, ag, why);
            return;
        }
        sched_agent_failed(c, ag->prof, why);
        agent_stop(c, ag, why);
        return;
    }
    uint64_t instance = 0;
    sp_get_uint(res, "instance", false, &instance, &e);
    if (ag->state == AG_RECONNECTING) {
        relink_hello(c, ag, instance, (uint32_t)nslots);
        return;
    }
    ag->instance = instance;
    /* An agent that keeps idempotency keys can be sent a request again. */
    ag->idem_ok = sp_map_get(res, "idempotency") != NULL;
    ag->nslots = (uint32_t)nslots;
    ag->slots = calloc(ag->nslots, sizeof *ag->slots);
    if (!ag->slots)
        abort();
    for (uint32_t i = 0; i < ag->nslots; i++) {
        ag->slots[i].ag = ag;
        ag->slots[i].index = i;
        ag->slots[i].state = SL_FOREIGN; /* until `slots` says otherwise */
        TAILQ_INIT(&ag->slots[i].sq);
    }
    struct preq *q = agent_req_new(ag, NULL, on_slots);
    msgpack_packer pk;
    agent_send_begin(ag, q, "slots", &pk);
    msgpack_pack_map(&pk, 0);
    agent_send_end(c, ag, q);
}

static void start_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    char why[700], tail[512];
    agent_stderr_tail(ag, tail, sizeof tail, 3);
    snprintf(why, sizeof why, "agent %s not ready after %.0f s%s%s", ag->id,
             (double)ag->prof->start_timeout_ms / 1000, *tail ? "; stderr: " : "", tail);
    sched_agent_failed(ag->ctl, ag->prof, why);
    agent_stop(ag->ctl, ag, why);
}

static void relink_handshake_cb(struct ev_loop *loop, ev_timer *w, int revents);

void agent_stream_ready(struct ctl *c, struct agent *ag, int fd)
{
    ag->stream_gen++;
    if (ag->state == AG_RECONNECTING) {
        ev_timer_stop(c->loop, &ag->timer);
        /* What the last stream left half read or unsent is void: every
         * request without an answer goes again on this one. */
        sp_reader_free(&ag->rd);
        sp_reader_init(&ag->rd, SP_DEFAULT_MAX_FRAME);
        sp_writer_free(&ag->wr);
        sp_writer_init(&ag->wr, AGENT_WRITE_LIMIT);
        /* Ticks while the new stream says nothing: its deadline, and the
         * backend asked again, for a relay can wait long for an agent
         * that died meanwhile. */
        ag->relink_attempt_at = ev_now(c->loop);
        ev_timer_stop(c->loop, &ag->relink_timer);
        ev_timer_init(&ag->relink_timer, relink_handshake_cb, RELINK_TICK_S, RELINK_TICK_S);
        ag->relink_timer.data = ag;
        ev_timer_start(c->loop, &ag->relink_timer);
    }
    ag->fd = fd;
    ag->connected = true;
    ev_io_init(&ag->rio, agent_read_cb, fd, EV_READ);
    ev_io_init(&ag->wio, agent_write_cb, fd, EV_WRITE);
    ag->rio.data = ag->wio.data = ag;
    ev_io_start(c->loop, &ag->rio);
    if (ag->state == AG_STARTING) {
        ev_timer_stop(c->loop, &ag->timer);
        ev_timer_init(&ag->timer, start_deadline_cb, (double)ag->prof->start_timeout_ms / 1000, 0);
        ag->timer.data = ag;
        ev_timer_start(c->loop, &ag->timer);
    }
    struct preq *r = agent_req_new(ag, NULL, on_hello);
    r->link_req = true;
    msgpack_packer pk;
    agent_send_begin(ag, r, "hello", &pk);
    const char *tok = *ag->token                                              ? ag->token
                      : *c->agent_token && !strcmp(ag->prof->backend, "exec") ? c->agent_token
                                                                              : NULL;
    msgpack_pack_map(&pk, tok ? 2 : 1);
    sp_pack_kv_str(&pk, "client", c->name);
    if (tok)
        sp_pack_kv_str(&pk, "token", tok);
    agent_send_end(c, ag, r);
}

/* ---- loss and stop ------------------------------------------------------- */

static void fail_pending(struct ctl *c, struct agent *ag, const char *why)
{
    struct sp_err e;
    char tail[400];
    agent_stderr_tail(ag, tail, sizeof tail, 2);
    sp_errf(&e, SP_AGENT_LOST, "agent %s lost: %s%s%s", ag->id, why, *tail ? "; stderr: " : "",
            tail);
    for (int b = 0; b < 64; b++) {
        struct preq *r;
        while ((r = ag->pending[b].head)) {
            ag->pending[b].head = r->hnext;
            ag->npending--;
            if (r->slot && --r->slot->inflight == 0)
                ag->executing--;
            r->cb(c, r, NULL, &e);
        }
    }
}

/* The stream closed; its requests fail with why; its leases end. */
static void disconnect(struct ctl *c, struct agent *ag, const char *why)
{
    agent_close_link(c, ag);
    fail_pending(c, ag, why);
    for (uint32_t i = 0; i < ag->nslots; i++)
        sched_slot_lost(c, &ag->slots[i]);
}

/* The agent is gone: its requests fail, its leases end, the backend stops
 * what is left of it. */
static void lose(struct ctl *c, struct agent *ag, const char *why)
{
    bool expected = ag->state == AG_STOPPING;
    ev_timer_stop(c->loop, &ag->timer);
    ev_timer_stop(c->loop, &ag->relink_timer);
    /* A process that dies says why on stderr just before: take it now. */
    char buf[4096];
    ssize_t n;
    while (ag->err_fd >= 0 && (n = read(ag->err_fd, buf, sizeof buf)) > 0)
        agent_stderr_append(ag, buf, (size_t)n);
    if (!expected) {
        log_warn("agent %s lost: %s", ag->id, why);
        if (ag->state == AG_STARTING) {
            char tail[512], msg[700];
            agent_stderr_tail(ag, tail, sizeof tail, 3);
            snprintf(msg, sizeof msg, "agent %s failed to start: %s%s%s", ag->id,
                     *tail ? tail : why, *tail ? " (" : "", *tail ? why : "");
            if (*tail)
                strcat(msg, ")");
            sched_agent_failed(c, ag->prof, msg);
        } else {
            /* The launcher's last words say why (Slurm's job state, a
             * bridge's reason), as in the requests' agent_lost messages. */
            char tail[512];
            agent_stderr_tail(ag, tail, sizeof tail, 2);
            snprintf(ag->prof->last_error, sizeof ag->prof->last_error, "agent %s lost: %s%s%.300s",
                     ag->id, why, *tail ? "; stderr: " : "", tail);
        }
    }
    disconnect(c, ag, why);
    if (ag->state != AG_STOPPING) {
        ag->state = AG_STOPPING;
        ag->prof->be->stop_agent(c, ag);
    }
    sched_kick(c, ag->prof);
}

void agent_stop(struct ctl *c, struct agent *ag, const char *why)
{
    if (ag->state == AG_STOPPING)
        return;
    log_info("stopping agent %s: %s", ag->id, why);
    ag->state = AG_STOPPING;
    ev_timer_stop(c->loop, &ag->timer);
    ev_timer_stop(c->loop, &ag->relink_timer);
    disconnect(c, ag, why);
    ag->prof->be->stop_agent(c, ag);
}

/* ---- reconnect ----------------------------------------------------------- */

/* Close the stream (not the agent): no request fails. */
static void close_stream(struct ctl *c, struct agent *ag)
{
    if (ev_cb(&ag->timer) == stream_gone_cb)
        ev_timer_stop(c->loop, &ag->timer);
    agent_close_link(c, ag);
    /* The hello of a stream that failed is nobody's business. */
    for (int b = 0; b < 64; b++)
        for (struct preq **pp = &ag->pending[b].head; *pp;) {
            struct preq *r = *pp;
            if (!r->link_req) {
                pp = &r->hnext;
                continue;
            }
            *pp = r->hnext;
            ag->npending--;
            preq_free(c, r);
        }
}

static void relink_give_up(struct ctl *c, struct agent *ag, const char *why)
{
    char msg[900];
    snprintf(msg, sizeof msg, "%.680s (its stream ended: %.190s)", why, ag->link_cause);
    ev_timer_stop(c->loop, &ag->relink_timer);
    ag->state = ag->relink_prev;
    lose(c, ag, msg);
}

static void relink_probe(struct ctl *c, struct agent *ag);

static void relink_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    relink_probe(ag->ctl, ag);
}

/* An attempt failed: the next one after a backoff, within the deadline. */
static void relink_retry(struct ctl *c, struct agent *ag, const char *why)
{
    snprintf(ag->error, sizeof ag->error, "reconnect attempt %u: %.460s", ag->relink_attempts, why);
    ev_timer_stop(c->loop, &ag->timer);
    close_stream(c, ag);
    /* A probe whose answer brings the next attempt, or an attempt already
     * scheduled: nothing more to do. Else the timer held a handshake's
     * deadline, which this failure ends. */
    if (ag->relink_probing ||
        (ev_is_active(&ag->relink_timer) && ev_cb(&ag->relink_timer) == relink_timer_cb))
        return;
    ev_timer_stop(c->loop, &ag->relink_timer);
    ev_tstamp now = ev_now(c->loop);
    if (now >= ag->relink_deadline) {
        char m[700];
        snprintf(m, sizeof m, "no new stream within reconnect_timeout %.0f s; last attempt: %.500s",
                 (double)ag->prof->reconnect_timeout_ms / 1000, why);
        relink_give_up(c, ag, m);
        return;
    }
    double d = ag->relink_delay;
    ag->relink_delay = d * 2 > RELINK_MAX_DELAY ? RELINK_MAX_DELAY : d * 2;
    if (now + d > ag->relink_deadline)
        d = ag->relink_deadline - now;
    log_debug("agent %s: reconnect attempt %u failed (%s); next in %.1f s", ag->id,
              ag->relink_attempts, why, d);
    ev_timer_init(&ag->relink_timer, relink_timer_cb, d, 0);
    ag->relink_timer.data = ag;
    ev_timer_start(c->loop, &ag->relink_timer);
}

void agent_relink_failed(struct ctl *c, struct agent *ag, const char *why)
{
    if (ag->state == AG_RECONNECTING)
        relink_retry(c, ag, why);
}

static void on_probe(struct ctl *c, struct agent *ag, int alive, const char *why);
static void relink_probe_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void relink_handshake_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    ev_tstamp now = ev_now(c->loop);
    if (now - ag->relink_attempt_at >= RELINK_HANDSHAKE_S || now >= ag->relink_deadline) {
        ev_timer_stop(c->loop, &ag->relink_timer);
        relink_retry(c, ag, "no answer to hello on the new stream");
        return;
    }
    if (!ag->relink_probing && ag->prof->be->probe) {
        ag->relink_probing = true;
        ag->prof->be->probe(c, ag, on_probe);
    }
}

static void relink_attempt(struct ctl *c, struct agent *ag)
{
    if (c->stopping)
        return; /* the controller leaves; the agent stays for the next one */
    if (ev_now(c->loop) >= ag->relink_deadline) {
        relink_retry(c, ag, "out of time");
        return;
    }
    if (ag->pid > 0 && ev_is_active(&ag->cw)) {
        /* The last relay still runs on a stream we gave up: it goes
         * first (one stream per agent); its exit brings the next try. */
        kill(-ag->pid, SIGKILL);
        kill(ag->pid, SIGKILL);
        return;
    }
    ag->relink_attempts++;
    /* A wait for the last relay's exit status (stream_gone) must not end
     * the stream this attempt opens. */
    ev_timer_stop(c->loop, &ag->timer);
    struct sp_err e;
    if (ag->prof->be->attach(c, ag, &e) < 0)
        relink_retry(c, ag, e.msg);
}

static void on_probe(struct ctl *c, struct agent *ag, int alive, const char *why)
{
    ag->relink_probing = false;
    if (ag->state != AG_RECONNECTING)
        return;
    if (ev_cb(&ag->relink_timer) == relink_probe_deadline_cb)
        ev_timer_stop(c->loop, &ag->relink_timer);
    if (alive == 0) {
        char m[400];
        snprintf(m, sizeof m, "the agent is gone: %.360s", why && *why ? why : "not running");
        relink_give_up(c, ag, m);
        return;
    }
    if (ev_is_active(&ag->relink_timer) && ev_cb(&ag->relink_timer) == relink_handshake_cb)
        return; /* a stream is being opened: it still may answer */
    if (alive < 0 && why && *why)
        log_debug("agent %s: cannot tell whether it runs (%s); reconnecting anyway", ag->id, why);
    relink_attempt(c, ag);
}

static void relink_probe_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    char m[160];
    snprintf(m, sizeof m,
             "the backend did not say whether the agent runs within "
             "reconnect_timeout %.0f s",
             (double)ag->prof->reconnect_timeout_ms / 1000);
    relink_give_up(ag->ctl, ag, m);
}

static void relink_probe(struct ctl *c, struct agent *ag)
{
    if (ag->state != AG_RECONNECTING || ag->relink_probing)
        return;
    if (!ag->prof->be->probe) {
        on_probe(c, ag, -1, NULL);
        return;
    }
    ag->relink_probing = true;
    /* The backend's answer is awaited no longer than the reconnect is. */
    ev_timer_stop(c->loop, &ag->relink_timer);
    ev_tstamp left = ag->relink_deadline - ev_now(c->loop);
    ev_timer_init(&ag->relink_timer, relink_probe_deadline_cb, left > 0 ? left : 0, 0);
    ag->relink_timer.data = ag;
    ev_timer_start(c->loop, &ag->relink_timer);
    ag->prof->be->probe(c, ag, on_probe);
}

static void relink_start(struct ctl *c, struct agent *ag, const char *why)
{
    ev_tstamp now = ev_now(c->loop);
    log_warn("agent %s: stream ended (%s); reconnecting (up to %.0f s)", ag->id, why,
             (double)ag->prof->reconnect_timeout_ms / 1000);
    ev_timer_stop(c->loop, &ag->timer);
    ag->relink_prev = ag->state;
    ag->state = AG_RECONNECTING;
    snprintf(ag->link_cause, sizeof ag->link_cause, "%s", why);
    ag->relink_since = now;
    ag->relink_deadline = now + (double)ag->prof->reconnect_timeout_ms / 1000;
    ag->relink_delay = RELINK_FIRST_DELAY;
    ag->relink_attempts = 0;
    close_stream(c, ag);
    /* From the loop, never from here: this may run inside a frame's
     * callback, and a probe and attach that finish at once would replace
     * the reader under it. */
    ev_timer_stop(c->loop, &ag->relink_timer);
    ev_timer_init(&ag->relink_timer, relink_timer_cb, 0, 0);
    ag->relink_timer.data = ag;
    ev_timer_start(c->loop, &ag->relink_timer);
}

static int cmp_aid(const void *a, const void *b)
{
    uint64_t x = (*(struct preq *const *)a)->aid, y = (*(struct preq *const *)b)->aid;
    return x < y ? -1 : x > y;
}

/* Everything without an answer, in the order it was first sent. */
static void resend_pending(struct ctl *c, struct agent *ag)
{
    struct preq **v = calloc(ag->npending ? ag->npending : 1, sizeof *v);
    if (!v)
        abort();
    uint32_t n = 0;
    for (int b = 0; b < 64; b++)
        for (struct preq *r = ag->pending[b].head; r; r = r->hnext)
            if (!r->link_req && n < ag->npending)
                v[n++] = r;
    qsort(v, n, sizeof *v, cmp_aid);
    for (uint32_t i = 0; i < n; i++) {
        struct preq *r = v[i];
        if (!r->args) {
            struct preq *t = pending_take(ag, r->aid, true);
            struct sp_err e;
            sp_errf(&e, SP_AGENT_LOST,
                    "agent %s: its stream ended (%s) and this request could "
                    "not be kept for a resend",
                    ag->id, ag->link_cause);
            if (t)
                t->cb(c, t, NULL, &e);
            continue;
        }
        msgpack_packer pk;
        sp_writer_packer(&ag->wr, &pk);
        sp_writer_begin_frame(&ag->wr);
        pack_head(ag, r, &pk, true);
        /* The args as first packed: appended raw, they are one map. */
        msgpack_pack_str_body(&pk, r->args, r->argsn);
        struct sp_err e;
        if (sp_writer_end_frame(&ag->wr, &e) < 0) {
            free(v);
            lose(c, ag, "its requests do not fit the output queue of a new stream");
            return;
        }
    }
    free(v);
    agent_flush(c, ag);
}

static void relink_hello(struct ctl *c, struct agent *ag, uint64_t instance, uint32_t nslots)
{
    if ((ag->instance && instance != ag->instance) || nslots != ag->nslots) {
        relink_give_up(c, ag,
                       "the agent restarted meanwhile (a new instance): what ran in it is "
                       "gone");
        return;
    }
    ev_timer_stop(c->loop, &ag->relink_timer);
    ev_tstamp now = ev_now(c->loop);
    ag->state = ag->relink_prev;
    ag->reconnects++;
    ag->relink_last_ms = (now - ag->relink_since) * 1000;
    *ag->error = 0;
    log_info("agent %s: reconnected after %.0f ms (attempt %u); resuming %u requests", ag->id,
             ag->relink_last_ms, ag->relink_attempts, ag->npending);
    resend_pending(c, ag);
    if (ag->fd >= 0)
        sched_kick(c, ag->prof);
}

int agent_drop_stream(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    (void)c;
    if (!can_relink(ag))
        return sp_errf(err, SP_BAD_REQUEST,
                       "agent %s: profile '%s' has agents that end with their stream (or "
                       "reconnect_timeout 0): nothing to reconnect to",
                       ag->id, ag->prof->name);
    if ((ag->state != AG_READY && ag->state != AG_DRAINING) || ag->fd < 0)
        return sp_errf(err, SP_BAD_REQUEST, "agent %s is %s, not ready", ag->id,
                       agent_state_name(ag->state));
    if (!ag->idem_ok)
        return sp_errf(err, SP_BAD_REQUEST,
                       "agent %s keeps no idempotency keys (an older agent): a new stream "
                       "could run its requests twice",
                       ag->id);
    /* As a network would: both directions end, and the usual path
     * (EOF, the relay's exit) takes it from there. */
    shutdown(ag->fd, SHUT_RDWR);
    return 0;
}

void agent_lost(struct ctl *c, struct agent *ag, const char *why)
{
    if (ag->state == AG_RECONNECTING) {
        relink_retry(c, ag, why); /* the stream of an attempt ended */
        return;
    }
    if ((ag->state == AG_READY || ag->state == AG_DRAINING) && !c->stopping && can_relink(ag) &&
        ag->idem_ok) {
        relink_start(c, ag, why);
        return;
    }
    lose(c, ag, why);
}

/* ---- TLS ----------------------------------------------------------------- */

static void relink_retry(struct ctl *c, struct agent *ag, const char *why);

/* The handshake failed: one line, as a failed start or a failed reconnect
 * attempt. */
static void tls_failed(struct ctl *c, struct agent *ag, const char *why)
{
    char msg[512];
    snprintf(msg, sizeof msg, "tls handshake with %.150s failed: %.330s", ag->tls_where, why);
    agent_close_link(c, ag);
    snprintf(ag->error, sizeof ag->error, "%s", msg);
    if (ag->state == AG_RECONNECTING) {
        relink_retry(c, ag, msg);
        return;
    }
    lose(c, ag, msg);
}

static void tls_step(struct ctl *c, struct agent *ag)
{
    struct sp_err e;
    int rc = sp_tls_handshake(ag->tls, &e);
    if (rc < 0) {
        tls_failed(c, ag, e.msg);
        return;
    }
    if (rc == 0) {
        int want = sp_tls_want(ag->tls);
        if (want & SP_TLS_WANT_WRITE)
            ev_io_start(c->loop, &ag->wio);
        else
            ev_io_stop(c->loop, &ag->wio);
        if (want & SP_TLS_WANT_READ || !want)
            ev_io_start(c->loop, &ag->rio);
        else
            ev_io_stop(c->loop, &ag->rio);
        return;
    }
    ev_io_stop(c->loop, &ag->rio);
    ev_io_stop(c->loop, &ag->wio);
    ev_timer_stop(c->loop, &ag->tls_timer);
    ag->tls_hs = false;
    log_debug("agent %s: %s with %s (%s)", ag->id, sp_tls_describe(ag->tls), ag->tls_where,
              sp_tls_peer_cn(ag->tls));
    int fd = ag->fd;
    agent_stream_ready(c, ag, fd);
    /* Bytes the agent sent right after the handshake may sit decrypted. */
    if (ag->tls && sp_tls_pending(ag->tls))
        ev_feed_event(c->loop, &ag->rio, EV_READ);
}

static void tls_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    tls_step(ag->ctl, ag);
}

static void tls_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    char why[160];
    snprintf(why, sizeof why,
             "no answer within %.0f s (does the agent listen on tls:, with its certificate?)",
             TLS_HANDSHAKE_S);
    tls_failed(ag->ctl, ag, why);
}

void agent_stream_ready_tls(struct ctl *c, struct agent *ag, int fd, const char *where)
{
    struct sp_err e;
    agent_close_link(c, ag);
    snprintf(ag->tls_where, sizeof ag->tls_where, "%s", where);
    ag->fd = fd;
    ag->connected = false;
    ag->tls_hs = true;
    struct sp_tls_ctx *x = tls_client_ctx(c, ag->prof, &e);
    ag->tls = x ? sp_tls_new(x, fd, tls_agent_expect(ag), &e) : NULL;
    if (!ag->tls) {
        tls_failed(c, ag, e.msg);
        return;
    }
    ev_io_init(&ag->rio, tls_io_cb, fd, EV_READ);
    ev_io_init(&ag->wio, tls_io_cb, fd, EV_WRITE);
    ag->rio.data = ag->wio.data = ag;
    ev_timer_init(&ag->tls_timer, tls_timeout_cb, TLS_HANDSHAKE_S, 0);
    ag->tls_timer.data = ag;
    ev_timer_start(c->loop, &ag->tls_timer);
    tls_step(c, ag);
}
