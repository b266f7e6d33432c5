/* L2 run decoding: the worked example of qcow2.c, stops, bad arguments. */
#include "check.h"
#include "qcow2.h"

#include <errno.h>
#include <string.h>

static void put(uint8_t *t, size_t i, uint64_t e)
{
    for (int b = 0; b < 8; b++)
        t[8 * i + b] = (uint8_t)(e >> (56 - 8 * b));
}

/* bj_qcow2_map: the worked example of qcow2.c, merges, stops, a full
 * buffer, bad arguments (each entry read is checked by ASan/valgrind). */
static void test_map(void)
{
    uint8_t t[8 * 16];
    uint64_t o[4 * 8], stop;
    memset(t, 0, sizeof t);
    put(t, 0, 0x8000000000050000ull);
    put(t, 1, 0x8000000000060000ull);
    put(t, 2, 0);
    put(t, 3, 1);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x8000, 0x38000, 16, 1ull << 30, 1, o, 8, &stop), 3);
    CHECK_EQ(stop, 0x38000);
    uint64_t want[] = { 0x8000, 0x18000, BJ_MAP_DATA, 0x58000,
                        0x20000, 0x10000, BJ_MAP_UNALLOCATED, 0,
                        0x30000, 0x8000, BJ_MAP_ZERO, 0 };
    for (size_t i = 0; i < 12; i++)
        CHECK_EQ(o[i], want[i]);
    /* the table maps from table_guest on; a range outside it is refused */
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 1ull << 30, (1ull << 30) + 0x10000, (1ull << 30) + 0x20000,
                          16, 1ull << 30, 1, o, 8, &stop), 1);
    CHECK_EQ(o[0], (1ull << 30) + 0x10000);
    CHECK_EQ(o[3], 0x60000);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 1ull << 30, 0, 0x10000, 16, 1ull << 30, 1, o, 8, &stop),
             -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0, 17 * 0x10000, 16, 1ull << 30, 1, o, 8, &stop),
             -EINVAL);
    /* data not contiguous: two runs; preallocated zero clusters merge when
     * contiguous, and not with plain zero clusters */
    put(t, 1, 0x8000000000090000ull);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0, 0x20000, 16, 1ull << 30, 1, o, 8, &stop), 2);
    put(t, 4, 0x8000000000070001ull);
    put(t, 5, 0x8000000000080001ull);
    put(t, 6, 1);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x40000, 0x70000, 16, 1ull << 30, 1, o, 8, &stop), 2);
    CHECK_EQ(o[1], 0x20000);
    CHECK_EQ(o[2], BJ_MAP_ZERO);
    CHECK_EQ(o[3], 0x70000);
    CHECK_EQ(o[7], 0);
    /* an unusual entry stops the walk at its cluster: at pos, no runs */
    uint64_t bad[] = { 1ull << 62, 0x8000000000050200ull, 0x80000000F0000000ull,
                       0x8000000000050002ull, 0x80FFFFFFFFFF0000ull };
    for (size_t i = 0; i < 5; i++) {
        put(t, 8, bad[i]);
        CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x70000, 0xA0000, 16, 1ull << 30, 1, o, 8, &stop), 1);
        CHECK_EQ(stop, 0x80000);
        CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x80000, 0xA0000, 16, 1ull << 30, 1, o, 8, &stop), 0);
        CHECK_EQ(stop, 0x80000);
    }
    /* the zero flag in a version 2 image */
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x30000, 0x40000, 16, 1ull << 30, 0, o, 8, &stop), 0);
    CHECK_EQ(stop, 0x30000);
    /* a full buffer: max runs and where to go on */
    for (size_t i = 0; i < 16; i++)
        put(t, i, (i & 1) ? 1 : 0);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0, 16 * 0x10000, 16, 1ull << 30, 1, o, 8, &stop), 8);
    CHECK_EQ(stop, 8 * 0x10000);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, stop, 16 * 0x10000, 16, 1ull << 30, 1, o, 8, &stop), 8);
    CHECK_EQ(stop, 16 * 0x10000);
    /* bad arguments; an empty range */
    CHECK_EQ(bj_qcow2_map(NULL, 8, 0, 0, 1, 16, 1, 1, o, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, 7, 0, 0, 1, 16, 1, 1, o, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0, 1, 8, 1, 1, o, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 2, 1, 16, 1, 1, o, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, UINT64_MAX - 0x10000, UINT64_MAX - 1, UINT64_MAX,
                          16, 1, 1, o, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_map(t, sizeof t, 0, 0x10000, 0x10000, 16, 1, 1, o, 8, &stop), 0);
    CHECK_EQ(stop, 0x10000);
}

/* bj_qcow2_read_segs: the worked example of qcow2.c, reads left to the
 * caller (unusual entries, unallocated with a backing node, outside the
 * table, no room) while the others are mapped, a table not allocated, bad
 * arguments. */
static void test_read_segs(void)
{
    uint8_t t[8 * 16];
    uint64_t sg[4 * 8], cnt[4];
    memset(t, 0, sizeof t);
    put(t, 0, 0x8000000000050000ull);
    put(t, 2, 1);
    put(t, 3, 0x8000000000070000ull);
    put(t, 4, 0x8000000000080000ull);                  /* contiguous with 3 */
    put(t, 5, 0x4000000000090000ull);                  /* compressed */
    uint64_t rq[] = { 0x8000, 0x20000, 0x30000, 0x10000 };
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 1, 1, 7, rq, 2, sg, 8, cnt), 3);
    CHECK_EQ(cnt[0], 2);
    CHECK_EQ(cnt[1], 1);
    uint64_t want[] = { BJ_QSEG_DATA_PAD, 7, 0x58000, 0x8000,
                        BJ_QSEG_ZERO, 0, 0, 0x18000,           /* unallocated + zero merged */
                        BJ_QSEG_DATA_PAD, 7, 0x70000, 0x10000 };
    for (size_t i = 0; i < 12; i++)
        CHECK_EQ(sg[i], want[i]);
    /* contiguous data merged; a compressed entry, an unallocated cluster
     * with a backing node, a range past the table's: the caller's, and the
     * reads after them still mapped */
    uint64_t rq2[] = { 0x38000, 0x10000, 0x40000, 0x20000, 0x10000, 0x8000, 0xf8000, 0x10000 };
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 1, 0, 7, rq2, 4, sg, 8, cnt), 1);
    CHECK_EQ(cnt[0], 1);
    CHECK_EQ(sg[0], BJ_QSEG_DATA_PAD);
    CHECK_EQ(sg[2], 0x78000);
    CHECK_EQ(sg[3], 0x10000);
    CHECK_EQ(cnt[1], 0);
    CHECK_EQ(cnt[2], 0);
    CHECK_EQ(cnt[3], 0);
    /* the zero flag of a v2 image and an entry past host_limit: the caller's */
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 0, 1, 7, rq + 2, 1, sg, 8, cnt), 1);
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 0, 1, 7, rq, 1, sg, 8, cnt), 0);
    CHECK_EQ(cnt[0], 0);
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 0x58000, 1, 1, 7, rq, 1, sg, 8, cnt), 0);
    CHECK_EQ(cnt[0], 0);
    /* no room for the second read: it is the caller's, the first stays */
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 1, 1, 7, rq, 2, sg, 2, cnt), 2);
    CHECK_EQ(cnt[0], 2);
    CHECK_EQ(cnt[1], 0);
    /* a table not allocated: zeroes, or the caller's with a backing node */
    uint64_t rq3[] = { (1ull << 30) + 0x1000, 0x30000 };
    CHECK_EQ(bj_qcow2_read_segs(NULL, sizeof t, 1ull << 30, 16, 1ull << 30, 1, 1, 7, rq3, 1, sg, 8,
                                cnt), 1);
    CHECK_EQ(cnt[0], 1);
    CHECK_EQ(sg[0], BJ_QSEG_ZERO);
    CHECK_EQ(sg[3], 0x30000);
    CHECK_EQ(bj_qcow2_read_segs(NULL, sizeof t, 1ull << 30, 16, 1ull << 30, 1, 0, 7, rq3, 1, sg, 8,
                                cnt), 0);
    CHECK_EQ(cnt[0], 0);
    /* an empty read, bad arguments */
    uint64_t rq4[] = { 0, 0 };
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 1, 1, 7, rq4, 1, sg, 8, cnt), 0);
    CHECK_EQ(cnt[0], 0);
    CHECK_EQ(bj_qcow2_read_segs(t, 7, 0, 16, 1ull << 30, 1, 1, 7, rq, 1, sg, 8, cnt), -EINVAL);
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 8, 1ull << 30, 1, 1, 7, rq, 1, sg, 8, cnt), -EINVAL);
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, 0, 16, 1ull << 30, 1, 1, 7, NULL, 1, sg, 8, cnt),
             -EINVAL);
    CHECK_EQ(bj_qcow2_read_segs(t, sizeof t, UINT64_MAX - 0x10000, 16, 1ull << 30, 1, 1, 7, rq, 1,
                                sg, 8, cnt), -EINVAL);
}

int main(void)
{
    uint8_t t[8 * 16];
    struct bj_l2run r[8];
    size_t stop;
    memset(t, 0, sizeof t);
    put(t, 0, 0x8000000000050000ull);
    put(t, 1, 0x8000000000060000ull);
    put(t, 2, 0);
    put(t, 3, 1);
    long n = bj_qcow2_l2_runs(t, sizeof t, 0, 4, 16, 1ull << 30, 1, r, 8, &stop);
    CHECK_EQ(n, 3);
    CHECK_EQ(stop, 4);
    CHECK_EQ(r[0].kind, BJ_L2_DATA);
    CHECK_EQ(r[0].count, 2);
    CHECK_EQ(r[0].host, 0x50000);
    CHECK_EQ(r[1].kind, BJ_L2_UNALLOCATED);
    CHECK_EQ(r[2].kind, BJ_L2_ZERO);
    /* non-contiguous data makes two runs */
    put(t, 1, 0x8000000000090000ull);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 0, 2, 16, 1ull << 30, 1, r, 8, &stop), 2);
    /* a compressed entry stops the walk there */
    put(t, 5, 1ull << 62);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 4, 4, 16, 1ull << 30, 1, r, 8, &stop), 1);
    CHECK_EQ(stop, 5);
    /* unaligned host, beyond the limit, reserved bits, zero flag in v2 */
    uint64_t bad[] = { 0x8000000000050200ull, 0x80000000F0000000ull, 0x8000000000050002ull };
    for (size_t i = 0; i < 3; i++) {
        put(t, 6, bad[i]);
        CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 6, 1, 16, 1ull << 30, 1, r, 8, &stop), 0);
        CHECK_EQ(stop, 6);
    }
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 3, 1, 16, 1ull << 30, 0, r, 8, &stop), 0);
    CHECK_EQ(stop, 3);
    /* a full run buffer: ENOBUFS and where to resume */
    memset(t, 0, sizeof t);
    for (size_t i = 0; i < 16; i++)
        put(t, i, (i & 1) ? 1 : 0);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 0, 16, 16, 1ull << 30, 1, r, 8, &stop), -ENOBUFS);
    CHECK_EQ(stop, 8);
    /* bad arguments, odd sizes */
    CHECK_EQ(bj_qcow2_l2_runs(NULL, 8, 0, 1, 16, 1, 1, r, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_l2_runs(t, 7, 0, 1, 16, 1, 1, r, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 15, 2, 16, 1, 1, r, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 0, 1, 8, 1, 1, r, 8, &stop), -EINVAL);
    CHECK_EQ(bj_qcow2_l2_runs(t, sizeof t, 16, 0, 16, 1, 1, r, 8, &stop), 0);
    test_map();
    test_read_segs();
    printf("test_qcow2: ok\n");
    return 0;
}
