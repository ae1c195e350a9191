/* untar.c: streaming tar extraction beneath a directory. Input passes
 * through an optional zlib inflater (bounded output buffer) into a block
 * state machine: a 512-byte header (possibly split across feeds), then the
 * member's data (written to its file as it arrives, buffered when it is a
 * bounded pax / GNU long-name record, or skipped), then padding. Parents
 * are opened with openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, else a
 * component walk with O_NOFOLLOW; the last component is created by an *at
 * call that never follows it. See untar.h. */
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include "untar.h"

#define BLOCK 512
#define NAME_MAX_LEN 4096                   /* longest member name or link target */
#define LONGNAME_MAX (NAME_MAX_LEN + BLOCK) /* GNU 'L'/'K' record, NUL included */
#define PAX_MAX (1u << 20)                  /* one pax 'x' header */
#define ZBUF (64u << 10)                    /* inflate output per round */

enum state { ST_HEADER, ST_BODY, ST_PAD, ST_END };
enum body { B_FILE, B_SKIP, B_META };

struct dirmode { /* a directory's final mode and mtime, applied at the end */
    char *path;
    size_t seq;
    mode_t mode;
    struct timespec mtime;
};

struct pending { /* from 'x', 'L' and 'K' records, for the next member */
    char *path, *link;
    size_t path_len, link_len;
    bool has_size, has_mtime;
    uint64_t size;
    struct timespec mtime;
};

struct untar {
    int dirfd;
    int gzip; /* -1 until sniffed */
    unsigned char sniff[2];
    size_t nsniff;
    bool z_ready, z_end; /* z_end: the gzip member ended cleanly */
    z_stream z;
    unsigned char *zbuf;
    struct untar_limits lim;
    uid_t uid;
    gid_t gid;
    bool failed, finished;
    struct sp_err first; /* the failure every later call repeats */
    enum state st;
    enum body body;
    unsigned char hdr[BLOCK];
    size_t hlen;
    unsigned zeros;        /* consecutive zero blocks */
    uint64_t off;          /* tar bytes consumed */
    uint64_t left, pad;    /* of the current body */
    char meta_type, *meta; /* B_META: the record being read */
    size_t meta_len;
    struct pending p;
    int fd; /* the regular file being written */
    mode_t mode;
    struct timespec mtime;
    char name[256]; /* as the archive spells it, for messages */
    char path[NAME_MAX_LEN + 1], link[NAME_MAX_LEN + 1], ustar_name[258];
    struct dirmode *dirs;
    size_t ndirs, dirs_cap;
    uint64_t files, bytes;
};

__attribute__((format(printf, 4, 5))) static int member_err(struct untar *u, struct sp_err *err,
                                                            enum sp_code code, const char *fmt, ...)
{
    char what[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return sp_errf(err, code, "tar member '%.200s': %s", u->name, what);
}

static int sys_err(struct untar *u, struct sp_err *err, int e, const char *op)
{
    char what[300];
    snprintf(what, sizeof what, "tar member '%.200s': %s", u->name, op);
    return sp_err_errno(err, e, what);
}

static void set_name(struct untar *u, const char *s, size_t len)
{
    len = strnlen(s, len < sizeof u->name - 1 ? len : sizeof u->name - 1);
    memcpy(u->name, s, len);
    u->name[len] = 0;
}

/* Owner (when given) and mode of something just created; -1 with errno. */
static int own(struct untar *u, int fd, mode_t mode)
{
    if ((u->uid != (uid_t)-1 || u->gid != (gid_t)-1) && fchown(fd, u->uid, u->gid) < 0)
        return -1;
    return fchmod(fd, mode);
}

/* A header number: octal as Python's tarfile reads it (up to a NUL, spaces
 * around, empty is 0), or GNU base-256 (first byte 0x80, or 0xff: negative). */
static int field_num(const unsigned char *f, size_t w, int64_t *out)
{
    uint64_t v = f[0] == 0xff ? UINT64_MAX : 0;
    if (f[0] == 0x80 || f[0] == 0xff) {
        for (size_t i = 1; i < w; i++) {
            if ((v >> 55) != (f[0] == 0xff ? 0x1ff : 0))
                return -1; /* does not fit in 64 bits */
            v = (v << 8) | f[i];
        }
        *out = (int64_t)v;
        return 0;
    }
    char s[13] = {0}, *d, *e; /* w <= 12: at most 36 bits */
    memcpy(s, f, w);
    d = s + strspn(s, " ");
    v = strtoull(d, &e, 8);
    if ((*d && (*d < '0' || *d > '7')) || e[strspn(e, " ")])
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* ---- paths ------------------------------------------------------------ */

/* Check a name from the archive and write it to out as "a/b/c" (no empty
 * or "." components, no trailing slash); "" when it names the root. */
static int norm_path(struct untar *u, const char *raw, size_t len, char *out, const char *what,
                     struct sp_err *err)
{
    if (len == 0)
        return member_err(u, err, SP_BAD_REQUEST, "empty %s", what);
    if (memchr(raw, 0, len))
        return member_err(u, err, SP_BAD_REQUEST, "%s contains a NUL byte", what);
    if (len > NAME_MAX_LEN)
        return member_err(u, err, SP_BAD_REQUEST, "%s longer than %d bytes", what, NAME_MAX_LEN);
    if (raw[0] == '/')
        return member_err(u, err, SP_BAD_REQUEST, "absolute %s", what);
    size_t o = 0;
    for (size_t i = 0, j; i < len; i = j + 1) {
        for (j = i; j < len && raw[j] != '/';)
            j++;
        if (j - i == 2 && raw[i] == '.' && raw[i + 1] == '.')
            return member_err(u, err, SP_BAD_REQUEST, "'..' in %s", what);
        if (j == i || (j - i == 1 && raw[i] == '.'))
            continue;
        if (o)
            out[o++] = '/';
        memcpy(out + o, raw + i, j - i);
        o += j - i;
    }
    out[o] = 0;
    return 0;
}

/* Open path (normalized, not "") beneath dirfd without following any
 * symlink; with create, missing directories are made (0755). -1 with
 * errno. */
static int open_beneath(struct untar *u, char *path, bool create, int flags)
{
    struct open_how how = {.flags = (uint64_t)(flags | O_NOFOLLOW | O_CLOEXEC),
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS};
    long r = syscall(SYS_openat2, u->dirfd, path, &how, sizeof how);
    if (r >= 0)
        return (int)r;
    /* Missing parts, no openat2 (or EAGAIN, EINTR): one component at a time. */
    int cur = u->dirfd;
    for (char *s = path;;) {
        char *slash = strchr(s, '/');
        if (slash)
            *slash = 0;
        int fd = openat(cur, s, (slash ? O_PATH | O_DIRECTORY : flags) | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT && create && mkdirat(cur, s, 0755) == 0) {
            fd = openat(cur, s, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd >= 0 && own(u, fd, 0755) < 0) {
                int e = errno;
                close(fd);
                fd = -1;
                errno = e;
            }
        }
        int e = errno;
        if (slash)
            *slash = '/';
        if (cur != u->dirfd)
            close(cur);
        if (fd < 0 || !slash) {
            errno = e;
            return fd;
        }
        cur = fd;
        s = slash + 1;
    }
}

/* The directory that holds path's last component (made when missing and
 * create); *base points into path. Close with close_dir. */
static int open_parent(struct untar *u, char *path, bool create, const char **base,
                       struct sp_err *err)
{
    char *slash = strrchr(path, '/');
    *base = slash ? slash + 1 : path;
    if (!slash)
        return u->dirfd;
    *slash = 0;
    int fd = open_beneath(u, path, create, O_PATH | O_DIRECTORY);
    int e = errno;
    *slash = '/';
    if (fd < 0 && (e == ELOOP || e == ENOTDIR))
        return member_err(u, err, SP_BAD_REQUEST,
                          "a parent is a symlink or not a directory (links are never followed)");
    return fd < 0 ? sys_err(u, err, e, "open parent directory") : fd;
}

static void close_dir(struct untar *u, int fd)
{
    if (fd >= 0 && fd != u->dirfd)
        close(fd);
}

/* ---- members ---------------------------------------------------------- */

static int record_dir(struct untar *u, struct sp_err *err)
{
    if (u->ndirs == u->dirs_cap) {
        struct dirmode *d = realloc(u->dirs, (u->dirs_cap * 2 + 16) * sizeof *d);
        if (!d)
            return sp_errf(err, SP_INTERNAL, "out of memory");
        u->dirs = d;
        u->dirs_cap = u->dirs_cap * 2 + 16;
    }
    char *p = strdup(u->path);
    if (!p)
        return sp_errf(err, SP_INTERNAL, "out of memory");
    u->dirs[u->ndirs] = (struct dirmode){p, u->ndirs, u->mode, u->mtime};
    u->ndirs++;
    return 0;
}

/* Create member type ('0' '5' '2' '1') as base in at, replacing what an
 * earlier member left there (a directory only when empty, and a directory
 * over a directory stays). A regular file is left open in u->fd. */
static int create(struct untar *u, char type, int at, const char *base, struct sp_err *err)
{
    struct stat st;
    bool there = fstatat(at, base, &st, AT_SYMLINK_NOFOLLOW) == 0;
    if (!there && errno != ENOENT)
        return sys_err(u, err, errno, "stat");
    bool keep = there && type == '5' && S_ISDIR(st.st_mode);
    if (there && !keep && unlinkat(at, base, S_ISDIR(st.st_mode) ? AT_REMOVEDIR : 0) < 0)
        return sys_err(u, err, errno, "replace an earlier member");
    if (type == '2') {
        struct timespec ts[2] = {{.tv_nsec = UTIME_OMIT}, u->mtime};
        if (symlinkat(u->link, at, base) < 0)
            return sys_err(u, err, errno, "symlink");
        if ((u->uid != (uid_t)-1 || u->gid != (gid_t)-1) &&
            fchownat(at, base, u->uid, u->gid, AT_SYMLINK_NOFOLLOW) < 0)
            return sys_err(u, err, errno, "chown symlink");
        return utimensat(at, base, ts, AT_SYMLINK_NOFOLLOW) < 0 ? sys_err(u, err, errno, "utimes")
                                                                : 0;
    }
    if (type == '1') {
        const char *tbase;
        int tat = open_parent(u, u->link, false, &tbase, err);
        if (tat < 0)
            return -1;
        int r = linkat(tat, tbase, at, base, 0); /* 0: a symlink is linked, not followed */
        int e = errno;
        close_dir(u, tat);
        return r < 0 ? sys_err(u, err, e, "hard link") : 0;
    }
    if (type == '5' && !keep && mkdirat(at, base, 0700) < 0)
        return sys_err(u, err, errno, "mkdir");
    int fd = type == '5'
                 ? openat(at, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                 : openat(at, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return sys_err(u, err, errno, "create");
    /* A directory stays writable and searchable until untar_finish. */
    if (own(u, fd, type == '5' ? u->mode | 0700 : u->mode) < 0) {
        int e = errno;
        close(fd);
        return sys_err(u, err, e, "chown/chmod");
    }
    if (type != '5') {
        u->fd = fd;
        return 0;
    }
    close(fd);
    return record_dir(u, err);
}

static int pax_parse(struct untar *u, char *b, size_t len, struct sp_err *err)
{
    for (size_t pos = 0, n; pos < len && b[pos]; pos += n) {
        size_t i = pos;
        for (n = 0; i < len && b[i] >= '0' && b[i] <= '9' && n <= len; i++)
            n = n * 10 + (size_t)(b[i] - '0');
        if (i == pos || i >= len || b[i] != ' ' || n < i - pos + 3 || n > len - pos ||
            b[pos + n - 1] != '\n')
            return member_err(u, err, SP_BAD_REQUEST, "malformed pax header");
        char *key = b + i + 1, *end = b + pos + n - 1, *val = memchr(key, '=', (size_t)(end - key));
        if (!val)
            return member_err(u, err, SP_BAD_REQUEST, "malformed pax record");
        *val++ = 0;
        *end = 0; /* key and value are strings now (the value may hold NULs) */
        size_t vlen = (size_t)(end - val);
        char *e = val, **dst = NULL;
        bool digit = *val >= '0' && *val <= '9';
        errno = 0;
        if (strcmp(key, "path") == 0 || strcmp(key, "linkpath") == 0) {
            dst = key[0] == 'p' ? &u->p.path : &u->p.link;
            free(*dst);
            if (!(*dst = malloc(vlen + 1)))
                return sp_errf(err, SP_INTERNAL, "out of memory");
            memcpy(*dst, val, vlen + 1);
            *(key[0] == 'p' ? &u->p.path_len : &u->p.link_len) = vlen;
        } else if (strcmp(key, "size") == 0) {
            u->p.size = strtoull(val, &e, 10);
            if (!digit || *e || errno)
                return member_err(u, err, SP_BAD_REQUEST, "pax size is not a number");
            u->p.has_size = true;
        } else if (strcmp(key, "mtime") == 0) {
            bool neg = *val == '-';
            long long sec = strtoll(val, &e, 10);
            long ns = 0, scale = 100000000;
            for (e += *e == '.'; *e >= '0' && *e <= '9'; e++, scale /= 10)
                ns += (*e - '0') * scale;
            if (!(digit || (neg && val[1] >= '0' && val[1] <= '9')) || *e || errno)
                return member_err(u, err, SP_BAD_REQUEST, "pax mtime is not a number");
            if (neg && ns) /* -1.25 is -2 s + 0.75 s */
                sec--, ns = 1000000000 - ns;
            u->p.mtime = (struct timespec){(time_t)sec, ns};
            u->p.has_mtime = true;
        }
    }
    return 0;
}

static int body_done(struct untar *u, struct sp_err *err)
{
    struct timespec ts[2] = {{.tv_nsec = UTIME_OMIT}, u->mtime};
    int rc = 0, fd = u->fd;
    u->st = u->pad ? ST_PAD : ST_HEADER;
    if (u->body == B_FILE) {
        u->fd = -1;
        rc = futimens(fd, ts) < 0 ? sys_err(u, err, errno, "set mtime") : 0;
        return close(fd) < 0 && rc == 0 ? sys_err(u, err, errno, "close") : rc;
    }
    if (u->body != B_META)
        return 0;
    char *m = u->meta;
    u->meta = NULL;
    if (u->meta_type == 'x') {
        rc = pax_parse(u, m, u->meta_len, err);
        free(m);
    } else {
        bool l = u->meta_type == 'L';
        free(l ? u->p.path : u->p.link);
        *(l ? &u->p.path : &u->p.link) = m;
        *(l ? &u->p.path_len : &u->p.link_len) = strnlen(m, u->meta_len);
    }
    return rc;
}

static int begin_body(struct untar *u, enum body kind, uint64_t size, struct sp_err *err)
{
    u->body = kind;
    u->left = size;
    u->pad = (BLOCK - size % BLOCK) % BLOCK;
    u->st = ST_BODY;
    return size ? 0 : body_done(u, err);
}

/* A real member, pending records applied. */
static int member(struct untar *u, char type, const char *raw, size_t raw_len, const char *lraw,
                  size_t lraw_len, uint64_t size, struct sp_err *err)
{
    bool reg = type == '0' || type == '\0' || type == '7';
    if (type == '\0' && raw_len > 0 && raw[raw_len - 1] == '/')
        type = '5', reg = false;      /* old tar: a directory */
    if (!reg && !strchr("125", type)) /* devices, fifos, unknown: skipped */
        return begin_body(u, B_SKIP, strchr("346", type) ? 0 : size, err);
    if (norm_path(u, raw, raw_len, u->path, "name", err) < 0)
        return -1;
    if (!u->path[0] && type == '5') /* "./": the root, which the caller owns */
        return begin_body(u, B_SKIP, 0, err);
    if (!u->path[0])
        return member_err(u, err, SP_BAD_REQUEST, "name is the extraction root");
    if (u->files >= u->lim.max_entries)
        return member_err(u, err, SP_TOO_LARGE, "more than %llu entries",
                          (unsigned long long)u->lim.max_entries);
    if (reg && size > u->lim.max_bytes - u->bytes)
        return member_err(u, err, SP_TOO_LARGE, "%llu bytes exceed max_bytes (%llu in all)",
                          (unsigned long long)size, (unsigned long long)u->lim.max_bytes);
    if (type == '1') {
        if (norm_path(u, lraw, lraw_len, u->link, "link target", err) < 0)
            return -1;
        if (!u->link[0])
            return member_err(u, err, SP_BAD_REQUEST, "hard link to the extraction root");
        if (strcmp(u->link, u->path) == 0)
            return begin_body(u, B_SKIP, 0, err); /* to itself: already there */
    } else if (type == '2') {
        if (lraw_len == 0 || lraw_len > NAME_MAX_LEN || memchr(lraw, 0, lraw_len))
            return member_err(u, err, SP_BAD_REQUEST, "symlink target empty, too long or has NUL");
        memcpy(u->link, lraw, lraw_len);
        u->link[lraw_len] = 0;
    }
    const char *base;
    int at = open_parent(u, u->path, true, &base, err);
    if (at < 0)
        return -1;
    int rc = create(u, reg ? '0' : type, at, base, err);
    close_dir(u, at);
    if (rc < 0)
        return -1;
    u->files++;
    return begin_body(u, reg ? B_FILE : B_SKIP, reg ? size : 0, err);
}

static int on_header(struct untar *u, struct sp_err *err)
{
    static const unsigned char zero[BLOCK];
    const unsigned char *h = u->hdr;
    if (memcmp(h, zero, BLOCK) == 0) {
        u->st = ++u->zeros == 2 ? ST_END : ST_HEADER;
        return 0;
    }
    u->zeros = 0;
    set_name(u, u->p.path ? u->p.path : (const char *)h, u->p.path ? u->p.path_len : 100);
    int64_t sum, size, mtime, mode, usum = 0, ssum = 0;
    for (size_t i = 0; i < BLOCK; i++) {
        unsigned char c = i >= 148 && i < 156 ? ' ' : h[i];
        usum += c;
        ssum += (signed char)c;
    }
    if (field_num(h + 148, 8, &sum) < 0 || (sum != usum && sum != ssum))
        return member_err(u, err, SP_BAD_REQUEST, "header checksum mismatch at offset %llu",
                          (unsigned long long)(u->off - BLOCK));
    if (field_num(h + 124, 12, &size) < 0 || size < 0)
        return member_err(u, err, SP_BAD_REQUEST, "size field is not a number");
    if (field_num(h + 136, 12, &mtime) < 0 || field_num(h + 100, 8, &mode) < 0)
        return member_err(u, err, SP_BAD_REQUEST, "mode or mtime field is not a number");
    char type = (char)h[156];
    if (type == 'g') /* global pax header: ignored */
        return begin_body(u, B_SKIP, (uint64_t)size, err);
    if (type == 'x' || type == 'L' || type == 'K') {
        uint64_t cap = type == 'x' ? PAX_MAX : LONGNAME_MAX;
        if ((uint64_t)size > cap)
            return member_err(u, err, SP_TOO_LARGE, "%c record of %lld bytes (limit %llu)", type,
                              (long long)size, (unsigned long long)cap);
        if (!(u->meta = malloc((size_t)size + 1)))
            return sp_errf(err, SP_INTERNAL, "out of memory");
        u->meta[size] = 0;
        u->meta_len = 0;
        u->meta_type = type;
        return begin_body(u, B_META, (uint64_t)size, err);
    }
    const char *name = (const char *)h, *lname = (const char *)h + 157;
    size_t name_len = strnlen(name, 100), lname_len = strnlen(lname, 100);
    if (memcmp(h + 257, "ustar", 6) == 0 && h[345]) { /* POSIX ustar: prefix/name */
        size_t pl = strnlen((const char *)h + 345, 155);
        memcpy(u->ustar_name, h + 345, pl);
        u->ustar_name[pl] = '/';
        memcpy(u->ustar_name + pl + 1, name, name_len);
        name = u->ustar_name;
        name_len += pl + 1;
        if (!u->p.path)
            set_name(u, name, name_len);
    }
    if (u->p.path)
        name = u->p.path, name_len = u->p.path_len;
    if (u->p.link)
        lname = u->p.link, lname_len = u->p.link_len;
    u->mode = (mode_t)mode & 0777; /* never setuid, setgid or sticky */
    u->mtime = u->p.has_mtime ? u->p.mtime : (struct timespec){(time_t)mtime, 0};
    int rc = member(u, type, name, name_len, lname, lname_len,
                    u->p.has_size ? u->p.size : (uint64_t)size, err);
    free(u->p.path);
    free(u->p.link);
    memset(&u->p, 0, sizeof u->p);
    return rc;
}

/* The tar stream itself, in pieces of any size. */
static int tar_input(struct untar *u, const unsigned char *p, size_t n, struct sp_err *err)
{
    while (n > 0 && u->st != ST_END) {
        if (u->st == ST_HEADER) {
            size_t take = BLOCK - u->hlen < n ? BLOCK - u->hlen : n;
            memcpy(u->hdr + u->hlen, p, take);
            u->hlen += take;
            u->off += take;
            p += take;
            n -= take;
            if (u->hlen == BLOCK && (u->hlen = 0, on_header(u, err) < 0))
                return -1;
            continue;
        }
        uint64_t *want = u->st == ST_BODY ? &u->left : &u->pad;
        size_t take = *want < n ? (size_t)*want : n;
        if (u->st == ST_BODY && u->body == B_FILE) {
            for (size_t done = 0; done < take;) {
                ssize_t w = write(u->fd, p + done, take - done);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return sys_err(u, err, w < 0 ? errno : EIO, "write");
                done += (size_t)w;
            }
            u->bytes += take;
        } else if (u->st == ST_BODY && u->body == B_META) {
            memcpy(u->meta + u->meta_len, p, take);
            u->meta_len += take;
        }
        u->off += take;
        p += take;
        n -= take;
        if ((*want -= take) == 0 && u->st == ST_PAD)
            u->st = ST_HEADER;
        else if (u->left == 0 && u->st == ST_BODY && body_done(u, err) < 0)
            return -1;
    }
    return 0;
}

static int gz_start(struct untar *u, struct sp_err *err)
{
    u->gzip = 1;
    u->zbuf = malloc(ZBUF);
    u->z_ready = u->zbuf && inflateInit2(&u->z, 15 + 16) == Z_OK; /* gzip only */
    return u->z_ready ? 0 : sp_errf(err, SP_INTERNAL, "cannot start inflate");
}

static int input(struct untar *u, const unsigned char *p, size_t n, struct sp_err *err)
{
    if (!u->gzip)
        return tar_input(u, p, n, err);
    while (n > 0 && u->st != ST_END) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        u->z.next_in = (Bytef *)(uintptr_t)p;
        u->z.avail_in = chunk;
        do {
            if (u->z_end && u->z.avail_in == 0)
                break;
            if (u->z_end) /* concatenated gzip members */
                inflateReset(&u->z);
            u->z.next_out = u->zbuf;
            u->z.avail_out = ZBUF;
            int zr = inflate(&u->z, Z_NO_FLUSH);
            if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR)
                return sp_errf(err, SP_BAD_REQUEST, "gzip data is corrupt: %s",
                               u->z.msg ? u->z.msg : "inflate failed");
            u->z_end = zr == Z_STREAM_END;
            if (tar_input(u, u->zbuf, ZBUF - u->z.avail_out, err) < 0)
                return -1;
        } while (u->st != ST_END && (u->z.avail_in > 0 || u->z.avail_out == 0));
        p += chunk;
        n -= chunk;
    }
    return 0;
}

/* ---- API -------------------------------------------------------------- */

struct untar *untar_new(int dirfd, int gzip, const struct untar_limits *lim, uid_t uid, gid_t gid,
                        struct sp_err *err)
{
    struct untar *u = calloc(1, sizeof *u);
    if (!u) {
        sp_errf(err, SP_INTERNAL, "out of memory");
        return NULL;
    }
    u->dirfd = dirfd;
    u->fd = -1;
    u->gzip = gzip < 0 ? -1 : 0;
    u->lim = lim ? *lim : (struct untar_limits){UINT64_MAX, UINT64_MAX};
    u->uid = uid;
    u->gid = gid;
    if (gzip > 0 && gz_start(u, err) < 0) {
        untar_free(u);
        return NULL;
    }
    return u;
}

/* rc < 0: remember the failure, so every later call repeats it. */
static int latch(struct untar *u, int rc, struct sp_err *err)
{
    if (rc < 0) {
        u->failed = true;
        u->first = *err;
    }
    return rc;
}

int untar_feed(struct untar *u, const void *data, size_t len, struct sp_err *err)
{
    if (u->failed || u->finished) {
        *err = u->first;
        return u->failed ? -1 : sp_errf(err, SP_INTERNAL, "untar_feed after untar_finish");
    }
    const unsigned char *p = data;
    int rc = 0;
    if (u->gzip < 0) {
        for (; len > 0 && u->nsniff < 2; len--)
            u->sniff[u->nsniff++] = *p++;
        if (u->nsniff < 2)
            return 0;
        u->gzip = 0;
        if (u->sniff[0] == 0x1f && u->sniff[1] == 0x8b)
            rc = gz_start(u, err);
        if (rc == 0)
            rc = input(u, u->sniff, 2, err);
    }
    return latch(u, rc == 0 ? input(u, p, len, err) : rc, err);
}

static int dir_cmp(const void *a, const void *b)
{
    const struct dirmode *x = a, *y = b;
    int c = strcmp(x->path, y->path);
    return c ? c : (x->seq > y->seq) - (x->seq < y->seq);
}

/* Directories' real modes and mtimes, children before parents (a parent
 * sorts before everything beneath it); of repeated names the last wins. */
static int apply_dirs(struct untar *u, struct sp_err *err)
{
    if (u->ndirs > 1)
        qsort(u->dirs, u->ndirs, sizeof *u->dirs, dir_cmp);
    for (size_t i = u->ndirs; i-- > 0;) {
        struct dirmode *d = &u->dirs[i];
        if (i + 1 < u->ndirs && strcmp(d->path, d[1].path) == 0)
            continue;
        set_name(u, d->path, strlen(d->path));
        int fd = open_beneath(u, d->path, false, O_RDONLY | O_DIRECTORY);
        if (fd < 0 && (errno == ENOENT || errno == ENOTDIR || errno == ELOOP))
            continue; /* replaced by a later member */
        if (fd < 0)
            return sys_err(u, err, errno, "open directory");
        struct timespec ts[2] = {{.tv_nsec = UTIME_OMIT}, d->mtime};
        int rc = fchmod(fd, d->mode) < 0 || futimens(fd, ts) < 0 ? -1 : 0;
        if (rc < 0)
            sys_err(u, err, errno, "set directory mode");
        close(fd);
        if (rc < 0)
            return -1;
    }
    return 0;
}

int untar_finish(struct untar *u, struct sp_err *err)
{
    int rc = 0;
    if (u->failed || u->finished) {
        *err = u->first;
        return u->failed ? -1 : sp_errf(err, SP_INTERNAL, "untar_finish called twice");
    }
    const char *why = u->gzip < 0 && u->nsniff == 1                  ? "after its first byte"
                      : u->st != ST_END && u->gzip == 1 && !u->z_end ? "inside the gzip stream"
                      : u->st == ST_HEADER && u->hlen                ? "inside a header"
                      : u->st == ST_BODY || u->st == ST_PAD          ? "inside a member"
                      : u->p.path || u->p.link || u->p.has_size || u->p.has_mtime
                          ? "after an extended header"
                          : NULL;
    if (why)
        rc = sp_errf(err, SP_BAD_REQUEST, "archive truncated %s (last member '%.200s')", why,
                     u->name);
    if (latch(u, rc == 0 ? apply_dirs(u, err) : rc, err) < 0)
        return -1;
    u->finished = true;
    return 0;
}

uint64_t untar_files(const struct untar *u)
{
    return u->files;
}

uint64_t untar_bytes(const struct untar *u)
{
    return u->bytes;
}

void untar_free(struct untar *u)
{
    if (!u)
        return;
    if (u->fd >= 0)
        close(u->fd);
    if (u->z_ready)
        inflateEnd(&u->z);
    free(u->zbuf);
    free(u->meta);
    free(u->p.path);
    free(u->p.link);
    for (size_t i = 0; i < u->ndirs; i++)
        free(u->dirs[i].path);
    free(u->dirs);
    free(u);
}
