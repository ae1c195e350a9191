/* Ops about the agent and its slots: hello (version, auth), health, stats,
 * slots, lease, unlease and reset. */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "idem.h"
#include "quota.h"
#include "session.h"
#include "tls.h"
#include "../template.h"

#define DEFAULT_TIMEOUT_MS 600000u
#define MAX_TIMEOUT_MS 86400000u

/* Time to compare depends only on the lengths, never on where bytes differ. */
static bool token_equal(const char *a, size_t an, const char *b, size_t bn)
{
    unsigned char diff = an != bn;
    size_t n = an < bn ? an : bn;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

static uint64_t ms_since(struct agent *ag, double t)
{
    double d = agent_now(ag) - t;
    return d > 0 ? (uint64_t)(d * 1000.0) : 0;
}

int op_hello(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    size_t tn;
    const char *tok = arg_str(rq, "token", &tn);
    if (ag->token_len) {
        if (tok && token_equal(tok, tn, ag->token, ag->token_len)) {
            conn_set_authed(rq->conn, true);
        } else if (tok) {
            log_warn("hello with a wrong token");
            return sp_errf(err, SP_UNAUTHORIZED, "wrong token");
        }
    }
    bool authed = rq->conn ? conn_authed(rq->conn) : false;
    char view[4200];
    slots_view_template(ag, view, sizeof view);
    const struct sp_tls *tls = rq->conn ? conn_tls(rq->conn) : NULL;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 17 + (tls != NULL));
    sp_pack_kv_uint(pk, "protocol", SP_PROTOCOL_VERSION);
    sp_pack_kv_bool(pk, "tls_listen", ag->tls_listen);
    if (tls) {
        /* "TLSv1.3 TLS_AES_128_GCM_SHA256" */
        const char *d = sp_tls_describe(tls), *sp = strchr(d, ' ');
        sp_pack_cstr(pk, "tls");
        msgpack_pack_map(pk, 3);
        sp_pack_cstr(pk, "version");
        sp_pack_strn(pk, d, sp ? (size_t)(sp - d) : strlen(d));
        sp_pack_kv_str(pk, "cipher", sp ? sp + 1 : "");
        sp_pack_kv_str(pk, "peer_cn", sp_tls_peer_cn(tls));
    }
    sp_pack_cstr(pk, "warm");
    warm_pack(ag, pk);
    sp_pack_cstr(pk, "idempotency");
    idem_pack_info(pk, ag);
    sp_pack_cstr(pk, "disk_quota");
    quota_pack_info(pk, ag);
    /* Shares exist only in boxes: without one a command does not see them
     * (and never a writable stand-in). */
    bool boxed = (ag->iso.available & (1u << RUNG_NAMESPACES)) != 0;
    sp_pack_cstr(pk, "shares");
    msgpack_pack_array(pk, ag->opt.nshares);
    for (unsigned i = 0; i < ag->opt.nshares; i++) {
        msgpack_pack_map(pk, 4);
        sp_pack_kv_str(pk, "host", ag->opt.shares[2 * i]);
        sp_pack_kv_str(pk, "path", ag->opt.shares[2 * i + 1]);
        sp_pack_kv_bool(pk, "available", boxed);
        if (boxed)
            sp_pack_kv_nil(pk, "why");
        else
            sp_pack_kv_str(pk, "why", ag->iso.why[RUNG_NAMESPACES]);
    }
    sp_pack_cstr(pk, "templates");
    template_pack_info(pk, ag);
    sp_pack_kv_str(pk, "agent", "slot-agent");
    sp_pack_kv_str(pk, "version", AGENT_VERSION);
    sp_pack_kv_uint(pk, "instance", ag->instance);
    sp_pack_kv_uint(pk, "slots", ag->nslots);
    sp_pack_kv_bool(pk, "authenticated", authed);
    sp_pack_kv_bool(pk, "auth_required", ag->token_len > 0);
    sp_pack_kv_str(pk, "workspace_view", view);
    sp_pack_cstr(pk, "isolation");
    msgpack_pack_map(pk, RUNG_COUNT);
    for (int r = 0; r < RUNG_COUNT; r++)
        sp_pack_kv_bool(pk, rung_names[r], (ag->iso.available & (1u << r)) != 0);
    sp_pack_cstr(pk, "isolation_detail");
    msgpack_pack_map(pk, 10);
    sp_pack_kv_bool(pk, "root", ag->iso.root);
    sp_pack_kv_uint(pk, "slot_uid_base", ag->iso.uid_base);
    sp_pack_kv_bool(pk, "user_namespace", (ag->iso.ns_flags & CLONE_NEWUSER) != 0);
    sp_pack_kv_bool(pk, "network_namespace", ag->iso.ns_net);
    sp_pack_kv_uint(pk, "cgroup_version", (uint64_t)ag->iso.cg_version);
    sp_pack_cstr(pk, "slot_memory");
    if (ag->iso.cg_memory)
        msgpack_pack_uint64(pk, ag->iso.cg_memory);
    else
        msgpack_pack_nil(pk);
    sp_pack_kv_uint(pk, "landlock_abi", ag->iso.landlock_abi > 0 ? ag->iso.landlock_abi : 0);
    sp_pack_kv_str(pk, "default", ag->opt.isolation_required ? "required" : "best_effort");
    sp_pack_cstr(pk, "unavailable");
    msgpack_pack_map(pk, (uint32_t)(RUNG_COUNT - __builtin_popcount(ag->iso.available)));
    for (int r = 0; r < RUNG_COUNT; r++)
        if (!(ag->iso.available & (1u << r)))
            sp_pack_kv_str(pk, rung_names[r], ag->iso.why[r]);
    sp_pack_cstr(pk, "rlimits");
    msgpack_pack_map(pk, LIM_COUNT);
    for (int i = 0; i < LIM_COUNT; i++) {
        sp_pack_cstr(pk, lim_names[i]);
        if (ag->iso.lim_max[i] == RLIM_INFINITY)
            msgpack_pack_nil(pk);
        else
            msgpack_pack_uint64(pk, ag->iso.lim_max[i]);
    }
    sp_pack_cstr(pk, "limits");
    msgpack_pack_map(pk, 6);
    sp_pack_kv_uint(pk, "max_frame", ag->opt.max_frame);
    sp_pack_kv_uint(pk, "max_output", ag->opt.max_output);
    sp_pack_kv_uint(pk, "max_queue", 1024);
    sp_pack_kv_uint(pk, "max_inflight", 4096);
    sp_pack_kv_uint(pk, "max_timeout_ms", MAX_TIMEOUT_MS);
    sp_pack_kv_uint(pk, "default_timeout_ms", DEFAULT_TIMEOUT_MS);
    req_reply_end(rq);
    return OP_DONE;
}

static unsigned busy_slots(struct agent *ag)
{
    unsigned n = 0;
    for (unsigned i = 0; i < ag->nslots; i++)
        if (ag->slots[i].active || ag->slots[i].running || ag->slots[i].resetting)
            n++;
    return n;
}

static unsigned running_execs(struct agent *ag)
{
    unsigned n = 0;
    for (struct exec *e = ag->running; e; e = e->next)
        n++;
    return n;
}

int op_health(struct req *rq, struct sp_err *err)
{
    (void)err;
    struct agent *ag = rq->ag;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 6);
    sp_pack_kv_bool(pk, "ok", true);
    sp_pack_kv_uint(pk, "uptime_ms", ms_since(ag, ag->started));
    sp_pack_kv_uint(pk, "slots", ag->nslots);
    sp_pack_kv_uint(pk, "busy_slots", busy_slots(ag));
    sp_pack_kv_uint(pk, "running_execs", running_execs(ag));
    sp_pack_kv_uint(pk, "connections", ag->nconns);
    req_reply_end(rq);
    return OP_DONE;
}

static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "re");
    unsigned long size = 0, res = 0;
    if (f) {
        if (fscanf(f, "%lu %lu", &size, &res) != 2)
            res = 0;
        fclose(f);
    }
    return (uint64_t)res * (uint64_t)sysconf(_SC_PAGESIZE);
}

static uint64_t tv_ms(struct timeval tv)
{
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

int op_stats(struct req *rq, struct sp_err *err)
{
    (void)err;
    struct agent *ag = rq->ag;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 18);
    sp_pack_kv_uint(pk, "uptime_ms", ms_since(ag, ag->started));
    sp_pack_cstr(pk, "tls");
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "handshakes", ag->tls_handshakes);
    sp_pack_kv_uint(pk, "failures", ag->tls_failures);
    sp_pack_kv_uint(pk, "handshaking", ag->nhandshaking);
    quota_pack_stats(pk, ag);
    idem_pack_stats(pk, ag);
    sp_pack_kv_uint(pk, "requests", ag->requests);
    sp_pack_kv_uint(pk, "errors", ag->errors);
    sp_pack_kv_uint(pk, "connections", ag->nconns);
    sp_pack_kv_uint(pk, "connections_total", ag->conns_total);
    sp_pack_kv_uint(pk, "connections_dropped", ag->conns_dropped);
    sp_pack_kv_uint(pk, "rss_bytes", rss_bytes());
    sp_pack_kv_uint(pk, "cpu_user_ms", tv_ms(ru.ru_utime));
    sp_pack_kv_uint(pk, "cpu_sys_ms", tv_ms(ru.ru_stime));
    sp_pack_cstr(pk, "exec");
    msgpack_pack_map(pk, 10);
    sp_pack_kv_uint(pk, "started", ag->execs_started);
    sp_pack_kv_uint(pk, "warm", ag->warm.execs);
    sp_pack_kv_uint(pk, "finished", ag->execs_finished);
    sp_pack_kv_uint(pk, "running", running_execs(ag));
    sp_pack_kv_uint(pk, "timed_out", ag->execs_timed_out);
    sp_pack_kv_uint(pk, "cancelled", ag->execs_cancelled);
    sp_pack_kv_uint(pk, "p50_us", hist_quantile(&ag->exec_lat, 0.50));
    sp_pack_kv_uint(pk, "p90_us", hist_quantile(&ag->exec_lat, 0.90));
    sp_pack_kv_uint(pk, "p99_us", hist_quantile(&ag->exec_lat, 0.99));
    sp_pack_kv_uint(pk, "max_us", hist_quantile(&ag->exec_lat, 1.0));
    sp_pack_cstr(pk, "ops");
    msgpack_pack_map(pk, op_count);
    for (unsigned i = 0; i < op_count; i++) {
        const struct op_stats *st = &ag->op_stats[i];
        sp_pack_cstr(pk, op_table[i].name);
        msgpack_pack_map(pk, 4);
        sp_pack_kv_uint(pk, "calls", st->calls);
        sp_pack_kv_uint(pk, "errors", st->errors);
        sp_pack_kv_uint(pk, "p50_us", hist_quantile(&st->lat, 0.50));
        sp_pack_kv_uint(pk, "p99_us", hist_quantile(&st->lat, 0.99));
    }
    req_reply_end(rq);
    return OP_DONE;
}

static void kv_double(msgpack_packer *pk, const char *key, double v)
{
    sp_pack_cstr(pk, key);
    msgpack_pack_double(pk, v);
}

static void pack_workspace(msgpack_packer *pk, struct slot *s)
{
    if (s->tpl && !s->tpl->anon)
        sp_pack_kv_str(pk, "template", s->tpl->name);
    else if (s->tpl)
        sp_pack_kv_str(pk, "template", "(fork)");
    else
        sp_pack_kv_nil(pk, "template");
    sp_pack_kv_str(pk, "workspace_mode", ws_mode_names[s->ws_mode]);
}

static void pack_slot(msgpack_packer *pk, struct agent *ag, struct slot *s)
{
    msgpack_pack_map(pk, 18);
    pack_workspace(pk, s);
    sp_pack_cstr(pk, "disk");
    quota_pack_slot(pk, ag, s);
    sp_pack_kv_uint(pk, "slot", s->index);
    sp_pack_kv_str(pk, "state",
                   s->resetting                ? "resetting"
                   : (s->active || s->running) ? "busy"
                                               : "idle");
    sp_pack_kv_bool(pk, "leased", s->leased);
    if (s->leased) {
        sp_pack_kv_str(pk, "trajectory_id", s->trajectory_id);
        if (s->holder)
            sp_pack_kv_str(pk, "holder", s->holder);
        else
            sp_pack_kv_nil(pk, "holder");
        sp_pack_kv_uint(pk, "leased_at", (uint64_t)(s->leased_at * 1000.0));
        if (s->owner)
            sp_pack_kv_str(pk, "owner", s->owner);
        else
            sp_pack_kv_nil(pk, "owner");
        sp_pack_kv_bool(pk, "bound", s->owner && s->owner_bound);
    } else {
        sp_pack_kv_nil(pk, "trajectory_id");
        sp_pack_kv_nil(pk, "holder");
        sp_pack_kv_nil(pk, "leased_at");
        sp_pack_kv_nil(pk, "owner");
        sp_pack_kv_bool(pk, "bound", false);
    }
    sp_pack_kv_uint(pk, "generation", s->generation);
    sp_pack_kv_uint(pk, "queued", s->q_len);
    sp_pack_cstr(pk, "running");
    unsigned n = 0;
    for (struct exec *e = ag->running; e; e = e->next)
        n += e->slot == s;
    msgpack_pack_array(pk, n);
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->slot == s)
            msgpack_pack_uint64(pk, e->id);
    sp_pack_kv_uint(pk, "execs", s->execs);
    sp_pack_kv_str(pk, "workspace", s->ws_path);
    sp_pack_kv_str(pk, "cwd_path", slot_view(ag, s));
    sp_pack_cstr(pk, "sessions");
    sessions_pack(pk, s);
}

int op_slots(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    const msgpack_object *one = req_arg(rq, "slot");
    if (one && one->via.u64 >= ag->nslots)
        return sp_errf(err, SP_UNKNOWN_SLOT, "slot %llu does not exist (slots 0..%u)",
                       (unsigned long long)one->via.u64, ag->nslots - 1);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 1);
    sp_pack_cstr(pk, "slots");
    if (one) {
        msgpack_pack_array(pk, 1);
        pack_slot(pk, ag, &ag->slots[one->via.u64]);
    } else {
        msgpack_pack_array(pk, ag->nslots);
        for (unsigned i = 0; i < ag->nslots; i++)
            pack_slot(pk, ag, &ag->slots[i]);
    }
    req_reply_end(rq);
    return OP_DONE;
}

static char *dup_str(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

static void pack_lease(msgpack_packer *pk, struct agent *ag, struct slot *s, bool prepared)
{
    msgpack_pack_map(pk, prepared ? 8 : 7);
    sp_pack_kv_uint(pk, "slot", s->index);
    sp_pack_kv_str(pk, "trajectory_id", s->trajectory_id);
    sp_pack_kv_uint(pk, "generation", s->generation);
    sp_pack_kv_uint(pk, "leased_at", (uint64_t)(s->leased_at * 1000.0));
    sp_pack_kv_str(pk, "cwd_path", slot_view(ag, s));
    pack_workspace(pk, s);
    if (prepared)
        kv_double(pk, "prepare_ms", s->ws_prepare_ms);
}

/* The slot's workspace is about to be replaced (reset, a lease or a fork
 * with a template): kill what runs, fail what is queued, and finish in
 * reset_complete once nothing of the slot is left. */
int slot_begin_reset(struct req *rq, struct slot *s, const char *why)
{
    struct agent *ag = rq->ag;
    s->resetting = true;
    rq->aux = exec_kill_slot(ag, s);
    rq->slot_next = s->reset_waiters;
    s->reset_waiters = rq;
    struct sp_err cancelled;
    sp_errf(&cancelled, SP_CANCELLED, "slot %u %s", s->index, why);
    slot_fail_queued(ag, s, &cancelled);
    if (s->running == 0)
        reset_complete(ag, s);
    return OP_PENDING;
}

int op_lease(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    struct template *tpl;
    if (template_arg(rq, "template", &tpl, err) < 0)
        return -1;
    size_t tn, hn, on;
    const char *tid = arg_str(rq, "trajectory_id", &tn);
    const char *holder = arg_str(rq, "holder", &hn);
    const char *owner = arg_str(rq, "owner", &on);
    if (tn == 0 || memchr(tid, 0, tn))
        return sp_errf(err, SP_BAD_REQUEST, "args.trajectory_id: must be non-empty, without NUL");
    if (holder && memchr(holder, 0, hn))
        return sp_errf(err, SP_BAD_REQUEST, "args.holder: contains a NUL byte");
    if (owner && (on == 0 || memchr(owner, 0, on)))
        return sp_errf(err, SP_BAD_REQUEST, "args.owner: must be non-empty, without NUL");
    if (s->leased) {
        if (strlen(s->trajectory_id) != tn || memcmp(s->trajectory_id, tid, tn) != 0)
            return sp_errf(err, SP_SLOT_BUSY, "slot %u is leased by trajectory '%s'", s->index,
                           s->trajectory_id);
    } else {
        char *t = dup_str(tid, tn), *h = holder ? dup_str(holder, hn) : NULL;
        char *o = owner ? dup_str(owner, on) : NULL;
        if (!t || (holder && !h) || (owner && !o)) {
            free(t);
            free(h);
            free(o);
            return sp_errf(err, SP_INTERNAL, "out of memory");
        }
        s->trajectory_id = t;
        s->holder = h;
        s->owner = o;
        s->owner_bound = arg_bool(rq, "bound", true);
        s->leased = true;
        s->leased_at = agent_now(rq->ag);
        s->generation++;
        if (tpl) {
            /* A fresh lease on a template starts from exactly it. */
            rq->tpl = tpl;
            template_ref(tpl);
            return slot_begin_reset(rq, s, "was leased with a template");
        }
    }
    msgpack_packer *pk = req_reply_begin(rq);
    pack_lease(pk, rq->ag, s, false);
    req_reply_end(rq);
    return OP_DONE;
}

int op_unlease(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    size_t tn;
    const char *tid = arg_str(rq, "trajectory_id", &tn);
    if (!s->leased)
        return sp_errf(err, SP_NOT_LEASED, "slot %u is not leased", s->index);
    if (tid && (strlen(s->trajectory_id) != tn || memcmp(s->trajectory_id, tid, tn) != 0))
        return sp_errf(err, SP_NOT_LEASED, "slot %u is leased by another trajectory", s->index);
    /* Sessions belong to the lease: the next holder must not find this
     * trajectory's shell (with its cwd, variables and history). */
    sessions_close_slot(rq->ag, s);
    slot_unlease(s);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 1);
    sp_pack_kv_uint(pk, "slot", s->index);
    req_reply_end(rq);
    return OP_DONE;
}

static void reset_answer(struct agent *ag, struct slot *s, struct req *rq, int rc,
                         const struct sp_err *err)
{
    if (rc < 0 && rq->op->fn == op_lease && s->leased) {
        /* A lease whose workspace could not be laid out is no lease. */
        slot_unlease(s);
    }
    if (rc < 0) {
        req_finish(rq, err);
        return;
    }
    msgpack_packer *pk = req_reply_begin(rq);
    if (rq->op->fn == op_lease) {
        pack_lease(pk, ag, s, true);
    } else if (rq->op->fn == op_fork) {
        msgpack_pack_map(pk, 7);
        sp_pack_kv_uint(pk, "slot", req_slot(rq)->index);
        sp_pack_kv_uint(pk, "to_slot", s->index);
        sp_pack_kv_uint(pk, "killed", rq->aux);
        sp_pack_kv_bool(pk, "flattened", rq->flattened);
        kv_double(pk, "prepare_ms", s->ws_prepare_ms);
        pack_workspace(pk, s);
    } else {
        msgpack_pack_map(pk, 5);
        sp_pack_kv_uint(pk, "slot", s->index);
        sp_pack_kv_uint(pk, "killed", rq->aux);
        kv_double(pk, "prepare_ms", s->ws_prepare_ms);
        pack_workspace(pk, s);
    }
    req_reply_end(rq);
    req_finish(rq, NULL);
}

/* Serve the waiters oldest first, each laying out its own workspace (the
 * last one's stays); stop while a worker copies, go on when it is done. */
static void reset_next(struct agent *ag, struct slot *s, int rc0, const struct sp_err *err0)
{
    /* Answering a waiter can run the next request of another slot, which
     * can reset this one again: the loop below serves it, not a second
     * loop inside this one. */
    if (s->in_reset || s->prep_rq)
        return;
    s->in_reset = true;
    while (s->reset_waiters) {
        struct req **pp = &s->reset_waiters;
        while ((*pp)->slot_next)
            pp = &(*pp)->slot_next;
        struct req *rq = *pp;
        *pp = NULL;
        struct sp_err e = *err0;
        int r = rc0;
        if (r == 0)
            r = ws_prepare_begin(ag, s, rq->tpl, rq->fork_from, &e);
        if (r == 1) {
            s->prep_rq = rq;
            s->in_reset = false;
            return;
        }
        reset_answer(ag, s, rq, r, &e);
    }
    s->in_reset = false;
    s->resetting = false;
    s->resets++;
    quota_slot_reset(ag, s);
    if (!s->active)
        slot_advance(ag, s);
}

/* Wipe and answer once nothing of the slot runs any more, so no dying
 * process can write into the freshly emptied workspace. */
void reset_complete(struct agent *ag, struct slot *s)
{
    if (s->prep_rq || s->in_reset)
        return; /* a worker lays out the workspace, or the loop of reset_next
                   runs: either serves the rest */
    proc_sweep_strays(ag);
    struct sp_err err = {0};
    int rc = path_empty_dir(s->tmp_fd, &err);
    reset_next(ag, s, rc, &err);
}

void reset_prepared(struct agent *ag, struct slot *s, int rc, const struct sp_err *err)
{
    struct req *rq = s->prep_rq;
    s->prep_rq = NULL;
    s->in_reset = true; /* answering may reset s again: reset_next serves that */
    if (rq)
        reset_answer(ag, s, rq, rc, err);
    s->in_reset = false;
    struct sp_err ok = {0};
    reset_next(ag, s, 0, &ok);
}

int op_reset(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    struct template *tpl;
    if (template_arg(rq, "template", &tpl, err) < 0)
        return -1;
    rq->tpl = tpl;
    template_ref(tpl);
    return slot_begin_reset(rq, s, "was reset");
}
