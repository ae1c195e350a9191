/* untar.h: the streaming tar extractor behind `template_put` (untar.c).
 * Owns one archive's extraction: the gzip inflater, the 512-byte block
 * state machine (ustar, GNU long names, pax 'x' headers, base-256 sizes),
 * the file being written, and the directory modes applied at the end. The
 * archive arrives in pieces of any size and is never held whole: file data
 * goes to disk as it comes. Every member is created beneath dirfd without
 * following any symlink (not even one an earlier member made); absolute
 * names, "..", NUL bytes and oversized names are refused. */
#ifndef SLOT_UNTAR_H
#define SLOT_UNTAR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "slotproto.h"

struct untar; /* opaque */

/* Exceeding either fails with SP_TOO_LARGE. A NULL limits pointer means no
 * limits. */
struct untar_limits {
    uint64_t max_bytes;   /* total regular-file bytes */
    uint64_t max_entries; /* files, directories and links created */
};

/* dirfd: an empty directory the archive is extracted beneath (the caller
 * owns it and keeps it open until untar_free).
 * gzip: input is gzip-compressed (1), plain tar (0), or sniffed (<0: gzip
 * when it starts with 1f 8b).
 * uid/gid: owner given to everything created ((uid_t)-1 / (gid_t)-1: leave
 * as the process's). */
struct untar *untar_new(int dirfd, int gzip, const struct untar_limits *lim, uid_t uid, gid_t gid,
                        struct sp_err *err);
/* The next piece of the archive; 0 or -1. After a failure every later call
 * fails too. Input after the end-of-archive blocks is ignored. */
int untar_feed(struct untar *u, const void *data, size_t len, struct sp_err *err);
/* End of input: fails when it stopped inside a member (or inside the gzip
 * stream); otherwise applies the directories' modes and times. */
int untar_finish(struct untar *u, struct sp_err *err);
uint64_t untar_files(const struct untar *u); /* entries created (files, dirs, links) */
uint64_t untar_bytes(const struct untar *u); /* regular-file bytes written */
/* Safe on NULL; closes what it holds; does not remove files. */
void untar_free(struct untar *u);

#endif
