/* A tar (ustar + pax) writer into memory, optionally gzip-compressed
 * (tar.c). */
#ifndef SLOT_TAR_H
#define SLOT_TAR_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <zlib.h>

#include "slotproto.h"

struct tar_out {
    char *buf;
    size_t len, cap;
    uint64_t max_bytes; /* cap on the archive's own size */
    uint64_t raw_bytes; /* tar bytes before compression */
    uint64_t max_raw;
    bool gzip;
    bool z_ready;
    z_stream z;
    unsigned entries;
};

int tar_begin(struct tar_out *t, bool gzip, uint64_t max_bytes, struct sp_err *err);
/* One member. Regular files are read from fd (st->st_size bytes); symlinks
 * carry target; directories and symlinks pass fd = -1. */
int tar_add(struct tar_out *t, const char *name, const struct stat *st, const char *target, int fd,
            struct sp_err *err);
int tar_finish(struct tar_out *t, struct sp_err *err);
void tar_free(struct tar_out *t);

#endif
