/* Commands (exec.c): their processes, bounded output, waiters and results. */
#ifndef SLOT_EXEC_H
#define SLOT_EXEC_H

#include "agent.h"

/* Head + tail of one output stream: the first head_cap bytes, then a ring of
 * the last ring_cap bytes; everything between is only counted. */
struct outbuf {
    char *head;
    size_t head_len, head_cap, head_alloc;
    char *ring;
    size_t ring_cap;
    uint64_t total;
};

void outbuf_init(struct outbuf *ob, uint64_t max_output);
void outbuf_free(struct outbuf *ob);
void outbuf_append(struct outbuf *ob, const char *p, size_t n);
uint64_t outbuf_dropped(const struct outbuf *ob);
/* Pack as one bin: head, a "[... N bytes dropped ...]" line when needed, tail. */
void outbuf_pack(msgpack_packer *pk, const struct outbuf *ob);

struct exec {
    struct agent *ag;
    struct exec *next, *prev; /* in ag->running or ag->finished */
    uint64_t id;
    struct slot *slot;
    pid_t pid;
    int fds[2]; /* stdout, stderr read ends; -1 once at EOF */
    ev_io io[2];
    int in_fd;
    ev_io in_w;
    char *in_buf;
    size_t in_len, in_off;
    struct outbuf ob[2];
    ev_timer timer; /* wall-clock timeout */
    ev_timer idle;  /* idle timeout */
    ev_timer drain; /* bound on waiting for EOF after the main process ended */
    double t_start, t_end;
    double last_output;
    double idle_s;
    bool exited, finished, timed_out, idle_timed_out, cancelled, detached, network;
    bool keep_background; /* leftovers live on until the slot's reset */
    bool spawning;        /* sent to a box holder; pid not known yet */
    struct nsbox *box;    /* that holder */
    int box_ch;           /* and its channel (ns_box_send) */
    unsigned iso_want;    /* rungs asked for (the box's answer says which applied) */
    struct req *announce; /* detach or stream request told once the pid is known */
    bool output_released; /* delivered to its requester: only the result is kept */
    bool keyed;           /* its request had an idempotency key: output kept for repeats */
    unsigned iso_applied; /* rungs the child applied */
    int status;
    double finished_at;
    struct req *owner;       /* the exec request, until answered */
    struct req *attach;      /* exec_attach requests, via exec_next */
    struct warm_shell *warm; /* started through this warm shell (pid not known yet) */
    uint64_t warm_seq;       /* its request to the warm shell */
    bool warm_used;          /* it was (reported in the result) */
    bool disk_quota;         /* stopped for its slot's disk budget (quota_why) */
    char quota_why[160];
};

struct exec_params {
    const char *path;
    char **argv;
    char **envp;
    int cwd_fd;
    const char *cwd_path; /* the same directory by name, for a box */
    const char *stdin_data;
    size_t stdin_len;
    uint64_t timeout_ms, idle_timeout_ms, max_output;
    bool detach, network, keep_background;
    struct iso_child *iso;
    struct nsbox *box;       /* spawn through this slot box, or NULL */
    struct warm_shell *warm; /* fork from this warm shell, or NULL (cold) */
    const char *cmd;         /* the shell command, for the warm shell */
};

struct exec *exec_start(struct agent *ag, struct slot *s, struct req *owner,
                        const struct exec_params *p, struct sp_err *err);
struct exec *exec_find(struct agent *ag, uint64_t id);
/* Kill a running command; reason flags are set by the caller. */
unsigned exec_kill(struct exec *e);
/* Pack the result map; output bytes only when with_output. */
void exec_pack_result(msgpack_packer *pk, const struct exec *e, bool with_output);
/* Send retained output from the request's offsets as events, then live. */
void exec_replay(struct exec *e, struct req *rq);
void exec_add_attach(struct exec *e, struct req *rq);
/* Is a command still waiting for box's holder to say it started? (A
 * session's shell is spawned through the box synchronously only when not.) */
/* A command's answer is awaited on the box's holder channel (0). */
bool exec_box_pending(struct agent *ag, struct nsbox *box);
/* op_exec.c, shared with sessions: the isolation a command of s gets (reads
 * args.rlimits); the directory it starts in as it sees it (the workspace,
 * BOX_WORKSPACE in a box that shows it there, joined with rel, a checked
 * relative path or ""); and its clean environment with TERM=term and
 * PWD=cwd (one malloc'd block: free the returned array). */
int exec_isolation(struct req *rq, struct slot *s, bool network, struct iso_child *ic,
                   struct sp_err *err);
int exec_cwd(struct agent *ag, struct slot *s, const struct iso_child *ic, const char *rel,
             char *out, size_t cap, struct sp_err *err);
char **exec_env(struct agent *ag, struct slot *s, const msgpack_object *env_o, const char *term,
                const struct iso_child *ic, const char *cwd, struct sp_err *err);
/* op_exec.c: the answer of a detached exec: {exec_id, pid, detached}. */
void exec_reply_detached(struct req *rq, uint64_t exec_id, pid_t pid);
/* op_exec.c: tell the request the command started (detach reply, stream
 * "started" event). OP_DONE when the request is answered. */
int exec_announce(struct req *rq, struct exec *e);

#endif
