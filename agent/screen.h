/* The screen of a PTY session (screen.c): a libvterm terminal fed with the
 * session's output, read back as text rows and a cursor position. */
#ifndef SLOT_SCREEN_H
#define SLOT_SCREEN_H

#include <stddef.h>

#include <msgpack.h>

#define SCREEN_HISTORY 10000 /* lines kept after they scrolled off the top */

struct screen;

/* Bytes the terminal itself answers with (cursor position reports, device
 * attributes): the session writes them to the PTY so programs that ask do
 * not wait forever. */
typedef void screen_reply_fn(const char *data, size_t len, void *ctx);

struct screen *screen_new(unsigned rows, unsigned cols, screen_reply_fn *reply, void *ctx);
void screen_free(struct screen *s);
void screen_feed(struct screen *s, const char *data, size_t len);
void screen_resize(struct screen *s, unsigned rows, unsigned cols);
/* Row r as UTF-8 without trailing blanks into out (NUL-terminated); the
 * length written. */
size_t screen_row(const struct screen *s, unsigned r, char *out, size_t cap);
void screen_cursor(const struct screen *s, unsigned *row, unsigned *col);
void screen_size(const struct screen *s, unsigned *rows, unsigned *cols);
/* {rows: [text...], cursor: {row, col}, size: {rows, cols}} as map pairs
 * (3 of them) into pk. */
void screen_pack(const struct screen *s, msgpack_packer *pk);
/* Lines that scrolled off the top of the primary screen, oldest first (at
 * most SCREEN_HISTORY), as one map pair `history: [text...]` into pk. */
void screen_pack_history(const struct screen *s, msgpack_packer *pk);

#endif
