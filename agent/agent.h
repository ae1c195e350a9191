/* slot-agent internals shared between modules: the one per-process context,
 * slots, connections, requests, the op table's handler contract, and the
 * helpers handlers use to read validated arguments and pack replies. */
#ifndef SLOT_AGENT_H
#define SLOT_AGENT_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "isolate/isolate.h"
#include "slotproto.h"
#include "warm.h"

#define AGENT_VERSION "0.1.0"

struct conn;
struct exec;
struct req;
struct session;
struct template;
struct upload;
struct build;
struct ws_job;
struct idem;
struct idem_entry;
struct sp_tls_ctx;
struct sp_tls;

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };
void agent_log(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void agent_log_set_level(int lvl);
#define log_debug(...) agent_log(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) agent_log(LOG_INFO, __VA_ARGS__)
#define log_warn(...) agent_log(LOG_WARN, __VA_ARGS__)
#define log_error(...) agent_log(LOG_ERROR, __VA_ARGS__)

/* Latency histogram: log-linear buckets over microseconds, enough for p50/p99
 * without keeping samples. */
#define HIST_BUCKETS 1024
struct hist {
    uint64_t count;
    uint64_t sum_us;
    uint32_t bucket[HIST_BUCKETS];
};
void hist_add(struct hist *h, uint64_t us);
uint64_t hist_quantile(const struct hist *h, double q);

struct op_stats {
    uint64_t calls;
    uint64_t errors;
    struct hist lat;
};

/* A slot's disk use as the last scan saw it (quota.c). */
struct slot_disk {
    uint64_t used, inodes;
    uint64_t prev_used, prev_inodes;  /* the scan before */
    uint64_t stops;                   /* times its processes were stopped */
    double scanned_at;                /* ev_now; 0: never */
    uint64_t epoch;                   /* bumped when the workspace is replaced */
    uint64_t cmds, cmds_counted;      /* commands started; as of the last count */
    uint64_t noted, noted_inodes;     /* written by write_file, ever (see apply) */
    bool dirty;                       /* changed since: scan it */
    bool fs;                          /* a filesystem of its own (slotfs.c) */
    uint64_t base_bytes, base_inodes; /* what its empty filesystem uses */
    bool over, deep, capped;
};

struct slot {
    unsigned index;
    int ws_fd;  /* workspace directory, O_RDONLY|O_DIRECTORY */
    int tmp_fd; /* private tmp directory */
    char *ws_path;
    char *tmp_path;
    /* Requests bound to this slot run one at a time in arrival order. */
    struct req *q_head, *q_tail;
    unsigned q_len;
    struct req *active;
    unsigned running; /* live commands (foreground and detached) */
    bool resetting;
    bool advancing;
    struct req *reset_waiters; /* reset requests waiting for processes to die */
    bool leased;
    char *trajectory_id;
    char *holder;
    char *owner;      /* the controller's trainer owner, kept for its restart */
    bool owner_bound; /* the lease ends when its owner goes (controller's choice) */
    double leased_at; /* ev_now */
    uint64_t generation;
    uint64_t execs;
    uint64_t resets;
    int ll_fd[2];              /* Landlock rulesets [network allowed, denied], built on first use */
    unsigned uid;              /* the slot's user, when the uid rung is on */
    struct nsbox box[2];       /* namespaces [network allowed, denied], started on first use */
    bool box_failed;           /* the last box start failed: commands run at the host path */
    ev_io box_w[2];            /* their holders' answers */
    ev_io cbox_w[2];           /* their command threads' (see namespaces.c) */
    struct warm_shell warm[2]; /* warm shells [network allowed, denied] (warm.c) */
    int cg_fd[2];              /* cgroup.procs of the slot's cgroup(s) (cgroup rung) */
    pid_t *kept;               /* keep_background leftovers */
    unsigned nkept, kept_cap;
    struct session *sessions; /* persistent shells (session.c) */
    unsigned nsessions;
    /* Templates (template.c): what the workspace stands on and how. */
    struct template *tpl;
    int ws_mode;          /* enum ws_mode */
    struct ovl_ns ws_ns;  /* overlay mode: ws_fd is ws_ns.ws_fd */
    char *ws_gen;         /* overlay mode: this mount's upper/work under overlay/N */
    double ws_prepare_ms; /* how long the last workspace change took */
    struct req *prep_rq;  /* the reset whose workspace a worker is copying */
    bool in_reset;        /* reset_next is serving this slot's waiters */
    struct slot_disk disk;
};

struct agent_opts {
    unsigned nslots;
    const char *data_dir;
    const char *token_file;
    uint32_t max_frame;
    uint64_t max_output;
    bool insecure;
    bool stdio;
    int log_level;
    bool isolation_required; /* default for requests that do not say */
    unsigned max_sessions;   /* per slot */
    uint64_t session_buffer; /* unread output kept per session */
    unsigned template_max_depth;
    bool template_copy; /* never overlay (--template-mode copy) */
    char *shares[32];   /* --share: pairs of host path, box path (read-only binds) */
    unsigned nshares;
    uint64_t slot_disk, slot_inodes, disk_reserve; /* quota.c; see *_set */
    bool slot_disk_set, slot_inodes_set, disk_reserve_set;
    unsigned disk_interval_ms;
    int disk_mode; /* 0 auto, 1 fs, 2 watch (--disk-mode) */
    /* idempotency keys (idem.c); 0: the defaults. Hidden, for tests. */
    unsigned idem_max_keys;
    uint64_t idem_max_bytes;
    double idem_window;
    /* TLS (conn.c): our certificate, key and the CA clients must chain to;
     * --tls-name is what --attach tls: expects the agent's certificate to
     * name. */
    const char *tls_cert, *tls_key, *tls_ca, *tls_name;
    double tls_handshake_timeout; /* seconds; hidden option for tests */
};

/* The disk watcher (quota.c). */
struct quota_state {
    uint64_t budget, ibudget, reserve; /* 0: none */
    const char *mechanism;             /* "fs", "watch" or "none" */
    bool fs;                           /* slots have filesystems of their own */
    pid_t guardian;                    /* unmounts them if the agent is killed */
    char why[400];                     /* what was not available */
    ev_timer tick;
    ev_io io;
    pid_t pid; /* the scanning worker, or 0 */
    int fd;
    unsigned char *buf;
    size_t len, cap;
    double started, next_at;
    bool guard, guard_hard; /* the data filesystem is under its reserve (its half) */
    uint64_t scans, stops, last_ms;
};

/* The one per-process context. */
struct agent {
    struct ev_loop *loop;
    struct agent_opts opt;
    char *data_dir;
    struct slot *slots;
    unsigned nslots;
    char token[512];
    size_t token_len; /* 0: no auth required */
    /* --pass-env: the agent's own variables that commands also get
     * ("K=V", read once at start; never HOME, PWD, TMPDIR or SLOT_*). */
    char **pass_env;
    unsigned npass_env;
    const char *shell; /* /bin/bash, else /bin/sh */
    struct conn *conns;
    unsigned nconns;
    struct listener *listeners;
    struct exec *finished; /* retained results, newest first */
    struct exec *finished_tail;
    unsigned nfinished;
    uint64_t next_exec_id;
    uint64_t next_session_id;
    uint64_t instance; /* random per start, lets clients spot a restart */
    pid_t pid;
    double started;
    bool stopping;
    /* counters for `stats` */
    uint64_t requests, errors, conns_total, conns_dropped;
    uint64_t execs_started, execs_finished, execs_timed_out, execs_cancelled;
    struct hist exec_lat;
    struct op_stats *op_stats; /* one per op table entry */
    ev_child child_w;
    ev_signal sig_term, sig_int;
    ev_timer sweep_w;
    ev_timer stop_w;
    double stop_at;
    struct sp_writer null_writer; /* sink for answers to vanished connections */
    int devnull_fd;
    char *child_stack;
    struct exec *running;    /* commands still running */
    uint64_t retained_bytes; /* output kept by finished execs */
    struct isolation iso;
    unsigned spawning; /* commands sent to box holders, pid not yet known */
    struct {
        pid_t pid;
        int status;
    } early[64]; /* exits reaped while spawns were pending */
    unsigned nearly;
    /* templates (template.c, op_template.c) */
    struct template *templates;
    bool tpl_overlay;  /* slots' workspaces can be overlays */
    char tpl_why[200]; /* why not */
    uint64_t tpl_seq;  /* names of staging dirs and mounts */
    struct upload *uploads;
    struct build *builds;
    struct ws_job *jobs; /* copies running in worker processes */
    struct quota_state quota;
    struct idem *idem; /* idempotency keys (idem.c) */
    /* TLS listeners (conn.c): one context for all of them, reloaded when
     * its files change; counters for `stats`. */
    struct sp_tls_ctx *tls;
    bool tls_listen;
    uint64_t tls_handshakes, tls_failures;
    unsigned nhandshaking; /* connections still in their handshake */
    double tls_log_window; /* rate limit of handshake-failure lines */
    unsigned tls_log_lines;
    uint64_t tls_log_suppressed;
    ev_signal sig_hup;
    struct warm_state warm; /* the warm exec path (warm.c) */
};

/* ---- requests and the op table ---------------------------------------- */

enum arg_type {
    ARG_UINT,
    ARG_INT,
    ARG_BOOL,
    ARG_STR,
    ARG_BIN,
    ARG_MAP,
    ARG_ARRAY,
    ARG_STR_UINT, /* either (a signal by name or number) */
};

struct arg_spec {
    const char *key;
    enum arg_type type;
    bool required;
    uint64_t max; /* uint: max value; str/bin: max length; 0 = no limit */
};

enum {
    OP_DONE = 0,    /* handler replied (req_reply_*) */
    OP_PENDING = 1, /* handler will finish the request later */
};

typedef int (*op_fn)(struct req *rq, struct sp_err *err);

enum op_flags {
    OPF_SLOT = 1 << 0,   /* takes `slot`, queued on that slot */
    OPF_NOAUTH = 1 << 1, /* allowed before a successful hello */
    OPF_NOW = 1 << 2,    /* with OPF_SLOT: validated but not queued (reset) */
    OPF_FSUSER = 1 << 3, /* file operation: runs with the slot user's fsuid */
    OPF_IDEM = 1 << 4,   /* changes state: a repeat of its `key` must not run it again */
};

struct op_def {
    const char *name;
    op_fn fn;
    unsigned flags;
    const struct arg_spec *args; /* terminated by {NULL} */
};

struct req {
    struct agent *ag;
    struct conn *conn; /* NULL once the connection is gone */
    const struct op_def *op;
    unsigned op_index;
    uint64_t id;
    int slot; /* -1 when the op is not bound to a slot */
    char *frame;
    msgpack_unpacked msg;
    const msgpack_object *args; /* map, or NULL */
    double t0;
    struct req *slot_next;
    struct req *conn_prev, *conn_next;
    struct exec *exec; /* exec / exec_attach waiting on a command */
    struct req *exec_next;
    bool replied;
    uint64_t aux;           /* op-private scratch (reset: processes killed) */
    struct template *tpl;   /* a template this request holds a reference to */
    struct slot *fork_from; /* fork: the source slot, while its copy waits */
    bool flattened;         /* fork: its layers were flattened */
    bool stream;            /* sends stdout/stderr events */
    uint64_t out_off;       /* next stdout offset this request has seen */
    uint64_t err_off;
    struct idem_entry *idem; /* the key it runs under (it is that key's first request) */
    struct req *idem_next;   /* a repeat waiting for the first request of its key */
    uint64_t resume_out;     /* envelope `resume`: output the client already has */
    uint64_t resume_err;
    msgpack_packer pk;
};

/* Arguments, already type-checked against the op's arg_spec. */
const msgpack_object *req_arg(const struct req *rq, const char *key);
uint64_t arg_uint(const struct req *rq, const char *key, uint64_t def);
int64_t arg_int(const struct req *rq, const char *key, int64_t def);
bool arg_bool(const struct req *rq, const char *key, bool def);
/* NULL when absent; *n set to the length. Strings are not NUL-terminated. */
const char *arg_str(const struct req *rq, const char *key, size_t *n);
const char *arg_bin(const struct req *rq, const char *key, size_t *n);
struct slot *req_slot(const struct req *rq);

/* Reply: req_reply_begin packs the success envelope head and returns a
 * packer; the handler packs exactly one value (the result map) and calls
 * req_reply_end. Safe when the connection is gone (output is discarded). */
msgpack_packer *req_reply_begin(struct req *rq);
void req_reply_end(struct req *rq);
/* Like req_reply_begin, but the caller packs the whole answer map itself
 * (idem.c replays a kept answer); end it with req_reply_end. */
msgpack_packer *req_frame_begin(struct req *rq);
/* Stream event {"id","event":name, ...nfields pairs the caller packs}. */
msgpack_packer *req_event_begin(struct req *rq, const char *event, uint32_t nfields);
void req_event_end(struct req *rq);
/* Finish a pending request: with err == NULL the handler has replied;
 * otherwise an error response is sent. Frees rq and advances its slot. */
void req_finish(struct req *rq, const struct sp_err *err);

/* ---- handlers --------------------------------------------------------- */

int op_hello(struct req *rq, struct sp_err *err);
int op_health(struct req *rq, struct sp_err *err);
int op_stats(struct req *rq, struct sp_err *err);
int op_slots(struct req *rq, struct sp_err *err);
int op_lease(struct req *rq, struct sp_err *err);
int op_unlease(struct req *rq, struct sp_err *err);
int op_reset(struct req *rq, struct sp_err *err);
int op_exec(struct req *rq, struct sp_err *err);
int op_exec_attach(struct req *rq, struct sp_err *err);
int op_cancel(struct req *rq, struct sp_err *err);
int op_read_file(struct req *rq, struct sp_err *err);
int op_write_file(struct req *rq, struct sp_err *err);
int op_stat(struct req *rq, struct sp_err *err);
int op_list(struct req *rq, struct sp_err *err);
int op_archive(struct req *rq, struct sp_err *err);
int op_session_open(struct req *rq, struct sp_err *err);
int op_session_exec(struct req *rq, struct sp_err *err);
int op_session_write(struct req *rq, struct sp_err *err);
int op_session_read(struct req *rq, struct sp_err *err);
int op_session_resize(struct req *rq, struct sp_err *err);
int op_session_screen(struct req *rq, struct sp_err *err);
int op_session_signal(struct req *rq, struct sp_err *err);
int op_session_close(struct req *rq, struct sp_err *err);
int op_template_put(struct req *rq, struct sp_err *err);
int op_template_from_slot(struct req *rq, struct sp_err *err);
int op_template_list(struct req *rq, struct sp_err *err);
int op_template_delete(struct req *rq, struct sp_err *err);
int op_fork(struct req *rq, struct sp_err *err);
int op_template_build(struct req *rq, struct sp_err *err);
int op_tls_renew(struct req *rq, struct sp_err *err);
/* op_template.c: the script of a template_build request has ended. */
void template_build_done(struct agent *ag, struct req *rq, struct exec *e);
/* op_template.c: the script of a template_build request never started. */
void template_build_failed(struct agent *ag, struct req *rq, const struct sp_err *err);
/* op_template.c: drop uploads idle for too long (sweep), and all (exit). */
void uploads_sweep(struct agent *ag, bool all);
void builds_free(struct agent *ag);

extern const struct op_def op_table[];
extern const unsigned op_count;

/* ---- paths (path.c): confinement beneath a slot's workspace ------------ */

/* Reject NUL bytes (bad_request), absolute paths (path_escape), and empty
 * paths where a name is needed. Copies into out (NUL-terminated). "" and "."
 * name the root itself when allow_root. */
int path_check(const char *path, size_t len, bool allow_root, char *out, size_t outcap,
               struct sp_err *err);
/* Does the last component of path say "." or ".."? Such paths name
 * directories with no parent+name form: they are opened, not lstat'ed. */
bool path_ends_in_dots(const char *path);
/* Does a checked path name the workspace itself ("", ".", "./.")? */
bool path_is_root(const char *path);
/* open(2) of a checked path beneath root_fd; nothing resolves outside it
 * (openat2 RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS, or a component walk that
 * refuses every symlink on kernels without openat2). Returns fd or -1. */
int path_open(int root_fd, const char *path, int flags, mode_t mode, struct sp_err *err);
/* Use only the component walk (tests of the pre-openat2 fallback). */
void path_force_fallback(bool on);
/* Open the directory that will hold path's last component, creating missing
 * directories (0755) when mkdirs; copies that component into base. */
int path_open_parent(int root_fd, const char *path, bool mkdirs, char *base, size_t basecap,
                     struct sp_err *err);
/* Remove everything inside dirfd, never following symlinks, fixing
 * permissions a command may have removed. */
int path_empty_dir(int dirfd, struct sp_err *err);

/* ---- processes (exec.c, child.c) -------------------------------------- */

/* op_slots.c: a reset waiting for the slot's processes to die completes. */
void reset_complete(struct agent *ag, struct slot *s);
/* op_slots.c: the worker laying out s's workspace for its reset is done. */
void reset_prepared(struct agent *ag, struct slot *s, int rc, const struct sp_err *err);
/* op_slots.c: rq (reset, lease or fork) replaces s's workspace: kill what
 * runs, fail what is queued, answer from reset_complete. OP_PENDING. */
int slot_begin_reset(struct req *rq, struct slot *s, const char *why);

/* Kill every process of the slot (all its commands and their leftovers);
 * returns how many were signalled. */
unsigned exec_kill_slot(struct agent *ag, struct slot *s);
/* Kill all commands (shutdown). */
void exec_kill_all(struct agent *ag);
void exec_on_child_exit(struct agent *ag, pid_t pid, int status);
void exec_conn_gone(struct agent *ag, struct conn *c);
/* A box holder (namespaces.c) of some slot exited: forget it. */
bool slots_box_exited(struct agent *ag, pid_t pid);
bool slots_is_box_holder(struct agent *ag, pid_t pid);
/* Kill every process of the slot's boxes; the next command starts new ones. */
void slots_box_stop(struct agent *ag, struct slot *s);
/* One box whose holder stopped taking requests (ns_box_send gave it up). */
void slots_box_lost(struct agent *ag, struct slot *s, const struct nsbox *box);
/* Watch a freshly started box's holder for its answers. */
void slots_box_watch(struct agent *ag, struct slot *s, int k);
/* exec.c: the holder of box k of s has answered (or is gone). */
void exec_box_readable(struct agent *ag, struct slot *s, int k, int ch);
/* exec.c: fail every command still waiting for that holder. */
void exec_box_gone(struct agent *ag, struct nsbox *box);
/* Kill the leftovers adopted by the slot's boxes (their PID 1's children). */
unsigned slots_box_sweep(struct agent *ag, struct slot *s);
/* Kill processes re-parented to the agent that belong to no live command. */
unsigned proc_sweep_strays(struct agent *ag);
/* SIGKILL pid and all its descendants (walks /proc children lists). */
unsigned proc_kill_tree(pid_t pid);
/* SIGKILL the descendants of pid (a box's PID 1: one thread), not pid
 * itself, sparing kept ones. */
unsigned proc_kill_children(struct agent *ag, pid_t pid);
/* pid's children (malloc'd array in *out). */
size_t proc_children(pid_t pid, pid_t **out);
/* keep_background: leftovers of a command that may outlive it, until the
 * slot is reset. */
bool slots_is_kept(struct agent *ag, pid_t pid);
void slots_keep_leftovers(struct agent *ag, struct slot *s);
void slots_forget_kept(struct agent *ag, pid_t pid);
unsigned slots_kill_kept(struct slot *s);
bool exec_is_main_pid(struct agent *ag, pid_t pid);
void exec_gc(struct agent *ag);
/* At exit: free every command record and the requests waiting on them. */
void exec_free_all(struct agent *ag);

/* ---- slots (slots.c) -------------------------------------------------- */

int slots_init(struct agent *ag, struct sp_err *err);
void slots_free(struct agent *ag);
/* Where commands of s see their workspace (and start): BOX_WORKSPACE when
 * its box shows it there, else the host path. */
const char *slot_view(const struct agent *ag, const struct slot *s);
/* The same for every slot, for hello and --probe: BOX_WORKSPACE, or the
 * host path with "{slot}" for the index. */
void slots_view_template(const struct agent *ag, char *out, size_t cap);
/* Queue rq on its slot and start it when the slot is idle. */
void slot_submit(struct agent *ag, struct req *rq);
/* The active request of s is finished: start the next. */
void slot_advance(struct agent *ag, struct slot *s);
/* Fail every queued (not active) request of s with err. */
void slot_fail_queued(struct agent *ag, struct slot *s, const struct sp_err *err);
void slot_drop_conn(struct agent *ag, struct conn *c);
/* The lease's bookkeeping goes (trajectory, holder, owner); its sessions
 * and workspace are the caller's business. */
void slot_unlease(struct slot *s);

/* dispatch.c */
void dispatch_frame(struct agent *ag, struct conn *c, const char *data, uint32_t len);
void req_run(struct req *rq);
/* Queue rq on its slot, or run it now when its op takes none (or is
 * OPF_NOW): what dispatch does with a request it has accepted. */
void req_start(struct req *rq);
void req_free(struct req *rq);
int op_index(const char *name);
double agent_now(struct agent *ag);
/* Monotonic seconds, not the loop's cached time: for latencies. */
double agent_now_precise(struct agent *ag);

/* conn.c */
bool conn_authed(const struct conn *c);
bool conn_peer_reading(const struct conn *c);
void conn_set_authed(struct conn *c, bool ok);
struct sp_writer *conn_writer(struct conn *c);
void conn_frame_done(struct conn *c);
void conn_req_add(struct conn *c, struct req *rq);
void conn_req_del(struct conn *c, struct req *rq);
int listeners_open(struct agent *ag, const char *const *specs, unsigned n, struct sp_err *err);
void listeners_close(struct agent *ag);
int conn_open_stdio(struct agent *ag, struct sp_err *err);
void conns_close_all(struct agent *ag);
bool conns_idle(struct agent *ag);
/* The connection's TLS link, NULL when plaintext. */
const struct sp_tls *conn_tls(const struct conn *c);
/* Re-read the TLS files if they changed (SIGHUP, every accept). */
void conn_tls_reload(struct agent *ag, bool force);
/* Log the summary of handshake failures held back by the rate limit. */
void conn_tls_log_flush(struct agent *ag);

/* main.c: begin an orderly shutdown (stop accepting, kill commands, answer
 * what is pending, exit 0). */
void agent_shutdown(struct agent *ag, const char *why);

/* attach.c: relay stdin/stdout to the agent at ADDR; the exit status. */
int attach_main(const char *addr, double timeout_s, const struct agent_opts *opt);

#endif
