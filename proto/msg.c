/* Decoding with limits (structural check before msgpack-c allocates),
 * envelope parsing, typed accessors, and packing helpers. */
#include <sha2.h>
#include <stdio.h>
#include <string.h>

#include "slotproto.h"

static uint64_t be(const unsigned char *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* An explicit stack of "values still to read" per open container instead of
 * recursion, so hostile nesting costs no C stack. Depth is clamped to
 * SP_MAX_DEPTH, which is also msgpack-c's own unpacker stack size: anything
 * accepted here is guaranteed to unpack. */
int sp_msgpack_check(const char *data, size_t len, unsigned max_depth, struct sp_err *err)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t remaining[SP_MAX_DEPTH + 1];
    if (max_depth > SP_MAX_DEPTH)
        max_depth = SP_MAX_DEPTH;
    int d = 0;
    remaining[0] = 1;
    size_t pos = 0;
    while (d >= 0) {
        if (remaining[d] == 0) {
            d--;
            continue;
        }
        remaining[d]--;
        if (pos >= len)
            return sp_errf(err, SP_BAD_REQUEST, "msgpack: truncated at byte %zu", pos);
        unsigned char b = p[pos++];
        uint64_t skip = 0, children = 0;
        unsigned lenbytes = 0;
        bool is_container = false;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* single byte */
        } else if (b >= 0x80 && b <= 0x8f) {
            children = 2 * (uint64_t)(b & 0x0f);
            is_container = true;
        } else if (b >= 0x90 && b <= 0x9f) {
            children = b & 0x0f;
            is_container = true;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4:
            case 0xd9: lenbytes = 1; break;
            case 0xc5:
            case 0xda: lenbytes = 2; break;
            case 0xc6:
            case 0xdb: lenbytes = 4; break;
            case 0xc7:
                lenbytes = 1;
                skip = 1;
                break;
            case 0xc8:
                lenbytes = 2;
                skip = 1;
                break;
            case 0xc9:
                lenbytes = 4;
                skip = 1;
                break;
            case 0xca: skip = 4; break;
            case 0xcb: skip = 8; break;
            case 0xcc:
            case 0xd0: skip = 1; break;
            case 0xcd:
            case 0xd1: skip = 2; break;
            case 0xce:
            case 0xd2: skip = 4; break;
            case 0xcf:
            case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc:
            case 0xdd:
            case 0xde:
            case 0xdf: {
                unsigned nb = (b == 0xdc || b == 0xde) ? 2 : 4;
                if (len - pos < nb)
                    return sp_errf(err, SP_BAD_REQUEST, "msgpack: truncated at byte %zu", pos);
                children = be(p + pos, nb);
                if (b >= 0xde)
                    children *= 2;
                pos += nb;
                is_container = true;
                break;
            }
            default:
                return sp_errf(err, SP_BAD_REQUEST, "msgpack: invalid byte 0x%02x at %zu", b,
                               pos - 1);
            }
        }
        if (lenbytes) {
            if (len - pos < lenbytes)
                return sp_errf(err, SP_BAD_REQUEST, "msgpack: truncated at byte %zu", pos);
            skip += be(p + pos, lenbytes);
            pos += lenbytes;
        }
        if (skip > len - pos)
            return sp_errf(err, SP_BAD_REQUEST,
                           "msgpack: value at byte %zu claims %llu bytes, %zu remain", pos,
                           (unsigned long long)skip, len - pos);
        pos += (size_t)skip;
        if (is_container) {
            /* The container read at stack index d is at nesting level d + 1;
             * empty ones count too, as in every other implementation's
             * notion of depth. */
            if ((unsigned)d + 1 > max_depth)
                return sp_errf(err, SP_BAD_REQUEST, "msgpack: nested deeper than %u levels",
                               max_depth);
            /* Every element takes at least one byte (a map pair two, counted
             * as two children), so a count beyond the bytes left is a lie. */
            if (children > len - pos)
                return sp_errf(err, SP_BAD_REQUEST,
                               "msgpack: container at byte %zu claims %llu elements, %zu bytes "
                               "remain",
                               pos, (unsigned long long)children, len - pos);
            if (children)
                remaining[++d] = children;
        }
    }
    if (pos != len)
        return sp_errf(err, SP_BAD_REQUEST, "msgpack: %zu trailing bytes after the value",
                       len - pos);
    return 0;
}

int sp_unpack(const char *data, size_t len, msgpack_unpacked *out, struct sp_err *err)
{
    if (sp_msgpack_check(data, len, SP_MAX_DEPTH, err) < 0)
        return -1;
    size_t off = 0;
    msgpack_unpack_return r = msgpack_unpack_next(out, data, len, &off);
    if (r != MSGPACK_UNPACK_SUCCESS)
        return sp_errf(err, r == MSGPACK_UNPACK_NOMEM_ERROR ? SP_INTERNAL : SP_BAD_REQUEST,
                       "msgpack: cannot decode (%d)", (int)r);
    return 0;
}

/* Empty str/bin objects may carry a NULL pointer; callers get a valid one so
 * that memcpy(dst, p, 0) and friends stay defined. */
static const char *nonnull(const char *p)
{
    return p ? p : "";
}

bool sp_str_eq(const char *s, size_t n, const char *key)
{
    size_t kn = strlen(key);
    /* msgpack-c leaves ptr NULL for empty str/bin: memcmp must not see it. */
    return n == kn && (n == 0 || memcmp(s, key, n) == 0);
}

const msgpack_object *sp_map_get(const msgpack_object *map, const char *key)
{
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && sp_str_eq(k->via.str.ptr, k->via.str.size, key))
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

const char *sp_type_name(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: return "nil";
    case MSGPACK_OBJECT_BOOLEAN: return "bool";
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return "unsigned integer";
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "negative integer";
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return "float";
    case MSGPACK_OBJECT_STR: return "str";
    case MSGPACK_OBJECT_BIN: return "bin";
    case MSGPACK_OBJECT_ARRAY: return "array";
    case MSGPACK_OBJECT_MAP: return "map";
    case MSGPACK_OBJECT_EXT: return "ext";
    }
    return "unknown";
}

int sp_parse_request(const msgpack_object *root, struct sp_request *req, struct sp_err *err)
{
    memset(req, 0, sizeof *req);
    if (root->type != MSGPACK_OBJECT_MAP)
        return sp_errf(err, SP_BAD_REQUEST, "request must be a map, got %s", sp_type_name(root));
    const msgpack_object *id = sp_map_get(root, "id");
    if (!id)
        return sp_errf(err, SP_BAD_REQUEST, "request has no 'id'");
    if (id->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return sp_errf(err, SP_BAD_REQUEST, "id must be an unsigned integer, got %s",
                       sp_type_name(id));
    req->id = id->via.u64;
    const msgpack_object *op = sp_map_get(root, "op");
    if (!op)
        return sp_errf(err, SP_BAD_REQUEST, "request has no 'op'");
    if (op->type != MSGPACK_OBJECT_STR)
        return sp_errf(err, SP_BAD_REQUEST, "op must be a str, got %s", sp_type_name(op));
    req->op = nonnull(op->via.str.ptr);
    req->op_len = op->via.str.size;
    const msgpack_object *args = sp_map_get(root, "args");
    if (args && args->type != MSGPACK_OBJECT_NIL) {
        if (args->type != MSGPACK_OBJECT_MAP)
            return sp_errf(err, SP_BAD_REQUEST, "args must be a map, got %s", sp_type_name(args));
        req->args = args;
    }
    return 0;
}

static int get(const msgpack_object *map, const char *key, bool required, const msgpack_object **v,
               struct sp_err *err)
{
    const msgpack_object *o = sp_map_get(map, key);
    if (!o || o->type == MSGPACK_OBJECT_NIL) {
        if (required)
            return sp_errf(err, SP_BAD_REQUEST, "missing required key '%s'", key);
        return 0;
    }
    *v = o;
    return 1;
}

static int wrong(const char *key, const char *want, const msgpack_object *o, struct sp_err *err)
{
    return sp_errf(err, SP_BAD_REQUEST, "%s: expected %s, got %s", key, want, sp_type_name(o));
}

int sp_get_str(const msgpack_object *map, const char *key, bool required, const char **s, size_t *n,
               struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type != MSGPACK_OBJECT_STR)
        return wrong(key, "str", o, err);
    *s = nonnull(o->via.str.ptr);
    *n = o->via.str.size;
    return 1;
}

int sp_get_bin(const msgpack_object *map, const char *key, bool required, const char **p, size_t *n,
               struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type == MSGPACK_OBJECT_BIN) {
        *p = nonnull(o->via.bin.ptr);
        *n = o->via.bin.size;
    } else if (o->type == MSGPACK_OBJECT_STR) {
        *p = nonnull(o->via.str.ptr);
        *n = o->via.str.size;
    } else {
        return wrong(key, "bin", o, err);
    }
    return 1;
}

int sp_get_uint(const msgpack_object *map, const char *key, bool required, uint64_t *v,
                struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return wrong(key, "unsigned integer", o, err);
    *v = o->via.u64;
    return 1;
}

int sp_get_int(const msgpack_object *map, const char *key, bool required, int64_t *v,
               struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 > INT64_MAX)
            return sp_errf(err, SP_BAD_REQUEST, "%s: integer out of range", key);
        *v = (int64_t)o->via.u64;
    } else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *v = o->via.i64;
    } else {
        return wrong(key, "integer", o, err);
    }
    return 1;
}

int sp_get_bool(const msgpack_object *map, const char *key, bool required, bool *v,
                struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type != MSGPACK_OBJECT_BOOLEAN)
        return wrong(key, "bool", o, err);
    *v = o->via.boolean;
    return 1;
}

int sp_get_map(const msgpack_object *map, const char *key, bool required, const msgpack_object **v,
               struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type != MSGPACK_OBJECT_MAP)
        return wrong(key, "map", o, err);
    *v = o;
    return 1;
}

int sp_get_array(const msgpack_object *map, const char *key, bool required,
                 const msgpack_object **v, struct sp_err *err)
{
    const msgpack_object *o = NULL;
    int r = get(map, key, required, &o, err);
    if (r <= 0)
        return r;
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return wrong(key, "array", o, err);
    *v = o;
    return 1;
}

/* ---- packing ---- */

/* Bodies are skipped when empty: callers may pass NULL with 0, and some
 * msgpack-c write callbacks would hand that NULL to memcpy. */
void sp_pack_strn(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    if (n)
        msgpack_pack_str_body(pk, s, n);
}

void sp_pack_cstr(msgpack_packer *pk, const char *s)
{
    sp_pack_strn(pk, s, strlen(s));
}

void sp_pack_binn(msgpack_packer *pk, const void *p, size_t n)
{
    msgpack_pack_bin(pk, n);
    if (n)
        msgpack_pack_bin_body(pk, p, n);
}

void sp_pack_kv_str(msgpack_packer *pk, const char *key, const char *val)
{
    sp_pack_cstr(pk, key);
    sp_pack_cstr(pk, val);
}

void sp_pack_kv_strn(msgpack_packer *pk, const char *key, const char *val, size_t n)
{
    sp_pack_cstr(pk, key);
    sp_pack_strn(pk, val, n);
}

void sp_pack_kv_bin(msgpack_packer *pk, const char *key, const void *p, size_t n)
{
    sp_pack_cstr(pk, key);
    sp_pack_binn(pk, p, n);
}

void sp_pack_kv_uint(msgpack_packer *pk, const char *key, uint64_t v)
{
    sp_pack_cstr(pk, key);
    msgpack_pack_uint64(pk, v);
}

void sp_pack_kv_int(msgpack_packer *pk, const char *key, int64_t v)
{
    sp_pack_cstr(pk, key);
    msgpack_pack_int64(pk, v);
}

void sp_pack_kv_bool(msgpack_packer *pk, const char *key, bool v)
{
    sp_pack_cstr(pk, key);
    if (v)
        msgpack_pack_true(pk);
    else
        msgpack_pack_false(pk);
}

void sp_pack_kv_nil(msgpack_packer *pk, const char *key)
{
    sp_pack_cstr(pk, key);
    msgpack_pack_nil(pk);
}

void sp_pack_ok_head(msgpack_packer *pk, uint64_t id)
{
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "id", id);
    sp_pack_kv_bool(pk, "ok", true);
    sp_pack_cstr(pk, "result");
}

void sp_pack_error(msgpack_packer *pk, uint64_t id, const struct sp_err *err)
{
    msgpack_pack_map(pk, 3);
    sp_pack_kv_uint(pk, "id", id);
    sp_pack_kv_bool(pk, "ok", false);
    sp_pack_cstr(pk, "error");
    msgpack_pack_map(pk, 2);
    sp_pack_kv_str(pk, "code", sp_code_name(err->code));
    sp_pack_kv_str(pk, "message", err->msg);
}

void sp_pack_event_head(msgpack_packer *pk, uint64_t id, const char *event, uint32_t nfields)
{
    msgpack_pack_map(pk, 2 + nfields);
    sp_pack_kv_uint(pk, "id", id);
    sp_pack_kv_str(pk, "event", event);
}

void sp_pack_request_head(msgpack_packer *pk, uint64_t id, const char *op, bool has_args)
{
    msgpack_pack_map(pk, has_args ? 3 : 2);
    sp_pack_kv_uint(pk, "id", id);
    sp_pack_kv_str(pk, "op", op);
    if (has_args)
        sp_pack_cstr(pk, "args");
}

void sp_sha256_hex(const void *data, size_t n, char out[65])
{
    SHA2_CTX ctx;
    SHA256Init(&ctx);
    SHA256Update(&ctx, data, n);
    uint8_t d[32];
    SHA256Final(d, &ctx);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[64] = 0;
}
