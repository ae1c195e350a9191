/* Error codes of the contract and the errno mapping. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "slotproto.h"

static const char *const code_names[SP_CODE_COUNT] = {
    [SP_OK] = "ok",
    [SP_BAD_REQUEST] = "bad_request",
    [SP_UNKNOWN_OP] = "unknown_op",
    [SP_UNAUTHORIZED] = "unauthorized",
    [SP_UNKNOWN_SLOT] = "unknown_slot",
    [SP_SLOT_BUSY] = "slot_busy",
    [SP_NOT_LEASED] = "not_leased",
    [SP_PATH_ESCAPE] = "path_escape",
    [SP_NOT_FOUND] = "not_found",
    [SP_EXISTS] = "exists",
    [SP_TOO_LARGE] = "too_large",
    [SP_TIMEOUT] = "timeout",
    [SP_CANCELLED] = "cancelled",
    [SP_ISOLATION_UNAVAILABLE] = "isolation_unavailable",
    [SP_AGENT_LOST] = "agent_lost",
    [SP_NO_CAPACITY] = "no_capacity",
    [SP_INTERNAL] = "internal",
};

const char *sp_code_name(enum sp_code code)
{
    return (unsigned)code < SP_CODE_COUNT ? code_names[code] : "internal";
}

int sp_code_from_name(const char *s, size_t n)
{
    for (int i = 1; i < SP_CODE_COUNT; i++)
        if (strlen(code_names[i]) == n && memcmp(code_names[i], s, n) == 0)
            return i;
    return -1;
}

int sp_errf(struct sp_err *e, enum sp_code code, const char *fmt, ...)
{
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int sp_err_errno(struct sp_err *e, int errnum, const char *what)
{
    enum sp_code c;
    switch (errnum) {
    case ENOENT:
    case ENOTDIR: c = SP_NOT_FOUND; break;
    case EEXIST:
    case ENOTEMPTY: c = SP_EXISTS; break;
    case EXDEV:
    case ELOOP: c = SP_PATH_ESCAPE; break;
    case EFBIG:
    case ENOSPC:
    case EDQUOT:
    case ENAMETOOLONG:
    case E2BIG: c = SP_TOO_LARGE; break;
    case EISDIR:
    case EINVAL: c = SP_BAD_REQUEST; break;
    case EACCES:
    case EPERM: c = SP_BAD_REQUEST; break;
    case ETIMEDOUT: c = SP_TIMEOUT; break;
    default: c = SP_INTERNAL; break;
    }
    return sp_errf(e, c, "%s: %s", what, strerror(errnum));
}
