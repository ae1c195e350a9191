/* tar.c: the archive writer (ustar headers, pax 'x' records for what ustar
 * cannot hold: names and link targets over 100 bytes, sizes of 8 GiB and
 * more, large ids), optionally streamed through zlib as gzip, into one
 * buffer that never grows past its cap; and the sorted tree walk shared by
 * `list` and `archive`. See tar.h. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"
#include "tar.h"

#define BLOCK 512
#define GROW_MIN (64u << 10)
#define USTAR_MAX_SIZE 077777777777ull /* 11 octal digits */
#define USTAR_MAX_ID 07777777ull       /* 7 octal digits */
/* Level 1: archives are built inside the event loop, and for source trees
 * the ratio gained by higher levels is small next to the time they take. */
#define GZIP_LEVEL 1
#define PATH_MAX_LEN 4095

static const char zeros[2 * BLOCK];

/* Make room for at least one more byte (and ideally want more), never past
 * max_bytes. */
static int out_reserve(struct tar_out *t, size_t want, struct sp_err *err)
{
    if (t->len + want > t->max_bytes)
        return sp_errf(err, SP_TOO_LARGE, "archive larger than max_bytes (%llu bytes)",
                       (unsigned long long)t->max_bytes);
    if (t->len + want <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : GROW_MIN;
    while (cap < t->len + want)
        cap *= 2;
    if (cap > t->max_bytes)
        cap = (size_t)t->max_bytes;
    char *b = realloc(t->buf, cap);
    if (!b)
        return sp_errf(err, SP_INTERNAL, "out of memory building the archive");
    t->buf = b;
    t->cap = cap;
    return 0;
}

/* Feed avail_in through deflate straight into the output buffer. */
static int z_run(struct tar_out *t, int flush, struct sp_err *err)
{
    for (;;) {
        if (t->len == t->cap) {
            size_t want = t->len + GROW_MIN <= t->max_bytes ? GROW_MIN : 1;
            if (out_reserve(t, want, err) < 0)
                return -1;
        }
        size_t room = t->cap - t->len;
        if (room > UINT_MAX)
            room = UINT_MAX;
        t->z.next_out = (Bytef *)t->buf + t->len;
        t->z.avail_out = (uInt)room;
        int zr = deflate(&t->z, flush);
        t->len += room - t->z.avail_out;
        if (zr == Z_STREAM_ERROR)
            return sp_errf(err, SP_INTERNAL, "deflate failed");
        if (flush == Z_FINISH) {
            if (zr == Z_STREAM_END)
                return 0;
        } else if (t->z.avail_in == 0 && t->z.avail_out != 0) {
            return 0; /* all input taken; deflate keeps the rest internally */
        }
    }
}

static int emit(struct tar_out *t, const void *p, size_t n, struct sp_err *err)
{
    if (n == 0)
        return 0;
    t->raw_bytes += n;
    if (t->raw_bytes > t->max_raw)
        return sp_errf(err, SP_TOO_LARGE, "archive content over %llu bytes before compression",
                       (unsigned long long)t->max_raw);
    if (!t->gzip) {
        if (out_reserve(t, n, err) < 0)
            return -1;
        memcpy(t->buf + t->len, p, n);
        t->len += n;
        return 0;
    }
    t->z.next_in = (Bytef *)(uintptr_t)p;
    t->z.avail_in = (uInt)n; /* callers pass at most a few blocks or 64 KiB */
    return z_run(t, Z_NO_FLUSH, err);
}

static int emit_pad(struct tar_out *t, uint64_t size, struct sp_err *err)
{
    return size % BLOCK ? emit(t, zeros, BLOCK - size % BLOCK, err) : 0;
}

int tar_begin(struct tar_out *t, bool gzip, uint64_t max_bytes, struct sp_err *err)
{
    memset(t, 0, sizeof *t);
    t->gzip = gzip;
    t->max_bytes = max_bytes;
    /* Compressible input could otherwise keep the loop busy for a long time
     * behind a small archive. */
    t->max_raw = gzip ? max_bytes * 64 : max_bytes;
    if (gzip && t->max_raw > (2ull << 30))
        t->max_raw = 2ull << 30;
    if (gzip) {
        if (deflateInit2(&t->z, GZIP_LEVEL, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
            return sp_errf(err, SP_INTERNAL, "deflateInit2 failed");
        t->z_ready = true;
    }
    return 0;
}

/* width-1 zero-padded octal digits and a NUL; callers keep v in range. */
static void octal(char *field, size_t width, uint64_t v)
{
    field[width - 1] = 0;
    for (size_t i = width - 1; i-- > 0; v >>= 3)
        field[i] = (char)('0' + (v & 7));
}

/* Append "<len> key=value\n" to the pax body; the length counts itself. */
static int pax_record(char *dst, size_t cap, size_t *used, const char *key, const char *val,
                      size_t vlen)
{
    size_t body = 1 + strlen(key) + 1 + vlen + 1; /* " key=value\n" */
    size_t total = body + 1;
    for (;;) {
        char digits[24];
        size_t d = (size_t)snprintf(digits, sizeof digits, "%zu", total);
        if (body + d == total)
            break;
        total = body + d;
    }
    if (*used + total > cap)
        return -1;
    char *p = dst + *used;
    p += sprintf(p, "%zu %s=", total, key);
    memcpy(p, val, vlen);
    p[vlen] = '\n';
    *used += total;
    return 0;
}

static void fill_header(char *h, const char *name, size_t name_len, mode_t mode, uint64_t uid,
                        uint64_t gid, uint64_t size, int64_t mtime, char type, const char *link)
{
    memset(h, 0, BLOCK);
    memcpy(h, name, name_len < 100 ? name_len : 100);
    octal(h + 100, 8, mode & 07777);
    octal(h + 108, 8, uid > USTAR_MAX_ID ? 0 : uid);
    octal(h + 116, 8, gid > USTAR_MAX_ID ? 0 : gid);
    octal(h + 124, 12, size > USTAR_MAX_SIZE ? 0 : size);
    octal(h + 136, 12, mtime > 0 && (uint64_t)mtime <= USTAR_MAX_SIZE ? (uint64_t)mtime : 0);
    h[156] = type;
    if (link)
        memcpy(h + 157, link, strnlen(link, 100));
    memcpy(h + 257, "ustar", 6); /* magic with its NUL */
    memcpy(h + 263, "00", 2);
    /* The checksum is computed with its own field as spaces. */
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum); /* six digits, NUL, then the space left */
}

/* The pax extended header for whatever ustar cannot represent, if any. */
static int add_pax(struct tar_out *t, const char *name, size_t name_len, const char *target,
                   const struct stat *st, uint64_t size, struct sp_err *err)
{
    size_t tlen = target ? strlen(target) : 0;
    uint64_t uid = st->st_uid, gid = st->st_gid;
    bool need_name = name_len > 100, need_link = tlen > 100;
    bool need_size = size > USTAR_MAX_SIZE;
    bool need_uid = uid > USTAR_MAX_ID, need_gid = gid > USTAR_MAX_ID;
    if (!need_name && !need_link && !need_size && !need_uid && !need_gid)
        return 0;
    char pax[2 * (PATH_MAX_LEN + 64) + 256];
    size_t used = 0;
    char num[24];
    int bad = 0;
    if (need_name)
        bad |= pax_record(pax, sizeof pax, &used, "path", name, name_len);
    if (need_link)
        bad |= pax_record(pax, sizeof pax, &used, "linkpath", target, tlen);
    if (need_size) {
        int n = snprintf(num, sizeof num, "%llu", (unsigned long long)size);
        bad |= pax_record(pax, sizeof pax, &used, "size", num, (size_t)n);
    }
    if (need_uid) {
        int n = snprintf(num, sizeof num, "%llu", (unsigned long long)uid);
        bad |= pax_record(pax, sizeof pax, &used, "uid", num, (size_t)n);
    }
    if (need_gid) {
        int n = snprintf(num, sizeof num, "%llu", (unsigned long long)gid);
        bad |= pax_record(pax, sizeof pax, &used, "gid", num, (size_t)n);
    }
    if (bad)
        return sp_errf(err, SP_BAD_REQUEST, "%.200s: name too long to archive", name);
    static const char pax_name[] = "././@PaxHeader";
    char h[BLOCK];
    fill_header(h, pax_name, sizeof pax_name - 1, 0644, 0, 0, used, (int64_t)st->st_mtim.tv_sec,
                'x', NULL);
    if (emit(t, h, BLOCK, err) < 0 || emit(t, pax, used, err) < 0 || emit_pad(t, used, err) < 0)
        return -1;
    return 0;
}

/* Copy size bytes of fd into the archive through a fixed buffer. */
static int add_data(struct tar_out *t, int fd, uint64_t size, const char *name, struct sp_err *err)
{
    char buf[64 << 10];
    uint64_t done = 0;
    while (done < size) {
        size_t want = size - done > sizeof buf ? sizeof buf : (size_t)(size - done);
        ssize_t n = pread(fd, buf, want, (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return sp_err_errno(err, errno, name);
        if (n == 0) {
            /* Shrank while we read: the header already promised size. */
            memset(buf, 0, want);
            n = (ssize_t)want;
        }
        if (emit(t, buf, (size_t)n, err) < 0)
            return -1;
        done += (uint64_t)n;
    }
    return emit_pad(t, size, err);
}

int tar_add(struct tar_out *t, const char *name, const struct stat *st, const char *target, int fd,
            struct sp_err *err)
{
    char type;
    uint64_t size = 0;
    if (S_ISREG(st->st_mode)) {
        type = '0';
        size = (uint64_t)st->st_size;
    } else if (S_ISDIR(st->st_mode)) {
        type = '5';
    } else if (S_ISLNK(st->st_mode)) {
        type = '2';
        if (!target)
            return sp_errf(err, SP_INTERNAL, "%.200s: symlink without a target", name);
    } else {
        return 0;
    }
    size_t name_len = strlen(name);
    /* Without compression the final size is known now: refuse before
     * reading a byte of a file that cannot fit. */
    if (!t->gzip && size > t->max_bytes)
        return sp_errf(err, SP_TOO_LARGE, "%.200s: %llu bytes, archive limit is %llu bytes", name,
                       (unsigned long long)size, (unsigned long long)t->max_bytes);
    if (add_pax(t, name, name_len, type == '2' ? target : NULL, st, size, err) < 0)
        return -1;
    char h[BLOCK];
    fill_header(h, name, name_len, st->st_mode, (uint64_t)st->st_uid, (uint64_t)st->st_gid, size,
                (int64_t)st->st_mtim.tv_sec, type, type == '2' ? target : NULL);
    if (emit(t, h, BLOCK, err) < 0)
        return -1;
    if (type == '0' && add_data(t, fd, size, name, err) < 0)
        return -1;
    t->entries++;
    return 0;
}

int tar_finish(struct tar_out *t, struct sp_err *err)
{
    if (emit(t, zeros, sizeof zeros, err) < 0)
        return -1;
    if (t->gzip) {
        t->z.next_in = NULL;
        t->z.avail_in = 0;
        return z_run(t, Z_FINISH, err);
    }
    return 0;
}

void tar_free(struct tar_out *t)
{
    if (t->z_ready)
        deflateEnd(&t->z);
    free(t->buf);
    memset(t, 0, sizeof *t);
}

/* ---- tree walk ------------------------------------------------------- */

/* A directory's limit on entries held at once, so one huge directory cannot
 * take the agent's memory (about 50 bytes and the name each). */
#define TREE_MAX_LEVEL (4u << 20)

/* One sort key of a level: the entry "name" itself, or with sub its
 * subtree, which sorts as "name/" would (where every "name/..." path goes). */
struct tkey {
    uint32_t off, len; /* name in the level's arena */
    bool sub;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    off_t size;
    struct timespec mtime;
};

struct tlevel {
    char *rel; /* "" or "a/b/": prefix of this level's entries */
    size_t rel_len;
    char *arena;
    size_t arena_len, arena_cap;
    struct tkey *keys;
    size_t n, cap, next;
};

static void level_free(struct tlevel *l)
{
    free(l->rel);
    free(l->arena);
    free(l->keys);
    memset(l, 0, sizeof *l);
}

static int key_char(const char *s, size_t len, bool sub, size_t i)
{
    if (i < len)
        return (unsigned char)s[i];
    return i == len && sub ? '/' : -1;
}

static int key_cmp(const void *a, const void *b, void *arena)
{
    const struct tkey *x = a, *y = b;
    const char *xs = (const char *)arena + x->off, *ys = (const char *)arena + y->off;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(xs, ys, n);
    if (c)
        return c;
    for (size_t i = n;; i++) {
        int cx = key_char(xs, x->len, x->sub, i), cy = key_char(ys, y->len, y->sub, i);
        if (cx != cy)
            return cx < cy ? -1 : 1;
        if (cx < 0)
            return 0;
    }
}

static int level_push_key(struct tlevel *l, uint32_t off, uint32_t len, bool sub,
                          const struct stat *st)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        struct tkey *k = realloc(l->keys, cap * sizeof *k);
        if (!k)
            return -1;
        l->keys = k;
        l->cap = cap;
    }
    l->keys[l->n++] = (struct tkey){.off = off,
                                    .len = len,
                                    .sub = sub,
                                    .mode = st->st_mode,
                                    .uid = st->st_uid,
                                    .gid = st->st_gid,
                                    .size = st->st_size,
                                    .mtime = st->st_mtim};
    return 0;
}

/* Read and sort the directory l->rel. 0, 1 when it is to be skipped, -1. */
static int level_read(int top_fd, struct tlevel *l, bool recursive, bool skip_unreadable,
                      struct sp_err *err)
{
    int fd;
    if (l->rel_len == 0) {
        fd = openat(top_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            return sp_err_errno(err, errno, ".");
    } else {
        l->rel[l->rel_len - 1] = 0; /* without the trailing slash */
        fd = path_open(top_fd, l->rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0, err);
        l->rel[l->rel_len - 1] = '/';
        if (fd < 0) {
            /* Gone, or replaced by a symlink or a file since we saw it. */
            if (err->code == SP_NOT_FOUND || err->code == SP_PATH_ESCAPE || skip_unreadable)
                return 1;
            return -1;
        }
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return sp_err_errno(err, errno, "fdopendir");
    }
    int rc = -1;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) {
                sp_err_errno(err, errno, "readdir");
                goto out;
            }
            break;
        }
        const char *name = de->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        struct stat st;
        if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue; /* removed since readdir saw it */
        if (l->n + 2 > TREE_MAX_LEVEL) {
            sp_errf(err, SP_TOO_LARGE, "%s: more than %u entries in one directory",
                    l->rel_len ? l->rel : ".", TREE_MAX_LEVEL);
            goto out;
        }
        size_t len = strlen(name);
        if (l->arena_len + len + 1 > l->arena_cap) {
            size_t cap = l->arena_cap ? l->arena_cap * 2 : 4096;
            while (cap < l->arena_len + len + 1)
                cap *= 2;
            char *a = realloc(l->arena, cap);
            if (!a) {
                sp_errf(err, SP_INTERNAL, "out of memory");
                goto out;
            }
            l->arena = a;
            l->arena_cap = cap;
        }
        uint32_t off = (uint32_t)l->arena_len;
        memcpy(l->arena + off, name, len + 1);
        l->arena_len += len + 1;
        if (level_push_key(l, off, (uint32_t)len, false, &st) < 0 ||
            (recursive && S_ISDIR(st.st_mode) &&
             level_push_key(l, off, (uint32_t)len, true, &st) < 0)) {
            sp_errf(err, SP_INTERNAL, "out of memory");
            goto out;
        }
    }
    if (l->n > 1)
        qsort_r(l->keys, l->n, sizeof *l->keys, key_cmp, l->arena);
    rc = 0;
out:
    closedir(d);
    return rc;
}

int tree_walk(int top_fd, bool recursive, bool skip_unreadable, tree_fn fn, void *ctx,
              struct sp_err *err)
{
    struct tlevel *lv = calloc(8, sizeof *lv);
    size_t depth = 0, cap = 8;
    char path[PATH_MAX_LEN + 1];
    int rc = -1;
    if (!lv)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    lv[0].rel = strdup("");
    if (!lv[0].rel) {
        sp_errf(err, SP_INTERNAL, "out of memory");
        goto out;
    }
    depth = 1;
    if (level_read(top_fd, &lv[0], recursive, skip_unreadable, err) < 0)
        goto out;
    while (depth > 0) {
        struct tlevel *l = &lv[depth - 1];
        if (l->next == l->n) {
            level_free(l);
            depth--;
            continue;
        }
        const struct tkey *k = &l->keys[l->next++];
        const char *name = l->arena + k->off;
        size_t rel_len = l->rel_len + k->len + (k->sub ? 1 : 0);
        if (rel_len > PATH_MAX_LEN + (k->sub ? 1 : 0)) {
            sp_errf(err, SP_TOO_LARGE, "%.100s...: path longer than %d bytes", l->rel,
                    PATH_MAX_LEN);
            goto out;
        }
        if (!k->sub) {
            memcpy(path, l->rel, l->rel_len);
            memcpy(path + l->rel_len, name, k->len);
            path[rel_len] = 0;
            struct stat st;
            memset(&st, 0, sizeof st);
            st.st_mode = k->mode;
            st.st_uid = k->uid;
            st.st_gid = k->gid;
            st.st_size = k->size;
            st.st_mtim = k->mtime;
            struct tree_ent e = {.rel = path, .rel_len = rel_len, .st = &st};
            int r = fn(ctx, &e, err);
            if (r != 0) {
                rc = r < 0 ? -1 : 1;
                goto out;
            }
            continue;
        }
        char *rel = malloc(rel_len + 1);
        if (!rel) {
            sp_errf(err, SP_INTERNAL, "out of memory");
            goto out;
        }
        memcpy(rel, l->rel, l->rel_len);
        memcpy(rel + l->rel_len, name, k->len);
        rel[rel_len - 1] = '/';
        rel[rel_len] = 0;
        if (depth == cap) {
            struct tlevel *nl = realloc(lv, cap * 2 * sizeof *nl);
            if (!nl) {
                free(rel);
                sp_errf(err, SP_INTERNAL, "out of memory");
                goto out;
            }
            lv = nl;
            cap *= 2;
        }
        struct tlevel *child = &lv[depth];
        memset(child, 0, sizeof *child);
        child->rel = rel;
        child->rel_len = rel_len;
        int r = level_read(top_fd, child, recursive, skip_unreadable, err);
        if (r != 0) {
            level_free(child);
            if (r < 0)
                goto out;
            continue;
        }
        depth++;
    }
    rc = 0;
out:
    while (depth > 0)
        level_free(&lv[--depth]);
    free(lv);
    return rc;
}
