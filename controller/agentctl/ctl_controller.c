/* agentctl's controller commands: the pool (status, agents, slots, leases,
 * profiles), acquire/release/drain, and `top`, a live view drawn with plain
 * ANSI escapes. Tables are for people (aligned columns, human units); --json
 * prints the controller's answer as it is. */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agentctl.h"

/* The longest command the agent accepts; what we wait for when the
 * controller's profile does not say. */
#define MAX_EXEC_TIMEOUT_MS 86400000u

/* A millisecond field of a controller profile (NULL: the default profile);
 * 0 when the controller does not tell. */
static uint64_t profile_ms(struct ctl *c, const char *profile, const char *key)
{
    if (!profile)
        profile = c->default_profile;
    const msgpack_object *r = call(c, "profiles", NULL);
    const msgpack_object *arr = r ? sp_map_get(r, "profiles") : NULL;
    for (uint32_t i = 0; arr && arr->type == MSGPACK_OBJECT_ARRAY && i < arr->via.array.size; i++) {
        int n;
        const char *name = get_s(&arr->via.array.ptr[i], "name", &n);
        if (sp_str_eq(name, (size_t)n, profile))
            return get_u(&arr->via.array.ptr[i], key);
    }
    return 0;
}

/* How long the controller may take with a command given no timeout: its
 * profile's exec_timeout. A lookup failure is not ours to report: the exec
 * itself says what is wrong with the handle. */
uint64_t controller_exec_timeout(struct ctl *c, const struct cmd *cmd)
{
    char profile[128] = "";
    const msgpack_object *r = call(c, "leases", NULL);
    const msgpack_object *arr = r ? sp_map_get(r, "leases") : NULL;
    for (uint32_t i = 0; arr && arr->type == MSGPACK_OBJECT_ARRAY && i < arr->via.array.size; i++) {
        int hn, pn;
        const char *h = get_s(&arr->via.array.ptr[i], "slot", &hn);
        const char *p = get_s(&arr->via.array.ptr[i], "profile", &pn);
        if (sp_str_eq(h, (size_t)hn, cmd->handle)) {
            snprintf(profile, sizeof profile, "%.*s", pn, p);
            break;
        }
    }
    uint64_t ms = profile[0] ? profile_ms(c, profile, "exec_timeout_ms") : 0;
    return ms ? ms : MAX_EXEC_TIMEOUT_MS;
}

/* ---- pool commands ------------------------------------------------------ */

void fmt_bytes(char *out, size_t cap, uint64_t n)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    if (n < 1024) {
        snprintf(out, cap, "%llu B", (unsigned long long)n);
        return;
    }
    double v = (double)n / 1024.0;
    int u = 0;
    while (v >= 1024.0 && u < 3) {
        v /= 1024.0;
        u++;
    }
    snprintf(out, cap, v < 10 ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void fmt_dur(char *out, size_t cap, uint64_t ms)
{
    uint64_t s = ms / 1000;
    if (ms < 1000)
        snprintf(out, cap, "%llums", (unsigned long long)ms);
    else if (s < 60)
        snprintf(out, cap, "%.1fs", (double)ms / 1000.0);
    else if (s < 3600)
        snprintf(out, cap, "%llum%02llus", (unsigned long long)(s / 60),
                 (unsigned long long)(s % 60));
    else if (s < 86400)
        snprintf(out, cap, "%lluh%02llum", (unsigned long long)(s / 3600),
                 (unsigned long long)(s / 60 % 60));
    else
        snprintf(out, cap, "%llud%02lluh", (unsigned long long)(s / 86400),
                 (unsigned long long)(s / 3600 % 24));
}

static void fmt_us(char *out, size_t cap, uint64_t us)
{
    if (us < 1000)
        snprintf(out, cap, "%lluus", (unsigned long long)us);
    else if (us < 1000000)
        snprintf(out, cap, "%.1fms", (double)us / 1000.0);
    else
        snprintf(out, cap, "%.2fs", (double)us / 1e6);
}

/* Time since an epoch-ms stamp, "-" when there is none. */
static void fmt_since(char *out, size_t cap, const msgpack_object *m, const char *key)
{
    uint64_t at = get_u(m, key);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    if (!at)
        snprintf(out, cap, "-");
    else
        fmt_dur(out, cap, now > at ? now - at : 0);
}

static double get_f(const msgpack_object *m, const char *k)
{
    const msgpack_object *o = sp_map_get(m, k);
    if (!o)
        return 0;
    if (o->type == MSGPACK_OBJECT_FLOAT32 || o->type == MSGPACK_OBJECT_FLOAT64)
        return o->via.f64;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        return (double)o->via.u64;
    return 0;
}

/* m[k1][k2] for count maps; a plain number at m[k1] stands for its total. */
static uint64_t get_u2(const msgpack_object *m, const char *k1, const char *k2)
{
    const msgpack_object *o = sp_map_get(m, k1);
    if (o && o->type == MSGPACK_OBJECT_MAP)
        return get_u(o, k2);
    if (o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && !strcmp(k2, "total"))
        return o->via.u64;
    return 0;
}

static const msgpack_object *get_array(struct ctl *c, const msgpack_object *r, const char *key)
{
    const msgpack_object *arr = sp_map_get(r, key);
    if (!arr || arr->type != MSGPACK_OBJECT_ARRAY) {
        fail(c, sp_code_name(SP_INTERNAL), "%s answer without a %s array", key, key);
        return NULL;
    }
    return arr;
}

/* Aligned columns for people: cells are added row by row after the header;
 * columns named in `right` (a bit per column) are numbers, right-aligned. */
struct table {
    int ncols;
    unsigned right;
    size_t n, cap;
    char **cells;
};

static void tbl_cell(struct table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tbl_cell(struct table *t, const char *fmt, ...)
{
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        char **nc = realloc(t->cells, cap * sizeof *nc);
        if (!nc)
            return; /* out of memory: the cell is dropped, the rest stays aligned */
        t->cells = nc;
        t->cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    /* Cells are one line each: control characters would break the columns. */
    for (char *p = s; p && *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = ' ';
    t->cells[t->n++] = s;
}

static void tbl_header(struct table *t, unsigned right, const char *const *names)
{
    *t = (struct table){.right = right};
    for (; names[t->ncols]; t->ncols++)
        tbl_cell(t, "%s", names[t->ncols]);
}

static void tbl_print(struct table *t, FILE *f)
{
    int w[32] = {0};
    int nc = t->ncols < 32 ? t->ncols : 32;
    for (size_t i = 0; i < t->n; i++) {
        int len = t->cells[i] ? (int)strlen(t->cells[i]) : 0;
        int col = (int)(i % (size_t)t->ncols);
        if (col < nc && len > w[col])
            w[col] = len;
    }
    for (size_t i = 0; i < t->n; i++) {
        int col = (int)(i % (size_t)t->ncols);
        const char *s = t->cells[i] ? t->cells[i] : "?";
        bool last = col == t->ncols - 1 || i + 1 == t->n;
        int width = col < nc ? w[col] : 0;
        if (col)
            fputs("  ", f);
        if (t->right & (1u << col))
            fprintf(f, "%*s", width, s);
        else if (last)
            fputs(s, f);
        else
            fprintf(f, "%-*s", width, s);
        if (last)
            fputc('\n', f);
    }
}

static void tbl_free(struct table *t)
{
    for (size_t i = 0; i < t->n; i++)
        free(t->cells[i]);
    free(t->cells);
    *t = (struct table){0};
}

/* A str field copied for "%s", at most 200 bytes. */
static const char *str_field(const msgpack_object *m, const char *k, char *buf, size_t cap)
{
    int n;
    const char *s = get_s(m, k, &n);
    snprintf(buf, cap, "%.*s", n > 200 ? 200 : n, s);
    return buf;
}

static const msgpack_object *ctl_call_filtered(struct ctl *c, const char *op, const struct cmd *cmd)
{
    struct args a;
    uint32_t n = (cmd->profile != NULL) + (cmd->agent_id != NULL);
    if (!n)
        return call(c, op, NULL);
    args_begin(&a, n);
    if (cmd->profile)
        sp_pack_kv_str(&a.pk, "profile", cmd->profile);
    if (cmd->agent_id)
        sp_pack_kv_str(&a.pk, "agent", cmd->agent_id);
    return call(c, op, &a);
}

/* The agents table, shared by `agents` and `top`. */
static void print_agents(const msgpack_object *arr, FILE *f, bool full)
{
    static const char *const cols[] = {"AGENT",      "PROFILE", "STATE",   "SLOTS",
                                       "LEASED",     "EXEC",    "AGE",     "REQUESTS",
                                       "RECONNECTS", "PID",     "ADDRESS", NULL};
    static const char *const short_cols[] = {"AGENT", "PROFILE", "STATE",    "SLOTS",      "LEASED",
                                             "EXEC",  "AGE",     "REQUESTS", "RECONNECTS", NULL};
    struct table t;
    tbl_header(&t, 0x1f8 | (full ? 0x200 : 0), full ? cols : short_cols);
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *a = &arr->via.array.ptr[i];
        char id[256], prof[256], st[64], age[32], addr[256];
        fmt_dur(age, sizeof age, get_u(a, "age_ms"));
        tbl_cell(&t, "%s", str_field(a, "id", id, sizeof id));
        tbl_cell(&t, "%s", str_field(a, "profile", prof, sizeof prof));
        tbl_cell(&t, "%s", str_field(a, "state", st, sizeof st));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(a, "slots"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(a, "leased"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(a, "executing"));
        tbl_cell(&t, "%s", age);
        tbl_cell(&t, "%llu", (unsigned long long)get_u(a, "requests"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(a, "reconnects"));
        if (full) {
            const msgpack_object *pid = sp_map_get(a, "pid");
            if (pid && pid->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
                tbl_cell(&t, "%llu", (unsigned long long)pid->via.u64);
            else
                tbl_cell(&t, "-");
            tbl_cell(&t, "%s", str_field(a, "address", addr, sizeof addr));
        }
    }
    tbl_print(&t, f);
    tbl_free(&t);
    /* Links and errors below the table: they are long and rare. */
    for (uint32_t i = 0; full && i < arr->via.array.size; i++) {
        const msgpack_object *a = &arr->via.array.ptr[i];
        char id[256], st[64], cause[512], took[32];
        str_field(a, "id", id, sizeof id);
        str_field(a, "state", st, sizeof st);
        fmt_dur(took, sizeof took, get_u(a, "reconnect_ms"));
        const msgpack_object *lc = sp_map_get(a, "link_cause");
        if (lc && lc->type == MSGPACK_OBJECT_STR) {
            str_field(a, "link_cause", cause, sizeof cause);
            if (!strcmp(st, "reconnecting"))
                fprintf(f, "%s: reconnecting for %s (attempt %llu); its stream ended: %s\n", id,
                        took, (unsigned long long)get_u(a, "reconnect_attempts"), cause);
            else
                fprintf(f, "%s: last stream ended: %s (reconnected in %s)\n", id, cause, took);
        }
        const msgpack_object *e = sp_map_get(a, "error");
        if (e && e->type == MSGPACK_OBJECT_STR)
            fprintf(f, "%s: error: %.*s\n", id, (int)e->via.str.size, e->via.str.ptr);
    }
}

/* Per-profile counts from status: `profiles` maps name -> counts. */
static void print_profile_counts(const msgpack_object *r, FILE *f)
{
    const msgpack_object *pm = sp_map_get(r, "profiles");
    if (!pm || pm->type != MSGPACK_OBJECT_MAP || !pm->via.map.size)
        return;
    static const char *const cols[] = {"PROFILE", "AGENTS", "READY",   "SLOTS", "FREE",
                                       "LEASED",  "EXEC",   "WAITERS", NULL};
    struct table t;
    tbl_header(&t, 0xfe, cols);
    for (uint32_t i = 0; i < pm->via.map.size; i++) {
        const msgpack_object *k = &pm->via.map.ptr[i].key, *v = &pm->via.map.ptr[i].val;
        if (k->type != MSGPACK_OBJECT_STR || v->type != MSGPACK_OBJECT_MAP)
            continue;
        tbl_cell(&t, "%.*s", (int)(k->via.str.size > 200 ? 200 : k->via.str.size), k->via.str.ptr);
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "agents", "total"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "agents", "ready"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "slots", "total"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "slots", "free"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "slots", "leased"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(v, "slots", "executing"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(v, "waiters"));
    }
    tbl_print(&t, f);
    tbl_free(&t);
}

/* The status summary lines, shared by `status` and the header of `top`. */
static void print_status_head(const msgpack_object *r, FILE *f)
{
    char name[256], up[32], rss[32], p50[32], p90[32], p99[32];
    fmt_dur(up, sizeof up, get_u(r, "uptime_ms"));
    fmt_bytes(rss, sizeof rss, get_u(r, "rss_bytes"));
    fprintf(f, "controller  %s  up %s  %llu connections  rss %s\n",
            str_field(r, "name", name, sizeof name), up,
            (unsigned long long)get_u(r, "connections"), rss);
    fprintf(
        f, "agents      %llu ready, %llu starting, %llu draining, %llu reconnecting (%llu total)\n",
        (unsigned long long)get_u2(r, "agents", "ready"),
        (unsigned long long)get_u2(r, "agents", "starting"),
        (unsigned long long)get_u2(r, "agents", "draining"),
        (unsigned long long)get_u2(r, "agents", "reconnecting"),
        (unsigned long long)get_u2(r, "agents", "total"));
    fprintf(f, "slots       %llu free, %llu leased, %llu executing (%llu total); %llu waiters\n",
            (unsigned long long)get_u2(r, "slots", "free"),
            (unsigned long long)get_u2(r, "slots", "leased"),
            (unsigned long long)get_u2(r, "slots", "executing"),
            (unsigned long long)get_u2(r, "slots", "total"),
            (unsigned long long)get_u(r, "waiters"));
    const msgpack_object *ex = sp_map_get(r, "exec");
    if (ex && ex->type == MSGPACK_OBJECT_MAP) {
        fmt_us(p50, sizeof p50, get_u(ex, "p50_us"));
        fmt_us(p90, sizeof p90, get_u(ex, "p90_us"));
        fmt_us(p99, sizeof p99, get_u(ex, "p99_us"));
        fprintf(f, "exec        %.1f/s  p50 %s  p90 %s  p99 %s  (%llu total, %llu errors)\n",
                get_f(ex, "rate"), p50, p90, p99, (unsigned long long)get_u(ex, "total"),
                (unsigned long long)get_u(ex, "errors"));
    }
    const msgpack_object *aq = sp_map_get(r, "acquire");
    if (aq && aq->type == MSGPACK_OBJECT_MAP)
        fprintf(f, "acquire     %llu total, %llu without capacity\n",
                (unsigned long long)get_u(aq, "total"),
                (unsigned long long)get_u(aq, "no_capacity"));
}

int cmd_status(struct ctl *c, const struct cmd *cmd)
{
    const msgpack_object *r = ctl_call_filtered(c, "status", cmd);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    print_status_head(r, stdout);
    const msgpack_object *pm = sp_map_get(r, "profiles");
    if (pm && pm->type == MSGPACK_OBJECT_MAP && pm->via.map.size) {
        fputc('\n', stdout);
        print_profile_counts(r, stdout);
    }
    return 0;
}

int cmd_agents(struct ctl *c, const struct cmd *cmd)
{
    const msgpack_object *r = ctl_call_filtered(c, "agents", cmd), *arr;
    if (!r || !(arr = get_array(c, r, "agents")))
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    print_agents(arr, stdout, true);
    /* Agents that failed to start or were lost are gone from the table;
     * what their launcher said last is kept here. */
    const msgpack_object *fl = sp_map_get(r, "failed");
    for (uint32_t i = 0; fl && fl->type == MSGPACK_OBJECT_ARRAY && i < fl->via.array.size; i++) {
        const msgpack_object *a = &fl->via.array.ptr[i];
        char prof[256], err[1024], when[64];
        uint64_t at = get_u(a, "at");
        time_t ts = (time_t)(at / 1000);
        struct tm tm;
        strftime(when, sizeof when, "%H:%M:%S", localtime_r(&ts, &tm));
        if (!i)
            printf("recent failures:\n");
        printf("  %s %s: %s\n", when, str_field(a, "profile", prof, sizeof prof),
               str_field(a, "error", err, sizeof err));
    }
    return 0;
}

int cmd_ctl_slots(struct ctl *c, const struct cmd *cmd)
{
    const msgpack_object *r = ctl_call_filtered(c, "slots", cmd), *arr;
    if (!r || !(arr = get_array(c, r, "slots")))
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    static const char *const cols[] = {"AGENT",      "INDEX", "PROFILE", "STATE", "SLOT",
                                       "TRAJECTORY", "EXEC",  "LEASED",  NULL};
    struct table t;
    tbl_header(&t, 0x42, cols);
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *s = &arr->via.array.ptr[i];
        char ag[256], prof[256], st[64], h[256], tr[256], age[32];
        fmt_since(age, sizeof age, s, "leased_at");
        tbl_cell(&t, "%s", str_field(s, "agent", ag, sizeof ag));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(s, "index"));
        tbl_cell(&t, "%s", str_field(s, "profile", prof, sizeof prof));
        tbl_cell(&t, "%s", str_field(s, "state", st, sizeof st));
        tbl_cell(&t, "%s", str_field(s, "slot", h, sizeof h));
        tbl_cell(&t, "%s", str_field(s, "trajectory_id", tr, sizeof tr));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(s, "executing"));
        tbl_cell(&t, "%s", age);
    }
    tbl_print(&t, stdout);
    tbl_free(&t);
    return 0;
}

int cmd_leases(struct ctl *c)
{
    const msgpack_object *r = call(c, "leases", NULL), *arr;
    if (!r || !(arr = get_array(c, r, "leases")))
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    /* GRACE: how long a lease whose owner has gone has left, "-" while
     * its owner is connected, "unbound" when it does not end with it. */
    static const char *const cols[] = {"SLOT", "TRAJECTORY", "OWNER", "GRACE", "PROFILE",
                                       "EXEC", "AGE",        "IDLE",  NULL};
    struct table t;
    tbl_header(&t, 0x28, cols);
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *l = &arr->via.array.ptr[i];
        char h[256], tr[256], own[256], prof[256], age[32], idle[32], grace[32];
        const msgpack_object *b = sp_map_get(l, "bound");
        fmt_since(age, sizeof age, l, "leased_at");
        fmt_since(idle, sizeof idle, l, "last_used");
        if (sp_map_get(l, "grace_left_ms"))
            fmt_dur(grace, sizeof grace, get_u(l, "grace_left_ms"));
        else
            snprintf(grace, sizeof grace, "%s",
                     b && b->type == MSGPACK_OBJECT_BOOLEAN && !b->via.boolean ? "unbound" : "-");
        tbl_cell(&t, "%s", str_field(l, "slot", h, sizeof h));
        tbl_cell(&t, "%s", str_field(l, "trajectory_id", tr, sizeof tr));
        tbl_cell(&t, "%s", str_field(l, "owner", own, sizeof own));
        tbl_cell(&t, "%s", grace);
        tbl_cell(&t, "%s", str_field(l, "profile", prof, sizeof prof));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(l, "executing"));
        tbl_cell(&t, "%s", age);
        tbl_cell(&t, "%s", idle);
    }
    tbl_print(&t, stdout);
    tbl_free(&t);
    return 0;
}

int cmd_profiles(struct ctl *c)
{
    const msgpack_object *r = call(c, "profiles", NULL), *arr;
    if (!r || !(arr = get_array(c, r, "profiles")))
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    static const char *const cols[] = {"PROFILE", "BACKEND", "SLOTS/AGENT", "AGENTS", "MIN-MAX",
                                       "SLOTS",   "WAITERS", "TIMEOUT",     "ERROR",  NULL};
    struct table t;
    tbl_header(&t, 0x6c, cols);
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *p = &arr->via.array.ptr[i];
        char name[256], be[64], err[256], tmo[32];
        fmt_dur(tmo, sizeof tmo, get_u(p, "exec_timeout_ms"));
        tbl_cell(&t, "%s", str_field(p, "name", name, sizeof name));
        tbl_cell(&t, "%s", str_field(p, "backend", be, sizeof be));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(p, "slots_per_agent"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(p, "agents", "total"));
        tbl_cell(&t, "%llu-%llu", (unsigned long long)get_u(p, "min_agents"),
                 (unsigned long long)get_u(p, "max_agents"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u2(p, "slots", "total"));
        tbl_cell(&t, "%llu", (unsigned long long)get_u(p, "waiters"));
        tbl_cell(&t, "%s", tmo);
        tbl_cell(&t, "%s", str_field(p, "last_error", err, sizeof err));
    }
    tbl_print(&t, stdout);
    tbl_free(&t);
    return 0;
}

int cmd_acquire(struct ctl *c, const struct cmd *cmd)
{
    /* The controller may keep us queued for the acquire timeout. */
    uint64_t wait_ms =
        cmd->have_timeout ? cmd->timeout_ms : profile_ms(c, cmd->profile, "acquire_timeout_ms");
    struct args a;
    args_begin(&a, 1 + (cmd->profile != NULL) + (cmd->trajectory != NULL) + cmd->have_timeout);
    /* This connection ends when agentctl exits, and the slot is used by
     * later agentctl runs: the lease must not end with it. */
    sp_pack_kv_bool(&a.pk, "bind", false);
    if (cmd->profile)
        sp_pack_kv_str(&a.pk, "profile", cmd->profile);
    if (cmd->trajectory)
        sp_pack_kv_str(&a.pk, "trajectory_id", cmd->trajectory);
    if (cmd->have_timeout)
        sp_pack_kv_uint(&a.pk, "timeout_ms", cmd->timeout_ms);
    uint64_t id = send_request(c, "acquire", &a.w);
    sp_writer_free(&a.w);
    if (!id)
        return -1;
    double saved = c->timeout_s;
    c->timeout_s += (double)wait_ms / 1000.0;
    const msgpack_object *r = wait_result(c, id);
    c->timeout_s = saved;
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    int n;
    const char *h = get_s(r, "slot", &n);
    printf("%.*s\n", n, h);
    return 0;
}

int cmd_release(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    args_begin(&a, 2);
    sp_pack_kv_str(&a.pk, "slot", cmd->handle);
    sp_pack_kv_bool(&a.pk, "reset", !cmd->no_reset);
    const msgpack_object *r = call(c, "release", &a);
    if (!r)
        return -1;
    if (c->json)
        print_json(r);
    else
        printf("released %s%s\n", cmd->handle, cmd->no_reset ? " (no reset)" : "");
    return 0;
}

int cmd_drain(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    args_begin(&a, 1);
    sp_pack_kv_str(&a.pk, "agent", cmd->agent_id);
    const msgpack_object *r = call(c, "drain", &a);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    char st[64];
    uint64_t leased = get_u(r, "leased");
    printf("agent %s: %s, %llu lease%s left%s\n", cmd->agent_id,
           str_field(r, "state", st, sizeof st), (unsigned long long)leased, leased == 1 ? "" : "s",
           leased ? " (stopped once released)" : "");
    return 0;
}

int cmd_reconnect(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    args_begin(&a, 1);
    sp_pack_kv_str(&a.pk, "agent", cmd->agent_id);
    const msgpack_object *r = call(c, "reconnect", &a);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    printf("agent %s: stream ended; reconnecting (%llu reconnects so far)\n", cmd->agent_id,
           (unsigned long long)get_u(r, "reconnects"));
    return 0;
}

/* The controller answers, stops its agents (deregistering Nomad jobs can
 * take a while), then exits: its EOF is the sign the stop is complete. */
int cmd_stop(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    args_begin(&a, 1);
    sp_pack_kv_bool(&a.pk, "purge", cmd->purge);
    const msgpack_object *r = call(c, "stop", &a);
    if (!r)
        return -1;
    uint64_t n = get_u(r, "agents"), leased = get_u(r, "leased");
    if (c->json)
        print_json(r);
    else {
        printf("stopping %llu agent%s (%llu leased slot%s)%s\n", (unsigned long long)n,
               n == 1 ? "" : "s", (unsigned long long)leased, leased == 1 ? "" : "s",
               cmd->purge ? "; Nomad jobs are purged" : "");
        fflush(stdout);
    }
    /* The controller gives its agents 90 s. */
    if (wait_closed(c, c->timeout_s > 100 ? c->timeout_s : 100) < 0)
        return fail(c, "timeout", "the controller did not finish stopping in time");
    if (!c->json)
        printf("controller stopped\n");
    return 0;
}

/* ---- top ----------------------------------------------------------------------- */

/* One frame of `top` into f; -1 with c->err set when the controller fails. */
static int top_frame(struct ctl *c, const struct cmd *cmd, FILE *f)
{
    const msgpack_object *r = ctl_call_filtered(c, "status", cmd);
    if (!r)
        return -1;
    char clock[16];
    time_t t = time(NULL);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(clock, sizeof clock, "%H:%M:%S", &tm);
    fprintf(f, "agentctl top  %s  %s", c->controller, clock);
    if (!cmd->once)
        fprintf(f, "  (every %gs; q quits)", cmd->interval);
    fputs("\n\n", f);
    print_status_head(r, f);
    fputc('\n', f);
    print_profile_counts(r, f);
    /* The status answer is released by the next call: it is printed already. */
    r = ctl_call_filtered(c, "agents", cmd);
    const msgpack_object *arr = r ? get_array(c, r, "agents") : NULL;
    if (!arr)
        return -1;
    fputc('\n', f);
    print_agents(arr, f, false);
    return 0;
}

/* Copy a rendered frame to the terminal: cursor home, every line cut to the
 * screen width and cleared to its end, the rest of the screen cleared. */
static int top_paint(struct ctl *c, const char *frame, size_t len)
{
    struct winsize ws = {0};
    int cols = 0, rows = 0;
    if (ioctl(1, TIOCGWINSZ, &ws) == 0)
        cols = ws.ws_col, rows = ws.ws_row;
    char *out = malloc(len * 2 + 64), *o = out;
    if (!out)
        return fail(c, "", "out of memory");
    o += sprintf(o, "\033[H");
    int row = 0;
    for (const char *p = frame; p < frame + len && (!rows || row < rows);) {
        const char *nl = memchr(p, '\n', (size_t)(frame + len - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(frame + len - p);
        size_t show = cols && n > (size_t)cols ? (size_t)cols : n;
        memcpy(o, p, show);
        o += show;
        row++;
        /* No newline after the last row: it would scroll the screen. */
        o += sprintf(o, "\033[K%s", rows && row == rows ? "" : "\r\n");
        p += n + (nl != NULL);
    }
    o += sprintf(o, "\033[J");
    int rc = write_all(c, 1, out, (size_t)(o - out));
    free(out);
    return rc;
}

/* Wait until the next refresh: 1 = time to redraw, 0 = quit. */
static int top_wait(struct ctl *c, double until, bool *stdin_open)
{
    for (;;) {
        struct pollfd p[2] = {{.fd = *stdin_open ? 0 : -1, .events = POLLIN},
                              {.fd = c->sigfd, .events = POLLIN}};
        int r = poll(p, 2, ms_until(until));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 1;
        if (p[1].revents && read_signal(c)) {
            if (c->signo == SIGWINCH) {
                c->interrupted = false;
                return 1;
            }
            return 0;
        }
        if (p[0].revents) {
            char buf[64];
            ssize_t n = read(0, buf, sizeof buf);
            if (n < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (n <= 0) {
                *stdin_open = false; /* not a terminal, and at its end: time alone drives us */
                continue;
            }
            for (ssize_t i = 0; i < n; i++)
                if (buf[i] == 'q' || buf[i] == 'Q' || buf[i] == 3 /* ^C without ISIG */)
                    return 0;
        }
    }
}

int cmd_top(struct ctl *c, const struct cmd *cmd)
{
    if (cmd->once)
        return top_frame(c, cmd, stdout);
    bool tty = isatty(0), stdin_open = true;
    struct termios saved, raw;
    if (tty && tcgetattr(0, &saved) == 0) {
        raw = saved;
        /* Keys arrive one by one and unechoed; Ctrl-C still signals. */
        raw.c_lflag &= ~(tcflag_t)(ICANON | ECHO);
        raw.c_cc[VMIN] = 1;
        raw.c_cc[VTIME] = 0;
        tcsetattr(0, TCSANOW, &raw);
    } else {
        tty = false;
    }
    sigset_t old;
    catch_signals(c, &old, true);
    int rc = write_all(c, 1, "\033[?1049h\033[?25l\033[H\033[2J", 22);
    while (rc == 0) {
        double next = now_s() + cmd->interval;
        char *frame = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&frame, &len);
        if (!f) {
            rc = fail(c, "", "open_memstream: %s", strerror(errno));
            break;
        }
        rc = top_frame(c, cmd, f);
        fclose(f);
        if (rc == 0)
            rc = top_paint(c, frame, len);
        free(frame);
        if (rc < 0)
            break;
        /* A signal that came while we talked to the controller. */
        if (c->interrupted && c->signo != SIGWINCH)
            break;
        c->interrupted = false;
        if (!top_wait(c, next, &stdin_open))
            break;
    }
    write_all(c, 1, "\033[?25h\033[?1049l", 14);
    if (tty)
        tcsetattr(0, TCSANOW, &saved);
    release_signals(c, &old);
    c->interrupted = false;
    return rc;
}

/* One row per template. Against the controller: every ready agent's (the
 * controller's knowledge, refreshed after each build); against one agent:
 * its template_list. */
static void template_rows(struct table *t, const char *agent, const msgpack_object *arr)
{
    for (uint32_t i = 0; arr && i < arr->via.array.size; i++) {
        const msgpack_object *x = &arr->via.array.ptr[i];
        char name[256], base[256], size[32], built[32];
        const msgpack_object *b = sp_map_get(x, "base");
        fmt_bytes(size, sizeof size, get_u(x, "size"));
        fmt_dur(built, sizeof built, get_u(x, "build_ms"));
        if (agent)
            tbl_cell(t, "%s", agent);
        tbl_cell(t, "%s", str_field(x, "name", name, sizeof name));
        tbl_cell(t, "%s",
                 b && b->type == MSGPACK_OBJECT_STR ? str_field(x, "base", base, sizeof base)
                                                    : "-");
        tbl_cell(t, "%s", size);
        tbl_cell(t, "%llu", (unsigned long long)get_u(x, "files"));
        tbl_cell(t, "%llu", (unsigned long long)get_u(x, "in_use"));
        tbl_cell(t, "%s", built);
    }
}

int cmd_templates(struct ctl *c)
{
    const msgpack_object *r = call(c, c->to_controller ? "templates" : "template_list", NULL);
    const msgpack_object *arr;
    if (!r || !(arr = get_array(c, r, c->to_controller ? "agents" : "templates")))
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    static const char *const cols_ctl[] = {"AGENT", "TEMPLATE", "BASE",  "SIZE",
                                           "FILES", "IN-USE",   "BUILD", NULL};
    static const char *const *cols = cols_ctl;
    struct table t;
    tbl_header(&t, c->to_controller ? 0x78 : 0x3c, c->to_controller ? cols : cols + 1);
    if (!c->to_controller) {
        template_rows(&t, NULL, arr);
    } else {
        for (uint32_t i = 0; i < arr->via.array.size; i++) {
            const msgpack_object *a = &arr->via.array.ptr[i];
            char id[256];
            str_field(a, "agent", id, sizeof id);
            const msgpack_object *l = sp_map_get(a, "templates");
            template_rows(&t, id, l && l->type == MSGPACK_OBJECT_ARRAY ? l : NULL);
            if (get_u(a, "building"))
                printf("%s: %llu template build%s running\n", id,
                       (unsigned long long)get_u(a, "building"),
                       get_u(a, "building") == 1 ? "" : "s");
        }
    }
    tbl_print(&t, stdout);
    tbl_free(&t);
    return 0;
}
