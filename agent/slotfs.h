/* slotfs.h: a filesystem of bounded size per slot (slotfs.c). */
#ifndef SLOT_SLOTFS_H
#define SLOT_SLOTFS_H

#include "agent.h"

/* Could slots get filesystems of their own here? Else why not. */
bool slotfs_usable(const struct agent *ag, char *why, size_t cap);
/* Make (first time) and mount s's filesystem over DATA/slots/N and
 * DATA/overlay/N; sets s->disk.fs. Before the slot's directories open. */
/* The budgets the existing filesystems were made with (slot 0's). */
int slotfs_budgets(const struct agent *ag, uint64_t *bytes, uint64_t *inodes);
int slotfs_mount(struct agent *ag, struct slot *s, struct sp_err *err);
void slotfs_guardian_start(struct agent *ag);
bool slotfs_guardian_pid(const struct agent *ag, pid_t pid);
/* main() of the guardian: slot-agent --fs-guardian DATA NSLOTS AGENT_PID. */
int slotfs_guardian_main(int argc, char **argv);
/* At exit, after every descriptor into them is closed. */
void slotfs_unmount_all(struct agent *ag);
/* What s uses of its filesystem (beyond an empty one's), and what is free. */
int slotfs_usage(const struct agent *ag, const struct slot *s, uint64_t *bytes, uint64_t *inodes);
/* What s's filesystem holds that its image on the host does not yet (the
 * page cache flushes it later): the host's free space is that much less. */
uint64_t slotfs_pending(const struct agent *ag, const struct slot *s);
int slotfs_free(const struct agent *ag, const struct slot *s, uint64_t *bytes, uint64_t *files);

#endif
