/* slot-agent: command line, the per-process context, signals, and the one
 * libev loop that runs everything. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "child.h"
#include "exec.h"
#include "idem.h"
#include "quota.h"
#include "slotfs.h"
#include "template.h"
#include "tls.h"

#define SHUTDOWN_SECONDS 5.0

static const char usage[] =
    "usage: slot-agent [options]\n"
    "\n"
    "Hosts many slot workspaces and runs commands and file operations in them,\n"
    "answering msgpack requests (see proto/PROTOCOL.md).\n"
    "\n"
    "  --listen tls:HOST:PORT   listen on TCP with TLS 1.3 and client certificates (needs\n"
    "                           --tls-cert, --tls-key, --tls-ca); repeatable\n"
    "  --listen tcp:HOST:PORT   listen on plaintext TCP (needs --token-file or --insecure;\n"
    "                           a non-loopback HOST needs --insecure); repeatable\n"
    "  --listen unix:PATH       listen on a Unix socket (mode 0600); repeatable\n"
    "  --stdio                  serve one client on stdin/stdout; exit when stdin closes\n"
    "  --attach unix:PATH|tcp:HOST:PORT|tls:HOST:PORT\n"
    "                           relay stdin/stdout byte for byte to an agent listening\n"
    "                           there (for docker exec, apptainer exec, ssh, srun streams);\n"
    "                           waits for its socket up to --attach-timeout (default 10 s);\n"
    "                           tls: presents --tls-cert/--tls-key, checks the agent against\n"
    "                           --tls-ca and, with --tls-name ID, that its certificate names ID\n"
    "  --slots N                number of slots (default 10)\n"
    "  --data-dir DIR           workspaces live in DIR/slots/N (default $NOMAD_ALLOC_DIR/data,\n"
    "                           else /data if writable, else ./slot-data)\n"
    "  --token-file FILE        require hello with this token on every connection\n"
    "  --insecure               allow TCP listeners without a token, and plaintext TCP\n"
    "                           listeners on non-loopback addresses\n"
    "  --tls-cert FILE          our certificate chain (PEM) for tls: listeners; re-read when\n"
    "                           it changes (checked on SIGHUP and on every connection)\n"
    "  --tls-key FILE           its private key (PEM)\n"
    "  --tls-ca FILE            CA certificate(s) (PEM) that client certificates must chain to\n"
    "  --tls-name NAME          --attach tls: only: the name the agent's certificate must carry\n"
    "  --max-frame BYTES        largest frame accepted or sent (default 64M)\n"
    "  --max-output BYTES       output kept per stream of a command (default 1M)\n"
    "  --max-sessions N         sessions (persistent shells) per slot (default 8)\n"
    "  --session-buffer BYTES   unread output kept per session, oldest dropped first\n"
    "                           (default 1M)\n"
    "  --template-mode MODE     overlay (default where a box can mount one) or copy:\n"
    "                           how a slot's workspace stands on a template\n"
    "  --template-max-depth N   layers a fork may pile up before it is flattened\n"
    "                           (1..64, default 16)\n"
    "  --share HOST:PATH        show host directory HOST read-only at PATH in every\n"
    "                           slot's box (PATH must exist in the image); repeatable\n"
    "  --log-level LEVEL        debug|info|warn|error (default info)\n"
    "  --isolation MODE         best_effort (default) or required: default for requests\n"
    "  --without RUNG           never apply a rung (uid, namespaces, landlock, seccomp,\n"
    "                           rlimits, cgroup); repeatable\n"
    "  --no-warm                start every command as a new shell: no warm shell per\n"
    "                           slot forking stateless execs (see --probe)\n"
    "  --slot-uid-base N        slot i runs as uid/gid N+i when the agent may change ids\n"
    "                           (default 20000)\n"
    "  --rlimit NAME=VALUE      per-command maximum and default: cpu (s), as, fsize (bytes),\n"
    "                           nproc, nofile; VALUE may be 'unlimited'; repeatable\n"
    "  --slot-memory BYTES      memory of each slot as a whole, with the cgroup rung\n"
    "                           (default unlimited)\n"
    "  --slot-pids N            processes of each slot as a whole (default 4096)\n"
    "  --slot-disk SIZE         disk budget of each slot: its writable workspace and tmp\n"
    "                           (K/M/G/T; 0 or off: none; default 90% of the free space\n"
    "                           over the slots, 256M..16G)\n"
    "  --slot-inodes N          files of each slot (K=1000, M=10^6; 0 or off: none;\n"
    "                           default 90% of the free inodes over the slots, 10K..500K)\n"
    "  --disk-reserve SIZE      free space kept on the data filesystem: under it the\n"
    "                           slot writing most is stopped (default 1%, 64M..1G,\n"
    "                           at most a tenth of the space free at start)\n"
    "  --disk-interval MS       how often busy slots' disk use is counted (default 250)\n"
    "  --disk-mode MODE         auto (default): a filesystem per slot where the agent can\n"
    "                           make one (root, loop devices, mkfs.ext4), else watch;\n"
    "                           fs: that or refuse to start; watch: count\n"
    "  --seccomp-deny CALLS     also deny these system calls (comma-separated); repeatable\n"
    "  --pass-env NAME          commands also get this variable of the agent's environment\n"
    "                           (NAME* a prefix, * all; never HOME, PWD, TMPDIR, SLOT_*;\n"
    "                           the request's env wins); repeatable\n"
    "  --config FILE            read options from FILE first: one 'name value' per line\n"
    "                           (any long option without its dashes; # comments);\n"
    "                           the command line overrides it\n"
    "  --probe [--json]         print which isolation rungs work here and exit\n"
    "  --version, --help\n";

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-')
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case 0: break;
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    default: return -1;
    }
    if (*end == 'i' || *end == 'B')
        end++;
    if (*end || (shift && v > (~0ull >> shift)))
        return -1;
    *out = v << shift;
    return 0;
}

static int read_token(struct agent *ag, const char *path, struct sp_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_errf(err, SP_NOT_FOUND, "token file %s: %s", path, strerror(errno));
    ssize_t n = read(fd, ag->token, sizeof ag->token);
    int e = errno;
    close(fd);
    if (n < 0)
        return sp_errf(err, SP_INTERNAL, "token file %s: %s", path, strerror(e));
    if ((size_t)n == sizeof ag->token)
        return sp_errf(err, SP_TOO_LARGE, "token file %s: token over %zu bytes", path,
                       sizeof ag->token - 1);
    while (n > 0 && (ag->token[n - 1] == '\n' || ag->token[n - 1] == '\r' ||
                     ag->token[n - 1] == ' ' || ag->token[n - 1] == '\t'))
        n--;
    if (n == 0)
        return sp_errf(err, SP_BAD_REQUEST, "token file %s is empty", path);
    ag->token_len = (size_t)n;
    return 0;
}

/* --share HOST:PATH: both absolute, HOST a directory, PATH an existing
 * directory of the root the boxes copy (a mount point needs one). */
static int add_share(struct agent *ag, const char *spec)
{
    const char *colon = strchr(spec, ':');
    struct stat st;
    if (!colon || spec[0] != '/' || colon[1] != '/' || strchr(colon + 1, ':')) {
        fprintf(stderr, "slot-agent: --share takes HOST:PATH, both absolute\n");
        return -1;
    }
    if (2 * ag->opt.nshares + 2 > sizeof ag->opt.shares / sizeof ag->opt.shares[0]) {
        fprintf(stderr, "slot-agent: at most %zu --share\n",
                sizeof ag->opt.shares / 2 / sizeof ag->opt.shares[0]);
        return -1;
    }
    char *host = strndup(spec, (size_t)(colon - spec)), *at = strdup(colon + 1);
    if (!host || !at || stat(host, &st) < 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "slot-agent: --share %s: %s is not a directory\n", spec, host ? host : "");
        free(host);
        free(at);
        return -1;
    }
    if (lstat(at, &st) < 0 || !S_ISDIR(st.st_mode) || !strcmp(at, "/") ||
        !strcmp(at, BOX_WORKSPACE) || !strncmp(at, "/workspace/", 11) || !strcmp(at, "/tmp") ||
        !strcmp(at, "/proc")) {
        fprintf(stderr,
                "slot-agent: --share %s: %s must be an existing directory of the image (and not "
                "/, /tmp, /proc or the workspace)\n",
                spec, at);
        free(host);
        free(at);
        return -1;
    }
    ag->opt.shares[2 * ag->opt.nshares] = host;
    ag->opt.shares[2 * ag->opt.nshares + 1] = at;
    ag->opt.nshares++;
    return 0;
}

enum {
    OPT_ISOLATION = 300,
    OPT_WITHOUT,
    OPT_RLIMIT,
    OPT_PROBE,
    OPT_JSON,
    OPT_UIDBASE,
    OPT_SECCOMP_DENY,
    OPT_SLOT_MEMORY,
    OPT_SLOT_PIDS,
    OPT_CONFIG,
    OPT_ATTACH,
    OPT_ATTACH_TIMEOUT,
    OPT_PASS_ENV,
    OPT_MAX_SESSIONS,
    OPT_SESSION_BUFFER,
    OPT_TEMPLATE_MODE,
    OPT_TEMPLATE_DEPTH,
    OPT_SHARE,
    OPT_SLOT_DISK,
    OPT_SLOT_INODES,
    OPT_DISK_RESERVE,
    OPT_DISK_INTERVAL,
    OPT_DISK_MODE,
    OPT_IDEM_MAX_KEYS, /* hidden (tests): idempotency bounds */
    OPT_IDEM_MAX_BYTES,
    OPT_IDEM_WINDOW,
    OPT_TLS_CERT,
    OPT_TLS_KEY,
    OPT_TLS_CA,
    OPT_TLS_NAME,
    OPT_TLS_HS_TIMEOUT, /* hidden (tests) */
};
enum {
    OPT_LISTEN = 256,
    OPT_STDIO,
    OPT_SLOTS,
    OPT_DATA,
    OPT_TOKEN,
    OPT_INSECURE,
    OPT_NO_WARM,
    OPT_MAXFRAME,
    OPT_MAXOUT,
    OPT_LOG,
    OPT_VERSION,
    OPT_HELP
};
static const struct option longopts[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"stdio", no_argument, NULL, OPT_STDIO},
    {"slots", required_argument, NULL, OPT_SLOTS},
    {"data-dir", required_argument, NULL, OPT_DATA},
    {"token-file", required_argument, NULL, OPT_TOKEN},
    {"insecure", no_argument, NULL, OPT_INSECURE},
    {"no-warm", no_argument, NULL, OPT_NO_WARM},
    {"max-frame", required_argument, NULL, OPT_MAXFRAME},
    {"max-output", required_argument, NULL, OPT_MAXOUT},
    {"log-level", required_argument, NULL, OPT_LOG},
    {"version", no_argument, NULL, OPT_VERSION},
    {"help", no_argument, NULL, OPT_HELP},
    {"isolation", required_argument, NULL, OPT_ISOLATION},
    {"without", required_argument, NULL, OPT_WITHOUT},
    {"rlimit", required_argument, NULL, OPT_RLIMIT},
    {"probe", no_argument, NULL, OPT_PROBE},
    {"json", no_argument, NULL, OPT_JSON},
    {"slot-uid-base", required_argument, NULL, OPT_UIDBASE},
    {"seccomp-deny", required_argument, NULL, OPT_SECCOMP_DENY},
    {"slot-memory", required_argument, NULL, OPT_SLOT_MEMORY},
    {"slot-pids", required_argument, NULL, OPT_SLOT_PIDS},
    {"config", required_argument, NULL, OPT_CONFIG},
    {"attach", required_argument, NULL, OPT_ATTACH},
    {"attach-timeout", required_argument, NULL, OPT_ATTACH_TIMEOUT},
    {"pass-env", required_argument, NULL, OPT_PASS_ENV},
    {"max-sessions", required_argument, NULL, OPT_MAX_SESSIONS},
    {"session-buffer", required_argument, NULL, OPT_SESSION_BUFFER},
    {"template-mode", required_argument, NULL, OPT_TEMPLATE_MODE},
    {"template-max-depth", required_argument, NULL, OPT_TEMPLATE_DEPTH},
    {"share", required_argument, NULL, OPT_SHARE},
    {"slot-disk", required_argument, NULL, OPT_SLOT_DISK},
    {"slot-inodes", required_argument, NULL, OPT_SLOT_INODES},
    {"disk-reserve", required_argument, NULL, OPT_DISK_RESERVE},
    {"disk-interval", required_argument, NULL, OPT_DISK_INTERVAL},
    {"disk-mode", required_argument, NULL, OPT_DISK_MODE},
    {"idem-max-keys", required_argument, NULL, OPT_IDEM_MAX_KEYS},
    {"idem-max-bytes", required_argument, NULL, OPT_IDEM_MAX_BYTES},
    {"idem-window", required_argument, NULL, OPT_IDEM_WINDOW},
    {"tls-cert", required_argument, NULL, OPT_TLS_CERT},
    {"tls-key", required_argument, NULL, OPT_TLS_KEY},
    {"tls-ca", required_argument, NULL, OPT_TLS_CA},
    {"tls-name", required_argument, NULL, OPT_TLS_NAME},
    {"tls-handshake-timeout", required_argument, NULL, OPT_TLS_HS_TIMEOUT},
    {NULL, 0, NULL, 0},
};

/* --config FILE: its lines become options placed before the command line's,
 * so the command line wins for single-valued options. */
static int config_load(const char *path, int argc, char **argv, int *out_argc, char ***out_argv,
                       char ***owned)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        fprintf(stderr, "slot-agent: config %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = (size_t)argc + 64, n = 0, nown = 0;
    char **av = calloc(cap + 1, sizeof *av), **own = calloc(cap + 1, sizeof *own);
    char line[4096];
    int lineno = 0, rc = -1;
    if (!av || !own)
        goto out;
    av[n++] = argv[0];
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *p = line, *end = line + strlen(line);
        while (end > p && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t'))
            *--end = 0;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        char *key = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '=')
            p++;
        char *val = p;
        if (*p) {
            *p++ = 0;
            while (*p == ' ' || *p == '\t' || *p == '=')
                p++;
            val = p;
        }
        const struct option *o = longopts;
        while (o->name && strcmp(o->name, key) != 0)
            o++;
        if (!o->name || !strcmp(key, "config") || !strcmp(key, "probe") || !strcmp(key, "json") ||
            !strcmp(key, "help") || !strcmp(key, "version")) {
            fprintf(stderr, "slot-agent: %s:%d: unknown key '%s'\n", path, lineno, key);
            goto out;
        }
        if ((o->has_arg == required_argument) != (*val != 0)) {
            fprintf(stderr, "slot-agent: %s:%d: '%s' %s\n", path, lineno, key,
                    *val ? "takes no value" : "needs a value");
            goto out;
        }
        if (n + (size_t)argc >= cap) {
            fprintf(stderr, "slot-agent: %s:%d: too many options\n", path, lineno);
            goto out;
        }
        size_t len = strlen(key) + strlen(val) + 4;
        char *opt = malloc(len);
        if (!opt)
            goto out;
        snprintf(opt, len, *val ? "--%s=%s" : "--%s", key, val);
        av[n++] = own[nown++] = opt;
    }
    for (int i = 1; i < argc; i++)
        av[n++] = argv[i];
    av[n] = NULL;
    *out_argc = (int)n;
    *out_argv = av;
    *owned = own;
    av = own = NULL;
    rc = 0;
out:
    fclose(f);
    if (own)
        for (size_t i = 0; i < nown; i++)
            free(own[i]);
    free(own);
    free(av);
    return rc;
}

static void config_free(char **av, char **owned)
{
    if (owned)
        for (size_t i = 0; owned[i]; i++)
            free(owned[i]);
    free(owned);
    free(av);
}

/* A box binds the slot's workspace over /workspace, after which paths
 * under /workspace lead into that workspace: a data dir there would put the
 * slot's own files (its tmp, the box's passwd copies) within the slot's
 * reach. Show the host path instead. */
static void workspace_view_check(struct agent *ag)
{
    size_t n = strlen(BOX_WORKSPACE);
    if (ag->iso.ns_workspace && ag->data_dir && !strncmp(ag->data_dir, BOX_WORKSPACE, n) &&
        (ag->data_dir[n] == '/' || ag->data_dir[n] == 0)) {
        ag->iso.ns_workspace = false;
        snprintf(ag->iso.ns_workspace_why, sizeof ag->iso.ns_workspace_why,
                 "the data dir is under %s", BOX_WORKSPACE);
    }
}

static char *default_data_dir(void)
{
    const char *alloc = getenv("NOMAD_ALLOC_DIR");
    char buf[4096];
    if (alloc && *alloc) {
        snprintf(buf, sizeof buf, "%s/data", alloc);
        return strdup(buf);
    }
    if (access("/data", W_OK) == 0)
        return strdup("/data");
    return strdup("./slot-data");
}

/* A relative data dir is made absolute once, so workspace paths handed to
 * commands (HOME, cwd) do not depend on the agent's cwd. */
static char *absolute_dir(const char *dir)
{
    if (dir[0] == '/')
        return strdup(dir);
    char cwd[4096], buf[8192];
    if (!getcwd(cwd, sizeof cwd))
        return NULL;
    snprintf(buf, sizeof buf, "%s/%s", cwd, dir);
    return strdup(buf);
}

static void shutdown_check_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    bool done = !ag->running && conns_idle(ag);
    if (done || ev_now(loop) - ag->stop_at > SHUTDOWN_SECONDS) {
        if (!done)
            log_warn("shutdown: giving up waiting after %.0f s", SHUTDOWN_SECONDS);
        ev_break(loop, EVBREAK_ALL);
    }
}

void agent_shutdown(struct agent *ag, const char *why)
{
    if (ag->stopping)
        return;
    ag->stopping = true;
    ag->stop_at = ev_now(ag->loop);
    log_info("shutting down: %s", why);
    listeners_close(ag);
    struct sp_err err;
    sp_errf(&err, SP_CANCELLED, "agent shutting down");
    for (unsigned i = 0; i < ag->nslots; i++)
        slot_fail_queued(ag, &ag->slots[i], &err);
    exec_kill_all(ag);
    ev_timer_init(&ag->stop_w, shutdown_check_cb, 0.0, 0.02);
    ag->stop_w.data = ag;
    ev_timer_start(ag->loop, &ag->stop_w);
}

/* SIGHUP: pick up renewed certificate files (nothing else is re-read). */
static void hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    if (!ag->tls) {
        log_info("SIGHUP: no TLS files to reload");
        return;
    }
    log_info("SIGHUP: checking the TLS files");
    conn_tls_reload(ag, false);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)revents;
    struct agent *ag = w->data;
    agent_shutdown(ag, w->signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void child_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)loop;
    (void)revents;
    if (!WIFEXITED(w->rstatus) && !WIFSIGNALED(w->rstatus))
        return; /* stopped or continued: we stop processes before killing them */
    exec_on_child_exit(w->data, w->rpid, w->rstatus);
}

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct agent *ag = w->data;
    exec_gc(ag);
    proc_sweep_strays(ag);
    uploads_sweep(ag, false);
    idem_sweep(ag);
    if (ev_now(loop) - ag->tls_log_window >= 1.0)
        conn_tls_log_flush(ag);
}

/* A closed 0/1/2 would let pipe() hand out those numbers and confuse the
 * child's dup2 sequence. */
static void ensure_std_fds(void)
{
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            open("/dev/null", O_RDWR);
}

/* The agent's variables that match a --pass-env pattern, copied once: what
 * the image, Modal Secrets or the job put in the agent's environment. */
static int pass_env_init(struct agent *ag, const char *const *pat, unsigned npat)
{
    extern char **environ;
    if (!npat)
        return 0;
    size_t n = 0;
    for (char **e = environ; *e; e++)
        n++;
    ag->pass_env = calloc(n + 1, sizeof *ag->pass_env);
    if (!ag->pass_env)
        return -1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e)
            continue;
        size_t kl = (size_t)(eq - *e);
        /* The slot's own places and the agent's own settings (its token)
         * are never the agent's to give away. */
        if ((kl == 4 && !memcmp(*e, "HOME", 4)) || (kl == 6 && !memcmp(*e, "TMPDIR", 6)) ||
            (kl == 3 && !memcmp(*e, "PWD", 3)) || !strncmp(*e, "SLOT_", 5))
            continue;
        bool match = false;
        for (unsigned i = 0; i < npat && !match; i++) {
            size_t pl = strlen(pat[i]);
            if (pat[i][pl - 1] == '*')
                match = kl >= pl - 1 && !memcmp(*e, pat[i], pl - 1);
            else
                match = kl == pl && !memcmp(*e, pat[i], pl);
        }
        if (match && !(ag->pass_env[ag->npass_env++] = strdup(*e)))
            return -1;
    }
    return 0;
}

static int agent_main(int argc, char **argv)
{
    struct agent agent_ctx;
    struct agent *ag = &agent_ctx;
    memset(ag, 0, sizeof *ag);
    ag->opt.nslots = 10;
    ag->opt.max_frame = SP_DEFAULT_MAX_FRAME;
    ag->opt.max_output = 1u << 20;
    ag->opt.max_sessions = 8;
    ag->opt.session_buffer = 1u << 20;
    ag->opt.log_level = LOG_INFO;
    ag->opt.tls_handshake_timeout = 10;
    const char *listens[32];
    unsigned nlisten = 0;
    bool probe = false, json = false;
    const char *attach = NULL;
    double attach_timeout = 10;
    const char *pass_pat[64];
    unsigned npass_pat = 0;
    struct sp_err perr;
    rlimit_defaults(&ag->iso);
    ag->iso.uid_base = 20000;
    ag->iso.cg_pids = 4096;
    int c;
    uint64_t v;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_LISTEN:
            if (nlisten == sizeof listens / sizeof listens[0]) {
                fprintf(stderr, "slot-agent: too many --listen\n");
                return 2;
            }
            listens[nlisten++] = optarg;
            break;
        case OPT_STDIO: ag->opt.stdio = true; break;
        case OPT_SLOTS:
            if (parse_size(optarg, &v) < 0 || v < 1 || v > 4096) {
                fprintf(stderr, "slot-agent: --slots must be 1..4096\n");
                return 2;
            }
            ag->opt.nslots = (unsigned)v;
            break;
        case OPT_DATA: ag->opt.data_dir = optarg; break;
        case OPT_TOKEN: ag->opt.token_file = optarg; break;
        case OPT_INSECURE: ag->opt.insecure = true; break;
        case OPT_NO_WARM: ag->warm.off = true; break;
        case OPT_MAXFRAME:
            if (parse_size(optarg, &v) < 0 || v < 4096 || v > (1u << 30)) {
                fprintf(stderr, "slot-agent: --max-frame must be 4K..1G\n");
                return 2;
            }
            ag->opt.max_frame = (uint32_t)v;
            break;
        case OPT_MAXOUT:
            if (parse_size(optarg, &v) < 0) {
                fprintf(stderr, "slot-agent: bad --max-output\n");
                return 2;
            }
            ag->opt.max_output = v;
            break;
        case OPT_LOG:
            if (!strcmp(optarg, "debug"))
                ag->opt.log_level = LOG_DEBUG;
            else if (!strcmp(optarg, "info"))
                ag->opt.log_level = LOG_INFO;
            else if (!strcmp(optarg, "warn"))
                ag->opt.log_level = LOG_WARN;
            else if (!strcmp(optarg, "error"))
                ag->opt.log_level = LOG_ERROR;
            else {
                fprintf(stderr, "slot-agent: --log-level must be debug|info|warn|error\n");
                return 2;
            }
            break;
        case OPT_VERSION:
            printf("slot-agent %s (protocol %d)\n", AGENT_VERSION, SP_PROTOCOL_VERSION);
            return 0;
        case OPT_HELP: fputs(usage, stdout); return 0;
        case OPT_ISOLATION:
            if (strcmp(optarg, "required") && strcmp(optarg, "best_effort")) {
                fprintf(stderr, "slot-agent: --isolation must be required or best_effort\n");
                return 2;
            }
            ag->opt.isolation_required = !strcmp(optarg, "required");
            break;
        case OPT_WITHOUT: {
            int r = 0;
            while (r < RUNG_COUNT && strcmp(rung_names[r], optarg) != 0)
                r++;
            if (r == RUNG_COUNT || r == RUNG_CONTAINMENT) {
                fprintf(stderr, "slot-agent: --without takes uid, namespaces, landlock, seccomp, "
                                "rlimits or cgroup\n");
                return 2;
            }
            ag->iso.disabled |= 1u << r;
            break;
        }
        case OPT_RLIMIT:
            if (rlimit_parse(&ag->iso, optarg, &perr) < 0) {
                fprintf(stderr, "slot-agent: %s\n", perr.msg);
                return 2;
            }
            break;
        case OPT_UIDBASE:
            if (parse_size(optarg, &v) < 0 || v < 1 || v > 0xfff00000u) {
                fprintf(stderr, "slot-agent: --slot-uid-base must be 1..4293918720\n");
                return 2;
            }
            ag->iso.uid_base = (unsigned)v;
            break;
        case OPT_SECCOMP_DENY: {
            char *list = strdup(optarg), *save = NULL;
            for (char *t = list ? strtok_r(list, ", ", &save) : NULL; t;
                 t = strtok_r(NULL, ", ", &save)) {
                if (seccomp_check_name(t, &perr) < 0) {
                    fprintf(stderr, "slot-agent: --seccomp-deny: %s\n", perr.msg);
                    free(list);
                    return 2;
                }
                if (ag->iso.nseccomp_deny == sizeof ag->iso.seccomp_deny / sizeof(char *)) {
                    fprintf(stderr, "slot-agent: --seccomp-deny: too many calls\n");
                    free(list);
                    return 2;
                }
                ag->iso.seccomp_deny[ag->iso.nseccomp_deny++] = strdup(t);
            }
            free(list);
            break;
        }
        case OPT_SLOT_MEMORY:
        case OPT_SLOT_PIDS:
            if (parse_size(optarg, &v) < 0) {
                fprintf(stderr, "slot-agent: bad --%s\n",
                        c == OPT_SLOT_MEMORY ? "slot-memory" : "slot-pids");
                return 2;
            }
            *(c == OPT_SLOT_MEMORY ? &ag->iso.cg_memory : &ag->iso.cg_pids) = v;
            break;
        case OPT_CONFIG: break; /* read before the others */
        case OPT_ATTACH: attach = optarg; break;
        case OPT_ATTACH_TIMEOUT: {
            char *end;
            attach_timeout = strtod(optarg, &end);
            if (*end || !(attach_timeout >= 0 && attach_timeout <= 86400)) {
                fprintf(stderr, "slot-agent: --attach-timeout takes seconds (0..86400)\n");
                return 2;
            }
            break;
        }
        case OPT_PASS_ENV: {
            size_t l = strlen(optarg);
            const char *star = strchr(optarg, '*');
            if (!l || strchr(optarg, '=') || (star && star != optarg + l - 1) ||
                npass_pat == sizeof pass_pat / sizeof pass_pat[0]) {
                fprintf(stderr, "slot-agent: --pass-env takes NAME, PREFIX* or * (at most %zu)\n",
                        sizeof pass_pat / sizeof pass_pat[0]);
                return 2;
            }
            pass_pat[npass_pat++] = optarg;
            break;
        }
        case OPT_MAX_SESSIONS:
            if (parse_size(optarg, &v) < 0 || v > 4096) {
                fprintf(stderr, "slot-agent: --max-sessions must be 0..4096\n");
                return 2;
            }
            ag->opt.max_sessions = (unsigned)v;
            break;
        case OPT_SESSION_BUFFER:
            if (parse_size(optarg, &v) < 0 || v < 1024 || v > (1u << 30)) {
                fprintf(stderr, "slot-agent: --session-buffer must be 1K..1G\n");
                return 2;
            }
            ag->opt.session_buffer = v;
            break;
        case OPT_TEMPLATE_MODE:
            if (strcmp(optarg, "overlay") && strcmp(optarg, "copy")) {
                fprintf(stderr, "slot-agent: --template-mode is overlay or copy\n");
                return 2;
            }
            ag->opt.template_copy = !strcmp(optarg, "copy");
            break;
        case OPT_TEMPLATE_DEPTH:
            if (parse_size(optarg, &v) < 0 || v < 1 || v > 64) {
                fprintf(stderr, "slot-agent: --template-max-depth must be 1..64\n");
                return 2;
            }
            ag->opt.template_max_depth = (unsigned)v;
            break;
        case OPT_SHARE:
            if (add_share(ag, optarg) < 0)
                return 2;
            break;
        case OPT_SLOT_DISK:
        case OPT_SLOT_INODES:
        case OPT_DISK_RESERVE: {
            bool count = c == OPT_SLOT_INODES;
            uint64_t *dst = c == OPT_SLOT_DISK     ? &ag->opt.slot_disk
                            : c == OPT_SLOT_INODES ? &ag->opt.slot_inodes
                                                   : &ag->opt.disk_reserve;
            if (quota_parse(optarg, count, dst) < 0) {
                fprintf(stderr, "slot-agent: bad --%s '%s': want %s, or off\n",
                        c == OPT_SLOT_DISK     ? "slot-disk"
                        : c == OPT_SLOT_INODES ? "slot-inodes"
                                               : "disk-reserve",
                        optarg, count ? "a count (K, M)" : "a size (K, M, G, T)");
                return 2;
            }
            *(c == OPT_SLOT_DISK     ? &ag->opt.slot_disk_set
              : c == OPT_SLOT_INODES ? &ag->opt.slot_inodes_set
                                     : &ag->opt.disk_reserve_set) = true;
            break;
        }
        case OPT_DISK_INTERVAL: {
            char *end;
            errno = 0;
            unsigned long ms = strtoul(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-' || ms < 10 || ms > 60000) {
                fprintf(stderr, "slot-agent: bad --disk-interval '%s': want 10..60000 ms\n",
                        optarg);
                return 2;
            }
            ag->opt.disk_interval_ms = (unsigned)ms;
            break;
        }
        case OPT_DISK_MODE:
            if (!strcmp(optarg, "auto"))
                ag->opt.disk_mode = 0;
            else if (!strcmp(optarg, "fs"))
                ag->opt.disk_mode = 1;
            else if (!strcmp(optarg, "watch"))
                ag->opt.disk_mode = 2;
            else {
                fprintf(stderr, "slot-agent: bad --disk-mode '%s': auto, fs or watch\n", optarg);
                return 2;
            }
            break;
        case OPT_IDEM_MAX_KEYS:
            if (parse_size(optarg, &v) < 0 || v < 1 || v > (1u << 20)) {
                fprintf(stderr, "slot-agent: --idem-max-keys must be 1..1M\n");
                return 2;
            }
            ag->opt.idem_max_keys = (unsigned)v;
            break;
        case OPT_IDEM_MAX_BYTES:
            if (parse_size(optarg, &v) < 0 || v < 1) {
                fprintf(stderr, "slot-agent: bad --idem-max-bytes\n");
                return 2;
            }
            ag->opt.idem_max_bytes = v;
            break;
        case OPT_IDEM_WINDOW:
            if (parse_size(optarg, &v) < 0 || v < 1 || v > 86400) {
                fprintf(stderr, "slot-agent: --idem-window must be 1..86400 seconds\n");
                return 2;
            }
            ag->opt.idem_window = (double)v;
            break;
        case OPT_TLS_CERT: ag->opt.tls_cert = optarg; break;
        case OPT_TLS_KEY: ag->opt.tls_key = optarg; break;
        case OPT_TLS_CA: ag->opt.tls_ca = optarg; break;
        case OPT_TLS_NAME: ag->opt.tls_name = optarg; break;
        case OPT_TLS_HS_TIMEOUT: {
            char *end;
            double t = strtod(optarg, &end);
            if (*end || !(t >= 0.05 && t <= 3600)) {
                fprintf(stderr, "slot-agent: --tls-handshake-timeout takes seconds (0.05..3600)\n");
                return 2;
            }
            ag->opt.tls_handshake_timeout = t;
            break;
        }
        case OPT_PROBE: probe = true; break;
        case OPT_JSON: json = true; break;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "slot-agent: unexpected argument '%s'\n%s", argv[optind], usage);
        return 2;
    }
    /* A relay serves nobody itself: options meant for the agent behind the
     * socket (--slots, --data-dir...) are accepted and ignored, so one
     * template can serve both modes. */
    if (attach)
        return attach_main(attach, attach_timeout, &ag->opt);
    if (probe) {
        isolate_init(&ag->iso, ag->opt.nslots, &perr);
        char *pdd = ag->opt.data_dir ? strdup(ag->opt.data_dir) : default_data_dir();
        ag->data_dir = pdd ? absolute_dir(pdd) : NULL;
        free(pdd);
        workspace_view_check(ag);
        char view[4200];
        slots_view_template(ag, view, sizeof view);
        if (ag->data_dir)
            templates_probe(ag);
        quota_configure(ag);
        char disk[1100];
        quota_report(ag, json, disk, sizeof disk);
        /* This binary can listen with tls: (controllers check before they
         * ask for it). The disk fragment is where extra report lines go. */
        size_t dl = strlen(disk);
        snprintf(disk + dl, sizeof disk - dl, "%s",
                 json ? ", \"tls_listen\": true"
                      : "\nTLS: --listen tls: available (TLS 1.3, wolfSSL)");
        ag->shell = access("/bin/bash", X_OK) == 0 ? "/bin/bash" : "/bin/sh";
        if (getenv("SLOT_AGENT_NO_WARM") && !ag->warm.off) {
            ag->warm.off = true;
            snprintf(ag->warm.why, sizeof ag->warm.why, "turned off (SLOT_AGENT_NO_WARM)");
        }
        dl = strlen(disk);
        warm_probe_report(ag, json, disk + dl, sizeof disk - dl);
        free(ag->data_dir);
        ag->data_dir = NULL;
        isolate_report(&ag->iso, json, view, ag->tpl_overlay ? "overlay" : "copy", ag->tpl_why,
                       disk);
        cgroup_cleanup(&ag->iso, 0);
        isolate_free(&ag->iso);
        return 0;
    }
    if (!nlisten && !ag->opt.stdio) {
        fprintf(stderr, "slot-agent: nothing to serve: give --listen and/or --stdio\n%s", usage);
        return 2;
    }
    /* Output kept per stream must fit in an answer with both streams. */
    if (ag->opt.max_output > ag->opt.max_frame / 4)
        ag->opt.max_output = ag->opt.max_frame / 4;
    agent_log_set_level(ag->opt.log_level);
    if (getenv("SLOT_AGENT_NO_OPENAT2"))
        path_force_fallback(true);
    /* The test suites' switch for running whole suites on the cold path. */
    if (getenv("SLOT_AGENT_NO_WARM") && !ag->warm.off) {
        ag->warm.off = true;
        snprintf(ag->warm.why, sizeof ag->warm.why, "turned off (SLOT_AGENT_NO_WARM)");
    }
    ensure_std_fds();

    struct sp_err err;
    int rc = 1;
    char *dd = ag->opt.data_dir ? strdup(ag->opt.data_dir) : default_data_dir();
    ag->data_dir = dd ? absolute_dir(dd) : NULL;
    free(dd);
    if (!ag->data_dir) {
        fprintf(stderr, "slot-agent: cannot resolve the data dir\n");
        return 1;
    }
    if (ag->opt.token_file && read_token(ag, ag->opt.token_file, &err) < 0) {
        log_error("%s", err.msg);
        return 1;
    }
    ag->shell = access("/bin/bash", X_OK) == 0 ? "/bin/bash" : "/bin/sh";
    /* Landlock rulesets and many connections need descriptors; the hard
     * limit is ours to use. */
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    isolate_init(&ag->iso, ag->opt.nslots, &perr);
    workspace_view_check(ag);
    /* libseccomp's compiler leaves freed heap behind; give it back. */
    malloc_trim(0);
    for (int r = 0; r < RUNG_COUNT; r++)
        if (!(ag->iso.available & (1u << r)))
            log_info("isolation: %s unavailable: %s", rung_names[r], ag->iso.why[r]);
    if (getrandom(&ag->instance, sizeof ag->instance, 0) != sizeof ag->instance)
        ag->instance = (uint64_t)getpid() ^ ((uint64_t)time(NULL) << 20);
    ag->next_exec_id = 1;
    ag->next_session_id = 1;
    ag->pid = getpid();
    ag->op_stats = calloc(op_count, sizeof *ag->op_stats);
    ag->child_stack = child_stack_alloc();
    ag->devnull_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    sp_writer_init(&ag->null_writer, 0);
    if (ag->child_stack && ag->devnull_fd >= 0)
        warm_init(ag);
    if (!ag->op_stats || !ag->child_stack || ag->devnull_fd < 0) {
        log_error("start-up: out of resources");
        return 1;
    }
    /* Leftovers of commands (double forks, setsid daemons) come back to us,
     * not to init, so they can be found and killed. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        log_warn("cannot become a child subreaper: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);

    ag->loop = ev_default_loop(EVFLAG_AUTO | EVFLAG_NOENV);
    if (!ag->loop) {
        log_error("cannot initialise the event loop");
        return 1;
    }
    ev_set_userdata(ag->loop, ag);
    ag->started = ev_now(ag->loop);
    if (idem_init(ag, ag->opt.idem_max_keys, ag->opt.idem_max_bytes, ag->opt.idem_window) < 0) {
        log_error("start-up: out of memory");
        return 1;
    }
    quota_configure(ag);
    if (ag->opt.disk_mode == 1 && !ag->quota.fs) {
        log_error("--disk-mode fs: %s", ag->quota.why);
        goto out;
    }
    if (slots_init(ag, &err) < 0 || templates_init(ag, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    quota_start(ag);
    if (!strcmp(ag->quota.mechanism, "none"))
        log_info("no disk quota: --slot-disk and --slot-inodes are off");
    else
        log_info("disk quota: %s (slot disk %" PRIu64 ", files %" PRIu64 "%s%s)",
                 ag->quota.mechanism, ag->quota.budget, ag->quota.ibudget,
                 ag->quota.why[0] ? "; " : "", ag->quota.why);
    if (!ag->tpl_overlay)
        log_info("templates: copy mode (%s)", ag->tpl_why);
    bool want_tls = false;
    for (unsigned i = 0; i < nlisten; i++)
        want_tls |= !strncmp(listens[i], "tls:", 4);
    if (want_tls) {
        if (!ag->opt.tls_cert || !ag->opt.tls_key || !ag->opt.tls_ca) {
            log_error("a tls: listener needs --tls-cert, --tls-key and --tls-ca");
            goto out;
        }
        ag->tls =
            sp_tls_ctx_new(SP_TLS_SERVER, ag->opt.tls_cert, ag->opt.tls_key, ag->opt.tls_ca, &err);
        if (!ag->tls) {
            log_error("TLS: %s", err.msg);
            goto out;
        }
        char when[40] = "?";
        time_t na = sp_tls_ctx_not_after(ag->tls);
        struct tm tm;
        if (na && gmtime_r(&na, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
        if (na && na < time(NULL))
            log_warn("TLS: our certificate (CN=%s) expired at %s: clients will refuse it",
                     sp_tls_ctx_cn(ag->tls), when);
        else
            log_info("TLS: certificate CN=%s, notAfter %s", sp_tls_ctx_cn(ag->tls), when);
    } else if (ag->opt.tls_cert || ag->opt.tls_key || ag->opt.tls_ca) {
        log_warn("--tls-cert/--tls-key/--tls-ca are used by tls: listeners only; none given");
    }
    if (listeners_open(ag, listens, nlisten, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    if (ag->opt.stdio && conn_open_stdio(ag, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    ev_child_init(&ag->child_w, child_cb, 0, 0);
    ag->child_w.data = ag;
    ev_child_start(ag->loop, &ag->child_w);
    ev_signal_init(&ag->sig_term, signal_cb, SIGTERM);
    ev_signal_init(&ag->sig_int, signal_cb, SIGINT);
    ag->sig_term.data = ag->sig_int.data = ag;
    ev_signal_start(ag->loop, &ag->sig_term);
    ev_signal_start(ag->loop, &ag->sig_int);
    ev_signal_init(&ag->sig_hup, hup_cb, SIGHUP);
    ag->sig_hup.data = ag;
    ev_signal_start(ag->loop, &ag->sig_hup);
    ev_timer_init(&ag->sweep_w, sweep_cb, 1.0, 1.0);
    ag->sweep_w.data = ag;
    ev_timer_start(ag->loop, &ag->sweep_w);
    log_info("slot-agent %s: %u slots in %s%s", AGENT_VERSION, ag->nslots, ag->data_dir,
             ag->token_len ? ", token required" : "");

    if (pass_env_init(ag, pass_pat, npass_pat) < 0) {
        log_error("out of memory");
        goto out;
    }
    ev_run(ag->loop, 0);
    rc = 0;
out:
    exec_kill_all(ag);
    quota_stop_watch(ag);
    conns_close_all(ag);
    listeners_close(ag);
    /* Before the requests still held go: none of them finds its key. */
    idem_free(ag);
    exec_free_all(ag);
    uploads_sweep(ag, true);
    builds_free(ag);
    ws_jobs_free(ag);
    templates_free_slots(ag);
    warm_free(ag);
    slots_free(ag);
    templates_free(ag);
    slotfs_unmount_all(ag);
    cgroup_cleanup(&ag->iso, ag->nslots);
    sp_writer_free(&ag->null_writer);
    isolate_free(&ag->iso);
    sp_tls_ctx_free(ag->tls);
    free(ag->op_stats);
    free(ag->data_dir);
    for (unsigned i = 0; i < ag->npass_env; i++)
        free(ag->pass_env[i]);
    free(ag->pass_env);
    for (unsigned i = 0; i < 2 * ag->opt.nshares; i++)
        free(ag->opt.shares[i]);
    if (ag->devnull_fd >= 0)
        close(ag->devnull_fd);
    log_info("exit %d", rc);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--fs-guardian"))
        return slotfs_guardian_main(argc, argv);
    const char *cfg = NULL;
    for (int i = 1; i < argc; i++) {
        const char *c = NULL;
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            c = argv[++i];
        else if (!strncmp(argv[i], "--config=", 9))
            c = argv[i] + 9;
        if (c && cfg) {
            fprintf(stderr, "slot-agent: --config given twice\n");
            return 2;
        }
        if (c)
            cfg = c;
    }
    char **cfg_argv = NULL, **cfg_owned = NULL;
    if (cfg) {
        if (config_load(cfg, argc, argv, &argc, &cfg_argv, &cfg_owned) < 0)
            return 2;
        argv = cfg_argv;
    }
    int rc = agent_main(argc, argv);
    config_free(cfg_argv, cfg_owned);
    return rc;
}
