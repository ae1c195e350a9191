/* Directory trees beneath descriptors: copy (sharing blocks with FICLONE
 * where the filesystem can), apply an overlay layer, measure, remove. Every
 * step is relative to an open directory and refuses to follow symlinks, so
 * a tree that changes underneath (a slot still writing) can make a copy
 * incomplete but never make it reach outside. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "agent.h"
#include "tree.h"

/* Two descriptors per level: deep enough for any real project, bounded so a
 * hostile tree cannot exhaust the agent's descriptors. */
#define TREE_MAX_DEPTH 200
#define COPY_CHUNK (1u << 20)

struct walk {
    unsigned flags;
    uid_t uid;
    gid_t gid;
    struct tree_stats *st;
    struct sp_err *err;
    char *buf; /* fallback copy buffer, allocated on first use */
};

static int fail(struct walk *w, int errnum, const char *what, const char *name)
{
    sp_errf(w->err, errnum == ENOSPC || errnum == EDQUOT ? SP_TOO_LARGE : SP_INTERNAL,
            "%s %.200s: %s", what, name, strerror(errnum));
    return -1;
}

static bool is_whiteout(const struct stat *sb)
{
    return S_ISCHR(sb->st_mode) && sb->st_rdev == makedev(0, 0);
}

static bool is_opaque(int dirfd)
{
    char v[4];
    ssize_t n = fgetxattr(dirfd, TREE_OPAQUE_XATTR, v, sizeof v);
    return n == 1 && v[0] == 'y';
}

static void own(struct walk *w, int parent, const char *name, int fd)
{
    if (w->uid == (uid_t)-1)
        return;
    if (fd >= 0)
        (void)!fchown(fd, w->uid, w->gid);
    else
        (void)!fchownat(parent, name, w->uid, w->gid, AT_SYMLINK_NOFOLLOW);
}

/* Bytes [from, to) of in to the same offsets of out. */
static int copy_range(struct walk *w, int in, int out, off_t from, off_t to, const char *name)
{
    off_t off_in = from, off_out = from;
    while (off_in < to) {
        ssize_t n = copy_file_range(in, &off_in, out, &off_out, (size_t)(to - off_in), 0);
        if (n > 0)
            continue;
        if (n == 0)
            break; /* EOF, or a filesystem that copies nothing this way (the read below tells) */
        if (errno == EINTR)
            continue;
        if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
            return fail(w, errno, "copying", name);
        break; /* fall back to read/write from where we are */
    }
    if (off_in < to && !w->buf && !(w->buf = malloc(COPY_CHUNK)))
        return fail(w, ENOMEM, "copying", name);
    while (off_in < to) {
        size_t want = (size_t)(to - off_in) < COPY_CHUNK ? (size_t)(to - off_in) : COPY_CHUNK;
        ssize_t n = pread(in, w->buf, want, off_in);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return fail(w, errno, "reading", name);
        if (n == 0)
            break; /* the file shrank meanwhile */
        for (ssize_t off = 0; off < n;) {
            ssize_t k = pwrite(out, w->buf + off, (size_t)(n - off), off_in + off);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                return fail(w, errno, "writing", name);
            off += k;
        }
        off_in += n;
    }
    return 0;
}

/* The data of a file, its holes kept as holes (a sparse file a command
 * made must not become gigabytes of zeros on disk). */
static int copy_bytes(struct walk *w, int in, int out, off_t size, const char *name)
{
    if (ioctl(out, FICLONE, in) == 0) {
        w->st->reflinked = true;
        return 0;
    }
    w->st->copied = true;
    off_t pos = 0;
    while (pos < size) {
        off_t data = lseek(in, pos, SEEK_DATA);
        if (data < 0 && errno == ENXIO)
            break; /* a hole to the end */
        off_t end = data < 0 ? size : lseek(in, data, SEEK_HOLE);
        if (data < 0)
            data = pos; /* no SEEK_DATA here: all of it */
        if (end < 0 || end > size)
            end = size;
        if (copy_range(w, in, out, data, end, name) < 0)
            return -1;
        pos = end > data ? end : size;
    }
    if (ftruncate(out, size) < 0)
        return fail(w, errno, "sizing", name);
    return 0;
}

static int copy_file(struct walk *w, int sdir, int ddir, const char *name, const struct stat *sb)
{
    int in = openat(sdir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (in < 0)
        return errno == ENOENT ? 0 : fail(w, errno, "opening", name);
    int out = openat(ddir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                     (sb->st_mode & 0777) | 0200);
    if (out < 0) {
        close(in);
        return fail(w, errno, "creating", name);
    }
    int rc = copy_bytes(w, in, out, sb->st_size, name);
    if (rc == 0) {
        own(w, ddir, name, out);
        struct timespec ts[2] = {sb->st_atim, sb->st_mtim};
        futimens(out, ts);
        fchmod(out, sb->st_mode & 0777); /* exactly, whatever the umask did */
        w->st->files++;
        w->st->bytes += (uint64_t)sb->st_size;
    }
    close(in);
    if (close(out) < 0 && rc == 0)
        rc = fail(w, errno, "writing", name);
    return rc;
}

static int copy_link(struct walk *w, int sdir, int ddir, const char *name)
{
    char t[4097];
    ssize_t n = readlinkat(sdir, name, t, sizeof t - 1);
    if (n < 0)
        return errno == ENOENT ? 0 : fail(w, errno, "reading link", name);
    t[n] = 0;
    if (symlinkat(t, ddir, name) < 0)
        return fail(w, errno, "creating link", name);
    own(w, ddir, name, -1);
    w->st->files++;
    return 0;
}

static int walk_dir(struct walk *w, int sdir, int ddir, unsigned depth);

/* dst has name as something other than a directory, or must lose it. */
static int clear_entry(struct walk *w, int ddir, const char *name, bool keep_dir)
{
    struct stat db;
    if (fstatat(ddir, name, &db, AT_SYMLINK_NOFOLLOW) < 0)
        return 0;
    if (keep_dir && S_ISDIR(db.st_mode))
        return 0;
    return tree_remove(ddir, name, w->err);
}

static int copy_entry(struct walk *w, int sdir, int ddir, const char *name, unsigned depth)
{
    struct stat sb;
    if (fstatat(sdir, name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? 0 : fail(w, errno, "stat", name);
    bool merge = w->flags & TREE_MERGE;
    if (is_whiteout(&sb)) {
        if (merge)
            return clear_entry(w, ddir, name, false);
        if (!(w->flags & TREE_LAYER))
            return 0;
        if (mknodat(ddir, name, S_IFCHR | 0600, makedev(0, 0)) < 0)
            return fail(w, errno, "creating whiteout", name);
        w->st->files++;
        return 0;
    }
    if (!S_ISDIR(sb.st_mode) && !S_ISREG(sb.st_mode) && !S_ISLNK(sb.st_mode))
        return 0;
    if (merge && clear_entry(w, ddir, name, S_ISDIR(sb.st_mode)) < 0)
        return -1;
    if (S_ISREG(sb.st_mode))
        return copy_file(w, sdir, ddir, name, &sb);
    if (S_ISLNK(sb.st_mode))
        return copy_link(w, sdir, ddir, name);
    if (depth >= TREE_MAX_DEPTH)
        return sp_errf(w->err, SP_TOO_LARGE, "directory tree deeper than %d levels at %.200s",
                       TREE_MAX_DEPTH, name);
    int s = openat(sdir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (s < 0)
        return errno == ENOENT ? 0 : fail(w, errno, "opening", name);
    bool opaque = is_opaque(s);
    if (mkdirat(ddir, name, 0700) < 0 && !(merge && errno == EEXIST)) {
        close(s);
        return fail(w, errno, "creating directory", name);
    }
    int d = openat(ddir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (d < 0) {
        close(s);
        return fail(w, errno, "opening", name);
    }
    int rc = 0;
    if (merge && opaque)
        rc = path_empty_dir(d, w->err);
    if (rc == 0 && (w->flags & TREE_LAYER) && opaque &&
        fsetxattr(d, TREE_OPAQUE_XATTR, "y", 1, 0) < 0)
        rc = fail(w, errno, "marking opaque", name);
    if (rc == 0)
        rc = walk_dir(w, s, d, depth + 1);
    if (rc == 0) {
        own(w, ddir, name, d);
        fchmod(d, sb.st_mode & 0777);
        struct timespec ts[2] = {sb.st_atim, sb.st_mtim};
        futimens(d, ts);
        w->st->files++;
    }
    close(s);
    close(d);
    return rc;
}

static int walk_dir(struct walk *w, int sdir, int ddir, unsigned depth)
{
    int fd = openat(sdir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dp = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dp) {
        if (fd >= 0)
            close(fd);
        return fail(w, errno, "opening", "directory");
    }
    int rc = 0;
    struct dirent *de;
    while (rc == 0 && (errno = 0, de = readdir(dp))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        rc = copy_entry(w, sdir, ddir, de->d_name, depth);
    }
    if (rc == 0 && errno)
        rc = fail(w, errno, "reading", "directory");
    closedir(dp);
    return rc;
}

int tree_copy(int src, int dst, unsigned flags, uid_t uid, gid_t gid, struct tree_stats *st,
              struct sp_err *err)
{
    struct tree_stats none;
    memset(st ? st : &none, 0, sizeof none);
    struct walk w = {flags, uid, gid, st ? st : &none, err, NULL};
    int rc = 0;
    if ((flags & TREE_MERGE) && is_opaque(src))
        rc = path_empty_dir(dst, err);
    if (rc == 0)
        rc = walk_dir(&w, src, dst, 0);
    if (rc == 0 && (flags & TREE_LAYER) && is_opaque(src) &&
        fsetxattr(dst, TREE_OPAQUE_XATTR, "y", 1, 0) < 0)
        rc = fail(&w, errno, "marking opaque", ".");
    free(w.buf);
    return rc;
}

int tree_remove(int parent, const char *name, struct sp_err *err)
{
    struct stat sb;
    if (fstatat(parent, name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? 0 : sp_err_errno(err, errno, name);
    if (S_ISDIR(sb.st_mode)) {
        int d = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (d < 0)
            return sp_err_errno(err, errno, name);
        int rc = path_empty_dir(d, err);
        close(d);
        if (rc < 0)
            return -1;
    }
    if (unlinkat(parent, name, S_ISDIR(sb.st_mode) ? AT_REMOVEDIR : 0) < 0 && errno != ENOENT)
        return sp_err_errno(err, errno, name);
    return 0;
}

static void usage_walk(int dir, unsigned depth, uint64_t *files, uint64_t *bytes)
{
    int fd = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dp = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dp) {
        if (fd >= 0)
            close(fd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(dp))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        struct stat sb;
        if (fstatat(dir, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
            continue;
        (*files)++;
        *bytes += (uint64_t)sb.st_blocks * 512u;
        if (S_ISDIR(sb.st_mode) && depth < TREE_MAX_DEPTH) {
            int d = openat(dir, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (d >= 0) {
                usage_walk(d, depth + 1, files, bytes);
                close(d);
            }
        }
    }
    closedir(dp);
}

int tree_usage(int dir, uint64_t *files, uint64_t *disk_bytes)
{
    *files = *disk_bytes = 0;
    usage_walk(dir, 0, files, disk_bytes);
    return 0;
}

static int chown_walk(int dir, uid_t uid, gid_t gid, unsigned depth, struct sp_err *err)
{
    if (uid != (uid_t)-1 && fchown(dir, uid, gid) < 0)
        return sp_err_errno(err, errno, "chown");
    int fd = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dp = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dp) {
        if (fd >= 0)
            close(fd);
        return sp_err_errno(err, errno, "opendir");
    }
    int rc = 0;
    struct dirent *de;
    while (rc == 0 && (de = readdir(dp))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        bool is_dir = de->d_type == DT_DIR;
        struct stat sb;
        if (de->d_type == DT_UNKNOWN && fstatat(dir, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) == 0)
            is_dir = S_ISDIR(sb.st_mode);
        if (is_dir && depth < TREE_MAX_DEPTH) {
            int d = openat(dir, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            mode_t restore = (mode_t)-1;
            if (d < 0 && errno == EACCES &&
                fstatat(dir, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) == 0 &&
                fchmodat(dir, de->d_name, 0700, AT_SYMLINK_NOFOLLOW) == 0) {
                /* A directory its owner closed (chmod 000, the agent not
                 * root): open it, then give it its mode back. */
                restore = sb.st_mode & 0777;
                d = openat(dir, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            }
            if (d < 0) {
                rc = sp_err_errno(err, errno, de->d_name);
                break;
            }
            rc = chown_walk(d, uid, gid, depth + 1, err);
            if (restore != (mode_t)-1)
                fchmod(d, restore);
            close(d);
        } else if (fchownat(dir, de->d_name, uid, gid, AT_SYMLINK_NOFOLLOW) < 0 &&
                   errno != ENOENT) {
            rc = sp_err_errno(err, errno, de->d_name);
        } else if (fstatat(dir, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(sb.st_mode) &&
                   (sb.st_mode & 07000)) {
            /* chown clears setuid/setgid as a rule; make sure (never
             * through a symlink swapped in meanwhile). */
            fchmodat(dir, de->d_name, sb.st_mode & 0777, AT_SYMLINK_NOFOLLOW);
        }
    }
    closedir(dp);
    return rc;
}

int tree_chown(int dir, uid_t uid, gid_t gid, struct sp_err *err)
{
    return chown_walk(dir, uid, gid, 0, err);
}
