/* bench-agent-exec: throughput, latency, CPU and memory of slot-agent's
 * `exec`, against the floor of spawning the same command directly from this
 * process (posix_spawn of /bin/bash -c CMD, stdout/stderr to drained pipes,
 * waitpid), both measured in the same run at the same concurrency.
 *
 * The bench starts its own agent in a fresh temp dir (Unix socket, 32 slots)
 * and removes it afterwards, also on failure paths and on SIGINT/SIGTERM.
 * Every answer is validated (ok, exit_code 0, the expected stdout size);
 * failures are counted and the first few printed. Figures and target
 * comparisons are printed ("ok"/"MISS"); timings are never asserted: the
 * exit status is 0 unless the setup fails (agent cannot be started or
 * reached, dies, or stops answering). See tests/bench/README.md.
 *
 * --tls DIR instead compares TLS 1.3 links (proto/tls.c) with plaintext TCP
 * on one agent listening on both, and prints JSON for tests/bench/tls.py. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "slotproto.h"
#include "tls.h"

extern char **environ;

#define MAX_LEVELS 8
#define MAX_CONC 256
#define MAX_RESULTS 96
#define WARMUP_OPS 200
#define WARMUP_CONC 8
/* The agent's warm-up reaches every slot the levels use, so that no level
 * pays for starting slot boxes and warm shells. */
#define WARMUP_AGENT_CONC(b) ((b)->top_level < NSLOTS ? (b)->top_level : NSLOTS)
/* a busy host: the agent's start-up (a filesystem per slot) alone can take seconds */
#define START_TIMEOUT_S 30.0
#define STOP_TIMEOUT_S 5.0
#define STALL_TIMEOUT_S 30.0
#define RSS_SAMPLE_S 0.002
#define ERRORS_SHOWN 10
#define NSLOTS 32

struct workload {
    const char *name;
    const char *cmd;
    size_t stdout_bytes; /* expected on stdout */
};

static const struct workload workloads[] = {
    {"true", "true", 0},
    {"64KiB", "head -c 65536 /dev/zero", 65536},
};
#define NWORKLOADS (sizeof workloads / sizeof workloads[0])

/* Agent isolation settings. The first is the agent with its defaults (every
 * rung the host supports); the others only run with --rungs. A variant that
 * is not `full` runs only the first workload at concurrency 1. */
struct variant {
    const char *name;
    bool off; /* every rung but `name` switched off (--without) */
    bool full;
    bool no_warm; /* --no-warm: every command a new shell */
};

static const char *const rungs[] = {"uid",     "namespaces", "landlock",
                                    "seccomp", "rlimits",    "cgroup"};
#define NRUNGS (sizeof rungs / sizeof rungs[0])

/* "default": every rung the host has (and the warm path); "cold": the
 * same with --no-warm; "off": no rung; a rung name: that one. The first two
 * always run, the others with --rungs. */
static const struct variant variants[] = {
    {"default", false, true, false},    {"cold", false, true, true},
    {"off", true, true, false},         {"uid", true, false, false},
    {"namespaces", true, false, false}, {"landlock", true, false, false},
    {"seccomp", true, false, false},    {"rlimits", true, false, false},
    {"cgroup", true, false, false},
};
#define NMAIN_VARIANTS 2
#define NVARIANTS (sizeof variants / sizeof variants[0])

struct result {
    const char *workload;
    const char *side; /* "floor" or "agent" */
    const char *variant;
    int conc;
    int ops;
    unsigned errors;
    double secs, ops_s, p50_ms, p99_ms, max_ms;
    double cpu_s; /* floor: this process; agent: the agent process */
};

/* One side of one level, gathered over its blocks (see measure_level). */
struct acc {
    double *lat;
    int n;
    double secs, cpu_s;
    int cpu_n; /* operations of the blocks whose CPU could be read */
    unsigned errors;
};

struct agent {
    pid_t pid;
    char dir[PATH_MAX];
    char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

struct bench {
    const char *agent_bin;
    int ops;
    int levels[MAX_LEVELS];
    int nlevels;
    int top_level; /* highest concurrency: RSS is sampled there */
    bool json;
    bool rungs;
    bool bwrap;             /* also the floor wrapped in bubblewrap, as sandbox servers do */
    const char *floor_side; /* "floor", or "bwrap" while that runs */
    long clk_tck;
    char **child_env;
    posix_spawnattr_t attr;
    struct agent ag;
    const char *variant;
    bool sample_rss;
    double last_rss_sample;
    long rss_idle_kb, rss_after_kb, rss_peak_kb, rss_hwm_kb;
    unsigned errors_shown;
    unsigned long errors_total;
    struct result res[MAX_RESULTS];
    int nres;
};

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static double percentile(const double *sorted, int n, double q)
{
    if (n <= 0)
        return 0;
    int k = (int)ceil(q * n) - 1;
    if (k < 0)
        k = 0;
    if (k >= n)
        k = n - 1;
    return sorted[k];
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

/* utime + stime of pid in clock ticks (fields 14 and 15 of /proc/PID/stat),
 * -1 when unreadable. */
static long long proc_cpu_ticks(pid_t pid);

/* CPU of the agent's warm shells (its children running the warm builtin):
 * each warm exec's fork is theirs, so it counts as the agent's. */
static long long warm_cpu_ticks(pid_t agent)
{
    char path[96], buf[8192];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)agent, (int)agent);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    long long sum = 0;
    for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
        char cpath[64], cmd[256];
        snprintf(cpath, sizeof cpath, "/proc/%s/cmdline", tok);
        int cf = open(cpath, O_RDONLY | O_CLOEXEC);
        if (cf < 0)
            continue;
        ssize_t k = read(cf, cmd, sizeof cmd - 1);
        close(cf);
        if (k <= 0)
            continue;
        for (ssize_t i = 0; i < k; i++)
            if (!cmd[i])
                cmd[i] = ' ';
        cmd[k] = 0;
        long long t;
        if (strstr(cmd, "__slot_warm serve") && (t = proc_cpu_ticks((pid_t)atoi(tok))) > 0)
            sum += t;
    }
    return sum;
}

static long long proc_cpu_ticks(pid_t pid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    /* comm may hold spaces and parentheses: fields restart after the last ')'. */
    const char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long long ut, st;
    /* field 3 (state) .. 13 (cmajflt), then 14 utime, 15 stime */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (long long)(ut + st);
}

/* A "Key:   N kB" line of /proc/PID/status, in KiB; -1 when unreadable. */
static long proc_status_kb(pid_t pid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    long kb = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, key, kl) && line[kl] == ':') {
            kb = strtol(line + kl + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb;
}

static void sample_rss(struct bench *b, bool force)
{
    if (!b->sample_rss)
        return;
    double t = now();
    if (!force && t - b->last_rss_sample < RSS_SAMPLE_S)
        return;
    b->last_rss_sample = t;
    long kb = proc_status_kb(b->ag.pid, "VmRSS");
    if (kb > b->rss_peak_kb)
        b->rss_peak_kb = kb;
}

static void note_error(struct bench *b, const char *side, const char *workload, int conc,
                       const char *why)
{
    b->errors_total++;
    if (b->errors_shown++ < ERRORS_SHOWN)
        fprintf(stderr, "bench: %s %s c=%d: %s\n", side, workload, conc, why);
    else if (b->errors_shown == ERRORS_SHOWN + 1)
        fprintf(stderr, "bench: (further errors only counted)\n");
}

static struct result *add_result(struct bench *b, const char *workload, const char *side, int conc,
                                 double *lat, int n, double secs, double cpu_s, unsigned errors)
{
    if (b->nres >= MAX_RESULTS)
        return NULL;
    struct result *r = &b->res[b->nres++];
    qsort(lat, (size_t)n, sizeof *lat, cmp_double);
    *r = (struct result){
        .workload = workload,
        .side = side,
        .variant = !strcmp(side, "bwrap") ? "-" : b->variant, /* a floor: the agent beside it */
        .conc = conc,
        .ops = n,
        .errors = errors,
        .secs = secs,
        .ops_s = secs > 0 ? n / secs : 0,
        .p50_ms = percentile(lat, n, 0.50) * 1e3,
        .p99_ms = percentile(lat, n, 0.99) * 1e3,
        .max_ms = n ? lat[n - 1] * 1e3 : 0,
        .cpu_s = cpu_s,
    };
    return r;
}

/* ---- floor: this process spawns the command itself --------------------- */

struct fchild {
    pid_t pid;
    int fd[2]; /* stdout, stderr read ends; -1 at EOF */
    size_t out_bytes;
    double t0;
    bool busy;
};

static int floor_spawn(struct bench *b, const char *cmd, struct fchild *ch)
{
    int out[2], err[2];
    ch->t0 = now();
    if (pipe2(out, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(err, O_CLOEXEC) < 0) {
        close(out[0]);
        close(out[1]);
        return -1;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    char *argv[] = {"/bin/bash", "-c", (char *)cmd, NULL};
    /* What a server that wraps every command in bubblewrap runs: fresh
     * namespaces (user, mount, PID, network, IPC, UTS, cgroup) per command. */
    char *bw[] = {"bwrap",
                  "--ro-bind",
                  "/",
                  "/",
                  "--dev",
                  "/dev",
                  "--proc",
                  "/proc",
                  "--tmpfs",
                  "/tmp",
                  "--unshare-all",
                  "--die-with-parent",
                  "--new-session",
                  "/bin/bash",
                  "-c",
                  (char *)cmd,
                  NULL};
    bool wrap = !strcmp(b->floor_side, "bwrap");
    int rc = wrap ? posix_spawnp(&ch->pid, "bwrap", &fa, &b->attr, bw, b->child_env)
                  : posix_spawn(&ch->pid, "/bin/bash", &fa, &b->attr, argv, b->child_env);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    if (rc != 0) {
        close(out[0]);
        close(err[0]);
        errno = rc;
        return -1;
    }
    /* only our ends are non-blocking; the child's stay blocking */
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    ch->fd[0] = out[0];
    ch->fd[1] = err[0];
    ch->out_bytes = 0;
    ch->busy = true;
    return 0;
}

/* Runs ops commands keeping conc in flight; records a result when record.
 * 0, or -1 when interrupted or nothing can be spawned. */
static int run_floor(struct bench *b, const struct workload *w, int conc, int ops, struct acc *acc)
{
    struct fchild *ch = calloc((size_t)conc, sizeof *ch);
    double *lat = calloc((size_t)ops, sizeof *lat);
    struct pollfd *pfd = calloc((size_t)conc * 2, sizeof *pfd);
    int *owner = calloc((size_t)conc * 2, sizeof *owner);
    static char sink[1 << 16];
    char why[160];
    int started = 0, done = 0, rc = 0;
    unsigned errors = 0;
    if (!ch || !lat || !pfd || !owner) {
        rc = -1;
        goto out;
    }
    double cpu0 = self_cpu_s(), t0 = now();
    while (done < ops) {
        if (g_stop) {
            rc = -1;
            break;
        }
        for (int i = 0; i < conc && started < ops; i++) {
            if (ch[i].busy)
                continue;
            if (floor_spawn(b, w->cmd, &ch[i]) < 0) {
                fprintf(stderr, "bench: posix_spawn /bin/bash: %s\n", strerror(errno));
                rc = -1;
                goto drain;
            }
            started++;
        }
        int np = 0;
        for (int i = 0; i < conc; i++)
            for (int k = 0; k < 2; k++)
                if (ch[i].busy && ch[i].fd[k] >= 0) {
                    pfd[np] = (struct pollfd){.fd = ch[i].fd[k], .events = POLLIN};
                    owner[np++] = i * 2 + k;
                }
        if (poll(pfd, (nfds_t)np, 1000) < 0 && errno != EINTR) {
            rc = -1;
            break;
        }
        for (int j = 0; j < np; j++) {
            if (!pfd[j].revents)
                continue;
            struct fchild *c = &ch[owner[j] / 2];
            int k = owner[j] % 2;
            ssize_t n;
            while ((n = read(c->fd[k], sink, sizeof sink)) > 0)
                if (k == 0)
                    c->out_bytes += (size_t)n;
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                close(c->fd[k]);
                c->fd[k] = -1;
            }
            if (c->fd[0] >= 0 || c->fd[1] >= 0)
                continue;
            /* both streams at EOF: the command is exiting; reap it */
            int st = 0;
            while (waitpid(c->pid, &st, 0) < 0 && errno == EINTR)
                ;
            lat[done++] = now() - c->t0;
            c->busy = false;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || c->out_bytes != w->stdout_bytes) {
                errors++;
                snprintf(why, sizeof why, "status 0x%x, %zu bytes on stdout (want %zu)", st,
                         c->out_bytes, w->stdout_bytes);
                if (acc)
                    note_error(b, b->floor_side, w->name, conc, why);
            }
        }
    }
    if (rc == 0 && acc) {
        memcpy(acc->lat + acc->n, lat, (size_t)done * sizeof *lat);
        acc->n += done;
        acc->secs += now() - t0;
        acc->cpu_s += self_cpu_s() - cpu0;
        acc->cpu_n += done;
        acc->errors += errors;
    }
drain:
    for (int i = 0; i < conc; i++) {
        if (!ch[i].busy)
            continue;
        for (int k = 0; k < 2; k++)
            if (ch[i].fd[k] >= 0)
                close(ch[i].fd[k]);
        kill(ch[i].pid, SIGKILL);
        waitpid(ch[i].pid, NULL, 0);
    }
out:
    free(ch);
    free(lat);
    free(pfd);
    free(owner);
    return rc;
}

/* ---- agent: exec requests over Unix sockets --------------------------- */

struct aconn {
    int fd;
    int slot;
    struct sp_reader rd;
    struct sp_writer wr;
    uint64_t id;
    double t0;
    bool busy;
};

static int connect_unix(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* After a connection failure: say so when the agent itself is gone. */
static void explain_agent_loss(struct bench *b)
{
    int st = 0;
    if (b->ag.pid > 0 && waitpid(b->ag.pid, &st, WNOHANG) == b->ag.pid) {
        if (WIFSIGNALED(st))
            fprintf(stderr, "bench: the agent died of signal %d\n", WTERMSIG(st));
        else
            fprintf(stderr, "bench: the agent exited with status %d\n", WEXITSTATUS(st));
        b->ag.pid = 0;
    }
}

static int queue_exec(struct aconn *c, const char *cmd)
{
    msgpack_packer pk;
    struct sp_err err;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, ++c->id, "exec", true);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "slot", (uint64_t)c->slot);
    sp_pack_kv_str(&pk, "cmd", cmd);
    if (sp_writer_end_frame(&c->wr, &err) < 0)
        return -1;
    c->t0 = now();
    c->busy = true;
    return sp_writer_flush(&c->wr, c->fd) < 0 ? -1 : 0;
}

static const char *str_or(const msgpack_object *map, const char *key, char *buf, size_t cap)
{
    const char *s;
    size_t n;
    struct sp_err err;
    if (map && sp_get_str(map, key, true, &s, &n, &err) == 1) {
        snprintf(buf, cap, "%.*s", (int)(n < cap ? n : cap - 1), s);
        return buf;
    }
    return "?";
}

/* Classify one frame: 1 the final answer and good, 0 the final answer and
 * bad (why says how), 2 a stream event (not final). */
static int check_answer(const char *data, uint32_t len, uint64_t want_id, size_t want_stdout,
                        char *why, size_t whylen)
{
    msgpack_unpacked u;
    struct sp_err err;
    int rc = 0;
    msgpack_unpacked_init(&u);
    if (sp_unpack(data, len, &u, &err) < 0 || u.data.type != MSGPACK_OBJECT_MAP) {
        snprintf(why, whylen, "undecodable answer (%u bytes)", len);
        goto out;
    }
    const msgpack_object *root = &u.data;
    if (sp_map_get(root, "event")) {
        rc = 2;
        goto out;
    }
    uint64_t id = 0;
    bool ok = false;
    if (sp_get_uint(root, "id", true, &id, &err) < 0 ||
        sp_get_bool(root, "ok", true, &ok, &err) < 0) {
        snprintf(why, whylen, "malformed answer: %.300s", err.msg);
        goto out;
    }
    if (id != want_id) {
        snprintf(why, whylen, "answer id %llu, expected %llu", (unsigned long long)id,
                 (unsigned long long)want_id);
        goto out;
    }
    if (!ok) {
        const msgpack_object *e = NULL;
        char code[64], msg[200];
        sp_get_map(root, "error", false, &e, &err);
        snprintf(why, whylen, "error %s: %s", str_or(e, "code", code, sizeof code),
                 str_or(e, "message", msg, sizeof msg));
        goto out;
    }
    const msgpack_object *res = NULL;
    int64_t exit_code = -1;
    uint64_t out_bytes = 0;
    const char *out_data = NULL;
    size_t out_len = 0;
    bool timed_out = false;
    if (sp_get_map(root, "result", true, &res, &err) < 0 ||
        sp_get_int(res, "exit_code", true, &exit_code, &err) < 0 ||
        sp_get_uint(res, "stdout_bytes", true, &out_bytes, &err) < 0 ||
        sp_get_bin(res, "stdout", true, &out_data, &out_len, &err) < 0 ||
        sp_get_bool(res, "timed_out", false, &timed_out, &err) < 0) {
        snprintf(why, whylen, "malformed result: %.300s", err.msg);
        goto out;
    }
    if (exit_code != 0 || timed_out || out_bytes != want_stdout || out_len != want_stdout) {
        snprintf(why, whylen, "exit_code %lld%s, stdout_bytes %llu, stdout %zu bytes (want %zu)",
                 (long long)exit_code, timed_out ? " (timed out)" : "",
                 (unsigned long long)out_bytes, out_len, want_stdout);
        goto out;
    }
    rc = 1;
out:
    msgpack_unpacked_destroy(&u);
    return rc;
}

static int run_agent(struct bench *b, const struct workload *w, int conc, int ops, struct acc *acc)
{
    struct aconn *cs = calloc((size_t)conc, sizeof *cs);
    double *lat = calloc((size_t)ops, sizeof *lat);
    struct pollfd *pfd = calloc((size_t)conc, sizeof *pfd);
    char why[400];
    int started = 0, done = 0, rc = 0, nconn = 0;
    unsigned errors = 0;
    if (!cs || !lat || !pfd) {
        rc = -1;
        goto out;
    }
    for (; nconn < conc; nconn++) {
        struct aconn *c = &cs[nconn];
        c->fd = connect_unix(b->ag.sock);
        if (c->fd < 0) {
            fprintf(stderr, "bench: connect %s: %s\n", b->ag.sock, strerror(errno));
            explain_agent_loss(b);
            rc = -1;
            goto out;
        }
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        c->slot = nconn % NSLOTS;
        sp_reader_init(&c->rd, SP_DEFAULT_MAX_FRAME);
        sp_writer_init(&c->wr, 0);
    }
    long long ticks0 = proc_cpu_ticks(b->ag.pid);
    long long wticks0 = warm_cpu_ticks(b->ag.pid);
    double t0 = now(), progress = t0;
    while (done < ops) {
        if (g_stop) {
            rc = -1;
            break;
        }
        for (int i = 0; i < conc && started < ops; i++) {
            if (cs[i].busy)
                continue;
            if (queue_exec(&cs[i], w->cmd) < 0) {
                fprintf(stderr, "bench: sending to the agent: %s\n", strerror(errno));
                rc = -1;
                goto out;
            }
            started++;
        }
        for (int i = 0; i < conc; i++)
            pfd[i] = (struct pollfd){
                .fd = cs[i].fd,
                .events = (short)(POLLIN | (sp_writer_pending(&cs[i].wr) ? POLLOUT : 0)),
            };
        int n = poll(pfd, (nfds_t)conc, 1000);
        if (n < 0 && errno != EINTR) {
            rc = -1;
            break;
        }
        if (now() - progress > STALL_TIMEOUT_S) {
            fprintf(stderr, "bench: no answer from the agent for %.0f s (%d of %d outstanding)\n",
                    STALL_TIMEOUT_S, started - done, conc);
            rc = -1;
            break;
        }
        for (int i = 0; i < conc && n > 0; i++) {
            struct aconn *c = &cs[i];
            if (!pfd[i].revents)
                continue;
            if ((pfd[i].revents & POLLOUT) && sp_writer_flush(&c->wr, c->fd) < 0) {
                fprintf(stderr, "bench: sending to the agent: %s\n", strerror(errno));
                rc = -1;
                goto out;
            }
            if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t got = sp_reader_fill(&c->rd, c->fd);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                fprintf(stderr, "bench: the agent closed connection %d (%s) with %s outstanding\n",
                        i, got == 0 ? "EOF" : strerror(errno), c->busy ? "a request" : "nothing");
                sleep_s(0.05);
                explain_agent_loss(b);
                rc = -1;
                goto out;
            }
            const char *data;
            uint32_t len;
            struct sp_err err;
            int r;
            while ((r = sp_reader_next(&c->rd, &data, &len, &err)) == 1) {
                int v = check_answer(data, len, c->id, w->stdout_bytes, why, sizeof why);
                if (v == 2)
                    continue;
                if (!c->busy) {
                    if (acc)
                        note_error(b, "agent", w->name, conc, "unsolicited answer");
                    continue;
                }
                lat[done++] = now() - c->t0;
                c->busy = false;
                progress = now();
                if (v == 0) {
                    errors++;
                    if (acc) {
                        char where[sizeof why + 32];
                        snprintf(where, sizeof where, "slot %d: %s", c->slot, why);
                        note_error(b, "agent", w->name, conc, where);
                    }
                }
            }
            if (r < 0) {
                fprintf(stderr, "bench: bad frame from the agent: %s\n", err.msg);
                rc = -1;
                goto out;
            }
        }
        sample_rss(b, false);
    }
    if (rc == 0 && acc) {
        double secs = now() - t0;
        long long ticks1 = proc_cpu_ticks(b->ag.pid);
        if (ticks0 >= 0 && ticks1 >= 0) {
            ticks0 += wticks0;
            ticks1 += warm_cpu_ticks(b->ag.pid);
        }
        double cpu =
            ticks0 >= 0 && ticks1 >= ticks0 ? (double)(ticks1 - ticks0) / (double)b->clk_tck : NAN;
        sample_rss(b, true);
        memcpy(acc->lat + acc->n, lat, (size_t)done * sizeof *lat);
        acc->n += done;
        acc->secs += secs;
        if (!isnan(cpu)) {
            acc->cpu_s += cpu;
            acc->cpu_n += done;
        }
        acc->errors += errors;
    }
out:
    for (int i = 0; i < nconn; i++) {
        close(cs[i].fd);
        sp_reader_free(&cs[i].rd);
        sp_writer_free(&cs[i].wr);
    }
    free(cs);
    free(lat);
    free(pfd);
    return rc;
}

/* ---- the agent process -------------------------------------------------- */

static bool rm_quiet;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if ((flag == FTW_DP ? rmdir(path) : unlink(path)) < 0 && errno != ENOENT && !rm_quiet)
        fprintf(stderr, "bench: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

static void remove_tree(const char *dir)
{
    if (!dir[0])
        return;
    /* The agent's filesystem guardian may still be unmounting the slots'
     * filesystems after the agent exited: try again for a few seconds,
     * and only the last try's failures are reported. */
    rm_quiet = true;
    for (int i = 0; i < 50; i++) {
        nftw(dir, rm_entry, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
        if (access(dir, F_OK) < 0)
            break;
        sleep_s(0.1);
    }
    rm_quiet = false;
    if (access(dir, F_OK) == 0)
        nftw(dir, rm_entry, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

/* Waits up to timeout for pid to exit; 1 when reaped (status in *st). */
static int reap_within(pid_t pid, double timeout, int *st)
{
    double end = now() + timeout;
    do {
        pid_t r = waitpid(pid, st, WNOHANG);
        if (r == pid || (r < 0 && errno == ECHILD))
            return 1;
        sleep_s(0.005);
    } while (now() < end);
    return 0;
}

static void stop_agent(struct bench *b)
{
    struct agent *ag = &b->ag;
    if (ag->pid > 0) {
        int st = 0;
        kill(ag->pid, SIGTERM);
        if (!reap_within(ag->pid, STOP_TIMEOUT_S, &st)) {
            fprintf(stderr, "bench: agent %d ignored SIGTERM for %.0f s; SIGKILL\n", (int)ag->pid,
                    STOP_TIMEOUT_S);
            kill(ag->pid, SIGKILL);
            waitpid(ag->pid, &st, 0);
        } else if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0) &&
                   !(WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM)) {
            fprintf(stderr, "bench: agent exited with status 0x%x after SIGTERM\n", st);
        }
        ag->pid = 0;
    }
    remove_tree(ag->dir);
    ag->dir[0] = 0;
}

static int start_agent(struct bench *b, const struct variant *v)
{
    struct agent *ag = &b->ag;
    /* Not /tmp: a data dir there keeps /tmp shared inside the slot boxes,
     * and the full ladder (private /tmp) is what is measured. */
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/var/tmp";
    if (snprintf(ag->dir, sizeof ag->dir, "%s/slot-bench-XXXXXX", tmp) >= (int)sizeof ag->dir ||
        !mkdtemp(ag->dir)) {
        fprintf(stderr, "bench: cannot create a temp dir in %s: %s\n", tmp, strerror(errno));
        ag->dir[0] = 0;
        return -1;
    }
    /* Slot users must be able to walk down to their workspaces. */
    chmod(ag->dir, 0755);
    if (snprintf(ag->sock, sizeof ag->sock, "%s/a.sock", ag->dir) >= (int)sizeof ag->sock) {
        fprintf(stderr, "bench: socket path under %s is too long; set TMPDIR\n", ag->dir);
        return -1;
    }
    char listen[sizeof ag->sock + 8], data[PATH_MAX + 8];
    snprintf(listen, sizeof listen, "unix:%s", ag->sock);
    snprintf(data, sizeof data, "%s/data", ag->dir);
    char *argv[24];
    int n = 0;
    argv[n++] = (char *)b->agent_bin;
    argv[n++] = "--listen";
    argv[n++] = listen;
    argv[n++] = "--slots";
    argv[n++] = "32";
    argv[n++] = "--data-dir";
    argv[n++] = data;
    argv[n++] = "--log-level";
    argv[n++] = "warn";
    if (v->no_warm)
        argv[n++] = "--no-warm";
    for (size_t i = 0; v->off && i < NRUNGS; i++)
        if (strcmp(rungs[i], v->name) != 0) {
            argv[n++] = "--without";
            argv[n++] = (char *)rungs[i];
        }
    argv[n] = NULL;
    posix_spawnattr_t attr;
    sigset_t def;
    posix_spawnattr_init(&attr);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    posix_spawnattr_setsigdefault(&attr, &def);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    int rc = posix_spawn(&ag->pid, b->agent_bin, NULL, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
        fprintf(stderr, "bench: cannot run %s: %s\n", b->agent_bin, strerror(rc));
        ag->pid = 0;
        return -1;
    }
    double end = now() + START_TIMEOUT_S;
    while (!g_stop && now() < end) {
        int st;
        if (waitpid(ag->pid, &st, WNOHANG) == ag->pid) {
            fprintf(stderr, "bench: the agent exited during start-up (status 0x%x)\n", st);
            ag->pid = 0;
            return -1;
        }
        int fd = connect_unix(ag->sock);
        if (fd >= 0) {
            close(fd);
            return 0;
        }
        sleep_s(0.01);
    }
    fprintf(stderr, "bench: the agent did not listen on %s within %.0f s\n", ag->sock,
            START_TIMEOUT_S);
    return -1;
}

/* ---- report ------------------------------------------------------------- */

static const struct result *find(const struct bench *b, const char *workload, const char *side,
                                 const char *variant, int conc)
{
    for (int i = 0; i < b->nres; i++) {
        const struct result *r = &b->res[i];
        if (!strcmp(r->workload, workload) && !strcmp(r->side, side) && r->conc == conc &&
            (!variant || !strcmp(r->variant, variant)))
            return r;
    }
    return NULL;
}

static double cpu_ms_per_op(const struct result *r)
{
    return r->ops ? r->cpu_s / r->ops * 1e3 : NAN;
}

/* CPU per op over every level of one workload and side: more clock ticks,
 * less quantisation than any single level. */
static double cpu_ms_all_levels(const struct bench *b, const char *workload, const char *side,
                                const char *variant)
{
    double cpu = 0;
    long ops = 0;
    for (int i = 0; i < b->nres; i++) {
        const struct result *r = &b->res[i];
        if (!strcmp(r->workload, workload) && !strcmp(r->side, side) &&
            (!variant || !strcmp(r->variant, variant))) {
            cpu += r->cpu_s;
            ops += r->ops;
        }
    }
    return ops ? cpu / (double)ops * 1e3 : NAN;
}

struct target {
    char name[96];
    const char *workload;
    double value, limit;
    double base; /* ops/s targets: the floor's */
    const char *unit;
    bool ok;
    bool have;
    bool absolute; /* ms: value against limit, not a difference */
};

#define MAX_TARGETS 24

/* The goals of the warm path (issue 20) and of the cold one beside it:
 * warm `true` at c=1 at most half the floor's p50 and at the highest level
 * at least 1.5x its throughput; cold within 0.1 ms of the floor's p50 and at
 * least 95% of its throughput. */
static int collect_targets(const struct bench *b, struct target *t)
{
    int n = 0;
    int hi = b->top_level;
    for (size_t wi = 0; wi < NWORKLOADS; wi++) {
        const char *w = workloads[wi].name;
        /* Each agent against the floor measured beside it. */
        const struct result *f1 = find(b, w, "floor", "default", 1);
        const struct result *fh = find(b, w, "floor", "default", hi);
        const struct result *g1 = find(b, w, "floor", "cold", 1);
        const struct result *gh = find(b, w, "floor", "cold", hi);
        const struct result *w1 = find(b, w, "agent", "default", 1);
        const struct result *wh = find(b, w, "agent", "default", hi);
        const struct result *c1 = find(b, w, "agent", "cold", 1);
        const struct result *ch = find(b, w, "agent", "cold", hi);
        if (!strcmp(w, "true")) {
            t[n] = (struct target){.workload = w, .unit = "ms", .have = f1 && w1, .absolute = true};
            snprintf(t[n].name, sizeof t[n].name, "warm p50 at c=1 <= floor p50 / 2");
            if (t[n].have) {
                t[n].value = w1->p50_ms;
                t[n].limit = f1->p50_ms / 2;
                t[n].ok = t[n].value <= t[n].limit;
            }
            n++;
            t[n] = (struct target){.workload = w, .unit = "ops/s", .have = fh && wh};
            snprintf(t[n].name, sizeof t[n].name, "warm ops/s at c=%d >= 1.5x floor", hi);
            if (t[n].have) {
                t[n].value = wh->ops_s;
                t[n].base = fh->ops_s;
                t[n].limit = 1.5 * fh->ops_s;
                t[n].ok = t[n].value >= t[n].limit;
            }
            n++;
        }
        t[n] = (struct target){.workload = w, .unit = "ms", .have = g1 && c1};
        snprintf(t[n].name, sizeof t[n].name, "cold p50 at c=1 - floor p50 <= 0.1 ms");
        if (t[n].have) {
            t[n].value = c1->p50_ms - g1->p50_ms;
            t[n].limit = 0.1;
            t[n].ok = t[n].value <= t[n].limit;
        }
        n++;
        t[n] = (struct target){.workload = w, .unit = "ops/s", .have = gh && ch};
        snprintf(t[n].name, sizeof t[n].name, "cold ops/s at c=%d >= 95%% of floor", hi);
        if (t[n].have) {
            t[n].value = ch->ops_s;
            t[n].base = gh->ops_s;
            t[n].limit = 0.95 * gh->ops_s;
            t[n].ok = t[n].value >= t[n].limit;
        }
        n++;
        double fc = cpu_ms_all_levels(b, w, "floor", NULL);
        static const char *const sides[2] = {"default", "cold"};
        for (int k = 0; k < 2; k++) {
            double ac = cpu_ms_all_levels(b, w, "agent", sides[k]);
            t[n] = (struct target){
                .workload = w, .unit = "ms", .have = !isnan(fc) && !isnan(ac), .absolute = true};
            snprintf(t[n].name, sizeof t[n].name, "%s cpu/exec <= floor cpu/spawn + 0.05 ms",
                     k ? "cold" : "warm");
            if (t[n].have) {
                t[n].value = ac;
                t[n].limit = fc + 0.05;
                t[n].ok = ac <= t[n].limit;
            }
            n++;
        }
    }
    t[n] = (struct target){.workload = "-", .unit = "KiB", .have = b->rss_idle_kb >= 0};
    snprintf(t[n].name, sizeof t[n].name, "agent RSS idle < 4 MiB");
    t[n].value = (double)b->rss_idle_kb;
    t[n].limit = 4096;
    t[n].ok = t[n].value < t[n].limit;
    n++;
    t[n] = (struct target){.workload = "-", .unit = "KiB", .have = hi == 32 && b->rss_peak_kb >= 0};
    snprintf(t[n].name, sizeof t[n].name, "agent RSS peak at c=32 < 16 MiB");
    t[n].value = (double)b->rss_peak_kb;
    t[n].limit = 16384;
    t[n].ok = t[n].value < t[n].limit;
    n++;
    return n;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static void json_num(double v, int prec)
{
    if (isnan(v) || isinf(v))
        printf("null");
    else
        printf("%.*f", prec, v);
}

static void report_json(const struct bench *b, const struct target *t, int nt)
{
    printf("{\"agent\": ");
    json_str(b->agent_bin);
    printf(", \"ops_per_level\": %d, \"warmup_ops\": %d, \"levels\": [", b->ops, WARMUP_OPS);
    for (int i = 0; i < b->nlevels; i++)
        printf("%s%d", i ? ", " : "", b->levels[i]);
    printf("], \"clk_tck\": %ld,\n \"results\": [", b->clk_tck);
    for (int i = 0; i < b->nres; i++) {
        const struct result *r = &b->res[i];
        printf("%s\n  {\"workload\": \"%s\", \"side\": \"%s\", \"isolation\": \"%s\", "
               "\"concurrency\": %d, \"ops\": %d, \"errors\": %u, \"seconds\": ",
               i ? "," : "", r->workload, r->side, r->variant, r->conc, r->ops, r->errors);
        json_num(r->secs, 4);
        printf(", \"ops_per_s\": ");
        json_num(r->ops_s, 1);
        printf(", \"p50_ms\": ");
        json_num(r->p50_ms, 4);
        printf(", \"p99_ms\": ");
        json_num(r->p99_ms, 4);
        printf(", \"max_ms\": ");
        json_num(r->max_ms, 4);
        printf(", \"cpu_ms_per_op\": ");
        json_num(cpu_ms_per_op(r), 4);
        printf("}");
    }
    printf("],\n \"cpu_ms_per_op_all_levels\": {");
    for (size_t wi = 0; wi < NWORKLOADS; wi++) {
        printf("%s\"%s\": {\"floor\": ", wi ? ", " : "", workloads[wi].name);
        json_num(cpu_ms_all_levels(b, workloads[wi].name, "floor", NULL), 4);
        printf(", \"agent\": ");
        json_num(cpu_ms_all_levels(b, workloads[wi].name, "agent", "default"), 4);
        printf(", \"agent_cold\": ");
        json_num(cpu_ms_all_levels(b, workloads[wi].name, "agent", "cold"), 4);
        printf("}");
    }
    printf("},\n \"agent_rss_kb\": {\"idle\": %ld, \"idle_after\": %ld, \"peak_sampled\": %ld, "
           "\"peak_sampled_at_concurrency\": %d, \"hwm\": %ld},\n",
           b->rss_idle_kb, b->rss_after_kb, b->rss_peak_kb, b->top_level, b->rss_hwm_kb);
    printf(" \"errors\": %lu,\n \"targets\": [", b->errors_total);
    for (int i = 0; i < nt; i++) {
        printf("%s\n  {\"name\": ", i ? "," : "");
        json_str(t[i].name);
        printf(", \"workload\": \"%s\", \"unit\": \"%s\", \"value\": ", t[i].workload, t[i].unit);
        if (t[i].have)
            json_num(t[i].value, 4);
        else
            printf("null");
        printf(", \"limit\": ");
        if (t[i].have)
            json_num(t[i].limit, 4);
        else
            printf("null");
        printf(", \"ok\": %s}", !t[i].have ? "null" : t[i].ok ? "true" : "false");
    }
    printf("]}\n");
}

static void report_text(const struct bench *b, const struct target *t, int nt)
{
    printf("bench-agent-exec: %s, %d ops per level after %d warm-up ops, /bin/bash -c CMD\n\n",
           b->agent_bin, b->ops, WARMUP_OPS);
    printf("%-8s %-5s %-9s %4s %9s %8s %8s %8s %10s %6s\n", "workload", "side", "isolation", "conc",
           "ops/s", "p50 ms", "p99 ms", "max ms", "cpu ms/op", "errors");
    for (int i = 0; i < b->nres; i++) {
        const struct result *r = &b->res[i];
        printf("%-8s %-5s %-9s %4d %9.0f %8.3f %8.3f %8.3f %10.4f %6u\n", r->workload, r->side,
               r->variant, r->conc, r->ops_s, r->p50_ms, r->p99_ms, r->max_ms, cpu_ms_per_op(r),
               r->errors);
    }
    printf("\ncpu ms/op: floor = this bench's own CPU per spawn (getrusage, children excluded);\n"
           "agent = utime+stime per exec of the agent and its warm shells (/proc; the\n"
           "commands themselves excluded; isolation default = warm path, cold = --no-warm;\n"
           "%ld ticks/s, so +-%.3f ms/op at %d ops).\n",
           b->clk_tck, 1e3 / (double)b->clk_tck / b->ops, b->ops);
    printf("agent RSS: idle %ld KiB before the run (%ld KiB after), peak sampled at c=%d "
           "%ld KiB, VmHWM %ld KiB\n",
           b->rss_idle_kb, b->rss_after_kb, b->top_level, b->rss_peak_kb, b->rss_hwm_kb);
    printf("errors: %lu\n\n", b->errors_total);
    printf("targets (informational; the exit status does not depend on them):\n");
    for (int i = 0; i < nt; i++) {
        printf("  %-6s %-46s ", t[i].workload, t[i].name);
        if (!t[i].have) {
            printf("n/a (level not measured)\n");
            continue;
        }
        if (!strcmp(t[i].unit, "ops/s"))
            printf("%8.0f vs %8.0f ops/s (%3.0f%%)  ", t[i].value, t[i].base,
                   100.0 * t[i].value / t[i].base);
        else if (!strcmp(t[i].unit, "KiB"))
            printf("%8.0f KiB %20s  ", t[i].value, "");
        else if (t[i].absolute)
            printf("%8.4f vs <= %6.4f ms %9s  ", t[i].value, t[i].limit, "");
        else
            printf("%+8.3f ms %21s  ", t[i].value, "");
        printf("%s\n", t[i].ok ? "ok" : "MISS");
    }
    const struct result *bw = find(b, "true", "bwrap", NULL, b->top_level);
    const struct result *ag = find(b, "true", "agent", "default", b->top_level);
    if (bw && ag)
        printf("\nbubblewrap per command (true, c=%d): %.0f ops/s; the agent with its full "
               "ladder: %.0f ops/s = %.1fx\n",
               b->top_level, bw->ops_s, ag->ops_s, ag->ops_s / bw->ops_s);
    if (!b->rungs)
        return;
    const struct result *off = find(b, "true", "agent", "off", 1);
    if (!off)
        return;
    printf("\nisolation cost (true, c=1, against isolation off):\n");
    for (size_t v = 0; v < NVARIANTS; v++) {
        if (!strcmp(variants[v].name, "off"))
            continue;
        const struct result *r = find(b, "true", "agent", variants[v].name, 1);
        if (r)
            printf("  %-9s p50 %+.3f ms, cpu %+.4f ms/exec\n", variants[v].name,
                   r->p50_ms - off->p50_ms, cpu_ms_per_op(r) - cpu_ms_per_op(off));
    }
}

/* ---- TLS against plaintext (--tls DIR) ----------------------------------- */

/* One agent listening on both tcp:127.0.0.1 and tls:127.0.0.1 (the same
 * token on both), measured side by side in one run, the sides interleaved
 * round by round so that both share whatever else the host does. DIR holds
 * ca.pem, agent.pem/.key (serverAuth), client.pem/.key (clientAuth) and
 * token; tests/bench/tls.py makes them and prints the figures. */

#define TLS_HS_N 200
#define TLS_ROUNDS 10
/* Rounds stop early past this (a loaded host): the whole bench must stay
 * well under two minutes; the report says how many rounds ran. */
#define TLS_EXEC_BUDGET_S 40.0
#define TLS_BULK_BYTES (16u << 20)
#define TLS_BULK_REPS 4
#define TLS_IO_TIMEOUT_S 30.0

struct tconn {
    int fd;
    struct sp_tls *tls; /* NULL: plaintext */
    struct sp_reader rd;
    struct sp_writer wr;
    uint64_t id;
    double t0;
    bool busy;
    int slot;
};

struct tside {
    const char *name;
    bool tls;
    int port;
    double hs[TLS_HS_N];
    int nhs;
    double *lat1;
    int nlat1;
    double *ping; /* `health` round trips at c=1: the link alone, no process */
    int nping;
    double secs32;
    int ops32;
    unsigned errors;
    double up_s[TLS_BULK_REPS], down_s[TLS_BULK_REPS];
    int nup, ndown;
    struct tconn conns[NSLOTS];
    int nconns;
};

struct tlsbench {
    struct bench *b;
    struct sp_tls_ctx *ctx;
    char token[256];
    char dir[PATH_MAX];
    struct tside side[2]; /* 0 plaintext, 1 TLS */
    const char *cipher;
    char cipher_buf[96];
    int rounds; /* exec rounds run (TLS_ROUNDS unless over budget) */
};

static int tcp_connect_port(int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    /* Both sides alike: no Nagle wait behind a small write (the handshake
     * sends several). */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static void tc_close(struct tconn *c)
{
    if (c->tls) {
        sp_tls_shutdown(c->tls);
        sp_tls_free(c->tls);
        c->tls = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    sp_reader_free(&c->rd);
    sp_writer_free(&c->wr);
}

static ssize_t tc_flush(struct tconn *c)
{
    return c->tls ? sp_tls_writer_flush(&c->wr, c->tls) : sp_writer_flush(&c->wr, c->fd);
}

/* Reads what the socket has; over TLS also what TLS decrypted and holds
 * (a level-triggered poll would not report it). >0 read, 0 EOF, -1 errno. */
static ssize_t tc_fill(struct tconn *c)
{
    if (!c->tls)
        return sp_reader_fill(&c->rd, c->fd);
    ssize_t total = 0, n;
    do {
        n = sp_tls_reader_fill(&c->rd, c->tls);
        if (n > 0)
            total += n;
    } while (n > 0 && sp_tls_pending(c->tls));
    if (total > 0)
        return total;
    return n;
}

static short tc_events(const struct tconn *c)
{
    bool out = sp_writer_pending(&c->wr) > 0;
    if (c->tls && (sp_tls_want(c->tls) & SP_TLS_WANT_WRITE))
        out = true;
    return (short)(POLLIN | (out ? POLLOUT : 0));
}

static const char *tc_why(const struct tconn *c, ssize_t n)
{
    if (n == 0)
        return "EOF";
    if (c->tls && sp_tls_error(c->tls) && *sp_tls_error(c->tls))
        return sp_tls_error(c->tls);
    return strerror(errno);
}

/* Waits for the final answer to c->id (stream events skipped); calls check
 * on it. 1 good, 0 bad answer (why), -1 the connection failed (why). */
static int tc_wait(struct tconn *c, int (*check)(const char *, uint32_t, void *), void *arg,
                   char *why, size_t whylen)
{
    double end = now() + TLS_IO_TIMEOUT_S;
    for (;;) {
        if (tc_flush(c) < 0 && errno != EAGAIN) {
            snprintf(why, whylen, "send: %s", tc_why(c, -1));
            return -1;
        }
        const char *data;
        uint32_t len;
        struct sp_err err;
        int r;
        while ((r = sp_reader_next(&c->rd, &data, &len, &err)) == 1) {
            int v = check(data, len, arg);
            if (v != 2) {
                c->busy = false;
                if (v == 0)
                    snprintf(why, whylen, "unexpected answer");
                return v;
            }
        }
        if (r < 0) {
            snprintf(why, whylen, "bad frame: %.300s", err.msg);
            return -1;
        }
        struct pollfd p = {.fd = c->fd, .events = tc_events(c)};
        double left = end - now();
        if (left <= 0 || g_stop) {
            if (g_stop)
                snprintf(why, whylen, "interrupted");
            else
                snprintf(why, whylen, "no answer in %.0f s", TLS_IO_TIMEOUT_S);
            return -1;
        }
        if (poll(&p, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR) {
            snprintf(why, whylen, "poll: %s", strerror(errno));
            return -1;
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = tc_fill(c);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                snprintf(why, whylen, "read: %s", tc_why(c, n));
                return -1;
            }
        }
    }
}

/* The final answer to a request: ok (any result). */
static int check_ok(const char *data, uint32_t len, void *arg)
{
    (void)arg;
    msgpack_unpacked u;
    struct sp_err err;
    int rc = 0;
    msgpack_unpacked_init(&u);
    if (sp_unpack(data, len, &u, &err) == 0 && u.data.type == MSGPACK_OBJECT_MAP) {
        bool ok = false;
        if (sp_map_get(&u.data, "event"))
            rc = 2;
        else if (sp_get_bool(&u.data, "ok", true, &ok, &err) == 1 && ok)
            rc = 1;
    }
    msgpack_unpacked_destroy(&u);
    return rc;
}

/* read_file's answer: ok and exactly *want bytes of data. */
static int check_read(const char *data, uint32_t len, void *arg)
{
    size_t want = *(const size_t *)arg;
    msgpack_unpacked u;
    struct sp_err err;
    int rc = 0;
    msgpack_unpacked_init(&u);
    if (sp_unpack(data, len, &u, &err) == 0 && u.data.type == MSGPACK_OBJECT_MAP) {
        const msgpack_object *res = NULL;
        const char *p;
        size_t n = 0;
        if (sp_map_get(&u.data, "event"))
            rc = 2;
        else if (sp_get_map(&u.data, "result", true, &res, &err) == 1 &&
                 sp_get_bin(res, "data", true, &p, &n, &err) == 1 && n == want)
            rc = 1;
    }
    msgpack_unpacked_destroy(&u);
    return rc;
}

/* Connects one side's connection: TCP, the TLS handshake when the side
 * is TLS, then hello with the token. 0, or -1 with why. */
static int tc_open(struct tlsbench *tb, struct tside *s, struct tconn *c, char *why, size_t wl)
{
    *c = (struct tconn){.fd = -1};
    sp_reader_init(&c->rd, SP_DEFAULT_MAX_FRAME);
    sp_writer_init(&c->wr, 0);
    c->fd = tcp_connect_port(s->port);
    if (c->fd < 0) {
        snprintf(why, wl, "connect 127.0.0.1:%d: %s", s->port, strerror(errno));
        return -1;
    }
    if (s->tls) {
        struct sp_err err;
        /* the agent's certificate names "slot-bench-agent": check it as the
         * controller checks an agent id */
        c->tls = sp_tls_new(tb->ctx, c->fd, "slot-bench-agent", &err);
        if (!c->tls) {
            snprintf(why, wl, "TLS: %.300s", err.msg);
            return -1;
        }
        double end = now() + TLS_IO_TIMEOUT_S;
        int r;
        while ((r = sp_tls_handshake(c->tls, &err)) == 0) {
            struct pollfd p = {
                .fd = c->fd,
                .events = (short)((sp_tls_want(c->tls) & SP_TLS_WANT_WRITE) ? POLLOUT : POLLIN)};
            double left = end - now();
            if (left <= 0 || g_stop) {
                snprintf(why, wl, "TLS handshake: no progress in %.0f s", TLS_IO_TIMEOUT_S);
                return -1;
            }
            if (poll(&p, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR) {
                snprintf(why, wl, "poll: %s", strerror(errno));
                return -1;
            }
        }
        if (r < 0) {
            snprintf(why, wl, "TLS handshake: %.300s", err.msg);
            return -1;
        }
        if (!tb->cipher) {
            snprintf(tb->cipher_buf, sizeof tb->cipher_buf, "%s", sp_tls_describe(c->tls));
            tb->cipher = tb->cipher_buf;
        }
    }
    msgpack_packer pk;
    struct sp_err err;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, ++c->id, "hello", true);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_str(&pk, "token", tb->token);
    sp_pack_kv_str(&pk, "client", "bench-agent-exec");
    if (sp_writer_end_frame(&c->wr, &err) < 0) {
        snprintf(why, wl, "hello: %.300s", err.msg);
        return -1;
    }
    char w2[300];
    int v = tc_wait(c, check_ok, NULL, w2, sizeof w2);
    if (v != 1) {
        snprintf(why, wl, "hello: %s", v == 0 ? "refused (token?)" : w2);
        return -1;
    }
    return 0;
}

/* 1. connect + (handshake +) hello, TLS_HS_N times a side, alternating. */
static int tls_handshakes(struct tlsbench *tb)
{
    char why[400];
    for (int i = 0; i < TLS_HS_N; i++) {
        for (int k = 0; k < 2; k++) {
            struct tside *s = &tb->side[(i + k) % 2]; /* who goes first alternates */
            struct tconn c;
            double t0 = now();
            int rc = tc_open(tb, s, &c, why, sizeof why);
            double dt = now() - t0;
            tc_close(&c);
            if (rc < 0) {
                fprintf(stderr, "bench: %s side: %s\n", s->name, why);
                explain_agent_loss(tb->b);
                return -1;
            }
            s->hs[s->nhs++] = dt;
        }
    }
    return 0;
}

/* Exec `true` keeping n of the side's connections busy until ops answers
 * arrived; latencies appended to lat (when given). Returns the wall time,
 * or -1 on a failure. */
static double tls_exec_run(struct tlsbench *tb, struct tside *s, int n, int ops, double *lat,
                           int *nlat)
{
    struct pollfd pfd[NSLOTS];
    char why[400];
    int started = 0, done = 0;
    double t0 = now(), progress = t0;
    while (done < ops) {
        if (g_stop)
            return -1;
        for (int i = 0; i < n && started < ops; i++) {
            struct tconn *c = &s->conns[i];
            if (c->busy)
                continue;
            msgpack_packer pk;
            struct sp_err err;
            sp_writer_begin_frame(&c->wr);
            sp_writer_packer(&c->wr, &pk);
            sp_pack_request_head(&pk, ++c->id, "exec", true);
            msgpack_pack_map(&pk, 2);
            sp_pack_kv_uint(&pk, "slot", (uint64_t)c->slot);
            sp_pack_kv_str(&pk, "cmd", "true");
            if (sp_writer_end_frame(&c->wr, &err) < 0)
                return -1;
            c->t0 = now();
            c->busy = true;
            if (tc_flush(c) < 0 && errno != EAGAIN) {
                fprintf(stderr, "bench: %s: send: %s\n", s->name, tc_why(c, -1));
                return -1;
            }
            started++;
        }
        for (int i = 0; i < n; i++)
            pfd[i] = (struct pollfd){.fd = s->conns[i].fd, .events = tc_events(&s->conns[i])};
        int pn = poll(pfd, (nfds_t)n, 1000);
        if (pn < 0 && errno != EINTR)
            return -1;
        if (now() - progress > STALL_TIMEOUT_S) {
            fprintf(stderr, "bench: %s: no answer for %.0f s\n", s->name, STALL_TIMEOUT_S);
            return -1;
        }
        for (int i = 0; i < n && pn > 0; i++) {
            struct tconn *c = &s->conns[i];
            if (!pfd[i].revents)
                continue;
            if ((pfd[i].revents & POLLOUT) && tc_flush(c) < 0 && errno != EAGAIN) {
                fprintf(stderr, "bench: %s: send: %s\n", s->name, tc_why(c, -1));
                return -1;
            }
            if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t got = tc_fill(c);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                fprintf(stderr, "bench: %s: connection %d: %s\n", s->name, i, tc_why(c, got));
                explain_agent_loss(tb->b);
                return -1;
            }
            const char *data;
            uint32_t len;
            struct sp_err err;
            int r;
            while ((r = sp_reader_next(&c->rd, &data, &len, &err)) == 1) {
                int v = check_answer(data, len, c->id, 0, why, sizeof why);
                if (v == 2 || !c->busy)
                    continue;
                if (lat)
                    lat[(*nlat)++] = now() - c->t0;
                done++;
                c->busy = false;
                progress = now();
                if (v == 0) {
                    s->errors++;
                    note_error(tb->b, s->name, "true", n, why);
                }
            }
            if (r < 0) {
                fprintf(stderr, "bench: %s: bad frame: %s\n", s->name, err.msg);
                return -1;
            }
        }
    }
    return now() - t0;
}

/* n `health` round trips on the side's first connection, one at a time;
 * latencies appended to s->ping. 0, or -1. */
static int tls_ping_run(struct tside *s, int n)
{
    struct tconn *c = &s->conns[0];
    char why[400];
    for (int i = 0; i < n; i++) {
        msgpack_packer pk;
        struct sp_err err;
        double t0 = now();
        sp_writer_begin_frame(&c->wr);
        sp_writer_packer(&c->wr, &pk);
        sp_pack_request_head(&pk, ++c->id, "health", false);
        if (sp_writer_end_frame(&c->wr, &err) < 0)
            return -1;
        if (tc_wait(c, check_ok, NULL, why, sizeof why) != 1) {
            fprintf(stderr, "bench: %s: health: %s\n", s->name, why);
            return -1;
        }
        s->ping[s->nping++] = now() - t0;
    }
    return 0;
}

/* One bulk transfer on the side's first connection: write_file of
 * TLS_BULK_BYTES (up) or read_file of it (down). Seconds, or -1. */
static double tls_bulk(struct tside *s, bool up, const char *payload)
{
    struct tconn *c = &s->conns[0];
    char why[400];
    msgpack_packer pk;
    struct sp_err err;
    double t0 = now();
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, ++c->id, up ? "write_file" : "read_file", true);
    msgpack_pack_map(&pk, up ? 3 : 2);
    sp_pack_kv_uint(&pk, "slot", 0);
    sp_pack_kv_str(&pk, "path", "bulk.bin");
    if (up)
        sp_pack_kv_bin(&pk, "data", payload, TLS_BULK_BYTES);
    if (sp_writer_end_frame(&c->wr, &err) < 0) {
        fprintf(stderr, "bench: bulk: %s\n", err.msg);
        return -1;
    }
    size_t want = TLS_BULK_BYTES;
    int v = up ? tc_wait(c, check_ok, NULL, why, sizeof why)
               : tc_wait(c, check_read, &want, why, sizeof why);
    if (v != 1) {
        fprintf(stderr, "bench: %s: bulk %s: %s\n", s->name, up ? "write_file" : "read_file",
                v == 0 ? "bad answer" : why);
        return -1;
    }
    return now() - t0;
}

static void json_lat(const char *key, double *lat, int n)
{
    qsort(lat, (size_t)n, sizeof *lat, cmp_double);
    printf("\"%s\": {\"n\": %d, \"p50_ms\": ", key, n);
    json_num(percentile(lat, n, 0.5) * 1e3, 4);
    printf(", \"p99_ms\": ");
    json_num(percentile(lat, n, 0.99) * 1e3, 4);
    printf(", \"max_ms\": ");
    json_num(n ? lat[n - 1] * 1e3 : NAN, 4);
    printf("}");
}

static double best_mbs(const double *secs, int n)
{
    double best = 0;
    for (int i = 0; i < n; i++)
        if (secs[i] > 0 && TLS_BULK_BYTES / secs[i] / 1e6 > best)
            best = TLS_BULK_BYTES / secs[i] / 1e6;
    return best;
}

static double median_mbs(double *secs, int n)
{
    if (!n)
        return NAN;
    qsort(secs, (size_t)n, sizeof *secs, cmp_double);
    return TLS_BULK_BYTES / percentile(secs, n, 0.5) / 1e6;
}

static void tls_report(struct tlsbench *tb)
{
    printf("{\"mode\": \"tls\", \"agent\": ");
    json_str(tb->b->agent_bin);
    printf(", \"cipher\": ");
    json_str(tb->cipher ? tb->cipher : "?");
    printf(", \"rounds\": %d, \"rounds_planned\": %d, \"errors\": %lu,\n \"sides\": {", tb->rounds,
           TLS_ROUNDS, tb->b->errors_total);
    for (int k = 0; k < 2; k++) {
        struct tside *s = &tb->side[k];
        printf("%s\n  \"%s\": {", k ? "," : "", s->name);
        json_lat("handshake", s->hs, s->nhs);
        printf(", ");
        json_lat("exec_c1", s->lat1, s->nlat1);
        printf(", ");
        json_lat("health_c1", s->ping, s->nping);
        printf(", \"c32\": {\"ops\": %d, \"seconds\": ", s->ops32);
        json_num(s->secs32, 4);
        printf(", \"ops_per_s\": ");
        json_num(s->secs32 > 0 ? s->ops32 / s->secs32 : NAN, 1);
        printf("}, \"bulk_bytes\": %u, \"write_file_mb_s\": ", TLS_BULK_BYTES);
        json_num(median_mbs(s->up_s, s->nup), 1);
        printf(", \"write_file_best_mb_s\": ");
        json_num(best_mbs(s->up_s, s->nup), 1);
        printf(", \"read_file_mb_s\": ");
        json_num(median_mbs(s->down_s, s->ndown), 1);
        printf(", \"read_file_best_mb_s\": ");
        json_num(best_mbs(s->down_s, s->ndown), 1);
        printf(", \"errors\": %u}", s->errors);
    }
    printf("}}\n");
}

static int tls_read_small(const char *dir, const char *name, char *out, size_t cap)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "re");
    if (!f) {
        fprintf(stderr, "bench: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t n = fread(out, 1, cap - 1, f);
    fclose(f);
    while (n && (out[n - 1] == '\n' || out[n - 1] == '\r'))
        n--;
    out[n] = 0;
    return 0;
}

static int free_tcp_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(sa.sin_port);
}

/* Starts the agent with both listeners; waits until both accept. */
static int tls_start_agent(struct tlsbench *tb)
{
    struct agent *ag = &tb->b->ag;
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/var/tmp";
    if (snprintf(ag->dir, sizeof ag->dir, "%s/slot-bench-tls-XXXXXX", tmp) >= (int)sizeof ag->dir ||
        !mkdtemp(ag->dir)) {
        fprintf(stderr, "bench: cannot create a temp dir in %s: %s\n", tmp, strerror(errno));
        ag->dir[0] = 0;
        return -1;
    }
    chmod(ag->dir, 0755);
    for (int k = 0; k < 2; k++)
        tb->side[k].port = free_tcp_port();
    if (tb->side[0].port <= 0 || tb->side[1].port <= 0 || tb->side[0].port == tb->side[1].port) {
        fprintf(stderr, "bench: no free TCP ports\n");
        return -1;
    }
    char plain[64], tls[64], data[PATH_MAX + 8], cert[PATH_MAX + 16], key[PATH_MAX + 16],
        ca[PATH_MAX + 16], token[PATH_MAX + 16];
    snprintf(plain, sizeof plain, "tcp:127.0.0.1:%d", tb->side[0].port);
    snprintf(tls, sizeof tls, "tls:127.0.0.1:%d", tb->side[1].port);
    snprintf(data, sizeof data, "%s/data", ag->dir);
    snprintf(cert, sizeof cert, "%s/agent.pem", tb->dir);
    snprintf(key, sizeof key, "%s/agent.key", tb->dir);
    snprintf(ca, sizeof ca, "%s/ca.pem", tb->dir);
    snprintf(token, sizeof token, "%s/token", tb->dir);
    char *argv[] = {(char *)tb->b->agent_bin,
                    "--listen",
                    plain,
                    "--listen",
                    tls,
                    "--tls-cert",
                    cert,
                    "--tls-key",
                    key,
                    "--tls-ca",
                    ca,
                    "--token-file",
                    token,
                    "--slots",
                    "32",
                    "--data-dir",
                    data,
                    "--log-level",
                    "warn",
                    NULL};
    posix_spawnattr_t attr;
    sigset_t def;
    posix_spawnattr_init(&attr);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    posix_spawnattr_setsigdefault(&attr, &def);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    int rc = posix_spawn(&ag->pid, tb->b->agent_bin, NULL, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
        fprintf(stderr, "bench: cannot run %s: %s\n", tb->b->agent_bin, strerror(rc));
        ag->pid = 0;
        return -1;
    }
    double end = now() + START_TIMEOUT_S;
    int up = 0;
    while (!g_stop && now() < end && up < 2) {
        int st;
        if (waitpid(ag->pid, &st, WNOHANG) == ag->pid) {
            fprintf(stderr, "bench: the agent exited during start-up (status 0x%x)\n", st);
            ag->pid = 0;
            return -1;
        }
        up = 0;
        for (int k = 0; k < 2; k++) {
            int fd = tcp_connect_port(tb->side[k].port);
            if (fd >= 0) {
                close(fd);
                up++;
            }
        }
        if (up < 2)
            sleep_s(0.01);
    }
    if (up < 2) {
        fprintf(stderr, "bench: the agent did not listen on %s and %s within %.0f s\n", plain, tls,
                START_TIMEOUT_S);
        return -1;
    }
    return 0;
}

static int tls_compare(struct bench *b, const char *dir)
{
    static struct tlsbench tb;
    int rc = -1;
    char *payload = NULL;
    tb.b = b;
    snprintf(tb.dir, sizeof tb.dir, "%s", dir);
    tb.side[0] = (struct tside){.name = "plaintext", .tls = false};
    tb.side[1] = (struct tside){.name = "tls", .tls = true};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < NSLOTS; i++)
            tb.side[k].conns[i].fd = -1;
    int ops1 = b->ops, ops32 = b->ops * 2;
    char cert[PATH_MAX + 16], key[PATH_MAX + 16], ca[PATH_MAX + 16];
    snprintf(cert, sizeof cert, "%s/client.pem", dir);
    snprintf(key, sizeof key, "%s/client.key", dir);
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    struct sp_err err;
    if (tls_read_small(dir, "token", tb.token, sizeof tb.token) < 0)
        return -1;
    tb.ctx = sp_tls_ctx_new(SP_TLS_CLIENT, cert, key, ca, &err);
    if (!tb.ctx) {
        fprintf(stderr, "bench: TLS client context: %s\n", err.msg);
        return -1;
    }
    payload = malloc(TLS_BULK_BYTES);
    for (int k = 0; k < 2; k++) {
        tb.side[k].lat1 = calloc((size_t)ops1 + TLS_ROUNDS, sizeof(double));
        tb.side[k].ping = calloc((size_t)ops1 + TLS_ROUNDS, sizeof(double));
    }
    if (!payload || !tb.side[0].lat1 || !tb.side[1].lat1 || !tb.side[0].ping || !tb.side[1].ping)
        goto out;
    for (size_t i = 0; i < TLS_BULK_BYTES; i++)
        payload[i] = (char)(i * 2654435761u >> 13); /* not compressible, not all zero */
    if (tls_start_agent(&tb) < 0)
        goto out;
    if (tls_handshakes(&tb) < 0)
        goto out;
    char why[400];
    for (int k = 0; k < 2; k++) {
        struct tside *s = &tb.side[k];
        for (; s->nconns < NSLOTS; s->nconns++) {
            if (tc_open(&tb, s, &s->conns[s->nconns], why, sizeof why) < 0) {
                fprintf(stderr, "bench: %s side: %s\n", s->name, why);
                goto out;
            }
            s->conns[s->nconns].slot = s->nconns;
        }
        /* warm-up, not counted */
        if (tls_exec_run(&tb, s, 1, 50, NULL, NULL) < 0 ||
            tls_exec_run(&tb, s, NSLOTS, 200, NULL, NULL) < 0)
            goto out;
    }
    /* 2. and 3.: rounds of c=1 then c=32, plaintext and TLS taking turns
     * at going first */
    double exec_t0 = now();
    for (int r = 0; r < TLS_ROUNDS && (r < 2 || now() - exec_t0 < TLS_EXEC_BUDGET_S); r++) {
        tb.rounds = r + 1;
        for (int k = 0; k < 2; k++) {
            struct tside *s = &tb.side[(r + k) % 2];
            int n1 = ops1 / TLS_ROUNDS + (r < ops1 % TLS_ROUNDS);
            if (tls_ping_run(s, n1) < 0 || tls_exec_run(&tb, s, 1, n1, s->lat1, &s->nlat1) < 0)
                goto out;
        }
        for (int k = 0; k < 2; k++) {
            struct tside *s = &tb.side[(r + k) % 2];
            int n32 = ops32 / TLS_ROUNDS;
            double secs = tls_exec_run(&tb, s, NSLOTS, n32, NULL, NULL);
            if (secs < 0)
                goto out;
            s->secs32 += secs;
            s->ops32 += n32;
        }
    }
    /* 4. bulk, up then down, the sides alternating */
    for (int r = 0; r < TLS_BULK_REPS; r++) {
        for (int k = 0; k < 2; k++) {
            struct tside *s = &tb.side[(r + k) % 2];
            double up = tls_bulk(s, true, payload);
            double down = up < 0 ? -1 : tls_bulk(s, false, NULL);
            if (up < 0 || down < 0)
                goto out;
            s->up_s[s->nup++] = up;
            s->down_s[s->ndown++] = down;
        }
    }
    tls_report(&tb);
    rc = 0;
out:
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < NSLOTS; i++)
            if (tb.side[k].conns[i].fd >= 0)
                tc_close(&tb.side[k].conns[i]);
        free(tb.side[k].lat1);
        free(tb.side[k].ping);
    }
    free(payload);
    sp_tls_ctx_free(tb.ctx);
    stop_agent(b);
    return rc;
}

/* ---- main ---------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: bench-agent-exec --agent PATH [--ops N] [--levels 1,8,32] [--json] [--rungs] "
            "[--bwrap] [--tls DIR]\n"
            "  --ops N       measured requests per level and side (default 2000)\n"
            "  --levels L    comma-separated concurrency levels, 1..%d (default 1,8,32)\n"
            "  --json        print one JSON object instead of the table\n"
            "  --rungs       also measure the agent with isolation off and one rung at a time\n"
            "  --bwrap       also measure the floor with every command wrapped in bubblewrap\n"
            "  --tls DIR     instead: one agent on tcp: and tls: (certificates and token in DIR),\n"
            "                handshakes, exec at c=1 and c=32, bulk; JSON (tests/bench/tls.py)\n",
            MAX_CONC);
}

static int parse_levels(struct bench *b, const char *arg)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", arg);
    b->nlevels = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        char *end;
        long v = strtol(tok, &end, 10);
        if (*end || v < 1 || v > MAX_CONC || b->nlevels == MAX_LEVELS)
            return -1;
        b->levels[b->nlevels++] = (int)v;
    }
    return b->nlevels ? 0 : -1;
}

/* The environment the agent gives commands, so that both sides run bash
 * the same way (locale, PATH lookup). */
static char **make_child_env(const char *home)
{
    static char path[] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    static char h[PATH_MAX + 8], tmp[PATH_MAX + 8], ws[PATH_MAX + 16];
    static char lang[] = "LANG=C.UTF-8", term[] = "TERM=dumb", idx[] = "SLOT_INDEX=0";
    static char *env[8];
    snprintf(h, sizeof h, "HOME=%s", home);
    snprintf(tmp, sizeof tmp, "TMPDIR=%s", home);
    snprintf(ws, sizeof ws, "SLOT_WORKSPACE=%s", home);
    char *list[] = {path, h, tmp, lang, term, idx, ws, NULL};
    memcpy(env, list, sizeof list);
    return env;
}

/* Runs one agent variant: start, measure, stop. -1 on a setup failure. */
/* A run of several seconds drifts (other work on the host, the page cache,
 * a VM's own neighbours): the floor and the agent are measured in
 * MEASURE_BLOCKS alternating blocks, ABBA, and each side's figures are over
 * all its blocks, so drift falls on both sides alike. ops/s is operations
 * over the summed time of the side's own blocks. Each block fills and
 * drains conc commands in flight: blocks of at least 20 x conc operations
 * keep that a small part of each. */
#define MEASURE_BLOCKS 10

/* CPU over the operations whose blocks could be read, as if over all. */
static double acc_cpu(const struct acc *a)
{
    return a->cpu_n > 0 ? a->cpu_s * a->n / a->cpu_n : NAN;
}

static int measure_level(struct bench *b, const struct workload *w, int conc, bool with_floor)
{
    struct acc fa = {.lat = calloc((size_t)b->ops, sizeof(double))};
    struct acc aa = {.lat = calloc((size_t)b->ops, sizeof(double))};
    int rc = fa.lat && aa.lat ? 0 : -1;
    int blocks = b->ops / (20 * conc);
    blocks = blocks < 1 ? 1 : blocks > MEASURE_BLOCKS ? MEASURE_BLOCKS : blocks;
    for (int k = 0; k < blocks && rc == 0; k++) {
        int n = b->ops / blocks + (k == blocks - 1 ? b->ops % blocks : 0);
        bool floor_first = k % 4 == 0 || k % 4 == 3;
        if (with_floor && floor_first)
            rc = run_floor(b, w, conc, n, &fa);
        if (rc == 0)
            rc = run_agent(b, w, conc, n, &aa);
        if (rc == 0 && with_floor && !floor_first)
            rc = run_floor(b, w, conc, n, &fa);
    }
    if (rc == 0 && with_floor)
        add_result(b, w->name, b->floor_side, conc, fa.lat, fa.n, fa.secs, acc_cpu(&fa), fa.errors);
    if (rc == 0)
        add_result(b, w->name, "agent", conc, aa.lat, aa.n, aa.secs, acc_cpu(&aa), aa.errors);
    free(fa.lat);
    free(aa.lat);
    return rc;
}

static int run_variant(struct bench *b, const struct variant *v, bool with_floor)
{
    b->variant = v->name;
    if (start_agent(b, v) < 0) {
        stop_agent(b);
        return -1;
    }
    bool main_variant = !strcmp(v->name, "default");
    if (main_variant) {
        sleep_s(0.2); /* let start-up allocations settle */
        b->rss_idle_kb = proc_status_kb(b->ag.pid, "VmRSS");
    }
    b->child_env = make_child_env(b->ag.dir);
    int rc = 0;
    size_t nw = v->full ? NWORKLOADS : 1;
    for (size_t wi = 0; wi < nw && rc == 0; wi++) {
        const struct workload *w = &workloads[wi];
        if (with_floor)
            rc = run_floor(b, w, WARMUP_CONC, WARMUP_OPS, NULL);
        if (rc == 0)
            rc = run_agent(b, w, WARMUP_AGENT_CONC(b), WARMUP_OPS, NULL);
        for (int l = 0; l < b->nlevels && rc == 0; l++) {
            int c = b->levels[l];
            if (!v->full && c != 1)
                continue;
            b->sample_rss = main_variant && c == b->top_level;
            rc = measure_level(b, w, c, with_floor);
            b->sample_rss = false;
        }
    }
    if (rc == 0 && main_variant) {
        sleep_s(0.2);
        b->rss_after_kb = proc_status_kb(b->ag.pid, "VmRSS");
        b->rss_hwm_kb = proc_status_kb(b->ag.pid, "VmHWM");
    }
    stop_agent(b);
    return rc;
}

int main(int argc, char **argv)
{
    struct bench b = {.ops = 2000, .levels = {1, 8, 32}, .nlevels = 3, .floor_side = "floor"};
    const char *tls_dir = NULL;
    b.rss_idle_kb = b.rss_after_kb = b.rss_peak_kb = b.rss_hwm_kb = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--agent") && i + 1 < argc) {
            b.agent_bin = argv[++i];
        } else if (!strcmp(a, "--ops") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 10 || v > 10000000) {
                fprintf(stderr, "bench: --ops must be 10..10000000\n");
                return 2;
            }
            b.ops = (int)v;
        } else if (!strcmp(a, "--levels") && i + 1 < argc) {
            if (parse_levels(&b, argv[++i]) < 0) {
                fprintf(stderr, "bench: --levels wants up to %d values in 1..%d\n", MAX_LEVELS,
                        MAX_CONC);
                return 2;
            }
        } else if (!strcmp(a, "--json")) {
            b.json = true;
        } else if (!strcmp(a, "--rungs")) {
            b.rungs = true;
        } else if (!strcmp(a, "--bwrap")) {
            b.bwrap = true;
        } else if (!strcmp(a, "--tls") && i + 1 < argc) {
            tls_dir = argv[++i];
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else {
            usage();
            return 2;
        }
    }
    if (!b.agent_bin) {
        usage();
        return 2;
    }
    for (int i = 0; i < b.nlevels; i++)
        if (b.levels[i] > b.top_level)
            b.top_level = b.levels[i];
    b.clk_tck = sysconf(_SC_CLK_TCK);
    if (b.clk_tck <= 0)
        b.clk_tck = 100;

    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: poll returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* Floor children: default SIGPIPE and their own session, like the
     * agent's commands. */
    sigset_t def;
    short flags = POSIX_SPAWN_SETSIGDEF;
#ifdef POSIX_SPAWN_SETSID
    flags |= POSIX_SPAWN_SETSID;
#endif
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    posix_spawnattr_init(&b.attr);
    posix_spawnattr_setsigdefault(&b.attr, &def);
    posix_spawnattr_setflags(&b.attr, flags);

    if (tls_dir) {
        int trc = tls_compare(&b, tls_dir);
        posix_spawnattr_destroy(&b.attr);
        if (trc < 0)
            fprintf(stderr, "bench: %s; no figures\n", g_stop ? "interrupted" : "setup failed");
        return trc < 0 ? 1 : 0;
    }

    int rc = 0;
    size_t nv = b.rungs ? NVARIANTS : NMAIN_VARIANTS;
    for (size_t v = 0; v < nv && rc == 0; v++)
        rc = run_variant(&b, &variants[v], true);
    if (rc == 0 && b.bwrap) {
        b.floor_side = "bwrap";
        rc = run_floor(&b, &workloads[0], WARMUP_CONC, WARMUP_OPS / 4, NULL);
        for (int l = 0; l < b.nlevels && rc == 0; l++) {
            struct acc a = {.lat = calloc((size_t)b.ops / 4 + 1, sizeof(double))};
            rc = a.lat ? run_floor(&b, &workloads[0], b.levels[l], b.ops / 4, &a) : -1;
            if (rc == 0)
                add_result(&b, workloads[0].name, "bwrap", b.levels[l], a.lat, a.n, a.secs, a.cpu_s,
                           a.errors);
            free(a.lat);
        }
        b.floor_side = "floor";
    }
    posix_spawnattr_destroy(&b.attr);
    if (rc < 0) {
        fprintf(stderr, "bench: %s; no figures\n", g_stop ? "interrupted" : "setup failed");
        return 1;
    }
    struct target t[MAX_TARGETS];
    int nt = collect_targets(&b, t);
    if (b.json)
        report_json(&b, t, nt);
    else
        report_text(&b, t, nt);
    return 0;
}
