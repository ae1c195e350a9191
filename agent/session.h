/* Sessions (session.c): persistent shells in a slot, with or without a
 * terminal, their bounded output, and the commands run in them. */
#ifndef SLOT_SESSION_H
#define SLOT_SESSION_H

#include "exec.h"

/* How a session's shell is started (op_session.c fills it like exec). */
struct session_params {
    const char *path; /* the shell */
    char **argv;
    char **envp;
    int cwd_fd;
    const char *cwd_path; /* the same directory by name, for a box */
    struct iso_child *iso;
    struct nsbox *box; /* spawn through this slot box, or NULL */
    bool pty, bash;
    bool network; /* for a pty session's own Landlock ruleset */
    unsigned cols, rows;
    const char *tag; /* the opener's name for it, listed by `slots` */
    size_t tag_len;
};

/* Start a shell in s. With bash the session becomes ready once the shell
 * has run the agent's set-up line: opener is answered then (OP_PENDING);
 * other shells are ready at once (OP_DONE after the reply). -1 on error. */
int session_open(struct agent *ag, struct slot *s, struct req *opener,
                 const struct session_params *p, struct sp_err *err);
struct session *session_find(struct agent *ag, uint64_t id, struct sp_err *err);
unsigned session_slot_index(const struct session *ss);

/* Run cmd in the session's shell; rq is answered when the shell's prompt
 * marker comes back (or the shell ends). OP_PENDING, or -1. */
int session_exec(struct session *ss, struct req *rq, const char *cmd, size_t len,
                 uint64_t timeout_ms, uint64_t max_output, struct sp_err *err);
/* Queue bytes for the shell's input (the terminal, or the shell's stdin);
 * returns how many were taken (fewer when the input queue is full). */
int session_write(struct session *ss, const char *p, size_t n, size_t *taken, struct sp_err *err);
/* session_write for rq, answered {written, prompt, waited_ms, alive} no
 * earlier than min_ms and, with prompt_ms, when the shell's prompt comes
 * back after the bytes (at most prompt_ms). OP_DONE, OP_PENDING or -1 (one
 * waiting write per session: slot_busy). */
int session_write_wait(struct session *ss, struct req *rq, const char *p, size_t n, uint64_t min_ms,
                       uint64_t prompt_ms, struct sp_err *err);
/* Answer rq with output not read yet, waiting up to wait_ms for some. */
int session_read(struct session *ss, struct req *rq, size_t max, uint64_t wait_ms,
                 struct sp_err *err);
int session_resize(struct session *ss, unsigned cols, unsigned rows, struct sp_err *err);
/* The terminal's screen as session_screen answers it: 4 map pairs (rows,
 * cursor, size, alive: the shell still runs), 5 with history (the lines
 * that scrolled off), into pk (NULL: only check); -1 for a session without
 * a pty. */
int session_screen(struct session *ss, msgpack_packer *pk, bool history, struct sp_err *err);
/* The terminal's transcript from offset as session_log answers it (6 map
 * pairs, see transcript_pack) into pk (NULL: only check); -1 without a pty. */
int session_log(struct session *ss, msgpack_packer *pk, uint64_t offset, size_t max, bool lines,
                struct sp_err *err);
/* Signal the foreground of the session; the number of processes or groups
 * signalled. */
int session_signal(struct session *ss, int sig, unsigned *n, pid_t *pgid, struct sp_err *err);
/* Kill the session's processes and free it; pending requests get why. */
unsigned session_close(struct session *ss, const struct sp_err *why);

/* Op session_log (op_session.c): declared here, beside the session ops'
 * helpers, so that the op table finds it. */
int op_session_log(struct req *rq, struct sp_err *err);

/* For slots: one map per session of s. */
void sessions_pack(msgpack_packer *pk, const struct slot *s);
/* The pid was a session's shell (now reaped). */
bool session_child_exit(struct agent *ag, pid_t pid, int status);
bool session_is_shell(struct agent *ag, pid_t pid);
/* Close every session of s (reset, shutdown); processes signalled. */
unsigned sessions_close_slot(struct agent *ag, struct slot *s);

#endif
