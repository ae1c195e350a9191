/* agentctl: drive a slot-controller (the default) or one slot-agent from the
 * command line, over a Unix socket, TCP, TLS 1.3 (tls:HOST:PORT, with a
 * client certificate), or the stdio of a command (--agent-cmd). Owns the
 * CLI (argument parsing, human tables, JSON output) and the agent and slot
 * commands; the connection and the small blocking client (non-blocking fds
 * driven by poll() with a deadline on every wait) live in conn.c. Slot
 * commands (exec, cat, put, ls, stat, archive, reset) take a slot index
 * with an agent and a slot handle with the controller, which runs them as
 * its `exec` op with the agent op as `tool`. The exit status of `exec` is
 * the command's; errors print "agentctl: CODE: message" and exit 1; usage
 * errors exit 2. The controller's pool commands and the live `top` live in
 * ctl_controller.c. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agentctl.h"
#include "slotproto.h"

#define DEFAULT_TIMEOUT_S 30.0
#define READ_RANGE (8u << 20)
/* Room for the envelope around a bin payload: the agent limits read_file
 * data and archives to max_frame - 64 KiB, and we keep put under the same. */
#define FRAME_SLACK (64u << 10)
#define DEFAULT_EXEC_TIMEOUT_MS 600000u
#define CANCEL_GRACE_S 10.0
#define TOKEN_MAX 511

#define EXIT_ERROR 1
#define EXIT_USAGE 2
#define EXIT_TIMED_OUT 124
#define EXIT_INTERRUPTED 130

static const char usage_text[] =
    "usage: agentctl [--controller ADDR | --agent ADDR | --agent-cmd 'COMMAND']\n"
    "                [--token-file F] [--tls-cert F --tls-key F --tls-ca F] [--tls-name N]\n"
    "                [--json] [--timeout SEC] [--wait SEC] COMMAND [ARGS]\n"
    "\n"
    "controller commands (the default; SLOT is a handle from acquire, e.g. default-3f9a2c/4/7):\n"
    "  status [--profile P]     pool summary: agents, slots, waiters, exec rate and latency\n"
    "  agents [--profile P] | slots [--profile P] [--agent A] | leases | profiles\n"
    "  acquire [--profile P] [--trajectory T] [--timeout-ms N]   print a slot handle\n"
    "                           (unbound: the lease outlives agentctl until release or\n"
    "                           the profile's lease_timeout)\n"
    "  release SLOT [--no-reset]\n"
    "  drain AGENT              no new leases; stopped once its last lease is released\n"
    "  reconnect AGENT          end the agent's stream as a network failure would; the\n"
    "                           controller opens a new one and resumes what was running\n"
    "  top [--interval SEC] [--once]   live view; q or Ctrl-C quits\n"
    "  stop [--purge]           stop every agent (Nomad jobs deregistered; --purge purges\n"
    "                           them) and then the controller; returns when it is done\n"
    "\n"
    "slot commands (SLOT is a handle with the controller, an index with --agent):\n"
    "  exec SLOT [--timeout-ms N] [--cwd DIR] [-e K=V]... [--stdin-file F|-] -- CMD...\n"
    "       one word after -- runs through the shell; several words are an argv\n"
    "  cat SLOT PATH            write a file of the slot to stdout\n"
    "  put SLOT PATH < FILE     write stdin to a file of the slot (parents created)\n"
    "  ls SLOT [PATH] [-R]      list a directory\n"
    "  stat SLOT PATH\n"
    "  archive SLOT [PATH] [--format tar|tar.gz] > FILE\n"
    "  reset SLOT               kill the slot's processes and empty its workspace\n"
    "  attach SLOT              an interactive shell in the slot (a terminal session, like\n"
    "                           docker exec -it); Ctrl-] detaches, the session is closed\n"
    "\n"
    "agent commands (with --agent or --agent-cmd):\n"
    "  hello | health | stats | slots\n"
    "                           slots: with DISK (bytes used/budget) and FILES\n"
    "                           (files+dirs used/budget), ! past a budget or full\n"
    "  lease SLOT TRAJECTORY | unlease SLOT | cancel EXEC_ID\n"
    "\n"
    "options:\n"
    "  --controller ADDR  controller address: unix:PATH, tls:HOST:PORT or tcp:HOST:PORT\n"
    "                     (default: $SLOT_CONTROLLER, else\n"
    "                     unix:$XDG_RUNTIME_DIR/slot-controller.sock, else\n"
    "                     unix:/tmp/slot-controller-UID.sock)\n"
    "  --agent ADDR       talk to one agent instead (default: $SLOT_AGENT)\n"
    "  --agent-cmd CMD    run CMD with /bin/sh -c; its stdin/stdout are the protocol stream\n"
    "                     (e.g. 'slot-agent --stdio --data-dir /tmp/x')\n"
    "  --token-file F     send the token in F with hello (default: $SLOT_TOKEN_FILE)\n"
    "  --tls-cert F, --tls-key F, --tls-ca F\n"
    "                     for tls: addresses: our client certificate and key, and the CA\n"
    "                     the peer's certificate must chain to (default: $SLOT_TLS_CERT,\n"
    "                     $SLOT_TLS_KEY, $SLOT_TLS_CA, else trainer.pem, trainer.key and\n"
    "                     ca.pem in STATE/tls, which the controller issues; an agent\n"
    "                     the controller started takes controller.pem and .key only)\n"
    "  --tls-name NAME    the name the peer's certificate must carry (CN or DNS name):\n"
    "                     an agent's id with --agent; default slot-controller-api with\n"
    "                     the controller; '' (and the default with an agent): any\n"
    "                     certificate of the CA\n"
    "  --state-dir DIR    the controller's state directory (default: $SLOT_STATE_DIR,\n"
    "                     else $XDG_RUNTIME_DIR/slot-controller, else\n"
    "                     /var/tmp/slot-controller-UID)\n"
    "  --json             print results as JSON\n"
    "  --timeout SEC      limit for each request other than exec and acquire (default 30)\n"
    "  --wait SEC         keep retrying while the agent or controller is not listening yet\n"
    "\n"
    "exit status: exec returns the command's (124 on timeout); 1 on errors; 2 on usage errors.\n"
    "Ctrl-C during exec cancels the command; a second one gives up waiting.\n";

/* ---- errors and time ------------------------------------------------------ */

int fail(struct ctl *c, const char *code, const char *fmt, ...)
{
    va_list ap;
    snprintf(c->err.code, sizeof c->err.code, "%s", code);
    va_start(ap, fmt);
    vsnprintf(c->err.msg, sizeof c->err.msg, fmt, ap);
    va_end(ap);
    return -1;
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    fputs("agentctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n\n", stderr);
    fputs(usage_text, stderr);
    exit(EXIT_USAGE);
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int ms_until(double deadline)
{
    double left = (deadline - now_s()) * 1000.0;
    if (left <= 0)
        return 0;
    return left > 1e9 ? 1000000000 : (int)left + 1;
}

/* ---- requests on one slot -------------------------------------------------- */

/* Begin the arguments of an op on one slot; n counts the op's own keys,
 * which the caller packs next. The agent takes {slot: INDEX, ...}; the
 * controller takes its `exec` op {slot: HANDLE, tool: TOOL, args: {...}} and
 * fills in the agent's slot index. A command's timeout (tmo, 0 = none) goes
 * to the controller's own `timeout_ms`, which it also waits by. Returns the
 * op to send. */
const char *slot_args(struct ctl *c, const struct cmd *cmd, const char *op, const char *tool,
                      struct args *a, uint32_t n, uint64_t tmo)
{
    if (!c->to_controller) {
        args_begin(a, n + 1);
        sp_pack_kv_uint(&a->pk, "slot", cmd->slot);
        return op;
    }
    args_begin(a, tmo ? 4 : 3);
    sp_pack_kv_str(&a->pk, "slot", cmd->handle);
    sp_pack_kv_str(&a->pk, "tool", tool);
    if (tmo)
        sp_pack_kv_uint(&a->pk, "timeout_ms", tmo);
    sp_pack_cstr(&a->pk, "args");
    msgpack_pack_map(&a->pk, n);
    return "exec";
}

/* ---- JSON and human output -------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at s (no overlongs, surrogates or
 * code points past U+10FFFF), 0 if there is none. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char b = s[0];
    if (b < 0x80)
        return 1;
    size_t k;
    uint32_t cp, min;
    if (b >= 0xc2 && b <= 0xdf) {
        k = 2;
        cp = b & 0x1fu;
        min = 0x80;
    } else if ((b & 0xf0) == 0xe0) {
        k = 3;
        cp = b & 0x0fu;
        min = 0x800;
    } else if (b >= 0xf0 && b <= 0xf4) {
        k = 4;
        cp = b & 0x07u;
        min = 0x10000;
    } else {
        return 0;
    }
    if (k > n)
        return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return k;
}

static bool utf8_valid(const char *p, size_t n)
{
    const unsigned char *s = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(s + i, n - i);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

/* A JSON string; bytes that are not UTF-8 become U+FFFD so the output
 * always parses. */
static void json_str(FILE *f, const char *p, size_t n)
{
    const unsigned char *s = (const unsigned char *)p;
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(s + i, n - i);
        if (!k) {
            fputs("\\ufffd", f);
            i++;
            continue;
        }
        if (k > 1) {
            fwrite(s + i, 1, k, f);
            i += k;
            continue;
        }
        unsigned char ch = s[i++];
        switch (ch) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (ch < 0x20 || ch == 0x7f)
                fprintf(f, "\\u%04x", ch);
            else
                fputc(ch, f);
        }
    }
    fputc('"', f);
}

static void json_base64(FILE *f, const unsigned char *p, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    fputs("{\"base64\": \"", f);
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        char q[4] = {tbl[v >> 18 & 63], tbl[v >> 12 & 63], i + 1 < n ? tbl[v >> 6 & 63] : '=',
                     i + 2 < n ? tbl[v & 63] : '='};
        fwrite(q, 1, 4, f);
    }
    fputs("\"}", f);
}

/* bin: a string when it is text, else {"base64": ...}. */
static void json_bytes(FILE *f, const char *p, size_t n)
{
    if (utf8_valid(p, n))
        json_str(f, p, n);
    else
        json_base64(f, (const unsigned char *)p, n);
}

static void json_obj(FILE *f, const msgpack_object *o, int indent)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("null", f); break;
    case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%llu", (unsigned long long)o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%lld", (long long)o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        /* JSON has no NaN or infinity. */
        if (o->via.f64 == o->via.f64 && o->via.f64 - o->via.f64 == 0)
            fprintf(f, "%.17g", o->via.f64);
        else
            fputs("null", f);
        break;
    case MSGPACK_OBJECT_STR: json_str(f, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN: json_bytes(f, o->via.bin.ptr, o->via.bin.size); break;
    case MSGPACK_OBJECT_ARRAY:
        fputc('[', f);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            fprintf(f, "%s\n%*s", i ? "," : "", indent + 2, "");
            json_obj(f, &o->via.array.ptr[i], indent + 2);
        }
        if (o->via.array.size)
            fprintf(f, "\n%*s", indent, "");
        fputc(']', f);
        break;
    case MSGPACK_OBJECT_MAP:
        fputc('{', f);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            fprintf(f, "%s\n%*s", i ? "," : "", indent + 2, "");
            if (k->type == MSGPACK_OBJECT_STR)
                json_str(f, k->via.str.ptr, k->via.str.size);
            else if (k->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
                fprintf(f, "\"%llu\"", (unsigned long long)k->via.u64);
            else
                fputs("\"?\"", f);
            fputs(": ", f);
            json_obj(f, &o->via.map.ptr[i].val, indent + 2);
        }
        if (o->via.map.size)
            fprintf(f, "\n%*s", indent, "");
        fputc('}', f);
        break;
    default: fputs("null", f); break;
    }
}

void print_json(const msgpack_object *o)
{
    json_obj(stdout, o, 0);
    fputc('\n', stdout);
}

static bool is_scalar(const msgpack_object *o)
{
    return o->type != MSGPACK_OBJECT_MAP && o->type != MSGPACK_OBJECT_ARRAY;
}

/* A value for people: strings bare, nil as "-", bytes counted. */
static void human_scalar(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("-", stdout); break;
    case MSGPACK_OBJECT_STR: fwrite(o->via.str.ptr, 1, o->via.str.size, stdout); break;
    case MSGPACK_OBJECT_BIN: printf("<%u bytes>", o->via.bin.size); break;
    default: json_obj(stdout, o, 0); break;
    }
}

/* key: value lines; nested maps indented below their key; arrays of scalars
 * on one line. */
static void print_kv(const msgpack_object *m, int indent)
{
    for (uint32_t i = 0; i < m->via.map.size; i++) {
        const msgpack_object *k = &m->via.map.ptr[i].key, *v = &m->via.map.ptr[i].val;
        printf("%*s", indent, "");
        human_scalar(k);
        fputc(':', stdout);
        if (v->type == MSGPACK_OBJECT_MAP && v->via.map.size) {
            fputc('\n', stdout);
            print_kv(v, indent + 2);
            continue;
        }
        fputc(' ', stdout);
        if (v->type == MSGPACK_OBJECT_MAP) {
            fputs("-", stdout);
        } else if (v->type == MSGPACK_OBJECT_ARRAY) {
            if (v->via.array.size == 0)
                fputs("-", stdout);
            for (uint32_t j = 0; j < v->via.array.size; j++) {
                const msgpack_object *e = &v->via.array.ptr[j];
                if (j)
                    fputs(", ", stdout);
                if (is_scalar(e))
                    human_scalar(e);
                else
                    json_obj(stdout, e, indent);
            }
        } else {
            human_scalar(v);
        }
        fputc('\n', stdout);
    }
}

static void print_result(struct ctl *c, const msgpack_object *r)
{
    if (c->json)
        print_json(r);
    else
        print_kv(r, 0);
}

uint64_t get_u(const msgpack_object *m, const char *k)
{
    const msgpack_object *o = sp_map_get(m, k);
    return o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

static bool get_b(const msgpack_object *m, const char *k)
{
    const msgpack_object *o = sp_map_get(m, k);
    return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

/* A str field as (pointer, int length) for "%.*s"; "-" when absent or nil. */
const char *get_s(const msgpack_object *m, const char *k, int *n)
{
    const msgpack_object *o = sp_map_get(m, k);
    if (!o || o->type != MSGPACK_OBJECT_STR) {
        *n = 1;
        return "-";
    }
    *n = (int)o->via.str.size;
    return o->via.str.ptr;
}

int write_all(struct ctl *c, int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return fail(c, "", "writing to %s: %s", fd == 1 ? "stdout" : "stderr", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- hello ---------------------------------------------------------------- */

static int read_token(struct ctl *c, char *tok, size_t cap, size_t *len)
{
    int fd = open(c->token_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(c, "", "token file %s: %s", c->token_file, strerror(errno));
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, tok + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return fail(c, "", "token file %s: %s", c->token_file, strerror(e));
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n == cap)
            break;
    }
    close(fd);
    if (n == cap)
        return fail(c, "", "token file %s: token over %d bytes", c->token_file, TOKEN_MAX);
    /* Same trimming as the agent, so a trailing newline does not matter. */
    while (n &&
           (tok[n - 1] == '\n' || tok[n - 1] == '\r' || tok[n - 1] == ' ' || tok[n - 1] == '\t'))
        n--;
    if (!n)
        return fail(c, "", "token file %s is empty", c->token_file);
    *len = n;
    return 0;
}

/* Every session starts with hello: it authenticates and tells the limits. */
static int hello(struct ctl *c, const struct cmd *cmd)
{
    char tok[TOKEN_MAX + 1];
    size_t tn = 0;
    if (c->token_file && read_token(c, tok, sizeof tok, &tn) < 0)
        return -1;
    struct args a;
    args_begin(&a, tn ? 2 : 1);
    sp_pack_kv_str(&a.pk, "client", "agentctl");
    if (tn)
        sp_pack_kv_strn(&a.pk, "token", tok, tn);
    explicit_bzero(tok, sizeof tok);
    uint64_t id = send_request(c, "hello", &a.w);
    /* Scrub the token from every buffer that held it. */
    explicit_bzero(a.w.buf, a.w.cap);
    sp_writer_free(&a.w);
    explicit_bzero(c->wr.buf, c->wr.cap);
    if (!id)
        return -1;
    const msgpack_object *r = wait_result(c, id);
    if (!r) {
        if (!strcmp(c->err.code, "unauthorized") && strlen(c->err.msg) < 900)
            strcat(c->err.msg, " (check --token-file / $SLOT_TOKEN_FILE)");
        return -1;
    }
    const msgpack_object *lim = sp_map_get(r, "limits");
    if (lim && lim->type == MSGPACK_OBJECT_MAP) {
        c->max_frame = get_u(lim, "max_frame");
        c->default_timeout_ms = get_u(lim, "default_timeout_ms");
        /* Answers up to the agent's own limit must be readable. */
        if (c->max_frame > c->rd.max_frame && c->max_frame <= UINT32_MAX)
            c->rd.max_frame = (uint32_t)c->max_frame;
    }
    if (!c->max_frame)
        c->max_frame = SP_DEFAULT_MAX_FRAME;
    const msgpack_object *dp = sp_map_get(r, "default_profile");
    if (dp && dp->type == MSGPACK_OBJECT_STR)
        snprintf(c->default_profile, sizeof c->default_profile, "%.*s", (int)dp->via.str.size,
                 dp->via.str.ptr);
    if (cmd->kind == CMD_HELLO) {
        print_result(c, r);
        return 0;
    }
    if (get_b(r, "auth_required") && !get_b(r, "authenticated"))
        return fail(c, sp_code_name(SP_UNAUTHORIZED),
                    "the %s requires a token: give --token-file F or set SLOT_TOKEN_FILE", c->peer);
    return 0;
}

/* ---- commands --------------------------------------------------------------- */

static int cmd_simple(struct ctl *c, const char *op)
{
    const msgpack_object *r = call(c, op, NULL);
    if (!r)
        return -1;
    print_result(c, r);
    return 0;
}

/* 12.3M: a size in a table cell (no space, so columns split on blanks). */
static void fmt_size_short(char *out, size_t cap, uint64_t n)
{
    static const char units[] = "KMGTP";
    if (n < 1024) {
        snprintf(out, cap, "%lluB", (unsigned long long)n);
        return;
    }
    double v = (double)n / 1024.0;
    int u = 0;
    while (v >= 1024.0 && u < 4) {
        v /= 1024.0;
        u++;
    }
    snprintf(out, cap, "%.1f%c", v, units[u]);
}

/* A slot's DISK and FILES cells from its `disk` map {used, budget, inodes,
 * inodes_budget, over}: "12.3M/1.0G", "340/500000"; "-" for no budget; a
 * "!" past a budget (on DISK when the agent says over without a figure
 * past one); "-" for both from an agent without disk maps. */
static void disk_cells(const msgpack_object *s, char *disk, size_t dcap, char *files, size_t fcap)
{
    const msgpack_object *d = sp_map_get(s, "disk");
    if (!d || d->type != MSGPACK_OBJECT_MAP) {
        snprintf(disk, dcap, "-");
        snprintf(files, fcap, "-");
        return;
    }
    uint64_t used = get_u(d, "used"), budget = get_u(d, "budget");
    uint64_t inodes = get_u(d, "inodes"), ibudget = get_u(d, "inodes_budget");
    bool over_b = budget && used > budget, over_i = ibudget && inodes > ibudget;
    if (get_b(d, "over") && !over_b && !over_i)
        over_b = true;
    char u[32], b[32] = "-";
    fmt_size_short(u, sizeof u, used);
    if (budget)
        fmt_size_short(b, sizeof b, budget);
    snprintf(disk, dcap, "%s/%s%s", u, b, over_b ? "!" : "");
    if (ibudget)
        snprintf(files, fcap, "%llu/%llu%s", (unsigned long long)inodes,
                 (unsigned long long)ibudget, over_i ? "!" : "");
    else
        snprintf(files, fcap, "%llu/-", (unsigned long long)inodes);
}

static int cmd_slots(struct ctl *c)
{
    const msgpack_object *r = call(c, "slots", NULL);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    const msgpack_object *arr = sp_map_get(r, "slots");
    if (!arr || arr->type != MSGPACK_OBJECT_ARRAY)
        return fail(c, sp_code_name(SP_INTERNAL), "slots answer without a slots array");
    uint32_t n = arr->via.array.size;
    char(*running)[64] = calloc(n ? n : 1, sizeof *running);
    /* DISK and FILES when the agent counts its slots' disk use. */
    bool with_disk = n && sp_map_get(&arr->via.array.ptr[0], "disk");
    char(*disk)[2][64] = with_disk ? calloc(n, sizeof *disk) : NULL;
    if (!running || (with_disk && !disk)) {
        free(running);
        return fail(c, "", "out of memory");
    }
    /* Two passes: widths first, so columns line up whatever the data. */
    int w_state = 5, w_lease = 5, w_run = 7, w_disk = 4;
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *s = &arr->via.array.ptr[i];
        int sn, tn;
        get_s(s, "state", &sn);
        get_s(s, "trajectory_id", &tn);
        const msgpack_object *run = sp_map_get(s, "running");
        size_t off = 0;
        for (uint32_t j = 0; run && run->type == MSGPACK_OBJECT_ARRAY && j < run->via.array.size;
             j++) {
            if (off + 24 >= sizeof running[i]) {
                snprintf(running[i] + off, sizeof running[i] - off, ",...");
                break;
            }
            off +=
                (size_t)snprintf(running[i] + off, sizeof running[i] - off, "%s%llu", j ? "," : "",
                                 (unsigned long long)run->via.array.ptr[j].via.u64);
        }
        if (!off)
            strcpy(running[i], "-");
        w_state = sn > w_state ? sn : w_state;
        w_lease = tn > w_lease ? (tn > 40 ? 40 : tn) : w_lease;
        w_run = (int)strlen(running[i]) > w_run ? (int)strlen(running[i]) : w_run;
        if (disk) {
            disk_cells(s, disk[i][0], sizeof disk[i][0], disk[i][1], sizeof disk[i][1]);
            w_disk = (int)strlen(disk[i][0]) > w_disk ? (int)strlen(disk[i][0]) : w_disk;
        }
    }
    printf("%-4s  %-*s  %-*s  %6s  %-*s  %5s", "SLOT", w_state, "STATE", w_lease, "LEASE", "QUEUED",
           w_run, "RUNNING", "EXECS");
    if (disk)
        printf("  %*s  %s", w_disk, "DISK", "FILES");
    putchar('\n');
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *s = &arr->via.array.ptr[i];
        int sn, tn;
        const char *st = get_s(s, "state", &sn);
        const char *tid = get_s(s, "trajectory_id", &tn);
        printf("%-4llu  %-*.*s  %-*.*s  %6llu  %-*s  %5llu", (unsigned long long)get_u(s, "slot"),
               w_state, sn, st, w_lease, tn > 40 ? 40 : tn, tid,
               (unsigned long long)get_u(s, "queued"), w_run, running[i],
               (unsigned long long)get_u(s, "execs"));
        if (disk)
            printf("  %*s  %s", w_disk, disk[i][0], disk[i][1]);
        putchar('\n');
    }
    free(running);
    free(disk);
    return 0;
}

/* Read fd to EOF, refusing more than limit bytes. */
static char *read_all(struct ctl *c, int fd, const char *what, size_t limit, size_t *len)
{
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fail(c, "", "out of memory");
        return NULL;
    }
    for (;;) {
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fail(c, "", "out of memory");
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fail(c, "", "reading %s: %s", what, strerror(errno));
            free(buf);
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > limit) {
            fail(c, sp_code_name(SP_TOO_LARGE),
                 "%s is over %zu bytes, the most one request to this agent can carry", what, limit);
            free(buf);
            return NULL;
        }
    }
    *len = n;
    return buf;
}

static size_t payload_limit(const struct ctl *c)
{
    return c->max_frame > 2 * FRAME_SLACK ? (size_t)c->max_frame - FRAME_SLACK : FRAME_SLACK;
}

static const char *pack_exec_args(struct ctl *c, const struct cmd *cmd, struct args *a)
{
    char *stdin_buf = NULL;
    size_t stdin_len = 0;
    if (cmd->stdin_file) {
        bool is_std = !strcmp(cmd->stdin_file, "-");
        int fd = is_std ? 0 : open(cmd->stdin_file, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            fail(c, "", "%s: %s", cmd->stdin_file, strerror(errno));
            return NULL;
        }
        stdin_buf =
            read_all(c, fd, is_std ? "stdin" : cmd->stdin_file, payload_limit(c), &stdin_len);
        if (!is_std)
            close(fd);
        if (!stdin_buf)
            return NULL;
    }
    /* The controller's `bash` tool names the shell command `command`. */
    bool shell = cmd->nwords == 1;
    bool tmo_in_args = cmd->timeout_ms > 0 && !c->to_controller;
    const char *op =
        slot_args(c, cmd, "exec", shell ? "bash" : "exec", a,
                  2 + tmo_in_args + (cmd->cwd != NULL) + (cmd->nenv > 0) + (stdin_buf != NULL),
                  cmd->timeout_ms);
    if (shell) {
        sp_pack_kv_str(&a->pk, c->to_controller ? "command" : "cmd", cmd->words[0]);
    } else {
        sp_pack_cstr(&a->pk, "argv");
        msgpack_pack_array(&a->pk, (uint32_t)cmd->nwords);
        for (int j = 0; j < cmd->nwords; j++)
            sp_pack_cstr(&a->pk, cmd->words[j]);
    }
    /* --json wants the result with its output: the agent collects it (and
     * bounds it with head + tail) instead of us. */
    sp_pack_kv_bool(&a->pk, "stream", !c->json);
    if (tmo_in_args)
        sp_pack_kv_uint(&a->pk, "timeout_ms", cmd->timeout_ms);
    if (cmd->cwd)
        sp_pack_kv_str(&a->pk, "cwd", cmd->cwd);
    if (cmd->nenv) {
        sp_pack_cstr(&a->pk, "env");
        msgpack_pack_map(&a->pk, (uint32_t)cmd->nenv);
        for (int j = 0; j < cmd->nenv; j++) {
            const char *eq = strchr(cmd->env[j], '=');
            sp_pack_strn(&a->pk, cmd->env[j], (size_t)(eq - cmd->env[j]));
            sp_pack_cstr(&a->pk, eq + 1);
        }
    }
    if (stdin_buf)
        sp_pack_kv_bin(&a->pk, "stdin", stdin_buf, stdin_len);
    free(stdin_buf);
    return op;
}

/* While an exec runs, SIGINT/SIGTERM/SIGHUP arrive through a signalfd, so the
 * first one can cancel the command on the agent instead of orphaning it. */
void catch_signals(struct ctl *c, sigset_t *old, bool winch)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    if (winch)
        sigaddset(&set, SIGWINCH);
    sigprocmask(SIG_BLOCK, &set, old);
    c->sigfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

void release_signals(struct ctl *c, const sigset_t *old)
{
    if (c->sigfd >= 0)
        close(c->sigfd);
    c->sigfd = -1;
    sigprocmask(SIG_SETMASK, old, NULL);
}

/* The controller has no cancel by exec id: its `cancel` tool kills what
 * runs in the slot, which is ours while we hold the handle. */
static int send_cancel(struct ctl *c, const struct cmd *cmd, uint64_t exec_id)
{
    struct args a;
    const char *op = "cancel";
    if (c->to_controller) {
        op = slot_args(c, cmd, "cancel", "cancel", &a, 0, 0);
    } else {
        args_begin(&a, 1);
        sp_pack_kv_uint(&a.pk, "exec_id", exec_id);
    }
    uint64_t id = send_request(c, op, &a.w);
    sp_writer_free(&a.w);
    return id ? 0 : -1;
}

/* Wait for the exec's answer, writing streamed output as it comes. Returns
 * the result (NULL with c->err set). */
static const msgpack_object *exec_wait(struct ctl *c, const struct cmd *cmd, uint64_t id,
                                       double budget_s)
{
    double deadline = now_s() + budget_s;
    uint64_t exec_id = 0;
    bool cancelling = false;
    for (;;) {
        int r = recv_frame(c, deadline);
        if (r < 0)
            return NULL;
        if (r == 0) {
            if (cancelling || (!exec_id && !c->to_controller)) {
                fail(c, "", "interrupted (signal %d)%s", c->signo,
                     cancelling ? "" : "; the command may still run on the agent");
                return NULL;
            }
            if (c->to_controller)
                fprintf(stderr, "agentctl: cancelling the commands of %s (again to stop waiting)\n",
                        cmd->handle);
            else
                fprintf(stderr, "agentctl: cancelling exec %llu (again to stop waiting)\n",
                        (unsigned long long)exec_id);
            if (send_cancel(c, cmd, exec_id) < 0)
                return NULL;
            cancelling = true;
            if (deadline > now_s() + CANCEL_GRACE_S)
                deadline = now_s() + CANCEL_GRACE_S;
            continue;
        }
        const msgpack_object *res = NULL;
        switch (classify(c, id, &res)) {
        case FRAME_RESULT: return res;
        case FRAME_ERROR: return NULL;
        case FRAME_OTHER: continue; /* e.g. the answer to our cancel */
        case FRAME_EVENT: break;
        }
        const msgpack_object *ev = &c->msg.data;
        const msgpack_object *name = sp_map_get(ev, "event");
        if (!name || name->type != MSGPACK_OBJECT_STR)
            continue;
        if (sp_str_eq(name->via.str.ptr, name->via.str.size, "started")) {
            exec_id = get_u(ev, "exec_id");
            /* Time spent queued behind the slot's earlier work does not
             * count against the command's own timeout. */
            deadline = now_s() + budget_s;
            continue;
        }
        const msgpack_object *data = sp_map_get(ev, "data");
        if (!data || (data->type != MSGPACK_OBJECT_BIN && data->type != MSGPACK_OBJECT_STR))
            continue;
        int fd = sp_str_eq(name->via.str.ptr, name->via.str.size, "stderr") ? 2 : 1;
        if (write_all(c, fd, data->via.bin.ptr, data->via.bin.size) < 0)
            return NULL;
    }
}

static int cmd_exec(struct ctl *c, const struct cmd *cmd, int *status)
{
    uint64_t tmo = cmd->timeout_ms         ? cmd->timeout_ms
                   : c->to_controller      ? controller_exec_timeout(c, cmd)
                   : c->default_timeout_ms ? c->default_timeout_ms
                                           : DEFAULT_EXEC_TIMEOUT_MS;
    struct args a;
    const char *op = pack_exec_args(c, cmd, &a);
    if (!op)
        return -1;
    sigset_t old;
    catch_signals(c, &old, false);
    uint64_t id = send_request(c, op, &a.w);
    sp_writer_free(&a.w);
    /* The controller answers `timeout` itself 5 s after the command's. */
    double budget = (double)tmo / 1000.0 + c->timeout_s + (c->to_controller ? 5.0 : 0.0);
    const msgpack_object *r = id ? exec_wait(c, cmd, id, budget) : NULL;
    release_signals(c, &old);
    if (!r)
        return -1;
    if (c->json)
        print_json(r);
    fflush(stdout);
    const msgpack_object *ec = sp_map_get(r, "exit_code");
    int code = ec && ec->type == MSGPACK_OBJECT_POSITIVE_INTEGER
                   ? (int)(ec->via.u64 > 255 ? 255 : ec->via.u64)
                   : 1;
    if (get_b(r, "timed_out") || get_b(r, "idle_timed_out")) {
        fprintf(stderr, "agentctl: exec %llu %stimed out after %llu ms\n",
                (unsigned long long)get_u(r, "exec_id"), get_b(r, "idle_timed_out") ? "idle " : "",
                (unsigned long long)get_u(r, "duration_ms"));
        code = EXIT_TIMED_OUT;
    } else if (get_b(r, "disk_quota")) {
        int rn;
        const char *why = get_s(r, "reason", &rn);
        fprintf(stderr, "agentctl: exec %llu was stopped: disk quota exceeded: %.*s\n",
                (unsigned long long)get_u(r, "exec_id"), rn, why);
    } else if (get_b(r, "cancelled")) {
        fprintf(stderr, "agentctl: exec %llu was cancelled\n",
                (unsigned long long)get_u(r, "exec_id"));
    }
    *status = code;
    return 0;
}

static int cmd_cat(struct ctl *c, const struct cmd *cmd)
{
    size_t range = payload_limit(c) < READ_RANGE ? payload_limit(c) : READ_RANGE;
    uint64_t offset = 0;
    char *all = NULL; /* --json collects the file to print it as one value */
    size_t all_len = 0;
    uint64_t size = 0, mode = 0, mtime = 0;
    for (;;) {
        struct args a;
        const char *op = slot_args(c, cmd, "read_file", "read_file", &a, 3, 0);
        sp_pack_kv_str(&a.pk, "path", cmd->path);
        sp_pack_kv_uint(&a.pk, "offset", offset);
        sp_pack_kv_uint(&a.pk, "length", range);
        const msgpack_object *r = call(c, op, &a);
        if (!r) {
            free(all);
            return -1;
        }
        const msgpack_object *d = sp_map_get(r, "data");
        size_t n = d && d->type == MSGPACK_OBJECT_BIN ? d->via.bin.size : 0;
        size = get_u(r, "size"), mode = get_u(r, "mode"), mtime = get_u(r, "mtime");
        if (c->json && n) {
            char *nb = realloc(all, all_len + n);
            if (!nb) {
                free(all);
                return fail(c, "", "out of memory");
            }
            all = nb;
            memcpy(all + all_len, d->via.bin.ptr, n);
            all_len += n;
        } else if (n && write_all(c, 1, d->via.bin.ptr, n) < 0) {
            return -1;
        }
        offset += n;
        if (get_b(r, "eof") || n == 0)
            break;
    }
    if (c->json) {
        fputs("{\n  \"path\": ", stdout);
        json_str(stdout, cmd->path, strlen(cmd->path));
        printf(",\n  \"size\": %llu,\n  \"mode\": %llu,\n  \"mtime\": %llu,\n  \"data\": ",
               (unsigned long long)size, (unsigned long long)mode, (unsigned long long)mtime);
        json_bytes(stdout, all ? all : "", all_len);
        fputs("\n}\n", stdout);
        free(all);
    }
    return 0;
}

static int cmd_put(struct ctl *c, const struct cmd *cmd)
{
    size_t n;
    char *data = read_all(c, 0, "stdin", payload_limit(c), &n);
    if (!data)
        return -1;
    struct args a;
    const char *op = slot_args(c, cmd, "write_file", "write_file", &a, 3, 0);
    sp_pack_kv_str(&a.pk, "path", cmd->path);
    sp_pack_kv_bin(&a.pk, "data", data, n);
    sp_pack_kv_bool(&a.pk, "mkdirs", true);
    free(data);
    const msgpack_object *r = call(c, op, &a);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    int pn, hn;
    const char *p = get_s(r, "path", &pn);
    const char *h = get_s(r, "sha256", &hn);
    printf("wrote %.*s (%llu bytes, sha256 %.*s)\n", pn, p, (unsigned long long)get_u(r, "size"),
           hn, h);
    return 0;
}

static void mode_str(char out[11], const char *type, int tn, uint64_t mode)
{
    char t = '?';
    if (sp_str_eq(type, (size_t)tn, "dir"))
        t = 'd';
    else if (sp_str_eq(type, (size_t)tn, "file"))
        t = '-';
    else if (sp_str_eq(type, (size_t)tn, "symlink"))
        t = 'l';
    out[0] = t;
    static const char rwx[] = "rwxrwxrwx";
    for (int i = 0; i < 9; i++)
        out[i + 1] = (mode & (1u << (8 - i))) ? rwx[i] : '-';
    /* setuid, setgid and sticky show in the execute columns, as ls does. */
    if (mode & 04000)
        out[3] = out[3] == 'x' ? 's' : 'S';
    if (mode & 02000)
        out[6] = out[6] == 'x' ? 's' : 'S';
    if (mode & 01000)
        out[9] = out[9] == 'x' ? 't' : 'T';
    out[10] = 0;
}

static void fmt_mtime(char *out, size_t cap, uint64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(out, cap, "%Y-%m-%d %H:%M", &tm);
}

static void print_entry(const msgpack_object *e, int size_width)
{
    int tn, pn;
    const char *type = get_s(e, "type", &tn);
    const char *path = get_s(e, "path", &pn);
    char mode[11], when[32];
    mode_str(mode, type, tn, get_u(e, "mode"));
    fmt_mtime(when, sizeof when, get_u(e, "mtime"));
    printf("%s %*llu %s %.*s", mode, size_width, (unsigned long long)get_u(e, "size"), when, pn,
           path);
    if (sp_map_get(e, "target")) {
        int xn;
        const char *target = get_s(e, "target", &xn);
        printf(" -> %.*s", xn, target);
    }
    fputc('\n', stdout);
}

static int cmd_ls(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    const char *op = slot_args(c, cmd, "list", "list", &a, 2, 0);
    sp_pack_kv_str(&a.pk, "path", cmd->path);
    sp_pack_kv_bool(&a.pk, "recursive", cmd->recursive);
    const msgpack_object *r = call(c, op, &a);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    const msgpack_object *arr = sp_map_get(r, "entries");
    if (!arr || arr->type != MSGPACK_OBJECT_ARRAY)
        return fail(c, sp_code_name(SP_INTERNAL), "list answer without entries");
    int w = 1;
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        int d =
            snprintf(NULL, 0, "%llu", (unsigned long long)get_u(&arr->via.array.ptr[i], "size"));
        w = d > w ? d : w;
    }
    for (uint32_t i = 0; i < arr->via.array.size; i++)
        print_entry(&arr->via.array.ptr[i], w);
    if (get_b(r, "truncated"))
        fprintf(stderr, "agentctl: listing truncated at %u entries\n", arr->via.array.size);
    return 0;
}

static int cmd_stat(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    const char *op = slot_args(c, cmd, "stat", "stat", &a, 1, 0);
    sp_pack_kv_str(&a.pk, "path", cmd->path);
    const msgpack_object *r = call(c, op, &a);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    int pn, tn;
    const char *path = get_s(r, "path", &pn);
    const char *type = get_s(r, "type", &tn);
    char mode[11], when[32];
    uint64_t m = get_u(r, "mode");
    mode_str(mode, type, tn, m);
    fmt_mtime(when, sizeof when, get_u(r, "mtime"));
    printf("path: %.*s\ntype: %.*s\nsize: %llu\nmode: %04llo (%s)\nmtime: %s\n", pn, path, tn, type,
           (unsigned long long)get_u(r, "size"), (unsigned long long)m, mode, when);
    if (sp_map_get(r, "target")) {
        int xn;
        const char *target = get_s(r, "target", &xn);
        printf("target: %.*s\n", xn, target);
    }
    return 0;
}

static int cmd_archive(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    const char *op = slot_args(c, cmd, "archive", "archive", &a, 2, 0);
    sp_pack_kv_str(&a.pk, "path", cmd->path);
    sp_pack_kv_str(&a.pk, "format", cmd->format);
    if (isatty(2) && !c->json) {
        c->progress = "archive";
        c->progress_start = now_s();
        c->progress_at = c->progress_start - PROGRESS_EVERY_S; /* the first line at once */
    }
    const msgpack_object *r = call(c, op, &a);
    end_progress(c);
    if (!r)
        return -1;
    if (c->json) {
        print_json(r);
        return 0;
    }
    const msgpack_object *d = sp_map_get(r, "data");
    if (!d || d->type != MSGPACK_OBJECT_BIN)
        return fail(c, sp_code_name(SP_INTERNAL), "archive answer without data");
    if (write_all(c, 1, d->via.bin.ptr, d->via.bin.size) < 0)
        return -1;
    if (isatty(2)) {
        char size[32];
        fmt_bytes(size, sizeof size, get_u(r, "bytes"));
        fprintf(stderr, "archived %llu entries, %llu bytes (%s, %s)\n",
                (unsigned long long)get_u(r, "entries"), (unsigned long long)get_u(r, "bytes"),
                size, cmd->format);
    }
    return 0;
}

static int cmd_slot_op(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    const char *op = slot_args(c, cmd, cmd->name, cmd->name, &a, cmd->trajectory ? 1 : 0, 0);
    if (cmd->trajectory)
        sp_pack_kv_str(&a.pk, "trajectory_id", cmd->trajectory);
    const msgpack_object *r = call(c, op, &a);
    if (!r)
        return -1;
    print_result(c, r);
    return 0;
}

static int cmd_cancel(struct ctl *c, const struct cmd *cmd)
{
    struct args a;
    args_begin(&a, 1);
    sp_pack_kv_uint(&a.pk, "exec_id", cmd->exec_id);
    const msgpack_object *r = call(c, "cancel", &a);
    if (!r)
        return -1;
    print_result(c, r);
    return 0;
}

/* ---- command line ------------------------------------------------------------ */

static uint64_t parse_uint(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (s[0] < '0' || s[0] > '9' || errno || *end)
        usage_error("%s must be a non-negative integer, got '%s'", what, s);
    return v;
}

static double parse_seconds(const char *s, const char *opt)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= 0) || v > 1e7)
        usage_error("%s wants seconds, got '%s'", opt, s);
    return v;
}

static void parse_exec(struct cmd *cmd, int argc, char **argv)
{
    int i = 2;
    cmd->env = calloc((size_t)argc, sizeof *cmd->env);
    if (!cmd->env)
        usage_error("out of memory");
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *o = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(o, "--timeout-ms") && has_val) {
            cmd->timeout_ms = parse_uint(argv[++i], "--timeout-ms");
        } else if (!strcmp(o, "--cwd") && has_val) {
            cmd->cwd = argv[++i];
        } else if (!strcmp(o, "--stdin-file") && has_val) {
            cmd->stdin_file = argv[++i];
        } else if (!strcmp(o, "-e") && has_val) {
            const char *kv = argv[++i];
            if (!strchr(kv, '=') || kv[0] == '=')
                usage_error("-e wants K=V, got '%s'", kv);
            cmd->env[cmd->nenv++] = kv;
        } else if (!strcmp(o, "--timeout-ms") || !strcmp(o, "--cwd") ||
                   !strcmp(o, "--stdin-file") || !strcmp(o, "-e")) {
            usage_error("exec: %s needs a value", o);
        } else {
            usage_error("exec: unknown option '%s' (the command goes after --)", o);
        }
    }
    if (i + 1 >= argc)
        usage_error("exec: give the command after --");
    cmd->words = argv + i + 1;
    cmd->nwords = argc - i - 1;
}

/* A slot: an index for an agent, a handle AGENT/INDEX/GENERATION for the
 * controller. */
static void parse_slot(struct cmd *cmd, const char *s, bool to_controller)
{
    if (!to_controller) {
        cmd->slot = parse_uint(s, "SLOT");
        return;
    }
    if (!strchr(s, '/') || s[0] == '-')
        usage_error("SLOT is a controller slot handle AGENT/INDEX/GENERATION (from agentctl "
                    "acquire), got '%s'; to address slot %s of one agent give --agent ADDR",
                    s, s);
    cmd->handle = s;
}

/* Options of the controller commands, after their positional words. */
static void parse_ctl_options(struct cmd *cmd, int argc, char **argv, int i, const char *usage)
{
    for (; i < argc; i++) {
        const char *o = argv[i];
        bool has_val = i + 1 < argc;
        bool acquire = cmd->kind == CMD_ACQUIRE;
        bool filtered = acquire || cmd->kind == CMD_STATUS || cmd->kind == CMD_AGENTS ||
                        cmd->kind == CMD_SLOTS || cmd->kind == CMD_TOP;
        if (!strcmp(o, "--profile") && has_val && filtered) {
            cmd->profile = argv[++i];
        } else if (!strcmp(o, "--agent") && has_val && cmd->kind == CMD_SLOTS) {
            cmd->agent_id = argv[++i];
        } else if (!strcmp(o, "--trajectory") && has_val && acquire) {
            cmd->trajectory = argv[++i];
        } else if (!strcmp(o, "--timeout-ms") && has_val && acquire) {
            cmd->timeout_ms = parse_uint(argv[++i], "--timeout-ms");
            cmd->have_timeout = true;
        } else if (!strcmp(o, "--no-reset") && cmd->kind == CMD_RELEASE) {
            cmd->no_reset = true;
        } else if (!strcmp(o, "--interval") && has_val && cmd->kind == CMD_TOP) {
            cmd->interval = parse_seconds(argv[++i], "--interval");
            if (cmd->interval < 0.05)
                usage_error("--interval is at least 0.05 seconds");
        } else if (!strcmp(o, "--once") && cmd->kind == CMD_TOP) {
            cmd->once = true;
        } else {
            usage_error("usage: agentctl %s", usage);
        }
    }
}

enum { MODE_AGENT = 1, MODE_CTL = 2, MODE_BOTH = 3 };

static void parse_command(struct cmd *cmd, int argc, char **argv, bool to_controller)
{
    static const struct {
        const char *name;
        enum cmd_kind kind;
        int modes;
        int min, max; /* positional words after the command, -1 = any */
        const char *usage;
    } table[] = {
        {"hello", CMD_HELLO, MODE_BOTH, 0, 0, "hello"},
        {"health", CMD_HEALTH, MODE_AGENT, 0, 0, "health"},
        {"stats", CMD_STATS, MODE_AGENT, 0, 0, "stats"},
        {"slots", CMD_SLOTS, MODE_AGENT, 0, 1, "slots"},
        {"exec", CMD_EXEC, MODE_BOTH, 1, -1,
         "exec SLOT [--timeout-ms N] [--cwd DIR] [-e K=V]... -- CMD..."},
        {"cat", CMD_CAT, MODE_BOTH, 2, 2, "cat SLOT PATH"},
        {"put", CMD_PUT, MODE_BOTH, 2, 2, "put SLOT PATH < FILE"},
        {"ls", CMD_LS, MODE_BOTH, 1, 3, "ls SLOT [PATH] [-R]"},
        {"stat", CMD_STAT, MODE_BOTH, 2, 2, "stat SLOT PATH"},
        {"archive", CMD_ARCHIVE, MODE_BOTH, 1, 4, "archive SLOT [PATH] [--format tar|tar.gz]"},
        {"reset", CMD_RESET, MODE_BOTH, 1, 1, "reset SLOT"},
        {"lease", CMD_LEASE, MODE_AGENT, 2, 2, "lease SLOT TRAJECTORY"},
        {"unlease", CMD_UNLEASE, MODE_AGENT, 1, 1, "unlease SLOT"},
        {"cancel", CMD_CANCEL, MODE_AGENT, 1, 1, "cancel EXEC_ID"},
        {"status", CMD_STATUS, MODE_CTL, 0, -1, "status [--profile P]"},
        {"agents", CMD_AGENTS, MODE_CTL, 0, -1, "agents [--profile P]"},
        {"slots", CMD_SLOTS, MODE_CTL, 0, -1, "slots [--profile P] [--agent A]"},
        {"leases", CMD_LEASES, MODE_CTL, 0, 0, "leases"},
        {"templates", CMD_TEMPLATES, MODE_BOTH, 0, 0, "templates"},
        {"profiles", CMD_PROFILES, MODE_CTL, 0, 0, "profiles"},
        {"acquire", CMD_ACQUIRE, MODE_CTL, 0, -1,
         "acquire [--profile P] [--trajectory T] [--timeout-ms N]"},
        {"release", CMD_RELEASE, MODE_CTL, 1, 2, "release SLOT [--no-reset]"},
        {"drain", CMD_DRAIN, MODE_CTL, 1, 1, "drain AGENT"},
        {"reconnect", CMD_RECONNECT, MODE_CTL, 1, 1, "reconnect AGENT"},
        {"top", CMD_TOP, MODE_CTL, 0, -1, "top [--interval SEC] [--once] [--profile P]"},
        {"stop", CMD_STOP, MODE_CTL, 0, 1, "stop [--purge]"},
        {"attach", CMD_ATTACH, MODE_BOTH, 1, 1, "attach SLOT"},
    };
    int mode = to_controller ? MODE_CTL : MODE_AGENT;
    size_t t = 0, nt = sizeof table / sizeof table[0], other = nt;
    for (; t < nt; t++) {
        if (strcmp(argv[0], table[t].name) != 0)
            continue;
        if (table[t].modes & mode)
            break;
        other = t;
    }
    if (t == nt && other < nt && to_controller)
        usage_error("'%s' talks to one agent: give --agent unix:PATH|tcp:HOST:PORT or "
                    "--agent-cmd CMD, or set SLOT_AGENT",
                    argv[0]);
    if (t == nt && other < nt)
        usage_error("'%s' is a controller command, but agentctl is talking to one agent "
                    "(--agent, --agent-cmd or $SLOT_AGENT): give --controller ADDR instead",
                    argv[0]);
    if (t == nt)
        usage_error("unknown command '%s'", argv[0]);
    int nargs = argc - 1;
    if (nargs < table[t].min || (table[t].max >= 0 && nargs > table[t].max))
        usage_error("usage: agentctl %s", table[t].usage);
    cmd->kind = table[t].kind;
    cmd->name = table[t].name;
    cmd->path = ".";
    cmd->format = "tar.gz";
    cmd->interval = 1.0;
    switch (cmd->kind) {
    case CMD_EXEC:
        parse_slot(cmd, argv[1], to_controller);
        parse_exec(cmd, argc, argv);
        break;
    case CMD_CAT:
    case CMD_PUT:
    case CMD_STAT:
        parse_slot(cmd, argv[1], to_controller);
        cmd->path = argv[2];
        break;
    case CMD_LS: {
        parse_slot(cmd, argv[1], to_controller);
        bool have_path = false;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "-R"))
                cmd->recursive = true;
            else if (argv[i][0] == '-' || have_path)
                usage_error("usage: agentctl %s", table[t].usage);
            else
                cmd->path = argv[i], have_path = true;
        }
        break;
    }
    case CMD_ARCHIVE: {
        parse_slot(cmd, argv[1], to_controller);
        bool have_path = false;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--format") && i + 1 < argc)
                cmd->format = argv[++i];
            else if (argv[i][0] == '-' || have_path)
                usage_error("usage: agentctl %s", table[t].usage);
            else
                cmd->path = argv[i], have_path = true;
        }
        if (strcmp(cmd->format, "tar") != 0 && strcmp(cmd->format, "tar.gz") != 0)
            usage_error("archive: --format is tar or tar.gz, got '%s'", cmd->format);
        break;
    }
    case CMD_RESET:
    case CMD_UNLEASE: parse_slot(cmd, argv[1], to_controller); break;
    case CMD_LEASE:
        cmd->slot = parse_uint(argv[1], "SLOT");
        cmd->trajectory = argv[2];
        break;
    case CMD_CANCEL: cmd->exec_id = parse_uint(argv[1], "EXEC_ID"); break;
    case CMD_RELEASE:
        parse_slot(cmd, argv[1], true);
        parse_ctl_options(cmd, argc, argv, 2, table[t].usage);
        break;
    case CMD_DRAIN:
    case CMD_RECONNECT:
        if (argv[1][0] == '-' || !argv[1][0])
            usage_error("usage: agentctl %s", table[t].usage);
        cmd->agent_id = argv[1];
        break;
    case CMD_ATTACH: parse_slot(cmd, argv[1], to_controller); break;
    case CMD_STOP:
        if (argc == 2 && strcmp(argv[1], "--purge") != 0)
            usage_error("usage: agentctl %s", table[t].usage);
        cmd->purge = argc == 2;
        break;
    case CMD_SLOTS:
        if (!to_controller) {
            if (argc > 1)
                usage_error("usage: agentctl %s", table[t].usage);
            break;
        }
        parse_ctl_options(cmd, argc, argv, 1, table[t].usage);
        break;
    case CMD_STATUS:
    case CMD_AGENTS:
    case CMD_ACQUIRE:
    case CMD_TOP: parse_ctl_options(cmd, argc, argv, 1, table[t].usage); break;
    default: break;
    }
}

/* The controller's default state directory, as slot-controller picks it. */
static const char *default_state_dir(void)
{
    static char dir[4200];
    const char *env = getenv("SLOT_STATE_DIR"), *xdg = getenv("XDG_RUNTIME_DIR");
    if (env && *env)
        snprintf(dir, sizeof dir, "%.4000s", env);
    else if (xdg && *xdg)
        snprintf(dir, sizeof dir, "%.4000s/slot-controller", xdg);
    else
        snprintf(dir, sizeof dir, "/var/tmp/slot-controller-%u", (unsigned)getuid());
    return dir;
}

/* Flag, else $SLOT_TLS_*, else the trainer certificate the controller
 * issues into STATE/tls (written into buf, which outlives the connection). */
static const char *tls_file(const char *flag, const char *env, const char *dir, const char *name,
                            char *buf, size_t cap)
{
    const char *v = getenv(env);
    if (flag)
        return flag;
    if (v && *v)
        return v;
    if ((size_t)snprintf(buf, cap, "%s/tls/%s", dir, name) >= cap)
        usage_error("--state-dir is too long: %s", dir);
    return buf;
}

static void tls_defaults(struct ctl *c, const char *state_dir)
{
    static char cert[4300], key[4300], ca[4300];
    const char *dir = state_dir ? state_dir : default_state_dir();
    c->tls_cert = tls_file(c->tls_cert, "SLOT_TLS_CERT", dir, "trainer.pem", cert, sizeof cert);
    c->tls_key = tls_file(c->tls_key, "SLOT_TLS_KEY", dir, "trainer.key", key, sizeof key);
    c->tls_ca = tls_file(c->tls_ca, "SLOT_TLS_CA", dir, "ca.pem", ca, sizeof ca);
    /* The controller's own API certificate is named so: another
     * certificate of its CA (an agent's) cannot stand in for it. */
    if (!c->tls_name && c->to_controller)
        c->tls_name = "slot-controller-api";
    if (c->tls_name && !*c->tls_name)
        c->tls_name = NULL; /* --tls-name '': any certificate of the CA */
}

static int run(struct ctl *c, const struct cmd *cmd, int *status)
{
    if (connect_peer(c) < 0 || hello(c, cmd) < 0)
        return -1;
    switch (cmd->kind) {
    case CMD_HELLO: return 0;
    case CMD_HEALTH:
    case CMD_STATS: return cmd_simple(c, cmd->name);
    case CMD_SLOTS: return c->to_controller ? cmd_ctl_slots(c, cmd) : cmd_slots(c);
    case CMD_EXEC: return cmd_exec(c, cmd, status);
    case CMD_CAT: return cmd_cat(c, cmd);
    case CMD_PUT: return cmd_put(c, cmd);
    case CMD_LS: return cmd_ls(c, cmd);
    case CMD_STAT: return cmd_stat(c, cmd);
    case CMD_ARCHIVE: return cmd_archive(c, cmd);
    case CMD_RESET:
    case CMD_LEASE:
    case CMD_UNLEASE: return cmd_slot_op(c, cmd);
    case CMD_CANCEL: return cmd_cancel(c, cmd);
    case CMD_STATUS: return cmd_status(c, cmd);
    case CMD_AGENTS: return cmd_agents(c, cmd);
    case CMD_LEASES: return cmd_leases(c);
    case CMD_TEMPLATES: return cmd_templates(c);
    case CMD_PROFILES: return cmd_profiles(c);
    case CMD_ACQUIRE: return cmd_acquire(c, cmd);
    case CMD_RELEASE: return cmd_release(c, cmd);
    case CMD_DRAIN: return cmd_drain(c, cmd);
    case CMD_RECONNECT: return cmd_reconnect(c, cmd);
    case CMD_TOP: return cmd_top(c, cmd);
    case CMD_STOP: return cmd_stop(c, cmd);
    case CMD_ATTACH: return cmd_attach(c, cmd, status);
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct ctl ctl = {.rfd = -1, .wfd = -1, .sigfd = -1, .timeout_s = DEFAULT_TIMEOUT_S};
    struct ctl *c = &ctl;
    const char *env_agent = getenv("SLOT_AGENT");
    const char *state_dir = NULL;
    c->token_file = getenv("SLOT_TOKEN_FILE");
    if (c->token_file && !*c->token_file)
        c->token_file = NULL;
    static const struct option opts[] = {
        {"controller", required_argument, NULL, 'C'},
        {"agent", required_argument, NULL, 'a'},
        {"agent-cmd", required_argument, NULL, 'c'},
        {"token-file", required_argument, NULL, 't'},
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 'T'},
        {"wait", required_argument, NULL, 'W'},
        {"tls-cert", required_argument, NULL, 'X'},
        {"tls-key", required_argument, NULL, 'K'},
        {"tls-ca", required_argument, NULL, 'A'},
        {"tls-name", required_argument, NULL, 'N'},
        {"state-dir", required_argument, NULL, 'S'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int o;
    opterr = 0;
    /* "+": stop at the first command word, so the command's options stay its own. */
    while ((o = getopt_long(argc, argv, "+:h", opts, NULL)) != -1) {
        switch (o) {
        case 'C': c->controller = optarg; break;
        case 'a': c->agent = optarg; break;
        case 'c': c->agent_cmd = optarg; break;
        case 't': c->token_file = optarg; break;
        case 'j': c->json = true; break;
        case 'T':
            c->timeout_s = parse_seconds(optarg, "--timeout");
            if (c->timeout_s <= 0)
                usage_error("--timeout must be positive");
            break;
        case 'W': c->wait_s = parse_seconds(optarg, "--wait"); break;
        case 'X': c->tls_cert = optarg; break;
        case 'K': c->tls_key = optarg; break;
        case 'A': c->tls_ca = optarg; break;
        case 'N': c->tls_name = optarg; break;
        case 'S': state_dir = optarg; break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': usage_error("%s needs a value", argv[optind - 1]);
        default: usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    argc -= optind;
    argv += optind;
    if (argc < 1)
        usage_error("no command given");
    /* The controller unless an agent is named: --agent or --agent-cmd, else
     * $SLOT_AGENT when --controller is not given either. */
    if (c->agent && c->agent_cmd)
        usage_error("give --agent or --agent-cmd, not both");
    if (c->controller && (c->agent || c->agent_cmd))
        usage_error("give --controller or --agent/--agent-cmd, not both");
    if (!c->controller && !c->agent && !c->agent_cmd && env_agent && *env_agent)
        c->agent = env_agent;
    c->to_controller = !c->agent && !c->agent_cmd;
    if (c->to_controller && !c->controller)
        c->controller = default_controller_addr();
    c->peer = c->to_controller ? "controller" : "agent";
    if (!c->agent_cmd && !strncmp(c->to_controller ? c->controller : c->agent, "tls:", 4))
        tls_defaults(c, state_dir);
    struct cmd cmd = {0};
    parse_command(&cmd, argc, argv, c->to_controller);
    if (cmd.kind == CMD_TOP && c->json)
        usage_error("top has no --json: use agentctl --json status");
    if (cmd.kind == CMD_ARCHIVE && !c->json && isatty(1)) {
        fprintf(stderr, "agentctl: refusing to write an archive to a terminal: redirect stdout "
                        "to a file\n");
        return EXIT_ERROR;
    }

    signal(SIGPIPE, SIG_IGN);
    sp_reader_init(&c->rd, SP_DEFAULT_MAX_FRAME);
    sp_writer_init(&c->wr, 0);
    int status = 0;
    int rc = run(c, &cmd, &status);
    if (fflush(stdout) != 0 && rc == 0)
        rc = fail(c, "", "writing to stdout: %s", strerror(errno));
    disconnect(c);
    sp_reader_free(&c->rd);
    sp_writer_free(&c->wr);
    free(cmd.env);
    if (rc < 0) {
        if (c->err.code[0])
            fprintf(stderr, "agentctl: %s: %s\n", c->err.code, c->err.msg);
        else
            fprintf(stderr, "agentctl: %s\n", c->err.msg);
        return c->interrupted ? EXIT_INTERRUPTED : EXIT_ERROR;
    }
    return status;
}
