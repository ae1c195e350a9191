/* The isolation ladder (the files of agent/isolate): what the host allows (probed once at
 * start-up), what is prepared once (seccomp programs, Landlock rulesets), and
 * the sequence a child runs before execve. One file per mechanism. */
#ifndef SLOT_ISOLATE_H
#define SLOT_ISOLATE_H

#include <linux/filter.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/resource.h>

#include "slotproto.h"

enum rung {
    RUNG_UID,
    RUNG_NAMESPACES,
    RUNG_LANDLOCK,
    RUNG_SECCOMP,
    RUNG_RLIMITS,
    RUNG_CGROUP,
    RUNG_CONTAINMENT,
    RUNG_COUNT
};

extern const char *const rung_names[RUNG_COUNT];

/* Where a box shows its slot's workspace to commands. */
#define BOX_WORKSPACE "/workspace"

/* Rungs that isolation "required" cannot do without. */
#define RUNGS_REQUIRED ((1u << RUNG_LANDLOCK) | (1u << RUNG_SECCOMP) | (1u << RUNG_CONTAINMENT))

enum { LIM_CPU, LIM_AS, LIM_NPROC, LIM_FSIZE, LIM_NOFILE, LIM_COUNT };
extern const char *const lim_names[LIM_COUNT];

struct isolation {
    unsigned available;        /* bit per rung */
    unsigned disabled;         /* turned off by --without */
    char why[RUNG_COUNT][200]; /* why a rung is unavailable */
    bool root;
    int landlock_abi;
    struct sock_fprog seccomp[2]; /* [0] network allowed, [1] network denied */
    rlim_t lim_max[LIM_COUNT];    /* agent maxima (and defaults); RLIM_INFINITY = none */
    unsigned uid_base;            /* slot i runs as uid/gid uid_base + i (rung 1) */
    int ns_flags;                 /* CLONE_NEW* a slot box gets (rung 2), network aside */
    bool ns_proc;                 /* a box can mount its own /proc */
    bool ns_net;                  /* network=false commands get an empty network namespace */
    bool ns_workspace;            /* a box shows the slot's workspace at /workspace */
    char ns_workspace_why[120];   /* why not */
    int cg_version;               /* 0: no cgroup rung; 1 or 2 */
    char cg_base[2][1200];        /* per-agent group ([0] v2, or v1 memory; [1] v1 pids) */
    char cg_parent[1100];         /* v2: the agent's original cgroup */
    bool cg_enabled_parent;       /* v2: we enabled the controllers there */
    uint64_t cg_memory;           /* per-slot memory limit, 0 = none */
    uint64_t cg_pids;             /* per-slot process limit, 0 = none */
    char *seccomp_deny[64];       /* --seccomp-deny additions */
    unsigned nseccomp_deny;
};

/* What one child applies; filled by the parent, `applied` and `failed` by the
 * child (the memory is shared until execve). */
struct iso_child {
    unsigned want;   /* rungs to apply */
    bool required;   /* a failing rung aborts the spawn */
    int landlock_fd; /* ruleset for this slot and network setting, or -1 */
    const struct sock_fprog *seccomp;
    int seccomp_index; /* which of isolation.seccomp, or -1 (sent to a box) */
    unsigned uid;      /* slot user, with want & RUNG_UID */
    int cg_fd[2];      /* cgroup.procs of the slot's cgroup(s), or -1 */
    struct rlimit lim[LIM_COUNT];
    unsigned applied;
    int failed_rung; /* -1, or the rung whose setup failed */
    int failed_errno;
};

struct agent;
struct slot;

/* Probe the host and prepare what is shared by every child. */
int isolate_init(struct isolation *iso, unsigned nslots, struct sp_err *err);
void isolate_free(struct isolation *iso);
/* Human (or JSON) report of the probe, for --probe; view: where commands
 * see their workspace (workspace_view of hello). */
void isolate_report(const struct isolation *iso, bool json, const char *view, const char *tpl_mode,
                    const char *tpl_why, const char *disk);
/* In the child, before execve: the documented order. 0, or -1 with
 * ic->failed_rung/failed_errno when a wanted rung failed and ic->required. */
int isolate_child(struct iso_child *ic);

/* uid.c */
int uid_probe(struct isolation *iso, unsigned nslots, char *why, size_t whycap);
int uid_check_path(const char *dir, char *why, size_t whycap);
int uid_own_dir(int dirfd, unsigned uid);
/* File operations done by the agent for a slot run with the slot's fsuid. */
void uid_fs_enter(unsigned uid);
void uid_fs_leave(void);
int uid_apply(unsigned uid);

/* namespaces.c: a box is one slot's set of namespaces (user when not root,
 * mount with a private /tmp and the workspace at /workspace, PID, IPC, and
 * network for network=false), held
 * by a holder process that forks every command of that slot into them as a
 * child of the agent (CLONE_PARENT), so the agent reaps them as usual. */
struct nsbox {
    pid_t pid;      /* holder, a child of the agent; 0 when none */
    pid_t init_pid; /* PID 1 of the box (agent's view), adopts leftovers */
    bool in_cgroup; /* the holder joined the slot's cgroup */
    int sock;
    int csock;   /* the command thread's (see namespaces.c), or -1 */
    int cold_ll; /* the ruleset the command thread enforces (its first), or -1 */
};
int ns_probe(struct isolation *iso, char *why, size_t whycap);
struct box_conf {
    const char *tmp_path; /* bound on /tmp, or NULL */
    const char *ws_path;  /* bound on /workspace, or NULL */
    const char *slot_dir; /* every sibling of it is hidden */
    bool network;         /* false: an empty network namespace too */
    unsigned uid;         /* the slot user (0: none), named in /etc/passwd */
    unsigned index;
    const char *home;
    const int *cg_fd; /* the slot's cgroup.procs: the holder joins it once, so
                         every command it forks starts inside (or NULL) */
    char *secret;     /* the agent's token: wiped from the holder's copy of memory */
    size_t secret_len;
    int ws_mnt_fd;             /* the workspace's mount namespace (overlay.c) to copy, or -1 */
    int ws_user_fd;            /* and its user namespace, joined first, or -1 */
    const char *hide[2];       /* directories shown empty in the box (templates, upper layers) */
    const char *const *shares; /* --share pairs: host path, box path (read-only binds) */
    unsigned nshares;
    bool cold; /* commands through a thread confined once (see namespaces.c) */
};
int ns_box_start(const struct isolation *iso, const struct box_conf *bc, struct nsbox *box,
                 struct sp_err *err);
/* Starting a command through the box's holder is asynchronous: send the
 * request (the spawn's fds travel with it and may be closed after), then
 * read the outcome when the socket is readable. Each of the box's two
 * channels (0: the holder's thread, 1: the command thread) answers its
 * requests in order. cold: the command thread may take it (the caller's
 * ruleset is the slot's own; only the one the thread enforces goes there). Returns the channel, or
 * -1: the holder is gone (the box is stopped). */
struct box_result {
    pid_t pid; /* the agent's child, or -1 */
    int child_errno, failed_rung, failed_errno;
    unsigned applied;
};
struct spawn;
int ns_box_send(struct nsbox *box, struct spawn *sp, bool cold);
int ns_box_recv(struct nsbox *box, int ch, struct box_result *r);
/* Kill the holder and with it every process in the box. */
void ns_box_stop(struct nsbox *box);

/* overlay.c: a workspace as an overlay of template layers (see there). Paths
 * are relative to base_dir, which keeps the mount options short. */
struct ovl_conf {
    const char *base_dir;
    const char *const *lowers; /* top layer first */
    unsigned nlowers;
    const char *upper, *work, *target;
    const char *stage;  /* where idmapped lowers are mounted (idmap_uid != 0) */
    unsigned idmap_uid; /* show files owned by 0 on disk as this uid and gid, or 0 */
};
struct ovl_ns {
    int ws_fd;   /* the overlay's root directory */
    int mnt_fd;  /* its mount namespace */
    int user_fd; /* its user namespace, or -1 */
};
int ovl_mount(const struct isolation *iso, const struct ovl_conf *c, struct ovl_ns *out,
              struct sp_err *err);
void ovl_ns_close(struct ovl_ns *ns);

/* cgroup.c */
int cgroup_probe(struct isolation *iso, char *why, size_t cap);
int cgroup_slot_init(const struct isolation *iso, unsigned index, int fds[2], struct sp_err *err);
int cgroup_join(const int fds[2]);
unsigned cgroup_slot_kill(const struct isolation *iso, unsigned index);
void cgroup_cleanup(struct isolation *iso, unsigned nslots);

/* rlimit.c */
int rlimit_parse(struct isolation *iso, const char *spec, struct sp_err *err);
void rlimit_defaults(struct isolation *iso);
int rlimit_apply(const struct rlimit *lim);

/* landlock.c */
int landlock_probe(void); /* ABI version, or -1 with errno */
/* A ruleset: read anywhere, write to ws/tmp and a few devices; TCP denied
 * when !network (ABI >= 4); signals and abstract sockets scoped (ABI >= 6). */
int landlock_ruleset(int abi, const char *ws, const char *tmp, bool network, const char *tty,
                     struct sp_err *err);
/* Also read anywhere beneath dir_fd: the root a box built for itself, which
 * paths in the box lead up to instead of the host's / (Landlock does not look
 * at the mount points it climbs over). Adding it again changes nothing. */
int landlock_allow_read(int ruleset_fd, int dir_fd);
/* A command's own domain beneath its box's (see namespaces.c): scoped
 * signals and abstract sockets (ABI 6), no tracing of other commands, and
 * the "refer" right beneath root_fd so the outer domain keeps deciding
 * links and renames. -1 on failure. */
int landlock_scope_ruleset(int abi, int root_fd);
int landlock_apply(int ruleset_fd);

/* seccomp.c */
/* extra: system calls the agent's configuration also denies. */
int seccomp_build(struct sock_fprog *prog, bool deny_network, char *const *extra, unsigned nextra,
                  struct sp_err *err);
int seccomp_check_name(const char *name, struct sp_err *err);
int seccomp_apply(const struct sock_fprog *prog);

#endif
