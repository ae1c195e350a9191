/* Templates as the controller sees them: each agent's list (learned with
 * template_list when the agent is ready and after every build), the
 * placement question "does this agent hold it?", and eviction: past the
 * profile's template_disk_budget, unused templates go, least recently used
 * first, one template_delete at a time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

bool tpl_has(const struct agent *ag, const char *name)
{
    for (uint32_t i = 0; i < ag->ntpls; i++)
        if (!strcmp(ag->tpls[i].name, name))
            return true;
    return false;
}

void tpl_forget(struct agent *ag)
{
    free(ag->tpls);
    ag->tpls = NULL;
    ag->ntpls = 0;
}

static void copy_str(const msgpack_object *m, const char *key, char *out, size_t cap)
{
    const char *v;
    size_t n;
    struct sp_err e;
    out[0] = 0;
    if (sp_get_str(m, key, false, &v, &n, &e) == 1 && n < cap) {
        memcpy(out, v, n);
        out[n] = 0;
    }
}

static void learn(struct agent *ag, const msgpack_object *list)
{
    tpl_forget(ag);
    if (!list || list->type != MSGPACK_OBJECT_ARRAY || !list->via.array.size)
        return;
    ag->tpls = calloc(list->via.array.size, sizeof *ag->tpls);
    if (!ag->tpls)
        return;
    for (uint32_t i = 0; i < list->via.array.size; i++) {
        const msgpack_object *t = &list->via.array.ptr[i];
        if (t->type != MSGPACK_OBJECT_MAP)
            continue;
        struct ctl_tpl *d = &ag->tpls[ag->ntpls];
        struct sp_err e;
        copy_str(t, "name", d->name, sizeof d->name);
        copy_str(t, "base", d->base, sizeof d->base);
        sp_get_uint(t, "size", false, &d->size, &e);
        sp_get_uint(t, "files", false, &d->files, &e);
        sp_get_uint(t, "in_use", false, &d->in_use, &e);
        sp_get_uint(t, "last_used_ms", false, &d->last_used_ms, &e);
        sp_get_uint(t, "build_ms", false, &d->build_ms, &e);
        sp_get_uint(t, "layers", false, &d->layers, &e);
        sp_get_uint(t, "created_ms", false, &d->created_ms, &e);
        if (d->name[0])
            ag->ntpls++;
    }
}

static void evict(struct ctl *c, struct agent *ag);

static void on_deleted(struct ctl *c, struct preq *r, const msgpack_object *resp,
                       const struct sp_err *err)
{
    struct agent *ag = r->ag;
    (void)err;
    preq_free(c, r);
    ag->tpl_evicting = false;
    if (!resp)
        return; /* the agent is gone */
    if (sp_map_get(resp, "result")) {
        ag->tpl_evicted++;
        tpl_refresh(c, ag); /* and on, until under the budget */
        return;
    }
    /* Refused (a slot took it meanwhile, or one being reset still stands
     * on it): learn the truth now, try again in a second. */
    ag->tpl_retry_at = ev_now(c->loop) + 1.0;
    tpl_refresh(c, ag);
}

void tpl_tick(struct ctl *c, struct agent *ag, ev_tstamp now)
{
    if (ag->tpl_retry_at && now >= ag->tpl_retry_at && ag->state == AG_READY) {
        ag->tpl_retry_at = 0;
        tpl_refresh(c, ag);
    }
}

/* Over the budget: delete the least recently used template nothing
 * stands on (the agent refuses one in use, so a race only costs a try). */
static void evict(struct ctl *c, struct agent *ag)
{
    uint64_t budget = ag->prof->template_budget, total = 0;
    if (!budget || ag->tpl_evicting || ag->tpl_retry_at || ag->state != AG_READY)
        return;
    struct ctl_tpl *lru = NULL;
    for (uint32_t i = 0; i < ag->ntpls; i++) {
        struct ctl_tpl *t = &ag->tpls[i];
        total += t->size;
        bool is_base = false;
        for (uint32_t j = 0; j < ag->ntpls; j++)
            is_base |= !strcmp(ag->tpls[j].base, t->name);
        if (!t->in_use && !is_base && (!lru || t->last_used_ms < lru->last_used_ms))
            lru = t;
    }
    if (total <= budget || !lru)
        return;
    log_info("agent %s: templates use %llu bytes, budget %llu: deleting '%s' (least recently "
             "used)",
             ag->id, (unsigned long long)total, (unsigned long long)budget, lru->name);
    ag->tpl_evicting = true;
    struct preq *r = agent_req_new(ag, NULL, on_deleted);
    msgpack_packer pk;
    agent_send_begin(ag, r, "template_delete", &pk);
    msgpack_pack_map(&pk, 1);
    sp_pack_kv_str(&pk, "name", lru->name);
    agent_send_end(c, ag, r);
    /* Gone for placement from now on: a lease sent meanwhile must not count
     * on it (an acquire with its recipe builds it again). */
    *lru = ag->tpls[--ag->ntpls];
}

static void on_list(struct ctl *c, struct preq *r, const msgpack_object *resp,
                    const struct sp_err *err)
{
    struct agent *ag = r->ag;
    (void)err;
    preq_free(c, r);
    const msgpack_object *res = resp ? sp_map_get(resp, "result") : NULL;
    if (!res)
        return; /* lost, or an agent without templates: it holds none */
    learn(ag, sp_map_get(res, "templates"));
    evict(c, ag);
}

void tpl_refresh(struct ctl *c, struct agent *ag)
{
    struct preq *r = agent_req_new(ag, NULL, on_list);
    msgpack_packer pk;
    agent_send_begin(ag, r, "template_list", &pk);
    msgpack_pack_map(&pk, 0);
    agent_send_end(c, ag, r);
}

void tpl_pack_all(struct ctl *c, msgpack_packer *pk, const struct profile *only)
{
    uint32_t n = 0;
    struct profile *p;
    struct agent *ag;
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link) n += (!only || p == only) && ag->state == AG_READY;
    msgpack_pack_map(pk, 1);
    sp_pack_cstr(pk, "agents");
    msgpack_pack_array(pk, n);
    TAILQ_FOREACH(p, &c->profiles, link)
    TAILQ_FOREACH(ag, &p->agents, link)
    {
        if ((only && p != only) || ag->state != AG_READY)
            continue;
        uint32_t building = 0;
        for (uint32_t i = 0; i < ag->nslots; i++)
            building += ag->slots[i].state == SL_BUILDING;
        msgpack_pack_map(pk, 6);
        sp_pack_kv_str(pk, "agent", ag->id);
        sp_pack_kv_str(pk, "profile", p->name);
        sp_pack_kv_uint(pk, "building", building);
        sp_pack_kv_uint(pk, "builds", ag->tpl_builds);
        sp_pack_kv_uint(pk, "evicted", ag->tpl_evicted);
        sp_pack_cstr(pk, "templates");
        msgpack_pack_array(pk, ag->ntpls);
        for (uint32_t i = 0; i < ag->ntpls; i++) {
            const struct ctl_tpl *t = &ag->tpls[i];
            msgpack_pack_map(pk, 9);
            sp_pack_kv_str(pk, "name", t->name);
            sp_pack_kv_uint(pk, "layers", t->layers);
            sp_pack_kv_uint(pk, "created_ms", t->created_ms);
            if (t->base[0])
                sp_pack_kv_str(pk, "base", t->base);
            else
                sp_pack_kv_nil(pk, "base");
            sp_pack_kv_uint(pk, "size", t->size);
            sp_pack_kv_uint(pk, "files", t->files);
            sp_pack_kv_uint(pk, "in_use", t->in_use);
            sp_pack_kv_uint(pk, "last_used_ms", t->last_used_ms);
            sp_pack_kv_uint(pk, "build_ms", t->build_ms);
        }
    }
}
