/* Spawning one command (child.c). */
#ifndef SLOT_CHILD_H
#define SLOT_CHILD_H

#include <stdbool.h>
#include <sys/types.h>

#include "isolate/isolate.h"

#define CHILD_STACK_SIZE (64 * 1024)

struct spawn {
    char *stack; /* CHILD_STACK_SIZE bytes from child_stack_alloc */
    const char *path;
    char *const *argv;
    char *const *envp;
    int stdin_fd, stdout_fd, stderr_fd;
    int cwd_fd;            /* -1: stay */
    const char *cwd_path;  /* instead, chdir here by name (inside a box, where the agent's
                              fd would leave the command in the agent's mount tree) */
    struct iso_child *iso; /* isolation to apply, or NULL */
    int clone_flags;       /* extra clone flags (CLONE_PARENT from a box holder) */
    bool ctty;             /* stdin is a pty slave: make it the controlling terminal */
    /* Set by the child when execve failed (the child then exits 127). */
    volatile int child_errno;
};

/* Returns the pid, or -1 with sp->child_errno. A pid with child_errno != 0
 * means execve failed; the child has already exited with 127. */
pid_t child_spawn(struct spawn *sp);
char *child_stack_alloc(void);

#endif
