/* Rung 5b: a cgroup per slot, when the agent has a writable subtree: the
 * slot's memory and process count are bounded as a whole (not per process as
 * rlimits are), and reset kills the whole group at once.
 *
 * cgroup v2: the agent's own cgroup X must have the memory and pids
 * controllers and no other processes; the agent moves itself into the leaf
 * X/slot-agent-PID/agent (v2 allows processes only in leaves) and makes
 * X/slot-agent-PID/slot-N per slot. cgroup v1 (hosts that still mount the
 * memory and pids hierarchies separately): slot-agent-PID/slot-N beneath the
 * agent's cgroup in each of the two hierarchies. A child joins its slot by
 * writing "0" to the cgroup.procs files the agent opened for it. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "../fdio.h"
#include "isolate.h"

#define CGROUP2_MAGIC 0x63677270
#define CGROUP1_MAGIC 0x27e0eb

/* The agent's cgroup path in the hierarchy named `ctrl` ("" for v2). */
static int own_path(const char *ctrl, char *out, size_t cap)
{
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f)
        return -1;
    char line[1024];
    int rc = -1;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        *c2 = 0;
        const char *list = c1 + 1;
        bool match = false;
        if (!*ctrl) {
            match = !strcmp(line, "0") && !*list;
        } else {
            char tmp[256];
            snprintf(tmp, sizeof tmp, "%s", list);
            for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t;
                 t = strtok_r(NULL, ",", &save))
                match |= !strcmp(t, ctrl);
        }
        if (match) {
            snprintf(out, cap, "%s", strcmp(c2 + 1, "/") ? c2 + 1 : "");
            rc = 0;
            break;
        }
    }
    fclose(f);
    return rc;
}

static bool has_words(const char *list, const char *a, const char *b)
{
    bool fa = false, fb = false;
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", list);
    for (char *save = NULL, *t = strtok_r(tmp, " \n", &save); t; t = strtok_r(NULL, " \n", &save)) {
        fa |= !strcmp(t, a);
        fb |= !strcmp(t, b);
    }
    return fa && fb;
}

/* Groups of agents that died without cleaning up (SIGKILL, OOM): remove
 * the empty ones beside ours. */
static void remove_stale(const char *parent)
{
    DIR *d = opendir(parent);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        int pid;
        char tail;
        if (sscanf(de->d_name, "slot-agent-%d%c", &pid, &tail) != 1 || pid <= 0 ||
            kill(pid, 0) == 0 || errno != ESRCH)
            continue;
        char dir[1300], sub[1600];
        snprintf(dir, sizeof dir, "%s/%s", parent, de->d_name);
        DIR *sd = opendir(dir);
        struct dirent *se;
        while (sd && (se = readdir(sd)))
            if (se->d_type == DT_DIR && se->d_name[0] != '.') {
                snprintf(sub, sizeof sub, "%s/%s", dir, se->d_name);
                rmdir(sub);
            }
        if (sd)
            closedir(sd);
        rmdir(dir);
    }
    closedir(d);
}

static int probe_v2(struct isolation *iso, const char *mnt, char *why, size_t cap)
{
    char rel[512], x[1024], path[1300], buf[512];
    if (own_path("", rel, sizeof rel) < 0) {
        snprintf(why, cap, "no cgroup v2 line in /proc/self/cgroup");
        return -1;
    }
    snprintf(x, sizeof x, "%s%s", mnt, rel);
    snprintf(path, sizeof path, "%s/cgroup.controllers", x);
    if (file_read_str(path, buf, sizeof buf) < 0 || !has_words(buf, "memory", "pids")) {
        snprintf(why, cap, "cgroup v2: memory and pids controllers not delegated to %.40s",
                 rel[0] ? rel : "/");
        return -1;
    }
    remove_stale(x);
    snprintf(iso->cg_base[0], sizeof iso->cg_base[0], "%s/slot-agent-%d", x, (int)getpid());
    snprintf(path, sizeof path, "%s/agent", iso->cg_base[0]);
    char pid[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    char procs[1400];
    snprintf(procs, sizeof procs, "%s/cgroup.procs", path);
    char sub[1300];
    snprintf(sub, sizeof sub, "%s/cgroup.subtree_control", x);
    char sub2[1300];
    snprintf(sub2, sizeof sub2, "%s/cgroup.subtree_control", iso->cg_base[0]);
    if (mkdir(iso->cg_base[0], 0755) < 0 || mkdir(path, 0755) < 0 ||
        file_write_str(procs, pid) < 0) {
        snprintf(why, cap, "cgroup v2: cannot create %.40s/slot-agent-*: %s", rel[0] ? rel : "",
                 strerror(errno));
        goto undo;
    }
    if (file_read_str(sub, buf, sizeof buf) == 0 && !has_words(buf, "memory", "pids")) {
        if (file_write_str(sub, "+memory +pids") < 0) {
            snprintf(why, cap, "cgroup v2: enabling memory, pids in %.40s: %s (other processes?)",
                     rel[0] ? rel : "/", strerror(errno));
            goto undo;
        }
        iso->cg_enabled_parent = true;
    }
    if (file_write_str(sub2, "+memory +pids") < 0) {
        snprintf(why, cap, "cgroup v2: enabling controllers: %s", strerror(errno));
        goto undo;
    }
    snprintf(iso->cg_parent, sizeof iso->cg_parent, "%s", x);
    iso->cg_version = 2;
    return 0;
undo : {
    char back[1300];
    snprintf(back, sizeof back, "%s/cgroup.procs", x);
    file_write_str(back, pid);
    rmdir(path);
    rmdir(iso->cg_base[0]);
    iso->cg_base[0][0] = 0;
    return -1;
}
}

static int probe_v1(struct isolation *iso, char *why, size_t cap)
{
    static const char *const ctrl[2] = {"memory", "pids"};
    for (int k = 0; k < 2; k++) {
        char rel[512], mnt[64];
        struct statfs sf;
        snprintf(mnt, sizeof mnt, "/sys/fs/cgroup/%s", ctrl[k]);
        if (statfs(mnt, &sf) < 0 || sf.f_type != CGROUP1_MAGIC ||
            own_path(ctrl[k], rel, sizeof rel) < 0) {
            snprintf(why, cap, "no cgroup v2 with memory and pids, nor cgroup v1 %s", ctrl[k]);
            goto undo;
        }
        char parent[700];
        snprintf(parent, sizeof parent, "%s%s", mnt, rel);
        remove_stale(parent);
        snprintf(iso->cg_base[k], sizeof iso->cg_base[k], "%s/slot-agent-%d", parent,
                 (int)getpid());
        if (mkdir(iso->cg_base[k], 0755) < 0) {
            snprintf(why, cap, "cgroup v1: cannot create %.50s: %s", iso->cg_base[k],
                     strerror(errno));
            iso->cg_base[k][0] = 0;
            goto undo;
        }
    }
    iso->cg_version = 1;
    return 0;
undo:
    for (int k = 0; k < 2; k++)
        if (iso->cg_base[k][0]) {
            rmdir(iso->cg_base[k]);
            iso->cg_base[k][0] = 0;
        }
    return -1;
}

int cgroup_probe(struct isolation *iso, char *why, size_t cap)
{
    struct statfs sf;
    char buf[512];
    if (statfs("/sys/fs/cgroup", &sf) == 0 && sf.f_type == CGROUP2_MAGIC)
        return probe_v2(iso, "/sys/fs/cgroup", why, cap);
    /* Hybrid hosts: v2 only if it holds the controllers, else v1. */
    if (statfs("/sys/fs/cgroup/unified", &sf) == 0 && sf.f_type == CGROUP2_MAGIC &&
        file_read_str("/sys/fs/cgroup/unified/cgroup.controllers", buf, sizeof buf) == 0 &&
        has_words(buf, "memory", "pids"))
        return probe_v2(iso, "/sys/fs/cgroup/unified", why, cap);
    return probe_v1(iso, why, cap);
}

static void slot_dir(const struct isolation *iso, int k, unsigned index, char *out, size_t cap)
{
    snprintf(out, cap, "%s/slot-%u", iso->cg_base[k], index);
}

int cgroup_slot_init(const struct isolation *iso, unsigned index, int fds[2], struct sp_err *err)
{
    fds[0] = fds[1] = -1;
    int n = iso->cg_version == 2 ? 1 : 2;
    for (int k = 0; k < n; k++) {
        char dir[1300], file[1400], val[32];
        slot_dir(iso, k, index, dir, sizeof dir);
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
            goto fail;
        bool mem = iso->cg_version == 2 || k == 0, pids = iso->cg_version == 2 || k == 1;
        if (mem && iso->cg_memory) {
            snprintf(file, sizeof file, "%s/%s", dir,
                     iso->cg_version == 2 ? "memory.max" : "memory.limit_in_bytes");
            snprintf(val, sizeof val, "%llu", (unsigned long long)iso->cg_memory);
            if (file_write_str(file, val) < 0)
                goto fail;
            if (iso->cg_version == 2) {
                /* A slot that swaps is a slot that hangs: keep it in RAM. */
                snprintf(file, sizeof file, "%s/memory.swap.max", dir);
                file_write_str(file, "0");
            }
        }
        if (pids && iso->cg_pids) {
            snprintf(file, sizeof file, "%s/pids.max", dir);
            snprintf(val, sizeof val, "%llu", (unsigned long long)iso->cg_pids);
            if (file_write_str(file, val) < 0)
                goto fail;
        }
        snprintf(file, sizeof file, "%s/cgroup.procs", dir);
        if ((fds[k] = open(file, O_WRONLY | O_CLOEXEC)) < 0)
            goto fail;
        continue;
    fail:
        sp_errf(err, SP_INTERNAL, "cgroup for slot %u: %.60s: %s", index, dir, strerror(errno));
        for (int j = 0; j < 2; j++)
            if (fds[j] >= 0) {
                close(fds[j]);
                fds[j] = -1;
            }
        return -1;
    }
    return 0;
}

/* In the child, before anything else: "0" is the writer itself. */
int cgroup_join(const int fds[2])
{
    for (int k = 0; k < 2; k++)
        if (fds[k] >= 0 && write(fds[k], "0", 1) != 1)
            return -1;
    return 0;
}

static unsigned kill_listed(const char *procs)
{
    char buf[65536];
    if (file_read_str(procs, buf, sizeof buf) < 0)
        return 0;
    unsigned n = 0;
    for (char *save = NULL, *t = strtok_r(buf, "\n", &save); t; t = strtok_r(NULL, "\n", &save))
        if (kill((pid_t)atoi(t), SIGKILL) == 0)
            n++;
    return n;
}

unsigned cgroup_slot_kill(const struct isolation *iso, unsigned index)
{
    char dir[1300], file[1400];
    if (iso->cg_version == 2) {
        slot_dir(iso, 0, index, dir, sizeof dir);
        snprintf(file, sizeof file, "%s/cgroup.kill", dir);
        if (file_write_str(file, "1") == 0)
            return 1;
        snprintf(file, sizeof file, "%s/cgroup.procs", dir);
        return kill_listed(file); /* kernels before 5.14 */
    }
    if (iso->cg_version == 1) {
        /* A process forking while we list is caught by the next round. */
        unsigned n = 0;
        slot_dir(iso, 1, index, dir, sizeof dir);
        snprintf(file, sizeof file, "%s/cgroup.procs", dir);
        for (int round = 0; round < 8; round++) {
            /* A killed process stays listed until it is reaped: count the
             * first round only. */
            unsigned k = kill_listed(file);
            if (round == 0)
                n = k;
            if (!k)
                break;
        }
        return n;
    }
    return 0;
}

void cgroup_cleanup(struct isolation *iso, unsigned nslots)
{
    if (!iso->cg_version)
        return;
    int n = iso->cg_version == 2 ? 1 : 2;
    for (unsigned i = 0; i < nslots; i++) {
        cgroup_slot_kill(iso, i);
        for (int k = 0; k < n; k++) {
            char dir[1300];
            slot_dir(iso, k, i, dir, sizeof dir);
            /* Killed processes leave the group as they are reaped: retry. */
            for (int t = 0; t < 100 && rmdir(dir) < 0 && errno == EBUSY; t++)
                usleep(10000);
        }
    }
    if (iso->cg_version == 2) {
        char file[1400], pid[32];
        snprintf(pid, sizeof pid, "%d", (int)getpid());
        snprintf(file, sizeof file, "%s/cgroup.subtree_control", iso->cg_base[0]);
        file_write_str(file, "-memory -pids");
        if (iso->cg_enabled_parent) {
            snprintf(file, sizeof file, "%s/cgroup.subtree_control", iso->cg_parent);
            file_write_str(file, "-memory -pids");
        }
        snprintf(file, sizeof file, "%s/cgroup.procs", iso->cg_parent);
        file_write_str(file, pid);
        snprintf(file, sizeof file, "%s/agent", iso->cg_base[0]);
        rmdir(file);
    }
    for (int k = 0; k < n; k++)
        rmdir(iso->cg_base[k]);
    iso->cg_version = 0;
}
