/* op_files.c: the ops read_file, write_file, stat and list. All file access
 * is confined to the slot's workspace through path.c; writes replace the
 * target atomically (temp file + rename); listings come from tree_walk in
 * sorted order. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "fdio.h"
#include "quota.h"
#include "tar.h"

#define PATH_BUF 4096
#define NAME_BUF 256 /* NAME_MAX + 1 */
#define LIST_DEFAULT 10000
/* What a list entry costs in the answer besides its path: the map with
 * five keys, type string and three integers, generously. */
#define LIST_ENTRY_OVERHEAD 64

/* The payload budget of one answer: max_frame less room for the envelope
 * and the other result fields. */
static uint64_t result_budget(const struct req *rq)
{
    uint64_t mf = rq->ag->opt.max_frame;
    uint64_t slack = 64u << 10;
    return mf > 2 * slack ? mf - slack : mf / 2;
}

static uint64_t mtime_ms(const struct stat *st)
{
    if (st->st_mtim.tv_sec < 0)
        return 0;
    return (uint64_t)st->st_mtim.tv_sec * 1000 + (uint64_t)st->st_mtim.tv_nsec / 1000000;
}

static const char *type_name(mode_t m)
{
    if (S_ISREG(m))
        return "file";
    if (S_ISDIR(m))
        return "dir";
    if (S_ISLNK(m))
        return "symlink";
    return "other";
}

/* The `path` argument, checked, into out; absent means the workspace. */
static int get_path(const struct req *rq, bool allow_root, char *out, size_t outcap,
                    struct sp_err *err)
{
    size_t n = 0;
    const char *p = arg_str(rq, "path", &n);
    if (!p) {
        p = ".";
        n = 1;
    }
    return path_check(p, n, allow_root, out, outcap, err);
}

/* ---- read_file -------------------------------------------------------- */

int op_read_file(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[PATH_BUF];
    if (get_path(rq, false, path, sizeof path, err) < 0)
        return -1;
    /* O_NONBLOCK: opening a FIFO must not hang the loop; it is refused
     * below anyway. */
    int fd = path_open(s->ws_fd, path, O_RDONLY | O_NOCTTY | O_NONBLOCK, 0, err);
    if (fd < 0)
        return -1;
    int rc = -1;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        sp_err_errno(err, errno, path);
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        sp_errf(err, SP_BAD_REQUEST, "%s: is a directory", path);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        sp_errf(err, SP_BAD_REQUEST, "%s: not a regular file", path);
        goto out;
    }
    uint64_t size = (uint64_t)st.st_size;
    uint64_t offset = arg_uint(rq, "offset", 0);
    uint64_t avail = offset < size ? size - offset : 0;
    bool ranged = req_arg(rq, "length") != NULL;
    uint64_t want = ranged ? arg_uint(rq, "length", 0) : avail;
    if (want > avail)
        want = avail;
    uint64_t limit = result_budget(rq);
    if (want > limit) {
        sp_errf(err, SP_TOO_LARGE,
                "%s: %llu bytes (file size %llu) is over the limit of %llu bytes per read; "
                "read in ranges with offset and length",
                path, (unsigned long long)want, (unsigned long long)size,
                (unsigned long long)limit);
        goto out;
    }
    buf = malloc(want ? (size_t)want : 1);
    if (!buf) {
        sp_errf(err, SP_INTERNAL, "out of memory for %llu bytes", (unsigned long long)want);
        goto out;
    }
    size_t got = 0;
    while (got < want) {
        ssize_t n = pread(fd, buf + got, (size_t)want - got, (off_t)(offset + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            sp_err_errno(err, errno, path);
            goto out;
        }
        if (n == 0)
            break; /* the file shrank meanwhile */
        got += (size_t)n;
    }
    bool want_sha = arg_bool(rq, "sha256", false);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, want_sha ? 7 : 6);
    sp_pack_kv_bin(pk, "data", buf, got);
    sp_pack_kv_uint(pk, "size", size);
    sp_pack_kv_uint(pk, "offset", offset);
    sp_pack_kv_bool(pk, "eof", offset + got >= size);
    sp_pack_kv_uint(pk, "mode", st.st_mode & 07777);
    sp_pack_kv_uint(pk, "mtime", mtime_ms(&st));
    if (want_sha) {
        char hex[65];
        sp_sha256_hex(buf, got, hex);
        sp_pack_kv_str(pk, "sha256", hex);
    }
    req_reply_end(rq);
    rc = OP_DONE;
out:
    free(buf);
    close(fd);
    return rc;
}

/* ---- write_file ------------------------------------------------------- */

/* Create ".<base>.slot-tmp-XXXXXX" exclusively in dfd; name receives it. */
static int make_temp(int dfd, const char *base, char *name, size_t cap, struct sp_err *err)
{
    static const char alnum[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    for (int tries = 0; tries < 32; tries++) {
        unsigned char rnd[6];
        if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd) {
            /* No entropy yet: uniqueness is all we need, O_EXCL does the rest. */
            unsigned long v = (unsigned long)getpid() * 2654435761u + (unsigned long)tries;
            for (size_t i = 0; i < sizeof rnd; i++, v >>= 5)
                rnd[i] = (unsigned char)v;
        }
        char sfx[7];
        for (size_t i = 0; i < 6; i++)
            sfx[i] = alnum[rnd[i] % (sizeof alnum - 1)];
        sfx[6] = 0;
        /* Keep the whole name within NAME_MAX for long base names. */
        snprintf(name, cap, ".%.200s.slot-tmp-%s", base, sfx);
        int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd >= 0)
            return fd;
        if (errno != EEXIST)
            return sp_err_errno(err, errno, name);
    }
    return sp_errf(err, SP_INTERNAL, "cannot create a temporary file next to %s", base);
}

/* Readers never see a half-written file: write a sibling, rename it over
 * the target (which replaces a symlink there rather than following it). */
static int write_replace(int dfd, const char *base, const char *path, const char *data, size_t n,
                         mode_t mode, struct stat *st, struct sp_err *err)
{
    char tmp[NAME_BUF + 32];
    int fd = make_temp(dfd, base, tmp, sizeof tmp, err);
    if (fd < 0)
        return -1;
    int rc = -1;
    if (fd_write_all(fd, data, n) < 0 || fchmod(fd, mode) < 0 || fstat(fd, st) < 0) {
        sp_err_errno(err, errno, path);
        goto out;
    }
    if (renameat(dfd, tmp, dfd, base) < 0) {
        int e = errno;
        if (e == EISDIR || e == ENOTEMPTY || e == EEXIST)
            sp_errf(err, SP_EXISTS, "%s: is a directory", path);
        else
            sp_err_errno(err, e, path);
        goto out;
    }
    tmp[0] = 0;
    rc = 0;
out:
    close(fd);
    if (tmp[0])
        unlinkat(dfd, tmp, 0);
    return rc;
}

/* Append, creating the file with mode when missing. Opened by its full path
 * from the workspace root, so a symlink that stays inside is followed and
 * one that leads out is refused. */
static int write_append(int ws_fd, const char *path, const char *data, size_t n, mode_t mode,
                        struct stat *st, struct sp_err *err)
{
    int flags = O_WRONLY | O_APPEND | O_NOCTTY | O_NONBLOCK;
    int fd = path_open(ws_fd, path, flags | O_CREAT | O_EXCL, mode, err);
    bool created = fd >= 0;
    if (fd < 0 && err->code == SP_EXISTS)
        fd = path_open(ws_fd, path, flags, 0, err);
    if (fd < 0) {
        /* A symlink to a directory: the target is a directory, as above. */
        struct sp_err probe_err;
        int probe =
            err->code == SP_BAD_REQUEST ? path_open(ws_fd, path, O_PATH, 0, &probe_err) : -1;
        if (probe >= 0) {
            if (fstat(probe, st) == 0 && S_ISDIR(st->st_mode))
                sp_errf(err, SP_EXISTS, "%s: is a directory", path);
            close(probe);
        }
        return -1;
    }
    int rc = -1;
    if (fstat(fd, st) < 0) {
        sp_err_errno(err, errno, path);
        goto out;
    }
    if (!S_ISREG(st->st_mode)) {
        sp_errf(err, SP_BAD_REQUEST, "%s: not a regular file", path);
        goto out;
    }
    /* The umask had its say at creation; the caller's mode is exact. */
    if ((created && fchmod(fd, mode) < 0) || fd_write_all(fd, data, n) < 0 || fstat(fd, st) < 0) {
        sp_err_errno(err, errno, path);
        goto out;
    }
    rc = 0;
out:
    close(fd);
    return rc;
}

int op_write_file(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[PATH_BUF], base[NAME_BUF];
    if (get_path(rq, false, path, sizeof path, err) < 0)
        return -1;
    size_t n = 0;
    const char *data = arg_bin(rq, "data", &n);
    mode_t mode = (mode_t)arg_uint(rq, "mode", 0644);
    bool append = arg_bool(rq, "append", false);
    if (quota_check_write(rq->ag, s, n, err) < 0)
        return -1;
    int dfd =
        path_open_parent(s->ws_fd, path, arg_bool(rq, "mkdirs", false), base, sizeof base, err);
    if (dfd < 0)
        return -1;
    int rc = -1;
    struct stat st;
    if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
        sp_errf(err, SP_EXISTS, "%s: is a directory", path);
        goto out;
    }
    if (append ? write_append(s->ws_fd, path, data, n, mode, &st, err)
               : write_replace(dfd, base, path, data, n, mode, &st, err))
        goto out;
    quota_note_write(rq->ag, s, n);
    char hex[65];
    sp_sha256_hex(data, n, hex);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 3);
    sp_pack_kv_str(pk, "path", path);
    sp_pack_kv_uint(pk, "size", (uint64_t)st.st_size);
    sp_pack_kv_str(pk, "sha256", hex);
    req_reply_end(rq);
    rc = OP_DONE;
out:
    close(dfd);
    return rc;
}

/* ---- stat ------------------------------------------------------------- */

int op_stat(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[PATH_BUF], base[NAME_BUF], target[PATH_BUF];
    if (get_path(rq, true, path, sizeof path, err) < 0)
        return -1;
    struct stat st;
    ssize_t tn = -1;
    if (path_is_root(path) || path_ends_in_dots(path)) {
        int fd = path_open(s->ws_fd, path, O_PATH | O_DIRECTORY, 0, err);
        if (fd < 0)
            return -1;
        int r = fstat(fd, &st);
        int e = errno;
        close(fd);
        if (r < 0)
            return sp_err_errno(err, e, path);
    } else {
        /* lstat semantics: resolve the parent beneath the workspace, then
         * look at the last component without following it. */
        int dfd = path_open_parent(s->ws_fd, path, false, base, sizeof base, err);
        if (dfd < 0)
            return -1;
        int r = fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW);
        int e = errno;
        if (r == 0 && S_ISLNK(st.st_mode)) {
            tn = readlinkat(dfd, base, target, sizeof target);
            e = errno;
        }
        close(dfd);
        if (r < 0)
            return e == ENOENT ? sp_errf(err, SP_NOT_FOUND, "%s: no such file or directory", path)
                               : sp_err_errno(err, e, path);
        if (S_ISLNK(st.st_mode) && tn < 0)
            return sp_err_errno(err, e, path);
    }
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, tn >= 0 ? 6 : 5);
    sp_pack_kv_str(pk, "path", path);
    sp_pack_kv_str(pk, "type", type_name(st.st_mode));
    sp_pack_kv_uint(pk, "size", (uint64_t)st.st_size);
    sp_pack_kv_uint(pk, "mode", st.st_mode & 07777);
    sp_pack_kv_uint(pk, "mtime", mtime_ms(&st));
    if (tn >= 0)
        sp_pack_kv_strn(pk, "target", target, (size_t)tn);
    req_reply_end(rq);
    return OP_DONE;
}

/* ---- list ------------------------------------------------------------- */

struct list_ent {
    char *path;
    mode_t mode;
    uint64_t size;
    uint64_t mtime;
};

struct list_acc {
    struct list_ent *v;
    size_t n, cap;
    uint64_t max;
    uint64_t bytes, max_bytes; /* estimate of the packed answer */
    bool truncated;
};

static int list_visit(void *ctx, const struct tree_ent *e, struct sp_err *err)
{
    struct list_acc *a = ctx;
    uint64_t cost = e->rel_len + LIST_ENTRY_OVERHEAD;
    /* The walk is in sorted order: stopping here keeps exactly the first
     * max entries. */
    if (a->n >= a->max || a->bytes + cost > a->max_bytes) {
        a->truncated = true;
        return 1;
    }
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 256;
        struct list_ent *v = realloc(a->v, cap * sizeof *v);
        if (!v)
            return sp_errf(err, SP_INTERNAL, "out of memory");
        a->v = v;
        a->cap = cap;
    }
    char *p = strdup(e->rel);
    if (!p)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    a->v[a->n++] = (struct list_ent){.path = p,
                                     .mode = e->st->st_mode,
                                     .size = (uint64_t)e->st->st_size,
                                     .mtime = mtime_ms(e->st)};
    a->bytes += cost;
    return 0;
}

/* Open the directory to list; a path naming something else is a
 * bad_request rather than not_found. */
static int open_list_dir(int ws_fd, const char *path, struct sp_err *err)
{
    int fd = path_open(ws_fd, path, O_RDONLY | O_DIRECTORY, 0, err);
    if (fd >= 0 || err->code != SP_NOT_FOUND)
        return fd;
    struct sp_err probe_err;
    int probe = path_open(ws_fd, path, O_PATH, 0, &probe_err);
    if (probe < 0)
        return -1;
    struct stat st;
    bool dir = fstat(probe, &st) == 0 && S_ISDIR(st.st_mode);
    close(probe);
    return dir ? -1 : sp_errf(err, SP_BAD_REQUEST, "%s: not a directory", path);
}

int op_list(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[PATH_BUF];
    if (get_path(rq, true, path, sizeof path, err) < 0)
        return -1;
    int fd = open_list_dir(s->ws_fd, path, err);
    if (fd < 0)
        return -1;
    struct list_acc a = {
        .max = arg_uint(rq, "max_entries", LIST_DEFAULT),
        .max_bytes = result_budget(rq),
    };
    int rc = tree_walk(fd, arg_bool(rq, "recursive", false), true, list_visit, &a, err);
    close(fd);
    if (rc >= 0) {
        msgpack_packer *pk = req_reply_begin(rq);
        msgpack_pack_map(pk, 2);
        sp_pack_cstr(pk, "entries");
        msgpack_pack_array(pk, (uint32_t)a.n);
        for (size_t i = 0; i < a.n; i++) {
            const struct list_ent *e = &a.v[i];
            msgpack_pack_map(pk, 5);
            sp_pack_kv_str(pk, "path", e->path);
            sp_pack_kv_str(pk, "type", type_name(e->mode));
            sp_pack_kv_uint(pk, "size", e->size);
            sp_pack_kv_uint(pk, "mode", e->mode & 07777);
            sp_pack_kv_uint(pk, "mtime", e->mtime);
        }
        sp_pack_kv_bool(pk, "truncated", a.truncated);
        req_reply_end(rq);
        rc = OP_DONE;
    }
    for (size_t i = 0; i < a.n; i++)
        free(a.v[i].path);
    free(a.v);
    return rc;
}
