/* A filesystem of bounded size per slot: an ext4 image (sparse, in the
 * data dir) on a loop device, made once with the slot's byte and inode
 * budgets, whose two directories are bound over DATA/slots/N (workspace
 * and tmp) and DATA/overlay/N (upper layers). The kernel then enforces the
 * budgets: a slot that fills its filesystem gets ENOSPC in its own
 * commands and nobody else notices, and its use is one statfs away.
 *
 * Needs root with CAP_SYS_ADMIN in the initial user namespace, loop
 * devices and mkfs.ext4 (e2fsprogs). The mounts are in the host's mount
 * namespace, where the slot's files are reached from outside: the agent
 * unmounts them when it exits, a guardian process when the agent is
 * killed, and a restart finds the images again (a slot's files and upper
 * layers survive it). Renames between a slot's filesystem and the rest of
 * the data dir fail with EXDEV: freezing such a slot copies instead. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/loop.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "slotfs.h"

#define EXT4_MAGIC 0xEF53

static const char *const mkfs_paths[] = {"/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4",
                                         "/usr/bin/mkfs.ext4", "/bin/mkfs.ext4", NULL};

static const char *mkfs_path(void)
{
    for (int i = 0; mkfs_paths[i]; i++)
        if (access(mkfs_paths[i], X_OK) == 0)
            return mkfs_paths[i];
    return NULL;
}

static bool fs_listed(const char *name)
{
    FILE *f = fopen("/proc/filesystems", "re");
    char line[128];
    bool found = false;
    while (f && !found && fgets(line, sizeof line, f)) {
        char *t = strrchr(line, '\t');
        t = t ? t + 1 : line;
        t[strcspn(t, "\n")] = 0;
        found = !strcmp(t, name);
    }
    if (f)
        fclose(f);
    return found;
}

bool slotfs_usable(const struct agent *ag, char *why, size_t cap)
{
    const struct quota_state *q = &ag->quota;
    if (!q->budget) {
        snprintf(why, cap, "no byte budget to size a filesystem by");
        return false;
    }
    if (geteuid() != 0) {
        snprintf(why, cap, "per-slot filesystems need root (loop devices and mount)");
        return false;
    }
    int fd = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, cap, "no loop devices (/dev/loop-control: %s)", strerror(errno));
        return false;
    }
    close(fd);
    if (!fs_listed("ext4")) {
        snprintf(why, cap, "the kernel has no ext4");
        return false;
    }
    if (!mkfs_path()) {
        snprintf(why, cap, "no mkfs.ext4 (e2fsprogs) to make per-slot filesystems with");
        return false;
    }
    return true;
}

static void pathf(char *out, size_t cap, const char *fmt, const char *data_dir, unsigned i)
{
    snprintf(out, cap, fmt, data_dir, i);
}

static bool is_mountpoint(const char *path)
{
    struct stat a, b;
    char parent[4400];
    snprintf(parent, sizeof parent, "%.4300s/..", path);
    return stat(path, &a) == 0 && stat(parent, &b) == 0 && a.st_dev != b.st_dev;
}

/* Run mkfs.ext4 on the image; 0 or -1 with err. */
static int make_fs(const char *img, uint64_t bytes, uint64_t inodes, unsigned i, struct sp_err *err)
{
    char nbuf[32], label[16];
    snprintf(nbuf, sizeof nbuf, "%" PRIu64, inodes);
    snprintf(label, sizeof label, "slot%u", i);
    /* No reserved blocks (the slot may use all of it), a small journal
     * (a crash replays, never fscks), inode tables never zeroed (a sparse
     * image reads zeros; zeroing would allocate them on the host). */
    const char *argv[] = {mkfs_path(),
                          "-q",
                          "-F",
                          "-t",
                          "ext4",
                          "-m",
                          "0",
                          "-b",
                          "4096",
                          "-J",
                          "size=4",
                          "-O",
                          "^resize_inode",
                          "-E",
                          "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                          "-L",
                          label,
                          inodes ? "-N" : NULL,
                          nbuf,
                          img,
                          NULL};
    if (!inodes) {
        argv[17] = img;
        argv[18] = NULL;
    }
    (void)bytes;
    pid_t pid = fork();
    if (pid == 0) {
        int dn = open("/dev/null", O_RDWR);
        if (dn >= 0) {
            dup2(dn, 0);
            dup2(dn, 1);
        }
        syscall(SYS_close_range, 3u, ~0u, 0);
        execv(argv[0], (char **)argv);
        _exit(127);
    }
    if (pid < 0)
        return sp_errf(err, SP_INTERNAL, "fork: %s", strerror(errno));
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return sp_errf(err, SP_INTERNAL, "waitpid: %s", strerror(errno));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return sp_errf(err, SP_INTERNAL, "mkfs.ext4 of %s failed (status %d)", img, st);
    return 0;
}

/* Is img still the backing file of a loop device (an agent that died
 * with a writer in its filesystem, or another agent on this data dir)?
 * Mounting it a second time would corrupt it. */
static bool loop_busy(const char *img)
{
    char want[4200];
    if (!realpath(img, want))
        return false;
    DIR *d = opendir("/sys/block");
    struct dirent *de;
    bool busy = false;
    while (d && !busy && (de = readdir(d))) {
        if (strncmp(de->d_name, "loop", 4) != 0)
            continue;
        char p[300], line[4200];
        snprintf(p, sizeof p, "/sys/block/%s/loop/backing_file", de->d_name);
        FILE *f = fopen(p, "re");
        if (f && fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            busy = !strcmp(line, want);
        }
        if (f)
            fclose(f);
    }
    if (d)
        closedir(d);
    return busy;
}

/* A loop device for img (released when its last mount goes). */
static int loop_attach(const char *img, char *dev, size_t cap, struct sp_err *err)
{
    /* A detached mount's device goes when its last user does: give a
     * killed agent's dying processes a moment. */
    for (int i = 0; i < 50 && loop_busy(img); i++)
        usleep(20000);
    if (loop_busy(img))
        return sp_errf(err, SP_INTERNAL,
                       "%s is still in use on a loop device (a process of an earlier agent, "
                       "or another agent on this data dir)",
                       img);
    int img_fd = open(img, O_RDWR | O_CLOEXEC);
    if (img_fd < 0)
        return sp_errf(err, SP_INTERNAL, "%s: %s", img, strerror(errno));
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) {
        close(img_fd);
        return sp_errf(err, SP_INTERNAL, "/dev/loop-control: %s", strerror(errno));
    }
    int rc = -1;
    for (int tries = 0; tries < 20 && rc < 0; tries++) {
        int n = ioctl(ctl, LOOP_CTL_GET_FREE);
        if (n < 0) {
            sp_errf(err, SP_INTERNAL, "no free loop device: %s", strerror(errno));
            break;
        }
        snprintf(dev, cap, "/dev/loop%d", n);
        int fd = open(dev, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            sp_errf(err, SP_INTERNAL, "%s: %s", dev, strerror(errno));
            break;
        }
        struct loop_config cfg = {.fd = (unsigned)img_fd, .block_size = 4096};
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
            rc = fd;
        } else {
            int e = errno;
            close(fd);
            /* Another process took it between GET_FREE and CONFIGURE. */
            if (e != EBUSY) {
                sp_errf(err, SP_INTERNAL, "%s: LOOP_CONFIGURE: %s", dev, strerror(e));
                break;
            }
        }
    }
    if (rc < 0 && !err->msg[0])
        sp_errf(err, SP_INTERNAL, "no loop device could be configured");
    close(ctl);
    close(img_fd);
    return rc;
}

/* DATA/overlay/.disks/N.conf: budget, inodes, image size, and what the
 * empty slot used (bytes, inodes). */
static int read_conf(const char *path, uint64_t v[5])
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    int n = fscanf(f, "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64, &v[0], &v[1],
                   &v[2], &v[3], &v[4]);
    fclose(f);
    return n == 5 ? 0 : -1;
}

static int make_image(const char *img, uint64_t size, uint64_t inodes, unsigned i,
                      struct sp_err *err)
{
    int fd = open(img, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return sp_errf(err, SP_INTERNAL, "%s: %s", img, strerror(errno));
    int r = ftruncate(fd, (off_t)size);
    close(fd);
    if (r < 0)
        return sp_errf(err, SP_INTERNAL, "%s: %s", img, strerror(errno));
    return make_fs(img, size, inodes, i, err);
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* What a fresh ext4 image will offer (statfs f_bavail once mounted): its
 * free blocks (superblock), less the clusters ext4 keeps for delayed
 * allocation's metadata (2% of the blocks, at most 4096). */
static int image_avail(const char *img, uint64_t *avail)
{
    unsigned char sb[1024];
    int fd = open(img, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? pread(fd, sb, sizeof sb, 1024) : -1;
    if (fd >= 0)
        close(fd);
    if (n != (ssize_t)sizeof sb || sb[0x38] != 0x53 || sb[0x39] != 0xEF)
        return -1;
    uint64_t blocks = le32(sb + 0x04), free = le32(sb + 0x0C);
    uint64_t bsize = 1024ull << le32(sb + 0x18);
    uint64_t resv = blocks / 50 < 4096 ? blocks / 50 : 4096;
    *avail = free > resv ? (free - resv) * bsize : 0;
    return 0;
}

static int mount_stage(const char *img, const char *stage, struct sp_err *err)
{
    char dev[64];
    int lfd = loop_attach(img, dev, sizeof dev, err);
    if (lfd < 0)
        return -1;
    mkdir(stage, 0700);
    int rc = 0;
    if (mount(dev, stage, "ext4", MS_NOSUID | MS_NODEV | MS_NOATIME, "discard,noinit_itable") < 0)
        rc = sp_errf(err, SP_INTERNAL, "mount %s on %s: %s", dev, stage, strerror(errno));
    close(lfd); /* the mount holds the device now; autoclear frees it after */
    return rc;
}

static int usage_at(const char *path, uint64_t *bytes, uint64_t *inodes)
{
    struct statfs sf;
    if (statfs(path, &sf) < 0 || sf.f_type != EXT4_MAGIC)
        return -1;
    *bytes = (uint64_t)(sf.f_blocks - sf.f_bfree) * (uint64_t)sf.f_bsize;
    *inodes = (uint64_t)(sf.f_files - sf.f_ffree);
    return 0;
}

int slotfs_budgets(const struct agent *ag, uint64_t *bytes, uint64_t *inodes)
{
    char conf[4200];
    uint64_t c[5];
    snprintf(conf, sizeof conf, "%s/overlay/.disks/0.conf", ag->data_dir);
    if (read_conf(conf, c) < 0 || !c[0])
        return -1;
    *bytes = c[0];
    *inodes = c[1];
    return 0;
}

int slotfs_mount(struct agent *ag, struct slot *s, struct sp_err *err)
{
    const struct quota_state *q = &ag->quota;
    unsigned i = s->index;
    char dir[4200], img[4200], conf[4200], stage[4200], slot_dir[4200], ovl_dir[4200], sub[4300];
    /* Under DATA/overlay, which no box shows. */
    pathf(dir, sizeof dir, "%s/overlay/.disks", ag->data_dir, i);
    pathf(img, sizeof img, "%s/overlay/.disks/%u.img", ag->data_dir, i);
    pathf(conf, sizeof conf, "%s/overlay/.disks/%u.conf", ag->data_dir, i);
    pathf(stage, sizeof stage, "%s/overlay/.disks/mnt%u", ag->data_dir, i);
    pathf(slot_dir, sizeof slot_dir, "%s/slots/%u", ag->data_dir, i);
    pathf(ovl_dir, sizeof ovl_dir, "%s/overlay/%u", ag->data_dir, i);
    char top[4200];
    snprintf(top, sizeof top, "%s", ag->data_dir);
    for (char *p = top + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(top, 0755);
            *p = '/';
        }
    mkdir(top, 0755);
    snprintf(top, sizeof top, "%s/overlay", ag->data_dir);
    mkdir(top, 0700);
    snprintf(top, sizeof top, "%s/slots", ag->data_dir);
    mkdir(top, 0755);
    mkdir(dir, 0700);
    mkdir(slot_dir, 0755);
    mkdir(ovl_dir, 0700);
    /* Left by an agent that was killed (and its guardian with it). */
    for (int k = 0; k < 3; k++) {
        const char *p = k == 0 ? slot_dir : k == 1 ? ovl_dir : stage;
        while (is_mountpoint(p) && umount2(p, MNT_DETACH) == 0)
            ;
    }
    uint64_t inodes = q->ibudget;
    uint64_t c[5] = {0};
    bool fresh = read_conf(conf, c) < 0 || c[0] != q->budget || c[1] != inodes;
    struct stat sb;
    if (!fresh)
        fresh = stat(img, &sb) < 0 || (uint64_t)sb.st_size != c[2];
    int rc = 0;
    if (fresh) {
        unlink(conf);
        /* The budget, plus room for inode tables, journal and the rest of
         * the metadata; then again, sized by what the first one left free
         * (read from its superblock: no mount, no loop device), so the
         * slot can store just under its budget. */
        uint64_t size = q->budget + inodes * 256 + (8ull << 20), avail = 0;
        for (int pass = 0; pass < 3; pass++) {
            size = (size + 4095) & ~4095ull;
            if (make_image(img, size, inodes, i, err) < 0) {
                unlink(img);
                return -1;
            }
            if (image_avail(img, &avail) < 0 ||
                (avail <= q->budget && q->budget - avail < (1ull << 20)))
                break;
            /* Aim a little under: a budget is a most, not a least. */
            int64_t next = (int64_t)size + ((int64_t)q->budget - (int64_t)avail) - (128 << 10);
            if (next < (16 << 20)) /* what mkfs needs for its metadata, at least */
                break;
            size = (uint64_t)next;
        }
        struct stat isb;
        c[2] = stat(img, &isb) == 0 ? (uint64_t)isb.st_size : size;
        if (mount_stage(img, stage, err) < 0) {
            unlink(img);
            return -1;
        }
    } else if (mount_stage(img, stage, err) < 0) {
        return -1;
    }
    for (int k = 0; k < 2 && rc == 0; k++) {
        snprintf(sub, sizeof sub, "%s/%s", stage, k ? "overlay" : "slot");
        if (mkdir(sub, k ? 0700 : 0755) < 0 && errno != EEXIST)
            rc = sp_errf(err, SP_INTERNAL, "%s: %s", sub, strerror(errno));
        else if (mount(sub, k ? ovl_dir : slot_dir, NULL, MS_BIND, NULL) < 0)
            rc = sp_errf(err, SP_INTERNAL, "bind %s: %s", sub, strerror(errno));
    }
    if (rc == 0 && fresh) {
        /* What an empty slot already uses (its directories) is not its. */
        for (int k = 0; k < 2; k++) {
            snprintf(sub, sizeof sub, "%s/%s", slot_dir, k ? "tmp" : "work");
            mkdir(sub, 0700);
        }
        usage_at(slot_dir, &c[3], &c[4]);
        FILE *f = fopen(conf, "we");
        if (!f || fprintf(f, "%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n",
                          q->budget, inodes, c[2], c[3], c[4]) < 0)
            rc = sp_errf(err, SP_INTERNAL, "%s: %s", conf, strerror(errno));
        if (f)
            fclose(f);
    }
    if (rc == 0) {
        s->disk.base_bytes = c[3];
        s->disk.base_inodes = c[4];
    }
    umount2(stage, MNT_DETACH);
    rmdir(stage);
    if (rc < 0) {
        umount2(slot_dir, MNT_DETACH);
        umount2(ovl_dir, MNT_DETACH);
        return -1;
    }
    s->disk.fs = true;
    return 0;
}

static void unmount_slots(const char *data_dir, unsigned n)
{
    char p[4200];
    for (unsigned i = 0; i < n; i++) {
        snprintf(p, sizeof p, "%s/slots/%u", data_dir, i);
        if (is_mountpoint(p))
            umount2(p, MNT_DETACH);
        snprintf(p, sizeof p, "%s/overlay/%u", data_dir, i);
        if (is_mountpoint(p))
            umount2(p, MNT_DETACH);
    }
}

void slotfs_unmount_all(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    if (!q->fs)
        return;
    unmount_slots(ag->data_dir, ag->nslots);
    if (q->guardian > 0) {
        kill(q->guardian, SIGKILL);
        waitpid(q->guardian, NULL, 0);
        q->guardian = 0;
    }
}

/* A process that outlives a killed agent just long enough to take its
 * mounts away, told by the parent-death signal. It is the agent's binary
 * again under a name of its own (slot-agent-fs-guardian), in a session of
 * its own: what stops agents by name or by process group leaves it. */
void slotfs_guardian_start(struct agent *ag)
{
    struct quota_state *q = &ag->quota;
    char parent[32], n[32];
    snprintf(parent, sizeof parent, "%d", (int)getpid());
    snprintf(n, sizeof n, "%u", ag->nslots);
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, &old);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0);
        setsid();
        int dn = open("/dev/null", O_RDWR);
        if (dn >= 0) {
            dup2(dn, 0);
            dup2(dn, 1);
            dup2(dn, 2);
        }
        syscall(SYS_close_range, 3u, ~0u, 0);
        char *argv[] = {"slot-agent-fs-guardian", "--fs-guardian", ag->data_dir, n, parent, NULL};
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid > 0)
        q->guardian = pid;
    else
        log_warn("per-slot filesystems: no guardian (%s): a killed agent leaves its mounts",
                 strerror(errno));
}

int slotfs_guardian_main(int argc, char **argv)
{
    if (argc != 5)
        return 2;
    char *end;
    unsigned long n = strtoul(argv[3], &end, 10);
    long parent = strtol(argv[4], NULL, 10);
    if (*end || n > 65536)
        return 2;
    /* Only the agent's death ends the wait (SIGUSR2 stays blocked across
     * the exec, for sigwait); every other signal that can be is ignored. */
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGUSR2 && sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0);
    /* Only the agent's death: a stray SIGUSR2 (pkill by name) is not. */
    while (getppid() == (pid_t)parent) {
        int got;
        sigwait(&set, &got);
    }
    unmount_slots(argv[2], (unsigned)n);
    return 0;
}

bool slotfs_guardian_pid(const struct agent *ag, pid_t pid)
{
    return ag->quota.guardian > 0 && ag->quota.guardian == pid;
}

int slotfs_usage(const struct agent *ag, const struct slot *s, uint64_t *bytes, uint64_t *inodes)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/slots/%u", ag->data_dir, s->index);
    if (usage_at(p, bytes, inodes) < 0)
        return -1;
    *bytes = *bytes > s->disk.base_bytes ? *bytes - s->disk.base_bytes : 0;
    *inodes = *inodes > s->disk.base_inodes ? *inodes - s->disk.base_inodes : 0;
    return 0;
}

uint64_t slotfs_pending(const struct agent *ag, const struct slot *s)
{
    char p[4200];
    struct statfs sf;
    struct stat sb;
    snprintf(p, sizeof p, "%s/slots/%u", ag->data_dir, s->index);
    if (statfs(p, &sf) < 0)
        return 0;
    uint64_t used = (uint64_t)(sf.f_blocks - sf.f_bfree) * (uint64_t)sf.f_bsize;
    snprintf(p, sizeof p, "%s/overlay/.disks/%u.img", ag->data_dir, s->index);
    if (stat(p, &sb) < 0)
        return 0;
    uint64_t on_host = (uint64_t)sb.st_blocks * 512u;
    return used > on_host ? used - on_host : 0;
}

int slotfs_free(const struct agent *ag, const struct slot *s, uint64_t *bytes, uint64_t *files)
{
    char p[4200];
    struct statfs sf;
    snprintf(p, sizeof p, "%s/slots/%u", ag->data_dir, s->index);
    if (statfs(p, &sf) < 0)
        return -1;
    *bytes = (uint64_t)sf.f_bavail * (uint64_t)sf.f_bsize;
    *files = (uint64_t)sf.f_ffree;
    return 0;
}
