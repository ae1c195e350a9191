/* slot-controller: command line, start-up (config, state directory,
 * reattaching agents that outlived an earlier run, listeners), the one
 * libev loop, and an orderly stop. Also the small utilities the other files
 * share (logging, latency statistics, directories). */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"
#include "tls_ca.h"

/* ---- logging ------------------------------------------------------------- */

/* Set once from the command line before the loop starts; logging must work
 * before the context exists. */
static int log_min = LOG_INFO;

void ctl_log_set_level(int lvl)
{
    log_min = lvl;
}

int ctl_log_parse_level(const char *s)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

void ctl_log(enum log_level lvl, const char *fmt, ...)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    if ((int)lvl < log_min)
        return;
    char line[1200];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line,
                     "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ slot-controller %s: ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, names[lvl]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}

/* ---- utilities ----------------------------------------------------------- */

double now_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000 + (double)ts.tv_nsec / 1e6;
}

uint64_t random_u64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != sizeof v)
        v = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return v;
}

int mkdir_p(const char *path, mode_t mode)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(buf, mode) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int rm_entry(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (flag == FTW_DP)
        rmdir(p);
    else
        unlink(p);
    return 0;
}

void remove_tree_now(const char *path)
{
    nftw(path, rm_entry, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

#define GONE_PREFIX ".gone-"

/* Detach every mount beneath dir, deepest first: an agent killed with its
 * guardian leaves its slots' filesystems mounted in its data dir. */
static void unmount_under(const char *path)
{
    char dir[4200];
    if (!realpath(path, dir))
        return;
    size_t dl = strlen(dir);
    for (int n = 0; n < 4096; n++) { /* one mount at a time, rereading */
        FILE *f = fopen("/proc/self/mountinfo", "re");
        if (!f)
            return;
        char line[8192], best[4200] = "";
        while (fgets(line, sizeof line, f)) {
            /* ID PARENT MAJ:MIN ROOT MOUNTPOINT ...; octal escapes in paths */
            char mp[4200];
            if (sscanf(line, "%*s %*s %*s %*s %4199s", mp) != 1)
                continue;
            char *w = mp;
            for (char *r = mp; *r; r++) {
                if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] && r[3]) {
                    *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
                    r += 3;
                } else
                    *w++ = *r;
            }
            *w = 0;
            if (!strncmp(mp, dir, dl) && mp[dl] == '/' && strlen(mp) > strlen(best))
                snprintf(best, sizeof best, "%s", mp);
        }
        fclose(f);
        if (!best[0] || umount2(best, MNT_DETACH) < 0)
            return;
    }
}

void remove_tree_async(struct ctl *c, const char *path)
{
    (void)c;
    /* Renamed aside first, at once: the name is free for a new agent's data
     * dir (local backend) while the old tree is still being removed, and a
     * removal never reaches into the new one. */
    static unsigned seq;
    char gone[4200];
    const char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    if (strncmp(name, GONE_PREFIX, strlen(GONE_PREFIX)) != 0 &&
        snprintf(gone, sizeof gone, "%.*s" GONE_PREFIX "%s-%d-%u", (int)(name - path), path, name,
                 (int)getpid(), seq++) < (int)sizeof gone) {
        if (rename(path, gone) == 0)
            path = gone;
        else if (errno == ENOENT)
            return;
    }
    /* Workspaces can be large; the loop must not wait for the disk. The
     * reaper watcher collects the child. */
    pid_t pid = fork();
    if (pid == 0) {
        /* No inherited descriptor (a data dir's lock) outlives the removal. */
        syscall(SYS_close_range, 3u, ~0u, 0);
        unmount_under(path);
        remove_tree_now(path);
        _exit(0);
    }
    if (pid < 0)
        log_warn("cannot remove %s: fork: %s", path, strerror(errno));
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

void lat_add(struct latency *l, double seconds, bool error, ev_tstamp now)
{
    double us = seconds * 1e6;
    l->ring[l->next] = us > 4e9 ? 4000000000u : (uint32_t)us;
    l->next = (l->next + 1) % CTL_LAT_RING;
    if (l->n < CTL_LAT_RING)
        l->n++;
    l->total++;
    l->errors += error;
    int64_t sec = (int64_t)now;
    int i = (int)(sec % CTL_RATE_SECS);
    if (l->rate_at[i] != sec) {
        l->rate_at[i] = sec;
        l->rate_sec[i] = 0;
    }
    l->rate_sec[i]++;
}

uint32_t lat_pct(const struct latency *l, double p)
{
    if (l->n == 0)
        return 0;
    uint32_t tmp[CTL_LAT_RING];
    memcpy(tmp, l->ring, l->n * sizeof *tmp);
    qsort(tmp, l->n, sizeof *tmp, cmp_u32);
    uint32_t k = (uint32_t)(p * (l->n - 1) + 0.5);
    return tmp[k];
}

double lat_rate(const struct latency *l, ev_tstamp now)
{
    int64_t sec = (int64_t)now;
    uint64_t sum = 0;
    for (int i = 0; i < CTL_RATE_SECS; i++)
        if (l->rate_at[i] > sec - CTL_RATE_SECS && l->rate_at[i] <= sec)
            sum += l->rate_sec[i];
    return (double)sum / CTL_RATE_SECS;
}

/* ---- command line -------------------------------------------------------- */

static const char usage_text[] =
    "usage: slot-controller [options]\n"
    "\n"
    "Leases slot workspaces of slot-agents to RL trainers and runs their tool calls\n"
    "(see proto/PROTOCOL.md, 'Controller ops'; docs/controller.md).\n"
    "\n"
    "  --config FILE          YAML file with controller: and profiles: (see\n"
    "                         controller/examples/controller.yaml)\n"
    "  --listen ADDR          unix:PATH, tls:HOST:PORT (TLS 1.3: serves\n"
    "                         STATE/tls/api.pem, client certificates of\n"
    "                         STATE/tls/trainer-ca.pem) or\n"
    "                         tcp:HOST:PORT (plaintext: loopback only unless\n"
    "                         --insecure); repeatable (default\n"
    "                         unix:$XDG_RUNTIME_DIR/slot-controller.sock, else\n"
    "                         unix:/tmp/slot-controller-$UID.sock)\n"
    "  --profile NAME         run only these profiles (created when not in the file);\n"
    "                         repeatable\n"
    "  --backend NAME         backend of every profile (local)\n"
    "  --set P.FIELD=VALUE    set a field of profile P ('*' for all); repeatable\n"
    "  --FIELD VALUE          set a field of every profile, e.g. --slots-per-agent 8\n"
    "  --state-dir DIR        agents' sockets, logs and workspaces (default\n"
    "                         $XDG_RUNTIME_DIR/slot-controller, else\n"
    "                         /var/tmp/slot-controller-$UID: not /tmp, which\n"
    "                         slot boxes replace with a private one)\n"
    "  --name NAME            holder name recorded in agent leases (default\n"
    "                         slot-controller@HOST); keep it across restarts\n"
    "  --agent-bin PATH       slot-agent for the local backend (default: next to\n"
    "                         this binary, else PATH)\n"
    "  --token-file FILE      require hello with this token\n"
    "  --insecure             allow TCP listeners without a token\n"
    "  --tls-cert FILE, --tls-key FILE, --tls-ca FILE\n"
    "                         the trainer API's certificate, key and the CA of its\n"
    "                         clients (default STATE/tls/api.pem, api.key,\n"
    "                         trainer-ca.pem)\n"
    "  --cert-lifetime D      lifetime of the certificates the controller issues\n"
    "                         (default 24h; 30m, 24h, 7d; renewed at 2/3 of it)\n"
    "  --log-level LEVEL      debug|info|warn|error (default info)\n"
    "  --check                load the configuration, print the profiles, exit\n"
    "  --stop [--purge]       do not serve: find the agents a controller of this name\n"
    "                         and configuration left running (Nomad jobs, socket and\n"
    "                         exec.start agents), stop them all, exit; --purge also\n"
    "                         purges the Nomad jobs (`agentctl stop` does the same\n"
    "                         through a running controller)\n"
    "  --nomad-alloc-address FILE [LABEL]\n"
    "                         print HOST:PORT of port LABEL (default agent) in a Nomad\n"
    "                         allocation's JSON, as the nomad backend reads it\n"
    "  --version, --help\n"
    "\n"
    "Precedence: flags > SLOT_PROFILE_<NAME>_<FIELD> > SLOT_<FIELD> > the file.\n"
    "Profile fields:\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
    fputs(config_field_help(), f);
}

static char *self_dir_file(const char *name)
{
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return NULL;
    exe[n] = 0;
    char *slash = strrchr(exe, '/');
    if (!slash)
        return NULL;
    *slash = 0;
    char *p = NULL;
    if (asprintf(&p, "%s/%s", exe, name) < 0)
        return NULL;
    if (access(p, X_OK) == 0)
        return p;
    free(p);
    return NULL;
}

static char *search_path(const char *name)
{
    const char *path = getenv("PATH");
    if (!path)
        path = "/usr/local/bin:/usr/bin:/bin";
    char *dup = strdup(path), *save = NULL;
    for (char *d = strtok_r(dup, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        char *p = NULL;
        if (asprintf(&p, "%s/%s", d, name) >= 0 && access(p, X_OK) == 0) {
            free(dup);
            return p;
        }
        free(p);
    }
    free(dup);
    return strdup(name);
}

char *ctl_find_program(const char *name)
{
    char *p = self_dir_file(name);
    return p ? p : search_path(name);
}

static int read_token(struct ctl *c, const char *file, struct sp_err *err)
{
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_err_errno(err, errno, file);
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return sp_err_errno(err, errno, file);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        n--;
    if (n == 0)
        return sp_errf(err, SP_BAD_REQUEST, "%s: empty token", file);
    free(c->token);
    c->token = malloc((size_t)n);
    memcpy(c->token, buf, (size_t)n);
    c->token_len = (size_t)n;
    return 0;
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    sched_tick(w->data);
}

static void reaper_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

static bool agents_left(struct ctl *c)
{
    struct profile *p;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link)
    if (c->stop_all || (!p->be->persistent(p) && ag->pid > 0) || ag->helper_pid > 0)
        return true;
    return false;
}

static void stop_wait_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    if (!agents_left(w->data))
        ev_break(loop, EVBREAK_ALL);
}

static void stop_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    log_warn("agents did not stop in time; exiting anyway");
    ev_break(loop, EVBREAK_ALL);
}

void ctl_shutdown(struct ctl *c, bool everything)
{
    struct ev_loop *loop = c->loop;
    c->stop_all |= everything;
    if (c->stopping)
        return;
    c->stopping = true;
    ev_timer_stop(loop, &c->tick);
    tls_ca_stop(c);
    api_close_all(c);
    struct profile *p;
    struct agent *ag, *tmp;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        for (ag = TAILQ_FIRST(&p->agents); ag; ag = tmp) {
            tmp = TAILQ_NEXT(ag, link);
            if (c->stop_all || !p->be->persistent(p))
                agent_stop(c, ag, c->stop_all ? "controller stop" : "controller stopping");
            else if (ag->fd >= 0)
                agent_close_link(c, ag);
        }
    }
    ev_timer_init(&c->stop_poll, stop_wait_cb, 0.02, 0.02);
    c->stop_poll.data = c;
    ev_timer_start(loop, &c->stop_poll);
    /* Deregistering through a remote API may take its full request timeout
     * and retries; a local stop is quick. */
    ev_timer_init(&c->stop_deadline, stop_deadline_cb, c->stop_all ? 90 : 8, 0);
    ev_timer_start(loop, &c->stop_deadline);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    struct ctl *c = w->data;
    if (c->stopping) {
        log_warn("second signal: exiting now");
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    log_info("signal %d: stopping (agents of persistent backends keep running)", w->signum);
    ctl_shutdown(c, false);
}

static bool data_dir_in_use(struct ctl *c, const char *path)
{
    struct profile *p;
    struct agent *a;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(a, &p->agents, link)
    if (a->data_dir && !strcmp(a->data_dir, path))
        return true;
    return false;
}

/* A local agent's BASE/PROFILE/N (backends/local.c): removed only when no
 * agent of ours has it and no process (an agent of any controller) holds
 * its lock; left-over trees being removed (.gone-*) go too. */
static void remove_stale_indexed(struct ctl *c, const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *n = de->d_name;
        bool gone = !strncmp(n, GONE_PREFIX, strlen(GONE_PREFIX));
        if (!gone && (!n[0] || strspn(n, "0123456789") != strlen(n)))
            continue;
        char *path = NULL, *lock = NULL;
        if (asprintf(&path, "%s/%s", dir, n) < 0 || asprintf(&lock, "%s.lock", path) < 0) {
            free(path);
            break;
        }
        int fd = gone ? -1 : open(lock, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (gone || (!data_dir_in_use(c, path) && fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0)) {
            log_info("removing data of a gone agent: %s", path);
            remove_tree_async(c, path);
        }
        if (fd >= 0) {
            flock(fd, LOCK_UN); /* not left to the removing child's copy */
            close(fd);
        }
        free(path);
        free(lock);
    }
    closedir(d);
}

/* Data directories of agents that are gone (stdio agents of a controller
 * that was killed), under the default base only: PROFILE/N of the local
 * backend, and PROFILE-xxxxxx (the exec backend's, and the local backend's
 * before it named them by index). */
static void remove_stale_data(struct ctl *c)
{
    struct profile *p;
    char *base = NULL;
    if (asprintf(&base, "%s/data", c->state_dir) < 0)
        return;
    DIR *d = opendir(base);
    if (!d) {
        free(base);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        bool profile_dir = false;
        TAILQ_FOREACH(p, &c->profiles, link)
        profile_dir |= !p->workspace_base && !strcmp(p->name, de->d_name);
        if (profile_dir) {
            char *dir = NULL;
            if (asprintf(&dir, "%s/%s", base, de->d_name) >= 0)
                remove_stale_indexed(c, dir);
            free(dir);
            continue;
        }
        if (!strncmp(de->d_name, GONE_PREFIX, strlen(GONE_PREFIX))) {
            char *path = NULL;
            if (asprintf(&path, "%s/%s", base, de->d_name) >= 0)
                remove_tree_async(c, path);
            free(path);
            continue;
        }
        const char *dash = strrchr(de->d_name, '-');
        if (!dash || strlen(dash + 1) != 6 || strspn(dash + 1, "0123456789abcdef") != 6 ||
            agent_find(c, de->d_name, strlen(de->d_name)))
            continue;
        bool ours = false;
        TAILQ_FOREACH(p, &c->profiles, link)
        ours |= !p->workspace_base && strlen(p->name) == (size_t)(dash - de->d_name) &&
                !memcmp(p->name, de->d_name, (size_t)(dash - de->d_name));
        if (!ours)
            continue;
        char *path = NULL;
        if (asprintf(&path, "%s/%s", base, de->d_name) >= 0) {
            log_info("removing data of a gone agent: %s", path);
            remove_tree_async(c, path);
        }
        free(path);
    }
    closedir(d);
    free(base);
}

static int alloc_address(const char *file, const char *label)
{
    json_error_t je;
    json_t *j = json_load_file(file, 0, &je);
    if (!j) {
        fprintf(stderr, "slot-controller: %s:%d: %s\n", file, je.line, je.text);
        return 1;
    }
    char host[256];
    int port = 0;
    int rc = nomad_alloc_port((struct json_t *)j, label, host, sizeof host, &port);
    json_decref(j);
    if (rc < 0) {
        fprintf(stderr, "slot-controller: %s: no port labelled '%s'\n", file, label);
        return 1;
    }
    printf("%s:%d\n", host, port);
    return 0;
}

static void print_profiles(struct ctl *c)
{
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        printf("profile %s: backend %s, %u slots/agent, agents %u..%u, %.1f starts/s, "
               "idle_timeout %llu ms, max_lifetime %llu ms, acquire_timeout %llu ms, "
               "exec_timeout %llu ms, lease_timeout %llu ms, lease_grace %llu ms%s%s%s%s\n",
               p->name, p->backend, p->slots_per_agent, p->min_agents, p->max_agents,
               p->max_starts_per_second, (unsigned long long)p->idle_timeout_ms,
               (unsigned long long)p->max_lifetime_ms, (unsigned long long)p->acquire_timeout_ms,
               (unsigned long long)p->exec_timeout_ms, (unsigned long long)p->lease_timeout_ms,
               (unsigned long long)p->lease_grace_ms,
               p->be == &backend_local ? ", local.mode " : "",
               p->be != &backend_local         ? ""
               : p->local_mode == LOCAL_SOCKET ? "socket"
                                               : "stdio",
               *p->isolation ? ", isolation " : "", p->isolation);
        const struct {
            const char *name;
            const struct strlist *t;
        } ts[] = {{"start", &p->exec_start},
                  {"launch", &p->exec_launch},
                  {"stop", &p->exec_stop},
                  {"list", &p->exec_list}};
        for (size_t i = 0;
             (p->be == &backend_exec || p->be == &backend_modal || p->be == &backend_slurm) &&
             i < sizeof ts / sizeof ts[0];
             i++) {
            if (!ts[i].t->n)
                continue;
            printf("  exec.%s:", ts[i].name);
            for (size_t k = 0; k < ts[i].t->n; k++)
                printf(" %s", ts[i].t->v[k]);
            printf("\n");
        }
    }
}

int main(int argc, char **argv)
{
    static struct ctl ctx;
    struct ctl *c = &ctx;
    struct config_opts o = {0};
    struct strlist listen_flags = {0};
    const char *state_dir = NULL, *name = NULL, *agent_bin = NULL, *token_file = NULL;
    bool insecure = false, check = false, stop = false;
    const char *tls_flags[3] = {NULL, NULL, NULL};
    uint64_t lifetime = 0;
    TAILQ_INIT(&c->profiles);
    LIST_INIT(&c->conns);

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define TAKE()                                                                                     \
    do {                                                                                           \
        if (!v) {                                                                                  \
            fprintf(stderr, "slot-controller: %s needs a value\n", a);                             \
            return 2;                                                                              \
        }                                                                                          \
        i++;                                                                                       \
    } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--version")) {
            printf("slot-controller %s\n", CTL_VERSION);
            return 0;
        } else if (!strcmp(a, "--config")) {
            TAKE();
            o.file = v;
        } else if (!strcmp(a, "--listen")) {
            TAKE();
            strlist_add(&listen_flags, v);
        } else if (!strcmp(a, "--profile")) {
            TAKE();
            strlist_add(&o.profile_names, v);
        } else if (!strcmp(a, "--set")) {
            TAKE();
            strlist_add(&o.sets, v);
        } else if (!strcmp(a, "--log-level")) {
            TAKE();
            if (ctl_log_parse_level(v) < 0) {
                fprintf(stderr, "slot-controller: --log-level: debug|info|warn|error\n");
                return 2;
            }
            o.log_level = (char *)v;
            ctl_log_set_level(ctl_log_parse_level(v));
        } else if (!strcmp(a, "--state-dir")) {
            TAKE();
            state_dir = v;
        } else if (!strcmp(a, "--name")) {
            TAKE();
            name = v;
        } else if (!strcmp(a, "--agent-bin")) {
            TAKE();
            agent_bin = v;
        } else if (!strcmp(a, "--token-file")) {
            TAKE();
            token_file = v;
        } else if (!strcmp(a, "--insecure")) {
            insecure = true;
        } else if (!strcmp(a, "--tls-cert") || !strcmp(a, "--tls-key") || !strcmp(a, "--tls-ca")) {
            TAKE();
            tls_flags[a[6] == 'c' && a[7] == 'e' ? 0 : a[6] == 'k' ? 1 : 2] = v;
        } else if (!strcmp(a, "--cert-lifetime")) {
            TAKE();
            if (tls_parse_lifetime(v, &lifetime) < 0) {
                fprintf(stderr,
                        "slot-controller: --cert-lifetime: expected a duration (seconds, "
                        "or 30m, 24h, 7d), got '%s'\n",
                        v);
                return 2;
            }
        } else if (!strcmp(a, "--check")) {
            check = true;
        } else if (!strcmp(a, "--stop")) {
            stop = true;
        } else if (!strcmp(a, "--purge")) {
            c->purge = true;
        } else if (!strcmp(a, "--nomad-alloc-address")) {
            /* Which address would the nomad backend use for this allocation
             * (GET /v1/allocation/:id saved to FILE)? An operator's check,
             * and the tests' way into the allocation JSON handling. */
            TAKE();
            const char *label = i + 1 < argc ? argv[i + 1] : "agent";
            return alloc_address(v, label);
        } else if (!strncmp(a, "--", 2) && a[2]) {
            /* --FIELD VALUE for every profile (--backend, --slots-per-agent, ...). */
            TAKE();
            char set[512];
            snprintf(set, sizeof set, "*.%s=%s", a + 2, v);
            for (char *q = set + 2; *q && *q != '='; q++)
                if (*q == '-')
                    *q = '_';
            strlist_add(&o.sets, set);
        } else {
            fprintf(stderr, "slot-controller: unexpected argument '%s' (see --help)\n", a);
            return 2;
        }
#undef TAKE
    }

    struct sp_err err;
    int crc = config_load(c, &o, &err);
    strlist_clear(&o.sets);
    strlist_clear(&o.profile_names);
    if (crc < 0) {
        strlist_clear(&listen_flags);
        fprintf(stderr, "slot-controller: %s\n", err.msg);
        return 2;
    }
    if (listen_flags.n) {
        strlist_clear(&c->listen);
        c->listen = listen_flags;
    }
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (!c->listen.n) {
        char def[512];
        if (xdg && *xdg)
            snprintf(def, sizeof def, "unix:%s/slot-controller.sock", xdg);
        else
            snprintf(def, sizeof def, "unix:/tmp/slot-controller-%u.sock", (unsigned)getuid());
        strlist_add(&c->listen, def);
    }
    if (state_dir) {
        free(c->state_dir);
        c->state_dir = strdup(state_dir);
    }
    if (!c->state_dir) {
        if (xdg && *xdg) {
            if (asprintf(&c->state_dir, "%s/slot-controller", xdg) < 0)
                return 1;
        } else if (asprintf(&c->state_dir, "/var/tmp/slot-controller-%u", (unsigned)getuid()) < 0)
            return 1;
    }
    if (name)
        snprintf(c->name, sizeof c->name, "%s", name);
    if (!*c->name) {
        char host[64] = "localhost";
        gethostname(host, sizeof host - 1);
        snprintf(c->name, sizeof c->name, "slot-controller@%s", host);
    }
    if (agent_bin) {
        free(c->agent_bin);
        c->agent_bin = strdup(agent_bin);
    }
    if (!c->agent_bin) {
        c->agent_bin = self_dir_file("slot-agent");
        if (!c->agent_bin)
            c->agent_bin = search_path("slot-agent");
    }
    if (token_file || c->token) {
        char *tf = strdup(token_file ? token_file : c->token);
        free(c->token);
        c->token = NULL;
        int rc = read_token(c, tf, &err);
        free(tf);
        if (rc < 0) {
            fprintf(stderr, "slot-controller: token file: %s\n", err.msg);
            return 2;
        }
    }
    c->insecure |= insecure;
    char **api_tls[3] = {&c->api_tls_cert, &c->api_tls_key, &c->api_tls_ca};
    for (int i = 0; i < 3; i++)
        if (tls_flags[i]) {
            free(*api_tls[i]);
            *api_tls[i] = strdup(tls_flags[i]);
        }
    if (lifetime)
        c->tls_lifetime_s = lifetime;
    if (check) {
        print_profiles(c);
        return 0;
    }

    char *agents_dir = NULL;
    if (asprintf(&agents_dir, "%s/agents", c->state_dir) < 0 || mkdir_p(agents_dir, 0700) < 0) {
        fprintf(stderr, "slot-controller: state directory %s: %s\n", c->state_dir, strerror(errno));
        return 1;
    }
    chmod(c->state_dir, 0755); /* slot users must traverse to their workspaces */
    free(agents_dir);

    signal(SIGPIPE, SIG_IGN);
    c->loop = ev_default_loop(EVFLAG_AUTO);
    c->started = ev_now(c->loop);
    c->instance = random_u64() >> 11;
    ev_signal_init(&c->sig_term, signal_cb, SIGTERM);
    ev_signal_init(&c->sig_int, signal_cb, SIGINT);
    c->sig_term.data = c->sig_int.data = c;
    ev_signal_start(c->loop, &c->sig_term);
    ev_signal_start(c->loop, &c->sig_int);
    ev_child_init(&c->reaper, reaper_cb, 0, 0);
    ev_child_start(c->loop, &c->reaper);
    /* Before any agent is started or found again (their certificates,
     * relays' client identity) and before the API listens (api.pem). */
    if (tls_ca_init(c, &err) < 0) {
        log_error("%s", err.msg);
        return 1;
    }

    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        int n = p->be->list_agents ? p->be->list_agents(c, p) : 0;
        if (n)
            log_info("profile %s: %d agents from an earlier run", p->name, n);
    }
    if (stop) {
        /* The agents of a controller that is gone: find them as a restart
         * would, then stop them all instead of serving. */
        ctl_shutdown(c, true);
        ev_run(c->loop, 0);
        log_info("stopped every agent of '%s'%s", c->name, c->purge ? " (Nomad jobs purged)" : "");
        return 0;
    }
    remove_stale_data(c);
    tls_remove_stale(c);
    if (api_listen(c, &err) < 0) {
        log_error("%s", err.msg);
        return 1;
    }
    log_info("slot-controller %s '%s' started; state in %s; agent %s", CTL_VERSION, c->name,
             c->state_dir, c->agent_bin);
    ev_timer_init(&c->tick, tick_cb, 0.25, 0.25);
    c->tick.data = c;
    ev_timer_start(c->loop, &c->tick);
    sched_tick(c);
    ev_run(c->loop, 0);
    log_info("stopped");
    return 0;
}
