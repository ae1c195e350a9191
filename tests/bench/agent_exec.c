/* bench-agent-exec: exec throughput, latency, agent CPU and RSS, against the
 * floor of spawning the same command directly (posix_spawn + pipes +
 * waitpid) in the same run. Prints figures; asserts nothing. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
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

extern char **environ;

#define MAX_CONC 64

struct result {
    const char *workload, *side, *variant;
    int conc;
    double ops_s, p50_ms, p99_ms, cpu_ms;
    unsigned errors;
};

struct bench {
    const char *agent_bin;
    int ops;
    int levels[8];
    int nlevels;
    bool json;
    char dir[64];
    char sock[100];
    pid_t agent;
    const char *variant;  /* label of the agent's isolation setting */
    const char *extra[8]; /* extra agent arguments for this variant */
    int nextra;
    bool rungs; /* also measure each rung alone */
    struct result res[128];
    int nres;
    long rss_idle_kb, rss_peak_kb;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double q)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    int i = (int)(q * n);
    return v[i >= n ? n - 1 : i];
}

static double self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static double proc_cpu(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    /* fields after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt
     * cmajflt utime stime */
    if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
        return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
    return 0;
}

static long proc_rss_kb(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kb = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

/* ---- floor: spawn directly ------------------------------------------- */

struct child {
    pid_t pid;
    int fd[2];
    double t0;
    bool busy;
};

static int spawn_one(const char *cmd, struct child *ch)
{
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0)
        return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    char *argv[] = {"/bin/bash", "-c", (char *)cmd, NULL};
    ch->t0 = now();
    int rc = posix_spawn(&ch->pid, "/bin/bash", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    if (rc != 0) {
        close(out[0]);
        close(err[0]);
        return -1;
    }
    ch->fd[0] = out[0];
    ch->fd[1] = err[0];
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    ch->busy = true;
    return 0;
}

static void run_floor(struct bench *b, const char *workload, const char *cmd, int conc, int ops,
                      bool record)
{
    struct child ch[MAX_CONC];
    memset(ch, 0, sizeof ch);
    double *lat = calloc((size_t)ops, sizeof *lat);
    int started = 0, done = 0;
    unsigned errors = 0;
    double cpu0 = self_cpu(), t0 = now();
    char sink[65536];
    while (done < ops) {
        for (int i = 0; i < conc && started < ops; i++)
            if (!ch[i].busy) {
                if (spawn_one(cmd, &ch[i]) < 0)
                    errors++;
                started++;
            }
        struct pollfd p[2 * MAX_CONC];
        int np = 0, owner[2 * MAX_CONC];
        for (int i = 0; i < conc; i++)
            for (int k = 0; k < 2; k++)
                if (ch[i].busy && ch[i].fd[k] >= 0) {
                    p[np].fd = ch[i].fd[k];
                    p[np].events = POLLIN;
                    owner[np++] = i * 2 + k;
                }
        if (np == 0)
            continue;
        poll(p, (nfds_t)np, 1000);
        for (int j = 0; j < np; j++) {
            if (!p[j].revents)
                continue;
            struct child *c = &ch[owner[j] / 2];
            int k = owner[j] % 2;
            ssize_t n;
            while ((n = read(c->fd[k], sink, sizeof sink)) > 0)
                ;
            if (n == 0) {
                close(c->fd[k]);
                c->fd[k] = -1;
            }
            if (c->fd[0] < 0 && c->fd[1] < 0) {
                int st;
                waitpid(c->pid, &st, 0);
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                    errors++;
                lat[done++] = now() - c->t0;
                c->busy = false;
            }
        }
    }
    double el = now() - t0, cpu = self_cpu() - cpu0;
    if (record) {
        struct result *r = &b->res[b->nres++];
        *r = (struct result){workload,
                             "floor",
                             "-",
                             conc,
                             ops / el,
                             pct(lat, ops, 0.5) * 1e3,
                             pct(lat, ops, 0.99) * 1e3,
                             cpu / ops * 1e3,
                             errors};
    }
    free(lat);
}

/* ---- agent ------------------------------------------------------------ */

struct conn {
    int fd;
    struct sp_reader rd;
    struct sp_writer wr;
    double t0;
    bool busy;
    uint64_t id;
};

static int connect_unix(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static void send_exec(struct conn *c, int slot, const char *cmd)
{
    msgpack_packer pk;
    struct sp_err err;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, ++c->id, "exec", true);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "slot", (uint64_t)slot);
    sp_pack_kv_str(&pk, "cmd", cmd);
    sp_writer_end_frame(&c->wr, &err);
    c->t0 = now();
    while (sp_writer_pending(&c->wr))
        if (sp_writer_flush(&c->wr, c->fd) < 0)
            break;
    c->busy = true;
}

/* 1 when the response is ok with exit_code 0. */
static int check_response(const char *data, uint32_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err err;
    int good = 0;
    if (sp_unpack(data, len, &u, &err) == 0) {
        const msgpack_object *ok = sp_map_get(&u.data, "ok");
        const msgpack_object *res = sp_map_get(&u.data, "result");
        const msgpack_object *code = res ? sp_map_get(res, "exit_code") : NULL;
        good = ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean && code &&
               code->type == MSGPACK_OBJECT_POSITIVE_INTEGER && code->via.u64 == 0;
        if (!good && getenv("BENCH_VERBOSE"))
            fprintf(stderr, "bad response (%u bytes)\n", len);
    }
    msgpack_unpacked_destroy(&u);
    return good;
}

static int run_agent(struct bench *b, const char *workload, const char *cmd, int conc, int ops,
                     bool record, bool sample_rss)
{
    struct conn cs[MAX_CONC];
    memset(cs, 0, sizeof cs);
    for (int i = 0; i < conc; i++) {
        cs[i].fd = connect_unix(b->sock);
        if (cs[i].fd < 0) {
            fprintf(stderr, "bench: cannot connect to the agent: %s\n", strerror(errno));
            return -1;
        }
        sp_reader_init(&cs[i].rd, SP_DEFAULT_MAX_FRAME);
        sp_writer_init(&cs[i].wr, 0);
    }
    double *lat = calloc((size_t)ops, sizeof *lat);
    int started = 0, done = 0;
    unsigned errors = 0;
    double cpu0 = proc_cpu(b->agent), t0 = now();
    while (done < ops) {
        for (int i = 0; i < conc && started < ops; i++)
            if (!cs[i].busy) {
                send_exec(&cs[i], i % 32, cmd);
                started++;
            }
        struct pollfd p[MAX_CONC];
        for (int i = 0; i < conc; i++)
            p[i] = (struct pollfd){.fd = cs[i].fd, .events = POLLIN};
        if (poll(p, (nfds_t)conc, 10000) <= 0) {
            fprintf(stderr, "bench: no answer from the agent for 10 s\n");
            errors += (unsigned)(started - done);
            break;
        }
        for (int i = 0; i < conc; i++) {
            if (!p[i].revents)
                continue;
            ssize_t n = sp_reader_fill(&cs[i].rd, cs[i].fd);
            if (n == 0) {
                fprintf(stderr, "bench: agent closed the connection\n");
                return -1;
            }
            const char *data;
            uint32_t len;
            struct sp_err err;
            while (sp_reader_next(&cs[i].rd, &data, &len, &err) == 1) {
                if (!check_response(data, len))
                    errors++;
                lat[done++] = now() - cs[i].t0;
                cs[i].busy = false;
                if (sample_rss && done % 50 == 0) {
                    long kb = proc_rss_kb(b->agent);
                    if (kb > b->rss_peak_kb)
                        b->rss_peak_kb = kb;
                }
            }
        }
    }
    double el = now() - t0, cpu = proc_cpu(b->agent) - cpu0;
    if (record) {
        struct result *r = &b->res[b->nres++];
        *r = (struct result){workload,
                             "agent",
                             b->variant,
                             conc,
                             done / el,
                             pct(lat, done, 0.5) * 1e3,
                             pct(lat, done, 0.99) * 1e3,
                             cpu / done * 1e3,
                             errors};
    }
    for (int i = 0; i < conc; i++) {
        close(cs[i].fd);
        sp_reader_free(&cs[i].rd);
        sp_writer_free(&cs[i].wr);
    }
    free(lat);
    return 0;
}

static int start_agent(struct bench *b)
{
    snprintf(b->dir, sizeof b->dir, "/tmp/slot-bench-XXXXXX");
    if (!mkdtemp(b->dir))
        return -1;
    snprintf(b->sock, sizeof b->sock, "%.80s/a.sock", b->dir);
    char listen[160], data[128];
    snprintf(listen, sizeof listen, "unix:%s", b->sock);
    snprintf(data, sizeof data, "%s/data", b->dir);
    char *argv[] = {(char *)b->agent_bin, "--listen", listen,        "--slots", "32",
                    "--data-dir",         data,       "--log-level", "warn",    NULL};
    if (posix_spawn(&b->agent, b->agent_bin, NULL, NULL, argv, environ) != 0)
        return -1;
    for (int i = 0; i < 1000; i++) {
        struct stat st;
        if (stat(b->sock, &st) == 0)
            return 0;
        usleep(10000);
    }
    return -1;
}

static void stop_agent(struct bench *b)
{
    if (b->agent > 0) {
        kill(b->agent, SIGTERM);
        for (int i = 0; i < 500; i++) {
            if (waitpid(b->agent, NULL, WNOHANG) == b->agent) {
                b->agent = 0;
                break;
            }
            usleep(10000);
        }
        if (b->agent > 0) {
            kill(b->agent, SIGKILL);
            waitpid(b->agent, NULL, 0);
        }
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", b->dir);
    if (b->dir[0] && system(cmd) != 0)
        fprintf(stderr, "bench: could not remove %s\n", b->dir);
}

static const struct result *find(const struct bench *b, const char *w, const char *side,
                                 const char *variant, int c)
{
    for (int i = 0; i < b->nres; i++)
        if (!strcmp(b->res[i].workload, w) && !strcmp(b->res[i].side, side) &&
            (!variant || !strcmp(b->res[i].variant, variant)) && b->res[i].conc == c)
            return &b->res[i];
    return NULL;
}

static void report(const struct bench *b)
{
    if (b->json) {
        printf("{\"results\": [");
        for (int i = 0; i < b->nres; i++) {
            const struct result *r = &b->res[i];
            printf("%s\n {\"workload\": \"%s\", \"side\": \"%s\", \"isolation\": \"%s\", "
                   "\"concurrency\": %d, \"ops_per_s\": %.1f, \"p50_ms\": %.4f, "
                   "\"p99_ms\": %.4f, \"cpu_ms_per_op\": %.4f, \"errors\": %u}",
                   i ? "," : "", r->workload, r->side, r->variant, r->conc, r->ops_s, r->p50_ms,
                   r->p99_ms, r->cpu_ms, r->errors);
        }
        printf("],\n \"agent_rss_idle_kb\": %ld, \"agent_rss_peak_kb\": %ld}\n", b->rss_idle_kb,
               b->rss_peak_kb);
        return;
    }
    printf("%-8s %-6s %-10s %5s %10s %9s %9s %12s %7s\n", "workload", "side", "isolation", "conc",
           "ops/s", "p50 ms", "p99 ms", "cpu ms/op", "errors");
    for (int i = 0; i < b->nres; i++) {
        const struct result *r = &b->res[i];
        printf("%-8s %-6s %-10s %5d %10.0f %9.3f %9.3f %12.4f %7u\n", r->workload, r->side,
               r->variant, r->conc, r->ops_s, r->p50_ms, r->p99_ms, r->cpu_ms, r->errors);
    }
    printf("\nagent RSS: idle %ld KiB, peak under load %ld KiB\n", b->rss_idle_kb, b->rss_peak_kb);
    printf("(floor cpu = the bench's own CPU per posix_spawn; agent cpu = the agent process "
           "only, children excluded, from /proc clock ticks)\n\n");
    const struct result *f1 = find(b, "true", "floor", NULL, 1);
    const struct result *f32 = find(b, "true", "floor", NULL, 32);
    const struct result *a1 = find(b, "true", "agent", "off", 1);
    const struct result *a32 = find(b, "true", "agent", "off", 32);
    const struct result *i1 = find(b, "true", "agent", "all", 1);
    const struct result *i32 = find(b, "true", "agent", "all", 32);
    printf("targets (true; core targets with isolation off):\n");
    if (f1 && a1)
        printf("  p50 at c=1 within 0.25 ms of floor:   %+.3f ms  %s\n", a1->p50_ms - f1->p50_ms,
               a1->p50_ms - f1->p50_ms <= 0.25 ? "ok" : "MISS");
    if (f32 && a32)
        printf("  ops/s at c=32 >= 90%% of floor:        %.0f%%      %s\n",
               100.0 * a32->ops_s / f32->ops_s, a32->ops_s >= 0.9 * f32->ops_s ? "ok" : "MISS");
    if (f1 && a1)
        printf("  agent cpu/exec <= floor cpu + 0.05:    %.4f vs %.4f ms  %s\n", a1->cpu_ms,
               f1->cpu_ms + 0.05, a1->cpu_ms <= f1->cpu_ms + 0.05 ? "ok" : "MISS");
    printf("  RSS idle < 4 MiB:                     %ld KiB  %s\n", b->rss_idle_kb,
           b->rss_idle_kb < 4096 ? "ok" : "MISS");
    printf("  RSS at c=32 < 16 MiB:                 %ld KiB  %s\n", b->rss_peak_kb,
           b->rss_peak_kb < 16384 ? "ok" : "MISS");
    if (a1 && i1)
        printf("  full ladder p50 cost at c=1 < 0.3 ms:  %+.3f ms  %s\n", i1->p50_ms - a1->p50_ms,
               i1->p50_ms - a1->p50_ms < 0.3 ? "ok" : "MISS");
    if (i32)
        printf("  isolated ops/s at c=32 >= 1250 (5x bwrap's ~250): %.0f  %s\n", i32->ops_s,
               i32->ops_s >= 1250 ? "ok" : "MISS");
    if (b->rungs && a1) {
        printf("\nper rung (true, c=1, p50 and agent cpu added to isolation off):\n");
        static const char *const v[] = {"rlimits", "landlock", "seccomp", "all"};
        for (size_t i = 0; i < 4; i++) {
            const struct result *r = find(b, "true", "agent", v[i], 1);
            if (r)
                printf("  %-9s %+.3f ms p50  %+.4f ms cpu\n", v[i], r->p50_ms - a1->p50_ms,
                       r->cpu_ms - a1->cpu_ms);
        }
    }
}

/* One agent per isolation variant; "off" and "all" run every workload and
 * level, single rungs only `true` at c=1. */
struct variant {
    const char *name;
    const char *args[6];
};

static const struct variant variants[] = {
    {"off", {"--without", "landlock", "--without", "seccomp", "--without", "rlimits"}},
    {"all", {NULL}},
    {"rlimits", {"--without", "landlock", "--without", "seccomp"}},
    {"landlock", {"--without", "seccomp", "--without", "rlimits"}},
    {"seccomp", {"--without", "landlock", "--without", "rlimits"}},
};

int main(int argc, char **argv)
{
    struct bench b = {.ops = 2000, .levels = {1, 8, 32}, .nlevels = 3};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--agent") && i + 1 < argc) {
            b.agent_bin = argv[++i];
        } else if (!strcmp(argv[i], "--ops") && i + 1 < argc) {
            b.ops = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--levels") && i + 1 < argc) {
            b.nlevels = 0;
            for (char *t = strtok(argv[++i], ","); t && b.nlevels < 8; t = strtok(NULL, ","))
                b.levels[b.nlevels++] = atoi(t);
        } else if (!strcmp(argv[i], "--json")) {
            b.json = true;
        } else if (!strcmp(argv[i], "--rungs")) {
            b.rungs = true;
        } else {
            fprintf(stderr, "usage: bench-agent-exec --agent PATH [--ops N] [--levels 1,8,32] "
                            "[--rungs] [--json]\n");
            return 2;
        }
    }
    for (int i = 0; i < b.nlevels; i++)
        if (b.levels[i] < 1 || b.levels[i] > MAX_CONC) {
            fprintf(stderr, "bench: concurrency must be 1..%d\n", MAX_CONC);
            return 2;
        }
    if (!b.agent_bin || b.ops < 10) {
        fprintf(stderr, "bench: --agent PATH is required (and --ops >= 10)\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    static const char *const work[][2] = {{"true", "true"}, {"64KiB", "head -c 65536 /dev/zero"}};
    int rc = 0;
    size_t nvar = b.rungs ? sizeof variants / sizeof variants[0] : 2;
    for (size_t v = 0; v < nvar && rc == 0; v++) {
        b.variant = variants[v].name;
        b.nextra = 0;
        for (int i = 0; i < 6 && variants[v].args[i]; i++)
            b.extra[b.nextra++] = variants[v].args[i];
        if (start_agent(&b) < 0) {
            fprintf(stderr, "bench: cannot start %s\n", b.agent_bin);
            stop_agent(&b);
            return 1;
        }
        usleep(200000);
        if (v == 0)
            b.rss_idle_kb = proc_rss_kb(b.agent);
        bool full = v < 2;
        for (size_t w = 0; w < (full ? 2u : 1u) && rc == 0; w++) {
            if (v == 0)
                run_floor(&b, work[w][0], work[w][1], 4, 200, false); /* warm-up */
            rc = run_agent(&b, work[w][0], work[w][1], 4, 200, false, false);
            for (int l = 0; l < b.nlevels && rc == 0; l++) {
                int c = b.levels[l];
                if (!full && c != 1)
                    continue;
                if (v == 0)
                    run_floor(&b, work[w][0], work[w][1], c, b.ops, true);
                rc = run_agent(&b, work[w][0], work[w][1], c, b.ops, true,
                               c == b.levels[b.nlevels - 1]);
            }
        }
        if (v == 0 && rc == 0) {
            usleep(200000);
            long kb = proc_rss_kb(b.agent);
            if (kb > b.rss_idle_kb)
                b.rss_idle_kb = kb;
        }
        stop_agent(&b);
    }
    if (rc == 0)
        report(&b);
    return rc == 0 ? 0 : 1;
}
