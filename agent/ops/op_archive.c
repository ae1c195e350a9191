/* Op archive: a tar or tar.gz of a file or directory tree of the workspace,
 * in sorted order, symlinks stored as links and never followed. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "tar.h"

#define RESULT_SLACK (64u << 10)
#define MAX_DEPTH 128

struct walk {
    struct tar_out *t;
    uint64_t max_entries;
    unsigned seen;
};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int add_entry(struct walk *w, int dirfd_, const char *name, const char *member, int depth,
                     struct sp_err *err);

static int add_dir_contents(struct walk *w, int fd, const char *prefix, int depth,
                            struct sp_err *err)
{
    if (depth > MAX_DEPTH)
        return sp_errf(err, SP_TOO_LARGE, "directory tree deeper than %d levels", MAX_DEPTH);
    int dfd = dup(fd);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        if (dfd >= 0)
            close(dfd);
        return sp_err_errno(err, errno, prefix);
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nv = realloc(names, cap * sizeof *nv);
            if (!nv) {
                rc = sp_errf(err, SP_INTERNAL, "out of memory");
                break;
            }
            names = nv;
        }
        if (!(names[n] = strdup(de->d_name))) {
            rc = sp_errf(err, SP_INTERNAL, "out of memory");
            break;
        }
        n++;
        if (w->seen + n > w->max_entries + 1) {
            rc = sp_errf(err, SP_TOO_LARGE, "more than max_entries (%llu) entries",
                         (unsigned long long)w->max_entries);
            break;
        }
    }
    closedir(d);
    if (rc == 0) {
        if (n)
            qsort(names, n, sizeof *names, cmp_str);
        for (size_t i = 0; i < n && rc == 0; i++) {
            char member[8192];
            if ((size_t)snprintf(member, sizeof member, "%s%s", prefix, names[i]) >=
                sizeof member) {
                rc = sp_errf(err, SP_BAD_REQUEST, "path too long to archive");
                break;
            }
            rc = add_entry(w, fd, names[i], member, depth, err);
        }
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc;
}

static int add_entry(struct walk *w, int dirfd_, const char *name, const char *member, int depth,
                     struct sp_err *err)
{
    struct stat st;
    if (fstatat(dirfd_, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? 0 : sp_err_errno(err, errno, member);
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode) && !S_ISLNK(st.st_mode))
        return 0;
    if (++w->seen > w->max_entries)
        return sp_errf(err, SP_TOO_LARGE, "more than max_entries (%llu) entries",
                       (unsigned long long)w->max_entries);
    if (S_ISLNK(st.st_mode)) {
        char target[4096];
        ssize_t tn = readlinkat(dirfd_, name, target, sizeof target - 1);
        if (tn < 0)
            return sp_err_errno(err, errno, member);
        target[tn] = 0;
        return tar_add(w->t, member, &st, target, -1, err);
    }
    int fd = openat(dirfd_, name,
                    (S_ISDIR(st.st_mode) ? O_DIRECTORY : 0) | O_RDONLY | O_NOFOLLOW | O_NONBLOCK |
                        O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : sp_err_errno(err, errno, member);
    struct stat st2;
    int rc;
    if (fstat(fd, &st2) < 0 || (st2.st_mode & S_IFMT) != (st.st_mode & S_IFMT)) {
        rc = 0; /* replaced while we looked: skip it */
    } else if (S_ISDIR(st2.st_mode)) {
        char dirname[8200];
        snprintf(dirname, sizeof dirname, "%s/", member);
        rc = tar_add(w->t, dirname, &st2, NULL, -1, err);
        if (rc == 0)
            rc = add_dir_contents(w, fd, dirname, depth + 1, err);
    } else {
        rc = tar_add(w->t, member, &st2, NULL, fd, err);
    }
    close(fd);
    return rc;
}

int op_archive(struct req *rq, struct sp_err *err)
{
    struct slot *s = req_slot(rq);
    size_t n, fn;
    const char *p = arg_str(rq, "path", &n);
    const char *fmt = arg_str(rq, "format", &fn);
    bool gzip = true;
    if (fmt && sp_str_eq(fmt, fn, "tar"))
        gzip = false;
    else if (fmt && !sp_str_eq(fmt, fn, "tar.gz"))
        return sp_errf(err, SP_BAD_REQUEST, "args.format: expected \"tar\" or \"tar.gz\"");
    char path[4096];
    if (path_check(p ? p : ".", p ? n : 1, true, path, sizeof path, err) < 0)
        return -1;
    uint64_t limit = rq->ag->opt.max_frame - RESULT_SLACK;
    uint64_t max_bytes = arg_uint(rq, "max_bytes", limit);
    if (max_bytes > limit || max_bytes == 0)
        max_bytes = limit;
    struct tar_out t;
    if (tar_begin(&t, gzip, max_bytes, err) < 0) {
        tar_free(&t);
        return -1;
    }
    struct walk w = {.t = &t, .max_entries = arg_uint(rq, "max_entries", 100000)};
    int rc = -1;
    int fd = path_open(s->ws_fd, path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY, 0, err);
    if (fd < 0 && err->code == SP_PATH_ESCAPE) {
        /* O_NOFOLLOW on a final symlink reports ELOOP: archive the link itself. */
        char base[256];
        int dfd = path_open_parent(s->ws_fd, path, false, base, sizeof base, err);
        if (dfd >= 0) {
            struct stat st;
            if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) {
                rc = add_entry(&w, dfd, base, base, 0, err);
                close(dfd);
                goto finish;
            }
            close(dfd);
        }
        sp_errf(err, SP_PATH_ESCAPE, "%s: resolves outside the workspace", path);
        goto out;
    }
    if (fd < 0)
        goto out;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        sp_err_errno(err, errno, path);
        close(fd);
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = tar_add(&t, "./", &st, NULL, -1, err);
        w.seen = 1;
        if (rc == 0)
            rc = add_dir_contents(&w, fd, "./", 1, err);
    } else if (S_ISREG(st.st_mode)) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        w.seen = 1;
        rc = tar_add(&t, base, &st, NULL, fd, err);
    } else {
        rc = sp_errf(err, SP_BAD_REQUEST, "%s: not a file or directory", path);
    }
    close(fd);
finish:
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
    }
out:
    tar_free(&t);
    return rc;
}
