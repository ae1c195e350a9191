/* The modal backend: each agent is the long-lived process of its own Modal
 * Sandbox, named APP-AGENT_ID (so a restarted controller finds it by name),
 * and the controller reaches it through slot-modal-bridge
 * (controller/modal/), which runs `slot-agent --attach` with Sandbox.exec
 * and pumps its stdio. This file only turns the profile's Modal fields into
 * the exec backend's launch, stop and list templates; the exec machinery
 * does the rest. Agents outlive the controller, like socket-mode agents. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"

#define MODAL_NAME_MAX 64
/* Modal's cap on a sandbox's lifetime (its `timeout`): 24 h. */
#define MODAL_MAX_LIFETIME_MS (24ull * 3600 * 1000)
/* Below this, Modal's idle timeout may end a sandbox during a reconnect or a
 * controller restart (no bridge attached: no exec runs, so Modal sees no
 * activity); the profile's reconnect_timeout raises the bar. */
#define MODAL_IDLE_FLOOR_MS (60ull * 1000)

static bool modal_name_ok(const char *s)
{
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '.' && *s != '_' && *s != '-')
            return false;
    return true;
}

static bool truthy(const char *s)
{
    return s && (!strcmp(s, "true") || !strcmp(s, "1") || !strcmp(s, "yes"));
}

static int modal_check(struct ctl *c, struct profile *p, struct sp_err *err)
{
    if (p->exec_launch.n || p->exec_start.n || p->exec_stop.n || p->exec_list.n)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': a modal profile makes its own exec templates; set "
                       "modal.bridge to run another bridge command",
                       p->name);
    if (!p->modal.app)
        p->modal.app = strdup("slot");
    /* Modal names: at most 64 of [A-Za-z0-9._-]; ours are APP-PROFILE-xxxxxx. */
    if (!*p->modal.app || !modal_name_ok(p->modal.app) || !modal_name_ok(p->name) ||
        strlen(p->modal.app) + strlen(p->name) + 8 > MODAL_NAME_MAX)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': sandbox names APP-PROFILE-xxxxxx must be at most %d "
                       "characters of A-Z a-z 0-9 . _ - (modal.app '%s')",
                       p->name, MODAL_NAME_MAX, p->modal.app);
    const char *on_signal = p->modal.on_signal ? p->modal.on_signal : "detach";
    if (strcmp(on_signal, "detach") && strcmp(on_signal, "terminate"))
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': modal.on_signal is detach or terminate, not '%s'", p->name,
                       on_signal);
    if (p->modal.timeout_ms > MODAL_MAX_LIFETIME_MS)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': modal.timeout is %llu s; Modal sandboxes live at most "
                       "%llu s (24 h)",
                       p->name, (unsigned long long)((p->modal.timeout_ms + 999) / 1000),
                       (unsigned long long)(MODAL_MAX_LIFETIME_MS / 1000));
    if (p->max_lifetime_ms > MODAL_MAX_LIFETIME_MS)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': max_lifetime is %llu s; Modal sandboxes live at most "
                       "%llu s (24 h)",
                       p->name, (unsigned long long)((p->max_lifetime_ms + 999) / 1000),
                       (unsigned long long)(MODAL_MAX_LIFETIME_MS / 1000));
    if (p->modal.timeout_ms && p->max_lifetime_ms > p->modal.timeout_ms)
        log_warn("profile '%s': max_lifetime (%llu s) is longer than modal.timeout (%llu s): "
                 "Modal ends the sandboxes before the controller drains them",
                 p->name, (unsigned long long)(p->max_lifetime_ms / 1000),
                 (unsigned long long)(p->modal.timeout_ms / 1000));
    uint64_t idle_floor = p->reconnect_timeout_ms > MODAL_IDLE_FLOOR_MS ? p->reconnect_timeout_ms
                                                                        : MODAL_IDLE_FLOOR_MS;
    if (p->modal.idle_timeout_ms && p->modal.idle_timeout_ms < idle_floor)
        log_warn("profile '%s': modal.idle_timeout is %llu s, less than %llu s (60 s, or "
                 "reconnect_timeout if longer): Modal counts only execs as activity, so it may "
                 "end a sandbox while no bridge is attached (a reconnect, a controller restart) "
                 "and its agent is lost",
                 p->name, (unsigned long long)((p->modal.idle_timeout_ms + 999) / 1000),
                 (unsigned long long)(idle_floor / 1000));
    if (!p->modal.bridge.n) {
        char *b = ctl_find_program("slot-modal-bridge");
        if (!b)
            return sp_errf(err, SP_NOT_FOUND,
                           "profile '%s': slot-modal-bridge is neither beside slot-controller "
                           "nor on PATH; install it or set modal.bridge",
                           p->name);
        strlist_add(&p->modal.bridge, b);
        free(b);
    }
    char name[MODAL_NAME_MAX + 32], prefix[MODAL_NAME_MAX + 8], strip[MODAL_NAME_MAX + 8];
    char num[64];
    snprintf(name, sizeof name, "%s-{agent_id}", p->modal.app);
    snprintf(prefix, sizeof prefix, "%s-%s-", p->modal.app, p->name);
    snprintf(strip, sizeof strip, "%s-", p->modal.app);

    struct strlist *l = &p->exec_launch;
    strlist_extend(l, &p->modal.bridge);
    strlist_add(l, "attach");
    strlist_add(l, "--app");
    strlist_add(l, p->modal.app);
    strlist_add(l, "--name");
    strlist_add(l, name);
    strlist_add(l, "--slots");
    strlist_add(l, "{slots}");
    strlist_add(l, "--agent-bin");
    strlist_add(l, "{agent_bin}");
    strlist_add(l, "--workdir");
    strlist_add(l, p->workdir ? p->workdir : "/workspace");
    /* Modal's own lifetime cap: past max_lifetime the controller drains the
     * agent; the extra hour (within Modal's 24 h) lets its last leases finish. */
    uint64_t tmo = p->modal.timeout_ms  ? p->modal.timeout_ms
                   : p->max_lifetime_ms ? p->max_lifetime_ms + 3600 * 1000
                                        : MODAL_MAX_LIFETIME_MS;
    if (tmo > MODAL_MAX_LIFETIME_MS)
        tmo = MODAL_MAX_LIFETIME_MS;
    snprintf(num, sizeof num, "%llu", (unsigned long long)((tmo + 999) / 1000));
    strlist_add(l, "--timeout");
    strlist_add(l, num);
    /* Only when set: without it Modal never ends an idle sandbox, so one the
     * controller holds survives any time without a bridge (until `timeout`). */
    if (p->modal.idle_timeout_ms) {
        snprintf(num, sizeof num, "%llu",
                 (unsigned long long)((p->modal.idle_timeout_ms + 999) / 1000));
        strlist_add(l, "--idle-timeout");
        strlist_add(l, num);
    }
    strlist_add(l, "--on-signal");
    strlist_add(l, on_signal);
    if (p->image) {
        strlist_add(l, "--image");
        strlist_add(l, "{image}");
    }
    if (p->cpu > 0) {
        strlist_add(l, "--cpu");
        strlist_add(l, "{cpu}");
    }
    if (p->memory) {
        strlist_add(l, "--memory");
        strlist_add(l, "{memory_mb}");
    }
    if (p->gpu && *p->gpu) {
        strlist_add(l, "--gpu");
        strlist_add(l, "{gpu}");
    }
    if (*p->isolation) {
        strlist_add(l, "--isolation");
        strlist_add(l, "{isolation}");
    }
    /* Only when set: unset is the agent's default (its 0 is no budget). */
    if (p->slot_disk) {
        strlist_add(l, "--slot-disk");
        strlist_add(l, "{slot_disk}");
    }
    if (p->slot_inodes) {
        strlist_add(l, "--slot-inodes");
        strlist_add(l, "{slot_inodes}");
    }
    for (size_t i = 0; i < p->secrets.n; i++) {
        strlist_add(l, "--secret");
        strlist_add(l, p->secrets.v[i]);
    }
    for (size_t i = 0; i < p->env.n; i++) {
        strlist_add(l, "--env");
        strlist_add(l, p->env.v[i]);
    }
    if (truthy(p->modal.block_network))
        strlist_add(l, "--block-network");
    for (size_t i = 0; i < p->modal.cidr_allowlist.n; i++) {
        strlist_add(l, "--cidr-allowlist");
        strlist_add(l, p->modal.cidr_allowlist.v[i]);
    }

    strlist_extend(&p->exec_stop, &p->modal.bridge);
    strlist_add(&p->exec_stop, "terminate");
    strlist_add(&p->exec_stop, "--app");
    strlist_add(&p->exec_stop, p->modal.app);
    strlist_add(&p->exec_stop, "--name");
    strlist_add(&p->exec_stop, name);

    strlist_extend(&p->exec_list, &p->modal.bridge);
    strlist_add(&p->exec_list, "list");
    strlist_add(&p->exec_list, "--app");
    strlist_add(&p->exec_list, p->modal.app);
    strlist_add(&p->exec_list, "--prefix");
    strlist_add(&p->exec_list, prefix);
    strlist_add(&p->exec_list, "--strip");
    strlist_add(&p->exec_list, strip);
    return backend_exec.check(c, p, err);
}

/* The sandbox outlives the bridge and the controller; `stop` terminates it. */
static bool modal_persistent(const struct profile *p)
{
    (void)p;
    return true;
}

static int modal_start(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    return backend_exec.start_agent(c, ag, err);
}

static void modal_stop(struct ctl *c, struct agent *ag)
{
    backend_exec.stop_agent(c, ag);
}

static int modal_list(struct ctl *c, struct profile *p)
{
    return backend_exec.list_agents(c, p);
}

static int modal_attach(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    return backend_exec.attach(c, ag, err);
}

/* A bridge ended: `slot-modal-bridge list` prints only sandboxes that answer
 * "running" to a poll, so a listed agent is one to attach to again. */
static void modal_probe(struct ctl *c, struct agent *ag, probe_done_fn done)
{
    backend_exec.probe(c, ag, done);
}

const struct backend backend_modal = {
    .name = "modal",
    .start_agent = modal_start,
    .stop_agent = modal_stop,
    .list_agents = modal_list,
    .attach = modal_attach,
    .check = modal_check,
    .persistent = modal_persistent,
    .probe = modal_probe,
};
