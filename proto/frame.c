/* Framing: the incremental reader and the capped writer. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "slotproto.h"

#define READ_CHUNK 65536
#define IDLE_KEEP (256 * 1024)

void sp_reader_init(struct sp_reader *r, uint32_t max_frame)
{
    memset(r, 0, sizeof *r);
    r->max_frame = max_frame;
}

void sp_reader_free(struct sp_reader *r)
{
    free(r->buf);
    memset(r, 0, sizeof *r);
}

static int reader_reserve(struct sp_reader *r, size_t want)
{
    if (r->off > 0 && (r->len == r->off || r->cap - r->len < want)) {
        memmove(r->buf, r->buf + r->off, r->len - r->off);
        r->len -= r->off;
        r->off = 0;
    }
    if (r->cap - r->len >= want)
        return 0;
    size_t cap = r->cap ? r->cap : READ_CHUNK;
    while (cap - r->len < want)
        cap *= 2;
    char *b = realloc(r->buf, cap);
    if (!b)
        return -1;
    r->buf = b;
    r->cap = cap;
    return 0;
}

/* Room for the next read: a chunk, or the rest of a frame whose header is
 * known and valid, whichever is more, never more than that frame. */
static size_t reader_want(const struct sp_reader *r)
{
    size_t have = r->len - r->off;
    if (have >= 4) {
        const unsigned char *p = (const unsigned char *)r->buf + r->off;
        uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        if (n <= r->max_frame && have < (size_t)n + 4) {
            size_t rest = (size_t)n + 4 - have;
            return rest > READ_CHUNK ? rest : READ_CHUNK;
        }
    }
    return READ_CHUNK;
}

ssize_t sp_reader_fill(struct sp_reader *r, int fd)
{
    if (reader_reserve(r, reader_want(r)) < 0) {
        errno = ENOMEM;
        return -1;
    }
    ssize_t n = read(fd, r->buf + r->len, r->cap - r->len);
    if (n > 0)
        r->len += (size_t)n;
    return n;
}

int sp_reader_feed(struct sp_reader *r, const void *data, size_t n)
{
    if (n == 0)
        return 0;
    if (reader_reserve(r, n) < 0)
        return -1;
    memcpy(r->buf + r->len, data, n);
    r->len += n;
    return 0;
}

int sp_reader_next(struct sp_reader *r, const char **data, uint32_t *len, struct sp_err *err)
{
    size_t have = r->len - r->off;
    if (have < 4) {
        if (have == 0 && r->cap > IDLE_KEEP) {
            /* A large frame has passed: give the memory back. */
            free(r->buf);
            r->buf = NULL;
            r->cap = r->len = r->off = 0;
        }
        return 0;
    }
    const unsigned char *p = (const unsigned char *)r->buf + r->off;
    uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    if (n > r->max_frame)
        return sp_errf(err, SP_TOO_LARGE, "frame of %u bytes is over the limit of %u bytes", n,
                       r->max_frame);
    if (have < (size_t)n + 4)
        return 0;
    *data = r->buf + r->off + 4;
    *len = n;
    r->off += (size_t)n + 4;
    return 1;
}

size_t sp_reader_pending(const struct sp_reader *r)
{
    return r->len - r->off;
}

/* ---- writer ---- */

void sp_writer_init(struct sp_writer *w, size_t limit)
{
    memset(w, 0, sizeof *w);
    w->limit = limit;
}

void sp_writer_free(struct sp_writer *w)
{
    free(w->buf);
    memset(w, 0, sizeof *w);
}

static int writer_reserve(struct sp_writer *w, size_t n)
{
    if (w->cap - w->len >= n)
        return 0;
    /* Reclaim sent bytes before growing, unless a frame is open (its start
     * offset would move: keep it simple and grow). */
    if (w->off > 0 && !w->in_frame) {
        memmove(w->buf, w->buf + w->off, w->len - w->off);
        w->len -= w->off;
        w->off = 0;
        if (w->cap - w->len >= n)
            return 0;
    }
    size_t cap = w->cap ? w->cap : 4096;
    while (cap - w->len < n)
        cap *= 2;
    char *b = realloc(w->buf, cap);
    if (!b)
        return -1;
    w->buf = b;
    w->cap = cap;
    return 0;
}

static int writer_cb(void *data, const char *buf, size_t len)
{
    struct sp_writer *w = data;
    if (w->overflow)
        return -1;
    if (len == 0)
        return 0;
    if (writer_reserve(w, len) < 0) {
        w->overflow = true;
        return -1;
    }
    memcpy(w->buf + w->len, buf, len);
    w->len += len;
    return 0;
}

void sp_writer_packer(struct sp_writer *w, msgpack_packer *pk)
{
    msgpack_packer_init(pk, w, writer_cb);
}

void sp_writer_begin_frame(struct sp_writer *w)
{
    static const char zero[4] = {0};
    if (w->off == w->len)
        w->off = w->len = 0;
    writer_cb(w, zero, 4);
    w->frame_start = w->len - 4;
    w->in_frame = true;
}

int sp_writer_end_frame(struct sp_writer *w, struct sp_err *err)
{
    w->in_frame = false;
    if (w->overflow)
        return sp_errf(err, SP_TOO_LARGE, "out of memory queueing a frame");
    size_t n = w->len - w->frame_start - 4;
    if (n > 0xffffffffu) {
        w->len = w->frame_start;
        return sp_errf(err, SP_TOO_LARGE, "frame of %zu bytes", n);
    }
    unsigned char *p = (unsigned char *)w->buf + w->frame_start;
    p[0] = (unsigned char)(n >> 24);
    p[1] = (unsigned char)(n >> 16);
    p[2] = (unsigned char)(n >> 8);
    p[3] = (unsigned char)n;
    if (w->limit && w->len - w->off > w->limit) {
        w->overflow = true;
        return sp_errf(err, SP_TOO_LARGE, "%zu bytes queued for a slow reader (limit %zu)",
                       w->len - w->off, w->limit);
    }
    return 0;
}

void sp_writer_abort_frame(struct sp_writer *w)
{
    if (w->in_frame)
        w->len = w->frame_start;
    w->in_frame = false;
}

int sp_writer_append(struct sp_writer *w, const void *data, size_t n, struct sp_err *err)
{
    if (w->limit && w->len - w->off + n > w->limit) {
        w->overflow = true;
        return sp_errf(err, SP_TOO_LARGE, "%zu bytes queued for a slow reader (limit %zu)",
                       w->len - w->off + n, w->limit);
    }
    if (writer_cb(w, data, n) < 0)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    return 0;
}

ssize_t sp_writer_flush(struct sp_writer *w, int fd)
{
    while (w->off < w->len) {
        ssize_t n = write(fd, w->buf + w->off, w->len - w->off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -1;
        }
        w->off += (size_t)n;
    }
    if (w->off == w->len && !w->in_frame) {
        w->off = w->len = 0;
        if (w->cap > IDLE_KEEP) {
            free(w->buf);
            w->buf = NULL;
            w->cap = 0;
        }
    }
    return (ssize_t)(w->len - w->off);
}

size_t sp_writer_pending(const struct sp_writer *w)
{
    return w->len - w->off;
}
