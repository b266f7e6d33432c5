/* extents.c: which parts of a file hold data, asked of the file system.
 *
 * Design: lseek(SEEK_DATA) finds the next data byte at or after a position,
 * lseek(SEEK_HOLE) the end of that data run. Walking a range costs two
 * syscalls per data extent and nothing per hole byte, so the caller asks per
 * work range (nbdcopy uses 128 MiB) and never maps a whole multi-TiB file up
 * front. File systems without SEEK_DATA (EINVAL/ENOTSUP... or older kernels)
 * are answered with "all data": correct, only slower.
 *
 * Cost: O(number of extents in the range) syscalls; no allocation.
 */
#include "extents.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

static int push(struct bj_extent *out, size_t max, size_t *n, uint64_t off, uint64_t len,
                uint32_t flags)
{
    if (len == 0)
        return 0;
    if (*n > 0 && out[*n - 1].flags == flags && out[*n - 1].offset + out[*n - 1].length == off) {
        out[*n - 1].length += len;
        return 0;
    }
    if (*n == max)
        return 1; /* full */
    out[*n].offset = off;
    out[*n].length = len;
    out[*n].flags = flags;
    (*n)++;
    return 0;
}

int bj_extents(int fd, uint64_t offset, uint64_t length,
               struct bj_extent *out, size_t max, size_t *n_out, uint64_t *next_out)
{
    struct stat st;
    size_t n = 0;
    uint64_t end, pos;

    if (!out || !n_out || !next_out || max == 0)
        return -EINVAL;
    *n_out = 0;
    *next_out = offset;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISDIR(st.st_mode))
        return -EISDIR;
    if (offset > UINT64_MAX - length)
        return -EINVAL;
    end = offset + length;
    if (S_ISREG(st.st_mode) && end > (uint64_t)st.st_size)
        end = (uint64_t)st.st_size;
    if (offset >= end) { /* all past EOF: one hole (max >= 1: room for it) */
        (void)push(out, max, &n, offset, length, 0);
        *n_out = n;
        *next_out = offset + length;
        return 0;
    }
    pos = offset;
    while (pos < end) {
        off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) {         /* no data after pos: hole to the end */
                if (push(out, max, &n, pos, end - pos, 0))
                    break;
                pos = end;
                continue;
            }
            if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
                if (push(out, max, &n, pos, end - pos, BJ_EXTENT_DATA))
                    break;
                pos = end;
                continue;
            }
            return -errno;
        }
        uint64_t data = (uint64_t)d;
        if (data > end)
            data = end;
        if (data > pos) {
            if (push(out, max, &n, pos, data - pos, 0))
                break;
            pos = data;
            if (pos >= end)
                break;
        }
        off_t h = lseek(fd, (off_t)pos, SEEK_HOLE);
        if (h < 0)
            return -errno;
        uint64_t hole = (uint64_t)h;
        if (hole > end || hole <= pos)
            hole = end;
        if (push(out, max, &n, pos, hole - pos, BJ_EXTENT_DATA))
            break;
        pos = hole;
    }
    *n_out = n;
    /* Beyond the file's end the range reads as a hole: report it as covered. */
    *next_out = (pos >= end) ? offset + length : pos;
    if (pos >= end && end < offset + length) {
        /* Past EOF: describe it as a hole if there is room, else resume there. */
        if (push(out, max, &n, end, offset + length - end, 0))
            *next_out = end;
        *n_out = n;
    }
    return 0;
}
