/* Templates: named, read-only layers under DATA/templates/NAME (layer/ and a
 * meta file), each optionally over a base template; and slot workspaces made
 * from them.
 *
 * A slot stands on a template in one of two modes. Overlay: the workspace
 * is an overlayfs of the template's layers (top first) and an upper layer
 * of the slot's own under DATA/overlay/N/GEN, mounted in a namespace of its
 * own (isolate/overlay.c) that the slot's boxes copy; O(1) in the
 * template's size. Copy: the layers are laid out into the plain workspace
 * (tree.c, sharing blocks where the filesystem can). Overlay needs a box
 * (commands must see the mount) and a kernel that mounts overlayfs for the
 * agent; everything else is copy.
 *
 * Templates are owned by the agent on disk. With a user per slot the lower
 * layers are idmapped to the slot's user; in copy mode the copy is chowned.
 * Every GEN directory is used for one mount only, so a dying process of an
 * earlier mount can never write into a later workspace. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "quota.h"
#include "template.h"
#include "tree.h"

const char *const ws_mode_names[3] = {"plain", "overlay", "copy"};

static void probe_overlay(struct agent *ag);

/* snprintf for paths: a path too long for its buffer comes out cut, and
 * then names nothing that exists (every use opens or creates it). */
static void __attribute__((format(printf, 3, 4))) pathf(char *out, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, cap, fmt, ap);
    va_end(ap);
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* Template files belong to the agent: to root when it is root (idmapped to
 * each slot's user), else to the agent's own user (the process default). */
static uid_t tpl_owner(void)
{
    return geteuid() == 0 ? 0 : (uid_t)-1;
}

static bool slot_uid_on(const struct agent *ag)
{
    return (ag->iso.available & (1u << RUNG_UID)) != 0;
}

static int dir_fd(const char *path, bool create, struct sp_err *err)
{
    if (create && mkdir(path, 0700) < 0 && errno != EEXIST)
        return sp_errf(err, SP_INTERNAL, "cannot create %.300s: %s", path, strerror(errno));
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return sp_errf(err, SP_INTERNAL, "cannot open %.300s: %s", path, strerror(errno));
    return fd;
}

static int remove_path(const char *path)
{
    char parent[4200];
    pathf(parent, sizeof parent, "%s", path);
    char *slash = strrchr(parent, '/');
    if (!slash)
        return -1;
    *slash = 0;
    int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (pfd < 0)
        return -1;
    struct sp_err e;
    int rc = tree_remove(pfd, slash + 1, &e);
    if (rc < 0)
        log_warn("removing %s: %s", path, e.msg);
    close(pfd);
    return rc;
}

int template_name_check(const char *name, size_t n, char *out, struct sp_err *err)
{
    if (n == 0 || n > TEMPLATE_NAME_MAX || name[0] == '.')
        return sp_errf(err, SP_BAD_REQUEST,
                       "template name must be 1..%d characters, not starting with '.'",
                       TEMPLATE_NAME_MAX);
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return sp_errf(err, SP_BAD_REQUEST,
                           "template name '%.*s': only letters, digits, '.', '_' and '-'",
                           (int)(n > 200 ? 200 : n), name);
    }
    memcpy(out, name, n);
    out[n] = 0;
    return 0;
}

struct template *template_find(struct agent *ag, const char *name)
{
    for (struct template *t = ag->templates; t; t = t->next)
        if (!strcmp(t->name, name))
            return t;
    return NULL;
}

int template_arg(struct req *rq, const char *key, struct template **out, struct sp_err *err)
{
    *out = NULL;
    size_t n;
    const char *v = arg_str(rq, key, &n);
    if (!v)
        return 0;
    char name[TEMPLATE_NAME_MAX + 1];
    if (template_name_check(v, n, name, err) < 0)
        return -1;
    if (!(*out = template_find(rq->ag, name)))
        return sp_errf(err, SP_NOT_FOUND, "template '%s' does not exist", name);
    return 0;
}

static void tpl_path(const struct agent *ag, const struct template *t, const char *sub, char *out,
                     size_t cap)
{
    pathf(out, cap, "%s/templates/%s%s%s", ag->data_dir, t->name, sub ? "/" : "", sub ? sub : "");
}

static void tpl_unlink(struct agent *ag, struct template *t)
{
    for (struct template **pp = &ag->templates; *pp; pp = &(*pp)->next)
        if (*pp == t) {
            *pp = t->next;
            return;
        }
}

static void tpl_free(struct template *t)
{
    free(t->name);
    free(t);
}

void template_ref(struct template *t)
{
    if (t)
        t->slots++;
}

/* An anonymous template nothing stands on any more goes, and with it its
 * hold on its base. */
static void tpl_release(struct agent *ag, struct template *t)
{
    while (t && t->anon && t->slots == 0 && t->children == 0) {
        struct template *base = t->base;
        char path[4200];
        tpl_path(ag, t, NULL, path, sizeof path);
        remove_path(path);
        tpl_unlink(ag, t);
        tpl_free(t);
        if (base)
            base->children--;
        t = base;
    }
}

void template_unref(struct agent *ag, struct template *t)
{
    if (!t)
        return;
    if (t->slots)
        t->slots--;
    tpl_release(ag, t);
}

/* ---- meta files --------------------------------------------------------- */

static int meta_write(struct agent *ag, const char *dir, const struct template *t)
{
    char path[4200], tmp[4300];
    pathf(path, sizeof path, "%s/meta", dir);
    pathf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "we");
    if (!f)
        return -1;
    fprintf(f, "base=%s\ncreated=%.3f\nbuild_ms=%llu\nfiles=%llu\ndisk_bytes=%llu\nanon=%d\n",
            t->base ? t->base->name : "", t->created, (unsigned long long)t->build_ms,
            (unsigned long long)t->files, (unsigned long long)t->disk_bytes, t->anon);
    int rc = fflush(f) == 0 && fsync(fileno(f)) == 0 ? 0 : -1;
    if (fclose(f) != 0)
        rc = -1;
    if (rc == 0)
        rc = rename(tmp, path);
    (void)ag;
    return rc;
}

static struct template *meta_read(const char *dir, const char *name, char *base, size_t bcap)
{
    char path[4200], line[512];
    pathf(path, sizeof path, "%s/meta", dir);
    FILE *f = fopen(path, "re");
    if (!f)
        return NULL;
    struct template *t = calloc(1, sizeof *t);
    if (!t || !(t->name = strdup(name))) {
        free(t);
        fclose(f);
        return NULL;
    }
    base[0] = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq)
            continue;
        *eq++ = 0;
        if (!strcmp(line, "base"))
            pathf(base, bcap, "%s", eq);
        else if (!strcmp(line, "created"))
            t->created = strtod(eq, NULL);
        else if (!strcmp(line, "build_ms"))
            t->build_ms = strtoull(eq, NULL, 10);
        else if (!strcmp(line, "files"))
            t->files = strtoull(eq, NULL, 10);
        else if (!strcmp(line, "disk_bytes"))
            t->disk_bytes = strtoull(eq, NULL, 10);
        else if (!strcmp(line, "anon"))
            t->anon = atoi(eq) != 0;
    }
    fclose(f);
    t->last_used = t->created;
    return t;
}

/* ---- staging and committing -------------------------------------------- */

int template_stage(struct agent *ag, char *dir, size_t cap, int *layer_fd, struct sp_err *err)
{
    pathf(dir, cap, "%s/templates/.stage-%llx-%llu", ag->data_dir, (unsigned long long)ag->instance,
          (unsigned long long)++ag->tpl_seq);
    char layer[4300];
    pathf(layer, sizeof layer, "%s/layer", dir);
    if (mkdir(dir, 0700) < 0 || mkdir(layer, 0755) < 0)
        return sp_errf(err, SP_INTERNAL, "cannot create %.300s: %s", layer, strerror(errno));
    if ((*layer_fd = dir_fd(layer, false, err)) < 0) {
        remove_path(dir);
        return -1;
    }
    return 0;
}

void template_abort(struct agent *ag, const char *stage_dir)
{
    (void)ag;
    remove_path(stage_dir);
}

static struct template *tpl_register(struct agent *ag, const char *name, struct template *base,
                                     bool anon)
{
    struct template *t = calloc(1, sizeof *t);
    if (!t || !(t->name = strdup(name))) {
        free(t);
        return NULL;
    }
    t->base = base;
    t->depth = base ? base->depth + 1 : 1;
    t->anon = anon;
    t->created = t->last_used = wall_now();
    if (base)
        base->children++;
    t->next = ag->templates;
    ag->templates = t;
    return t;
}

/* On failure the staging dir is removed, unless keep (its layer is a
 * slot's workspace that goes back). */
static int commit_(struct agent *ag, const char *stage_dir, const char *name, bool anon,
                   struct template *base, uint64_t build_ms, bool keep, struct template **out,
                   struct sp_err *err)
{
    if (template_find(ag, name)) {
        if (!keep)
            template_abort(ag, stage_dir);
        return sp_errf(err, SP_EXISTS, "template '%s' already exists", name);
    }
    char layer[4300], final[4200];
    pathf(layer, sizeof layer, "%s/layer", stage_dir);
    pathf(final, sizeof final, "%s/templates/%s", ag->data_dir, name);
    struct template *t = tpl_register(ag, name, base, anon);
    if (!t) {
        if (!keep)
            template_abort(ag, stage_dir);
        return sp_errf(err, SP_INTERNAL, "out of memory");
    }
    t->build_ms = build_ms;
    int lfd = open(layer, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lfd >= 0) {
        tree_usage(lfd, &t->files, &t->disk_bytes);
        /* The layer's root: readable and searchable by everyone who sees it
         * (through the overlay, as the slot's own user). */
        fchmod(lfd, 0755);
        close(lfd);
    }
    if (meta_write(ag, stage_dir, t) < 0 || rename(stage_dir, final) < 0) {
        sp_errf(err, SP_INTERNAL, "saving template '%s': %s", name, strerror(errno));
        tpl_unlink(ag, t);
        if (base)
            base->children--;
        tpl_free(t);
        if (!keep)
            template_abort(ag, stage_dir);
        return -1;
    }
    *out = t;
    return 0;
}

static int commit(struct agent *ag, const char *stage_dir, const char *name, bool anon,
                  struct template *base, uint64_t build_ms, struct template **out,
                  struct sp_err *err)
{
    return commit_(ag, stage_dir, name, anon, base, build_ms, false, out, err);
}

int template_commit(struct agent *ag, const char *stage_dir, const char *name,
                    struct template *base, uint64_t build_ms, struct template **out,
                    struct sp_err *err)
{
    return commit(ag, stage_dir, name, false, base, build_ms, out, err);
}

int template_delete(struct agent *ag, const char *name, struct sp_err *err)
{
    struct template *t = template_find(ag, name);
    if (!t || t->anon)
        return sp_errf(err, SP_NOT_FOUND, "template '%s' does not exist", name);
    if (t->slots || t->children)
        return sp_errf(err, SP_SLOT_BUSY,
                       "template '%s' is in use (%u slots stand on it, %u templates build on it)",
                       name, t->slots, t->children);
    /* Out of sight first (a rename), then removed: a crash in between
     * leaves a staging directory, which the next start clears. */
    char path[4200], gone[4300];
    tpl_path(ag, t, NULL, path, sizeof path);
    pathf(gone, sizeof gone, "%s/templates/.stage-%llx-%llu", ag->data_dir,
          (unsigned long long)ag->instance, (unsigned long long)++ag->tpl_seq);
    if (rename(path, gone) < 0)
        return sp_errf(err, SP_INTERNAL, "removing template '%s': %s", name, strerror(errno));
    remove_path(gone);
    tpl_unlink(ag, t);
    if (t->base) {
        t->base->children--;
        tpl_release(ag, t->base);
    }
    tpl_free(t);
    return 0;
}

/* ---- slot workspaces ---------------------------------------------------- */

static void state_path(const struct agent *ag, const struct slot *s, char *out, size_t cap)
{
    pathf(out, cap, "%s/overlay/%u/state", ag->data_dir, s->index);
}

/* Where a slot stands survives a restart: "MODE TEMPLATE GEN". */
static void state_save(struct agent *ag, struct slot *s)
{
    char path[4200], tmp[4300];
    state_path(ag, s, path, sizeof path);
    if (!s->tpl) {
        unlink(path);
        return;
    }
    pathf(tmp, sizeof tmp, "%s/overlay/%u", ag->data_dir, s->index);
    mkdir(tmp, 0700);
    pathf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "we");
    if (!f) {
        log_warn("slot %u: cannot save what its workspace stands on: %s", s->index,
                 strerror(errno));
        return;
    }
    fprintf(f, "%s %s %s\n", ws_mode_names[s->ws_mode], s->tpl->name, s->ws_gen ? s->ws_gen : "-");
    if (fclose(f) == 0)
        rename(tmp, path);
}

/* The workspace would not empty (a command left something readdir cannot
 * see but rmdir finds, such as a forged overlay marker on a data dir that
 * is itself an overlay): move it where no box looks and start a new one. */
static int ws_replace_dir(struct agent *ag, struct slot *s, struct sp_err *err)
{
    char trash[4200], dir[4200];
    /* With a filesystem of its own, the slot's directory is the only place
     * a rename reaches (and it is gone at once). */
    if (s->disk.fs)
        pathf(dir, sizeof dir, "%s/slots/%u", ag->data_dir, s->index);
    else
        pathf(dir, sizeof dir, "%s/overlay/%u", ag->data_dir, s->index);
    mkdir(dir, 0700);
    pathf(trash, sizeof trash, "%s/.trash-%llx-%llu", dir, (unsigned long long)ag->instance,
          (unsigned long long)++ag->tpl_seq);
    if (rename(s->ws_path, trash) < 0 || mkdir(s->ws_path, 0700) < 0)
        return sp_errf(err, SP_INTERNAL, "replacing the workspace %.300s: %s", s->ws_path,
                       strerror(errno));
    int fd = dir_fd(s->ws_path, false, err);
    if (fd < 0)
        return -1;
    if (slot_uid_on(ag))
        uid_own_dir(fd, s->uid);
    close(s->ws_fd);
    s->ws_fd = fd;
    log_warn("slot %u: its workspace would not empty; replaced (the old one is %s)", s->index,
             trash);
    remove_path(trash);
    return 0;
}

/* Back to a plain, empty workspace. */
static int ws_detach(struct agent *ag, struct slot *s, struct sp_err *err)
{
    for (int k = 0; k < 2; k++)
        if (s->ll_fd[k] >= 0) {
            /* Landlock rules name the workspace's inode: a new one needs
             * new rules. */
            close(s->ll_fd[k]);
            s->ll_fd[k] = -1;
        }
    int rc = 0;
    if (s->ws_mode == WS_OVERLAY) {
        ovl_ns_close(&s->ws_ns);
        s->ws_fd = -1;
        char gen[4200];
        pathf(gen, sizeof gen, "%s/overlay/%u/%s", ag->data_dir, s->index, s->ws_gen);
        remove_path(gen);
        free(s->ws_gen);
        s->ws_gen = NULL;
        if ((s->ws_fd = dir_fd(s->ws_path, false, err)) < 0)
            rc = -1;
    }
    if (rc == 0 && path_empty_dir(s->ws_fd, err) < 0)
        rc = ws_replace_dir(ag, s, err);
    template_unref(ag, s->tpl);
    s->tpl = NULL;
    s->ws_mode = WS_PLAIN;
    state_save(ag, s);
    return rc;
}

static int ws_overlay(struct agent *ag, struct slot *s, struct template *t, const char *gen,
                      bool fresh, struct sp_err *err)
{
    char rel[3][300], base[4200];
    const char *lowers[TEMPLATE_DEFAULT_MAX_DEPTH * 4];
    char lower_buf[TEMPLATE_DEFAULT_MAX_DEPTH * 4][300];
    unsigned n = 0;
    for (struct template *l = t; l; l = l->base) {
        if (n == sizeof lowers / sizeof lowers[0])
            return sp_errf(err, SP_INTERNAL, "template '%s' has too many layers", t->name);
        pathf(lower_buf[n], sizeof lower_buf[n], "templates/%s/layer", l->name);
        lowers[n] = lower_buf[n];
        n++;
    }
    pathf(rel[0], sizeof rel[0], "overlay/%u/%s/upper", s->index, gen);
    pathf(rel[1], sizeof rel[1], "overlay/%u/%s/work", s->index, gen);
    pathf(rel[2], sizeof rel[2], "overlay/%u/%s/stage", s->index, gen);
    char slotdir[4200], path[4400];
    pathf(slotdir, sizeof slotdir, "%s/overlay/%u", ag->data_dir, s->index);
    mkdir(slotdir, 0700);
    if (fresh) {
        pathf(path, sizeof path, "%s/%s", slotdir, gen);
        if (mkdir(path, 0700) < 0)
            return sp_errf(err, SP_INTERNAL, "cannot create %.300s: %s", path, strerror(errno));
        for (int i = 0; i < 3; i++) {
            pathf(path, sizeof path, "%s/%s", ag->data_dir, rel[i]);
            if (mkdir(path, i == 0 ? 0755 : 0700) < 0)
                return sp_errf(err, SP_INTERNAL, "cannot create %.300s: %s", path, strerror(errno));
            /* The workspace's root is the upper layer's: the slot owns it. */
            if (i == 0 && slot_uid_on(ag) && chown(path, s->uid, s->uid) < 0)
                return sp_errf(err, SP_INTERNAL, "chown %.300s: %s", path, strerror(errno));
        }
    }
    pathf(base, sizeof base, "%s", ag->data_dir);
    char target[300];
    pathf(target, sizeof target, "slots/%u/work", s->index);
    struct ovl_conf c = {
        .base_dir = base,
        .lowers = lowers,
        .nlowers = n,
        .upper = rel[0],
        .work = rel[1],
        .target = target,
        .stage = rel[2],
        .idmap_uid = slot_uid_on(ag) ? s->uid : 0,
    };
    struct ovl_ns ns;
    if (ovl_mount(&ag->iso, &c, &ns, err) < 0)
        return -1;
    if (s->ws_fd >= 0)
        close(s->ws_fd);
    s->ws_ns = ns;
    s->ws_fd = ns.ws_fd;
    return 0;
}

static int ws_copy_layers(struct agent *ag, struct slot *s, struct template *t, struct sp_err *err)
{
    struct template *chain[TEMPLATE_DEFAULT_MAX_DEPTH * 4];
    unsigned n = 0;
    for (struct template *l = t; l && n < sizeof chain / sizeof chain[0]; l = l->base)
        chain[n++] = l;
    uid_t uid = slot_uid_on(ag) ? s->uid : (uid_t)-1;
    while (n-- > 0) {
        char path[4200];
        tpl_path(ag, chain[n], "layer", path, sizeof path);
        int lfd = dir_fd(path, false, err);
        if (lfd < 0)
            return -1;
        int rc = tree_copy(lfd, s->ws_fd, chain[n]->base ? TREE_MERGE : 0, uid, uid, NULL, err);
        close(lfd);
        if (rc < 0)
            return -1;
    }
    return 0;
}

int ws_prepare(struct agent *ag, struct slot *s, struct template *t, struct sp_err *err)
{
    double t0 = mono_ms();
    int rc = ws_detach(ag, s, err);
    if (rc == 0 && t) {
        bool overlay = ag->tpl_overlay;
        char gen[64];
        pathf(gen, sizeof gen, "g%llx-%llu", (unsigned long long)ag->instance,
              (unsigned long long)++ag->tpl_seq);
        if (overlay && ws_overlay(ag, s, t, gen, true, err) == 0) {
            s->ws_mode = WS_OVERLAY;
            s->ws_gen = strdup(gen);
        } else {
            if (overlay) {
                /* Overlay worked at start: say why not now, then copy. */
                log_warn("slot %u: %s; copying template '%s' instead", s->index, err->msg, t->name);
                char path[4200];
                pathf(path, sizeof path, "%s/overlay/%u/%s", ag->data_dir, s->index, gen);
                remove_path(path);
            }
            rc = ws_copy_layers(ag, s, t, err);
            s->ws_mode = WS_COPY;
            if (rc < 0) {
                struct sp_err e2;
                path_empty_dir(s->ws_fd, &e2);
                s->ws_mode = WS_PLAIN;
            }
        }
        if (rc == 0) {
            s->tpl = t;
            template_ref(t);
            t->last_used = wall_now();
            state_save(ag, s);
        }
    }
    s->ws_prepare_ms = mono_ms() - t0;
    quota_slot_reset(ag, s);
    return rc;
}

/* ---- copies in a worker process ----------------------------------------
 * A copy is O(size): in the event loop it would hold up every other slot
 * (and a controller's health checks) for as long as it takes. A forked
 * worker does it and reports through a pipe; the slot stays resetting
 * meanwhile, so nothing else of it runs. */

struct ws_job {
    struct ws_job *next;
    struct agent *ag;
    pid_t pid;
    int fd;
    ev_io w;
    struct slot *s;
    struct template *t;        /* held until the job ends */
    struct slot *from;         /* copying another slot's workspace (fork in copy mode) */
    uint64_t from_resets;      /* from's resets when the copy began */
    struct template *from_tpl; /* and what it stood on (held) */
    double t0;
};

struct job_result {
    int32_t rc;
    struct sp_err err;
};

static int fd_to(int fd, int want)
{
    return fd == want ? 0 : dup2(fd, want) < 0 ? -1 : 0;
}

static void __attribute__((noreturn))
job_child(struct agent *ag, struct slot *s, struct template *t, struct slot *from, int out)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* Only what the copy needs: the agent's sockets must not outlive it
     * here (a client would not see its connection close). */
    int ws = fcntl(s->ws_fd, F_DUPFD, 10), src = from ? fcntl(from->ws_fd, F_DUPFD, 10) : -1;
    int pipe_fd = fcntl(out, F_DUPFD, 10);
    struct job_result r = {0};
    if (ws < 0 || pipe_fd < 0 || (from && src < 0) || fd_to(ws, 3) < 0 || fd_to(pipe_fd, 4) < 0 ||
        (from && fd_to(src, 5) < 0))
        _exit(1);
    syscall(SYS_close_range, from ? 6u : 5u, ~0u, 0);
    s->ws_fd = 3;
    uid_t uid = slot_uid_on(ag) ? s->uid : (uid_t)-1;
    if (from)
        r.rc = tree_copy(5, 3, 0, uid, uid, NULL, &r.err);
    else
        r.rc = ws_copy_layers(ag, s, t, &r.err);
    _exit(write(4, &r, sizeof r) == (ssize_t)sizeof r ? 0 : 1);
}

static void job_free(struct agent *ag, struct ws_job *j)
{
    for (struct ws_job **pp = &ag->jobs; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            break;
        }
    ev_io_stop(ag->loop, &j->w);
    close(j->fd);
    template_unref(ag, j->t);
    template_unref(ag, j->from_tpl);
    free(j);
}

static void job_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct ws_job *j = w->data;
    struct agent *ag = j->ag;
    struct slot *s = j->s;
    struct job_result r;
    ssize_t n = read(j->fd, &r, sizeof r);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (n != (ssize_t)sizeof r) {
        r.rc = -1;
        sp_errf(&r.err, SP_INTERNAL, "the copy of slot %u's workspace ended without a word",
                s->index);
    }
    r.err.msg[sizeof r.err.msg - 1] = 0;
    if (r.rc == 0 && j->from && (j->from->resets != j->from_resets || j->from->resetting)) {
        /* The source was emptied or replaced under the copy. */
        r.rc = -1;
        sp_errf(&r.err, SP_CANCELLED, "slot %u was reset while it was being copied",
                j->from->index);
    }
    struct template *t = j->from ? j->from_tpl : j->t;
    if (r.rc == 0) {
        s->ws_mode = WS_COPY;
        s->tpl = t;
        template_ref(t);
        if (t)
            t->last_used = wall_now();
        state_save(ag, s);
    } else {
        struct sp_err e2;
        path_empty_dir(s->ws_fd, &e2);
        s->ws_mode = WS_PLAIN;
        if (!s->tpl) /* a plain copy (fork) has no template to say */
            state_save(ag, s);
    }
    s->ws_prepare_ms = mono_ms() - j->t0;
    quota_slot_reset(ag, s);
    job_free(ag, j);
    reset_prepared(ag, s, r.rc, &r.err);
}

static int job_start(struct agent *ag, struct slot *s, struct template *t, struct slot *from,
                     double t0, struct sp_err *err)
{
    int pp[2];
    if (pipe2(pp, O_CLOEXEC) < 0)
        return sp_errf(err, SP_INTERNAL, "pipe: %s", strerror(errno));
    struct ws_job *j = calloc(1, sizeof *j);
    pid_t pid = j ? fork() : -1;
    if (pid == 0)
        job_child(ag, s, t, from, pp[1]);
    close(pp[1]);
    if (pid < 0) {
        close(pp[0]);
        free(j);
        return sp_errf(err, SP_INTERNAL, "fork: %s", strerror(errno));
    }
    j->ag = ag;
    j->pid = pid;
    j->fd = pp[0];
    j->s = s;
    j->t = t;
    template_ref(t);
    j->from = from;
    if (from) {
        j->from_resets = from->resets;
        j->from_tpl = from->tpl;
        template_ref(from->tpl);
    }
    j->t0 = t0;
    ev_io_init(&j->w, job_cb, j->fd, EV_READ);
    j->w.data = j;
    ev_io_start(ag->loop, &j->w);
    j->next = ag->jobs;
    ag->jobs = j;
    return 1;
}

bool ws_job_pid(const struct agent *ag, pid_t pid)
{
    for (const struct ws_job *j = ag->jobs; j; j = j->next)
        if (j->pid == pid)
            return true;
    return false;
}

int ws_prepare_begin(struct agent *ag, struct slot *s, struct template *t, struct slot *from,
                     struct sp_err *err)
{
    double t0 = mono_ms();
    if (ws_detach(ag, s, err) < 0)
        return -1;
    if (!from && !t) {
        s->ws_prepare_ms = mono_ms() - t0;
        return 0;
    }
    if (!from && ag->tpl_overlay) {
        char gen[64];
        pathf(gen, sizeof gen, "g%llx-%llu", (unsigned long long)ag->instance,
              (unsigned long long)++ag->tpl_seq);
        if (ws_overlay(ag, s, t, gen, true, err) == 0) {
            s->ws_mode = WS_OVERLAY;
            s->ws_gen = strdup(gen);
            s->tpl = t;
            template_ref(t);
            t->last_used = wall_now();
            state_save(ag, s);
            s->ws_prepare_ms = mono_ms() - t0;
            return 0;
        }
        log_warn("slot %u: %s; copying template '%s' instead", s->index, err->msg, t->name);
        char path[4200];
        pathf(path, sizeof path, "%s/overlay/%u/%s", ag->data_dir, s->index, gen);
        remove_path(path);
    }
    return job_start(ag, s, t, from, t0, err);
}

void ws_jobs_free(struct agent *ag)
{
    while (ag->jobs) {
        struct ws_job *j = ag->jobs;
        kill(j->pid, SIGKILL);
        job_free(ag, j);
    }
}

/* ---- freezing a slot ---------------------------------------------------- */

/* Lay out the whole chain of t, then s's upper layer, into dst. */
static int flatten(struct agent *ag, struct slot *s, int dst, struct sp_err *err)
{
    struct template *chain[TEMPLATE_DEFAULT_MAX_DEPTH * 4];
    unsigned n = 0;
    for (struct template *l = s->tpl; l && n < sizeof chain / sizeof chain[0]; l = l->base)
        chain[n++] = l;
    char path[4300];
    while (n-- > 0) {
        tpl_path(ag, chain[n], "layer", path, sizeof path);
        int lfd = dir_fd(path, false, err);
        if (lfd < 0)
            return -1;
        int rc = tree_copy(lfd, dst, chain[n]->base ? TREE_MERGE : 0, tpl_owner(), tpl_owner(),
                           NULL, err);
        close(lfd);
        if (rc < 0)
            return -1;
    }
    pathf(path, sizeof path, "%s/overlay/%u/%s/upper", ag->data_dir, s->index, s->ws_gen);
    int ufd = dir_fd(path, false, err);
    if (ufd < 0)
        return -1;
    int rc = tree_copy(ufd, dst, TREE_MERGE, tpl_owner(), tpl_owner(), NULL, err);
    close(ufd);
    return rc;
}

int template_freeze(struct agent *ag, struct slot *s, const char *name, struct template **out,
                    bool *flattened, struct sp_err *err)
{
    double t0 = mono_ms();
    char stage[4200], anon_name[64];
    int lfd;
    *flattened = false;
    if (!name) {
        pathf(anon_name, sizeof anon_name, ".fork-%llx-%llu", (unsigned long long)ag->instance,
              (unsigned long long)++ag->tpl_seq);
        name = anon_name;
    } else if (template_find(ag, name)) {
        return sp_errf(err, SP_EXISTS, "template '%s' already exists", name);
    }
    if (template_stage(ag, stage, sizeof stage, &lfd, err) < 0)
        return -1;
    struct template *base = NULL;
    int rc;
    if (s->ws_mode == WS_OVERLAY && s->tpl->depth < ag->opt.template_max_depth) {
        /* The upper layer as it is, whiteouts and opaque markers included,
         * becomes a layer over what the slot stands on. */
        char path[4300];
        pathf(path, sizeof path, "%s/overlay/%u/%s/upper", ag->data_dir, s->index, s->ws_gen);
        int ufd = dir_fd(path, false, err);
        rc = ufd < 0 ? -1 : tree_copy(ufd, lfd, TREE_LAYER, tpl_owner(), tpl_owner(), NULL, err);
        if (ufd >= 0)
            close(ufd);
        base = s->tpl;
    } else if (s->ws_mode == WS_OVERLAY) {
        rc = flatten(ag, s, lfd, err);
        *flattened = true;
    } else {
        rc = tree_copy(s->ws_fd, lfd, 0, tpl_owner(), tpl_owner(), NULL, err);
    }
    close(lfd);
    if (rc < 0) {
        template_abort(ag, stage);
        return -1;
    }
    uint64_t ms = (uint64_t)(mono_ms() - t0);
    return commit(ag, stage, name, name == anon_name, base, ms, out, err);
}

/* Freezing without copying: nothing of s runs, so the slot's own layer
 * (its upper layer in overlay mode, else its whole workspace directory)
 * becomes the template's by a rename, and with slot users a chown to the
 * agent (which also clears setuid bits). With remount, s then stands on
 * the new template with a fresh upper layer (fork, template_from_slot);
 * without, s is left plain and empty (template_build, whose slot is done).
 * Anything running in s would see its workspace move: then -1 with
 * err->msg empty, and the caller copies instead. */
int template_freeze_in_place(struct agent *ag, struct slot *s, const char *name, bool remount,
                             struct template **out, struct sp_err *err)
{
    err->msg[0] = 0;
    bool ovl = s->ws_mode == WS_OVERLAY;
    /* Without a box, a leftover of the slot is the agent's child and could
     * still be at work in the directory that moves: copy instead. */
    /* A slot with a filesystem of its own cannot rename out of it. */
    if (s->disk.fs || s->running || s->nsessions || s->nkept || (remount && !ovl) ||
        !(ag->iso.available & (1u << RUNG_NAMESPACES)) ||
        (ovl && s->tpl->depth >= ag->opt.template_max_depth))
        return -1;
    for (int k = 0; k < 2; k++) {
        /* A leftover still dying in a box could write into the layer. */
        pid_t *kids = NULL;
        size_t n = s->box[k].pid > 0 ? proc_children(s->box[k].init_pid, &kids) : 0;
        free(kids);
        if (n)
            return -1;
    }
    double t0 = mono_ms();
    char stage[4200], layer[4300], from[4300], anon[64], gen[64];
    int lfd;
    if (template_stage(ag, stage, sizeof stage, &lfd, err) < 0)
        return -1;
    close(lfd);
    pathf(layer, sizeof layer, "%s/layer", stage);
    if (ovl)
        pathf(from, sizeof from, "%s/overlay/%u/%s/upper", ag->data_dir, s->index, s->ws_gen);
    else
        pathf(from, sizeof from, "%s", s->ws_path);
    if (!name)
        pathf(anon, sizeof anon, ".fork-%llx-%llu", (unsigned long long)ag->instance,
              (unsigned long long)++ag->tpl_seq);
    /* Nothing may hold the old workspace while it moves. */
    slots_box_stop(ag, s);
    for (int k = 0; k < 2; k++)
        if (s->ll_fd[k] >= 0) {
            close(s->ll_fd[k]);
            s->ll_fd[k] = -1;
        }
    if (ovl)
        ovl_ns_close(&s->ws_ns);
    else
        close(s->ws_fd);
    s->ws_fd = -1;
    struct template *t = NULL;
    bool moved = rmdir(layer) == 0 && rename(from, layer) == 0;
    int rc = moved ? 0 : -1;
    if (!moved)
        sp_errf(err, SP_INTERNAL, "freezing slot %u's layer: %s", s->index, strerror(errno));
    if (rc == 0 && !ovl && mkdir(s->ws_path, 0700) < 0)
        rc =
            sp_errf(err, SP_INTERNAL, "a new workspace for slot %u: %s", s->index, strerror(errno));
    if (rc == 0) {
        int fd = dir_fd(layer, false, err);
        /* The agent's, like every template; no setuid bit survives. */
        rc = fd < 0 ? -1 : tree_chown(fd, tpl_owner(), tpl_owner(), err);
        if (fd >= 0)
            close(fd);
    }
    if (rc == 0)
        rc = commit_(ag, stage, name ? name : anon, !name, ovl ? s->tpl : NULL,
                     (uint64_t)(mono_ms() - t0), true, &t, err);
    struct sp_err merr;
    if (rc < 0 && moved) {
        /* Put the slot's own layer back where it was: a failed freeze must
         * not cost the slot its changes. */
        if (!ovl)
            rmdir(s->ws_path);
        if (rename(layer, from) < 0)
            log_error("slot %u: its layer could not go back from %s: %s", s->index, layer,
                      strerror(errno));
    }
    if (rc < 0)
        template_abort(ag, stage);
    else
        log_debug("slot %u: frozen in place as '%s' (%.1f ms)", s->index, t->name, mono_ms() - t0);
    if (rc < 0 || !remount) {
        if (ovl && rc < 0) {
            /* Back as it was, on its template and its own upper layer. */
            s->ws_fd = dir_fd(s->ws_path, false, &merr);
            if (s->ws_fd >= 0 && ws_overlay(ag, s, s->tpl, s->ws_gen, false, &merr) == 0)
                return -1;
            log_error("slot %u: mounting its workspace again: %s", s->index, merr.msg);
        }
        if (ovl) {
            char old[4200];
            pathf(old, sizeof old, "%s/overlay/%u/%s", ag->data_dir, s->index, s->ws_gen);
            remove_path(old);
            free(s->ws_gen);
            s->ws_gen = NULL;
        }
        if (s->ws_fd < 0)
            s->ws_fd = dir_fd(s->ws_path, false, &merr);
        if (s->ws_fd >= 0 && slot_uid_on(ag) && rc == 0)
            uid_own_dir(s->ws_fd, s->uid);
        if (ovl || rc == 0) {
            template_unref(ag, s->tpl);
            s->tpl = NULL;
            s->ws_mode = WS_PLAIN;
            state_save(ag, s);
        }
        if (rc == 0)
            *out = t;
        return rc;
    }
    /* s again, on the frozen layer, with a fresh upper layer. */
    char old[4200];
    pathf(old, sizeof old, "%s/overlay/%u/%s", ag->data_dir, s->index, s->ws_gen);
    remove_path(old);
    free(s->ws_gen);
    s->ws_gen = NULL;
    pathf(gen, sizeof gen, "g%llx-%llu", (unsigned long long)ag->instance,
          (unsigned long long)++ag->tpl_seq);
    s->ws_fd = dir_fd(s->ws_path, false, &merr);
    if (s->ws_fd < 0 || ws_overlay(ag, s, t, gen, true, &merr) < 0) {
        log_error("slot %u: mounting its workspace again after freezing it: %s", s->index,
                  merr.msg);
        if (s->ws_fd < 0)
            s->ws_fd = dir_fd(s->ws_path, false, &merr);
        template_unref(ag, s->tpl);
        s->tpl = NULL;
        s->ws_mode = WS_PLAIN;
        state_save(ag, s);
        *out = t; /* the template is made; the slot is empty (said in the log) */
        return 0;
    }
    s->ws_gen = strdup(gen);
    template_ref(t);
    template_unref(ag, s->tpl);
    s->tpl = t;
    state_save(ag, s);
    *out = t;
    return 0;
}

/* ---- start-up ----------------------------------------------------------- */

static void clear_stages(struct agent *ag, int tfd)
{
    DIR *d = fdopendir(dup(tfd));
    if (!d)
        return;
    rewinddir(d); /* a dup shares its offset with every other reader of tfd */
    struct dirent *de;
    while ((de = readdir(d)))
        if (!strncmp(de->d_name, ".stage-", 7)) {
            struct sp_err e;
            tree_remove(tfd, de->d_name, &e);
        }
    closedir(d);
    (void)ag;
}

static void load_all(struct agent *ag, int tfd)
{
    DIR *d = fdopendir(dup(tfd));
    if (!d)
        return;
    rewinddir(d); /* a dup shares its offset with every other reader of tfd */
    struct found {
        struct template *t;
        char base[TEMPLATE_NAME_MAX + 40];
    } *found = NULL;
    unsigned n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
            !strncmp(de->d_name, ".stage-", 7))
            continue;
        if (n == cap) {
            struct found *f = realloc(found, (cap = cap ? cap * 2 : 256) * sizeof *f);
            if (!f) {
                log_error("templates: out of memory loading them; only %u loaded", n);
                break;
            }
            found = f;
        }
        char dir[4200];
        pathf(dir, sizeof dir, "%s/templates/%s", ag->data_dir, de->d_name);
        struct template *t = meta_read(dir, de->d_name, found[n].base, sizeof found[n].base);
        if (!t) {
            log_warn("templates: %s has no readable meta file; ignored", dir);
            continue;
        }
        found[n++].t = t;
    }
    closedir(d);
    /* Link bases; a template whose base is missing is dropped (it cannot
     * be mounted or copied), with a warning. Repeat until stable. */
    for (unsigned i = 0; i < n; i++) {
        found[i].t->next = ag->templates;
        ag->templates = found[i].t;
    }
    for (unsigned i = 0; i < n; i++)
        if (found[i].base[0])
            found[i].t->base = template_find(ag, found[i].base);
    for (bool changed = true; changed;) {
        changed = false;
        for (unsigned i = 0; i < n; i++) {
            struct template *t = found[i].t;
            if (!t || !found[i].base[0] || (t->base && template_find(ag, t->base->name)))
                continue;
            log_warn("templates: '%s' stands on '%s', which is gone; ignored", t->name,
                     found[i].base);
            /* What stood on it is gone too, on the next round. */
            for (unsigned j = 0; j < n; j++)
                if (found[j].t && found[j].t->base == t)
                    found[j].t->base = NULL;
            tpl_unlink(ag, t);
            tpl_free(t);
            found[i].t = NULL;
            changed = true;
        }
    }
    for (struct template *t = ag->templates; t; t = t->next) {
        unsigned depth = 1;
        for (struct template *b = t->base; b && depth < 1000; b = b->base)
            depth++;
        t->depth = depth;
        if (t->base)
            t->base->children++;
    }
    free(found);
}

static void restore_slot(struct agent *ag, struct slot *s)
{
    char path[4200], mode[16], name[TEMPLATE_NAME_MAX + 40], gen[80];
    state_path(ag, s, path, sizeof path);
    FILE *f = fopen(path, "re");
    if (!f)
        return;
    int k = fscanf(f, "%15s %167s %79s", mode, name, gen);
    fclose(f);
    struct template *t = k == 3 ? template_find(ag, name) : NULL;
    struct sp_err err;
    if (t && !strcmp(mode, "overlay") && ag->tpl_overlay &&
        ws_overlay(ag, s, t, gen, false, &err) == 0) {
        s->ws_mode = WS_OVERLAY;
        s->ws_gen = strdup(gen);
    } else if (t && !strcmp(mode, "copy")) {
        s->ws_mode = WS_COPY;
    } else {
        if (t || k == 3)
            log_warn("slot %u: its workspace stood on template '%s' (%s) and cannot again; "
                     "it starts empty",
                     s->index, name, mode);
        unlink(path);
        path_empty_dir(s->ws_fd, &err);
        return;
    }
    s->tpl = t;
    template_ref(t);
}

/* Remove upper layers no slot uses (left by a crash or a changed mode). */
static void clear_gens(struct agent *ag, struct slot *s)
{
    char dir[4200];
    pathf(dir, sizeof dir, "%s/overlay/%u", ag->data_dir, s->index);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0)
            close(fd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)))
        if ((de->d_name[0] == 'g' && !(s->ws_gen && !strcmp(de->d_name, s->ws_gen))) ||
            !strncmp(de->d_name, ".trash-", 7)) {
            struct sp_err e;
            tree_remove(dirfd(d), de->d_name, &e);
        }
    closedir(d);
}

void templates_probe(struct agent *ag)
{
    char p[4200];
    pathf(p, sizeof p, "%s/overlay", ag->data_dir);
    if ((mkdir(ag->data_dir, 0755) < 0 && errno != EEXIST) ||
        (mkdir(p, 0700) < 0 && errno != EEXIST)) {
        ag->tpl_overlay = false;
        pathf(ag->tpl_why, sizeof ag->tpl_why, "cannot probe: %.60s: %s", p, strerror(errno));
        return;
    }
    probe_overlay(ag);
}

static void probe_overlay(struct agent *ag)
{
    struct isolation *iso = &ag->iso;
    ag->tpl_overlay = false;
    if (ag->opt.template_copy) {
        pathf(ag->tpl_why, sizeof ag->tpl_why, "turned off (--template-mode copy)");
        return;
    }
    if (!(iso->available & (1u << RUNG_NAMESPACES)) || !iso->ns_workspace) {
        pathf(ag->tpl_why, sizeof ag->tpl_why, "no box shows the workspace: %.160s",
              !(iso->available & (1u << RUNG_NAMESPACES)) ? iso->why[RUNG_NAMESPACES]
                                                          : iso->ns_workspace_why);
        return;
    }
    if (strpbrk(ag->data_dir, ":,\\")) {
        pathf(ag->tpl_why, sizeof ag->tpl_why, "the data dir's path has ':', ',' or '\\'");
        return;
    }
    char p[4200];
    static const char *const sub[] = {"", "/l", "/u", "/w", "/s", "/t"};
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++) {
        pathf(p, sizeof p, "%s/overlay/.probe%s", ag->data_dir, sub[i]);
        mkdir(p, 0700);
    }
    const char *lowers[] = {"overlay/.probe/l"};
    struct ovl_conf c = {
        .base_dir = ag->data_dir,
        .lowers = lowers,
        .nlowers = 1,
        .upper = "overlay/.probe/u",
        .work = "overlay/.probe/w",
        .target = "overlay/.probe/t",
        .stage = "overlay/.probe/s",
        .idmap_uid = slot_uid_on(ag) ? iso->uid_base : 0,
    };
    struct ovl_ns ns;
    struct sp_err err;
    if (ovl_mount(iso, &c, &ns, &err) == 0) {
        ovl_ns_close(&ns);
        ag->tpl_overlay = true;
        ag->tpl_why[0] = 0;
    } else {
        pathf(ag->tpl_why, sizeof ag->tpl_why, "%.190s", err.msg);
    }
    pathf(p, sizeof p, "%s/overlay/.probe", ag->data_dir);
    remove_path(p);
}

int templates_init(struct agent *ag, struct sp_err *err)
{
    if (!ag->opt.template_max_depth)
        ag->opt.template_max_depth = TEMPLATE_DEFAULT_MAX_DEPTH;
    char path[4200];
    pathf(path, sizeof path, "%s/overlay", ag->data_dir);
    int ofd = dir_fd(path, true, err);
    if (ofd < 0)
        return -1;
    close(ofd);
    pathf(path, sizeof path, "%s/templates", ag->data_dir);
    int tfd = dir_fd(path, true, err);
    if (tfd < 0)
        return -1;
    clear_stages(ag, tfd);
    load_all(ag, tfd);
    close(tfd);
    probe_overlay(ag);
    for (unsigned i = 0; i < ag->nslots; i++) {
        ag->slots[i].ws_ns = (struct ovl_ns){-1, -1, -1};
        restore_slot(ag, &ag->slots[i]);
        clear_gens(ag, &ag->slots[i]);
    }
    /* Forks nothing stands on any more. */
    for (bool again = true; again;) {
        again = false;
        for (struct template *t = ag->templates; t; t = t->next)
            if (t->anon && !t->slots && !t->children) {
                tpl_release(ag, t);
                again = true;
                break;
            }
    }
    return 0;
}

void templates_free_slots(struct agent *ag)
{
    for (unsigned i = 0; ag->slots && i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        if (s->prep_rq) {
            req_free(s->prep_rq);
            s->prep_rq = NULL;
        }
        if (s->ws_mode == WS_OVERLAY) {
            ovl_ns_close(&s->ws_ns);
            s->ws_fd = -1;
        }
        free(s->ws_gen);
        s->ws_gen = NULL;
    }
}

void templates_free(struct agent *ag)
{
    while (ag->templates) {
        struct template *t = ag->templates;
        ag->templates = t->next;
        tpl_free(t);
    }
}

void templates_hidden(struct agent *ag, char out[2][4200])
{
    pathf(out[0], 4200, "%s/templates", ag->data_dir);
    pathf(out[1], 4200, "%s/overlay", ag->data_dir);
}

/* ---- answers ------------------------------------------------------------- */

void template_pack(msgpack_packer *pk, struct template *t)
{
    msgpack_pack_map(pk, 9);
    sp_pack_kv_str(pk, "name", t->name);
    if (t->base)
        sp_pack_kv_str(pk, "base", t->base->name);
    else
        sp_pack_kv_nil(pk, "base");
    sp_pack_kv_uint(pk, "layers", t->depth);
    sp_pack_kv_uint(pk, "size", t->disk_bytes);
    sp_pack_kv_uint(pk, "files", t->files);
    sp_pack_kv_uint(pk, "in_use", t->slots + t->children);
    sp_pack_kv_uint(pk, "created_ms", (uint64_t)(t->created * 1000.0));
    sp_pack_kv_uint(pk, "last_used_ms", (uint64_t)(t->last_used * 1000.0));
    sp_pack_kv_uint(pk, "build_ms", t->build_ms);
}

void templates_pack(msgpack_packer *pk, struct agent *ag, const char *only)
{
    uint32_t n = 0;
    for (struct template *t = ag->templates; t; t = t->next)
        n += !t->anon && (!only || !strcmp(only, t->name));
    msgpack_pack_array(pk, n);
    for (struct template *t = ag->templates; t; t = t->next)
        if (!t->anon && (!only || !strcmp(only, t->name)))
            template_pack(pk, t);
}

void template_pack_info(msgpack_packer *pk, struct agent *ag)
{
    msgpack_pack_map(pk, 3);
    sp_pack_kv_str(pk, "mode", ag->tpl_overlay ? "overlay" : "copy");
    if (ag->tpl_overlay)
        sp_pack_kv_nil(pk, "why");
    else
        sp_pack_kv_str(pk, "why", ag->tpl_why);
    sp_pack_kv_uint(pk, "max_depth", ag->opt.template_max_depth);
}
