/* Parallel cluster compression for qcow2 targets (convert -c, compressed
 * backup): one raw deflate stream per cluster, the clusters handed out to
 * the threads by an atomic counter; every cluster writes only its own slot
 * of out and out_len, so the caller reads them in order once all threads
 * are joined. No Python, no GIL: one call per chunk of clusters. */
#include "compress.h"
#include "zero.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

struct job {
    const uint8_t *in;
    uint8_t *out;
    uint32_t *out_len;
    size_t n, cs, last, limit;
    int level, window_bits;
    atomic_size_t next;
    atomic_int err;
};

static int one(struct job *j, z_stream *zs, uint8_t *pad, size_t i)
{
    const uint8_t *src = j->in + i * j->cs;
    size_t len = i + 1 == j->n ? j->last : j->cs;
    if (bj_is_zero(src, len)) {
        j->out_len[i] = BJ_DEFLATE_ZERO;
        return 0;
    }
    if (len < j->cs) {
        memcpy(pad, src, len);
        memset(pad + len, 0, j->cs - len);
        src = pad;
    }
    if (deflateReset(zs) != Z_OK)
        return -EINVAL;
    zs->next_in = (Bytef *)(uintptr_t)src;
    zs->avail_in = (uInt)j->cs;
    zs->next_out = j->out + i * j->cs;
    zs->avail_out = (uInt)j->limit;
    int rc = deflate(zs, Z_FINISH);
    j->out_len[i] = rc == Z_STREAM_END ? (uint32_t)zs->total_out : 0;
    return 0;
}

static void *worker(void *arg)
{
    struct job *j = arg;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    uint8_t *pad = malloc(j->cs);
    if (!pad || deflateInit2(&zs, j->level, Z_DEFLATED, -j->window_bits, 9,
                             Z_DEFAULT_STRATEGY) != Z_OK) {
        free(pad);
        atomic_store(&j->err, -ENOMEM);
        return NULL;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n || atomic_load(&j->err))
            break;
        int rc = one(j, &zs, pad, i);
        if (rc) {
            atomic_store(&j->err, rc);
            break;
        }
    }
    deflateEnd(&zs);
    free(pad);
    return NULL;
}

int bj_deflate_clusters(const uint8_t *in, size_t n, size_t cs, size_t last, uint8_t *out,
                        uint32_t *out_len, size_t limit, int level, int window_bits,
                        int threads)
{
    if (!n)
        return 0;
    if (!cs || cs > (1u << 30) || last < 1 || last > cs || limit > cs || threads < 1 ||
        window_bits < 9 || window_bits > 15 || level < -1 || level > 9)
        return -EINVAL;
    struct job j = {.in = in, .out = out, .out_len = out_len, .n = n, .cs = cs,
                    .last = last, .limit = limit, .level = level,
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
