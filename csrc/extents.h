#ifndef BJ_EXTENTS_H
#define BJ_EXTENTS_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* One extent of a file: [offset, offset+length) is data (flags & BJ_EXTENT_DATA)
 * or a hole (flags == 0; reads as zeroes). */
#define BJ_EXTENT_DATA 1
struct bj_extent {
    uint64_t offset;
    uint64_t length;
    uint32_t flags;
};

/* Walk [offset, offset+length) of fd with SEEK_DATA/SEEK_HOLE and fill at most
 * max extents, in order, adjacent, covering from offset. *n_out gets the count
 * and *next_out the first offset not described (== offset+length when all was
 * covered; call again from there otherwise). A file system without
 * SEEK_DATA reports the whole range as data. The range is clipped to the
 * file size. Returns 0 or -errno. */
int bj_extents(int fd, uint64_t offset, uint64_t length,
               struct bj_extent *out, size_t max, size_t *n_out, uint64_t *next_out);
/* Which blocks of [offset, offset+length) of fd hold only zero bytes:
 * out[i] = 1 when block i (block bytes from offset + i*block; the last one
 * may be shorter) reads as zeroes, else 0; n = the number of blocks (at
 * most nout). A block's first 512 bytes are read first, the rest only when
 * that was all zero, so a block of data costs one small read. Bytes past
 * the end of the file read as zeroes. Returns 0 or -errno (-EINVAL: bad
 * arguments, nout too small). */
int bj_zero_blocks(int fd, uint64_t offset, uint64_t length, uint64_t block,
                   uint8_t *out, size_t nout);
/* cdef-end */

#endif
