/* The screen of a PTY session: libvterm (Debian's libvterm-dev, linked
 * statically) keeps the terminal state that full-screen programs (vi, less,
 * htop) draw into, so `session_screen` can answer with what a person would
 * see instead of the raw escape sequences. Alternate screen on, as in
 * xterm: programs that switch to it and back restore the shell's screen. */
#include "screen.h"

#include <stdlib.h>
#include <string.h>

#include <vterm.h>

#include "slotproto.h"

struct screen {
    VTerm *vt;
    VTermScreen *vs;
    screen_reply_fn *reply;
    void *ctx;
    /* Lines that scrolled off the top, as text: a ring of SCREEN_HISTORY
     * lines and at most SCREEN_HISTORY_BYTES, the oldest dropped first (a
     * wide pane of combining characters makes long lines: the byte bound
     * keeps the history, and an answer holding it, small). */
    char **sb;
    unsigned sb_head, sb_len;
    size_t sb_bytes;
};

#define SCREEN_HISTORY_BYTES (4u << 20)

static size_t cells_text(const VTermScreenCell *cells, unsigned cols, char *out, size_t cap);
static int sb_pushline(int cols, const VTermScreenCell *cells, void *user);
static const VTermScreenCallbacks screen_cbs = {.sb_pushline = sb_pushline};

static void out_cb(const char *s, size_t len, void *user)
{
    struct screen *sc = user;
    if (sc->reply)
        sc->reply(s, len, sc->ctx);
}

struct screen *screen_new(unsigned rows, unsigned cols, screen_reply_fn *reply, void *ctx)
{
    struct screen *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->vt = vterm_new((int)rows, (int)cols);
    if (!s->vt) {
        free(s);
        return NULL;
    }
    s->reply = reply;
    s->ctx = ctx;
    vterm_set_utf8(s->vt, 1);
    vterm_output_set_callback(s->vt, out_cb, s);
    s->vs = vterm_obtain_screen(s->vt);
    vterm_screen_enable_altscreen(s->vs, 1);
    /* Only scrollback: damage is not followed, rows are read when asked. */
    vterm_screen_set_callbacks(s->vs, &screen_cbs, s);
    vterm_screen_reset(s->vs, 1);
    return s;
}

void screen_free(struct screen *s)
{
    if (!s)
        return;
    vterm_free(s->vt);
    for (unsigned i = 0; i < s->sb_len; i++)
        free(s->sb[(s->sb_head + i) % SCREEN_HISTORY]);
    free(s->sb);
    free(s);
}

void screen_feed(struct screen *s, const char *data, size_t len)
{
    vterm_input_write(s->vt, data, len);
    vterm_screen_flush_damage(s->vs);
}

void screen_resize(struct screen *s, unsigned rows, unsigned cols)
{
    vterm_set_size(s->vt, (int)rows, (int)cols);
    vterm_screen_flush_damage(s->vs);
}

void screen_size(const struct screen *s, unsigned *rows, unsigned *cols)
{
    int r, c;
    vterm_get_size(s->vt, &r, &c);
    *rows = (unsigned)r;
    *cols = (unsigned)c;
}

void screen_cursor(const struct screen *s, unsigned *row, unsigned *col)
{
    VTermPos pos;
    vterm_state_get_cursorpos(vterm_obtain_state(s->vt), &pos);
    *row = (unsigned)pos.row;
    *col = (unsigned)pos.col;
}

static size_t utf8_put(uint32_t c, char *out)
{
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (char)(0xc0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3f));
        return 2;
    }
    if (c < 0x10000) {
        if (c >= 0xd800 && c < 0xe000)
            c = 0xfffd;
        out[0] = (char)(0xe0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        out[2] = (char)(0x80 | (c & 0x3f));
        return 3;
    }
    if (c > 0x10ffff)
        return utf8_put(0xfffd, out);
    out[0] = (char)(0xf0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3f));
    out[3] = (char)(0x80 | (c & 0x3f));
    return 4;
}

/* One row of cells as UTF-8 without trailing blanks into out
 * (NUL-terminated); the length written. */
static size_t cells_text(const VTermScreenCell *cells, unsigned cols, char *out, size_t cap)
{
    size_t n = 0, keep = 0; /* keep: length without trailing blanks */
    if (cap == 0)
        return 0;
    for (unsigned c = 0; c < cols;) {
        const VTermScreenCell *cell = &cells[c];
        char buf[4 * VTERM_MAX_CHARS_PER_CELL];
        size_t bl = 0;
        if (!cell->chars[0])
            buf[bl++] = ' ';
        for (int i = 0; i < VTERM_MAX_CHARS_PER_CELL && cell->chars[i]; i++)
            bl += utf8_put(cell->chars[i], buf + bl);
        if (n + bl + 1 > cap)
            break;
        memcpy(out + n, buf, bl);
        n += bl;
        if (cell->chars[0] && cell->chars[0] != ' ')
            keep = n;
        c += cell->width > 1 ? (unsigned)cell->width : 1;
    }
    out[keep] = 0;
    return keep;
}

size_t screen_row(const struct screen *s, unsigned r, char *out, size_t cap)
{
    unsigned rows, cols;
    screen_size(s, &rows, &cols);
    if (cap == 0)
        return 0;
    out[0] = 0;
    if (r >= rows)
        return 0;
    VTermScreenCell *cells = calloc(cols ? cols : 1, sizeof *cells);
    if (!cells)
        return 0;
    unsigned got = 0;
    for (; got < cols; got++) {
        VTermPos pos = {.row = (int)r, .col = (int)got};
        if (!vterm_screen_get_cell(s->vs, pos, &cells[got]))
            break;
    }
    size_t n = cells_text(cells, got, out, cap);
    free(cells);
    return n;
}

/* libvterm gives up a line at the top of the primary screen (never the
 * alternate one: full-screen programs leave no history, as in tmux). */
static int sb_pushline(int cols, const VTermScreenCell *cells, void *user)
{
    struct screen *s = user;
    size_t cap = (size_t)cols * 4 * VTERM_MAX_CHARS_PER_CELL + 1;
    char *line = malloc(cap);
    if (!line)
        return 1;
    size_t n = cells_text(cells, (unsigned)cols, line, cap);
    char *shrunk = realloc(line, n + 1);
    line = shrunk ? shrunk : line;
    if (!s->sb && !(s->sb = calloc(SCREEN_HISTORY, sizeof *s->sb))) {
        free(line);
        return 1;
    }
    while (s->sb_len && (s->sb_len == SCREEN_HISTORY || s->sb_bytes + n > SCREEN_HISTORY_BYTES)) {
        s->sb_bytes -= strlen(s->sb[s->sb_head]);
        free(s->sb[s->sb_head]);
        s->sb_head = (s->sb_head + 1) % SCREEN_HISTORY;
        s->sb_len--;
    }
    s->sb[(s->sb_head + s->sb_len++) % SCREEN_HISTORY] = line;
    s->sb_bytes += n;
    return 1;
}

void screen_pack_history(const struct screen *s, msgpack_packer *pk)
{
    sp_pack_cstr(pk, "history");
    msgpack_pack_array(pk, s->sb_len);
    for (unsigned i = 0; i < s->sb_len; i++) {
        const char *line = s->sb[(s->sb_head + i) % SCREEN_HISTORY];
        sp_pack_strn(pk, line, strlen(line));
    }
}

void screen_pack(const struct screen *s, msgpack_packer *pk)
{
    unsigned rows, cols, cr, cc;
    screen_size(s, &rows, &cols);
    screen_cursor(s, &cr, &cc);
    size_t cap = (size_t)cols * 4 * VTERM_MAX_CHARS_PER_CELL + 1;
    char *line = malloc(cap);
    sp_pack_cstr(pk, "rows");
    msgpack_pack_array(pk, rows);
    for (unsigned r = 0; r < rows; r++) {
        size_t n = line ? screen_row(s, r, line, cap) : 0;
        sp_pack_strn(pk, line ? line : "", n);
    }
    free(line);
    sp_pack_cstr(pk, "cursor");
    msgpack_pack_map(pk, 2);
    sp_pack_kv_uint(pk, "row", cr);
    sp_pack_kv_uint(pk, "col", cc);
    sp_pack_cstr(pk, "size");
    msgpack_pack_map(pk, 2);
    sp_pack_kv_uint(pk, "rows", rows);
    sp_pack_kv_uint(pk, "cols", cols);
}
