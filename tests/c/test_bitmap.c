/* Tests of csrc/bitmap.c: the worked example of its opening comment, error
 * returns, odd sizes, a randomized comparison with a byte-per-granule model
 * (sizes that span several summary words), and writer threads racing a
 * job that takes dirty areas. */
#include "bitmap.h"
#include "check.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

static struct bj_bitmap *mk(uint64_t size, uint64_t gran)
{
    struct bj_bitmap *b = NULL;
    CHECK_EQ(bj_bitmap_new(&b, size, gran), 0);
    CHECK(b != NULL);
    return b;
}

static void test_example(void)
{
    struct bj_bitmap *b = mk(10000, 1024);
    uint64_t st, len;
    unsigned char buf[4] = {0xee, 0xee, 0xee, 0xee};

    CHECK_EQ(bj_bitmap_size(b), 10000);
    CHECK_EQ(bj_bitmap_granularity(b), 1024);
    CHECK_EQ(bj_bitmap_set(b, 1000, 100), 2);
    CHECK_EQ(bj_bitmap_set(b, 9500, 1), 1);
    CHECK_EQ(bj_bitmap_set(b, 9500, 1), 0); /* already dirty */
    CHECK_EQ(bj_bitmap_count(b), 3);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 2832);
    CHECK_EQ(bj_bitmap_next_dirty(b, 1500), 1500);
    CHECK_EQ(bj_bitmap_next_dirty(b, 2048), 9216);
    CHECK_EQ(bj_bitmap_next_dirty(b, 10000), -ENOENT);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), 2048);
    CHECK_EQ(bj_bitmap_next_clean(b, 9216), -ENOENT);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, 1 << 20, &st, &len), 1);
    CHECK_EQ(st, 0);
    CHECK_EQ(len, 2048);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 3000, 1 << 20, &st, &len), 1);
    CHECK_EQ(st, 9216);
    CHECK_EQ(len, 784); /* clipped at size */
    CHECK_EQ(bj_bitmap_serialized_size(b, 0, 10000), 2);
    CHECK_EQ(bj_bitmap_serialize(b, 0, 10000, buf, sizeof(buf)), 2);
    CHECK_EQ(buf[0], 0x03);
    CHECK_EQ(buf[1], 0x02);
    CHECK_EQ(buf[2], 0xee); /* nothing written past the range */
    CHECK_EQ(bj_bitmap_reset(b, 9216, 700), -EINVAL);
    CHECK_EQ(bj_bitmap_reset(b, 9216, 784), 1);
    CHECK_EQ(bj_bitmap_test(b, 9999), 0);
    CHECK_EQ(bj_bitmap_test(b, 1024), 1);
    bj_bitmap_free(b);
}

static void test_errors(void)
{
    struct bj_bitmap *b = (struct bj_bitmap *)&b; /* must be overwritten */
    uint64_t bad_gran[] = {0, 1, 256, 511, 513, 1000, 4096 + 512, (uint64_t)1 << 32, UINT64_MAX};
    for (size_t i = 0; i < sizeof(bad_gran) / sizeof(bad_gran[0]); i++) {
        b = (struct bj_bitmap *)&b;
        CHECK_EQ(bj_bitmap_new(&b, 4096, bad_gran[i]), -EINVAL);
        CHECK(b == NULL);
    }
    CHECK_EQ(bj_bitmap_new(&b, BJ_BITMAP_MAX_SIZE + 1, 512), -EINVAL);
    CHECK_EQ(bj_bitmap_new(NULL, 4096, 512), -EINVAL);

    /* NULL bitmaps. */
    uint64_t st = 7, len = 7;
    CHECK_EQ(bj_bitmap_set(NULL, 0, 1), -EINVAL);
    CHECK_EQ(bj_bitmap_reset(NULL, 0, 1), -EINVAL);
    CHECK_EQ(bj_bitmap_test(NULL, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_count(NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_dirty_bytes(NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty(NULL, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_next_clean(NULL, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty_area(NULL, 0, 1, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_take_dirty_area(NULL, 0, 512, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_merge(NULL, NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_subtract(NULL, NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_clear(NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_set_all(NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_resize(NULL, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_copy(&b, NULL), -EINVAL);
    CHECK_EQ(bj_bitmap_serialized_size(NULL, 0, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_size(NULL), 0);
    CHECK_EQ(bj_bitmap_granularity(NULL), 0);
    bj_bitmap_free(NULL);

    b = mk(10000, 512);
    /* Ranges beyond size are rejected, including overflowing ones. */
    CHECK_EQ(bj_bitmap_set(b, 10001, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_set(b, 9999, 2), -EINVAL);
    CHECK_EQ(bj_bitmap_set(b, 512, UINT64_MAX), -EINVAL);
    CHECK_EQ(bj_bitmap_set(b, UINT64_MAX, 1), -EINVAL);
    CHECK_EQ(bj_bitmap_set(b, 10000, 0), 0);
    CHECK_EQ(bj_bitmap_reset(b, 0, 10001), -EINVAL);
    CHECK_EQ(bj_bitmap_reset(b, 1, 511), -EINVAL);  /* unaligned start */
    CHECK_EQ(bj_bitmap_reset(b, 0, 513), -EINVAL);  /* unaligned end */
    CHECK_EQ(bj_bitmap_reset(b, 3, 0), 0);          /* empty: no-op */
    CHECK_EQ(bj_bitmap_test(b, 10000), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty(b, 10001), -EINVAL);
    CHECK_EQ(bj_bitmap_next_clean(b, 10001), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, 0, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 10001, 1, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, 1, NULL, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_take_dirty_area(b, 0, 511, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_take_dirty_area(b, 100, 512, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_take_dirty_area(b, 10240, 512, &st, &len), -EINVAL);
    CHECK_EQ(bj_bitmap_resize(b, BJ_BITMAP_MAX_SIZE + 1), -EINVAL);
    CHECK_EQ(bj_bitmap_size(b), 10000);
    /* Serialization ranges: start on 8 granules (4096), end on 8 or size. */
    unsigned char buf[8];
    CHECK_EQ(bj_bitmap_serialized_size(b, 512, 4096), -EINVAL);
    CHECK_EQ(bj_bitmap_serialized_size(b, 0, 4095), -EINVAL);
    CHECK_EQ(bj_bitmap_serialized_size(b, 0, 10001), -EINVAL);
    CHECK_EQ(bj_bitmap_serialized_size(b, 4096, 5904), 2); /* 12 granules */
    CHECK_EQ(bj_bitmap_serialized_size(b, 0, 10000), 3);   /* 20 granules */
    CHECK_EQ(bj_bitmap_serialized_size(b, 10000, 0), 0); /* empty, at size */
    CHECK_EQ(bj_bitmap_serialized_size(b, 9999, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_serialize(b, 0, 10000, buf, 2), -ENOBUFS);
    CHECK_EQ(bj_bitmap_serialize(b, 0, 10000, NULL, 3), -EINVAL);
    CHECK_EQ(bj_bitmap_deserialize(b, 0, 10000, buf, 2), -ENOBUFS);
    CHECK_EQ(bj_bitmap_deserialize(b, 512, 4096, buf, 8), -EINVAL);
    CHECK_EQ(bj_bitmap_count(b), 0); /* no failed call changed anything */

    /* merge/subtract need the same size and granularity. */
    struct bj_bitmap *o = mk(10000, 1024), *p = mk(10240, 512);
    CHECK_EQ(bj_bitmap_merge(b, o), -EINVAL);
    CHECK_EQ(bj_bitmap_merge(b, p), -EINVAL);
    CHECK_EQ(bj_bitmap_subtract(b, o), -EINVAL);
    bj_bitmap_free(o);
    bj_bitmap_free(p);
    bj_bitmap_free(b);
}

static void test_odd_sizes(void)
{
    uint64_t st, len;
    /* Size 0: nothing to mark, nothing to find. */
    struct bj_bitmap *b = mk(0, 512);
    CHECK_EQ(bj_bitmap_set(b, 0, 0), 0);
    CHECK_EQ(bj_bitmap_set(b, 0, 1), -EINVAL);
    CHECK_EQ(bj_bitmap_test(b, 0), -EINVAL);
    CHECK_EQ(bj_bitmap_next_dirty(b, 0), -ENOENT);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), -ENOENT);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, 512, &st, &len), 0);
    CHECK_EQ(bj_bitmap_set_all(b), 0);
    CHECK_EQ(bj_bitmap_count(b), 0);
    CHECK_EQ(bj_bitmap_serialized_size(b, 0, 0), 0);
    CHECK_EQ(bj_bitmap_serialize(b, 0, 0, NULL, 0), 0);
    CHECK_EQ(bj_bitmap_resize(b, 1), 0);
    CHECK_EQ(bj_bitmap_set(b, 0, 1), 1);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 1);
    CHECK_EQ(bj_bitmap_resize(b, 0), 0);
    CHECK_EQ(bj_bitmap_count(b), 0);
    bj_bitmap_free(b);

    /* One byte, one partial granule. */
    b = mk(1, 65536);
    CHECK_EQ(bj_bitmap_set_all(b), 0);
    CHECK_EQ(bj_bitmap_count(b), 1);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 1);
    CHECK_EQ(bj_bitmap_reset(b, 0, 1), 1);
    bj_bitmap_free(b);

    /* 64 granules + 1 byte: the 65th granule starts a second word. */
    b = mk(64 * 512 + 1, 512);
    CHECK_EQ(bj_bitmap_set_all(b), 0);
    CHECK_EQ(bj_bitmap_count(b), 65);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 64 * 512 + 1);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), -ENOENT);
    CHECK_EQ(bj_bitmap_reset(b, 64 * 512, 1), 1);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), 64 * 512);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 64 * 512);
    /* Growing keeps a dirty partial last granule dirty; new space is clean. */
    CHECK_EQ(bj_bitmap_set(b, 64 * 512, 1), 1);
    CHECK_EQ(bj_bitmap_resize(b, 64 * 512 + 300), 0);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 64 * 512 + 300);
    CHECK_EQ(bj_bitmap_resize(b, 200 * 512), 0);
    CHECK_EQ(bj_bitmap_count(b), 65);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), 65 * 512);
    /* Shrinking drops granules; growing back does not resurrect them. */
    CHECK_EQ(bj_bitmap_resize(b, 10 * 512 + 7), 0);
    CHECK_EQ(bj_bitmap_count(b), 11);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), 10 * 512 + 7);
    CHECK_EQ(bj_bitmap_resize(b, 200 * 512), 0);
    CHECK_EQ(bj_bitmap_count(b), 11);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), 11 * 512);
    bj_bitmap_free(b);
}

/* The qcow2 order, against hand-computed bytes: granules 0, 9, 10, 17, 23
 * of 24 -> byte 0 = bit0 = 0x01, byte 1 = bits 1,2 = 0x06, byte 2 =
 * bits 1,7 = 0x82. */
static void test_serialize_order(void)
{
    struct bj_bitmap *b = mk(24 * 4096, 4096);
    uint64_t gs[] = {0, 9, 10, 17, 23};
    for (size_t i = 0; i < 5; i++)
        CHECK_EQ(bj_bitmap_set(b, gs[i] * 4096 + 5, 1), 1);
    unsigned char buf[3], want[3] = {0x01, 0x06, 0x82};
    CHECK_EQ(bj_bitmap_serialize(b, 0, 24 * 4096, buf, 3), 3);
    CHECK(memcmp(buf, want, 3) == 0);
    /* The second byte alone (granules 8..15). */
    CHECK_EQ(bj_bitmap_serialize(b, 8 * 4096, 8 * 4096, buf, 1), 1);
    CHECK_EQ(buf[0], 0x06);
    /* Deserialize replaces the range: byte 1 := 0x81 -> granules 8, 15. */
    unsigned char one = 0x81;
    CHECK_EQ(bj_bitmap_deserialize(b, 8 * 4096, 8 * 4096, &one, 1), 1);
    CHECK_EQ(bj_bitmap_count(b), 5);
    CHECK_EQ(bj_bitmap_next_dirty(b, 4096), 8 * 4096);
    CHECK_EQ(bj_bitmap_next_dirty(b, 9 * 4096), 15 * 4096);
    bj_bitmap_free(b);

    /* Padding bits after the last granule are ignored by deserialize and
     * written as 0 by serialize. */
    b = mk(3 * 512 + 1, 512); /* 4 granules */
    unsigned char in = 0xff, out = 0;
    CHECK_EQ(bj_bitmap_deserialize(b, 0, 3 * 512 + 1, &in, 1), 1);
    CHECK_EQ(bj_bitmap_count(b), 4);
    CHECK_EQ(bj_bitmap_serialize(b, 0, 3 * 512 + 1, &out, 1), 1);
    CHECK_EQ(out, 0x0f);
    bj_bitmap_free(b);
}

/* ---- randomized comparison with a model: one byte per granule ---------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint64_t rnd(uint64_t n) /* uniform-ish in [0, n) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return n ? rng_state % n : 0;
}

#define MAXG 20000
struct model {
    uint64_t size, gran, n;
    unsigned char g[MAXG];
};

static void model_check(struct bj_bitmap *b, const struct model *m)
{
    uint64_t cnt = 0, bytes = 0;
    for (uint64_t i = 0; i < m->n; i++) {
        if (m->g[i]) {
            cnt++;
            uint64_t end = (i + 1) * m->gran;
            bytes += (end > m->size ? m->size : end) - i * m->gran;
        }
    }
    CHECK_EQ(bj_bitmap_count(b), cnt);
    CHECK_EQ(bj_bitmap_dirty_bytes(b), bytes);
    CHECK_EQ(bj_bitmap_size(b), m->size);
}

static int64_t model_next(const struct model *m, uint64_t off, int want)
{
    for (uint64_t i = off / m->gran; i < m->n; i++)
        if (m->g[i] == want)
            return (int64_t)(i * m->gran > off ? i * m->gran : off);
    return -ENOENT;
}

static void test_random(void)
{
    static struct model m, m2;
    uint64_t grans[] = {512, 1024, 4096, 65536};
    for (int round = 0; round < 60; round++) {
        memset(&m, 0, sizeof(m));
        m.gran = grans[rnd(4)];
        m.n = 1 + rnd(round % 3 == 0 ? 200 : MAXG / 2);
        m.size = (m.n - 1) * m.gran + 1 + rnd(m.gran); /* often partial */
        struct bj_bitmap *b = mk(m.size, m.gran);
        for (int op = 0; op < 400; op++) {
            uint64_t off = rnd(m.size + 1), len = rnd(m.size - off + 1);
            if (rnd(4) == 0)
                len = rnd(3 * m.gran); /* short ranges too */
            if (len > m.size - off)
                len = m.size - off;
            switch (rnd(10)) {
            case 0: case 1: case 2: { /* set */
                uint64_t want = 0;
                if (len)
                    for (uint64_t i = off / m.gran; i <= (off + len - 1) / m.gran; i++)
                        want += !m.g[i], m.g[i] = 1;
                CHECK_EQ(bj_bitmap_set(b, off, len), want);
                break;
            }
            case 3: case 4: { /* reset, aligned */
                uint64_t s = off / m.gran * m.gran, e = (off + len) / m.gran * m.gran;
                if (rnd(3) == 0)
                    e = m.size;
                uint64_t want = 0;
                for (uint64_t i = s / m.gran; i * m.gran < e; i++)
                    want += m.g[i], m.g[i] = 0;
                CHECK_EQ(bj_bitmap_reset(b, s, e - s), want);
                break;
            }
            case 5: { /* test + next */
                if (off < m.size)
                    CHECK_EQ(bj_bitmap_test(b, off), m.g[off / m.gran]);
                CHECK_EQ(bj_bitmap_next_dirty(b, off), model_next(&m, off, 1));
                CHECK_EQ(bj_bitmap_next_clean(b, off), model_next(&m, off, 0));
                break;
            }
            case 6: { /* next dirty area */
                uint64_t maxl = 1 + rnd(m.size + 1), st = 1, ln = 1;
                int64_t s = model_next(&m, off, 1);
                int rc = bj_bitmap_next_dirty_area(b, off, maxl, &st, &ln);
                if (s < 0) {
                    CHECK_EQ(rc, 0);
                    CHECK_EQ(st, 0);
                    CHECK_EQ(ln, 0);
                } else {
                    uint64_t i = (uint64_t)s / m.gran;
                    while (i < m.n && m.g[i])
                        i++;
                    uint64_t e = i * m.gran;
                    if (e > m.size)
                        e = m.size;
                    if (e - (uint64_t)s > maxl)
                        e = (uint64_t)s + maxl;
                    CHECK_EQ(rc, 1);
                    CHECK_EQ(st, s);
                    CHECK_EQ(ln, e - (uint64_t)s);
                }
                break;
            }
            case 7: { /* merge / subtract with a random other bitmap */
                struct bj_bitmap *o = mk(m.size, m.gran);
                memset(m2.g, 0, sizeof(m2.g));
                for (int k = 0; m.size && k < 5; k++) {
                    uint64_t o1 = rnd(m.size), l1 = 1 + rnd(m.size - o1);
                    CHECK(bj_bitmap_set(o, o1, l1) >= 0);
                    for (uint64_t i = o1 / m.gran; i <= (o1 + l1 - 1) / m.gran; i++)
                        m2.g[i] = 1;
                }
                int merge = (int)rnd(2);
                uint64_t want = 0;
                for (uint64_t i = 0; i < m.n; i++) {
                    unsigned char v = merge ? (m.g[i] | m2.g[i]) : (m.g[i] & !m2.g[i]);
                    want += v != m.g[i];
                    m.g[i] = v;
                }
                CHECK_EQ(merge ? bj_bitmap_merge(b, o) : bj_bitmap_subtract(b, o), want);
                bj_bitmap_free(o);
                break;
            }
            case 8: { /* resize */
                uint64_t nn = 1 + rnd(MAXG / 2);
                uint64_t ns = rnd(8) == 0 ? 0 : (nn - 1) * m.gran + 1 + rnd(m.gran);
                uint64_t n2 = ns ? (ns - 1) / m.gran + 1 : 0;
                for (uint64_t i = n2; i < m.n; i++)
                    m.g[i] = 0;
                m.size = ns;
                m.n = n2;
                CHECK_EQ(bj_bitmap_resize(b, ns), 0);
                break;
            }
            default: { /* serialize round trip through a copy */
                static unsigned char buf[MAXG / 8 + 1];
                int64_t nb = bj_bitmap_serialized_size(b, 0, m.size);
                CHECK_EQ(nb, (m.n + 7) / 8);
                CHECK_EQ(bj_bitmap_serialize(b, 0, m.size, buf, sizeof(buf)), nb);
                for (uint64_t i = 0; i < m.n; i++)
                    CHECK_EQ((buf[i / 8] >> (i % 8)) & 1, m.g[i]);
                struct bj_bitmap *c = mk(m.size, m.gran), *d;
                CHECK_EQ(bj_bitmap_set_all(c), 0);
                CHECK_EQ(bj_bitmap_deserialize(c, 0, m.size, buf, (size_t)nb), nb);
                model_check(c, &m);
                CHECK_EQ(bj_bitmap_copy(&d, c), 0);
                int64_t had = bj_bitmap_count(d);
                CHECK_EQ(bj_bitmap_subtract(d, b), had); /* d == b: all go */
                CHECK_EQ(bj_bitmap_count(d), 0);
                CHECK_EQ(bj_bitmap_merge(c, c), 0);
                bj_bitmap_free(c);
                bj_bitmap_free(d);
                break;
            }
            }
            model_check(b, &m);
        }
        int64_t left = bj_bitmap_count(b);
        CHECK_EQ(bj_bitmap_subtract(b, b), left);
        CHECK_EQ(bj_bitmap_count(b), 0);
        bj_bitmap_free(b);
    }
}

/* Large bitmap: runs that cross summary words (4096 granules each). */
static void test_large(void)
{
    uint64_t g = 512, n = 3 * 4096 * 64 + 77; /* ~6.3 GB disk, 100 KiB of words */
    struct bj_bitmap *b = mk(n * g, g);
    uint64_t st, len;
    CHECK_EQ(bj_bitmap_next_dirty(b, 0), -ENOENT);
    CHECK_EQ(bj_bitmap_set(b, (n - 1) * g, 1), 1);
    CHECK_EQ(bj_bitmap_next_dirty(b, 0), (int64_t)((n - 1) * g));
    CHECK_EQ(bj_bitmap_set(b, 5000 * g, 300000 * g), 300000);
    CHECK_EQ(bj_bitmap_next_clean(b, 5000 * g), (int64_t)(305000 * g));
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, UINT64_MAX, &st, &len), 1);
    CHECK_EQ(st, 5000 * g);
    CHECK_EQ(len, 300000 * g);
    CHECK_EQ(bj_bitmap_next_dirty_area(b, 0, 7 * g + 3, &st, &len), 1);
    CHECK_EQ(len, 7 * g + 3);
    CHECK_EQ(bj_bitmap_set_all(b), 0);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), -ENOENT);
    CHECK_EQ(bj_bitmap_reset(b, 700000 * g, g), 1);
    CHECK_EQ(bj_bitmap_next_clean(b, 0), (int64_t)(700000 * g));
    CHECK_EQ(bj_bitmap_count(b), (int64_t)n - 1);
    bj_bitmap_free(b);
}

/* ---- writers racing a job ------------------------------------------------ */

#define NWRITERS 4
#define PER_WRITER 20000
#define RACE_G 512
#define ROUNDS 8

struct writer_arg {
    struct bj_bitmap *b;
    uint64_t id;
    int *finished; /* writers done, updated atomically */
};

static void *writer(void *arg)
{
    struct writer_arg *w = arg;
    /* Writer id owns granules id, id+N, id+2N, ...: each granule is marked
     * exactly once, in a scattered order, and all writers share words. */
    for (uint64_t k = 0; k < PER_WRITER; k++) {
        uint64_t j = (k * 7919) % PER_WRITER;
        uint64_t gi = j * NWRITERS + w->id;
        CHECK_EQ(bj_bitmap_set(w->b, gi * RACE_G + 1, 3), 1);
    }
    __atomic_add_fetch(w->finished, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* A job takes areas while the writers mark: every granule is taken exactly
 * once, nothing is lost, the count ends at 0. */
static void test_threads_take(void)
{
    static unsigned char seen[NWRITERS * PER_WRITER];
    memset(seen, 0, sizeof(seen));
    struct bj_bitmap *b = mk((uint64_t)NWRITERS * PER_WRITER * RACE_G, RACE_G);
    int finished = 0;
    pthread_t th[NWRITERS];
    struct writer_arg args[NWRITERS];
    for (int i = 0; i < NWRITERS; i++) {
        args[i] = (struct writer_arg){b, (uint64_t)i, &finished};
        CHECK_EQ(pthread_create(&th[i], NULL, writer, &args[i]), 0);
    }
    /* Passes over the disk until a whole pass that started after every
     * writer finished found nothing. */
    uint64_t off = 0, st, len, taken = 0;
    int all_done_at_start = 0, found_in_pass = 0;
    for (;;) {
        int rc = bj_bitmap_take_dirty_area(b, off, 16 * RACE_G, &st, &len);
        CHECK(rc >= 0);
        if (rc == 1) {
            for (uint64_t i = st / RACE_G; i < (st + len) / RACE_G; i++) {
                CHECK_EQ(seen[i], 0); /* each granule taken exactly once */
                seen[i] = 1;
            }
            taken += len / RACE_G;
            off = st + len;
            found_in_pass = 1;
            continue;
        }
        if (all_done_at_start && !found_in_pass)
            break;
        all_done_at_start = __atomic_load_n(&finished, __ATOMIC_SEQ_CST) == NWRITERS;
        found_in_pass = 0;
        off = 0;
    }
    for (int i = 0; i < NWRITERS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    CHECK_EQ(taken, NWRITERS * PER_WRITER);
    CHECK_EQ(bj_bitmap_count(b), 0);
    bj_bitmap_free(b);
}

/* Writers set long overlapping ranges (many words per call) while a reader
 * copies, merges and iterates: the result is exactly the union. */
#define OVL_G 1024
#define OVL_N 400000 /* granules; ~60% end up dirty */
#define OVL_OPS 100

static void ovl_range(uint64_t seed, uint64_t k, uint64_t *off, uint64_t *len)
{
    uint64_t x = (seed + 1) * 0x9e3779b97f4a7c15u + k * 0xbf58476d1ce4e5b9u;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebu;
    x ^= x >> 29;
    uint64_t size = (uint64_t)OVL_N * OVL_G - 333;
    *off = x % size;
    *len = 1 + (x >> 20) % (2000 * OVL_G);
    if (*len > size - *off)
        *len = size - *off;
}

struct ovl_arg {
    struct bj_bitmap *b;
    uint64_t seed;
};

static void *ovl_writer(void *arg)
{
    struct ovl_arg *a = arg;
    for (uint64_t k = 0; k < OVL_OPS; k++) {
        uint64_t off, len;
        ovl_range(a->seed, k, &off, &len);
        CHECK(bj_bitmap_set(a->b, off, len) >= 0);
    }
    return NULL;
}

static void *ovl_reader(void *arg)
{
    struct bj_bitmap *b = arg;
    for (int k = 0; k < 200; k++) {
        struct bj_bitmap *c;
        uint64_t off = 0, st, len;
        CHECK_EQ(bj_bitmap_copy(&c, b), 0);
        CHECK_EQ(bj_bitmap_merge(b, c), 0); /* b only grows: c is a subset */
        int64_t had = bj_bitmap_count(c);
        CHECK_EQ(bj_bitmap_subtract(c, b), had); /* all of c is in b */
        while (bj_bitmap_next_dirty_area(b, off, UINT64_MAX, &st, &len) == 1)
            off = st + len;
        bj_bitmap_free(c);
    }
    return NULL;
}

static void test_threads_overlap(void)
{
    uint64_t size = (uint64_t)OVL_N * OVL_G - 333;
    struct bj_bitmap *b = mk(size, OVL_G), *want = mk(size, OVL_G);
    struct ovl_arg args[NWRITERS];
    pthread_t th[NWRITERS], rd;
    CHECK_EQ(pthread_create(&rd, NULL, ovl_reader, b), 0);
    for (int i = 0; i < NWRITERS; i++) {
        args[i] = (struct ovl_arg){b, (uint64_t)i};
        CHECK_EQ(pthread_create(&th[i], NULL, ovl_writer, &args[i]), 0);
    }
    for (int i = 0; i < NWRITERS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    CHECK_EQ(pthread_join(rd, NULL), 0);
    for (int i = 0; i < NWRITERS; i++) {
        args[i].b = want;
        ovl_writer(&args[i]);
    }
    int64_t n = bj_bitmap_count(want);
    CHECK(n > OVL_N / 4 && n < OVL_N * 9 / 10); /* the union is not trivial */
    CHECK_EQ(bj_bitmap_count(b), n);
    CHECK_EQ(bj_bitmap_subtract(want, b), n); /* equal counts, want in b: */
    CHECK_EQ(bj_bitmap_count(want), 0);       /* b == want */
    bj_bitmap_free(b);
    bj_bitmap_free(want);
}

int main(void)
{
    test_example();
    test_errors();
    test_odd_sizes();
    test_serialize_order();
#ifndef __SANITIZE_THREAD__
    /* one thread against a model: the ASan and valgrind builds run it; under
     * ThreadSanitizer (races only) it took 5 of the binary's 6 s of CPU */
    test_random();
#endif
    test_large();
    for (int r = 0; r < ROUNDS; r++)
        test_threads_take();
    for (int r = 0; r < ROUNDS / 2; r++)
        test_threads_overlap();
    printf("test_bitmap: ok\n");
    return 0;
}
