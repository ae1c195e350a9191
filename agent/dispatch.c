/* The op table and the single place every request passes through: decoding,
 * authentication, argument validation against each op's schema, per-slot
 * queueing, reply helpers, and per-op counters and latency for `stats`. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent.h"
#include "idem.h"
#include "session.h" /* op_session_log */
#include "template.h"

#define MAX_TIMEOUT_MS 86400000u

static const struct arg_spec args_none[] = {{NULL}};
static const struct arg_spec args_hello[] = {
    {"token", ARG_STR, false, 4096},
    {"client", ARG_STR, false, 256},
    {NULL},
};
static const struct arg_spec args_tls_renew[] = {
    {"cert", ARG_BIN, true, 1u << 20},
    {"key", ARG_BIN, true, 1u << 16},
    {NULL},
};
static const struct arg_spec args_slots[] = {{"slot", ARG_UINT, false, 0}, {NULL}};
static const struct arg_spec args_reset[] = {
    {"slot", ARG_UINT, true, 0},
    {"template", ARG_STR, false, 256},
    {NULL},
};
static const struct arg_spec args_template_put[] = {
    {"name", ARG_STR, true, 256},
    {"data", ARG_BIN, true, 0},
    {"offset", ARG_UINT, false, 0},
    {"done", ARG_BOOL, false, 0},
    {"format", ARG_STR, false, 16},
    {"base", ARG_STR, false, 256},
    {NULL},
};
static const struct arg_spec args_template_from_slot[] = {
    {"slot", ARG_UINT, true, 0},
    {"name", ARG_STR, true, 256},
    {NULL},
};
static const struct arg_spec args_template_name[] = {{"name", ARG_STR, true, 256}, {NULL}};
static const struct arg_spec args_template_list[] = {{"name", ARG_STR, false, 256}, {NULL}};
static const struct arg_spec args_template_build[] = {
    {"name", ARG_STR, true, 256},    {"slot", ARG_UINT, false, 0},
    {"base", ARG_STR, false, 256},   {"script", ARG_STR, true, 1u << 20},
    {"env", ARG_MAP, false, 1024},   {"timeout_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {"network", ARG_BOOL, false, 0}, {"isolation", ARG_STR, false, 32},
    {"rlimits", ARG_MAP, false, 8},  {NULL},
};
static const struct arg_spec args_fork[] = {
    {"slot", ARG_UINT, true, 0},
    {"to_slot", ARG_UINT, true, 0},
    {NULL},
};
static const struct arg_spec args_lease[] = {
    {"slot", ARG_UINT, true, 0},
    {"trajectory_id", ARG_STR, true, 256},
    {"holder", ARG_STR, false, 256},
    {"owner", ARG_STR, false, 256},
    {"bound", ARG_BOOL, false, 0},
    {"template", ARG_STR, false, 256},
    {NULL},
};
static const struct arg_spec args_unlease[] = {
    {"slot", ARG_UINT, true, 0},
    {"trajectory_id", ARG_STR, false, 256},
    {NULL},
};
static const struct arg_spec args_exec[] = {
    {"slot", ARG_UINT, true, 0},
    {"cmd", ARG_STR, false, 1u << 20},
    {"argv", ARG_ARRAY, false, 4096},
    {"env", ARG_MAP, false, 1024},
    {"stdin", ARG_BIN, false, 0},
    {"cwd", ARG_STR, false, 4095},
    {"timeout_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {"idle_timeout_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {"max_output", ARG_UINT, false, 0},
    {"stream", ARG_BOOL, false, 0},
    {"detach", ARG_BOOL, false, 0},
    {"network", ARG_BOOL, false, 0},
    {"isolation", ARG_STR, false, 32},
    {"rlimits", ARG_MAP, false, 8},
    {"keep_background", ARG_BOOL, false, 0},
    {NULL},
};
static const struct arg_spec args_exec_attach[] = {
    {"exec_id", ARG_UINT, true, 0},
    {"offset", ARG_UINT, false, 0},
    {"stderr_offset", ARG_UINT, false, 0},
    {NULL},
};
static const struct arg_spec args_cancel[] = {
    {"exec_id", ARG_UINT, false, 0},
    {"slot", ARG_UINT, false, 0},
    {NULL},
};
static const struct arg_spec args_read_file[] = {
    {"slot", ARG_UINT, true, 0},    {"path", ARG_STR, true, 4095},  {"offset", ARG_UINT, false, 0},
    {"length", ARG_UINT, false, 0}, {"sha256", ARG_BOOL, false, 0}, {NULL},
};
static const struct arg_spec args_write_file[] = {
    {"slot", ARG_UINT, true, 0},
    {"path", ARG_STR, true, 4095},
    {"data", ARG_BIN, true, 0},
    {"mode", ARG_UINT, false, 07777},
    {"mkdirs", ARG_BOOL, false, 0},
    {"append", ARG_BOOL, false, 0},
    {NULL},
};
static const struct arg_spec args_stat[] = {
    {"slot", ARG_UINT, true, 0},
    {"path", ARG_STR, true, 4095},
    {NULL},
};
static const struct arg_spec args_list[] = {
    {"slot", ARG_UINT, true, 0},
    {"path", ARG_STR, false, 4095},
    {"recursive", ARG_BOOL, false, 0},
    {"max_entries", ARG_UINT, false, 1000000},
    {NULL},
};
static const struct arg_spec args_archive[] = {
    {"slot", ARG_UINT, true, 0},         {"path", ARG_STR, false, 4095},
    {"format", ARG_STR, false, 16},      {"max_bytes", ARG_UINT, false, 0},
    {"max_entries", ARG_UINT, false, 0}, {NULL},
};

static const struct arg_spec args_session_open[] = {
    {"slot", ARG_UINT, true, 0},     {"pty", ARG_BOOL, false, 0},
    {"cols", ARG_UINT, false, 1000}, {"rows", ARG_UINT, false, 1000},
    {"shell", ARG_STR, false, 4095}, {"env", ARG_MAP, false, 1024},
    {"cwd", ARG_STR, false, 4095},   {"network", ARG_BOOL, false, 0},
    {"tag", ARG_STR, false, 64},     {"isolation", ARG_STR, false, 32},
    {"rlimits", ARG_MAP, false, 8},  {NULL},
};
static const struct arg_spec args_session_exec[] = {
    {"session", ARG_UINT, true, 0},     {"slot", ARG_UINT, false, 0},
    {"cmd", ARG_STR, true, 1u << 20},   {"timeout_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {"max_output", ARG_UINT, false, 0}, {NULL},
};
static const struct arg_spec args_session_write[] = {
    {"session", ARG_UINT, true, 0},
    {"slot", ARG_UINT, false, 0},
    {"data", ARG_BIN, true, 0},
    {"min_wait_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {"wait_prompt_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {NULL},
};
static const struct arg_spec args_session_screen[] = {
    {"session", ARG_UINT, true, 0},
    {"slot", ARG_UINT, false, 0},
    {"history", ARG_BOOL, false, 0},
    {NULL},
};
static const struct arg_spec args_session_log[] = {
    {"session", ARG_UINT, true, 0}, {"slot", ARG_UINT, false, 0},
    {"offset", ARG_UINT, false, 0}, {"max_bytes", ARG_UINT, false, 0},
    {"lines", ARG_BOOL, false, 0},  {NULL},
};
static const struct arg_spec args_session_read[] = {
    {"session", ARG_UINT, true, 0},
    {"slot", ARG_UINT, false, 0},
    {"max_bytes", ARG_UINT, false, 0},
    {"wait_ms", ARG_UINT, false, MAX_TIMEOUT_MS},
    {NULL},
};
static const struct arg_spec args_session_resize[] = {
    {"session", ARG_UINT, true, 0},
    {"slot", ARG_UINT, false, 0},
    {"cols", ARG_UINT, true, 1000},
    {"rows", ARG_UINT, true, 1000},
    {NULL},
};
static const struct arg_spec args_session_signal[] = {
    {"session", ARG_UINT, true, 0},
    {"slot", ARG_UINT, false, 0},
    {"signal", ARG_STR_UINT, true, 64},
    {NULL},
};
static const struct arg_spec args_session[] = {
    {"session", ARG_UINT, true, 0}, {"slot", ARG_UINT, false, 0}, {NULL}};

/* OPF_IDEM: ops whose effects must not happen twice remember a request's
 * `key` (idem.c); the others are safe to run again and ignore it.
 * session_read consumes what it returns, so it counts as one that changes
 * state. */
const struct op_def op_table[] = {
    {"hello", op_hello, OPF_NOAUTH, args_hello},
    {"health", op_health, 0, args_none},
    {"stats", op_stats, 0, args_none},
    {"slots", op_slots, 0, args_slots},
    {"lease", op_lease, OPF_SLOT | OPF_IDEM, args_lease},
    {"unlease", op_unlease, OPF_SLOT | OPF_IDEM, args_unlease},
    {"exec", op_exec, OPF_SLOT | OPF_IDEM, args_exec},
    {"exec_attach", op_exec_attach, 0, args_exec_attach},
    {"cancel", op_cancel, OPF_IDEM, args_cancel},
    {"read_file", op_read_file, OPF_SLOT | OPF_FSUSER, args_read_file},
    {"write_file", op_write_file, OPF_SLOT | OPF_FSUSER | OPF_IDEM, args_write_file},
    {"stat", op_stat, OPF_SLOT | OPF_FSUSER, args_stat},
    {"list", op_list, OPF_SLOT | OPF_FSUSER, args_list},
    {"archive", op_archive, OPF_SLOT | OPF_FSUSER, args_archive},
    {"reset", op_reset, OPF_SLOT | OPF_NOW | OPF_IDEM, args_reset},
    {"session_open", op_session_open, OPF_SLOT | OPF_IDEM, args_session_open},
    {"session_exec", op_session_exec, OPF_IDEM, args_session_exec},
    {"session_write", op_session_write, OPF_IDEM, args_session_write},
    {"session_read", op_session_read, OPF_IDEM, args_session_read},
    {"session_resize", op_session_resize, OPF_IDEM, args_session_resize},
    {"session_screen", op_session_screen, 0, args_session_screen},
    {"session_log", op_session_log, 0, args_session_log},
    {"session_signal", op_session_signal, OPF_IDEM, args_session_signal},
    {"session_close", op_session_close, OPF_IDEM, args_session},
    {"template_put", op_template_put, OPF_IDEM, args_template_put},
    {"template_from_slot", op_template_from_slot, OPF_SLOT | OPF_IDEM, args_template_from_slot},
    {"template_list", op_template_list, 0, args_template_list},
    {"template_delete", op_template_delete, OPF_IDEM, args_template_name},
    {"fork", op_fork, OPF_SLOT | OPF_IDEM, args_fork},
    {"template_build", op_template_build, OPF_IDEM, args_template_build},
    {"tls_renew", op_tls_renew, OPF_IDEM, args_tls_renew},
};
const unsigned op_count = sizeof op_table / sizeof op_table[0];

int op_index(const char *name)
{
    for (unsigned i = 0; i < op_count; i++)
        if (strcmp(op_table[i].name, name) == 0)
            return (int)i;
    return -1;
}

double agent_now(struct agent *ag)
{
    return ev_now(ag->loop);
}

double agent_now_precise(struct agent *ag)
{
    (void)ag;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- histogram ---------------------------------------------------------
 * Buckets: values below 64 us exactly, then 32 sub-buckets per power of two,
 * so every quantile is within ~3%. */

static unsigned hist_bucket(uint64_t us)
{
    if (us < 64)
        return (unsigned)us;
    unsigned lg = 63u - (unsigned)__builtin_clzll(us); /* >= 6 */
    unsigned sub = (unsigned)((us >> (lg - 5)) & 31u);
    unsigned b = 64 + (lg - 6) * 32 + sub;
    return b < HIST_BUCKETS ? b : HIST_BUCKETS - 1;
}

static uint64_t hist_value(unsigned b)
{
    if (b < 64)
        return b;
    unsigned lg = (b - 64) / 32 + 6, sub = (b - 64) % 32;
    return ((uint64_t)(32 + sub) << (lg - 5)) + ((uint64_t)1 << (lg - 5)) / 2;
}

void hist_add(struct hist *h, uint64_t us)
{
    h->count++;
    h->sum_us += us;
    h->bucket[hist_bucket(us)]++;
}

uint64_t hist_quantile(const struct hist *h, double q)
{
    if (h->count == 0)
        return 0;
    uint64_t want = (uint64_t)(q * (double)h->count);
    if (want >= h->count)
        want = h->count - 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < HIST_BUCKETS; b++) {
        seen += h->bucket[b];
        if (seen > want)
            return hist_value(b);
    }
    return hist_value(HIST_BUCKETS - 1);
}

/* ---- arguments ---------------------------------------------------------- */

const msgpack_object *req_arg(const struct req *rq, const char *key)
{
    if (!rq->args)
        return NULL;
    const msgpack_object *o = sp_map_get(rq->args, key);
    return (o && o->type != MSGPACK_OBJECT_NIL) ? o : NULL;
}

uint64_t arg_uint(const struct req *rq, const char *key, uint64_t def)
{
    const msgpack_object *o = req_arg(rq, key);
    return o ? o->via.u64 : def;
}

int64_t arg_int(const struct req *rq, const char *key, int64_t def)
{
    const msgpack_object *o = req_arg(rq, key);
    if (!o)
        return def;
    return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (int64_t)o->via.u64 : o->via.i64;
}

bool arg_bool(const struct req *rq, const char *key, bool def)
{
    const msgpack_object *o = req_arg(rq, key);
    return o ? o->via.boolean : def;
}

const char *arg_str(const struct req *rq, const char *key, size_t *n)
{
    const msgpack_object *o = req_arg(rq, key);
    if (!o) {
        *n = 0;
        return NULL;
    }
    *n = o->via.str.size;
    return o->via.str.ptr;
}

const char *arg_bin(const struct req *rq, const char *key, size_t *n)
{
    const msgpack_object *o = req_arg(rq, key);
    if (!o) {
        *n = 0;
        return NULL;
    }
    if (o->type == MSGPACK_OBJECT_BIN) {
        *n = o->via.bin.size;
        return o->via.bin.ptr;
    }
    *n = o->via.str.size;
    return o->via.str.ptr;
}

struct slot *req_slot(const struct req *rq)
{
    return rq->slot >= 0 ? &rq->ag->slots[rq->slot] : NULL;
}

static const char *arg_type_name(enum arg_type t)
{
    switch (t) {
    case ARG_UINT: return "unsigned integer";
    case ARG_INT: return "integer";
    case ARG_BOOL: return "bool";
    case ARG_STR: return "str";
    case ARG_BIN: return "bin";
    case ARG_MAP: return "map";
    case ARG_ARRAY: return "array";
    case ARG_STR_UINT: return "str or unsigned integer";
    }
    return "?";
}

static bool arg_type_ok(enum arg_type t, const msgpack_object *o)
{
    switch (t) {
    case ARG_UINT: return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
    case ARG_INT:
        return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ||
               o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER;
    case ARG_BOOL: return o->type == MSGPACK_OBJECT_BOOLEAN;
    case ARG_STR: return o->type == MSGPACK_OBJECT_STR;
    case ARG_BIN: return o->type == MSGPACK_OBJECT_BIN || o->type == MSGPACK_OBJECT_STR;
    case ARG_MAP: return o->type == MSGPACK_OBJECT_MAP;
    case ARG_ARRAY: return o->type == MSGPACK_OBJECT_ARRAY;
    case ARG_STR_UINT:
        return o->type == MSGPACK_OBJECT_STR || o->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
    }
    return false;
}

static uint64_t arg_len(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_STR: return o->via.str.size;
    case MSGPACK_OBJECT_BIN: return o->via.bin.size;
    case MSGPACK_OBJECT_ARRAY: return o->via.array.size;
    case MSGPACK_OBJECT_MAP: return o->via.map.size;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return o->via.u64;
    default: return 0;
    }
}

/* Schema check once, here, so handlers never re-validate types. */
static int validate_args(const struct op_def *op, const msgpack_object *args, struct sp_err *err)
{
    if (args) {
        for (uint32_t i = 0; i < args->via.map.size; i++) {
            const msgpack_object *k = &args->via.map.ptr[i].key;
            const msgpack_object *v = &args->via.map.ptr[i].val;
            if (k->type != MSGPACK_OBJECT_STR)
                return sp_errf(err, SP_BAD_REQUEST, "%s: argument keys must be strings", op->name);
            const struct arg_spec *sp = op->args;
            for (; sp->key; sp++)
                if (sp_str_eq(k->via.str.ptr, k->via.str.size, sp->key))
                    break;
            if (!sp->key)
                return sp_errf(err, SP_BAD_REQUEST, "%s: unknown argument '%.*s'", op->name,
                               (int)(k->via.str.size > 64 ? 64 : k->via.str.size), k->via.str.ptr);
            if (v->type == MSGPACK_OBJECT_NIL)
                continue;
            if (!arg_type_ok(sp->type, v))
                return sp_errf(err, SP_BAD_REQUEST, "args.%s: expected %s, got %s", sp->key,
                               arg_type_name(sp->type), sp_type_name(v));
            if (sp->max && arg_len(v) > sp->max)
                return sp_errf(err, SP_BAD_REQUEST, "args.%s: %s over the limit of %llu", sp->key,
                               sp->type == ARG_UINT ? "value" : "length",
                               (unsigned long long)sp->max);
        }
    }
    for (const struct arg_spec *sp = op->args; sp->key; sp++) {
        if (!sp->required)
            continue;
        const msgpack_object *v = args ? sp_map_get(args, sp->key) : NULL;
        if (!v || v->type == MSGPACK_OBJECT_NIL)
            return sp_errf(err, SP_BAD_REQUEST, "%s: missing required argument '%s'", op->name,
                           sp->key);
    }
    return 0;
}

/* ---- replies ---------------------------------------------------------- */

static struct sp_writer *req_writer(struct req *rq)
{
    /* Answers for a vanished connection go to a scratch writer that is emptied
     * after every frame. */
    return rq->conn ? conn_writer(rq->conn) : &rq->ag->null_writer;
}

msgpack_packer *req_frame_begin(struct req *rq)
{
    struct sp_writer *w = req_writer(rq);
    sp_writer_begin_frame(w);
    sp_writer_packer(w, &rq->pk);
    return &rq->pk;
}

msgpack_packer *req_reply_begin(struct req *rq)
{
    msgpack_packer *pk = req_frame_begin(rq);
    sp_pack_ok_head(pk, rq->id);
    return pk;
}

/* final: the request's answer (not an event), which its key keeps. */
static void req_frame_end(struct req *rq, bool final)
{
    struct sp_writer *w = req_writer(rq);
    struct sp_err e;
    int rc = sp_writer_end_frame(w, &e);
    if (final && rq->idem) {
        /* Before the null writer is emptied or a flush reuses the buffer.
         * A frame lost to an overflow has left no bytes. */
        bool whole = w->len > w->frame_start + 4;
        idem_capture(rq, whole ? w->buf + w->frame_start + 4 : NULL,
                     whole ? w->len - w->frame_start - 4 : 0);
    }
    if (!rq->conn) {
        w->off = w->len = 0;
        w->overflow = false;
        return;
    }
    if (rc < 0)
        log_warn("dropping connection: %s", e.msg);
    conn_frame_done(rq->conn);
}

void req_reply_end(struct req *rq)
{
    req_frame_end(rq, true);
    rq->replied = true;
}

msgpack_packer *req_event_begin(struct req *rq, const char *event, uint32_t nfields)
{
    struct sp_writer *w = req_writer(rq);
    sp_writer_begin_frame(w);
    sp_writer_packer(w, &rq->pk);
    sp_pack_event_head(&rq->pk, rq->id, event, nfields);
    return &rq->pk;
}

void req_event_end(struct req *rq)
{
    req_frame_end(rq, false);
}

static void reply_error(struct agent *ag, struct conn *c, uint64_t id, const struct sp_err *err)
{
    struct sp_writer *w = c ? conn_writer(c) : &ag->null_writer;
    msgpack_packer pk;
    sp_writer_begin_frame(w);
    sp_writer_packer(w, &pk);
    sp_pack_error(&pk, id, err);
    struct sp_err e;
    int rc = sp_writer_end_frame(w, &e);
    if (!c) {
        w->off = w->len = 0;
        w->overflow = false;
        return;
    }
    if (rc < 0)
        log_warn("dropping connection: %s", e.msg);
    conn_frame_done(c);
}

/* ---- request lifecycle ------------------------------------------------ */

void req_free(struct req *rq)
{
    idem_dropped(rq);
    if (rq->tpl)
        template_unref(rq->ag, rq->tpl);
    if (rq->frame) {
        msgpack_unpacked_destroy(&rq->msg);
        free(rq->frame);
    }
    free(rq);
}

void req_finish(struct req *rq, const struct sp_err *err)
{
    struct agent *ag = rq->ag;
    if (err) {
        reply_error(ag, rq->conn, rq->id, err);
    } else if (!rq->replied) {
        struct sp_err e;
        sp_errf(&e, SP_INTERNAL, "%s: handler finished without a reply", rq->op->name);
        reply_error(ag, rq->conn, rq->id, &e);
        err = &e;
    }
    struct op_stats *st = &ag->op_stats[rq->op_index];
    st->calls++;
    if (err) {
        st->errors++;
        ag->errors++;
    }
    double dt = agent_now_precise(ag) - rq->t0;
    hist_add(&st->lat, dt > 0 ? (uint64_t)(dt * 1e6) : 0);
    idem_finished(rq, err);
    if (rq->conn)
        conn_req_del(rq->conn, rq);
    struct slot *s = req_slot(rq);
    bool was_active = s && s->active == rq;
    req_free(rq);
    if (was_active)
        slot_advance(ag, s);
}

void req_run(struct req *rq)
{
    struct sp_err err;
    struct slot *s = req_slot(rq);
    /* File operations act as the slot's user: what they create belongs to
     * it, and they can reach nothing its commands could not. */
    bool as_user = s && (rq->op->flags & OPF_FSUSER) && (rq->ag->iso.available & (1u << RUNG_UID));
    if (as_user)
        uid_fs_enter(s->uid);
    int rc = rq->op->fn(rq, &err);
    if (as_user)
        uid_fs_leave();
    if (rc == OP_PENDING)
        return;
    req_finish(rq, rc < 0 ? &err : NULL);
}

void req_start(struct req *rq)
{
    if ((rq->op->flags & OPF_SLOT) && !(rq->op->flags & OPF_NOW))
        slot_submit(rq->ag, rq);
    else
        req_run(rq);
}

/* The envelope's `key` (str of 1..IDEM_KEY_MAX bytes) and `resume` ({stdout,
 * stderr} uint offsets); nil is the same as absent. Checked for every op,
 * used only by those with OPF_IDEM. */
static int parse_envelope_extras(struct req *rq, const char **key, size_t *key_len,
                                 struct sp_err *err)
{
    const msgpack_object *root = &rq->msg.data;
    const msgpack_object *k = sp_map_get(root, "key");
    *key = NULL;
    *key_len = 0;
    if (k && k->type != MSGPACK_OBJECT_NIL) {
        if (k->type != MSGPACK_OBJECT_STR)
            return sp_errf(err, SP_BAD_REQUEST, "key: expected str, got %s", sp_type_name(k));
        if (k->via.str.size == 0 || k->via.str.size > IDEM_KEY_MAX)
            return sp_errf(err, SP_BAD_REQUEST, "key: %u bytes, must be 1..%u",
                           (unsigned)k->via.str.size, IDEM_KEY_MAX);
        *key = k->via.str.ptr;
        *key_len = k->via.str.size;
    }
    const msgpack_object *r = sp_map_get(root, "resume");
    if (!r || r->type == MSGPACK_OBJECT_NIL)
        return 0;
    if (r->type != MSGPACK_OBJECT_MAP)
        return sp_errf(err, SP_BAD_REQUEST, "resume: expected map, got %s", sp_type_name(r));
    for (uint32_t i = 0; i < r->via.map.size; i++) {
        const msgpack_object *rk = &r->via.map.ptr[i].key, *rv = &r->via.map.ptr[i].val;
        bool out = rk->type == MSGPACK_OBJECT_STR &&
                   sp_str_eq(rk->via.str.ptr, rk->via.str.size, "stdout");
        bool er = rk->type == MSGPACK_OBJECT_STR &&
                  sp_str_eq(rk->via.str.ptr, rk->via.str.size, "stderr");
        if (!out && !er)
            return sp_errf(err, SP_BAD_REQUEST, "resume: unknown field (stdout, stderr)");
        if (rv->type == MSGPACK_OBJECT_NIL)
            continue;
        if (rv->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            return sp_errf(err, SP_BAD_REQUEST, "resume.%s: expected unsigned integer, got %s",
                           out ? "stdout" : "stderr", sp_type_name(rv));
        *(out ? &rq->resume_out : &rq->resume_err) = rv->via.u64;
    }
    return 0;
}

void dispatch_frame(struct agent *ag, struct conn *c, const char *data, uint32_t len)
{
    struct sp_err err;
    struct sp_request sr = {0};
    ag->requests++;
    struct req *rq = calloc(1, sizeof *rq);
    if (!rq) {
        sp_errf(&err, SP_INTERNAL, "out of memory");
        goto fail;
    }
    rq->ag = ag;
    rq->slot = -1;
    rq->t0 = agent_now_precise(ag);
    if (len == 0) {
        sp_errf(&err, SP_BAD_REQUEST, "empty frame");
        goto fail;
    }
    /* The request owns a copy: str/bin objects point into it and it may wait
     * in a slot queue after the reader's buffer has moved on. */
    rq->frame = malloc(len);
    if (!rq->frame) {
        sp_errf(&err, SP_INTERNAL, "out of memory for a %u-byte frame", len);
        goto fail;
    }
    memcpy(rq->frame, data, len);
    msgpack_unpacked_init(&rq->msg);
    if (sp_unpack(rq->frame, len, &rq->msg, &err) < 0)
        goto fail;
    if (sp_parse_request(&rq->msg.data, &sr, &err) < 0)
        goto fail;
    rq->id = sr.id;
    rq->args = sr.args;
    const struct op_def *op = NULL;
    for (unsigned i = 0; i < op_count; i++) {
        if (sp_str_eq(sr.op, sr.op_len, op_table[i].name)) {
            op = &op_table[i];
            rq->op_index = i;
            break;
        }
    }
    if (!op) {
        sp_errf(&err, SP_UNKNOWN_OP, "unknown op '%.*s'", (int)(sr.op_len > 64 ? 64 : sr.op_len),
                sr.op);
        goto fail;
    }
    rq->op = op;
    if (ag->token_len && !conn_authed(c) && !(op->flags & OPF_NOAUTH)) {
        sp_errf(&err, SP_UNAUTHORIZED, "%s: send hello with the agent's token first", op->name);
        goto fail_counted;
    }
    const char *key;
    size_t key_len;
    if (parse_envelope_extras(rq, &key, &key_len, &err) < 0)
        goto fail_counted;
    if (validate_args(op, rq->args, &err) < 0)
        goto fail_counted;
    if (op->flags & OPF_SLOT) {
        uint64_t slot = arg_uint(rq, "slot", 0);
        if (slot >= ag->nslots) {
            sp_errf(&err, SP_UNKNOWN_SLOT, "slot %llu does not exist (slots 0..%u)",
                    (unsigned long long)slot, ag->nslots - 1);
            goto fail_counted;
        }
        rq->slot = (int)slot;
    }
    rq->conn = c;
    conn_req_add(c, rq);
    /* After validation and authorisation: a refused request leaves no key. */
    if (key && idem_arrive(rq, key, key_len))
        return;
    req_start(rq);
    return;

fail_counted:
    ag->op_stats[rq->op_index].calls++;
    ag->op_stats[rq->op_index].errors++;
fail:
    ag->errors++;
    log_debug("request %llu refused: %s: %s", (unsigned long long)sr.id, sp_code_name(err.code),
              err.msg);
    reply_error(ag, c, sr.id, &err);
    if (rq)
        req_free(rq);
}
