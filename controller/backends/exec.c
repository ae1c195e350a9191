/* The exec backend: agents reached through the stdin/stdout of a command
 * the profile names (docker run -i, docker exec -i CTR slot-agent --attach,
 * apptainer exec, ssh, srun). Templates are argv lists with {placeholders},
 * expanded per agent and run without a shell. With `start` (and `stop`,
 * `list`), the agent is a daemon that outlives its stream: `launch` then only
 * attaches to it, and a restarted controller finds it again through `list`.
 * What the launcher and the helpers say on stderr ends up in the agent's
 * stderr tail, shown in errors and by `agentctl agents`. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"
#include "tls_ca.h"

#define STOP_GRACE_S 5.0
#define LIST_MAX_OUT (1 << 20)

enum helper_kind { HELPER_NONE, HELPER_START, HELPER_STOP, HELPER_PROBE };

#define PROBE_MAX_OUT (64 * 1024)

/* A `list` run to learn whether an agent whose stream ended still runs
 * (ag->be_data while it runs). */
struct probe {
    probe_done_fn done;
    char *out;
    size_t len;
    bool truncated; /* more than PROBE_MAX_OUT: not finding it proves nothing */
};

static const char *const placeholders[] = {
    "agent_id", "profile",  "controller",      "slots",          "image",     "token",
    "cpu",      "memory",   "memory_mb",       "slot_memory",    "slot_disk", "slot_inodes",
    "gpu",      "data_dir", "isolation",       "state_dir",      "agent_bin", "tls_cert",
    "tls_key",  "tls_ca",   "tls_client_cert", "tls_client_key", NULL,
};

/* ---- templates ----------------------------------------------------------- */

static void controller_id(const struct ctl *c, char *out, size_t cap)
{
    size_t i = 0;
    for (const char *s = c->name; *s && i + 1 < cap; s++)
        out[i++] = isalnum((unsigned char)*s) || *s == '_' || *s == '.' || *s == '-' ? *s : '-';
    out[i] = 0;
}

static void ph_value(const struct ctl *c, const struct profile *p, const struct agent *ag,
                     const char *name, char *out, size_t cap)
{
    *out = 0;
    if (!strcmp(name, "agent_id"))
        snprintf(out, cap, "%s", ag ? ag->id : "");
    else if (!strcmp(name, "profile"))
        snprintf(out, cap, "%s", p->name);
    else if (!strcmp(name, "controller"))
        controller_id(c, out, cap);
    else if (!strcmp(name, "slots"))
        snprintf(out, cap, "%u", p->slots_per_agent);
    else if (!strcmp(name, "image"))
        snprintf(out, cap, "%s", p->image ? p->image : "");
    else if (!strcmp(name, "token"))
        snprintf(out, cap, "%s", c->agent_token);
    else if (!strcmp(name, "cpu"))
        snprintf(out, cap, "%g", p->cpu);
    else if (!strcmp(name, "memory"))
        snprintf(out, cap, "%" PRIu64, p->memory);
    else if (!strcmp(name, "memory_mb"))
        snprintf(out, cap, "%" PRIu64, p->memory >> 20);
    else if (!strcmp(name, "slot_memory"))
        snprintf(out, cap, "%" PRIu64, p->memory / p->slots_per_agent);
    else if (!strcmp(name, "slot_disk"))
        snprintf(out, cap, "%" PRIu64, p->slot_disk);
    else if (!strcmp(name, "slot_inodes"))
        snprintf(out, cap, "%" PRIu64, p->slot_inodes);
    else if (!strcmp(name, "gpu"))
        snprintf(out, cap, "%s", p->gpu ? p->gpu : "");
    else if (!strcmp(name, "data_dir"))
        snprintf(out, cap, "%s", ag && ag->data_dir ? ag->data_dir : "");
    else if (!strcmp(name, "isolation"))
        snprintf(out, cap, "%s", *p->isolation ? p->isolation : "best_effort");
    else if (!strcmp(name, "state_dir"))
        snprintf(out, cap, "%s", c->state_dir);
    else if (!strcmp(name, "agent_bin"))
        snprintf(out, cap, "%s", c->agent_bin ? c->agent_bin : "");
    else if (!strncmp(name, "tls_client_", 11)) {
        /* the controller's own client identity: for relays that reach a
         * daemon's tls: listener on the controller's behalf */
        const char *f =
            tls_file(c, !strcmp(name, "tls_client_cert") ? TLS_CLIENT_CERT : TLS_CLIENT_KEY);
        snprintf(out, cap, "%s", f ? f : "");
    } else if (!strncmp(name, "tls_", 4) && ag) {
        char cert[1024], key[1024], ca[1024];
        tls_agent_paths(c, ag, cert, key, ca, sizeof cert);
        snprintf(out, cap, "%s",
                 !strcmp(name, "tls_cert")  ? cert
                 : !strcmp(name, "tls_key") ? key
                                            : ca);
    }
}

static bool ph_known(const char *name, size_t n)
{
    for (int i = 0; placeholders[i]; i++)
        if (strlen(placeholders[i]) == n && !memcmp(placeholders[i], name, n))
            return true;
    return false;
}

/* Length of a {word} of [a-z_] at s (0 if s does not start one): anything
 * else, like Go templates' {{.Names}}, stays as written. */
static size_t ph_at(const char *s)
{
    if (*s != '{')
        return 0;
    size_t n = 1;
    while (islower((unsigned char)s[n]) || s[n] == '_')
        n++;
    return n > 1 && s[n] == '}' ? n + 1 : 0;
}

static char *expand_one(const struct ctl *c, const struct profile *p, const struct agent *ag,
                        const char *t)
{
    size_t cap = strlen(t) + 1, len = 0;
    char *out = malloc(cap);
    if (!out)
        abort();
    while (*t) {
        size_t n = ph_at(t);
        char val[1024];
        const char *add = t;
        size_t addn = 1;
        if (n) {
            char name[64];
            snprintf(name, sizeof name, "%.*s", (int)(n - 2), t + 1);
            ph_value(c, p, ag, name, val, sizeof val);
            add = val;
            addn = strlen(val);
        } else
            n = 1;
        if (len + addn + 1 > cap) {
            cap = (len + addn + 1) * 2;
            out = realloc(out, cap);
            if (!out)
                abort();
        }
        memcpy(out + len, add, addn);
        len += addn;
        t += n;
    }
    out[len] = 0;
    return out;
}

static char **expand(const struct ctl *c, const struct profile *p, const struct agent *ag,
                     const struct strlist *tmpl)
{
    char **v = calloc(tmpl->n + 1, sizeof *v);
    if (!v)
        abort();
    for (size_t i = 0; i < tmpl->n; i++)
        v[i] = expand_one(c, p, ag, tmpl->v[i]);
    return v;
}

static void free_argv(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        free(v[i]);
    free(v);
}

/* "docker exec -i slot-x ..." for addresses and messages. */
static void argv_summary(char **v, char *out, size_t cap)
{
    size_t off = 0;
    *out = 0;
    for (size_t i = 0; v[i] && off + 1 < cap; i++)
        off += (size_t)snprintf(out + off, cap - off, "%s%s", i ? " " : "", v[i]);
    if (off >= cap && cap > 4)
        strcpy(out + cap - 4, "...");
}

/* ---- the agents' token --------------------------------------------------- */

/* {token}: one random token per state directory, kept across restarts so
 * reattached agents still accept it. */
static int ensure_token(struct ctl *c, struct sp_err *err)
{
    if (*c->agent_token)
        return 0;
    char *path = NULL;
    if (asprintf(&path, "%s/agent-token", c->state_dir) < 0)
        abort();
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, c->agent_token, sizeof c->agent_token - 1);
        close(fd);
        while (n > 0 && isspace((unsigned char)c->agent_token[n - 1]))
            n--;
        c->agent_token[n > 0 ? n : 0] = 0;
    }
    if (!*c->agent_token) {
        snprintf(c->agent_token, sizeof c->agent_token, "%016" PRIx64 "%016" PRIx64, random_u64(),
                 random_u64());
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write(fd, c->agent_token, strlen(c->agent_token)) < 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            *c->agent_token = 0;
            sp_err_errno(err, e, path);
            free(path);
            return -1;
        }
        close(fd);
    }
    free(path);
    return 0;
}

/* ---- processes ----------------------------------------------------------- */

/* In the child: the agent's identity in the environment (so templates can
 * pass it on with `docker run -e SLOT_AGENT_TOKEN` and keep it out of argv),
 * signals back to defaults, then the program found on PATH. */
static void child_exec(struct ctl *c, struct agent *ag, char **argv)
{
    child_reset_signals();
    setpgid(0, 0); /* a Ctrl-C at the controller's terminal is the controller's */
    if (ag) {
        setenv("SLOT_AGENT_ID", ag->id, 1);
        setenv("SLOT_PROFILE", ag->prof->name, 1);
        if (ag->data_dir)
            setenv("SLOT_DATA_DIR", ag->data_dir, 1);
    }
    if (*c->agent_token)
        setenv("SLOT_AGENT_TOKEN", c->agent_token, 1);
    if (ag) {
        /* the same paths as {tls_cert}, {tls_key}, {tls_ca} */
        char cert[1024], key[1024], ca[1024];
        tls_agent_paths(c, ag, cert, key, ca, sizeof cert);
        if (*cert) {
            setenv("SLOT_TLS_CERT", cert, 1);
            setenv("SLOT_TLS_KEY", key, 1);
            setenv("SLOT_TLS_CA", ca, 1);
        }
    }
    if (!argv[0] || !*argv[0]) {
        dprintf(2, "slot-controller: empty command template\n");
        _exit(127);
    }
    execvp(argv[0], argv);
    dprintf(2, "slot-controller: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* Free the agent once its launcher and helper are both done. */
static void maybe_gone(struct ctl *c, struct agent *ag)
{
    if (ag->state != AG_STOPPING || ag->pid > 0 || ag->helper_pid > 0)
        return;
    agent_free_soon(c, ag);
}

/* ---- the launcher (the stream) ------------------------------------------- */

static void launcher_exit_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    (void)loop;
    char why[160];
    child_reaped(c, ag, w, "launch command", why, sizeof why);
    if (c->stopping && ag->state != AG_STOPPING)
        /* The controller is leaving an agent that outlives it: the relay
         * ended because we closed its stream; the daemon stays. */
        log_debug("agent %s: relay %s; the agent stays", ag->id, why);
    else if (ag->state != AG_STOPPING)
        agent_lost(c, ag, why); /* calls exec_stop */
    else
        log_debug("agent %s: %s", ag->id, why);
    maybe_gone(c, ag);
}

static int launch(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    char **argv = expand(c, ag->prof, ag, &ag->prof->exec_launch);
    char summary[200];
    argv_summary(argv, summary, sizeof summary);
    int fd;
    int rc = child_spawn_stream(c, ag, argv, child_exec, launcher_exit_cb, &fd, err);
    free_argv(argv);
    if (rc < 0)
        return -1;
    snprintf(ag->address, sizeof ag->address, "exec:%s", summary);
    agent_stream_ready(c, ag, fd);
    return 0;
}

/* ---- helpers: start and stop commands ------------------------------------ */

static void run_stop_helper(struct ctl *c, struct agent *ag);
static void probe_finish(struct ctl *c, struct agent *ag, bool ok, const char *status);

static void helper_out_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    char buf[4096];
    ssize_t n;
    /* All there is: at the helper's exit this is the last call, and what
     * is left unread would be lost (a list's answer with it). */
    while ((n = read(ag->helper_fd, buf, sizeof buf)) > 0) {
        if (ag->helper_kind == HELPER_PROBE) {
            struct probe *pr = ag->be_data;
            size_t k = (size_t)n < PROBE_MAX_OUT - pr->len ? (size_t)n : PROBE_MAX_OUT - pr->len;
            memcpy(pr->out + pr->len, buf, k);
            pr->len += k;
            pr->truncated |= k < (size_t)n;
        } else {
            agent_stderr_append(ag, buf, (size_t)n);
        }
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    ev_io_stop(loop, w);
    close(ag->helper_fd);
    ag->helper_fd = -1;
}

static void helper_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    if (ag->helper_pid > 0) {
        log_warn("agent %s: %s command still running after %.0f s; killing it", ag->id,
                 ag->helper_kind == HELPER_START   ? "start"
                 : ag->helper_kind == HELPER_PROBE ? "list"
                                                   : "stop",
                 (double)ag->prof->exec_command_timeout_ms / 1000);
        kill(-ag->helper_pid, SIGKILL);
        kill(ag->helper_pid, SIGKILL);
    }
}

static void helper_exit_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    struct ctl *c = ag->ctl;
    ev_child_stop(loop, w);
    ev_timer_stop(loop, &ag->helper_timer);
    if (ag->helper_fd >= 0) {
        helper_out_cb(loop, &ag->helper_io, 0);
        ev_io_stop(loop, &ag->helper_io);
        if (ag->helper_fd >= 0)
            close(ag->helper_fd);
        ag->helper_fd = -1;
    }
    ag->helper_pid = 0;
    int kind = ag->helper_kind;
    ag->helper_kind = HELPER_NONE;
    bool ok = WIFEXITED(w->rstatus) && WEXITSTATUS(w->rstatus) == 0;
    char st[64];
    child_status_text(w->rstatus, st, sizeof st);
    if (kind == HELPER_PROBE) {
        probe_finish(c, ag, ok, st);
        if (ag->state == AG_STOPPING) {
            run_stop_helper(c, ag); /* it was stopped while we asked */
            maybe_gone(c, ag);
        }
        return;
    }
    if (kind == HELPER_START) {
        if (ag->state == AG_STOPPING) {
            /* Stopped while starting: undo what the start made. */
            run_stop_helper(c, ag);
            maybe_gone(c, ag);
            return;
        }
        struct sp_err e;
        if (ok && launch(c, ag, &e) == 0)
            return;
        char why[700], tail[512];
        agent_stderr_tail(ag, tail, sizeof tail, 3);
        if (ok)
            snprintf(why, sizeof why, "agent %s: launch: %.500s", ag->id, e.msg);
        else
            snprintf(why, sizeof why, "agent %s: start command %s%s%s", ag->id, st,
                     *tail ? ": " : "", tail);
        sched_agent_failed(c, ag->prof, why);
        agent_stop(c, ag, why); /* runs the stop command, then frees */
        return;
    }
    if (!ok) {
        char tail[512];
        agent_stderr_tail(ag, tail, sizeof tail, 2);
        log_warn("agent %s: stop command %s%s%s", ag->id, st, *tail ? ": " : "", tail);
    }
    maybe_gone(c, ag);
}

static int run_helper(struct ctl *c, struct agent *ag, int kind, const struct strlist *tmpl,
                      struct sp_err *err)
{
    int op[2];
    if (pipe2(op, O_CLOEXEC) < 0)
        return sp_err_errno(err, errno, "pipe");
    char **argv = expand(c, ag->prof, ag, tmpl);
    pid_t pid = fork();
    if (pid == 0) {
        int dn = open("/dev/null", O_RDWR);
        dup2(dn, 0);
        /* docker run -d prints the container id: noise; list's output is
         * the answer */
        dup2(kind == HELPER_PROBE ? op[1] : dn, 1);
        dup2(op[1], 2);
        child_exec(c, ag, argv);
    }
    int e = errno;
    if (kind == HELPER_START || kind == HELPER_STOP) {
        char summary[200];
        argv_summary(argv, summary, sizeof summary);
        log_debug("agent %s: %s: %s", ag->id, kind == HELPER_START ? "start" : "stop", summary);
    }
    free_argv(argv);
    close(op[1]);
    if (pid < 0) {
        close(op[0]);
        return sp_err_errno(err, e, "fork");
    }
    ag->helper_pid = pid;
    ag->helper_kind = kind;
    ag->helper_fd = op[0];
    fcntl(op[0], F_SETFL, O_NONBLOCK);
    ev_io_init(&ag->helper_io, helper_out_cb, op[0], EV_READ);
    ag->helper_io.data = ag;
    ev_io_start(c->loop, &ag->helper_io);
    ev_child_init(&ag->helper_cw, helper_exit_cb, pid, 0);
    ag->helper_cw.data = ag;
    ev_child_start(c->loop, &ag->helper_cw);
    ev_timer_init(&ag->helper_timer, helper_timeout_cb,
                  (double)ag->prof->exec_command_timeout_ms / 1000, 0);
    ag->helper_timer.data = ag;
    ev_timer_start(c->loop, &ag->helper_timer);
    return 0;
}

static void run_stop_helper(struct ctl *c, struct agent *ag)
{
    if (!ag->prof->exec_stop.n || ag->helper_pid > 0)
        return;
    struct sp_err e;
    if (run_helper(c, ag, HELPER_STOP, &ag->prof->exec_stop, &e) < 0)
        log_warn("agent %s: cannot run the stop command: %s", ag->id, e.msg);
}

/* ---- the vtable ---------------------------------------------------------- */

static void set_data_dir(struct ctl *c, struct agent *ag, bool create)
{
    struct profile *p = ag->prof;
    free(ag->data_dir);
    ag->data_dir = NULL;
    int r = p->workspace_base ? asprintf(&ag->data_dir, "%s/%s", p->workspace_base, ag->id)
                              : asprintf(&ag->data_dir, "%s/data/%s", c->state_dir, ag->id);
    if (r < 0)
        abort();
    struct stat st;
    if (create)
        /* The path may only mean something on the far side (a remote host):
         * that it cannot be made here is no error. */
        ag->data_ours = mkdir_p(ag->data_dir, 0755) == 0;
    else
        ag->data_ours = stat(ag->data_dir, &st) == 0 && S_ISDIR(st.st_mode);
}

static int exec_start_agent(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    if (ensure_token(c, err) < 0)
        return -1;
    /* Its certificate, in files the templates name; removed with the
     * agent (agent_free), whatever way it goes. */
    if (tls_profile_issues(ag->prof) && tls_agent_issue(c, ag, true, NULL, err) < 0)
        return -1;
    set_data_dir(c, ag, true);
    if (ag->prof->exec_start.n) {
        snprintf(ag->address, sizeof ag->address, "exec:starting");
        return run_helper(c, ag, HELPER_START, &ag->prof->exec_start, err);
    }
    return launch(c, ag, err);
}

static void kill_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    if (ag->pid > 0) {
        log_warn("agent %s: launch command did not exit in %.0f s; SIGKILL", ag->id, STOP_GRACE_S);
        kill(-ag->pid, SIGKILL);
        kill(ag->pid, SIGKILL);
    }
}

static void exec_stop_agent(struct ctl *c, struct agent *ag)
{
    ev_timer_stop(c->loop, &ag->timer);
    if (ag->pid > 0) {
        /* Its stdin is closed already, which ends a stdio agent and a relay;
         * SIGTERM makes sure (docker run proxies it to the agent). */
        kill(ag->pid, SIGTERM);
        ev_timer_init(&ag->timer, kill_cb, STOP_GRACE_S, 0);
        ag->timer.data = ag;
        ev_timer_start(c->loop, &ag->timer);
    }
    /* A start still running is left to finish (killing `docker run -d`
     * midway could leave a container behind); its end runs the stop, as
     * does the end of a list asking whether the agent runs. */
    if (ag->helper_kind == HELPER_PROBE && ag->helper_pid > 0)
        kill(-ag->helper_pid, SIGKILL);
    else if (ag->helper_kind != HELPER_START)
        run_stop_helper(c, ag);
    maybe_gone(c, ag);
}

static int exec_attach(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    return launch(c, ag, err);
}

/* Is the agent's id a line of what `list` printed? */
static bool listed(const char *out, size_t n, const char *id)
{
    size_t il = strlen(id);
    for (size_t i = 0; i < n;) {
        size_t e = i;
        while (e < n && out[e] != '\n')
            e++;
        size_t a = i, b = e;
        while (a < b && isspace((unsigned char)out[a]))
            a++;
        while (b > a && isspace((unsigned char)out[b - 1]))
            b--;
        if (b - a == il && !memcmp(out + a, id, il))
            return true;
        i = e + 1;
    }
    return false;
}

static void probe_finish(struct ctl *c, struct agent *ag, bool ok, const char *status)
{
    struct probe *pr = ag->be_data;
    ag->be_data = NULL;
    if (!pr)
        return;
    char why[300];
    int alive;
    if (!ok) {
        alive = -1;
        snprintf(why, sizeof why, "list command %s", status);
    } else if (listed(pr->out, pr->len, ag->id)) {
        alive = 1;
        *why = 0;
    } else if (pr->truncated) {
        alive = -1;
        snprintf(why, sizeof why, "the list command printed more than %d bytes", PROBE_MAX_OUT);
    } else {
        alive = 0;
        snprintf(why, sizeof why, "the list command no longer lists %s", ag->id);
    }
    probe_done_fn done = pr->done;
    free(pr->out);
    free(pr);
    done(c, ag, alive, why);
}

/* The stream ended: ask `list` whether the daemon still runs. Without a
 * list template nobody can tell, and attach answers instead. */
static void exec_probe(struct ctl *c, struct agent *ag, probe_done_fn done)
{
    struct sp_err e;
    if (!ag->prof->exec_list.n || ag->helper_pid > 0) {
        done(c, ag, -1, ag->prof->exec_list.n ? "a start or stop command runs" : NULL);
        return;
    }
    struct probe *pr = calloc(1, sizeof *pr);
    if (!pr || !(pr->out = malloc(PROBE_MAX_OUT)))
        abort();
    pr->done = done;
    ag->be_data = pr;
    if (run_helper(c, ag, HELPER_PROBE, &ag->prof->exec_list, &e) < 0) {
        ag->be_data = NULL;
        free(pr->out);
        free(pr);
        done(c, ag, -1, e.msg);
    }
}

/* Is s "PROFILE-xxxxxx", an id this controller gives? */
static bool is_agent_id(const struct profile *p, const char *s, size_t n)
{
    size_t pl = strlen(p->name);
    if (n != pl + 7 || memcmp(s, p->name, pl) || s[pl] != '-')
        return false;
    for (size_t i = pl + 1; i < n; i++)
        if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i]))
            return false;
    return true;
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Run `list` to completion before the loop starts (once, at start-up). */
static int run_list(struct ctl *c, struct profile *p, char **out, size_t *outn, char *errtxt,
                    size_t errcap)
{
    int op[2], ep[2];
    *out = NULL;
    *outn = 0;
    *errtxt = 0;
    if (pipe2(op, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(ep, O_CLOEXEC) < 0) {
        close(op[0]);
        close(op[1]);
        return -1;
    }
    char **argv = expand(c, p, NULL, &p->exec_list);
    pid_t pid = fork();
    if (pid == 0) {
        int dn = open("/dev/null", O_RDONLY);
        dup2(dn, 0);
        dup2(op[1], 1);
        dup2(ep[1], 2);
        child_exec(c, NULL, argv);
    }
    free_argv(argv);
    close(op[1]);
    close(ep[1]);
    if (pid < 0) {
        close(op[0]);
        close(ep[0]);
        return -1;
    }
    size_t cap = 4096, errn = 0;
    char *buf = malloc(cap);
    if (!buf)
        abort();
    double deadline = mono() + (double)p->exec_command_timeout_ms / 1000;
    bool o_open = true, e_open = true, late = false;
    while (o_open || e_open) {
        double left = deadline - mono();
        if (left <= 0) {
            late = true;
            break;
        }
        struct pollfd pf[2] = {{.fd = o_open ? op[0] : -1, .events = POLLIN},
                               {.fd = e_open ? ep[0] : -1, .events = POLLIN}};
        if (poll(pf, 2, (int)(left * 1000) + 1) < 0 && errno != EINTR)
            break;
        if (pf[0].revents) {
            if (*outn + 4096 > cap && cap < LIST_MAX_OUT) {
                cap *= 2;
                buf = realloc(buf, cap);
                if (!buf)
                    abort();
            }
            ssize_t n = *outn + 1 < cap ? read(op[0], buf + *outn, cap - *outn - 1) : 0;
            if (n > 0)
                *outn += (size_t)n;
            else if (n == 0 || errno != EINTR)
                o_open = false;
        }
        if (pf[1].revents) {
            char tmp[1024];
            ssize_t n = read(ep[0], tmp, sizeof tmp);
            if (n > 0 && errn + 1 < errcap) {
                size_t k = (size_t)n < errcap - errn - 1 ? (size_t)n : errcap - errn - 1;
                memcpy(errtxt + errn, tmp, k);
                errn += k;
                errtxt[errn] = 0;
            } else if (n <= 0 && (n == 0 || errno != EINTR))
                e_open = false;
        }
    }
    close(op[0]);
    close(ep[0]);
    if (late) {
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    buf[*outn] = 0;
    *out = buf;
    if (late) {
        snprintf(errtxt, errcap, "timed out after %.0f s",
                 (double)p->exec_command_timeout_ms / 1000);
        return -1;
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        char s[64];
        child_status_text(st, s, sizeof s);
        size_t el = strlen(errtxt);
        while (el && isspace((unsigned char)errtxt[el - 1]))
            errtxt[--el] = 0;
        char tmp[600];
        snprintf(tmp, sizeof tmp, "%s%s%.500s", s, el ? ": " : "", errtxt);
        snprintf(errtxt, errcap, "%s", tmp);
        return -1;
    }
    return 0;
}

static int exec_list_agents(struct ctl *c, struct profile *p)
{
    if (!p->exec_list.n)
        return 0;
    struct sp_err err;
    if (ensure_token(c, &err) < 0) {
        log_warn("profile %s: %s", p->name, err.msg);
        return 0;
    }
    char *out = NULL, errtxt[600];
    size_t outn = 0;
    if (run_list(c, p, &out, &outn, errtxt, sizeof errtxt) < 0) {
        log_warn("profile %s: list command %s; agents of an earlier run are not reattached",
                 p->name, errtxt);
        free(out);
        return 0;
    }
    int found = 0;
    for (char *line = out, *nl; line && *line; line = nl) {
        nl = strchr(line, '\n');
        if (nl)
            *nl++ = 0;
        while (isspace((unsigned char)*line))
            line++;
        size_t n = strlen(line);
        while (n && isspace((unsigned char)line[n - 1]))
            line[--n] = 0;
        if (!is_agent_id(p, line, n) || agent_find(c, line, n))
            continue;
        struct agent *ag = agent_new(c, p, line);
        ag->reattached = true;
        set_data_dir(c, ag, false);
        if (tls_profile_issues(p)) {
            /* Its files from the earlier run stay its own; a renewal once
             * it is ready tells the controller their lifetime. */
            char cert[1024], key[1024], ca[1024];
            ag->tls_files = true;
            tls_agent_paths(c, ag, cert, key, ca, sizeof cert);
            ag->tls_issued = access(cert, R_OK) == 0;
        }
        if (exec_attach(c, ag, &err) < 0) {
            log_warn("agent %s from an earlier run: cannot attach (%s); stopping it", line,
                     err.msg);
            ag->state = AG_STOPPING;
            exec_stop_agent(c, ag);
            continue;
        }
        log_info("reattaching agent %s", line);
        found++;
    }
    free(out);
    return found;
}

static bool exec_persistent(const struct profile *p)
{
    return p->exec_start.n > 0;
}

static int check_template(struct profile *p, const char *what, const struct strlist *t,
                          struct sp_err *err)
{
    for (size_t i = 0; i < t->n; i++)
        for (const char *s = t->v[i]; *s; s++) {
            size_t n = ph_at(s);
            if (!n)
                continue;
            if (!ph_known(s + 1, n - 2))
                return sp_errf(err, SP_BAD_REQUEST,
                               "profile '%s': exec.%s: unknown placeholder %.*s (known: agent_id, "
                               "profile, controller, slots, image, token, cpu, memory, memory_mb, "
                               "slot_memory, slot_disk, slot_inodes, gpu, data_dir, isolation, "
                               "state_dir, agent_bin, tls_cert, tls_key, tls_ca, tls_client_cert, "
                               "tls_client_key)",
                               p->name, what, (int)n, s);
            if (!strncmp(s, "{tls_", 5)) {
                if (!tls_profile_on(p))
                    return sp_errf(err, SP_BAD_REQUEST,
                                   "profile '%s': exec.%s uses %.*s but the profile has tls: off",
                                   p->name, what, (int)n, s);
                if (strncmp(s, "{tls_client_", 12))
                    p->tls_used = true;
            }
            if (!strncmp(s, "{image}", 7) && !p->image)
                return sp_errf(err, SP_BAD_REQUEST,
                               "profile '%s': exec.%s uses {image} but the profile has no image",
                               p->name, what);
            /* Unset is the agent's default, but the agent reads 0 as no
             * budget at all: a template that passes the value needs it. */
            if ((!strncmp(s, "{slot_disk}", 11) && !p->slot_disk) ||
                (!strncmp(s, "{slot_inodes}", 13) && !p->slot_inodes))
                return sp_errf(err, SP_BAD_REQUEST,
                               "profile '%s': exec.%s uses %.*s but the profile does not set %.*s "
                               "(0 would turn the agents' budget off, not give their default)",
                               p->name, what, (int)n, s, (int)n - 2, s + 1);
            s += n - 1;
        }
    return 0;
}

static int exec_check(struct ctl *c, struct profile *p, struct sp_err *err)
{
    (void)c;
    if (!p->exec_launch.n)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': the exec backend needs exec.launch (the command whose "
                       "stdin/stdout is the agent's stream)",
                       p->name);
    if (p->exec_start.n && !p->exec_stop.n)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': exec.start needs exec.stop (agents it starts outlive their "
                       "stream and must be stoppable); add exec.list to reattach after a restart",
                       p->name);
    const struct {
        const char *name;
        const struct strlist *t;
    } ts[] = {{"launch", &p->exec_launch},
              {"start", &p->exec_start},
              {"stop", &p->exec_stop},
              {"list", &p->exec_list}};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        if (check_template(p, ts[i].name, ts[i].t, err) < 0)
            return -1;
    return 0;
}

const struct backend backend_exec = {
    .name = "exec",
    .start_agent = exec_start_agent,
    .stop_agent = exec_stop_agent,
    .list_agents = exec_list_agents,
    .attach = exec_attach,
    .check = exec_check,
    .persistent = exec_persistent,
    .probe = exec_probe,
};
