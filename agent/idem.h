/* Idempotency keys (idem.c): a repeated request with the key of one already
 * seen attaches to the first run instead of running again. */
#ifndef SLOT_IDEM_H
#define SLOT_IDEM_H

#include "agent.h"

#define IDEM_KEY_MAX 128
#define IDEM_WINDOW_S 600.0
#define IDEM_MAX_KEYS 65536u
#define IDEM_MAX_BYTES (64ull << 20)

/* main.c: the table, with its bounds (0: the defaults above). */
int idem_init(struct agent *ag, unsigned max_keys, uint64_t max_bytes, double window_s);
/* main.c, at exit after the connections are closed: forget every key. */
void idem_free(struct agent *ag);
/* main.c, from the periodic sweep: drop entries past their window. */
void idem_sweep(struct agent *ag);

/* dispatch.c: a validated, authorised request carrying `key` has arrived
 * (rq->conn set). 0: run it (its key is now remembered when its op has
 * OPF_IDEM); 1: it was a repeat and is answered or waiting (do not run). */
int idem_arrive(struct req *rq, const char *key, size_t len);
/* dispatch.c: the final success frame of rq has been packed (body is the
 * msgpack map; NULL when it could not be queued). */
void idem_capture(struct req *rq, const char *body, size_t len);
/* dispatch.c (req_finish): rq has had its final answer (err: the error
 * sent), so its key's repeats get that answer. */
void idem_finished(struct req *rq, const struct sp_err *err);
/* dispatch.c (req_free): rq goes without having been answered, e.g. it was
 * queued when its connection closed: its key is forgotten, or a repeat
 * waiting on it runs instead. */
void idem_dropped(struct req *rq);
/* conn.c: repeats waiting on c go (they never ran; the client resends). */
void idem_conn_gone(struct agent *ag, struct conn *c);

/* exec.c: the command of a keyed exec request has started (pid known):
 * repeats waiting for it attach to it from now on. */
void idem_exec_started(struct req *first, struct exec *e);

/* op_slots.c: hello's `idempotency` map, and stats' three counters (packs
 * three key/value pairs). */
void idem_pack_info(msgpack_packer *pk, const struct agent *ag);
void idem_pack_stats(msgpack_packer *pk, const struct agent *ag);

#endif
