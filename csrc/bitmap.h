#ifndef BJ_BITMAP_H
#define BJ_BITMAP_H
#include <stdint.h>
#include <stddef.h>

/* The dirty bitmap: one bit per granule of a disk of `size` bytes. The
 * structure, its cost and a worked example are at the top of bitmap.c.
 *
 * Conventions, for every function below:
 *  - Offsets and lengths are in BYTES of the disk. A granule is `granularity`
 *    bytes (a power of two, 512 .. 2 GiB); granule i covers
 *    [i*granularity, (i+1)*granularity), and when `size` is not a multiple
 *    of the granularity the last granule is partial (it ends at `size`).
 *  - Ranges are REJECTED, never clipped: offset > size, or offset + length >
 *    size, returns -EINVAL (a write beyond the end of the disk is a caller
 *    bug that clipping would hide). length 0 is a valid no-op.
 *  - set rounds OUT (every granule the range touches becomes dirty); reset
 *    never rounds: its range must start on a granule boundary and end on one
 *    or at `size`, else -EINVAL (rounding in or out would silently keep or
 *    lose dirt).
 *  - Return values are 0, a count or offset (>= 0), or -errno; nothing
 *    exits or aborts. A NULL bitmap is -EINVAL (size/granularity: 0).
 *  - Every function is thread-safe: each bitmap has its own mutex, so
 *    writer threads may mark while a job iterates. Each call is atomic;
 *    a sequence of calls is not (see bj_bitmap_take_dirty_area).
 *  - bj_bitmap_free must not race with any other call on the same bitmap.
 */

/* cdef-begin */
#define BJ_BITMAP_MIN_GRANULARITY 512
#define BJ_BITMAP_MAX_GRANULARITY 2147483648
/* Largest disk size accepted (2^62 bytes, so byte counts fit in int64_t). */
#define BJ_BITMAP_MAX_SIZE 4611686018427387904

struct bj_bitmap;

/* A clean bitmap for a disk of `size` bytes (0 allowed). -EINVAL for a
 * granularity that is not a power of two in [MIN, MAX] or size > MAX_SIZE,
 * -ENOMEM. */
int bj_bitmap_new(struct bj_bitmap **out, uint64_t size, uint64_t granularity);
/* A new bitmap with the same size, granularity and bits as src, taken
 * atomically (backup freezes a bitmap by copying it). */
int bj_bitmap_copy(struct bj_bitmap **out, struct bj_bitmap *src);
void bj_bitmap_free(struct bj_bitmap *b);

uint64_t bj_bitmap_size(struct bj_bitmap *b);
uint64_t bj_bitmap_granularity(struct bj_bitmap *b);

/* Mark [offset, offset+length) dirty, rounding out to granules. Returns the
 * number of granules that were clean and became dirty. */
int64_t bj_bitmap_set(struct bj_bitmap *b, uint64_t offset, uint64_t length);
/* Mark [offset, offset+length) clean; granule-aligned (end may be size).
 * Returns the number of granules that were dirty and became clean. */
int64_t bj_bitmap_reset(struct bj_bitmap *b, uint64_t offset, uint64_t length);
/* 1 if the granule holding byte `offset` is dirty, 0 if clean; offset must
 * be < size. */
int bj_bitmap_test(struct bj_bitmap *b, uint64_t offset);

/* Number of dirty granules. */
int64_t bj_bitmap_count(struct bj_bitmap *b);
/* Dirty bytes: dirty granules * granularity, except that a dirty partial
 * last granule counts only its bytes below size. Always <= size. */
int64_t bj_bitmap_dirty_bytes(struct bj_bitmap *b);

/* The first dirty (resp. clean) byte at or after offset: offset itself if
 * its granule is dirty (clean), else the start of the next such granule.
 * -ENOENT if there is none before size; -EINVAL if offset > size. */
int64_t bj_bitmap_next_dirty(struct bj_bitmap *b, uint64_t offset);
int64_t bj_bitmap_next_clean(struct bj_bitmap *b, uint64_t offset);
/* The first dirty area at or after offset: *start = next_dirty(offset),
 * *length = bytes to the end of its run of dirty granules, at most max_len
 * and never past size. Returns 1 if found, 0 if not (outputs set to 0),
 * -EINVAL for offset > size or max_len == 0. With offset and max_len
 * granule multiples, the area is one that bj_bitmap_reset accepts. */
int bj_bitmap_next_dirty_area(struct bj_bitmap *b, uint64_t offset, uint64_t max_len,
                              uint64_t *start, uint64_t *length);
/* next_dirty_area and reset of that area as one atomic step, for a job that
 * copies what it takes (a write racing with the copy re-dirties the area,
 * and is never lost). offset must be granule-aligned (or size), max_len is
 * rounded down to granules and must be >= granularity. Returns 1/0/-errno. */
int bj_bitmap_take_dirty_area(struct bj_bitmap *b, uint64_t offset, uint64_t max_len,
                              uint64_t *start, uint64_t *length);

/* dst |= src (merge) and dst &= ~src (subtract). Same size and granularity,
 * else -EINVAL. Returns the number of granules of dst that changed.
 * dst == src is allowed. */
int64_t bj_bitmap_merge(struct bj_bitmap *dst, struct bj_bitmap *src);
int64_t bj_bitmap_subtract(struct bj_bitmap *dst, struct bj_bitmap *src);

/* All clean / all dirty. */
int bj_bitmap_clear(struct bj_bitmap *b);
int bj_bitmap_set_all(struct bj_bitmap *b);
/* Change the disk size (image resize). Growing adds clean granules (a dirty
 * partial last granule stays dirty and now covers more bytes); shrinking
 * drops the granules past the new end. On -ENOMEM nothing changed. */
int bj_bitmap_resize(struct bj_bitmap *b, uint64_t size);

/* Serialization in the on-disk order of qcow2 persistent bitmaps: byte k,
 * bit j (least significant first) is granule 8k+j of the range; padding bits
 * after the last granule of the disk are 0 (ignored by deserialize).
 * A range [offset, offset+length) must start on a multiple of
 * 8*granularity (whole bytes of the stream) and end on one; either end
 * may also be size.
 * serialized_size returns the bytes the range takes, ceil(granules/8).
 * serialize writes them to buf and returns the count (-ENOBUFS if buf_len
 * is smaller); deserialize replaces the range's bits with buf's (any dirt
 * in the range is overwritten). Both keep the index and count exact, so
 * no "finish" step is needed. */
int64_t bj_bitmap_serialized_size(struct bj_bitmap *b, uint64_t offset, uint64_t length);
int64_t bj_bitmap_serialize(struct bj_bitmap *b, uint64_t offset, uint64_t length,
                            void *buf, size_t buf_len);
int64_t bj_bitmap_deserialize(struct bj_bitmap *b, uint64_t offset, uint64_t length,
                              const void *buf, size_t buf_len);
/* cdef-end */

#endif
