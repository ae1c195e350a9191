/* Starting a command: clone(CLONE_VM|CLONE_VFORK) into a child that only
 * makes raw system calls before execve, the way posix_spawn does, so a spawn
 * costs no page-table copy; unlike posix_spawn it leaves room for the
 * isolation steps that must run in the child. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "child.h"

static void child_close_from(int lowfd)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0) == 0)
        return;
#endif
    /* Everything is O_CLOEXEC anyway; this is the belt to those braces. */
    for (int fd = lowfd; fd < 1024; fd++)
        close(fd);
}

static int child_main(void *arg)
{
    struct spawn *sp = arg;
    /* Handlers of the agent must never run here: the memory is shared. The
     * parent blocked every signal before clone; reset dispositions, then
     * unblock. Ignored signals (SIGPIPE) would survive execve otherwise. */
    static const int sigs[] = {SIGPIPE, SIGCHLD, SIGTERM, SIGINT,
                               SIGHUP,  SIGQUIT, SIGUSR1, SIGUSR2};
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &dfl, NULL);
    if (setsid() < 0)
        goto fail;
    /* Orphans of the command stay under it while it runs, so a running
     * command's helpers are never mistaken for another command's leftovers;
     * the setting survives execve. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (dup2(sp->stdin_fd, 0) < 0 || dup2(sp->stdout_fd, 1) < 0 || dup2(sp->stderr_fd, 2) < 0)
        goto fail;
    /* A session's terminal: the new session (setsid above) takes the pty
     * slave it was handed as its controlling terminal, so its shell gets job
     * control and the agent can find the foreground process group. */
    if (sp->ctty && ioctl(0, TIOCSCTTY, 0) < 0)
        goto fail;
    if (sp->cwd_path ? chdir(sp->cwd_path) < 0 : sp->cwd_fd >= 0 && fchdir(sp->cwd_fd) < 0)
        goto fail;
    /* Before closing fds: the Landlock ruleset is one of them. */
    if (sp->iso && isolate_child(sp->iso) < 0) {
        errno = sp->iso->failed_errno;
        goto fail;
    }
    child_close_from(3);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(sp->path, sp->argv, sp->envp);
fail:
    sp->child_errno = errno;
    _exit(127);
}

pid_t child_spawn(struct spawn *sp)
{
    if (!sp->stack) {
        sp->child_errno = EINVAL;
        return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    sp->child_errno = 0;
    /* CLONE_VFORK: we resume once the child has exec'd or exited, so one
     * stack serves every spawn. */
    pid_t pid = clone(child_main, sp->stack + CHILD_STACK_SIZE,
                      CLONE_VM | CLONE_VFORK | SIGCHLD | sp->clone_flags, sp);
    int e = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        sp->child_errno = e;
        return -1;
    }
    return pid;
}

char *child_stack_alloc(void)
{
    char *st = mmap(NULL, CHILD_STACK_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    return st == MAP_FAILED ? NULL : st;
}
