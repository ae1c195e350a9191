/* Unit tests of libslotproto: frame reader and writer with partial input,
 * limits and back-pressure; structural checks; envelope and typed
 * accessors; packing; and the shared vectors in proto/vectors. */
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

/* Pack {"id": id, "op": op, "args": {"slot": 1, "path": "p"}} into buf. */
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
    /* first 3.5 frames, then the rest */
    size_t cut = 3 * n + n / 2;
    sp_reader_feed(&r, all, cut);
    int got = 0;
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
    assert_true(r.cap < (1u << 20));
    sp_reader_free(&r);
}

static void reader_zero_length_frame(void **state)
{
    (void)state;
    struct sp_reader r;
    sp_reader_init(&r, 1024);
    char z[4] = {0};
    sp_reader_feed(&r, z, 4);
    const char *data;
    uint32_t len = 99;
    struct sp_err err;
    assert_int_equal(sp_reader_next(&r, &data, &len, &err), 1);
    assert_int_equal(len, 0);
    sp_reader_free(&r);
}

static void reader_nonblocking_fd(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    struct sp_reader r;
    sp_reader_init(&r, 8 << 20);
    errno = 0;
    assert_int_equal(sp_reader_fill(&r, sv[0]), -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    /* a 3 MiB frame arrives in pieces through the socket */
    size_t body = 3 << 20;
    char *big = calloc(1, body + 4);
    big[0] = 0;
    big[1] = (char)(body >> 16);
    big[2] = (char)(body >> 8);
    big[3] = (char)body;
    big[4] = (char)0xc4; /* not validated here: the reader only frames */
    size_t sent = 0;
    int frames = 0;
    while (frames == 0) {
        if (sent < body + 4) {
            ssize_t w = write(sv[1], big + sent, body + 4 - sent);
            if (w > 0)
                sent += (size_t)w;
        }
        ssize_t n = sp_reader_fill(&r, sv[0]);
        assert_true(n > 0 || errno == EAGAIN);
        const char *data;
        uint32_t len;
        struct sp_err err;
        while (sp_reader_next(&r, &data, &len, &err) == 1) {
            assert_int_equal(len, body);
            frames++;
        }
    }
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
    assert_int_equal((size_t)p[3] + 4, n);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(sp_unpack((const char *)p + 4, n - 4, &u, &err), 0);
    assert_true(sp_map_get(&u.data, "ok")->via.boolean);
    msgpack_unpacked_destroy(&u);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(sp_writer_flush(&w, sv[0]), 0);
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
    int overflowed = 0;
    for (int i = 0; i < 100 && !overflowed; i++) {
        msgpack_packer pk;
        sp_writer_begin_frame(&w);
        sp_writer_packer(&w, &pk);
        sp_pack_binn(&pk, blob, sizeof blob);
        if (sp_writer_end_frame(&w, &err) < 0) {
            overflowed = 1;
            break;
        }
        ssize_t left = sp_writer_flush(&w, sv[0]); /* nobody reads sv[1] */
        assert_true(left >= 0);
    }
    assert_true(overflowed);
    assert_int_equal(err.code, SP_TOO_LARGE);
    assert_true(w.overflow);
    close(sv[0]);
    close(sv[1]);
    sp_writer_free(&w);
}

static void writer_abort_frame(void **state)
{
    (void)state;
    struct sp_writer w;
    sp_writer_init(&w, 0);
    msgpack_packer pk;
    sp_writer_begin_frame(&w);
    sp_writer_packer(&w, &pk);
    sp_pack_cstr(&pk, "half");
    sp_writer_abort_frame(&w);
    assert_int_equal(sp_writer_pending(&w), 0);
    sp_writer_free(&w);
}

/* ---- checks, envelope, accessors ---- */

static void check_rejects_bad_structures(void **state)
{
    (void)state;
    struct sp_err err;
    char deep[40];
    memset(deep, 0x91, 33);
    deep[33] = (char)0xc0;
    assert_int_equal(sp_msgpack_check(deep, 34, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(sp_msgpack_check(deep + 2, 32, SP_MAX_DEPTH, &err), 0); /* 31 deep ok */
    assert_int_equal(sp_msgpack_check("\xdd\xff\xff\xff\xff", 5, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(sp_msgpack_check("\xdb\x40\x00\x00\x00", 5, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(sp_msgpack_check("\xc1", 1, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(sp_msgpack_check("\x81\xa1k", 3, SP_MAX_DEPTH, &err), -1); /* truncated */
    assert_int_equal(sp_msgpack_check("\xc0\xc0", 2, SP_MAX_DEPTH, &err), -1);  /* trailing */
    assert_int_equal(sp_msgpack_check("", 0, SP_MAX_DEPTH, &err), -1);
    assert_int_equal(err.code, SP_BAD_REQUEST);
    assert_int_equal(sp_msgpack_check("\x92\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xd4\x01\x02", 13,
                                      SP_MAX_DEPTH, &err),
                     0); /* float64 and fixext1 */
}

static void parse_request_errors(void **state)
{
    (void)state;
    struct {
        const char *hex;
        const char *want;
        uint64_t id;
    } cases[] = {
        {"9101", "must be a map", 0},
        {"81a26f70a16f", "no 'id'", 0},
        {"82a26964ffa26f70a16f", "unsigned", 0},
        {"81a2696405", "no 'op'", 5},
        {"82a2696405a26f7003", "op must be a str", 5},
        {"83a2696405a26f70a16fa46172677301", "args must be a map", 5},
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
        assert_non_null(strstr(err.msg, cases[i].want));
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
    msgpack_pack_map(&pk, 6);
    sp_pack_kv_str(&pk, "s", "str");
    sp_pack_kv_uint(&pk, "u", 5);
    sp_pack_kv_int(&pk, "n", -3);
    sp_pack_kv_bool(&pk, "b", true);
    sp_pack_kv_bin(&pk, "bin", "\x00\x01", 2);
    sp_pack_kv_nil(&pk, "nil");
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
    assert_int_equal(sp_get_str(m, "s", true, &s, &n, &err), 1);
    assert_int_equal(n, 3);
    assert_int_equal(sp_get_uint(m, "u", true, &uv, &err), 1);
    assert_int_equal(uv, 5);
    assert_int_equal(sp_get_int(m, "n", true, &iv, &err), 1);
    assert_int_equal(iv, -3);
    assert_int_equal(sp_get_int(m, "u", true, &iv, &err), 1);
    assert_int_equal(sp_get_bool(m, "b", true, &bv, &err), 1);
    assert_int_equal(sp_get_bin(m, "bin", true, &s, &n, &err), 1);
    assert_int_equal(n, 2);
    assert_int_equal(sp_get_bin(m, "s", true, &s, &n, &err), 1); /* str accepted as bytes */
    assert_int_equal(sp_get_uint(m, "nil", false, &uv, &err), 0);
    assert_int_equal(sp_get_uint(m, "absent", false, &uv, &err), 0);
    assert_int_equal(sp_get_uint(m, "absent", true, &uv, &err), -1);
    assert_non_null(strstr(err.msg, "'absent'"));
    assert_int_equal(sp_get_uint(m, "n", true, &uv, &err), -1);
    assert_non_null(strstr(err.msg, "n: expected unsigned integer, got negative integer"));
    assert_int_equal(sp_get_str(m, "u", true, &s, &n, &err), -1);
    assert_non_null(strstr(err.msg, "u: expected str, got unsigned integer"));
    const msgpack_object *o;
    assert_int_equal(sp_get_map(m, "s", true, &o, &err), -1);
    assert_int_equal(sp_get_array(m, "b", true, &o, &err), -1);
    assert_int_equal(err.code, SP_BAD_REQUEST);
    msgpack_unpacked_destroy(&u);
    msgpack_sbuffer_destroy(&sb);
}

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
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int c = sp_code_from_name(names[i], strlen(names[i]));
        assert_true(c > 0);
        assert_string_equal(sp_code_name((enum sp_code)c), names[i]);
    }
    assert_int_equal(sp_code_from_name("nope", 4), -1);
    struct sp_err e;
    assert_int_equal(sp_err_errno(&e, ENOENT, "x"), -1);
    assert_int_equal(e.code, SP_NOT_FOUND);
    sp_err_errno(&e, EXDEV, "x");
    assert_int_equal(e.code, SP_PATH_ESCAPE);
}

static void sha256_known_answer(void **state)
{
    (void)state;
    char hex[65];
    sp_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
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
        cmocka_unit_test(reader_oversize_refused_without_allocation),
        cmocka_unit_test(reader_zero_length_frame),
        cmocka_unit_test(reader_nonblocking_fd),
        cmocka_unit_test(writer_frames_and_flush),
        cmocka_unit_test(writer_limit_and_full_peer),
        cmocka_unit_test(writer_abort_frame),
        cmocka_unit_test(check_rejects_bad_structures),
        cmocka_unit_test(parse_request_errors),
        cmocka_unit_test(accessors_name_the_key),
        cmocka_unit_test(codes_round_trip),
        cmocka_unit_test(sha256_known_answer),
        cmocka_unit_test(vectors),
    };
    return cmocka_run_group_tests_name("libslotproto", tests, NULL, NULL);
}
