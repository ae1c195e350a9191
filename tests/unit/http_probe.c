/* http-probe: drives controller/http.c from the command line for
 * tests/controller/test_http.py. Sends N identical requests concurrently in
 * one libev loop and prints one line per answer, in completion order:
 *   status=S index=I attempts=A len=L error=E body=B
 * usage: http-probe [--token T] [--attempts N] [--backoff S] [--timeout S]
 *                   [--parallel N] [--cancel-after S] [--cacert F]
 *                   [--skip-verify] [--server-name NAME]
 *                   ADDR METHOD PATH [BODY] */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

struct probe {
    struct ev_loop *loop;
    struct http_client *h;
    struct http_req **reqs;
    int n, left;
};

struct one {
    struct probe *p;
    int i;
};

static void on_answer(void *ctx, const struct http_resp *r)
{
    struct one *o = ctx;
    struct probe *p = o->p;
    p->reqs[o->i] = NULL;
    printf("status=%ld index=%llu attempts=%d len=%zu error=%s body=%.200s\n", r->status,
           (unsigned long long)r->index, r->attempts, r->len, r->error, r->body);
    fflush(stdout);
    if (--p->left == 0)
        ev_break(p->loop, EVBREAK_ALL);
}

static void cancel_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct probe *p = w->data;
    for (int i = 0; i < p->n; i++)
        if (p->reqs[i]) {
            http_cancel(p->reqs[i]);
            p->reqs[i] = NULL;
            printf("cancelled\n");
        }
    fflush(stdout);
    ev_break(loop, EVBREAK_ALL);
}

static void deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    fprintf(stderr, "http-probe: no answer within 120 s\n");
    ev_break(loop, EVBREAK_ALL);
}

int main(int argc, char **argv)
{
    struct http_conf conf = {.agent = "http-probe"};
    double timeout = 10, cancel_after = -1;
    int parallel = 1;
    static const struct option opts[] = {
        {"token", required_argument, NULL, 't'},
        {"attempts", required_argument, NULL, 'a'},
        {"backoff", required_argument, NULL, 'b'},
        {"timeout", required_argument, NULL, 'T'},
        {"parallel", required_argument, NULL, 'p'},
        {"cancel-after", required_argument, NULL, 'c'},
        {"cacert", required_argument, NULL, 'C'},
        {"skip-verify", no_argument, NULL, 'k'},
        {"server-name", required_argument, NULL, 'n'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't': conf.token = optarg; break;
        case 'a': conf.max_attempts = atoi(optarg); break;
        case 'b': conf.backoff_s = atof(optarg); break;
        case 'T': timeout = atof(optarg); break;
        case 'p': parallel = atoi(optarg); break;
        case 'c': cancel_after = atof(optarg); break;
        case 'C': conf.cacert = optarg; break;
        case 'k': conf.skip_verify = true; break;
        case 'n': conf.tls_server_name = optarg; break;
        default: return 2;
        }
    }
    if (argc - optind < 3 || parallel < 1) {
        fprintf(stderr, "usage: http-probe [options] ADDR METHOD PATH [BODY]\n");
        return 2;
    }
    conf.addr = argv[optind];
    struct probe p = {.loop = ev_default_loop(0), .n = parallel, .left = parallel};
    struct sp_err err;
    p.h = http_client_new(p.loop, &conf, &err);
    if (!p.h) {
        printf("client error: %s\n", err.msg);
        return 1;
    }
    p.reqs = calloc((size_t)parallel, sizeof *p.reqs);
    struct one *ones = calloc((size_t)parallel, sizeof *ones);
    for (int i = 0; i < parallel; i++) {
        ones[i] = (struct one){&p, i};
        p.reqs[i] =
            http_request(p.h, argv[optind + 1], argv[optind + 2],
                         argc - optind > 3 ? argv[optind + 3] : NULL, timeout, on_answer, &ones[i]);
        if (!p.reqs[i]) {
            printf("request error\n");
            return 1;
        }
    }
    ev_timer cw, dw;
    if (cancel_after >= 0) {
        ev_timer_init(&cw, cancel_cb, cancel_after, 0);
        cw.data = &p;
        ev_timer_start(p.loop, &cw);
    }
    ev_timer_init(&dw, deadline_cb, 120, 0);
    ev_timer_start(p.loop, &dw);
    ev_run(p.loop, 0);
    printf("attempts_total=%llu\n", (unsigned long long)http_attempts(p.h));
    http_client_free(p.h);
    free(p.reqs);
    free(ones);
    ev_loop_destroy(p.loop);
    return p.left == 0 || cancel_after >= 0 ? 0 : 1;
}
