/* Template ops: template_put (a tar or tar.gz stream in chunks, extracted
 * as it arrives), template_from_slot, template_list, template_delete, and
 * fork (a slot becomes a copy-on-write copy of another's workspace). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../exec.h"
#include "../template.h"
#include "../untar.h"

/* An upload nobody continues for this long is dropped. */
#define UPLOAD_IDLE_S 300.0
#define UPLOAD_MAX_BYTES (256ull << 30)
#define UPLOAD_MAX_ENTRIES 20000000ull

struct upload {
    struct upload *next;
    char name[TEMPLATE_NAME_MAX + 1];
    char stage[4200];
    struct untar *u;
    int layer_fd;
    struct template *base; /* referenced while the upload lasts */
    uint64_t received;
    double last, t0;
};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void upload_drop(struct agent *ag, struct upload *up, bool keep_stage)
{
    for (struct upload **pp = &ag->uploads; *pp; pp = &(*pp)->next)
        if (*pp == up) {
            *pp = up->next;
            break;
        }
    untar_free(up->u);
    if (up->layer_fd >= 0)
        close(up->layer_fd);
    if (!keep_stage)
        template_abort(ag, up->stage);
    template_unref(ag, up->base);
    free(up);
}

void uploads_sweep(struct agent *ag, bool all)
{
    double now = mono_s();
    for (struct upload *up = ag->uploads, *next; up; up = next) {
        next = up->next;
        if (all || now - up->last > UPLOAD_IDLE_S) {
            if (!all)
                log_warn("template_put of '%s': idle for %.0f s, dropped", up->name, UPLOAD_IDLE_S);
            upload_drop(ag, up, false);
        }
    }
}

static struct build *build_find(struct agent *ag, const char *name);

static struct upload *upload_find(struct agent *ag, const char *name)
{
    for (struct upload *up = ag->uploads; up; up = up->next)
        if (!strcmp(up->name, name))
            return up;
    return NULL;
}

static int upload_start(struct req *rq, const char *name, struct upload **out, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct upload *old = upload_find(ag, name);
    if (old)
        upload_drop(ag, old, false); /* offset 0 starts over */
    if (template_find(ag, name))
        return sp_errf(err, SP_EXISTS, "template '%s' already exists", name);
    if (build_find(ag, name))
        return sp_errf(err, SP_SLOT_BUSY, "template '%s' is being built", name);
    struct template *base;
    if (template_arg(rq, "base", &base, err) < 0)
        return -1;
    size_t fn;
    const char *fmt = arg_str(rq, "format", &fn);
    int gzip = -1;
    if (fmt && fn == 3 && !memcmp(fmt, "tar", 3))
        gzip = 0;
    else if (fmt && ((fn == 6 && !memcmp(fmt, "tar.gz", 6)) || (fn == 3 && !memcmp(fmt, "tgz", 3))))
        gzip = 1;
    else if (fmt)
        return sp_errf(err, SP_BAD_REQUEST, "args.format: 'tar' or 'tar.gz' (default: detected)");
    struct upload *up = calloc(1, sizeof *up);
    if (!up)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    snprintf(up->name, sizeof up->name, "%s", name);
    if (template_stage(ag, up->stage, sizeof up->stage, &up->layer_fd, err) < 0) {
        free(up);
        return -1;
    }
    struct untar_limits lim = {UPLOAD_MAX_BYTES, UPLOAD_MAX_ENTRIES};
    uid_t owner = geteuid() == 0 ? 0 : (uid_t)-1;
    up->u = untar_new(up->layer_fd, gzip, &lim, owner, owner, err);
    if (!up->u) {
        close(up->layer_fd);
        template_abort(ag, up->stage);
        free(up);
        return -1;
    }
    up->base = base;
    template_ref(base);
    up->t0 = mono_s();
    up->next = ag->uploads;
    ag->uploads = up;
    *out = up;
    return 0;
}

int op_template_put(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    size_t nn, dn;
    const char *nv = arg_str(rq, "name", &nn);
    const char *data = arg_bin(rq, "data", &dn);
    char name[TEMPLATE_NAME_MAX + 1];
    if (template_name_check(nv, nn, name, err) < 0)
        return -1;
    uint64_t offset = arg_uint(rq, "offset", 0);
    struct upload *up = NULL;
    if (offset == 0) {
        if (upload_start(rq, name, &up, err) < 0)
            return -1;
    } else if (!(up = upload_find(ag, name))) {
        return sp_errf(err, SP_NOT_FOUND,
                       "no upload of template '%s' in progress (start one at offset 0)", name);
    } else if (offset != up->received) {
        return sp_errf(err, SP_BAD_REQUEST, "args.offset: expected %llu for template '%s'",
                       (unsigned long long)up->received, name);
    }
    if (dn && untar_feed(up->u, data, dn, err) < 0) {
        upload_drop(ag, up, false);
        return -1;
    }
    up->received += dn;
    up->last = mono_s();
    if (!arg_bool(rq, "done", false)) {
        msgpack_packer *pk = req_reply_begin(rq);
        msgpack_pack_map(pk, 3);
        sp_pack_kv_str(pk, "name", name);
        sp_pack_kv_uint(pk, "received", up->received);
        sp_pack_kv_bool(pk, "done", false);
        req_reply_end(rq);
        return OP_DONE;
    }
    if (untar_finish(up->u, err) < 0) {
        upload_drop(ag, up, false);
        return -1;
    }
    uint64_t ms = (uint64_t)((mono_s() - up->t0) * 1000.0);
    char stage[4200];
    snprintf(stage, sizeof stage, "%s", up->stage);
    struct template *base = up->base, *t;
    template_ref(base); /* across the drop below */
    upload_drop(ag, up, true);
    int rc = template_commit(ag, stage, name, base, ms, &t, err);
    template_unref(ag, base);
    if (rc < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 2);
    sp_pack_kv_bool(pk, "done", true);
    sp_pack_cstr(pk, "template");
    template_pack(pk, t);
    req_reply_end(rq);
    return OP_DONE;
}

int op_template_from_slot(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct slot *s = req_slot(rq);
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    if (template_name_check(nv, nn, name, err) < 0)
        return -1;
    struct template *t;
    bool flattened = false;
    if (template_find(ag, name))
        return sp_errf(err, SP_EXISTS, "template '%s' already exists", name);
    /* A quiet overlay slot gives its upper layer and stands on the result;
     * otherwise its changes (or its whole workspace) are copied. */
    int frozen = s->ws_mode == WS_OVERLAY ? template_freeze_in_place(ag, s, name, true, &t, err)
                                          : (err->msg[0] = 0, -1);
    if (frozen < 0 && err->msg[0])
        return -1;
    if (frozen < 0 && template_freeze(ag, s, name, &t, &flattened, err) < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "slot", s->index);
    sp_pack_kv_bool(pk, "flattened", flattened);
    sp_pack_cstr(pk, "template");
    template_pack(pk, t);
    req_reply_end(rq);
    return OP_DONE;
}

int op_template_list(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    if (nv && template_name_check(nv, nn, name, err) < 0)
        return -1;
    if (nv && !template_find(ag, name))
        return sp_errf(err, SP_NOT_FOUND, "template '%s' does not exist", name);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 2);
    sp_pack_cstr(pk, "templates");
    templates_pack(pk, ag, nv ? name : NULL);
    sp_pack_cstr(pk, "workspaces");
    template_pack_info(pk, ag);
    req_reply_end(rq);
    return OP_DONE;
}

int op_template_delete(struct req *rq, struct sp_err *err)
{
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    if (template_name_check(nv, nn, name, err) < 0)
        return -1;
    if (upload_find(rq->ag, name))
        return sp_errf(err, SP_SLOT_BUSY, "template '%s' is being uploaded", name);
    if (template_delete(rq->ag, name, err) < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 1);
    sp_pack_kv_str(pk, "name", name);
    req_reply_end(rq);
    return OP_DONE;
}

/* The source's changes are frozen now (an anonymous layer over what it
 * stands on, or kept for a copy); the target is emptied like a reset, and
 * reset_complete lays it out once nothing of it runs. */
int op_fork(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct slot *s = req_slot(rq);
    uint64_t to = arg_uint(rq, "to_slot", 0);
    if (to >= ag->nslots)
        return sp_errf(err, SP_UNKNOWN_SLOT, "to_slot %llu does not exist (slots 0..%u)",
                       (unsigned long long)to, ag->nslots - 1);
    if (to == s->index)
        return sp_errf(err, SP_BAD_REQUEST, "to_slot is the slot itself");
    struct slot *d = &ag->slots[to];
    if (s->ws_mode == WS_OVERLAY) {
        struct template *t;
        rq->flattened = false;
        /* This request is s's only one running (fork is queued on s). */
        int frozen = template_freeze_in_place(ag, s, NULL, true, &t, err);
        if (frozen < 0 && err->msg[0])
            return -1;
        if (frozen < 0 && template_freeze(ag, s, NULL, &t, &rq->flattened, err) < 0)
            return -1;
        rq->tpl = t;
        template_ref(t);
    } else {
        rq->fork_from = s;
    }
    char why[64];
    snprintf(why, sizeof why, "was replaced by a fork of slot %u", s->index);
    return slot_begin_reset(rq, d, why);
}

/* ---- template_build ------------------------------------------------------
 * A build borrows a free slot: leased to "template-build:NAME" for its
 * duration, its workspace a view of the base (or empty), the script run
 * there by op_exec with the slot's full isolation (network on unless the
 * request says otherwise), and on exit 0 the workspace frozen as NAME.
 * Requests for a name being built wait for that build and get its answer. */

struct build {
    struct build *next;
    char name[TEMPLATE_NAME_MAX + 1];
    struct slot *slot;
    struct req *waiters; /* via slot_next */
};

static struct build *build_find(struct agent *ag, const char *name)
{
    for (struct build *b = ag->builds; b; b = b->next)
        if (!strcmp(b->name, name))
            return b;
    return NULL;
}

static struct slot *free_slot(struct agent *ag)
{
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        if (!s->leased && !s->active && !s->q_head && !s->running && !s->resetting && !s->nsessions)
            return s;
    }
    return NULL;
}

/* cached: the template was there already; joined: another request's
 * build of the same name, waited for. */
static void build_answer(struct req *rq, struct template *t, struct exec *e, bool cached,
                         bool joined)
{
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 5);
    sp_pack_kv_bool(pk, "built", t != NULL);
    sp_pack_kv_bool(pk, "cached", cached);
    sp_pack_kv_bool(pk, "joined", joined);
    sp_pack_cstr(pk, "template");
    if (t)
        template_pack(pk, t);
    else
        msgpack_pack_nil(pk);
    sp_pack_cstr(pk, "exec");
    if (e)
        exec_pack_result(pk, e, true);
    else
        msgpack_pack_nil(pk);
    req_reply_end(rq);
}

/* The build is over (t: its template, or NULL): give the slot back, empty
 * and unleased, and answer everyone who waited. */
static void build_end(struct agent *ag, struct build *b, struct template *t, struct exec *e,
                      const struct sp_err *err)
{
    for (struct build **pp = &ag->builds; *pp; pp = &(*pp)->next)
        if (*pp == b) {
            *pp = b->next;
            break;
        }
    struct slot *s = b->slot;
    exec_kill_slot(ag, s);
    struct sp_err e2;
    if (ws_prepare(ag, s, NULL, &e2) < 0)
        log_warn("slot %u: emptying after the build of '%s': %s", s->index, b->name, e2.msg);
    slot_unlease(s);
    while (b->waiters) {
        struct req *w = b->waiters;
        b->waiters = w->slot_next;
        w->slot_next = NULL;
        if (err) {
            req_finish(w, err);
        } else {
            build_answer(w, t, e, false, true);
            req_finish(w, NULL);
        }
    }
    free(b);
}

static int build_start(struct req *rq, const char *name, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct template *base;
    if (template_arg(rq, "base", &base, err) < 0)
        return -1;
    struct slot *s;
    const msgpack_object *want = req_arg(rq, "slot");
    if (want) {
        /* The controller names the slot it will lease once the build is
         * done: it must be as free as one the agent would pick. */
        if (want->via.u64 >= ag->nslots)
            return sp_errf(err, SP_UNKNOWN_SLOT, "slot %llu does not exist (slots 0..%u)",
                           (unsigned long long)want->via.u64, ag->nslots - 1);
        s = &ag->slots[want->via.u64];
        if (s->leased || s->active || s->q_head || s->running || s->resetting || s->nsessions)
            return sp_errf(err, SP_SLOT_BUSY, "slot %u is leased or busy: cannot build in it",
                           s->index);
    } else if (!(s = free_slot(ag))) {
        return sp_errf(err, SP_NO_CAPACITY,
                       "no free slot to build template '%s' in (all %u are leased or busy)", name,
                       ag->nslots);
    }
    struct build *b = calloc(1, sizeof *b);
    char tid[TEMPLATE_NAME_MAX + 32];
    snprintf(tid, sizeof tid, "template-build:%s", name);
    if (!b || !(s->trajectory_id = strdup(tid)) || !(s->holder = strdup("slot-agent"))) {
        free(b);
        free(s->trajectory_id);
        s->trajectory_id = NULL;
        return sp_errf(err, SP_INTERNAL, "out of memory");
    }
    s->leased = true;
    s->owner_bound = false;
    s->leased_at = agent_now(ag);
    s->generation++;
    snprintf(b->name, sizeof b->name, "%s", name);
    b->slot = s;
    b->next = ag->builds;
    ag->builds = b;
    /* Run again, now as the slot's request (rq->aux = 1). */
    rq->tpl = base;
    template_ref(base);
    rq->slot = (int)s->index;
    rq->aux = 1;
    slot_submit(ag, rq);
    return OP_PENDING;
}

/* The script's key is the one op_exec reads. */
static void script_as_cmd(struct req *rq)
{
    const msgpack_object *m = rq->args;
    for (uint32_t i = 0; m && i < m->via.map.size; i++) {
        msgpack_object *k = &m->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == 6 &&
            !memcmp(k->via.str.ptr, "script", 6)) {
            k->via.str.ptr = "cmd";
            k->via.str.size = 3;
        }
    }
}

int op_template_build(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    if (template_name_check(nv, nn, name, err) < 0)
        return -1;
    if (rq->aux == 0) {
        struct template *t = template_find(ag, name);
        if (t) {
            t->last_used = (double)time(NULL);
            build_answer(rq, t, NULL, true, false);
            return OP_DONE;
        }
        struct build *b = build_find(ag, name);
        if (b) {
            rq->slot_next = b->waiters;
            b->waiters = rq;
            return OP_PENDING;
        }
        if (upload_find(ag, name))
            return sp_errf(err, SP_SLOT_BUSY, "template '%s' is being uploaded", name);
        return build_start(rq, name, err);
    }
    /* On the borrowed slot: lay out the base, then run the script. */
    struct build *b = build_find(ag, name);
    struct slot *s = req_slot(rq);
    if (ws_prepare(ag, s, rq->tpl, err) < 0) {
        build_end(ag, b, NULL, NULL, err);
        return -1;
    }
    script_as_cmd(rq);
    int rc = op_exec(rq, err);
    if (rc < 0)
        build_end(ag, b, NULL, NULL, err);
    return rc;
}

void template_build_done(struct agent *ag, struct req *rq, struct exec *e)
{
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    struct sp_err err;
    struct build *b = template_name_check(nv, nn, name, &err) == 0 ? build_find(ag, name) : NULL;
    struct template *t = NULL;
    bool ok = e->exited && !e->timed_out && !e->idle_timed_out && !e->cancelled &&
              WIFEXITED(e->status) && WEXITSTATUS(e->status) == 0;
    if (b && ok) {
        bool flat;
        double ms = (e->t_end - e->t_start) * 1000.0;
        /* The build's slot is done: its layer (or whole workspace) becomes
         * the template without a copy when nothing of it still runs. */
        int frozen = template_freeze_in_place(ag, b->slot, name, false, &t, &err);
        if (frozen < 0 && err.msg[0]) {
            log_warn("template_build '%s': %s", name, err.msg);
            build_end(ag, b, NULL, NULL, &err);
            req_finish(rq, &err);
            return;
        }
        if (frozen < 0 && template_freeze(ag, b->slot, name, &t, &flat, &err) < 0) {
            log_warn("template_build '%s': %s", name, err.msg);
            build_end(ag, b, NULL, NULL, &err);
            req_finish(rq, &err);
            return;
        }
        t->build_ms = ms > 0 ? (uint64_t)ms : 0;
        t->last_used = (double)time(NULL);
    }
    build_answer(rq, t, e, false, false);
    if (b)
        build_end(ag, b, t, e, NULL);
    req_finish(rq, NULL);
}

void builds_free(struct agent *ag)
{
    while (ag->builds) {
        struct build *b = ag->builds;
        ag->builds = b->next;
        while (b->waiters) {
            struct req *w = b->waiters;
            b->waiters = w->slot_next;
            req_free(w);
        }
        free(b);
    }
}

void template_build_failed(struct agent *ag, struct req *rq, const struct sp_err *err)
{
    size_t nn;
    const char *nv = arg_str(rq, "name", &nn);
    char name[TEMPLATE_NAME_MAX + 1];
    struct sp_err e2;
    struct build *b = template_name_check(nv, nn, name, &e2) == 0 ? build_find(ag, name) : NULL;
    if (b)
        build_end(ag, b, NULL, NULL, err);
    req_finish(rq, err);
}
