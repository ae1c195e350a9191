/* Ops exec, exec_attach and cancel: turn validated arguments into a command
 * (argv, clean environment, cwd, stdin), and wire requests to commands. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "exec.h"
#include "quota.h"
#include "template.h"

#define DEFAULT_TIMEOUT_MS 600000u
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* A bump arena for one spawn's argv and envp: freed right after clone
 * returns (CLONE_VFORK means the child has exec'd by then). */
struct arena {
    char *buf;
    size_t len, cap;
};

static char *arena_strndup(struct arena *a, const char *s, size_t n)
{
    if (a->len + n + 1 > a->cap)
        return NULL;
    char *p = a->buf + a->len;
    memcpy(p, s, n);
    p[n] = 0;
    a->len += n + 1;
    return p;
}

static char *arena_printf(struct arena *a, const char *fmt, const char *k, const char *v)
{
    int n = snprintf(a->buf + a->len, a->cap - a->len, fmt, k, v);
    if (n < 0 || a->len + (size_t)n + 1 > a->cap)
        return NULL;
    char *p = a->buf + a->len;
    a->len += (size_t)n + 1;
    return p;
}

/* Does the request's env map (nenv pairs, keys checked to be strings) set
 * this name? */
static bool env_lookup(const msgpack_object *env_o, uint32_t nenv, const char *k, size_t kl)
{
    for (uint32_t j = 0; j < nenv; j++) {
        const msgpack_object *key = &env_o->via.map.ptr[j].key;
        if (key->via.str.size == kl && !memcmp(key->via.str.ptr, k, kl))
            return true;
    }
    return false;
}

static bool pass_lookup(const struct agent *ag, const char *k, size_t kl)
{
    for (unsigned i = 0; i < ag->npass_env; i++)
        if (!strncmp(ag->pass_env[i], k, kl) && ag->pass_env[i][kl] == '=')
            return true;
    return false;
}

static bool has_nul(const char *s, size_t n)
{
    return memchr(s, 0, n) != NULL;
}

/* Search PATH for name like execvp, but in the agent before spawning, so a
 * missing program is a clear not_found instead of exit 127. */
static int resolve_program(const char *name, const char *path_env, int cwd_fd, char *out,
                           size_t outcap, struct sp_err *err)
{
    if (strchr(name, '/')) {
        if (faccessat(name[0] == '/' ? AT_FDCWD : cwd_fd, name, X_OK, 0) < 0)
            return sp_errf(err, SP_NOT_FOUND, "cannot execute %s: %s", name, strerror(errno));
        if ((size_t)snprintf(out, outcap, "%s", name) >= outcap)
            return sp_errf(err, SP_BAD_REQUEST, "program path too long");
        return 0;
    }
    const char *p = path_env;
    while (*p) {
        const char *colon = strchr(p, ':');
        size_t dl = colon ? (size_t)(colon - p) : strlen(p);
        if (dl > 0 && p[0] == '/' &&
            (size_t)snprintf(out, outcap, "%.*s/%s", (int)dl, p, name) < outcap &&
            access(out, X_OK) == 0)
            return 0;
        if (!colon)
            break;
        p = colon + 1;
    }
    return sp_errf(err, SP_NOT_FOUND, "%s: command not found in PATH", name);
}

/* A data dir under /tmp would vanish beneath the private /tmp: then /tmp
 * stays shared and only TMPDIR is private. */
static bool box_binds_tmp(const struct agent *ag)
{
    return strncmp(ag->data_dir, "/tmp/", 5) != 0;
}

int exec_cwd(struct agent *ag, struct slot *s, const struct iso_child *ic, const char *rel,
             char *out, size_t cap, struct sp_err *err)
{
    bool boxed = (ic->want & (1u << RUNG_NAMESPACES)) && ag->iso.ns_workspace;
    size_t n = (size_t)snprintf(out, cap, "%s", boxed ? BOX_WORKSPACE : s->ws_path);
    /* "." components and doubled slashes dropped: this is also PWD, which
     * shells take as it is only when it is clean. */
    for (const char *c = rel ? rel : ""; *c;) {
        size_t cl = strcspn(c, "/");
        if (cl && !(cl == 1 && c[0] == '.'))
            n += (size_t)snprintf(out + (n < cap ? n : cap), n < cap ? cap - n : 0, "/%.*s",
                                  (int)cl, c);
        c += cl + (c[cl] == '/');
    }
    if (n >= cap)
        return sp_errf(err, SP_BAD_REQUEST, "args.cwd: path too long");
    return 0;
}

/* Which rungs this command gets, with what: fails closed when isolation is
 * required and a required rung is missing. */
int exec_isolation(struct req *rq, struct slot *s, bool network, struct iso_child *ic,
                   struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct isolation *iso = &ag->iso;
    unsigned have = iso->available;
    if ((have & (1u << RUNG_NAMESPACES)) && s->box[!network].pid <= 0 && s->ll_fd[!network] >= 0) {
        /* The box about to start adds its own root to this ruleset (see
         * landlock_allow_read): a fresh one keeps the roots of boxes gone
         * with earlier resets from piling up in it. */
        close(s->ll_fd[!network]);
        s->ll_fd[!network] = -1;
    }
    if ((have & (1u << RUNG_LANDLOCK)) && s->ll_fd[!network] < 0) {
        struct sp_err lerr;
        /* An overlay workspace is not the host path's directory: name it
         * by the descriptor (its inode is what the rule holds). */
        char ws[64];
        if (s->ws_mode == WS_OVERLAY)
            snprintf(ws, sizeof ws, "/proc/self/fd/%d", s->ws_fd);
        s->ll_fd[!network] =
            landlock_ruleset(iso->landlock_abi, s->ws_mode == WS_OVERLAY ? ws : s->ws_path,
                             s->tmp_path, network, NULL, &lerr);
        if (s->ll_fd[!network] < 0) {
            log_warn("slot %u: %s", s->index, lerr.msg);
            if (ic->required)
                return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "%s", lerr.msg);
        }
    }
    if (s->ll_fd[!network] < 0)
        have &= ~(1u << RUNG_LANDLOCK);
    if ((have & (1u << RUNG_NAMESPACES)) && s->box[!network].pid <= 0) {
        struct sp_err berr;
        char slot_dir[4200];
        snprintf(slot_dir, sizeof slot_dir, "%s/slots/%u", ag->data_dir, s->index);
        char hide[2][4200];
        templates_hidden(ag, hide);
        bool ovl = s->ws_mode == WS_OVERLAY;
        struct box_conf bc = {
            .ws_mnt_fd = ovl ? s->ws_ns.mnt_fd : -1,
            .ws_user_fd = ovl ? s->ws_ns.user_fd : -1,
            .hide = {hide[0], hide[1]},
            .shares = (const char *const *)ag->opt.shares,
            .nshares = ag->opt.nshares,
            .tmp_path = box_binds_tmp(ag) ? s->tmp_path : NULL,
            .ws_path = iso->ns_workspace ? s->ws_path : NULL,
            .slot_dir = slot_dir,
            .network = network,
            .uid = (have & (1u << RUNG_UID)) ? s->uid : 0,
            .index = s->index,
            .home = iso->ns_workspace ? BOX_WORKSPACE : s->ws_path,
            .cg_fd = (have & (1u << RUNG_CGROUP)) ? s->cg_fd : NULL,
            .secret = ag->token,
            .secret_len = sizeof ag->token,
            .cold = true,
        };
        if (ns_box_start(iso, &bc, &s->box[!network], &berr) < 0) {
            log_warn("slot %u: %s", s->index, berr.msg);
            have &= ~(1u << RUNG_NAMESPACES);
            s->box_failed = true; /* `slots` says where its commands really run */
        } else {
            s->box_failed = false;
            slots_box_watch(ag, s, !network);
        }
    }
    if (s->ws_mode == WS_OVERLAY && !(have & (1u << RUNG_NAMESPACES)))
        /* The overlay exists only inside the box: outside, the workspace
         * would be the empty directory beneath it. */
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE,
                       "slot %u stands on template '%s' as an overlay, which only its box "
                       "shows, and the box did not start (see the agent's log)",
                       s->index, s->tpl->anon ? "(fork)" : s->tpl->name);
    ic->uid = s->uid;
    ic->cg_fd[0] = s->cg_fd[0];
    ic->cg_fd[1] = s->cg_fd[1];
    if (s->cg_fd[0] < 0)
        have &= ~(1u << RUNG_CGROUP);
    unsigned missing = RUNGS_REQUIRED & ~have;
    if (ic->required && missing) {
        char names[128] = "";
        for (int r = 0; r < RUNG_COUNT; r++)
            if (missing & (1u << r))
                snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s (%s)",
                         names[0] ? ", " : "", rung_names[r], iso->why[r]);
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "isolation required, missing: %s", names);
    }
    ic->want = have;
    ic->landlock_fd = s->ll_fd[!network];
    ic->seccomp = (have & (1u << RUNG_SECCOMP)) ? &iso->seccomp[!network] : NULL;
    ic->seccomp_index = !network;
    const msgpack_object *lim = req_arg(rq, "rlimits");
    for (int i = 0; i < LIM_COUNT; i++) {
        rlim_t v = iso->lim_max[i];
        const msgpack_object *o = lim ? sp_map_get(lim, lim_names[i]) : NULL;
        if (o) {
            if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return sp_errf(err, SP_BAD_REQUEST, "args.rlimits.%s: expected unsigned integer",
                               lim_names[i]);
            if (v != RLIM_INFINITY && o->via.u64 > v)
                return sp_errf(err, SP_BAD_REQUEST,
                               "args.rlimits.%s: %llu is over the agent's maximum %llu",
                               lim_names[i], (unsigned long long)o->via.u64, (unsigned long long)v);
            v = (rlim_t)o->via.u64;
        }
        ic->lim[i].rlim_cur = ic->lim[i].rlim_max = v;
    }
    /* One file cannot outgrow the slot's disk budget (nor be written while it is over). */
    rlim_t left = quota_fsize(ag, s);
    if (ic->lim[LIM_FSIZE].rlim_cur == RLIM_INFINITY || ic->lim[LIM_FSIZE].rlim_cur > left)
        ic->lim[LIM_FSIZE].rlim_cur = ic->lim[LIM_FSIZE].rlim_max = left;
    if (lim)
        for (uint32_t i = 0; i < lim->via.map.size; i++) {
            const msgpack_object *k = &lim->via.map.ptr[i].key;
            bool known = false;
            for (int j = 0; j < LIM_COUNT && k->type == MSGPACK_OBJECT_STR; j++)
                known |= sp_str_eq(k->via.str.ptr, k->via.str.size, lim_names[j]);
            if (!known)
                return sp_errf(err, SP_BAD_REQUEST,
                               "args.rlimits: unknown limit (cpu, as, nproc, fsize, nofile)");
        }
    return 0;
}

/* Check args.env (str -> str, names non-empty without '=' or NUL, values
 * without NUL) and add the bytes the environment needs to *need. */
static int check_env(const struct agent *ag, const msgpack_object *env_o, size_t *need,
                     struct sp_err *err)
{
    uint32_t nenv = env_o ? env_o->via.map.size : 0;
    for (uint32_t i = 0; i < nenv; i++) {
        const msgpack_object *k = &env_o->via.map.ptr[i].key, *v = &env_o->via.map.ptr[i].val;
        if (k->type != MSGPACK_OBJECT_STR || v->type != MSGPACK_OBJECT_STR)
            return sp_errf(err, SP_BAD_REQUEST, "args.env: keys and values must be str");
        if (k->via.str.size == 0 || memchr(k->via.str.ptr, '=', k->via.str.size) ||
            has_nul(k->via.str.ptr, k->via.str.size) || has_nul(v->via.str.ptr, v->via.str.size))
            return sp_errf(err, SP_BAD_REQUEST,
                           "args.env: names must be non-empty without '=' or NUL, values "
                           "without NUL");
        *need += k->via.str.size + v->via.str.size + 2;
    }
    for (unsigned i = 0; i < ag->npass_env; i++)
        *need += strlen(ag->pass_env[i]) + 1;
    return 0;
}

/* The clean environment of a command of s into envp (room for the defaults,
 * --pass-env and args.env plus a NULL), strings from a: the request's
 * variables override the defaults. Returns the PATH to search programs in,
 * or NULL when a is too small. */
static const char *build_env(struct agent *ag, struct slot *s, const msgpack_object *env_o,
                             const char *term, const struct iso_child *ic, const char *cwd,
                             struct arena *a, char **envp)
{
    uint32_t nenv = env_o ? env_o->via.map.size : 0;
    unsigned ne = 0;
    char slot_idx[16];
    snprintf(slot_idx, sizeof slot_idx, "%u", s->index);
    /* Paths as the command sees them: in a box that shows the workspace at
     * /workspace, no host path (naming the agent) reaches it. */
    bool boxed = (ic->want & (1u << RUNG_NAMESPACES)) != 0;
    const char *ws = boxed && ag->iso.ns_workspace ? BOX_WORKSPACE : s->ws_path;
    const char *defaults[][2] = {
        {"PATH", DEFAULT_PATH},
        {"HOME", ws},
        {"TMPDIR", boxed && box_binds_tmp(ag) ? "/tmp" : s->tmp_path},
        {"LANG", "C.UTF-8"},
        {"TERM", term},
        {"SLOT_INDEX", slot_idx},
        {"SLOT_WORKSPACE", ws},
        {"PWD", cwd},
    };
    const char *path_env = DEFAULT_PATH;
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++) {
        bool overridden = env_lookup(env_o, nenv, defaults[i][0], strlen(defaults[i][0])) ||
                          pass_lookup(ag, defaults[i][0], strlen(defaults[i][0]));
        if (!overridden && !(envp[ne++] = arena_printf(a, "%s=%s", defaults[i][0], defaults[i][1])))
            return NULL;
    }
    /* --pass-env: between the defaults and the request's env. */
    for (unsigned i = 0; i < ag->npass_env; i++) {
        const char *kv = ag->pass_env[i];
        size_t kl = (size_t)(strchr(kv, '=') - kv);
        if (env_lookup(env_o, nenv, kv, kl))
            continue;
        envp[ne++] = (char *)kv;
        if (kl == 4 && !memcmp(kv, "PATH", 4))
            path_env = kv + 5;
    }
    for (uint32_t j = 0; j < nenv; j++) {
        const msgpack_object *k = &env_o->via.map.ptr[j].key, *v = &env_o->via.map.ptr[j].val;
        char *kv = arena_strndup(a, k->via.str.ptr, k->via.str.size + 1 + v->via.str.size);
        if (!kv)
            return NULL;
        kv[k->via.str.size] = '=';
        memcpy(kv + k->via.str.size + 1, v->via.str.ptr, v->via.str.size);
        kv[k->via.str.size + 1 + v->via.str.size] = 0;
        envp[ne++] = kv;
        if (sp_str_eq(k->via.str.ptr, k->via.str.size, "PATH"))
            path_env = kv + 5;
    }
    envp[ne] = NULL;
    return path_env;
}

char **exec_env(struct agent *ag, struct slot *s, const msgpack_object *env_o, const char *term,
                const struct iso_child *ic, const char *cwd, struct sp_err *err)
{
    size_t need = 1024 + strlen(s->ws_path) * 2 + strlen(s->tmp_path) + strlen(term) + strlen(cwd);
    if (check_env(ag, env_o, &need, err) < 0)
        return NULL;
    size_t nptr = (env_o ? env_o->via.map.size : 0) + ag->npass_env + 9 + 1;
    /* The pointer array comes first, the strings after it: one free(). */
    struct arena a = {0};
    char *block = malloc(nptr * sizeof(char *) + need);
    if (!block) {
        sp_errf(err, SP_INTERNAL, "out of memory");
        return NULL;
    }
    char **envp = (char **)block;
    a.buf = block + nptr * sizeof(char *);
    a.cap = need;
    if (!build_env(ag, s, env_o, term, ic, cwd, &a, envp)) {
        free(block);
        sp_errf(err, SP_INTERNAL, "out of memory building the environment");
        return NULL;
    }
    return envp;
}

int op_exec(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    struct slot *s = req_slot(rq);
    const msgpack_object *argv_o = req_arg(rq, "argv");
    const msgpack_object *env_o = req_arg(rq, "env");
    size_t cmd_len, cwd_len, iso_len, stdin_len;
    const char *cmd = arg_str(rq, "cmd", &cmd_len);
    const char *cwd = arg_str(rq, "cwd", &cwd_len);
    const char *iso = arg_str(rq, "isolation", &iso_len);
    const char *stdin_data = arg_bin(rq, "stdin", &stdin_len);
    int cwd_fd = -1, rc = -1;
    struct arena a = {0};

    if (!!cmd == !!argv_o)
        return sp_errf(err, SP_BAD_REQUEST, "exec: give exactly one of 'cmd' or 'argv'");
    if (cmd && has_nul(cmd, cmd_len))
        return sp_errf(err, SP_BAD_REQUEST, "args.cmd: contains a NUL byte");
    if (argv_o && argv_o->via.array.size == 0)
        return sp_errf(err, SP_BAD_REQUEST, "args.argv: must not be empty");
    if (iso && !sp_str_eq(iso, iso_len, "best_effort") && !sp_str_eq(iso, iso_len, "required"))
        return sp_errf(err, SP_BAD_REQUEST,
                       "args.isolation: expected \"best_effort\" or \"required\"");
    bool required = iso ? sp_str_eq(iso, iso_len, "required") : ag->opt.isolation_required;
    bool network = arg_bool(rq, "network", true);
    struct iso_child ic = {.required = required, .landlock_fd = -1, .failed_rung = -1};
    if (exec_isolation(rq, s, network, &ic, err) < 0)
        return -1;

    /* The arena holds every string of argv and envp: the request's strings
     * plus the fixed variables. */
    char cwd_path[8200];
    size_t need = 1024 + cmd_len + strlen(s->ws_path) * 2 + strlen(s->tmp_path) + sizeof cwd_path;
    uint32_t nargv = argv_o ? argv_o->via.array.size : 3;
    uint32_t nenv = env_o ? env_o->via.map.size : 0;
    if (argv_o)
        for (uint32_t i = 0; i < nargv; i++) {
            const msgpack_object *v = &argv_o->via.array.ptr[i];
            if (v->type != MSGPACK_OBJECT_STR)
                return sp_errf(err, SP_BAD_REQUEST, "args.argv[%u]: expected str, got %s", i,
                               sp_type_name(v));
            if (has_nul(v->via.str.ptr, v->via.str.size))
                return sp_errf(err, SP_BAD_REQUEST, "args.argv[%u]: contains a NUL byte", i);
            need += v->via.str.size + 1;
        }
    if (check_env(ag, env_o, &need, err) < 0)
        return -1;
    size_t nptr = (nargv + 1) + (nenv + ag->npass_env + 9 + 1);
    /* argv/envp pointer arrays follow the strings: keep them aligned. */
    a.cap = (need + 64 + sizeof(char *) - 1) & ~(sizeof(char *) - 1);
    a.buf = malloc(a.cap + nptr * sizeof(char *));
    if (!a.buf)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    char **argv = (char **)(a.buf + a.cap);
    char **envp = argv + nargv + 1;

    char rel[4096] = "";
    if (cwd) {
        if (path_check(cwd, cwd_len, true, rel, sizeof rel, err) < 0)
            goto out;
        cwd_fd = path_open(s->ws_fd, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0, err);
        if (cwd_fd < 0)
            goto out;
    }
    if (exec_cwd(ag, s, &ic, rel, cwd_path, sizeof cwd_path, err) < 0)
        goto out;

    const char *path_env = build_env(ag, s, env_o, "dumb", &ic, cwd_path, &a, envp);
    if (!path_env)
        goto oom;

    char prog[4096];
    if (cmd) {
        snprintf(prog, sizeof prog, "%s", ag->shell);
        argv[0] = (char *)ag->shell;
        argv[1] = (char *)"-c";
        if (!(argv[2] = arena_strndup(&a, cmd, cmd_len)))
            goto oom;
        argv[3] = NULL;
    } else {
        for (uint32_t i = 0; i < nargv; i++)
            if (!(argv[i] = arena_strndup(&a, argv_o->via.array.ptr[i].via.str.ptr,
                                          argv_o->via.array.ptr[i].via.str.size)))
                goto oom;
        argv[nargv] = NULL;
        if (argv[0][0] == 0) {
            sp_errf(err, SP_BAD_REQUEST, "args.argv[0]: empty program name");
            goto out;
        }
        if (resolve_program(argv[0], path_env, cwd_fd >= 0 ? cwd_fd : s->ws_fd, prog, sizeof prog,
                            err) < 0)
            goto out;
    }

    uint64_t timeout_ms = arg_uint(rq, "timeout_ms", 0);
    uint64_t max_output = arg_uint(rq, "max_output", ag->opt.max_output);
    if (max_output > ag->opt.max_output) {
        sp_errf(err, SP_BAD_REQUEST, "args.max_output: %llu is above the agent's maximum %llu",
                (unsigned long long)max_output, (unsigned long long)ag->opt.max_output);
        goto out;
    }
    struct exec_params p = {
        .path = prog,
        .argv = argv,
        .envp = envp,
        .cwd_fd = cwd_fd >= 0 ? cwd_fd : s->ws_fd,
        .cwd_path = cwd_path,
        .stdin_data = stdin_data,
        .stdin_len = stdin_len,
        .timeout_ms = timeout_ms ? timeout_ms : DEFAULT_TIMEOUT_MS,
        .idle_timeout_ms = arg_uint(rq, "idle_timeout_ms", 0),
        .max_output = max_output,
        .detach = arg_bool(rq, "detach", false),
        .network = network,
        .keep_background = arg_bool(rq, "keep_background", false),
        .iso = &ic,
        .box = (ic.want & (1u << RUNG_NAMESPACES)) ? &s->box[!network] : NULL,
        .cmd = cmd ? argv[2] : NULL,
    };
    bool wait = false;
    /* Template builds (which come here too) keep the cold path: their
     * request's end is the build's, not an exec's. */
    if (cmd && !ag->warm.bypass && rq->op->fn == op_exec)
        p.warm = warm_pick(ag, s, network, &ic, cmd_len, &wait);
    if (wait && warm_wait(ag, s, network, rq)) {
        rc = OP_PENDING; /* runs again when the slot's warm shell is ready */
        goto out;
    }
    rq->stream = arg_bool(rq, "stream", false) && !p.detach;
    struct exec *e = exec_start(ag, s, rq, &p, err);
    if (!e)
        goto out;
    /* Through a box, the pid comes later: announced from the holder's answer. */
    rc = e->spawning ? OP_PENDING : exec_announce(rq, e);
    goto out;
oom:
    sp_errf(err, SP_INTERNAL, "out of memory building the command");
out:
    if (cwd_fd >= 0)
        close(cwd_fd);
    free(a.buf);
    return rc;
}

void exec_reply_detached(struct req *rq, uint64_t exec_id, pid_t pid)
{
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "exec_id", exec_id);
    sp_pack_kv_int(pk, "pid", pid);
    sp_pack_kv_bool(pk, "detached", true);
    req_reply_end(rq);
}

int exec_announce(struct req *rq, struct exec *e)
{
    if (e->detached) {
        exec_reply_detached(rq, e->id, e->pid);
        return OP_DONE;
    }
    if (rq->stream) {
        msgpack_packer *pk = req_event_begin(rq, "started", 2);
        sp_pack_kv_uint(pk, "exec_id", e->id);
        sp_pack_kv_int(pk, "pid", e->pid);
        req_event_end(rq);
    }
    return OP_PENDING;
}

int op_exec_attach(struct req *rq, struct sp_err *err)
{
    uint64_t id = arg_uint(rq, "exec_id", 0);
    struct exec *e = exec_find(rq->ag, id);
    if (!e)
        return sp_errf(err, SP_NOT_FOUND, "exec %llu is unknown or its result has expired",
                       (unsigned long long)id);
    rq->stream = true;
    rq->out_off = arg_uint(rq, "offset", 0);
    rq->err_off = arg_uint(rq, "stderr_offset", 0);
    exec_replay(e, rq);
    if (e->finished) {
        exec_pack_result(req_reply_begin(rq), e, false);
        req_reply_end(rq);
        return OP_DONE;
    }
    exec_add_attach(e, rq);
    return OP_PENDING;
}

int op_cancel(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    const msgpack_object *id_o = req_arg(rq, "exec_id");
    const msgpack_object *slot_o = req_arg(rq, "slot");
    if (!!id_o == !!slot_o)
        return sp_errf(err, SP_BAD_REQUEST, "cancel: give exactly one of 'exec_id' or 'slot'");
    unsigned n = 0;
    if (id_o) {
        struct exec *e = exec_find(ag, id_o->via.u64);
        if (!e)
            return sp_errf(err, SP_NOT_FOUND, "exec %llu is unknown or its result has expired",
                           (unsigned long long)id_o->via.u64);
        if (!e->exited) {
            e->cancelled = true;
            exec_kill(e);
            n = 1;
        }
    } else {
        if (slot_o->via.u64 >= ag->nslots)
            return sp_errf(err, SP_UNKNOWN_SLOT, "slot %llu does not exist (slots 0..%u)",
                           (unsigned long long)slot_o->via.u64, ag->nslots - 1);
        for (struct exec *e = ag->running; e; e = e->next) {
            if (e->slot->index != slot_o->via.u64 || e->exited)
                continue;
            e->cancelled = true;
            exec_kill(e);
            n++;
        }
    }
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 1);
    sp_pack_kv_uint(pk, "cancelled", n);
    req_reply_end(rq);
    return OP_DONE;
}
