/* Whole-buffer reads and writes on descriptors, and one-shot small files
 * (/proc and cgroup control files) (fdio.c). */
#ifndef SLOT_FDIO_H
#define SLOT_FDIO_H

#include <stddef.h>
#include <sys/types.h>

/* All n bytes, retrying short transfers and EINTR; -1 with errno (EIO for
 * an early EOF or a zero-byte write). */
int fd_write_all(int fd, const void *p, size_t n);
int fd_read_all(int fd, void *p, size_t n);
/* One sendmsg of len bytes with nfds (<= 8) descriptors as SCM_RIGHTS,
 * retrying EINTR, without SIGPIPE: bytes sent, or -1 with errno. */
ssize_t fd_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* Write s to an existing file in one write(2), as control files want. */
int file_write_str(const char *path, const char *s);
/* Read up to cap-1 bytes of a small file, NUL-terminated. */
int file_read_str(const char *path, char *buf, size_t cap);

#endif
