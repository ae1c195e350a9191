/* agent/screen.c: what libvterm makes of a PTY's output, as session_screen
 * reports it (text rows without trailing blanks, cursor, size). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "screen.h"

struct reply {
    char buf[256];
    size_t len;
};

static void on_reply(const char *data, size_t len, void *ctx)
{
    struct reply *r = ctx;
    if (r->len + len < sizeof r->buf) {
        memcpy(r->buf + r->len, data, len);
        r->len += len;
    }
}

static void feed(struct screen *s, const char *str)
{
    screen_feed(s, str, strlen(str));
}

static const char *row(struct screen *s, unsigned r)
{
    static char buf[4096];
    screen_row(s, r, buf, sizeof buf);
    return buf;
}

static void test_text_and_cursor(void **state)
{
    (void)state;
    struct screen *s = screen_new(5, 20, NULL, NULL);
    assert_non_null(s);
    feed(s, "hello\r\nworld  ");
    assert_string_equal(row(s, 0), "hello");
    assert_string_equal(row(s, 1), "world");
    assert_string_equal(row(s, 2), "");
    unsigned r, c;
    screen_cursor(s, &r, &c);
    assert_int_equal(r, 1);
    assert_int_equal(c, 7);
    /* a line longer than the screen wraps */
    feed(s, "\r\n0123456789012345678901234");
    assert_string_equal(row(s, 2), "01234567890123456789");
    assert_string_equal(row(s, 3), "01234");
    screen_free(s);
}

static void test_clear_and_positioning(void **state)
{
    (void)state;
    struct screen *s = screen_new(4, 10, NULL, NULL);
    feed(s, "junk\r\njunk\x1b[2J\x1b[H");
    assert_string_equal(row(s, 0), "");
    feed(s, "\x1b[3;4HX\x1b[1;1HTop");
    assert_string_equal(row(s, 0), "Top");
    assert_string_equal(row(s, 2), "   X");
    /* scrolling: the first lines go up and out */
    feed(s, "\x1b[4;1Ha\r\nb\r\nc");
    assert_string_equal(row(s, 3), "c");
    assert_string_equal(row(s, 2), "b");
    screen_free(s);
}

static void test_alternate_screen_restores(void **state)
{
    (void)state;
    struct screen *s = screen_new(3, 10, NULL, NULL);
    feed(s, "$ less f");
    feed(s, "\x1b[?1049h\x1b[H\x1b[2Jpage one");
    assert_string_equal(row(s, 0), "page one");
    feed(s, "\x1b[?1049l");
    assert_string_equal(row(s, 0), "$ less f");
    screen_free(s);
}

static void test_utf8_and_wide(void **state)
{
    (void)state;
    struct screen *s = screen_new(2, 10, NULL, NULL);
    feed(s, "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac!");
    assert_string_equal(row(s, 0), "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac!");
    unsigned r, c;
    screen_cursor(s, &r, &c);
    /* 5 + 2*2 + 1 = 10 columns used: at the right margin, the wrap pending */
    assert_int_equal(c, 9);
    screen_free(s);
}

static void test_resize(void **state)
{
    (void)state;
    struct screen *s = screen_new(24, 80, NULL, NULL);
    unsigned rows, cols;
    screen_resize(s, 10, 40);
    screen_size(s, &rows, &cols);
    assert_int_equal(rows, 10);
    assert_int_equal(cols, 40);
    feed(s, "\x1b[10;40HZ");
    assert_string_equal(row(s, 9), "                                       Z");
    screen_free(s);
}

static void test_terminal_answers_queries(void **state)
{
    (void)state;
    struct reply rep = {0};
    struct screen *s = screen_new(5, 20, on_reply, &rep);
    feed(s, "\x1b[3;7H\x1b[6n"); /* where is the cursor? */
    assert_int_equal(rep.len, strlen("\x1b[3;7R"));
    assert_memory_equal(rep.buf, "\x1b[3;7R", rep.len);
    screen_free(s);
}

static void test_pack(void **state)
{
    (void)state;
    struct screen *s = screen_new(2, 8, NULL, NULL);
    feed(s, "ab\r\ncd");
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    screen_pack(s, &pk);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, NULL), MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *m = &u.data;
    assert_int_equal(m->type, MSGPACK_OBJECT_MAP);
    assert_int_equal(m->via.map.size, 3);
    const msgpack_object *rows = &m->via.map.ptr[0].val;
    assert_int_equal(rows->via.array.size, 2);
    assert_int_equal(rows->via.array.ptr[1].via.str.size, 2);
    assert_memory_equal(rows->via.array.ptr[1].via.str.ptr, "cd", 2);
    const msgpack_object *cur = &m->via.map.ptr[1].val;
    assert_int_equal(cur->via.map.ptr[0].val.via.u64, 1);
    assert_int_equal(cur->via.map.ptr[1].val.via.u64, 2);
    msgpack_unpacked_destroy(&u);
    msgpack_sbuffer_destroy(&sb);
    screen_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_and_cursor),
        cmocka_unit_test(test_clear_and_positioning),
        cmocka_unit_test(test_alternate_screen_restores),
        cmocka_unit_test(test_utf8_and_wide),
        cmocka_unit_test(test_resize),
        cmocka_unit_test(test_terminal_answers_queries),
        cmocka_unit_test(test_pack),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
