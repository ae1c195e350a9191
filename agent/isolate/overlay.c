/* Overlay workspaces: a slot's workspace as an overlayfs view of a
 * template's layers with the slot's own upper layer on top, O(1) in the
 * template's size.
 *
 * The mount lives in a mount namespace of its own (with a user namespace
 * of its own when the agent is not root), made by a short-lived child: the
 * host's view of the data dir never changes, and no mount outlives the
 * agent. The child hands back three descriptors: the overlay's root (the
 * agent's file operations work through it), and the mount and user
 * namespaces, which a slot's boxes join before making their own copy of the
 * mount table (namespaces.c), so both boxes of a slot and the agent see the
 * same overlay. Closing the three ends it.
 *
 * With a user per slot (root), template files belong to the agent (0:0 on
 * disk) and each lower layer is mounted idmapped, 0 -> the slot's user, so a
 * slot owns what it sees and overlayfs copies files up as the slot's user. */
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
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

#include "../fdio.h"
#include "isolate.h"

#ifndef SYS_open_tree
#define SYS_open_tree 428
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define OVL_OPEN_TREE_CLONE 1u
#define OVL_MOVE_MOUNT_F_EMPTY_PATH 0x4u
#define OVL_MOUNT_ATTR_RDONLY 0x1ull
#define OVL_MOUNT_ATTR_IDMAP 0x100000ull
#define OVL_TIMEOUT_S 10

struct ovl_mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

struct ovl_reply {
    int32_t ok;
    char why[200];
};

/* The agent's own ids, as they were before unshare (after it they read
 * as the overflow ids until mapped), map to themselves. */
static int self_map(uid_t uid, gid_t gid)
{
    char m[64];
    if (file_write_str("/proc/self/setgroups", "deny") < 0 && errno != ENOENT)
        return -1;
    snprintf(m, sizeof m, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
    if (file_write_str("/proc/self/uid_map", m) < 0)
        return -1;
    snprintf(m, sizeof m, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
    return file_write_str("/proc/self/gid_map", m);
}

/* A user namespace whose only mapping is 0 -> uid (and gid), for idmapped
 * mounts; made by a child that waits until its maps are written. */
static int idmap_userns(unsigned uid)
{
    int go[2], done[2];
    if (pipe2(go, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(done, O_CLOEXEC) < 0) {
        close(go[0]);
        close(go[1]);
        return -1;
    }
    pid_t p = fork();
    if (p == 0) {
        close(go[0]);
        close(done[1]); /* else the read below never sees EOF */
        char c = unshare(CLONE_NEWUSER) == 0 ? 'y' : 'n';
        (void)!write(go[1], &c, 1);
        (void)!read(done[0], &c, 1);
        _exit(0);
    }
    close(go[1]);
    close(done[0]);
    char c = 0, path[64], m[64];
    int fd = -1;
    if (p > 0 && read(go[0], &c, 1) == 1 && c == 'y') {
        snprintf(m, sizeof m, "0 %u 1\n", uid);
        snprintf(path, sizeof path, "/proc/%d/uid_map", (int)p);
        bool ok = file_write_str(path, m) == 0;
        snprintf(path, sizeof path, "/proc/%d/gid_map", (int)p);
        ok = ok && file_write_str(path, m) == 0;
        snprintf(path, sizeof path, "/proc/%d/ns/user", (int)p);
        if (ok)
            fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    close(go[0]);
    close(done[1]);
    if (p > 0)
        waitpid(p, NULL, 0);
    return fd;
}

/* Lower layer i, idmapped, on stage/i; its path goes to out. */
static int idmap_lower(const char *lower, const char *stage, unsigned i, int userns, char *out,
                       size_t cap)
{
    snprintf(out, cap, "%s/%u", stage, i);
    if (mkdir(out, 0700) < 0 && errno != EEXIST)
        return -1;
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, lower, OVL_OPEN_TREE_CLONE | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct ovl_mount_attr a = {
        .attr_set = OVL_MOUNT_ATTR_IDMAP | OVL_MOUNT_ATTR_RDONLY,
        .userns_fd = (uint64_t)userns,
    };
    int rc = (int)syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &a, sizeof a);
    if (rc == 0)
        rc = (int)syscall(SYS_move_mount, fd, "", AT_FDCWD, out, OVL_MOVE_MOUNT_F_EMPTY_PATH);
    close(fd);
    return rc;
}

static void __attribute__((noreturn))
mounter(const struct isolation *iso, const struct ovl_conf *c, int sock)
{
    struct ovl_reply rep = {0};
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    bool userns = (iso->ns_flags & CLONE_NEWUSER) != 0;
    char opts[3500], lower[512];
    size_t n = 0;
    int userns_idmap = -1;
    const char *step = "chdir to the data dir";
    if (chdir(c->base_dir) < 0)
        goto fail;
    uid_t uid = geteuid();
    gid_t gid = getegid();
    step = "unshare";
    if (unshare(CLONE_NEWNS | (userns ? CLONE_NEWUSER : 0)) < 0)
        goto fail;
    step = "id maps";
    if (userns && self_map(uid, gid) < 0)
        goto fail;
    step = "making mounts private";
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        goto fail;
    step = "idmapped user namespace";
    if (c->idmap_uid && (userns_idmap = idmap_userns(c->idmap_uid)) < 0)
        goto fail;
    n = (size_t)snprintf(opts, sizeof opts, "userxattr,lowerdir=");
    for (unsigned i = 0; i < c->nlowers; i++) {
        const char *l = c->lowers[i];
        step = "idmapped lower layer";
        if (userns_idmap >= 0) {
            if (idmap_lower(c->lowers[i], c->stage, i, userns_idmap, lower, sizeof lower) < 0)
                goto fail;
            l = lower;
        }
        n += (size_t)snprintf(opts + n, n < sizeof opts ? sizeof opts - n : 0, "%s%s", i ? ":" : "",
                              l);
    }
    n += (size_t)snprintf(opts + n, n < sizeof opts ? sizeof opts - n : 0,
                          ",upperdir=%s,workdir=%s", c->upper, c->work);
    step = "overlay options";
    if (n >= sizeof opts) {
        errno = E2BIG;
        goto fail;
    }
    step = "mounting the overlay";
    if (mount("overlay", c->target, "overlay", MS_NOSUID | MS_NODEV, opts) < 0)
        goto fail;
    int fds[3] = {open(c->target, O_RDONLY | O_DIRECTORY | O_CLOEXEC),
                  open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC),
                  userns ? open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC) : -1};
    step = "opening the overlay";
    if (fds[0] < 0 || fds[1] < 0 || (userns && fds[2] < 0))
        goto fail;
    rep.ok = 1;
    _exit(fd_send_fds(sock, &rep, sizeof rep, fds, userns ? 3 : 2) == (ssize_t)sizeof rep ? 0 : 1);
fail:
    snprintf(rep.why, sizeof rep.why, "%s: %s", step, strerror(errno));
    (void)!write(sock, &rep, sizeof rep);
    _exit(1);
}

int ovl_mount(const struct isolation *iso, const struct ovl_conf *c, struct ovl_ns *out,
              struct sp_err *err)
{
    out->ws_fd = out->mnt_fd = out->user_fd = -1;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return sp_errf(err, SP_INTERNAL, "socketpair: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        return sp_errf(err, SP_INTERNAL, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        close(sv[0]);
        mounter(iso, c, sv[1]);
    }
    close(sv[1]);
    struct timeval tv = {OVL_TIMEOUT_S, 0};
    setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct ovl_reply rep = {0};
    int fds[3] = {-1, -1, -1};
    char cbuf[CMSG_SPACE(sizeof fds)];
    struct iovec iov = {&rep, sizeof rep};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t n;
    do
        n = recvmsg(sv[0], &mh, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    int nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(cm), sizeof(int) * (size_t)(nfds > 3 ? 3 : nfds));
        }
    close(sv[0]);
    if (n != (ssize_t)sizeof rep)
        kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    rep.why[sizeof rep.why - 1] = 0;
    if (n != (ssize_t)sizeof rep || !rep.ok || nfds < 2) {
        for (int i = 0; i < 3; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "overlay: %s",
                       n == (ssize_t)sizeof rep ? rep.why : "the mounter did not answer");
    }
    out->ws_fd = fds[0];
    out->mnt_fd = fds[1];
    out->user_fd = nfds > 2 ? fds[2] : -1;
    return 0;
}

void ovl_ns_close(struct ovl_ns *ns)
{
    int *fds[3] = {&ns->ws_fd, &ns->mnt_fd, &ns->user_fd};
    for (int i = 0; i < 3; i++)
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
}
