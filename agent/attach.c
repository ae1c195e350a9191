/* --attach: relay stdin/stdout to an agent listening on a Unix, TCP or TLS
 * socket, byte for byte, without looking at the frames. Runtimes whose
 * stream dies with the client (docker exec -i, apptainer exec, ssh, srun,
 * Modal's Sandbox.exec) carry this relay; the agent daemon behind the socket
 * keeps its leases and running commands when a stream ends, so the next
 * relay finds them again. */
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "tls.h"

#define RELAY_BUF (256 * 1024)

struct pipe_buf {
    char *data;
    size_t start, end;
    bool eof; /* the source is done; the sink gets EOF once drained */
};

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One connect attempt; -1 with errno. */
static int connect_once(const char *addr)
{
    if (!strncmp(addr, "unix:", 5)) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(addr + 5) >= sizeof sa.sun_path) {
            errno = ENAMETOOLONG;
            return -1;
        }
        strcpy(sa.sun_path, addr + 5);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        return fd;
    }
    /* tcp:HOST:PORT or tls:HOST:PORT; HOST may be [v6]. */
    char host[256];
    const char *hp = addr + 4, *colon = strrchr(hp, ':');
    if (!colon || (size_t)(colon - hp) >= sizeof host) {
        errno = EINVAL;
        return -1;
    }
    memcpy(host, hp, (size_t)(colon - hp));
    host[colon - hp] = 0;
    char *h = host;
    if (*h == '[' && h[strlen(h) - 1] == ']') {
        h[strlen(h) - 1] = 0;
        h++;
    }
    /* Numeric addresses only: getaddrinfo would need glibc's NSS modules,
     * which a static binary in a scratch image does not have. */
    if (!strcmp(h, "localhost"))
        h = "127.0.0.1";
    char *end;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (*end || !colon[1] || port == 0 || port > 65535) {
        errno = EINVAL;
        return -1;
    }
    struct sockaddr_storage ss = {0};
    socklen_t sl;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, h, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        sl = sizeof *s4;
    } else if (inet_pton(AF_INET6, h, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        sl = sizeof *s6;
    } else {
        errno = EINVAL;
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&ss, sl) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* The daemon may still be starting (docker run -d, then docker exec): wait
 * for its socket up to timeout_s. */
static int connect_wait(const char *addr, double timeout_s)
{
    double deadline = mono_now() + timeout_s;
    for (;;) {
        int fd = connect_once(addr);
        if (fd >= 0)
            return fd;
        bool transient = errno == ENOENT || errno == ECONNREFUSED || errno == EAGAIN;
        if (!transient || mono_now() >= deadline)
            return -1;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Move bytes from fd (or its TLS link) into b; false when the source
 * failed hard. */
static bool fill(int fd, struct sp_tls *t, struct pipe_buf *b)
{
    ssize_t n = t ? sp_tls_read(t, b->data + b->end, RELAY_BUF - b->end)
                  : read(fd, b->data + b->end, RELAY_BUF - b->end);
    if (n > 0)
        b->end += (size_t)n;
    else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        b->eof = true;
        return !(t && n < 0);
    }
    return true;
}

/* Move bytes from b to fd (or its TLS link); false when the sink is gone. */
static bool drain(int fd, struct sp_tls *t, struct pipe_buf *b)
{
    while (b->start < b->end) {
        ssize_t n = t ? sp_tls_write(t, b->data + b->start, b->end - b->start)
                      : write(fd, b->data + b->start, b->end - b->start);
        if (n > 0) {
            b->start += (size_t)n;
            if (b->start == b->end)
                b->start = b->end = 0; /* room to read again */
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return true;
        return false;
    }
    return true;
}

/* The TLS handshake of --attach tls:, waiting with poll() up to the
 * deadline. 0, or -1 with the one-line reason printed. */
static int attach_handshake(struct sp_tls *t, int sock, const char *addr, double deadline)
{
    struct sp_err err;
    for (;;) {
        int rc = sp_tls_handshake(t, &err);
        if (rc == 1)
            return 0;
        if (rc < 0) {
            fprintf(stderr, "slot-agent: attach: %s: %s\n", addr, err.msg);
            return -1;
        }
        double left = deadline - mono_now();
        if (left <= 0) {
            fprintf(stderr, "slot-agent: attach: %s: no TLS handshake within the timeout\n", addr);
            return -1;
        }
        struct pollfd pf = {.fd = sock,
                            .events = sp_tls_want(t) == SP_TLS_WANT_WRITE ? POLLOUT : POLLIN};
        if (poll(&pf, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR) {
            fprintf(stderr, "slot-agent: attach: poll: %s\n", strerror(errno));
            return -1;
        }
    }
}

int attach_main(const char *addr, double timeout_s, const struct agent_opts *opt)
{
    bool tls = !strncmp(addr, "tls:", 4);
    if (strncmp(addr, "unix:", 5) && strncmp(addr, "tcp:", 4) && !tls) {
        fprintf(stderr, "slot-agent: --attach takes unix:PATH, tcp:HOST:PORT or tls:HOST:PORT\n");
        return 2;
    }
    struct sp_tls_ctx *ctx = NULL;
    struct sp_tls *t = NULL;
    struct sp_err err;
    if (tls) {
        if (!opt->tls_cert || !opt->tls_key || !opt->tls_ca) {
            fprintf(stderr, "slot-agent: --attach tls: needs --tls-cert, --tls-key and --tls-ca\n");
            return 2;
        }
        ctx = sp_tls_ctx_new(SP_TLS_CLIENT, opt->tls_cert, opt->tls_key, opt->tls_ca, &err);
        if (!ctx) {
            fprintf(stderr, "slot-agent: attach: %s\n", err.msg);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    double deadline = mono_now() + timeout_s;
    int sock = connect_wait(addr, timeout_s);
    if (sock < 0) {
        fprintf(stderr, "slot-agent: attach: cannot connect to %s: %s (waited %.0f s)\n", addr,
                strerror(errno), timeout_s);
        sp_tls_ctx_free(ctx);
        return 1;
    }
    int in_fl = fcntl(0, F_GETFL), out_fl = fcntl(1, F_GETFL);
    fcntl(0, F_SETFL, in_fl | O_NONBLOCK);
    fcntl(1, F_SETFL, out_fl | O_NONBLOCK);
    fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
    struct pipe_buf up = {.data = malloc(RELAY_BUF)}, down = {.data = malloc(RELAY_BUF)};
    int rc = 0;
    bool up_shut = false;
    if (!up.data || !down.data) {
        fprintf(stderr, "slot-agent: attach: out of memory\n");
        rc = 1;
        goto out;
    }
    if (tls) {
        if (mono_now() > deadline - 1)
            deadline = mono_now() + 1; /* the connect used it up: leave the handshake a second */
        t = sp_tls_new(ctx, sock, opt->tls_name, &err);
        if (!t) {
            fprintf(stderr, "slot-agent: attach: %s\n", err.msg);
            rc = 1;
            goto out;
        }
        if (attach_handshake(t, sock, addr, deadline) < 0) {
            rc = 1;
            goto out;
        }
    }
    for (;;) {
        /* stdin -> socket; EOF on stdin becomes a half-close, after which the
         * agent closes and the socket's EOF ends the relay. */
        if (up.eof && up.start == up.end && !up_shut) {
            shutdown(sock, SHUT_WR);
            up_shut = true;
        }
        if (down.eof && down.start == down.end)
            break;
        struct pollfd pf[3] = {{.fd = -1}, {.fd = -1}, {.fd = -1}};
        if (!up.eof && up.end < RELAY_BUF)
            pf[0] = (struct pollfd){.fd = 0, .events = POLLIN};
        short sev = 0;
        if (!down.eof && down.end < RELAY_BUF)
            sev |= POLLIN;
        if (up.start < up.end)
            sev |= POLLOUT;
        /* TLS: a read may wait for the socket to take our bytes and the
         * reverse; and records already decrypted will not wake poll(). */
        int wait_ms = -1;
        if (t) {
            if (sp_tls_want(t) == SP_TLS_WANT_WRITE)
                sev |= POLLOUT;
            else if (sp_tls_want(t) == SP_TLS_WANT_READ)
                sev |= POLLIN;
            if (sp_tls_pending(t) && !down.eof && down.end < RELAY_BUF)
                wait_ms = 0;
        }
        pf[1] = (struct pollfd){.fd = sock, .events = sev};
        if (down.start < down.end)
            pf[2] = (struct pollfd){.fd = 1, .events = POLLOUT};
        if (poll(pf, 3, wait_ms) < 0) {
            if (errno == EINTR)
                continue;
            rc = 1;
            break;
        }
        if (pf[0].revents)
            fill(0, NULL, &up);
        if ((pf[1].revents & (POLLIN | POLLHUP | POLLERR)) || (t && wait_ms == 0) ||
            (t && (pf[1].revents & POLLOUT)))
            if (!down.eof && down.end < RELAY_BUF && !fill(sock, t, &down)) {
                /* A TLS failure after the handshake: with TLS 1.3 the
                 * agent's verdict on our certificate arrives here. */
                fprintf(stderr, "slot-agent: attach: %s: %s\n", addr, sp_tls_error(t));
                rc = 1;
            }
        if (up.start < up.end && (pf[1].revents & (POLLOUT | POLLERR | POLLHUP | POLLIN)) &&
            !drain(sock, t, &up)) {
            /* The agent went away mid-write; what it said is still
             * delivered below. */
            up.eof = true;
            up.start = up.end = 0;
        }
        if (down.start < down.end && pf[2].revents && !drain(1, NULL, &down)) {
            rc = 1; /* nobody reads our stdout: the client is gone */
            break;
        }
    }
out:
    if (t) {
        sp_tls_shutdown(t);
        sp_tls_free(t);
    }
    sp_tls_ctx_free(ctx);
    close(sock);
    fcntl(0, F_SETFL, in_fl);
    fcntl(1, F_SETFL, out_fl);
    free(up.data);
    free(down.data);
    return rc;
}
