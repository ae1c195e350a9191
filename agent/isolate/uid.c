/* Rung 1: a user per slot. When the agent may change ids, slot i runs as
 * uid/gid base+i, owns its workspace and tmp (mode 0700), and cannot read,
 * signal or trace another slot's processes or files by plain Unix rules,
 * whatever else the host lacks. */
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <stdio.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "isolate.h"

/* Besides switching ids, the agent must give workspaces away (CHOWN, and
 * FOWNER to chmod what it no longer owns), still reach into them
 * (DAC_OVERRIDE) and signal the slots' processes (KILL): a container with
 * only some of these (docker --cap-drop ALL --cap-add SETUID...) would
 * otherwise hand out workspaces that nobody can use. */
static const struct {
    int cap;
    const char *name;
} uid_caps[] = {
    {CAP_SETUID, "SETUID"},
    {CAP_SETGID, "SETGID"},
    {CAP_CHOWN, "CHOWN"},
    {CAP_FOWNER, "FOWNER"},
    {CAP_DAC_OVERRIDE, "DAC_OVERRIDE"},
    {CAP_KILL, "KILL"},
};

static int missing_caps(char *out, size_t cap)
{
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct d[2];
    int n = 0;
    size_t off = 0;
    *out = 0;
    bool ok = syscall(SYS_capget, &h, d) == 0;
    for (size_t i = 0; i < sizeof uid_caps / sizeof uid_caps[0]; i++)
        if (!ok || !(d[0].effective & (1u << uid_caps[i].cap))) {
            if (off < cap)
                off +=
                    (size_t)snprintf(out + off, cap - off, "%s%s", n ? "/" : "", uid_caps[i].name);
            n++;
        }
    return n;
}

int uid_probe(struct isolation *iso, unsigned nslots, char *why, size_t whycap)
{
    char miss[96];
    if (missing_caps(miss, sizeof miss)) {
        snprintf(why, whycap, "no CAP_%s%s", miss, geteuid() ? " (not root)" : "");
        return -1;
    }
    uint64_t last = (uint64_t)iso->uid_base + (nslots ? nslots - 1 : 0);
    if (iso->uid_base == 0 || last >= 0xfffffffeu) {
        snprintf(why, whycap, "--slot-uid-base %u leaves no room for %u slots", iso->uid_base,
                 nslots);
        return -1;
    }
    /* Inside a user namespace (rootless containers, Apptainer --fakeroot)
     * only mapped ids exist: try the first and the last for real. */
    pid_t pid = fork();
    if (pid == 0) {
        uid_t ids[2] = {(uid_t)iso->uid_base, (uid_t)last};
        for (int i = 0; i < 2; i++)
            if (syscall(SYS_setresgid, ids[i], ids[i], ids[i]) < 0 ||
                syscall(SYS_setresuid, 0, ids[i], 0) < 0 || syscall(SYS_setresuid, 0, 0, 0) < 0)
                _exit(1);
        _exit(0);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        snprintf(why, whycap, "uids %u..%llu cannot be used here (not mapped?)", iso->uid_base,
                 (unsigned long long)last);
        return -1;
    }
    return 0;
}

/* Slot users must be able to walk down to their workspace: every directory
 * above it needs search permission for others. */
int uid_check_path(const char *dir, char *why, size_t whycap)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return -1;
    for (;;) {
        struct stat st;
        if (stat(buf[0] ? buf : "/", &st) == 0 && !(st.st_mode & S_IXOTH)) {
            snprintf(why, whycap, "%.60s is not searchable by other users", buf[0] ? buf : "/");
            return -1;
        }
        char *slash = strrchr(buf, '/');
        if (!slash || slash == buf)
            break;
        *slash = 0;
    }
    return 0;
}

int uid_own_dir(int dirfd, unsigned uid)
{
    if (fchown(dirfd, uid, uid) < 0 || fchmod(dirfd, 0700) < 0)
        return -1;
    return 0;
}

void uid_fs_enter(unsigned uid)
{
    setfsgid(uid);
    setfsuid(uid);
}

void uid_fs_leave(void)
{
    setfsuid(geteuid());
    setfsgid(getegid());
}

/* In the child: raw system calls, because libc's set*id wrappers signal
 * every thread of a process whose memory this child shares. */
int uid_apply(unsigned uid)
{
    if (syscall(SYS_setgroups, 0, NULL) < 0 || syscall(SYS_setresgid, uid, uid, uid) < 0 ||
        syscall(SYS_setresuid, uid, uid, uid) < 0)
        return -1;
    return 0;
}
