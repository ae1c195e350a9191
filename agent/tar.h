/* tar.h: the in-memory tar (ustar + pax) writer behind `archive`, optionally
 * gzip-compressed, and the sorted, never-following tree walk that `list` and
 * `archive` share (both in tar.c). */
#ifndef SLOT_TAR_H
#define SLOT_TAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <zlib.h>

#include "slotproto.h"

struct tar_out {
    char *buf; /* the archive so far (compressed when gzip) */
    size_t len, cap;
    uint64_t max_bytes; /* cap on len */
    uint64_t raw_bytes; /* tar bytes produced before compression */
    uint64_t max_raw;   /* cap on raw_bytes, bounds the CPU spent on gzip */
    bool gzip;
    bool z_ready;
    z_stream z;
    uint64_t entries; /* members written */
};

/* tar_free is safe after any outcome of tar_begin. */
int tar_begin(struct tar_out *t, bool gzip, uint64_t max_bytes, struct sp_err *err);
/* One member. name is stored as given (directories should end in '/').
 * Regular files: st->st_size bytes are read from fd (a file that shrank is
 * padded with zeros, one that grew is cut). Symlinks carry target.
 * Directories and symlinks take fd = -1. Other types are skipped (returns 0
 * without writing). */
int tar_add(struct tar_out *t, const char *name, const struct stat *st, const char *target, int fd,
            struct sp_err *err);
/* End-of-archive blocks and the gzip trailer. */
int tar_finish(struct tar_out *t, struct sp_err *err);
void tar_free(struct tar_out *t);

/* ---- tree walk ----------------------------------------------------------
 * Visits every entry beneath top_fd (not top itself) in bytewise order of
 * the full relative path, so a directory always comes before its contents
 * and a caller can stop after the first N entries and have exactly the
 * first N. Symlinks are reported, never followed; subdirectories are opened
 * with path_open beneath top_fd, so a tree changed meanwhile cannot lead the
 * walk outside it. Only one directory is open at a time: depth costs memory
 * for the names of each level's siblings, not fds or C stack. */

struct tree_ent {
    const char *rel; /* relative to top, no leading "./", NUL-terminated */
    size_t rel_len;
    /* lstat of the entry; only st_mode, st_size, st_mtim, st_uid and st_gid
     * are filled. */
    const struct stat *st;
};

/* 0 to go on, 1 to stop the walk, -1 with err set to fail it. */
typedef int (*tree_fn)(void *ctx, const struct tree_ent *e, struct sp_err *err);

/* Returns 0 when every entry was visited, 1 when fn stopped the walk, -1
 * with err. Directories that vanish or turn into something else during the
 * walk are skipped; unreadable ones too when skip_unreadable, else they
 * fail the walk. */
int tree_walk(int top_fd, bool recursive, bool skip_unreadable, tree_fn fn, void *ctx,
              struct sp_err *err);

#endif
