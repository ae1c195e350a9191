/* The trainer tool names bash_stateful and tmux on agent sessions. The
 * controller keeps one shell session and one terminal (PTY) session per
 * lease, opens each on first use, and runs these calls one at a time per
 * slot in the order they came: a session runs one command at a time, and
 * the agent does not queue session ops as it queues a slot's exec. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

#define TMUX_DEFAULT_COLS 160
#define TMUX_DEFAULT_ROWS 40
#define TMUX_MAX_SIDE 1000
#define MAX_KEYS (1u << 20)
#define SESSION_READY_S 10.0 /* the agent's bound on a shell's start-up */

enum sc_kind { SC_BASH, SC_START, SC_KEYS, SC_CAPTURE, SC_STOP };

struct scall {
    enum sc_kind kind;
    uint64_t gen;        /* the lease the call was made in */
    uint64_t timeout_ms; /* bash: the command's */
    uint32_t cols, rows; /* start: the pane */
    bool retried;        /* bash, start: reopened once after the session vanished */
    bool sent;           /* a request for it (open or the op) is in flight */
    bool detached;       /* answered `timeout`, off the queue; its late answer dropped */
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
    {"F4", "\x1bOS"},
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

/* Arguments of bash_stateful: command, timeout (seconds) or timeout_ms. */
static struct scall *parse_bash(const msgpack_object *args, uint64_t dflt_ms, struct sp_err *err)
{
    const msgpack_object *cmd = NULL;
    uint64_t ms = dflt_ms;
    bool has_ms = false;
    for (uint32_t i = 0; args && i < args->via.map.size; i++) {
        const msgpack_object *k = &args->via.map.ptr[i].key, *v = &args->via.map.ptr[i].val;
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
            return bad_arg(err, k, "bash_stateful",
                           "command str, timeout seconds, timeout_ms uint");
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
    return sc;
}

static int pane_side(const msgpack_object *v, const char *name, uint32_t *out, struct sp_err *err)
{
    if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 < 1 || v->via.u64 > TMUX_MAX_SIDE)
        return sp_errf(err, SP_BAD_REQUEST, "'%s' must be 1..%d", name, TMUX_MAX_SIDE);
    *out = (uint32_t)v->via.u64;
    return 0;
}

/* Arguments of tmux: action (start, send_keys, capture, stop), keys (a
 * string or a list of strings, tmux send-keys words), pane_width,
 * pane_height. */
static struct scall *parse_tmux(const msgpack_object *args, struct sp_err *err)
{
    const msgpack_object *action = NULL, *keys = NULL;
    uint32_t cols = TMUX_DEFAULT_COLS, rows = TMUX_DEFAULT_ROWS;
    for (uint32_t i = 0; args && i < args->via.map.size; i++) {
        const msgpack_object *k = &args->via.map.ptr[i].key, *v = &args->via.map.ptr[i].val;
        if (is_key(k, "action") && v->type == MSGPACK_OBJECT_STR)
            action = v;
        else if (is_key(k, "keys"))
            keys = v;
        else if (is_key(k, "pane_width")) {
            if (pane_side(v, "pane_width", &cols, err) < 0)
                return NULL;
        } else if (is_key(k, "pane_height")) {
            if (pane_side(v, "pane_height", &rows, err) < 0)
                return NULL;
        } else if (!is_key(k, "slot")) {
            return bad_arg(err, k, "tmux",
                           "action str, keys str or [str], pane_width, pane_height");
        }
    }
    static const char *const names[] = {"start", "send_keys", "capture", "stop"};
    static const enum sc_kind kinds[] = {SC_START, SC_KEYS, SC_CAPTURE, SC_STOP};
    int a = -1;
    for (int i = 0; action && i < 4; i++)
        if (sp_str_eq(action->via.str.ptr, action->via.str.size, names[i]))
            a = i;
    if (a < 0) {
        sp_errf(err, SP_BAD_REQUEST,
                "tool tmux needs 'action': start, send_keys, capture or stop (got %s%.*s)",
                action ? "" : "nothing",
                action ? (int)(action->via.str.size > 32 ? 32 : action->via.str.size) : 0,
                action ? action->via.str.ptr : "");
        return NULL;
    }
    if (kinds[a] != SC_KEYS) {
        struct scall *sc = scall_new(kinds[a], 0);
        sc->cols = cols;
        sc->rows = rows;
        return sc;
    }
    /* Words: one string, or a list of them. */
    const msgpack_object *words = keys;
    uint32_t nw = 1;
    if (keys && keys->type == MSGPACK_OBJECT_ARRAY) {
        words = keys->via.array.ptr;
        nw = keys->via.array.size;
    }
    size_t total = 0;
    for (uint32_t i = 0; keys && i < nw; i++) {
        if (words[i].type != MSGPACK_OBJECT_STR) {
            sp_errf(err, SP_BAD_REQUEST, "'keys' must be a string or a list of strings");
            return NULL;
        }
        total += words[i].via.str.size + 2; /* a key name never grows more */
    }
    if (!keys) {
        sp_errf(err, SP_BAD_REQUEST, "tmux send_keys needs 'keys'");
        return NULL;
    }
    if (total > MAX_KEYS) {
        sp_errf(err, SP_TOO_LARGE, "'keys' above %u bytes", MAX_KEYS);
        return NULL;
    }
    struct scall *sc = scall_new(SC_KEYS, total);
    for (uint32_t i = 0; i < nw; i++)
        sc->len += key_bytes(words[i].via.str.ptr, words[i].via.str.size, sc->data + sc->len);
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
    if (old)
        send_close(c, s, old);
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
    bool mine = sc->gen == s->generation;
    const msgpack_object *res = answer_ok(resp) ? sp_map_get(resp, "result") : NULL;
    bool alive = true, has_alive = false;
    struct sp_err e;
    if (res)
        has_alive = sp_get_bool(res, sc->kind == SC_BASH ? "session_alive" : "alive", false, &alive,
                                &e) == 1;
    /* not_found: the session went (a reset); the agent's bad_request
     * "session N has ended": its shell exited, the session is still listed */
    bool gone = agent_error(resp, "not_found", NULL),
         ended = agent_error(resp, "bad_request", "has ended");
    if ((sc->kind == SC_BASH || sc->kind == SC_START) && mine && !sc->retried &&
        (gone || ended || (sc->kind == SC_START && has_alive && !alive))) {
        /* The session went (a `reset` tool call) or its shell exited
         * between calls: a new one, the call again (once). */
        sc->retried = true;
        if (gone)
            *(sc->kind == SC_BASH ? &s->sess_bash : &s->sess_tmux) = 0;
        else
            drop_session(c, s, sc->kind != SC_BASH);
        run_head(c, s);
        return;
    }
    if (mine) {
        if (sc->kind == SC_BASH && has_alive && !alive)
            drop_session(c, s, false); /* `exit`: a new shell next time */
        if (sc->kind != SC_BASH && gone)
            s->sess_tmux = 0;
        else if (sc->kind == SC_KEYS && ended)
            drop_session(c, s, true);
    }
    TAILQ_REMOVE(&s->sq, r, slink);
    api_tool_answer(c, r, resp, err);
    run_head(c, s);
}

static void on_open(struct ctl *c, struct preq *o, const msgpack_object *resp,
                    const struct sp_err *err)
{
    struct slot *s = o->slot;
    struct preq *r = o->step_of;
    preq_free(c, o);
    struct scall *sc = r->ctx;
    bool pty = sc->kind == SC_START; /* the only call that opens a terminal */
    sc->sent = false;
    const msgpack_object *res = answer_ok(resp) ? sp_map_get(resp, "result") : NULL;
    uint64_t id = 0;
    struct sp_err e;
    bool opened = res && sp_get_uint(res, "session", true, &id, &e) == 1 && id;
    if (sc->detached) {
        /* Nobody waits for it: keep the session if the lease still has
         * none, else close it. */
        uint64_t *have = pty ? &s->sess_tmux : &s->sess_bash;
        if (opened && sc->gen == s->generation && s->ag->connected && !*have)
            *have = id;
        else if (opened && s->ag->connected)
            send_close(c, s, id);
        preq_free(c, r);
        return;
    }
    if (opened) {
        if (sc->gen == s->generation)
            *(pty ? &s->sess_tmux : &s->sess_bash) = id;
        run_head(c, s);
        return;
    }
    /* The agent's refusal (e.g. the slot's session limit) is the answer. */
    TAILQ_REMOVE(&s->sq, r, slink);
    api_answer(c, r, resp, err);
    preq_free(c, r);
    run_head(c, s);
}

static void send_open(struct ctl *c, struct slot *s, struct preq *r, bool pty, uint32_t cols,
                      uint32_t rows)
{
    struct preq *o = agent_req_new(s->ag, s, on_open);
    o->step_of = r;
    msgpack_packer pk;
    pack_head(s->ag, o, "session_open", &pk, pty ? 4 : 1);
    /* Named, so a restarted controller finds it again (stateful_adopt). */
    sp_pack_kv_str(&pk, "tag", pty ? "tmux" : "bash_stateful");
    if (pty) {
        sp_pack_kv_bool(&pk, "pty", true);
        sp_pack_kv_uint(&pk, "cols", cols);
        sp_pack_kv_uint(&pk, "rows", rows);
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

/* The next agent request for the call at the head of s's queue: 1 when
 * sent (its answer goes on), 0 with err when the call fails here. */
static int step(struct ctl *c, struct slot *s, struct preq *r, struct sp_err *err)
{
    struct agent *ag = s->ag;
    struct scall *sc = r->ctx;
    if (!ag->connected || ag->state == AG_STOPPING)
        return sp_errf(err, SP_AGENT_LOST, "agent %s is gone", ag->id), 0;
    if (s->state != SL_LEASED || s->generation != sc->gen)
        return sp_errf(err, SP_NOT_LEASED, "the slot was released"), 0;
    if (!r->conn)
        return sp_errf(err, SP_CANCELLED, "the trainer that sent it is gone"), 0;
    if (s->sess_gen != s->generation) {
        /* Sessions belong to a lease (the agent closes them at unlease). */
        s->sess_bash = s->sess_tmux = 0;
        s->sess_gen = s->generation;
    }
    if (!ev_is_active(&r->timer)) {
        /* Covers the session_open and a retry too. */
        sc->backstop_s = (sc->kind == SC_BASH ? (double)sc->timeout_ms / 1000.0 : 0) +
                         2 * SESSION_READY_S + CTL_BACKSTOP_S;
        ev_timer_init(&r->timer, backstop_cb, sc->backstop_s, 0);
        r->timer.data = r;
        ev_timer_start(c->loop, &r->timer);
    }
    sc->sent = true;
    r->aid = ++ag->next_id;
    msgpack_packer pk;
    switch (sc->kind) {
    case SC_BASH:
        if (!s->sess_bash) {
            send_open(c, s, r, false, 0, 0);
            return 1;
        }
        pack_head(ag, r, "session_exec", &pk, sc->timeout_ms ? 3 : 2);
        sp_pack_kv_uint(&pk, "session", s->sess_bash);
        sp_pack_kv_strn(&pk, "cmd", sc->data, sc->len);
        if (sc->timeout_ms)
            sp_pack_kv_uint(&pk, "timeout_ms", sc->timeout_ms);
        break;
    case SC_START:
        if (!s->sess_tmux) {
            send_open(c, s, r, true, sc->cols, sc->rows);
            return 1;
        }
        pack_head(ag, r, "session_screen", &pk, 1);
        sp_pack_kv_uint(&pk, "session", s->sess_tmux);
        break;
    case SC_KEYS:
    case SC_CAPTURE:
    case SC_STOP:
        if (!s->sess_tmux)
            return sp_errf(err, SP_NOT_FOUND, "no tmux session in this slot (action start first)"),
                   0;
        pack_head(ag, r,
                  sc->kind == SC_KEYS      ? "session_write"
                  : sc->kind == SC_CAPTURE ? "session_screen"
                                           : "session_close",
                  &pk, sc->kind == SC_KEYS ? 2 : 1);
        sp_pack_kv_uint(&pk, "session", s->sess_tmux);
        if (sc->kind == SC_KEYS)
            sp_pack_kv_bin(&pk, "data", sc->data, sc->len);
        if (sc->kind == SC_STOP)
            s->sess_tmux = 0;
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
        if (step(c, s, r, &e))
            return;
        TAILQ_REMOVE(&s->sq, r, slink);
        api_answer(c, r, NULL, &e);
        preq_free(c, r);
    }
}

void stateful_adopt(struct slot *s, const msgpack_object *sessions)
{
    s->sess_bash = s->sess_tmux = 0;
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
    struct scall *sc =
        sp_str_eq(tool, tool_len, "tmux")
            ? parse_tmux(args, err)
            : parse_bash(args, timeout_ms ? timeout_ms : s->ag->prof->exec_timeout_ms, err);
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
