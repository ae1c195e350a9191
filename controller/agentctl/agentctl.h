/* Shared by agentctl.c (the CLI, the agent and slot commands), conn.c (the
 * connection and the blocking client), ctl_controller.c (the controller's
 * pool commands and `top`) and attach.c. */
#ifndef AGENTCTL_H
#define AGENTCTL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "slotproto.h"
#include "tls.h"

enum cmd_kind {
    CMD_HELLO,
    CMD_HEALTH,
    CMD_STATS,
    CMD_SLOTS,
    CMD_EXEC,
    CMD_CAT,
    CMD_PUT,
    CMD_LS,
    CMD_STAT,
    CMD_ARCHIVE,
    CMD_RESET,
    CMD_LEASE,
    CMD_UNLEASE,
    CMD_CANCEL,
    /* controller only */
    CMD_STATUS,
    CMD_AGENTS,
    CMD_LEASES,
    CMD_TEMPLATES,
    CMD_PROFILES,
    CMD_ACQUIRE,
    CMD_RELEASE,
    CMD_DRAIN,
    CMD_RECONNECT,
    CMD_TOP,
    CMD_STOP,
    CMD_ATTACH,
};

/* What the command line asked for, fully validated before connecting. */
struct cmd {
    enum cmd_kind kind;
    const char *name;
    uint64_t slot;      /* agent: slot index */
    const char *handle; /* controller: slot handle AGENT/INDEX/GENERATION */
    uint64_t exec_id;
    const char *path;
    const char *trajectory;
    const char *format;
    bool recursive;
    /* exec */
    uint64_t timeout_ms;
    const char *cwd;
    const char *stdin_file;
    const char **env; /* K=V strings, nenv of them */
    int nenv;
    char **words;
    int nwords;
    /* controller commands */
    const char *profile;
    const char *agent_id;
    bool have_timeout; /* acquire --timeout-ms given (0 is meaningful) */
    bool no_reset;
    bool purge;
    double interval;
    bool once;
};

struct ctl_err {
    char code[32]; /* contract code, or "" for a local failure without one */
    char msg[1024];
};

/* The one context: options, connection and the last error. */
struct ctl {
    const char *agent;
    const char *agent_cmd;
    const char *controller;
    bool to_controller;
    const char *peer; /* "agent" or "controller", for messages */
    char default_profile[128];
    const char *token_file;
    bool json;
    double timeout_s;
    double wait_s; /* keep retrying the connection this long (agent starting) */
    /* tls: addresses: our certificate and key, the CA the peer must chain
     * to, and the name its certificate must carry (NULL: any the CA signed) */
    const char *tls_cert, *tls_key, *tls_ca, *tls_name;
    struct sp_tls_ctx *tls_ctx;
    struct sp_tls *tls; /* NULL on unix:, tcp: and --agent-cmd */

    int rfd, wfd;
    pid_t child;
    int sigfd; /* signalfd while an exec is waited for, else -1 */
    int signo; /* signal that interrupted the last wait */
    bool interrupted;
    bool eof;
    struct sp_reader rd;
    struct sp_writer wr;
    uint64_t next_id;
    uint64_t max_frame;
    uint64_t default_timeout_ms;
    bool have_msg;
    msgpack_unpacked msg; /* last frame; points into rd's buffer */

    struct ctl_err err;

    const char *progress; /* what a progress line on stderr names, or NULL */
    double progress_at;
    double progress_start;
    bool progress_shown;
};

/* Argument maps are packed into a scratch writer, then copied into the frame. */
struct args {
    struct sp_writer w;
    msgpack_packer pk;
};

/* agentctl.c: errors, time, slot requests, output */
int fail(struct ctl *c, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
double now_s(void);
int ms_until(double deadline);
void catch_signals(struct ctl *c, sigset_t *old, bool winch);
void release_signals(struct ctl *c, const sigset_t *old);
const char *slot_args(struct ctl *c, const struct cmd *cmd, const char *op, const char *tool,
                      struct args *a, uint32_t n, uint64_t tmo);
void print_json(const msgpack_object *o);
uint64_t get_u(const msgpack_object *m, const char *k);
const char *get_s(const msgpack_object *m, const char *k, int *n);
int write_all(struct ctl *c, int fd, const char *p, size_t n);

/* conn.c: the connection and the blocking client */
/* A progress line (c->progress set) is redrawn at most this often. */
#define PROGRESS_EVERY_S 0.1
/* $SLOT_CONTROLLER, else the controller's socket in $XDG_RUNTIME_DIR, else
 * a per-user one in /tmp. */
const char *default_controller_addr(void);
/* Connect to c->controller or c->agent (TLS handshake on tls:), or spawn
 * c->agent_cmd; -1 with c->err set. */
int connect_peer(struct ctl *c);
/* Close the connection; an --agent-cmd child is reaped (killed if it hangs). */
void disconnect(struct ctl *c);
/* Clear the progress line, if one was shown; c->progress ends. */
void end_progress(struct ctl *c);
int read_signal(struct ctl *c);
void args_begin(struct args *a, uint32_t n);
uint64_t send_request(struct ctl *c, const char *op, const struct sp_writer *args);
/* Next frame into c->msg. 1 = frame, 0 = interrupted by a signal (c->signo),
 * -1 = error. The frame stays valid until the next receive or send. */
int recv_frame(struct ctl *c, double deadline);
enum frame_kind { FRAME_OTHER, FRAME_EVENT, FRAME_RESULT, FRAME_ERROR };
/* Sort the current frame for request id; FRAME_ERROR fills c->err. */
enum frame_kind classify(struct ctl *c, uint64_t id, const msgpack_object **result);
const msgpack_object *wait_result(struct ctl *c, uint64_t id);
const msgpack_object *call(struct ctl *c, const char *op, struct args *a);
int wait_closed(struct ctl *c, double seconds);
/* c->err from an error answer m ({id, ok: false, error: {code, message}}); -1. */
int fail_from_answer(struct ctl *c, const msgpack_object *m);
/* The connection's bytes into c->rd, through TLS on a tls: address: the
 * contract of sp_reader_fill. */
ssize_t peer_read(struct ctl *c);
/* Why the last peer_read failed (errno e): TLS's reason when it has one. */
const char *peer_error(const struct ctl *c, int e);
/* Decrypted bytes wait in TLS: read again before polling. */
bool peer_pending(const struct ctl *c);
/* poll() events for the connection's fd while waiting to read. */
short peer_events(const struct ctl *c);

/* ctl_controller.c */
void fmt_bytes(char *out, size_t cap, uint64_t n);
uint64_t controller_exec_timeout(struct ctl *c, const struct cmd *cmd);
int cmd_status(struct ctl *c, const struct cmd *cmd);
int cmd_agents(struct ctl *c, const struct cmd *cmd);
int cmd_ctl_slots(struct ctl *c, const struct cmd *cmd);
int cmd_leases(struct ctl *c);
int cmd_templates(struct ctl *c);
int cmd_profiles(struct ctl *c);
int cmd_acquire(struct ctl *c, const struct cmd *cmd);
int cmd_release(struct ctl *c, const struct cmd *cmd);
int cmd_drain(struct ctl *c, const struct cmd *cmd);
int cmd_reconnect(struct ctl *c, const struct cmd *cmd);
int cmd_top(struct ctl *c, const struct cmd *cmd);
int cmd_stop(struct ctl *c, const struct cmd *cmd);

/* attach.c */
int cmd_attach(struct ctl *c, const struct cmd *cmd, int *status);

#endif
