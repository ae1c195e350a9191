/* A session_write that waits (keywait.c): answered no earlier than
 * min_wait_ms after its bytes were queued and, with wait_prompt_ms, once the
 * shell's prompt comes back after them (or when that wait ends). */
#ifndef SLOT_KEYWAIT_H
#define SLOT_KEYWAIT_H

#include "agent.h"

struct keywait {
    struct req *rq; /* the waiting session_write, or NULL */
    ev_timer timer;
    double t0;           /* when its bytes were queued */
    double min_s, max_s; /* answer no earlier; max_s > 0: wait for a prompt until then */
    size_t written;
    bool prompt;       /* a prompt came after the bytes */
    const bool *alive; /* the session's shell still runs */
};

void keywait_init(struct keywait *kw, const bool *alive);
bool keywait_busy(const struct keywait *kw);
/* rq wrote `written` bytes: answer it ({written, prompt, waited_ms, alive})
 * now when it asked for no wait (OP_DONE), else later (OP_PENDING). */
int keywait_start(struct keywait *kw, struct req *rq, size_t written, uint64_t min_ms,
                  uint64_t prompt_ms);
/* The shell printed its prompt marker. */
void keywait_prompt(struct keywait *kw);
/* The shell ended: no prompt will come. */
void keywait_ended(struct keywait *kw);
/* The session goes: the waiting request fails with why. */
void keywait_cancel(struct keywait *kw, const struct sp_err *why);

#endif
