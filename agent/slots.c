/* Slots: workspace and tmp directories under the data dir, and the per-slot
 * FIFO that runs slot-bound requests one at a time in arrival order. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "quota.h"

#define MAX_QUEUE 1024

static int mkdir_p(const char *path, mode_t mode)
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
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int open_dir(const char *path, struct sp_err *err)
{
    if (mkdir_p(path, 0700) < 0)
        return sp_errf(err, SP_INTERNAL, "cannot create %s: %s", path, strerror(errno));
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return sp_errf(err, SP_INTERNAL, "cannot open %s: %s", path, strerror(errno));
    return fd;
}

static void slots_own(struct agent *ag);

int slots_init(struct agent *ag, struct sp_err *err)
{
    ag->nslots = ag->opt.nslots;
    ag->slots = calloc(ag->nslots, sizeof *ag->slots);
    if (!ag->slots)
        return sp_errf(err, SP_INTERNAL, "out of memory for %u slots", ag->nslots);
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        s->index = i;
        s->ws_fd = s->tmp_fd = -1;
        s->ll_fd[0] = s->ll_fd[1] = -1;
        s->box[0].sock = s->box[1].sock = -1;
        s->box[0].csock = s->box[1].csock = -1;
        s->warm[0].sock = s->warm[1].sock = -1;
        s->cg_fd[0] = s->cg_fd[1] = -1;
        s->uid = ag->iso.uid_base + i;
        s->ws_ns = (struct ovl_ns){-1, -1, -1};
    }
    if (quota_mount_slots(ag, err) < 0)
        return -1;
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        char path[4096];
        snprintf(path, sizeof path, "%s/slots/%u/work", ag->data_dir, i);
        s->ws_path = strdup(path);
        snprintf(path, sizeof path, "%s/slots/%u/tmp", ag->data_dir, i);
        s->tmp_path = strdup(path);
        if (!s->ws_path || !s->tmp_path)
            return sp_errf(err, SP_INTERNAL, "out of memory");
        if ((s->ws_fd = open_dir(s->ws_path, err)) < 0)
            return -1;
        if ((s->tmp_fd = open_dir(s->tmp_path, err)) < 0)
            return -1;
    }
    if (ag->iso.available & (1u << RUNG_UID))
        slots_own(ag);
    for (unsigned i = 0; i < ag->nslots && (ag->iso.available & (1u << RUNG_CGROUP)); i++) {
        struct sp_err cerr;
        if (cgroup_slot_init(&ag->iso, i, ag->slots[i].cg_fd, &cerr) < 0) {
            ag->iso.available &= ~(1u << RUNG_CGROUP);
            snprintf(ag->iso.why[RUNG_CGROUP], sizeof ag->iso.why[RUNG_CGROUP], "%.190s", cerr.msg);
            log_warn("isolation: cgroup unavailable: %s", cerr.msg);
        }
    }
    return 0;
}

static bool boxes_show_workspace(const struct agent *ag)
{
    return (ag->iso.available & (1u << RUNG_NAMESPACES)) && ag->iso.ns_workspace;
}

const char *slot_view(const struct agent *ag, const struct slot *s)
{
    return boxes_show_workspace(ag) && !s->box_failed ? BOX_WORKSPACE : s->ws_path;
}

void slots_view_template(const struct agent *ag, char *out, size_t cap)
{
    if (boxes_show_workspace(ag))
        snprintf(out, cap, "%s", BOX_WORKSPACE);
    else
        snprintf(out, cap, "%s/slots/{slot}/work", ag->data_dir ? ag->data_dir : ".");
}

/* With a user per slot, each slot owns its workspace and tmp (0700); the
 * directories above must let slot users pass. */
static void slots_own(struct agent *ag)
{
    struct isolation *iso = &ag->iso;
    char why[200], dir[4096];
    snprintf(dir, sizeof dir, "%s/slots", ag->data_dir);
    chmod(dir, 0755);
    for (unsigned i = 0; i < ag->nslots; i++) {
        snprintf(dir, sizeof dir, "%s/slots/%u", ag->data_dir, i);
        chmod(dir, 0755);
    }
    if (uid_check_path(dir, why, sizeof why) < 0) {
        iso->available &= ~(1u << RUNG_UID);
        snprintf(iso->why[RUNG_UID], sizeof iso->why[RUNG_UID], "%s", why);
        log_warn("isolation: uid unavailable: %s", why);
        return;
    }
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        if (uid_own_dir(s->ws_fd, s->uid) < 0 || uid_own_dir(s->tmp_fd, s->uid) < 0) {
            iso->available &= ~(1u << RUNG_UID);
            snprintf(iso->why[RUNG_UID], sizeof iso->why[RUNG_UID], "chown %s: %s", s->ws_path,
                     strerror(errno));
            log_warn("isolation: uid unavailable: %s", iso->why[RUNG_UID]);
            /* Take back what was given away: slots without their own user
             * run as the agent and must be able to use their directories. */
            for (unsigned k = 0; k <= i; k++) {
                (void)!fchown(ag->slots[k].ws_fd, geteuid(), getegid());
                (void)!fchown(ag->slots[k].tmp_fd, geteuid(), getegid());
            }
            return;
        }
    }
}

bool slots_is_box_holder(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (int k = 0; k < 2; k++)
            if (ag->slots[i].box[k].pid == pid)
                return true;
    return false;
}

static void box_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct agent *ag = ev_userdata(loop);
    struct slot *s = w->data;
    int k = w == &s->box_w[0] || w == &s->cbox_w[0] ? 0 : 1;
    exec_box_readable(ag, s, k, w == &s->cbox_w[k]);
}

static void box_unwatch(struct agent *ag, struct slot *s, int k)
{
    ev_io_stop(ag->loop, &s->box_w[k]);
    ev_io_stop(ag->loop, &s->cbox_w[k]); /* a no-op when never started */
}

void slots_box_watch(struct agent *ag, struct slot *s, int k)
{
    box_unwatch(ag, s, k); /* never init an active watcher */
    ev_io_init(&s->box_w[k], box_cb, s->box[k].sock, EV_READ);
    s->box_w[k].data = s;
    ev_io_start(ag->loop, &s->box_w[k]);
    if (s->box[k].csock >= 0) {
        ev_io_init(&s->cbox_w[k], box_cb, s->box[k].csock, EV_READ);
        s->cbox_w[k].data = s;
        ev_io_start(ag->loop, &s->cbox_w[k]);
    }
}

/* Also for a box whose holder ns_box_send gave up already (pid 0): its
 * watchers, warm shell and the commands waiting for its answers go too. */
static void box_stop(struct agent *ag, struct slot *s, int k)
{
    box_unwatch(ag, s, k);
    ns_box_stop(&s->box[k]);
    exec_box_gone(ag, &s->box[k]);
    /* Last: what waited for the warm shell may start this box anew. */
    warm_stop(ag, &s->warm[k]); /* it dies with the box */
}

void slots_box_lost(struct agent *ag, struct slot *s, const struct nsbox *box)
{
    box_stop(ag, s, box == &s->box[0] ? 0 : 1);
}

bool slots_box_exited(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (int k = 0; k < 2; k++)
            if (ag->slots[i].box[k].pid == pid) {
                log_warn("slot %u: namespace holder %d exited", i, (int)pid);
                box_stop(ag, &ag->slots[i], k);
                return true;
            }
    return false;
}

void slots_box_stop(struct agent *ag, struct slot *s)
{
    for (int k = 0; k < 2; k++)
        box_stop(ag, s, k);
}

unsigned slots_box_sweep(struct agent *ag, struct slot *s)
{
    unsigned n = 0;
    for (int k = 0; k < 2; k++)
        if (s->box[k].pid > 0)
            n += proc_kill_children(ag, s->box[k].init_pid);
    return n;
}

bool slots_is_kept(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++)
        for (unsigned j = 0; j < ag->slots[i].nkept; j++)
            if (ag->slots[i].kept[j] == pid)
                return true;
    return false;
}

static void keep(struct slot *s, pid_t pid)
{
    if (s->nkept == s->kept_cap) {
        unsigned cap = s->kept_cap ? s->kept_cap * 2 : 8;
        pid_t *v = realloc(s->kept, cap * sizeof *v);
        if (!v)
            return; /* not kept: swept like any leftover */
        s->kept = v;
        s->kept_cap = cap;
    }
    s->kept[s->nkept++] = pid;
}

/* Called when a keep_background command has ended: the processes it left
 * have just been re-parented to the agent, or to its box's PID 1. */
void slots_keep_leftovers(struct agent *ag, struct slot *s)
{
    pid_t parents[3] = {ag->pid, s->box[0].init_pid, s->box[1].init_pid};
    for (int k = 0; k < 3; k++) {
        if (parents[k] <= 0)
            continue;
        pid_t *kids;
        size_t n = proc_children(parents[k], &kids);
        for (size_t i = 0; i < n; i++)
            if (!exec_is_main_pid(ag, kids[i]) && !slots_is_box_holder(ag, kids[i]) &&
                !slots_is_kept(ag, kids[i]) && !warm_is_shell(ag, kids[i]))
                keep(s, kids[i]);
        free(kids);
    }
}

void slots_forget_kept(struct agent *ag, pid_t pid)
{
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        for (unsigned j = 0; j < s->nkept; j++)
            if (s->kept[j] == pid) {
                s->kept[j] = s->kept[--s->nkept];
                quota_kick(ag, s); /* what it wrote is counted */
                return;
            }
    }
}

unsigned slots_kill_kept(struct slot *s)
{
    unsigned n = 0;
    for (unsigned j = 0; j < s->nkept; j++)
        n += proc_kill_tree(s->kept[j]);
    s->nkept = 0;
    return n;
}

void slots_free(struct agent *ag)
{
    for (unsigned i = 0; ag->slots && i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        while (s->reset_waiters) {
            struct req *rq = s->reset_waiters;
            s->reset_waiters = rq->slot_next;
            req_free(rq);
        }
        while (s->q_head) {
            struct req *rq = s->q_head;
            s->q_head = rq->slot_next;
            req_free(rq);
        }
        for (int k = 0; k < 2; k++) {
            if (s->ll_fd[k] >= 0)
                close(s->ll_fd[k]);
            if (s->box[k].pid > 0 && ag->loop)
                box_unwatch(ag, s, k);
            ns_box_stop(&s->box[k]);
            if (s->cg_fd[k] >= 0)
                close(s->cg_fd[k]);
        }
        free(s->kept);
        if (s->ws_fd >= 0)
            close(s->ws_fd);
        if (s->tmp_fd >= 0)
            close(s->tmp_fd);
        free(s->ws_path);
        free(s->tmp_path);
        free(s->trajectory_id);
        free(s->holder);
        free(s->owner);
    }
    free(ag->slots);
    ag->slots = NULL;
}

void slot_submit(struct agent *ag, struct req *rq)
{
    struct slot *s = req_slot(rq);
    if (s->q_len >= MAX_QUEUE) {
        struct sp_err err;
        sp_errf(&err, SP_SLOT_BUSY, "slot %u has %u requests queued (limit %u)", s->index, s->q_len,
                MAX_QUEUE);
        req_finish(rq, &err);
        return;
    }
    rq->slot_next = NULL;
    if (s->q_tail)
        s->q_tail->slot_next = rq;
    else
        s->q_head = rq;
    s->q_tail = rq;
    s->q_len++;
    if (!s->active && !s->resetting)
        slot_advance(ag, s);
}

/* Iterative so that a long queue of synchronous ops (each finishing inside
 * req_run and calling back here) does not recurse. */
void slot_advance(struct agent *ag, struct slot *s)
{
    s->active = NULL;
    quota_kick(ag, s); /* what the request wrote is counted */
    if (s->advancing)
        return;
    s->advancing = true;
    while (!s->active && !s->resetting && s->q_head) {
        struct req *rq = s->q_head;
        s->q_head = rq->slot_next;
        if (!s->q_head)
            s->q_tail = NULL;
        s->q_len--;
        rq->slot_next = NULL;
        s->active = rq;
        req_run(rq);
    }
    s->advancing = false;
    (void)ag;
}

void slot_fail_queued(struct agent *ag, struct slot *s, const struct sp_err *err)
{
    (void)ag;
    struct req *rq = s->q_head;
    s->q_head = s->q_tail = NULL;
    s->q_len = 0;
    while (rq) {
        struct req *next = rq->slot_next;
        rq->slot_next = NULL;
        req_finish(rq, err);
        rq = next;
    }
}

void slot_drop_conn(struct agent *ag, struct conn *c)
{
    for (unsigned i = 0; i < ag->nslots; i++) {
        struct slot *s = &ag->slots[i];
        struct req **pp = &s->q_head, *last = NULL;
        while (*pp) {
            struct req *rq = *pp;
            if (rq->conn == c) {
                *pp = rq->slot_next;
                s->q_len--;
                conn_req_del(c, rq);
                req_free(rq);
                continue;
            }
            last = rq;
            pp = &rq->slot_next;
        }
        s->q_tail = last;
    }
}

void slot_unlease(struct slot *s)
{
    free(s->trajectory_id);
    free(s->holder);
    free(s->owner);
    s->trajectory_id = s->holder = s->owner = NULL;
    s->owner_bound = false;
    s->leased = false;
}
