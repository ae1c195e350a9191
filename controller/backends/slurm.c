/* The slurm backend: each agent is one Slurm batch job running the agent
 * daemon on a Unix socket in its workspace on the node, named
 * slot-CONTROLLER-AGENT_ID so that a restarted controller finds it with
 * squeue; the controller's stream is a job step (`srun --jobid --overlap
 * --unbuffered`) running `slot-agent --attach` to that socket. The commands
 * live in slot-slurm (controller/slurm/); this file turns the profile into
 * the exec backend's start, launch, stop and list templates around it, and
 * the exec machinery does the rest: a pending job is a starting agent (its
 * pending reason on the launcher's stderr), a job that ends makes its agent
 * lost with Slurm's state in the message. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"

static void add2(struct strlist *l, const char *a, const char *b)
{
    strlist_add(l, a);
    strlist_add(l, b);
}

/* --sbatch-arg --NAME=VALUE when the profile sets it. */
static void sbatch_opt(struct strlist *l, const char *name, const char *v)
{
    if (!v || !*v)
        return;
    char buf[600];
    snprintf(buf, sizeof buf, "--%s=%s", name, v);
    add2(l, "--sbatch-arg", buf);
}

static void job_parts(const struct profile *p, struct strlist *l)
{
    add2(l, "--workspace", p->slurm.workspace ? p->slurm.workspace : "/var/tmp/slot-slurm");
    add2(l, "--agent", p->slurm.agent ? p->slurm.agent : "{agent_bin}");
    for (size_t i = 0; i < p->slurm.container.n; i++)
        add2(l, "--container-arg", p->slurm.container.v[i]);
}

static int slurm_check(struct ctl *c, struct profile *p, struct sp_err *err)
{
    if (p->exec_launch.n || p->exec_start.n || p->exec_stop.n || p->exec_list.n)
        return sp_errf(err, SP_BAD_REQUEST,
                       "profile '%s': a slurm profile makes its own exec templates; set "
                       "slurm.helper to run another command",
                       p->name);
    if (!p->slurm.helper.n) {
        char *h = ctl_find_program("slot-slurm");
        if (!h)
            return sp_errf(err, SP_NOT_FOUND,
                           "profile '%s': slot-slurm is neither beside slot-controller nor on "
                           "PATH; install it or set slurm.helper",
                           p->name);
        strlist_add(&p->slurm.helper, h);
        free(h);
    }
    const char *name = "slot-{controller}-{agent_id}";
    char buf[256];

    struct strlist *l = &p->exec_start;
    strlist_extend(l, &p->slurm.helper);
    strlist_add(l, "start");
    add2(l, "--name", name);
    job_parts(p, l);
    add2(l, "--slots", "{slots}");
    if (*p->isolation)
        add2(l, "--isolation", "{isolation}");
    /* Only when set: unset is the agent's default (its 0 is no budget). */
    if (p->slot_disk)
        add2(l, "--slot-disk", "{slot_disk}");
    if (p->slot_inodes)
        add2(l, "--slot-inodes", "{slot_inodes}");
    if (p->cpu > 0) {
        snprintf(buf, sizeof buf, "%.0f", ceil(p->cpu));
        sbatch_opt(l, "cpus-per-task", buf);
    }
    if (p->memory)
        sbatch_opt(l, "mem", "{memory_mb}M");
    if (p->gpu && *p->gpu) {
        snprintf(buf, sizeof buf, "gpu:%s", p->gpu);
        sbatch_opt(l, "gres", buf);
    }
    if (p->max_lifetime_ms) {
        snprintf(buf, sizeof buf, "%llu",
                 (unsigned long long)((p->max_lifetime_ms + 59999) / 60000));
        sbatch_opt(l, "time", buf);
    }
    sbatch_opt(l, "partition", p->slurm.partition);
    sbatch_opt(l, "account", p->slurm.account);
    sbatch_opt(l, "qos", p->slurm.qos);
    sbatch_opt(l, "constraint", p->slurm.constraint);
    sbatch_opt(l, "reservation", p->slurm.reservation);
    for (size_t i = 0; i < p->slurm.sbatch_args.n; i++)
        add2(l, "--sbatch-arg", p->slurm.sbatch_args.v[i]);

    l = &p->exec_launch;
    strlist_extend(l, &p->slurm.helper);
    strlist_add(l, "attach");
    add2(l, "--name", name);
    job_parts(p, l);
    for (size_t i = 0; i < p->slurm.srun_args.n; i++)
        add2(l, "--srun-arg", p->slurm.srun_args.v[i]);

    strlist_extend(&p->exec_stop, &p->slurm.helper);
    strlist_add(&p->exec_stop, "stop");
    add2(&p->exec_stop, "--name", name);

    strlist_extend(&p->exec_list, &p->slurm.helper);
    strlist_add(&p->exec_list, "list");
    snprintf(buf, sizeof buf, "slot-{controller}-%s-", p->name);
    add2(&p->exec_list, "--prefix", buf);
    add2(&p->exec_list, "--strip", "slot-{controller}-");
    return backend_exec.check(c, p, err);
}

static bool slurm_persistent(const struct profile *p)
{
    (void)p;
    return true;
}

static int slurm_start(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    return backend_exec.start_agent(c, ag, err);
}

static void slurm_stop(struct ctl *c, struct agent *ag)
{
    backend_exec.stop_agent(c, ag);
}

static int slurm_list(struct ctl *c, struct profile *p)
{
    return backend_exec.list_agents(c, p);
}

static int slurm_attach(struct ctl *c, struct agent *ag, struct sp_err *err)
{
    return backend_exec.attach(c, ag, err);
}

static void slurm_probe(struct ctl *c, struct agent *ag, probe_done_fn done)
{
    backend_exec.probe(c, ag, done);
}

const struct backend backend_slurm = {
    .name = "slurm",
    .start_agent = slurm_start,
    .stop_agent = slurm_stop,
    .list_agents = slurm_list,
    .attach = slurm_attach,
    .check = slurm_check,
    .persistent = slurm_persistent,
    .probe = slurm_probe,
};
