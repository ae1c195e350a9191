/* Rung 5a: resource limits per command. The agent's configured values are
 * both the defaults and the maxima: a request may only lower them. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "isolate.h"

const char *const lim_names[LIM_COUNT] = {"cpu", "as", "nproc", "fsize", "nofile"};
static const int lim_resource[LIM_COUNT] = {RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
                                            RLIMIT_NOFILE};

void rlimit_defaults(struct isolation *iso)
{
    /* cpu: the wall-clock timeout is the usual bound, this catches spinning
     * daemons that escape it. as: unlimited, because JIT runtimes (V8, the
     * JVM, Go) reserve large virtual ranges they never touch. */
    iso->lim_max[LIM_CPU] = 3600;
    iso->lim_max[LIM_AS] = RLIM_INFINITY;
    /* nproc counts every process of the real uid, the agent's own included:
     * only meaningful with per-slot users, so off unless configured. */
    iso->lim_max[LIM_NPROC] = RLIM_INFINITY;
    iso->lim_max[LIM_FSIZE] = 16ull << 30;
    iso->lim_max[LIM_NOFILE] = 4096;
}

/* NAME=VALUE with VALUE a number (K/M/G suffixes) or "unlimited". */
int rlimit_parse(struct isolation *iso, const char *spec, struct sp_err *err)
{
    const char *eq = strchr(spec, '=');
    if (!eq)
        return sp_errf(err, SP_BAD_REQUEST, "--rlimit wants NAME=VALUE, got '%s'", spec);
    for (int i = 0; i < LIM_COUNT; i++) {
        if (strlen(lim_names[i]) != (size_t)(eq - spec) ||
            strncmp(spec, lim_names[i], (size_t)(eq - spec)) != 0)
            continue;
        if (strcmp(eq + 1, "unlimited") == 0) {
            iso->lim_max[i] = RLIM_INFINITY;
            return 0;
        }
        char *end;
        errno = 0;
        unsigned long long v = strtoull(eq + 1, &end, 10);
        unsigned shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
        if (shift)
            end++;
        if (errno || end == eq + 1 || *end || eq[1] == '-')
            return sp_errf(err, SP_BAD_REQUEST, "--rlimit %s: bad value", spec);
        iso->lim_max[i] = (rlim_t)(v << shift);
        return 0;
    }
    return sp_errf(err, SP_BAD_REQUEST,
                   "--rlimit: unknown limit in '%s' (cpu, as, nproc, "
                   "fsize, nofile)",
                   spec);
}

int rlimit_apply(const struct rlimit *lim)
{
    for (int i = 0; i < LIM_COUNT; i++)
        if (setrlimit(lim_resource[i], &lim[i]) < 0)
            return -1;
    return 0;
}
