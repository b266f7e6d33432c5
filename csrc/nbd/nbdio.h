/* nbdio: a thin C layer over libnbd's asynchronous API for blkjobs.
 *
 * Every call drives one handle's state machine itself (poll(2) on the
 * handle's socket) so that a stalled server costs at most ``timeout_ms`` of
 * silence: no call here can block forever. A call that returns -ETIMEDOUT
 * or a connection error may leave requests in flight on the handle (reads
 * that would still fill the caller's buffer): the caller must then close
 * the handle (nbd_close) before the buffer is reused. Every function
 * returns 0 (or a count) or -errno; nbd_get_error() has libnbd's text. */
#ifndef BJ_NBDIO_H
#define BJ_NBDIO_H

#include <stddef.h>
#include <stdint.h>
#include <libnbd.h>

/* cdef-begin */
struct nbd_handle;
struct nbd_handle *nbd_create(void);
void nbd_close(struct nbd_handle *h);
const char *nbd_get_error(void);
int nbd_get_errno(void);
int nbd_set_tls(struct nbd_handle *h, int tls);
int nbd_set_tls_certificates(struct nbd_handle *h, const char *dir);
int nbd_set_tls_verify_peer(struct nbd_handle *h, bool verify);
int nbd_add_meta_context(struct nbd_handle *h, const char *name);
int nbd_set_uri_allow_local_file(struct nbd_handle *h, bool allow);
int nbd_set_export_name(struct nbd_handle *h, const char *export_name);
int nbd_can_meta_context(struct nbd_handle *h, const char *metacontext);
int nbd_is_read_only(struct nbd_handle *h);
int nbd_can_flush(struct nbd_handle *h);
int nbd_can_fua(struct nbd_handle *h);
int nbd_can_trim(struct nbd_handle *h);
int nbd_can_zero(struct nbd_handle *h);
int nbd_can_fast_zero(struct nbd_handle *h);
int nbd_can_multi_conn(struct nbd_handle *h);
int64_t nbd_get_size(struct nbd_handle *h);
int64_t nbd_get_block_size(struct nbd_handle *h, int size_type);
int nbd_aio_is_ready(struct nbd_handle *h);
int nbd_shutdown(struct nbd_handle *h, uint32_t flags);

int bj_nbd_connect(struct nbd_handle *h, const char *uri, int timeout_ms);
int bj_nbd_rw(struct nbd_handle *h, int write, void *buf, uint64_t len, uint64_t off,
              uint64_t chunk, int depth, uint32_t flags, int timeout_ms);
int bj_nbd_cmd(struct nbd_handle *h, int op, uint64_t off, uint64_t len, uint32_t flags,
               int timeout_ms);
int64_t bj_nbd_extents(struct nbd_handle *h, uint64_t off, uint64_t len, uint32_t *out,
                       size_t max_pairs, int timeout_ms);
struct bj_nbd_copy_stats {
    uint64_t data_bytes;    /* copied as data */
    uint64_t zero_bytes;    /* found zero: skipped or written as zeroes */
    int error_side;         /* 0 none, 1 source, 2 target */
    uint64_t error_offset;
};
int bj_nbd_copy_fd(struct nbd_handle *h, int fd, int to_nbd, uint64_t off, uint64_t len,
                   uint64_t chunk, int depth, int skip_zero, int zero_flags, int timeout_ms,
                   struct bj_nbd_copy_stats *st);
/* cdef-end */

#define BJ_NBD_FLUSH 0
#define BJ_NBD_TRIM 1
#define BJ_NBD_ZERO 2

#endif
