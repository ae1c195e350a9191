/* libFuzzer target: arbitrary bytes through the frame reader (small frame
 * limit, every split point), the structural check, msgpack unpacking, the
 * envelope parser and every typed accessor, as the agent's dispatcher uses
 * them. Any crash, leak or sanitizer report is a finding. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "slotproto.h"

static void poke_args(const msgpack_object *args)
{
    static const char *const keys[] = {"slot", "cmd",  "argv",   "env",   "stdin",
                                       "path", "data", "offset", "token", "timeout_ms"};
    struct sp_err err;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *s;
        size_t n;
        uint64_t u;
        int64_t v;
        bool b;
        const msgpack_object *o;
        sp_get_str(args, keys[i], false, &s, &n, &err);
        sp_get_bin(args, keys[i], false, &s, &n, &err);
        sp_get_uint(args, keys[i], false, &u, &err);
        sp_get_int(args, keys[i], false, &v, &err);
        sp_get_bool(args, keys[i], false, &b, &err);
        sp_get_map(args, keys[i], false, &o, &err);
        sp_get_array(args, keys[i], true, &o, &err);
    }
}

static void one_frame(const char *data, uint32_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    struct sp_err err;
    if (sp_unpack(data, len, &u, &err) == 0) {
        struct sp_request rq;
        if (sp_parse_request(&u.data, &rq, &err) == 0 && rq.args)
            poke_args(rq.args);
        sp_type_name(&u.data);
    }
    msgpack_unpacked_destroy(&u);
}

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t size)
{
    /* The first byte picks where the input is split, so partial reads are
     * exercised as well as whole frames. */
    size_t split = size ? buf[0] % (size + 1) : 0;
    struct sp_reader r;
    sp_reader_init(&r, 4096);
    const char *data;
    uint32_t len;
    struct sp_err err;
    sp_reader_feed(&r, buf, split);
    int rc;
    while ((rc = sp_reader_next(&r, &data, &len, &err)) == 1)
        one_frame(data, len);
    if (rc == 0) {
        sp_reader_feed(&r, buf + split, size - split);
        while (sp_reader_next(&r, &data, &len, &err) == 1)
            one_frame(data, len);
    }
    sp_reader_free(&r);
    /* And the raw bytes as one frame body. */
    if (size)
        one_frame((const char *)buf, (uint32_t)(size > 65536 ? 65536 : size));
    return 0;
}
