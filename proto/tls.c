/* TLS 1.3 links over wolfSSL's native API: contexts with mutual X.509
 * authentication (reloadable, replaceable in memory), non-blocking
 * handshakes, and the frame reader/writer over a TLS stream. Our own socket
 * callbacks see the peer's first bytes, so a plaintext peer is named as such
 * instead of surfacing as a record-layer error, and a verify callback keeps
 * the failing certificate's name and dates for the one-line reason. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/error-ssl.h>
#include <wolfssl/wolfcrypt/asn.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/error-crypt.h>

#include "tls.h"

/* wolfSSL_X509_get_extended_key_usage() answers in OpenSSL's XKU_* bits
 * (wolfssl/openssl/x509v3.h, not included to stay on the native API). */
#define XKU_SERVER 0x1
#define XKU_CLIENT 0x2
#define XKU_ANY 0x100

#define READ_CHUNK 16384 /* one TLS record's plaintext */
#define WRITE_CHUNK (256 * 1024)

struct file_sig {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    bool ok;
};

struct sp_tls_ctx {
    enum sp_tls_role role;
    char *cert, *key, *ca;
    struct file_sig sig[3];
    WOLFSSL_CTX *ctx; /* refcounted by wolfSSL: connections keep theirs */
    time_t not_after;
    char cn[256];
};

struct sp_tls {
    WOLFSSL *ssl;
    enum sp_tls_role role;
    int fd;
    int want;
    bool done, eof;
    unsigned char first[5]; /* the peer's first bytes, to name a plaintext peer */
    size_t nfirst;
    char expect[256];
    char peer_cn[256];
    char verify[640]; /* why the peer's certificate was refused, if it was */
    char desc[96];
    char error[640];
};

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_rc;

static void tls_init(void)
{
    init_rc = wolfSSL_Init() == WOLFSSL_SUCCESS ? 0 : -1;
}

/* ---- certificate facts ------------------------------------------------- */

static void x509_cn(WOLFSSL_X509 *x, char *out, size_t n)
{
    out[0] = 0;
    WOLFSSL_X509_NAME *nm = x ? wolfSSL_X509_get_subject_name(x) : NULL;
    if (!nm || wolfSSL_X509_NAME_get_text_by_NID(nm, NID_commonName, out, (int)n) < 0)
        out[0] = 0;
}

static time_t asn1_time(const WOLFSSL_ASN1_TIME *t)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    if (!t || wolfSSL_ASN1_TIME_to_tm(t, &tm) != WOLFSSL_SUCCESS)
        return 0;
    return timegm(&tm);
}

static void fmt_time(time_t t, char *out, size_t n)
{
    struct tm tm;
    if (t == 0 || !gmtime_r(&t, &tm) || strftime(out, n, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(out, n, "unknown");
}

/* ---- contexts ---------------------------------------------------------- */

static void sig_of(const char *path, struct file_sig *s)
{
    struct stat st;
    memset(s, 0, sizeof *s);
    if (path && stat(path, &st) == 0) {
        s->dev = st.st_dev;
        s->ino = st.st_ino;
        s->size = st.st_size;
        s->mtime = st.st_mtim;
        s->ok = true;
    }
}

static bool sig_eq(const struct file_sig *a, const struct file_sig *b)
{
    return a->ok == b->ok && a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec;
}

static int verify_cb(int ok, WOLFSSL_X509_STORE_CTX *st);

static int readable(const char *flag, const char *path, struct sp_err *err)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return sp_errf(err, SP_BAD_REQUEST, "%s %s: %s", flag, path, strerror(errno));
    return 0;
}

/* A whole PEM file in memory (NUL-terminated), so that files and pushed
 * PEM take one path. Certificates and keys are small: 1 MiB is plenty. */
static char *slurp(const char *flag, const char *path, size_t *n, struct sp_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        sp_errf(err, SP_BAD_REQUEST, "%s %s: %s", flag, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap + 1);
    while (buf && len < cap) {
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            sp_errf(err, SP_BAD_REQUEST, "%s %s: %s", flag, path, strerror(errno));
            free(buf);
            buf = NULL;
            break;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    if (!buf) {
        if (err->msg[0] == 0)
            sp_errf(err, SP_INTERNAL, "out of memory");
        return NULL;
    }
    if (len == cap) {
        free(buf);
        sp_errf(err, SP_TOO_LARGE, "%s %s: over 1 MiB, not a certificate or key", flag, path);
        return NULL;
    }
    buf[len] = 0;
    *n = len;
    return buf;
}

/* Does the EC private key belong to the certificate? wolfSSL's own pair
 * check lets a mismatched EC key through, and a server with one fails
 * every handshake with a signature error. 1 yes, 0 no, -1 not an EC key
 * (left to wolfSSL's check). */
static int ec_pair_matches(WOLFSSL_X509 *x, const char *key, size_t keyn)
{
    int rc = -1;
    unsigned char *der = malloc(keyn + 1);
    unsigned char spki[512], a[160], b[160];
    int spkin = sizeof spki;
    word32 an = sizeof a, bn = sizeof b, idx = 0;
    ecc_key priv, pub;
    bool pi = false, pu = false;
    if (!der)
        return -1;
    int dn = wc_KeyPemToDer((const unsigned char *)key, (int)keyn, der, (int)keyn + 1, NULL);
    if (dn <= 0 || wc_ecc_init(&priv) != 0)
        goto out;
    pi = true;
    if (wc_EccPrivateKeyDecode(der, &idx, &priv, (word32)dn) != 0)
        goto out;
    rc = 0;
    if (wc_ecc_make_pub(&priv, NULL) != 0 || wc_ecc_export_x963(&priv, a, &an) != 0)
        goto out;
    if (wolfSSL_X509_get_pubkey_buffer(x, spki, &spkin) != WOLFSSL_SUCCESS || spkin <= 0 ||
        wc_ecc_init(&pub) != 0)
        goto out;
    pu = true;
    idx = 0;
    if (wc_EccPublicKeyDecode(spki, &idx, &pub, (word32)spkin) != 0 ||
        wc_ecc_export_x963(&pub, b, &bn) != 0)
        goto out;
    rc = an == bn && memcmp(a, b, an) == 0;
out:
    if (pi)
        wc_ecc_free(&priv);
    if (pu)
        wc_ecc_free(&pub);
    /* The DER holds the private key: wipe it. */
    memset(der, 0, keyn + 1);
    free(der);
    return rc;
}

/* A fresh WOLFSSL_CTX from PEM: our chain and key from files or memory, the
 * CA always from its file. Also learns our CN and notAfter. */
static WOLFSSL_CTX *build(enum sp_tls_role role, const char *certf, const char *keyf,
                          const char *caf, const char *certb, size_t certn, const char *keyb,
                          size_t keyn, char *cn, size_t cnn, time_t *not_after, struct sp_err *err)
{
    pthread_once(&init_once, tls_init);
    if (init_rc < 0) {
        sp_errf(err, SP_INTERNAL, "wolfSSL failed to initialise");
        return NULL;
    }
    err->msg[0] = 0;
    WOLFSSL_CTX *c = NULL;
    WOLFSSL_X509 *x = NULL;
    char *certm = NULL, *keym = NULL;
    const char *certd = certf ? "--tls-cert " : "the certificate";
    const char *keyd = keyf ? "--tls-key " : "the key";
    if (certf && !(certb = certm = slurp("--tls-cert", certf, &certn, err)))
        goto fail;
    if (keyf && !(keyb = keym = slurp("--tls-key", keyf, &keyn, err)))
        goto fail;
    if (readable("--tls-ca", caf, err) < 0)
        goto fail;
    c = wolfSSL_CTX_new(role == SP_TLS_SERVER ? wolfTLSv1_3_server_method()
                                              : wolfTLSv1_3_client_method());
    if (!c) {
        sp_errf(err, SP_INTERNAL, "cannot create a TLS context (out of memory?)");
        goto fail;
    }
    /* Debian's wolfSSL has no AES-NI: ChaCha20-Poly1305 moves bulk output
     * about twice as fast as AES-GCM there, so both ends ask for it first
     * and a server picks by its own order (Python's ssl offers AES first). */
    if (wolfSSL_CTX_set_cipher_list(c, "TLS13-CHACHA20-POLY1305-SHA256:TLS13-AES128-GCM-SHA256:"
                                       "TLS13-AES256-GCM-SHA384") != WOLFSSL_SUCCESS) {
        sp_errf(err, SP_INTERNAL, "this wolfSSL lacks the TLS 1.3 cipher suites");
        goto fail;
    }
    if (wolfSSL_CTX_use_certificate_chain_buffer_format(c, (const unsigned char *)certb,
                                                        (long)certn,
                                                        WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS) {
        sp_errf(err, SP_BAD_REQUEST, "%s%s: not a PEM certificate (chain)", certd,
                certf ? certf : "");
        goto fail;
    }
    if (wolfSSL_CTX_use_PrivateKey_buffer(c, (const unsigned char *)keyb, (long)keyn,
                                          WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS) {
        sp_errf(err, SP_BAD_REQUEST, "%s%s: not a PEM private key (or an encrypted one)", keyd,
                keyf ? keyf : "");
        goto fail;
    }
    x = wolfSSL_X509_load_certificate_buffer((const unsigned char *)certb, (int)certn,
                                             WOLFSSL_FILETYPE_PEM);
    if (!x) {
        sp_errf(err, SP_BAD_REQUEST, "%s%s: cannot parse the certificate", certd,
                certf ? certf : "");
        goto fail;
    }
    int pair = ec_pair_matches(x, keyb, keyn);
    if (pair == 0 || (pair < 0 && wolfSSL_CTX_check_private_key(c) != WOLFSSL_SUCCESS)) {
        sp_errf(err, SP_BAD_REQUEST, "the key%s%s does not match the certificate%s%s",
                keyf ? " in " : "", keyf ? keyf : "", certf ? " in " : "", certf ? certf : "");
        goto fail;
    }
    if (wolfSSL_CTX_load_verify_locations(c, caf, NULL) != WOLFSSL_SUCCESS) {
        sp_errf(err, SP_BAD_REQUEST, "--tls-ca %s: no usable PEM CA certificate in it", caf);
        goto fail;
    }
    x509_cn(x, cn, cnn);
    *not_after = asn1_time(wolfSSL_X509_get_notAfter(x));
    wolfSSL_X509_free(x);
    if (keym) {
        memset(keym, 0, keyn);
        free(keym);
    }
    free(certm);
    wolfSSL_CTX_set_verify(
        c, WOLFSSL_VERIFY_PEER | (role == SP_TLS_SERVER ? WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
        verify_cb);
    /* Links are long-lived and never resumed: no tickets to mint per accept. */
    if (role == SP_TLS_SERVER)
        wolfSSL_CTX_no_ticket_TLSv13(c);
    return c;
fail:
    if (x)
        wolfSSL_X509_free(x);
    if (c)
        wolfSSL_CTX_free(c);
    if (keym) {
        memset(keym, 0, keyn);
        free(keym);
    }
    free(certm);
    return NULL;
}

struct sp_tls_ctx *sp_tls_ctx_new(enum sp_tls_role role, const char *cert, const char *key,
                                  const char *ca, struct sp_err *err)
{
    if (!cert || !key || !ca || !*cert || !*key || !*ca) {
        sp_errf(err, SP_BAD_REQUEST, "TLS needs --tls-cert, --tls-key and --tls-ca");
        return NULL;
    }
    struct sp_tls_ctx *x = calloc(1, sizeof *x);
    if (!x || !(x->cert = strdup(cert)) || !(x->key = strdup(key)) || !(x->ca = strdup(ca))) {
        sp_tls_ctx_free(x);
        sp_errf(err, SP_INTERNAL, "out of memory");
        return NULL;
    }
    x->role = role;
    sig_of(cert, &x->sig[0]);
    sig_of(key, &x->sig[1]);
    sig_of(ca, &x->sig[2]);
    x->ctx = build(role, cert, key, ca, NULL, 0, NULL, 0, x->cn, sizeof x->cn, &x->not_after, err);
    if (!x->ctx) {
        sp_tls_ctx_free(x);
        return NULL;
    }
    return x;
}

void sp_tls_ctx_free(struct sp_tls_ctx *x)
{
    if (!x)
        return;
    if (x->ctx)
        wolfSSL_CTX_free(x->ctx);
    free(x->cert);
    free(x->key);
    free(x->ca);
    free(x);
}

int sp_tls_ctx_reload(struct sp_tls_ctx *x, bool force, struct sp_err *err)
{
    struct file_sig s[3];
    sig_of(x->cert, &s[0]);
    sig_of(x->key, &s[1]);
    sig_of(x->ca, &s[2]);
    if (!force && sig_eq(&s[0], &x->sig[0]) && sig_eq(&s[1], &x->sig[1]) &&
        sig_eq(&s[2], &x->sig[2]))
        return 0;
    /* Remember this set even when it is broken, so a bad file is reported
     * once rather than on every accept; its next change is tried again. */
    memcpy(x->sig, s, sizeof s);
    char cn[sizeof x->cn];
    time_t na = 0;
    WOLFSSL_CTX *c =
        build(x->role, x->cert, x->key, x->ca, NULL, 0, NULL, 0, cn, sizeof cn, &na, err);
    if (!c) {
        char m[sizeof err->msg];
        snprintf(m, sizeof m, "%.580s (kept the certificate loaded before)", err->msg);
        return sp_errf(err, err->code, "%s", m);
    }
    wolfSSL_CTX_free(x->ctx); /* open connections hold their own reference */
    x->ctx = c;
    memcpy(x->cn, cn, sizeof cn);
    x->not_after = na;
    return 1;
}

int sp_tls_ctx_set_pem(struct sp_tls_ctx *x, const char *cert, size_t certn, const char *key,
                       size_t keyn, struct sp_err *err)
{
    if (!cert || !key || certn == 0 || keyn == 0 || certn > INT32_MAX || keyn > INT32_MAX)
        return sp_errf(err, SP_BAD_REQUEST, "a certificate and a key (PEM) are required");
    char cn[sizeof x->cn];
    time_t na = 0;
    WOLFSSL_CTX *c =
        build(x->role, NULL, NULL, x->ca, cert, certn, key, keyn, cn, sizeof cn, &na, err);
    if (!c)
        return -1;
    wolfSSL_CTX_free(x->ctx);
    x->ctx = c;
    memcpy(x->cn, cn, sizeof cn);
    x->not_after = na;
    return 0;
}

int sp_tls_pem_info(const char *cert, size_t certn, char *cn, size_t cnn, time_t *not_after,
                    struct sp_err *err)
{
    pthread_once(&init_once, tls_init);
    if (!cert || certn == 0 || certn > INT32_MAX)
        return sp_errf(err, SP_BAD_REQUEST, "no certificate given");
    WOLFSSL_X509 *x = wolfSSL_X509_load_certificate_buffer((const unsigned char *)cert, (int)certn,
                                                           WOLFSSL_FILETYPE_PEM);
    if (!x)
        return sp_errf(err, SP_BAD_REQUEST, "not a PEM certificate");
    x509_cn(x, cn, cnn);
    *not_after = asn1_time(wolfSSL_X509_get_notAfter(x));
    wolfSSL_X509_free(x);
    return 0;
}

time_t sp_tls_ctx_not_after(const struct sp_tls_ctx *x)
{
    return x ? x->not_after : 0;
}

const char *sp_tls_ctx_cn(const struct sp_tls_ctx *x)
{
    return x ? x->cn : "";
}

/* ---- socket callbacks -------------------------------------------------- */

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    (void)ssl;
    struct sp_tls *t = arg;
    ssize_t n;
    do
        n = recv(t->fd, buf, (size_t)sz, 0);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        if (t->nfirst < sizeof t->first) {
            size_t k = sizeof t->first - t->nfirst;
            if (k > (size_t)n)
                k = (size_t)n;
            memcpy(t->first + t->nfirst, buf, k);
            t->nfirst += k;
        }
        return (int)n;
    }
    if (n == 0) {
        t->eof = true;
        return WOLFSSL_CBIO_ERR_CONN_CLOSE;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return WOLFSSL_CBIO_ERR_WANT_READ;
    if (errno == ECONNRESET) {
        t->eof = true;
        return WOLFSSL_CBIO_ERR_CONN_RST;
    }
    return WOLFSSL_CBIO_ERR_GENERAL;
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    (void)ssl;
    struct sp_tls *t = arg;
    ssize_t n;
    do
        n = send(t->fd, buf, (size_t)sz, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n >= 0)
        return (int)n;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return WOLFSSL_CBIO_ERR_WANT_WRITE;
    if (errno == EPIPE || errno == ECONNRESET) {
        t->eof = true;
        return WOLFSSL_CBIO_ERR_CONN_CLOSE;
    }
    return WOLFSSL_CBIO_ERR_GENERAL;
}

/* ---- verification ------------------------------------------------------ */

static const char *peer_kind(const struct sp_tls *t)
{
    return t->role == SP_TLS_SERVER ? "client" : "server";
}

/* Called for every certificate of the peer's chain (wolfSSL is built with
 * WOLFSSL_ALWAYS_VERIFY_CB); keeps the leaf's CN and, on a refusal, the
 * reason with the certificate's name. The EKU rule is ours: a certificate
 * that names extended key usages must allow the peer's role. */
static int verify_cb(int ok, WOLFSSL_X509_STORE_CTX *st)
{
    struct sp_tls *t = st ? st->userCtx : NULL;
    if (!t)
        return ok;
    WOLFSSL_X509 *x = st->current_cert;
    char cn[256];
    x509_cn(x, cn, sizeof cn);
    if (st->error_depth == 0 && cn[0] && ok)
        snprintf(t->peer_cn, sizeof t->peer_cn, "%s", cn);
    const char *kind = peer_kind(t);
    char when[64];
    if (ok && st->error_depth == 0 && x) {
        unsigned eku = wolfSSL_X509_get_extended_key_usage(x);
        unsigned need = t->role == SP_TLS_SERVER ? XKU_CLIENT : XKU_SERVER;
        if (eku && !(eku & (need | XKU_ANY))) {
            snprintf(t->verify, sizeof t->verify,
                     "the %s certificate (CN=%.200s) is not for %s use (its extended key usage "
                     "lacks %s)",
                     kind, cn, t->role == SP_TLS_SERVER ? "client" : "server",
                     t->role == SP_TLS_SERVER ? "clientAuth" : "serverAuth");
            st->error = EXTKEYUSE_AUTH_E;
            return 0;
        }
        return 1;
    }
    if (ok)
        return 1;
    if (t->verify[0])
        return 0; /* the first reason is the one to tell */
    /* wolfSSL reports expiry as X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD
     * (14) and a future notBefore as ..._NOT_BEFORE_FIELD (13): the dates
     * decide which it is. */
    int e = st->error;
    time_t now = time(NULL);
    if (e == X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD && x &&
        asn1_time(wolfSSL_X509_get_notAfter(x)) != 0 &&
        asn1_time(wolfSSL_X509_get_notAfter(x)) < now)
        e = X509_V_ERR_CERT_HAS_EXPIRED;
    if (e == X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD && x &&
        asn1_time(wolfSSL_X509_get_notBefore(x)) > now)
        e = X509_V_ERR_CERT_NOT_YET_VALID;
    switch (e) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case ASN_AFTER_DATE_E:
        fmt_time(asn1_time(x ? wolfSSL_X509_get_notAfter(x) : NULL), when, sizeof when);
        snprintf(t->verify, sizeof t->verify,
                 "the %s certificate has expired (CN=%.200s, notAfter %s)", kind, cn, when);
        break;
    case X509_V_ERR_CERT_NOT_YET_VALID:
    case ASN_BEFORE_DATE_E:
        fmt_time(asn1_time(x ? wolfSSL_X509_get_notBefore(x) : NULL), when, sizeof when);
        snprintf(t->verify, sizeof t->verify,
                 "the %s certificate is not valid yet (CN=%.200s, notBefore %s; clocks apart?)",
                 kind, cn, when);
        break;
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_UNTRUSTED:
    case ASN_NO_SIGNER_E:
    case ASN_SELF_SIGNED_E:
        snprintf(t->verify, sizeof t->verify,
                 "the %s certificate is not signed by this %s's CA (CN=%.200s)", kind,
                 t->role == SP_TLS_SERVER ? "server" : "client", cn);
        break;
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
    case ASN_SIG_CONFIRM_E:
        snprintf(t->verify, sizeof t->verify,
                 "the %s certificate's signature does not verify against the CA (CN=%.200s)", kind,
                 cn);
        break;
    case DOMAIN_NAME_MISMATCH:
        snprintf(t->verify, sizeof t->verify,
                 "the %s certificate is for CN=%.200s, not for the expected name %.200s", kind, cn,
                 t->expect);
        break;
    case X509_V_ERR_INVALID_PURPOSE:
    case EXTKEYUSE_AUTH_E:
        snprintf(
            t->verify, sizeof t->verify,
            "the %s certificate (CN=%.200s) is not for %s use (its extended key usage lacks %s)",
            kind, cn, kind, t->role == SP_TLS_SERVER ? "clientAuth" : "serverAuth");
        break;
    default:
        snprintf(t->verify, sizeof t->verify, "the %s certificate (CN=%.200s) was refused: %s (%d)",
                 kind, cn, wolfSSL_ERR_reason_error_string((unsigned long)st->error), st->error);
        break;
    }
    return 0;
}

/* ---- connections ------------------------------------------------------- */

struct sp_tls *sp_tls_new(struct sp_tls_ctx *x, int fd, const char *expect_name, struct sp_err *err)
{
    struct sp_tls *t = calloc(1, sizeof *t);
    if (!t) {
        sp_errf(err, SP_INTERNAL, "out of memory");
        return NULL;
    }
    t->fd = fd;
    t->role = x->role;
    t->ssl = wolfSSL_new(x->ctx);
    if (!t->ssl) {
        free(t);
        sp_errf(err, SP_INTERNAL, "cannot create a TLS connection (out of memory?)");
        return NULL;
    }
    wolfSSL_SSLSetIORecv(t->ssl, io_recv);
    wolfSSL_SSLSetIOSend(t->ssl, io_send);
    wolfSSL_SetIOReadCtx(t->ssl, t);
    wolfSSL_SetIOWriteCtx(t->ssl, t);
    wolfSSL_SetCertCbCtx(t->ssl, t);
    if (expect_name && *expect_name) {
        snprintf(t->expect, sizeof t->expect, "%s", expect_name);
        if (wolfSSL_check_domain_name(t->ssl, expect_name) != WOLFSSL_SUCCESS) {
            sp_tls_free(t);
            sp_errf(err, SP_INTERNAL, "cannot set the expected TLS name");
            return NULL;
        }
    }
    return t;
}

void sp_tls_free(struct sp_tls *t)
{
    if (!t)
        return;
    if (t->ssl)
        wolfSSL_free(t->ssl);
    free(t);
}

static const char *alert_name(int code)
{
    switch (code) {
    case 0: return "close_notify";
    case 10: return "unexpected_message";
    case 20: return "bad_record_mac";
    case 22: return "record_overflow";
    case 40: return "handshake_failure";
    case 42: return "bad_certificate";
    case 43: return "unsupported_certificate";
    case 44: return "certificate_revoked";
    case 45: return "certificate_expired";
    case 46: return "certificate_unknown";
    case 47: return "illegal_parameter";
    case 48: return "unknown_ca";
    case 49: return "access_denied";
    case 50: return "decode_error";
    case 51: return "decrypt_error";
    case 70: return "protocol_version";
    case 71: return "insufficient_security";
    case 80: return "internal_error";
    case 86: return "inappropriate_fallback";
    case 109: return "missing_extension";
    case 110: return "unsupported_extension";
    case 112: return "unrecognized_name";
    case 116: return "certificate_required";
    case 120: return "no_application_protocol";
    default: return "unknown";
    }
}

/* One line for a failed TLS step. `e` is wolfSSL_get_error()'s answer. */
static enum sp_code describe_failure(struct sp_tls *t, int e, char *out, size_t n)
{
    bool server = t->role == SP_TLS_SERVER;
    if (t->verify[0]) {
        snprintf(out, n, "%s", t->verify);
        return SP_UNAUTHORIZED;
    }
    if (t->nfirst > 0 && !sp_tls_looks_like_tls(t->first, t->nfirst)) {
        snprintf(out, n, "%s",
                 server ? "the peer is not speaking TLS (plaintext client on a tls: port?)"
                        : "the agent answered in plaintext (it listens with tcp:, not tls:?)");
        return SP_BAD_REQUEST;
    }
    WOLFSSL_ALERT_HISTORY h;
    memset(&h, 0, sizeof h);
    wolfSSL_get_alert_history(t->ssl, &h);
    if (e == FATAL_ERROR && h.last_rx.code > 0) {
        int a = h.last_rx.code;
        const char *name = alert_name(a);
        switch (a) {
        case 42:
        case 43:
        case 44:
        case 45:
        case 46:
        case 48:
        case 49:
            snprintf(out, n,
                     server ? "the client refused this server's certificate (TLS alert %s: is "
                              "it signed by the CA the client trusts?)"
                            : "the server refused our client certificate (TLS alert %s: is it "
                              "signed by the server's --tls-ca, valid now, and for clientAuth?)",
                     name);
            return SP_UNAUTHORIZED;
        case 116:
            snprintf(out, n,
                     "the server requires a client certificate and we sent none (TLS "
                     "alert certificate_required: give --tls-cert/--tls-key)");
            return SP_UNAUTHORIZED;
        case 70:
            snprintf(out, n,
                     "the peer refused TLS 1.3 (TLS alert protocol_version: it speaks "
                     "TLS 1.2 or older?)");
            return SP_BAD_REQUEST;
        default:
            snprintf(out, n, "the peer ended the TLS handshake (TLS alert %s)", name);
            return SP_BAD_REQUEST;
        }
    }
    switch (e) {
    case NO_PEER_CERT:
        snprintf(out, n,
                 "the peer sent no client certificate (this %s requires one signed by "
                 "its --tls-ca)",
                 server ? "server" : "side");
        return SP_UNAUTHORIZED;
    case VERSION_ERROR:
    case UNSUPPORTED_PROTO_VERSION:
    case MATCH_SUITE_ERROR:
        snprintf(out, n, "%s",
                 server ? "the peer offered TLS 1.2 or older; slot links need TLS 1.3"
                        : "the server does not speak TLS 1.3 (slot links need it)");
        return SP_BAD_REQUEST;
    case DOMAIN_NAME_MISMATCH:
        snprintf(out, n, "the server certificate is not for the expected name %.200s", t->expect);
        return SP_UNAUTHORIZED;
    case EXTKEYUSE_AUTH_E:
        snprintf(out, n, "the %s certificate is not for %s use (extended key usage)", peer_kind(t),
                 peer_kind(t));
        return SP_UNAUTHORIZED;
    case SOCKET_PEER_CLOSED_E:
    case SOCKET_ERROR_E:
        if (t->eof || e == SOCKET_PEER_CLOSED_E) {
            snprintf(out, n, "%s",
                     t->done ? "the peer closed the connection"
                             : "the peer closed the connection during the TLS "
                               "handshake");
            return SP_BAD_REQUEST;
        }
        snprintf(out, n, "TLS socket error: %s", strerror(errno));
        return SP_INTERNAL;
    default: break;
    }
    char buf[WOLFSSL_MAX_ERROR_SZ];
    wolfSSL_ERR_error_string_n((unsigned long)e, buf, sizeof buf);
    snprintf(out, n, "TLS %s failed: %s (wolfSSL %d)", t->done ? "link" : "handshake", buf, e);
    return SP_BAD_REQUEST;
}

int sp_tls_handshake(struct sp_tls *t, struct sp_err *err)
{
    if (t->done)
        return 1;
    t->want = 0;
    int rc = t->role == SP_TLS_SERVER ? wolfSSL_accept(t->ssl) : wolfSSL_connect(t->ssl);
    if (rc == WOLFSSL_SUCCESS) {
        t->done = true;
        return 1;
    }
    int e = wolfSSL_get_error(t->ssl, rc);
    if (e == WOLFSSL_ERROR_WANT_READ) {
        t->want = SP_TLS_WANT_READ;
        return 0;
    }
    if (e == WOLFSSL_ERROR_WANT_WRITE) {
        t->want = SP_TLS_WANT_WRITE;
        return 0;
    }
    enum sp_code c = describe_failure(t, e, t->error, sizeof t->error);
    return sp_errf(err, c, "%s", t->error);
}

int sp_tls_want(const struct sp_tls *t)
{
    return t->want;
}

bool sp_tls_done(const struct sp_tls *t)
{
    return t->done;
}

static uint32_t be32(const char *b)
{
    const unsigned char *p = (const unsigned char *)b;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* wolfSSL_read/write failed: EAGAIN with want set, 0 for an orderly close,
 * or -1 with the reason kept. */
static ssize_t io_failed(struct sp_tls *t, int rc, bool reading)
{
    int e = wolfSSL_get_error(t->ssl, rc);
    if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE) {
        t->want = e == WOLFSSL_ERROR_WANT_READ ? SP_TLS_WANT_READ : SP_TLS_WANT_WRITE;
        errno = EAGAIN;
        return -1;
    }
    if (reading && (e == WOLFSSL_ERROR_ZERO_RETURN || (t->eof && e != FATAL_ERROR)))
        return 0; /* close_notify, or TCP closed at a record boundary */
    describe_failure(t, e, t->error, sizeof t->error);
    errno = t->eof ? ECONNRESET : EPROTO;
    return -1;
}

ssize_t sp_tls_reader_fill(struct sp_reader *r, struct sp_tls *t)
{
    /* The same sizing as sp_reader_fill: never grow for a refused header. */
    size_t have = r->len - r->off;
    size_t want;
    if (have < 4) {
        want = READ_CHUNK;
    } else {
        uint32_t n = be32(r->buf + r->off);
        if (n > r->max_frame) {
            errno = EMSGSIZE;
            return -1;
        }
        want = have < (size_t)n + 4 ? (size_t)n + 4 - have : READ_CHUNK;
    }
    if (want > READ_CHUNK)
        want = READ_CHUNK;
    t->want = 0;
    int rc;
    if (r->cap - r->len >= want) {
        /* Room already: decrypt straight into the reader. */
        rc = wolfSSL_read(t->ssl, r->buf + r->len, (int)(r->cap - r->len));
        if (rc > 0) {
            r->len += (size_t)rc;
            return rc;
        }
    } else {
        char buf[READ_CHUNK];
        rc = wolfSSL_read(t->ssl, buf, (int)want);
        if (rc > 0) {
            if (sp_reader_feed(r, buf, (size_t)rc) < 0) {
                errno = ENOMEM;
                return -1;
            }
            return rc;
        }
    }
    return io_failed(t, rc, true);
}

ssize_t sp_tls_writer_flush(struct sp_writer *w, struct sp_tls *t)
{
    size_t end = w->in_frame ? w->frame_start : w->len;
    t->want = 0;
    while (w->off < end) {
        /* After WANT_WRITE wolfSSL must be offered at least the bytes it
         * was offered before; the queue only grows, so min() with the same
         * chunk size does that. */
        size_t n = end - w->off;
        if (n > WRITE_CHUNK)
            n = WRITE_CHUNK;
        int rc = wolfSSL_write(t->ssl, w->buf + w->off, (int)n);
        if (rc <= 0) {
            if (io_failed(t, rc, false) < 0 && errno == EAGAIN)
                break;
            return -1;
        }
        w->off += (size_t)rc;
    }
    if (w->off == w->len && !w->in_frame) {
        w->off = w->len = 0;
        if (w->cap > 256 * 1024) {
            free(w->buf);
            w->buf = NULL;
            w->cap = 0;
        }
    }
    return (ssize_t)(w->len - w->off);
}

ssize_t sp_tls_read(struct sp_tls *t, void *buf, size_t n)
{
    t->want = 0;
    int rc = wolfSSL_read(t->ssl, buf, (int)(n > INT32_MAX ? INT32_MAX : n));
    return rc > 0 ? rc : io_failed(t, rc, true);
}

ssize_t sp_tls_write(struct sp_tls *t, const void *buf, size_t n)
{
    /* The same chunking rule as the writer: a retry after WANT_WRITE offers
     * what was offered before. */
    t->want = 0;
    int rc = wolfSSL_write(t->ssl, buf, (int)(n > WRITE_CHUNK ? WRITE_CHUNK : n));
    return rc > 0 ? rc : io_failed(t, rc, false);
}

const char *sp_tls_error(const struct sp_tls *t)
{
    return t->error[0] ? t->error : "TLS link failed";
}

bool sp_tls_pending(const struct sp_tls *t)
{
    return t->done && wolfSSL_has_pending(t->ssl);
}

void sp_tls_shutdown(struct sp_tls *t)
{
    if (t && t->ssl && t->done && !t->eof)
        wolfSSL_shutdown(t->ssl); /* one close_notify; the socket is non-blocking */
}

const char *sp_tls_peer_cn(const struct sp_tls *t)
{
    return t->peer_cn;
}

const char *sp_tls_describe(const struct sp_tls *t)
{
    struct sp_tls *m = (struct sp_tls *)t; /* the name is cached */
    if (!m->desc[0] && m->done) {
        /* The IANA name, as OpenSSL and Python print it. */
        int cs = wolfSSL_get_current_cipher_suite(m->ssl);
        const char *name =
            wolfSSL_get_cipher_name_iana_from_suite((unsigned char)(cs >> 8), (unsigned char)cs);
        snprintf(m->desc, sizeof m->desc, "%s %s", wolfSSL_get_version(m->ssl),
                 name ? name : wolfSSL_get_cipher_name(m->ssl));
    }
    return m->desc;
}

bool sp_tls_looks_like_tls(const void *buf, size_t n)
{
    const unsigned char *p = buf;
    /* A handshake record (22) of version 3.x. A plaintext frame header
     * would mean a frame of 369 MB or more, over any limit. */
    if (n == 0 || p[0] != 22)
        return false;
    if (n >= 2 && p[1] != 3)
        return false;
    if (n >= 3 && p[2] > 4)
        return false;
    return true;
}
