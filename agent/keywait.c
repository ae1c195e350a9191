/* A session_write that waits. A trainer typing a command into a terminal
 * wants to know when it has finished, and the only sign a terminal gives is
 * the shell's next prompt: the agent already sees it as the prompt marker
 * (session.c), so the write is answered when the first marker after its
 * bytes arrives. Which command a marker ends is not known; keys typed while
 * an earlier line still runs are answered at that line's prompt. */
#include "keywait.h"

static void answer(struct keywait *kw)
{
    struct req *rq = kw->rq;
    double ms = (agent_now_precise(rq->ag) - kw->t0) * 1000.0;
    kw->rq = NULL;
    ev_timer_stop(rq->ag->loop, &kw->timer);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 4);
    sp_pack_kv_uint(pk, "written", kw->written);
    sp_pack_kv_bool(pk, "prompt", kw->prompt);
    sp_pack_kv_uint(pk, "waited_ms", ms > 0 ? (uint64_t)ms : 0);
    sp_pack_kv_bool(pk, "alive", *kw->alive);
    req_reply_end(rq);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct keywait *kw = w->data;
    struct req *rq = kw->rq;
    if (!rq)
        return;
    double left = (kw->prompt || kw->max_s <= 0 ? kw->min_s : kw->max_s) -
                  (agent_now_precise(rq->ag) - kw->t0);
    if (left > 0.001) {
        /* The minimum is over but the prompt is not in: on to the deadline. */
        ev_timer_set(w, left, 0.0);
        ev_timer_start(loop, w);
        return;
    }
    answer(kw);
    req_finish(rq, NULL);
}

void keywait_init(struct keywait *kw, const bool *alive)
{
    kw->rq = NULL;
    kw->alive = alive;
    ev_init(&kw->timer, timer_cb);
    kw->timer.data = kw;
}

bool keywait_busy(const struct keywait *kw)
{
    return kw->rq != NULL;
}

int keywait_start(struct keywait *kw, struct req *rq, size_t written, uint64_t min_ms,
                  uint64_t prompt_ms)
{
    kw->rq = rq;
    kw->t0 = agent_now_precise(rq->ag);
    kw->written = written;
    kw->prompt = false;
    kw->min_s = (double)min_ms / 1000.0;
    /* Waiting for the prompt never ends before the minimum. */
    kw->max_s = prompt_ms ? (double)(prompt_ms > min_ms ? prompt_ms : min_ms) / 1000.0 : 0;
    if (!min_ms && !prompt_ms) {
        answer(kw);
        return OP_DONE;
    }
    ev_now_update(rq->ag->loop);
    ev_timer_set(&kw->timer, min_ms ? kw->min_s : kw->max_s, 0.0);
    ev_timer_start(rq->ag->loop, &kw->timer);
    return OP_PENDING;
}

void keywait_prompt(struct keywait *kw)
{
    struct req *rq = kw->rq;
    if (!rq || kw->prompt)
        return;
    kw->prompt = true;
    if (kw->max_s <= 0 || agent_now_precise(rq->ag) - kw->t0 < kw->min_s)
        return; /* the timer answers at the minimum */
    answer(kw);
    req_finish(rq, NULL);
}

void keywait_ended(struct keywait *kw)
{
    struct req *rq = kw->rq;
    if (!rq)
        return;
    answer(kw);
    req_finish(rq, NULL);
}

void keywait_cancel(struct keywait *kw, const struct sp_err *why)
{
    struct req *rq = kw->rq;
    if (!rq)
        return;
    kw->rq = NULL;
    ev_timer_stop(rq->ag->loop, &kw->timer);
    req_finish(rq, why);
}
