/* The trainer API's ops: the op table and the handlers, called by the
 * transport (api_conn.c) once per frame through api_dispatch. Tool calls
 * are translated into agent ops here (bash -> exec, write_file content ->
 * data, artifacts -> read_file/list/archive), sent to the agents at once,
 * and answered as the agents answer: single requests in any order matched
 * by id, a batch as one answer in request order. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api.h"
#include "ctl.h"

#define ARTIFACT_DEFAULT_MAX (16u << 20)
#define MAX_TIMEOUT_MS 86400000ull
#define MAX_KV 40

/* ---- agent answers back to the trainer ----------------------------------- */

static void pack_obj_raw(msgpack_packer *pk, const void *p, size_t n)
{
    pk->callback(pk->data, p, n);
}

/* {"ok": .., "result"/"error": ..} pairs of an agent answer, reshaped. */
static void pack_outcome(msgpack_packer *pk, const msgpack_object *resp, enum preq_shape shape)
{
    const msgpack_object *ok = sp_map_get(resp, "ok");
    const msgpack_object *res = sp_map_get(resp, "result");
    bool good = ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean && res;
    sp_pack_kv_bool(pk, "ok", good);
    if (!good) {
        const msgpack_object *er = sp_map_get(resp, "error");
        sp_pack_cstr(pk, "error");
        if (er)
            msgpack_pack_object(pk, *er);
        else {
            msgpack_pack_map(pk, 2);
            sp_pack_kv_str(pk, "code", "internal");
            sp_pack_kv_str(pk, "message", "agent answer without result or error");
        }
        return;
    }
    sp_pack_cstr(pk, "result");
    if (shape != SHAPE_ARTIFACT) {
        msgpack_pack_object(pk, *res);
        return;
    }
    struct sp_err e;
    const char *data = NULL, *sha = NULL;
    size_t dl = 0, shl = 0;
    uint64_t size = 0;
    bool eof = true;
    sp_get_bin(res, "data", false, &data, &dl, &e);
    sp_get_uint(res, "size", false, &size, &e);
    sp_get_bool(res, "eof", false, &eof, &e);
    sp_get_str(res, "sha256", false, &sha, &shl, &e);
    msgpack_pack_map(pk, sha ? 4 : 3);
    sp_pack_kv_bin(pk, "content", data, dl);
    sp_pack_kv_uint(pk, "size", size);
    sp_pack_kv_bool(pk, "truncated", !eof);
    if (sha)
        sp_pack_kv_strn(pk, "sha256", sha, shl);
}

static void pack_err_outcome(msgpack_packer *pk, const struct sp_err *e)
{
    sp_pack_kv_bool(pk, "ok", false);
    sp_pack_cstr(pk, "error");
    msgpack_pack_map(pk, 2);
    sp_pack_kv_str(pk, "code", sp_code_name(e->code));
    sp_pack_kv_str(pk, "message", e->msg);
}

static void batch_release(struct ctl *c, struct batch *b)
{
    if (--b->remaining > 0)
        return;
    if (b->conn && !b->conn->closing) {
        msgpack_packer pk;
        tconn_begin(b->conn, &pk);
        sp_pack_ok_head(&pk, b->client_id);
        msgpack_pack_map(&pk, 1);
        sp_pack_cstr(&pk, "results");
        msgpack_pack_array(&pk, b->n);
        for (uint32_t k = 0; k < b->n; k++)
            pack_obj_raw(&pk, b->items[k].data, b->items[k].size);
        tconn_end(c, b->conn);
    }
    for (uint32_t k = 0; k < b->n; k++)
        msgpack_sbuffer_destroy(&b->items[k]);
    free(b->items);
    free(b);
}

static void batch_item_done(struct ctl *c, struct batch *b, uint32_t i, const msgpack_object *resp,
                            enum preq_shape shape, const struct sp_err *err)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b->items[i], msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    if (resp)
        pack_outcome(&pk, resp, shape);
    else
        pack_err_outcome(&pk, err);
    batch_release(c, b);
}

void api_answer(struct ctl *c, struct preq *r, const msgpack_object *resp, const struct sp_err *err)
{
    if (r->answered)
        return;
    r->answered = true;
    ev_timer_stop(c->loop, &r->timer);
    if (r->batch) {
        /* The batch may be freed now, while r can live on (a late answer
         * after the backstop): forget it. */
        struct batch *b = r->batch;
        r->batch = NULL;
        batch_item_done(c, b, r->item, resp, r->shape, err);
        return;
    }
    struct tconn *t = r->conn;
    if (!t || t->closing)
        return;
    if (!resp) {
        tconn_error(c, t, r->client_id, err);
        return;
    }
    msgpack_packer pk;
    tconn_begin(t, &pk);
    msgpack_pack_map(&pk, 3);
    sp_pack_kv_uint(&pk, "id", r->client_id);
    pack_outcome(&pk, resp, r->shape);
    tconn_end(c, t);
}

void api_tool_answer(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err)
{
    bool failed = !resp;
    if (resp) {
        const msgpack_object *ok = sp_map_get(resp, "ok");
        failed = !ok || ok->type != MSGPACK_OBJECT_BOOLEAN || !ok->via.boolean;
    }
    ev_tstamp now = ev_now(c->loop);
    lat_add(&r->ag->prof->lat, now - r->sent_at, failed, now);
    lat_add(&c->lat, now - r->sent_at, failed, now);
    api_answer(c, r, resp, err);
    preq_free(c, r);
}

static void on_tool_event(struct ctl *c, struct preq *r, const msgpack_object *ev,
                          const struct sp_err *err)
{
    (void)err;
    struct tconn *t = r->conn;
    if (r->answered || !t || t->closing)
        return;
    msgpack_packer pk;
    tconn_begin(t, &pk);
    msgpack_pack_map(&pk, ev->via.map.size);
    for (uint32_t i = 0; i < ev->via.map.size; i++) {
        const msgpack_object_kv *kv = &ev->via.map.ptr[i];
        msgpack_pack_object(&pk, kv->key);
        if (kv->key.type == MSGPACK_OBJECT_STR &&
            sp_str_eq(kv->key.via.str.ptr, kv->key.via.str.size, "id"))
            msgpack_pack_uint64(&pk, r->client_id);
        else
            msgpack_pack_object(&pk, kv->val);
    }
    tconn_end(c, t);
}

static void backstop_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct preq *r = w->data;
    struct ctl *c = r->ag->ctl;
    struct sp_err e;
    sp_errf(&e, SP_TIMEOUT, "agent %s did not answer within %.1f s", r->ag->id, w->repeat);
    lat_add(&r->ag->prof->lat, ev_now(c->loop) - r->sent_at, true, ev_now(c->loop));
    /* The request stays pending in the agent; its late answer is dropped. */
    api_answer(c, r, NULL, &e);
}

static void arm_backstop(struct ctl *c, struct preq *r, double seconds)
{
    ev_timer_init(&r->timer, backstop_cb, seconds, 0);
    r->timer.data = r;
    ev_timer_start(c->loop, &r->timer);
}

/* ---- tool translation ---------------------------------------------------- */

struct kv {
    const char *k;
    enum { KV_OBJ, KV_UINT, KV_STR, KV_BOOL, KV_ENV } t;
    const msgpack_object *o;
    uint64_t u;
    const char *s;
    size_t sl;
};

struct kvs {
    struct kv v[MAX_KV];
    uint32_t n;
};

static void kv_obj(struct kvs *a, const char *k, const msgpack_object *o)
{
    a->v[a->n++] = (struct kv){.k = k, .t = KV_OBJ, .o = o};
}

static void kv_uint(struct kvs *a, const char *k, uint64_t u)
{
    a->v[a->n++] = (struct kv){.k = k, .t = KV_UINT, .u = u};
}

static bool env_has(const msgpack_object *env, const char *k, size_t kl)
{
    if (!env)
        return false;
    for (uint32_t i = 0; i < env->via.map.size; i++) {
        const msgpack_object *key = &env->via.map.ptr[i].key;
        if (key->type == MSGPACK_OBJECT_STR && key->via.str.size == kl &&
            !memcmp(key->via.str.ptr, k, kl))
            return true;
    }
    return false;
}

/* Profile env and secrets, then the request's env (which wins). */
static void pack_env(msgpack_packer *pk, const struct profile *p, const msgpack_object *env)
{
    uint32_t n = env ? env->via.map.size : 0;
    for (size_t i = 0; i < p->env.n; i++) {
        const char *eq = strchr(p->env.v[i], '=');
        n += !env_has(env, p->env.v[i], (size_t)(eq - p->env.v[i]));
    }
    /* A modal profile's secrets name Modal Secrets, attached to the sandbox. */
    size_t nsec = p->be == &backend_modal ? 0 : p->secrets.n;
    for (size_t i = 0; i < nsec; i++)
        n += getenv(p->secrets.v[i]) && !env_has(env, p->secrets.v[i], strlen(p->secrets.v[i]));
    msgpack_pack_map(pk, n);
    for (size_t i = 0; i < p->env.n; i++) {
        const char *kvp = p->env.v[i], *eq = strchr(kvp, '=');
        if (env_has(env, kvp, (size_t)(eq - kvp)))
            continue;
        sp_pack_strn(pk, kvp, (size_t)(eq - kvp));
        sp_pack_cstr(pk, eq + 1);
    }
    for (size_t i = 0; i < nsec; i++) {
        const char *v = getenv(p->secrets.v[i]);
        if (!v || env_has(env, p->secrets.v[i], strlen(p->secrets.v[i])))
            continue;
        sp_pack_kv_str(pk, p->secrets.v[i], v);
    }
    for (uint32_t i = 0; env && i < env->via.map.size; i++) {
        msgpack_pack_object(pk, env->via.map.ptr[i].key);
        msgpack_pack_object(pk, env->via.map.ptr[i].val);
    }
}

enum tool_kind {
    T_BASH,
    T_EXEC,
    T_PASS,
    T_WRITE,
    T_READ_ARTIFACT,
    T_LIST_ARTIFACTS,
    T_ARCHIVE_ARTIFACTS
};

struct tool {
    const char *name;
    const char *op;
    enum tool_kind kind;
};

static const struct tool tools[] = {
    {"bash", "exec", T_BASH},
    {"exec", "exec", T_EXEC},
    {"read_file", "read_file", T_PASS},
    {"write_file", "write_file", T_WRITE},
    {"stat", "stat", T_PASS},
    {"list", "list", T_PASS},
    {"archive", "archive", T_PASS},
    {"reset", "reset", T_PASS},
    {"cancel", "cancel", T_PASS},
    {"read_artifact", "read_file", T_READ_ARTIFACT},
    {"list_artifacts", "list", T_LIST_ARTIFACTS},
    {"archive_artifacts", "archive", T_ARCHIVE_ARTIFACTS},
    /* Sessions: the agent checks that the session is this slot's. */
    {"session_open", "session_open", T_PASS},
    {"session_exec", "session_exec", T_PASS},
    {"session_write", "session_write", T_PASS},
    {"session_read", "session_read", T_PASS},
    {"session_screen", "session_screen", T_PASS},
    {"session_resize", "session_resize", T_PASS},
    {"session_signal", "session_signal", T_PASS},
    {"session_close", "session_close", T_PASS},
};

static const struct tool *tool_find(const char *s, size_t n)
{
    for (size_t i = 0; i < sizeof tools / sizeof tools[0]; i++)
        if (sp_str_eq(s, n, tools[i].name))
            return &tools[i];
    return NULL;
}

static bool key_is(const msgpack_object *k, const char *name)
{
    return k->type == MSGPACK_OBJECT_STR && sp_str_eq(k->via.str.ptr, k->via.str.size, name);
}

/* Start one tool call on its slot. 0, or -1 with err (answered by the caller). */
static int start_tool(struct ctl *c, struct tconn *t, uint64_t client_id, struct batch *b,
                      uint32_t item, struct slot *s, const struct tool *tool,
                      const msgpack_object *args, uint64_t timeout_ms, struct sp_err *err)
{
    if (args && args->type != MSGPACK_OBJECT_MAP)
        return sp_errf(err, SP_BAD_REQUEST, "'args' must be a map (got %s)", sp_type_name(args));
    uint32_t nargs = args ? args->via.map.size : 0;
    if (nargs > MAX_KV - 6)
        return sp_errf(err, SP_BAD_REQUEST, "too many arguments (%u)", nargs);
    struct profile *p = s->ag->prof;
    struct kvs a = {.n = 0};
    kv_uint(&a, "slot", s->index);
    const msgpack_object *env = NULL, *isolation = NULL;
    uint64_t args_timeout = 0;
    bool has_timeout = false, want_stream = false, has_mkdirs = false, has_recursive = false,
         has_length = false, has_network = false;
    /* The trainer's sandbox policy (bash): -1 when not given. */
    int allow_network = -1, require_sandbox = -1;
    for (uint32_t i = 0; i < nargs; i++) {
        const msgpack_object *k = &args->via.map.ptr[i].key, *v = &args->via.map.ptr[i].val;
        if (k->type != MSGPACK_OBJECT_STR)
            return sp_errf(err, SP_BAD_REQUEST, "argument names must be strings");
        if (key_is(k, "slot"))
            continue;
        if (tool->kind == T_BASH || tool->kind == T_EXEC) {
            if (key_is(k, "env")) {
                if (v->type != MSGPACK_OBJECT_MAP && v->type != MSGPACK_OBJECT_NIL)
                    return sp_errf(err, SP_BAD_REQUEST, "'env' must be a map (got %s)",
                                   sp_type_name(v));
                env = v->type == MSGPACK_OBJECT_MAP ? v : NULL;
                continue;
            }
            if (key_is(k, "stream")) {
                want_stream = v->type == MSGPACK_OBJECT_BOOLEAN && v->via.boolean;
                continue;
            }
            if (key_is(k, "timeout_ms")) {
                has_timeout = true;
                if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER && v->via.u64)
                    args_timeout = v->via.u64;
            }
        }
        if (tool->kind == T_BASH) {
            if (key_is(k, "command")) {
                if (v->type != MSGPACK_OBJECT_STR)
                    return sp_errf(err, SP_BAD_REQUEST, "'command' must be a string (got %s)",
                                   sp_type_name(v));
                kv_obj(&a, "cmd", v);
                continue;
            }
            if (key_is(k, "timeout")) { /* seconds, as trainers send it */
                double sec = v->type == MSGPACK_OBJECT_FLOAT64 || v->type == MSGPACK_OBJECT_FLOAT32
                                 ? v->via.f64
                             : v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (double)v->via.u64
                                                                          : -1;
                if (sec < 0 || sec > MAX_TIMEOUT_MS / 1000.0)
                    return sp_errf(err, SP_BAD_REQUEST, "'timeout' must be seconds (got %s)",
                                   sp_type_name(v));
                if (!has_timeout) {
                    kv_uint(&a, "timeout_ms", (uint64_t)(sec * 1000));
                    args_timeout = (uint64_t)(sec * 1000);
                }
                has_timeout = true;
                continue;
            }
            bool is_allow = key_is(k, "allow_network"), is_req = key_is(k, "require_sandbox");
            if (is_allow || is_req || key_is(k, "require_stateful_sandbox")) {
                if (v->type != MSGPACK_OBJECT_BOOLEAN)
                    return sp_errf(err, SP_BAD_REQUEST, "'%.*s' must be a bool (got %s)",
                                   (int)k->via.str.size, k->via.str.ptr, sp_type_name(v));
                /* require_stateful_sandbox is about stateful tools: a
                 * bash call starts from nothing anyway. */
                if (is_allow)
                    allow_network = v->via.boolean;
                else if (is_req)
                    require_sandbox = v->via.boolean;
                continue;
            }
            if (key_is(k, "isolation")) {
                isolation = v; /* packed below: require_sandbox may tighten it */
                continue;
            }
            has_network |= key_is(k, "network");
            static const char *const ok_keys[] = {"timeout_ms",      "cwd",     "stdin",
                                                  "max_output",      "network", "keep_background",
                                                  "idle_timeout_ms", "rlimits"};
            bool known = false;
            for (size_t j = 0; j < sizeof ok_keys / sizeof ok_keys[0]; j++)
                known |= key_is(k, ok_keys[j]);
            if (!known)
                return sp_errf(err, SP_BAD_REQUEST, "unknown argument '%.*s' for tool bash",
                               (int)k->via.str.size, k->via.str.ptr);
        }
        if (tool->kind == T_WRITE && key_is(k, "content")) {
            kv_obj(&a, "data", v);
            continue;
        }
        if (tool->kind == T_WRITE && key_is(k, "mkdirs"))
            has_mkdirs = true;
        if (tool->kind == T_LIST_ARTIFACTS && key_is(k, "recursive"))
            has_recursive = true;
        if (tool->kind == T_READ_ARTIFACT) {
            if (key_is(k, "max_bytes")) {
                kv_obj(&a, "length", v);
                has_length = true;
                continue;
            }
            if (!key_is(k, "path") && !key_is(k, "sha256"))
                return sp_errf(err, SP_BAD_REQUEST,
                               "unknown argument '%.*s' for read_artifact (path, max_bytes, "
                               "sha256)",
                               (int)k->via.str.size, k->via.str.ptr);
        }
        kv_obj(&a, NULL, v);
        a.v[a.n - 1].s = k->via.str.ptr;
        a.v[a.n - 1].sl = k->via.str.size;
    }
    if (tool->kind == T_BASH) {
        bool has_cmd = false;
        for (uint32_t i = 0; i < a.n; i++)
            has_cmd |= a.v[i].k && !strcmp(a.v[i].k, "cmd");
        if (!has_cmd)
            return sp_errf(err, SP_BAD_REQUEST, "tool bash needs 'command'");
        /* The agent's own `network` wins over the trainer's allow_network;
         * the stricter of `isolation` and require_sandbox wins, so that a
         * required sandbox is never silently downgraded. The trainer's
         * allow_network false fails closed: without the rungs that enforce
         * it, the command does not run. */
        if (allow_network >= 0 && !has_network)
            a.v[a.n++] = (struct kv){.k = "network", .t = KV_BOOL, .u = (uint64_t)allow_network};
        if (require_sandbox == 1 || (allow_network == 0 && !has_network))
            a.v[a.n++] = (struct kv){.k = "isolation", .t = KV_STR, .s = "required", .sl = 8};
        else if (isolation)
            kv_obj(&a, "isolation", isolation);
    }
    bool command = tool->kind == T_BASH || tool->kind == T_EXEC;
    uint64_t cmd_timeout = args_timeout ? args_timeout
                           : timeout_ms ? timeout_ms
                                        : p->exec_timeout_ms;
    if (cmd_timeout > MAX_TIMEOUT_MS)
        cmd_timeout = MAX_TIMEOUT_MS;
    if (command && !has_timeout && cmd_timeout)
        kv_uint(&a, "timeout_ms", cmd_timeout);
    if (command) {
        a.v[a.n++] = (struct kv){.k = "env", .t = KV_ENV, .o = env};
        if (want_stream && !b)
            a.v[a.n++] = (struct kv){.k = "stream", .t = KV_BOOL, .u = 1};
    }
    if (tool->kind == T_WRITE && !has_mkdirs)
        a.v[a.n++] = (struct kv){.k = "mkdirs", .t = KV_BOOL, .u = 1};
    if (tool->kind == T_LIST_ARTIFACTS && !has_recursive)
        a.v[a.n++] = (struct kv){.k = "recursive", .t = KV_BOOL, .u = 1};
    if (tool->kind == T_READ_ARTIFACT && !has_length)
        kv_uint(&a, "length", ARTIFACT_DEFAULT_MAX);

    struct preq *r = agent_req_new(s->ag, s, api_tool_answer);
    r->conn = t;
    r->client_id = client_id;
    r->batch = b;
    r->item = item;
    r->shape = tool->kind == T_READ_ARTIFACT ? SHAPE_ARTIFACT : SHAPE_PASS;
    r->is_command = command;
    if (want_stream && !b)
        r->on_event = on_tool_event;
    if (t)
        TAILQ_INSERT_TAIL(&t->reqs, r, clink);
    msgpack_packer pk;
    agent_send_begin(s->ag, r, tool->op, &pk);
    msgpack_pack_map(&pk, a.n);
    for (uint32_t i = 0; i < a.n; i++) {
        struct kv *x = &a.v[i];
        if (x->k)
            sp_pack_cstr(&pk, x->k);
        else
            sp_pack_strn(&pk, x->s, x->sl);
        switch (x->t) {
        case KV_OBJ: msgpack_pack_object(&pk, *x->o); break;
        case KV_UINT: msgpack_pack_uint64(&pk, x->u); break;
        case KV_STR: sp_pack_strn(&pk, x->s, x->sl); break;
        case KV_BOOL:
            if (x->u)
                msgpack_pack_true(&pk);
            else
                msgpack_pack_false(&pk);
            break;
        case KV_ENV: pack_env(&pk, p, x->o); break;
        }
    }
    /* The agent kills a command at its timeout and answers; the backstop
     * only fires if the agent itself stops answering. */
    arm_backstop(c, r, (double)cmd_timeout / 1000.0 + CTL_BACKSTOP_S);
    agent_send_end(c, s->ag, r);
    return 0;
}

#define TOOL_NAMES                                                                                 \
    "bash, bash_stateful, tmux, read_file, write_file, exec, stat, list, archive, reset, cancel, " \
    "read_artifact, list_artifacts, archive_artifacts, session_*"

/* One call of tool `tn` on the slot with this handle. */
static int start_call(struct ctl *c, struct tconn *t, uint64_t client_id, struct batch *b,
                      uint32_t item, const msgpack_object *handle, const char *tn, size_t tnl,
                      const msgpack_object *args, uint64_t timeout_ms, struct sp_err *err)
{
    bool stateful = stateful_tool(tn, tnl);
    const struct tool *tool = stateful ? NULL : tool_find(tn, tnl);
    if (!stateful && !tool)
        return sp_errf(err, SP_BAD_REQUEST, "unknown tool '%.*s' (%s)", (int)(tnl > 64 ? 64 : tnl),
                       tn, TOOL_NAMES);
    if (!handle || handle->type != MSGPACK_OBJECT_STR)
        return sp_errf(err, SP_BAD_REQUEST, "'slot' must be a slot handle string (got %s)",
                       handle ? sp_type_name(handle) : "nothing");
    struct slot *s;
    if (sched_resolve(c, handle->via.str.ptr, handle->via.str.size, &s, err) < 0)
        return -1;
    if (stateful)
        return stateful_start(c, t, client_id, b, item, s, tn, tnl, args, timeout_ms, err);
    return start_tool(c, t, client_id, b, item, s, tool, args, timeout_ms, err);
}

/* ---- ops ----------------------------------------------------------------- */

struct op {
    const char *name;
    void (*fn)(struct ctl *c, struct tconn *t, const struct sp_request *req);
    bool open; /* allowed before authentication */
};

static void reply_err(struct ctl *c, struct tconn *t, uint64_t id, const struct sp_err *e)
{
    tconn_error(c, t, id, e);
}

/* An owner names a trainer in logs and listings: 1..CTL_OWNER_MAX
 * printable bytes. */
static int get_owner(const msgpack_object *args, const char **o, size_t *n, struct sp_err *e)
{
    const msgpack_object *v = args ? sp_map_get(args, "owner") : NULL;
    if (!v || v->type == MSGPACK_OBJECT_NIL)
        return 0;
    if (v->type != MSGPACK_OBJECT_STR)
        return sp_errf(e, SP_BAD_REQUEST, "'owner' must be a string (got %s)", sp_type_name(v));
    *o = v->via.str.ptr;
    *n = v->via.str.size;
    if (*n == 0 || *n > CTL_OWNER_MAX)
        return sp_errf(e, SP_BAD_REQUEST, "'owner' must be 1..%d bytes (got %zu)", CTL_OWNER_MAX,
                       *n);
    for (size_t i = 0; i < *n; i++)
        if ((unsigned char)(*o)[i] < 0x20 || (*o)[i] == 0x7f)
            return sp_errf(e, SP_BAD_REQUEST,
                           "'owner' must not contain NUL or control characters (byte %zu)", i);
    return 1;
}

static void op_hello(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    const char *tok = NULL, *owner = NULL;
    size_t tl = 0, ol = 0;
    if (req->args && (sp_get_str(req->args, "token", false, &tok, &tl, &e) < 0 ||
                      get_owner(req->args, &owner, &ol, &e) < 0))
        return reply_err(c, t, req->id, &e);
    if (c->token_len && tok) {
        unsigned char diff = tl != c->token_len;
        for (size_t i = 0; i < tl && i < c->token_len; i++)
            diff |= (unsigned char)(tok[i] ^ c->token[i]);
        if (diff) {
            sp_errf(&e, SP_UNAUTHORIZED, "wrong token");
            return reply_err(c, t, req->id, &e);
        }
        t->authed = true;
    }
    /* Only a connection that may use leases may keep them alive. */
    if (owner && t->authed && !sp_str_eq(owner, ol, t->owner)) {
        char old[CTL_OWNER_MAX + 1];
        memcpy(old, t->owner, sizeof old);
        memcpy(t->owner, owner, ol);
        t->owner[ol] = 0;
        sched_owner_gone(c, old);
        sched_owner_back(c, t->owner);
        log_debug("trainer connection %d: owner '%s'", t->fd, t->owner);
    }
    uint32_t np = 0;
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    np++;
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 10);
    sp_pack_kv_uint(&pk, "protocol", SP_PROTOCOL_VERSION);
    sp_pack_kv_str(&pk, "server", "slot-controller");
    sp_pack_kv_str(&pk, "version", CTL_VERSION);
    sp_pack_kv_str(&pk, "name", c->name);
    sp_pack_kv_uint(&pk, "instance", c->instance);
    sp_pack_cstr(&pk, "profiles");
    msgpack_pack_array(&pk, np);
    TAILQ_FOREACH(p, &c->profiles, link)
    sp_pack_cstr(&pk, p->name);
    sp_pack_kv_str(&pk, "default_profile", c->default_profile);
    sp_pack_kv_bool(&pk, "authenticated", t->authed);
    sp_pack_kv_bool(&pk, "auth_required", c->token_len > 0);
    sp_pack_kv_str(&pk, "owner", t->owner);
    tconn_end(c, t);
}

static int find_profile(struct ctl *c, const msgpack_object *args, struct profile **out, bool any,
                        struct sp_err *e)
{
    const char *pn = NULL;
    size_t pl = 0;
    if (args && sp_get_str(args, "profile", false, &pn, &pl, e) < 0)
        return -1;
    if (!pn) {
        *out = any ? NULL : profile_find(c, c->default_profile, strlen(c->default_profile));
        return 0;
    }
    *out = profile_find(c, pn, pl);
    if (*out)
        return 0;
    char names[512];
    size_t o = 0;
    struct profile *p;
    names[0] = 0;
    TAILQ_FOREACH(p, &c->profiles, link)
    o += (size_t)snprintf(names + o, o < sizeof names ? sizeof names - o : 0, "%s%s", o ? ", " : "",
                          p->name);
    return sp_errf(e, SP_BAD_REQUEST, "unknown profile '%.*s' (profiles: %s)",
                   (int)(pl > 64 ? 64 : pl), pn, names);
}

static int get_handle(struct ctl *c, const struct sp_request *req, struct slot **s,
                      struct sp_err *e);

static void op_acquire(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    const char *traj = NULL;
    size_t tl = 0;
    uint64_t timeout = 0;
    struct profile *p;
    int has_to = 0;
    bool bind = true;
    if (sp_get_str(req->args, "trajectory_id", false, &traj, &tl, &e) < 0 ||
        (has_to = sp_get_uint(req->args, "timeout_ms", false, &timeout, &e)) < 0 ||
        sp_get_bool(req->args, "bind", false, &bind, &e) < 0 ||
        find_profile(c, req->args, &p, false, &e) < 0)
        return reply_err(c, t, req->id, &e);
    if (traj && (tl == 0 || tl > CTL_TRAJ_MAX || memchr(traj, 0, tl))) {
        sp_errf(&e, SP_BAD_REQUEST, "'trajectory_id' must be 1..%d bytes without NUL",
                CTL_TRAJ_MAX);
        return reply_err(c, t, req->id, &e);
    }
    if (timeout > MAX_TIMEOUT_MS) {
        sp_errf(&e, SP_BAD_REQUEST, "'timeout_ms' above %llu", MAX_TIMEOUT_MS);
        return reply_err(c, t, req->id, &e);
    }
    /* template: a name, or {name, script, base}: the recipe that builds it
     * on an agent that does not hold it yet. */
    const msgpack_object *tpl = sp_map_get(req->args, "template");
    const char *name = NULL, *script = NULL, *base = NULL;
    size_t nl = 0, sl = 0, bl = 0;
    if (tpl && tpl->type == MSGPACK_OBJECT_MAP) {
        if (sp_get_str(tpl, "name", true, &name, &nl, &e) < 0 ||
            sp_get_str(tpl, "script", false, &script, &sl, &e) < 0 ||
            sp_get_str(tpl, "base", false, &base, &bl, &e) < 0)
            return reply_err(c, t, req->id, &e);
        for (uint32_t i = 0; i < tpl->via.map.size; i++) {
            const msgpack_object *k = &tpl->via.map.ptr[i].key;
            if (k->type != MSGPACK_OBJECT_STR ||
                !(sp_str_eq(k->via.str.ptr, k->via.str.size, "name") ||
                  sp_str_eq(k->via.str.ptr, k->via.str.size, "script") ||
                  sp_str_eq(k->via.str.ptr, k->via.str.size, "base"))) {
                sp_errf(&e, SP_BAD_REQUEST, "'template': unknown key (name, script, base)");
                return reply_err(c, t, req->id, &e);
            }
        }
    } else if (tpl && tpl->type != MSGPACK_OBJECT_NIL &&
               sp_get_str(req->args, "template", false, &name, &nl, &e) < 0) {
        sp_errf(&e, SP_BAD_REQUEST, "'template': a name or {name, script, base}");
        return reply_err(c, t, req->id, &e);
    }
    if ((name && (nl == 0 || nl > CTL_TPL_MAX || memchr(name, 0, nl))) ||
        (base && (bl == 0 || bl > CTL_TPL_MAX || memchr(base, 0, bl))) ||
        (script && memchr(script, 0, sl))) {
        sp_errf(&e, SP_BAD_REQUEST, "'template': names are 1..%d bytes, nothing with NUL",
                CTL_TPL_MAX);
        return reply_err(c, t, req->id, &e);
    }
    struct waiter *w = sched_waiter_new(c, t, req->id, p, traj, tl, bind);
    if (name)
        memcpy(w->tpl, name, nl);
    if (base)
        memcpy(w->tpl_base, base, bl);
    if (script && !(w->tpl_script = strndup(script, sl)))
        abort();
    sched_acquire_w(c, w, has_to ? timeout : p->acquire_timeout_ms);
}

/* fork {slot, trajectory_id?}: a new lease on the same agent whose
 * workspace is a copy-on-write copy of slot's as it is now. */
static void op_fork(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct slot *s;
    const char *traj = NULL;
    size_t tl = 0;
    if (sp_get_str(req->args, "trajectory_id", false, &traj, &tl, &e) < 0 ||
        get_handle(c, req, &s, &e) < 0)
        return reply_err(c, t, req->id, &e);
    if (traj && (tl == 0 || tl > CTL_TRAJ_MAX || memchr(traj, 0, tl))) {
        sp_errf(&e, SP_BAD_REQUEST, "'trajectory_id' must be 1..%d bytes without NUL",
                CTL_TRAJ_MAX);
        return reply_err(c, t, req->id, &e);
    }
    sched_fork(c, t, req->id, s, traj, tl);
}

static void op_templates(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct profile *p = NULL;
    if (sp_map_get(req->args, "profile") && find_profile(c, req->args, &p, false, &e) < 0)
        return reply_err(c, t, req->id, &e);
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    tpl_pack_all(c, &pk, p);
    tconn_end(c, t);
}

static int get_handle(struct ctl *c, const struct sp_request *req, struct slot **s,
                      struct sp_err *e)
{
    const char *h;
    size_t hl;
    if (sp_get_str(req->args, "slot", true, &h, &hl, e) < 0)
        return -1;
    return sched_resolve(c, h, hl, s, e);
}

static void op_release(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct slot *s;
    bool reset = true;
    if (sp_get_bool(req->args, "reset", false, &reset, &e) < 0 || get_handle(c, req, &s, &e) < 0)
        return reply_err(c, t, req->id, &e);
    char h[160];
    slot_handle(s, h, sizeof h);
    sched_release(c, s, reset);
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_str(&pk, "slot", h);
    sp_pack_kv_bool(&pk, "reset", reset);
    tconn_end(c, t);
}

static void op_exec(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    const char *tn = "bash";
    size_t tnl = 4;
    const msgpack_object *args = NULL;
    uint64_t timeout = 0;
    if (sp_get_str(req->args, "tool", false, &tn, &tnl, &e) < 0 ||
        sp_get_map(req->args, "args", false, &args, &e) < 0 ||
        sp_get_uint(req->args, "timeout_ms", false, &timeout, &e) < 0)
        return reply_err(c, t, req->id, &e);
    if (start_call(c, t, req->id, NULL, 0, sp_map_get(req->args, "slot"), tn, tnl, args, timeout,
                   &e) < 0)
        reply_err(c, t, req->id, &e);
}

/* read_artifact, list_artifacts, archive_artifacts: the request's own
 * args are the tool args. */
static void op_artifact(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    if (start_call(c, t, req->id, NULL, 0, sp_map_get(req->args, "slot"), req->op, req->op_len,
                   req->args, 0, &e) < 0)
        reply_err(c, t, req->id, &e);
}

static void op_batch(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    const msgpack_object *reqs;
    uint64_t timeout = 0;
    if (sp_get_array(req->args, "requests", true, &reqs, &e) < 0 ||
        sp_get_uint(req->args, "timeout_ms", false, &timeout, &e) < 0)
        return reply_err(c, t, req->id, &e);
    uint32_t n = reqs->via.array.size;
    if (n > CTL_MAX_BATCH) {
        sp_errf(&e, SP_TOO_LARGE, "%u requests in one batch (max %d)", n, CTL_MAX_BATCH);
        return reply_err(c, t, req->id, &e);
    }
    struct batch *b = calloc(1, sizeof *b);
    b->items = calloc(n ? n : 1, sizeof *b->items);
    if (!b || !b->items)
        abort();
    b->conn = t;
    b->client_id = req->id;
    b->n = n;
    b->remaining = n + 1; /* held until every request is sent */
    for (uint32_t i = 0; i < n; i++)
        msgpack_sbuffer_init(&b->items[i]);
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *it = &reqs->via.array.ptr[i], *args = NULL;
        const char *tn = "bash";
        size_t tnl = 4;
        uint64_t to = timeout;
        if (it->type != MSGPACK_OBJECT_MAP) {
            sp_errf(&e, SP_BAD_REQUEST, "request %u is a %s, not a map", i, sp_type_name(it));
            batch_item_done(c, b, i, NULL, SHAPE_PASS, &e);
            continue;
        }
        if (sp_get_str(it, "tool", false, &tn, &tnl, &e) < 0 ||
            sp_get_map(it, "args", false, &args, &e) < 0 ||
            sp_get_uint(it, "timeout_ms", false, &to, &e) < 0) {
            batch_item_done(c, b, i, NULL, SHAPE_PASS, &e);
            continue;
        }
        if (start_call(c, t, req->id, b, i, sp_map_get(it, "slot"), tn, tnl, args, to, &e) < 0)
            batch_item_done(c, b, i, NULL, SHAPE_PASS, &e);
    }
    /* Drop the hold; this answers an empty or all-failed batch. */
    batch_release(c, b);
}

/* ---- introspection ------------------------------------------------------- */

struct counts {
    uint32_t starting, ready, draining, reconnecting, agents;
    uint32_t slots, nfree, leased, executing;
};

static void count_profile(const struct profile *p, struct counts *k)
{
    const struct agent *ag;
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        if (ag->state == AG_STOPPING)
            continue;
        k->agents++;
        if (ag->state == AG_STARTING) {
            k->starting++;
            continue;
        }
        if (ag->state == AG_READY)
            k->ready++;
        else if (ag->state == AG_RECONNECTING)
            k->reconnecting++;
        else
            k->draining++;
        k->slots += ag->nslots;
        k->nfree += ag->state == AG_READY ? ag->nfree : 0;
        k->leased += ag->leased;
        k->executing += ag->executing;
    }
}

static void pack_counts(msgpack_packer *pk, const struct counts *k, uint32_t waiters)
{
    sp_pack_cstr(pk, "agents");
    msgpack_pack_map(pk, 5);
    sp_pack_kv_uint(pk, "starting", k->starting);
    sp_pack_kv_uint(pk, "ready", k->ready);
    sp_pack_kv_uint(pk, "draining", k->draining);
    sp_pack_kv_uint(pk, "reconnecting", k->reconnecting);
    sp_pack_kv_uint(pk, "total", k->agents);
    sp_pack_cstr(pk, "slots");
    msgpack_pack_map(pk, 4);
    sp_pack_kv_uint(pk, "total", k->slots);
    sp_pack_kv_uint(pk, "free", k->nfree);
    sp_pack_kv_uint(pk, "leased", k->leased);
    sp_pack_kv_uint(pk, "executing", k->executing);
    sp_pack_kv_uint(pk, "waiters", waiters);
}

static void pack_lat(struct ctl *c, msgpack_packer *pk, const struct latency *l)
{
    sp_pack_cstr(pk, "exec");
    msgpack_pack_map(pk, 6);
    sp_pack_kv_uint(pk, "total", l->total);
    sp_pack_kv_uint(pk, "errors", l->errors);
    sp_pack_cstr(pk, "rate");
    msgpack_pack_double(pk, lat_rate(l, ev_now(c->loop)));
    sp_pack_kv_uint(pk, "p50_us", lat_pct(l, 0.50));
    sp_pack_kv_uint(pk, "p90_us", lat_pct(l, 0.90));
    sp_pack_kv_uint(pk, "p99_us", lat_pct(l, 0.99));
}

static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, res = 0;
    if (f) {
        if (fscanf(f, "%lu %lu", &size, &res) != 2)
            res = 0;
        fclose(f);
    }
    return (uint64_t)res * (uint64_t)sysconf(_SC_PAGESIZE);
}

static void op_status(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct profile *only, *p;
    if (find_profile(c, req->args, &only, true, &e) < 0)
        return reply_err(c, t, req->id, &e);
    struct counts all = {0};
    uint32_t waiters = 0, np = 0;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        if (only && p != only)
            continue;
        count_profile(p, &all);
        waiters += p->nwaiters;
        np++;
    }
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 10);
    sp_pack_kv_str(&pk, "name", c->name);
    sp_pack_kv_uint(&pk, "uptime_ms", (uint64_t)((ev_now(c->loop) - c->started) * 1000));
    sp_pack_kv_uint(&pk, "connections", c->nconns);
    sp_pack_kv_uint(&pk, "rss_bytes", rss_bytes());
    pack_counts(&pk, &all, waiters);
    pack_lat(c, &pk, only ? &only->lat : &c->lat);
    sp_pack_cstr(&pk, "acquire");
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "total", only ? only->acquires : c->acquires);
    sp_pack_kv_uint(&pk, "no_capacity", only ? only->no_capacity : c->no_capacity);
    sp_pack_cstr(&pk, "profiles");
    msgpack_pack_map(&pk, np);
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        if (only && p != only)
            continue;
        struct counts k = {0};
        count_profile(p, &k);
        sp_pack_cstr(&pk, p->name);
        msgpack_pack_map(&pk, 5);
        pack_counts(&pk, &k, p->nwaiters);
        pack_lat(c, &pk, &p->lat);
        sp_pack_kv_str(&pk, "last_error", p->last_error);
    }
    tconn_end(c, t);
}

static void op_profiles(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct profile *p;
    uint32_t np = 0;
    TAILQ_FOREACH(p, &c->profiles, link)
    np++;
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 1);
    sp_pack_cstr(&pk, "profiles");
    msgpack_pack_array(&pk, np);
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        struct counts k = {0};
        count_profile(p, &k);
        msgpack_pack_map(&pk, profile_pack_fields(p, &pk, true) + 4);
        profile_pack_fields(p, &pk, false);
        pack_counts(&pk, &k, p->nwaiters);
        sp_pack_kv_str(&pk, "last_error", p->last_error);
    }
    tconn_end(c, t);
}

static void op_agents(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct profile *only, *p;
    if (find_profile(c, req->args, &only, true, &e) < 0)
        return reply_err(c, t, req->id, &e);
    uint32_t n = 0;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    if (!only || p == only)
        TAILQ_FOREACH(ag, &p->agents, link)
    n++;
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    uint32_t nf = 0;
    TAILQ_FOREACH(p, &c->profiles, link)
    if (!only || p == only)
        nf += p->nfailed < CTL_FAILED_KEEP ? p->nfailed : CTL_FAILED_KEEP;
    msgpack_pack_map(&pk, 2);
    /* The last agents that failed to start or were lost, with what their
     * launcher said: agents that are gone leave no other trace. */
    sp_pack_cstr(&pk, "failed");
    msgpack_pack_array(&pk, nf);
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        if (only && p != only)
            continue;
        uint32_t have = p->nfailed < CTL_FAILED_KEEP ? p->nfailed : CTL_FAILED_KEEP;
        for (uint32_t i = 0; i < have; i++) {
            uint32_t k = (p->nfailed - have + i) % CTL_FAILED_KEEP;
            msgpack_pack_map(&pk, 3);
            sp_pack_kv_str(&pk, "profile", p->name);
            sp_pack_kv_str(&pk, "error", p->failed[k].why);
            sp_pack_kv_uint(&pk, "at", (uint64_t)p->failed[k].at_ms);
        }
    }
    sp_pack_cstr(&pk, "agents");
    msgpack_pack_array(&pk, n);
    double now = ev_now(c->loop), wall = now_wall_ms();
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        if (only && p != only)
            continue;
        TAILQ_FOREACH(ag, &p->agents, link)
        {
            char tail[CTL_STDERR_TAIL];
            agent_stderr_tail(ag, tail, sizeof tail, 5);
            msgpack_pack_map(&pk, 20);
            sp_pack_kv_str(&pk, "id", ag->id);
            sp_pack_kv_str(&pk, "profile", p->name);
            sp_pack_kv_str(&pk, "state", agent_state_name(ag->state));
            sp_pack_kv_int(&pk, "pid", ag->pid);
            sp_pack_kv_str(&pk, "address", ag->address);
            sp_pack_kv_uint(&pk, "instance", ag->instance);
            sp_pack_kv_uint(&pk, "slots", ag->nslots);
            sp_pack_kv_uint(&pk, "leased", ag->leased);
            sp_pack_kv_uint(&pk, "executing", ag->executing);
            sp_pack_kv_uint(&pk, "started_at", (uint64_t)(wall - (now - ag->started_at) * 1000));
            sp_pack_kv_uint(&pk, "age_ms", (uint64_t)((now - ag->started_at) * 1000));
            sp_pack_kv_uint(&pk, "requests", ag->requests);
            if (*ag->error)
                sp_pack_kv_str(&pk, "error", ag->error);
            else
                sp_pack_kv_nil(&pk, "error");
            sp_pack_kv_str(&pk, "stderr", tail);
            sp_pack_kv_bool(&pk, "reattached", ag->reattached);
            /* Its links: how often one was re-opened, why the last ended,
             * how long the last reconnect took or this one has taken. */
            sp_pack_kv_uint(&pk, "reconnects", ag->reconnects);
            if (*ag->link_cause)
                sp_pack_kv_str(&pk, "link_cause", ag->link_cause);
            else
                sp_pack_kv_nil(&pk, "link_cause");
            sp_pack_kv_uint(&pk, "reconnect_ms",
                            (uint64_t)(ag->state == AG_RECONNECTING
                                           ? (now - ag->relink_since) * 1000
                                           : ag->relink_last_ms));
            sp_pack_kv_uint(&pk, "reconnect_attempts", ag->relink_attempts);
            /* The certificate the controller issued to it (tls_ca.c): its
             * notAfter, Unix seconds; nil when none. */
            if (ag->tls_not_after)
                sp_pack_kv_uint(&pk, "tls_not_after", (uint64_t)ag->tls_not_after);
            else
                sp_pack_kv_nil(&pk, "tls_not_after");
        }
    }
    tconn_end(c, t);
}

static const char *slot_state_name(enum slot_state s)
{
    static const char *const n[] = {"free",      "leasing",     "leased",
                                    "releasing", "unavailable", "building"};
    return n[s];
}

static void op_slots(struct ctl *c, struct tconn *t, const struct sp_request *req, bool leases)
{
    struct sp_err e;
    struct profile *only, *p;
    const char *aid = NULL;
    size_t al = 0;
    if (find_profile(c, req->args, &only, true, &e) < 0 ||
        sp_get_str(req->args, "agent", false, &aid, &al, &e) < 0)
        return reply_err(c, t, req->id, &e);
    uint32_t n = 0;
    struct agent *ag;
    double now = ev_now(c->loop), wall = now_wall_ms();
    for (int pass = 0; pass < 2; pass++) {
        msgpack_packer pk;
        if (pass == 1) {
            tconn_begin(t, &pk);
            sp_pack_ok_head(&pk, req->id);
            msgpack_pack_map(&pk, 1);
            sp_pack_cstr(&pk, leases ? "leases" : "slots");
            msgpack_pack_array(&pk, n);
        }
        TAILQ_FOREACH(p, &c->profiles, link)
        {
            if (only && p != only)
                continue;
            TAILQ_FOREACH(ag, &p->agents, link)
            {
                if (ag->state == AG_STARTING || ag->state == AG_STOPPING ||
                    (aid && !sp_str_eq(aid, al, ag->id)))
                    continue;
                for (uint32_t i = 0; i < ag->nslots; i++) {
                    struct slot *s = &ag->slots[i];
                    bool held = s->state == SL_LEASED;
                    if (leases && !held)
                        continue;
                    if (pass == 0) {
                        n++;
                        continue;
                    }
                    char h[160];
                    slot_handle(s, h, sizeof h);
                    bool grace = held && s->grace_until;
                    msgpack_pack_map(&pk, (leases ? 11 : 10) + grace);
                    if (leases)
                        sp_pack_kv_uint(&pk, "last_used",
                                        (uint64_t)(wall - (now - s->last_used) * 1000));
                    sp_pack_kv_str(&pk, "agent", ag->id);
                    sp_pack_kv_uint(&pk, "index", i);
                    sp_pack_kv_str(&pk, "profile", p->name);
                    if (held)
                        sp_pack_kv_str(&pk, "slot", h);
                    else
                        sp_pack_kv_nil(&pk, "slot");
                    if (leases)
                        sp_pack_kv_uint(&pk, "generation", s->generation);
                    else
                        sp_pack_kv_str(&pk, "state", slot_state_name(s->state));
                    if (held)
                        sp_pack_kv_str(&pk, "trajectory_id", s->traj);
                    else
                        sp_pack_kv_nil(&pk, "trajectory_id");
                    sp_pack_kv_uint(&pk, "executing", s->inflight);
                    sp_pack_kv_uint(&pk, "leased_at", s->leased_at_ms);
                    if (held && s->owner[0])
                        sp_pack_kv_str(&pk, "owner", s->owner);
                    else
                        sp_pack_kv_nil(&pk, "owner");
                    sp_pack_kv_bool(&pk, "bound", held && s->bound);
                    if (grace) {
                        double left = (s->grace_until - now) * 1000;
                        sp_pack_kv_uint(&pk, "grace_left_ms", left > 0 ? (uint64_t)left : 0);
                    }
                }
            }
        }
        if (pass == 1)
            tconn_end(c, t);
    }
}

static void op_slots_(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    op_slots(c, t, req, false);
}

static void op_leases(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    op_slots(c, t, req, true);
}

/* The live agent the `agent` argument names; NULL when answered here. */
static struct agent *arg_agent(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    const char *aid;
    size_t al;
    if (sp_get_str(req->args, "agent", true, &aid, &al, &e) < 0) {
        reply_err(c, t, req->id, &e);
        return NULL;
    }
    struct agent *ag = agent_find(c, aid, al);
    if (!ag || ag->state == AG_STOPPING) {
        sp_errf(&e, SP_NOT_FOUND, "no agent '%.*s'", (int)(al > 80 ? 80 : al), aid);
        reply_err(c, t, req->id, &e);
        return NULL;
    }
    return ag;
}

static void op_drain(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct agent *ag = arg_agent(c, t, req);
    if (!ag)
        return;
    if (ag->state == AG_RECONNECTING && ag->relink_prev == AG_READY) {
        log_info("agent %s: draining on request (once it is reconnected)", ag->id);
        ag->relink_prev = AG_DRAINING;
    }
    if (ag->state == AG_READY || ag->state == AG_STARTING) {
        log_info("agent %s: draining on request", ag->id);
        ag->state = ag->state == AG_STARTING ? AG_STARTING : AG_DRAINING;
        if (ag->state == AG_STARTING)
            agent_stop(c, ag, "drained while starting");
    }
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 3);
    sp_pack_kv_str(&pk, "agent", ag->id);
    sp_pack_kv_str(&pk, "state", agent_state_name(ag->state));
    sp_pack_kv_uint(&pk, "leased", ag->leased);
    tconn_end(c, t);
    sched_kick(c, ag->prof);
}

/* `reconnect`: end an agent's stream as a network would; it is opened
 * again and what was in flight resumes (operators: a link that looks stuck;
 * tests: a drop at a chosen moment). */
static void op_reconnect(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    struct agent *ag = arg_agent(c, t, req);
    if (!ag)
        return;
    if (agent_drop_stream(c, ag, &e) < 0)
        return reply_err(c, t, req->id, &e);
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_str(&pk, "agent", ag->id);
    sp_pack_kv_uint(&pk, "reconnects", ag->reconnects);
    tconn_end(c, t);
}

/* `stop`: every agent goes, also those of backends that outlive the
 * controller, then the controller exits. The asking connection stays open
 * until then, so its EOF tells the caller that the stop is complete. */
static void op_stop(struct ctl *c, struct tconn *t, const struct sp_request *req)
{
    struct sp_err e;
    bool purge = false;
    if (sp_get_bool(req->args, "purge", false, &purge, &e) < 0)
        return reply_err(c, t, req->id, &e);
    uint32_t n = 0, leased = 0;
    struct profile *p;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        n++;
        leased += ag->leased;
    }
    log_info("stop requested%s: %u agents (%u leased slots) go", purge ? " with purge" : "", n,
             leased);
    msgpack_packer pk;
    tconn_begin(t, &pk);
    sp_pack_ok_head(&pk, req->id);
    msgpack_pack_map(&pk, 3);
    sp_pack_kv_uint(&pk, "agents", n);
    sp_pack_kv_uint(&pk, "leased", leased);
    sp_pack_kv_bool(&pk, "purge", purge);
    tconn_end(c, t);
    if (c->stopping)
        return;
    c->purge = purge;
    c->stop_conn = t;
    ctl_shutdown(c, true);
}

static const struct op ops[] = {
    {"hello", op_hello, true},
    {"acquire", op_acquire, false},
    {"fork", op_fork, false},
    {"templates", op_templates, false},
    {"release", op_release, false},
    {"exec", op_exec, false},
    {"batch", op_batch, false},
    {"read_artifact", op_artifact, false},
    {"list_artifacts", op_artifact, false},
    {"archive_artifacts", op_artifact, false},
    {"status", op_status, false},
    {"profiles", op_profiles, false},
    {"agents", op_agents, false},
    {"slots", op_slots_, false},
    {"leases", op_leases, false},
    {"drain", op_drain, false},
    {"reconnect", op_reconnect, false},
    {"stop", op_stop, false},
};

void api_dispatch(struct ctl *c, struct tconn *t, const char *data, uint32_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err e;
    struct sp_request req = {0};
    if (sp_unpack(data, len, &u, &e) < 0 || sp_parse_request(&u.data, &req, &e) < 0) {
        reply_err(c, t, req.id, &e);
        goto out;
    }
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        if (!sp_str_eq(req.op, req.op_len, ops[i].name))
            continue;
        if (!ops[i].open && !t->authed) {
            sp_errf(&e, SP_UNAUTHORIZED, "send hello with the token first");
            reply_err(c, t, req.id, &e);
        } else
            ops[i].fn(c, t, &req);
        goto out;
    }
    sp_errf(&e, SP_UNKNOWN_OP, "unknown op '%.*s'", (int)(req.op_len > 64 ? 64 : req.op_len),
            req.op);
    reply_err(c, t, req.id, &e);
out:
    msgpack_unpacked_destroy(&u);
}
