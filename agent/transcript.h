/* The transcript of a terminal session (transcript.c): the last bytes its
 * terminal printed, numbered from the session's start, so that a reader
 * can resume where it stopped and learn what the bound dropped. */
#ifndef SLOT_TRANSCRIPT_H
#define SLOT_TRANSCRIPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#define TRANSCRIPT_CAP (4u << 20) /* bytes kept per terminal session */

struct transcript {
    char *buf;           /* a ring, grown up to cap as output comes */
    size_t cap, alloc;   /* the bound, what is allocated */
    size_t head;         /* where byte `start` is in buf */
    uint64_t start, end; /* offsets of the first byte kept and of the next */
};

void transcript_init(struct transcript *t, size_t cap);
void transcript_free(struct transcript *t);
/* Append; past the bound the oldest bytes go (start moves on). */
void transcript_put(struct transcript *t, const char *p, size_t n);
/* session_log's 6 answer pairs into pk: `data` (up to max bytes from
 * offset, or from `start` when offset is older; with lines, up to the last
 * newline, or max bytes of a line longer than max), `offset` (where data
 * begins), `next_offset`, `start`, `end`, `dropped` (bytes between the
 * offset asked and the first one kept). */
void transcript_pack(const struct transcript *t, msgpack_packer *pk, uint64_t offset, size_t max,
                     bool lines);

#endif
