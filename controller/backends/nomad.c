/* The nomad backend: one Nomad job per agent, so the controller, not
 * Nomad, picks which agent goes on scale-down (lowering a group's count lets
 * Nomad stop the highest indexes, whatever they hold). Each job comes from
 * the profile's HCL2 template, turned into JSON by Nomad's own
 * /v1/jobs/parse, named slot-CONTROLLER-AGENT and registered; the
 * allocation is watched with blocking queries, its address read from the
 * agent's port label, and the agent reached over TCP with a per-job token
 * (derived from the controller's secret, so a restarted controller can
 * compute it again; it only travels in the job's variables). Nomad's own
 * words (task events, placement failures, HTTP errors) become the errors.
 * The agent outlives its stream: when the stream ends, probe asks Nomad
 * whether the same allocation still runs (and where), and attach connects
 * to it again. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <jansson.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sha2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl.h"
#include "http.h"
#include "tls_ca.h"

/* Nomad's own default for blocking queries: an idle agent costs one
 * request per 5 minutes, woken at once by any change to its allocations. */
#define WATCH_WAIT_S 300
#define API_TIMEOUT_S 30.0
#define CONNECT_RETRY_S 0.2
#define LIST_TIMEOUT_S 30.0
/* A probe, and a reconnect's connect, wait at most this long (or
 * exec.command_timeout if shorter): the controller holds the agent's
 * reconnect meanwhile, and retries (probing again) within its own
 * reconnect_timeout. */
#define PROBE_MAX_S 10.0

struct nprof {
    struct http_client *http;
    char *query; /* "namespace=..&region=.." */
    char *hcl;
    char prefix[200]; /* job ids of this controller and profile */
    char secret[65];
};

enum nphase { NP_PARSE, NP_REGISTER, NP_WATCH, NP_CONNECT, NP_READY, NP_STOP };

struct nagent {
    struct agent *ag;
    enum nphase phase;
    char job_id[240];
    char eval_id[64];
    char alloc_id[64];
    uint64_t index;
    struct http_req *req, *watch;
    int fd;
    ev_io cio;
    ev_timer ctimer, deadline, rewatch, evtimer;
    char host[64];
    int port;
    int empty;
    char last_event[600];
    int cerr;     /* why the last connect attempt failed (errno; 0: no answer yet) */
    int restarts; /* the tasks' restarts when the stream was first handed over */
    /* the probe in flight: done is answered exactly once (probe_finish) */
    struct http_req *probe;
    probe_done_fn probe_done;
    ev_timer ptimer;
};

/* ---- helpers --------------------------------------------------------------- */

static struct nprof *np(struct profile *p)
{
    return p->be_data;
}

static struct nagent *na(struct agent *ag)
{
    return ag->be_data;
}

static double probe_bound_s(const struct profile *p)
{
    double s = (double)p->exec_command_timeout_ms / 1000;
    return s > 0 && s < PROBE_MAX_S ? s : PROBE_MAX_S;
}

static const char *envdef(char **field, const char *var)
{
    if (!*field) {
        const char *v = getenv(var);
        if (v && *v)
            *field = strdup(v);
    }
    return *field;
}

static void controller_id(const struct ctl *c, char *out, size_t cap)
{
    size_t i = 0;
    for (const char *s = c->name; *s && i + 1 < cap; s++)
        out[i++] = isalnum((unsigned char)*s) || *s == '_' || *s == '-' ? *s : '-';
    out[i] = 0;
}

static char *read_file(const char *path, struct sp_err *err)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        sp_err_errno(err, errno, path);
        return NULL;
    }
    size_t cap = 8192, len = 0;
    char *b = malloc(cap);
    size_t n;
    while (b && (n = fread(b + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 == cap && cap < (1u << 20)) {
            cap *= 2;
            b = realloc(b, cap);
        }
    }
    fclose(f);
    if (!b)
        abort();
    b[len] = 0;
    return b;
}

/* Per-job token: sha256(secret ":" job id), hex. */
static void job_token(const struct nprof *n, const char *job, char out[65])
{
    SHA2_CTX ctx;
    uint8_t d[32];
    SHA256Init(&ctx);
    SHA256Update(&ctx, (const uint8_t *)n->secret, strlen(n->secret));
    SHA256Update(&ctx, (const uint8_t *)":", 1);
    SHA256Update(&ctx, (const uint8_t *)job, strlen(job));
    SHA256Final(d, &ctx);
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* One secret per state directory (STATE/nomad-secret, 0600). */
static int load_secret(struct ctl *c, struct nprof *n, struct sp_err *err)
{
    char *path = NULL;
    if (asprintf(&path, "%s/nomad-secret", c->state_dir) < 0)
        abort();
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t k = read(fd, n->secret, sizeof n->secret - 1);
        close(fd);
        n->secret[k > 0 ? k : 0] = 0;
    }
    if (strlen(n->secret) < 32) {
        snprintf(n->secret, sizeof n->secret, "%016" PRIx64 "%016" PRIx64 "%016" PRIx64,
                 random_u64(), random_u64(), random_u64());
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write(fd, n->secret, strlen(n->secret)) < 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            free(path);
            return sp_err_errno(err, e, "nomad secret");
        }
        close(fd);
    }
    free(path);
    return 0;
}

static int ensure(struct ctl *c, struct profile *p, struct sp_err *err)
{
    if (p->be_data)
        return 0;
    struct nprof *n = calloc(1, sizeof *n);
    if (!n)
        abort();
    struct http_conf hc = {
        .addr = p->nomad.addr,
        .token = p->nomad.token,
        .cacert = p->nomad.cacert,
        .capath = p->nomad.capath,
        .client_cert = p->nomad.client_cert,
        .client_key = p->nomad.client_key,
        .tls_server_name = p->nomad.tls_server_name,
        .skip_verify = p->nomad.skip_verify && (!strcmp(p->nomad.skip_verify, "true") ||
                                                !strcmp(p->nomad.skip_verify, "1")),
        .agent = "slot-controller/" CTL_VERSION,
    };
    n->http = http_client_new(c->loop, &hc, err);
    if (!n->http || load_secret(c, n, err) < 0) {
        if (n->http)
            http_client_free(n->http);
        free(n);
        return -1;
    }
    n->hcl = read_file(p->nomad.job, err);
    if (!n->hcl) {
        http_client_free(n->http);
        free(n);
        return -1;
    }
    char q[300] = "";
    if (p->nomad.ns)
        snprintf(q, sizeof q, "namespace=%s", p->nomad.ns);
    if (p->nomad.region)
        snprintf(q + strlen(q), sizeof q - strlen(q), "%sregion=%s", *q ? "&" : "",
                 p->nomad.region);
    n->query = strdup(q);
    char cid[100];
    controller_id(c, cid, sizeof cid);
    snprintf(n->prefix, sizeof n->prefix, "slot-%.100s-%.63s-", cid, p->name);
    p->be_data = n;
    return 0;
}

/* "/v1/x" + "?"/"&" + namespace/region */
static char *api_path(struct nprof *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *api_path(struct nprof *n, const char *fmt, ...)
{
    char *p = NULL, *out = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&p, fmt, ap) < 0)
        abort();
    va_end(ap);
    if (!*n->query)
        return p;
    if (asprintf(&out, "%s%s%s", p, strchr(p, '?') ? "&" : "?", n->query) < 0)
        abort();
    free(p);
    return out;
}

/* Nomad's error bodies are text; keep one line of it. */
static void body_line(const struct http_resp *r, char *out, size_t cap)
{
    if (r->status == 0) {
        snprintf(out, cap, "%s", r->error);
        return;
    }
    size_t i = 0;
    for (const char *s = r->body; *s && i + 1 < cap; s++)
        out[i++] = *s == '\n' || *s == '\r' ? ' ' : *s;
    while (i && out[i - 1] == ' ')
        i--;
    out[i] = 0;
}

static void http_failure(struct agent *ag, const char *what, const struct http_resp *r, char *out,
                         size_t cap)
{
    char line[400];
    body_line(r, line, sizeof line);
    const char *addr = ag->prof->nomad.addr ? ag->prof->nomad.addr : "http://127.0.0.1:4646";
    if (r->status == 0)
        snprintf(out, cap, "Nomad unreachable at %s (%s, %d attempts): %s", addr, what, r->attempts,
                 line);
    else if (r->status == 403)
        snprintf(out, cap, "Nomad refused the ACL token (%s): %s", what, line);
    else if (r->status == 400 || r->status == 500)
        snprintf(out, cap, "Nomad rejected the job (%s, HTTP %ld): %s", what, r->status, line);
    else
        snprintf(out, cap, "Nomad %s: HTTP %ld: %s", what, r->status, line);
}

static void fail_start(struct ctl *c, struct agent *ag, const char *why)
{
    char msg[700];
    snprintf(msg, sizeof msg, "agent %s: %s", ag->id, why);
    snprintf(ag->error, sizeof ag->error, "%.500s", why);
    sched_agent_failed(c, ag->prof, msg);
    agent_stop(c, ag, msg);
}

/* A start step's answer: true (the start failed, in Nomad's words) unless
 * HTTP 200. */
static bool start_step_failed(struct agent *ag, const char *what, const struct http_resp *r)
{
    if (r->status == 200)
        return false;
    char why[600];
    http_failure(ag, what, r, why, sizeof why);
    fail_start(ag->ctl, ag, why);
    return true;
}

/* ---- JSON of allocations -------------------------------------------------- */

static const char *jstr(json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

/* What Nomad said, across tasks: the last failure (driver, setup, hook:
 * the cause) and, if later, the last event (often only "Not Restarting"). */
static void last_event(json_t *alloc, char *out, size_t cap)
{
    json_t *ts = json_object_get(alloc, "TaskStates");
    const char *task;
    json_t *st;
    int64_t best = -1, bestf = -1;
    char last[300] = "", fail[300] = "";
    *out = 0;
    json_object_foreach(ts, task, st)
    {
        json_t *evs = json_object_get(st, "Events");
        size_t i;
        json_t *ev;
        json_array_foreach(evs, i, ev)
        {
            int64_t t = json_integer_value(json_object_get(ev, "Time"));
            const char *m = jstr(ev, "DisplayMessage");
            if (!*m)
                m = jstr(ev, "Message");
            if (!*m)
                continue;
            const char *type = jstr(ev, "Type");
            bool failure = *jstr(ev, "DriverError") || *jstr(ev, "SetupError") ||
                           strstr(type, "Failure") || strstr(type, "failed") ||
                           strstr(type, "Failed");
            if (failure && t >= bestf) {
                bestf = t;
                snprintf(fail, sizeof fail, "%s: %s: %s", task, type, m);
            }
            if (t >= best) {
                best = t;
                snprintf(last, sizeof last, "%s: %s: %s", task, type, m);
            }
        }
    }
    if (*fail && strcmp(fail, last))
        snprintf(out, cap, "%.290s; then %.290s", fail, last);
    else
        snprintf(out, cap, "%s", *last ? last : fail);
}

static bool tasks_running(json_t *alloc)
{
    json_t *ts = json_object_get(alloc, "TaskStates");
    const char *task;
    json_t *st;
    int n = 0;
    json_object_foreach(ts, task, st)
    {
        if (strcmp(jstr(st, "State"), "running"))
            return false;
        n++;
    }
    return n > 0;
}

/* host:port of the port label in a full allocation (new and old layouts). */
int nomad_alloc_port(json_t *alloc, const char *label, char *host, size_t hcap, int *port)
{
    json_t *ar = json_object_get(alloc, "AllocatedResources");
    json_t *shared = json_object_get(ar, "Shared");
    size_t i;
    json_t *pt;
    json_array_foreach(json_object_get(shared, "Ports"), i, pt)
    {
        if (!strcmp(jstr(pt, "Label"), label)) {
            snprintf(host, hcap, "%s", jstr(pt, "HostIP"));
            *port = (int)json_integer_value(json_object_get(pt, "Value"));
            return *host && *port > 0 ? 0 : -1;
        }
    }
    /* Older layouts: Shared.Networks, then per task networks. */
    json_t *nets[2] = {json_object_get(shared, "Networks"), NULL};
    json_t *tasks = json_object_get(ar, "Tasks");
    const char *tn;
    json_t *t;
    json_object_foreach(tasks, tn, t)
    {
        nets[1] = json_object_get(t, "Networks");
        break;
    }
    for (int k = 0; k < 2; k++) {
        json_t *net;
        json_array_foreach(nets[k], i, net)
        {
            const char *ip = jstr(net, "IP");
            const char *kinds[] = {"DynamicPorts", "ReservedPorts"};
            for (int w = 0; w < 2; w++) {
                size_t j;
                json_t *p;
                json_array_foreach(json_object_get(net, kinds[w]), j, p)
                {
                    if (!strcmp(jstr(p, "Label"), label)) {
                        snprintf(host, hcap, "%s", ip);
                        *port = (int)json_integer_value(json_object_get(p, "Value"));
                        return *host && *port > 0 ? 0 : -1;
                    }
                }
            }
        }
    }
    return -1;
}

/* ---- connecting to the agent ---------------------------------------------- */

static void watch(struct ctl *c, struct agent *ag);

static int connect_try(struct ctl *c, struct agent *ag, char *why, size_t cap);

/* A reconnect of an agent that was ready: its failures are for the
 * controller to weigh (agent_relink_failed), not a failed start that counts
 * against the profile and stops the job. */
static bool relinking(struct agent *ag)
{
    return na(ag)->phase == NP_READY && ag->state != AG_STARTING;
}

static void connect_stop(struct ctl *c, struct nagent *a)
{
    ev_timer_stop(c->loop, &a->ctimer);
    ev_io_stop(c->loop, &a->cio);
    if (a->fd >= 0) {
        close(a->fd);
        a->fd = -1;
    }
}

static void connect_failed(struct ctl *c, struct agent *ag, const char *why)
{
    struct nagent *a = na(ag);
    connect_stop(c, a);
    ev_timer_stop(c->loop, &a->deadline);
    if (relinking(ag))
        agent_relink_failed(c, ag, why);
    else
        fail_start(c, ag, why);
}

static void ctimer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    char why[200];
    if (connect_try(a->ag->ctl, a->ag, why, sizeof why) < 0)
        connect_failed(a->ag->ctl, a->ag, why);
}

static void cio_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct nagent *a = w->data;
    struct agent *ag = a->ag;
    ev_io_stop(loop, w);
    int e = 0;
    socklen_t l = sizeof e;
    getsockopt(a->fd, SOL_SOCKET, SO_ERROR, &e, &l);
    if (e) {
        a->cerr = e;
        close(a->fd);
        a->fd = -1;
        ev_timer_set(&a->ctimer, CONNECT_RETRY_S, 0);
        ev_timer_start(loop, &a->ctimer);
        return;
    }
    int fd = a->fd;
    a->fd = -1;
    if (a->phase == NP_READY) /* agent.c says more once hello is answered */
        log_debug("agent %s: reconnected to %s:%d (Nomad allocation %.8s)", ag->id, a->host,
                  a->port, a->alloc_id);
    a->phase = NP_READY;
    *ag->error = 0; /* "waiting for Nomad: ..." is over */
    ev_timer_stop(loop, &a->deadline);
    if (!tls_profile_on(ag->prof)) {
        agent_stream_ready(ag->ctl, ag, fd);
        return;
    }
    char where[100];
    snprintf(where, sizeof where, "tcp:%s:%d", a->host, a->port);
    agent_stream_ready_tls(ag->ctl, ag, fd, where);
}

/* Begin a non-blocking connect to the allocation's address; refusals retry
 * every CONNECT_RETRY_S (the agent may not listen yet) until a deadline
 * the caller armed. -1 with why when no attempt can even be made. */
static int connect_try(struct ctl *c, struct agent *ag, char *why, size_t cap)
{
    struct nagent *a = na(ag);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a->port)};
    if (inet_pton(AF_INET, a->host, &sa.sin_addr) != 1) {
        snprintf(why, cap, "allocation address '%s' is not an IPv4 address", a->host);
        return -1;
    }
    a->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (a->fd < 0) {
        snprintf(why, cap, "%s", strerror(errno));
        return -1;
    }
    if (connect(a->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        a->cerr = errno;
        close(a->fd);
        a->fd = -1;
        ev_timer_set(&a->ctimer, CONNECT_RETRY_S, 0);
        ev_timer_start(c->loop, &a->ctimer);
        return 0;
    }
    ev_io_init(&a->cio, cio_cb, a->fd, EV_WRITE);
    a->cio.data = a;
    ev_io_start(c->loop, &a->cio);
    return 0;
}

static void relink_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    struct agent *ag = a->ag;
    char why[400];
    snprintf(why, sizeof why, "cannot reconnect to %s:%d (Nomad allocation %.8s) within %.0f s: %s",
             a->host, a->port, a->alloc_id, probe_bound_s(ag->prof),
             a->cerr ? strerror(a->cerr) : "no answer");
    connect_failed(ag->ctl, ag, why);
}

/* Restarts Nomad made of the allocation's tasks, in place: each one is a
 * new agent process behind the same address. */
static int task_restarts(json_t *alloc)
{
    const char *task;
    json_t *st;
    int n = 0;
    json_object_foreach(json_object_get(alloc, "TaskStates"), task, st)
    {
        n += (int)json_integer_value(json_object_get(st, "Restarts"));
    }
    return n;
}

/* ---- watching the allocation ------------------------------------------------ */

static void on_alloc(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    struct ctl *c = ag->ctl;
    a->req = NULL;
    char why[600];
    if (start_step_failed(ag, "reading the allocation", r))
        return;
    json_t *j = json_loads(r->body, 0, NULL);
    const char *label = ag->prof->nomad.port_label ? ag->prof->nomad.port_label : "agent";
    if (!j || nomad_alloc_port(j, label, a->host, sizeof a->host, &a->port) < 0) {
        snprintf(why, sizeof why,
                 "allocation %.8s has no port labelled '%s' (the job template must give the "
                 "agent a port with that label)",
                 a->alloc_id, label);
        json_decref(j);
        fail_start(c, ag, why);
        return;
    }
    a->restarts = task_restarts(j);
    json_decref(j);
    snprintf(ag->address, sizeof ag->address, "%s:%s:%d (nomad alloc %.8s)",
             tls_profile_on(ag->prof) ? "tls" : "tcp", a->host, a->port, a->alloc_id);
    a->phase = NP_CONNECT;
    if (connect_try(c, ag, why, sizeof why) < 0) {
        fail_start(c, ag, why);
        return;
    }
    watch(c, ag);
}

static void rewatch_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    watch(a->ag->ctl, a->ag);
}

static void read_eval(struct agent *ag);

static void evtimer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    read_eval(a->ag);
}

static void on_eval(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    a->req = NULL;
    if (r->status != 200)
        return;
    json_t *j = json_loads(r->body, 0, NULL);
    const char *st = jstr(j, "Status");
    if ((!strcmp(st, "pending") || !*st) && a->phase == NP_WATCH && !*a->alloc_id) {
        /* Not evaluated yet: look again shortly (the allocations watch
         * would sleep until a placement that may never come). */
        json_decref(j);
        ev_timer_set(&a->evtimer, 0.5, 0);
        ev_timer_start(ag->ctl->loop, &a->evtimer);
        return;
    }
    json_t *failed = json_object_get(j, "FailedTGAllocs");
    if (json_object_size(failed)) {
        char why[600] = "no node can place the job:";
        const char *g;
        json_t *m;
        json_object_foreach(failed, g, m)
        {
            const char *kinds[] = {"ConstraintFiltered", "DimensionExhausted", "ClassExhausted"};
            for (int k = 0; k < 3; k++) {
                const char *reason;
                json_t *cnt;
                json_object_foreach(json_object_get(m, kinds[k]), reason, cnt)
                {
                    size_t l = strlen(why);
                    snprintf(why + l, sizeof why - l, " %s (%lld node%s);", reason,
                             (long long)json_integer_value(cnt),
                             json_integer_value(cnt) == 1 ? "" : "s");
                }
            }
            size_t l = strlen(why);
            snprintf(why + l, sizeof why - l, " %lld nodes evaluated",
                     (long long)json_integer_value(json_object_get(m, "NodesEvaluated")));
        }
        json_decref(j);
        fail_start(ag->ctl, ag, why);
        return;
    }
    json_decref(j);
}

static void read_eval(struct agent *ag)
{
    struct nagent *a = na(ag);
    if (!*a->eval_id || a->req || a->phase != NP_WATCH)
        return;
    char *path = api_path(np(ag->prof), "/v1/evaluation/%s", a->eval_id);
    a->req = http_request(np(ag->prof)->http, "GET", path, NULL, API_TIMEOUT_S, on_eval, ag);
    free(path);
}

static void probe_finish(struct ctl *c, struct agent *ag, int alive, const char *why);

/* The watch saw the allocation go. With a probe waiting (the stream ended
 * already), that is the probe's answer, so the controller hears it once
 * and decides; otherwise the agent is lost. */
static void alloc_lost(struct ctl *c, struct agent *ag, const char *why)
{
    if (!na(ag)->probe_done) {
        agent_lost(c, ag, why);
        return;
    }
    probe_finish(c, ag, 0, why);
    /* The controller stops the agent on that answer, as a rule; should it
     * not, the watch goes on (and says it again). */
    if (na(ag)->phase != NP_STOP)
        watch(c, ag);
}

/* Client statuses of an allocation that no longer runs (unknown: its node
 * lost contact with the servers). */
static bool alloc_ended(const char *cs)
{
    return !strcmp(cs, "failed") || !strcmp(cs, "lost") || !strcmp(cs, "unknown") ||
           !strcmp(cs, "complete");
}

static void on_allocs(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    struct ctl *c = ag->ctl;
    a->watch = NULL;
    if (r->status != 200) {
        char why[600];
        http_failure(ag, "watching the job's allocations", r, why, sizeof why);
        if (a->phase == NP_READY) {
            /* Nomad down is not the agent down: the stream says that. */
            log_warn("agent %s: %s; watching again in 5 s", ag->id, why);
            ev_timer_set(&a->rewatch, 5, 0);
            ev_timer_start(c->loop, &a->rewatch);
            return;
        }
        fail_start(c, ag, why);
        return;
    }
    if (r->index < a->index)
        a->index = 0; /* the index went backwards (a new leader): start over */
    else
        a->index = r->index;
    json_t *arr = json_loads(r->body, 0, NULL);
    json_t *live = NULL;
    size_t i;
    json_t *al;
    json_array_foreach(arr, i, al)
    {
        if (strcmp(jstr(al, "DesiredStatus"), "run")) {
            /* Nomad is stopping our allocation (drain, alloc stop, node
             * loss): the agent goes now, whatever it still answers. */
            if ((a->phase == NP_READY || a->phase == NP_CONNECT) &&
                !strcmp(jstr(al, "ID"), a->alloc_id)) {
                char why[300];
                snprintf(why, sizeof why, "Nomad is stopping allocation %.8s (desired %s)",
                         a->alloc_id, jstr(al, "DesiredStatus"));
                json_decref(arr);
                alloc_lost(c, ag, why);
                return;
            }
            continue;
        }
        /* The newest wins (a rescheduled allocation replaces a lost one). */
        if (!live || json_integer_value(json_object_get(al, "CreateIndex")) >
                         json_integer_value(json_object_get(live, "CreateIndex")))
            live = al;
    }
    if (!live) {
        json_decref(arr);
        if (a->phase == NP_READY || a->phase == NP_CONNECT) {
            alloc_lost(c, ag, "Nomad: the job has no running allocation any more");
            return;
        }
        if (++a->empty == 1)
            read_eval(ag);
        watch(c, ag);
        return;
    }
    const char *cs = jstr(live, "ClientStatus");
    char ev[600];
    last_event(live, ev, sizeof ev);
    if (*ev)
        snprintf(a->last_event, sizeof a->last_event, "%s", ev);
    bool bad = alloc_ended(cs);
    const char *id = jstr(live, "ID");
    if (bad) {
        char why[600];
        snprintf(why, sizeof why, "Nomad allocation %.8s %s%s%.500s", id, cs, *ev ? ": " : "", ev);
        json_decref(arr);
        if (a->phase == NP_READY || a->phase == NP_CONNECT)
            alloc_lost(c, ag, why);
        else
            fail_start(c, ag, why);
        return;
    }
    if ((a->phase == NP_READY || a->phase == NP_CONNECT) && strcmp(id, a->alloc_id)) {
        char why[200];
        snprintf(why, sizeof why, "Nomad allocation %.8s replaced by %.8s", a->alloc_id, id);
        json_decref(arr);
        alloc_lost(c, ag, why);
        return;
    }
    if (a->phase == NP_WATCH && !strcmp(cs, "running") && tasks_running(live) && !a->req) {
        snprintf(a->alloc_id, sizeof a->alloc_id, "%s", id);
        json_decref(arr);
        char *path = api_path(np(ag->prof), "/v1/allocation/%s", a->alloc_id);
        a->req = http_request(np(ag->prof)->http, "GET", path, NULL, API_TIMEOUT_S, on_alloc, ag);
        free(path);
        return; /* on_alloc watches again */
    }
    if (a->phase == NP_WATCH && *ev)
        snprintf(ag->error, sizeof ag->error, "waiting for Nomad: %.480s", ev);
    json_decref(arr);
    watch(c, ag);
}

static void watch(struct ctl *c, struct agent *ag)
{
    (void)c;
    struct nagent *a = na(ag);
    if (a->watch || a->phase == NP_STOP)
        return;
    char *path = api_path(np(ag->prof), "/v1/job/%s/allocations?index=%" PRIu64 "&wait=%ds",
                          a->job_id, a->index, WATCH_WAIT_S);
    /* The server may hold the answer for wait + wait/16. */
    a->watch =
        http_request(np(ag->prof)->http, "GET", path, NULL, WATCH_WAIT_S * 1.1 + 10, on_allocs, ag);
    free(path);
}

/* ---- probing: is the agent's allocation still there? ------------------------ */

/* Answer the probe, once. Its request and timer go first, so that done
 * may stop the agent (nomad_stop finds no probe left to answer). */
static void probe_finish(struct ctl *c, struct agent *ag, int alive, const char *why)
{
    struct nagent *a = na(ag);
    probe_done_fn done = a->probe_done;
    if (!done)
        return;
    a->probe_done = NULL;
    http_cancel(a->probe);
    a->probe = NULL;
    ev_timer_stop(c->loop, &a->ptimer);
    log_debug("agent %s: probe: %s (%s)", ag->id,
              alive > 0    ? "alive"
              : alive == 0 ? "gone"
                           : "cannot tell",
              why);
    done(c, ag, alive, why);
}

static void ptimer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    struct agent *ag = a->ag;
    char why[300];
    snprintf(why, sizeof why, "Nomad did not say within %.0f s whether allocation %.8s runs",
             probe_bound_s(ag->prof), a->alloc_id);
    probe_finish(ag->ctl, ag, -1, why);
}

/* Nomad could not be asked: its words, without http_failure's "rejected
 * the job" (meant for registering) on a 400 or 500. */
static void probe_http_failed(struct agent *ag, const char *what, const struct http_resp *r)
{
    char why[600];
    if (r->status == 400 || r->status == 500) {
        char line[400];
        body_line(r, line, sizeof line);
        snprintf(why, sizeof why, "Nomad %s: HTTP %ld: %s", what, r->status, line);
    } else
        http_failure(ag, what, r, why, sizeof why);
    probe_finish(ag->ctl, ag, -1, why);
}

/* The allocation is no longer known (garbage-collected once it ended):
 * the job says whether the operator removed it. */
static void on_probe_job(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    a->probe = NULL;
    char why[400];
    if (r->status == 404) {
        snprintf(why, sizeof why, "Nomad job %s is gone (purged), and allocation %.8s with it",
                 a->job_id, a->alloc_id);
        probe_finish(ag->ctl, ag, 0, why);
        return;
    }
    if (r->status != 200) {
        probe_http_failed(ag, "reading the job", r);
        return;
    }
    json_t *j = json_loads(r->body, 0, NULL);
    if (json_is_true(json_object_get(j, "Stop")))
        snprintf(why, sizeof why, "Nomad job %s was stopped", a->job_id);
    else
        snprintf(why, sizeof why, "Nomad no longer knows allocation %.8s (garbage-collected)",
                 a->alloc_id);
    json_decref(j);
    probe_finish(ag->ctl, ag, 0, why);
}

/* The allocation still runs: take its address as Nomad gives it now (the
 * agent is reached there on attach). */
static void probe_running(struct agent *ag, json_t *alloc, char *why, size_t cap)
{
    struct nagent *a = na(ag);
    const char *label = ag->prof->nomad.port_label ? ag->prof->nomad.port_label : "agent";
    char host[sizeof a->host];
    int port = 0;
    /* No port any more would be odd (it had one): keep the address known. */
    if (nomad_alloc_port(alloc, label, host, sizeof host, &port) == 0 &&
        (strcmp(host, a->host) || port != a->port)) {
        log_info("agent %s: Nomad allocation %.8s moved from %s:%d to %s:%d", ag->id, a->alloc_id,
                 a->host, a->port, host, port);
        snprintf(a->host, sizeof a->host, "%s", host);
        a->port = port;
        snprintf(ag->address, sizeof ag->address, "%s:%s:%d (nomad alloc %.8s)",
                 tls_profile_on(ag->prof) ? "tls" : "tcp", a->host, a->port, a->alloc_id);
    }
    int n = task_restarts(alloc);
    if (n > a->restarts)
        snprintf(why, cap,
                 "Nomad allocation %.8s runs at %s:%d; its task was restarted in place (%d "
                 "restart%s so far)",
                 a->alloc_id, a->host, a->port, n, n == 1 ? "" : "s");
    else
        snprintf(why, cap, "Nomad allocation %.8s runs at %s:%d", a->alloc_id, a->host, a->port);
    a->restarts = n;
}

static void on_probe_alloc(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    struct ctl *c = ag->ctl;
    a->probe = NULL;
    if (r->status == 404) {
        char *path = api_path(np(ag->prof), "/v1/job/%s", a->job_id);
        a->probe = http_request(np(ag->prof)->http, "GET", path, NULL, probe_bound_s(ag->prof),
                                on_probe_job, ag);
        free(path);
        if (!a->probe)
            probe_finish(c, ag, -1, "cannot make an HTTP request");
        return;
    }
    if (r->status != 200) {
        probe_http_failed(ag, "reading the allocation", r);
        return;
    }
    json_t *j = json_loads(r->body, 0, NULL);
    if (!j) {
        probe_finish(c, ag, -1, "Nomad's answer about the allocation is not JSON");
        return;
    }
    const char *cs = jstr(j, "ClientStatus"), *ds = jstr(j, "DesiredStatus");
    const char *next = jstr(j, "NextAllocation");
    char ev[600], why[800];
    last_event(j, ev, sizeof ev);
    if (*ev)
        snprintf(a->last_event, sizeof a->last_event, "%s", ev);
    int alive = 0;
    if (alloc_ended(cs)) {
        snprintf(why, sizeof why, "Nomad allocation %.8s is %s%s%.500s", a->alloc_id, cs,
                 *ev ? ": " : "", ev);
        if (*next)
            snprintf(why + strlen(why), sizeof why - strlen(why), "; replaced by %.8s", next);
    } else if (*next) {
        /* A replacement runs a new agent process (new slots, new token
         * check): the one the stream was to is gone. */
        snprintf(why, sizeof why, "Nomad allocation %.8s replaced by %.8s", a->alloc_id, next);
    } else if (strcmp(ds, "run")) {
        const char *dd = jstr(j, "DesiredDescription");
        snprintf(why, sizeof why, "Nomad is stopping allocation %.8s (desired %s%s%.300s)",
                 a->alloc_id, ds, *dd ? ": " : "", dd);
    } else if (!strcmp(cs, "running") && tasks_running(j)) {
        alive = 1;
        probe_running(ag, j, why, sizeof why);
    } else {
        /* Pending, or a task between restarts: Nomad brings it back in the
         * same allocation, so a reconnect that waits may well succeed. */
        alive = -1;
        snprintf(why, sizeof why, "Nomad allocation %.8s is %s, its task not running%s%.500s",
                 a->alloc_id, cs, *ev ? ": " : "", ev);
    }
    json_decref(j);
    probe_finish(c, ag, alive, why);
}

/* The stream ended: ask Nomad about the allocation the stream was to. One
 * GET of it says all (status, tasks, replacement, address); a second, of
 * the job, only when Nomad forgot the allocation. */
static void nomad_probe(struct ctl *c, struct agent *ag, probe_done_fn done)
{
    struct nagent *a = na(ag);
    if (!a || a->phase == NP_STOP) {
        done(c, ag, 0, "the agent is being stopped");
        return;
    }
    if (a->probe_done) {
        /* The first probe's answer follows; this one cannot add to it. */
        done(c, ag, -1, "a probe of this agent is already under way");
        return;
    }
    if (!*a->alloc_id) {
        done(c, ag, -1, "no Nomad allocation is known for this agent yet");
        return;
    }
    double bound = probe_bound_s(ag->prof);
    char *path = api_path(np(ag->prof), "/v1/allocation/%s", a->alloc_id);
    a->probe = http_request(np(ag->prof)->http, "GET", path, NULL, bound, on_probe_alloc, ag);
    free(path);
    if (!a->probe) {
        done(c, ag, -1, "cannot make an HTTP request");
        return;
    }
    a->probe_done = done;
    /* Each attempt is bounded by bound, but the HTTP layer retries: the
     * timer bounds them all. */
    ev_timer_set(&a->ptimer, bound, 0);
    ev_timer_start(c->loop, &a->ptimer);
}

static void arm_deadline(struct ctl *c, struct nagent *a);

/* ---- registering ------------------------------------------------------------ */

static void on_register(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    a->req = NULL;
    if (start_step_failed(ag, "registering the job", r))
        return;
    json_t *j = json_loads(r->body, 0, NULL);
    snprintf(a->eval_id, sizeof a->eval_id, "%s", jstr(j, "EvalID"));
    const char *warn = jstr(j, "Warnings");
    if (*warn)
        log_warn("agent %s: Nomad: %s", ag->id, warn);
    json_decref(j);
    a->phase = NP_WATCH;
    watch(ag->ctl, ag);
}

static void on_parse(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    struct profile *p = ag->prof;
    a->req = NULL;
    char why[600];
    if (start_step_failed(ag, "parsing the job template", r))
        return;
    json_t *job = json_loads(r->body, 0, NULL);
    json_t *groups = json_object_get(job, "TaskGroups");
    if (!job || json_array_size(groups) != 1) {
        snprintf(why, sizeof why, "job template %s must have exactly one group (it has %zu)",
                 p->nomad.job, json_array_size(groups));
        json_decref(job);
        fail_start(ag->ctl, ag, why);
        return;
    }
    json_object_set_new(job, "ID", json_string(a->job_id));
    json_object_set_new(job, "Name", json_string(a->job_id));
    json_t *meta = json_object_get(job, "Meta");
    if (!json_is_object(meta)) {
        meta = json_object();
        json_object_set_new(job, "Meta", meta);
    }
    json_object_set_new(meta, "slot_controller", json_string(ag->ctl->name));
    json_object_set_new(meta, "slot_profile", json_string(p->name));
    json_object_set_new(meta, "slot_agent", json_string(ag->id));
    json_object_set_new(json_array_get(groups, 0), "Count", json_integer(1));
    json_t *req = json_pack("{s:o}", "Job", job);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    char *path = api_path(np(p), "/v1/jobs");
    a->phase = NP_REGISTER;
    a->req = http_request(np(p)->http, "POST", path, body, API_TIMEOUT_S, on_register, ag);
    free(path);
    free(body);
}

/* HCL variable values: numbers and lists as written, anything else quoted. */
static void hcl_var(char **buf, size_t *len, const char *k, const char *v)
{
    bool raw = *v && (strspn(v, "0123456789.") == strlen(v) || *v == '[' || *v == '{' ||
                      !strcmp(v, "true") || !strcmp(v, "false"));
    size_t need = strlen(k) + 2 * strlen(v) + 16; /* each byte escaped at most once */
    *buf = realloc(*buf, *len + need);
    if (!*buf)
        abort();
    char *o = *buf + *len;
    o += sprintf(o, "%s = ", k);
    if (raw)
        o += sprintf(o, "%s", v);
    else {
        *o++ = '"';
        for (const char *s = v; *s; s++) {
            if (*s == '"' || *s == '\\')
                *o++ = '\\';
            if (*s == '$' && s[1] == '{')
                *o++ = '$'; /* no interpolation: ${ is written $${ */
            if (*s == '\n') {
                /* kept (PEM files are lines): an escape HCL reads back */
                *o++ = '\\';
                *o++ = 'n';
                continue;
            }
            *o++ = *s;
        }
        *o++ = '"';
    }
    *o++ = '\n';
    *o = 0;
    *len = (size_t)(o - *buf);
}

/* The backend's state of an agent: its job (slot-CTL-PROFILE-xxxxxx, the
 * agent id's suffix), its token and its timers. */
static struct nagent *nagent_new(struct agent *ag)
{
    struct profile *p = ag->prof;
    struct nagent *a = calloc(1, sizeof *a);
    if (!a)
        abort();
    a->ag = ag;
    a->fd = -1;
    ag->be_data = a;
    snprintf(a->job_id, sizeof a->job_id, "%s%s", np(p)->prefix, ag->id + strlen(p->name) + 1);
    job_token(np(p), a->job_id, ag->token);
    ev_timer_init(&a->ctimer, ctimer_cb, CONNECT_RETRY_S, 0);
    a->ctimer.data = a;
    ev_timer_init(&a->rewatch, rewatch_cb, 5, 0);
    a->rewatch.data = a;
    ev_timer_init(&a->evtimer, evtimer_cb, 0.5, 0);
    a->evtimer.data = a;
    ev_timer_init(&a->ptimer, ptimer_cb, PROBE_MAX_S, 0);
    a->ptimer.data = a;
    return a;
}

static int nomad_start(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    struct profile *p = ag->prof;
    if (ensure(c, p, err) < 0)
        return -1;
    struct nagent *a = nagent_new(ag);
    snprintf(ag->address, sizeof ag->address, "nomad job %s", a->job_id);
    arm_deadline(c, a);
    /* variables: ours, then the profile's (which may override) */
    char *vars = calloc(1, 1);
    size_t len = 0;
    char num[64];
    hcl_var(&vars, &len, "job_id", a->job_id);
    snprintf(num, sizeof num, "%u", p->slots_per_agent);
    hcl_var(&vars, &len, "slots", num);
    hcl_var(&vars, &len, "token", ag->token);
    /* Its certificate, key and our CA, as the token travels: job variables
     * the templates write to secrets/ files. */
    if (tls_profile_issues(p)) {
        struct tls_pem pem;
        if (tls_agent_issue(c, ag, false, &pem, err) < 0) {
            explicit_bzero(vars, len);
            free(vars);
            return -1;
        }
        size_t n = 0;
        char *ca = NULL;
        FILE *f = fopen(tls_file(c, TLS_CA_CERT), "re");
        if (f) {
            ca = calloc(1, 16384);
            n = ca ? fread(ca, 1, 16383, f) : 0;
            fclose(f);
        }
        hcl_var(&vars, &len, "tls_cert", pem.cert);
        hcl_var(&vars, &len, "tls_key", pem.key);
        hcl_var(&vars, &len, "tls_ca", ca && n ? ca : "");
        free(ca);
        tls_pem_free(&pem);
    } else if (p->tls_cert) {
        /* a site's own files, read here and passed the same way */
        const char *files[3] = {p->tls_cert, p->tls_key, p->tls_ca};
        const char *names[3] = {"tls_cert", "tls_key", "tls_ca"};
        for (int i = 0; i < 3; i++) {
            char *b = files[i] ? read_file(files[i], err) : NULL;
            if (files[i] && !b) {
                explicit_bzero(vars, len);
                free(vars);
                return -1;
            }
            hcl_var(&vars, &len, names[i], b ? b : "");
            if (b) {
                explicit_bzero(b, strlen(b));
                free(b);
            }
        }
    }
    if (p->image)
        hcl_var(&vars, &len, "image", p->image);
    if (p->cpu > 0) {
        snprintf(num, sizeof num, "%.0f", p->cpu * 1000);
        hcl_var(&vars, &len, "cpu", num);
    }
    if (p->memory) {
        snprintf(num, sizeof num, "%" PRIu64, p->memory >> 20);
        hcl_var(&vars, &len, "memory", num);
    }
    /* Only when set: the templates pass nothing for an empty value, which
     * leaves the agent's default (its 0 is no budget). */
    if (p->slot_disk) {
        snprintf(num, sizeof num, "%" PRIu64, p->slot_disk);
        hcl_var(&vars, &len, "slot_disk", num);
    }
    if (p->slot_inodes) {
        snprintf(num, sizeof num, "%" PRIu64, p->slot_inodes);
        hcl_var(&vars, &len, "slot_inodes", num);
    }
    for (size_t i = 0; i < p->nomad.vars.n; i++) {
        char *kv = strdup(p->nomad.vars.v[i]), *eq = strchr(kv, '=');
        *eq = 0;
        hcl_var(&vars, &len, kv, eq + 1);
        free(kv);
    }
    json_t *req =
        json_pack("{s:s,s:b,s:s}", "JobHCL", np(p)->hcl, "Canonicalize", 1, "Variables", vars);
    explicit_bzero(vars, len);
    free(vars);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    char *path = api_path(np(p), "/v1/jobs/parse");
    a->phase = NP_PARSE;
    a->req = http_request(np(p)->http, "POST", path, body, API_TIMEOUT_S, on_parse, ag);
    explicit_bzero(body, strlen(body));
    free(body);
    free(path);
    if (!a->req)
        return sp_errf(err, SP_INTERNAL, "cannot make an HTTP request");
    return 0;
}

static void start_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    struct agent *ag = a->ag;
    char why[600];
    snprintf(why, sizeof why, "not ready after %.0f s%s%.400s",
             (double)ag->prof->start_timeout_ms / 1000,
             *a->last_event ? "; last Nomad event: " : " (no allocation placed yet)",
             a->last_event);
    fail_start(ag->ctl, ag, why);
}

static void arm_deadline(struct ctl *c, struct nagent *a)
{
    ev_timer_init(&a->deadline, start_deadline_cb, (double)a->ag->prof->start_timeout_ms / 1000, 0);
    a->deadline.data = a;
    ev_timer_start(c->loop, &a->deadline);
}

/* ---- stopping ------------------------------------------------------------------ */

static void free_later_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct nagent *a = w->data;
    struct agent *ag = a->ag;
    struct ctl *c = ag->ctl;
    struct profile *p = ag->prof;
    ag->be_data = NULL;
    free(a);
    agent_free(c, ag);
    sched_kick(c, p);
}

static void free_later(struct ctl *c, struct agent *ag)
{
    struct nagent *a = na(ag);
    ev_timer_stop(c->loop, &a->deadline);
    ev_timer_init(&a->deadline, free_later_cb, 0, 0);
    a->deadline.data = a;
    ev_timer_start(c->loop, &a->deadline);
}

static void on_deregister(void *ctx, const struct http_resp *r)
{
    struct agent *ag = ctx;
    struct nagent *a = na(ag);
    a->req = NULL;
    if (r->status != 200 && r->status != 404) {
        char why[600];
        http_failure(ag, "deregistering the job", r, why, sizeof why);
        log_warn("agent %s: job %s may be left behind: %s", ag->id, a->job_id, why);
    } else
        log_debug("agent %s: job %s deregistered", ag->id, a->job_id);
    free_later(ag->ctl, ag);
}

static void nomad_stop(struct ctl *c, struct agent *ag)
{
    struct nagent *a = na(ag);
    if (!a) {
        ev_timer_stop(c->loop, &ag->timer);
        return;
    }
    a->phase = NP_STOP;
    /* A probe still waiting is answered (exactly once, as promised) after
     * the rest is torn down: the agent is going, whatever Nomad says. */
    probe_done_fn done = a->probe_done;
    a->probe_done = NULL;
    http_cancel(a->probe);
    a->probe = NULL;
    ev_timer_stop(c->loop, &a->ptimer);
    http_cancel(a->watch);
    a->watch = NULL;
    http_cancel(a->req);
    a->req = NULL;
    ev_timer_stop(c->loop, &a->ctimer);
    ev_timer_stop(c->loop, &a->rewatch);
    ev_timer_stop(c->loop, &a->evtimer);
    ev_timer_stop(c->loop, &a->deadline);
    ev_io_stop(c->loop, &a->cio);
    if (a->fd >= 0) {
        close(a->fd);
        a->fd = -1;
    }
    /* Scaling down purges: the job is the controller's own and would only
     * pile up. `stop` without --purge leaves the stopped jobs for the
     * operator to inspect (nomad job status), as `nomad job stop` does. */
    bool purge = !c->stop_all || c->purge;
    char *path = api_path(np(ag->prof), "/v1/job/%s%s", a->job_id, purge ? "?purge=true" : "");
    a->req =
        http_request(np(ag->prof)->http, "DELETE", path, NULL, API_TIMEOUT_S, on_deregister, ag);
    free(path);
    if (!a->req)
        free_later(c, ag); /* from the loop's next turn: ag lives through done */
    if (done)
        done(c, ag, 0, "the agent is being stopped");
}

/* ---- finding the agents of an earlier run ----------------------------------- */

struct listing {
    bool done;
    struct http_resp resp;
    char *body;
};

static void on_list(void *ctx, const struct http_resp *r)
{
    struct listing *l = ctx;
    l->resp = *r;
    l->body = strdup(r->body);
    l->done = true;
}

static void list_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    ev_break(loop, EVBREAK_ONE);
}

static int nomad_list(struct ctl *c, struct profile *p)
{
    struct sp_err err;
    if (ensure(c, p, &err) < 0) {
        log_warn("profile %s: %s", p->name, err.msg);
        return 0;
    }
    struct listing l = {0};
    char *path = api_path(np(p), "/v1/jobs?prefix=%s", np(p)->prefix);
    struct http_req *r = http_request(np(p)->http, "GET", path, NULL, LIST_TIMEOUT_S, on_list, &l);
    free(path);
    /* Before the loop serves anyone: run it just for this answer. */
    ev_timer t;
    ev_timer_init(&t, list_timeout_cb, LIST_TIMEOUT_S + 5, 0);
    ev_timer_start(c->loop, &t);
    while (r && !l.done && ev_is_active(&t))
        ev_run(c->loop, EVRUN_ONCE);
    ev_timer_stop(c->loop, &t);
    if (!l.done) {
        http_cancel(r);
        log_warn("profile %s: Nomad did not list jobs in time", p->name);
        return 0;
    }
    if (l.resp.status != 200) {
        char line[400];
        l.resp.body = l.body;
        body_line(&l.resp, line, sizeof line);
        log_warn("profile %s: cannot list Nomad jobs (HTTP %ld): %s; agents of an earlier run "
                 "are not reattached",
                 p->name, l.resp.status, line);
        free(l.body);
        return 0;
    }
    json_t *arr = json_loads(l.body, 0, NULL);
    free(l.body);
    int found = 0;
    size_t i;
    json_t *job;
    size_t pl = strlen(np(p)->prefix);
    json_array_foreach(arr, i, job)
    {
        const char *id = jstr(job, "ID");
        if (strncmp(id, np(p)->prefix, pl) || json_is_true(json_object_get(job, "Stop")) ||
            !strcmp(jstr(job, "Status"), "dead"))
            continue;
        char aid[CTL_NAME_MAX + 16];
        snprintf(aid, sizeof aid, "%s-%s", p->name, id + pl);
        if (strlen(id + pl) != 6 || agent_find(c, aid, strlen(aid)))
            continue;
        struct agent *ag = agent_new(c, p, aid);
        ag->reattached = true;
        /* Its certificate's lifetime is unknown here: renewed once ready. */
        ag->tls_issued = tls_profile_issues(p);
        struct nagent *a = nagent_new(ag);
        snprintf(ag->address, sizeof ag->address, "nomad job %s", a->job_id);
        a->phase = NP_WATCH;
        arm_deadline(c, a);
        watch(c, ag);
        log_info("reattaching agent %s (Nomad job %s)", aid, id);
        found++;
    }
    json_decref(arr);
    return found;
}

/* Connect the agent's stream again. An agent that was ready is reached at
 * its allocation's address (probe refreshed it) within probe_bound_s; a
 * failure is agent_relink_failed's (which tries again, probing first), a
 * start's failure stays fail_start.
 * One found by list_agents, or a start under way, connects by itself once
 * the watch sees its allocation run. */
static int nomad_attach(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    struct nagent *a = na(ag);
    if (!a || a->phase == NP_STOP)
        return sp_errf(err, SP_AGENT_LOST, "agent %s is being stopped", ag->id);
    if (a->phase != NP_READY) {
        if (a->phase == NP_WATCH)
            watch(c, ag);
        return 0;
    }
    if (ag->connected)
        return sp_errf(err, SP_INTERNAL, "agent %s is connected already", ag->id);
    if (a->fd >= 0 || ev_is_active(&a->ctimer))
        return 0; /* a reconnect is under way: its end calls back */
    a->cerr = 0;
    ev_timer_stop(c->loop, &a->deadline);
    ev_timer_init(&a->deadline, relink_deadline_cb, probe_bound_s(ag->prof), 0);
    a->deadline.data = a;
    ev_timer_start(c->loop, &a->deadline);
    char why[200];
    if (connect_try(c, ag, why, sizeof why) < 0) {
        ev_timer_stop(c->loop, &a->deadline);
        return sp_errf(err, SP_AGENT_LOST, "agent %s: %s", ag->id, why);
    }
    return 0;
}

static bool nomad_persistent(const struct profile *p)
{
    (void)p;
    return true;
}

static int nomad_check(struct ctl *c, struct profile *p, struct sp_err *err)
{
    (void)c;
    envdef(&p->nomad.addr, "NOMAD_ADDR");
    envdef(&p->nomad.token, "NOMAD_TOKEN");
    envdef(&p->nomad.cacert, "NOMAD_CACERT");
    envdef(&p->nomad.capath, "NOMAD_CAPATH");
    envdef(&p->nomad.client_cert, "NOMAD_CLIENT_CERT");
    envdef(&p->nomad.client_key, "NOMAD_CLIENT_KEY");
    envdef(&p->nomad.tls_server_name, "NOMAD_TLS_SERVER_NAME");
    envdef(&p->nomad.skip_verify, "NOMAD_SKIP_VERIFY");
    envdef(&p->nomad.ns, "NOMAD_NAMESPACE");
    envdef(&p->nomad.region, "NOMAD_REGION");
    if (!p->nomad.job)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': the nomad backend needs nomad.job (an HCL2 job template, "
                       "e.g. nomad/slot-agent-docker.nomad.hcl)",
                       p->name);
    if (access(p->nomad.job, R_OK) < 0)
        return sp_errf(err, SP_NOT_FOUND, "profile '%s': nomad.job %s: %s", p->name, p->nomad.job,
                       strerror(errno));
    return 0;
}

const struct backend backend_nomad = {
    .name = "nomad",
    .start_agent = nomad_start,
    .stop_agent = nomad_stop,
    .list_agents = nomad_list,
    .attach = nomad_attach,
    .check = nomad_check,
    .persistent = nomad_persistent,
    .probe = nomad_probe,
};
