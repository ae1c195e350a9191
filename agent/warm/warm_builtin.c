/* The warm shell's side (a bash loadable builtin, embedded in the agent and
 * loaded from a memfd): a bash started and isolated once per slot box waits
 * on its socket for requests and forks one child per command with
 * clone(CLONE_PARENT), so every command is the agent's own child (reaped,
 * timed out and killed as any other) while costing a fork of an initialised
 * shell instead of an execve of a new one.
 *
 * The child takes the request's session, descriptors, directory, limits and
 * Landlock scope, and its own command line; answers the agent itself (the
 * socket's credentials carry its pid, so the agent knows it even when the
 * command has ended by the time it reads the answer); then makes the shell's
 * state what `bash -c CMD` would have started with: $$, PPID, the environment's differences, PWD,
 * RANDOM, SECONDS, $_ and BASH_EXECUTION_STRING, and this builtin gone from the builtin table. It
 * runs the command the way `-c` does and exits through exit_shell, so EXIT traps and `exit` behave
 * as in a fresh shell. Nothing the child does reaches the warm shell: each command starts from its
 * pristine state.
 *
 * Built against the headers of the bash it runs in (Debian's bash-builtins);
 * it refuses any other bash series, and the agent then runs every command
 * the cold way. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#include "builtins.h"
#include "shell.h"
#include "common.h"
#include "jobs.h"
#include "array.h"

#include "warm_wire.h"

extern int dollar_dollar_pid;
extern int executing_builtin;
extern int parse_and_execute_level;
extern int bash_argv_initialized;
extern int last_command_exit_value;
extern char *this_command_name;
extern struct timeval shellstart;
extern time_t shell_start_time;

#define WARM_SERIES "5.2"
#define WARM_NFDS 4

static int warm_builtin(WORD_LIST *list);

/* This process's argument area ([arg_start, arg_end) of /proc/self/stat):
 * each child writes its own `SHELL -c CMD` there, so ps and pgrep see the
 * command as they would a cold one. The agent pads the warm shell's own
 * arguments to leave room. */
static struct {
    char *args_at;
    size_t args_len;
    int scope_fd; /* the Landlock ruleset each command enforces on itself, or -1 */
    char buf[sizeof(struct warm_req) + WARM_MAX_PAYLOAD]; /* one request */
} me;

static char *warm_doc[] = {"Serve the slot agent's commands (internal).", NULL};

struct builtin __slot_warm_struct = {
    WARM_CMD_NAME, warm_builtin, BUILTIN_ENABLED, warm_doc, WARM_CMD_NAME " check|serve SHELL", 0,
};

static int series_ok(void)
{
    if (dist_version && !strcmp(dist_version, WARM_SERIES))
        return 1;
    fprintf(stderr, "bash %s, and the warm builtin is built for bash %s\n",
            dist_version ? dist_version : "?", WARM_SERIES);
    return 0;
}

/* Take this builtin out of the table (without unloading the code that is
 * running): a command must not see it. */
static void forget_self(void)
{
    for (int i = 0; i < num_shell_builtins; i++) {
        if (shell_builtins[i].function != warm_builtin)
            continue;
        memmove(&shell_builtins[i], &shell_builtins[i + 1],
                (size_t)(num_shell_builtins - i) * sizeof shell_builtins[0]);
        num_shell_builtins--;
        return;
    }
}

static void set_var(const char *name, char *value, int export)
{
    SHELL_VAR *v = bind_variable(name, value, 0);
    if (v && export) {
        VSETATTR(v, att_exported);
        array_needs_making = 1;
    }
    stupidly_hack_special_variables((char *)name);
}

static void find_args(void)
{
    char buf[2048];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long start = 0, end = 0;
    /* Fields after the command name start at 3 (state); 48 and 49. */
    for (int field = 3; p && field <= 49; field++) {
        p = strchr(p + 1, ' ');
        if (p && field == 48)
            start = strtoul(p + 1, NULL, 10);
        if (p && field == 49)
            end = strtoul(p + 1, NULL, 10);
    }
    if (start && end > start) {
        me.args_at = (char *)start;
        me.args_len = end - start;
    }
}

static void set_args(const char *shell, const char *cmd)
{
    size_t sl = strlen(shell) + 1, cl = strlen(cmd) + 1;
    if (!me.args_at || sl + 3 + cl > me.args_len)
        return;
    memset(me.args_at, 0, me.args_len);
    memcpy(me.args_at, shell, sl);
    memcpy(me.args_at + sl, "-c", 3);
    memcpy(me.args_at + sl + 3, cmd, cl);
}

/* In the child: becomes the command. Never returns. */
static int reply(int sock, uint64_t seq, int err, int ready)
{
    struct warm_rep rep = {WARM_MAGIC, err, seq, ready, 0};
    ssize_t n;
    while ((n = send(sock, &rep, sizeof rep, MSG_NOSIGNAL)) < 0 && errno == EINTR)
        ;
    return n == (ssize_t)sizeof rep ? 0 : -1;
}

/* Tell the agent how the set-up went (0 or an errno) with our own
 * credentials; on failure leave. A command whose answer does not reach the
 * agent (it gave the request up) never runs. */
static void setup_done(int sock, uint64_t seq, int err)
{
    if (reply(sock, seq, err, 0) < 0 || err)
        _exit(126);
}

static void run_child(const struct warm_req *rq, char *payload, int fds[WARM_NFDS],
                      const char *shell, int sock)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    /* Everything a cold command has when its pid is announced is done
     * before the warm shell answers: session, streams, directory, limits,
     * isolation. */
    if (setsid() < 0)
        setup_done(sock, rq->seq, errno);
    /* As a cold command: orphans of the command stay under it. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    for (int k = 0; k < 3; k++)
        if (dup2(fds[k], k) < 0)
            setup_done(sock, rq->seq, errno);
    char *cmd = payload;
    char *cwd = cmd + strlen(cmd) + 1;
    char *env = cwd + strlen(cwd) + 1;
    if ((rq->flags & WARM_CWD_FD) ? fchdir(fds[3]) < 0 : chdir(cwd) < 0)
        setup_done(sock, rq->seq, errno);
    if (rq->flags & WARM_LIMITS_ON) {
        static const int res[WARM_LIMITS] = {RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
                                             RLIMIT_NOFILE};
        for (int i = 0; i < WARM_LIMITS; i++) {
            struct rlimit rl = {(rlim_t)rq->lim[i].cur, (rlim_t)rq->lim[i].max};
            setrlimit(res[i], &rl);
        }
    }
    /* Its own Landlock domain, like a cold command's: it cannot signal or
     * trace this shell or its siblings. Fail closed. */
    if ((rq->flags & WARM_SCOPE) &&
        (me.scope_fd < 0 || syscall(446 /* landlock_restrict_self */, me.scope_fd, 0) < 0))
        setup_done(sock, rq->seq, me.scope_fd < 0 ? ENOSYS : errno);
    set_args(shell, cmd);
    setup_done(sock, rq->seq, 0);
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3u, ~0u, 0) < 0)
#endif
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    /* The shell's state as `bash -c` starts with it. */
    dollar_dollar_pid = getpid();
    set_ppid();
    shell_pgrp = original_pgrp = getpid();
    for (uint32_t i = 0; i < rq->nenv; i++) {
        char *eq = strchr(env, '=');
        char *next = env + strlen(env) + 1;
        if (eq) {
            *eq = 0;
            set_var(env, eq + 1, 1);
        }
        env = next;
    }
    set_working_directory(cwd);
    seedrand();
    gettimeofday(&shellstart, NULL);
    shell_start_time = shellstart.tv_sec;
    /* Set by what the warm shell itself ran. */
    unbind_variable("PIPESTATUS");
    /* Filled on first use from the positional parameters, as in a fresh
     * shell (the warm shell has used them already). */
    static const char *const argvars[] = {"BASH_ARGC", "BASH_ARGV"};
    for (int i = 0; i < 2; i++) {
        SHELL_VAR *v = find_variable(argvars[i]);
        if (v && array_p(v))
            array_flush(array_cell(v));
    }
    bash_argv_initialized = 0;
    bind_variable("BASH_EXECUTION_STRING", cmd, 0);
    bind_variable("_", (char *)shell, 0);
    forget_self();
    executing_builtin = 0;
    parse_and_execute_level = 0;
    this_command_name = NULL;
    size_t n = strlen(cmd);
    char *copy = xmalloc(n + 1); /* parse_and_execute frees it */
    memcpy(copy, cmd, n + 1);
    parse_and_execute(copy, "-c", SEVAL_NOHIST | SEVAL_RESETLINE);
    exit_shell(last_command_exit_value);
}

/* The ruleset of a command's own domain, built once: scoped signals and
 * abstract sockets (ABI 6). A domain denies linking and renaming across
 * directories (the "refer" right) unless a rule grants it, even when it
 * handles no file access: this one grants it beneath /, and the shell's own
 * domain keeps deciding where. -1 where Landlock lacks scoping (the agent
 * then does not ask for it). */
static int scope_ruleset(void)
{
    struct {
        uint64_t fs, net, scoped;
    } attr = {1ull << 13 /* REFER */, 0, 3 /* abstract sockets, signals */};
    struct __attribute__((packed)) {
        uint64_t allowed;
        int32_t parent_fd;
    } rule = {1ull << 13, open("/", O_PATH | O_CLOEXEC)};
    long fd = syscall(444 /* landlock_create_ruleset */, &attr, sizeof attr, 0);
    if (fd >= 0 && (rule.parent_fd < 0 ||
                    syscall(445 /* landlock_add_rule */, fd, 1 /* path beneath */, &rule, 0) < 0)) {
        close((int)fd);
        fd = -1;
    }
    if (rule.parent_fd >= 0)
        close(rule.parent_fd);
    if (fd >= 0)
        fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    return (int)fd;
}

/* A request is well formed when its payload holds the command, the
 * directory and nenv strings, and its descriptors are all there. */
static int valid(const struct warm_req *rq, size_t got, const char *payload, int nfds)
{
    if (got < sizeof *rq || rq->magic != WARM_MAGIC || got - sizeof *rq != rq->len ||
        rq->len == 0 || payload[rq->len - 1] != 0)
        return 0;
    uint32_t strings = 0;
    for (uint32_t i = 0; i < rq->len; i++)
        strings += payload[i] == 0;
    return strings == 2 + rq->nenv && nfds == ((rq->flags & WARM_CWD_FD) ? 4 : 3);
}

static int serve(const char *shell)
{
    /* stdin is the agent's socket and stdout the memfd this code came
     * from: move the socket away, and put /dev/null on both. */
    find_args();
    int sock = fcntl(0, F_DUPFD_CLOEXEC, 10);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (sock < 0 || null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0)
        return 1;
    close(null);
    me.scope_fd = scope_ruleset();
    /* Commands of the slot run as the same user: they must not be able to
     * read or change this process's memory. Each child sets itself back. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    reply(sock, 0, 0, 1);
    char *buf = me.buf;
    for (;;) {
        struct iovec iov = {buf, sizeof me.buf};
        union {
            char b[CMSG_SPACE(WARM_NFDS * sizeof(int))];
            struct cmsghdr align;
        } u;
        struct msghdr mh = {
            .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof u.b};
        ssize_t got = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            _exit(0); /* the agent is gone */
        int fds[WARM_NFDS] = {-1, -1, -1, -1}, nfds = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            int n = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cm) + (size_t)i * sizeof(int), sizeof fd);
                if (nfds < WARM_NFDS)
                    fds[nfds++] = fd;
                else
                    close(fd);
            }
        }
        struct warm_req rq;
        memcpy(&rq, buf, sizeof rq < (size_t)got ? sizeof rq : (size_t)got);
        char *payload = buf + sizeof rq;
        int err = 0;
        if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || !valid(&rq, (size_t)got, payload, nfds)) {
            err = EINVAL;
        } else {
            /* The child answers for itself (its credentials carry its pid). */
            pid_t pid = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
            if (pid == 0)
                run_child(&rq, payload, fds, shell, sock);
            if (pid < 0)
                err = errno;
        }
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        /* The child has its copy: no later command's memory holds this one. */
        memset(buf, 0, (size_t)got);
        if (err)
            reply(sock, rq.seq, err, 0);
    }
}

static int warm_builtin(WORD_LIST *list)
{
    const char *verb = list && list->word ? list->word->word : "";
    if (!series_ok())
        return 1;
    if (!strcmp(verb, "check"))
        return 0;
    if (!strcmp(verb, "serve") && list->next && list->next->word)
        return serve(list->next->word->word);
    builtin_usage();
    return 2;
}
