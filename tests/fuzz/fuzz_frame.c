/* libFuzzer target: arbitrary bytes through the frame reader (small frame
 * limit, a fuzzer-chosen split point), the structural check, msgpack
 * unpacking, the envelope parser and every typed accessor, as the agent's
 * dispatcher uses them; then the error answer is packed through the writer
 * and read back. Any crash, leak, sanitizer report or broken invariant
 * (abort) is a finding. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "slotproto.h"

#define FUZZ_MAX_FRAME 4096

static void poke_map(const msgpack_object *map)
{
    static const char *const keys[] = {"slot",   "cmd",  "argv",  "env",     "stdin",     "path",
                                       "data",   "mode", "token", "id",      "op",        "args",
                                       "offset", "",     "a",     "rlimits", "timeout_ms"};
    struct sp_err err;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *s;
        size_t n;
        uint64_t u;
        int64_t v;
        bool b;
        const msgpack_object *o;
        sp_map_get(map, keys[i]);
        sp_get_str(map, keys[i], false, &s, &n, &err);
        sp_get_bin(map, keys[i], true, &s, &n, &err);
        sp_get_uint(map, keys[i], false, &u, &err);
        sp_get_int(map, keys[i], true, &v, &err);
        sp_get_bool(map, keys[i], false, &b, &err);
        if (sp_get_map(map, keys[i], false, &o, &err) == 1)
            sp_get_uint(o, "nofile", false, &u, &err);
        if (sp_get_array(map, keys[i], true, &o, &err) == 1) {
            for (uint32_t j = 0; j < o->via.array.size; j++)
                sp_type_name(&o->via.array.ptr[j]);
        }
    }
}

/* Our own answers must always be well-formed frames. */
static void answer_roundtrip(uint64_t id, const struct sp_err *e)
{
    struct sp_writer w;
    sp_writer_init(&w, 1 << 20);
    msgpack_packer pk;
    sp_writer_begin_frame(&w);
    sp_writer_packer(&w, &pk);
    sp_pack_error(&pk, id, e);
    struct sp_err err;
    if (sp_writer_end_frame(&w, &err) < 0)
        abort();
    struct sp_reader r;
    sp_reader_init(&r, 1 << 20);
    if (sp_reader_feed(&r, w.buf + w.off, sp_writer_pending(&w)) < 0)
        abort();
    const char *data;
    uint32_t len;
    if (sp_reader_next(&r, &data, &len, &err) != 1)
        abort();
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (sp_unpack(data, len, &u, &err) < 0)
        abort();
    const msgpack_object *got = sp_map_get(&u.data, "id");
    if (!got || got->type != MSGPACK_OBJECT_POSITIVE_INTEGER || got->via.u64 != id)
        abort();
    msgpack_unpacked_destroy(&u);
    sp_reader_free(&r);
    sp_writer_free(&w);
}

static void one_frame(const char *data, uint32_t len)
{
    struct sp_err err = {SP_BAD_REQUEST, "empty frame"};
    uint64_t id = 0;
    if (len > 0) {
        bool checked = sp_msgpack_check(data, len, SP_MAX_DEPTH, &err) == 0;
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        int rc = sp_unpack(data, len, &u, &err);
        /* The check is the only gate: what it accepts must unpack. */
        if (checked != (rc == 0))
            abort();
        if (rc == 0) {
            struct sp_request rq;
            sp_type_name(&u.data);
            poke_map(&u.data);
            if (sp_parse_request(&u.data, &rq, &err) == 0) {
                if (rq.args)
                    poke_map(rq.args);
                sp_errf(&err, SP_UNKNOWN_OP, "unknown op '%.*s'",
                        (int)(rq.op_len > 64 ? 64 : rq.op_len), rq.op);
            }
            id = rq.id;
        }
        msgpack_unpacked_destroy(&u);
    }
    answer_roundtrip(id, &err);
}

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t size)
{
    /* The first byte picks where the input is split, so partial reads are
     * exercised as well as whole frames. */
    size_t split = size ? buf[0] % (size + 1) : 0;
    struct sp_reader r;
    sp_reader_init(&r, FUZZ_MAX_FRAME);
    const char *data;
    uint32_t len;
    struct sp_err err;
    int rc = 0;
    if (sp_reader_feed(&r, buf, split) < 0)
        abort();
    while ((rc = sp_reader_next(&r, &data, &len, &err)) == 1)
        one_frame(data, len);
    if (rc == 0) {
        if (sp_reader_feed(&r, buf + split, size - split) < 0)
            abort();
        while ((rc = sp_reader_next(&r, &data, &len, &err)) == 1)
            one_frame(data, len);
    }
    if (rc < 0 && err.code != SP_TOO_LARGE)
        abort();
    if (r.cap > 2 * (size + 65536))
        abort(); /* the reader never holds more than it was given, plus a chunk */
    sp_reader_free(&r);
    /* And the raw bytes as one frame body, and under a smaller depth. */
    if (size) {
        one_frame((const char *)buf, (uint32_t)size);
        sp_msgpack_check((const char *)buf, size, buf[size - 1] % 40, &err);
    }
    return 0;
}
