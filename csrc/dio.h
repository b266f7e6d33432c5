#ifndef BJ_DIO_H
#define BJ_DIO_H
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

/* cdef-begin */
/* I/O that works on any fd, opened with O_DIRECT or not (dio.c).
 *
 * bj_dio_align(fd): 1 when fd is not O_DIRECT, else the request alignment
 * O_DIRECT needs on it, probed once per file as QEMU's file driver does
 * (BLKSSZGET on a block device, else the first of 1, 512 ... 4096 bytes a
 * read at offset 0 accepts, 1 meaning 4096) and remembered. */
uint32_t bj_dio_align(int fd);
/* Read len bytes at off into buf (any address, offset or length: an
 * unaligned request on an O_DIRECT fd goes through an aligned bounce
 * buffer). Returns the bytes read (fewer only at the end of the file) or
 * -errno. */
int64_t bj_dio_pread(int fd, void *buf, uint64_t len, uint64_t off);
/* Write all len bytes of buf at off. On an O_DIRECT fd an unaligned head or
 * tail block is read, patched and written whole (read-modify-write); a tail
 * block past the end of the file leaves the file no longer than
 * max(its size before, off + len). Returns len or -errno (*fail_off: where). */
int64_t bj_dio_pwrite(int fd, const void *buf, uint64_t len, uint64_t off, uint64_t *fail_off);
/* The same with the fd's alignment a (bj_dio_align) known: no fcntl per
 * call (the copy engine asks it once per file); an EINVAL (the fd's mode
 * switched since) goes on as bj_dio_pread/bj_dio_pwrite do. */
int64_t bj_dio_pread_a(int fd, uint32_t a, void *buf, uint64_t len, uint64_t off);
int64_t bj_dio_pwrite_a(int fd, uint32_t a, const void *buf, uint64_t len, uint64_t off,
                        uint64_t *fail_off);
/* cdef-end */

#endif
