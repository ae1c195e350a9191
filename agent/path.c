/* path.c: confinement of every path an op takes beneath a slot's workspace.
 * Owns path validation, opening beneath a root (openat2 RESOLVE_BENEATH, or
 * a symlink-refusing component walk on kernels without it), opening and
 * creating a path's parent, and emptying a directory tree without ever
 * following a link out of it. No path here goes through a shell. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "agent.h"

#define PATH_MAX_LEN 4095
/* path_empty_dir keeps at most this many directory streams open; deeper
 * levels are reopened through ".." (and checked) on the way back up. */
#define EMPTY_FD_WINDOW 32

bool path_is_root(const char *path)
{
    /* Only "." components and slashes: ".." is never the root. */
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
    if (len > 0 && memchr(path, 0, len))
        return sp_errf(err, SP_BAD_REQUEST, "path contains a NUL byte");
    if (len > PATH_MAX_LEN)
        return sp_errf(err, SP_BAD_REQUEST, "path longer than %d bytes", PATH_MAX_LEN);
    if (len + 2 > outcap)
        return sp_errf(err, SP_INTERNAL, "path buffer too small");
    if (len > 0 && path[0] == '/')
        return sp_errf(err, SP_PATH_ESCAPE,
                       "absolute path '%.*s': paths are relative to the workspace",
                       (int)(len > 200 ? 200 : len), path);
    memcpy(out, path, len);
    out[len] = 0;
    if (path_is_root(out)) {
        if (!allow_root)
            return sp_errf(err, SP_BAD_REQUEST, "path names the workspace itself, not a file");
        if (len == 0)
            memcpy(out, ".", 2); /* outcap >= 2 checked above */
    }
    return 0;
}

/* Contract codes for the errors resolution produces; messages name the
 * path as the client gave it. */
static int map_errno(struct sp_err *err, int e, const char *path)
{
    switch (e) {
    case EXDEV: return sp_errf(err, SP_PATH_ESCAPE, "%s: resolves outside the workspace", path);
    case ELOOP: return sp_errf(err, SP_PATH_ESCAPE, "%s: symlink loop or symlink escape", path);
    case ENOENT: return sp_errf(err, SP_NOT_FOUND, "%s: no such file or directory", path);
    case ENOTDIR: return sp_errf(err, SP_NOT_FOUND, "%s: a component is not a directory", path);
    case EISDIR: return sp_errf(err, SP_BAD_REQUEST, "%s: is a directory", path);
    case ENAMETOOLONG: return sp_errf(err, SP_BAD_REQUEST, "%s: name too long", path);
    default: return sp_err_errno(err, e, path);
    }
}

/* After O_NOFOLLOW failed on name with ENOTDIR, was it because name is a
 * symlink (O_DIRECTORY|O_NOFOLLOW reports a link that way)? */
static bool is_symlink_at(int dir_fd, const char *name)
{
    struct stat st;
    return fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
}

/* Fallback for kernels without openat2: one component at a time with
 * O_NOFOLLOW, refusing every symlink (stricter than openat2, never looser),
 * and ".." handled by popping our own stack of directory fds, so it can
 * never climb above the root however the tree changes meanwhile. */
static int walk_open(int root_fd, const char *path, int flags, mode_t mode, struct sp_err *err)
{
    char buf[PATH_MAX_LEN + 1];
    int *up = NULL; /* directories above cur; up[0] is root_fd */
    size_t depth = 0, cap = 0;
    int cur = root_fd, result = -1;
    size_t len = strlen(path);
    if (len > PATH_MAX_LEN)
        return sp_errf(err, SP_BAD_REQUEST, "path longer than %d bytes", PATH_MAX_LEN);
    memcpy(buf, path, len + 1);
    /* "dir/" must name a directory, as the kernel would insist. */
    if (len > 0 && path[len - 1] == '/' && !(flags & O_CREAT))
        flags |= O_DIRECTORY;
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
            cur = up[--depth];
            continue;
        }
        if (!next) {
            result = openat(cur, comp, flags | O_NOFOLLOW | O_CLOEXEC, mode);
            int e = errno;
            struct stat st;
            /* A final symlink shows up as ELOOP, as ENOTDIR with O_DIRECTORY,
             * or as an fd of the link itself with O_PATH: refuse all three. */
            if (result < 0 && e == ENOTDIR && is_symlink_at(cur, comp))
                e = ELOOP;
            if (result >= 0 && (flags & O_PATH) && fstat(result, &st) == 0 && S_ISLNK(st.st_mode)) {
                close(result);
                result = -1;
                e = ELOOP;
            }
            if (result < 0)
                map_errno(err, e, path);
            goto out;
        }
        int fd = openat(cur, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == ENOTDIR && is_symlink_at(cur, comp))
                e = ELOOP;
            map_errno(err, e, path);
            goto out;
        }
        if (depth == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            int *nu = realloc(up, ncap * sizeof *nu);
            if (!nu) {
                close(fd);
                sp_errf(err, SP_INTERNAL, "out of memory");
                goto out;
            }
            up = nu;
            cap = ncap;
        }
        up[depth++] = cur;
        cur = fd;
    }
    /* The path ended in ".", ".." or named the root. */
    result = openat(cur, ".", flags | O_CLOEXEC, mode);
    if (result < 0)
        map_errno(err, errno, path);
out:
    if (cur != root_fd)
        close(cur);
    while (depth > 0) {
        int fd = up[--depth];
        if (fd != root_fd)
            close(fd);
    }
    free(up);
    return result;
}

/* Written once at start-up, before the loop runs (SLOT_AGENT_NO_OPENAT2), so
 * the fallback walk can be tested on kernels that have openat2. The API in
 * agent.h takes no context, hence the one file-scope flag. */
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
        /* openat2 insists on mode 0 unless a file may be created. */
        .mode = (flags & (O_CREAT | __O_TMPFILE)) ? mode : 0,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    for (;;) {
        long fd = syscall(SYS_openat2, root_fd, path, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        /* EAGAIN: a concurrent rename raced the lookup; the kernel asks for
         * a retry rather than risk a wrong answer. */
        if (errno == EINTR || errno == EAGAIN)
            continue;
        if (errno == ENOSYS)
            return walk_open(root_fd, path, flags, mode, err);
        return map_errno(err, errno, path);
    }
}

/* The last component of path is path[*start, *end), trailing slashes
 * aside. */
static void last_component(const char *path, size_t *end, size_t *start)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    size_t i = len;
    while (i > 0 && path[i - 1] != '/')
        i--;
    *end = len;
    *start = i;
}

bool path_ends_in_dots(const char *path)
{
    size_t len, i;
    last_component(path, &len, &i);
    return (len - i == 1 && path[i] == '.') ||
           (len - i == 2 && path[i] == '.' && path[i + 1] == '.');
}

/* Split path into its directory ("." when none) and last component, which
 * must be a real name (not "." or ".."). */
static int split_last(const char *path, char *dir, size_t dircap, char *base, size_t basecap,
                      struct sp_err *err)
{
    size_t len, i;
    last_component(path, &len, &i);
    if (len == i || path_ends_in_dots(path))
        return sp_errf(err, SP_BAD_REQUEST, "%s: must end in a file name", path);
    size_t bl = len - i;
    if (bl >= basecap)
        return sp_errf(err, SP_BAD_REQUEST, "%s: file name longer than %zu bytes", path,
                       basecap - 1);
    memcpy(base, path + i, bl);
    base[bl] = 0;
    if (i >= dircap)
        return sp_errf(err, SP_BAD_REQUEST, "%s: too long", path);
    if (i == 0) {
        memcpy(dir, ".", 2);
    } else {
        memcpy(dir, path, i);
        dir[i] = 0;
    }
    return 0;
}

/* Create the missing directories of dir one at a time. Every prefix is
 * reopened from the root through path_open, so ".." and symlinks inside the
 * workspace resolve exactly as they would for any other op, and mkdirat only
 * ever runs in a directory that is already confined. */
static int make_dirs(int root_fd, char *dir, const char *path, struct sp_err *err)
{
    size_t len = strlen(dir), i = 0;
    int cur = path_open(root_fd, ".", O_RDONLY | O_DIRECTORY, 0, err);
    while (cur >= 0 && i < len) {
        while (i < len && dir[i] == '/')
            i++;
        size_t start = i;
        while (i < len && dir[i] != '/')
            i++;
        if (i == start)
            break;
        char saved = dir[i];
        dir[i] = 0;
        const char *comp = dir + start;
        bool name = strcmp(comp, ".") != 0 && strcmp(comp, "..") != 0;
        int next = -1;
        if (name && mkdirat(cur, comp, 0755) < 0 && errno != EEXIST)
            map_errno(err, errno, path);
        else
            next = path_open(root_fd, dir, O_RDONLY | O_DIRECTORY, 0, err);
        dir[i] = saved;
        close(cur);
        cur = next;
    }
    return cur;
}

int path_open_parent(int root_fd, const char *path, bool mkdirs, char *base, size_t basecap,
                     struct sp_err *err)
{
    char dir[PATH_MAX_LEN + 1];
    if (split_last(path, dir, sizeof dir, base, basecap, err) < 0) {
        /* "..", "a/../.." and the like: an escape is the better answer
         * than "not a file name" when the path leads outside. */
        struct sp_err e2;
        int fd = path_open(root_fd, path, O_PATH | O_DIRECTORY, 0, &e2);
        if (fd >= 0)
            close(fd);
        else if (e2.code == SP_PATH_ESCAPE)
            *err = e2;
        return -1;
    }
    int fd = path_open(root_fd, dir, O_RDONLY | O_DIRECTORY, 0, err);
    if (fd >= 0 || !mkdirs || err->code != SP_NOT_FOUND)
        return fd;
    return make_dirs(root_fd, dir, path, err);
}

/* ---- emptying a directory --------------------------------------------- */

struct empty_level {
    DIR *d;    /* NULL while closed to save fds (outside the window) */
    dev_t dev; /* identity, checked when reopened through ".." */
    ino_t ino;
    char *name; /* name in the parent level; NULL for the top */
};

/* Reopen level lv (closed earlier) as the parent of the open level below it,
 * and make sure ".." still leads where we came from: a directory renamed
 * meanwhile must not take the removal somewhere else. */
static int reopen_level(struct empty_level *lv, DIR *child, struct sp_err *err)
{
    int fd = openat(dirfd(child), "..", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return sp_err_errno(err, errno, "reopen parent directory");
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_dev != lv->dev || st.st_ino != lv->ino) {
        close(fd);
        return sp_errf(err, SP_INTERNAL, "directory moved while emptying the workspace");
    }
    lv->d = fdopendir(fd);
    if (!lv->d) {
        close(fd);
        return sp_err_errno(err, errno, "fdopendir");
    }
    return 0;
}

/* A command may have set overlayfs metadata on its own directories (the
 * data dir may itself be on an overlay, as in a container): an opaque
 * marker there can hide the directory's entries from readdir while rmdir
 * still finds them. Such xattrs are the command's; they go first. */
static void drop_overlay_xattrs(int fd)
{
    char names[4096];
    ssize_t n = flistxattr(fd, names, sizeof names);
    for (ssize_t i = 0; i < n;) {
        const char *nm = names + i;
        if (strstr(nm, "overlay."))
            fremovexattr(fd, nm);
        i += (ssize_t)strlen(nm) + 1;
    }
}

/* Descend into the directory name of level top: it must be emptied first. */
static int push_level(struct empty_level **lv, size_t *depth, size_t *cap, const char *name,
                      struct sp_err *err)
{
    struct empty_level *up = &(*lv)[*depth - 1];
    int pfd = dirfd(up->d);
    /* A command may have removed our permissions; the directory is going
     * anyway. AT_SYMLINK_NOFOLLOW: never chmod through a link swapped in. */
    fchmodat(pfd, name, 0700, AT_SYMLINK_NOFOLLOW);
    int fd = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : sp_err_errno(err, errno, name);
    drop_overlay_xattrs(fd);
    struct stat st;
    DIR *d = NULL;
    char *nm = NULL;
    if (fstat(fd, &st) < 0 || !(nm = strdup(name)) || !(d = fdopendir(fd))) {
        int e = errno;
        free(nm);
        close(fd);
        return sp_err_errno(err, e, name);
    }
    if (*depth == *cap) {
        size_t ncap = *cap * 2;
        struct empty_level *n = realloc(*lv, ncap * sizeof *n);
        if (!n) {
            closedir(d);
            free(nm);
            return sp_errf(err, SP_INTERNAL, "out of memory");
        }
        *lv = n;
        *cap = ncap;
    }
    if (*depth >= EMPTY_FD_WINDOW) {
        struct empty_level *old = &(*lv)[*depth - EMPTY_FD_WINDOW];
        if (old->d) {
            closedir(old->d);
            old->d = NULL;
        }
    }
    (*lv)[*depth] = (struct empty_level){.d = d, .dev = st.st_dev, .ino = st.st_ino, .name = nm};
    (*depth)++;
    return 0;
}

/* Iterative depth-first removal: the C stack stays flat however deep the
 * tree, and only EMPTY_FD_WINDOW directories are open at once. */
int path_empty_dir(int dir_fd, struct sp_err *err)
{
    size_t depth = 0, cap = 16;
    int rc = -1;
    struct empty_level *lv = malloc(cap * sizeof *lv);
    if (!lv)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    struct stat st;
    if (fstat(dir_fd, &st) < 0) {
        sp_err_errno(err, errno, "workspace");
        goto out;
    }
    if ((st.st_mode & 0700) != 0700)
        fchmod(dir_fd, (st.st_mode & 07777) | 0700);
    drop_overlay_xattrs(dir_fd);
    int top = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *td = top >= 0 ? fdopendir(top) : NULL;
    if (!td) {
        sp_err_errno(err, errno, "workspace");
        if (top >= 0)
            close(top);
        goto out;
    }
    lv[depth++] = (struct empty_level){.d = td, .dev = st.st_dev, .ino = st.st_ino};
    while (depth > 0) {
        struct empty_level *cur = &lv[depth - 1];
        errno = 0;
        struct dirent *de = readdir(cur->d);
        if (!de) {
            if (errno) {
                sp_err_errno(err, errno, "readdir");
                goto out;
            }
            if (depth == 1)
                break;
            struct empty_level *parent = &lv[depth - 2];
            if (!parent->d && reopen_level(parent, cur->d, err) < 0)
                goto out;
            closedir(cur->d);
            char *name = cur->name;
            depth--;
            int r = unlinkat(dirfd(parent->d), name, AT_REMOVEDIR);
            int e = errno;
            if (r < 0 && e != ENOENT) {
                sp_err_errno(err, e, name);
                free(name);
                goto out;
            }
            free(name);
            continue;
        }
        const char *name = de->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        int fd = dirfd(cur->d);
        if (unlinkat(fd, name, 0) == 0 || errno == ENOENT)
            continue;
        if (errno != EISDIR && errno != EPERM) {
            sp_err_errno(err, errno, name);
            goto out;
        }
        if (unlinkat(fd, name, AT_REMOVEDIR) == 0 || errno == ENOENT)
            continue;
        if (errno != ENOTEMPTY && errno != EEXIST && errno != EACCES && errno != EPERM) {
            sp_err_errno(err, errno, name);
            goto out;
        }
        if (push_level(&lv, &depth, &cap, name, err) < 0)
            goto out;
    }
    rc = 0;
out:
    while (depth > 0) {
        struct empty_level *l = &lv[--depth];
        if (l->d)
            closedir(l->d);
        free(l->name);
    }
    free(lv);
    return rc;
}
