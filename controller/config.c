/* Configuration: the YAML file (libyaml), then SLOT_<FIELD> and
 * SLOT_PROFILE_<NAME>_<FIELD> environment variables, then command-line
 * settings, each overriding the one before. Owns the profile field table,
 * so a field is added in one place and is at once settable from all three
 * sources and reported by the `profiles` op. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "ctl.h"
#include "tls_ca.h"

enum ftype {
    F_STR,
    F_DOUBLE,
    F_U32,
    F_DURATION,
    F_SIZE,
    F_COUNT,
    F_LIST,
    F_ENV,
    F_BACKEND,
    F_ISOLATION,
    F_LOCAL_MODE,
    F_ARGV,
    F_TLS_MODE
};

struct field {
    const char *name; /* dotted for blocks: local.mode */
    enum ftype type;
    size_t off;
    const char *help;
    bool alias; /* another name of the field before it with the same offset */
};

#define PF(f) offsetof(struct profile, f)
static const struct field fields[] = {
    {"backend", F_BACKEND, PF(backend), "where agents run: local, exec, nomad, modal or slurm"},
    {"image", F_STR, PF(image), "container image (container backends; recorded for local)"},
    {"cpu", F_DOUBLE, PF(cpu), "CPUs per agent (container backends)"},
    {"memory", F_SIZE, PF(memory), "memory per agent; local: split over its slots"},
    {"gpu", F_STR, PF(gpu), "GPUs per agent (container backends)"},
    {"slots_per_agent", F_U32, PF(slots_per_agent), "slots in each agent"},
    {"min_agents", F_U32, PF(min_agents), "agents kept running even when idle"},
    {"min_pool", F_U32, PF(min_agents), "the same as min_agents", true},
    {"max_agents", F_U32, PF(max_agents), "upper bound on agents"},
    {"max_pool", F_U32, PF(max_agents), "the same as max_agents", true},
    {"max_starts_per_second", F_DOUBLE, PF(max_starts_per_second), "agent start rate cap"},
    {"idle_timeout", F_DURATION, PF(idle_timeout_ms), "stop agents without leases after this"},
    {"scale_down_idle", F_DURATION, PF(idle_timeout_ms), "the same as idle_timeout", true},
    {"max_lifetime", F_DURATION, PF(max_lifetime_ms), "drain agents older than this (0: never)"},
    {"acquire_timeout", F_DURATION, PF(acquire_timeout_ms), "default acquire wait"},
    {"exec_timeout", F_DURATION, PF(exec_timeout_ms), "default command timeout"},
    {"lease_timeout", F_DURATION, PF(lease_timeout_ms),
     "release (with reset) leases unused this long (0: never)"},
    {"lease_grace", F_DURATION, PF(lease_grace_ms),
     "release (with reset) a trainer's bound leases this long after its last connection went"},
    {"start_timeout", F_DURATION, PF(start_timeout_ms), "an agent not ready by then failed"},
    {"reconnect_timeout", F_DURATION, PF(reconnect_timeout_ms),
     "an agent whose stream ended is reconnected for this long (0: lost at once)"},
    {"template_disk_budget", F_SIZE, PF(template_budget),
     "per agent: unused templates past this much disk are deleted, least recently used first "
     "(0: no limit)"},
    {"slot_disk", F_SIZE, PF(slot_disk),
     "per slot disk budget passed to agents as --slot-disk (0: agent's default)"},
    {"slot_inodes", F_COUNT, PF(slot_inodes),
     "per slot files+dirs budget passed to agents as --slot-inodes (0: agent's default)"},
    {"env", F_ENV, PF(env), "environment added to every command"},
    {"env_vars", F_ENV, PF(env), "the same as env", true},
    {"secrets", F_LIST, PF(secrets),
     "controller env vars passed to commands, never shown; modal: Modal Secret names"},
    {"workdir", F_STR, PF(workdir), "modal: the sandbox's working directory (default /workspace)"},
    {"isolation", F_ISOLATION, PF(isolation), "best_effort or required"},
    {"workspace_base", F_STR, PF(workspace_base), "directory holding agents' data dirs"},
    {"local.mode", F_LOCAL_MODE, PF(local_mode), "stdio (children) or socket (detached)"},
    {"local.agent", F_STR, PF(local_agent), "slot-agent binary"},
    {"local.args", F_LIST, PF(local_args), "extra slot-agent arguments"},
    {"exec.launch", F_ARGV, PF(exec_launch), "argv whose stdin/stdout is the agent's stream"},
    {"exec.start", F_ARGV, PF(exec_start), "argv run first to start an agent daemon (optional)"},
    {"exec.stop", F_ARGV, PF(exec_stop), "argv run to stop an agent (optional)"},
    {"exec.list", F_ARGV, PF(exec_list), "argv printing living agent ids, one a line (optional)"},
    {"exec.command_timeout", F_DURATION, PF(exec_command_timeout_ms),
     "time allowed to start, stop and list commands"},
    {"nomad.addr", F_STR, PF(nomad.addr),
     "Nomad API: http(s)://HOST:PORT or unix:///PATH ($NOMAD_ADDR)"},
    {"nomad.token", F_STR, PF(nomad.token), "ACL token ($NOMAD_TOKEN); never shown"},
    {"nomad.cacert", F_STR, PF(nomad.cacert), "CA file ($NOMAD_CACERT)"},
    {"nomad.capath", F_STR, PF(nomad.capath), "CA directory ($NOMAD_CAPATH)"},
    {"nomad.client_cert", F_STR, PF(nomad.client_cert), "client certificate ($NOMAD_CLIENT_CERT)"},
    {"nomad.client_key", F_STR, PF(nomad.client_key), "client key ($NOMAD_CLIENT_KEY)"},
    {"nomad.tls_server_name", F_STR, PF(nomad.tls_server_name),
     "verify the server as this name ($NOMAD_TLS_SERVER_NAME)"},
    {"nomad.skip_verify", F_STR, PF(nomad.skip_verify),
     "true: no TLS verification ($NOMAD_SKIP_VERIFY)"},
    {"nomad.namespace", F_STR, PF(nomad.ns), "namespace ($NOMAD_NAMESPACE)"},
    {"nomad.region", F_STR, PF(nomad.region), "region ($NOMAD_REGION)"},
    {"nomad.job", F_STR, PF(nomad.job), "HCL2 job template file (nomad/*.nomad.hcl)"},
    {"nomad.vars", F_ENV, PF(nomad.vars), "template variables, NAME: value"},
    {"nomad.port_label", F_STR, PF(nomad.port_label), "the agent's port label (default agent)"},
    {"modal.app", F_STR, PF(modal.app), "Modal app holding the sandboxes (default slot)"},
    {"modal.bridge", F_ARGV, PF(modal.bridge),
     "the bridge command (default slot-modal-bridge beside slot-controller, else PATH)"},
    {"modal.timeout", F_DURATION, PF(modal.timeout_ms),
     "sandbox lifetime cap (default max_lifetime + 1h, else 24h)"},
    {"modal.idle_timeout", F_DURATION, PF(modal.idle_timeout_ms),
     "Modal's own idle timeout (a connected agent is never idle to Modal)"},
    {"modal.block_network", F_STR, PF(modal.block_network), "true: no network in the sandbox"},
    {"modal.cidr_allowlist", F_LIST, PF(modal.cidr_allowlist), "outbound CIDRs allowed"},
    {"modal.on_signal", F_STR, PF(modal.on_signal),
     "what a bridge told to stop does: detach (default) or terminate"},
    {"tls", F_TLS_MODE, PF(tls_mode),
     "TLS to the agents: on (default where the controller opens TCP: nomad; exec when its "
     "templates use {tls_*}) or off (plaintext tcp:, the agents need --insecure)"},
    {"tls.cert", F_STR, PF(tls_cert),
     "a site's own certificate file for the agents (then none is issued; with tls.key, tls.ca)"},
    {"tls.key", F_STR, PF(tls_key), "the key of tls.cert"},
    {"tls.ca", F_STR, PF(tls_ca),
     "the CA the agents' certificates chain to and the controller's client certificate must "
     "chain to"},
    {"slurm.partition", F_STR, PF(slurm.partition), "sbatch --partition"},
    {"slurm.account", F_STR, PF(slurm.account), "sbatch --account"},
    {"slurm.qos", F_STR, PF(slurm.qos), "sbatch --qos"},
    {"slurm.constraint", F_STR, PF(slurm.constraint), "sbatch --constraint"},
    {"slurm.reservation", F_STR, PF(slurm.reservation), "sbatch --reservation"},
    {"slurm.sbatch_args", F_LIST, PF(slurm.sbatch_args), "more sbatch arguments"},
    {"slurm.srun_args", F_LIST, PF(slurm.srun_args), "more arguments of the attach srun"},
    {"slurm.workspace", F_STR, PF(slurm.workspace),
     "agents' directories on the node (default /var/tmp/slot-slurm; $VARS of the job expand)"},
    {"slurm.agent", F_STR, PF(slurm.agent),
     "the agent's path where the job runs (default: the controller's agent; in a container "
     "image /usr/local/bin/slot-agent)"},
    {"slurm.container", F_ARGV, PF(slurm.container),
     "argv before the agent, e.g. [apptainer, exec, \"{image}\"]"},
    {"slurm.helper", F_ARGV, PF(slurm.helper),
     "the slot-slurm command (default beside slot-controller, else PATH)"},
};
#define NFIELDS (sizeof fields / sizeof fields[0])

void strlist_add(struct strlist *l, const char *s)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v)
        abort();
    l->v = v;
    l->v[l->n++] = strdup(s);
}

void strlist_extend(struct strlist *l, const struct strlist *src)
{
    for (size_t i = 0; i < src->n; i++)
        strlist_add(l, src->v[i]);
}

void strlist_clear(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* "a 'b c' \"d\"" -> [a, b c, d]: quotes group, backslash escapes; no
 * expansion of any kind (templates never go through a shell). */
static int split_words(const char *v, struct strlist *out, char *why, size_t whylen)
{
    size_t n = strlen(v);
    char *w = malloc(n + 1);
    if (!w)
        abort();
    const char *p = v;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        if (!*p)
            break;
        size_t k = 0;
        char q = 0;
        while (*p && (q || (*p != ' ' && *p != '\t' && *p != '\n'))) {
            if (!q && (*p == '\'' || *p == '"'))
                q = *p++;
            else if (q && *p == q) {
                q = 0;
                p++;
            } else if (*p == '\\' && q != '\'' && p[1]) {
                w[k++] = p[1];
                p += 2;
            } else
                w[k++] = *p++;
        }
        if (q) {
            snprintf(why, whylen, "unterminated %c quote in '%s'", q, v);
            free(w);
            return -1;
        }
        w[k] = 0;
        strlist_add(out, w);
    }
    free(w);
    return 0;
}

static const struct field *field_find(const char *name)
{
    for (size_t i = 0; i < NFIELDS; i++)
        if (!strcmp(fields[i].name, name))
            return &fields[i];
    return NULL;
}

static struct profile *profile_new(struct ctl *c, const char *name)
{
    struct profile *p = calloc(1, sizeof *p);
    if (!p)
        abort();
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->backend, sizeof p->backend, "local");
    p->slots_per_agent = 4;
    p->min_agents = 0;
    p->max_agents = 8;
    p->max_starts_per_second = 10;
    p->idle_timeout_ms = 300000;
    p->acquire_timeout_ms = 60000;
    p->exec_timeout_ms = 600000;
    /* A crashed trainer's leases must not hold slots forever; 30 min is
     * longer than any one tool call a trainer waits for. */
    p->lease_timeout_ms = 1800000;
    p->lease_grace_ms = 60000;
    p->start_timeout_ms = 30000;
    p->reconnect_timeout_ms = 60000;
    p->exec_command_timeout_ms = 120000;
    TAILQ_INIT(&p->agents);
    TAILQ_INIT(&p->waiters);
    TAILQ_INSERT_TAIL(&c->profiles, p, link);
    return p;
}

struct profile *profile_find(struct ctl *c, const char *name, size_t n)
{
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    if (strlen(p->name) == n && !memcmp(p->name, name, n))
        return p;
    return NULL;
}

/* "30", "30s", "500ms", "5m", "2h" -> ms. Bare numbers are seconds. */
static int parse_duration(const char *s, uint64_t *ms)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v < 0 || !isfinite(v))
        return -1;
    double mult = 1000;
    if (!strcmp(end, "ms"))
        mult = 1;
    else if (!strcmp(end, "s") || !*end)
        mult = 1000;
    else if (!strcmp(end, "m"))
        mult = 60000;
    else if (!strcmp(end, "h"))
        mult = 3600000;
    else if (!strcmp(end, "d"))
        mult = 86400000;
    else
        return -1;
    if (v * mult > 1e15)
        return -1;
    *ms = (uint64_t)(v * mult + 0.5);
    return 0;
}

/* "1073741824", "512M", "2G", "2Gi", "1.5GB" -> bytes. */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v < 0 || !isfinite(v))
        return -1;
    double mult = 1;
    switch (toupper((unsigned char)*end)) {
    case 0: break;
    case 'K': mult = 1024.0; break;
    case 'M': mult = 1024.0 * 1024; break;
    case 'G': mult = 1024.0 * 1024 * 1024; break;
    case 'T': mult = 1024.0 * 1024 * 1024 * 1024; break;
    default: return -1;
    }
    if (*end) {
        const char *u = end + 1;
        if (*u == 'i')
            u++;
        if (toupper((unsigned char)*u) == 'B')
            u++;
        if (*u)
            return -1;
    }
    if (v * mult > 1e18)
        return -1;
    *out = (uint64_t)(v * mult);
    return 0;
}

/* "5000", "500K", "2M" -> a count: K and M are 10^3 and 10^6, as the
 * agent's --slot-inodes reads them. */
static int parse_count(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t mult = 1;
    if (*end == 'k' || *end == 'K')
        mult = 1000, end++;
    else if (*end == 'm' || *end == 'M')
        mult = 1000000, end++;
    if (errno || *end || v > UINT64_MAX / 1000000)
        return -1;
    *out = (uint64_t)v * mult;
    return 0;
}

static int set_str(char **dst, const char *v)
{
    free(*dst);
    *dst = *v ? strdup(v) : NULL;
    return 0;
}

/* Set one field from a string (env, flags, YAML scalars). Lists and env maps
 * take comma-separated items. Returns 0, or -1 with a reason in why. */
static int field_set(struct profile *p, const struct field *f, const char *v, char *why,
                     size_t whylen)
{
    char *base = (char *)p + f->off;
    char *end;
    switch (f->type) {
    case F_STR: return set_str((char **)base, v);
    case F_DOUBLE: {
        errno = 0;
        double d = strtod(v, &end);
        if (end == v || *end || errno || d < 0 || !isfinite(d)) {
            snprintf(why, whylen, "expected a non-negative number, got '%s'", v);
            return -1;
        }
        *(double *)base = d;
        return 0;
    }
    case F_U32: {
        errno = 0;
        unsigned long long u = strtoull(v, &end, 10);
        if (end == v || *end || errno || u > 1000000 || *v == '-') {
            snprintf(why, whylen, "expected an integer 0..1000000, got '%s'", v);
            return -1;
        }
        *(uint32_t *)base = (uint32_t)u;
        return 0;
    }
    case F_DURATION:
        if (parse_duration(v, (uint64_t *)base) < 0) {
            snprintf(why, whylen, "expected a duration (30, 30s, 500ms, 5m, 2h), got '%s'", v);
            return -1;
        }
        return 0;
    case F_SIZE:
        if (parse_size(v, (uint64_t *)base) < 0) {
            snprintf(why, whylen, "expected a size (bytes, or 512M, 2G), got '%s'", v);
            return -1;
        }
        return 0;
    case F_COUNT:
        if (parse_count(v, (uint64_t *)base) < 0) {
            snprintf(why, whylen, "expected a count (5000, or 500K, 2M), got '%s'", v);
            return -1;
        }
        return 0;
    case F_LIST:
    case F_ENV: {
        struct strlist *l = (struct strlist *)base;
        strlist_clear(l);
        char *dup = strdup(v), *save = NULL;
        for (char *tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            while (*tok == ' ')
                tok++;
            if (!*tok)
                continue;
            if (f->type == F_ENV && (!strchr(tok, '=') || *tok == '=')) {
                snprintf(why, whylen, "expected KEY=VALUE items separated by commas, got '%s'",
                         tok);
                free(dup);
                return -1;
            }
            strlist_add(l, tok);
        }
        free(dup);
        return 0;
    }
    case F_ARGV: {
        struct strlist *l = (struct strlist *)base;
        strlist_clear(l);
        return split_words(v, l, why, whylen);
    }
    case F_BACKEND:
        if (!backend_find(v)) {
            snprintf(why, whylen,
                     "unknown backend '%s' (available: local, exec, nomad, modal, slurm)", v);
            return -1;
        }
        snprintf(base, sizeof p->backend, "%s", v);
        return 0;
    case F_ISOLATION:
        if (*v && strcmp(v, "best_effort") && strcmp(v, "required")) {
            snprintf(why, whylen, "expected best_effort or required, got '%s'", v);
            return -1;
        }
        snprintf(base, sizeof p->isolation, "%s", v);
        return 0;
    case F_TLS_MODE:
        if (*v && strcmp(v, "on") && strcmp(v, "off") && strcmp(v, "true") && strcmp(v, "false")) {
            snprintf(why, whylen, "expected on or off, got '%s'", v);
            return -1;
        }
        snprintf(base, sizeof p->tls_mode, "%s",
                 !strcmp(v, "true")    ? "on"
                 : !strcmp(v, "false") ? "off"
                                       : v);
        return 0;
    case F_LOCAL_MODE:
        if (!strcmp(v, "stdio"))
            *(enum local_mode *)base = LOCAL_STDIO;
        else if (!strcmp(v, "socket"))
            *(enum local_mode *)base = LOCAL_SOCKET;
        else {
            snprintf(why, whylen, "expected stdio or socket, got '%s'", v);
            return -1;
        }
        return 0;
    }
    return -1;
}

/* ---- YAML ---------------------------------------------------------------- */

struct yctx {
    const char *file;
    yaml_document_t *doc;
    struct sp_err *err;
};

static int yerr(struct yctx *y, const yaml_node_t *n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int yerr(struct yctx *y, const yaml_node_t *n, const char *fmt, ...)
{
    char msg[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return sp_errf(y->err, SP_BAD_REQUEST, "%s:%lu: %s", y->file,
                   n ? (unsigned long)n->start_mark.line + 1 : 0UL, msg);
}

static const char *scalar(const yaml_node_t *n)
{
    return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static yaml_node_t *node(struct yctx *y, int i)
{
    return yaml_document_get_node(y->doc, i);
}

static int yaml_field(struct yctx *y, struct profile *p, const struct field *f, yaml_node_t *v)
{
    char why[160];
    if (f->type == F_LIST || f->type == F_ENV || f->type == F_ARGV) {
        struct strlist *l = (struct strlist *)((char *)p + f->off);
        if (f->type == F_ENV && v->type == YAML_MAPPING_NODE) {
            strlist_clear(l);
            for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top;
                 pr++) {
                const char *k = scalar(node(y, pr->key)), *val = scalar(node(y, pr->value));
                if (!k || !val || !*k || strchr(k, '='))
                    return yerr(y, node(y, pr->key), "profile '%s' %s: entries must be NAME: value",
                                p->name, f->name);
                size_t len = strlen(k) + strlen(val) + 2;
                char *kv = malloc(len);
                snprintf(kv, len, "%s=%s", k, val);
                strlist_add(l, kv);
                free(kv);
            }
            return 0;
        }
        if ((f->type == F_LIST || f->type == F_ARGV) && v->type == YAML_SEQUENCE_NODE) {
            strlist_clear(l);
            for (yaml_node_item_t *it = v->data.sequence.items.start;
                 it < v->data.sequence.items.top; it++) {
                const char *s = scalar(node(y, *it));
                if (!s)
                    return yerr(y, node(y, *it), "profile '%s' %s: items must be strings", p->name,
                                f->name);
                strlist_add(l, s);
            }
            return 0;
        }
    }
    const char *s = scalar(v);
    if (!s)
        return yerr(y, v, "profile '%s' field '%s': expected a %s", p->name, f->name,
                    f->type == F_ENV                         ? "map of NAME: value"
                    : f->type == F_LIST || f->type == F_ARGV ? "list"
                                                             : "scalar");
    if (field_set(p, f, s, why, sizeof why) < 0)
        return yerr(y, v, "profile '%s' field '%s': %s", p->name, f->name, why);
    return 0;
}

static int yaml_profile(struct yctx *y, struct profile *p, yaml_node_t *m, const char *prefix)
{
    if (m->type != YAML_MAPPING_NODE)
        return yerr(y, m, "profile '%s'%s%s: expected a map", p->name, *prefix ? " block " : "",
                    prefix);
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *kn = node(y, pr->key), *vn = node(y, pr->value);
        const char *k = scalar(kn);
        if (!k)
            return yerr(y, kn, "profile '%s': keys must be strings", p->name);
        char full[96];
        snprintf(full, sizeof full, "%s%s%s", prefix, *prefix ? "." : "", k);
        if (!*prefix && (!strcmp(k, "local") || !strcmp(k, "exec") || !strcmp(k, "nomad") ||
                         !strcmp(k, "modal") || !strcmp(k, "slurm") ||
                         (!strcmp(k, "tls") && vn->type == YAML_MAPPING_NODE))) {
            if (yaml_profile(y, p, vn, k) < 0)
                return -1;
            continue;
        }
        const struct field *f = field_find(full);
        if (!f)
            return yerr(y, kn, "unknown key '%s' in profile '%s'", full, p->name);
        if (yaml_field(y, p, f, vn) < 0)
            return -1;
    }
    return 0;
}

static int yaml_controller(struct yctx *y, struct ctl *c, yaml_node_t *m, struct config_opts *o)
{
    if (m->type != YAML_MAPPING_NODE)
        return yerr(y, m, "'controller' must be a map");
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *kn = node(y, pr->key), *vn = node(y, pr->value);
        const char *k = scalar(kn), *v = scalar(vn);
        if (!k)
            return yerr(y, kn, "controller: keys must be strings");
        if (!strcmp(k, "listen")) {
            strlist_clear(&c->listen);
            if (vn->type == YAML_SEQUENCE_NODE) {
                for (yaml_node_item_t *it = vn->data.sequence.items.start;
                     it < vn->data.sequence.items.top; it++) {
                    const char *s = scalar(node(y, *it));
                    if (!s)
                        return yerr(y, vn, "controller.listen: items must be strings");
                    strlist_add(&c->listen, s);
                }
                continue;
            }
        }
        if (!v)
            return yerr(y, vn, "controller.%s: expected a scalar", k);
        if (!strcmp(k, "listen"))
            strlist_add(&c->listen, v);
        else if (!strcmp(k, "name"))
            snprintf(c->name, sizeof c->name, "%s", v);
        else if (!strcmp(k, "state_dir"))
            set_str(&c->state_dir, v);
        else if (!strcmp(k, "agent_bin"))
            set_str(&c->agent_bin, v);
        else if (!strcmp(k, "default_profile"))
            snprintf(c->default_profile, sizeof c->default_profile, "%s", v);
        else if (!strcmp(k, "log_level")) {
            if (ctl_log_parse_level(v) < 0)
                return yerr(y, vn, "controller.log_level: expected debug|info|warn|error");
            if (!o->log_level)
                ctl_log_set_level(ctl_log_parse_level(v));
        } else if (!strcmp(k, "insecure"))
            c->insecure = !strcmp(v, "true") || !strcmp(v, "yes");
        else if (!strcmp(k, "token_file")) {
            free(c->token);
            c->token = strdup(v);          /* a path until main reads it */
        } else if (!strcmp(k, "tls_cert")) /* the trainer API's (api.c) */
            set_str(&c->api_tls_cert, v);
        else if (!strcmp(k, "tls_key"))
            set_str(&c->api_tls_key, v);
        else if (!strcmp(k, "tls_ca"))
            set_str(&c->api_tls_ca, v);
        else
            return yerr(y, kn,
                        "unknown key '%s' in controller (known: listen, name, state_dir, "
                        "agent_bin, default_profile, log_level, insecure, token_file, tls_cert, "
                        "tls_key, tls_ca)",
                        k);
    }
    return 0;
}

/* Top-level `tls:`: the controller's client identity from a site's PKI
 * (cert, key, ca: then none is issued for it), the lifetime of the
 * certificates the controller issues, more names for its API certificate. */
static int yaml_tls(struct yctx *y, struct ctl *c, yaml_node_t *m)
{
    if (m->type != YAML_MAPPING_NODE)
        return yerr(y, m, "'tls' must be a map (cert, key, ca, cert_lifetime, api_names)");
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *kn = node(y, pr->key), *vn = node(y, pr->value);
        const char *k = scalar(kn), *v = scalar(vn);
        if (k && !strcmp(k, "api_names") && vn->type == YAML_SEQUENCE_NODE) {
            strlist_clear(&c->tls_api_names);
            for (yaml_node_item_t *it = vn->data.sequence.items.start;
                 it < vn->data.sequence.items.top; it++) {
                const char *s = scalar(node(y, *it));
                if (!s)
                    return yerr(y, vn, "tls.api_names: items must be strings");
                strlist_add(&c->tls_api_names, s);
            }
            continue;
        }
        if (!k || !v)
            return yerr(y, vn, "tls.%s: expected a scalar", k ? k : "?");
        if (!strcmp(k, "cert"))
            set_str(&c->tls_cert, v);
        else if (!strcmp(k, "key"))
            set_str(&c->tls_key, v);
        else if (!strcmp(k, "ca"))
            set_str(&c->tls_ca, v);
        else if (!strcmp(k, "cert_lifetime")) {
            if (tls_parse_lifetime(v, &c->tls_lifetime_s) < 0)
                return yerr(y, vn,
                            "tls.cert_lifetime: expected a duration (seconds, or 30m, 24h, "
                            "7d), got '%s'",
                            v);
        } else
            return yerr(y, kn,
                        "unknown key '%s' in tls (known: cert, key, ca, cert_lifetime, api_names)",
                        k);
    }
    return 0;
}

static int load_file(struct ctl *c, struct config_opts *o, struct sp_err *err)
{
    FILE *f = fopen(o->file, "r");
    if (!f)
        return sp_errf(err, SP_NOT_FOUND, "%s: %s", o->file, strerror(errno));
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, f);
    int rc = -1;
    if (!yaml_parser_load(&parser, &doc)) {
        sp_errf(err, SP_BAD_REQUEST, "%s:%lu: YAML error: %s%s%s", o->file,
                (unsigned long)parser.problem_mark.line + 1,
                parser.problem ? parser.problem : "malformed", parser.context ? " " : "",
                parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        fclose(f);
        return -1;
    }
    struct yctx y = {o->file, &doc, err};
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        rc = 0; /* empty file */
        goto out;
    }
    if (root->type != YAML_MAPPING_NODE) {
        yerr(&y, root, "the top level must be a map (controller:, profiles:)");
        goto out;
    }
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top;
         pr++) {
        yaml_node_t *kn = node(&y, pr->key), *vn = node(&y, pr->value);
        const char *k = scalar(kn);
        if (k && !strcmp(k, "controller")) {
            if (yaml_controller(&y, c, vn, o) < 0)
                goto out;
        } else if (k && !strcmp(k, "tls")) {
            if (yaml_tls(&y, c, vn) < 0)
                goto out;
        } else if (k && !strcmp(k, "profiles")) {
            if (vn->type != YAML_MAPPING_NODE) {
                yerr(&y, vn, "'profiles' must be a map of name -> profile");
                goto out;
            }
            for (yaml_node_pair_t *pp = vn->data.mapping.pairs.start;
                 pp < vn->data.mapping.pairs.top; pp++) {
                yaml_node_t *pk = node(&y, pp->key);
                const char *name = scalar(pk);
                size_t nl = name ? strlen(name) : 0;
                bool ok = nl > 0 && nl < CTL_NAME_MAX;
                for (size_t i = 0; ok && i < nl; i++)
                    ok = isalnum((unsigned char)name[i]) || name[i] == '_';
                if (!ok) {
                    yerr(&y, pk, "profile names are 1-%d letters, digits or '_'", CTL_NAME_MAX - 1);
                    goto out;
                }
                if (profile_find(c, name, nl)) {
                    yerr(&y, pk, "profile '%s' defined twice", name);
                    goto out;
                }
                struct profile *p = profile_new(c, name);
                yaml_node_t *body = node(&y, pp->value);
                if (!(body->type == YAML_SCALAR_NODE && !*scalar(body)) &&
                    yaml_profile(&y, p, body, "") < 0)
                    goto out;
            }
        } else {
            yerr(&y, kn, "unknown key '%s' at the top level (known: controller, profiles, tls)",
                 k ? k : "?");
            goto out;
        }
    }
    rc = 0;
out:
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    fclose(f);
    return rc;
}

/* ---- env and flags ------------------------------------------------------- */

static void env_name(char *out, size_t cap, const char *a, const char *b, const char *c)
{
    snprintf(out, cap, "%s%s%s", a, b, c);
    for (char *q = out; *q; q++)
        *q = *q == '.' || *q == '-' ? '_' : (char)toupper((unsigned char)*q);
}

static int apply_env(struct ctl *c, struct sp_err *err)
{
    char why[160], var[160];
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        for (int pass = 0; pass < 2; pass++) {
            for (size_t i = 0; i < NFIELDS; i++) {
                if (pass == 0)
                    env_name(var, sizeof var, "SLOT_", fields[i].name, "");
                else {
                    char pre[96];
                    snprintf(pre, sizeof pre, "SLOT_PROFILE_%s_", p->name);
                    env_name(var, sizeof var, pre, fields[i].name, "");
                }
                const char *v = getenv(var);
                if (v && field_set(p, &fields[i], v, why, sizeof why) < 0)
                    return sp_errf(err, SP_BAD_REQUEST, "environment %s: %s", var, why);
            }
        }
    }
    return 0;
}

static int apply_sets(struct ctl *c, struct config_opts *o, struct sp_err *err)
{
    char why[160];
    for (size_t i = 0; i < o->sets.n; i++) {
        const char *s = o->sets.v[i];
        const char *dot = strchr(s, '.'), *eq = strchr(s, '=');
        if (!dot || !eq || eq < dot)
            return sp_errf(err, SP_BAD_REQUEST, "--set %s: expected PROFILE.FIELD=VALUE", s);
        char fname[64];
        snprintf(fname, sizeof fname, "%.*s", (int)(eq - dot - 1), dot + 1);
        for (char *q = fname; *q; q++)
            if (*q == '-')
                *q = '_';
        const struct field *f = field_find(fname);
        if (!f)
            return sp_errf(err, SP_BAD_REQUEST, "--set %s: unknown profile field '%s'", s, fname);
        bool all = dot == s + 1 && *s == '*';
        struct profile *p;
        if (!all && !profile_find(c, s, (size_t)(dot - s)))
            return sp_errf(err, SP_BAD_REQUEST, "--set %s: no profile '%.*s'", s, (int)(dot - s),
                           s);
        TAILQ_FOREACH(p, &c->profiles, link)
        {
            if (!all && (strlen(p->name) != (size_t)(dot - s) || memcmp(p->name, s, dot - s)))
                continue;
            if (field_set(p, f, eq + 1, why, sizeof why) < 0)
                return sp_errf(err, SP_BAD_REQUEST, "--%s: %s", fname, why);
        }
    }
    return 0;
}

static void profile_destroy(struct profile *p)
{
    free(p->image);
    free(p->gpu);
    free(p->workspace_base);
    free(p->local_agent);
    free(p->tls_cert);
    free(p->tls_key);
    free(p->tls_ca);
    strlist_clear(&p->env);
    strlist_clear(&p->secrets);
    strlist_clear(&p->local_args);
    strlist_clear(&p->exec_launch);
    strlist_clear(&p->exec_start);
    strlist_clear(&p->exec_stop);
    strlist_clear(&p->exec_list);
    char **ns[] = {&p->nomad.addr,
                   &p->nomad.token,
                   &p->nomad.cacert,
                   &p->nomad.capath,
                   &p->nomad.client_cert,
                   &p->nomad.client_key,
                   &p->nomad.tls_server_name,
                   &p->nomad.ns,
                   &p->nomad.region,
                   &p->nomad.job,
                   &p->nomad.port_label,
                   &p->nomad.skip_verify};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        free(*ns[i]);
    strlist_clear(&p->nomad.vars);
    free(p->workdir);
    free(p->modal.app);
    free(p->modal.block_network);
    free(p->modal.on_signal);
    strlist_clear(&p->modal.bridge);
    strlist_clear(&p->modal.cidr_allowlist);
    char **ss[] = {&p->slurm.partition,   &p->slurm.account,   &p->slurm.qos,  &p->slurm.constraint,
                   &p->slurm.reservation, &p->slurm.workspace, &p->slurm.agent};
    for (size_t i = 0; i < sizeof ss / sizeof ss[0]; i++)
        free(*ss[i]);
    strlist_clear(&p->slurm.sbatch_args);
    strlist_clear(&p->slurm.srun_args);
    strlist_clear(&p->slurm.container);
    strlist_clear(&p->slurm.helper);
    free(p);
}

int config_load(struct ctl *c, struct config_opts *o, struct sp_err *err)
{
    if (o->file && load_file(c, o, err) < 0)
        return -1;
    /* SLOT_PROFILES=a,b: the profiles to run when no --profile says, so a
     * pool can be described by the environment alone. */
    const char *env_profiles = getenv("SLOT_PROFILES");
    if (!o->profile_names.n && env_profiles && *env_profiles) {
        char *dup = strdup(env_profiles), *save = NULL;
        for (char *t = strtok_r(dup, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
            if (strlen(t) >= CTL_NAME_MAX) {
                free(dup);
                return sp_errf(err, SP_BAD_REQUEST,
                               "SLOT_PROFILES: profile name '%.40s...' "
                               "is too long",
                               t);
            }
            strlist_add(&o->profile_names, t);
        }
        free(dup);
    }
    if (o->profile_names.n) {
        /* --profile selects (and if need be creates) the profiles to run. */
        for (size_t i = 0; i < o->profile_names.n; i++) {
            const char *n = o->profile_names.v[i];
            if (!profile_find(c, n, strlen(n)))
                profile_new(c, n);
        }
        struct profile *p, *tmp;
        for (p = TAILQ_FIRST(&c->profiles); p; p = tmp) {
            tmp = TAILQ_NEXT(p, link);
            bool keep = false;
            for (size_t i = 0; i < o->profile_names.n; i++)
                keep |= !strcmp(o->profile_names.v[i], p->name);
            if (!keep) {
                TAILQ_REMOVE(&c->profiles, p, link);
                profile_destroy(p);
            }
        }
    }
    if (TAILQ_EMPTY(&c->profiles))
        profile_new(c, "default");
    if (apply_env(c, err) < 0 || apply_sets(c, o, err) < 0)
        return -1;
    struct profile *p;
    TAILQ_FOREACH(p, &c->profiles, link)
    {
        if (p->slots_per_agent < 1 || p->slots_per_agent > 4096)
            return sp_errf(err, SP_BAD_REQUEST, "profile '%s': slots_per_agent must be 1..4096",
                           p->name);
        if (p->max_agents < 1 || p->min_agents > p->max_agents)
            return sp_errf(err, SP_BAD_REQUEST,
                           "profile '%s': need 1 <= max_agents and min_agents <= max_agents "
                           "(min_agents %u, max_agents %u)",
                           p->name, p->min_agents, p->max_agents);
        if ((p->tls_cert || p->tls_key || p->tls_ca) && !(p->tls_cert && p->tls_key && p->tls_ca))
            return sp_errf(err, SP_BAD_REQUEST,
                           "profile '%s': tls.cert, tls.key and tls.ca go together (a site's own "
                           "files for its agents)",
                           p->name);
        p->be = backend_find(p->backend);
        if (!p->be)
            return sp_errf(err, SP_BAD_REQUEST, "profile '%s': unknown backend '%s'", p->name,
                           p->backend);
        if (p->be->check && p->be->check(c, p, err) < 0)
            return -1;
        for (size_t i = 0; i < p->secrets.n && p->be != &backend_modal; i++)
            if (!getenv(p->secrets.v[i]))
                log_warn("profile '%s': secret %s is not set in the controller's environment",
                         p->name, p->secrets.v[i]);
    }
    if ((c->tls_cert || c->tls_key) && !(c->tls_cert && c->tls_key))
        return sp_errf(err, SP_BAD_REQUEST,
                       "tls.cert and tls.key go together (the controller's client identity)");
    if (!*c->default_profile)
        snprintf(c->default_profile, sizeof c->default_profile, "%s",
                 TAILQ_FIRST(&c->profiles)->name);
    else if (!profile_find(c, c->default_profile, strlen(c->default_profile)))
        return sp_errf(err, SP_BAD_REQUEST, "default_profile '%s' is not a profile",
                       c->default_profile);
    return 0;
}

static void pack_list(msgpack_packer *pk, const struct strlist *l, bool names_only)
{
    msgpack_pack_array(pk, (uint32_t)l->n);
    for (size_t i = 0; i < l->n; i++) {
        const char *s = l->v[i];
        const char *eq = names_only ? strchr(s, '=') : NULL;
        if (eq)
            sp_pack_strn(pk, s, (size_t)(eq - s));
        else
            sp_pack_cstr(pk, s);
    }
}

uint32_t profile_pack_fields(const struct profile *p, msgpack_packer *pk, bool count_only)
{
    /* name + every top-level field + the local and exec blocks */
    uint32_t n = 1;
    for (size_t i = 0; i < NFIELDS; i++)
        n += strchr(fields[i].name, '.') == NULL && !fields[i].alias;
    n += 4;
    if (count_only)
        return n;
    sp_pack_kv_str(pk, "name", p->name);
    for (size_t i = 0; i < NFIELDS; i++) {
        const struct field *f = &fields[i];
        if (strchr(f->name, '.') || f->alias)
            continue;
        const char *base = (const char *)p + f->off;
        char key[64];
        snprintf(key, sizeof key, "%s%s", f->name, f->type == F_DURATION ? "_ms" : "");
        sp_pack_cstr(pk, key);
        switch (f->type) {
        case F_STR: {
            const char *s = *(char *const *)base;
            if (s)
                sp_pack_cstr(pk, s);
            else
                msgpack_pack_nil(pk);
            break;
        }
        case F_DOUBLE: msgpack_pack_double(pk, *(const double *)base); break;
        case F_U32: msgpack_pack_uint32(pk, *(const uint32_t *)base); break;
        case F_DURATION:
        case F_SIZE:
        case F_COUNT: msgpack_pack_uint64(pk, *(const uint64_t *)base); break;
        case F_ENV: pack_list(pk, (const struct strlist *)base, false); break;
        case F_LIST: pack_list(pk, (const struct strlist *)base, false); break;
        case F_BACKEND:
        case F_ISOLATION: sp_pack_cstr(pk, base); break;
        case F_TLS_MODE: sp_pack_cstr(pk, *base ? base : "auto"); break;
        case F_LOCAL_MODE:
        case F_ARGV: break;
        }
    }
    sp_pack_cstr(pk, "local");
    msgpack_pack_map(pk, 3);
    sp_pack_kv_str(pk, "mode", p->local_mode == LOCAL_SOCKET ? "socket" : "stdio");
    sp_pack_kv_str(pk, "agent", p->local_agent ? p->local_agent : "");
    sp_pack_cstr(pk, "args");
    pack_list(pk, &p->local_args, false);
    sp_pack_cstr(pk, "exec");
    msgpack_pack_map(pk, 5);
    sp_pack_cstr(pk, "launch");
    pack_list(pk, &p->exec_launch, false);
    sp_pack_cstr(pk, "start");
    pack_list(pk, &p->exec_start, false);
    sp_pack_cstr(pk, "stop");
    pack_list(pk, &p->exec_stop, false);
    sp_pack_cstr(pk, "list");
    pack_list(pk, &p->exec_list, false);
    sp_pack_kv_uint(pk, "command_timeout_ms", p->exec_command_timeout_ms);
    sp_pack_cstr(pk, "nomad");
    msgpack_pack_map(pk, 7);
    sp_pack_kv_str(pk, "addr", p->nomad.addr ? p->nomad.addr : "");
    sp_pack_kv_str(pk, "namespace", p->nomad.ns ? p->nomad.ns : "");
    sp_pack_kv_str(pk, "region", p->nomad.region ? p->nomad.region : "");
    sp_pack_kv_str(pk, "job", p->nomad.job ? p->nomad.job : "");
    sp_pack_kv_str(pk, "port_label", p->nomad.port_label ? p->nomad.port_label : "");
    sp_pack_kv_bool(pk, "token_set", p->nomad.token && *p->nomad.token);
    sp_pack_cstr(pk, "vars");
    pack_list(pk, &p->nomad.vars, false);
    sp_pack_cstr(pk, "modal");
    msgpack_pack_map(pk, 6);
    sp_pack_kv_str(pk, "app", p->modal.app ? p->modal.app : "");
    sp_pack_kv_uint(pk, "timeout_ms", p->modal.timeout_ms);
    sp_pack_kv_uint(pk, "idle_timeout_ms", p->modal.idle_timeout_ms);
    sp_pack_kv_str(pk, "block_network", p->modal.block_network ? p->modal.block_network : "");
    sp_pack_kv_str(pk, "on_signal", p->modal.on_signal ? p->modal.on_signal : "");
    sp_pack_cstr(pk, "cidr_allowlist");
    pack_list(pk, &p->modal.cidr_allowlist, false);
    return n;
}

const char *config_field_help(void)
{
    static char buf[8192]; /* every field's line: 4 KiB was too short */
    if (*buf)
        return buf;
    size_t off = 0;
    for (size_t i = 0; i < NFIELDS && off < sizeof buf; i++)
        off += (size_t)snprintf(buf + off, sizeof buf - off, "  %-22s %s\n", fields[i].name,
                                fields[i].help);
    return buf;
}
