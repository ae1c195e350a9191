/* agent/untar.c: archives written by GNU tar and Python's tarfile (gnu,
 * posix/pax, ustar; plain and gzip) fed in pieces of many sizes and the
 * extracted trees compared with their sources; hostile archives built here
 * block by block (escaping names, symlink and hardlink tricks, bad
 * checksums and numbers, truncation, limits). */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cmocka.h>

#include "untar.h"

#define PY "/usr/bin/python3"

static char base[64]; /* mkdtemp: src/, out/, outside/, the archives */
static char dir_a[121], dir_b[151], dir_m[61], file_n[61];

static void sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc != 0)
        fail_msg("command failed (%d): %s", rc, cmd);
}

static char *at(const char *fmt, ...)
{
    static char bufs[4][8192];
    static int k;
    char *b = bufs[k++ % 4];
    int n = snprintf(b, sizeof bufs[0], "%s/", base);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b + n, sizeof bufs[0] - (size_t)n, fmt, ap);
    va_end(ap);
    return b;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* A fresh, empty out/ opened as the extraction root. */
static int fresh_out(void)
{
    sh("rm -rf '%s' '%s' && mkdir '%s' '%s'", at("out"), at("outside"), at("out"), at("outside"));
    int fd = open(at("out"), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    assert_true(fd >= 0);
    return fd;
}

struct run {
    uint64_t files, bytes;
    struct sp_err err;
};

/* chunk 0: random sizes (1, 511, 513, 64 KiB, or anything up to 100 KB). */
static int extract_buf(const unsigned char *buf, size_t len, int gzip, size_t chunk,
                       const struct untar_limits *lim, uid_t uid, gid_t gid, struct run *r)
{
    static const size_t mix[] = {1, 511, 513, 65536};
    int dfd = fresh_out();
    memset(r, 0, sizeof *r);
    struct untar *u = untar_new(dfd, gzip, lim, uid, gid, &r->err);
    assert_non_null(u);
    unsigned seed = (unsigned)len;
    int rc = 0;
    for (size_t off = 0; off < len && rc == 0;) {
        size_t n = chunk;
        if (!n) {
            unsigned x = (unsigned)rand_r(&seed);
            n = x % 5 < 4 ? mix[x % 5] : (size_t)(x >> 4) % 100000 + 1;
        }
        if (n > len - off)
            n = len - off;
        rc = untar_feed(u, buf + off, n, &r->err);
        off += n;
    }
    if (rc == 0)
        rc = untar_finish(u, &r->err);
    r->files = untar_files(u);
    r->bytes = untar_bytes(u);
    untar_free(u);
    close(dfd);
    return rc;
}

static int extract_file(const char *name, int gzip, size_t chunk, const struct untar_limits *lim,
                        struct run *r)
{
    size_t len;
    unsigned char *b = slurp(at("%s", name), &len);
    int rc = extract_buf(b, len, gzip, chunk, lim, (uid_t)-1, (gid_t)-1, r);
    free(b);
    return rc;
}

static bool exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* ---- the sources and archives, made once ------------------------------ */

static const char py_script[] =
    "import sys, tarfile\n"
    "out, fmt, small = sys.argv[1], sys.argv[2], sys.argv[3] == '1'\n"
    "f = {'pax': tarfile.PAX_FORMAT, 'gnu': tarfile.GNU_FORMAT}[fmt]\n"
    "kw = {'pax_headers': {'comment': 'a global header'}} if fmt == 'pax' else {}\n"
    "flt = (lambda ti: None if ti.name.endswith('big.bin') else ti) if small else None\n"
    "with tarfile.open(out, 'w', format=f, **kw) as t:\n"
    "    t.add('src', arcname='.', filter=flt)\n";

static int setup(void **state)
{
    (void)state;
    umask(022);
    strcpy(base, "/tmp/test-untar-XXXXXX");
    if (!mkdtemp(base))
        return -1;
    memset(dir_a, 'a', 120);
    memset(dir_b, 'b', 150);
    memset(dir_m, 'm', 60);
    memset(file_n, 'n', 56);
    memcpy(file_n + 56, ".txt", 4);
    setenv("A", dir_a, 1);
    setenv("B", dir_b, 1);
    setenv("M", dir_m, 1);
    setenv("N", file_n, 1);
    setenv("PYSCRIPT", py_script, 1);
    sh("set -e; umask 022; cd '%s'; mkdir -p src/emptydir src/ro src/deep/$A/$B src/$M\n"
       "printf 'hello\\n' > src/small.txt; chmod 0644 src/small.txt\n"
       "printf '#!/bin/sh\\n' > src/suid; chmod 4755 src/suid\n" PY
       " -c 'import random; random.seed(7); "
       "open(\"src/big.bin\", \"wb\").write(random.randbytes(3 << 20))'\n"
       "printf inner > src/ro/inner.txt; printf deep > src/deep/$A/$B/file.txt\n"
       "printf mid > src/$M/$N\n"
       "ln -s small.txt src/link; ln -s deep/$A/$B/file.txt src/longlink\n"
       "ln src/small.txt src/hard; mkfifo src/fifo\n"
       "chmod 0750 src/emptydir; chmod 0555 src/ro\n"
       "touch -d @1234567890 src/small.txt; touch -h -d @1234500000 src/link\n"
       "touch -d @1234000000 src/emptydir src/deep/$A\n"
       "tar --sort=name -C src -cf gnu.tar .\n"
       "tar --sort=name --format=posix -C src -cf posix.tar .\n"
       "tar --sort=name --exclude=./big.bin -C src -cf gnu-small.tar .\n"
       "tar --sort=name --format=posix --exclude=./big.bin -C src -cf posix-small.tar .\n"
       "tar --format=ustar -C src -cf ustar.tar small.txt $M/$N suid\n" PY
       " -c \"$PYSCRIPT\" pypax.tar pax 0; " PY " -c \"$PYSCRIPT\" pygnu.tar gnu 0\n" PY
       " -c \"$PYSCRIPT\" pypax-small.tar pax 1; " PY " -c \"$PYSCRIPT\" pygnu-small.tar gnu 1\n"
       "for f in *.tar; do gzip -c $f > $f.gz; done\n",
       base);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    sh("chmod -R u+rwx '%s'; rm -rf '%s'", base, base);
    return 0;
}

/* ---- extracted trees against src --------------------------------------- */

static void same_entry(const char *rel, bool content)
{
    struct stat s, o;
    assert_int_equal(lstat(at("src/%s", rel), &s), 0);
    if (lstat(at("out/%s", rel), &o) != 0)
        fail_msg("%s: not extracted", rel);
    assert_int_equal(s.st_mode & S_IFMT, o.st_mode & S_IFMT);
    if (!S_ISLNK(s.st_mode))
        assert_int_equal(s.st_mode & 0777, o.st_mode & 07777);
    if (s.st_mtim.tv_sec != o.st_mtim.tv_sec)
        fail_msg("%s: mtime %lld, want %lld", rel, (long long)o.st_mtim.tv_sec,
                 (long long)s.st_mtim.tv_sec);
    if (content)
        sh("cmp -s '%s' '%s'", at("src/%s", rel), at("out/%s", rel));
    if (S_ISLNK(s.st_mode)) {
        char a[4096] = {0}, b[4096] = {0};
        assert_true(readlink(at("src/%s", rel), a, sizeof a - 1) > 0);
        assert_true(readlink(at("out/%s", rel), b, sizeof b - 1) > 0);
        assert_string_equal(a, b);
    }
}

static void check_tree(const struct run *r, bool big)
{
    char deep[400], mid[130];
    snprintf(deep, sizeof deep, "deep/%s/%s/file.txt", dir_a, dir_b);
    snprintf(mid, sizeof mid, "%s/%s", dir_m, file_n);
    const char *files[] = {"small.txt", "hard", "ro/inner.txt", deep, mid};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++)
        same_entry(files[i], true);
    same_entry("emptydir", false);
    same_entry("ro", false);
    same_entry("link", false);
    same_entry("longlink", false);
    char deep_a[200];
    snprintf(deep_a, sizeof deep_a, "deep/%s", dir_a);
    same_entry(deep_a, false);
    struct stat st, st2;
    /* setuid dropped, the rest kept */
    assert_int_equal(lstat(at("out/suid"), &st), 0);
    assert_int_equal(st.st_mode & 07777, 0755);
    sh("cmp -s '%s' '%s'", at("src/suid"), at("out/suid"));
    assert_int_equal(lstat(at("out/small.txt"), &st), 0);
    assert_int_equal(lstat(at("out/hard"), &st2), 0);
    assert_int_equal(st.st_ino, st2.st_ino);
    assert_int_equal(st.st_nlink, 2);
    assert_false(exists(at("out/fifo")));
    uint64_t bytes = 6 + 10 + 5 + 4 + 3;
    if (big) {
        sh("cmp -s '%s' '%s'", at("src/big.bin"), at("out/big.bin"));
        bytes += 3 << 20;
    } else {
        assert_false(exists(at("out/big.bin")));
    }
    /* small.txt suid big.bin emptydir ro ro/inner.txt deep deep/A deep/A/B
     * deep/A/B/file.txt M M/N link longlink hard; not "./" nor the fifo */
    assert_int_equal(r->files, big ? 15 : 14);
    assert_int_equal(r->bytes, bytes);
}

static void test_formats(void **state)
{
    (void)state;
    static const char *const kinds[] = {"gnu", "posix", "pypax", "pygnu"};
    static const size_t chunks[] = {0, 511, 513, 65536};
    for (size_t k = 0; k < 4; k++) {
        for (int gz = 0; gz < 2; gz++) {
            for (size_t c = 0; c < 4; c++) {
                char name[64];
                snprintf(name, sizeof name, "%s.tar%s", kinds[k], gz ? ".gz" : "");
                struct run r;
                /* gzip: 1 = said so, -1 = sniffed (both, alternately) */
                int mode = gz ? (c % 2 ? 1 : -1) : (c % 2 ? 0 : -1);
                if (extract_file(name, mode, chunks[c], NULL, &r) < 0)
                    fail_msg("%s chunk %zu: %s", name, chunks[c], r.err.msg);
                check_tree(&r, true);
            }
            /* byte by byte, without the 3 MiB file */
            char name[64];
            snprintf(name, sizeof name, "%s-small.tar%s", kinds[k], gz ? ".gz" : "");
            struct run r;
            if (extract_file(name, gz, 1, NULL, &r) < 0)
                fail_msg("%s: %s", name, r.err.msg);
            check_tree(&r, false);
        }
    }
}

static void test_ustar_prefix(void **state)
{
    (void)state;
    struct run r;
    for (int gz = 0; gz < 2; gz++) {
        assert_int_equal(extract_file(gz ? "ustar.tar.gz" : "ustar.tar", -1, 0, NULL, &r), 0);
        char mid[130];
        snprintf(mid, sizeof mid, "%s/%s", dir_m, file_n);
        same_entry(mid, true);
        same_entry("small.txt", true);
        assert_int_equal(r.files, 3);
    }
}

/* ---- archives built block by block ------------------------------------ */

struct tb {
    unsigned char *b;
    size_t len, cap;
};

static void tb_put(struct tb *t, const void *p, size_t n)
{
    if (t->len + n > t->cap) {
        t->cap = (t->len + n) * 2;
        t->b = realloc(t->b, t->cap);
        assert_non_null(t->b);
    }
    if (p)
        memcpy(t->b + t->len, p, n);
    else
        memset(t->b + t->len, 0, n);
    t->len += n;
}

static void tb_sum(unsigned char *h)
{
    unsigned sum = 0;
    memset(h + 148, ' ', 8);
    for (int i = 0; i < 512; i++)
        sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
}

/* A ustar header; returns its offset so callers may patch it (and tb_sum). */
static size_t tb_hdr(struct tb *t, const char *name, char type, unsigned mode, uint64_t size,
                     const char *link)
{
    unsigned char h[512] = {0};
    memcpy(h, name, strnlen(name, 100));
    snprintf((char *)h + 100, 8, "%07o", mode & 07777);
    snprintf((char *)h + 108, 8, "%07o", 0);
    snprintf((char *)h + 116, 8, "%07o", 0);
    snprintf((char *)h + 124, 12, "%011llo", (unsigned long long)size & 077777777777ull);
    snprintf((char *)h + 136, 12, "%011o", 1234567890);
    h[156] = (unsigned char)type;
    if (link)
        memcpy(h + 157, link, strnlen(link, 100));
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    tb_sum(h);
    size_t off = t->len;
    tb_put(t, h, 512);
    return off;
}

static void tb_data(struct tb *t, const void *p, size_t n)
{
    tb_put(t, p, n);
    if (n % 512)
        tb_put(t, NULL, 512 - n % 512);
}

static void tb_file(struct tb *t, const char *name, const char *content)
{
    tb_hdr(t, name, '0', 0644, strlen(content), NULL);
    tb_data(t, content, strlen(content));
}

/* A pax 'x' header with one record (value may hold NUL bytes). */
static void tb_pax(struct tb *t, const char *key, const char *val, size_t vlen)
{
    size_t body = strlen(key) + vlen + 3, total = body + 1;
    while (snprintf(NULL, 0, "%zu", total) + body != total)
        total = body + (size_t)snprintf(NULL, 0, "%zu", total);
    char *rec = malloc(total + 1);
    int n = sprintf(rec, "%zu %s=", total, key);
    memcpy(rec + n, val, vlen);
    rec[total - 1] = '\n';
    tb_hdr(t, "./PaxHeaders/x", 'x', 0644, total, NULL);
    tb_data(t, rec, total);
    free(rec);
}

static void tb_end(struct tb *t)
{
    tb_put(t, NULL, 1024);
}

static int run_tb(struct tb *t, struct run *r)
{
    return extract_buf(t->b, t->len, 0, 0, NULL, (uid_t)-1, (gid_t)-1, r);
}

static void expect_fail(struct tb *t, enum sp_code code, const char *needle)
{
    struct run r;
    int rc = run_tb(t, &r);
    if (rc == 0)
        fail_msg("expected failure mentioning '%s'", needle);
    if (r.err.code != code || !strstr(r.err.msg, needle))
        fail_msg("got %s: %s (wanted %s, '%s')", sp_code_name(r.err.code), r.err.msg,
                 sp_code_name(code), needle);
    free(t->b);
    memset(t, 0, sizeof *t);
}

static void test_hostile_names(void **state)
{
    (void)state;
    struct tb t = {0};
    tb_file(&t, "../x", "pwned");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "'../x'");
    assert_false(exists(at("x")));

    tb_file(&t, at("outside/abs"), "pwned");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "absolute");
    assert_false(exists(at("outside/abs")));

    tb_file(&t, "/etc/x", "pwned");
    expect_fail(&t, SP_BAD_REQUEST, "'/etc/x': absolute");

    tb_file(&t, "ok", "fine");
    tb_file(&t, "a/../../x", "pwned");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "'a/../../x': '..'");
    assert_false(exists(at("x")));

    tb_file(&t, "", "empty");
    expect_fail(&t, SP_BAD_REQUEST, "empty name");

    tb_pax(&t, "path", "a\0b", 3);
    tb_file(&t, "placeholder", "x");
    expect_fail(&t, SP_BAD_REQUEST, "NUL byte");

    char *lng = malloc(5000);
    memset(lng, 'z', 5000);
    for (size_t i = 200; i < 5000; i += 200)
        lng[i] = '/';
    tb_pax(&t, "path", lng, 4097);
    tb_file(&t, "placeholder", "x");
    expect_fail(&t, SP_BAD_REQUEST, "longer than 4096");
    tb_pax(&t, "path", lng, 4096); /* the limit itself is fine */
    tb_file(&t, "placeholder", "x");
    tb_end(&t);
    struct run r;
    assert_int_equal(run_tb(&t, &r), 0);
    free(t.b);
    free(lng);
}

static void test_symlink_escape(void **state)
{
    (void)state;
    struct run r;
    const char *variants[] = {"evil/pwn", "evil/sub/dir/pwn", "evil/"};
    for (int v = 0; v < 3; v++) {
        for (int rel = 0; rel < 2; rel++) {
            struct tb t = {0};
            tb_hdr(&t, "evil", '2', 0777, 0, rel ? "../outside" : at("outside"));
            if (v == 2)
                tb_hdr(&t, "evil/newdir", '5', 0755, 0, NULL);
            else
                tb_file(&t, variants[v], "pwned");
            tb_end(&t);
            assert_int_equal(run_tb(&t, &r), -1);
            assert_int_equal(r.err.code, SP_BAD_REQUEST);
            assert_non_null(strstr(r.err.msg, "symlink"));
            assert_non_null(strstr(r.err.msg, "'evil/"));
            sh("test -z \"$(ls -A '%s')\"", at("outside")); /* nothing created there */
            free(t.b);
        }
    }
    /* symlinks inside the tree are not followed either */
    struct tb t = {0};
    tb_hdr(&t, "real", '5', 0755, 0, NULL);
    tb_hdr(&t, "alias", '2', 0777, 0, "real");
    tb_file(&t, "alias/f", "x");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "alias/f");
    assert_false(exists(at("out/real/f")));
}

static void test_hardlink_escape(void **state)
{
    (void)state;
    struct tb t = {0};
    tb_hdr(&t, "pw", '1', 0644, 0, "/etc/passwd");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "absolute link target");
    assert_false(exists(at("out/pw")));

    tb_hdr(&t, "x", '1', 0644, 0, "../x");
    expect_fail(&t, SP_BAD_REQUEST, "'..' in link target");

    /* through a symlink to a file outside */
    sh("echo secret > '%s'", at("outside-secret"));
    tb_hdr(&t, "evil", '2', 0777, 0, base);
    tb_hdr(&t, "stolen", '1', 0644, 0, "evil/outside-secret");
    tb_end(&t);
    expect_fail(&t, SP_BAD_REQUEST, "'stolen'");
    assert_false(exists(at("out/stolen")));
    struct stat st;
    assert_int_equal(stat(at("outside-secret"), &st), 0);
    assert_int_equal(st.st_nlink, 1);
    unlink(at("outside-secret"));

    /* a hard link to a symlink links the symlink itself */
    tb_hdr(&t, "sl", '2', 0777, 0, "/etc/passwd");
    tb_hdr(&t, "hl", '1', 0644, 0, "sl");
    tb_end(&t);
    struct run r;
    assert_int_equal(run_tb(&t, &r), 0);
    assert_int_equal(lstat(at("out/hl"), &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(st.st_nlink, 2);
    free(t.b);
}

static void test_bad_headers(void **state)
{
    (void)state;
    struct tb t = {0};
    tb_file(&t, "a", "aaa");
    size_t off = tb_hdr(&t, "b", '0', 0644, 3, NULL);
    tb_data(&t, "bbb", 3);
    tb_end(&t);
    t.b[off + 10] ^= 1;
    expect_fail(&t, SP_BAD_REQUEST, "checksum");

    off = tb_hdr(&t, "c", '0', 0644, 3, NULL);
    memcpy(t.b + off + 124, "0000000x003", 11);
    tb_sum(t.b + off);
    tb_data(&t, "ccc", 3);
    expect_fail(&t, SP_BAD_REQUEST, "size field is not a number");

    tb_pax(&t, "size", "12z", 3);
    tb_file(&t, "d", "x");
    expect_fail(&t, SP_BAD_REQUEST, "pax size is not a number");

    /* base-256 size, pax mtime with a fraction, garbage after the end */
    off = tb_hdr(&t, "b256", '0', 0600, 0, NULL);
    memset(t.b + off + 124, 0, 12);
    t.b[off + 124] = 0x80;
    t.b[off + 135] = 5;
    tb_sum(t.b + off);
    tb_data(&t, "hello", 5);
    tb_pax(&t, "mtime", "1500000000.25", 13);
    tb_file(&t, "frac", "f");
    tb_end(&t);
    tb_put(&t, "garbage after the end", 21);
    struct run r;
    assert_int_equal(run_tb(&t, &r), 0);
    struct stat st;
    assert_int_equal(stat(at("out/b256"), &st), 0);
    assert_int_equal(st.st_size, 5);
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(st.st_mtim.tv_sec, 1234567890);
    assert_int_equal(stat(at("out/frac"), &st), 0);
    assert_int_equal(st.st_mtim.tv_sec, 1500000000);
    assert_int_equal(st.st_mtim.tv_nsec, 250000000);
    free(t.b);

    /* not gzip at all */
    assert_int_equal(extract_buf((const unsigned char *)"not gzip data here", 18, 1, 0, NULL,
                                 (uid_t)-1, (gid_t)-1, &r),
                     -1);
    assert_non_null(strstr(r.err.msg, "gzip"));
}

static size_t gzip_buf(const unsigned char *in, size_t n, unsigned char **out)
{
    z_stream z = {0};
    assert_int_equal(deflateInit2(&z, 6, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY), Z_OK);
    size_t cap = deflateBound(&z, n) + 64;
    *out = malloc(cap);
    z.next_in = (Bytef *)(uintptr_t)in;
    z.avail_in = (uInt)n;
    z.next_out = *out;
    z.avail_out = (uInt)cap;
    assert_int_equal(deflate(&z, Z_FINISH), Z_STREAM_END);
    size_t len = cap - z.avail_out;
    deflateEnd(&z);
    return len;
}

static void test_truncated(void **state)
{
    (void)state;
    struct tb t = {0};
    char big[1000];
    memset(big, 'q', sizeof big);
    tb_hdr(&t, "a", '0', 0644, sizeof big, NULL);
    tb_data(&t, big, sizeof big);   /* header 0, data 512..1512, pad to 1536 */
    tb_file(&t, "b", "0123456789"); /* header 1536, data 2048, pad to 2560 */
    size_t no_end = t.len;
    tb_end(&t);
    static const struct {
        size_t cut;
        bool ok;
    } cuts[] = {{0, true},     {300, false}, {512, false},  {1000, false},
                {1520, false}, {1536, true}, {1700, false}, {2300, false},
                {2560, true},  {3072, true}, {3584, true}};
    struct run r;
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        int rc = extract_buf(t.b, cuts[i].cut, 0, 0, NULL, (uid_t)-1, (gid_t)-1, &r);
        if ((rc == 0) != cuts[i].ok)
            fail_msg("cut at %zu: rc %d (%s)", cuts[i].cut, rc, r.err.msg);
        if (!cuts[i].ok)
            assert_non_null(strstr(r.err.msg, "truncated"));
    }
    /* gzip: cut in the middle, and cut in the trailer of an archive with
     * no end blocks; an archive that ended may lose its trailer */
    unsigned char *gz;
    size_t gzlen = gzip_buf(t.b, t.len, &gz);
    assert_int_equal(extract_buf(gz, gzlen / 2, 1, 0, NULL, (uid_t)-1, (gid_t)-1, &r), -1);
    assert_non_null(strstr(r.err.msg, "truncated"));
    assert_int_equal(extract_buf(gz, gzlen - 3, 1, 0, NULL, (uid_t)-1, (gid_t)-1, &r), 0);
    free(gz);
    gzlen = gzip_buf(t.b, no_end, &gz);
    assert_int_equal(extract_buf(gz, gzlen, -1, 1, NULL, (uid_t)-1, (gid_t)-1, &r), 0);
    assert_int_equal(extract_buf(gz, gzlen - 3, 1, 0, NULL, (uid_t)-1, (gid_t)-1, &r), -1);
    assert_non_null(strstr(r.err.msg, "truncated inside the gzip stream"));
    assert_int_equal(extract_buf(gz, 1, -1, 0, NULL, (uid_t)-1, (gid_t)-1, &r), -1);
    free(gz);
    free(t.b);
    /* a real archive cut mid-file */
    size_t len;
    unsigned char *b = slurp(at("gnu.tar"), &len);
    assert_int_equal(extract_buf(b, len / 2, 0, 0, NULL, (uid_t)-1, (gid_t)-1, &r), -1);
    assert_non_null(strstr(r.err.msg, "big.bin"));
    free(b);
}

static void test_limits(void **state)
{
    (void)state;
    struct run r;
    struct untar_limits lim = {.max_bytes = 1 << 20, .max_entries = 1000};
    assert_int_equal(extract_file("gnu.tar.gz", 1, 0, &lim, &r), -1);
    assert_int_equal(r.err.code, SP_TOO_LARGE);
    assert_non_null(strstr(r.err.msg, "big.bin"));
    assert_false(exists(at("out/big.bin")));
    lim = (struct untar_limits){.max_bytes = 1 << 30, .max_entries = 3};
    assert_int_equal(extract_file("pypax.tar", 0, 0, &lim, &r), -1);
    assert_int_equal(r.err.code, SP_TOO_LARGE);
    assert_non_null(strstr(r.err.msg, "more than 3 entries"));
    assert_int_equal(r.files, 3);
    /* exactly at both limits */
    lim = (struct untar_limits){.max_bytes = (3 << 20) + 28, .max_entries = 15};
    assert_int_equal(extract_file("posix.tar", 0, 0, &lim, &r), 0);
    check_tree(&r, true);
}

static void test_replace_and_modes(void **state)
{
    (void)state;
    struct tb t = {0};
    sh("echo keep > '%s'", at("target"));
    tb_hdr(&t, "f", '2', 0777, 0, at("target"));
    tb_file(&t, "f", "new content"); /* replaces the symlink, never writes through */
    tb_file(&t, "g", "old");
    tb_hdr(&t, "g", '5', 0711, 0, NULL); /* a directory replaces a file */
    tb_hdr(&t, "d/", '5', 0700, 0, NULL);
    tb_hdr(&t, "d/", '5', 0751, 0, NULL); /* the last mode wins */
    tb_file(&t, "d/in", "x");
    tb_hdr(&t, "ro", '5', 0500, 0, NULL);
    tb_file(&t, "ro/sub/file", "y"); /* missing parent made inside a read-only dir */
    tb_hdr(&t, "e", '5', 0755, 0, NULL);
    tb_file(&t, "e", "file over empty dir");
    tb_hdr(&t, "dev", '3', 0644, 0, NULL);
    tb_hdr(&t, "fifo", '6', 0644, 0, NULL);
    tb_hdr(&t, "./", '5', 0700, 0, NULL);
    tb_end(&t);
    struct run r;
    if (run_tb(&t, &r) < 0)
        fail_msg("%s", r.err.msg);
    free(t.b);
    sh("grep -qx keep '%s'", at("target"));
    sh("grep -qx 'new content' '%s'", at("out/f"));
    struct stat st;
    assert_int_equal(lstat(at("out/g"), &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0711);
    assert_int_equal(st.st_mtim.tv_sec, 1234567890);
    assert_int_equal(lstat(at("out/d"), &st), 0);
    assert_int_equal(st.st_mode & 07777, 0751);
    assert_int_equal(lstat(at("out/ro"), &st), 0);
    assert_int_equal(st.st_mode & 07777, 0500);
    assert_int_equal(lstat(at("out/ro/sub"), &st), 0);
    assert_int_equal(st.st_mode & 07777, 0755);
    assert_int_equal(lstat(at("out/e"), &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_false(exists(at("out/dev")));
    assert_false(exists(at("out/fifo")));
    assert_int_equal(lstat(at("out"), &st), 0);
    assert_int_equal(st.st_mode & 0777, 0755); /* "./" leaves the root alone */
    /* f f g g d d d/in ro ro/sub/file e e */
    assert_int_equal(r.files, 11);
}

static void test_owner(void **state)
{
    (void)state;
    if (geteuid() != 0)
        skip();
    struct tb t = {0};
    tb_file(&t, "p/q/file", "x");
    tb_hdr(&t, "p/sl", '2', 0777, 0, "q/file");
    tb_hdr(&t, "dir", '5', 0755, 0, NULL);
    tb_end(&t);
    struct run r;
    assert_int_equal(extract_buf(t.b, t.len, 0, 0, NULL, 1234, 5678, &r), 0);
    free(t.b);
    const char *paths[] = {"p", "p/q", "p/q/file", "p/sl", "dir"};
    for (size_t i = 0; i < 5; i++) {
        struct stat st;
        assert_int_equal(lstat(at("out/%s", paths[i]), &st), 0);
        assert_int_equal(st.st_uid, 1234);
        assert_int_equal(st.st_gid, 5678);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_formats),           cmocka_unit_test(test_ustar_prefix),
        cmocka_unit_test(test_hostile_names),     cmocka_unit_test(test_symlink_escape),
        cmocka_unit_test(test_hardlink_escape),   cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_truncated),         cmocka_unit_test(test_limits),
        cmocka_unit_test(test_replace_and_modes), cmocka_unit_test(test_owner),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
