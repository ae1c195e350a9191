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
    }
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
    return 0;
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
        for (int k = 0; k < 2; k++)
            if (s->ll_fd[k] >= 0)
                close(s->ll_fd[k]);
        if (s->ws_fd >= 0)
            close(s->ws_fd);
        if (s->tmp_fd >= 0)
            close(s->tmp_fd);
        free(s->ws_path);
        free(s->tmp_path);
        free(s->trajectory_id);
        free(s->holder);
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
