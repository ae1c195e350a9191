/* The seam between the trainer API's transport (api_conn.c: listeners,
 * connections, TLS, frames in and out) and its ops (api.c). */
#ifndef CTL_API_H
#define CTL_API_H

#include <stdint.h>

struct ctl;
struct tconn;

/* One request frame of t (data, len: the frame's msgpack body): parsed,
 * checked against t's authentication, and handed to its op; errors are
 * answered on t. */
void api_dispatch(struct ctl *c, struct tconn *t, const char *data, uint32_t len);

#endif
