/* The ladder as one sequence: probe at start-up, prepare shared programs, and
 * in the child apply rlimits, the slot user, no_new_privs, Landlock and
 * seccomp in that order (seccomp last, so the filter never blocks the setup
 * itself). Namespaces are entered before the child exists: the slot's box
 * holder forks it inside them. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "isolate.h"

const char *const rung_names[RUNG_COUNT] = {"uid",     "namespaces", "landlock",   "seccomp",
                                            "rlimits", "cgroup",     "containment"};

static void unavailable(struct isolation *iso, enum rung r, const char *why)
{
    iso->available &= ~(1u << r);
    snprintf(iso->why[r], sizeof iso->why[r], "%.190s", why);
}

int isolate_init(struct isolation *iso, unsigned nslots, struct sp_err *err)
{
    (void)err;
    char why[200];
    iso->root = geteuid() == 0;
    iso->available = (1u << RUNG_CONTAINMENT) | (1u << RUNG_RLIMITS);
    if (uid_probe(iso, nslots, why, sizeof why) == 0)
        iso->available |= 1u << RUNG_UID;
    else
        unavailable(iso, RUNG_UID, why);
    if (!(iso->disabled & (1u << RUNG_NAMESPACES))) {
        if (ns_probe(iso, why, sizeof why) == 0)
            iso->available |= 1u << RUNG_NAMESPACES;
        else
            unavailable(iso, RUNG_NAMESPACES, why);
    }
    /* A box's user namespace maps the agent's own ids only (box_enter): no
     * slot user exists in it, and workspaces given to one would be out of
     * reach. The box wins; --without namespaces keeps a user per slot. */
    if ((iso->available & (1u << RUNG_NAMESPACES)) && (iso->ns_flags & CLONE_NEWUSER) &&
        (iso->available & (1u << RUNG_UID))) {
        snprintf(why, sizeof why,
                 "the box's user namespace maps only uid %u%s; --without namespaces keeps a "
                 "user per slot",
                 (unsigned)geteuid(), iso->root ? " (root without CAP_SYS_ADMIN needs one)" : "");
        unavailable(iso, RUNG_UID, why);
    }
    if (iso->disabled & (1u << RUNG_CGROUP))
        unavailable(iso, RUNG_CGROUP, "disabled");
    else if (cgroup_probe(iso, why, sizeof why) == 0)
        iso->available |= 1u << RUNG_CGROUP;
    else
        unavailable(iso, RUNG_CGROUP, why);
    /* Keep the configured maxima within what this process may grant. */
    static const int res[LIM_COUNT] = {RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
                                       RLIMIT_NOFILE};
    for (int i = 0; i < LIM_COUNT; i++) {
        struct rlimit rl;
        if (getrlimit(res[i], &rl) == 0 && rl.rlim_max != RLIM_INFINITY &&
            (iso->lim_max[i] == RLIM_INFINITY || iso->lim_max[i] > rl.rlim_max))
            iso->lim_max[i] = rl.rlim_max;
    }
    iso->landlock_abi = landlock_probe();
    if (iso->landlock_abi > 0) {
        iso->available |= 1u << RUNG_LANDLOCK;
    } else {
        snprintf(why, sizeof why, "landlock_create_ruleset: %s",
                 errno == ENOSYS ? "not in this kernel" : strerror(errno));
        unavailable(iso, RUNG_LANDLOCK, why);
    }
    struct sp_err e;
    if (seccomp_build(&iso->seccomp[0], false, iso->seccomp_deny, iso->nseccomp_deny, &e) == 0 &&
        seccomp_build(&iso->seccomp[1], true, iso->seccomp_deny, iso->nseccomp_deny, &e) == 0 &&
        prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0) {
        iso->available |= 1u << RUNG_SECCOMP;
    } else {
        unavailable(iso, RUNG_SECCOMP, e.msg);
    }
    iso->available &= ~iso->disabled;
    for (int r = 0; r < RUNG_COUNT; r++)
        if (iso->disabled & (1u << r))
            snprintf(iso->why[r], sizeof iso->why[r], "disabled by --without");
    return 0;
}

void isolate_free(struct isolation *iso)
{
    for (unsigned i = 0; i < iso->nseccomp_deny; i++)
        free(iso->seccomp_deny[i]);
    iso->nseccomp_deny = 0;
    for (int i = 0; i < 2; i++) {
        free(iso->seccomp[i].filter);
        iso->seccomp[i].filter = NULL;
    }
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

void isolate_report(const struct isolation *iso, bool json, const char *view, const char *tpl_mode,
                    const char *tpl_why, const char *disk)
{
    if (json) {
        printf("{\"root\": %s, \"landlock_abi\": %d, \"slot_uid_base\": %u, \"cgroup\": %d, "
               "\"namespaces\": {\"user\": %s, \"net\": %s, \"proc\": %s, \"workspace\": %s}, "
               "\"workspace_view\": ",
               iso->root ? "true" : "false", iso->landlock_abi > 0 ? iso->landlock_abi : 0,
               iso->uid_base, iso->cg_version, (iso->ns_flags & CLONE_NEWUSER) ? "true" : "false",
               iso->ns_net ? "true" : "false", iso->ns_proc ? "true" : "false",
               iso->ns_workspace ? "true" : "false");
        json_str(view);
        printf(", \"templates\": {\"mode\": ");
        json_str(tpl_mode);
        printf(", \"why\": ");
        json_str(tpl_why);
        printf("}, %s, \"rungs\": {", disk);
        for (int r = 0; r < RUNG_COUNT; r++)
            printf("%s\"%s\": {\"available\": %s, \"why\": \"%s\"}", r ? ", " : "", rung_names[r],
                   (iso->available & (1u << r)) ? "true" : "false",
                   (iso->available & (1u << r)) ? "" : iso->why[r]);
        printf("}}\n");
        return;
    }
    printf("running as %s; Landlock ABI %d; commands see their workspace at %s\n",
           iso->root ? "root" : "an unprivileged user",
           iso->landlock_abi > 0 ? iso->landlock_abi : 0, view);
    printf("templates: a slot stands on one as %s%s%s%s\n",
           !strcmp(tpl_mode, "overlay") ? "an overlay" : "a copy", tpl_why[0] ? " (" : "", tpl_why,
           tpl_why[0] ? ")" : "");
    printf("%s\n", disk);
    for (int r = 0; r < RUNG_COUNT; r++) {
        if ((iso->available & (1u << r)) && r == RUNG_UID)
            printf("  %-12s yes  (slot N runs as uid/gid %u+N)\n", rung_names[r], iso->uid_base);
        else if ((iso->available & (1u << r)) && r == RUNG_NAMESPACES)
            printf("  %-12s yes  (mount, pid, ipc%s%s; %s /proc; %s)\n", rung_names[r],
                   (iso->ns_flags & CLONE_NEWUSER) ? ", user" : "",
                   iso->ns_net ? ", net for network=false" : "", iso->ns_proc ? "own" : "host's",
                   iso->ns_workspace ? "workspace at " BOX_WORKSPACE : iso->ns_workspace_why);
        else if ((iso->available & (1u << r)) && r == RUNG_CGROUP)
            printf("  %-12s yes  (v%d, per slot: memory %llu bytes, pids %llu; 0 = unlimited)\n",
                   rung_names[r], iso->cg_version, (unsigned long long)iso->cg_memory,
                   (unsigned long long)iso->cg_pids);
        else if (iso->available & (1u << r))
            printf("  %-12s yes\n", rung_names[r]);
        else
            printf("  %-12s no   (%s)\n", rung_names[r], iso->why[r]);
    }
}

/* One rung's outcome in the child: applied, or, when the spawn may not go
 * on without it, the failure that stops it. */
static int step(struct iso_child *ic, enum rung r, int rc, bool must)
{
    if (rc == 0) {
        ic->applied |= 1u << r;
        return 0;
    }
    if (!must)
        return 0;
    ic->failed_rung = r;
    ic->failed_errno = errno;
    return -1;
}

static bool wants(const struct iso_child *ic, enum rung r)
{
    return (ic->want & (1u << r)) != 0;
}

/* Runs in the child (shared memory, raw system calls only). */
int isolate_child(struct iso_child *ic)
{
    ic->applied = 0;
    ic->failed_rung = -1;
    /* First, while still privileged enough to move into the group. */
    if (wants(ic, RUNG_CGROUP) && ic->cg_fd[0] >= 0 &&
        step(ic, RUNG_CGROUP, cgroup_join(ic->cg_fd), ic->required) < 0)
        return -1;
    if (wants(ic, RUNG_RLIMITS) && step(ic, RUNG_RLIMITS, rlimit_apply(ic->lim), ic->required) < 0)
        return -1;
    /* Never run as the agent's user when a slot user was wanted. */
    if (wants(ic, RUNG_UID) && step(ic, RUNG_UID, uid_apply(ic->uid), true) < 0)
        return -1;
    /* Needed by Landlock and seccomp without privileges; also keeps setuid
     * binaries from gaining any. */
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (wants(ic, RUNG_LANDLOCK) && ic->landlock_fd >= 0 &&
        step(ic, RUNG_LANDLOCK, landlock_apply(ic->landlock_fd), ic->required) < 0)
        return -1;
    if (wants(ic, RUNG_SECCOMP) && ic->seccomp &&
        step(ic, RUNG_SECCOMP, seccomp_apply(ic->seccomp), ic->required) < 0)
        return -1;
    ic->applied |= ic->want & (1u << RUNG_CONTAINMENT);
    return 0;
}
