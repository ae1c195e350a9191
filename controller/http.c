/* Asynchronous HTTP for the controller: libcurl's multi-socket interface
 * driven by the libev loop (curl tells us which sockets to watch and when to
 * wake; we tell it what happened). Requests retry transport errors and 5xx
 * answers with doubling delays, each attempt bounded by its timeout. */
#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http.h"

#define HTTP_MAX_BODY (64u << 20)
#define HTTP_MAX_BACKOFF_S 5.0

struct http_sock {
    ev_io io;
    struct http_client *h;
    curl_socket_t fd;
};

struct http_req {
    struct http_req *next, *prev;
    struct http_client *h;
    CURL *easy;
    struct curl_slist *hdrs, *connect_to;
    char *url, *method, *body;
    double timeout_s;
    http_cb cb;
    void *ctx;
    int attempts;
    bool in_multi;
    ev_timer retry;
    /* this attempt's answer */
    char *buf;
    size_t len, cap;
    bool too_big;
    uint64_t index;
    char errbuf[CURL_ERROR_SIZE];
};

struct http_client {
    struct ev_loop *loop;
    CURLM *multi;
    ev_timer timer;
    struct http_req *reqs;
    char *base;       /* URL prefix: scheme://host:port */
    char *unix_path;  /* unix:// */
    char *connect_to; /* tls_server_name: connect here instead */
    char *token_hdr;
    char *cacert, *capath, *client_cert, *client_key, *agent;
    bool skip_verify;
    int max_attempts;
    double backoff_s;
    uint64_t attempts;
};

static char *dup_or_null(const char *s)
{
    return s && *s ? strdup(s) : NULL;
}

/* ---- curl <-> libev --------------------------------------------------- */

static void check_done(struct http_client *h);

static void sock_cb_ev(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    struct http_sock *s = w->data;
    struct http_client *h = s->h;
    int flags =
        (revents & EV_READ ? CURL_CSELECT_IN : 0) | (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    int running;
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    check_done(h);
}

static int curl_sock_cb(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)e;
    struct http_client *h = userp;
    struct http_sock *s = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (s) {
            ev_io_stop(h->loop, &s->io);
            free(s);
            curl_multi_assign(h->multi, fd, NULL);
        }
        return 0;
    }
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s)
            return -1;
        s->h = h;
        s->fd = fd;
        curl_multi_assign(h->multi, fd, s);
    } else
        ev_io_stop(h->loop, &s->io);
    int ev = (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
    ev_io_init(&s->io, sock_cb_ev, fd, ev);
    s->io.data = s;
    ev_io_start(h->loop, &s->io);
    return 0;
}

static void timer_cb_ev(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct http_client *h = w->data;
    int running;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(h);
}

static int curl_timer_cb(CURLM *m, long timeout_ms, void *userp)
{
    (void)m;
    struct http_client *h = userp;
    ev_timer_stop(h->loop, &h->timer);
    if (timeout_ms >= 0) {
        ev_timer_set(&h->timer, (double)timeout_ms / 1000.0, 0);
        ev_timer_start(h->loop, &h->timer);
    }
    return 0;
}

/* ---- requests ------------------------------------------------------------ */

static size_t write_cb(char *p, size_t size, size_t n, void *ud)
{
    struct http_req *r = ud;
    size_t k = size * n;
    if (r->len + k > HTTP_MAX_BODY) {
        r->too_big = true;
        return 0; /* aborts the transfer */
    }
    if (r->len + k + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + k + 1)
            cap *= 2;
        char *b = realloc(r->buf, cap);
        if (!b)
            return 0;
        r->buf = b;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, p, k);
    r->len += k;
    r->buf[r->len] = 0;
    return k;
}

static size_t header_cb(char *p, size_t size, size_t n, void *ud)
{
    struct http_req *r = ud;
    size_t k = size * n;
    static const char name[] = "x-nomad-index:";
    if (k > sizeof name - 1 && !strncasecmp(p, name, sizeof name - 1)) {
        char tmp[32];
        size_t vl = k - (sizeof name - 1);
        if (vl >= sizeof tmp)
            vl = sizeof tmp - 1;
        memcpy(tmp, p + sizeof name - 1, vl);
        tmp[vl] = 0;
        r->index = strtoull(tmp, NULL, 10);
    }
    return k;
}

static void req_unlink(struct http_req *r)
{
    struct http_client *h = r->h;
    if (r->prev)
        r->prev->next = r->next;
    else if (h->reqs == r)
        h->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->next = r->prev = NULL;
}

static void req_free(struct http_req *r)
{
    struct http_client *h = r->h;
    ev_timer_stop(h->loop, &r->retry);
    if (r->in_multi)
        curl_multi_remove_handle(h->multi, r->easy);
    curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    curl_slist_free_all(r->connect_to);
    free(r->url);
    free(r->method);
    free(r->body);
    free(r->buf);
    free(r);
}

static int attempt(struct http_req *r)
{
    struct http_client *h = r->h;
    r->len = 0;
    r->too_big = false;
    r->index = 0;
    r->errbuf[0] = 0;
    if (r->buf)
        r->buf[0] = 0;
    r->attempts++;
    h->attempts++;
    if (curl_multi_add_handle(h->multi, r->easy) != CURLM_OK)
        return -1;
    r->in_multi = true;
    return 0;
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct http_req *r = w->data;
    if (attempt(r) < 0) {
        struct http_resp resp = {.attempts = r->attempts};
        snprintf(resp.error, sizeof resp.error, "curl refused the request");
        resp.body = "";
        http_cb cb = r->cb;
        void *ctx = r->ctx;
        req_unlink(r);
        req_free(r);
        cb(ctx, &resp);
    }
}

static void finish(struct http_req *r, CURLcode rc)
{
    struct http_client *h = r->h;
    curl_multi_remove_handle(h->multi, r->easy);
    r->in_multi = false;
    struct http_resp resp = {.attempts = r->attempts};
    if (rc == CURLE_OK)
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &resp.status);
    else if (r->too_big)
        snprintf(resp.error, sizeof resp.error, "answer over %u bytes", HTTP_MAX_BODY);
    else
        snprintf(resp.error, sizeof resp.error, "%s",
                 *r->errbuf ? r->errbuf : curl_easy_strerror(rc));
    bool transient = resp.status == 0 ? !r->too_big : resp.status >= 500;
    if (transient && r->attempts < h->max_attempts) {
        double d = h->backoff_s;
        for (int i = 1; i < r->attempts && d < HTTP_MAX_BACKOFF_S; i++)
            d *= 2;
        if (d > HTTP_MAX_BACKOFF_S)
            d = HTTP_MAX_BACKOFF_S;
        ev_timer_set(&r->retry, d, 0);
        ev_timer_start(h->loop, &r->retry);
        return;
    }
    resp.body = r->buf ? r->buf : "";
    resp.len = r->len;
    resp.index = r->index;
    http_cb cb = r->cb;
    void *ctx = r->ctx;
    req_unlink(r);
    cb(ctx, &resp);
    req_free(r);
}

static void check_done(struct http_client *h)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(h->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        struct http_req *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        if (r)
            finish(r, m->data.result);
    }
}

struct http_req *http_request(struct http_client *h, const char *method, const char *path,
                              const char *body, double timeout_s, http_cb cb, void *ctx)
{
    struct http_req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->h = h;
    r->cb = cb;
    r->ctx = ctx;
    r->timeout_s = timeout_s;
    r->easy = curl_easy_init();
    r->method = strdup(method);
    r->body = body ? strdup(body) : NULL;
    if (asprintf(&r->url, "%s%s", h->base, path) < 0)
        r->url = NULL;
    if (!r->easy || !r->method || !r->url || (body && !r->body)) {
        if (r->easy)
            curl_easy_cleanup(r->easy);
        free(r->method);
        free(r->body);
        free(r->url);
        free(r);
        return NULL;
    }
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, r->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)(timeout_s < 10 ? timeout_s * 1000 : 10000));
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
    if (!strcmp(method, "HEAD"))
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    if (r->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
        r->hdrs = curl_slist_append(r->hdrs, "Content-Type: application/json");
    }
    if (h->token_hdr)
        r->hdrs = curl_slist_append(r->hdrs, h->token_hdr);
    r->hdrs = curl_slist_append(r->hdrs, "Expect:"); /* no 100-continue round trip */
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    if (h->agent)
        curl_easy_setopt(e, CURLOPT_USERAGENT, h->agent);
    if (h->unix_path)
        curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, h->unix_path);
    if (h->connect_to) {
        r->connect_to = curl_slist_append(NULL, h->connect_to);
        curl_easy_setopt(e, CURLOPT_CONNECT_TO, r->connect_to);
    }
    if (h->cacert)
        curl_easy_setopt(e, CURLOPT_CAINFO, h->cacert);
    if (h->capath)
        curl_easy_setopt(e, CURLOPT_CAPATH, h->capath);
    if (h->client_cert)
        curl_easy_setopt(e, CURLOPT_SSLCERT, h->client_cert);
    if (h->client_key)
        curl_easy_setopt(e, CURLOPT_SSLKEY, h->client_key);
    if (h->skip_verify) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    ev_timer_init(&r->retry, retry_cb, 0, 0);
    r->retry.data = r;
    r->next = h->reqs;
    if (h->reqs)
        h->reqs->prev = r;
    h->reqs = r;
    if (attempt(r) < 0) {
        req_unlink(r);
        req_free(r);
        return NULL;
    }
    return r;
}

void http_cancel(struct http_req *r)
{
    if (!r)
        return;
    req_unlink(r);
    req_free(r);
}

uint64_t http_attempts(const struct http_client *h)
{
    return h->attempts;
}

/* ---- the client ------------------------------------------------------- */

/* "https://host:port" -> scheme, host, port (default 4646). */
static int split_addr(const char *a, char *scheme, size_t sc, char *host, size_t hc, int *port)
{
    const char *p = strstr(a, "://");
    if (!p)
        return -1;
    snprintf(scheme, sc, "%.*s", (int)(p - a), a);
    p += 3;
    const char *end = p + strcspn(p, "/");
    const char *colon = NULL;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(end - p));
        if (!rb)
            return -1;
        colon = rb + 1 < end && rb[1] == ':' ? rb + 1 : NULL;
    } else
        colon = memchr(p, ':', (size_t)(end - p));
    const char *hend = colon ? colon : end;
    if (hend == p || (size_t)(hend - p) >= hc)
        return -1;
    snprintf(host, hc, "%.*s", (int)(hend - p), p);
    *port = colon ? atoi(colon + 1) : 4646;
    return *port > 0 && *port < 65536 ? 0 : -1;
}

struct http_client *http_client_new(struct ev_loop *loop, const struct http_conf *conf,
                                    struct sp_err *err)
{
    static bool global_done;
    if (!global_done) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            sp_errf(err, SP_INTERNAL, "libcurl failed to initialise");
            return NULL;
        }
        global_done = true;
    }
    struct http_client *h = calloc(1, sizeof *h);
    if (!h)
        abort();
    h->loop = loop;
    h->max_attempts = conf->max_attempts > 0 ? conf->max_attempts : 4;
    h->backoff_s = conf->backoff_s > 0 ? conf->backoff_s : 0.25;
    const char *a = conf->addr && *conf->addr ? conf->addr : "http://127.0.0.1:4646";
    if (!strncmp(a, "unix://", 7)) {
        h->unix_path = strdup(a + 7);
        h->base = strdup("http://127.0.0.1");
    } else {
        char scheme[16], host[256];
        int port;
        if (split_addr(a, scheme, sizeof scheme, host, sizeof host, &port) < 0 ||
            (strcmp(scheme, "http") && strcmp(scheme, "https"))) {
            sp_errf(err, SP_BAD_REQUEST,
                    "address '%.200s': expected http://HOST:PORT, https://HOST:PORT or "
                    "unix:///PATH",
                    a);
            free(h);
            return NULL;
        }
        const char *name =
            conf->tls_server_name && *conf->tls_server_name ? conf->tls_server_name : NULL;
        if (name) {
            /* Verify (and send SNI) as NAME while connecting to HOST. */
            if (asprintf(&h->base, "%s://%s:%d", scheme, name, port) < 0 ||
                asprintf(&h->connect_to, "%s:%d:%s:%d", name, port, host, port) < 0)
                abort();
        } else if (asprintf(&h->base, "%s://%s:%d", scheme, host, port) < 0)
            abort();
    }
    if (conf->token && *conf->token &&
        asprintf(&h->token_hdr, "X-Nomad-Token: %s", conf->token) < 0)
        abort();
    h->cacert = dup_or_null(conf->cacert);
    h->capath = dup_or_null(conf->capath);
    h->client_cert = dup_or_null(conf->client_cert);
    h->client_key = dup_or_null(conf->client_key);
    h->agent = dup_or_null(conf->agent);
    h->skip_verify = conf->skip_verify;
    h->multi = curl_multi_init();
    if (!h->multi)
        abort();
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, curl_sock_cb);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    ev_timer_init(&h->timer, timer_cb_ev, 0, 0);
    h->timer.data = h;
    return h;
}

void http_client_free(struct http_client *h)
{
    if (!h)
        return;
    while (h->reqs) {
        struct http_req *r = h->reqs;
        req_unlink(r);
        req_free(r);
    }
    ev_timer_stop(h->loop, &h->timer);
    curl_multi_cleanup(h->multi);
    free(h->base);
    free(h->unix_path);
    free(h->connect_to);
    if (h->token_hdr) {
        explicit_bzero(h->token_hdr, strlen(h->token_hdr));
        free(h->token_hdr);
    }
    free(h->cacert);
    free(h->capath);
    free(h->client_cert);
    free(h->client_key);
    free(h->agent);
    free(h);
}
