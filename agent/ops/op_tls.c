/* tls_renew: the controller pushes a renewed certificate and key over an
 * authenticated link before the old one expires. The agent swaps them in
 * memory (new handshakes use them, open connections keep theirs) and writes
 * them back to its --tls-cert/--tls-key files when it may, so a restart
 * starts with the renewed pair. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "tls.h"

/* Replace path with data: a temporary file beside it, fsync, rename, so a
 * crash leaves the old file or the new one, never half of each. */
static int write_atomic(const char *path, const char *data, size_t n, mode_t mode,
                        struct sp_err *err)
{
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.renew.%d~", path, (int)getpid()) >= (int)sizeof tmp)
        return sp_errf(err, SP_TOO_LARGE, "path too long: %s", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return sp_errf(err, SP_INTERNAL, "%s: %s", tmp, strerror(errno));
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, data + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return sp_errf(err, SP_INTERNAL, "%s: %s", tmp, strerror(e));
        }
        off += (size_t)w;
    }
    /* The mode is exact whatever the umask (the key stays 0600). */
    if (fchmod(fd, mode) < 0 || fsync(fd) < 0 || close(fd) < 0 || rename(tmp, path) < 0) {
        int e = errno;
        unlink(tmp);
        return sp_errf(err, SP_INTERNAL, "%s: %s", path, strerror(e));
    }
    return 0;
}

int op_tls_renew(struct req *rq, struct sp_err *err)
{
    struct agent *ag = rq->ag;
    if (!ag->tls)
        return sp_errf(err, SP_BAD_REQUEST, "this agent has no tls: listener to renew");
    size_t certn, keyn;
    const char *cert = arg_bin(rq, "cert", &certn), *key = arg_bin(rq, "key", &keyn);
    char cn[256];
    time_t not_after = 0;
    if (sp_tls_pem_info(cert, certn, cn, sizeof cn, &not_after, err) < 0)
        return -1;
    /* The controller renews, it does not rename: a certificate for another
     * identity would let this agent answer as someone else. */
    if (strcmp(cn, sp_tls_ctx_cn(ag->tls)) != 0)
        return sp_errf(err, SP_BAD_REQUEST,
                       "the new certificate is for CN=%s, this agent's is CN=%s (renewal keeps "
                       "the name)",
                       cn, sp_tls_ctx_cn(ag->tls));
    if (sp_tls_ctx_set_pem(ag->tls, cert, certn, key, keyn, err) < 0)
        return -1;
    /* Written back when we may, key first: until both are in place the
     * file set does not match and a reload keeps the pair in memory. */
    struct sp_err werr;
    bool written = ag->opt.tls_cert && ag->opt.tls_key &&
                   write_atomic(ag->opt.tls_key, key, keyn, 0600, &werr) == 0 &&
                   write_atomic(ag->opt.tls_cert, cert, certn, 0644, &werr) == 0;
    if (written)
        log_info("TLS: certificate renewed (CN=%s, notAfter %lld), written to %s", cn,
                 (long long)not_after, ag->opt.tls_cert);
    else
        log_warn("TLS: certificate renewed in memory (CN=%s, notAfter %lld); not written back: "
                 "%s",
                 cn, (long long)not_after, werr.msg);
    msgpack_packer *pk = req_reply_begin(rq);
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "not_after", not_after > 0 ? (uint64_t)not_after : 0);
    sp_pack_kv_str(pk, "cn", cn);
    sp_pack_kv_bool(pk, "written", written);
    req_reply_end(rq);
    return OP_DONE;
}
