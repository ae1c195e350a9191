/* The messages between the agent (warm.c) and its warm shells
 * (warm_builtin.c), one per SOCK_SEQPACKET datagram. Both ends are built
 * from this tree, so the layout is plain structs. */
#ifndef SLOT_WARM_WIRE_H
#define SLOT_WARM_WIRE_H

#include <stdint.h>

#define WARM_MAGIC 0x736c7731u /* "slw1" */
#define WARM_LIMITS 5          /* cpu, as, nproc, fsize, nofile (isolate.h's order) */
#define WARM_MAX_PAYLOAD (48u * 1024)
#define WARM_CMD_NAME "__slot_warm"
/* Room in the warm shell's argument area for a command's `SHELL -c CMD`
 * (its script ends in a comment this long); longer commands run cold. Each
 * command clears the whole area, so it stays within about one page: a 16
 * KiB area cost 0.07 ms per command at p50. */
#define WARM_ARGS_ROOM 3800

/* Flags of a request. */
#define WARM_CWD_FD 1u    /* chdir to the passed descriptor, else to the path */
#define WARM_LIMITS_ON 2u /* lower the rlimits to lim[] */
#define WARM_SCOPE                                                                                 \
    4u /* a Landlock domain of its own scoping signals and abstract                                \
          sockets (ABI 6), as a cold command's */

/* Agent to shell: start one command. Payload: the command, the directory
 * it starts in (by name: PWD and, without WARM_CWD_FD, the chdir), then
 * nenv NAME=VALUE strings the environment differs in from the shell's own;
 * each NUL-ended. Descriptors: stdin, stdout, stderr, and with WARM_CWD_FD
 * the directory. */
struct warm_req {
    uint32_t magic;
    uint32_t len;
    uint32_t nenv;
    uint32_t flags;
    uint64_t seq; /* echoed in the answer */
    struct {
        uint64_t cur, max; /* RLIM_INFINITY as ~0 */
    } lim[WARM_LIMITS];
};

/* To the agent, whose end has SO_PASSCRED: the kernel adds each sender's
 * pid as the agent sees it. The shell says it is ready (ready = 1) once;
 * then each command, once set up and before it runs, sends {seq, err 0}
 * itself, so its credentials carry its pid. A command that could not be
 * set up, or a clone that failed, sends err (an errno). A command runs only
 * after its answer is sent: one whose answer never comes never ran. */
struct warm_rep {
    uint32_t magic;
    int32_t err;
    uint64_t seq;
    int32_t ready;
    int32_t pad;
};

#endif
