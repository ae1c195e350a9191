/* tree.h: copying, merging, measuring and removing directory trees beneath
 * directory descriptors (tree.c), never following a symlink. Templates use
 * it to freeze a workspace into a layer, to lay layers out as a plain copy
 * where overlayfs is unavailable, and to flatten deep layer chains. */
#ifndef SLOT_TREE_H
#define SLOT_TREE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "slotproto.h"

/* Overlay metadata as overlayfs writes it with the userxattr option (the
 * one form both root and unprivileged agents can mount). */
#define TREE_OPAQUE_XATTR "user.overlay.opaque"

enum tree_flags {
    /* Copy a layer as it is: whiteouts (0/0 character devices) and opaque
     * markers are kept (a slot's upper layer frozen into a template). */
    TREE_LAYER = 1u << 0,
    /* Apply src onto dst as an overlay layer: a whiteout deletes, an
     * opaque directory replaces what dst had there. */
    TREE_MERGE = 1u << 1,
};

struct tree_stats {
    uint64_t files; /* entries created: files, directories, symlinks */
    uint64_t bytes; /* regular-file bytes */
    bool reflinked; /* at least one file shared its blocks (FICLONE) */
    bool copied;    /* at least one file was copied byte by byte */
};

/* Copy everything beneath src into dst (both directory fds). Ownership of
 * what is created: uid/gid, or the process's own when uid == (uid_t)-1.
 * Permission bits are kept, setuid/setgid/sticky dropped, mtimes kept.
 * Sockets, fifos and devices (other than kept whiteouts) are skipped. */
int tree_copy(int src, int dst, unsigned flags, uid_t uid, gid_t gid, struct tree_stats *st,
              struct sp_err *err);
/* rm -rf of name beneath parent (a missing name is not an error). */
int tree_remove(int parent, const char *name, struct sp_err *err);
/* Give dir and everything beneath it to uid:gid (symlinks themselves). */
int tree_chown(int dir, uid_t uid, gid_t gid, struct sp_err *err);
/* Entries and bytes on disk (st_blocks) beneath dir. */
int tree_usage(int dir, uint64_t *files, uint64_t *disk_bytes);

#endif
