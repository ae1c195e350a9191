/* Ops read_file, write_file, stat and list: file access confined to the
 * slot's workspace (path.c), atomic replace on write, sorted listings. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define RESULT_SLACK (64u << 10)
#define LIST_DEFAULT 10000

static uint64_t mtime_ms(const struct stat *st)
{
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

static int checked_path(struct req *rq, const char *key, bool allow_root, char *out, size_t outcap,
                        struct sp_err *err)
{
    size_t n;
    const char *p = arg_str(rq, key, &n);
    if (!p) {
        p = ".";
        n = 1;
    }
    return path_check(p, n, allow_root, out, outcap, err);
}

int op_read_file(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[4096];
    if (checked_path(rq, "path", false, path, sizeof path, err) < 0)
        return -1;
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
    const msgpack_object *len_o = req_arg(rq, "length");
    uint64_t limit = rq->ag->opt.max_frame - RESULT_SLACK;
    uint64_t avail = offset < size ? size - offset : 0;
    uint64_t want = len_o ? len_o->via.u64 : avail;
    if (want > avail)
        want = avail;
    if (want > limit) {
        sp_errf(err, SP_TOO_LARGE,
                "%s: %llu bytes to read, over the limit of %llu per request; read in ranges "
                "with offset and length",
                path, (unsigned long long)want, (unsigned long long)limit);
        goto out;
    }
    buf = malloc(want ? want : 1);
    if (!buf) {
        sp_errf(err, SP_INTERNAL, "out of memory for %llu bytes", (unsigned long long)want);
        goto out;
    }
    size_t got = 0;
    while (got < want) {
        ssize_t n = pread(fd, buf + got, want - got, (off_t)(offset + got));
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

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int op_write_file(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[4096], base[256];
    if (checked_path(rq, "path", false, path, sizeof path, err) < 0)
        return -1;
    size_t n;
    const char *data = arg_bin(rq, "data", &n);
    mode_t mode = (mode_t)arg_uint(rq, "mode", 0644);
    bool append = arg_bool(rq, "append", false);
    int dfd =
        path_open_parent(s->ws_fd, path, arg_bool(rq, "mkdirs", false), base, sizeof base, err);
    if (dfd < 0)
        return -1;
    int rc = -1, fd = -1;
    char tmp[300] = "";
    struct stat st;
    if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
        sp_errf(err, SP_EXISTS, "%s: is a directory", path);
        goto out;
    }
    if (append) {
        /* Appending follows the confinement rules of path_open (a symlink
         * inside the workspace is fine, one leading out is not). */
        char rel[300];
        snprintf(rel, sizeof rel, "%s", base);
        fd = path_open(dfd, rel, O_WRONLY | O_APPEND | O_CREAT | O_NOCTTY, mode, err);
        if (fd < 0)
            goto out;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
            sp_errf(err, SP_BAD_REQUEST, "%s: not a regular file", path);
            goto out;
        }
        if (write_all(fd, data, n) < 0) {
            sp_err_errno(err, errno, path);
            goto out;
        }
    } else {
        /* Readers never see a half-written file: write a sibling, rename. */
        for (int tries = 0; tries < 16 && fd < 0; tries++) {
            unsigned r;
            if (getentropy(&r, sizeof r) < 0)
                r = (unsigned)rand();
            snprintf(tmp, sizeof tmp, ".%.200s.slot-tmp-%08x", base, r);
            fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (fd < 0 && errno != EEXIST) {
                sp_err_errno(err, errno, path);
                tmp[0] = 0;
                goto out;
            }
        }
        if (fd < 0) {
            sp_errf(err, SP_INTERNAL, "%s: cannot create a temporary file", path);
            tmp[0] = 0;
            goto out;
        }
        if (write_all(fd, data, n) < 0 || fchmod(fd, mode) < 0) {
            sp_err_errno(err, errno, path);
            goto out;
        }
        if (renameat(dfd, tmp, dfd, base) < 0) {
            sp_err_errno(err, errno, path);
            goto out;
        }
        tmp[0] = 0;
    }
    if (fstat(fd, &st) < 0) {
        sp_err_errno(err, errno, path);
        goto out;
    }
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
    if (fd >= 0)
        close(fd);
    if (tmp[0])
        unlinkat(dfd, tmp, 0);
    close(dfd);
    return rc;
}

int op_stat(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[4096], base[256];
    if (checked_path(rq, "path", true, path, sizeof path, err) < 0)
        return -1;
    struct stat st;
    char target[4096];
    ssize_t tn = -1;
    bool root = path_is_root(path);
    if (root) {
        if (fstat(s->ws_fd, &st) < 0)
            return sp_err_errno(err, errno, path);
    } else {
        int dfd = path_open_parent(s->ws_fd, path, false, base, sizeof base, err);
        if (dfd < 0)
            return -1;
        if (strcmp(base, "..") == 0 || fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            int e = errno;
            close(dfd);
            return e == ENOENT ? sp_errf(err, SP_NOT_FOUND, "%s: no such file or directory", path)
                               : sp_err_errno(err, e, path);
        }
        if (S_ISLNK(st.st_mode))
            tn = readlinkat(dfd, base, target, sizeof target - 1);
        close(dfd);
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

struct entry {
    char *path;
    struct stat st;
};

struct entries {
    struct entry *v;
    size_t n, cap;
    size_t max;
    bool truncated;
    size_t bytes; /* estimate of the packed size */
};

static int entries_push(struct entries *es, const char *path, const struct stat *st)
{
    if (es->n == es->cap) {
        size_t cap = es->cap ? es->cap * 2 : 256;
        struct entry *v = realloc(es->v, cap * sizeof *v);
        if (!v)
            return -1;
        es->v = v;
        es->cap = cap;
    }
    if (!(es->v[es->n].path = strdup(path)))
        return -1;
    es->v[es->n].st = *st;
    es->n++;
    es->bytes += strlen(path) + 64;
    return 0;
}

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const struct entry *)a)->path, ((const struct entry *)b)->path);
}

/* Depth-first with an explicit work list of directories still to read. */
static int list_dir(int top, bool recursive, struct entries *es, size_t byte_limit,
                    struct sp_err *err)
{
    struct pending {
        char *rel;
    } *todo = NULL;
    size_t ntodo = 0, captodo = 0;
    int rc = 0;
    char *first = strdup("");
    if (!first)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    todo = malloc(sizeof *todo);
    if (!todo) {
        free(first);
        return sp_errf(err, SP_INTERNAL, "out of memory");
    }
    captodo = 1;
    todo[ntodo++].rel = first;
    while (ntodo && !es->truncated) {
        char *rel = todo[--ntodo].rel;
        int fd = rel[0] ? openat(top, rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                        : openat(top, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
        if (!d) {
            if (fd >= 0)
                close(fd);
            free(rel);
            continue; /* vanished or unreadable: list what can be listed */
        }
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            if (es->n >= es->max || es->bytes > byte_limit) {
                es->truncated = true;
                break;
            }
            struct stat st;
            if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                continue;
            char child[4096];
            if ((size_t)snprintf(child, sizeof child, "%s%s%s", rel, rel[0] ? "/" : "",
                                 de->d_name) >= sizeof child)
                continue;
            if (entries_push(es, child, &st) < 0) {
                rc = sp_errf(err, SP_INTERNAL, "out of memory");
                break;
            }
            if (recursive && S_ISDIR(st.st_mode)) {
                if (ntodo == captodo) {
                    size_t cap = captodo * 2;
                    struct pending *t = realloc(todo, cap * sizeof *t);
                    if (!t) {
                        rc = sp_errf(err, SP_INTERNAL, "out of memory");
                        break;
                    }
                    todo = t;
                    captodo = cap;
                }
                if (!(todo[ntodo].rel = strdup(child))) {
                    rc = sp_errf(err, SP_INTERNAL, "out of memory");
                    break;
                }
                ntodo++;
            }
        }
        closedir(d);
        free(rel);
        if (rc < 0)
            break;
    }
    while (ntodo)
        free(todo[--ntodo].rel);
    free(todo);
    return rc;
}

int op_list(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    char path[4096];
    if (checked_path(rq, "path", true, path, sizeof path, err) < 0)
        return -1;
    int fd = path_open(s->ws_fd, path, O_RDONLY | O_DIRECTORY, 0, err);
    if (fd < 0) {
        if (err->code == SP_NOT_FOUND) {
            struct stat st;
            int probe = path_open(s->ws_fd, path, O_PATH, 0, err);
            if (probe >= 0) {
                bool dir = fstat(probe, &st) == 0 && S_ISDIR(st.st_mode);
                close(probe);
                if (!dir)
                    return sp_errf(err, SP_BAD_REQUEST, "%s: not a directory", path);
            }
        }
        return -1;
    }
    struct entries es = {.max = arg_uint(rq, "max_entries", LIST_DEFAULT)};
    int rc = list_dir(fd, arg_bool(rq, "recursive", false), &es,
                      rq->ag->opt.max_frame - RESULT_SLACK, err);
    close(fd);
    if (rc == 0) {
        if (es.n)
            qsort(es.v, es.n, sizeof *es.v, cmp_entry);
        msgpack_packer *pk = req_reply_begin(rq);
        msgpack_pack_map(pk, 2);
        sp_pack_cstr(pk, "entries");
        msgpack_pack_array(pk, (uint32_t)es.n);
        for (size_t i = 0; i < es.n; i++) {
            const struct stat *st = &es.v[i].st;
            msgpack_pack_map(pk, 5);
            sp_pack_kv_str(pk, "path", es.v[i].path);
            sp_pack_kv_str(pk, "type", type_name(st->st_mode));
            sp_pack_kv_uint(pk, "size", (uint64_t)st->st_size);
            sp_pack_kv_uint(pk, "mode", st->st_mode & 07777);
            sp_pack_kv_uint(pk, "mtime", mtime_ms(st));
        }
        sp_pack_kv_bool(pk, "truncated", es.truncated);
        req_reply_end(rq);
    }
    for (size_t i = 0; i < es.n; i++)
        free(es.v[i].path);
    free(es.v);
    return rc < 0 ? -1 : OP_DONE;
}
