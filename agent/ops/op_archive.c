/* op_archive.c: the archive op, a tar or tar.gz of one file, symlink or
 * directory tree of the workspace, in sorted order, symlinks stored as
 * links and never followed, built in memory under max_bytes (tar.c). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "tar.h"

#define PATH_BUF 4096
#define NAME_BUF 256
#define ENTRIES_DEFAULT 100000

struct arc {
    struct tar_out *t;
    int top; /* the directory being archived */
    uint64_t max_entries;
    uint64_t seen;
};

static int count_entry(struct arc *a, struct sp_err *err)
{
    if (++a->seen > a->max_entries)
        return sp_errf(err, SP_TOO_LARGE, "more than max_entries (%llu) entries to archive",
                       (unsigned long long)a->max_entries);
    return 0;
}

/* The target of the symlink rel beneath top. 1: it is gone or no longer a
 * link (changed since the walk saw it), skip it. */
static int read_link_beneath(int top, const char *rel, char *target, size_t cap, struct sp_err *err)
{
    char base[NAME_BUF];
    int dfd = path_open_parent(top, rel, false, base, sizeof base, err);
    if (dfd < 0)
        return err->code == SP_NOT_FOUND || err->code == SP_PATH_ESCAPE ? 1 : -1;
    ssize_t n = readlinkat(dfd, base, target, cap - 1);
    int e = errno;
    close(dfd);
    if (n < 0)
        return e == ENOENT || e == EINVAL ? 1 : sp_err_errno(err, e, rel);
    target[n] = 0;
    return 0;
}

static int arc_visit(void *ctx, const struct tree_ent *e, struct sp_err *err)
{
    struct arc *a = ctx;
    mode_t m = e->st->st_mode;
    if (!S_ISREG(m) && !S_ISDIR(m) && !S_ISLNK(m))
        return 0; /* sockets, fifos, devices */
    if (count_entry(a, err) < 0)
        return -1;
    char member[PATH_BUF + 8];
    snprintf(member, sizeof member, "./%s%s", e->rel, S_ISDIR(m) ? "/" : "");
    if (S_ISDIR(m))
        return tar_add(a->t, member, e->st, NULL, -1, err);
    if (S_ISLNK(m)) {
        char target[PATH_BUF];
        int r = read_link_beneath(a->top, e->rel, target, sizeof target, err);
        return r != 0 ? (r < 0 ? -1 : 0) : tar_add(a->t, member, e->st, target, -1, err);
    }
    /* O_NOFOLLOW: a file swapped for a symlink since the walk saw it is
     * refused (and skipped), never read through. */
    int fd = path_open(a->top, e->rel, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY, 0, err);
    if (fd < 0)
        return err->code == SP_NOT_FOUND || err->code == SP_PATH_ESCAPE ? 0 : -1;
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0)
        rc = sp_err_errno(err, errno, e->rel);
    else if (S_ISREG(st.st_mode))
        rc = tar_add(a->t, member, &st, NULL, fd, err);
    close(fd);
    return rc;
}

/* A directory: "./" and then everything beneath it. Takes dir_fd. */
static int archive_dir(struct arc *a, int dir_fd, struct sp_err *err)
{
    struct stat st;
    int rc = -1;
    if (fstat(dir_fd, &st) < 0) {
        sp_err_errno(err, errno, "directory");
        goto out;
    }
    a->top = dir_fd;
    if (count_entry(a, err) < 0 || tar_add(a->t, "./", &st, NULL, -1, err) < 0)
        goto out;
    rc = tree_walk(dir_fd, true, false, arc_visit, a, err) < 0 ? -1 : 0;
out:
    close(dir_fd);
    return rc;
}

/* What path names, looked at without following a final symlink: a tree, a
 * single file under its base name, or a single link. */
static int archive_path(struct arc *a, int ws_fd, const char *path, struct sp_err *err)
{
    if (path_is_root(path) || path_ends_in_dots(path)) {
        int fd = path_open(ws_fd, path, O_RDONLY | O_DIRECTORY, 0, err);
        return fd < 0 ? -1 : archive_dir(a, fd, err);
    }
    char base[NAME_BUF];
    int dfd = path_open_parent(ws_fd, path, false, base, sizeof base, err);
    if (dfd < 0)
        return -1;
    int rc = -1;
    struct stat st;
    if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        if (errno == ENOENT)
            sp_errf(err, SP_NOT_FOUND, "%s: no such file or directory", path);
        else
            sp_err_errno(err, errno, path);
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        int fd = openat(dfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            sp_err_errno(err, errno, path);
        else
            rc = archive_dir(a, fd, err);
    } else if (S_ISLNK(st.st_mode)) {
        char target[PATH_BUF];
        ssize_t n = readlinkat(dfd, base, target, sizeof target - 1);
        if (n < 0) {
            sp_err_errno(err, errno, path);
        } else {
            target[n] = 0;
            if (count_entry(a, err) == 0)
                rc = tar_add(a->t, base, &st, target, -1, err);
        }
    } else if (S_ISREG(st.st_mode)) {
        int fd = openat(dfd, base, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) < 0) {
            sp_err_errno(err, errno, path);
        } else if (!S_ISREG(st.st_mode)) {
            sp_errf(err, SP_BAD_REQUEST, "%s: changed while archiving", path);
        } else if (count_entry(a, err) == 0) {
            rc = tar_add(a->t, base, &st, NULL, fd, err);
        }
        if (fd >= 0)
            close(fd);
    } else {
        sp_errf(err, SP_BAD_REQUEST, "%s: not a file, directory or symlink", path);
    }
out:
    close(dfd);
    return rc;
}

int op_archive(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    size_t fn = 0;
    const char *fmt = arg_str(rq, "format", &fn);
    bool gzip;
    if (!fmt || sp_str_eq(fmt, fn, "tar.gz"))
        gzip = true;
    else if (sp_str_eq(fmt, fn, "tar"))
        gzip = false;
    else
        return sp_errf(err, SP_BAD_REQUEST, "args.format: expected \"tar\" or \"tar.gz\"");
    char path[PATH_BUF];
    size_t n = 0;
    const char *p = arg_str(rq, "path", &n);
    if (path_check(p ? p : ".", p ? n : 1, true, path, sizeof path, err) < 0)
        return -1;
    /* The answer must fit in one frame with its envelope. 0 means the
     * default, as an archive can never be empty. */
    uint64_t mf = rq->ag->opt.max_frame, slack = 64u << 10;
    uint64_t budget = mf > 2 * slack ? mf - slack : mf / 2;
    uint64_t max_bytes = arg_uint(rq, "max_bytes", 0);
    if (max_bytes == 0 || max_bytes > budget)
        max_bytes = budget;
    struct arc a = {.max_entries = arg_uint(rq, "max_entries", 0)};
    if (a.max_entries == 0)
        a.max_entries = ENTRIES_DEFAULT;
    struct tar_out t;
    a.t = &t;
    int rc = tar_begin(&t, gzip, max_bytes, err);
    if (rc == 0)
        rc = archive_path(&a, s->ws_fd, path, err);
    if (rc == 0)
        rc = tar_finish(&t, err);
    if (rc == 0) {
        msgpack_packer *pk = req_reply_begin(rq);
        msgpack_pack_map(pk, 4);
        sp_pack_kv_bin(pk, "data", t.buf, t.len);
        sp_pack_kv_str(pk, "format", gzip ? "tar.gz" : "tar");
        sp_pack_kv_uint(pk, "entries", t.entries);
        sp_pack_kv_uint(pk, "bytes", t.len);
        req_reply_end(rq);
        rc = OP_DONE;
    } else {
        rc = -1;
    }
    tar_free(&t);
    return rc;
}
