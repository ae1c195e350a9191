/* tar writer: ustar headers, pax extended records for what ustar cannot
 * hold (long names and link targets, sizes over 8 GiB), streamed through
 * zlib for tar.gz, into a buffer that refuses to grow past its cap. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tar.h"

#define BLOCK 512

static int out_append(struct tar_out *t, const void *p, size_t n, struct sp_err *err)
{
    if (t->len + n > t->max_bytes)
        return sp_errf(err, SP_TOO_LARGE, "archive larger than max_bytes (%llu)",
                       (unsigned long long)t->max_bytes);
    if (t->len + n > t->cap) {
        size_t cap = t->cap ? t->cap : 65536;
        while (cap < t->len + n)
            cap *= 2;
        if (cap > t->max_bytes)
            cap = (size_t)t->max_bytes;
        char *b = realloc(t->buf, cap);
        if (!b)
            return sp_errf(err, SP_INTERNAL, "out of memory building the archive");
        t->buf = b;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, p, n);
    t->len += n;
    return 0;
}

static int deflate_out(struct tar_out *t, const void *p, size_t n, int flush, struct sp_err *err)
{
    unsigned char chunk[65536];
    t->z.next_in = (Bytef *)(uintptr_t)p;
    t->z.avail_in = (uInt)n;
    do {
        t->z.next_out = chunk;
        t->z.avail_out = sizeof chunk;
        int zr = deflate(&t->z, flush);
        if (zr == Z_STREAM_ERROR)
            return sp_errf(err, SP_INTERNAL, "deflate failed");
        size_t have = sizeof chunk - t->z.avail_out;
        if (have && out_append(t, chunk, have, err) < 0)
            return -1;
    } while (t->z.avail_out == 0 || (flush == Z_FINISH && t->z.avail_in));
    return 0;
}

static int emit(struct tar_out *t, const void *p, size_t n, struct sp_err *err)
{
    t->raw_bytes += n;
    if (t->raw_bytes > t->max_raw)
        return sp_errf(err, SP_TOO_LARGE, "archive input over %llu bytes",
                       (unsigned long long)t->max_raw);
    return t->gzip ? deflate_out(t, p, n, Z_NO_FLUSH, err) : out_append(t, p, n, err);
}

int tar_begin(struct tar_out *t, bool gzip, uint64_t max_bytes, struct sp_err *err)
{
    memset(t, 0, sizeof *t);
    t->gzip = gzip;
    t->max_bytes = max_bytes;
    /* Highly compressible input could otherwise keep the loop busy for a
     * long time behind a small archive. */
    t->max_raw = gzip ? max_bytes * 64 : max_bytes;
    if (t->max_raw > (4ull << 30))
        t->max_raw = 4ull << 30;
    if (gzip) {
        if (deflateInit2(&t->z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
            return sp_errf(err, SP_INTERNAL, "deflateInit2 failed");
        t->z_ready = true;
    }
    return 0;
}

static void octal(char *field, size_t width, uint64_t v)
{
    /* width-1 zero-padded digits and a NUL; callers keep v in range. */
    field[width - 1] = 0;
    for (size_t i = width - 1; i-- > 0; v >>= 3)
        field[i] = (char)('0' + (v & 7));
}

static int pax_record(char *dst, size_t cap, const char *key, const char *val, size_t *used)
{
    size_t body = 1 + strlen(key) + 1 + strlen(val) + 1; /* " key=val\n" */
    size_t total = body + 1;
    /* The length field counts its own digits. */
    for (;;) {
        char digits[24];
        int d = snprintf(digits, sizeof digits, "%zu", total);
        if (body + (size_t)d == total)
            break;
        total = body + (size_t)d;
    }
    if (*used + total > cap)
        return -1;
    snprintf(dst + *used, cap - *used + 1, "%zu %s=%s\n", total, key, val);
    *used += total;
    return 0;
}

static void fill_header(char *h, const char *name, const struct stat *st, char type, uint64_t size,
                        const char *link)
{
    memset(h, 0, BLOCK);
    snprintf(h, 100, "%s", name);
    octal(h + 100, 8, st->st_mode & 07777);
    octal(h + 108, 8, (uint64_t)st->st_uid & 07777777);
    octal(h + 116, 8, (uint64_t)st->st_gid & 07777777);
    octal(h + 124, 12, size);
    octal(h + 136, 12, (uint64_t)(st->st_mtim.tv_sec > 0 ? st->st_mtim.tv_sec : 0));
    h[156] = type;
    if (link)
        memcpy(h + 157, link, strnlen(link, 100));
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum);
    h[155] = ' ';
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
    } else {
        return 0; /* sockets, fifos, devices: not archived */
    }
    char h[BLOCK];
    bool long_name = strlen(name) >= 100, long_link = target && strlen(target) >= 100;
    bool big = size > 077777777777ull;
    if (long_name || long_link || big) {
        char pax[3 * 4096 + 256];
        size_t used = 0;
        char sz[24];
        snprintf(sz, sizeof sz, "%llu", (unsigned long long)size);
        if ((long_name && pax_record(pax, sizeof pax - 1, "path", name, &used) < 0) ||
            (long_link && pax_record(pax, sizeof pax - 1, "linkpath", target, &used) < 0) ||
            (big && pax_record(pax, sizeof pax - 1, "size", sz, &used) < 0))
            return sp_errf(err, SP_BAD_REQUEST, "%s: name too long to archive", name);
        struct stat pst = *st;
        pst.st_mode = 0644;
        fill_header(h, "././@PaxHeader", &pst, 'x', used, NULL);
        if (emit(t, h, BLOCK, err) < 0 || emit(t, pax, used, err) < 0)
            return -1;
        static const char zeros[BLOCK];
        if (used % BLOCK && emit(t, zeros, BLOCK - used % BLOCK, err) < 0)
            return -1;
    }
    fill_header(h, name, st, type, big ? 0 : size, target);
    if (emit(t, h, BLOCK, err) < 0)
        return -1;
    if (type == '0') {
        char buf[65536];
        uint64_t left = size;
        while (left) {
            size_t want = left > sizeof buf ? sizeof buf : (size_t)left;
            ssize_t n = read(fd, buf, want);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return sp_err_errno(err, errno, name);
            if (n == 0) {
                /* The file shrank while archiving: pad to the size announced. */
                memset(buf, 0, want);
                n = (ssize_t)want;
            }
            if (emit(t, buf, (size_t)n, err) < 0)
                return -1;
            left -= (uint64_t)n;
        }
        static const char zeros[BLOCK];
        if (size % BLOCK && emit(t, zeros, BLOCK - size % BLOCK, err) < 0)
            return -1;
    }
    t->entries++;
    return 0;
}

int tar_finish(struct tar_out *t, struct sp_err *err)
{
    static const char zeros[2 * BLOCK];
    if (emit(t, zeros, sizeof zeros, err) < 0)
        return -1;
    if (t->gzip && deflate_out(t, NULL, 0, Z_FINISH, err) < 0)
        return -1;
    return 0;
}

void tar_free(struct tar_out *t)
{
    if (t->z_ready)
        deflateEnd(&t->z);
    free(t->buf);
    memset(t, 0, sizeof *t);
}
