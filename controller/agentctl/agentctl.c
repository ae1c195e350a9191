/* agentctl: inspect and drive one slot-agent from the command line, over a
 * Unix socket, TCP, or the stdio of a command (--agent-cmd). Blocking I/O
 * with poll() and a deadline on every wait; tables for people, --json for
 * scripts; the exit status of `exec` is the command's. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "slotproto.h"

#define DEFAULT_TIMEOUT_S 30
#define READ_RANGE (8u << 20)

struct ctl {
    const char *agent;
    const char *agent_cmd;
    const char *token_file;
    bool json;
    double timeout_s;
    double wait_s; /* keep trying to connect this long (agent still starting) */
    int rfd, wfd;
    pid_t child;
    struct sp_reader rd;
    struct sp_writer wr;
    uint64_t next_id;
    uint64_t max_frame;
    msgpack_unpacked msg;
    char *frame; /* copy backing msg */
};

static const char usage[] =
    "usage: agentctl [--agent unix:PATH|tcp:HOST:PORT | --agent-cmd 'COMMAND']\n"
    "                [--token-file F] [--json] [--timeout SEC] [--wait SEC] COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  hello | health | stats | slots\n"
    "  exec SLOT [--timeout-ms N] [--cwd DIR] [-e K=V]... [--stdin-file F|-] -- CMD...\n"
    "       one word after -- runs through the shell; several words are an argv\n"
    "  cat SLOT PATH            write a file of the slot to stdout\n"
    "  put SLOT PATH < FILE     write stdin to a file of the slot (parents created)\n"
    "  ls SLOT [PATH] [-R]      list a directory\n"
    "  stat SLOT PATH\n"
    "  archive SLOT PATH [--format tar|tar.gz] > FILE\n"
    "  reset SLOT               kill the slot's processes and empty its workspace\n"
    "  lease SLOT TRAJECTORY | unlease SLOT | cancel EXEC_ID\n"
    "\n"
    "--wait SEC keeps retrying a Unix socket that does not exist yet (agent starting).\n"
    "The agent address also comes from $SLOT_AGENT, the token file from $SLOT_TOKEN_FILE.\n";

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("agentctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- connection --------------------------------------------------------- */

static void connect_agent(struct ctl *c)
{
    if (c->agent_cmd) {
        int in[2], out[2];
        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0)
            die(1, "pipe: %s", strerror(errno));
        pid_t pid = fork();
        if (pid < 0)
            die(1, "fork: %s", strerror(errno));
        if (pid == 0) {
            dup2(in[0], 0);
            dup2(out[1], 1);
            execl("/bin/sh", "sh", "-c", c->agent_cmd, (char *)NULL);
            _exit(127);
        }
        close(in[0]);
        close(out[1]);
        c->child = pid;
        c->wfd = in[1];
        c->rfd = out[0];
        return;
    }
    const char *a = c->agent;
    int fd = -1;
    if (strncmp(a, "unix:", 5) == 0) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(a + 5) >= sizeof sa.sun_path)
            die(2, "unix socket path too long: %s", a + 5);
        strcpy(sa.sun_path, a + 5);
        double deadline = now_s() + c->wait_s;
        for (;;) {
            fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
                break;
            int e = errno;
            if (fd >= 0)
                close(fd);
            if ((e != ENOENT && e != ECONNREFUSED) || now_s() >= deadline)
                die(1, "no agent at %s (%s): start one with: slot-agent --listen %s", a,
                    strerror(e), a);
            usleep(20000);
        }
    } else if (strncmp(a, "tcp:", 4) == 0) {
        char host[256];
        const char *colon = strrchr(a + 4, ':');
        if (!colon || (size_t)(colon - (a + 4)) >= sizeof host)
            die(2, "bad address %s: want tcp:HOST:PORT", a);
        memcpy(host, a + 4, (size_t)(colon - (a + 4)));
        host[colon - (a + 4)] = 0;
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        int g = getaddrinfo(host, colon + 1, &hints, &res);
        if (g)
            die(1, "%s: %s", a, gai_strerror(g));
        for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
            fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
            if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
                close(fd);
                fd = -1;
            }
        }
        freeaddrinfo(res);
        if (fd < 0)
            die(1, "no agent at %s (%s): start one with: slot-agent --listen %s --token-file F", a,
                strerror(errno), a);
    } else {
        die(2, "agent address must be unix:PATH or tcp:HOST:PORT, got '%s'", a);
    }
    c->rfd = c->wfd = fd;
}

static void disconnect(struct ctl *c)
{
    if (c->child > 0) {
        close(c->wfd);
        /* Give the agent a moment to finish and exit on EOF, then insist. */
        for (int i = 0; i < 200; i++) {
            if (waitpid(c->child, NULL, WNOHANG) == c->child)
                return;
            usleep(10000);
        }
        kill(c->child, SIGKILL);
        waitpid(c->child, NULL, 0);
    } else if (c->rfd >= 0) {
        close(c->rfd);
    }
}

static uint64_t send_request_packed(struct ctl *c, const char *op, const struct sp_writer *args)
{
    /* args: an already packed map (or NULL). */
    uint64_t id = ++c->next_id;
    msgpack_packer pk;
    sp_writer_begin_frame(&c->wr);
    sp_writer_packer(&c->wr, &pk);
    sp_pack_request_head(&pk, id, op, args != NULL);
    struct sp_err err;
    if (args && sp_writer_append(&c->wr, args->buf + args->off, args->len - args->off, &err) < 0)
        die(1, "%s", err.msg);
    if (sp_writer_end_frame(&c->wr, &err) < 0)
        die(1, "%s", err.msg);
    double deadline = now_s() + c->timeout_s;
    while (sp_writer_pending(&c->wr)) {
        ssize_t left = sp_writer_flush(&c->wr, c->wfd);
        if (left < 0)
            die(1, "agent connection lost while sending: %s", strerror(errno));
        if (left == 0)
            break;
        struct pollfd p = {.fd = c->wfd, .events = POLLOUT};
        int ms = (int)((deadline - now_s()) * 1000);
        if (ms <= 0 || poll(&p, 1, ms) == 0)
            die(1, "timed out sending to the agent");
    }
    return id;
}

/* Next frame within the deadline; the object stays valid until the next call. */
static const msgpack_object *recv_frame(struct ctl *c, double deadline)
{
    if (c->frame) {
        msgpack_unpacked_destroy(&c->msg);
        free(c->frame);
        c->frame = NULL;
    }
    for (;;) {
        const char *data;
        uint32_t len;
        struct sp_err err;
        int r = sp_reader_next(&c->rd, &data, &len, &err);
        if (r < 0)
            die(1, "%s", err.msg);
        if (r > 0) {
            c->frame = malloc(len ? len : 1);
            if (!c->frame)
                die(1, "out of memory");
            memcpy(c->frame, data, len);
            msgpack_unpacked_init(&c->msg);
            if (sp_unpack(c->frame, len, &c->msg, &err) < 0)
                die(1, "bad frame from agent: %s", err.msg);
            return &c->msg.data;
        }
        struct pollfd p = {.fd = c->rfd, .events = POLLIN};
        int ms = (int)((deadline - now_s()) * 1000);
        if (ms <= 0)
            die(1, "timed out waiting for the agent (%.0f s)", c->timeout_s);
        int pr = poll(&p, 1, ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0)
            continue;
        ssize_t n = sp_reader_fill(&c->rd, c->rfd);
        if (n == 0)
            die(1, "the agent closed the connection");
        if (n < 0 && errno != EINTR && errno != EAGAIN)
            die(1, "reading from the agent: %s", strerror(errno));
    }
}

/* Wait for the final answer to id; events go to on_event. Returns the result
 * map, or exits with the error (code 1). */
typedef void (*event_fn)(struct ctl *c, const msgpack_object *ev, void *ud);

static const msgpack_object *wait_answer(struct ctl *c, uint64_t id, double timeout_s,
                                         event_fn on_event, void *ud)
{
    double deadline = now_s() + timeout_s;
    for (;;) {
        const msgpack_object *m = recv_frame(c, deadline);
        uint64_t rid = 0;
        const msgpack_object *o = sp_map_get(m, "id");
        if (o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            rid = o->via.u64;
        if (rid != id && rid != 0)
            continue;
        if (sp_map_get(m, "event")) {
            if (on_event)
                on_event(c, m, ud);
            continue;
        }
        const msgpack_object *ok = sp_map_get(m, "ok");
        if (ok && ok->type == MSGPACK_OBJECT_BOOLEAN && ok->via.boolean) {
            const msgpack_object *r = sp_map_get(m, "result");
            if (!r)
                die(1, "answer without result");
            return r;
        }
        const msgpack_object *e = sp_map_get(m, "error");
        const char *code = "internal", *msg = "";
        size_t cn = 8, mn = 0;
        struct sp_err err;
        if (e) {
            sp_get_str(e, "code", false, &code, &cn, &err);
            sp_get_str(e, "message", false, &msg, &mn, &err);
        }
        if (c->child > 0)
            close(c->wfd);
        fprintf(stderr, "agentctl: %.*s: %.*s\n", (int)cn, code, (int)mn, msg);
        exit(1);
    }
}

/* Tiny argument-map builder: pack into a scratch writer. */
struct args {
    struct sp_writer w;
    msgpack_packer pk;
};

static void args_begin(struct args *a, uint32_t n)
{
    sp_writer_init(&a->w, 0);
    sp_writer_packer(&a->w, &a->pk);
    msgpack_pack_map(&a->pk, n);
}

static const msgpack_object *call(struct ctl *c, const char *op, struct args *a)
{
    uint64_t id = send_request_packed(c, op, a ? &a->w : NULL);
    if (a)
        sp_writer_free(&a->w);
    return wait_answer(c, id, c->timeout_s, NULL, NULL);
}

/* ---- output ------------------------------------------------------------ */

static bool utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned char b = s[i];
        size_t k = b < 0x80 ? 0 : (b >> 5) == 6 ? 1 : (b >> 4) == 14 ? 2 : (b >> 3) == 30 ? 3 : 9;
        if (k == 9 || i + k >= n + (k ? 0 : 1))
            return k == 0;
        for (size_t j = 1; j <= k; j++)
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
        i += k + 1;
    }
    return true;
}

static void json_str(FILE *f, const char *s, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (ch < 0x20)
                fprintf(f, "\\u%04x", ch);
            else
                fputc(ch, f);
        }
    }
    fputc('"', f);
}

static void json_b64(FILE *f, const unsigned char *p, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    fputs("{\"base64\": \"", f);
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16 | (i + 1 < n ? (unsigned)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        fputc(tbl[v >> 18 & 63], f);
        fputc(tbl[v >> 12 & 63], f);
        fputc(i + 1 < n ? tbl[v >> 6 & 63] : '=', f);
        fputc(i + 2 < n ? tbl[v & 63] : '=', f);
    }
    fputs("\"}", f);
}

static void json_obj(FILE *f, const msgpack_object *o, int indent)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("null", f); break;
    case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%llu", (unsigned long long)o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%lld", (long long)o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: fprintf(f, "%.17g", o->via.f64); break;
    case MSGPACK_OBJECT_STR: json_str(f, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
        if (utf8_ok((const unsigned char *)o->via.bin.ptr, o->via.bin.size))
            json_str(f, o->via.bin.ptr, o->via.bin.size);
        else
            json_b64(f, (const unsigned char *)o->via.bin.ptr, o->via.bin.size);
        break;
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
            fprintf(f, "%s\n%*s", i ? "," : "", indent + 2, "");
            const msgpack_object *k = &o->via.map.ptr[i].key;
            if (k->type == MSGPACK_OBJECT_STR)
                json_str(f, k->via.str.ptr, k->via.str.size);
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

static void print_json(const msgpack_object *o)
{
    json_obj(stdout, o, 0);
    fputc('\n', stdout);
}

/* key: value lines, nested maps indented. */
static void print_kv(const msgpack_object *m, int indent)
{
    for (uint32_t i = 0; i < m->via.map.size; i++) {
        const msgpack_object *k = &m->via.map.ptr[i].key, *v = &m->via.map.ptr[i].val;
        printf("%*s%.*s:", indent, "", (int)k->via.str.size, k->via.str.ptr);
        if (v->type == MSGPACK_OBJECT_MAP) {
            fputc('\n', stdout);
            print_kv(v, indent + 2);
            continue;
        }
        fputc(' ', stdout);
        json_obj(stdout, v, indent);
        fputc('\n', stdout);
    }
}

static uint64_t get_u(const msgpack_object *m, const char *k)
{
    const msgpack_object *o = sp_map_get(m, k);
    return o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

static bool get_b(const msgpack_object *m, const char *k)
{
    const msgpack_object *o = sp_map_get(m, k);
    return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

static const char *get_s(const msgpack_object *m, const char *k, int *n)
{
    const msgpack_object *o = sp_map_get(m, k);
    if (!o || o->type != MSGPACK_OBJECT_STR) {
        *n = 1;
        return "-";
    }
    *n = (int)o->via.str.size;
    return o->via.str.ptr;
}

static void write_all_fd(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            die(1, "write: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

/* ---- commands ----------------------------------------------------------- */

static uint64_t parse_slot(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s || s[0] == '-')
        die(2, "'%s' is not a slot number", s);
    return v;
}

static void hello(struct ctl *c, bool print)
{
    char tok[512];
    size_t tn = 0;
    if (c->token_file) {
        int fd = open(c->token_file, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(1, "token file %s: %s", c->token_file, strerror(errno));
        ssize_t n = read(fd, tok, sizeof tok - 1);
        close(fd);
        if (n <= 0)
            die(1, "token file %s is empty", c->token_file);
        tn = (size_t)n;
        while (tn && (tok[tn - 1] == '\n' || tok[tn - 1] == '\r' || tok[tn - 1] == ' '))
            tn--;
    }
    struct args a;
    args_begin(&a, tn ? 2 : 1);
    sp_pack_kv_str(&a.pk, "client", "agentctl");
    if (tn)
        sp_pack_kv_strn(&a.pk, "token", tok, tn);
    memset(tok, 0, sizeof tok);
    const msgpack_object *r = call(c, "hello", &a);
    const msgpack_object *lim = sp_map_get(r, "limits");
    if (lim)
        c->max_frame = get_u(lim, "max_frame");
    if (!print)
        return;
    if (c->json)
        print_json(r);
    else
        print_kv(r, 0);
}

static void cmd_simple(struct ctl *c, const char *op)
{
    const msgpack_object *r = call(c, op, NULL);
    if (c->json)
        print_json(r);
    else
        print_kv(r, 0);
}

static void cmd_slots(struct ctl *c)
{
    const msgpack_object *r = call(c, "slots", NULL);
    if (c->json) {
        print_json(r);
        return;
    }
    const msgpack_object *arr = sp_map_get(r, "slots");
    printf("%-5s %-10s %-24s %6s %-12s %6s\n", "SLOT", "STATE", "LEASE", "QUEUED", "RUNNING",
           "EXECS");
    for (uint32_t i = 0; arr && i < arr->via.array.size; i++) {
        const msgpack_object *s = &arr->via.array.ptr[i];
        int sn, tn;
        const char *st = get_s(s, "state", &sn);
        const char *tid = get_s(s, "trajectory_id", &tn);
        const msgpack_object *run = sp_map_get(s, "running");
        char running[64] = "-";
        if (run && run->type == MSGPACK_OBJECT_ARRAY && run->via.array.size) {
            int off = 0;
            for (uint32_t j = 0; j < run->via.array.size && off < 48; j++)
                off += snprintf(running + off, sizeof running - (size_t)off, "%s%llu", j ? "," : "",
                                (unsigned long long)run->via.array.ptr[j].via.u64);
        }
        printf("%-5llu %-10.*s %-24.*s %6llu %-12s %6llu\n", (unsigned long long)get_u(s, "slot"),
               sn, st, tn > 24 ? 24 : tn, tid, (unsigned long long)get_u(s, "queued"), running,
               (unsigned long long)get_u(s, "execs"));
    }
}

struct exec_state {
    bool json;
};

static void exec_event(struct ctl *c, const msgpack_object *ev, void *ud)
{
    (void)c;
    (void)ud;
    const msgpack_object *name = sp_map_get(ev, "event");
    const msgpack_object *data = sp_map_get(ev, "data");
    if (!name || name->type != MSGPACK_OBJECT_STR || !data || data->type != MSGPACK_OBJECT_BIN)
        return;
    int fd = sp_str_eq(name->via.str.ptr, name->via.str.size, "stderr") ? 2 : 1;
    write_all_fd(fd, data->via.bin.ptr, data->via.bin.size);
}

static char *read_fd_all(int fd, size_t limit, size_t *len)
{
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        die(1, "out of memory");
    for (;;) {
        if (n == cap) {
            cap *= 2;
            if (!(buf = realloc(buf, cap)))
                die(1, "out of memory");
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die(1, "read: %s", strerror(errno));
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > limit)
            die(1, "input larger than the agent's frame limit (%zu bytes)", limit);
    }
    *len = n;
    return buf;
}

static int cmd_exec(struct ctl *c, int argc, char **argv)
{
    /* exec SLOT [opts] -- CMD... */
    if (argc < 2)
        die(2, "exec needs SLOT and a command after --");
    uint64_t slot = parse_slot(argv[1]);
    uint64_t timeout_ms = 0;
    const char *cwd = NULL, *stdin_file = NULL;
    const char *envs[256];
    int nenv = 0, i = 2;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (!strcmp(argv[i], "--timeout-ms") && i + 1 < argc)
            timeout_ms = parse_slot(argv[++i]);
        else if (!strcmp(argv[i], "--cwd") && i + 1 < argc)
            cwd = argv[++i];
        else if (!strcmp(argv[i], "--stdin-file") && i + 1 < argc)
            stdin_file = argv[++i];
        else if (!strcmp(argv[i], "-e") && i + 1 < argc && nenv < 256)
            envs[nenv++] = argv[++i];
        else
            die(2, "exec: unknown option '%s' (the command goes after --)", argv[i]);
    }
    if (i >= argc || i + 1 >= argc)
        die(2, "exec: give the command after --");
    char **cmd = argv + i + 1;
    int ncmd = argc - i - 1;
    char *stdin_buf = NULL;
    size_t stdin_len = 0;
    if (stdin_file) {
        int fd = strcmp(stdin_file, "-") == 0 ? 0 : open(stdin_file, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(1, "%s: %s", stdin_file, strerror(errno));
        stdin_buf =
            read_fd_all(fd, c->max_frame ? c->max_frame - 65536 : SP_DEFAULT_MAX_FRAME, &stdin_len);
        if (fd)
            close(fd);
    }
    struct args a;
    args_begin(&a, 3 + (timeout_ms > 0) + (cwd != NULL) + (nenv > 0) + (stdin_buf != NULL));
    sp_pack_kv_uint(&a.pk, "slot", slot);
    if (ncmd == 1) {
        sp_pack_kv_str(&a.pk, "cmd", cmd[0]);
    } else {
        sp_pack_cstr(&a.pk, "argv");
        msgpack_pack_array(&a.pk, (uint32_t)ncmd);
        for (int j = 0; j < ncmd; j++)
            sp_pack_cstr(&a.pk, cmd[j]);
    }
    sp_pack_kv_bool(&a.pk, "stream", !c->json);
    if (timeout_ms)
        sp_pack_kv_uint(&a.pk, "timeout_ms", timeout_ms);
    if (cwd)
        sp_pack_kv_str(&a.pk, "cwd", cwd);
    if (nenv) {
        sp_pack_cstr(&a.pk, "env");
        msgpack_pack_map(&a.pk, (uint32_t)nenv);
        for (int j = 0; j < nenv; j++) {
            const char *eq = strchr(envs[j], '=');
            if (!eq)
                die(2, "-e wants K=V, got '%s'", envs[j]);
            sp_pack_strn(&a.pk, envs[j], (size_t)(eq - envs[j]));
            sp_pack_cstr(&a.pk, eq + 1);
        }
    }
    if (stdin_buf)
        sp_pack_kv_bin(&a.pk, "stdin", stdin_buf, stdin_len);
    free(stdin_buf);
    uint64_t id = send_request_packed(c, "exec", &a.w);
    sp_writer_free(&a.w);
    /* The command's own timeout bounds the wait (default 10 min), plus room. */
    double wait_s = (timeout_ms ? (double)timeout_ms / 1000.0 : 600.0) + c->timeout_s;
    const msgpack_object *r = wait_answer(c, id, wait_s, exec_event, NULL);
    if (c->json) {
        print_json(r);
    }
    int code = (int)get_u(r, "exit_code");
    const msgpack_object *ec = sp_map_get(r, "exit_code");
    if (ec && ec->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        code = 1;
    if (get_b(r, "timed_out") || get_b(r, "idle_timed_out")) {
        fprintf(stderr, "agentctl: command timed out after %llu ms\n",
                (unsigned long long)get_u(r, "duration_ms"));
        return 124;
    }
    if (get_b(r, "cancelled"))
        fprintf(stderr, "agentctl: command was cancelled\n");
    return code > 255 ? 255 : code;
}

static void cmd_cat(struct ctl *c, uint64_t slot, const char *path)
{
    uint64_t offset = 0;
    for (;;) {
        struct args a;
        args_begin(&a, 4);
        sp_pack_kv_uint(&a.pk, "slot", slot);
        sp_pack_kv_str(&a.pk, "path", path);
        sp_pack_kv_uint(&a.pk, "offset", offset);
        sp_pack_kv_uint(&a.pk, "length", READ_RANGE);
        const msgpack_object *r = call(c, "read_file", &a);
        const msgpack_object *d = sp_map_get(r, "data");
        size_t n = d && d->type == MSGPACK_OBJECT_BIN ? d->via.bin.size : 0;
        if (c->json) {
            print_json(r);
        } else if (n) {
            write_all_fd(1, d->via.bin.ptr, n);
        }
        offset += n;
        if (get_b(r, "eof") || n == 0 || c->json)
            break;
    }
}

static void cmd_put(struct ctl *c, uint64_t slot, const char *path)
{
    size_t n;
    char *data = read_fd_all(0, c->max_frame ? c->max_frame - 65536 : SP_DEFAULT_MAX_FRAME, &n);
    struct args a;
    args_begin(&a, 4);
    sp_pack_kv_uint(&a.pk, "slot", slot);
    sp_pack_kv_str(&a.pk, "path", path);
    sp_pack_kv_bin(&a.pk, "data", data, n);
    sp_pack_kv_bool(&a.pk, "mkdirs", true);
    free(data);
    const msgpack_object *r = call(c, "write_file", &a);
    if (c->json) {
        print_json(r);
        return;
    }
    int pn;
    const char *p = get_s(r, "path", &pn);
    printf("wrote %.*s (%llu bytes)\n", pn, p, (unsigned long long)get_u(r, "size"));
}

static void mode_str(char out[11], const char *type, uint64_t mode)
{
    out[0] = type[0] == 'd' ? 'd' : type[0] == 's' ? 'l' : type[0] == 'f' ? '-' : '?';
    const char *rwx = "rwxrwxrwx";
    for (int i = 0; i < 9; i++)
        out[i + 1] = (mode & (1u << (8 - i))) ? rwx[i] : '-';
    out[10] = 0;
}

static void print_entry(const msgpack_object *e)
{
    int tn, pn;
    const char *type = get_s(e, "type", &tn);
    const char *path = get_s(e, "path", &pn);
    char mode[11];
    char ttype[16];
    snprintf(ttype, sizeof ttype, "%.*s", tn, type);
    mode_str(mode, ttype, get_u(e, "mode"));
    time_t t = (time_t)(get_u(e, "mtime") / 1000);
    struct tm tm;
    char when[32];
    localtime_r(&t, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M", &tm);
    printf("%s %10llu %s %.*s", mode, (unsigned long long)get_u(e, "size"), when, pn, path);
    int xn;
    const char *target = get_s(e, "target", &xn);
    if (sp_map_get(e, "target"))
        printf(" -> %.*s", xn, target);
    fputc('\n', stdout);
}

static void cmd_ls(struct ctl *c, uint64_t slot, const char *path, bool recursive)
{
    struct args a;
    args_begin(&a, 3);
    sp_pack_kv_uint(&a.pk, "slot", slot);
    sp_pack_kv_str(&a.pk, "path", path);
    sp_pack_kv_bool(&a.pk, "recursive", recursive);
    const msgpack_object *r = call(c, "list", &a);
    if (c->json) {
        print_json(r);
        return;
    }
    const msgpack_object *arr = sp_map_get(r, "entries");
    for (uint32_t i = 0; arr && i < arr->via.array.size; i++)
        print_entry(&arr->via.array.ptr[i]);
    if (get_b(r, "truncated"))
        fprintf(stderr, "agentctl: listing truncated\n");
}

static void cmd_stat(struct ctl *c, uint64_t slot, const char *path)
{
    struct args a;
    args_begin(&a, 2);
    sp_pack_kv_uint(&a.pk, "slot", slot);
    sp_pack_kv_str(&a.pk, "path", path);
    const msgpack_object *r = call(c, "stat", &a);
    if (c->json)
        print_json(r);
    else
        print_entry(r);
}

static void cmd_archive(struct ctl *c, uint64_t slot, const char *path, const char *format)
{
    if (!c->json && isatty(1))
        die(1, "refusing to write an archive to a terminal: redirect stdout to a file");
    struct args a;
    args_begin(&a, 3);
    sp_pack_kv_uint(&a.pk, "slot", slot);
    sp_pack_kv_str(&a.pk, "path", path);
    sp_pack_kv_str(&a.pk, "format", format);
    const msgpack_object *r = call(c, "archive", &a);
    if (c->json) {
        print_json(r);
        return;
    }
    const msgpack_object *d = sp_map_get(r, "data");
    if (d && d->type == MSGPACK_OBJECT_BIN)
        write_all_fd(1, d->via.bin.ptr, d->via.bin.size);
    if (isatty(2))
        fprintf(stderr, "archived %llu entries, %llu bytes (%s)\n",
                (unsigned long long)get_u(r, "entries"), (unsigned long long)get_u(r, "bytes"),
                format);
}

static void cmd_slot_op(struct ctl *c, const char *op, uint64_t slot, const char *key,
                        const char *val)
{
    struct args a;
    args_begin(&a, val ? 2 : 1);
    sp_pack_kv_uint(&a.pk, "slot", slot);
    if (val)
        sp_pack_kv_str(&a.pk, key, val);
    const msgpack_object *r = call(c, op, &a);
    if (c->json)
        print_json(r);
    else
        print_kv(r, 0);
}

static void cmd_cancel(struct ctl *c, uint64_t exec_id)
{
    struct args a;
    args_begin(&a, 1);
    sp_pack_kv_uint(&a.pk, "exec_id", exec_id);
    const msgpack_object *r = call(c, "cancel", &a);
    if (c->json)
        print_json(r);
    else
        print_kv(r, 0);
}

int main(int argc, char **argv)
{
    struct ctl ctl = {.rfd = -1, .wfd = -1, .timeout_s = DEFAULT_TIMEOUT_S};
    struct ctl *c = &ctl;
    c->agent = getenv("SLOT_AGENT");
    c->token_file = getenv("SLOT_TOKEN_FILE");
    static const struct option opts[] = {
        {"agent", required_argument, NULL, 'a'},
        {"agent-cmd", required_argument, NULL, 'c'},
        {"token-file", required_argument, NULL, 't'},
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 'T'},
        {"wait", required_argument, NULL, 'W'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int o;
    /* "+": stop at the first command word, so command options stay its own. */
    while ((o = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
        switch (o) {
        case 'a': c->agent = optarg; break;
        case 'c': c->agent_cmd = optarg; break;
        case 't': c->token_file = optarg; break;
        case 'j': c->json = true; break;
        case 'T':
            c->timeout_s = atof(optarg);
            if (c->timeout_s <= 0)
                die(2, "bad --timeout");
            break;
        case 'W': c->wait_s = atof(optarg); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    argc -= optind;
    argv += optind;
    if (argc < 1) {
        fputs(usage, stderr);
        return 2;
    }
    if (!c->agent && !c->agent_cmd) {
        fprintf(stderr, "agentctl: no agent: give --agent unix:PATH|tcp:HOST:PORT, --agent-cmd, "
                        "or set SLOT_AGENT\n");
        return 2;
    }
    const char *cmd = argv[0];
    static const char *const known[] = {"hello", "health", "stats",   "slots", "exec",
                                        "cat",   "put",    "ls",      "stat",  "archive",
                                        "reset", "lease",  "unlease", "cancel"};
    bool ok = false;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        ok |= strcmp(cmd, known[i]) == 0;
    if (!ok) {
        fprintf(stderr, "agentctl: unknown command '%s'\n%s", cmd, usage);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sp_reader_init(&c->rd, SP_DEFAULT_MAX_FRAME);
    sp_writer_init(&c->wr, 0);
    int rc = 0;
    /* Usage errors first, before connecting. */
    if ((!strcmp(cmd, "cat") || !strcmp(cmd, "put") || !strcmp(cmd, "stat") ||
         !strcmp(cmd, "lease")) &&
        argc != 3)
        die(2, "usage: agentctl %s SLOT %s", cmd, !strcmp(cmd, "lease") ? "TRAJECTORY" : "PATH");
    if ((!strcmp(cmd, "reset") || !strcmp(cmd, "unlease") || !strcmp(cmd, "cancel")) && argc != 2)
        die(2, "usage: agentctl %s %s", cmd, !strcmp(cmd, "cancel") ? "EXEC_ID" : "SLOT");
    if ((!strcmp(cmd, "ls") || !strcmp(cmd, "archive")) && argc < 2)
        die(2, "usage: agentctl %s SLOT [PATH]", cmd);
    connect_agent(c);
    hello(c, !strcmp(cmd, "hello"));
    if (!strcmp(cmd, "hello")) {
    } else if (!strcmp(cmd, "health") || !strcmp(cmd, "stats")) {
        cmd_simple(c, cmd);
    } else if (!strcmp(cmd, "slots")) {
        cmd_slots(c);
    } else if (!strcmp(cmd, "exec")) {
        rc = cmd_exec(c, argc, argv);
    } else if (!strcmp(cmd, "cat")) {
        cmd_cat(c, parse_slot(argv[1]), argv[2]);
    } else if (!strcmp(cmd, "put")) {
        cmd_put(c, parse_slot(argv[1]), argv[2]);
    } else if (!strcmp(cmd, "ls")) {
        const char *path = ".";
        bool rec = false;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "-R"))
                rec = true;
            else
                path = argv[i];
        }
        cmd_ls(c, parse_slot(argv[1]), path, rec);
    } else if (!strcmp(cmd, "stat")) {
        cmd_stat(c, parse_slot(argv[1]), argv[2]);
    } else if (!strcmp(cmd, "archive")) {
        const char *path = ".", *format = "tar.gz";
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--format") && i + 1 < argc)
                format = argv[++i];
            else
                path = argv[i];
        }
        cmd_archive(c, parse_slot(argv[1]), path, format);
    } else if (!strcmp(cmd, "reset")) {
        cmd_slot_op(c, "reset", parse_slot(argv[1]), NULL, NULL);
    } else if (!strcmp(cmd, "lease")) {
        cmd_slot_op(c, "lease", parse_slot(argv[1]), "trajectory_id", argv[2]);
    } else if (!strcmp(cmd, "unlease")) {
        cmd_slot_op(c, "unlease", parse_slot(argv[1]), NULL, NULL);
    } else if (!strcmp(cmd, "cancel")) {
        cmd_cancel(c, parse_slot(argv[1]));
    }
    fflush(stdout);
    if (c->frame) {
        msgpack_unpacked_destroy(&c->msg);
        free(c->frame);
    }
    disconnect(c);
    sp_reader_free(&c->rd);
    sp_writer_free(&c->wr);
    return rc;
}
