/* The local backend: agents as processes on this machine. In stdio mode
 * each agent is a child whose stdin/stdout is one end of a socketpair (it
 * exits when the controller goes). In socket mode each agent is a detached
 * daemon on STATE/agents/ID.sock that outlives the controller; a restarted
 * controller finds the sockets again (list_agents) and reattaches.
 *
 * An agent's data dir is BASE/PROFILE/N (BASE: the profile's
 * workspace_base, else STATE/data), N the lowest index no live agent uses,
 * so the paths its commands see where it has no box do not name the agent
 * and repeat from run to run. BASE/PROFILE/N.lock is flock'ed while N is
 * in use: by the controller while it picks N, then by the agent process,
 * which inherits the descriptor and holds it for its whole life (across
 * controller restarts in socket mode). A directory is only ever emptied or
 * removed under that lock, so neither this controller, a restarted one nor
 * another sharing BASE takes or removes a data dir in use. */
#include <dirent.h>
#include <sys/file.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctl.h"

#define STOP_GRACE_S 5.0
#define CONNECT_RETRY_S 0.02

static const char *agent_bin(struct ctl *c, struct agent *ag)
{
    return ag->prof->local_agent ? ag->prof->local_agent : c->agent_bin;
}

static char *path_in_state(struct ctl *c, const char *id, const char *ext)
{
    char *p = NULL;
    if (asprintf(&p, "%s/agents/%s%s", c->state_dir, id, ext) < 0)
        abort();
    return p;
}

static char *data_base(struct ctl *c, struct profile *p)
{
    char *d = NULL;
    if (p->workspace_base)
        d = strdup(p->workspace_base);
    else if (asprintf(&d, "%s/data", c->state_dir) < 0)
        abort();
    return d;
}

/* The lock of the data dir being started: its descriptor survives into the
 * agent (the one place a spawn sees it is the child, between fork and exec). */
static int spawn_lock_fd = -1;

static void inherit_lock(void)
{
    if (spawn_lock_fd >= 0)
        fcntl(spawn_lock_fd, F_SETFD, 0);
}

static char *lock_path(const char *data_dir)
{
    char *p = NULL;
    if (asprintf(&p, "%s.lock", data_dir) < 0)
        abort();
    return p;
}

/* Is dir BASE/PROFILE/N (the locked layout), not an id-named dir of an
 * agent started by an earlier version? */
static bool data_indexed(const struct profile *p, const char *dir)
{
    const char *slash = strrchr(dir, '/');
    if (!slash || !slash[1] || strspn(slash + 1, "0123456789") != strlen(slash + 1))
        return false;
    size_t pl = strlen(p->name);
    return (size_t)(slash - dir) > pl && slash[-(long)pl - 1] == '/' &&
           !memcmp(slash - pl, p->name, pl);
}

static bool data_used_here(struct ctl *c, const char *dir)
{
    struct profile *p;
    struct agent *a;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(a, &p->agents, link)
    if (a->data_dir && !strcmp(a->data_dir, dir))
        return true;
    return false;
}

/* Give ag the lowest free BASE/PROFILE/N, emptied, with its lock held in
 * *lock_fd (close-on-exec until the agent's spawn). */
static int data_pick(struct ctl *c, struct agent *ag, int *lock_fd, struct sp_err *err)
{
    char *base = data_base(c, ag->prof), *dir = NULL;
    if (asprintf(&dir, "%s/%s", base, ag->prof->name) < 0)
        abort();
    free(base);
    int rc = -1;
    if (mkdir_p(dir, 0755) < 0) {
        sp_err_errno(err, errno, dir);
        goto out;
    }
    sp_errf(err, SP_NO_CAPACITY, "no free data dir index under %s", dir);
    for (unsigned n = 0; n < 100000 && rc < 0; n++) {
        char *path = NULL;
        if (asprintf(&path, "%s/%u", dir, n) < 0)
            abort();
        if (data_used_here(c, path)) {
            free(path);
            continue;
        }
        char *lp = lock_path(path);
        int fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        int e = errno;
        free(lp);
        if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) < 0) {
            if (fd >= 0)
                e = errno, close(fd);
            free(path);
            if (e == EWOULDBLOCK)
                continue; /* a live agent's (perhaps another controller's) */
            sp_err_errno(err, e, "locking a data dir");
            goto out;
        }
        /* Ours now: what is there is an agent's that went without its
         * clean-up (a controller killed); it goes, the agent starts empty. */
        struct stat st;
        if (lstat(path, &st) == 0) {
            log_info("data dir %s: removing what a gone agent left", path);
            remove_tree_async(c, path);
        }
        if (mkdir(path, 0755) < 0) {
            sp_err_errno(err, errno, path);
            close(fd);
            free(path);
            goto out;
        }
        ag->data_dir = path;
        *lock_fd = fd;
        rc = 0;
    }
out:
    free(dir);
    return rc;
}

/* The agent is gone: remove its data dir, under the dir's lock when it has
 * one (taken only once the agent process has let it go). Later removal by
 * agent_free_soon is not wanted: the lock must be held across it. */
static void data_release(struct ctl *c, struct agent *ag)
{
    if (!ag->data_dir || !ag->data_ours || !data_indexed(ag->prof, ag->data_dir))
        return; /* agent_free_soon removes an id-named dir as before */
    ag->data_ours = false;
    char *lp = lock_path(ag->data_dir);
    int fd = open(lp, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    free(lp);
    if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0) {
        remove_tree_async(c, ag->data_dir);
        /* Explicitly: the removing child shares the lock until it has
         * closed its copy, and the index must be free now. */
        flock(fd, LOCK_UN);
        /* Gone: its index is free for the next agent at once. */
        free(ag->data_dir);
        ag->data_dir = NULL;
    } else
        log_warn("agent %s: data dir %s is still locked; left for a later clean-up", ag->id,
                 ag->data_dir);
    if (fd >= 0)
        close(fd);
}

/* argv for the agent; strings owned by the returned array (NULL-ended). */
static char **build_argv(struct ctl *c, struct agent *ag, const char *listen)
{
    struct profile *p = ag->prof;
    size_t n = 20 + p->local_args.n;
    char **v = calloc(n, sizeof *v);
    size_t i = 0;
    v[i++] = strdup(agent_bin(c, ag));
    if (listen) {
        v[i++] = strdup("--listen");
        v[i++] = strdup(listen);
    } else
        v[i++] = strdup("--stdio");
    v[i++] = strdup("--slots");
    if (asprintf(&v[i++], "%u", p->slots_per_agent) < 0)
        abort();
    v[i++] = strdup("--data-dir");
    v[i++] = strdup(ag->data_dir);
    if (*p->isolation) {
        v[i++] = strdup("--isolation");
        v[i++] = strdup(p->isolation);
    }
    if (p->memory) {
        v[i++] = strdup("--slot-memory");
        if (asprintf(&v[i++], "%" PRIu64, p->memory / p->slots_per_agent) < 0)
            abort();
    }
    /* 0 is the agent's own default: nothing to pass (its --slot-disk 0
     * would mean no budget at all). */
    if (p->slot_disk) {
        v[i++] = strdup("--slot-disk");
        if (asprintf(&v[i++], "%" PRIu64, p->slot_disk) < 0)
            abort();
    }
    if (p->slot_inodes) {
        v[i++] = strdup("--slot-inodes");
        if (asprintf(&v[i++], "%" PRIu64, p->slot_inodes) < 0)
            abort();
    }
    for (size_t k = 0; k < p->local_args.n; k++)
        v[i++] = strdup(p->local_args.v[k]);
    v[i] = NULL;
    return v;
}

static void free_argv(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        free(v[i]);
    free(v);
}

static void child_exec(char **argv)
{
    child_reset_signals();
    execv(argv[0], argv);
    dprintf(2, "slot-controller: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* ---- stdio mode ---------------------------------------------------------- */

static void run_agent(struct ctl *c, struct agent *ag, char **argv)
{
    (void)c;
    (void)ag;
    inherit_lock();
    child_exec(argv);
}

static void child_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    (void)loop;
    char why[128];
    child_reaped(c, ag, w, "agent process", why, sizeof why);
    /* Before a replacement starts: it may have the index. */
    data_release(c, ag);
    if (ag->state != AG_STOPPING)
        agent_lost(c, ag, why);
    else
        log_debug("agent %s: %s", ag->id, why);
    agent_free_soon(c, ag);
}

static int start_stdio(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    char **argv = build_argv(c, ag, NULL);
    int fd;
    int rc = child_spawn_stream(c, ag, argv, run_agent, child_cb, &fd, err);
    free_argv(argv);
    if (rc < 0)
        return -1;
    snprintf(ag->address, sizeof ag->address, "stdio:pid:%d", (int)ag->pid);
    agent_stream_ready(c, ag, fd);
    return 0;
}

/* ---- socket mode --------------------------------------------------------- */

static void load_log_tail(struct ctl *c, struct agent *ag)
{
    char *log = path_in_state(c, ag->id, ".log");
    int fd = open(log, O_RDONLY | O_CLOEXEC);
    free(log);
    if (fd < 0)
        return;
    char buf[CTL_STDERR_TAIL];
    off_t size = lseek(fd, 0, SEEK_END);
    off_t from = size > (off_t)sizeof buf - 1 ? size - (off_t)sizeof buf + 1 : 0;
    ssize_t n = pread(fd, buf, sizeof buf - 1, from);
    close(fd);
    ag->errlen = 0;
    if (n > 0)
        agent_stderr_append(ag, buf, (size_t)n);
}

/* Is pid the agent serving this socket? (pids are reused; never signal a
 * stranger.) */
static bool pid_is_agent(pid_t pid, const char *sock)
{
    if (pid <= 0)
        return false;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return false;
    for (ssize_t i = 0; i < n; i++)
        if (!buf[i])
            buf[i] = ' ';
    buf[n] = 0;
    return strstr(buf, sock) != NULL;
}

static int connect_sock(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static void connect_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    char *sock = path_in_state(c, ag->id, ".sock");
    int fd = connect_sock(sock);
    free(sock);
    if (fd >= 0) {
        ev_timer_stop(c->loop, &ag->timer);
        agent_stream_ready(c, ag, fd);
        return;
    }
    bool alive = ag->pid > 0 && kill(ag->pid, 0) == 0;
    bool late = (ev_now(c->loop) - ag->started_at) * 1000 >= (double)ag->prof->start_timeout_ms;
    if (alive && !late)
        return; /* the timer repeats */
    load_log_tail(c, ag);
    char why[700], tail[512];
    agent_stderr_tail(ag, tail, sizeof tail, 3);
    snprintf(why, sizeof why, "agent %s %s%s%s", ag->id,
             alive ? "did not open its socket in time" : "exited before opening its socket",
             *tail ? "; stderr: " : "", tail);
    sched_agent_failed(c, ag->prof, why);
    agent_stop(c, ag, why);
}

static int start_socket(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    char *sock = path_in_state(c, ag->id, ".sock");
    char *log = path_in_state(c, ag->id, ".log");
    char *pidf = path_in_state(c, ag->id, ".pid");
    char listen[300];
    snprintf(listen, sizeof listen, "unix:%s", sock);
    snprintf(ag->address, sizeof ag->address, "unix:%s", sock);
    char **argv = build_argv(c, ag, listen);
    int pp[2];
    int rc = -1;
    if (pipe2(pp, O_CLOEXEC) < 0) {
        sp_err_errno(err, errno, "pipe");
        goto out;
    }
    pid_t mid = fork();
    if (mid == 0) {
        /* Detach: own session, reparented to init, output to a log file. */
        setsid();
        pid_t gc = fork();
        if (gc == 0) {
            int dn = open("/dev/null", O_RDWR);
            int lf = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
            dup2(dn, 0);
            dup2(dn, 1);
            dup2(lf >= 0 ? lf : dn, 2);
            inherit_lock();
            child_exec(argv);
        }
        (void)!write(pp[1], &gc, sizeof gc);
        _exit(0);
    }
    close(pp[1]);
    if (mid < 0) {
        close(pp[0]);
        sp_err_errno(err, errno, "fork");
        goto out;
    }
    pid_t gc = -1;
    ssize_t n = read(pp[0], &gc, sizeof gc);
    close(pp[0]);
    waitpid(mid, NULL, 0);
    if (n != (ssize_t)sizeof gc || gc <= 0) {
        sp_errf(err, SP_INTERNAL, "could not start the agent daemon");
        goto out;
    }
    ag->pid = gc;
    FILE *f = fopen(pidf, "w");
    if (f) {
        fprintf(f, "%d\n", (int)gc);
        fclose(f);
    }
    /* A restarted controller reads which data dir the agent has. */
    char *dataf = path_in_state(c, ag->id, ".data");
    if ((f = fopen(dataf, "w"))) {
        fprintf(f, "%s\n", ag->data_dir);
        fclose(f);
    }
    free(dataf);
    ev_timer_init(&ag->timer, connect_retry_cb, CONNECT_RETRY_S, CONNECT_RETRY_S);
    ag->timer.data = ag;
    ev_timer_start(c->loop, &ag->timer);
    rc = 0;
out:
    free_argv(argv);
    free(sock);
    free(log);
    free(pidf);
    return rc;
}

static void socket_stop_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    bool gone = ag->pid <= 0 || kill(ag->pid, 0) < 0;
    if (!gone && ev_now(c->loop) - ag->idle_since < STOP_GRACE_S)
        return;
    if (!gone) {
        log_warn("agent %s ignored SIGTERM for %.0f s; SIGKILL", ag->id, STOP_GRACE_S);
        kill(ag->pid, SIGKILL);
    }
    for (const char *ext = ".sock\0.pid\0.log\0.data\0"; *ext; ext += strlen(ext) + 1) {
        char *p = path_in_state(c, ag->id, ext);
        unlink(p);
        free(p);
    }
    data_release(c, ag);
    agent_free_soon(c, ag);
}

/* ---- the vtable ---------------------------------------------------------- */

static int local_start(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    if (access(agent_bin(c, ag), X_OK) < 0)
        return sp_errf(err, SP_NOT_FOUND,
                       "slot-agent binary %s: %s (set local.agent or "
                       "--agent-bin)",
                       agent_bin(c, ag), strerror(errno));
    int lock_fd = -1;
    if (data_pick(c, ag, &lock_fd, err) < 0)
        return -1;
    ag->data_ours = true;
    spawn_lock_fd = lock_fd;
    int rc =
        ag->prof->local_mode == LOCAL_SOCKET ? start_socket(c, ag, err) : start_stdio(c, ag, err);
    /* The agent holds the lock from here on (or, when it did not start,
     * nobody: its dir goes with it under a lock taken again). */
    spawn_lock_fd = -1;
    close(lock_fd);
    return rc;
}

static void stdio_kill_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    if (ag->pid > 0) {
        log_warn("agent %s did not exit in %.0f s; SIGKILL", ag->id, STOP_GRACE_S);
        kill(ag->pid, SIGKILL);
    }
}

static void local_stop(struct ctl *c, struct agent *ag)
{
    ev_timer_stop(c->loop, &ag->timer);
    if (ag->prof->local_mode == LOCAL_STDIO) {
        if (ag->pid <= 0) {
            data_release(c, ag);
            agent_free_soon(c, ag);
            return;
        }
        /* Its stdin is closed already (it exits on EOF); SIGTERM makes sure. */
        kill(ag->pid, SIGTERM);
        ev_timer_init(&ag->timer, stdio_kill_cb, STOP_GRACE_S, 0);
        ag->timer.data = ag;
        ev_timer_start(c->loop, &ag->timer);
        return; /* child_cb frees it */
    }
    char *sock = path_in_state(c, ag->id, ".sock");
    if (pid_is_agent(ag->pid, sock))
        kill(ag->pid, SIGTERM);
    else
        ag->pid = 0;
    free(sock);
    ag->idle_since = ev_now(c->loop);
    ev_timer_init(&ag->timer, socket_stop_cb, 0.05, 0.05);
    ag->timer.data = ag;
    ev_timer_start(c->loop, &ag->timer);
}

static int local_attach(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    char *sock = path_in_state(c, ag->id, ".sock");
    int fd = connect_sock(sock);
    int e = errno;
    free(sock);
    if (fd < 0)
        return sp_err_errno(err, e, "connect to agent socket");
    agent_stream_ready(c, ag, fd);
    return 0;
}

/* A socket-mode daemon whose stream ended: does its process still serve
 * its socket? */
static void local_probe(struct ctl *c, struct agent *ag, probe_done_fn done)
{
    char *sock = path_in_state(c, ag->id, ".sock");
    bool alive = pid_is_agent(ag->pid, sock);
    free(sock);
    char why[80];
    snprintf(why, sizeof why, "process %d exited", (int)ag->pid);
    done(c, ag, alive ? 1 : ag->pid > 0 ? 0 : -1, alive ? NULL : why);
}

/* Agents of profile p left by an earlier controller: STATE/agents/P-*.sock. */
static int local_list(struct ctl *c, struct profile *p)
{
    char *dir = NULL;
    if (asprintf(&dir, "%s/agents", c->state_dir) < 0)
        abort();
    DIR *d = opendir(dir);
    free(dir);
    if (!d)
        return 0;
    int found = 0;
    size_t pl = strlen(p->name);
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t n = strlen(de->d_name);
        if (n < pl + 6 || strncmp(de->d_name, p->name, pl) || de->d_name[pl] != '-' ||
            strcmp(de->d_name + n - 5, ".sock"))
            continue;
        char id[CTL_NAME_MAX + 16];
        if (n - 5 >= sizeof id)
            continue;
        memcpy(id, de->d_name, n - 5);
        id[n - 5] = 0;
        if (strchr(id + pl + 1, '-') || agent_find(c, id, strlen(id)))
            continue;
        struct agent *ag = agent_new(c, p, id);
        ag->reattached = true;
        char *pidf = path_in_state(c, id, ".pid"), *sock = path_in_state(c, id, ".sock");
        FILE *f = fopen(pidf, "r");
        int pid = 0;
        if (f) {
            if (fscanf(f, "%d", &pid) != 1)
                pid = 0;
            fclose(f);
        }
        ag->pid = pid;
        snprintf(ag->address, sizeof ag->address, "unix:%s", sock);
        /* Its data dir as start_socket recorded it; an agent started by a
         * version without the record has an id-named one. */
        char *dataf = path_in_state(c, id, ".data"), line[4096];
        if ((f = fopen(dataf, "r")) && fgets(line, sizeof line, f) && line[0] == '/') {
            line[strcspn(line, "\n")] = 0;
            ag->data_dir = strdup(line);
        } else {
            char *base = data_base(c, p);
            if (asprintf(&ag->data_dir, "%s/%s", base, id) < 0)
                abort();
            free(base);
        }
        if (f)
            fclose(f);
        free(dataf);
        ag->data_ours = true;
        struct sp_err e;
        if (p->local_mode != LOCAL_SOCKET || local_attach(c, ag, &e) < 0) {
            log_warn("agent %s from an earlier run is unreachable (%s); removing it", id,
                     p->local_mode != LOCAL_SOCKET ? "profile is not in socket mode" : e.msg);
            if (!pid_is_agent(pid, sock))
                ag->pid = 0;
            ag->state = AG_STOPPING;
            local_stop(c, ag);
        } else {
            log_info("reattaching agent %s (pid %d)", id, pid);
            found++;
        }
        free(pidf);
        free(sock);
    }
    closedir(d);
    return found;
}

static bool local_persistent(const struct profile *p)
{
    return p->local_mode == LOCAL_SOCKET;
}

const struct backend backend_local = {
    .name = "local",
    .start_agent = local_start,
    .stop_agent = local_stop,
    .list_agents = local_list,
    .attach = local_attach,
    .persistent = local_persistent,
    .probe = local_probe,
};

const struct backend *backend_find(const char *name)
{
    if (!strcmp(name, "local"))
        return &backend_local;
    if (!strcmp(name, "exec"))
        return &backend_exec;
    if (!strcmp(name, "nomad"))
        return &backend_nomad;
    if (!strcmp(name, "modal"))
        return &backend_modal;
    if (!strcmp(name, "slurm"))
        return &backend_slurm;
    return NULL;
}
