/* The trainer tool names bash_stateful and tmux on agent sessions. The
 * controller keeps one shell session and one terminal (PTY) session per
 * lease, opens each on first use, and runs these calls one at a time per
 * slot in the order they came: a session runs one command at a time, and
 * the agent does not queue session ops as it queues a slot's exec. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ctl.h"

/* The trainer's pane: 120 x 40 unless asked, clamped as its reference
 * server clamps (an out-of-range size is not worth failing a call). */
#define TMUX_DEFAULT_COLS 120
#define TMUX_DEFAULT_ROWS 40
#define TMUX_MIN_COLS 20
#define TMUX_MAX_COLS 500
#define TMUX_MIN_ROWS 10
#define TMUX_MAX_ROWS 200
#define STREAM_DEFAULT_BYTES 50000
#define STREAM_MAX_BYTES 200000
#define MAX_WAIT_S 86400.0
#define MAX_KEYS (1u << 20)
#define SESSION_READY_S 10.0 /* the agent's bound on a shell's start-up */

enum sc_kind { SC_BASH, SC_START, SC_KEYS, SC_CAPTURE, SC_STREAM, SC_STOP };

struct scall {
    enum sc_kind kind;
    uint64_t gen;        /* the lease the call was made in */
    uint64_t timeout_ms; /* bash: the command's */
    /* When this call opens the session: its terminal and policy. */
    uint32_t cols, rows;
    bool network, required; /* isolation: "required" */
    /* tmux */
    bool block;   /* send_keys: wait for the shell's prompt */
    bool entire;  /* capture: the history too */
    bool reset;   /* stream: from the transcript's start */
    bool created; /* this call opened the terminal */
    uint64_t min_wait_ms, max_wait_ms;
    double max_wait_s; /* as given, for the timeout's message */
    uint32_t max_bytes;
    bool retried;  /* reopened once after the session vanished or ended */
    bool sent;     /* a request for it (open or the op) is in flight */
    bool detached; /* answered `timeout`, off the queue; its late answer dropped */
    double backstop_s;
    size_t len;
    char data[]; /* bash: the command; send_keys: the bytes to type */
};

static const struct {
    const char *name, *seq;
} tmux_keys[] = {
    {"Enter", "\r"},       {"C-m", "\r"},         {"Escape", "\x1b"},    {"Esc", "\x1b"},
    {"Tab", "\t"},         {"BSpace", "\x7f"},    {"Space", " "},        {"Up", "\x1b[A"},
    {"Down", "\x1b[B"},    {"Right", "\x1b[C"},   {"Left", "\x1b[D"},    {"Home", "\x1b[H"},
    {"End", "\x1b[F"},     {"PageUp", "\x1b[5~"}, {"PPage", "\x1b[5~"},  {"PageDown", "\x1b[6~"},
    {"NPage", "\x1b[6~"},  {"DC", "\x1b[3~"},     {"Delete", "\x1b[3~"}, {"IC", "\x1b[2~"},
    {"Insert", "\x1b[2~"}, {"F1", "\x1bOP"},      {"F2", "\x1bOQ"},      {"F3", "\x1bOR"},
    {"F4", "\x1bOS"},      {"KPEnter", "\r"},
};

bool stateful_tool(const char *name, size_t n)
{
    return sp_str_eq(name, n, "bash_stateful") || sp_str_eq(name, n, "tmux");
}

/* One tmux send-keys word: a key name becomes its sequence (Enter, C-c,
 * M-x, Up, ...), anything else is typed as it is. Returns the bytes added. */
static size_t key_bytes(const char *w, size_t n, char *out)
{
    for (size_t i = 0; i < sizeof tmux_keys / sizeof tmux_keys[0]; i++)
        if (sp_str_eq(w, n, tmux_keys[i].name)) {
            size_t l = strlen(tmux_keys[i].seq);
            memcpy(out, tmux_keys[i].seq, l);
            return l;
        }
    if (n == 3 && w[0] == 'C' && w[1] == '-' &&
        ((w[2] >= 'a' && w[2] <= 'z') || (w[2] >= 'A' && w[2] <= 'Z'))) {
        out[0] = (char)((w[2] | 0x20) & 0x1f);
        return 1;
    }
    if (n == 3 && w[0] == 'M' && w[1] == '-') {
        out[0] = '\x1b';
        out[1] = w[2];
        return 2;
    }
    memcpy(out, w, n);
    return n;
}

static struct scall *scall_new(enum sc_kind kind, size_t len)
{
    struct scall *sc = calloc(1, sizeof *sc + len + 1);
    if (!sc)
        abort();
    sc->kind = kind;
    return sc;
}

static bool is_key(const msgpack_object *k, const char *name)
{
    return k->type == MSGPACK_OBJECT_STR && sp_str_eq(k->via.str.ptr, k->via.str.size, name);
}

/* bad_request naming argument k (a wrong name or a value of the wrong type). */
static struct scall *bad_arg(struct sp_err *err, const msgpack_object *k, const char *tool,
                             const char *usage)
{
    int n = k->type == MSGPACK_OBJECT_STR ? (int)(k->via.str.size > 64 ? 64 : k->via.str.size) : 0;
    sp_errf(err, SP_BAD_REQUEST, "bad argument '%.*s' for tool %s (%s)", n, n ? k->via.str.ptr : "",
            tool, usage);
    return NULL;
}

/* A flag: true or false; nil counts as not given. */
static bool flag_val(const msgpack_object *v, bool *out)
{
    if (v->type == MSGPACK_OBJECT_NIL)
        return true;
    if (v->type != MSGPACK_OBJECT_BOOLEAN)
        return false;
    *out = v->via.boolean;
    return true;
}

/* A number (seconds), integer or float. */
static bool num_val(const msgpack_object *v, double *out)
{
    switch (v->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)v->via.u64; return true;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)v->via.i64; return true;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *out = v->via.f64; return true;
    default: return false;
    }
}

/* An integer clamped to lo..hi: the trainer's reference clamps sizes rather
 * than failing the call. */
static bool clamped_int(const msgpack_object *v, int64_t lo, int64_t hi, uint32_t *out)
{
    if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        *out = (uint32_t)(v->via.u64 > (uint64_t)hi   ? hi
                          : v->via.u64 < (uint64_t)lo ? lo
                                                      : (int64_t)v->via.u64);
    else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        *out = (uint32_t)lo;
    else
        return false;
    return true;
}

/* The trainer's sandbox policy, applied when the call opens the session:
 * allow_network (false also requires isolation), require_stateful_sandbox,
 * and require_sandbox (its fallback when require_stateful_sandbox is not
 * given). */
struct policy {
    bool network;
    int stateful, plain; /* -1: not given */
};

static const struct policy policy_default = {.network = true, .stateful = -1, .plain = -1};

/* 1: k was a policy argument (taken), 0: not one, -1: a bad value. */
static int policy_arg(const msgpack_object *k, const msgpack_object *v, struct policy *p)
{
    int *given = is_key(k, "require_stateful_sandbox") ? &p->stateful
                 : is_key(k, "require_sandbox")        ? &p->plain
                                                       : NULL;
    bool b = false;
    if (!given && !is_key(k, "allow_network"))
        return 0;
    if (!flag_val(v, &b))
        return -1;
    if (v->type == MSGPACK_OBJECT_NIL)
        return 1;
    if (given)
        *given = b;
    else
        p->network = b;
    return 1;
}

static void policy_apply(const struct policy *p, struct scall *sc)
{
    sc->network = p->network;
    /* No network fails closed, as the trainer's server refuses a shell it
     * cannot cut off. */
    sc->required = (p->stateful >= 0 ? p->stateful == 1 : p->plain == 1) || !p->network;
}

#define POLICY_USAGE "allow_network, require_stateful_sandbox, require_sandbox bool"

/* Arguments of bash_stateful: command, timeout (seconds) or timeout_ms, and
 * the sandbox policy. */
static struct scall *parse_bash(const msgpack_object *args, uint64_t dflt_ms, struct sp_err *err)
{
    static const char usage[] = "command str, timeout seconds, timeout_ms uint, " POLICY_USAGE;
    const msgpack_object *cmd = NULL;
    uint64_t ms = dflt_ms;
    bool has_ms = false;
    struct policy pol = policy_default;
    for (uint32_t i = 0; args && i < args->via.map.size; i++) {
        const msgpack_object *k = &args->via.map.ptr[i].key, *v = &args->via.map.ptr[i].val;
        int pr = policy_arg(k, v, &pol);
        if (pr < 0)
            return bad_arg(err, k, "bash_stateful", usage);
        if (pr > 0)
            continue;
        if (is_key(k, "command") && v->type == MSGPACK_OBJECT_STR) {
            cmd = v;
        } else if (is_key(k, "timeout_ms") && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            ms = v->via.u64;
            has_ms = true;
        } else if (is_key(k, "timeout") &&
                   (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ||
                    v->type == MSGPACK_OBJECT_FLOAT64 || v->type == MSGPACK_OBJECT_FLOAT32)) {
            double sec =
                v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (double)v->via.u64 : v->via.f64;
            if (!(sec >= 0 && sec <= 86400.0)) {
                sp_errf(err, SP_BAD_REQUEST, "'timeout' must be 0..86400 seconds");
                return NULL;
            }
            if (!has_ms)
                ms = (uint64_t)(sec * 1000);
        } else if (!is_key(k, "slot")) {
            return bad_arg(err, k, "bash_stateful", usage);
        }
    }
    if (!cmd) {
        sp_errf(err, SP_BAD_REQUEST, "tool bash_stateful needs 'command' (a string)");
        return NULL;
    }
    if (!ms || ms > 86400000ull) /* 0: the agent's own default, 10 minutes */
        ms = ms ? 86400000ull : 600000;
    struct scall *sc = scall_new(SC_BASH, cmd->via.str.size);
    memcpy(sc->data, cmd->via.str.ptr, cmd->via.str.size);
    sc->len = cmd->via.str.size;
    sc->timeout_ms = ms;
    policy_apply(&pol, sc);
    return sc;
}

/* The action, as the trainer's server reads it: trimmed, any case, and
 * capture when not given. */
static int tmux_action(const msgpack_object *action, enum sc_kind *out, struct sp_err *err)
{
    static const char *const names[] = {"start", "send_keys", "capture", "stream", "stop"};
    static const enum sc_kind kinds[] = {SC_START, SC_KEYS, SC_CAPTURE, SC_STREAM, SC_STOP};
    const char *p = action ? action->via.str.ptr : "";
    size_t n = action ? action->via.str.size : 0;
    while (n && (*p == ' ' || *p == '\t' || *p == '\n')) {
        p++;
        n--;
    }
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\n'))
        n--;
    if (n == 0) {
        *out = SC_CAPTURE;
        return 0;
    }
    for (int i = 0; i < 5; i++)
        if (strlen(names[i]) == n && !strncasecmp(p, names[i], n)) {
            *out = kinds[i];
            return 0;
        }
    return sp_errf(err, SP_BAD_REQUEST,
                   "tool tmux: unknown action '%.*s' (start, send_keys, capture, stream or stop)",
                   (int)(n > 32 ? 32 : n), p);
}

/* The send_keys words as bytes into a new call: one string, or a list of
 * them; with block an Enter after them unless they end with one (the
 * trainer's server does the same: a blocked line must run). */
static struct scall *parse_keys(const msgpack_object *keys, bool block, struct sp_err *err)
{
    if (!keys || keys->type == MSGPACK_OBJECT_NIL) {
        sp_errf(err, SP_BAD_REQUEST, "tmux send_keys needs 'keys' (a string or a list of strings)");
        return NULL;
    }
    const msgpack_object *words = keys;
    uint32_t nw = 1;
    if (keys->type == MSGPACK_OBJECT_ARRAY) {
        words = keys->via.array.ptr;
        nw = keys->via.array.size;
    }
    size_t total = 1;
    for (uint32_t i = 0; i < nw; i++) {
        if (words[i].type != MSGPACK_OBJECT_STR) {
            sp_errf(err, SP_BAD_REQUEST, "'keys' must be a string or a list of strings");
            return NULL;
        }
        total += words[i].via.str.size + 2; /* a key name never grows more */
    }
    if (total > MAX_KEYS) {
        sp_errf(err, SP_TOO_LARGE, "'keys' above %u bytes", MAX_KEYS);
        return NULL;
    }
    struct scall *sc = scall_new(SC_KEYS, total);
    for (uint32_t i = 0; i < nw; i++)
        sc->len += key_bytes(words[i].via.str.ptr, words[i].via.str.size, sc->data + sc->len);
    const msgpack_object *last = nw ? &words[nw - 1] : NULL;
    if (block && !(last && (sp_str_eq(last->via.str.ptr, last->via.str.size, "Enter") ||
                            sp_str_eq(last->via.str.ptr, last->via.str.size, "C-m") ||
                            sp_str_eq(last->via.str.ptr, last->via.str.size, "KPEnter"))))
        sc->data[sc->len++] = '\r';
    return sc;
}

#define TMUX_USAGE                                                                                 \
    "action start|send_keys|capture|stream|stop, keys str or [str], block bool, min_wait_s, "      \
    "max_wait_s, timeout seconds, capture_entire bool, max_bytes int, reset bool, pane_width, "    \
    "pane_height int, " POLICY_USAGE

/* Arguments of tmux, as the trainer's executor sends them (see
 * notes/trainer-interface.md): unknown names and wrong types are refused,
 * sizes clamped. dflt_ms: the call's timeout, max_wait_s's default. */
static struct scall *parse_tmux(const msgpack_object *args, uint64_t dflt_ms, struct sp_err *err)
{
    const msgpack_object *action = NULL, *keys = NULL;
    uint32_t cols = TMUX_DEFAULT_COLS, rows = TMUX_DEFAULT_ROWS, max_bytes = STREAM_DEFAULT_BYTES;
    double min_wait = 0, max_wait = 0, timeout = 0;
    bool block = false, entire = false, reset = false;
    struct policy pol = policy_default;
    for (uint32_t i = 0; args && i < args->via.map.size; i++) {
        const msgpack_object *k = &args->via.map.ptr[i].key, *v = &args->via.map.ptr[i].val;
        int pr = policy_arg(k, v, &pol);
        bool ok = pr > 0;
        if (pr != 0) {
            /* a policy argument: taken, or of the wrong type */
        } else if (is_key(k, "action")) {
            ok = v->type == MSGPACK_OBJECT_STR || v->type == MSGPACK_OBJECT_NIL;
            action = v->type == MSGPACK_OBJECT_STR ? v : NULL;
        } else if (is_key(k, "keys")) {
            ok = true; /* checked for send_keys only, as the trainer's server does */
            keys = v;
        } else if (is_key(k, "block")) {
            ok = flag_val(v, &block);
        } else if (is_key(k, "capture_entire")) {
            ok = flag_val(v, &entire);
        } else if (is_key(k, "reset")) {
            ok = flag_val(v, &reset);
        } else if (is_key(k, "min_wait_s") || is_key(k, "max_wait_s") || is_key(k, "timeout")) {
            double sec = 0;
            bool is_min = is_key(k, "min_wait_s"), is_max = is_key(k, "max_wait_s");
            if (v->type == MSGPACK_OBJECT_NIL)
                continue;
            if (!num_val(v, &sec))
                return bad_arg(err, k, "tmux", TMUX_USAGE);
            if (!(sec >= 0 && sec <= MAX_WAIT_S) || (is_max && !(sec > 0))) {
                sp_errf(err, SP_BAD_REQUEST, "'%s' must be %s..%.0f seconds",
                        is_min   ? "min_wait_s"
                        : is_max ? "max_wait_s"
                                 : "timeout",
                        is_max ? "above 0" : "0", MAX_WAIT_S);
                return NULL;
            }
            *(is_min ? &min_wait : is_max ? &max_wait : &timeout) = sec;
            ok = true;
        } else if (is_key(k, "max_bytes")) {
            ok = v->type == MSGPACK_OBJECT_NIL || clamped_int(v, 1, STREAM_MAX_BYTES, &max_bytes);
        } else if (is_key(k, "pane_width")) {
            ok = v->type == MSGPACK_OBJECT_NIL ||
                 clamped_int(v, TMUX_MIN_COLS, TMUX_MAX_COLS, &cols);
        } else if (is_key(k, "pane_height")) {
            ok = v->type == MSGPACK_OBJECT_NIL ||
                 clamped_int(v, TMUX_MIN_ROWS, TMUX_MAX_ROWS, &rows);
        } else {
            ok = is_key(k, "slot");
        }
        if (!ok)
            return bad_arg(err, k, "tmux", TMUX_USAGE);
    }
    enum sc_kind kind = SC_CAPTURE;
    if (tmux_action(action, &kind, err) < 0)
        return NULL;
    if (!(max_wait > 0))
        max_wait = timeout > 0 ? timeout : (double)dflt_ms / 1000.0;
    struct scall *sc = kind == SC_KEYS ? parse_keys(keys, block, err) : scall_new(kind, 0);
    if (!sc)
        return NULL;
    sc->cols = cols;
    sc->rows = rows;
    sc->block = block;
    sc->entire = entire;
    sc->reset = reset;
    sc->max_bytes = max_bytes;
    sc->min_wait_ms = (uint64_t)(min_wait * 1000.0);
    if (max_wait > MAX_WAIT_S) /* the default comes from exec_timeout, which is not bounded */
        max_wait = MAX_WAIT_S;
    sc->max_wait_s = max_wait;
    sc->max_wait_ms = (uint64_t)ceil(max_wait * 1000.0);
    if (!sc->max_wait_ms)
        sc->max_wait_ms = 1;
    policy_apply(&pol, sc);
    return sc;
}

static void run_head(struct ctl *c, struct slot *s);

static void on_closed(struct ctl *c, struct preq *r, const msgpack_object *resp,
                      const struct sp_err *err)
{
    (void)resp;
    (void)err;
    preq_free(c, r);
}

static void pack_head(struct agent *ag, struct preq *r, const char *op, msgpack_packer *pk,
                      uint32_t n)
{
    agent_send_begin(ag, r, op, pk);
    msgpack_pack_map(pk, n + 1);
    sp_pack_kv_uint(pk, "slot", r->slot->index);
}

/* Is resp the agent's error `code`, its message ending in `tail` (NULL:
 * any message)? */
static bool agent_error(const msgpack_object *resp, const char *code, const char *tail)
{
    const msgpack_object *er = resp ? sp_map_get(resp, "error") : NULL;
    const char *c = NULL, *m = NULL;
    size_t cl = 0, ml = 0, tl = tail ? strlen(tail) : 0;
    struct sp_err e;
    if (!er || er->type != MSGPACK_OBJECT_MAP || sp_get_str(er, "code", false, &c, &cl, &e) != 1 ||
        !sp_str_eq(c, cl, code))
        return false;
    return !tail || (sp_get_str(er, "message", false, &m, &ml, &e) == 1 && ml >= tl &&
                     !memcmp(m + ml - tl, tail, tl));
}

static bool answer_ok(const msgpack_object *resp)
{
    const msgpack_object *ok = resp ? sp_map_get(resp, "ok") : NULL;
    return ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean;
}

static void send_close(struct ctl *c, struct slot *s, uint64_t id)
{
    struct preq *cl = agent_req_new(s->ag, s, on_closed);
    msgpack_packer pk;
    pack_head(s->ag, cl, "session_close", &pk, 1);
    sp_pack_kv_uint(&pk, "session", id);
    agent_send_end(c, s->ag, cl);
}

/* Forget the lease's bash (pty false) or tmux session, closing it: its
 * shell ended, and an ended session stays listed (and counts against the
 * slot's limit) until it is closed. */
static void drop_session(struct ctl *c, struct slot *s, bool pty)
{
    uint64_t *id = pty ? &s->sess_tmux : &s->sess_bash;
    uint64_t old = *id;
    *id = 0;
    if (pty)
        s->tmux_off = 0;
    if (old)
        send_close(c, s, old);
}

/* Answer r with a result made here rather than the agent's: tmux start's
 * {"started": true, "created": .., and the screen's pairs}, or stop's
 * {"stopped": true}. sent: r went to the agent (its latency counts). */
static void answer_made(struct ctl *c, struct preq *r, bool started, const msgpack_object *screen,
                        bool sent)
{
    struct scall *sc = r->ctx;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_bool(&pk, "ok", true);
    sp_pack_cstr(&pk, "result");
    uint32_t n = screen && screen->type == MSGPACK_OBJECT_MAP ? screen->via.map.size : 0;
    if (started) {
        msgpack_pack_map(&pk, n + 2);
        sp_pack_kv_bool(&pk, "started", true);
        sp_pack_kv_bool(&pk, "created", sc->created);
        for (uint32_t i = 0; i < n; i++) {
            msgpack_pack_object(&pk, screen->via.map.ptr[i].key);
            msgpack_pack_object(&pk, screen->via.map.ptr[i].val);
        }
    } else {
        msgpack_pack_map(&pk, 1);
        sp_pack_kv_bool(&pk, "stopped", true);
    }
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err e;
    const msgpack_object *resp = NULL;
    if (sp_unpack(sb.data, sb.size, &u, &e) == 0)
        resp = &u.data;
    else
        sp_errf(&e, SP_INTERNAL, "tmux: packing the answer failed");
    if (sent) {
        api_tool_answer(c, r, resp, &e);
    } else {
        api_answer(c, r, resp, &e);
        preq_free(c, r);
    }
    msgpack_unpacked_destroy(&u);
    msgpack_sbuffer_destroy(&sb);
}

/* Python's str() of a float, as the trainer's server prints max_wait_s. */
static void py_float(double v, char *out, size_t cap)
{
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(out, cap, "%.1f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

/* The answer to the call itself: keep track of the sessions, answer the
 * trainer, go on with the slot's next call. */
static void on_answer(struct ctl *c, struct preq *r, const msgpack_object *resp,
                      const struct sp_err *err)
{
    struct slot *s = r->slot;
    struct scall *sc = r->ctx;
    sc->sent = false;
    if (sc->detached) {
        api_tool_answer(c, r, resp, err);
        return;
    }
    bool mine = sc->gen == s->generation, tmux = sc->kind != SC_BASH;
    const msgpack_object *res = answer_ok(resp) ? sp_map_get(resp, "result") : NULL;
    bool alive = true, has_alive = false;
    struct sp_err e;
    if (res)
        has_alive = sp_get_bool(res, tmux ? "alive" : "session_alive", false, &alive, &e) == 1;
    /* not_found: the session went (a reset); the agent's bad_request
     * "session N has ended": its shell exited, the session is still listed */
    bool gone = agent_error(resp, "not_found", NULL),
         ended = agent_error(resp, "bad_request", "has ended");
    if (sc->kind != SC_STOP && mine && !sc->retried &&
        (gone || (ended && (sc->kind == SC_BASH || sc->kind == SC_KEYS)) ||
         (sc->kind == SC_START && has_alive && !alive))) {
        /* The session went (a `reset` tool call) or its shell exited
         * between calls: a new one, the call again (once). A capture or a
         * stream of an ended terminal still shows its last output. */
        sc->retried = true;
        if (gone)
            *(tmux ? &s->sess_tmux : &s->sess_bash) = 0;
        else
            drop_session(c, s, tmux);
        run_head(c, s);
        return;
    }
    TAILQ_REMOVE(&s->sq, r, slink);
    if (mine) {
        if (sc->kind == SC_BASH && has_alive && !alive)
            drop_session(c, s, false); /* `exit`: a new shell next time */
        if (tmux && sc->kind != SC_STOP && gone)
            s->sess_tmux = 0;
        else if (sc->kind == SC_KEYS && ended)
            drop_session(c, s, true);
    }
    bool prompt = false;
    uint64_t next = 0;
    switch (sc->kind) {
    case SC_STOP:
        /* Whatever the agent said, the lease has no terminal now. */
        if (resp)
            answer_made(c, r, false, NULL, true);
        else
            api_tool_answer(c, r, resp, err);
        break;
    case SC_START:
        if (res)
            answer_made(c, r, true, res, true);
        else
            api_tool_answer(c, r, resp, err);
        break;
    case SC_KEYS:
        if (res && sc->block && sp_get_bool(res, "prompt", false, &prompt, &e) >= 0 && !prompt) {
            /* The line did not finish (or the shell ended): as the trainer's
             * server does, the terminal goes with what runs in it. */
            if (mine)
                drop_session(c, s, true);
            if (alive) {
                char secs[32];
                py_float(sc->max_wait_s, secs, sizeof secs);
                sp_errf(&e, SP_TIMEOUT, "tmux blocked keys timed out after %ss", secs);
                api_tool_answer(c, r, NULL, &e);
                break;
            }
        }
        api_tool_answer(c, r, resp, err);
        break;
    case SC_STREAM:
        if (res && mine && sp_get_uint(res, "next_offset", false, &next, &e) == 1)
            s->tmux_off = next;
        api_tool_answer(c, r, resp, err);
        break;
    default: api_tool_answer(c, r, resp, err); break;
    }
    run_head(c, s);
}

static void on_open(struct ctl *c, struct preq *o, const msgpack_object *resp,
                    const struct sp_err *err)
{
    struct slot *s = o->slot;
    struct preq *r = o->step_of;
    preq_free(c, o);
    struct scall *sc = r->ctx;
    bool pty = sc->kind != SC_BASH;
    sc->sent = false;
    const msgpack_object *res = answer_ok(resp) ? sp_map_get(resp, "result") : NULL;
    uint64_t id = 0;
    struct sp_err e;
    bool opened = res && sp_get_uint(res, "session", true, &id, &e) == 1 && id;
    uint64_t *have = pty ? &s->sess_tmux : &s->sess_bash;
    if (sc->detached) {
        /* Nobody waits for it: keep the session if the lease still has
         * none, else close it. */
        if (opened && sc->gen == s->generation && agent_reachable(s->ag) && !*have) {
            *have = id;
            if (pty)
                s->tmux_off = 0;
        } else if (opened && agent_reachable(s->ag)) {
            send_close(c, s, id);
        }
        preq_free(c, r);
        return;
    }
    if (opened) {
        if (sc->gen == s->generation) {
            *have = id;
            if (pty)
                s->tmux_off = 0;
        }
        run_head(c, s);
        return;
    }
    /* The agent's refusal (e.g. the slot's session limit, or isolation
     * required where a rung is missing) is the answer. */
    TAILQ_REMOVE(&s->sq, r, slink);
    api_answer(c, r, resp, err);
    preq_free(c, r);
    run_head(c, s);
}

/* A session for the call at the head: the shell (bash_stateful) or the
 * terminal (tmux), with the call's policy, which stays the session's. */
static void send_open(struct ctl *c, struct slot *s, struct preq *r, struct scall *sc)
{
    bool pty = sc->kind != SC_BASH;
    struct preq *o = agent_req_new(s->ag, s, on_open);
    o->step_of = r;
    msgpack_packer pk;
    pack_head(s->ag, o, "session_open", &pk, 2 + (sc->required ? 1 : 0) + (pty ? 3 : 0));
    /* Named, so a restarted controller finds it again (stateful_adopt). */
    sp_pack_kv_str(&pk, "tag", pty ? "tmux" : "bash_stateful");
    sp_pack_kv_bool(&pk, "network", sc->network);
    if (sc->required)
        sp_pack_kv_str(&pk, "isolation", "required");
    if (pty) {
        sp_pack_kv_bool(&pk, "pty", true);
        sp_pack_kv_uint(&pk, "cols", sc->cols);
        sp_pack_kv_uint(&pk, "rows", sc->rows);
    }
    agent_send_end(c, s->ag, o);
}

/* The agent did not answer the head in time: the trainer hears `timeout`
 * and the slot's next calls go on (they meet a busy session if the command
 * still runs); the head's late answer is dropped. */
static void backstop_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct preq *r = w->data;
    struct scall *sc = r->ctx;
    struct slot *s = r->slot;
    struct ctl *c = r->ag->ctl;
    struct sp_err e;
    sp_errf(&e, SP_TIMEOUT, "agent %s did not answer within %.0f s", r->ag->id, sc->backstop_s);
    api_answer(c, r, NULL, &e);
    if (sc->detached || !sc->sent)
        return;
    sc->detached = true;
    TAILQ_REMOVE(&s->sq, r, slink);
    run_head(c, s);
}

/* How long the agent may take with the call itself, past opening. */
static double call_wait_s(const struct scall *sc)
{
    if (sc->kind == SC_BASH)
        return (double)sc->timeout_ms / 1000.0;
    if (sc->kind != SC_KEYS)
        return 0;
    uint64_t ms =
        sc->block && sc->max_wait_ms > sc->min_wait_ms ? sc->max_wait_ms : sc->min_wait_ms;
    return (double)ms / 1000.0;
}

/* The next agent request for the call at the head of s's queue: 1 when
 * sent (its answer goes on), 0 with err when the call fails here, 2 when
 * it is answered here (stop without a terminal). */
static int step(struct ctl *c, struct slot *s, struct preq *r, struct sp_err *err)
{
    struct agent *ag = s->ag;
    struct scall *sc = r->ctx;
    if (!agent_reachable(ag))
        return sp_errf(err, SP_AGENT_LOST, "agent %s is gone", ag->id), 0;
    if (s->state != SL_LEASED || s->generation != sc->gen)
        return sp_errf(err, SP_NOT_LEASED, "the slot was released"), 0;
    if (!r->conn)
        return sp_errf(err, SP_CANCELLED, "the trainer that sent it is gone"), 0;
    if (s->sess_gen != s->generation) {
        /* Sessions belong to a lease (the agent closes them at unlease). */
        s->sess_bash = s->sess_tmux = 0;
        s->tmux_off = 0;
        s->sess_gen = s->generation;
    }
    if (sc->kind == SC_STOP && !s->sess_tmux)
        return 2;
    if (!ev_is_active(&r->timer)) {
        /* Covers the session_open and a retry too. */
        sc->backstop_s = call_wait_s(sc) + 2 * SESSION_READY_S + CTL_BACKSTOP_S;
        ev_timer_init(&r->timer, backstop_cb, sc->backstop_s, 0);
        r->timer.data = r;
        ev_timer_start(c->loop, &r->timer);
    }
    sc->sent = true;
    r->aid = ++ag->next_id;
    uint64_t id = sc->kind == SC_BASH ? s->sess_bash : s->sess_tmux;
    if (!id && sc->kind != SC_STOP) {
        /* Every action but stop works on a terminal: a fresh one when the
         * lease has none (never started, stopped, or gone). */
        sc->created = true;
        send_open(c, s, r, sc);
        return 1;
    }
    msgpack_packer pk;
    switch (sc->kind) {
    case SC_BASH:
        pack_head(ag, r, "session_exec", &pk, 3);
        sp_pack_kv_uint(&pk, "session", id);
        sp_pack_kv_strn(&pk, "cmd", sc->data, sc->len);
        sp_pack_kv_uint(&pk, "timeout_ms", sc->timeout_ms);
        break;
    case SC_START:
    case SC_CAPTURE:
        if (sc->kind == SC_START)
            s->tmux_off = 0; /* as the trainer's server: start rewinds the stream */
        pack_head(ag, r, "session_screen", &pk, 2);
        sp_pack_kv_uint(&pk, "session", id);
        sp_pack_kv_bool(&pk, "history", sc->kind == SC_CAPTURE && sc->entire);
        break;
    case SC_KEYS:
        pack_head(ag, r, "session_write", &pk, 4);
        sp_pack_kv_uint(&pk, "session", id);
        sp_pack_kv_bin(&pk, "data", sc->data, sc->len);
        sp_pack_kv_uint(&pk, "min_wait_ms", sc->min_wait_ms);
        sp_pack_kv_uint(&pk, "wait_prompt_ms", sc->block ? sc->max_wait_ms : 0);
        break;
    case SC_STREAM:
        if (sc->reset) {
            s->tmux_off = 0;
            sc->reset = false; /* once, should the call be retried */
        }
        pack_head(ag, r, "session_log", &pk, 4);
        sp_pack_kv_uint(&pk, "session", id);
        sp_pack_kv_uint(&pk, "offset", s->tmux_off);
        sp_pack_kv_uint(&pk, "max_bytes", sc->max_bytes);
        sp_pack_kv_bool(&pk, "lines", true);
        break;
    case SC_STOP:
        pack_head(ag, r, "session_close", &pk, 1);
        sp_pack_kv_uint(&pk, "session", id);
        s->sess_tmux = 0;
        s->tmux_off = 0;
        break;
    }
    agent_send_end(c, ag, r);
    return 1;
}

static void run_head(struct ctl *c, struct slot *s)
{
    struct preq *r;
    while ((r = TAILQ_FIRST(&s->sq)) && !((struct scall *)r->ctx)->sent) {
        struct sp_err e;
        int rc = step(c, s, r, &e);
        if (rc == 1)
            return;
        TAILQ_REMOVE(&s->sq, r, slink);
        if (rc == 2) {
            answer_made(c, r, false, NULL, false);
            continue;
        }
        api_answer(c, r, NULL, &e);
        preq_free(c, r);
    }
}

void stateful_adopt(struct slot *s, const msgpack_object *sessions)
{
    s->sess_bash = s->sess_tmux = 0;
    s->tmux_off = 0; /* the stream's offset is not kept: it starts again */
    s->sess_gen = s->generation;
    for (uint32_t i = 0;
         sessions && sessions->type == MSGPACK_OBJECT_ARRAY && i < sessions->via.array.size; i++) {
        const msgpack_object *m = &sessions->via.array.ptr[i];
        const char *tag = NULL;
        size_t tl = 0;
        uint64_t id = 0;
        bool alive = false;
        struct sp_err e;
        if (m->type != MSGPACK_OBJECT_MAP || sp_get_uint(m, "session", true, &id, &e) < 0 ||
            sp_get_str(m, "tag", false, &tag, &tl, &e) < 0 ||
            sp_get_bool(m, "alive", false, &alive, &e) < 0 || !tag || !alive)
            continue;
        if (sp_str_eq(tag, tl, "bash_stateful"))
            s->sess_bash = id;
        else if (sp_str_eq(tag, tl, "tmux"))
            s->sess_tmux = id;
    }
}

int stateful_start(struct ctl *c, struct tconn *t, uint64_t client_id, struct batch *b,
                   uint32_t item, struct slot *s, const char *tool, size_t tool_len,
                   const msgpack_object *args, uint64_t timeout_ms, struct sp_err *err)
{
    if (args && args->type != MSGPACK_OBJECT_MAP)
        return sp_errf(err, SP_BAD_REQUEST, "'args' must be a map (got %s)", sp_type_name(args));
    uint64_t dflt_ms = timeout_ms ? timeout_ms : s->ag->prof->exec_timeout_ms;
    struct scall *sc = sp_str_eq(tool, tool_len, "tmux")
                           ? parse_tmux(args, dflt_ms ? dflt_ms : 600000, err)
                           : parse_bash(args, dflt_ms, err);
    if (!sc)
        return -1;
    sc->gen = s->generation;
    struct preq *r = agent_req_new(s->ag, s, on_answer);
    r->conn = t;
    r->client_id = client_id;
    r->batch = b;
    r->item = item;
    r->shape = SHAPE_PASS;
    r->ctx = sc;
    if (t)
        TAILQ_INSERT_TAIL(&t->reqs, r, clink);
    bool idle = TAILQ_EMPTY(&s->sq);
    TAILQ_INSERT_TAIL(&s->sq, r, slink);
    if (idle)
        run_head(c, s);
    return 0;
}
