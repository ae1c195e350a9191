/* Unit tests of libslotproto: frame reader and writer with partial input,
 * real non-blocking fds, limits and back-pressure; the structural check;
 * envelope and typed accessors; packing helpers; error codes; sha256; and
 * the shared vectors in proto/vectors. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "slotproto.h"

#define CHUNK 65536

/* ---- helpers ---- */

static size_t frame_of(const char *body, size_t n, char *out)
{
    out[0] = (char)(n >> 24);
    out[1] = (char)(n >> 16);
    out[2] = (char)(n >> 8);
    out[3] = (char)n;
    memcpy(out + 4, body, n);
    return n + 4;
}

/* Frame {"id": id, "op": op, "args": {"slot": 1, "path": "p"}} into out. */
static size_t pack_req(uint64_t id, const char *op, char *out)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    sp_pack_request_head(&pk, id, op, true);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "slot", 1);
    sp_pack_kv_str(&pk, "path", "p");
    size_t n = frame_of(sb.data, sb.size, out);
    msgpack_sbuffer_destroy(&sb);
    return n;
}

static size_t hex_decode(const char *hex, unsigned char **out)
{
    size_t n = strlen(hex) / 2;
    *out = malloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        (*out)[i] = (unsigned char)v;
    }
    return n;
}

static int check(const char *data, size_t n)
{
    struct sp_err err;
    return sp_msgpack_check(data, n, SP_MAX_DEPTH, &err);
}

/* `levels` nested one-element arrays around `inner` (a single byte). */
static size_t nested(char *out, unsigned levels, char inner)
{
    memset(out, 0x91, levels);
    out[levels] = inner;
    return levels + 1;
}

static size_t round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

/* ---- reader ---- */

static void reader_byte_by_byte(void **state)
{
    (void)state;
    char buf[256];
    size_t n = pack_req(42, "read_file", buf);
    struct sp_reader r;
    sp_reader_init(&r, 1024);
    const char *data;
    uint32_t len;
    struct sp_err err;
    for (size_t i = 0; i < n - 1; i++) {
        assert_int_equal(sp_reader_feed(&r, buf + i, 1), 0);
        assert_int_equal(sp_reader_next(&r, &data, &len, &err), 0);
        assert_int_equal(sp_reader_pending(&r), i + 1);
    }
    assert_int_equal(sp_reader_feed(&r, buf + n - 1, 1), 0);
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_int_equal(len, n - 4);
    assert_memory_equal(data, buf + 4, len);
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 0);
    assert_int_equal(sp_reader_pending(&r), 0);
    sp_reader_free(&r);
}

static void reader_many_frames_one_feed_and_split(void **state)
{
    (void)state;
    char one[256], all[256 * 10];
    size_t n = pack_req(7, "stat", one);
    for (int i = 0; i < 10; i++)
        memcpy(all + i * n, one, n);
    struct sp_reader r;
    sp_reader_init(&r, 1024);
    const char *data;
    uint32_t len;
    struct sp_err err;
    /* all ten in one feed */
    assert_int_equal(sp_reader_feed(&r, all, 10 * n), 0);
    int got = 0;
    while (sp_reader_next(&r, &data, &len, &err) == 1) {
        assert_int_equal(len, n - 4);
        assert_memory_equal(data, one + 4, n - 4);
        got++;
    }
    assert_int_equal(got, 10);
    /* first 3.5 frames, then the rest */
    size_t cut = 3 * n + n / 2;
    sp_reader_feed(&r, all, cut);
    got = 0;
    while (sp_reader_next(&r, &data, &len, &err) == 1)
        got++;
    assert_int_equal(got, 3);
    sp_reader_feed(&r, all + cut, 10 * n - cut);
    while (sp_reader_next(&r, &data, &len, &err) == 1) {
        assert_memory_equal(data, one + 4, n - 4);
        got++;
    }
    assert_int_equal(got, 10);
    sp_reader_free(&r);
}

static void reader_every_split_point(void **state)
{
    (void)state;
    char two[512];
    size_t n1 = pack_req(1, "hello", two);
    size_t n = n1 + pack_req(2, "health", two + n1);
    for (size_t cut = 0; cut <= n; cut++) {
        struct sp_reader r;
        sp_reader_init(&r, 1024);
        const char *data;
        uint32_t len;
        struct sp_err err;
        int got = 0;
        sp_reader_feed(&r, two, cut);
        while (sp_reader_next(&r, &data, &len, &err) == 1)
            got++;
        assert_int_equal(got, cut >= n ? 2 : cut >= n1 ? 1 : 0);
        sp_reader_feed(&r, two + cut, n - cut);
        while (sp_reader_next(&r, &data, &len, &err) == 1) {
            got++;
            if (got == 2)
                assert_memory_equal(data, two + n1 + 4, n - n1 - 4);
        }
        assert_int_equal(got, 2);
        assert_int_equal(sp_reader_pending(&r), 0);
        sp_reader_free(&r);
    }
}

static void reader_oversize_refused_without_allocation(void **state)
{
    (void)state;
    struct sp_reader r;
    sp_reader_init(&r, 1 << 20);
    unsigned char hdr[4] = {0x40, 0, 0, 0}; /* 1 GiB */
    sp_reader_feed(&r, hdr, 4);
    const char *data;
    uint32_t len;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), -1);
    assert_int_equal(err.code, SP_TOO_LARGE);
    assert_non_null(strstr(err.msg, "1073741824"));
    assert_non_null(strstr(err.msg, "1048576"));
    assert_true(r.cap <= CHUNK);
    sp_reader_free(&r);
}

static void reader_limit_boundary(void **state)
{
    (void)state;
    const uint32_t max = 100;
    char *buf = calloc(1, max + 8);
    for (uint32_t body = max; body <= max + 1; body++) {
        struct sp_reader r;
        sp_reader_init(&r, max);
        buf[0] = buf[1] = buf[2] = 0;
        buf[3] = (char)body;
        sp_reader_feed(&r, buf, body + 4);
        const char *data;
        uint32_t len;
        struct sp_err err;
        int rc = sp_reader_next(&r, &data, &len, &err);
        if (body == max) {
            assert_int_equal(rc, 1);
            assert_int_equal(len, max);
        } else {
            assert_int_equal(rc, -1);
            assert_int_equal(err.code, SP_TOO_LARGE);
        }
        sp_reader_free(&r);
    }
    free(buf);
}

/* Through a real pipe: the header of a huge frame and some junk arrive; the
 * reader refuses it having read at most one chunk. */
static void reader_oversize_from_fd(void **state)
{
    (void)state;
    int p[2];
    assert_int_equal(pipe2(p, O_NONBLOCK), 0);
    char junk[1000] = {0x7f, (char)0xff, (char)0xff, (char)0xff};
    assert_int_equal(write(p[1], junk, sizeof junk), (ssize_t)sizeof junk);
    struct sp_reader r;
    sp_reader_init(&r, SP_DEFAULT_MAX_FRAME);
    assert_int_equal(sp_reader_fill(&r, p[0]), (ssize_t)sizeof junk);
    const char *data;
    uint32_t len;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), -1);
    assert_int_equal(err.code, SP_TOO_LARGE);
    assert_true(r.cap <= CHUNK);
    /* Even if the caller keeps reading, the buffer only grows by chunks. */
    assert_int_equal(write(p[1], junk, sizeof junk), (ssize_t)sizeof junk);
    assert_true(sp_reader_fill(&r, p[0]) > 0);
    assert_true(r.cap <= CHUNK);
    close(p[0]);
    close(p[1]);
    sp_reader_free(&r);
}

static void reader_zero_length_frame(void **state)
{
    (void)state;
    struct sp_reader r;
    sp_reader_init(&r, 1024);
    char buf[300] = {0};
    size_t n = 4 + pack_req(3, "stat", buf + 4);
    sp_reader_feed(&r, buf, n);
    const char *data;
    uint32_t len = 99;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_int_equal(len, 0);
    /* the stream goes on */
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_int_equal(len, n - 8);
    sp_reader_free(&r);
}

static void reader_pipe_small_frames(void **state)
{
    (void)state;
    int p[2];
    assert_int_equal(pipe2(p, O_NONBLOCK), 0);
    struct sp_reader r;
    sp_reader_init(&r, 1024);
    errno = 0;
    assert_int_equal(sp_reader_fill(&r, p[0]), -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    char buf[256];
    size_t n = pack_req(5, "list", buf);
    /* a frame and a half */
    assert_int_equal(write(p[1], buf, n), (ssize_t)n);
    assert_int_equal(write(p[1], buf, n / 2), (ssize_t)(n / 2));
    assert_int_equal(sp_reader_fill(&r, p[0]), (ssize_t)(n + n / 2));
    const char *data;
    uint32_t len;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_memory_equal(data, buf + 4, n - 4);
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 0);
    assert_int_equal(sp_reader_fill(&r, p[0]), -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    assert_int_equal(write(p[1], buf + n / 2, n - n / 2), (ssize_t)(n - n / 2));
    assert_int_equal(sp_reader_fill(&r, p[0]), (ssize_t)(n - n / 2));
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_memory_equal(data, buf + 4, n - 4);
    close(p[1]);
    assert_int_equal(sp_reader_fill(&r, p[0]), 0); /* EOF */
    assert_int_equal(sp_reader_pending(&r), 0);
    close(p[0]);
    sp_reader_free(&r);
}

static void reader_big_frame_nonblocking_socket(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    struct sp_reader r;
    sp_reader_init(&r, 8 << 20);
    /* a 3 MiB frame and a small one behind it arrive in pieces */
    size_t body = 3 << 20;
    char small[256];
    size_t sn = pack_req(9, "stat", small);
    size_t total = body + 4 + sn;
    char *big = calloc(1, total);
    big[1] = (char)(body >> 16);
    big[2] = (char)(body >> 8);
    big[3] = (char)body;
    big[4] = (char)0xc4; /* not validated here: the reader only frames */
    memcpy(big + body + 4, small, sn);
    size_t sent = 0, max_cap = 0;
    int frames = 0;
    while (frames < 2) {
        if (sent < total) {
            ssize_t w = write(sv[1], big + sent, total - sent);
            if (w > 0)
                sent += (size_t)w;
        }
        ssize_t n = sp_reader_fill(&r, sv[0]);
        assert_true(n > 0 || errno == EAGAIN);
        if (r.cap > max_cap)
            max_cap = r.cap;
        const char *data;
        uint32_t len;
        struct sp_err err;
        while (sp_reader_next(&r, &data, &len, &err) == 1) {
            assert_int_equal(len, frames == 0 ? body : sn - 4);
            if (frames == 1)
                assert_memory_equal(data, small + 4, sn - 4);
            frames++;
        }
    }
    /* never more than the frame (rounded to a chunk) and one more chunk */
    assert_true(max_cap <= round_up(body + 4, CHUNK) + CHUNK);
    close(sv[1]);
    assert_int_equal(sp_reader_fill(&r, sv[0]), 0); /* EOF */
    /* consumed: the big buffer is given back on the next empty poll */
    const char *data;
    uint32_t len;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 0);
    assert_true(r.cap <= (256u << 10));
    free(big);
    close(sv[0]);
    sp_reader_free(&r);
}

/* ---- writer ---- */

static void writer_frames_and_flush(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 0);
    msgpack_packer pk;
    sp_writer_begin_frame(&w);
    sp_writer_packer(&w, &pk);
    sp_pack_ok_head(&pk, 9);
    msgpack_pack_map(&pk, 1);
    sp_pack_kv_bool(&pk, "x", true);
    struct sp_err err;
    assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    size_t n = sp_writer_pending(&w);
    unsigned char *p = (unsigned char *)w.buf + w.off;
    assert_int_equal(p[0] | p[1] | p[2], 0);
    assert_int_equal((size_t)p[3] + 4, n);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(sp_unpack((const char *)p + 4, n - 4, &u, &err), 0);
    assert_true(sp_map_get(&u.data, "ok")->via.boolean);
    msgpack_unpacked_destroy(&u);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(sp_writer_flush(&w, sv[0]), 0);
    assert_int_equal(sp_writer_pending(&w), 0);
    char back[64];
    assert_int_equal(read(sv[1], back, sizeof back), (ssize_t)n);
    close(sv[0]);
    close(sv[1]);
    sp_writer_free(&w);
}

static void writer_limit_and_full_peer(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 100000);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    static char blob[30000];
    struct sp_err err;
    bool overflowed = false, blocked = false;
    for (int i = 0; i < 1000 && !overflowed; i++) {
        msgpack_packer pk;
        sp_writer_begin_frame(&w);
        sp_writer_packer(&w, &pk);
        sp_pack_binn(&pk, blob, sizeof blob);
        if (sp_writer_end_frame(&w, &err) < 0) {
            overflowed = true;
            break;
        }
        ssize_t left = sp_writer_flush(&w, sv[0]); /* nobody reads sv[1] */
        assert_true(left >= 0);
        if (left > 0)
            blocked = true; /* EAGAIN: the socket is full */
    }
    assert_true(blocked);
    assert_true(overflowed);
    assert_int_equal(err.code, SP_TOO_LARGE);
    assert_non_null(strstr(err.msg, "100000"));
    assert_true(w.overflow);
    /* nothing more is queued once overflowed */
    size_t pending = sp_writer_pending(&w);
    assert_int_equal(sp_writer_append(&w, "x", 1, &err), -1);
    sp_writer_begin_frame(&w);
    sp_writer_abort_frame(&w);
    assert_true(sp_writer_pending(&w) <= pending);
    close(sv[0]);
    close(sv[1]);
    sp_writer_free(&w);
}

static void writer_drains_and_shrinks(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 0);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    size_t big = 2 << 20;
    char *blob = calloc(1, big);
    msgpack_packer pk;
    sp_writer_begin_frame(&w);
    sp_writer_packer(&w, &pk);
    sp_pack_binn(&pk, blob, big);
    struct sp_err err;
    assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    assert_true(w.cap > big);
    size_t total = sp_writer_pending(&w), got = 0;
    ssize_t left;
    while ((left = sp_writer_flush(&w, sv[0])) > 0) {
        ssize_t n = read(sv[1], blob, big);
        if (n > 0)
            got += (size_t)n;
    }
    assert_int_equal(left, 0);
    ssize_t n;
    while ((n = read(sv[1], blob, big)) > 0)
        got += (size_t)n;
    assert_int_equal(got, total);
    assert_int_equal(w.off, 0);
    assert_int_equal(w.len, 0);
    assert_true(w.cap <= (256u << 10)); /* the idle writer gave its memory back */
    /* and is still usable */
    assert_int_equal(sp_writer_append(&w, "abcd", 4, &err), 0);
    assert_int_equal(sp_writer_pending(&w), 4);
    free(blob);
    close(sv[0]);
    close(sv[1]);
    sp_writer_free(&w);
}

/* A frame still being packed is never sent (its header is not patched), and
 * compacting sent bytes while it is open keeps it intact. */
static void writer_open_frame_and_compaction(void **state)
{
    (void)state;
    int p[2];
    assert_int_equal(pipe2(p, O_NONBLOCK), 0);
    fcntl(p[1], F_SETPIPE_SZ, 4096);
    struct sp_writer w;
    sp_writer_init(&w, 0);
    static char blob[3000];
    struct sp_err err;
    msgpack_packer pk;
    sp_writer_packer(&w, &pk);
    for (int i = 0; i < 3; i++) {
        sp_writer_begin_frame(&w);
        msgpack_pack_uint64(&pk, (uint64_t)i);
        assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    }
    sp_writer_begin_frame(&w);
    sp_pack_binn(&pk, blob, sizeof blob);
    assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    sp_writer_begin_frame(&w);
    sp_pack_binn(&pk, blob, sizeof blob);
    assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    /* the pipe takes part of it: off is now mid-buffer */
    assert_true(sp_writer_flush(&w, p[1]) > 0);
    assert_true(w.off > 0);
    size_t before_open = sp_writer_pending(&w);
    /* an open frame that needs more room than is left: compaction runs */
    sp_writer_begin_frame(&w);
    msgpack_pack_array(&pk, 20);
    for (int i = 0; i < 20; i++)
        sp_pack_binn(&pk, blob, sizeof blob);
    /* flushing now must stop before the open frame */
    struct sp_reader r;
    sp_reader_init(&r, 1 << 20);
    char tmp[8192];
    ssize_t n;
    while ((n = read(p[0], tmp, sizeof tmp)) > 0)
        sp_reader_feed(&r, tmp, (size_t)n);
    ssize_t left = sp_writer_flush(&w, p[1]);
    assert_int_equal(left, (ssize_t)sp_writer_pending(&w));
    while ((n = read(p[0], tmp, sizeof tmp)) > 0)
        sp_reader_feed(&r, tmp, (size_t)n);
    assert_true(sp_writer_pending(&w) > 20 * sizeof blob);
    assert_true(sp_writer_pending(&w) < before_open + 21 * sizeof blob);
    assert_int_equal(sp_writer_end_frame(&w, &err), 0);
    while (sp_writer_flush(&w, p[1]) > 0)
        while ((n = read(p[0], tmp, sizeof tmp)) > 0)
            sp_reader_feed(&r, tmp, (size_t)n);
    while ((n = read(p[0], tmp, sizeof tmp)) > 0)
        sp_reader_feed(&r, tmp, (size_t)n);
    /* six well-formed frames in order */
    const char *data;
    uint32_t len;
    int frames = 0;
    while (sp_reader_next(&r, &data, &len, &err) == 1) {
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        assert_int_equal(sp_unpack(data, len, &u, &err), 0);
        if (frames < 3) {
            assert_int_equal(u.data.type, MSGPACK_OBJECT_POSITIVE_INTEGER);
            assert_int_equal(u.data.via.u64, frames);
        } else if (frames < 5) {
            assert_int_equal(u.data.type, MSGPACK_OBJECT_BIN);
        } else {
            assert_int_equal(u.data.type, MSGPACK_OBJECT_ARRAY);
            assert_int_equal(u.data.via.array.size, 20);
        }
        msgpack_unpacked_destroy(&u);
        frames++;
    }
    assert_int_equal(frames, 6);
    assert_int_equal(sp_reader_pending(&r), 0);
    sp_reader_free(&r);
    close(p[0]);
    close(p[1]);
    sp_writer_free(&w);
}

static void writer_abort_frame(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 0);
    struct sp_err err;
    assert_int_equal(sp_writer_append(&w, "\0\0\0\1\xc0", 5, &err), 0);
    msgpack_packer pk;
    sp_writer_begin_frame(&w);
    sp_writer_packer(&w, &pk);
    sp_pack_cstr(&pk, "half");
    sp_writer_abort_frame(&w);
    assert_int_equal(sp_writer_pending(&w), 5);
    assert_memory_equal(w.buf + w.off, "\0\0\0\1\xc0", 5);
    sp_writer_free(&w);
}

static void writer_append_limit(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 10);
    struct sp_err err;
    assert_int_equal(sp_writer_append(&w, "0123456789", 10, &err), 0);
    assert_false(w.overflow);
    assert_int_equal(sp_writer_append(&w, "x", 1, &err), -1);
    assert_int_equal(err.code, SP_TOO_LARGE);
    assert_true(w.overflow);
    assert_int_equal(sp_writer_pending(&w), 10);
    sp_writer_free(&w);
}

/* ---- structural check ---- */

static void check_depth(void **state)
{
    (void)state;
    char buf[64];
    struct sp_err err;
    /* 32 levels pass the check and msgpack-c unpacks them */
    size_t n = nested(buf, 32, (char)0xc0);
    assert_int_equal(check(buf, n), 0);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(sp_unpack(buf, n, &u, &err), 0);
    msgpack_unpacked_destroy(&u);
    /* 33 do not, also when the innermost level is an empty container */
    n = nested(buf, 33, (char)0xc0);
    assert_int_equal(sp_msgpack_check(buf, n, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(err.code, SP_BAD_REQUEST);
    assert_non_null(strstr(err.msg, "deeper"));
    n = nested(buf, 32, (char)0x90);
    assert_int_equal(check(buf, n), -1);
    n = nested(buf, 32, (char)0x80);
    assert_int_equal(check(buf, n), -1);
    n = nested(buf, 31, (char)0x90);
    assert_int_equal(check(buf, n), 0);
    /* a smaller limit is honoured, and a larger one is clamped */
    n = nested(buf, 3, 1);
    assert_int_equal(sp_msgpack_check(buf, n, 3, &err), 0);
    assert_int_equal(sp_msgpack_check(buf, n, 2, &err), -1);
    assert_int_equal(sp_msgpack_check("\x01", 1, 0, &err), 0);
    n = nested(buf, 40, 1);
    assert_int_equal(sp_msgpack_check(buf, n, 1000, &err), -1);
    /* maps nest as well: {"a": {"a": ...}} */
    char m[200];
    size_t k = 0;
    for (int i = 0; i < 33; i++) {
        m[k++] = (char)0x81;
        m[k++] = (char)0xa1;
        m[k++] = 'a';
    }
    m[k++] = 1;
    assert_int_equal(check(m, k), -1);
    assert_int_equal(check(m + 3, k - 3), 0);
    /* depth is per path: [[..[1, [[2]], 3]..]] */
    char wide[100];
    size_t w = nested(wide, 30, (char)0x93);
    wide[w++] = 1;
    wide[w++] = (char)0x91;
    wide[w++] = (char)0x91;
    wide[w++] = 2;
    wide[w++] = 3;
    assert_int_equal(check(wide, w), -1); /* 30 + 1 + 2 = 33 */
    w = nested(wide, 29, (char)0x93);
    wide[w++] = 1;
    wide[w++] = (char)0x91;
    wide[w++] = (char)0x91;
    wide[w++] = 2;
    wide[w++] = 3;
    assert_int_equal(check(wide, w), 0);
}

static void check_huge_counts(void **state)
{
    (void)state;
    struct sp_err err;
    static const struct {
        const char *b;
        size_t n;
    } lies[] = {
        {"\xdd\xff\xff\xff\xff", 5},             /* array32 of 4G */
        {"\xdf\xff\xff\xff\xff", 5},             /* map32 of 4G */
        {"\xdc\xff\xff", 3},                     /* array16 of 64K */
        {"\xde\x00\x02\xc0\xc0\xc0", 6},         /* map16 of 2 pairs, 3 bytes */
        {"\x81\xc0", 2},                         /* fixmap 1 pair, 1 byte */
        {"\x9f\xc0\xc0", 3},                     /* fixarray 15, 2 bytes */
        {"\xdb\x40\x00\x00\x00", 5},             /* str32 of 1 GiB */
        {"\xda\x01\x00xx", 5},                   /* str16 of 256 */
        {"\xd9\x05xxxx", 6},                     /* str8 of 5, 4 present */
        {"\xc6\xff\xff\xff\xff", 5},             /* bin32 of 4G */
        {"\xc5\x00\x10x", 4},                    /* bin16 */
        {"\xc4\x02x", 3},                        /* bin8 */
        {"\xc9\xff\xff\xff\xff\x01", 6},         /* ext32 */
        {"\xc8\x00\x02\x01x", 5},                /* ext16 */
        {"\xc7\x01\x01", 3},                     /* ext8: type but no data */
        {"\xd8\x01xxxxxxxxxxxxxxx", 17},         /* fixext16 one short */
        {"\xa5xxxx", 5},                         /* fixstr */
        {"\x91\xdd\x7f\xff\xff\xff\xc0\xc0", 8}, /* nested lie */
    };
    for (size_t i = 0; i < sizeof lies / sizeof lies[0]; i++) {
        err.code = SP_OK;
        if (sp_msgpack_check(lies[i].b, lies[i].n, SP_MAX_DEPTH, &err) != -1)
            fail_msg("lie %zu accepted", i);
        assert_int_equal(err.code, SP_BAD_REQUEST);
        /* and sp_unpack never reaches msgpack-c with it */
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        assert_int_equal(sp_unpack(lies[i].b, lies[i].n, &u, &err), -1);
        msgpack_unpacked_destroy(&u);
    }
    assert_non_null(strstr(err.msg, "claims"));
}

static void check_truncated_trailing_reserved(void **state)
{
    (void)state;
    struct sp_err err;
    assert_int_equal(sp_msgpack_check("\xc1", 1, SP_MAX_DEPTH, &err), -1);
    assert_non_null(strstr(err.msg, "0xc1"));
    assert_int_equal(check("\x92\x01\xc1", 3), -1);
    assert_int_equal(check("\x81\xa1k", 3), -1); /* value missing */
    assert_int_equal(check("\xc0\xc0", 2), -1);  /* trailing */
    assert_int_equal(sp_msgpack_check("\x80\x00", 2, SP_MAX_DEPTH, &err), -1);
    assert_non_null(strstr(err.msg, "trailing"));
    assert_int_equal(check("", 0), -1);
    /* every proper prefix of a valid request is rejected, the whole accepted */
    char f[256];
    size_t n = pack_req(300, "write_file", f) - 4;
    for (size_t i = 0; i < n; i++)
        assert_int_equal(check(f + 4, i), -1);
    assert_int_equal(check(f + 4, n), 0);
    /* truncated inside multi-byte headers and scalars */
    assert_int_equal(check("\xcd\x01", 2), -1);
    assert_int_equal(check("\xcb\x00\x00", 3), -1);
    assert_int_equal(check("\xdd\x00\x00", 3), -1);
    assert_int_equal(check("\xc6\x00", 2), -1);
    assert_int_equal(check("\xc9\x00\x00\x00\x01", 5), -1);
}

static void check_accepts_every_type(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    static char big[70000];
    msgpack_pack_array(&pk, 28);
    msgpack_pack_nil(&pk);
    msgpack_pack_true(&pk);
    msgpack_pack_false(&pk);
    msgpack_pack_fix_uint8(&pk, 1);
    msgpack_pack_fix_uint16(&pk, 1);
    msgpack_pack_fix_uint32(&pk, 1);
    msgpack_pack_fix_uint64(&pk, 1);
    msgpack_pack_fix_int8(&pk, -1);
    msgpack_pack_fix_int16(&pk, -1);
    msgpack_pack_fix_int32(&pk, -1);
    msgpack_pack_fix_int64(&pk, -1);
    msgpack_pack_float(&pk, 1.5f);
    msgpack_pack_double(&pk, 2.5);
    sp_pack_strn(&pk, big, 10);    /* fixstr */
    sp_pack_strn(&pk, big, 100);   /* str8 */
    sp_pack_strn(&pk, big, 1000);  /* str16 */
    sp_pack_strn(&pk, big, 70000); /* str32 */
    sp_pack_binn(&pk, big, 10);    /* bin8 */
    sp_pack_binn(&pk, big, 1000);  /* bin16 */
    sp_pack_binn(&pk, big, 70000); /* bin32 */
    msgpack_pack_ext(&pk, 1, 5);   /* fixext: 1, 2, 4, 8, 16 */
    msgpack_pack_ext_body(&pk, big, 1);
    msgpack_pack_ext(&pk, 16, 5);
    msgpack_pack_ext_body(&pk, big, 16);
    msgpack_pack_ext(&pk, 3, 5); /* ext8 */
    msgpack_pack_ext_body(&pk, big, 3);
    msgpack_pack_ext(&pk, 300, 5); /* ext16 */
    msgpack_pack_ext_body(&pk, big, 300);
    msgpack_pack_ext(&pk, 70000, 5); /* ext32 */
    msgpack_pack_ext_body(&pk, big, 70000);
    msgpack_pack_array(&pk, 16); /* array16 */
    for (int i = 0; i < 16; i++)
        msgpack_pack_int(&pk, i);
    msgpack_pack_map(&pk, 16); /* map16 */
    for (int i = 0; i < 16; i++) {
        msgpack_pack_int(&pk, i);
        msgpack_pack_map(&pk, 0);
    }
    msgpack_pack_array(&pk, 0);
    struct sp_err err;
    assert_int_equal(sp_msgpack_check(sb.data, sb.size, SP_MAX_DEPTH, &err), 0);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(sp_unpack(sb.data, sb.size, &u, &err), 0);
    assert_int_equal(u.data.via.array.size, 28);
    msgpack_unpacked_destroy(&u);
    /* array32 and map32 headers with honest counts */
    assert_int_equal(check("\xdd\x00\x00\x00\x02\x01\x02", 7), 0);
    assert_int_equal(check("\xdf\x00\x00\x00\x01\x01\x02", 7), 0);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- envelope and accessors ---- */

static void parse_request_ok(void **state)
{
    (void)state;
    static const struct {
        const char *hex;
        uint64_t id;
        const char *op;
        bool args;
    } cases[] = {
        {"82a2696400a26f70a568656c6c6f", 0, "hello", false},              /* id 0 */
        {"83a2696401a26f70a568656c6c6fa461726773c0", 1, "hello", false},  /* args nil */
        {"83a2696401a26f70a568656c6c6fa46172677380", 1, "hello", true},   /* args {} */
        {"82a26964d001a26f70a0", 1, "", false},                           /* int8 id */
        {"82a26964cfffffffffffffffffa26f70a161", UINT64_MAX, "a", false}, /* max */
        {"84a174c3a2696405a26f70a161a46172677381a1780a", 5, "a", true},   /* extra */
        {"83a26f70a161a2696405a26f70a162", 5, "a", false},                /* dup: first wins */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned char *b;
        size_t n = hex_decode(cases[i].hex, &b);
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        struct sp_err err;
        assert_int_equal(sp_unpack((char *)b, n, &u, &err), 0);
        struct sp_request rq;
        if (sp_parse_request(&u.data, &rq, &err) != 0)
            fail_msg("case %zu: %s", i, err.msg);
        assert_true(rq.id == cases[i].id);
        assert_true(sp_str_eq(rq.op, rq.op_len, cases[i].op));
        assert_int_equal(rq.args != NULL, cases[i].args);
        if (rq.args)
            assert_int_equal(rq.args->type, MSGPACK_OBJECT_MAP);
        msgpack_unpacked_destroy(&u);
        free(b);
    }
}

static void parse_request_errors(void **state)
{
    (void)state;
    static const struct {
        const char *hex;
        const char *want;
        uint64_t id;
    } cases[] = {
        {"9101", "must be a map", 0},
        {"a3616263", "must be a map", 0},
        {"81a26f70a16f", "no 'id'", 0},
        {"82a26964ffa26f70a16f", "id must be an unsigned integer", 0},
        {"82a26964d3ffffffffffffffffa26f70a16f", "id must be an unsigned integer", 0},
        {"82a26964a131a26f70a16f", "id must be an unsigned integer, got str", 0},
        {"82a26964c0a26f70a16f", "id must be an unsigned integer, got nil", 0},
        {"82a26964cb3ff0000000000000a26f70a16f", "id must be an unsigned integer", 0},
        {"81a2696405", "no 'op'", 5},
        {"82a2696405a26f7003", "op must be a str", 5},
        {"82a2696405a26f70c4016f", "op must be a str, got bin", 5},
        {"83a2696405a26f70a16fa46172677301", "args must be a map", 5},
        {"83a2696405a26f70a16fa46172677390", "args must be a map, got array", 5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned char *b;
        size_t n = hex_decode(cases[i].hex, &b);
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        struct sp_err err;
        assert_int_equal(sp_unpack((char *)b, n, &u, &err), 0);
        struct sp_request rq;
        assert_int_equal(sp_parse_request(&u.data, &rq, &err), -1);
        assert_int_equal(err.code, SP_BAD_REQUEST);
        if (!strstr(err.msg, cases[i].want))
            fail_msg("case %zu: '%s' lacks '%s'", i, err.msg, cases[i].want);
        assert_int_equal(rq.id, cases[i].id);
        msgpack_unpacked_destroy(&u);
        free(b);
    }
}

static void accessors_name_the_key(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 11);
    sp_pack_kv_str(&pk, "s", "str");
    sp_pack_kv_uint(&pk, "u", 5);
    sp_pack_kv_int(&pk, "n", -3);
    sp_pack_kv_bool(&pk, "b", true);
    sp_pack_kv_bin(&pk, "bin", "\x00\x01", 2);
    sp_pack_kv_nil(&pk, "nil");
    sp_pack_kv_uint(&pk, "huge", UINT64_MAX);
    sp_pack_kv_int(&pk, "min", INT64_MIN);
    sp_pack_cstr(&pk, "m");
    msgpack_pack_map(&pk, 1);
    sp_pack_kv_strn(&pk, "k", "v\0w", 3);
    sp_pack_cstr(&pk, "a");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_int(&pk, 1);
    msgpack_pack_int(&pk, 2);
    sp_pack_strn(&pk, "ke\0y", 4); /* a key with a NUL: never matches "ke" */
    msgpack_pack_int(&pk, 1);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err err;
    assert_int_equal(sp_unpack(sb.data, sb.size, &u, &err), 0);
    const msgpack_object *m = &u.data;
    const char *s;
    size_t n;
    uint64_t uv;
    int64_t iv;
    bool bv;
    const msgpack_object *o;
    assert_int_equal(sp_get_str(m, "s", true, &s, &n, &err), 1);
    assert_int_equal(n, 3);
    assert_memory_equal(s, "str", 3);
    assert_int_equal(sp_get_uint(m, "u", true, &uv, &err), 1);
    assert_int_equal(uv, 5);
    assert_int_equal(sp_get_uint(m, "huge", true, &uv, &err), 1);
    assert_true(uv == UINT64_MAX);
    assert_int_equal(sp_get_int(m, "n", true, &iv, &err), 1);
    assert_int_equal(iv, -3);
    assert_int_equal(sp_get_int(m, "min", true, &iv, &err), 1);
    assert_true(iv == INT64_MIN);
    assert_int_equal(sp_get_int(m, "u", true, &iv, &err), 1);
    assert_int_equal(iv, 5);
    assert_int_equal(sp_get_int(m, "huge", true, &iv, &err), -1);
    assert_non_null(strstr(err.msg, "huge"));
    assert_int_equal(sp_get_bool(m, "b", true, &bv, &err), 1);
    assert_true(bv);
    assert_int_equal(sp_get_bin(m, "bin", true, &s, &n, &err), 1);
    assert_int_equal(n, 2);
    assert_memory_equal(s, "\x00\x01", 2);
    assert_int_equal(sp_get_bin(m, "s", true, &s, &n, &err), 1); /* str accepted as bytes */
    assert_int_equal(n, 3);
    assert_int_equal(sp_get_map(m, "m", true, &o, &err), 1);
    assert_int_equal(sp_get_str(o, "k", true, &s, &n, &err), 1);
    assert_int_equal(n, 3); /* embedded NUL kept */
    assert_int_equal(sp_get_array(m, "a", true, &o, &err), 1);
    assert_int_equal(o->via.array.size, 2);
    /* absent and nil */
    uv = 77;
    assert_int_equal(sp_get_uint(m, "nil", false, &uv, &err), 0);
    assert_int_equal(sp_get_uint(m, "absent", false, &uv, &err), 0);
    assert_int_equal(uv, 77); /* untouched */
    assert_int_equal(sp_get_uint(m, "absent", true, &uv, &err), -1);
    assert_string_equal(err.msg, "missing required key 'absent'");
    assert_int_equal(sp_get_str(m, "nil", true, &s, &n, &err), -1);
    assert_non_null(strstr(err.msg, "'nil'"));
    /* exact byte comparison of keys */
    assert_null(sp_map_get(m, "ke"));
    assert_null(sp_map_get(m, "S"));
    assert_null(sp_map_get(m, "bi"));
    assert_null(sp_map_get(m, "bins"));
    assert_non_null(sp_map_get(m, "bin"));
    assert_null(sp_map_get(sp_map_get(m, "a"), "x")); /* not a map */
    /* wrong types name the key, the expected and the actual type */
    assert_int_equal(sp_get_uint(m, "n", true, &uv, &err), -1);
    assert_string_equal(err.msg, "n: expected unsigned integer, got negative integer");
    assert_int_equal(sp_get_uint(m, "s", false, &uv, &err), -1);
    assert_string_equal(err.msg, "s: expected unsigned integer, got str");
    assert_int_equal(sp_get_str(m, "u", true, &s, &n, &err), -1);
    assert_string_equal(err.msg, "u: expected str, got unsigned integer");
    assert_int_equal(sp_get_str(m, "bin", true, &s, &n, &err), -1);
    assert_string_equal(err.msg, "bin: expected str, got bin");
    assert_int_equal(sp_get_bin(m, "u", true, &s, &n, &err), -1);
    assert_non_null(strstr(err.msg, "bin, got unsigned integer"));
    assert_int_equal(sp_get_int(m, "b", true, &iv, &err), -1);
    assert_string_equal(err.msg, "b: expected integer, got bool");
    assert_int_equal(sp_get_bool(m, "u", true, &bv, &err), -1);
    assert_string_equal(err.msg, "u: expected bool, got unsigned integer");
    assert_int_equal(sp_get_map(m, "a", true, &o, &err), -1);
    assert_string_equal(err.msg, "a: expected map, got array");
    assert_int_equal(sp_get_array(m, "m", true, &o, &err), -1);
    assert_string_equal(err.msg, "m: expected array, got map");
    assert_int_equal(err.code, SP_BAD_REQUEST);
    msgpack_unpacked_destroy(&u);
    msgpack_sbuffer_destroy(&sb);
}

/* msgpack-c gives empty str/bin a NULL pointer: lookups of "" must not pass
 * it to memcmp, and accessors hand out a valid pointer. */
static void accessors_empty_values(void **state)
{
    (void)state;
    const char body[] = "\x83\xa0\x01\xa1s\xa0\xa1\x62\xc4\x00";
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err err;
    assert_int_equal(sp_unpack(body, sizeof body - 1, &u, &err), 0);
    const msgpack_object *v = sp_map_get(&u.data, "");
    assert_non_null(v);
    assert_int_equal(v->via.u64, 1);
    const char *s = NULL;
    size_t n = 9;
    assert_int_equal(sp_get_str(&u.data, "s", true, &s, &n, &err), 1);
    assert_non_null(s);
    assert_int_equal(n, 0);
    s = NULL;
    assert_int_equal(sp_get_bin(&u.data, "b", true, &s, &n, &err), 1);
    assert_non_null(s);
    assert_int_equal(n, 0);
    msgpack_unpacked_destroy(&u);
    /* and packing empty values with a NULL pointer is fine */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    sp_pack_strn(&pk, NULL, 0);
    sp_pack_binn(&pk, NULL, 0);
    assert_int_equal(sb.size, 3);
    assert_memory_equal(sb.data, "\xa0\xc4\x00", 3);
    msgpack_sbuffer_destroy(&sb);
}

static void type_names(void **state)
{
    (void)state;
    static const struct {
        const char *bytes;
        size_t n;
        const char *name;
    } cases[] = {
        {"\xc0", 1, "nil"},
        {"\xc3", 1, "bool"},
        {"\x05", 1, "unsigned integer"},
        {"\xff", 1, "negative integer"},
        {"\xca\x00\x00\x00\x00", 5, "float"},
        {"\xcb\x00\x00\x00\x00\x00\x00\x00\x00", 9, "float"},
        {"\xa0", 1, "str"},
        {"\xc4\x00", 2, "bin"},
        {"\x90", 1, "array"},
        {"\x80", 1, "map"},
        {"\xd4\x01\x00", 3, "ext"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        struct sp_err err;
        assert_int_equal(sp_unpack(cases[i].bytes, cases[i].n, &u, &err), 0);
        assert_string_equal(sp_type_name(&u.data), cases[i].name);
        msgpack_unpacked_destroy(&u);
    }
    assert_true(sp_str_eq("abc", 3, "abc"));
    assert_false(sp_str_eq("abc", 2, "abc"));
    assert_false(sp_str_eq("abcd", 4, "abc"));
    assert_true(sp_str_eq("", 0, ""));
}

/* ---- packing helpers ---- */

static void unpack_sbuffer(msgpack_sbuffer *sb, msgpack_unpacked *u)
{
    struct sp_err err;
    msgpack_unpacked_init(u);
    if (sp_unpack(sb->data, sb->size, u, &err) != 0)
        fail_msg("%s", err.msg);
}

static void packing_envelopes(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    struct sp_err e;
    sp_errf(&e, SP_UNKNOWN_SLOT, "slot %d out of range", 9);
    sp_pack_error(&pk, 12, &e);
    msgpack_unpacked u;
    unpack_sbuffer(&sb, &u);
    const msgpack_object *m = &u.data;
    assert_int_equal(m->via.map.size, 3);
    assert_int_equal(sp_map_get(m, "id")->via.u64, 12);
    assert_int_equal(sp_map_get(m, "ok")->type, MSGPACK_OBJECT_BOOLEAN);
    assert_false(sp_map_get(m, "ok")->via.boolean);
    const msgpack_object *er = sp_map_get(m, "error");
    assert_int_equal(er->via.map.size, 2);
    const char *s;
    size_t n;
    assert_int_equal(sp_get_str(er, "code", true, &s, &n, &e), 1);
    assert_true(sp_str_eq(s, n, "unknown_slot"));
    assert_int_equal(sp_get_str(er, "message", true, &s, &n, &e), 1);
    assert_true(sp_str_eq(s, n, "slot 9 out of range"));
    msgpack_unpacked_destroy(&u);

    msgpack_sbuffer_clear(&sb);
    sp_pack_ok_head(&pk, 13);
    msgpack_pack_map(&pk, 2);
    sp_pack_kv_uint(&pk, "slot", 1);
    sp_pack_kv_bin(&pk, "data", "\xff", 1);
    unpack_sbuffer(&sb, &u);
    m = &u.data;
    assert_int_equal(m->via.map.size, 3);
    assert_int_equal(sp_map_get(m, "id")->via.u64, 13);
    assert_true(sp_map_get(m, "ok")->via.boolean);
    assert_int_equal(sp_map_get(m, "result")->via.map.size, 2);
    msgpack_unpacked_destroy(&u);

    msgpack_sbuffer_clear(&sb);
    sp_pack_event_head(&pk, 14, "stdout", 2);
    sp_pack_kv_bin(&pk, "data", "hi\n", 3);
    sp_pack_kv_uint(&pk, "offset", 4096);
    unpack_sbuffer(&sb, &u);
    m = &u.data;
    assert_int_equal(m->via.map.size, 4);
    assert_int_equal(sp_map_get(m, "id")->via.u64, 14);
    assert_int_equal(sp_get_str(m, "event", true, &s, &n, &e), 1);
    assert_true(sp_str_eq(s, n, "stdout"));
    assert_int_equal(sp_map_get(m, "data")->type, MSGPACK_OBJECT_BIN);
    assert_int_equal(sp_map_get(m, "offset")->via.u64, 4096);
    msgpack_unpacked_destroy(&u);

    /* request heads, with and without args, parse back */
    for (int has = 0; has < 2; has++) {
        msgpack_sbuffer_clear(&sb);
        sp_pack_request_head(&pk, 15, "stat", has);
        if (has) {
            msgpack_pack_map(&pk, 1);
            sp_pack_kv_str(&pk, "path", "a");
        }
        unpack_sbuffer(&sb, &u);
        struct sp_request rq;
        assert_int_equal(sp_parse_request(&u.data, &rq, &e), 0);
        assert_int_equal(u.data.via.map.size, has ? 3 : 2);
        assert_int_equal(rq.id, 15);
        assert_true(sp_str_eq(rq.op, rq.op_len, "stat"));
        assert_int_equal(rq.args != NULL, has);
        msgpack_unpacked_destroy(&u);
    }

    /* kv helpers: exact bytes for small values */
    msgpack_sbuffer_clear(&sb);
    sp_pack_kv_int(&pk, "i", -1);
    sp_pack_kv_nil(&pk, "z");
    sp_pack_kv_bool(&pk, "f", false);
    assert_int_equal(sb.size, 9);
    assert_memory_equal(sb.data, "\xa1i\xff\xa1z\xc0\xa1\x66\xc2", 9);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- errors ---- */

static void codes_round_trip(void **state)
{
    (void)state;
    static const char *const names[] = {"bad_request",
                                        "unknown_op",
                                        "unauthorized",
                                        "unknown_slot",
                                        "slot_busy",
                                        "not_leased",
                                        "path_escape",
                                        "not_found",
                                        "exists",
                                        "too_large",
                                        "timeout",
                                        "cancelled",
                                        "isolation_unavailable",
                                        "agent_lost",
                                        "no_capacity",
                                        "internal"};
    assert_int_equal(sizeof names / sizeof names[0], SP_CODE_COUNT - 1);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int c = sp_code_from_name(names[i], strlen(names[i]));
        assert_int_equal(c, (int)i + 1); /* the enum order is the contract's */
        assert_string_equal(sp_code_name((enum sp_code)c), names[i]);
    }
    assert_int_equal(sp_code_from_name("nope", 4), -1);
    assert_int_equal(sp_code_from_name("bad_request", 3), -1);
    assert_int_equal(sp_code_from_name("bad_requestX", 12), -1);
    assert_int_equal(sp_code_from_name("", 0), -1);
    assert_non_null(sp_code_name((enum sp_code)999));

    struct sp_err e;
    assert_int_equal(sp_errf(&e, SP_TIMEOUT, "after %d ms", 5), -1);
    assert_int_equal(e.code, SP_TIMEOUT);
    assert_string_equal(e.msg, "after 5 ms");
    char longs[sizeof e.msg + 300];
    memset(longs, 'x', sizeof longs - 1);
    longs[sizeof longs - 1] = 0;
    sp_errf(&e, SP_INTERNAL, "%s", longs);
    assert_int_equal(strlen(e.msg), sizeof e.msg - 1); /* truncated, terminated */

    static const struct {
        int errnum;
        enum sp_code code;
    } map[] = {
        {ENOENT, SP_NOT_FOUND},  {EEXIST, SP_EXISTS},   {EXDEV, SP_PATH_ESCAPE},
        {ELOOP, SP_PATH_ESCAPE}, {EFBIG, SP_TOO_LARGE}, {ENOSPC, SP_TOO_LARGE},
        {ETIMEDOUT, SP_TIMEOUT}, {EIO, SP_INTERNAL},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        assert_int_equal(sp_err_errno(&e, map[i].errnum, "src/a.py"), -1);
        assert_int_equal(e.code, map[i].code);
        assert_non_null(strstr(e.msg, "src/a.py"));
        assert_non_null(strstr(e.msg, strerror(map[i].errnum)));
    }
}

static void sha256_known_answers(void **state)
{
    (void)state;
    char hex[65];
    sp_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    sp_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

/* ---- vectors ---- */

static bool json_matches(const json_t *j, const msgpack_object *o)
{
    if (json_is_null(j))
        return o->type == MSGPACK_OBJECT_NIL;
    if (json_is_boolean(j))
        return o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean == json_is_true(j);
    if (json_is_integer(j)) {
        json_int_t v = json_integer_value(j);
        if (v >= 0)
            return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == (uint64_t)v;
        return o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER && o->via.i64 == v;
    }
    if (json_is_real(j)) {
        /* Integers are decoded as reals: 2^64-1 does not fit json_int_t, and
         * every other vector integer is exact in a double. */
        double v = json_real_value(j);
        if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            return (double)o->via.u64 == v;
        if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
            return (double)o->via.i64 == v;
        return false;
    }
    if (json_is_string(j))
        return o->type == MSGPACK_OBJECT_STR && o->via.str.size == json_string_length(j) &&
               memcmp(o->via.str.ptr, json_string_value(j), o->via.str.size) == 0;
    if (json_is_array(j)) {
        if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != json_array_size(j))
            return false;
        for (size_t i = 0; i < json_array_size(j); i++)
            if (!json_matches(json_array_get(j, i), &o->via.array.ptr[i]))
                return false;
        return true;
    }
    const json_t *bin = json_object_get(j, "$bin");
    if (bin) {
        unsigned char *b;
        size_t n = hex_decode(json_string_value(bin), &b);
        bool ok = o->type == MSGPACK_OBJECT_BIN && o->via.bin.size == n &&
                  (n == 0 || memcmp(o->via.bin.ptr, b, n) == 0);
        free(b);
        return ok;
    }
    if (o->type != MSGPACK_OBJECT_MAP || o->via.map.size != json_object_size(j))
        return false;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)j, key, val)
    {
        const msgpack_object *mv = sp_map_get(o, key);
        if (!mv || !json_matches(val, mv))
            return false;
    }
    return true;
}

static void vectors(void **state)
{
    (void)state;
    json_error_t jerr;
    json_t *all = json_load_file(VECTOR_DIR "/vectors.json", JSON_DECODE_INT_AS_REAL, &jerr);
    assert_non_null(all);
    assert_true(json_array_size(all) >= 25);
    size_t i;
    json_t *v;
    json_array_foreach(all, i, v)
    {
        const char *name = json_string_value(json_object_get(v, "name"));
        const json_t *expect = json_object_get(v, "expect");
        const char *kind = json_string_value(json_object_get(expect, "kind"));
        unsigned char *bytes;
        size_t n = hex_decode(json_string_value(json_object_get(v, "hex")), &bytes);
        struct sp_reader r;
        sp_reader_init(&r, SP_DEFAULT_MAX_FRAME);
        sp_reader_feed(&r, bytes, n);
        const char *data;
        uint32_t len;
        struct sp_err err = {0};
        int rc = sp_reader_next(&r, &data, &len, &err);
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        enum sp_code got = SP_OK;
        struct sp_request rq = {0};
        if (rc < 0)
            got = err.code;
        else if (rc == 0)
            fail_msg("%s: frame incomplete", name);
        else if (len == 0)
            got = SP_BAD_REQUEST;
        else if (sp_unpack(data, len, &u, &err) < 0)
            got = err.code;
        else if (strcmp(kind, "response") != 0 && sp_parse_request(&u.data, &rq, &err) < 0)
            got = err.code;
        if (strcmp(kind, "invalid") == 0) {
            const char *want = json_string_value(json_object_get(expect, "code"));
            if (got == SP_OK || strcmp(sp_code_name(got), want) != 0)
                fail_msg("%s: want %s, got %s", name, want, sp_code_name(got));
        } else if (strcmp(kind, "request") == 0) {
            if (got != SP_OK)
                fail_msg("%s: %s", name, err.msg);
            /* Compared as doubles: the largest id is 2^64-1 (see json_matches). */
            assert_true((double)rq.id == json_number_value(json_object_get(expect, "id")));
            const char *op = json_string_value(json_object_get(expect, "op"));
            assert_true(sp_str_eq(rq.op, rq.op_len, op));
            const json_t *args = json_object_get(expect, "args");
            if (json_is_null(args))
                assert_null(rq.args);
            else if (!json_matches(args, rq.args))
                fail_msg("%s: args differ", name);
        } else {
            if (got != SP_OK || !json_matches(json_object_get(expect, "value"), &u.data))
                fail_msg("%s: value differs", name);
        }
        msgpack_unpacked_destroy(&u);
        sp_reader_free(&r);
        free(bytes);
    }
    json_decref(all);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(reader_byte_by_byte),
        cmocka_unit_test(reader_many_frames_one_feed_and_split),
        cmocka_unit_test(reader_every_split_point),
        cmocka_unit_test(reader_oversize_refused_without_allocation),
        cmocka_unit_test(reader_limit_boundary),
        cmocka_unit_test(reader_oversize_from_fd),
        cmocka_unit_test(reader_zero_length_frame),
        cmocka_unit_test(reader_pipe_small_frames),
        cmocka_unit_test(reader_big_frame_nonblocking_socket),
        cmocka_unit_test(writer_frames_and_flush),
        cmocka_unit_test(writer_limit_and_full_peer),
        cmocka_unit_test(writer_drains_and_shrinks),
        cmocka_unit_test(writer_open_frame_and_compaction),
        cmocka_unit_test(writer_abort_frame),
        cmocka_unit_test(writer_append_limit),
        cmocka_unit_test(check_depth),
        cmocka_unit_test(check_huge_counts),
        cmocka_unit_test(check_truncated_trailing_reserved),
        cmocka_unit_test(check_accepts_every_type),
        cmocka_unit_test(parse_request_ok),
        cmocka_unit_test(parse_request_errors),
        cmocka_unit_test(accessors_name_the_key),
        cmocka_unit_test(accessors_empty_values),
        cmocka_unit_test(type_names),
        cmocka_unit_test(packing_envelopes),
        cmocka_unit_test(codes_round_trip),
        cmocka_unit_test(sha256_known_answers),
        cmocka_unit_test(vectors),
    };
    return cmocka_run_group_tests_name("libslotproto", tests, NULL, NULL);
}
