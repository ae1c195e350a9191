/* The scheduler: leases (recorded in the agent before the trainer hears of
 * them), waiters served first in, first out per profile, releases that reset
 * through the agent before a slot is reused, and scaling between
 * min_agents and max_agents at no more than max_starts_per_second, never
 * stopping an agent that holds a lease. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

void slot_set(struct slot *s, enum slot_state st)
{
    struct agent *ag = s->ag;
    if (s->state == SL_FREE)
        ag->nfree--;
    if (s->state == SL_LEASED)
        ag->leased--;
    s->state = st;
    if (st == SL_FREE)
        ag->nfree++;
    if (st == SL_LEASED)
        ag->leased++;
    if (ag->nfree == ag->nslots)
        ag->idle_since = ev_now(ag->ctl->loop);
}

int slot_handle(const struct slot *s, char *out, size_t cap)
{
    return snprintf(out, cap, "%s/%" PRIu32 "/%" PRIu64, s->ag->id, s->index, s->generation);
}

int sched_resolve(struct ctl *c, const char *h, size_t n, struct slot **out, struct sp_err *err)
{
    const char *s2 = memrchr(h, '/', n);
    const char *s1 = s2 ? memrchr(h, '/', (size_t)(s2 - h)) : NULL;
    if (!s1 || s1 == h)
        return sp_errf(err, SP_BAD_REQUEST, "slot handle '%.*s' is not AGENT/INDEX/GENERATION",
                       (int)(n > 100 ? 100 : n), h);
    char num[48];
    uint64_t idx, gen;
    char *end;
    size_t l1 = (size_t)(s2 - s1 - 1), l2 = n - (size_t)(s2 - h) - 1;
    if (l1 == 0 || l1 >= sizeof num || l2 == 0 || l2 >= sizeof num)
        return sp_errf(err, SP_BAD_REQUEST, "slot handle '%.*s' is malformed",
                       (int)(n > 100 ? 100 : n), h);
    memcpy(num, s1 + 1, l1);
    num[l1] = 0;
    idx = strtoull(num, &end, 10);
    if (*end)
        return sp_errf(err, SP_BAD_REQUEST, "slot handle: bad index '%s'", num);
    memcpy(num, s2 + 1, l2);
    num[l2] = 0;
    gen = strtoull(num, &end, 10);
    if (*end)
        return sp_errf(err, SP_BAD_REQUEST, "slot handle: bad generation '%s'", num);
    struct agent *ag = agent_find(c, h, (size_t)(s1 - h));
    if (!ag || ag->state == AG_STOPPING)
        return sp_errf(err, SP_NOT_LEASED,
                       "slot %.*s is not leased: agent %.*s is gone (lost or stopped); acquire "
                       "a new slot",
                       (int)(n > 100 ? 100 : n), h, (int)(s1 - h > 80 ? 80 : s1 - h), h);
    if (ag->state == AG_STARTING || idx >= ag->nslots)
        return sp_errf(err, SP_NOT_LEASED, "slot %.*s is not leased: no such slot",
                       (int)(n > 100 ? 100 : n), h);
    struct slot *s = &ag->slots[idx];
    if (s->state != SL_LEASED)
        return sp_errf(err, SP_NOT_LEASED, "slot %.*s is not leased (released)",
                       (int)(n > 100 ? 100 : n), h);
    if (s->generation != gen)
        return sp_errf(err, SP_NOT_LEASED,
                       "slot %.*s is not leased: generation %" PRIu64 " is stale (now %" PRIu64 ")",
                       (int)(n > 100 ? 100 : n), h, gen, s->generation);
    *out = s;
    return 0;
}

/* ---- waiters and leases -------------------------------------------------- */

/* An agent's error map as an error of the same code and message. */
static void err_from(const msgpack_object *er, struct sp_err *e)
{
    const char *code = "internal", *msg = "the agent's answer has no error";
    size_t cl = 8, ml = strlen(msg);
    struct sp_err x;
    if (er) {
        sp_get_str(er, "code", false, &code, &cl, &x);
        sp_get_str(er, "message", false, &msg, &ml, &x);
    }
    int k = sp_code_from_name(code, cl);
    sp_errf(e, k < 0 ? SP_INTERNAL : (enum sp_code)k, "%.*s", (int)(ml > 600 ? 600 : ml), msg);
}

static void waiter_destroy(struct waiter *w)
{
    free(w->tpl_script);
    free(w);
}

static void waiter_free(struct ctl *c, struct waiter *w)
{
    ev_timer_stop(c->loop, &w->timer);
    if (w->conn)
        TAILQ_REMOVE(&w->conn->waiters, w, clink);
    waiter_destroy(w);
}

static void waiter_dequeue(struct ctl *c, struct waiter *w)
{
    if (!w->queued)
        return;
    TAILQ_REMOVE(&w->prof->waiters, w, plink);
    w->prof->nwaiters--;
    w->queued = false;
    ev_timer_stop(c->loop, &w->timer);
}

void sched_waiter_drop(struct ctl *c, struct waiter *w)
{
    TAILQ_REMOVE(&w->conn->waiters, w, clink);
    w->conn = NULL;
    if (w->queued) {
        waiter_dequeue(c, w);
        waiter_destroy(w);
    }
    /* else its lease is in flight; on_lease gives the slot back */
}

static struct slot *pick_free(struct profile *p, const char *tpl)
{
    /* An agent that holds the template first (no build); then pack leases
     * onto the busiest agents so that idle ones can go. */
    struct agent *best = NULL, *ag;
    bool best_has = false;
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        if (ag->state != AG_READY || ag->nfree == 0)
            continue;
        bool has = tpl && tpl[0] && tpl_has(ag, tpl);
        if (!best || (has && !best_has) ||
            (has == best_has && ag->nslots - ag->nfree > best->nslots - best->nfree)) {
            best = ag;
            best_has = has;
        }
    }
    if (!best)
        return NULL;
    for (uint32_t i = 0; i < best->nslots; i++)
        if (best->slots[i].state == SL_FREE)
            return &best->slots[i];
    return NULL;
}

static void answer_acquire(struct ctl *c, struct waiter *w, struct slot *s,
                           const msgpack_object *res)
{
    struct tconn *t = w->conn;
    msgpack_packer pk;
    char h[160];
    slot_handle(s, h, sizeof h);
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, w->client_id);
    msgpack_pack_map(&pk, 14);
    /* What the workspace stands on, as the agent laid it out. */
    const msgpack_object *mode = res ? sp_map_get(res, "workspace_mode") : NULL;
    const msgpack_object *ms = res ? sp_map_get(res, "prepare_ms") : NULL;
    const msgpack_object *tn = res ? sp_map_get(res, "template") : NULL;
    if (tn && tn->type == MSGPACK_OBJECT_STR) {
        sp_pack_cstr(&pk, "template"); /* the agent's word: "(fork)" for a fork's layer */
        msgpack_pack_object(&pk, *tn);
    } else if (w->tpl[0]) {
        sp_pack_kv_str(&pk, "template", w->tpl);
    } else {
        sp_pack_kv_nil(&pk, "template");
    }
    sp_pack_cstr(&pk, "workspace_mode");
    if (mode && mode->type == MSGPACK_OBJECT_STR)
        msgpack_pack_object(&pk, *mode);
    else
        msgpack_pack_nil(&pk);
    sp_pack_cstr(&pk, "prepare_ms");
    if (ms && (ms->type == MSGPACK_OBJECT_FLOAT64 || ms->type == MSGPACK_OBJECT_FLOAT32))
        msgpack_pack_double(&pk, ms->via.f64);
    else
        msgpack_pack_nil(&pk);
    sp_pack_kv_str(&pk, "slot", h);
    sp_pack_kv_str(&pk, "agent", s->ag->id);
    sp_pack_kv_uint(&pk, "index", s->index);
    sp_pack_kv_uint(&pk, "generation", s->generation);
    sp_pack_kv_str(&pk, "trajectory_id", s->traj);
    sp_pack_kv_str(&pk, "profile", s->ag->prof->name);
    sp_pack_kv_str(&pk, "workspace", s->workspace ? s->workspace : "");
    sp_pack_kv_str(&pk, "cwd_path", s->cwd_path ? s->cwd_path : "");
    sp_pack_kv_str(&pk, "address", s->ag->address);
    sp_pack_kv_str(&pk, "owner", s->owner);
    sp_pack_kv_bool(&pk, "bound", s->bound);
    tconn_end(c, t);
}

static void serve(struct ctl *c, struct waiter *w, struct slot *s);
static void send_fork(struct ctl *c, struct waiter *w, struct slot *s);

static void on_unlease(struct ctl *c, struct preq *r, const msgpack_object *resp,
                       const struct sp_err *err)
{
    struct slot *s = r->slot;
    (void)err;
    preq_free(c, r);
    if (!resp)
        return; /* lost with its agent */
    s->traj[0] = 0;
    s->owner[0] = 0;
    s->bound = false;
    s->grace_until = 0;
    s->leased_at_ms = 0;
    slot_set(s, SL_FREE);
    sched_kick(c, s->ag->prof);
}

static void send_unlease(struct ctl *c, struct slot *s)
{
    struct preq *r = agent_req_new(s->ag, s, on_unlease);
    msgpack_packer pk;
    agent_send_begin(s->ag, r, "unlease", &pk);
    msgpack_pack_map(&pk, 1);
    sp_pack_kv_uint(&pk, "slot", s->index);
    agent_send_end(c, s->ag, r);
}

static void on_lease(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    struct slot *s = r->slot;
    struct waiter *w = r->ctx;
    struct profile *p = w->prof;
    r->ctx = NULL;
    (void)err;
    preq_free(c, r);
    const msgpack_object *res = resp ? sp_map_get(resp, "result") : NULL;
    struct sp_err e;
    uint64_t gen = 0, at = 0;
    if (res && sp_get_uint(res, "generation", true, &gen, &e) == 1) {
        sp_get_uint(res, "leased_at", false, &at, &e);
        s->generation = gen;
        s->leased_at_ms = at;
        s->last_used = ev_now(c->loop);
        slot_set(s, SL_LEASED);
        if (w->conn) /* a hello may have renamed the connection meanwhile */
            memcpy(s->owner, w->conn->owner, sizeof s->owner);
        /* Its owner may have gone (or a hello renamed its connection)
         * while the lease was being recorded: the deadline starts now. */
        if (s->bound && !s->grace_until && !sched_owner_connected(c, s->owner))
            s->grace_until = ev_now(c->loop) + (double)s->ag->prof->lease_grace_ms / 1000.0;
        if (w->tpl[0])
            tpl_refresh(c, s->ag); /* its in_use count changed */
        if (w->conn && w->fork_from) {
            send_fork(c, w, s);
        } else if (w->conn) {
            answer_acquire(c, w, s, res);
            waiter_free(c, w);
        } else {
            /* The trainer went away while the lease was being recorded. */
            waiter_destroy(w);
            slot_set(s, SL_RELEASING);
            send_unlease(c, s);
        }
        return;
    }
    const msgpack_object *er = resp ? sp_map_get(resp, "error") : NULL;
    const char *code = "";
    size_t codel = 0;
    if (er)
        sp_get_str(er, "code", false, &code, &codel, &e);
    if (er && !sp_str_eq(code, codel, "slot_busy")) {
        /* The lease itself is wrong (an unknown template, a workspace that
         * could not be laid out): the trainer hears why; the slot is fine. */
        slot_set(s, SL_FREE);
        s->traj[0] = 0;
        struct sp_err le;
        err_from(er, &le);
        if (w->conn) {
            tconn_error(c, w->conn, w->client_id, &le);
            waiter_free(c, w);
        } else {
            waiter_destroy(w);
        }
        sched_kick(c, p);
        return;
    }
    if (resp) {
        /* Leased by someone else behind our back: leave that slot alone. */
        log_warn("agent %s refused lease of slot %u; marking it foreign", s->ag->id, s->index);
        slot_set(s, SL_FOREIGN);
    }
    if (!w->conn) {
        waiter_destroy(w);
        return;
    }
    if (w->fork_from) {
        sp_errf(&e, SP_NO_CAPACITY, "fork: the slot chosen on agent %s was taken meanwhile",
                s->ag->id);
        tconn_error(c, w->conn, w->client_id, &e);
        waiter_free(c, w);
        return;
    }
    /* Back to the head of the queue: it was first. */
    struct slot *next = pick_free(p, w->tpl);
    if (next) {
        serve(c, w, next);
        return;
    }
    TAILQ_INSERT_HEAD(&p->waiters, w, plink);
    p->nwaiters++;
    w->queued = true;
    double left = w->since + w->timeout_s - ev_now(c->loop);
    ev_timer_set(&w->timer, left > 0 ? left : 0.001, 0);
    ev_timer_start(c->loop, &w->timer);
    sched_kick(c, p);
}

static void send_lease(struct ctl *c, struct waiter *w, struct slot *s)
{
    slot_set(s, SL_LEASING);
    struct preq *r = agent_req_new(s->ag, s, on_lease);
    r->ctx = w;
    msgpack_packer pk;
    agent_send_begin(s->ag, r, "lease", &pk);
    msgpack_pack_map(&pk, w->tpl[0] ? 6 : 5);
    if (w->tpl[0])
        sp_pack_kv_str(&pk, "template", w->tpl);
    sp_pack_kv_uint(&pk, "slot", s->index);
    sp_pack_kv_str(&pk, "trajectory_id", w->traj);
    sp_pack_kv_str(&pk, "holder", c->name);
    /* In the agent too, so that a restarted controller knows whose lease
     * it rebuilds and whether it ends with its owner. */
    sp_pack_kv_str(&pk, "owner", w->owner);
    sp_pack_kv_bool(&pk, "bound", w->bind);
    agent_send_end(c, s->ag, r);
}

/* The agent has built the template in s (or failed to): lease s on it. */
static void on_build(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    struct slot *s = r->slot;
    struct waiter *w = r->ctx;
    struct profile *p = s->ag->prof;
    r->ctx = NULL;
    preq_free(c, r);
    const msgpack_object *res = resp ? sp_map_get(resp, "result") : NULL;
    bool built = false, cached = false, joined = false;
    struct sp_err e;
    if (res) {
        sp_get_bool(res, "built", false, &built, &e);
        sp_get_bool(res, "cached", false, &cached, &e);
        sp_get_bool(res, "joined", false, &joined, &e);
    }
    if (built) {
        s->ag->tpl_builds += !cached && !joined;
        tpl_refresh(c, s->ag);
        if (w->conn) {
            send_lease(c, w, s);
            return;
        }
    }
    if (resp)
        slot_set(s, SL_FREE);
    if (w->conn) {
        if (!resp)
            e = *err;
        else if (!res)
            err_from(sp_map_get(resp, "error"), &e);
        else {
            /* The script failed: its exit code and the end of its output. */
            const msgpack_object *ex = sp_map_get(res, "exec");
            int64_t code = -1;
            const char *out = "";
            size_t outl = 0;
            if (ex && ex->type == MSGPACK_OBJECT_MAP) {
                sp_get_int(ex, "exit_code", false, &code, &e);
                const msgpack_object *o = sp_map_get(ex, "stderr");
                if (!o || o->via.bin.size == 0)
                    o = sp_map_get(ex, "stdout");
                if (o && (o->type == MSGPACK_OBJECT_BIN || o->type == MSGPACK_OBJECT_STR)) {
                    out = o->via.bin.ptr;
                    outl = o->via.bin.size;
                }
            }
            if (outl > 400) {
                out += outl - 400;
                outl = 400;
            }
            sp_errf(&e, SP_BAD_REQUEST,
                    "building template '%s' on agent %s failed: exit %lld: %.*s", w->tpl, s->ag->id,
                    (long long)code, (int)outl, out);
        }
        tconn_error(c, w->conn, w->client_id, &e);
        waiter_free(c, w);
    } else {
        waiter_destroy(w);
    }
    sched_kick(c, p);
}

static void serve(struct ctl *c, struct waiter *w, struct slot *s)
{
    waiter_dequeue(c, w);
    memcpy(s->traj, w->traj, sizeof s->traj);
    memcpy(s->owner, w->owner, sizeof s->owner);
    s->bound = w->bind;
    s->grace_until = 0;
    if (!w->tpl[0] || !w->tpl_script || tpl_has(s->ag, w->tpl)) {
        send_lease(c, w, s);
        return;
    }
    /* Built in the slot the lease will have (one build per name per
     * agent: the agent makes later builds of it wait for the first). */
    slot_set(s, SL_BUILDING);
    struct preq *r = agent_req_new(s->ag, s, on_build);
    r->ctx = w;
    msgpack_packer pk;
    agent_send_begin(s->ag, r, "template_build", &pk);
    msgpack_pack_map(&pk, w->tpl_base[0] ? 4 : 3);
    sp_pack_kv_str(&pk, "name", w->tpl);
    sp_pack_kv_uint(&pk, "slot", s->index);
    sp_pack_kv_str(&pk, "script", w->tpl_script);
    if (w->tpl_base[0])
        sp_pack_kv_str(&pk, "base", w->tpl_base);
    agent_send_end(c, s->ag, r);
}

static void capacity_msg(struct ctl *c, struct profile *p, char *out, size_t cap)
{
    uint32_t agents = 0, starting = 0, slots = 0, leased = 0, nfree = 0;
    struct agent *ag;
    (void)c;
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        if (ag->state == AG_STOPPING)
            continue;
        agents++;
        if (ag->state == AG_STARTING) {
            starting++;
            continue;
        }
        slots += ag->nslots;
        leased += ag->nslots - ag->nfree;
        nfree += ag->state == AG_READY ? ag->nfree : 0;
    }
    int n = snprintf(out, cap,
                     "capacity %u slots on %u agents (%u leased, %u free, %u agents starting; "
                     "max_agents %u)",
                     slots, agents - starting, leased, nfree, starting, p->max_agents);
    if (*p->last_error && n > 0 && (size_t)n < cap)
        snprintf(out + n, cap - (size_t)n, "; last agent failure: %s", p->last_error);
}

static void waiter_timeout_cb(struct ev_loop *loop, ev_timer *tm, int revents)
{
    (void)loop;
    (void)revents;
    struct waiter *w = tm->data;
    struct ctl *c = w->conn->ctl;
    struct profile *p = w->prof;
    uint32_t pos = 1;
    struct waiter *x;
    TAILQ_FOREACH(x, &p->waiters, plink)
    {
        if (x == w)
            break;
        pos++;
    }
    char capm[700];
    capacity_msg(c, p, capm, sizeof capm);
    struct sp_err e;
    sp_errf(&e, SP_NO_CAPACITY,
            "no free slot in profile '%s' after %.0f ms: queue position %u of %u waiters; %s",
            p->name, (ev_now(c->loop) - w->since) * 1000, pos, p->nwaiters, capm);
    p->no_capacity++;
    c->no_capacity++;
    tconn_error(c, w->conn, w->client_id, &e);
    waiter_dequeue(c, w);
    waiter_free(c, w);
}

struct waiter *sched_waiter_new(struct ctl *c, struct tconn *t, uint64_t id, struct profile *p,
                                const char *traj, size_t trajn, bool bind)
{
    struct waiter *w = calloc(1, sizeof *w);
    if (!w)
        abort();
    w->prof = p;
    w->conn = t;
    w->client_id = id;
    w->since = ev_now(c->loop);
    memcpy(w->owner, t->owner, sizeof w->owner);
    w->bind = bind;
    if (traj)
        memcpy(w->traj, traj, trajn);
    else
        snprintf(w->traj, sizeof w->traj, "traj-%" PRIu64, ++c->traj_seq);
    return w;
}

void sched_acquire_w(struct ctl *c, struct waiter *w, uint64_t timeout_ms)
{
    struct profile *p = w->prof;
    c->acquires++;
    p->acquires++;
    w->timeout_s = (double)timeout_ms / 1000.0;
    TAILQ_INSERT_TAIL(&w->conn->waiters, w, clink);
    ev_timer_init(&w->timer, waiter_timeout_cb, (double)timeout_ms / 1000.0, 0);
    w->timer.data = w;
    struct slot *s = TAILQ_EMPTY(&p->waiters) ? pick_free(p, w->tpl) : NULL;
    if (s) {
        serve(c, w, s);
        return;
    }
    TAILQ_INSERT_TAIL(&p->waiters, w, plink);
    p->nwaiters++;
    w->queued = true;
    if (timeout_ms == 0) {
        waiter_timeout_cb(c->loop, &w->timer, 0);
        return;
    }
    ev_timer_start(c->loop, &w->timer);
    sched_kick(c, p);
}

void sched_acquire(struct ctl *c, struct tconn *t, uint64_t id, struct profile *p, const char *traj,
                   size_t trajn, uint64_t timeout_ms, bool bind)
{
    sched_acquire_w(c, sched_waiter_new(c, t, id, p, traj, trajn, bind), timeout_ms);
}

/* ---- fork ------------------------------------------------------------------
 * A new lease on the same agent (the copy must be where the workspace is),
 * recorded like any lease, then the agent's fork lays it out. */

static void on_fork(struct ctl *c, struct preq *r, const msgpack_object *resp,
                    const struct sp_err *err)
{
    struct slot *s = r->slot;
    struct waiter *w = r->ctx;
    r->ctx = NULL;
    preq_free(c, r);
    const msgpack_object *res = resp ? sp_map_get(resp, "result") : NULL;
    if (res && w->conn) {
        answer_acquire(c, w, s, res);
        waiter_free(c, w);
        return;
    }
    struct sp_err e;
    if (!resp)
        e = *err;
    else
        err_from(sp_map_get(resp, "error"), &e);
    if (w->conn) {
        tconn_error(c, w->conn, w->client_id, &e);
        waiter_free(c, w);
    } else {
        waiter_destroy(w);
    }
    if (resp && s->state == SL_LEASED) {
        /* A lease nobody will use: give it back (its workspace emptied). */
        sched_release(c, s, true);
    }
}

static void send_fork(struct ctl *c, struct waiter *w, struct slot *s)
{
    struct slot *from = w->fork_from;
    if (from->ag != s->ag || from->state != SL_LEASED) {
        struct sp_err e;
        sp_errf(&e, SP_NOT_LEASED, "fork: the slot forked from was released meanwhile");
        tconn_error(c, w->conn, w->client_id, &e);
        waiter_free(c, w);
        sched_release(c, s, true);
        return;
    }
    struct preq *r = agent_req_new(s->ag, s, on_fork);
    r->ctx = w;
    msgpack_packer pk;
    agent_send_begin(s->ag, r, "fork", &pk);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "slot", from->index);
    sp_pack_kv_uint(&pk, "to_slot", s->index);
    agent_send_end(c, s->ag, r);
}

void sched_fork(struct ctl *c, struct tconn *t, uint64_t id, struct slot *from, const char *traj,
                size_t trajn)
{
    struct agent *ag = from->ag;
    struct slot *to = NULL;
    for (uint32_t i = 0; i < ag->nslots && !to; i++)
        if (ag->slots[i].state == SL_FREE)
            to = &ag->slots[i];
    if (!to || ag->state != AG_READY) {
        struct sp_err e;
        sp_errf(&e, SP_NO_CAPACITY,
                "fork: agent %s has no free slot (a fork stays on the agent of its lease)", ag->id);
        tconn_error(c, t, id, &e);
        return;
    }
    struct waiter *w = sched_waiter_new(c, t, id, ag->prof, traj, trajn, from->bound);
    w->fork_from = from;
    TAILQ_INSERT_TAIL(&t->waiters, w, clink);
    ev_timer_init(&w->timer, waiter_timeout_cb, 3600.0, 0);
    w->timer.data = w;
    c->acquires++;
    ag->prof->acquires++;
    serve(c, w, to);
}

/* ---- release ------------------------------------------------------------- */

static void on_reset(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    struct slot *s = r->slot;
    (void)err;
    preq_free(c, r);
    if (!resp)
        return;
    if (!sp_map_get(resp, "result"))
        log_warn("agent %s: reset of slot %u failed; unleasing anyway", s->ag->id, s->index);
    send_unlease(c, s);
}

static void on_cancel(struct ctl *c, struct preq *r, const msgpack_object *resp,
                      const struct sp_err *err)
{
    (void)resp;
    (void)err;
    preq_free(c, r);
}

void sched_cancel_slot(struct ctl *c, struct slot *s)
{
    struct preq *r = agent_req_new(s->ag, NULL, on_cancel);
    msgpack_packer pk;
    agent_send_begin(s->ag, r, "cancel", &pk);
    msgpack_pack_map(&pk, 1);
    sp_pack_kv_uint(&pk, "slot", s->index);
    agent_send_end(c, s->ag, r);
}

void sched_release(struct ctl *c, struct slot *s, bool reset)
{
    slot_set(s, SL_RELEASING);
    s->grace_until = 0;
    if (reset) {
        struct preq *r = agent_req_new(s->ag, s, on_reset);
        msgpack_packer pk;
        agent_send_begin(s->ag, r, "reset", &pk);
        msgpack_pack_map(&pk, 1);
        sp_pack_kv_uint(&pk, "slot", s->index);
        agent_send_end(c, s->ag, r);
        return;
    }
    if (s->inflight > 0)
        sched_cancel_slot(c, s);
    send_unlease(c, s);
}

void sched_slot_lost(struct ctl *c, struct slot *s)
{
    (void)c;
    if (s->state == SL_LEASED)
        log_info("lease of '%s' on %s/%u ends with its agent", s->traj, s->ag->id, s->index);
    slot_set(s, SL_FOREIGN);
}

/* ---- owners -------------------------------------------------------------- */

bool sched_owner_connected(struct ctl *c, const char *owner)
{
    struct tconn *t;
    LIST_FOREACH(t, &c->conns, link)
    if (!t->closing && !strcmp(t->owner, owner))
        return true;
    return false;
}

/* Set (gone) or cancel the grace deadlines of owner's bound leases; how
 * many changed. */
static uint32_t owner_deadlines(struct ctl *c, const char *owner, bool gone)
{
    ev_tstamp now = ev_now(c->loop);
    uint32_t n = 0;
    struct profile *p;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        for (uint32_t i = 0; i < ag->nslots; i++) {
            struct slot *s = &ag->slots[i];
            if (s->state != SL_LEASED || !s->bound || strcmp(s->owner, owner))
                continue;
            if (gone && !s->grace_until) {
                s->grace_until = now + (double)p->lease_grace_ms / 1000.0;
                n++;
            } else if (!gone && s->grace_until) {
                s->grace_until = 0;
                n++;
            }
        }
    }
    return n;
}

void sched_owner_gone(struct ctl *c, const char *owner)
{
    if (sched_owner_connected(c, owner))
        return;
    uint32_t n = owner_deadlines(c, owner, true);
    if (n)
        log_info("owner '%s' has no connection left: %u lease%s released with reset unless it "
                 "is back within lease_grace",
                 owner, n, n == 1 ? "" : "s");
}

void sched_owner_back(struct ctl *c, const char *owner)
{
    uint32_t n = owner_deadlines(c, owner, false);
    if (n)
        log_info("owner '%s' is back within lease_grace: %u lease%s kept", owner, n,
                 n == 1 ? "" : "s");
}

void sched_lease_adopted(struct ctl *c, struct slot *s, const char *owner, size_t ownern,
                         bool bound)
{
    /* A lease from an agent that never heard of owners has none: nobody
     * can come back for it, so only release or lease_timeout end it. */
    char was[sizeof s->owner];
    memcpy(was, s->owner, sizeof was);
    snprintf(s->owner, sizeof s->owner, "%.*s", (int)(ownern <= CTL_OWNER_MAX ? ownern : 0),
             owner ? owner : "");
    s->bound = bound && s->owner[0];
    /* The same lease seen again (its agent's slots listed once more): a
     * running deadline goes on, it does not start over. */
    if (!(s->bound && s->grace_until && !strcmp(was, s->owner)))
        s->grace_until = 0;
    if (s->bound && !s->grace_until && !sched_owner_connected(c, s->owner)) {
        s->grace_until = ev_now(c->loop) + (double)s->ag->prof->lease_grace_ms / 1000.0;
        log_info("lease of '%s' on %s/%u: owner '%s' has no connection; released unless it is "
                 "back within %.1f s",
                 s->traj, s->ag->id, s->index, s->owner,
                 (double)s->ag->prof->lease_grace_ms / 1000.0);
    }
}

/* ---- scaling ------------------------------------------------------------- */

void sched_agent_failed(struct ctl *c, struct profile *p, const char *why)
{
    p->start_failures++;
    double back = 0.5 * pow(2, p->start_failures - 1);
    if (back > 30)
        back = 30;
    p->next_start_at = ev_now(c->loop) + back;
    snprintf(p->last_error, sizeof p->last_error, "%.500s", why);
    uint32_t k = p->nfailed++ % CTL_FAILED_KEEP;
    snprintf(p->failed[k].why, sizeof p->failed[k].why, "%.500s", why);
    p->failed[k].at_ms = now_wall_ms();
    log_warn("profile %s: agent start failed (%u in a row; next try in %.1f s): %s", p->name,
             p->start_failures, back, why);
}

void sched_agent_ready(struct ctl *c, struct agent *ag)
{
    ag->prof->start_failures = 0;
    ag->prof->next_start_at = 0;
    sched_kick(c, ag->prof);
}

void sched_start_agent(struct ctl *c, struct profile *p)
{
    char id[CTL_NAME_MAX + 16];
    snprintf(id, sizeof id, "%s-%06" PRIx64, p->name, random_u64() & 0xffffff);
    while (agent_find(c, id, strlen(id)))
        snprintf(id, sizeof id, "%s-%06" PRIx64, p->name, random_u64() & 0xffffff);
    struct agent *ag = agent_new(c, p, id);
    struct sp_err e;
    log_info("starting agent %s (%s backend, %u slots)", id, p->be->name, p->slots_per_agent);
    if (p->be->start_agent(c, ag, &e) < 0) {
        sched_agent_failed(c, p, e.msg);
        agent_free(c, ag);
    }
}

static void scale(struct ctl *c, struct profile *p)
{
    if (c->stopping)
        return;
    ev_tstamp now = ev_now(c->loop);
    uint32_t starting = 0, ready = 0, draining = 0, nfree = 0;
    struct agent *ag, *tmp;
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        switch (ag->state) {
        case AG_STARTING: starting++; break;
        case AG_READY:
            ready++;
            nfree += ag->nfree;
            break;
        case AG_DRAINING: draining++; break;
        /* Its leases wait for it; a replacement would only double it. */
        case AG_RECONNECTING:
            if (ag->relink_prev == AG_DRAINING)
                draining++;
            else
                ready++;
            break;
        case AG_STOPPING: break;
        }
    }
    int64_t want = (int64_t)p->nwaiters - nfree - (int64_t)starting * p->slots_per_agent;
    int64_t need = want > 0 ? (want + p->slots_per_agent - 1) / p->slots_per_agent : 0;
    if ((int64_t)p->min_agents - (starting + ready) > need)
        need = (int64_t)p->min_agents - (starting + ready);
    int64_t room = (int64_t)p->max_agents - (starting + ready + draining);
    if (need > room)
        need = room;
    if (need > 0 && now >= p->next_start_at) {
        double rate = p->max_starts_per_second;
        if (rate > 0) {
            double capacity = rate < 1 ? 1 : rate;
            p->start_tokens += (now - p->tokens_at) * rate;
            if (p->start_tokens > capacity)
                p->start_tokens = capacity;
        }
        p->tokens_at = now;
        while (need-- > 0) {
            if (rate > 0) {
                if (p->start_tokens < 1)
                    break; /* the tick retries: bursts queue, they do not fail */
                p->start_tokens -= 1;
            }
            sched_start_agent(c, p);
            if (p->next_start_at > now)
                break; /* that start failed at once */
        }
    }
    /* Scale down and drain; an agent with any lease or request stays. */
    uint32_t live = starting + ready;
    for (ag = TAILQ_FIRST(&p->agents); ag; ag = tmp) {
        tmp = TAILQ_NEXT(ag, link);
        bool idle = ag->nfree == ag->nslots && ag->npending == 0;
        if (ag->state == AG_READY && p->max_lifetime_ms &&
            (now - ag->started_at) * 1000 >= (double)p->max_lifetime_ms) {
            log_info("agent %s reached max_lifetime; draining", ag->id);
            ag->state = AG_DRAINING;
            live--;
        }
        if (ag->state == AG_DRAINING && idle) {
            agent_stop(c, ag, "drained");
            continue;
        }
        if (ag->state == AG_READY && idle && p->idle_timeout_ms && live > p->min_agents &&
            p->nwaiters == 0 && (now - ag->idle_since) * 1000 >= (double)p->idle_timeout_ms) {
            live--;
            agent_stop(c, ag, "idle");
        }
    }
}

void sched_kick(struct ctl *c, struct profile *p)
{
    struct waiter *w;
    while ((w = TAILQ_FIRST(&p->waiters))) {
        struct slot *s = pick_free(p, w->tpl);
        if (!s)
            break;
        serve(c, w, s);
    }
    scale(c, p);
}

void sched_tick(struct ctl *c)
{
    ev_tstamp now = ev_now(c->loop);
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        struct agent *ag;
        TAILQ_FOREACH(ag, &p->agents, link)
        {
            if (ag->state == AG_STOPPING || ag->state == AG_STARTING)
                continue;
            tpl_tick(c, ag, now);
            for (uint32_t i = 0; i < ag->nslots; i++) {
                struct slot *s = &ag->slots[i];
                if (s->state != SL_LEASED)
                    continue;
                if (s->grace_until && now >= s->grace_until) {
                    log_info("lease of '%s' on %s/%u: owner '%s' did not come back within "
                             "lease_grace (%.1f s): released with reset",
                             s->traj, ag->id, i, s->owner, (double)p->lease_grace_ms / 1000.0);
                    sched_release(c, s, true);
                } else if (p->lease_timeout_ms && s->inflight == 0 &&
                           (now - s->last_used) * 1000 >= (double)p->lease_timeout_ms) {
                    log_info("lease of '%s' (owner '%s') on %s/%u unused for %.0f s: released "
                             "with reset",
                             s->traj, s->owner, ag->id, i, now - s->last_used);
                    sched_release(c, s, true);
                }
            }
        }
        sched_kick(c, p);
    }
}
