/* controller/http.c: asynchronous HTTP requests inside the controller's
 * libev loop (libcurl's multi-socket interface), for orchestrator APIs such
 * as Nomad's. Every request has a timeout; transport errors and 5xx answers
 * are retried a bounded number of times with doubling delays; nothing ever
 * blocks the loop. */
#ifndef CTL_HTTP_H
#define CTL_HTTP_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "slotproto.h"

struct http_conf {
    const char *addr;            /* http://HOST:PORT, https://HOST:PORT or unix:///PATH */
    const char *token;           /* sent as X-Nomad-Token; never logged */
    const char *cacert, *capath; /* TLS trust */
    const char *client_cert, *client_key;
    const char *tls_server_name; /* verify the server as this name */
    bool skip_verify;
    int max_attempts;  /* per request, >= 1 (default 4) */
    double backoff_s;  /* first retry delay, doubling up to 5 s (default 0.25) */
    const char *agent; /* User-Agent */
};

struct http_resp {
    long status;      /* HTTP status; 0 when no answer came */
    const char *body; /* NUL-terminated */
    size_t len;
    uint64_t index;  /* X-Nomad-Index, 0 if absent */
    char error[256]; /* transport error when status == 0 */
    int attempts;
};

struct http_client;
struct http_req;
typedef void (*http_cb)(void *ctx, const struct http_resp *r);

struct http_client *http_client_new(struct ev_loop *loop, const struct http_conf *conf,
                                    struct sp_err *err);
/* Cancels every request in flight without calling back. */
void http_client_free(struct http_client *h);
/* path includes the query ("/v1/jobs?namespace=x"). body may be NULL.
 * timeout_s bounds each attempt. The callback runs once, from the loop. */
struct http_req *http_request(struct http_client *h, const char *method, const char *path,
                              const char *body, double timeout_s, http_cb cb, void *ctx);
/* Forget a request: no callback. */
void http_cancel(struct http_req *r);
/* Attempts sent since the client was made (for rate figures). */
uint64_t http_attempts(const struct http_client *h);

#endif
