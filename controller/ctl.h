/* slot-controller: shared types. One context (struct ctl) owns the loop,
 * the profiles (each with its agents, slots and waiters), the trainer
 * connections and the statistics. Files, in the order a request travels:
 * main.c (options, loop) -> config.c (YAML, env, flags) -> api_conn.c
 * (trainer listeners and connections, TLS) -> api.c (op table) -> sched.c (leases, waiters,
 * scaling) -> agent.c (agent connections, requests to agents) -> backends/local.c (processes). */
#ifndef CTL_H
#define CTL_H

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>
#include <time.h>

#include "slotproto.h"

#define CTL_VERSION "0.1.0"
#define CTL_NAME_MAX 64
#define CTL_TRAJ_MAX 256
#define CTL_OWNER_MAX 128
#define CTL_STDERR_TAIL 4096
#define CTL_LAT_RING 4096
#define CTL_RATE_SECS 10
#define CTL_AGENT_BUCKETS 4096
#define CTL_MAX_BATCH 100000
#define CTL_BACKSTOP_S 5.0
#define CTL_FAILED_KEEP 4
#define CTL_TPL_MAX 128

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };
void ctl_log(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ctl_log_set_level(int lvl);
#define log_debug(...) ctl_log(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) ctl_log(LOG_INFO, __VA_ARGS__)
#define log_warn(...) ctl_log(LOG_WARN, __VA_ARGS__)
#define log_error(...) ctl_log(LOG_ERROR, __VA_ARGS__)
int ctl_log_parse_level(const char *s);

struct ctl;
struct agent;
struct profile;
struct tconn;
struct preq;
struct sp_tls;
struct sp_tls_ctx;
struct tls_state;

/* ---- statistics ---------------------------------------------------------- */

struct latency {
    uint32_t ring[CTL_LAT_RING]; /* microseconds */
    uint32_t n, next;
    uint64_t total, errors;
    uint64_t rate_sec[CTL_RATE_SECS]; /* completions per wall second */
    int64_t rate_at[CTL_RATE_SECS];
};
void lat_add(struct latency *l, double seconds, bool error, ev_tstamp now);
/* p in [0,1]; microseconds. */
uint32_t lat_pct(const struct latency *l, double p);
double lat_rate(const struct latency *l, ev_tstamp now);

/* ---- backends ------------------------------------------------------------ */

typedef void (*probe_done_fn)(struct ctl *c, struct agent *ag, int alive, const char *why);

struct backend {
    const char *name;
    /* Start the agent's process; on success the agent's stream is connected
     * (or being connected) and agent_stream_ready() follows. */
    int (*start_agent)(struct ctl *c, struct agent *ag, struct sp_err *err);
    /* Ask the agent to go away (it holds no lease). */
    void (*stop_agent)(struct ctl *c, struct agent *ag);
    /* Find agents that outlived a previous controller; called once at start. */
    int (*list_agents)(struct ctl *c, struct profile *p);
    /* (Re)connect the stream of an agent found by list_agents. */
    int (*attach)(struct ctl *c, struct agent *ag, struct sp_err *err);
    /* Optional: validate the profile's backend settings at load. */
    int (*check)(struct ctl *c, struct profile *p, struct sp_err *err);
    /* Do this profile's agents outlive the controller? */
    bool (*persistent)(const struct profile *p);
    /* Optional: the agent's stream ended; is the agent itself still there?
     * Calls done exactly once (perhaps before returning) with alive 1 (it
     * runs: reconnect with attach), 0 (gone: why says so, in a few words
     * the user can act on) or -1 (cannot tell: try attach anyway). The
     * agent may be freed only after done. */
    void (*probe)(struct ctl *c, struct agent *ag, probe_done_fn done);
};
extern const struct backend backend_local;
extern const struct backend backend_exec;
extern const struct backend backend_nomad;
extern const struct backend backend_modal;
extern const struct backend backend_slurm;
const struct backend *backend_find(const char *name);

/* ---- profiles ------------------------------------------------------------ */

enum local_mode { LOCAL_STDIO, LOCAL_SOCKET };

struct strlist {
    char **v;
    size_t n;
};
void strlist_add(struct strlist *l, const char *s);
void strlist_extend(struct strlist *l, const struct strlist *src);
void strlist_clear(struct strlist *l);

struct waiter {
    TAILQ_ENTRY(waiter) plink; /* in profile queue */
    TAILQ_ENTRY(waiter) clink; /* in its connection */
    struct profile *prof;
    struct tconn *conn;
    uint64_t client_id;
    char traj[CTL_TRAJ_MAX + 1];
    char owner[CTL_OWNER_MAX + 1]; /* the lease's owner: its connection's */
    bool bind;                     /* the lease ends when its owner goes */
    ev_timer timer;
    ev_tstamp since;
    double timeout_s;
    bool queued;
    /* acquire with a template: its name, and the recipe that builds it on
     * an agent that lacks it (script NULL: it must be there already) */
    char tpl[CTL_TPL_MAX + 1];
    char tpl_base[CTL_TPL_MAX + 1];
    char *tpl_script;
    struct slot *fork_from; /* fork: the lease this one copies */
};
TAILQ_HEAD(waiter_q, waiter);
TAILQ_HEAD(agent_q, agent);

struct profile {
    TAILQ_ENTRY(profile) link;
    char name[CTL_NAME_MAX];
    /* configuration */
    char backend[16];
    char *image;
    double cpu;
    uint64_t memory;
    char *gpu;
    uint32_t slots_per_agent, min_agents, max_agents;
    double max_starts_per_second;
    uint64_t idle_timeout_ms, max_lifetime_ms, acquire_timeout_ms, exec_timeout_ms;
    uint64_t lease_timeout_ms, lease_grace_ms, start_timeout_ms;
    uint64_t reconnect_timeout_ms; /* a lost stream is re-opened for this long; 0: never */
    uint64_t template_budget;      /* bytes of templates per agent; 0: no limit */
    uint64_t slot_disk;            /* --slot-disk of the agents; 0: the agent's default */
    uint64_t slot_inodes;          /* --slot-inodes of the agents; 0: the agent's default */
    struct strlist env;            /* KEY=VALUE */
    struct strlist secrets;        /* names of controller env vars */
    char isolation[16];
    char *workspace_base;
    enum local_mode local_mode;
    char *local_agent;
    struct strlist local_args;
    struct strlist exec_launch, exec_start, exec_stop, exec_list; /* argv templates */
    uint64_t exec_command_timeout_ms;
    struct {
        char *addr, *token, *cacert, *capath, *client_cert, *client_key, *tls_server_name;
        char *ns, *region, *job, *port_label, *skip_verify;
        struct strlist vars; /* NAME=VALUE for the job template's variables */
    } nomad;
    char *workdir; /* modal: the sandbox's working directory (slots live there) */
    struct {
        char *app, *block_network, *on_signal;
        struct strlist bridge; /* argv */
        uint64_t timeout_ms, idle_timeout_ms;
        struct strlist cidr_allowlist;
    } modal;
    struct {
        char *partition, *account, *qos, *constraint, *reservation, *workspace, *agent;
        struct strlist sbatch_args, srun_args, container, helper;
    } slurm;
    /* TLS to its agents (tls_ca.c): tls_mode "" (default: on where the
     * controller opens TCP, and for exec templates that use {tls_*}),
     * "on" or "off"; a site's own files for the agents (then nothing is
     * issued); whether exec templates name a {tls_*} placeholder; the
     * client context for links to its agents. */
    char tls_mode[8];
    char *tls_cert, *tls_key, *tls_ca;
    bool tls_used;
    struct sp_tls_ctx *tls_ctx;
    void *be_data; /* the backend's per-profile state */
    /* live state */
    const struct backend *be;
    struct agent_q agents;
    struct waiter_q waiters;
    uint32_t nwaiters;
    double start_tokens;
    ev_tstamp tokens_at, next_start_at;
    uint32_t start_failures;
    char last_error[512];
    /* the last agents that failed, for `agents` */
    struct {
        char why[512];
        double at_ms;
    } failed[CTL_FAILED_KEEP];
    uint32_t nfailed;
    struct latency lat;
    uint64_t acquires, no_capacity;
};
TAILQ_HEAD(profile_q, profile);

/* ---- agents -------------------------------------------------------------- */

/* RECONNECTING: its stream ended but the agent is believed alive; its
 * leases and requests wait for a new stream (agent.c). */
enum agent_state { AG_STARTING, AG_READY, AG_DRAINING, AG_STOPPING, AG_RECONNECTING };
const char *agent_state_name(enum agent_state s);

enum slot_state { SL_FREE, SL_LEASING, SL_LEASED, SL_RELEASING, SL_FOREIGN, SL_BUILDING };

/* What the controller knows of an agent's templates (template_list). */
struct ctl_tpl {
    char name[CTL_TPL_MAX + 1];
    char base[CTL_TPL_MAX + 1];
    uint64_t size, files, in_use, last_used_ms, build_ms, layers, created_ms;
};

struct preq;
TAILQ_HEAD(preq_q, preq);

struct slot {
    struct agent *ag;
    uint32_t index;
    enum slot_state state;
    char traj[CTL_TRAJ_MAX + 1];
    /* The trainer that took the lease (its connections' owner); a bound
     * lease is released with reset at grace_until (0: none running) once
     * no connection of its owner is left. */
    char owner[CTL_OWNER_MAX + 1];
    bool bound;
    ev_tstamp grace_until;
    char *workspace;
    char *cwd_path; /* where its commands see the workspace (the agent's slots) */
    uint64_t generation;
    uint64_t leased_at_ms;
    ev_tstamp last_used;
    uint32_t inflight;
    /* bash_stateful and tmux (stateful.c): the lease's sessions, and the
     * calls waiting for them, the head's request in flight */
    uint64_t sess_bash, sess_tmux, sess_gen;
    uint64_t tmux_off; /* tmux stream: the transcript offset read up to */
    struct preq_q sq;
};

struct preq_bucket {
    struct preq *head;
};

struct agent {
    TAILQ_ENTRY(agent) link; /* in profile */
    struct agent *hnext;     /* in ctl agent hash */
    struct ctl *ctl;
    struct profile *prof;
    char id[CTL_NAME_MAX + 16];
    enum agent_state state;
    bool reattached;
    pid_t pid;
    char address[256];
    char *data_dir;
    uint64_t instance;
    /* stream */
    int fd;
    ev_io rio, wio;
    struct sp_reader rd;
    struct sp_writer wr;
    bool connected;
    ev_timer timer; /* start deadline, connect retries, stop grace */
    /* process (local stdio, exec launch) */
    ev_child cw;
    int err_fd;
    ev_io eio;
    char errtail[CTL_STDERR_TAIL];
    size_t errlen;
    /* exec backend: a start or stop command running for this agent */
    pid_t helper_pid;
    int helper_fd;
    ev_child helper_cw;
    ev_io helper_io;
    ev_timer helper_timer;
    int helper_kind;
    bool data_ours; /* remove data_dir when the agent goes */
    void *be_data;  /* the backend's per-agent state */
    char token[65]; /* sent in hello when set */
    /* slots */
    uint32_t nslots;
    struct slot *slots;
    uint32_t leased, executing, nfree;
    /* requests */
    uint64_t next_id;
    struct preq_bucket pending[64];
    uint32_t npending;
    uint64_t requests;
    ev_tstamp started_at, idle_since;
    char error[512];
    char lost_why[160]; /* stream ended; waiting for the process's status */
    /* reconnects (agent.c): the state to go back to, why the last stream
     * ended, when this reconnect began and gives up, the next attempt */
    enum agent_state relink_prev;
    uint32_t reconnects, relink_attempts;
    char link_cause[200];
    ev_tstamp relink_since, relink_deadline, relink_delay, relink_attempt_at;
    double relink_last_ms; /* how long the last completed reconnect took */
    bool relink_probing;   /* the backend's probe has not answered yet */
    bool idem_ok;          /* its hello says it keeps idempotency keys */
    uint64_t stream_gen;   /* streams opened: a read loop notices a new one */
    ev_timer relink_timer;
    /* TLS (agent.c, tls_ca.c): the link's session while the controller
     * speaks TLS itself (nomad), its handshake deadline and where it goes;
     * the certificate issued to the agent and its renewal. */
    struct sp_tls *tls;
    bool tls_hs; /* handshake under way: the stream is not ready yet */
    ev_timer tls_timer;
    char tls_where[160];
    bool tls_issued, tls_files, tls_renewing;
    time_t tls_not_before, tls_not_after, tls_pending_nb;
    ev_tstamp tls_retry_at, tls_warned_at;
    double tls_retry_delay;
    /* templates (templates.c) */
    struct ctl_tpl *tpls;
    uint32_t ntpls;
    bool tpl_evicting;
    ev_tstamp tpl_retry_at; /* an eviction was refused (in use): look again then */
    uint64_t tpl_builds, tpl_evicted;
};

/* ---- requests to agents -------------------------------------------------- */

struct preq;
/* resp is the agent's whole response map, or NULL with err set (agent lost,
 * timeout). ev is set (and resp NULL) for stream events. */
typedef void (*preq_cb)(struct ctl *c, struct preq *r, const msgpack_object *resp,
                        const struct sp_err *err);

enum preq_shape { SHAPE_PASS, SHAPE_ARTIFACT };

struct batch {
    struct tconn *conn;
    uint64_t client_id;
    uint32_t n, remaining;
    msgpack_sbuffer *items;
};

struct preq {
    struct preq *hnext; /* in agent pending bucket */
    TAILQ_ENTRY(preq) clink;
    TAILQ_ENTRY(preq) slink; /* in its slot's queue (stateful.c) */
    struct preq *step_of;    /* stateful.c: the call a session_open is for */
    struct agent *ag;
    struct slot *slot;
    uint64_t aid;
    preq_cb cb;
    preq_cb on_event;
    /* client side (trainer requests) */
    struct tconn *conn;
    uint64_t client_id;
    struct batch *batch;
    uint32_t item;
    enum preq_shape shape;
    bool is_command; /* cancel it in the agent when its trainer goes */
    bool answered;   /* the trainer already got an answer (backstop fired) */
    /* For a resend on a new stream (agent.c): the op, its packed args, and
     * for a streamed exec the output bytes already passed on. */
    const char *op;
    char *args;
    size_t argsn;
    uint64_t out_off, err_off;
    size_t args_at;    /* where the args begin in the agent's writer */
    bool started_seen; /* a resumed stream repeats `started` */
    bool link_req;     /* hello of a new stream: goes out while the agent reconnects */
    ev_timer timer;
    ev_tstamp sent_at;
    void *ctx;
};

/* ---- trainer connections ------------------------------------------------- */

struct tconn {
    LIST_ENTRY(tconn) link;
    struct ctl *ctl;
    int fd;
    ev_io rio, wio;
    struct sp_reader rd;
    struct sp_writer wr;
    bool authed;
    bool closing;
    char owner[CTL_OWNER_MAX + 1]; /* from hello, else conn-INSTANCE-N */
    struct preq_q reqs;
    TAILQ_HEAD(, waiter) waiters;
};

struct listener {
    int fd;
    ev_io io;
    bool tcp;
    bool tls;   /* tls:HOST:PORT: TLS 1.3 with client certificates (api_conn.c) */
    char *path; /* unix: to unlink at exit */
    struct ctl *ctl;
};

/* ---- context ------------------------------------------------------------- */

struct ctl {
    struct ev_loop *loop;
    char name[128];
    char *state_dir;
    char *agent_bin;
    char *token;
    size_t token_len;
    bool insecure;
    char default_profile[CTL_NAME_MAX];
    struct strlist listen;
    /* tls: listeners (api_conn.c): our certificate and key, and the CA
     * that trainers' certificates must chain to; NULL: STATE/tls/api.pem,
     * api.key and trainer-ca.pem, which the controller issues */
    char *api_tls_cert, *api_tls_key, *api_tls_ca;
    struct sp_tls_ctx *api_tls;
    struct listener *listeners;
    size_t nlisteners;
    struct profile_q profiles;
    char agent_token[65]; /* {token} of exec templates; sent in hello */
    struct agent *agent_hash[CTL_AGENT_BUCKETS];
    LIST_HEAD(, tconn) conns;
    uint32_t nconns;
    uint64_t instance;
    uint64_t traj_seq, conn_seq;
    ev_tstamp started;
    ev_timer tick;
    ev_signal sig_term, sig_int;
    ev_child reaper;
    struct latency lat;
    uint64_t acquires, no_capacity;
    bool stopping;
    /* `stop` (agentctl stop, slot-controller --stop): agents of persistent
     * backends go too, and Nomad jobs are purged rather than only stopped
     * when purge is set. The connection that asked is answered at exit. */
    bool stop_all, purge;
    struct tconn *stop_conn;
    ev_timer stop_poll, stop_deadline;
    /* TLS (tls_ca.c): the site's client identity and CA when given
     * (top-level `tls:` of the file), the lifetime of issued certificates,
     * more names for the API's certificate, and the CA's state. */
    char *tls_cert, *tls_key, *tls_ca;
    uint64_t tls_lifetime_s;
    struct strlist tls_api_names;
    struct tls_state *tls;
};

/* config.c */
struct config_opts {
    const char *file;
    struct strlist profile_names; /* --profile */
    struct strlist sets;          /* --set PROFILE.FIELD=VALUE, --FIELD VALUE as *.FIELD=VALUE */
    char *log_level;
};
int config_load(struct ctl *c, struct config_opts *o, struct sp_err *err);
struct profile *profile_find(struct ctl *c, const char *name, size_t n);
/* Pack the profile's configuration as map pairs (count returned by
 * profile_field_count). */
uint32_t profile_pack_fields(const struct profile *p, msgpack_packer *pk, bool count_only);
const char *config_field_help(void);

/* agent.c */
struct agent *agent_new(struct ctl *c, struct profile *p, const char *id);
void agent_free(struct ctl *c, struct agent *ag);
struct agent *agent_find(struct ctl *c, const char *id, size_t n);
/* The stream fd is connected: start reading, say hello, learn slots. */
void agent_stream_ready(struct ctl *c, struct agent *ag, int fd);
/* Close the agent's stream (its TLS session too); no request fails. */
void agent_close_link(struct ctl *c, struct agent *ag);
/* A TCP connection to the agent is up: a TLS handshake first (in the loop,
 * bounded), checking the agent's certificate against the profile's CA and
 * its id; then agent_stream_ready. where ("tcp:HOST:PORT") names it in
 * errors. A failed handshake is a failed start, or a failed reconnect
 * attempt. */
void agent_stream_ready_tls(struct ctl *c, struct agent *ag, int fd, const char *where);
/* The stream ended: reconnect when the backend can and the agent lives,
 * else it is gone: fail its requests with agent_lost, drop its leases. */
void agent_lost(struct ctl *c, struct agent *ag, const char *why);
/* A backend's attach during a reconnect failed after it returned 0 (e.g. a
 * TCP connect that timed out): try again later, within the timeout. */
void agent_relink_failed(struct ctl *c, struct agent *ag, const char *why);
/* Can requests be sent to it? A reconnecting agent queues them. */
static inline bool agent_reachable(const struct agent *ag)
{
    return ag->state != AG_STOPPING && (ag->connected || ag->state == AG_RECONNECTING);
}
/* End the agent's stream as a network failure would (op `reconnect`). */
int agent_drop_stream(struct ctl *c, struct agent *ag, struct sp_err *err);
void agent_stop(struct ctl *c, struct agent *ag, const char *why);
/* Begin a request to the agent: returns the packer for the args map (the
 * caller packs exactly one map), then agent_send_end. */
struct preq *agent_req_new(struct agent *ag, struct slot *s, preq_cb cb);
void agent_send_begin(struct agent *ag, struct preq *r, const char *op, msgpack_packer *pk);
void agent_send_end(struct ctl *c, struct agent *ag, struct preq *r);
void preq_free(struct ctl *c, struct preq *r);
void agent_stderr_append(struct agent *ag, const char *p, size_t n);
/* Last non-empty lines of the agent's stderr, joined by "; ". */
void agent_stderr_tail(const struct agent *ag, char *out, size_t cap, int lines);

/* sched.c */
void sched_kick(struct ctl *c, struct profile *p);
void sched_tick(struct ctl *c);
void sched_acquire(struct ctl *c, struct tconn *t, uint64_t id, struct profile *p, const char *traj,
                   size_t trajn, uint64_t timeout_ms, bool bind);
/* Owners (sched.c): a lease belongs to the owner of the connection that
 * took it. The last connection of an owner went: its bound leases get
 * their grace deadline. A connection of the owner came (back): the
 * deadlines are cancelled. */
void sched_owner_gone(struct ctl *c, const char *owner);
void sched_owner_back(struct ctl *c, const char *owner);
bool sched_owner_connected(struct ctl *c, const char *owner);
/* A lease found in an agent after a restart (agent.c): its owner, and its
 * grace deadline when the owner has no connection. */
void sched_lease_adopted(struct ctl *c, struct slot *s, const char *owner, size_t ownern,
                         bool bound);
void sched_agent_ready(struct ctl *c, struct agent *ag);
void sched_slot_lost(struct ctl *c, struct slot *s);
void sched_release(struct ctl *c, struct slot *s, bool reset);
void sched_cancel_slot(struct ctl *c, struct slot *s);
void sched_waiter_drop(struct ctl *c, struct waiter *w);
/* Resolve a handle: 0 with *out, or -1 with err (not_leased / bad_request). */
int sched_resolve(struct ctl *c, const char *h, size_t n, struct slot **out, struct sp_err *err);
int slot_handle(const struct slot *s, char *out, size_t cap);
void slot_set(struct slot *s, enum slot_state st);
void sched_start_agent(struct ctl *c, struct profile *p);
void sched_agent_failed(struct ctl *c, struct profile *p, const char *why);

/* sched.c: acquire with a template (w carries it), fork of a lease */
void sched_acquire_w(struct ctl *c, struct waiter *w, uint64_t timeout_ms);
struct waiter *sched_waiter_new(struct ctl *c, struct tconn *t, uint64_t id, struct profile *p,
                                const char *traj, size_t trajn, bool bind);
void sched_fork(struct ctl *c, struct tconn *t, uint64_t id, struct slot *from, const char *traj,
                size_t trajn);

/* templates.c: each agent's templates as the controller knows them */
bool tpl_has(const struct agent *ag, const char *name);
/* Learn them again (template_list); evicts past the profile's budget. */
void tpl_refresh(struct ctl *c, struct agent *ag);
void tpl_forget(struct agent *ag);
/* sched_tick: retry an eviction the agent refused. */
void tpl_tick(struct ctl *c, struct agent *ag, ev_tstamp now);
/* Pack {agents: [{agent, profile, templates: [...]}]} (agentctl templates). */
void tpl_pack_all(struct ctl *c, msgpack_packer *pk, const struct profile *only);

/* api_conn.c */
int api_listen(struct ctl *c, struct sp_err *err);
void api_close_all(struct ctl *c);
/* api.c */
/* The trainer's answer for r (once: later ones are dropped). */
void api_answer(struct ctl *c, struct preq *r, const msgpack_object *resp,
                const struct sp_err *err);
/* The agent's answer to a tool call: counted, answered, r freed. */
void api_tool_answer(struct ctl *c, struct preq *r, const msgpack_object *resp,
                     const struct sp_err *err);

/* child.c: agent processes the controller forks */
typedef void (*child_run_fn)(struct ctl *c, struct agent *ag, char **argv);
/* In a child: no blocked signals, SIGPIPE back to its default. */
void child_reset_signals(void);
void child_status_text(int st, char *out, size_t cap);
/* Fork a process (its own process group) with stdin/stdout on a socketpair
 * and stderr read into ag's tail; `run` execs argv in it. ag->pid is set,
 * on_exit watches it, *fd is the controller's end of the stream. */
int child_spawn_stream(struct ctl *c, struct agent *ag, char **argv, child_run_fn run,
                       void (*on_exit)(struct ev_loop *, ev_child *, int), int *fd,
                       struct sp_err *err);
/* From ag's exit callback: stop watching, drain stderr, why = "WHAT exited
 * with status N" (or killed by signal N). */
void child_reaped(struct ctl *c, struct agent *ag, ev_child *w, const char *what, char *why,
                  size_t cap);
/* Free ag from the loop's next turn (its data_dir removed when data_ours). */
void agent_free_soon(struct ctl *c, struct agent *ag);

/* stateful.c: bash_stateful and tmux on the agent's sessions */
bool stateful_tool(const char *name, size_t n);
/* A lease rebuilt after a restart: take back its tagged sessions (the
 * `sessions` array of the agent's `slots` answer). */
void stateful_adopt(struct slot *s, const msgpack_object *sessions);
int stateful_start(struct ctl *c, struct tconn *t, uint64_t client_id, struct batch *b,
                   uint32_t item, struct slot *s, const char *tool, size_t tool_len,
                   const msgpack_object *args, uint64_t timeout_ms, struct sp_err *err);

/* main.c: stop serving; every agent goes when everything is set, else only
 * those whose backend does not outlive the controller. */
void ctl_shutdown(struct ctl *c, bool everything);
/* NAME beside slot-controller, else on PATH; NULL when neither (malloc'd). */
char *ctl_find_program(const char *name);
void tconn_flush(struct ctl *c, struct tconn *t);
msgpack_packer *tconn_begin(struct tconn *t, msgpack_packer *pk);
void tconn_end(struct ctl *c, struct tconn *t);
void tconn_error(struct ctl *c, struct tconn *t, uint64_t id, const struct sp_err *e);

/* backends/nomad.c: host and port of a port label in an allocation's JSON
 * (json_t *), for the new (Shared.Ports) and older (Networks) layouts. */
struct json_t;
int nomad_alloc_port(struct json_t *alloc, const char *label, char *host, size_t hcap, int *port);

/* util */
double now_wall_ms(void);
uint64_t random_u64(void);
int mkdir_p(const char *path, mode_t mode);
void remove_tree_async(struct ctl *c, const char *path);
/* The same, here and now: small trees only (the loop waits). */
void remove_tree_now(const char *path);

#endif
