/* Tests of csrc/compress.c: each cluster inflates (with QEMU's 4 KiB
 * window) back to its bytes, zero-padded when short; an all-zero cluster is
 * reported as such, an incompressible one as 0 (store plain); the result
 * does not depend on the number of threads; bad arguments are refused. */
#include "check.h"
#include "compress.h"

#include <errno.h>
#include <string.h>
#include <zlib.h>

enum { CS = 65536, N = 9, LAST = 5000 };

static void inflate_check(const uint8_t *z, uint32_t zlen, const uint8_t *want, size_t len)
{
    static uint8_t got[CS];
    z_stream s;
    memset(&s, 0, sizeof s);
    CHECK(inflateInit2(&s, -12) == Z_OK);
    s.next_in = (Bytef *)(uintptr_t)z;
    s.avail_in = zlen;
    s.next_out = got;
    s.avail_out = CS;
    CHECK_EQ(inflate(&s, Z_FINISH), Z_STREAM_END);
    CHECK_EQ(s.total_out, CS);
    inflateEnd(&s);
    CHECK(memcmp(got, want, len) == 0);
    for (size_t k = len; k < CS; k++)
        CHECK_EQ(got[k], 0);
}

int main(void)
{
    static uint8_t in[N * CS], out[N * CS], out1[N * CS];
    uint32_t len[N], len1[N];
    uint32_t x = 12345;
    for (size_t i = 0; i < N; i++) {
        uint8_t *c = in + i * CS;
        if (i == 2) {
            memset(c, 0, CS);                      /* zero cluster */
        } else if (i == 4) {
            for (size_t k = 0; k < CS; k++) {       /* incompressible */
                x = x * 1103515245u + 12345u;
                c[k] = (uint8_t)(x >> 16);
            }
        } else {
            for (size_t k = 0; k < CS; k++)        /* text-like */
                c[k] = (uint8_t)("block job mirror "[(k + i) % 17]);
        }
    }
    for (int threads = 1; threads <= 4; threads += 3) {
        memset(out, 0xee, sizeof out);
        CHECK_EQ(bj_deflate_clusters(in, N, CS, LAST, out, len, CS - 513, 6, 12, threads), 0);
        for (size_t i = 0; i < N; i++) {
            size_t l = i + 1 == N ? LAST : CS;
            if (i == 2)
                CHECK_EQ(len[i], BJ_DEFLATE_ZERO);
            else if (i == 4)
                CHECK_EQ(len[i], 0);
            else {
                CHECK(len[i] > 0 && len[i] <= CS - 513);
                inflate_check(out + i * CS, len[i], in + i * CS, l);
            }
        }
        if (threads == 1) {
            memcpy(out1, out, sizeof out);
            memcpy(len1, len, sizeof len);
        } else {
            CHECK(memcmp(len, len1, sizeof len) == 0);
            for (size_t i = 0; i < N; i++)
                if (len[i] && len[i] != BJ_DEFLATE_ZERO)
                    CHECK(memcmp(out + i * CS, out1 + i * CS, len[i]) == 0);
        }
    }
    /* a tiny limit: nothing fits */
    CHECK_EQ(bj_deflate_clusters(in, 2, CS, CS, out, len, 4, 6, 12, 2), 0);
    CHECK_EQ(len[0], 0);
    CHECK_EQ(len[1], 0);
    CHECK_EQ(bj_deflate_clusters(in, 0, CS, CS, out, len, CS, 6, 12, 2), 0);
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, 0, out, len, CS, 6, 12, 2), -EINVAL);
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS + 1, 6, 12, 2), -EINVAL);
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, 6, 16, 2), -EINVAL);
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, 6, 12, 0), -EINVAL);
    printf("test_compress: ok\n");
    return 0;
}
