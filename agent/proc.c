/* Process-tree containment without cgroups or namespaces: find descendants
 * through /proc/PID/task/TID/children, freeze them with SIGSTOP before
 * listing their children (a stopped process cannot fork), then SIGKILL the
 * lot. The agent is a child subreaper, so leftovers of a finished command
 * come back to it and are swept here. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"
#include "quota.h"
#include "slotfs.h"
#include "template.h"
#include "session.h"

struct pidvec {
    pid_t *v;
    size_t n, cap;
};

static int pidvec_push(struct pidvec *pv, pid_t p)
{
    if (pv->n == pv->cap) {
        size_t cap = pv->cap ? pv->cap * 2 : 64;
        pid_t *v = realloc(pv->v, cap * sizeof *v);
        if (!v)
            return -1;
        pv->v = v;
        pv->cap = cap;
    }
    pv->v[pv->n++] = p;
    return 0;
}

/* Parse one children file ("pid pid ... "). */
static void read_children_file(const char *path, struct pidvec *out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char buf[4096];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        char *p = buf;
        for (;;) {
            while (*p == ' ' || *p == '\n')
                p++;
            char *end = p;
            while (*end >= '0' && *end <= '9')
                end++;
            if (end == p || (!*end && have == sizeof buf - 1))
                break; /* done, or a number cut at the buffer's end */
            pidvec_push(out, (pid_t)strtol(p, NULL, 10));
            p = end;
        }
        size_t rest = strlen(p);
        memmove(buf, p, rest);
        have = rest;
    }
    close(fd);
}

/* Append the children of every thread of pid. */
static void read_children(pid_t pid, struct pidvec *out)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        char cpath[320];
        snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", (int)pid, de->d_name);
        read_children_file(cpath, out);
    }
    closedir(d);
}

unsigned proc_kill_tree(pid_t root)
{
    if (root <= 1)
        return 0;
    struct pidvec pv = {0};
    if (pidvec_push(&pv, root) < 0)
        return 0;
    /* Breadth-first: stop each process, then collect its children. */
    for (size_t i = 0; i < pv.n; i++) {
        kill(pv.v[i], SIGSTOP);
        read_children(pv.v[i], &pv);
    }
    /* Leaves first: a parent killed before its stopped children orphans
     * their process groups, and the kernel's SIGHUP+SIGCONT to those can
     * end and reap a child before our SIGKILL reaches it (a short count). */
    unsigned n = 0;
    for (size_t i = pv.n; i-- > 0;) {
        if (kill(pv.v[i], SIGKILL) == 0)
            n++;
        /* Its process group too: members that left the tree by re-parenting
         * but kept the group. */
        kill(-pv.v[i], SIGKILL);
    }
    free(pv.v);
    return n;
}

unsigned proc_kill_children(struct agent *ag, pid_t pid)
{
    /* A box's PID 1 has one thread (box_init): its one children file,
     * without listing its tasks (this runs after every command). */
    struct pidvec kids = {0};
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)pid);
    read_children_file(path, &kids);
    unsigned n = 0;
    for (size_t i = 0; i < kids.n; i++)
        if (!slots_is_kept(ag, kids.v[i]))
            n += proc_kill_tree(kids.v[i]);
    free(kids.v);
    return n;
}

size_t proc_children(pid_t pid, pid_t **out)
{
    struct pidvec kids = {0};
    read_children(pid, &kids);
    *out = kids.v;
    return kids.n;
}

unsigned proc_sweep_strays(struct agent *ag)
{
    /* A command a box holder just started is our child before we know its
     * pid: sweep later. */
    if (ag->spawning)
        return 0;
    unsigned total = 0;
    /* Killing a stray re-parents its children to us: repeat, bounded. */
    for (int round = 0; round < 16; round++) {
        struct pidvec kids = {0};
        /* The agent has one thread, so its children are all in one file. */
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)ag->pid);
        read_children_file(path, &kids);
        unsigned n = 0;
        for (size_t i = 0; i < kids.n; i++) {
            if (exec_is_main_pid(ag, kids.v[i]) || slots_is_box_holder(ag, kids.v[i]) ||
                slots_is_kept(ag, kids.v[i]) || session_is_shell(ag, kids.v[i]) ||
                ws_job_pid(ag, kids.v[i]) || quota_worker_pid(ag, kids.v[i]) ||
                slotfs_guardian_pid(ag, kids.v[i]) || warm_is_shell(ag, kids.v[i]))
                continue;
            /* A stray that already exited is only a zombie: reap it here
             * (nobody waits for its status) instead of "killing" it again. */
            int st;
            if (waitpid(kids.v[i], &st, WNOHANG) == kids.v[i])
                continue;
            n += proc_kill_tree(kids.v[i]);
        }
        free(kids.v);
        total += n;
        if (n == 0)
            break;
    }
    if (total)
        log_debug("swept %u leftover processes", total);
    return total;
}
