/* Framing: the incremental frame reader (limits checked on the header, before
 * any memory is committed to a frame) and the capped frame writer. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "slotproto.h"

#define READ_CHUNK 65536
/* Buffers above this are given back once idle, so a connection that once
 * carried a 64 MiB frame does not keep 64 MiB for the rest of its life. */
#define IDLE_KEEP (256 * 1024)
#define WRITER_MIN 4096

static uint32_t be32(const char *b)
{
    const unsigned char *p = (const unsigned char *)b;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static size_t round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

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

/* End (relative to buf) of the frame at off when its header is known and
 * within the limit, else 0. */
static size_t reader_frame_end(const struct sp_reader *r)
{
    if (r->len - r->off < 4)
        return 0;
    uint32_t n = be32(r->buf + r->off);
    return n <= r->max_frame ? r->off + 4 + (size_t)n : 0;
}

/* Make room for `want` more bytes after len. Consumed bytes are dropped
 * first. Growth doubles (many small feeds stay cheap) but never past the end
 * of the frame being received, rounded to a chunk: a 64 MiB frame must not
 * become a 128 MiB buffer. */
static int reader_reserve(struct sp_reader *r, size_t want)
{
    if (r->off > 0 && (r->len == r->off || r->cap - r->len < want)) {
        memmove(r->buf, r->buf + r->off, r->len - r->off);
        r->len -= r->off;
        r->off = 0;
    }
    if (r->cap - r->len >= want)
        return 0;
    if (want > SIZE_MAX / 4 - r->len)
        return -1;
    size_t need = r->len + want;
    size_t fe = reader_frame_end(r);
    size_t bound = round_up(need > fe ? need : fe, READ_CHUNK);
    size_t cap = r->cap ? r->cap : READ_CHUNK;
    while (cap < need)
        cap *= 2;
    if (cap > bound)
        cap = bound;
    char *b = realloc(r->buf, cap);
    if (!b)
        return -1;
    r->buf = b;
    r->cap = cap;
    return 0;
}

ssize_t sp_reader_fill(struct sp_reader *r, int fd)
{
    size_t have = r->len - r->off;
    size_t want;
    if (have < 4) {
        /* One chunk of buffer is enough to learn the next header. */
        want = READ_CHUNK - have;
    } else {
        uint32_t n = be32(r->buf + r->off);
        if (n > r->max_frame)
            want = 0; /* refused header: never grow for it */
        else if (have < (size_t)n + 4)
            want = (size_t)n + 4 - have; /* validated: room for the whole frame */
        else
            want = READ_CHUNK; /* complete frames the caller has not taken yet */
    }
    if (reader_reserve(r, want) < 0) {
        errno = ENOMEM;
        return -1;
    }
    if (r->cap == r->len) {
        /* Only reachable behind a refused header: the stream is unusable. */
        errno = EMSGSIZE;
        return -1;
    }
    ssize_t n;
    do
        n = read(fd, r->buf + r->len, r->cap - r->len);
    while (n < 0 && errno == EINTR);
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
    if (have == 0) {
        r->off = r->len = 0;
        if (r->cap > IDLE_KEEP) {
            free(r->buf);
            r->buf = NULL;
            r->cap = 0;
        }
        return 0;
    }
    if (have < 4)
        return 0;
    uint32_t n = be32(r->buf + r->off);
    if (n > r->max_frame)
        return sp_errf(err, SP_TOO_LARGE, "frame of %u bytes is over the limit of %u bytes", n,
                       r->max_frame);
    if (have - 4 < n)
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

/* Room for n more bytes. Sent bytes are reclaimed before growing; an open
 * frame moves with them, so frame_start is shifted too. */
static int writer_reserve(struct sp_writer *w, size_t n)
{
    if (w->cap - w->len >= n)
        return 0;
    if (w->off > 0) {
        memmove(w->buf, w->buf + w->off, w->len - w->off);
        w->len -= w->off;
        if (w->in_frame)
            w->frame_start -= w->off;
        w->off = 0;
        if (w->cap - w->len >= n)
            return 0;
    }
    if (n > SIZE_MAX / 2 - w->len)
        return -1;
    size_t cap = w->cap ? w->cap : WRITER_MIN;
    while (cap - w->len < n)
        cap *= 2;
    char *b = realloc(w->buf, cap);
    if (!b)
        return -1;
    w->buf = b;
    w->cap = cap;
    return 0;
}

/* msgpack_packer write callback. Once the writer has overflowed nothing more
 * is queued: the connection is being dropped. */
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
    /* frame_start is taken before the header so that an abort after a failed
     * (overflowed) header write cannot move len backwards past real data. */
    w->frame_start = w->len;
    w->in_frame = true;
    writer_cb(w, zero, sizeof zero);
}

int sp_writer_end_frame(struct sp_writer *w, struct sp_err *err)
{
    if (!w->in_frame)
        return sp_errf(err, SP_INTERNAL, "no frame open");
    w->in_frame = false;
    if (w->overflow) {
        w->len = w->frame_start;
        return sp_errf(err, SP_TOO_LARGE, "output queue overflowed (out of memory or over limit)");
    }
    size_t n = w->len - w->frame_start - 4;
    if (n > 0xffffffffu) {
        w->len = w->frame_start;
        w->overflow = true;
        return sp_errf(err, SP_TOO_LARGE, "frame of %zu bytes is over 4 GiB", n);
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
    if (w->overflow)
        return sp_errf(err, SP_TOO_LARGE, "output queue already overflowed");
    if (w->limit && w->len - w->off + n > w->limit) {
        w->overflow = true;
        return sp_errf(err, SP_TOO_LARGE, "%zu bytes queued for a slow reader (limit %zu)",
                       w->len - w->off + n, w->limit);
    }
    if (writer_cb(w, data, n) < 0)
        return sp_errf(err, SP_INTERNAL, "out of memory queueing %zu bytes", n);
    return 0;
}

ssize_t sp_writer_flush(struct sp_writer *w, int fd)
{
    /* Bytes of a frame still being packed have no valid header yet. */
    size_t end = w->in_frame ? w->frame_start : w->len;
    while (w->off < end) {
        ssize_t n = write(fd, w->buf + w->off, end - w->off);
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
