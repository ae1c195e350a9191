/* Ops session_open, session_exec, session_write, session_read,
 * session_resize, session_screen, session_log, session_signal and
 * session_close: turn validated
 * arguments into a session's shell (isolation, environment and cwd exactly
 * as exec builds them) and hand the rest to session.c. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "../session.h"

#define DEFAULT_TIMEOUT_MS 600000u
#define DEFAULT_READ_BYTES 65536u

static bool is_bash(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    return strcmp(base, "bash") == 0;
}

int op_session_open(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct slot *s = req_slot(rq);
    size_t shell_len, cwd_len, iso_len;
    const char *shell_a = arg_str(rq, "shell", &shell_len);
    const char *cwd = arg_str(rq, "cwd", &cwd_len);
    const char *iso = arg_str(rq, "isolation", &iso_len);
    size_t tag_len = 0;
    const char *tag = arg_str(rq, "tag", &tag_len);
    if (tag && memchr(tag, 0, tag_len))
        return sp_errf(err, SP_BAD_REQUEST, "args.tag: no NUL");
    bool pty = arg_bool(rq, "pty", false);
    uint64_t cols = arg_uint(rq, "cols", 80), rows = arg_uint(rq, "rows", 24);
    if (cols == 0 || rows == 0)
        return sp_errf(err, SP_BAD_REQUEST, "args.cols, args.rows: must be 1..1000");
    if ((req_arg(rq, "cols") || req_arg(rq, "rows")) && !pty)
        return sp_errf(err, SP_BAD_REQUEST, "args.cols, args.rows: only with pty: true");
    if (s->nsessions >= ag->opt.max_sessions)
        return sp_errf(err, SP_NO_CAPACITY,
                       "too many sessions: slot %u has %u (--max-sessions); close one", s->index,
                       s->nsessions);
    char shell[4096];
    if (shell_a) {
        if (shell_len == 0 || memchr(shell_a, 0, shell_len) || shell_a[0] != '/')
            return sp_errf(err, SP_BAD_REQUEST, "args.shell: an absolute path without NUL");
        snprintf(shell, sizeof shell, "%.*s", (int)shell_len, shell_a);
    } else {
        snprintf(shell, sizeof shell, "%s", ag->shell);
    }
    if (access(shell, X_OK) < 0)
        return sp_errf(err, SP_NOT_FOUND, "cannot execute %s: %s", shell, strerror(errno));
    if (iso && !sp_str_eq(iso, iso_len, "best_effort") && !sp_str_eq(iso, iso_len, "required"))
        return sp_errf(err, SP_BAD_REQUEST,
                       "args.isolation: expected \"best_effort\" or \"required\"");
    bool required = iso ? sp_str_eq(iso, iso_len, "required") : ag->opt.isolation_required;
    bool network = arg_bool(rq, "network", true);
    struct iso_child ic = {.required = required, .landlock_fd = -1, .failed_rung = -1};
    if (exec_isolation(rq, s, network, &ic, err) < 0)
        return -1;

    int cwd_fd = -1, rc = -1;
    char cwd_path[8200], rel[4096] = "";
    if (cwd) {
        if (path_check(cwd, cwd_len, true, rel, sizeof rel, err) < 0)
            return -1;
        cwd_fd = path_open(s->ws_fd, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0, err);
        if (cwd_fd < 0)
            return -1;
    }
    char **envp = NULL;
    if (exec_cwd(ag, s, &ic, rel, cwd_path, sizeof cwd_path, err) < 0)
        goto out;
    /* A terminal is not dumb: full-screen programs need to know what it is. */
    envp = exec_env(ag, s, req_arg(rq, "env"), pty ? "xterm-256color" : "dumb", &ic, cwd_path, err);
    if (!envp)
        goto out;
    bool bash = is_bash(shell);
    /* Interactive (see session.c); without a terminal no line editing. */
    char *argv_bash[] = {
        shell, (char *)"--noprofile", (char *)"--norc", (char *)"--noediting", (char *)"-i", NULL};
    char *argv_bash_pty[] = {shell, (char *)"--noprofile", (char *)"--norc", (char *)"-i", NULL};
    char *argv_other[] = {shell, NULL};
    struct session_params p = {
        .path = shell,
        .argv = bash ? (pty ? argv_bash_pty : argv_bash) : argv_other,
        .envp = envp,
        .cwd_fd = cwd_fd >= 0 ? cwd_fd : s->ws_fd,
        .cwd_path = cwd_path,
        .iso = &ic,
        .box = (ic.want & (1u << RUNG_NAMESPACES)) ? &s->box[!network] : NULL,
        .pty = pty,
        .network = network,
        .bash = bash,
        .cols = (unsigned)cols,
        .rows = (unsigned)rows,
        .tag = tag,
        .tag_len = tag_len,
    };
    rc = session_open(ag, s, rq, &p, err);
out:
    free(envp);
    if (cwd_fd >= 0)
        close(cwd_fd);
    return rc;
}

/* The session named by args.session; with args.slot as well (the
 * controller always sends its trainer's slot) it must be that slot's, so a
 * trajectory cannot reach another slot's session by its number. */
static struct session *arg_session(struct req *rq, struct sp_err *err)
{
    uint64_t id = arg_uint(rq, "session", 0);
    struct session *ss = session_find(rq->ag, id, err);
    if (ss && req_arg(rq, "slot") && session_slot_index(ss) != arg_uint(rq, "slot", 0)) {
        sp_errf(err, SP_NOT_FOUND, "no session %llu in slot %llu", (unsigned long long)id,
                (unsigned long long)arg_uint(rq, "slot", 0));
        return NULL;
    }
    return ss;
}

int op_session_exec(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    size_t len;
    const char *cmd = arg_str(rq, "cmd", &len);
    uint64_t timeout_ms = arg_uint(rq, "timeout_ms", 0);
    uint64_t max_output = arg_uint(rq, "max_output", ag->opt.max_output);
    if (max_output > ag->opt.max_output)
        return sp_errf(err, SP_BAD_REQUEST,
                       "args.max_output: %llu is above the agent's maximum %llu",
                       (unsigned long long)max_output, (unsigned long long)ag->opt.max_output);
    return session_exec(ss, rq, cmd, len, timeout_ms ? timeout_ms : DEFAULT_TIMEOUT_MS, max_output,
                        err);
}

int op_session_write(struct req *rq, struct sp_err *err)
{
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    size_t n, taken = 0;
    const char *data = arg_bin(rq, "data", &n);
    /* Asked to wait (even 0 ms): the answer says whether the prompt came. */
    if (req_arg(rq, "min_wait_ms") || req_arg(rq, "wait_prompt_ms"))
        return session_write_wait(ss, rq, data, n, arg_uint(rq, "min_wait_ms", 0),
                                  arg_uint(rq, "wait_prompt_ms", 0), err);
    if (session_write(ss, data, n, &taken, err) < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 1);
    sp_pack_kv_uint(pk, "written", taken);
    req_reply_end(rq);
    return OP_DONE;
}

int op_session_read(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    uint64_t max = arg_uint(rq, "max_bytes", DEFAULT_READ_BYTES);
    /* An answer must fit in a frame. */
    if (max == 0 || max > ag->opt.max_frame / 2)
        return sp_errf(err, SP_BAD_REQUEST, "args.max_bytes: must be 1..%u", ag->opt.max_frame / 2);
    return session_read(ss, rq, (size_t)max, arg_uint(rq, "wait_ms", 0), err);
}

int op_session_resize(struct req *rq, struct sp_err *err)
{
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    uint64_t cols = arg_uint(rq, "cols", 0), rows = arg_uint(rq, "rows", 0);
    if (cols == 0 || rows == 0)
        return sp_errf(err, SP_BAD_REQUEST, "args.cols, args.rows: must be 1..1000");
    if (session_resize(ss, (unsigned)cols, (unsigned)rows, err) < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 2);
    sp_pack_kv_uint(pk, "cols", cols);
    sp_pack_kv_uint(pk, "rows", rows);
    req_reply_end(rq);
    return OP_DONE;
}

int op_session_screen(struct req *rq, struct sp_err *err)
{
    struct session *ss = arg_session(rq, err);
    if (!ss || session_screen(ss, NULL, false, err) < 0)
        return -1;
    bool history = arg_bool(rq, "history", false);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, history ? 6 : 5);
    sp_pack_kv_uint(pk, "session", arg_uint(rq, "session", 0));
    session_screen(ss, pk, history, err); /* rows, cursor, size, alive[, history] */
    req_reply_end(rq);
    return OP_DONE;
}

int op_session_log(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct session *ss = arg_session(rq, err);
    if (!ss || session_log(ss, NULL, 0, 0, false, err) < 0)
        return -1;
    uint64_t max = arg_uint(rq, "max_bytes", DEFAULT_READ_BYTES);
    /* An answer must fit in a frame. */
    if (max == 0 || max > ag->opt.max_frame / 2)
        return sp_errf(err, SP_BAD_REQUEST, "args.max_bytes: must be 1..%u", ag->opt.max_frame / 2);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 7);
    sp_pack_kv_uint(pk, "session", arg_uint(rq, "session", 0));
    session_log(ss, pk, arg_uint(rq, "offset", 0), (size_t)max, arg_bool(rq, "lines", false), err);
    req_reply_end(rq);
    return OP_DONE;
}

static const struct {
    const char *name;
    int sig;
} signal_names[] = {
    {"HUP", SIGHUP},   {"INT", SIGINT},   {"QUIT", SIGQUIT}, {"KILL", SIGKILL}, {"USR1", SIGUSR1},
    {"USR2", SIGUSR2}, {"PIPE", SIGPIPE}, {"ALRM", SIGALRM}, {"TERM", SIGTERM}, {"CONT", SIGCONT},
    {"STOP", SIGSTOP}, {"TSTP", SIGTSTP}, {"TTIN", SIGTTIN}, {"TTOU", SIGTTOU}, {"WINCH", SIGWINCH},
};

/* "INT", "SIGINT", "int" or a number 1..64. */
static int parse_signal(const msgpack_object *o, struct sp_err *err)
{
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 < 1 || o->via.u64 > 64)
            return sp_errf(err, SP_BAD_REQUEST, "args.signal: %llu is not a signal (1..64)",
                           (unsigned long long)o->via.u64);
        return (int)o->via.u64;
    }
    const char *p = o->via.str.ptr;
    size_t n = o->via.str.size;
    if (n > 3 && !strncasecmp(p, "SIG", 3)) {
        p += 3;
        n -= 3;
    }
    for (size_t i = 0; i < sizeof signal_names / sizeof signal_names[0]; i++)
        if (strlen(signal_names[i].name) == n && !strncasecmp(signal_names[i].name, p, n))
            return signal_names[i].sig;
    return sp_errf(err, SP_BAD_REQUEST,
                   "args.signal: unknown signal '%.*s' (HUP INT QUIT KILL USR1 USR2 PIPE ALRM "
                   "TERM CONT STOP TSTP TTIN TTOU WINCH, or a number)",
                   (int)(o->via.str.size > 32 ? 32 : o->via.str.size), o->via.str.ptr);
}

int op_session_signal(struct req *rq, struct sp_err *err)
{
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    int sig = parse_signal(req_arg(rq, "signal"), err);
    if (sig < 0)
        return -1;
    unsigned n = 0;
    pid_t pgid = 0;
    if (session_signal(ss, sig, &n, &pgid, err) < 0)
        return -1;
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 3);
    sp_pack_kv_int(pk, "signal", sig);
    sp_pack_kv_uint(pk, "signalled", n);
    sp_pack_kv_int(pk, "pgid", pgid);
    req_reply_end(rq);
    return OP_DONE;
}

int op_session_close(struct req *rq, struct sp_err *err)
{
    struct session *ss = arg_session(rq, err);
    if (!ss)
        return -1;
    uint64_t id = arg_uint(rq, "session", 0);
    unsigned killed = session_close(ss, NULL);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 2);
    sp_pack_kv_uint(pk, "session", id);
    sp_pack_kv_uint(pk, "killed", killed);
    req_reply_end(rq);
    return OP_DONE;
}
