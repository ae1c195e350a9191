/* Warm shells: the agent's side of the warm exec path.
 *
 * A stateless `exec` of a shell command costs little besides starting bash
 * and isolating it. So each slot box (per network setting) gets one bash,
 * started and isolated once through the same path as any command (box,
 * cgroup, slot user, Landlock, seccomp, the agent's maximum rlimits), that
 * loads the builtin of agent/warm/warm_builtin.c from a memfd and then forks
 * a child per command (clone with CLONE_PARENT: the child is the agent's,
 * reaped, timed out and killed like a cold command). This file starts and
 * stops those shells, decides per request whether one can serve it, and
 * carries requests and answers; exec.c owns the commands themselves.
 *
 * A request goes cold when the path is off, the slot's shell is not ready
 * (the first command of a slot starts it), the command is given as argv, its
 * environment sets something bash reads only at start-up, or it is too big
 * for one message. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "child.h"
#include "exec.h"
#include "fdio.h"
#include "warm.h"
#include "warm/warm_wire.h"

#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif

#define WARM_MAX_FAILS 3
#define WARM_PROBE_MS 5000
/* A fork and its set-up take well under a millisecond; this bounds a shell
 * that stopped answering (or starting), and a lost shell's last answers. */
#define WARM_ANSWER_S 5.0

extern const unsigned char warm_so[];
extern const size_t warm_so_len;

static int load_so(struct agent *ag)
{
    int fd = memfd_create("slot-warm", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC);
    if (fd < 0 && errno == EINVAL) /* a kernel before MFD_EXEC */
        fd = memfd_create("slot-warm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "memfd_create: %s", strerror(errno));
        return -1;
    }
    if (fd_write_all(fd, warm_so, warm_so_len) < 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "writing the builtin: %s", strerror(errno));
        close(fd);
        return -1;
    }
    /* Every warm shell opens it (as the slot's user, until it knows better:
     * its fd 1): nobody may change the code the next one loads. */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "sealing the builtin: %s", strerror(errno));
        close(fd);
        return -1;
    }
    ag->warm.so_fd = fd;
    return 0;
}

/* Wait for pid with a bound; kill it when the bound passes. */
static int wait_bounded(pid_t pid, int ms, int *status)
{
    for (int waited = 0;; waited += 5) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
        if (waited >= ms) {
            kill(pid, SIGKILL);
            waitpid(pid, status, 0);
            return -1;
        }
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Does the shell take the builtin? One spawn of `SHELL -c 'enable ...'`
 * with its error kept for the report. */
static void probe(struct agent *ag)
{
    int errp[2];
    if (pipe2(errp, O_CLOEXEC) < 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "pipe: %s", strerror(errno));
        return;
    }
    char script[256];
    snprintf(script, sizeof script, "enable -f /proc/self/fd/1 %s && %s check", WARM_CMD_NAME,
             WARM_CMD_NAME);
    char *argv[] = {(char *)ag->shell, (char *)"-c", script, NULL};
    char *envp[] = {(char *)"PATH=/usr/bin:/bin", NULL};
    struct spawn sp = {
        .stack = ag->child_stack,
        .path = ag->shell,
        .argv = argv,
        .envp = envp,
        .stdin_fd = ag->devnull_fd,
        .stdout_fd = ag->warm.so_fd,
        .stderr_fd = errp[1],
        .cwd_fd = -1,
    };
    pid_t pid = child_spawn(&sp);
    close(errp[1]);
    char msg[200] = "";
    int status = 0;
    if (pid < 0 || sp.child_errno) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "cannot run %s: %s", ag->shell,
                 strerror(sp.child_errno));
        if (pid > 0)
            waitpid(pid, &status, 0);
        close(errp[0]);
        return;
    }
    struct pollfd pfd = {errp[0], POLLIN, 0};
    size_t have = 0;
    while (have < sizeof msg - 1 && poll(&pfd, 1, WARM_PROBE_MS) > 0) {
        ssize_t n = read(errp[0], msg + have, sizeof msg - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
    }
    msg[have] = 0;
    close(errp[0]);
    if (wait_bounded(pid, WARM_PROBE_MS, &status) < 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "%s did not finish loading the builtin",
                 ag->shell);
        return;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        ag->warm.active = true;
        return;
    }
    msg[strcspn(msg, "\n")] = 0;
    snprintf(ag->warm.why, sizeof ag->warm.why, "%s does not take the warm builtin: %s", ag->shell,
             msg[0] ? msg : "no reason given");
}

void warm_init(struct agent *ag)
{
    ag->warm.so_fd = -1;
    if (ag->warm.off) {
        if (!ag->warm.why[0])
            snprintf(ag->warm.why, sizeof ag->warm.why, "turned off (--no-warm)");
        return;
    }
    const char *base = strrchr(ag->shell, '/');
    if (strcmp(base ? base + 1 : ag->shell, "bash") != 0) {
        snprintf(ag->warm.why, sizeof ag->warm.why, "the shell is %s, not bash", ag->shell);
        return;
    }
    if (load_so(ag) == 0)
        probe(ag);
    if (ag->warm.active && !(ag->warm.buf = malloc(sizeof(struct warm_req) + WARM_MAX_PAYLOAD))) {
        ag->warm.active = false;
        snprintf(ag->warm.why, sizeof ag->warm.why, "out of memory");
    }
    if (!ag->warm.active)
        log_info("warm exec path off: %s", ag->warm.why);
}

void warm_probe_report(struct agent *ag, bool json, char *out, size_t cap)
{
    ag->child_stack = child_stack_alloc();
    ag->devnull_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (ag->child_stack && ag->devnull_fd >= 0)
        warm_init(ag);
    else
        snprintf(ag->warm.why, sizeof ag->warm.why, "out of resources");
    if (json) {
        /* why is ours, but may quote an error text: keep the JSON valid. */
        char why[2 * sizeof ag->warm.why];
        size_t n = 0;
        for (const char *c = ag->warm.active ? "" : ag->warm.why; *c && n + 2 < sizeof why; c++) {
            if (*c == '"' || *c == '\\')
                why[n++] = '\\';
            why[n++] = (unsigned char)*c < 0x20 ? ' ' : *c;
        }
        why[n] = 0;
        snprintf(out, cap, ", \"warm\": {\"active\": %s, \"why\": \"%s\"}",
                 ag->warm.active ? "true" : "false", why);
    } else if (ag->warm.active) {
        snprintf(out, cap, "\nwarm exec: yes (a warm shell per slot forks stateless execs)");
    } else {
        snprintf(out, cap, "\nwarm exec: no (%s)", ag->warm.why);
    }
    warm_free(ag);
    if (ag->child_stack)
        munmap(ag->child_stack, CHILD_STACK_SIZE);
    if (ag->devnull_fd >= 0)
        close(ag->devnull_fd);
    ag->child_stack = NULL;
    ag->devnull_fd = -1;
}

void warm_free(struct agent *ag)
{
    for (unsigned i = 0; ag->slots && i < ag->nslots; i++)
        for (int k = 0; k < 2; k++) {
            struct warm_shell *w = &ag->slots[i].warm[k];
            if (w->sock >= 0) {
                ev_io_stop(ag->loop, &w->w);
                close(w->sock);
            }
            free(w->env);
            *w = (struct warm_shell){.sock = -1};
        }
    if (ag->warm.so_fd > 0) /* 0: warm_init never ran */
        close(ag->warm.so_fd);
    free(ag->warm.buf);
    ag->warm.buf = NULL;
    ag->warm.so_fd = -1;
}

static void warm_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    exec_warm_readable(ev_userdata(loop), w->data);
}

static void finish(struct agent *ag, struct warm_shell *w, enum warm_gone how);

static void wd_cb(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    struct warm_shell *w = t->data;
    if (w->draining) {
        /* A command that neither answered nor closed the socket: whether it
         * ran cannot be known, so its request fails instead of running twice. */
        log_warn("slot %u: commands of a lost warm shell did not answer in %.0f s", w->slot->index,
                 WARM_ANSWER_S);
        finish(ev_userdata(loop), w, WARM_UNKNOWN);
        return;
    }
    log_warn("slot %u: warm shell %d did not answer for %.0f s; replacing it", w->slot->index,
             (int)w->pid, WARM_ANSWER_S);
    warm_lost(ev_userdata(loop), w);
}

/* Start the slot's shell for network setting k with the isolation of ic
 * (the rlimits raised to the agent's maxima: each command lowers its own).
 * Through a box the holder's answer is waited for here, as for a session's
 * shell, so only when no command's answer is outstanding. */
static void warm_start(struct agent *ag, struct slot *s, int k, const struct iso_child *ic)
{
    struct warm_shell *w = &s->warm[k];
    struct iso_child bic = *ic;
    for (int i = 0; i < LIM_COUNT; i++)
        bic.lim[i].rlim_cur = bic.lim[i].rlim_max = ag->iso.lim_max[i];
    bic.applied = 0;
    bic.failed_rung = -1;
    struct nsbox *box = (bic.want & (1u << RUNG_NAMESPACES)) ? &s->box[k] : NULL;
    if (box && (box->pid <= 0 || exec_box_pending(ag, box)))
        return;
    struct sp_err err;
    char cwd[8200];
    if (exec_cwd(ag, s, &bic, NULL, cwd, sizeof cwd, &err) < 0)
        return;
    char **env = exec_env(ag, s, NULL, "dumb", &bic, cwd, &err);
    if (!env)
        return;
    int sv[2];
    int on = 1;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        free(env);
        return;
    }
    /* Each command answers itself: the kernel adds its pid, in our view. */
    setsockopt(sv[0], SOL_SOCKET, SO_PASSCRED, &on, sizeof on);
    char script[300 + WARM_ARGS_ROOM];
    int sl = snprintf(script, 300, "enable -f /proc/self/fd/1 %s && %s serve %s #", WARM_CMD_NAME,
                      WARM_CMD_NAME, ag->shell);
    memset(script + sl, ' ', WARM_ARGS_ROOM);
    script[sl + WARM_ARGS_ROOM] = 0;
    char *argv[] = {(char *)ag->shell, (char *)"-c", script, NULL};
    struct spawn sp = {
        .stack = ag->child_stack,
        .path = ag->shell,
        .argv = argv,
        .envp = env,
        .stdin_fd = sv[1],
        .stdout_fd = ag->warm.so_fd,
        .stderr_fd = ag->devnull_fd,
        .cwd_fd = s->ws_fd,
        .cwd_path = box ? cwd : NULL,
        .iso = &bic,
    };
    pid_t pid = -1;
    unsigned applied = 0;
    if (box) {
        struct box_result r;
        if (ns_box_send(box, &sp, false) < 0) {
            /* the holder is gone: its exit is on the way */
        } else if (ns_box_recv(box, 0, &r) < 0) {
            slots_box_stop(ag, s); /* it stopped answering, as in session.c */
        } else if (r.pid > 0 && !r.child_errno) {
            pid = r.pid;
            applied = r.applied & (bic.want | (1u << RUNG_NAMESPACES));
        }
    } else {
        pid = child_spawn(&sp);
        if (pid > 0 && sp.child_errno)
            pid = -1; /* it exited 127 and is reaped as a stray */
        applied = bic.applied;
    }
    close(sv[1]);
    if (pid <= 0) {
        log_warn("slot %u: the warm shell did not start", s->index);
        w->fails++;
        close(sv[0]);
        free(env);
        return;
    }
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    *w = (struct warm_shell){
        .pid = pid,
        .sock = sv[0],
        .env = env,
        .applied = applied,
        .fails = w->fails,
        .scope = (applied & (1u << RUNG_LANDLOCK)) && ag->iso.landlock_abi >= 6,
        .slot = s,
    };
    ev_io_init(&w->w, warm_cb, w->sock, EV_READ);
    w->w.data = w;
    ev_io_start(ag->loop, &w->w);
    ev_init(&w->wd, wd_cb);
    w->wd.repeat = WARM_ANSWER_S;
    w->wd.data = w;
    ev_timer_again(ag->loop, &w->wd); /* bounds the start too */
    ag->warm.starts++;
    log_debug("slot %u: warm shell %d starting", s->index, (int)pid);
}

static size_t name_len(const char *kv)
{
    const char *eq = strchr(kv, '=');
    return eq ? (size_t)(eq - kv) : strlen(kv);
}

/* The value of the variable named like kv's in env, or NULL. */
static const char *env_get(char **env, const char *kv)
{
    size_t n = name_len(kv);
    for (; *env; env++)
        if (!strncmp(*env, kv, n) && (*env)[n] == '=')
            return *env + n + 1;
    return NULL;
}

/* Can the forked shell take this variable as bash would at start-up? Not
 * what bash reads only then or sets itself (options, start-up files,
 * exported functions, its own counters), nor names bash would not import. */
static bool name_ok(const char *kv)
{
    static const char *const own[] = {
        "SHELLOPTS",    "ENV",           "POSIXLY_CORRECT",
        "SHLVL",        "IFS",           "UID",
        "EUID",         "PPID",          "GROUPS",
        "HOSTNAME",     "HOSTTYPE",      "OSTYPE",
        "MACHTYPE",     "RANDOM",        "SRANDOM",
        "SECONDS",      "LINENO",        "HISTCMD",
        "OPTIND",       "OPTERR",        "PS4",
        "EPOCHSECONDS", "EPOCHREALTIME", "_",
        "OLDPWD",       "PWD",
    };
    size_t n = name_len(kv);
    if (n == 0 ||
        !(kv[0] == '_' || (kv[0] >= 'A' && kv[0] <= 'Z') || (kv[0] >= 'a' && kv[0] <= 'z')))
        return false;
    for (size_t i = 1; i < n; i++) {
        char c = kv[i];
        if (!(c == '_' || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9')))
            return false;
    }
    if (n >= 4 && !strncmp(kv, "BASH", 4))
        return false;
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
        if (strlen(own[i]) == n && !strncmp(kv, own[i], n))
            return false;
    return true;
}

/* The payload's environment part: the variables envp sets differently from
 * the shell's own. -1 when the shell cannot take envp (see name_ok; PWD must
 * be the command's directory, and nothing of the shell's may be missing). */
static long env_diff(const struct warm_shell *w, char **envp, const char *cwd, char *out,
                     size_t cap, uint32_t *count)
{
    size_t len = 0;
    *count = 0;
    for (char **e = w->env; *e; e++)
        if (!env_get(envp, *e))
            return -1;
    for (char **e = envp; *e; e++) {
        const char *mine = env_get(w->env, *e);
        const char *val = *e + name_len(*e) + 1;
        if (!strncmp(*e, "PWD=", 4)) {
            if (strcmp(val, cwd) != 0)
                return -1;
        } else if (mine && !strcmp(mine, val)) {
            continue;
        } else if (!name_ok(*e)) {
            return -1;
        }
        size_t n = strlen(*e) + 1;
        if (out) {
            if (len + n > cap)
                return -1;
            memcpy(out + len, *e, n);
        }
        len += n;
        (*count)++;
    }
    return (long)len;
}

struct warm_shell *warm_pick(struct agent *ag, struct slot *s, bool network,
                             const struct iso_child *ic, size_t cmd_len, bool *wait)
{
    *wait = false;
    if (!ag->warm.active)
        return NULL;
    int k = !network;
    struct warm_shell *w = &s->warm[k];
    if (w->pid == 0) {
        if (w->fails < WARM_MAX_FAILS && !s->resetting)
            warm_start(ag, s, k, ic);
        *wait = w->pid > 0 && !w->ready;
        return NULL;
    }
    if (!w->ready || w->stopping) {
        *wait = !w->ready && !w->stopping;
        return NULL;
    }
    /* The command would get no rung its shell lacks (a box restarted since,
     * or isolation asked for that this shell did not get). */
    unsigned need = ic->want & ~(1u << RUNG_RLIMITS);
    if ((need & ~w->applied) != 0)
        return NULL;
    /* The environment and the message's size are checked once, by
     * warm_send as it builds the message: a refusal there runs it cold. */
    return cmd_len < WARM_ARGS_ROOM ? w : NULL;
}

int warm_send(struct agent *ag, struct warm_shell *w, const char *cmd, const char *cwd, int cwd_fd,
              char **envp, const struct rlimit *lim, const int fds[3], uint64_t *seq,
              struct sp_err *err)
{
    char *buf = ag->warm.buf;
    const size_t cap = sizeof(struct warm_req) + WARM_MAX_PAYLOAD;
    struct warm_req rq = {.magic = WARM_MAGIC,
                          .flags = (lim ? WARM_LIMITS_ON : 0u) | (w->scope ? WARM_SCOPE : 0u),
                          .seq = w->seq + 1};
    size_t cl = strlen(cmd) + 1, dl = strlen(cwd) + 1;
    if (sizeof rq + cl + dl > cap)
        return sp_errf(err, SP_BAD_REQUEST, "too big for the warm shell");
    char *p = buf + sizeof rq;
    memcpy(p, cmd, cl);
    memcpy(p + cl, cwd, dl);
    long envlen = env_diff(w, envp, cwd, p + cl + dl, cap - sizeof rq - cl - dl, &rq.nenv);
    if (envlen < 0)
        return sp_errf(err, SP_BAD_REQUEST, "an environment the warm shell cannot take");
    rq.len = (uint32_t)(cl + dl + (size_t)envlen);
    for (int i = 0; lim && i < WARM_LIMITS; i++) {
        rq.lim[i].cur = lim[i].rlim_cur == RLIM_INFINITY ? ~0ull : (uint64_t)lim[i].rlim_cur;
        rq.lim[i].max = lim[i].rlim_max == RLIM_INFINITY ? ~0ull : (uint64_t)lim[i].rlim_max;
    }
    int send_fds[4] = {fds[0], fds[1], fds[2], cwd_fd};
    int nfds = 3;
    if (cwd_fd >= 0) {
        rq.flags |= WARM_CWD_FD;
        nfds = 4;
    }
    memcpy(buf, &rq, sizeof rq);
    struct iovec iov = {buf, sizeof rq + rq.len};
    union {
        char b[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr mh = {.msg_iov = &iov,
                        .msg_iovlen = 1,
                        .msg_control = u.b,
                        .msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int))};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(cm), send_fds, (size_t)nfds * sizeof(int));
    ssize_t n;
    while ((n = sendmsg(w->sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT)) < 0 && errno == EINTR)
        ;
    if (n < 0)
        return sp_errf(err, SP_INTERNAL, "the warm shell: %s", strerror(errno));
    *seq = ++w->seq;
    if (w->pending++ == 0)
        ev_timer_again(ag->loop, &w->wd);
    return 0;
}

void warm_answered(struct agent *ag, struct warm_shell *w)
{
    if (w->pending && --w->pending)
        ev_timer_again(ag->loop, &w->wd);
    else
        ev_timer_stop(ag->loop, &w->wd);
}

/* Run the waiting requests again: warm when the shell is ready, else cold
 * (or, when the agent is stopping, not at all). */
static void release(struct agent *ag, struct warm_shell *w, bool cold)
{
    while (w->nwaiting) {
        struct req *rq = w->waiting[0];
        memmove(w->waiting, w->waiting + 1, --w->nwaiting * sizeof w->waiting[0]);
        if (ag->stopping || (w->slot && w->slot->resetting)) {
            struct sp_err err;
            sp_errf(&err, SP_CANCELLED, "%s before the command started",
                    ag->stopping ? "the agent is stopping" : "the slot was reset");
            req_finish(rq, &err);
        } else {
            warm_rerun(ag, rq, cold);
        }
    }
}

void warm_rerun(struct agent *ag, struct req *rq, bool cold)
{
    struct sp_err err;
    ag->warm.bypass = cold;
    int rc = op_exec(rq, &err);
    ag->warm.bypass = false;
    if (rc < 0)
        req_finish(rq, &err);
    else if (rc == OP_DONE)
        req_finish(rq, NULL);
}

bool warm_wait(struct agent *ag, struct slot *s, bool network, struct req *rq)
{
    (void)ag;
    struct warm_shell *w = &s->warm[!network];
    if (w->nwaiting == WARM_WAITERS)
        return false;
    w->waiting[w->nwaiting++] = rq;
    return true;
}

int warm_recv(struct agent *ag, struct warm_shell *w, uint64_t *seq, pid_t *pid, int *err_no)
{
    struct warm_rep rep;
    struct iovec iov = {&rep, sizeof rep};
    union {
        char b[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof u.b};
    ssize_t n;
    while ((n = recvmsg(w->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)) < 0 && errno == EINTR)
        ;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 1;
    struct ucred cred = {0, 0, 0};
    bool have_cred = false;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n > 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET)
            continue;
        if (cm->cmsg_type == SCM_CREDENTIALS && cm->cmsg_len >= CMSG_LEN(sizeof cred)) {
            memcpy(&cred, CMSG_DATA(cm), sizeof cred);
            have_cred = true;
        } else if (cm->cmsg_type == SCM_RIGHTS) {
            /* Nobody sends us descriptors: close what came. */
            size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                close(fd);
            }
        }
    }
    if (n != (ssize_t)sizeof rep || rep.magic != WARM_MAGIC || !have_cred)
        return -1;
    if (rep.ready) {
        w->ready = w->served = true;
        w->fails = 0;
        if (!w->pending)
            ev_timer_stop(ag->loop, &w->wd);
        log_debug("slot %u: warm shell %d ready", w->slot->index, (int)w->pid);
        release(ag, w, false);
        return 2;
    }
    *seq = rep.seq;
    *err_no = rep.err;
    *pid = rep.err ? -1 : (pid_t)cred.pid;
    if (!rep.err && cred.pid <= 0)
        *err_no = ESRCH; /* not visible to us: cannot be */
    return 0;
}

bool warm_is_shell(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (int k = 0; k < 2; k++)
            if (ag->slots[i].warm[k].pid == pid)
                return true;
    return false;
}

/* Stop talking to w; what it had not started fails, or with retry runs
 * cold. The process is forgotten when it is reaped (warm_exited). */
/* Done with w: what it had not started fails (cancelled, or with unknown
 * state, see warm_gone) or runs cold; the struct is free for a new shell.
 * Its process is dead or killed (reaped later as any stray). */
static void finish(struct agent *ag, struct warm_shell *w, enum warm_gone how)
{
    unsigned fails = w->served || how == WARM_CANCEL ? 0 : w->fails + 1;
    w->stopping = true; /* nothing waits for it or is sent to it from here */
    w->ready = false;
    if (w->sock >= 0) {
        ev_io_stop(ag->loop, &w->w);
        close(w->sock);
        w->sock = -1;
    }
    ev_timer_stop(ag->loop, &w->wd);
    exec_warm_gone(ag, w, how);
    release(ag, w, true);
    free(w->env);
    *w = (struct warm_shell){.sock = -1, .fails = fails};
}

/* The shell is dead or killed: its commands answer for themselves, so read
 * on until every holder of the socket has closed it (EOF) before running
 * the unanswered requests again: a command that never answered never ran.
 * Bounded by WARM_ANSWER_S. */
static void drain(struct agent *ag, struct warm_shell *w)
{
    w->stopping = true;
    w->ready = false;
    release(ag, w, true); /* never sent: cold now */
    if (!w->pending || w->sock < 0) {
        finish(ag, w, WARM_RETRY);
        return;
    }
    w->draining = true;
    ev_timer_stop(ag->loop, &w->wd);
    ev_timer_set(&w->wd, WARM_ANSWER_S, 0.0);
    ev_timer_start(ag->loop, &w->wd);
}

void warm_closed(struct agent *ag, struct warm_shell *w)
{
    if (w->draining) {
        finish(ag, w, WARM_RETRY);
        return;
    }
    log_warn("slot %u: the warm shell stopped answering", w->slot->index);
    warm_lost(ag, w);
}

bool warm_exited(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (int k = 0; k < 2; k++) {
            struct warm_shell *w = &ag->slots[i].warm[k];
            if (w->pid != pid)
                continue;
            if (!w->stopping)
                log_info("slot %u: warm shell %d exited%s", i, (int)pid,
                         w->served ? "" : " before it was ready");
            w->pid = -1; /* reaped: never to be signalled again */
            if (!w->draining)
                drain(ag, w);
            return true;
        }
    return false;
}

void warm_stop(struct agent *ag, struct warm_shell *w)
{
    if (w->pid > 0)
        kill(w->pid, SIGKILL);
    if (w->pid != 0)
        finish(ag, w, WARM_CANCEL);
    w->fails = 0; /* a new workspace or box: worth another try */
}

void warm_lost(struct agent *ag, struct warm_shell *w)
{
    if (w->pid == 0 || w->draining)
        return;
    if (w->pid > 0)
        kill(w->pid, SIGKILL);
    drain(ag, w);
}

void warm_stop_slot(struct agent *ag, struct slot *s)
{
    for (int k = 0; k < 2; k++)
        warm_stop(ag, &s->warm[k]);
}

void warm_pack(struct agent *ag, msgpack_packer *pk)
{
    msgpack_pack_map(pk, 2);
    sp_pack_kv_bool(pk, "active", ag->warm.active);
    if (ag->warm.active)
        sp_pack_kv_nil(pk, "why");
    else
        sp_pack_kv_str(pk, "why", ag->warm.why);
}
