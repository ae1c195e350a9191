/* Warm shells (warm.c): per slot and network setting, a bash started and
 * isolated once that forks each stateless `exec` instead of a new shell
 * being spawned for it. */
#ifndef SLOT_WARM_H
#define SLOT_WARM_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "isolate/isolate.h"

struct agent;
struct slot;
struct req;

#define WARM_WAITERS 8

struct warm_shell {
    pid_t pid;        /* the shell, the agent's own child; 0: none; -1: reaped, draining */
    int sock;         /* our end of its socket, -1 */
    ev_io w;          /* its answers */
    bool ready;       /* it said it serves */
    bool stopping;    /* being forgotten: nothing more is sent to it */
    bool draining;    /* lost: reading its commands' last answers */
    bool served;      /* it was ready once: its end is no failed start */
    char **env;       /* its environment (one block from exec_env) */
    unsigned applied; /* the rungs it (and so every command it forks) runs under */
    unsigned fails;   /* starts in a row that ended before it was ready */
    bool scope;       /* each command gets a Landlock domain of its own (ABI 6) */
    unsigned pending; /* requests sent, not answered */
    uint64_t seq;     /* of the last request sent */
    ev_timer wd;      /* a shell that stops answering (or starting) is replaced */
    struct req *waiting[WARM_WAITERS]; /* execs waiting for it to be ready */
    unsigned nwaiting;
    struct slot *slot;
};

/* Per agent: whether the path is on and why not. */
struct warm_state {
    bool off;       /* --no-warm */
    bool active;    /* the shell loads the builtin: warm shells can serve */
    char why[240];  /* why not active */
    int so_fd;      /* memfd holding the builtin */
    uint64_t execs; /* commands started warm */
    uint64_t starts;
    bool bypass; /* re-running requests a lost shell had not started: go cold */
    char *buf;   /* one request being built */
};

/* At start-up: load the builtin into a memfd and check that the shell takes
 * it (one spawn). Sets ag->warm.active or .why. */
void warm_init(struct agent *ag);
void warm_free(struct agent *ag);
/* --probe: the same check, as a line of text or a JSON member (",
 * \"warm\": {...}") into out. */
void warm_probe_report(struct agent *ag, bool json, char *out, size_t cap);
/* The warm shell to start this command through, or NULL (cold path): the
 * shell is ready and the command line fits (warm_send checks the
 * environment). When the slot has no shell, it starts one and
 * *wait says the request may wait for it (warm_wait). */
struct warm_shell *warm_pick(struct agent *ag, struct slot *s, bool network,
                             const struct iso_child *ic, size_t cmd_len, bool *wait);
/* Park rq until the slot's starting shell is ready (then it runs again,
 * warm) or is lost (then it runs cold). false: no room, run it now. */
bool warm_wait(struct agent *ag, struct slot *s, bool network, struct req *rq);
/* Run an exec request (again) and finish it if that ends it; with cold,
 * past the warm shells. */
void warm_rerun(struct agent *ag, struct req *rq, bool cold);
/* Send one command: its descriptors (stdin, stdout, stderr), directory (by
 * fd outside a box, else by name), limits and environment; *seq is what its
 * answer will carry. */
int warm_send(struct agent *ag, struct warm_shell *w, const char *cmd, const char *cwd, int cwd_fd,
              char **envp, const struct rlimit *lim, const int fds[3], uint64_t *seq,
              struct sp_err *err);
/* Read one message: 0 with the request's *seq and *pid (the agent's view)
 * or *err_no; 1 when there is none; 2 when the shell said it is ready; -1
 * when it is gone or broke the protocol. */
int warm_recv(struct agent *ag, struct warm_shell *w, uint64_t *seq, pid_t *pid, int *err_no);
bool warm_is_shell(struct agent *ag, pid_t pid);
/* A child exited: was it a warm shell? Then forget it. */
bool warm_exited(struct agent *ag, pid_t pid);
/* Kill a warm shell, or the slot's (its workspace or box is going). */
void warm_stop(struct agent *ag, struct warm_shell *w);
/* It misbehaved (stopped answering, broke the protocol): kill it and run
 * what it had not started the cold way. */
void warm_lost(struct agent *ag, struct warm_shell *w);
/* Its socket reached EOF or broke. */
void warm_closed(struct agent *ag, struct warm_shell *w);
/* An answer arrived: one request fewer outstanding. */
void warm_answered(struct agent *ag, struct warm_shell *w);
void warm_stop_slot(struct agent *ag, struct slot *s);
/* hello / --probe. */
void warm_pack(struct agent *ag, msgpack_packer *pk);

/* exec.c. What becomes of the commands a warm shell was sent and never
 * answered for: reset or stop (cancelled), never ran (their requests run
 * again, cold), or unknown (they fail). */
enum warm_gone { WARM_CANCEL, WARM_RETRY, WARM_UNKNOWN };
void exec_warm_readable(struct agent *ag, struct warm_shell *w);
void exec_warm_gone(struct agent *ag, struct warm_shell *w, enum warm_gone how);

#endif
