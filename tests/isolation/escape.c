/* slot-escape: one real escape attempt per invocation, for the isolation
 * suite. Prints "blocked ERRNO_NAME" (exit 0) when the kernel refused it and
 * "escaped ..." (exit 1) when it worked. Static, so it runs in any image. */
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static int verdict(long rc, const char *what)
{
    if (rc < 0) {
        printf("blocked %s\n", strerrorname_np(errno) ? strerrorname_np(errno) : "?");
        return 0;
    }
    printf("escaped %s\n", what);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: slot-escape ACTION [ARGS]\n");
        return 2;
    }
    const char *a = argv[1];
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(a, "write") && argc == 3)
        return verdict(open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644), "file created");
    if (!strcmp(a, "read") && argc == 3) {
        int fd = open(argv[2], O_RDONLY);
        char b[64];
        return verdict(fd < 0 ? -1 : read(fd, b, sizeof b), "file read");
    }
    if (!strcmp(a, "list") && argc == 3)
        return verdict(open(argv[2], O_RDONLY | O_DIRECTORY), "directory opened");
    if (!strcmp(a, "kill") && argc == 3)
        return verdict(kill(atoi(argv[2]), SIGTERM), "signal delivered");
    if (!strcmp(a, "ptrace")) {
        pid_t p = fork();
        if (p == 0) {
            pause();
            _exit(0);
        }
        long rc = ptrace(PTRACE_ATTACH, p, 0, 0);
        int r = verdict(rc, "attached to a sibling");
        kill(p, SIGKILL);
        waitpid(p, NULL, 0);
        return r;
    }
    if (!strcmp(a, "mount"))
        return verdict(mount("none", ".", "tmpfs", 0, NULL), "tmpfs mounted");
    if (!strcmp(a, "unshare-user"))
        return verdict(unshare(CLONE_NEWUSER), "new user namespace");
    if (!strcmp(a, "unshare-net"))
        return verdict(unshare(CLONE_NEWNET), "new network namespace");
    if (!strcmp(a, "bpf")) {
        union bpf_attr at;
        memset(&at, 0, sizeof at);
        at.map_type = BPF_MAP_TYPE_ARRAY;
        at.key_size = 4;
        at.value_size = 4;
        at.max_entries = 1;
        return verdict(syscall(SYS_bpf, BPF_MAP_CREATE, &at, sizeof at), "bpf map created");
    }
    if (!strcmp(a, "keyctl"))
        return verdict(syscall(SYS_add_key, "user", "slot-escape", "x", 1, -3 /* session */),
                       "key added");
    if (!strcmp(a, "perf")) {
        struct perf_event_attr pe;
        memset(&pe, 0, sizeof pe);
        pe.type = PERF_TYPE_SOFTWARE;
        pe.size = sizeof pe;
        pe.config = PERF_COUNT_SW_CPU_CLOCK;
        pe.exclude_kernel = 1;
        return verdict(syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0), "perf event opened");
    }
    if (!strcmp(a, "socket") && argc >= 3) {
        int type = !strcmp(argv[2], "raw")   ? SOCK_RAW
                   : !strcmp(argv[2], "udp") ? SOCK_DGRAM
                                             : SOCK_STREAM;
        int fd = socket(AF_INET, type, type == SOCK_RAW ? IPPROTO_ICMP : 0);
        if (fd < 0 || argc < 4 || type == SOCK_RAW)
            return verdict(fd, "socket created");
        struct sockaddr_in sa = {.sin_family = AF_INET,
                                 .sin_port = htons(atoi(argv[3])),
                                 .sin_addr.s_addr = htonl(0x7f000001)};
        return verdict(connect(fd, (struct sockaddr *)&sa, sizeof sa), "connected");
    }
    if (!strcmp(a, "alloc") && argc == 3) {
        size_t n = strtoull(argv[2], NULL, 10);
        char *p = malloc(n);
        if (!p)
            return verdict(-1, "");
        for (size_t i = 0; i < n; i += 4096)
            p[i] = 1;
        return verdict(0, "memory allocated");
    }
    if (!strcmp(a, "fill") && argc == 4) {
        signal(SIGXFSZ, SIG_IGN);
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0)
            return verdict(-1, "");
        static char buf[1 << 20];
        unsigned long long want = strtoull(argv[3], NULL, 10), done = 0;
        while (done < want) {
            ssize_t k = write(fd, buf, sizeof buf);
            if (k < 0)
                return verdict(-1, "");
            done += (unsigned long long)k;
        }
        return verdict(0, "file filled");
    }
    /* Overlay metadata forged from inside: an opaque marker (either
     * namespace overlayfs reads) or a whiteout device. */
    if (!strcmp(a, "xattr") && argc == 4)
        return verdict(setxattr(argv[2], argv[3], "y", 1, 0), "overlay xattr set");
    if (!strcmp(a, "whiteout") && argc == 3)
        return verdict(mknod(argv[2], S_IFCHR | 0600, makedev(0, 0)), "whiteout created");
    fprintf(stderr, "slot-escape: unknown action %s\n", a);
    return 2;
}
