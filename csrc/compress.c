/* Parallel cluster compression for qcow2 targets (convert -c, compressed
 * backup): one raw deflate stream per cluster, the clusters handed out to
 * the threads by an atomic counter; every cluster writes only its own slot
 * of out and out_len, so the caller reads them in order once all threads
 * are joined. No Python, no GIL: one call per chunk of clusters.
 *
 * Two deflate codecs: zlib (always there) and, where the build found it
 * (BJ_HAVE_ISAL: Debian's libisal-dev), ISA-L's igzip, several times
 * faster per byte. Both honour the window QEMU inflates with: zlib's
 * windowBits, igzip's hist_bits (its matches reach at most 2^hist_bits
 * bytes back). */
#include "compress.h"
#include "zero.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#ifdef BJ_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

struct job {
    const uint8_t *in;
    uint8_t *out;
    uint32_t *out_len;
    size_t n, cs, last, limit;
    int codec, level, window_bits;
    atomic_size_t next;
    atomic_int err;
};

/* One thread's codec state. */
struct ctx {
    z_stream zs;
    int zs_ready;
#ifdef BJ_HAVE_ISAL
    uint8_t *lvl_buf;
    uint32_t lvl_size;
#endif
    uint8_t *pad;
};

int bj_deflate_codecs(void)
{
#ifdef BJ_HAVE_ISAL
    return (1 << BJ_CODEC_ZLIB) | (1 << BJ_CODEC_ISAL);
#else
    return 1 << BJ_CODEC_ZLIB;
#endif
}

static int ctx_init(struct ctx *c, const struct job *j)
{
    memset(c, 0, sizeof *c);
    c->pad = malloc(j->cs);
    if (!c->pad)
        return -ENOMEM;
    if (j->codec == BJ_CODEC_ZLIB) {
        if (deflateInit2(&c->zs, j->level, Z_DEFLATED, -j->window_bits, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return -ENOMEM;
        c->zs_ready = 1;
        return 0;
    }
#ifdef BJ_HAVE_ISAL
    static const uint32_t sizes[] = {ISAL_DEF_LVL0_DEFAULT, ISAL_DEF_LVL1_DEFAULT,
                                     ISAL_DEF_LVL2_DEFAULT, ISAL_DEF_LVL3_DEFAULT};
    c->lvl_size = sizes[j->level];
    if (c->lvl_size) {
        c->lvl_buf = calloc(1, c->lvl_size);     /* defined bytes: valgrind */
        if (!c->lvl_buf)
            return -ENOMEM;
    }
    return 0;
#else
    return -EOPNOTSUPP;
#endif
}

static void ctx_fini(struct ctx *c)
{
    if (c->zs_ready)
        deflateEnd(&c->zs);
#ifdef BJ_HAVE_ISAL
    free(c->lvl_buf);
#endif
    free(c->pad);
}

/* The stream's length, or 0 when it does not fit in j->limit bytes. */
static int deflate_one(const struct job *j, struct ctx *c, const uint8_t *src, uint8_t *dst,
                       uint32_t *len)
{
    if (j->codec == BJ_CODEC_ZLIB) {
        z_stream *zs = &c->zs;
        if (deflateReset(zs) != Z_OK)
            return -EINVAL;
        zs->next_in = (Bytef *)(uintptr_t)src;
        zs->avail_in = (uInt)j->cs;
        zs->next_out = dst;
        zs->avail_out = (uInt)j->limit;
        int rc = deflate(zs, Z_FINISH);
        *len = rc == Z_STREAM_END ? (uint32_t)zs->total_out : 0;
        return 0;
    }
#ifdef BJ_HAVE_ISAL
    struct isal_zstream s;
    isal_deflate_stateless_init(&s);
    s.next_in = (uint8_t *)(uintptr_t)src;
    s.avail_in = (uint32_t)j->cs;
    s.next_out = dst;
    s.avail_out = (uint32_t)j->limit;
    s.level = (uint32_t)j->level;
    s.level_buf = c->lvl_buf;
    s.level_buf_size = c->lvl_size;
    s.hist_bits = (uint16_t)j->window_bits;
    s.end_of_stream = 1;
    s.flush = NO_FLUSH;
    s.gzip_flag = IGZIP_DEFLATE;
    int rc = isal_deflate_stateless(&s);
    if (rc == STATELESS_OVERFLOW) {
        *len = 0;
        return 0;
    }
    if (rc != COMP_OK || s.avail_in)
        return -EIO;
    *len = s.total_out;
    return 0;
#else
    return -EOPNOTSUPP;
#endif
}

static int one(struct job *j, struct ctx *c, size_t i)
{
    const uint8_t *src = j->in + i * j->cs;
    size_t len = i + 1 == j->n ? j->last : j->cs;
    if (bj_is_zero(src, len)) {
        j->out_len[i] = BJ_DEFLATE_ZERO;
        return 0;
    }
    if (len < j->cs) {
        memcpy(c->pad, src, len);
        memset(c->pad + len, 0, j->cs - len);
        src = c->pad;
    }
    return deflate_one(j, c, src, j->out + i * j->cs, &j->out_len[i]);
}

static void *worker(void *arg)
{
    struct job *j = arg;
    struct ctx c;
    int rc = ctx_init(&c, j);
    if (rc) {
        ctx_fini(&c);
        atomic_store(&j->err, rc);
        return NULL;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n || atomic_load(&j->err))
            break;
        rc = one(j, &c, i);
        if (rc) {
            atomic_store(&j->err, rc);
            break;
        }
    }
    ctx_fini(&c);
    return NULL;
}

int bj_deflate_clusters(const uint8_t *in, size_t n, size_t cs, size_t last, uint8_t *out,
                        uint32_t *out_len, size_t limit, int codec, int level,
                        int window_bits, int threads)
{
    if (codec != BJ_CODEC_ZLIB && codec != BJ_CODEC_ISAL)
        return -EINVAL;
    if (!(bj_deflate_codecs() & (1 << codec)))
        return -EOPNOTSUPP;
    if (!n)
        return 0;
    if (!cs || cs > (1u << 30) || last < 1 || last > cs || limit > cs || threads < 1 ||
        window_bits < 9 || window_bits > 15)
        return -EINVAL;
    if (codec == BJ_CODEC_ZLIB ? (level < -1 || level > 9) : (level < 0 || level > 3))
        return -EINVAL;
    struct job j = {.in = in, .out = out, .out_len = out_len, .n = n, .cs = cs,
                    .last = last, .limit = limit, .codec = codec, .level = level,
                    .window_bits = window_bits};
    atomic_init(&j.next, 0);
    atomic_init(&j.err, 0);
    size_t extra = (size_t)threads - 1;
    if (extra > n - 1)
        extra = n - 1;
    pthread_t *tid = extra ? calloc(extra, sizeof *tid) : NULL;
    size_t started = 0;
    if (extra && !tid)
        atomic_store(&j.err, -ENOMEM);
    for (; tid && started < extra; started++)
        if (pthread_create(&tid[started], NULL, worker, &j))
            break;                  /* fewer threads: the others do the work */
    worker(&j);
    for (size_t k = 0; k < started; k++)
        pthread_join(tid[k], NULL);
    free(tid);
    return atomic_load(&j.err);
}
