/* The transcript of a terminal session: what session_read consumes is gone
 * once read, and the screen forgets what scrolled away, but a trainer that
 * follows a terminal wants to ask again for "everything after what I saw".
 * Bytes keep their offset from the session's start for its whole life, so
 * a reader holds only a number, several readers do not disturb each other,
 * and one that fell behind the bound learns how much it missed. The ring
 * grows as output comes: an idle terminal costs little. */
#include "transcript.h"

#include <stdlib.h>
#include <string.h>

#include "slotproto.h"

void transcript_init(struct transcript *t, size_t cap)
{
    memset(t, 0, sizeof *t);
    t->cap = cap;
}

void transcript_free(struct transcript *t)
{
    free(t->buf);
    t->buf = NULL;
    t->alloc = t->head = 0;
    t->start = t->end;
}

/* Keep nothing before `end`: what is in the ring is forgotten. */
static void forget_all(struct transcript *t)
{
    t->start = t->end;
    t->head = 0;
}

static void grow(struct transcript *t, size_t need)
{
    size_t len = (size_t)(t->end - t->start);
    size_t want = t->alloc ? t->alloc * 2 : 4096;
    while (want < need)
        want *= 2;
    if (want > t->cap)
        want = t->cap;
    char *nb = malloc(want);
    if (!nb)
        return; /* keep the ring as it is: older bytes are dropped sooner */
    for (size_t i = 0; i < len; i++)
        nb[i] = t->buf[(t->head + i) % t->alloc];
    free(t->buf);
    t->buf = nb;
    t->alloc = want;
    t->head = 0;
}

void transcript_put(struct transcript *t, const char *p, size_t n)
{
    size_t len = (size_t)(t->end - t->start);
    if (len + n > t->alloc && t->alloc < t->cap)
        grow(t, len + n);
    if (n >= t->alloc) {
        /* Only the last alloc bytes of p stay. */
        t->end += n - t->alloc;
        p += n - t->alloc;
        n = t->alloc;
        forget_all(t);
        len = 0;
    } else if (len + n > t->alloc) {
        size_t drop = len + n - t->alloc;
        t->head = (t->head + drop) % t->alloc;
        t->start += drop;
        len -= drop;
    }
    if (n == 0)
        return;
    size_t tail = (t->head + len) % t->alloc;
    size_t first = t->alloc - tail < n ? t->alloc - tail : n;
    memcpy(t->buf + tail, p, first);
    memcpy(t->buf, p + first, n - first);
    t->end += n;
}

static char byte_at(const struct transcript *t, uint64_t off)
{
    return t->buf[(t->head + (size_t)(off - t->start)) % t->alloc];
}

void transcript_pack(const struct transcript *t, msgpack_packer *pk, uint64_t offset, size_t max,
                     bool lines)
{
    uint64_t o = offset < t->start ? t->start : offset > t->end ? t->end : offset;
    size_t avail = (size_t)(t->end - o);
    size_t take = avail < max ? avail : max;
    if (lines && take) {
        size_t k = take;
        while (k > 0 && byte_at(t, o + k - 1) != '\n')
            k--;
        /* No newline: a line still being written waits for its end, unless
         * it is already longer than a reader may take at once. */
        take = k ? k : avail >= max ? max : 0;
    }
    sp_pack_cstr(pk, "data");
    msgpack_pack_bin(pk, take);
    if (take) {
        size_t at = (t->head + (size_t)(o - t->start)) % t->alloc;
        size_t first = t->alloc - at < take ? t->alloc - at : take;
        msgpack_pack_bin_body(pk, t->buf + at, first);
        if (take > first)
            msgpack_pack_bin_body(pk, t->buf, take - first);
    }
    sp_pack_kv_uint(pk, "offset", o);
    sp_pack_kv_uint(pk, "next_offset", o + take);
    sp_pack_kv_uint(pk, "start", t->start);
    sp_pack_kv_uint(pk, "end", t->end);
    sp_pack_kv_uint(pk, "dropped", o > offset ? o - offset : 0);
}
