/* Path confinement beneath a slot's workspace: openat2(RESOLVE_BENEATH) where
 * the kernel has it, else a component walk that refuses every symlink and
 * never climbs above the root; plus emptying a directory without following
 * links. Nothing here takes a path through a shell. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent.h"

#define PATH_MAX_LEN 4095
#define WALK_MAX_DEPTH 256

bool path_is_root(const char *path)
{
    /* Nothing but "." components (".." is not the root). */
    for (const char *c = path; *c;) {
        size_t cl = strcspn(c, "/");
        if (cl != 0 && !(cl == 1 && c[0] == '.'))
            return false;
        c += cl + (c[cl] == '/');
    }
    return true;
}

int path_check(const char *path, size_t len, bool allow_root, char *out, size_t outcap,
               struct sp_err *err)
{
    if (memchr(path, 0, len))
        return sp_errf(err, SP_BAD_REQUEST, "path contains a NUL byte");
    if (len > PATH_MAX_LEN || len + 1 > outcap)
        return sp_errf(err, SP_BAD_REQUEST, "path longer than %d bytes", PATH_MAX_LEN);
    if (len > 0 && path[0] == '/')
        return sp_errf(err, SP_PATH_ESCAPE,
                       "absolute path '%.*s': paths are relative to the "
                       "workspace",
                       (int)(len > 200 ? 200 : len), path);
    memcpy(out, path, len);
    out[len] = 0;
    bool root = path_is_root(out);
    if (root && !allow_root)
        return sp_errf(err, SP_BAD_REQUEST, "path names the workspace itself, not a file");
    if (len == 0) {
        out[0] = '.';
        out[1] = 0;
    }
    return 0;
}

static int map_errno(struct sp_err *err, int e, const char *path)
{
    switch (e) {
    case EXDEV: return sp_errf(err, SP_PATH_ESCAPE, "%s: resolves outside the workspace", path);
    case ELOOP:
        return sp_errf(err, SP_PATH_ESCAPE, "%s: symlink loop or symlink leaving the workspace",
                       path);
    case ENOENT: return sp_errf(err, SP_NOT_FOUND, "%s: no such file or directory", path);
    case ENOTDIR: return sp_errf(err, SP_NOT_FOUND, "%s: a component is not a directory", path);
    case EISDIR: return sp_errf(err, SP_BAD_REQUEST, "%s: is a directory", path);
    default: return sp_err_errno(err, e, path);
    }
}

/* Fallback for kernels without openat2: walk one component at a time with
 * O_NOFOLLOW, refusing any symlink, keeping our own stack of directories so
 * ".." can never climb above the root. Stricter than openat2 (symlinks that
 * stay inside are refused too), never looser. */
static int walk_open(int root_fd, const char *path, int flags, mode_t mode, struct sp_err *err)
{
    char buf[PATH_MAX_LEN + 1];
    snprintf(buf, sizeof buf, "%s", path);
    int stack[WALK_MAX_DEPTH];
    int depth = 0;
    int cur = root_fd;
    int result = -1;
    char *save = NULL, *next;
    for (char *comp = strtok_r(buf, "/", &save); comp; comp = next) {
        next = strtok_r(NULL, "/", &save);
        if (strcmp(comp, ".") == 0)
            continue;
        if (strcmp(comp, "..") == 0) {
            if (depth == 0) {
                sp_errf(err, SP_PATH_ESCAPE, "%s: '..' leaves the workspace", path);
                goto out;
            }
            close(cur);
            cur = stack[--depth];
            continue;
        }
        if (!next) {
            result = openat(cur, comp, flags | O_NOFOLLOW | O_CLOEXEC, mode);
            struct stat st;
            int e = errno;
            /* A final symlink: ELOOP, or ENOTDIR with O_DIRECTORY, or an fd
             * of the link itself with O_PATH. All are refusals here. */
            bool link =
                (result < 0 && e == ENOTDIR && fstatat(cur, comp, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                 S_ISLNK(st.st_mode)) ||
                (result >= 0 && (flags & O_PATH) && fstat(result, &st) == 0 && S_ISLNK(st.st_mode));
            if (link) {
                if (result >= 0)
                    close(result);
                result = -1;
                e = ELOOP;
            }
            if (result < 0)
                map_errno(err, e, path);
            goto out;
        }
        if (depth == WALK_MAX_DEPTH) {
            sp_errf(err, SP_BAD_REQUEST, "%s: too deep", path);
            goto out;
        }
        int fd = openat(cur, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            struct stat st;
            /* O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR too. */
            if (e == ENOTDIR && fstatat(cur, comp, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                S_ISLNK(st.st_mode))
                e = ELOOP;
            map_errno(err, e, path);
            goto out;
        }
        stack[depth++] = cur;
        cur = fd;
    }
    result = openat(cur, ".", flags | O_CLOEXEC, mode);
    if (result < 0)
        map_errno(err, errno, path);
out:
    if (cur != root_fd)
        close(cur);
    while (depth > 0) {
        int fd = stack[--depth];
        if (fd != root_fd)
            close(fd);
    }
    return result;
}

/* Set once at start-up (before the loop) from SLOT_AGENT_NO_OPENAT2, so the
 * fallback walk can be exercised on kernels that have openat2. */
static bool force_walk;

void path_force_fallback(bool on)
{
    force_walk = on;
}

int path_open(int root_fd, const char *path, int flags, mode_t mode, struct sp_err *err)
{
    if (force_walk)
        return walk_open(root_fd, path, flags, mode, err);
    struct open_how how = {
        .flags = (uint64_t)(flags | O_CLOEXEC),
        .mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    for (;;) {
        long fd = syscall(SYS_openat2, root_fd, path, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno == EINTR || errno == EAGAIN)
            continue; /* EAGAIN: a concurrent rename raced the lookup */
        if (errno == ENOSYS)
            return walk_open(root_fd, path, flags, mode, err);
        return map_errno(err, errno, path);
    }
}

/* Split "a/b/c" into "a/b" and "c"; the last component must be a name. */
static int split_last(const char *path, char *dir, size_t dircap, char *base, size_t basecap,
                      struct sp_err *err)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    size_t i = len;
    while (i > 0 && path[i - 1] != '/')
        i--;
    size_t bl = len - i;
    if (bl == 0 || bl >= basecap)
        return sp_errf(err, SP_BAD_REQUEST, "%s: no file name", path);
    memcpy(base, path + i, bl);
    base[bl] = 0;
    if (strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return sp_errf(err, SP_BAD_REQUEST, "%s: must end in a file name", path);
    if (i == 0) {
        snprintf(dir, dircap, ".");
    } else {
        if (i >= dircap)
            return sp_errf(err, SP_BAD_REQUEST, "%s: too long", path);
        memcpy(dir, path, i);
        dir[i] = 0;
    }
    return 0;
}

int path_open_parent(int root_fd, const char *path, bool mkdirs, char *base, size_t basecap,
                     struct sp_err *err)
{
    char dir[PATH_MAX_LEN + 1];
    if (split_last(path, dir, sizeof dir, base, basecap, err) < 0)
        return -1;
    int fd = path_open(root_fd, dir, O_RDONLY | O_DIRECTORY, 0, err);
    if (fd >= 0 || !mkdirs || err->code != SP_NOT_FOUND)
        return fd;
    /* Create the missing directories one by one, each beneath the last. */
    int cur = dup(root_fd);
    if (cur < 0)
        return sp_err_errno(err, errno, "dup");
    char *save = NULL;
    for (char *c = strtok_r(dir, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        if (strcmp(c, ".") == 0)
            continue;
        if (strcmp(c, "..") == 0) {
            close(cur);
            return sp_errf(err, SP_PATH_ESCAPE, "%s: '..' while creating directories", path);
        }
        if (mkdirat(cur, c, 0755) < 0 && errno != EEXIST) {
            int e = errno;
            close(cur);
            return map_errno(err, e, path);
        }
        int next = path_open(cur, c, O_RDONLY | O_DIRECTORY, 0, err);
        close(cur);
        if (next < 0)
            return -1;
        cur = next;
    }
    return cur;
}

/* Iterative post-order removal with an explicit stack of open directories,
 * so depth is bounded by fds, not by the C stack. */
int path_empty_dir(int dir_fd, struct sp_err *err)
{
    struct frame {
        DIR *d;
        unsigned long descents;
    } stack[WALK_MAX_DEPTH];
    int depth = 0;
    int top = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (top < 0)
        return sp_err_errno(err, errno, "open workspace");
    fchmod(top, 0700);
    stack[0].d = fdopendir(top);
    stack[0].descents = 0;
    if (!stack[0].d) {
        close(top);
        return sp_err_errno(err, errno, "fdopendir");
    }
    int rc = 0;
    while (depth >= 0) {
        DIR *d = stack[depth].d;
        struct dirent *de = readdir(d);
        if (!de) {
            closedir(d);
            depth--;
            if (depth >= 0)
                rewinddir(stack[depth].d); /* the child is empty now: rescan to rmdir it */
            continue;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        int fd = dirfd(d);
        if (unlinkat(fd, de->d_name, 0) == 0 || errno == ENOENT)
            continue;
        if (errno != EISDIR && errno != EPERM) {
            rc = sp_err_errno(err, errno, de->d_name);
            break;
        }
        if (unlinkat(fd, de->d_name, AT_REMOVEDIR) == 0 || errno == ENOENT)
            continue;
        if (errno != ENOTEMPTY && errno != EEXIST && errno != EACCES) {
            rc = sp_err_errno(err, errno, de->d_name);
            break;
        }
        if (depth + 1 >= WALK_MAX_DEPTH) {
            rc = sp_errf(err, SP_TOO_LARGE, "directory tree deeper than %d levels", WALK_MAX_DEPTH);
            break;
        }
        /* A command may have removed read, write or search permission. */
        fchmodat(fd, de->d_name, 0700, 0);
        int sub = openat(fd, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        DIR *sd = sub >= 0 ? fdopendir(sub) : NULL;
        if (!sd) {
            rc = sp_err_errno(err, errno, de->d_name);
            if (sub >= 0)
                close(sub);
            break;
        }
        /* Emptying it must make progress, or an entry that cannot be removed
         * would send us round forever: one descent per entry per pass. */
        if (++stack[depth].descents > 1000000) {
            closedir(sd);
            rc = sp_errf(err, SP_INTERNAL, "cannot empty the workspace: no progress");
            break;
        }
        stack[++depth].d = sd;
        stack[depth].descents = 0;
    }
    while (depth >= 0)
        closedir(stack[depth--].d);
    return rc;
}
