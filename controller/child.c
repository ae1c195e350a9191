/* Agent processes the controller forks (the local backend's stdio agents,
 * the exec backend's launchers): the stream on a socketpair, stderr read
 * into the agent's tail, the exit status in words, and freeing the agent
 * from the loop once its process is gone. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctl.h"

void child_reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
}

void child_status_text(int st, char *out, size_t cap)
{
    if (WIFEXITED(st))
        snprintf(out, cap, "exited with status %d", WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        snprintf(out, cap, "killed by signal %d", WTERMSIG(st));
    else
        snprintf(out, cap, "ended (status 0x%x)", st);
}

/* One read of the agent's stderr into its tail: > 0 bytes read, 0 at EOF
 * (the pipe closed), < 0 nothing for now. */
static ssize_t stderr_read(struct ctl *c, struct agent *ag)
{
    char buf[4096];
    ssize_t n = read(ag->err_fd, buf, sizeof buf);
    if (n > 0) {
        agent_stderr_append(ag, buf, (size_t)n);
        /* At debug level the agent's own log joins ours (sanitizer reports
         * of agents reach the test logs this way). */
        log_debug("agent %s says: %.*s", ag->id, (int)(buf[n - 1] == '\n' ? n - 1 : n), buf);
        return n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return -1;
    ev_io_stop(c->loop, &ag->eio);
    close(ag->err_fd);
    ag->err_fd = -1;
    return 0;
}

static void stderr_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    stderr_read(ag->ctl, ag);
}

static void drain_stderr(struct ctl *c, struct agent *ag)
{
    /* What a process says just before it dies is why (and where a
     * sanitizer reports). */
    while (ag->err_fd >= 0 && stderr_read(c, ag) > 0)
        ;
    if (ag->err_fd >= 0) {
        ev_io_stop(c->loop, &ag->eio);
        close(ag->err_fd);
        ag->err_fd = -1;
    }
}

void child_reaped(struct ctl *c, struct agent *ag, ev_child *w, const char *what, char *why,
                  size_t cap)
{
    ev_child_stop(c->loop, w);
    drain_stderr(c, ag);
    ag->pid = 0;
    char st[64];
    child_status_text(w->rstatus, st, sizeof st);
    snprintf(why, cap, "%s %s", what, st);
}

int child_spawn_stream(struct ctl *c, struct agent *ag, char **argv, child_run_fn run,
                       void (*on_exit)(struct ev_loop *, ev_child *, int), int *fd,
                       struct sp_err *err)
{
    int sv[2], ep[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return sp_err_errno(err, errno, "socketpair");
    if (pipe2(ep, O_CLOEXEC) < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        return sp_err_errno(err, e, "pipe");
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(sv[1], 0);
        dup2(sv[1], 1);
        dup2(ep[1], 2);
        child_reset_signals();
        setpgid(0, 0); /* a Ctrl-C at the controller's terminal is the controller's */
        run(c, ag, argv);
        _exit(127);
    }
    int e = errno;
    close(sv[1]);
    close(ep[1]);
    if (pid < 0) {
        close(sv[0]);
        close(ep[0]);
        return sp_err_errno(err, e, "fork");
    }
    ag->pid = pid;
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    fcntl(ep[0], F_SETFL, O_NONBLOCK);
    ag->err_fd = ep[0];
    ev_io_init(&ag->eio, stderr_cb, ep[0], EV_READ);
    ag->eio.data = ag;
    ev_io_start(c->loop, &ag->eio);
    ev_child_init(&ag->cw, on_exit, pid, 0);
    ag->cw.data = ag;
    ev_child_start(c->loop, &ag->cw);
    *fd = sv[0];
    return 0;
}

static void free_soon_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    if (ag->data_dir && ag->data_ours)
        remove_tree_async(c, ag->data_dir);
    log_debug("agent %s gone", ag->id);
    struct profile *p = ag->prof;
    agent_free(c, ag);
    sched_kick(c, p);
}

void agent_free_soon(struct ctl *c, struct agent *ag)
{
    ev_timer_stop(c->loop, &ag->timer);
    ev_timer_init(&ag->timer, free_soon_cb, 0, 0);
    ag->timer.data = ag;
    ev_timer_start(c->loop, &ag->timer);
}
