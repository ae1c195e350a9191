/* template.h: named, read-only, prepared trees (templates) on disk under the
 * data dir, and slot workspaces made from them: an overlay view where a box
 * can mount one, else a copy (template.c). Anonymous templates (".fork-*")
 * hold a forked slot's frozen changes while a slot stands on them. */
#ifndef SLOT_TEMPLATE_H
#define SLOT_TEMPLATE_H

#include "agent.h"

#define TEMPLATE_NAME_MAX 128
#define TEMPLATE_DEFAULT_MAX_DEPTH 16

enum ws_mode { WS_PLAIN, WS_OVERLAY, WS_COPY };
extern const char *const ws_mode_names[3];

struct template
{
    struct template *next;
    char *name;
    struct template *base; /* the layer beneath, or NULL */
    unsigned depth;        /* layers in its chain, itself included */
    unsigned slots;        /* slots whose workspace stands on it (directly) */
    unsigned children;     /* templates built on it */
    uint64_t files, disk_bytes;
    double created; /* wall clock */
    uint64_t build_ms;
    double last_used; /* wall clock; for the controller's eviction */
    bool anon;
};

/* At start: the store's directories, overlay probe, templates on disk,
 * slots that stood on one before a restart. */
int templates_init(struct agent *ag, struct sp_err *err);
/* At exit, in this order: templates_free_slots (the slots' mounts and the
 * requests waiting for a copy), slots_free (its requests still hold
 * templates), templates_free. */
void templates_free_slots(struct agent *ag);
void templates_free(struct agent *ag);
/* --probe: could slots stand on templates as overlays here (tpl_overlay,
 * tpl_why)? Makes DATA/overlay when missing. */
void templates_probe(struct agent *ag);
/* Names: 1..128 of [A-Za-z0-9._-], not starting with '.'. */
int template_name_check(const char *name, size_t n, char *out, struct sp_err *err);
struct template *template_find(struct agent *ag, const char *name);
/* A template argument: NULL when absent; err set (not_found) when unknown. */
int template_arg(struct req *rq, const char *key, struct template **out, struct sp_err *err);
void template_ref(struct template *t);
void template_unref(struct agent *ag, struct template *t);
/* Make s's workspace a fresh view of t (NULL: empty). Nothing of s may run.
 * On failure the workspace is left empty and plain. */
int ws_prepare(struct agent *ag, struct slot *s, struct template *t, struct sp_err *err);
/* Replace s's workspace (nothing of it runs) by a view of t, or a copy of
 * from's workspace, or nothing (both NULL). 0: done; 1: a worker process
 * copies, and reset_prepared(ag, s, ...) follows; -1 with err. */
int ws_prepare_begin(struct agent *ag, struct slot *s, struct template *t, struct slot *from,
                     struct sp_err *err);
/* Is pid a copy worker (not a stray to sweep)? */
bool ws_job_pid(const struct agent *ag, pid_t pid);
/* At exit: kill the workers. */
void ws_jobs_free(struct agent *ag);
/* Freeze s's workspace as a template: named, or anonymous (name NULL). A
 * chain deeper than the agent's maximum is flattened (*flattened). */
int template_freeze(struct agent *ag, struct slot *s, const char *name, struct template **out,
                    bool *flattened, struct sp_err *err);
/* Freeze s without copying (see there): named, or anonymous (name NULL);
 * with remount s stands on the result, else it is left plain and empty.
 * -1 with err->msg empty when it does not apply (the caller copies). */
int template_freeze_in_place(struct agent *ag, struct slot *s, const char *name, bool remount,
                             struct template **out, struct sp_err *err);
/* A staging directory for a template being made (its layer/ inside);
 * template_commit turns it into name, template_abort removes it. */
int template_stage(struct agent *ag, char *dir, size_t cap, int *layer_fd, struct sp_err *err);
int template_commit(struct agent *ag, const char *stage_dir, const char *name,
                    struct template *base, uint64_t build_ms, struct template **out,
                    struct sp_err *err);
void template_abort(struct agent *ag, const char *stage_dir);
int template_delete(struct agent *ag, const char *name, struct sp_err *err);
void templates_pack(msgpack_packer *pk, struct agent *ag, const char *only);
void template_pack(msgpack_packer *pk, struct template *t);
void template_pack_info(msgpack_packer *pk, struct agent *ag);
/* Host paths the boxes hide (templates, upper layers). */
void templates_hidden(struct agent *ag, char out[2][4200]);

#endif
