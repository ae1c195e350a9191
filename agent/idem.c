/* Idempotency keys. Owns the one table of keys that clients gave with
 * requests whose effects must not happen twice (ops flagged OPF_IDEM) and
 * decides what a repeat of such a request gets: the first run's answer under
 * the repeat's own id, a wait for the first run to answer, or (exec) an
 * attach to the first run's command. A repeat never runs its handler.
 *
 * The table: entries in a chained hash table keyed by the key string, on a
 * list of running ones and a list of done ones oldest first (window expiry
 * and the count bound drop from its head); the cached answers (a list of
 * their own, oldest first, for the byte bound); the keys the count bound
 * pushed out before their window ended (only a hash each: enough to refuse
 * running them again); and the counters `stats` reports. All of it lives in
 * struct idem, reached from the agent context.
 *
 * Hooks: dispatch.c (arrival, the final answer's frame, the end of a
 * request, a request dropped unanswered), conn.c (repeats of a closed
 * connection), exec.c (a keyed exec's command started), main.c (sweep). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "exec.h"
#include "idem.h"

struct idem_entry {
    struct idem_entry *hnext;         /* hash chain */
    struct idem_entry *prev, *next;   /* running list, or done list oldest first */
    struct idem_entry *cprev, *cnext; /* done with a cached answer, oldest first */
    uint64_t hash;
    struct req *first;                  /* the request running under the key */
    struct req *waiters, *waiters_tail; /* repeats waiting (idem_next), oldest first */
    char *answer;                       /* the final answer, a msgpack map */
    size_t answer_len;
    uint64_t exec_id; /* exec: its command, once started */
    int64_t pid;
    double done_at;
    unsigned op;   /* op table index of the first */
    bool done;     /* the final answer went out */
    bool answered; /* its frame was seen (idem_capture) */
    bool has_exec, detached;
    bool lost;   /* done, but the answer is not kept (bounds, out of memory) */
    bool orphan; /* the first was dropped before it ran: a waiter takes over */
    unsigned char key_len;
    char key[];
};

/* A key the count bound pushed out before its window ended: 40 bytes where
 * its entry took a few hundred (and its answer up to max_frame), so up to
 * GONE_PER_KEY of them are kept per entry, oldest dropped first. */
#define GONE_PER_KEY 4u
struct idem_gone {
    struct idem_gone *hnext, *next;
    uint64_t hash;
    double expires;
    unsigned op;
};

struct idem {
    struct agent *ag;
    uint64_t seed;
    size_t nbuckets; /* a power of two; the gone table has GONE_PER_KEY times more */
    struct idem_entry **buckets;
    struct idem_gone **gbuckets;
    struct idem_entry *running;
    struct idem_entry *done_head, *done_tail;
    struct idem_entry *cached_head, *cached_tail;
    struct idem_gone *gone_head, *gone_tail;
    unsigned nentries, ngone;
    uint64_t bytes, hits;
    unsigned max_keys;
    uint64_t max_bytes;
    double window;
    ev_timer promote_w; /* starts waiters of orphaned entries, outside any caller's loop */
};

static void promote_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* ---- keys ---------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Seeded per agent start, so chains cannot be lined up in advance. */
static uint64_t key_hash(const struct idem *id, const char *k, size_t n)
{
    uint64_t h = mix64(id->seed ^ (uint64_t)n);
    for (; n >= 8; k += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, k, 8);
        h = mix64(h ^ v) + 0x9e3779b97f4a7c15ull;
    }
    uint64_t v = 0;
    memcpy(&v, k, n);
    return mix64(h ^ v ^ ((uint64_t)n << 59));
}

/* The key as messages show it: bytes that are not printable ASCII as \xNN,
 * so that an error message stays valid UTF-8 whatever the key holds. */
static const char *key_show(const char *k, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        unsigned char ch = (unsigned char)k[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\')
            out[o++] = (char)ch;
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
    }
    out[o] = 0;
    return out;
}

/* ---- the tables ------------------------------------------------------------ */

static struct idem_entry *entry_find(struct idem *id, uint64_t h, const char *k, size_t n)
{
    for (struct idem_entry *en = id->buckets[h & (id->nbuckets - 1)]; en; en = en->hnext)
        if (en->hash == h && en->key_len == n && !memcmp(en->key, k, n))
            return en;
    return NULL;
}

static size_t gone_bucket(const struct idem *id, uint64_t h)
{
    return (size_t)(h & (id->nbuckets * GONE_PER_KEY - 1));
}

static struct idem_gone *gone_find(struct idem *id, uint64_t h)
{
    for (struct idem_gone *g = id->gbuckets[gone_bucket(id, h)]; g; g = g->hnext)
        if (g->hash == h)
            return g;
    return NULL;
}

static void gone_drop_oldest(struct idem *id)
{
    struct idem_gone *g = id->gone_head;
    struct idem_gone **pp = &id->gbuckets[gone_bucket(id, g->hash)];
    while (*pp != g)
        pp = &(*pp)->hnext;
    *pp = g->hnext;
    id->gone_head = g->next;
    if (!id->gone_head)
        id->gone_tail = NULL;
    id->ngone--;
    free(g);
}

/* Expiry times only grow (entries are pushed out in the order they were
 * done), so the list stays oldest first. */
static void gone_add(struct idem *id, uint64_t h, unsigned op, double expires)
{
    if (id->ngone >= GONE_PER_KEY * id->max_keys)
        gone_drop_oldest(id);
    struct idem_gone *g = malloc(sizeof *g);
    if (!g)
        return; /* out of memory: a repeat of this key would run again */
    g->hash = h;
    g->op = op;
    g->expires = expires;
    g->next = NULL;
    size_t b = gone_bucket(id, h);
    g->hnext = id->gbuckets[b];
    id->gbuckets[b] = g;
    if (id->gone_tail)
        id->gone_tail->next = g;
    else
        id->gone_head = g;
    id->gone_tail = g;
    id->ngone++;
}

static void cached_del(struct idem *id, struct idem_entry *en)
{
    if (en->cprev)
        en->cprev->cnext = en->cnext;
    else if (id->cached_head == en)
        id->cached_head = en->cnext;
    else
        return; /* not on the list */
    if (en->cnext)
        en->cnext->cprev = en->cprev;
    else
        id->cached_tail = en->cprev;
    en->cprev = en->cnext = NULL;
}

static void drop_answer(struct idem *id, struct idem_entry *en)
{
    cached_del(id, en);
    id->bytes -= en->answer_len;
    free(en->answer);
    en->answer = NULL;
    en->answer_len = 0;
    en->lost = true;
}

/* Unlink from the running or the done list. */
static void order_del(struct idem *id, struct idem_entry *en)
{
    if (en->prev)
        en->prev->next = en->next;
    else if (en->done)
        id->done_head = en->next;
    else
        id->running = en->next;
    if (en->next)
        en->next->prev = en->prev;
    else if (en->done)
        id->done_tail = en->prev;
    en->prev = en->next = NULL;
}

/* remember: the key stays known as one that ran (pushed out by the count
 * bound inside its window), rather than forgotten (expired, never ran). */
static void entry_free(struct idem *id, struct idem_entry *en, bool remember)
{
    struct idem_entry **pp = &id->buckets[en->hash & (id->nbuckets - 1)];
    while (*pp != en)
        pp = &(*pp)->hnext;
    *pp = en->hnext;
    order_del(id, en);
    cached_del(id, en);
    id->bytes -= en->answer_len;
    free(en->answer);
    if (remember && en->done)
        gone_add(id, en->hash, en->op, en->done_at + id->window);
    id->nentries--;
    free(en);
}

static struct idem_entry *entry_new(struct idem *id, struct req *rq, uint64_t h, const char *k,
                                    size_t n)
{
    if (id->nentries >= id->max_keys) {
        /* Running entries are bounded by the in-flight limits and must stay:
         * their repeats have to find them. */
        if (!id->done_head) {
            log_warn("idempotency: all %u keys belong to requests still running; key of "
                     "request %llu not remembered",
                     id->max_keys, (unsigned long long)rq->id);
            return NULL;
        }
        entry_free(id, id->done_head, true);
    }
    struct idem_entry *en = calloc(1, sizeof *en + n);
    if (!en) {
        log_warn("idempotency: out of memory; key of request %llu not remembered",
                 (unsigned long long)rq->id);
        return NULL;
    }
    en->hash = h;
    en->op = rq->op_index;
    en->key_len = (unsigned char)n;
    memcpy(en->key, k, n);
    en->first = rq;
    rq->idem = en;
    size_t b = h & (id->nbuckets - 1);
    en->hnext = id->buckets[b];
    id->buckets[b] = en;
    en->next = id->running;
    if (id->running)
        id->running->prev = en;
    id->running = en;
    id->nentries++;
    return en;
}

/* Running -> done: the window starts, the answer counts against the byte
 * bound (oldest answers dropped first). */
static void entry_done(struct idem *id, struct idem_entry *en)
{
    order_del(id, en);
    en->done = true;
    en->done_at = ev_now(id->ag->loop);
    en->prev = id->done_tail;
    if (id->done_tail)
        id->done_tail->next = en;
    else
        id->done_head = en;
    id->done_tail = en;
    if (en->answer) {
        en->cprev = id->cached_tail;
        if (id->cached_tail)
            id->cached_tail->cnext = en;
        else
            id->cached_head = en;
        id->cached_tail = en;
    }
    while (id->bytes > id->max_bytes && id->cached_head)
        drop_answer(id, id->cached_head);
}

static void waiter_push(struct idem_entry *en, struct req *rq)
{
    rq->idem_next = NULL;
    if (en->waiters_tail)
        en->waiters_tail->idem_next = rq;
    else
        en->waiters = rq;
    en->waiters_tail = rq;
}

static struct req *waiter_pop(struct idem_entry *en)
{
    struct req *rq = en->waiters;
    if (rq) {
        en->waiters = rq->idem_next;
        if (!en->waiters)
            en->waiters_tail = NULL;
        rq->idem_next = NULL;
    }
    return rq;
}

/* ---- answering repeats ------------------------------------------------------ */

static void fail_gone(struct idem *id, struct req *rq, const char *k, size_t n)
{
    char shown[4 * IDEM_KEY_MAX + 1];
    struct sp_err err;
    sp_errf(&err, SP_NOT_FOUND,
            "request key %s ran once already; its result is no longer kept (window %.0f s)",
            key_show(k, n, shown, sizeof shown), id->window);
    req_finish(rq, &err);
}

static void fail_other_op(struct req *rq, const char *k, size_t n, unsigned op)
{
    char shown[4 * IDEM_KEY_MAX + 1];
    struct sp_err err;
    sp_errf(&err, SP_BAD_REQUEST, "key %s was used for %s", key_show(k, n, shown, sizeof shown),
            op_table[op].name);
    req_finish(rq, &err);
}

/* The first run's answer with the repeat's id in place of the first's. */
static void reply_cached(struct req *rq, const struct idem_entry *en)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    if (msgpack_unpack_next(&u, en->answer, en->answer_len, &off) != MSGPACK_UNPACK_SUCCESS ||
        u.data.type != MSGPACK_OBJECT_MAP) {
        msgpack_unpacked_destroy(&u);
        struct sp_err err;
        sp_errf(&err, SP_INTERNAL, "the kept answer of this key cannot be decoded");
        req_finish(rq, &err);
        return;
    }
    const msgpack_object_map *m = &u.data.via.map;
    msgpack_packer *pk = req_frame_begin(rq);
    msgpack_pack_map(pk, m->size);
    for (uint32_t i = 0; i < m->size; i++) {
        const msgpack_object *k = &m->ptr[i].key;
        msgpack_pack_object(pk, *k);
        if (k->type == MSGPACK_OBJECT_STR && sp_str_eq(k->via.str.ptr, k->via.str.size, "id"))
            msgpack_pack_uint64(pk, rq->id);
        else
            msgpack_pack_object(pk, m->ptr[i].val);
    }
    req_reply_end(rq);
    msgpack_unpacked_destroy(&u);
    req_finish(rq, NULL);
}

static void reply_detached(struct req *rq, const struct idem_entry *en)
{
    exec_reply_detached(rq, en->exec_id, en->pid);
    req_finish(rq, NULL);
}

/* A repeat of an exec becomes an attach to its command: with `stream`, a
 * `started` event and the output from the envelope's `resume` offsets, then
 * live output and the result without output (as a streamed exec ends);
 * without, just the result with its output (as the first run got it). */
static void attach(struct req *rq, struct exec *e)
{
    rq->stream = arg_bool(rq, "stream", false);
    rq->out_off = rq->resume_out;
    rq->err_off = rq->resume_err;
    if (rq->stream) {
        msgpack_packer *pk = req_event_begin(rq, "started", 2);
        sp_pack_kv_uint(pk, "exec_id", e->id);
        sp_pack_kv_int(pk, "pid", e->pid);
        req_event_end(rq);
        exec_replay(e, rq);
    }
    if (!e->finished) {
        exec_add_attach(e, rq);
        return;
    }
    exec_pack_result(req_reply_begin(rq), e, !rq->stream);
    req_reply_end(rq);
    req_finish(rq, NULL);
}

/* Answer (or park) a repeat of en's key. false: nothing of the first run
 * is left to give (answered not_found). */
static bool serve(struct idem *id, struct idem_entry *en, struct req *rq)
{
    if (en->answer) {
        reply_cached(rq, en);
        return true;
    }
    if (en->has_exec && en->detached) {
        reply_detached(rq, en);
        return true;
    }
    if (en->has_exec) {
        struct exec *e = exec_find(id->ag, en->exec_id);
        if (!e) {
            fail_gone(id, rq, en->key, en->key_len);
            return false;
        }
        attach(rq, e);
        return true;
    }
    if (!en->done) {
        waiter_push(en, rq);
        return true;
    }
    fail_gone(id, rq, en->key, en->key_len);
    return false;
}

int idem_arrive(struct req *rq, const char *key, size_t len)
{
    struct idem *id = rq->ag->idem;
    if (!id || !(rq->op->flags & OPF_IDEM))
        return 0;
    double now = ev_now(id->ag->loop);
    uint64_t h = key_hash(id, key, len);
    struct idem_entry *en = entry_find(id, h, key, len);
    if (en && en->done && now >= en->done_at + id->window) {
        entry_free(id, en, false); /* expired, the sweep has not come by yet */
        en = NULL;
    }
    if (!en) {
        struct idem_gone *g = gone_find(id, h);
        if (!g || now >= g->expires) {
            entry_new(id, rq, h, key, len);
            return 0;
        }
        if (g->op != rq->op_index)
            fail_other_op(rq, key, len, g->op);
        else
            fail_gone(id, rq, key, len);
        return 1;
    }
    if (en->op != rq->op_index) {
        fail_other_op(rq, key, len, en->op);
        return 1;
    }
    log_debug("request %llu (%s) repeats a key: %s", (unsigned long long)rq->id, rq->op->name,
              en->done ? "answered from the first run" : "joins the first run");
    if (serve(id, en, rq))
        id->hits++;
    return 1;
}

/* ---- the first run's end ------------------------------------------------------ */

void idem_capture(struct req *rq, const char *body, size_t len)
{
    struct idem_entry *en = rq->idem;
    if (!en || en->answered)
        return;
    struct idem *id = rq->ag->idem;
    en->answered = true;
    /* An exec result is served from the command's record (retained with
     * its output): a second copy of up to twice max_output is not kept. */
    if (en->has_exec)
        return;
    if (!body || len > id->max_bytes || !(en->answer = malloc(len))) {
        en->lost = true;
        return;
    }
    memcpy(en->answer, body, len);
    en->answer_len = len;
    id->bytes += len;
}

static void capture_error(struct idem *id, struct idem_entry *en, uint64_t rid,
                          const struct sp_err *err)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    sp_pack_error(&pk, rid, err);
    en->answered = true;
    if (!sb.data || sb.size > id->max_bytes) {
        msgpack_sbuffer_destroy(&sb);
        en->lost = true;
        return;
    }
    en->answer_len = sb.size;
    en->answer = msgpack_sbuffer_release(&sb);
    id->bytes += en->answer_len;
}

static void entry_finish(struct idem *id, struct idem_entry *en, uint64_t rid,
                         const struct sp_err *err)
{
    en->first = NULL;
    en->orphan = false;
    if (err && !en->answered)
        capture_error(id, en, rid, err);
    else if (!en->answered)
        en->lost = true;
    entry_done(id, en);
    /* Taken off the entry first: answering one may close connections,
     * whose clean-up walks the waiters of running entries. */
    struct req *list = en->waiters;
    en->waiters = en->waiters_tail = NULL;
    while (list) {
        struct req *w = list;
        list = w->idem_next;
        w->idem_next = NULL;
        serve(id, en, w);
    }
}

void idem_finished(struct req *rq, const struct sp_err *err)
{
    struct idem_entry *en = rq->idem;
    if (!en)
        return;
    rq->idem = NULL;
    entry_finish(rq->ag->idem, en, rq->id, err);
}

void idem_dropped(struct req *rq)
{
    struct idem_entry *en = rq->idem;
    if (!en)
        return;
    struct idem *id = rq->ag->idem;
    rq->idem = NULL;
    en->first = NULL;
    if (en->answered) {
        entry_finish(id, en, rq->id, NULL);
        return;
    }
    if (!en->waiters) {
        entry_free(id, en, false); /* never ran: a repeat runs it */
        return;
    }
    /* A repeat waiting on it runs it instead, from the loop: this may be in
     * the middle of walking a slot's queue. */
    en->orphan = true;
    if (!ev_is_active(&id->promote_w))
        ev_timer_start(id->ag->loop, &id->promote_w);
}

static void promote_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct idem *id = w->data;
    for (;;) {
        /* The oldest first (the list is newest first), so that repeats
         * keep their firsts' order; from the head each time: running a
         * request may finish entries. */
        struct idem_entry *en = NULL;
        for (struct idem_entry *x = id->running; x; x = x->next)
            if (x->orphan)
                en = x;
        if (!en)
            break;
        en->orphan = false;
        struct req *rq = waiter_pop(en);
        if (!rq) {
            entry_free(id, en, false);
            continue;
        }
        log_debug("request %llu (%s) runs its key: the first request was dropped unrun",
                  (unsigned long long)rq->id, rq->op->name);
        en->first = rq;
        rq->idem = en;
        req_start(rq);
    }
}

void idem_conn_gone(struct agent *ag, struct conn *c)
{
    struct idem *id = ag->idem;
    if (!id)
        return;
    struct idem_entry *next;
    for (struct idem_entry *en = id->running; en; en = next) {
        next = en->next;
        struct req *keep = NULL, *keep_tail = NULL, *rq;
        while ((rq = waiter_pop(en))) {
            if (rq->conn != c) {
                if (keep_tail)
                    keep_tail->idem_next = rq;
                else
                    keep = rq;
                keep_tail = rq;
                continue;
            }
            conn_req_del(c, rq);
            req_free(rq);
        }
        en->waiters = keep;
        en->waiters_tail = keep_tail;
        if (en->orphan && !en->waiters)
            entry_free(id, en, false);
    }
}

void idem_exec_started(struct req *first, struct exec *e)
{
    struct idem_entry *en = first->idem;
    if (!en || first->op->fn != op_exec)
        return;
    en->has_exec = true;
    en->exec_id = e->id;
    en->pid = e->pid;
    en->detached = e->detached;
    e->keyed = true;
    struct req *list = en->waiters;
    en->waiters = en->waiters_tail = NULL;
    while (list) {
        struct req *w = list;
        list = w->idem_next;
        w->idem_next = NULL;
        if (en->detached)
            reply_detached(w, en);
        else
            attach(w, e);
    }
}

/* ---- life ------------------------------------------------------------------ */

int idem_init(struct agent *ag, unsigned max_keys, uint64_t max_bytes, double window_s)
{
    struct idem *id = calloc(1, sizeof *id);
    if (!id)
        return -1;
    id->ag = ag;
    id->max_keys = max_keys ? max_keys : IDEM_MAX_KEYS;
    id->max_bytes = max_bytes ? max_bytes : IDEM_MAX_BYTES;
    id->window = window_s > 0 ? window_s : IDEM_WINDOW_S;
    /* Chains of two at most on average when full; untouched buckets cost
     * no memory until used (calloc of a large block maps zero pages). */
    id->nbuckets = 64;
    while (id->nbuckets < id->max_keys / 2)
        id->nbuckets *= 2;
    id->buckets = calloc(id->nbuckets, sizeof *id->buckets);
    id->gbuckets = calloc(id->nbuckets * GONE_PER_KEY, sizeof *id->gbuckets);
    if (!id->buckets || !id->gbuckets) {
        free(id->buckets);
        free(id->gbuckets);
        free(id);
        return -1;
    }
    if (getrandom(&id->seed, sizeof id->seed, 0) != sizeof id->seed)
        id->seed = ag->instance;
    ev_timer_init(&id->promote_w, promote_cb, 0.0, 0.0);
    id->promote_w.data = id;
    ag->idem = id;
    return 0;
}

void idem_free(struct agent *ag)
{
    struct idem *id = ag->idem;
    if (!id)
        return;
    ev_timer_stop(ag->loop, &id->promote_w);
    ag->idem = NULL;
    while (id->running) {
        struct idem_entry *en = id->running;
        if (en->first)
            en->first->idem = NULL;
        struct req *rq;
        while ((rq = waiter_pop(en))) {
            if (rq->conn)
                conn_req_del(rq->conn, rq);
            req_free(rq);
        }
        entry_free(id, en, false);
    }
    while (id->done_head)
        entry_free(id, id->done_head, false);
    while (id->gone_head)
        gone_drop_oldest(id);
    free(id->buckets);
    free(id->gbuckets);
    free(id);
}

void idem_sweep(struct agent *ag)
{
    struct idem *id = ag->idem;
    if (!id)
        return;
    double now = ev_now(ag->loop);
    while (id->done_head && now >= id->done_head->done_at + id->window)
        entry_free(id, id->done_head, false);
    while (id->gone_head && now >= id->gone_head->expires)
        gone_drop_oldest(id);
}

void idem_pack_info(msgpack_packer *pk, const struct agent *ag)
{
    const struct idem *id = ag->idem;
    msgpack_pack_map(pk, 2);
    sp_pack_kv_uint(pk, "window_s", id ? (uint64_t)id->window : (uint64_t)IDEM_WINDOW_S);
    sp_pack_kv_uint(pk, "max_keys", id ? id->max_keys : IDEM_MAX_KEYS);
}

void idem_pack_stats(msgpack_packer *pk, const struct agent *ag)
{
    const struct idem *id = ag->idem;
    sp_pack_kv_uint(pk, "idem_keys", id ? id->nentries : 0);
    sp_pack_kv_uint(pk, "idem_hits", id ? id->hits : 0);
    sp_pack_kv_uint(pk, "idem_bytes", id ? id->bytes : 0);
}
