#ifndef BJ_COMPRESS_H
#define BJ_COMPRESS_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
/* out_len[i] of a cluster that is all zero bytes (nothing compressed). */
#define BJ_DEFLATE_ZERO 4294967295

/* The deflate codecs: zlib (always built in) and ISA-L's igzip (where
 * libisal-dev was found at build time). */
#define BJ_CODEC_ZLIB 0
#define BJ_CODEC_ISAL 1

/* A bit mask of the codecs built in: 1 << BJ_CODEC_*. */
int bj_deflate_codecs(void);

/* Compress n clusters of cs bytes, in[i*cs .. i*cs+cs) (the last one `last`
 * bytes long, 1 <= last <= cs, compressed as if padded with zeroes to cs),
 * each into its own raw deflate stream (no zlib header) with `codec` at
 * its `level` (zlib: -1..9; ISA-L: 0..3) with a window of 2^window_bits
 * bytes (9..15: no match reaches further back; QEMU's qcow2 inflates with
 * 12, larger windows are unreadable to it), on `threads` threads (the
 * caller's included; at most one per cluster).
 * Cluster i's stream goes to out[i*cs ..), its length to out_len[i]:
 * BJ_DEFLATE_ZERO for an all-zero cluster, 0 when the stream would be
 * longer than `limit` bytes (limit <= cs: store that cluster plain).
 * Returns 0, -EINVAL (bad arguments), -EOPNOTSUPP (codec not built in),
 * -ENOMEM (codec state or threads) or -EIO (the codec failed). */
int bj_deflate_clusters(const uint8_t *in, size_t n, size_t cs, size_t last, uint8_t *out,
                        uint32_t *out_len, size_t limit, int codec, int level,
                        int window_bits, int threads);
/* cdef-end */

#endif
