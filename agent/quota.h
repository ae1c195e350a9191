/* quota.h: per-slot disk and inode budgets (quota.c). */
#ifndef SLOT_QUOTA_H
#define SLOT_QUOTA_H

#include <sys/resource.h>

#include "agent.h"

/* --slot-disk / --disk-reserve (bytes, K/M/G/T = 2^10..2^40) and
 * --slot-inodes (a count, K/M = 10^3, 10^6); "off" is 0. -1 when bad. */
int quota_parse(const char *s, bool count, uint64_t *out);
/* Budgets and reserve from the options, defaults from the data
 * filesystem, and what the kernel offers there (the why of "watch"). */
void quota_configure(struct agent *ag);
/* In slots_init, before the slots' directories open: per-slot filesystems
 * when the mechanism is "fs" (falls back to "watch" unless --disk-mode fs). */
int quota_mount_slots(struct agent *ag, struct sp_err *err);
/* Start watching (after slots and templates are set up); stop at exit. */
void quota_start(struct agent *ag);
void quota_stop_watch(struct agent *ag);
bool quota_worker_pid(const struct agent *ag, pid_t pid);
/* The RLIMIT_FSIZE a new command of s gets: what is left of its budget. */
rlim_t quota_fsize(struct agent *ag, struct slot *s);
/* write_file of len bytes into s: 0, or -1 with err (too_large). */
int quota_check_write(struct agent *ag, struct slot *s, uint64_t len, struct sp_err *err);
/* A request of s is done: count it soon (now, if pacing allows). */
void quota_kick(struct agent *ag, struct slot *s);
/* write_file put n bytes into s: counted at once, until the next count. */
void quota_note_write(struct agent *ag, struct slot *s, uint64_t n);
/* s was emptied or laid out again: count it afresh. */
void quota_slot_reset(struct agent *ag, struct slot *s);
void quota_pack_info(msgpack_packer *pk, const struct agent *ag);
void quota_pack_slot(msgpack_packer *pk, struct agent *ag, struct slot *s);
void quota_pack_stats(msgpack_packer *pk, const struct agent *ag); /* 3 pairs */
/* --probe: one line of text, or a JSON member ("disk_quota": {...}). */
void quota_report(const struct agent *ag, bool json, char *out, size_t cap);

#endif
