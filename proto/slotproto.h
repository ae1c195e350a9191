/* libslotproto: the wire contract in C. Owns error codes, frame reading and
 * writing with limits, structural validation of msgpack before it is unpacked,
 * typed access to request maps, and small packing helpers. Shared by
 * slot-agent, slot-controller and agentctl. See proto/PROTOCOL.md. */
#ifndef SLOTPROTO_H
#define SLOTPROTO_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SP_PROTOCOL_VERSION 1
#define SP_DEFAULT_MAX_FRAME (64u << 20)
#define SP_MAX_DEPTH 32

/* ---- errors ----------------------------------------------------------- */

enum sp_code {
    SP_OK = 0,
    SP_BAD_REQUEST,
    SP_UNKNOWN_OP,
    SP_UNAUTHORIZED,
    SP_UNKNOWN_SLOT,
    SP_SLOT_BUSY,
    SP_NOT_LEASED,
    SP_PATH_ESCAPE,
    SP_NOT_FOUND,
    SP_EXISTS,
    SP_TOO_LARGE,
    SP_TIMEOUT,
    SP_CANCELLED,
    SP_ISOLATION_UNAVAILABLE,
    SP_AGENT_LOST,
    SP_NO_CAPACITY,
    SP_INTERNAL,
    SP_CODE_COUNT
};

struct sp_err {
    enum sp_code code;
    char msg[640];
};

/* The contract's stable string for a code ("bad_request", ...). */
const char *sp_code_name(enum sp_code code);
/* Parse a code string; returns -1 when unknown. */
int sp_code_from_name(const char *s, size_t n);
/* Fill *e and return -1, so callers can `return sp_errf(...)`. */
int sp_errf(struct sp_err *e, enum sp_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Map an errno from a syscall on `what` to the closest contract code
 * (ENOENT -> not_found, EEXIST -> exists, EXDEV/ELOOP -> path_escape,
 * EFBIG/ENOSPC -> too_large, ...); returns -1. */
int sp_err_errno(struct sp_err *e, int errnum, const char *what);

/* ---- frame reader -------------------------------------------------------
 * Incremental: bytes arrive in any split; frames come out whole. A header
 * announcing more than max_frame bytes is refused before anything is
 * allocated for it. */

struct sp_reader {
    char *buf;
    size_t off; /* start of unconsumed bytes */
    size_t len; /* end of valid bytes */
    size_t cap;
    uint32_t max_frame;
};

void sp_reader_init(struct sp_reader *r, uint32_t max_frame);
void sp_reader_free(struct sp_reader *r);
/* One read(2) from fd into the buffer. Returns bytes read, 0 on EOF, -1 with
 * errno set (EAGAIN/EWOULDBLOCK for a non-blocking fd with nothing to read). */
ssize_t sp_reader_fill(struct sp_reader *r, int fd);
/* Append bytes from another transport (tests, fuzzing, relays). 0 or -1
 * (out of memory). */
int sp_reader_feed(struct sp_reader *r, const void *data, size_t n);
/* Next complete frame payload (without its 4-byte header). Returns 1 with
 * data and len valid until the next call on r, 0 when more bytes are needed, -1
 * with err set (too_large) when the header exceeds max_frame; the stream is
 * then unusable. */
int sp_reader_next(struct sp_reader *r, const char **data, uint32_t *len, struct sp_err *err);
/* Bytes buffered but not yet returned as frames. */
size_t sp_reader_pending(const struct sp_reader *r);

/* ---- frame writer -------------------------------------------------------
 * A byte queue with a hard cap. Frames are packed straight into it with a
 * msgpack_packer (see sp_writer_packer); sp_writer_end_frame patches the
 * length and enforces the cap, so a slow reader cannot make a process buffer
 * without bound. */

struct sp_writer {
    char *buf;
    size_t off; /* first unsent byte */
    size_t len; /* end of queued bytes */
    size_t cap;
    size_t limit; /* max queued bytes; 0 = unlimited */
    size_t frame_start;
    bool in_frame;
    bool overflow;
};

void sp_writer_init(struct sp_writer *w, size_t limit);
void sp_writer_free(struct sp_writer *w);
/* A packer whose output goes into w. */
void sp_writer_packer(struct sp_writer *w, msgpack_packer *pk);
/* Reserve the 4-byte header; frames do not nest. */
void sp_writer_begin_frame(struct sp_writer *w);
/* Patch the header. Returns 0, or -1 with err (too_large) when the queue now
 * exceeds the limit or the frame is over 4 GiB; the caller drops the
 * connection. */
int sp_writer_end_frame(struct sp_writer *w, struct sp_err *err);
/* Discard a frame begun but not ended (e.g. the handler failed midway). */
void sp_writer_abort_frame(struct sp_writer *w);
/* Append raw bytes (an already framed message). 0 or -1 over the limit. */
int sp_writer_append(struct sp_writer *w, const void *data, size_t n, struct sp_err *err);
/* write(2) as much as the fd takes. Returns bytes still queued (0 = all
 * sent), or -1 with errno on a real error (not EAGAIN). */
ssize_t sp_writer_flush(struct sp_writer *w, int fd);
size_t sp_writer_pending(const struct sp_writer *w);

/* ---- decoding -------------------------------------------------------- */

/* Structural check of one msgpack value filling exactly [data, data+len):
 * well-formed, nesting at most max_depth, and every container count and
 * str/bin/ext length plausible for the bytes that remain, so unpacking can
 * never allocate more than a small multiple of len. 0 or -1 with err
 * (bad_request). */
int sp_msgpack_check(const char *data, size_t len, unsigned max_depth, struct sp_err *err);

/* sp_msgpack_check, then msgpack_unpack_next into *out (which the caller has
 * msgpack_unpacked_init'ed and later destroys). str/bin objects point into
 * data, so data must outlive *out. */
int sp_unpack(const char *data, size_t len, msgpack_unpacked *out, struct sp_err *err);

struct sp_request {
    uint64_t id;
    const char *op;
    size_t op_len;
    const msgpack_object *args; /* a map, or NULL when absent or nil */
};

/* Validate the envelope {"id": uint, "op": str, "args": map?}. On failure
 * req->id is still set when the id itself was readable (else 0), so the
 * error can be answered with it. */
int sp_parse_request(const msgpack_object *root, struct sp_request *req, struct sp_err *err);

/* Typed access to a map. Each returns 1 when the key is present with the
 * right type, 0 when absent (or nil) and !required, -1 with err
 * (bad_request naming the key and the expected and actual types). */
const msgpack_object *sp_map_get(const msgpack_object *map, const char *key);
int sp_get_str(const msgpack_object *map, const char *key, bool required, const char **s, size_t *n,
               struct sp_err *err);
/* Bytes: accepts bin, and str for convenience of hand-written clients. */
int sp_get_bin(const msgpack_object *map, const char *key, bool required, const char **p, size_t *n,
               struct sp_err *err);
int sp_get_uint(const msgpack_object *map, const char *key, bool required, uint64_t *v,
                struct sp_err *err);
int sp_get_int(const msgpack_object *map, const char *key, bool required, int64_t *v,
               struct sp_err *err);
int sp_get_bool(const msgpack_object *map, const char *key, bool required, bool *v,
                struct sp_err *err);
int sp_get_map(const msgpack_object *map, const char *key, bool required, const msgpack_object **v,
               struct sp_err *err);
int sp_get_array(const msgpack_object *map, const char *key, bool required,
                 const msgpack_object **v, struct sp_err *err);
/* "positive integer", "str", ... for messages. */
const char *sp_type_name(const msgpack_object *o);
/* key == (s, n)? */
bool sp_str_eq(const char *s, size_t n, const char *key);

/* ---- packing helpers -------------------------------------------------- */

void sp_pack_cstr(msgpack_packer *pk, const char *s);
void sp_pack_strn(msgpack_packer *pk, const char *s, size_t n);
void sp_pack_binn(msgpack_packer *pk, const void *p, size_t n);
void sp_pack_kv_str(msgpack_packer *pk, const char *key, const char *val);
void sp_pack_kv_strn(msgpack_packer *pk, const char *key, const char *val, size_t n);
void sp_pack_kv_bin(msgpack_packer *pk, const char *key, const void *p, size_t n);
void sp_pack_kv_uint(msgpack_packer *pk, const char *key, uint64_t v);
void sp_pack_kv_int(msgpack_packer *pk, const char *key, int64_t v);
void sp_pack_kv_bool(msgpack_packer *pk, const char *key, bool v);
void sp_pack_kv_nil(msgpack_packer *pk, const char *key);

/* Envelope heads. After sp_pack_ok_head the caller packs the result map
 * (exactly one value). sp_pack_error packs a whole failure response;
 * sp_pack_event_head packs {"id","event",<nfields more pairs follow>}. */
void sp_pack_ok_head(msgpack_packer *pk, uint64_t id);
void sp_pack_error(msgpack_packer *pk, uint64_t id, const struct sp_err *err);
void sp_pack_event_head(msgpack_packer *pk, uint64_t id, const char *event, uint32_t nfields);

/* Client side: pack a request head {"id","op","args": <caller packs a map>}
 * (has_args) or {"id","op"}. */
void sp_pack_request_head(msgpack_packer *pk, uint64_t id, const char *op, bool has_args);

/* ---- misc ------------------------------------------------------------- */

/* Lower-case hex sha256 of data into out[65]. */
void sp_sha256_hex(const void *data, size_t n, char out[65]);

#endif
