/* Rung 3: Landlock. Read and execute anywhere; write only beneath the slot's
 * workspace and tmp and to a few harmless devices; no TCP bind/connect when
 * the command has no network (ABI >= 4); no signals or abstract Unix sockets
 * across the sandbox boundary (ABI >= 6). Rulesets are built by the agent and
 * only enforced by the child (landlock_restrict_self). The constants are the
 * kernel's stable ABI, spelled out because distribution headers lag. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "isolate.h"

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif

#define LL_CREATE_RULESET_VERSION (1u << 0)
#define LL_RULE_PATH_BENEATH 1

#define FS_EXECUTE (1ull << 0)
#define FS_WRITE_FILE (1ull << 1)
#define FS_READ_FILE (1ull << 2)
#define FS_READ_DIR (1ull << 3)
#define FS_REMOVE_DIR (1ull << 4)
#define FS_REMOVE_FILE (1ull << 5)
#define FS_MAKE_CHAR (1ull << 6)
#define FS_MAKE_DIR (1ull << 7)
#define FS_MAKE_REG (1ull << 8)
#define FS_MAKE_SOCK (1ull << 9)
#define FS_MAKE_FIFO (1ull << 10)
#define FS_MAKE_BLOCK (1ull << 11)
#define FS_MAKE_SYM (1ull << 12)
#define FS_REFER (1ull << 13)           /* ABI 2 */
#define FS_TRUNCATE (1ull << 14)        /* ABI 3 */
#define FS_IOCTL_DEV (1ull << 15)       /* ABI 5 */
#define NET_BIND_TCP (1ull << 0)        /* ABI 4 */
#define NET_CONNECT_TCP (1ull << 1)     /* ABI 4 */
#define SCOPE_ABSTRACT_UNIX (1ull << 0) /* ABI 6 */
#define SCOPE_SIGNAL (1ull << 1)        /* ABI 6 */

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct ll_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

int landlock_probe(void)
{
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return abi < 0 ? -1 : (int)abi;
}

static uint64_t fs_all(int abi)
{
    uint64_t a = (FS_MAKE_SYM << 1) - 1; /* ABI 1: bits 0..12 */
    if (abi >= 2)
        a |= FS_REFER;
    if (abi >= 3)
        a |= FS_TRUNCATE;
    if (abi >= 5)
        a |= FS_IOCTL_DEV;
    return a;
}

static int add_path(int rfd, const char *path, uint64_t access, bool must_exist, struct sp_err *err)
{
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        if (!must_exist)
            return 0;
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "landlock: open %s: %s", path,
                       strerror(errno));
    }
    struct ll_path_beneath pb = {.allowed_access = access, .parent_fd = fd};
    long rc = syscall(SYS_landlock_add_rule, rfd, LL_RULE_PATH_BENEATH, &pb, 0);
    int e = errno;
    close(fd);
    if (rc < 0)
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "landlock: rule for %s: %s", path,
                       strerror(e));
    return 0;
}

int landlock_ruleset(int abi, const char *ws, const char *tmp, bool network, const char *tty,
                     struct sp_err *err)
{
    struct ll_ruleset_attr attr = {.handled_access_fs = fs_all(abi)};
    size_t size = sizeof attr.handled_access_fs;
    if (abi >= 4) {
        size = offsetof(struct ll_ruleset_attr, scoped);
        if (!network)
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP;
    }
    if (abi >= 6) {
        size = sizeof attr;
        attr.scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL;
    }
    int rfd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (rfd < 0)
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "landlock_create_ruleset: %s",
                       strerror(errno));
    uint64_t all = fs_all(abi);
    uint64_t file_rw =
        FS_READ_FILE | FS_WRITE_FILE | (abi >= 3 ? FS_TRUNCATE : 0) | (abi >= 5 ? FS_IOCTL_DEV : 0);
    static const char *const devices[] = {"/dev/null",   "/dev/zero",    "/dev/full",
                                          "/dev/random", "/dev/urandom", "/dev/tty"};
    int rc = add_path(rfd, "/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR, true, err);
    if (rc == 0)
        rc = add_path(rfd, ws, all, true, err);
    if (rc == 0)
        rc = add_path(rfd, tmp, all, true, err);
    for (size_t i = 0; rc == 0 && i < sizeof devices / sizeof devices[0]; i++)
        rc = add_path(rfd, devices[i], file_rw, false, err);
    /* A session's own terminal by its name (programs such as less open
     * ttyname(), not /dev/tty): only that one, not the other slots'. */
    if (rc == 0 && tty)
        rc = add_path(rfd, tty, file_rw, false, err);
    if (rc < 0) {
        close(rfd);
        return -1;
    }
    return rfd;
}

int landlock_allow_read(int ruleset_fd, int dir_fd)
{
    struct ll_path_beneath pb = {.allowed_access = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR,
                                 .parent_fd = dir_fd};
    return (int)syscall(SYS_landlock_add_rule, ruleset_fd, LL_RULE_PATH_BENEATH, &pb, 0);
}

int landlock_scope_ruleset(int abi, int root_fd)
{
    if (abi < 1 || root_fd < 0)
        return -1;
    /* A domain of its own also keeps commands from tracing one another
     * (Landlock refuses ptrace between sibling domains), whatever the ABI.
     * One that handles no refer right still refuses every link or rename
     * across directories: this one handles it and grants it (ABI 1 has no
     * refer right and refuses those anyway: it handles and grants a right
     * the outer domain denies regardless). */
    uint64_t right = abi >= 2 ? FS_REFER : FS_MAKE_BLOCK;
    struct ll_ruleset_attr attr = {.handled_access_fs = right,
                                   .scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL};
    size_t size = abi >= 6   ? sizeof attr
                  : abi >= 4 ? offsetof(struct ll_ruleset_attr, scoped)
                             : sizeof attr.handled_access_fs;
    int rfd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    struct ll_path_beneath pb = {.allowed_access = right, .parent_fd = root_fd};
    if (rfd >= 0 && syscall(SYS_landlock_add_rule, rfd, LL_RULE_PATH_BENEATH, &pb, 0) < 0) {
        close(rfd);
        rfd = -1;
    }
    return rfd;
}

int landlock_apply(int ruleset_fd)
{
    return (int)syscall(SYS_landlock_restrict_self, ruleset_fd, 0);
}
