/* Rung 4: a seccomp-bpf deny list at least as strict as Docker's default
 * profile for namespaces, mounts, kernel administration, tracing, BPF, keyrings
 * and modules, plus non-Unix sockets when the command has no network. Built
 * with libseccomp once at start-up and exported as BPF; a child only loads it.
 * Denied calls fail with EPERM (clone3 with ENOSYS, so libc falls back to
 * clone, whose flags can be inspected); nothing is killed. */
#include <errno.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <seccomp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "isolate.h"

static const char *const denied[] = {
    /* namespaces and mounts */
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    /* tracing and other processes' memory */
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    /* kernel administration */
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "nfsservctl",
    "_sysctl",
    "uselib",
    "ustat",
    "sysfs",
    "get_kernel_syms",
    "query_module",
    /* time */
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    /* BPF, perf, keyrings, userfaultfd, io_uring, handles */
    "bpf",
    "perf_event_open",
    "add_key",
    "request_key",
    "keyctl",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
};

int seccomp_check_name(const char *name, struct sp_err *err)
{
    if (seccomp_syscall_resolve_name(name) == __NR_SCMP_ERROR)
        return sp_errf(err, SP_BAD_REQUEST, "unknown system call '%s'", name);
    return 0;
}

int seccomp_build(struct sock_fprog *prog, bool deny_network, char *const *extra, unsigned nextra,
                  struct sp_err *err)
{
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    int memfd = -1, rc = -1;
    char *buf = NULL;
    if (!ctx)
        return sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp_init failed");
    /* The agent sets no_new_privs itself, in the child. */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    /* A binary tree over the syscall number instead of a linear list: every
     * system call of every command runs this filter. */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    for (size_t i = 0; i < sizeof denied / sizeof denied[0]; i++) {
        int nr = seccomp_syscall_resolve_name(denied[i]);
        if (nr == __NR_SCMP_ERROR)
            continue; /* not on this architecture */
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0) < 0) {
            sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp rule for %s", denied[i]);
            goto out;
        }
    }
    /* Additions from the agent's configuration (checked at start-up). */
    for (unsigned i = 0; i < nextra; i++) {
        int nr = seccomp_syscall_resolve_name(extra[i]);
        if (nr == __NR_SCMP_ERROR || seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0) < 0) {
            sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp rule for %s", extra[i]);
            goto out;
        }
    }
    /* clone with any namespace flag (one rule per flag: the rules of a call
     * are or-ed); clone3 hides its flags in memory, so it is refused whole. */
    static const uint64_t ns_flags[] = {CLONE_NEWNS,     CLONE_NEWUTS, CLONE_NEWIPC,
                                        CLONE_NEWUSER,   CLONE_NEWPID, CLONE_NEWNET,
                                        CLONE_NEWCGROUP, 0x00000080 /* CLONE_NEWTIME */};
    for (size_t i = 0; i < sizeof ns_flags / sizeof ns_flags[0]; i++)
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                             SCMP_A0(SCMP_CMP_MASKED_EQ, ns_flags[i], ns_flags[i])) < 0)
            goto rule_fail;
    if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0) < 0)
        goto rule_fail;
    if (deny_network) {
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1,
                             SCMP_A0(SCMP_CMP_NE, AF_UNIX)) < 0 ||
            seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socketpair), 1,
                             SCMP_A0(SCMP_CMP_NE, AF_UNIX)) < 0)
            goto rule_fail;
    }
    memfd = memfd_create("slot-seccomp", MFD_CLOEXEC);
    if (memfd < 0 || seccomp_export_bpf(ctx, memfd) < 0) {
        sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp_export_bpf failed");
        goto out;
    }
    off_t len = lseek(memfd, 0, SEEK_END);
    if (len <= 0 || len % (off_t)sizeof(struct sock_filter) != 0 || !(buf = malloc((size_t)len)) ||
        pread(memfd, buf, (size_t)len, 0) != len) {
        sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp: cannot read the exported program");
        goto out;
    }
    prog->len = (unsigned short)(len / (off_t)sizeof(struct sock_filter));
    prog->filter = (struct sock_filter *)buf;
    buf = NULL;
    rc = 0;
    goto out;
rule_fail:
    sp_errf(err, SP_ISOLATION_UNAVAILABLE, "seccomp: cannot add a rule");
out:
    free(buf);
    if (memfd >= 0)
        close(memfd);
    seccomp_release(ctx);
    return rc;
}

int seccomp_apply(const struct sock_fprog *prog)
{
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, prog);
}
