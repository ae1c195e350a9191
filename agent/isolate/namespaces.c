/* Rung 2: namespaces, created once per slot (a "box"), not per command.
 *
 * A holder process forked from the agent unshares a mount, PID and IPC
 * namespace (plus a user namespace when the agent is not root, and a network
 * namespace for the box that runs network=false commands), makes every mount
 * private, binds the slot's tmp directory over /tmp and its workspace on
 * /workspace (see box_workspace), and forks the box's
 * PID 1, which mounts a /proc of its own and reaps whatever is re-parented to
 * it. The holder then serves spawn requests from the agent over a Unix
 * socket: argv, environment, rlimits and the rest of the ladder in one
 * message, the command's standard streams, cwd and Landlock ruleset as
 * SCM_RIGHTS. It starts each command with clone(CLONE_PARENT), so the
 * command is in the box's namespaces but is the agent's own child: the agent
 * waits for it, times it out and kills its tree exactly as without a box.
 * Killing the holder kills PID 1 and with it everything in the box.
 *
 * The agent does not wait for the answer: it reads it from its event loop,
 * and an exit reaped before the answer named the pid is kept until then.
 *
 * Commands of `exec` come through a second socket, served by a thread of the
 * holder that enforces the slot's Landlock ruleset (and loads the seccomp
 * filter) on itself once, with the first of them: Landlock and seccomp
 * belong to a thread, and what it clones inherits them, so each command only
 * adds what its request asks for. The holder's own thread stays unconfined
 * for what needs a ruleset of its own (sessions, with their terminal). Each
 * command still enters one more Landlock domain that only scopes signals
 * and abstract sockets, so that commands cannot signal one another, as
 * before. The thread is outside the box's PID namespace: nothing in the box
 * can name it. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../child.h"
#include "../fdio.h"
#include "isolate.h"

#ifndef SYS_open_tree
#define SYS_open_tree 428
#define SYS_move_mount 429
#endif
#define OPEN_TREE_CLONE_ 1u
#define AT_RECURSIVE_ 0x8000
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x4u
#define ROOT_MAX_ENTRIES 256

#define BOX_TIMEOUT_MS 5000
#define BOX_MAX_PAYLOAD (8u << 20)
#define BOX_MAX_FDS 7

struct box_ready {
    int32_t ok;
    int32_t cold; /* the command thread runs */
    int32_t cgroup;
    int32_t init_pid;
    int32_t proc;
    char why[120];
};

struct box_req {
    uint32_t len; /* payload: path, cwd path, argv strings, envp strings, NUL-ended */
    uint32_t argc, envc;
    uint32_t want;
    int32_t required;
    int32_t seccomp_index;
    uint32_t uid;
    int32_t has_cwd, has_ll, ncg;
    int32_t ll_rooted; /* the ruleset has the rule for the box's root already */
    int32_t ctty;      /* stdin is a pty slave to take as controlling terminal */
    struct rlimit lim[LIM_COUNT];
};

struct box_rep {
    int32_t pid;
    int32_t child_errno;
    int32_t failed_rung;
    int32_t failed_errno;
    uint32_t applied;
};

/* Hide every other slot: a tmpfs over DATA/slots with only this slot's
 * directory bound back into it. */
static int hide_other_slots(const char *slot_dir, char *why, size_t cap)
{
    char slots[4096], self[64], target[4200];
    snprintf(slots, sizeof slots, "%s", slot_dir);
    char *name = strrchr(slots, '/');
    if (!name || name == slots)
        return 0;
    *name++ = 0;
    int keep = open(slot_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (keep < 0) {
        snprintf(why, cap, "open %.60s: %s", slot_dir, strerror(errno));
        return -1;
    }
    snprintf(self, sizeof self, "/proc/self/fd/%d", keep);
    snprintf(target, sizeof target, "%s/%s", slots, name);
    int rc = -1;
    if (mount("slots", slots, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k") < 0)
        snprintf(why, cap, "tmpfs over %.60s: %s", slots, strerror(errno));
    else if (mkdir(target, 0755) < 0 || mount(self, target, NULL, MS_BIND | MS_REC, NULL) < 0)
        snprintf(why, cap, "binding %.60s back: %s", target, strerror(errno));
    else
        rc = 0;
    close(keep);
    return rc;
}

struct root_entry {
    char name[256];
    int fd;     /* a detached clone of /name (with the mounts beneath), or -1 */
    bool dir;   /* else a file */
    char *link; /* a symlink's target, recreated as is */
};

static void root_entries_free(struct root_entry *e, int n)
{
    for (int i = 0; i < n; i++) {
        if (e[i].fd >= 0)
            close(e[i].fd);
        free(e[i].link);
    }
    free(e);
}

/* Clone every entry of / now, before the stage is mounted anywhere, so no
 * clone contains the stage itself. */
static int root_entries(struct root_entry **out, char *why, size_t cap)
{
    DIR *d = opendir("/");
    if (!d) {
        snprintf(why, cap, "opendir /: %s", strerror(errno));
        return -1;
    }
    struct root_entry *e = calloc(ROOT_MAX_ENTRIES, sizeof *e);
    int n = 0, rc = 0;
    struct dirent *de;
    while (e && rc == 0 && (de = readdir(d))) {
        const char *nm = de->d_name;
        if (!strcmp(nm, ".") || !strcmp(nm, "..") || !strcmp(nm, BOX_WORKSPACE + 1))
            continue;
        struct stat st;
        if (fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
            !(S_ISDIR(st.st_mode) || S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)))
            continue; /* gone meanwhile, or a socket or device: nothing to show */
        if (n == ROOT_MAX_ENTRIES || strlen(nm) >= sizeof e[n].name) {
            snprintf(why, cap, "too many entries in /");
            rc = -1;
            break;
        }
        struct root_entry *r = &e[n++];
        snprintf(r->name, sizeof r->name, "%s", nm);
        r->fd = -1;
        r->dir = S_ISDIR(st.st_mode);
        if (S_ISLNK(st.st_mode)) {
            char t[4096];
            ssize_t k = readlinkat(dirfd(d), nm, t, sizeof t - 1);
            if (k < 0 || !(r->link = strndup(t, (size_t)k))) {
                snprintf(why, cap, "readlink /%.60s: %s", nm, strerror(errno));
                rc = -1;
            }
            continue;
        }
        char path[300];
        snprintf(path, sizeof path, "/%s", nm);
        r->fd = (int)syscall(SYS_open_tree, AT_FDCWD, path,
                             OPEN_TREE_CLONE_ | AT_RECURSIVE_ | AT_NO_AUTOMOUNT | O_CLOEXEC);
        if (r->fd < 0) {
            snprintf(why, cap, "cloning /%.60s: %s", nm, strerror(errno));
            rc = -1;
        }
    }
    closedir(d);
    if (!e) {
        snprintf(why, cap, "out of memory");
        return -1;
    }
    if (rc < 0) {
        root_entries_free(e, n);
        return -1;
    }
    *out = e;
    return n;
}

/* The root filesystem has no /workspace and the box must not create one
 * there: the box gets a root of its own instead, a read-only tmpfs holding
 * every entry of / (its clone, mounts included) and an empty /workspace.
 * The tmpfs is mounted over the old root (MS_MOVE, then chroot) rather than
 * pivoted to, so every path still leads up to the host's / and Landlock's
 * rule on it (read anywhere) keeps holding. Commands cannot chroot back out
 * (seccomp), and the old root beneath holds nothing they could not see. */
static int box_new_root(char *why, size_t cap)
{
    struct root_entry *e;
    int n = root_entries(&e, why, cap);
    if (n < 0)
        return -1;
    static const char *const stages[] = {"/tmp", "/mnt", "/srv", "/opt", "/home", "/var"};
    const char *stage = NULL;
    for (size_t i = 0; !stage && i < sizeof stages / sizeof stages[0]; i++) {
        struct stat st;
        if (lstat(stages[i], &st) == 0 && S_ISDIR(st.st_mode))
            stage = stages[i];
    }
    int rc = -1;
    bool mounted = false;
    char t[600];
    if (!stage) {
        snprintf(why, cap, "no directory to build the box's root on");
        goto out;
    }
    if (mount("root", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") < 0) {
        snprintf(why, cap, "tmpfs for the box's root: %s", strerror(errno));
        goto out;
    }
    mounted = true;
    for (int i = 0; i < n; i++) {
        struct root_entry *r = &e[i];
        snprintf(t, sizeof t, "%s/%s", stage, r->name);
        int made;
        if (r->link)
            made = symlink(r->link, t);
        else if (r->dir)
            made = mkdir(t, 0755);
        else if ((made = open(t, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)) >= 0)
            made = close(made);
        if (made < 0 || (r->fd >= 0 && syscall(SYS_move_mount, r->fd, "", AT_FDCWD, t,
                                               MOVE_MOUNT_F_EMPTY_PATH_) < 0)) {
            snprintf(why, cap, "/%.60s in the box's root: %s", r->name, strerror(errno));
            goto out;
        }
    }
    snprintf(t, sizeof t, "%s%s", stage, BOX_WORKSPACE);
    if (mkdir(t, 0755) < 0 || chdir(stage) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0) {
        snprintf(why, cap, "moving the box's root over /: %s", strerror(errno));
        goto out;
    }
    mounted = false;
    if (chroot(".") < 0 || chdir("/") < 0) {
        snprintf(why, cap, "chroot into the box's root: %s", strerror(errno));
        goto out;
    }
    /* Nothing but the binds beneath is writable (and those as before). */
    mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
    rc = 0;
out:
    if (rc < 0 && mounted)
        umount2(stage, MNT_DETACH);
    root_entries_free(e, n);
    return rc;
}

/* Commands see the slot's workspace at /workspace, their working directory:
 * bound there (the same inode, so Landlock's rule on the workspace holds),
 * on the image's empty /workspace or, where the root filesystem has none,
 * on the one of a root built for the box. The host's view never changes. */
static int box_workspace(const char *ws_path, char *why, size_t cap)
{
    struct stat st;
    if ((lstat(BOX_WORKSPACE, &st) < 0 || !S_ISDIR(st.st_mode)) && box_new_root(why, cap) < 0)
        return -1;
    if (mount(ws_path, BOX_WORKSPACE, NULL, MS_BIND | MS_REC, NULL) < 0) {
        snprintf(why, cap, "binding the workspace on %s: %s", BOX_WORKSPACE, strerror(errno));
        return -1;
    }
    return 0;
}

/* Enter fresh namespaces and set them up; in a child of the agent. */
/* --share: host directories shown read-only at their place in every box
 * (pairs: host path, box path; the box path exists in the root). */
static int box_shares(const char *const *shares, unsigned n, char *why, size_t cap)
{
    for (unsigned i = 0; i < n; i++) {
        const char *host = shares[2 * i], *at = shares[2 * i + 1];
        if (mount(host, at, NULL, MS_BIND | MS_REC, NULL) < 0 ||
            mount(NULL, at, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) <
                0) {
            snprintf(why, cap, "sharing %.50s on %.50s: %s", host, at, strerror(errno));
            return -1;
        }
    }
    return 0;
}

static int box_enter(int flags, const char *tmp_path, const char *slot_dir, const char *ws_path,
                     const char *const *hide, const char *const *shares, unsigned nshares,
                     char *why, size_t cap)
{
    uid_t uid = geteuid();
    gid_t gid = getegid();
    if (unshare(flags) < 0) {
        snprintf(why, cap, "unshare: %s", strerror(errno));
        return -1;
    }
    if (flags & CLONE_NEWUSER) {
        /* The agent's own ids map to themselves: files keep their owners. */
        char m[64];
        if (file_write_str("/proc/self/setgroups", "deny") < 0 && errno != ENOENT) {
            snprintf(why, cap, "setgroups deny: %s", strerror(errno));
            return -1;
        }
        snprintf(m, sizeof m, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
        if (file_write_str("/proc/self/uid_map", m) < 0) {
            snprintf(why, cap, "uid_map: %s", strerror(errno));
            return -1;
        }
        snprintf(m, sizeof m, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
        if (file_write_str("/proc/self/gid_map", m) < 0) {
            snprintf(why, cap, "gid_map: %s", strerror(errno));
            return -1;
        }
    }
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
        snprintf(why, cap, "making mounts private: %s", strerror(errno));
        return -1;
    }
    if (slot_dir && hide_other_slots(slot_dir, why, cap) < 0)
        return -1;
    if (tmp_path && mount(tmp_path, "/tmp", NULL, MS_BIND | MS_REC, NULL) < 0) {
        snprintf(why, cap, "binding the slot's tmp on /tmp: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < 2 && hide && hide[i]; i++) {
        /* Templates and other slots' upper layers: the slot's overlay was
         * mounted from them already, and nothing in the box needs them. */
        struct stat st;
        if (lstat(hide[i], &st) == 0 && S_ISDIR(st.st_mode) &&
            mount("hidden", hide[i], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=0555,size=4k") < 0) {
            snprintf(why, cap, "hiding %.60s: %s", hide[i], strerror(errno));
            return -1;
        }
    }
    if (nshares && box_shares(shares, nshares, why, cap) < 0)
        return -1;
    if (ws_path && box_workspace(ws_path, why, cap) < 0)
        return -1;
    return 0;
}

/* With a user per slot: /etc/passwd and /etc/group of the box name the slot
 * user. Programs look their uid up (bash does at every start); an unknown
 * uid sends glibc through every NSS module (systemd's userdb walk costs
 * ~0.3 ms per command) and leaves `whoami` with no answer. */
static int copy_with_line(const char *src, const char *dst, const char *line)
{
    char tmp[4300], buf[65536];
    snprintf(tmp, sizeof tmp, "%s.%d", dst, (int)getpid());
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -1;
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (out < 0) {
        close(in);
        return -1;
    }
    ssize_t n;
    int rc = 0;
    char last = '\n';
    while ((n = read(in, buf, sizeof buf)) > 0) {
        if (fd_write_all(out, buf, (size_t)n) < 0)
            rc = -1;
        last = buf[n - 1];
    }
    if (n < 0 || (last != '\n' && fd_write_all(out, "\n", 1) < 0) ||
        fd_write_all(out, line, strlen(line)) < 0)
        rc = -1;
    close(in);
    if (close(out) < 0 || rc < 0 || rename(tmp, dst) < 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static void box_user_files(const char *slot_dir, unsigned uid, unsigned index, const char *home)
{
    static const char *const etc[2] = {"/etc/passwd", "/etc/group"};
    for (int k = 0; k < 2; k++) {
        char dst[4200], line[4300];
        snprintf(dst, sizeof dst, "%s/%s", slot_dir, k ? "group" : "passwd");
        if (k)
            snprintf(line, sizeof line, "slot%u:x:%u:\n", index, uid);
        else
            snprintf(line, sizeof line, "slot%u:x:%u:%u:slot %u:%s:/bin/sh\n", index, uid, uid,
                     index, home);
        if (copy_with_line(etc[k], dst, line) == 0 && mount(dst, etc[k], NULL, MS_BIND, NULL) == 0)
            mount(NULL, etc[k], NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
    }
}

static bool mount_proc(void)
{
    return mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0;
}

int ns_probe(struct isolation *iso, char *why, size_t whycap)
{
    /* Root gets a user namespace only where the others need one: without
     * CAP_SYS_ADMIN (Docker's default set, under a seccomp profile that lets
     * unshare through) unshare fails with EPERM, and a user namespace first
     * gives the box the capabilities for the rest (docs/docker-seccomp.md). */
    int user = iso->root ? 0 : CLONE_NEWUSER;
    char eperm[64];
    snprintf(eperm, sizeof eperm, "Eunshare: %s", strerror(EPERM));
again:;
    int base = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | user;
    int tries[2] = {base | CLONE_NEWNET, base};
    for (int t = 0; t < 2; t++) {
        int pp[2];
        if (pipe2(pp, O_CLOEXEC) < 0) {
            snprintf(why, whycap, "pipe: %s", strerror(errno));
            return -1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            char msg[128] = "";
            if (box_enter(tries[t], NULL, NULL, NULL, NULL, NULL, 0, msg + 1, sizeof msg - 1) < 0) {
                msg[0] = 'E';
                (void)!write(pp[1], msg, strlen(msg));
                _exit(1);
            }
            /* PID 1 tries what a box's does, in the same order: the
             * workspace (any directory will do), then its own /proc. It
             * answers "P|p W|w [why the workspace failed]". */
            pid_t one = fork();
            if (one == 0) {
                char m[128] = "PW";
                if (box_workspace("/", m + 2, sizeof m - 2) < 0)
                    m[1] = 'w';
                if (!mount_proc())
                    m[0] = 'p';
                (void)!write(pp[1], m, strlen(m));
                _exit(0);
            }
            int st = 0;
            waitpid(one, &st, 0);
            if (one < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
                (void)!write(pp[1], "pwthe probe's PID 1 failed", 26);
            _exit(0);
        }
        close(pp[1]);
        char msg[128] = "";
        ssize_t n = pid < 0 ? -1 : read(pp[0], msg, sizeof msg - 1);
        close(pp[0]);
        if (pid > 0)
            waitpid(pid, NULL, 0);
        if (n > 1 && (msg[0] == 'P' || msg[0] == 'p')) {
            iso->ns_flags = base;
            iso->ns_net = t == 0;
            iso->ns_proc = msg[0] == 'P';
            iso->ns_workspace = msg[1] == 'W';
            snprintf(iso->ns_workspace_why, sizeof iso->ns_workspace_why, "%.119s",
                     iso->ns_workspace ? "" : msg + 2);
            return 0;
        }
        if (t == 1 && !user && !strcmp(msg, eperm)) {
            user = CLONE_NEWUSER;
            goto again;
        }
        if (t == 1 || n <= 0) {
            snprintf(why, whycap, "%s%s", n > 1 ? msg + 1 : "probe child failed",
                     iso->root && user ? " (also with a user namespace)" : "");
            return -1;
        }
    }
    return -1;
}

/* ---- the holder --------------------------------------------------------- */

static ssize_t recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds)
{
    char cbuf[CMSG_SPACE(sizeof(int) * BOX_MAX_FDS)];
    struct iovec iov = {buf, len};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t n;
    do
        n = recvmsg(sock, &mh, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k && *nfds < BOX_MAX_FDS; i++)
                memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    return n;
}

/* PID 1 of the box: reap whatever ends up here, until the holder dies. */
static void __attribute__((noreturn)) box_init(bool want_proc, int report_fd)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    char ok = want_proc && mount_proc() ? 1 : 0;
    (void)!write(report_fd, &ok, 1);
    syscall(SYS_close_range, 0u, ~0u, 0);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    for (;;) {
        struct timespec ts = {1, 0};
        sigtimedwait(&chld, NULL, &ts);
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
}

/* cold: the command thread (see the top): it enforces the slot's ruleset on
 * itself with the first request that carries it, and each command then
 * enforces only the scope ruleset. */
static void serve(const struct isolation *iso, int sock, pid_t init, int root_fd, bool cold)
{
    char *stack = child_stack_alloc();
    if (!stack)
        return;
    /* The box's seccomp filter, once loaded here, is every command's: the
     * holder loads it with the first command that wants it (they all want
     * the same one: a box has one network setting), and commands skip it.
     * Not with denials added by the configuration: those could refuse a
     * command's own set-up (ids, limits, Landlock), which runs after. */
    int filtered = iso->nseccomp_deny ? -2 : -1;
    int confined = 0, scope_fd = -1; /* cold: 1 once the ruleset holds, -1 if it failed */
    for (;;) {
        struct pollfd pfd = {sock, POLLIN, 0};
        int r = poll(&pfd, 1, 1000);
        if (init > 0 && waitpid(init, NULL, WNOHANG) == init)
            return; /* the box is gone */
        if (r <= 0)
            continue;
        struct box_req rq;
        int fds[BOX_MAX_FDS], nfds;
        ssize_t n = recv_with_fds(sock, &rq, sizeof rq, fds, &nfds);
        if (n != (ssize_t)sizeof rq || rq.len > BOX_MAX_PAYLOAD || rq.ncg < 0 || rq.ncg > 2 ||
            nfds != 3 + !!rq.has_cwd + !!rq.has_ll + rq.ncg)
            return; /* the agent went away, or spoke nonsense */
        char *buf = malloc(rq.len + 1);
        char **vec = calloc((size_t)rq.argc + rq.envc + 2, sizeof *vec);
        if (!buf || !vec || fd_read_all(sock, buf, rq.len) < 0)
            return;
        buf[rq.len] = 0;
        /* path, then argc strings, then envc strings. */
        char *p = buf, *end = buf + rq.len;
        const char *path = p;
        p += strlen(p) + 1;
        const char *cwd_path = p < end ? p : "";
        p += strlen(cwd_path) + 1;
        uint32_t nstr = rq.argc + rq.envc;
        for (uint32_t i = 0; i < nstr; i++) {
            if (p >= end)
                return;
            vec[i < rq.argc ? i : i + 1] = p;
            p += strlen(p) + 1;
        }
        struct iso_child ic = {
            .want = rq.want,
            .required = rq.required,
            .landlock_fd = rq.has_ll ? fds[3 + !!rq.has_cwd] : -1,
            .seccomp = rq.seccomp_index >= 0 && rq.seccomp_index < 2
                           ? &iso->seccomp[rq.seccomp_index]
                           : NULL,
            .seccomp_index = rq.seccomp_index,
            .uid = rq.uid,
            .cg_fd = {-1, -1},
            .failed_rung = -1,
        };
        for (int k = 0; k < rq.ncg; k++)
            ic.cg_fd[k] = fds[3 + !!rq.has_cwd + !!rq.has_ll + k];
        unsigned inherited = 0;
        /* The agent's read-anywhere rule is on the host's /; when the box
         * has a root of its own, paths here lead up to that one instead.
         * (A failure shows as the command's EACCES.) */
        if (ic.landlock_fd >= 0 && root_fd >= 0 && !rq.ll_rooted)
            landlock_allow_read(ic.landlock_fd, root_fd);
        if (cold && ic.landlock_fd >= 0 && (rq.want & (1u << RUNG_LANDLOCK))) {
            if (confined == 0) {
                /* Without a domain of their own, commands would share one:
                 * then each enforces the whole ruleset itself, as before. */
                scope_fd = landlock_scope_ruleset(iso->landlock_abi, root_fd);
                confined = scope_fd >= 0 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
                                   landlock_apply(ic.landlock_fd) == 0
                               ? 1
                               : -1;
                if (confined < 0 && scope_fd >= 0)
                    close(scope_fd);
            }
            if (confined == 1) { /* else the command tries it, and reports */
                ic.landlock_fd = scope_fd;
                inherited |= 1u << RUNG_LANDLOCK;
            }
        }
        if (ic.seccomp && (rq.want & (1u << RUNG_SECCOMP))) {
            if (filtered == -1 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
                seccomp_apply(ic.seccomp) == 0)
                filtered = rq.seccomp_index;
            if (filtered == rq.seccomp_index) {
                ic.seccomp = NULL;
                inherited = 1u << RUNG_SECCOMP;
            }
        }
        memcpy(ic.lim, rq.lim, sizeof ic.lim);
        struct spawn sp = {
            .stack = stack,
            .path = path,
            .argv = vec,
            .envp = vec + rq.argc + 1,
            .stdin_fd = fds[0],
            .stdout_fd = fds[1],
            .stderr_fd = fds[2],
            .cwd_fd = rq.has_cwd ? fds[3] : -1,
            .cwd_path = cwd_path[0] ? cwd_path : NULL,
            .iso = &ic,
            .clone_flags = CLONE_PARENT,
            .ctty = rq.ctty != 0,
        };
        struct box_rep rep = {0};
        rep.pid = child_spawn(&sp);
        rep.child_errno = sp.child_errno;
        rep.failed_rung = ic.failed_rung;
        rep.failed_errno = ic.failed_errno;
        rep.applied = ic.applied | (rep.pid > 0 && !sp.child_errno ? inherited : 0);
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        free(buf);
        free(vec);
        if (fd_write_all(sock, &rep, sizeof rep) < 0)
            return;
    }
}

struct cold_thread {
    const struct isolation *iso;
    int sock, root_fd;
    int go, ready; /* pipes: the box's PID 1 in, the outcome out */
};

/* The command thread. A thread cannot be created once its process has
 * unshared a PID namespace, so it is created before, and joins the box's
 * PID namespace (for its children) on its own, by the box's PID 1, whose
 * pid the holder sends it (-2: the box has no PID namespace). */
static void *cold_main(void *arg)
{
    struct cold_thread *t = arg;
    pid_t init = -1;
    char ok = 0;
    if (read(t->go, &init, sizeof init) == (ssize_t)sizeof init) {
        int pfd = init > 0 ? (int)syscall(SYS_pidfd_open, init, 0) : -1;
        ok = init == -2 || (pfd >= 0 && setns(pfd, CLONE_NEWPID) == 0);
        if (pfd >= 0)
            close(pfd);
    }
    (void)!write(t->ready, &ok, 1);
    if (!ok) {
        close(t->sock);
        return NULL; /* commands go through the holder's own socket */
    }
    serve(t->iso, t->sock, -1, t->root_fd, true);
    /* The agent stopped talking, or spoke nonsense: the box goes (its PID 1
     * dies with the holder). */
    _exit(0);
}

static void __attribute__((noreturn))
holder_main(const struct isolation *iso, int sock, int cold_sock, const struct box_conf *bc,
            pid_t agent)
{
    /* A copy of the agent: drop its signal handlers and every descriptor
     * but the socket (listeners, connections, the stdio stream). */
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() != agent)
        _exit(1);
    /* The holder is a copy of the agent: it has no use for the token. */
    if (bc->secret)
        explicit_bzero(bc->secret, bc->secret_len);
    /* Its own session: with scheduler autogroups, the agent's session would
     * otherwise share one CPU share among the agent and every holder while
     * each command (a session leader) gets a whole one. */
    setsid();
    /* Before the descriptors go: children inherit the cgroup of the task
     * that forks them, which spares every command a migration (slow on
     * cgroup v1). */
    struct box_ready rd = {0};
    if (bc->cg_fd && bc->cg_fd[0] >= 0)
        rd.cgroup = cgroup_join(bc->cg_fd) == 0;
    /* A workspace mounted in namespaces of its own (overlay.c): the box
     * starts from a copy of that mount table, in that user namespace. */
    int flags = iso->ns_flags | (!bc->network && iso->ns_net ? CLONE_NEWNET : 0);
    if (bc->ws_user_fd >= 0) {
        if (setns(bc->ws_user_fd, CLONE_NEWUSER) < 0) {
            snprintf(rd.why, sizeof rd.why, "joining the workspace's user namespace: %s",
                     strerror(errno));
            (void)!write(sock, &rd, sizeof rd);
            _exit(1);
        }
        flags &= ~CLONE_NEWUSER;
    }
    if (bc->ws_mnt_fd >= 0 && setns(bc->ws_mnt_fd, CLONE_NEWNS) < 0) {
        snprintf(rd.why, sizeof rd.why, "joining the workspace's mounts: %s", strerror(errno));
        (void)!write(sock, &rd, sizeof rd);
        _exit(1);
    }
    /* The sockets to 3 and 4 (by way of numbers above: either may be 3 or
     * 4 now), and nothing else of the agent's. */
    int hs = fcntl(sock, F_DUPFD_CLOEXEC, 5);
    int hc = cold_sock >= 0 ? fcntl(cold_sock, F_DUPFD_CLOEXEC, 5) : -1;
    if (hs < 0 || (cold_sock >= 0 && hc < 0))
        _exit(1);
    dup3(hs, 3, O_CLOEXEC);
    sock = 3;
    if (hc >= 0) {
        dup3(hc, 4, O_CLOEXEC);
        cold_sock = 4;
    }
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    syscall(SYS_close_range, hc >= 0 ? 5u : 4u, ~0u, 0);
    /* PID namespace last: see cold_main. */
    if (box_enter(flags & ~CLONE_NEWPID, bc->tmp_path, bc->slot_dir, bc->ws_path, bc->hide,
                  bc->shares, bc->nshares, rd.why, sizeof rd.why) < 0) {
        (void)!write(sock, &rd, sizeof rd);
        _exit(1);
    }
    if (bc->uid)
        box_user_files(bc->slot_dir, bc->uid, bc->index, bc->home);
    /* Not before: /proc/self of a non-dumpable process is root's, and the
     * id maps above are written there. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int root_fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    int go[2] = {-1, -1}, ready[2] = {-1, -1};
    struct cold_thread ct = {iso, cold_sock, root_fd, -1, -1};
    pthread_t tid;
    bool cold = cold_sock >= 0 && pipe2(go, O_CLOEXEC) == 0 && pipe2(ready, O_CLOEXEC) == 0;
    if (cold) {
        ct.go = go[0];
        ct.ready = ready[1];
        cold = pthread_create(&tid, NULL, cold_main, &ct) == 0;
    }
    if (!cold && cold_sock >= 0)
        close(cold_sock);
    if ((flags & CLONE_NEWPID) && unshare(CLONE_NEWPID) < 0) {
        snprintf(rd.why, sizeof rd.why, "unshare of the PID namespace: %s", strerror(errno));
        (void)!write(sock, &rd, sizeof rd);
        _exit(1);
    }
    int pp[2];
    if (pipe2(pp, O_CLOEXEC) < 0)
        _exit(1);
    pid_t init = fork();
    if (init == 0)
        box_init(iso->ns_proc, pp[1]);
    close(pp[1]);
    if (cold) {
        pid_t in = init < 0 ? -1 : (flags & CLONE_NEWPID) ? init : -2;
        char ok = 0;
        rd.cold = fd_write_all(go[1], &in, sizeof in) == 0 && read(ready[0], &ok, 1) == 1 && ok;
    }
    for (int i = 0; i < 2; i++) {
        if (go[i] >= 0)
            close(go[i]);
        if (ready[i] >= 0)
            close(ready[i]);
    }
    char proc = 0;
    if (init < 0 || read(pp[0], &proc, 1) != 1) {
        snprintf(rd.why, sizeof rd.why, "starting the box's PID 1 failed");
        (void)!write(sock, &rd, sizeof rd);
        _exit(1);
    }
    close(pp[0]);
    rd.ok = 1;
    rd.init_pid = init;
    rd.proc = proc;
    if (fd_write_all(sock, &rd, sizeof rd) == 0)
        serve(iso, sock, init, root_fd, false);
    kill(init, SIGKILL);
    _exit(0);
}

/* ---- the agent's side --------------------------------------------------- */

int ns_box_start(const struct isolation *iso, const struct box_conf *bc, struct nsbox *box,
                 struct sp_err *err)
{
    int sv[2], cv[2] = {-1, -1};
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return sp_errf(err, SP_INTERNAL, "socketpair: %s", strerror(errno));
    /* Without one the commands go through the holder's own socket. */
    if (bc->cold && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, cv) < 0)
        cv[0] = cv[1] = -1;
    pid_t agent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        for (int i = 0; i < 2; i++) {
            close(sv[i]);
            if (cv[i] >= 0)
                close(cv[i]);
        }
        return sp_errf(err, SP_INTERNAL, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        close(sv[0]);
        if (cv[0] >= 0)
            close(cv[0]);
        holder_main(iso, sv[1], cv[1], bc, agent);
    }
    close(sv[1]);
    if (cv[1] >= 0)
        close(cv[1]);
    struct timeval tv = {BOX_TIMEOUT_MS / 1000, 0};
    setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(sv[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct box_ready rd;
    memset(&rd, 0, sizeof rd);
    if (fd_read_all(sv[0], &rd, sizeof rd) < 0 || !rd.ok) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        close(sv[0]);
        if (cv[0] >= 0)
            close(cv[0]);
        rd.why[sizeof rd.why - 1] = 0;
        return sp_errf(err, SP_INTERNAL, "namespaces: %s",
                       rd.why[0] ? rd.why : "the holder did not start");
    }
    box->pid = pid;
    box->init_pid = rd.init_pid;
    box->in_cgroup = rd.cgroup;
    box->sock = sv[0];
    box->csock = -1;
    if (cv[0] >= 0 && rd.cold) {
        setsockopt(cv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(cv[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        box->csock = cv[0];
    } else if (cv[0] >= 0) {
        close(cv[0]);
    }
    box->cold_ll = -1;
    return 0;
}

void ns_box_stop(struct nsbox *box)
{
    if (box->pid <= 0)
        return;
    kill(box->init_pid, SIGKILL);
    kill(box->pid, SIGKILL);
    close(box->sock);
    if (box->csock >= 0)
        close(box->csock);
    box->pid = box->init_pid = 0;
    box->sock = box->csock = box->cold_ll = -1;
}

int ns_box_send(struct nsbox *box, struct spawn *sp, bool cold)
{
    struct iso_child *ic = sp->iso;
    const char *cwd_path = sp->cwd_path ? sp->cwd_path : "";
    size_t len = strlen(sp->path) + 1 + strlen(cwd_path) + 1;
    uint32_t argc = 0, envc = 0;
    for (; sp->argv[argc]; argc++)
        len += strlen(sp->argv[argc]) + 1;
    for (; sp->envp[envc]; envc++)
        len += strlen(sp->envp[envc]) + 1;
    if (len > BOX_MAX_PAYLOAD) {
        sp->child_errno = E2BIG;
        return -1;
    }
    /* Only what stands on the slot's own ruleset (the one the thread
     * enforces: the first it was sent) may go to the thread. */
    int ch = cold && box->csock >= 0 && ic->landlock_fd >= 0 &&
                     (ic->want & (1u << RUNG_LANDLOCK)) &&
                     (box->cold_ll < 0 || box->cold_ll == ic->landlock_fd)
                 ? 1
                 : 0;
    /* The header and the strings in one buffer, sent by one sendmsg
     * (its remainder, if the socket takes less, by plain writes). */
    struct box_req rq;
    char *buf = malloc(sizeof rq + len), *p = buf + sizeof rq;
    if (!buf) {
        sp->child_errno = ENOMEM;
        return -1;
    }
    size_t k = strlen(sp->path) + 1;
    memcpy(p, sp->path, k);
    p += k;
    k = strlen(cwd_path) + 1;
    memcpy(p, cwd_path, k);
    p += k;
    for (uint32_t i = 0; i < argc; i++, p += k)
        memcpy(p, sp->argv[i], k = strlen(sp->argv[i]) + 1);
    for (uint32_t i = 0; i < envc; i++, p += k)
        memcpy(p, sp->envp[i], k = strlen(sp->envp[i]) + 1);
    rq = (struct box_req){
        .len = (uint32_t)len,
        .argc = argc,
        .envc = envc,
        .want = ic->want,
        .required = ic->required,
        .seccomp_index = ic->seccomp ? ic->seccomp_index : -1,
        .uid = ic->uid,
        .has_cwd = sp->cwd_fd >= 0 && !sp->cwd_path, /* the path is what counts in a box */
        .has_ll = ic->landlock_fd >= 0,
        /* The thread added the box's root to the slot's ruleset with its
         * first request (the holder's own thread always does: it is rare). */
        .ll_rooted = ch == 1 && box->cold_ll == ic->landlock_fd,
        .ncg = box->in_cgroup ? 0 : (ic->cg_fd[0] >= 0) + (ic->cg_fd[1] >= 0),
        .ctty = sp->ctty,
    };
    memcpy(rq.lim, ic->lim, sizeof rq.lim);
    memcpy(buf, &rq, sizeof rq);
    int fds[BOX_MAX_FDS] = {sp->stdin_fd, sp->stdout_fd, sp->stderr_fd};
    int nfds = 3;
    if (rq.has_cwd)
        fds[nfds++] = sp->cwd_fd;
    if (ic->landlock_fd >= 0)
        fds[nfds++] = ic->landlock_fd;
    for (int j = 0; j < 2 && !box->in_cgroup; j++)
        if (ic->cg_fd[j] >= 0)
            fds[nfds++] = ic->cg_fd[j];
    int sock = ch ? box->csock : box->sock;
    size_t total = sizeof rq + len;
    ssize_t n = fd_send_fds(sock, buf, total, fds, nfds);
    int ok = n >= (ssize_t)sizeof rq &&
             ((size_t)n == total || fd_write_all(sock, buf + n, total - (size_t)n) == 0);
    free(buf);
    if (!ok) {
        /* A holder that does not take requests is not trusted again. */
        ns_box_stop(box);
        sp->child_errno = EIO;
        return -1;
    }
    if (ch == 1)
        box->cold_ll = ic->landlock_fd;
    return ch;
}

int ns_box_recv(struct nsbox *box, int ch, struct box_result *r)
{
    struct box_rep rep;
    int sock = ch ? box->csock : box->sock;
    if (box->pid <= 0 || sock < 0 || fd_read_all(sock, &rep, sizeof rep) < 0)
        return -1;
    r->pid = rep.pid;
    r->child_errno = rep.child_errno;
    r->failed_rung = rep.failed_rung;
    r->failed_errno = rep.failed_errno;
    r->applied = rep.applied | (1u << RUNG_NAMESPACES);
    if (box->in_cgroup)
        r->applied |= 1u << RUNG_CGROUP;
    return 0;
}
