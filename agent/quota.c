/* Per-slot disk and inode budgets: the budgets and their defaults, the
 * watcher that counts what busy slots hold on disk (in a worker process,
 * so the agent keeps answering) and stops a slot that goes over, the
 * RLIMIT_FSIZE that bounds one file, and the checks of write_file.
 *
 * Why a watcher: a per-slot limit the kernel enforces needs project quotas
 * (ext4 or XFS mounted with prjquota, and the quota formats built into the
 * kernel) or a filesystem per slot (a loop device per slot, root only; a
 * tmpfs is memory and gone at a restart). Where neither is at hand the
 * agent counts: RLIMIT_FSIZE stops a single runaway file exactly at the
 * budget, and the watcher catches many files, or many writers, within a
 * scan interval. hello and --probe say which, and why. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/quota.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "exec.h"
#include "quota.h"
#include "session.h"
#include "slotfs.h"
#include "template.h"

#define SCAN_MAX_DEPTH 512
#define DUTY 9.0 /* a pass may take at most 1/(1+DUTY) of the time */
#define MIB (1ull << 20)
#define GIB (1ull << 30)

enum { REC_DEEP = 1, REC_CAPPED = 2 };

struct rec {
    uint32_t index;
    uint32_t flags;
    uint64_t epoch;               /* the slot's when the pass began */
    uint64_t cmds;                /* and its commands started by then */
    uint64_t noted, noted_inodes; /* and what write_file had put in by then */
    uint64_t bytes;
    uint64_t inodes;
};

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int quota_parse(const char *s, bool count, uint64_t *out)
{
    if (!strcmp(s, "off")) {
        *out = 0;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-' || s[0] == '+' || s[0] == ' ')
        return -1;
    uint64_t mul = 1;
    if (*end) {
        const char *units = count ? "KM" : "KMGT";
        const char *u = strchr(units, *end & ~0x20);
        if (!u || end[1])
            return -1;
        unsigned k = (unsigned)(u - units) + 1;
        for (unsigned i = 0; i < k; i++)
            mul *= count ? 1000 : 1024;
    }
    if (v && mul > UINT64_MAX / v)
        return -1;
    *out = v * mul;
    return 0;
}

static const char *fs_name(unsigned long type)
{
    switch (type) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794c7630: return "overlayfs";
    case 0x6969: return "nfs";
    case 0x2fc12fc1: return "zfs";
    default: return "a filesystem";
    }
}

static uint64_t clamp(uint64_t v, uint64_t lo, uint64_t hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

void quota_configure(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    q->fd = -1;
    unsigned n = ag->opt.nslots ? ag->opt.nslots : 1;
    struct statvfs vf;
    struct statfs sf;
    /* The data dir, or where it will be made. */
    char at[4096];
    snprintf(at, sizeof at, "%s", ag->data_dir ? ag->data_dir : "/");
    while (access(at, F_OK) < 0 && strrchr(at, '/') && strcmp(at, "/")) {
        char *sl = strrchr(at, '/');
        if (sl == at)
            sl[1] = 0;
        else
            *sl = 0;
    }
    bool have_vf = statvfs(at, &vf) == 0;
    /* A fair share of what is free now, within sane bounds: enough for a
     * repository and its environment, never the whole disk to one slot. */
    uint64_t avail = have_vf ? (uint64_t)vf.f_bavail * vf.f_frsize : 0;
    uint64_t size = have_vf ? (uint64_t)vf.f_blocks * vf.f_frsize : 0;
    q->budget =
        ag->opt.slot_disk_set ? ag->opt.slot_disk : clamp(avail / 10 * 9 / n, 256 * MIB, 16 * GIB);
    uint64_t ifree = have_vf && vf.f_files ? (uint64_t)vf.f_favail : 0;
    q->ibudget = ag->opt.slot_inodes_set ? ag->opt.slot_inodes
                 : ifree                 ? clamp(ifree / 10 * 9 / n, 10000, 500000)
                                         : 500000;
    q->reserve = ag->opt.disk_reserve_set ? ag->opt.disk_reserve : clamp(size / 100, 64 * MIB, GIB);
    /* A disk that starts nearly full keeps a tenth of what is free: the
     * reserve is for what slots write from now on. */
    if (!ag->opt.disk_reserve_set && have_vf && q->reserve > avail / 10)
        q->reserve = avail / 10;
    if (!ag->opt.disk_interval_ms)
        ag->opt.disk_interval_ms = 250;
    q->mechanism = q->budget || q->ibudget ? "watch" : "none";
    char fs_why[200] = "";
    q->fs = false;
    if (!strcmp(q->mechanism, "watch") && ag->opt.disk_mode != 2) {
        q->fs = slotfs_usable(ag, fs_why, sizeof fs_why);
        if (q->fs)
            q->mechanism = "fs";
    }
    /* Filesystems made before keep the budgets they were made with unless
     * a flag says otherwise: a default that moved with the free space
     * would otherwise make them anew, empty. */
    uint64_t kept[2];
    if (q->fs && (!ag->opt.slot_disk_set || !ag->opt.slot_inodes_set) &&
        slotfs_budgets(ag, &kept[0], &kept[1]) == 0) {
        if (!ag->opt.slot_disk_set)
            q->budget = kept[0];
        if (!ag->opt.slot_inodes_set)
            q->ibudget = kept[1];
    }

    /* What the kernel would have offered: say it, so an operator knows
     * what to turn on. */
    const char *fs =
        statfs(at, &sf) == 0 ? fs_name((unsigned long)sf.f_type) : "the data filesystem";
    int fd = open(at, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct dqinfo info;
    long rc = -1;
    int e = EBADF;
#ifdef SYS_quotactl_fd
    if (fd >= 0) {
        /* QCMD() shifts a signed int past its range (UBSan): the same bits. */
        unsigned cmd = ((unsigned)Q_GETINFO << SUBCMDSHIFT) | (PRJQUOTA & SUBCMDMASK);
        rc = syscall(SYS_quotactl_fd, fd, (int)cmd, 0, &info);
        e = errno;
    }
#else
    e = ENOSYS;
#endif
    if (fd >= 0)
        close(fd);
    char pq[120];
    if (rc == 0)
        snprintf(pq, sizeof pq, "%s has project quotas, which this agent does not use", fs);
    else if (e == ESRCH || e == ENOENT || e == ENOTSUP || e == EOPNOTSUPP || e == EINVAL)
        snprintf(pq, sizeof pq, "no project quota on %s", fs);
    else
        snprintf(pq, sizeof pq, "no project quota on %s (quotactl: %s)", fs, strerror(e));
    if (q->fs)
        snprintf(q->why, sizeof q->why, "%s", "");
    else if (!strcmp(q->mechanism, "none"))
        snprintf(q->why, sizeof q->why, "--slot-disk and --slot-inodes are off");
    else if (ag->opt.disk_mode == 2)
        snprintf(q->why, sizeof q->why, "--disk-mode watch; %.120s", pq);
    else
        snprintf(q->why, sizeof q->why, "no per-slot filesystem: %.100s; %.120s", fs_why, pq);
}

int quota_mount_slots(struct agent *ag, struct sp_err *err)
{
    struct quota_state *q = &ag->quota;
    if (!q->fs)
        return 0;
    /* The guardian first: an agent killed while it mounts leaves nothing. */
    slotfs_guardian_start(ag);
    for (unsigned i = 0; i < ag->nslots; i++) {
        if (slotfs_mount(ag, &ag->slots[i], err) == 0)
            continue;
        /* One filesystem or none: half the slots bounded by the kernel
         * and half counted would be two behaviours to explain. */
        for (unsigned k = 0; k < i; k++)
            ag->slots[k].disk.fs = false;
        slotfs_unmount_all(ag);
        q->fs = false;
        if (ag->opt.disk_mode == 1)
            return sp_errf(err, SP_INTERNAL, "--disk-mode fs: slot %u: %s", i, err->msg);
        q->mechanism = "watch";
        snprintf(q->why, sizeof q->why, "no per-slot filesystem: %.200s", err->msg);
        log_warn("disk quota: %s; counting instead", q->why);
        return 0;
    }
    return 0;
}

/* ---- the worker: count what each slot holds ---------------------------- */

struct acc {
    uint64_t bytes, inodes;
    double frac_bytes, frac_inodes; /* hard links, counted once across the tree */
    uint64_t cap_bytes, cap_inodes;
    uint32_t flags;
};

static bool acc_full(const struct acc *a)
{
    return (a->cap_inodes && a->inodes > a->cap_inodes) ||
           (a->cap_bytes && a->bytes > a->cap_bytes);
}

/* Open directory name beneath dir (dir may be AT_FDCWD with a path) for
 * reading, never following a symlink. A directory its owner closed
 * (chmod 000, 0400...: the agent is not root) is opened anyway, through
 * the inode itself: hiding files that way hides nothing. *restore is then
 * its mode, to give back with fchmod on the returned descriptor. */
static int open_dir_at(int dir, const char *name, mode_t *restore)
{
    *restore = (mode_t)-1;
    int d = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (d >= 0 && geteuid() != 0 && fstat(d, &st) == 0 && (st.st_mode & 0500) != 0500 &&
        st.st_uid == geteuid()) {
        /* Readable but not searchable (chmod 0400): its entries could not
         * be looked at. */
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", d);
        if (fchmodat(AT_FDCWD, proc, (st.st_mode & 07777) | 0700, 0) == 0)
            *restore = st.st_mode & 07777;
        return d;
    }
    if (d >= 0 || errno != EACCES)
        return d;
    int pfd = openat(dir, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat sb;
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
    /* Through the descriptor's magic link: the very directory opened, not
     * whatever a slot renamed into its place meanwhile. */
    if (pfd >= 0 && fstat(pfd, &sb) == 0 &&
        fchmodat(AT_FDCWD, proc, (sb.st_mode & 07777) | 0700, 0) == 0) {
        *restore = sb.st_mode & 07777;
        d = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (d < 0)
            fchmodat(AT_FDCWD, proc, *restore, 0), *restore = (mode_t)-1;
    }
    if (pfd >= 0)
        close(pfd);
    return d;
}

/* d: an open directory (consumed). */
static void walk(int d, unsigned depth, struct acc *a)
{
    DIR *dp = fdopendir(d);
    if (!dp) {
        close(d);
        a->flags |= REC_DEEP; /* out of descriptors: cannot be counted */
        return;
    }
    int dir = dirfd(dp);
    struct dirent *de;
    while (!acc_full(a) && (de = readdir(dp))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        struct stat sb;
        if (fstatat(dir, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) /* removed meanwhile is fine; unseen is not */
                a->flags |= REC_DEEP;
            continue;
        }
        uint64_t blocks = (uint64_t)sb.st_blocks * 512u;
        if (!S_ISDIR(sb.st_mode) && sb.st_nlink > 1) {
            /* Each of n names carries 1/n: links inside the tree add up to
             * one file, links to files outside it cost what they cost. */
            a->frac_bytes += (double)blocks / (double)sb.st_nlink;
            a->frac_inodes += 1.0 / (double)sb.st_nlink;
        } else {
            a->bytes += blocks;
            a->inodes++;
        }
        if (!S_ISDIR(sb.st_mode))
            continue;
        if (depth >= SCAN_MAX_DEPTH) {
            a->flags |= REC_DEEP;
            continue;
        }
        mode_t restore;
        int sub = open_dir_at(dir, de->d_name, &restore);
        if (sub < 0) {
            if (errno != ENOENT)
                a->flags |= REC_DEEP;
            continue;
        }
        int keep = restore != (mode_t)-1 ? dup(sub) : -1;
        walk(sub, depth + 1, a);
        if (keep >= 0) {
            fchmod(keep, restore);
            close(keep);
        }
    }
    closedir(dp);
}

static void count_path(const char *path, struct acc *a)
{
    mode_t restore;
    int d = open_dir_at(AT_FDCWD, path, &restore);
    if (d < 0) {
        if (errno != ENOENT)
            a->flags |= REC_DEEP;
        return;
    }
    int keep = restore != (mode_t)-1 ? dup(d) : -1;
    walk(d, 0, a);
    if (keep >= 0) {
        fchmod(keep, restore);
        close(keep);
    }
}

/* max_entries: stop there (0: no limit but the budgets'); a count that
 * stops early is capped, and capped counts only ever refuse. */
static void count_slot(const struct agent *ag, const struct slot *s, struct rec *r,
                       uint64_t max_entries)
{
    const struct quota_state *q = &ag->quota;
    /* Counting stops well past the budget: enough to tell over, and
     * shrinking from growing, without walking a million files. */
    struct acc a = {.cap_bytes = q->budget ? 4 * q->budget : 0,
                    .cap_inodes = q->ibudget ? 4 * q->ibudget : 0};
    if (max_entries && (!a.cap_inodes || a.cap_inodes > max_entries))
        a.cap_inodes = max_entries;
    count_path(s->tmp_path, &a);
    if (s->ws_mode == WS_OVERLAY && s->ws_gen) {
        char p[4200];
        snprintf(p, sizeof p, "%s/overlay/%u/%s", ag->data_dir, s->index, s->ws_gen);
        count_path(p, &a);
    } else {
        count_path(s->ws_path, &a);
    }
    *r = (struct rec){.index = s->index,
                      .epoch = s->disk.epoch,
                      .cmds = s->disk.cmds,
                      .noted = s->disk.noted,
                      .noted_inodes = s->disk.noted_inodes,
                      .flags = a.flags | (acc_full(&a) ? REC_CAPPED : 0),
                      .bytes = a.bytes + (uint64_t)a.frac_bytes,
                      .inodes = a.inodes + (uint64_t)(a.frac_inodes + 0.5)};
}

static void __attribute__((noreturn)) worker(struct agent *ag, int out)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* Below the slots' own work: counting must not slow what it counts. */
    setpriority(PRIO_PROCESS, 0, 10);
    syscall(SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    int o = fcntl(out, F_DUPFD, 10);
    if (o < 0 || dup2(o, 3) < 0)
        _exit(1);
    /* Not the agent's stdio stream: its peer must see it close with the
     * agent, not with this worker. */
    dup2(ag->devnull_fd, 0);
    dup2(ag->devnull_fd, 1);
    syscall(SYS_close_range, 4u, ~0u, 0);
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        if (!s->disk.dirty || s->disk.fs)
            continue;
        struct rec r;
        count_slot(ag, s, &r, 0);
        if (write(3, &r, sizeof r) != (ssize_t)sizeof r)
            _exit(1);
    }
    _exit(0);
}

/* ---- the agent's side -------------------------------------------------- */

static bool slot_busy(const struct slot *s)
{
    return s->running || s->nsessions || s->nkept || s->active;
}

static void fmt_size(uint64_t v, char *out, size_t cap)
{
    if (v >= GIB)
        snprintf(out, cap, "%.1f GiB", (double)v / (double)GIB);
    else if (v >= MIB)
        snprintf(out, cap, "%.1f MiB", (double)v / (double)MIB);
    else
        snprintf(out, cap, "%" PRIu64 " KiB", v >> 10);
}

/* Every process of s goes, each running command saying why. */
static void stop_slot(struct agent *ag, struct slot *s, const char *why)
{
    for (struct exec *e = ag->running; e; e = e->next)
        if (e->slot == s && !e->exited) {
            e->disk_quota = true;
            snprintf(e->quota_why, sizeof e->quota_why, "%s", why);
        }
    unsigned n = exec_kill_slot(ag, s);
    s->disk.stops++;
    ag->quota.stops++;
    log_warn("%s: %u processes stopped", why, n);
}

static void over_why(const struct agent *ag, const struct slot *s, char *out, size_t cap)
{
    const struct quota_state *q = &ag->quota;
    char u[32], b[32];
    if (s->disk.deep)
        snprintf(
            out, cap,
            "slot %u nests directories deeper than %u levels, or keeps files where they cannot be "
            "counted against its disk budget",
            s->index, SCAN_MAX_DEPTH);
    else if (q->ibudget && s->disk.inodes > q->ibudget)
        snprintf(out, cap, "slot %u is over its budget of %" PRIu64 " files: %" PRIu64 "%s used",
                 s->index, q->ibudget, s->disk.inodes, s->disk.capped ? " or more" : "");
    else {
        fmt_size(s->disk.used, u, sizeof u);
        fmt_size(q->budget, b, sizeof b);
        snprintf(out, cap, "slot %u is over its disk budget of %s: %s%s used", s->index, b, u,
                 s->disk.capped ? " or more" : "");
    }
}

static void apply(struct agent *ag, const struct rec *r)
{
    struct quota_state *q = &ag->quota;
    if (r->index >= ag->nslots)
        return;
    struct slot *s = &ag->slots[r->index];
    if (r->epoch != s->disk.epoch) {
        s->disk.dirty = true; /* counted before its workspace was replaced */
        return;
    }
    bool was_over = s->disk.over;
    /* A command started since the last count, or since this one began:
     * what it finds may be the doing of the one before (counts lag), so it
     * is only a baseline. */
    bool baseline = r->cmds != s->disk.cmds_counted || r->cmds != s->disk.cmds;
    s->disk.cmds_counted = r->cmds;
    s->disk.prev_used = s->disk.used;
    s->disk.prev_inodes = s->disk.inodes;
    /* What write_file put in after the pass began is not in its count. */
    uint64_t nb = s->disk.noted - r->noted, ni = s->disk.noted_inodes - r->noted_inodes;
    s->disk.used = r->bytes + nb;
    s->disk.inodes = r->inodes + ni;
    s->disk.capped = r->flags & REC_CAPPED;
    s->disk.deep = r->flags & REC_DEEP;
    s->disk.scanned_at = ev_now(ag->loop);
    s->disk.over = s->disk.deep || (q->budget && s->disk.used > q->budget) ||
                   (q->ibudget && s->disk.inodes > q->ibudget);
    /* (A slot already over cannot use the baseline to write: its commands
     * get RLIMIT_FSIZE 0. Empty files, a few per short command, go on
     * until one is counted twice, or the reserve is reached.) */
    if (!s->disk.over || !slot_busy(s) || baseline)
        return;
    /* Over, counted twice in one command: it stops, unless it is giving
     * space back (rm -rf of what it made). */
    bool shrinking = s->disk.used < s->disk.prev_used || s->disk.inodes < s->disk.prev_inodes;
    if (was_over && shrinking)
        return;
    char why[160];
    over_why(ag, s, why, sizeof why);
    stop_slot(ag, s, why);
}

/* The data filesystem is under its reserve. The slot holding the most is
 * stopped if it is still growing; once it is stopped the others may go on
 * writing a little. Under half the reserve, whichever busy slot grew most
 * is stopped. Slots that write nothing are let be: on a disk that was
 * nearly full before, they are not the ones filling it. */
static void guard(struct agent *ag, bool hard)
{
    struct slot *worst = NULL, *biggest = NULL;
    uint64_t best = 0;
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        uint64_t grew = s->disk.used > s->disk.prev_used ? s->disk.used - s->disk.prev_used : 0;
        if (slot_busy(s) && grew > best)
            worst = s, best = grew;
        if (!biggest || s->disk.used > biggest->disk.used)
            biggest = s;
    }
    if (!hard && worst != biggest)
        worst = biggest && slot_busy(biggest) && biggest->disk.used > biggest->disk.prev_used
                    ? biggest
                    : NULL;
    if (!worst)
        return;
    char why[160], r[32];
    fmt_size(ag->quota.reserve, r, sizeof r);
    snprintf(why, sizeof why, "the data filesystem has less than %s free; slot %u wrote the most",
             r, worst->index);
    stop_slot(ag, worst, why);
}

static void worker_done(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    ev_io_stop(ag->loop, &q->io);
    close(q->fd);
    q->fd = -1;
    q->pid = 0;
    double now = mono();
    double took = now - q->started;
    q->last_ms = (uint64_t)(took * 1000.0);
    q->next_at = now + took * DUTY;
    q->scans++;
    for (size_t off = 0; off + sizeof(struct rec) <= q->len; off += sizeof(struct rec)) {
        struct rec r;
        memcpy(&r, q->buf + off, sizeof r);
        apply(ag, &r);
    }
    q->len = 0;
    if (q->guard)
        guard(ag, q->guard_hard);
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct quota_state *q = &ag->quota;
    for (;;) {
        if (q->len > (size_t)ag->nslots * sizeof(struct rec)) {
            /* More than one record per slot: a confused worker. */
            kill(q->pid, SIGKILL);
            q->len = 0;
            worker_done(ag);
            return;
        }
        ssize_t n = read(q->fd, q->buf + q->len, q->cap - q->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0)
            break;
        q->len += (size_t)n;
    }
    worker_done(ag);
}

static void pass_start(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    int pp[2];
    if (pipe2(pp, O_CLOEXEC) < 0)
        return;
    pid_t pid = fork();
    if (pid == 0)
        worker(ag, pp[1]);
    close(pp[1]);
    if (pid < 0) {
        close(pp[0]);
        return;
    }
    fcntl(pp[0], F_SETFL, O_NONBLOCK);
    for (unsigned i = 0; i < ag->nslots; i++)
        ag->slots[i].disk.dirty = false;
    q->pid = pid;
    q->fd = pp[0];
    q->len = 0;
    q->started = mono();
    ev_io_init(&q->io, io_cb, q->fd, EV_READ);
    q->io.data = ag;
    ev_io_start(ag->loop, &q->io);
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    struct quota_state *q = &ag->quota;
    if (q->pid && mono() - q->started > 120) {
        /* A pass that hangs (a filesystem that does not answer) must not
         * end all counting: the next one tries again. */
        log_warn("disk watcher: a count took over 120 s; killed");
        kill(q->pid, SIGKILL);
    }
    if (q->pid || ag->stopping)
        return;
    struct statvfs vf;
    uint64_t host_free =
        statvfs(ag->data_dir, &vf) == 0 ? (uint64_t)vf.f_bavail * vf.f_frsize : UINT64_MAX;
    /* Sparse images take host space when the page cache writes them out,
     * seconds later: count what they hold and the host does not yet. */
    for (unsigned i = 0; i < ag->nslots && q->fs && host_free != UINT64_MAX; i++) {
        uint64_t p = ag->slots[i].disk.fs ? slotfs_pending(ag, &ag->slots[i]) : 0;
        host_free = host_free > p ? host_free - p : 0;
    }
    q->guard = q->reserve && host_free < q->reserve;
    q->guard_hard = q->reserve && host_free < q->reserve / 2;
    bool any = false;
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        if (slot_busy(s) && !s->resetting)
            s->disk.dirty = true;
        if (s->disk.fs && s->disk.dirty) {
            /* The kernel bounds it; one statfs tells its use. */
            s->disk.dirty = false;
            s->disk.prev_used = s->disk.used;
            s->disk.prev_inodes = s->disk.inodes;
            if (slotfs_usage(ag, s, &s->disk.used, &s->disk.inodes) == 0)
                s->disk.scanned_at = ev_now(ag->loop);
            continue;
        }
        any |= s->disk.dirty;
    }
    /* Without budgets, counting only serves the reserve: only under it. */
    bool budgets = q->budget || q->ibudget;
    if (any && (q->guard || (budgets && mono() >= q->next_at)))
        pass_start(ag);
    else if (q->guard && q->fs)
        guard(ag, q->guard_hard);
}

void quota_kick(struct agent *ag, struct slot *s)
{
    struct quota_state *q = &ag->quota;
    s->disk.dirty = true;
    /* Counted now rather than at the next tick: the next command's
     * RLIMIT_FSIZE and write_file's check see what this one wrote. */
    if (q->buf && !s->disk.fs && (q->budget || q->ibudget) && !q->pid && !ag->stopping &&
        mono() >= q->next_at)
        pass_start(ag);
}

void quota_start(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    q->fd = -1;
    if (!strcmp(q->mechanism, "none") && !q->reserve)
        return;
    /* One record per slot, and room to see a worker that sends more. */
    q->cap = ((size_t)ag->nslots + 1) * sizeof(struct rec);
    q->buf = malloc(q->cap);
    if (!q->buf) {
        log_error("disk watcher: out of memory; slots' disk use is not watched");
        return;
    }
    /* Count every slot once: what a restart found is shown at once. */
    for (unsigned i = 0; i < ag->nslots; i++)
        ag->slots[i].disk.dirty = true;
    double iv = ag->opt.disk_interval_ms / 1000.0;
    ev_timer_init(&q->tick, tick_cb, 0.0, iv);
    q->tick.data = ag;
    ev_timer_start(ag->loop, &q->tick);
}

void quota_stop_watch(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    if (q->buf)
        ev_timer_stop(ag->loop, &q->tick);
    if (q->pid) {
        ev_io_stop(ag->loop, &q->io);
        kill(q->pid, SIGKILL);
        waitpid(q->pid, NULL, 0);
        q->pid = 0;
    }
    if (q->fd >= 0)
        close(q->fd);
    q->fd = -1;
    free(q->buf);
    q->buf = NULL;
}

bool quota_worker_pid(const struct agent *ag, pid_t pid)
{
    return ag->quota.pid && ag->quota.pid == pid;
}

/* About to refuse, or to deny writes, on a count that may be old (a
 * command just removed files): count s now, here, if it is small enough to
 * count in the event loop; a bigger one keeps its last count. */
static void refresh(struct agent *ag, struct slot *s)
{
    struct quota_state *q = &ag->quota;
    if (!(s->disk.dirty || q->pid))
        return;
    struct rec r;
    count_slot(ag, s, &r, 20000);
    if (r.flags & REC_CAPPED)
        return;
    s->disk.epoch++; /* what a pass in flight counted is older */
    s->disk.used = r.bytes;
    s->disk.inodes = r.inodes;
    s->disk.capped = false;
    s->disk.deep = r.flags & REC_DEEP;
    s->disk.scanned_at = ev_now(ag->loop);
    s->disk.over =
        s->disk.deep || (q->budget && r.bytes > q->budget) || (q->ibudget && r.inodes > q->ibudget);
}

rlim_t quota_fsize(struct agent *ag, struct slot *s)
{
    uint64_t b = ag->quota.budget;
    if (s->disk.fs)
        return RLIM_INFINITY;
    /* Over: commands run (to look, to remove) but write no file. Else one
     * file is bounded by the whole budget (the limit is on offsets, not on
     * bytes added: what is left would stop an append to a big file). */
    if (s->disk.over)
        refresh(ag, s);
    if (s->disk.over)
        return 0;
    return b ? (rlim_t)b : RLIM_INFINITY;
}

/* Would len more bytes take s over (or is it over)? */
static bool would_exceed(const struct agent *ag, const struct slot *s, uint64_t len)
{
    const struct quota_state *q = &ag->quota;
    return s->disk.over || (q->budget && s->disk.used + len > q->budget);
}

int quota_check_write(struct agent *ag, struct slot *s, uint64_t len, struct sp_err *err)
{
    struct quota_state *q = &ag->quota;
    if (!s->disk.fs && would_exceed(ag, s, len))
        refresh(ag, s);
    char why[160];
    uint64_t avail, files;
    if (s->disk.fs && slotfs_free(ag, s, &avail, &files) == 0) {
        if (!files)
            return sp_errf(err, SP_TOO_LARGE,
                           "slot %u has used all of its budget of %" PRIu64 " files", s->index,
                           q->ibudget);
        if (len <= avail)
            return 0;
        char a[32], b[32], l[32];
        fmt_size(avail, a, sizeof a);
        fmt_size(q->budget, b, sizeof b);
        fmt_size(len, l, sizeof l);
        return sp_errf(err, SP_TOO_LARGE,
                       "writing %s does not fit in slot %u's disk budget of %s (%s free)", l,
                       s->index, b, a);
    }
    if (s->disk.over) {
        over_why(ag, s, why, sizeof why);
        return sp_errf(err, SP_TOO_LARGE, "%s; remove files or reset the slot", why);
    }
    if (q->budget && s->disk.used + len > q->budget) {
        char u[32], b[32], l[32];
        fmt_size(s->disk.used, u, sizeof u);
        fmt_size(q->budget, b, sizeof b);
        fmt_size(len, l, sizeof l);
        return sp_errf(err, SP_TOO_LARGE,
                       "writing %s would take slot %u over its disk budget of %s (%s used)", l,
                       s->index, b, u);
    }
    return 0;
}

void quota_note_write(struct agent *ag, struct slot *s, uint64_t n)
{
    (void)ag;
    if (!s->disk.fs) {
        uint64_t b = (n + 4095) & ~(uint64_t)4095;
        s->disk.used += b;
        s->disk.inodes++;
        s->disk.noted += b;
        s->disk.noted_inodes++;
    }
}

void quota_slot_reset(struct agent *ag, struct slot *s)
{
    (void)ag;
    s->disk.epoch++;
    s->disk.dirty = true;
    s->disk.over = s->disk.deep = s->disk.capped = false;
    s->disk.used = s->disk.inodes = 0; /* the next count says (a copy: soon) */
}

void quota_pack_info(msgpack_packer *pk, const struct agent *ag)
{
    const struct quota_state *q = &ag->quota;
    msgpack_pack_map(pk, 6);
    sp_pack_kv_str(pk, "mechanism", q->mechanism ? q->mechanism : "none");
    sp_pack_kv_str(pk, "why", q->why);
    sp_pack_kv_uint(pk, "slot_disk", q->budget);
    sp_pack_kv_uint(pk, "slot_inodes", q->ibudget);
    sp_pack_kv_uint(pk, "interval_ms", ag->opt.disk_interval_ms);
    sp_pack_kv_uint(pk, "reserve", q->reserve);
}

void quota_pack_slot(msgpack_packer *pk, struct agent *ag, struct slot *s)
{
    const struct quota_state *q = &ag->quota;
    uint64_t avail = 1, files = 1;
    if (s->disk.fs && slotfs_usage(ag, s, &s->disk.used, &s->disk.inodes) == 0) {
        s->disk.scanned_at = ev_now(ag->loop);
        slotfs_free(ag, s, &avail, &files);
    }
    msgpack_pack_map(pk, 7);
    sp_pack_kv_uint(pk, "used", s->disk.used);
    sp_pack_kv_uint(pk, "budget", q->budget);
    sp_pack_kv_uint(pk, "inodes", s->disk.inodes);
    sp_pack_kv_uint(pk, "inodes_budget", q->ibudget);
    /* A filesystem of its own is never over: full is as far as it goes. */
    sp_pack_kv_bool(pk, "over", s->disk.fs ? avail == 0 || files == 0 : s->disk.over);
    sp_pack_kv_uint(pk, "stops", s->disk.stops);
    double ago = s->disk.scanned_at ? (ev_now(ag->loop) - s->disk.scanned_at) * 1000.0 : -1;
    sp_pack_kv_int(pk, "scanned_ms_ago", ago < 0 ? -1 : (int64_t)ago);
}

void quota_pack_stats(msgpack_packer *pk, const struct agent *ag)
{
    sp_pack_kv_uint(pk, "disk_scans", ag->quota.scans);
    sp_pack_kv_uint(pk, "disk_scan_ms", ag->quota.last_ms);
    sp_pack_kv_uint(pk, "disk_stops", ag->quota.stops);
}

void quota_report(const struct agent *ag, bool json, char *out, size_t cap)
{
    const struct quota_state *q = &ag->quota;
    char b[32];
    fmt_size(q->budget, b, sizeof b);
    if (json) {
        /* why holds no quote or backslash: it is made of fixed text,
         * a filesystem name and strerror. */
        snprintf(out, cap,
                 "\"disk_quota\": {\"mechanism\": \"%s\", \"why\": \"%s\", \"slot_disk\": %" PRIu64
                 ", \"slot_inodes\": %" PRIu64 ", \"interval_ms\": %u, \"reserve\": %" PRIu64 "}",
                 q->mechanism, q->why, q->budget, q->ibudget, ag->opt.disk_interval_ms, q->reserve);
    } else if (q->fs) {
        snprintf(out, cap,
                 "disk quota: fs (each slot an ext4 filesystem of %s and %" PRIu64
                 " files on a loop device; full gives ENOSPC)",
                 b, q->ibudget);
    } else if (!strcmp(q->mechanism, "none")) {
        snprintf(out, cap,
                 "disk quota: none (no disk quota: --slot-disk and --slot-inodes are off)");
    } else {
        snprintf(out, cap,
                 "disk quota: watch (per slot %s%s, %" PRIu64
                 " files%s; counted every %u ms, one file bounded by RLIMIT_FSIZE; %s)",
                 q->budget ? b : "no byte budget", "", q->ibudget, q->ibudget ? "" : " (none)",
                 ag->opt.disk_interval_ms, q->why);
    }
}
