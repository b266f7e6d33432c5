/* Tests of csrc/compress.c, for each codec built in (zlib; ISA-L's igzip
 * where libisal-dev is installed): each cluster inflates back to its bytes,
 * zero-padded when short, with QEMU's 4 KiB window -- inflated a little at a
 * time, so that a match reaching further back than the window fails (the
 * checker is shown to catch one made with a 32 KiB window); an all-zero
 * cluster is reported as such, an incompressible one as 0 (store plain);
 * the result does not depend on the number of threads; bad arguments and a
 * codec not built in are refused. */
#include "check.h"
#include "compress.h"

#include <errno.h>
#include <string.h>
#include <zlib.h>

enum { CS = 65536, N = 10, LAST = 5000 };

/* Inflate with a 2^wbits window, at most 256 bytes of output per call (so
 * no match can reach into output of an earlier call beyond the window):
 * Z_STREAM_END and the bytes equal, or the zlib error. */
static int inflate_strict(const uint8_t *z, uint32_t zlen, const uint8_t *want, size_t len,
                          int wbits)
{
    static uint8_t got[CS];
    z_stream s;
    memset(&s, 0, sizeof s);
    CHECK(inflateInit2(&s, -wbits) == Z_OK);
    s.next_in = (Bytef *)(uintptr_t)z;
    s.avail_in = zlen;
    int rc = Z_OK;
    while (rc == Z_OK && s.total_out < CS) {
        s.next_out = got + s.total_out;
        s.avail_out = CS - (uInt)s.total_out < 256 ? CS - (uInt)s.total_out : 256;
        rc = inflate(&s, Z_NO_FLUSH);
    }
    size_t total = s.total_out;
    inflateEnd(&s);
    if (rc != Z_STREAM_END)
        return rc == Z_OK ? Z_BUF_ERROR : rc;
    CHECK_EQ(total, CS);
    CHECK(memcmp(got, want, len) == 0);
    for (size_t k = len; k < CS; k++)
        CHECK_EQ(got[k], 0);
    return Z_STREAM_END;
}

static uint32_t x = 12345;
static uint8_t rnd8(void)
{
    x = x * 1103515245u + 12345u;
    return (uint8_t)(x >> 16);
}

int main(void)
{
    static uint8_t in[N * CS], out[N * CS], out1[N * CS];
    uint32_t len[64], len1[64];
    for (size_t i = 0; i < N; i++) {
        uint8_t *c = in + i * CS;
        if (i == 2) {
            memset(c, 0, CS);                      /* zero cluster */
        } else if (i == 4) {
            for (size_t k = 0; k < CS; k++)        /* incompressible */
                c[k] = rnd8();
        } else if (i == 6) {
            /* a 6000-byte block (half random, half text) repeated: the
             * best matches are 6000 bytes back, out of the 4 KiB window */
            for (size_t k = 0; k < 6000; k++)
                c[k] = k < 3000 ? rnd8() : (uint8_t)("stream commit "[k % 14]);
            for (size_t k = 6000; k < CS; k++)
                c[k] = c[k - 6000];
        } else {
            for (size_t k = 0; k < CS; k++)        /* text-like */
                c[k] = (uint8_t)("block job mirror "[(k + i) % 17]);
        }
    }
    /* the checker catches a stream that reaches beyond 4 KiB */
    {
        static uint8_t z[2 * CS];
        uLongf zlen = sizeof z;
        z_stream s;
        memset(&s, 0, sizeof s);
        CHECK(deflateInit2(&s, 6, Z_DEFLATED, -15, 9, Z_DEFAULT_STRATEGY) == Z_OK);
        s.next_in = in + 6 * CS;
        s.avail_in = CS;
        s.next_out = z;
        s.avail_out = (uInt)zlen;
        CHECK_EQ(deflate(&s, Z_FINISH), Z_STREAM_END);
        zlen = s.total_out;
        deflateEnd(&s);
        CHECK(zlen < CS / 4);
        CHECK_EQ(inflate_strict(z, (uint32_t)zlen, in + 6 * CS, CS, 15), Z_STREAM_END);
        CHECK_EQ(inflate_strict(z, (uint32_t)zlen, in + 6 * CS, CS, 12), Z_DATA_ERROR);
    }
    int codecs = bj_deflate_codecs();
    CHECK(codecs & (1 << BJ_CODEC_ZLIB));
    for (int codec = BJ_CODEC_ZLIB; codec <= BJ_CODEC_ISAL; codec++) {
        if (!(codecs & (1 << codec))) {
            CHECK_EQ(bj_deflate_clusters(in, N, CS, LAST, out, len, CS - 513, codec, 1, 12, 1),
                     -EOPNOTSUPP);
            printf("test_compress: codec %d not built in\n", codec);
            continue;
        }
        int level = codec == BJ_CODEC_ZLIB ? 6 : 3;
        for (int threads = 1; threads <= 4; threads += 3) {
            memset(out, 0xee, sizeof out);
            CHECK_EQ(bj_deflate_clusters(in, N, CS, LAST, out, len, CS - 513, codec, level, 12,
                                         threads), 0);
            for (size_t i = 0; i < N; i++) {
                size_t l = i + 1 == N ? LAST : CS;
                if (i == 2)
                    CHECK_EQ(len[i], BJ_DEFLATE_ZERO);
                else if (i == 4)
                    CHECK_EQ(len[i], 0);
                else {
                    CHECK(len[i] > 0 && len[i] <= CS - 513);
                    CHECK_EQ(inflate_strict(out + i * CS, len[i], in + i * CS, l, 12),
                             Z_STREAM_END);
                }
            }
            if (threads == 1) {
                memcpy(out1, out, sizeof out);
                memcpy(len1, len, sizeof len);
            } else {
                CHECK(memcmp(len, len1, N * sizeof len[0]) == 0);
                for (size_t i = 0; i < N; i++)
                    if (len[i] && len[i] != BJ_DEFLATE_ZERO)
                        CHECK(memcmp(out + i * CS, out1 + i * CS, len[i]) == 0);
            }
        }
        /* every level, small and large clusters */
        for (int lv = codec == BJ_CODEC_ZLIB ? 1 : 0; lv <= (codec == BJ_CODEC_ZLIB ? 9 : 3);
             lv++) {
            CHECK_EQ(bj_deflate_clusters(in + 6 * CS, 1, CS, CS, out, len, CS - 513, codec, lv,
                                         12, 1), 0);
            CHECK(len[0] > 0 && len[0] <= CS - 513);
            CHECK_EQ(inflate_strict(out, len[0], in + 6 * CS, CS, 12), Z_STREAM_END);
        }
        /* 4 KiB clusters: 16 of the text cluster, the random one, the repeats */
        CHECK_EQ(bj_deflate_clusters(in + 3 * CS, 48, 4096, 4096, out, len, 4096 - 513, codec,
                                     level, 12, 2), 0);
        for (size_t i = 0; i < 48; i++) {
            if (i >= 16 && i < 32) {
                CHECK_EQ(len[i], 0);
            } else if (i < 16) {
                CHECK(len[i] > 0 && len[i] <= 4096 - 513);
                z_stream s;
                static uint8_t got[4096];
                memset(&s, 0, sizeof s);
                CHECK(inflateInit2(&s, -12) == Z_OK);
                s.next_in = out + i * 4096;
                s.avail_in = len[i];
                s.next_out = got;
                s.avail_out = 4096;
                CHECK_EQ(inflate(&s, Z_FINISH), Z_STREAM_END);
                inflateEnd(&s);
                CHECK(memcmp(got, in + 3 * CS + i * 4096, 4096) == 0);
            }
        }
        /* a tiny limit: nothing fits */
        CHECK_EQ(bj_deflate_clusters(in, 2, CS, CS, out, len, 4, codec, level, 12, 2), 0);
        CHECK_EQ(len[0], 0);
        CHECK_EQ(len[1], 0);
        CHECK_EQ(bj_deflate_clusters(in, 0, CS, CS, out, len, CS, codec, level, 12, 2), 0);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, 0, out, len, CS, codec, level, 12, 2), -EINVAL);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS + 1, codec, level, 12, 2),
                 -EINVAL);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, codec, level, 16, 2), -EINVAL);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, codec, level, 12, 0), -EINVAL);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, codec, 10, 12, 1), -EINVAL);
        CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, codec, -2, 12, 1), -EINVAL);
        printf("test_compress: codec %d ok\n", codec);
    }
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, 2, 1, 12, 1), -EINVAL);
    CHECK_EQ(bj_deflate_clusters(in, 1, CS, CS, out, len, CS, -1, 1, 12, 1), -EINVAL);
    printf("test_compress: ok\n");
    return 0;
}
