/* The dirty bitmap.
 *
 * Structure
 * ---------
 * One bit per granule, granule i in bit i%64 of the 64-bit word words[i/64]
 * (least significant bit first, so on a little-endian host the words ARE the
 * qcow2 on-disk bytes). Bits past the last granule are always 0.
 *
 * Next to the words, a one-level index of two summaries, one bit per word:
 *
 *     nz[w/64]   bit w%64 set  <=>  words[w] != 0           (has dirt)
 *     full[w/64] bit w%64 set  <=>  words[w] has every bit   (no clean bit)
 *                                   of its granules set
 *
 * and `count`, the number of set bits, kept exact on every change (each word
 * write adds popcount(new) - popcount(old)). Every word write goes through
 * put_word(), which updates the count and both summaries, so the index can
 * never disagree with the words.
 *
 * Cost
 * ----
 * Memory: size/granularity/8 bytes for the words, plus 2/64 of that for the
 * index (a 1 TiB disk at 64 KiB granules: 2 MiB + 64 KiB; at 512 B: 256 MiB
 * + 8 MiB). set/reset of n granules: O(n/64). test, count: O(1).
 * next_dirty / next_clean: O(1) inside a word, else a scan of the summary,
 * 64 words (4096 granules) per summary word: O(words/64) in the worst case
 * (a 1 TiB, 64 KiB-granule bitmap that is all clean scans 512 summary
 * words). Known flaw: with 512 B granules on a huge disk that scan is
 * ~512 KiB per miss; a second summary level would make it O(log) but we
 * have not needed it. merge/subtract/copy/resize/serialize: O(words).
 *
 * Worked example
 * --------------
 * size 10000, granularity 1024: 10 granules, the last one partial
 * (9216..9999, 784 bytes), one word, a last-word mask of 0x3ff.
 *     set(1000, 100)   bytes 1000..1099 touch granules 0 and 1: words[0] = 0x003
 *     set(9500, 1)     granule 9:                             words[0] = 0x203
 *     count() = 3 granules, dirty_bytes() = 1024 + 1024 + 784 = 2832
 *     nz[0] = 0x1 (word 0 has dirt), full[0] = 0x0 (0x203 != 0x3ff)
 *     next_dirty(1500) = 1500 (its granule 1 is dirty), next_dirty(2048) = 9216
 *     next_clean(0) = 2048, next_dirty_area(0, 1 MiB) = (0, 2048)
 *     serialize(0, 10000) = 2 bytes: 0x03 0x02
 *     reset(9216, 784) clears granule 9 (ends at size); reset(9216, 700): -EINVAL
 *
 * Concurrency
 * -----------
 * One pthread mutex per bitmap, held for the whole of each call. Writers
 * mark a range per guest write; the job iterates with next_dirty_area or
 * take_dirty_area. A mutex makes each call atomic at once for the words, the
 * summaries and the count together; per-word atomics would keep the words
 * right but not an exact count nor a consistent index without a second
 * protocol, and the critical sections are short (a few words) next to the
 * I/O each call stands for, so contention is not the cost that matters.
 * merge/subtract lock both bitmaps in address order (no ABBA deadlock).
 */
#include "bitmap.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct bj_bitmap {
    pthread_mutex_t lock;
    uint64_t size;       /* bytes */
    uint64_t gran;       /* bytes per granule, 1 << shift */
    unsigned shift;
    uint64_t nbits;      /* granules: ceil(size / gran) */
    uint64_t nwords;     /* ceil(nbits / 64) */
    uint64_t nsum;       /* ceil(nwords / 64) */
    uint64_t count;      /* set bits */
    uint64_t *words;     /* nwords (at least 1 allocated) */
    uint64_t *nz;        /* nsum: word has a set bit */
    uint64_t *full;      /* nsum: word has every valid bit set */
};

#define ONES UINT64_MAX

/* Bits lo..hi (inclusive, 0 <= lo <= hi <= 63) of a word. */
static uint64_t bits_mask(unsigned lo, unsigned hi)
{
    return (ONES << lo) & (ONES >> (63 - hi));
}

/* The valid bits of word w (all but the tail of the last word). */
static uint64_t word_mask(const struct bj_bitmap *b, uint64_t w)
{
    unsigned tail = (unsigned)(b->nbits % 64);
    if (w + 1 == b->nwords && tail)
        return (ONES >> (64 - tail));
    return ONES;
}

static void sum_put(uint64_t *sum, uint64_t w, int on)
{
    uint64_t bit = (uint64_t)1 << (w % 64);
    if (on)
        sum[w / 64] |= bit;
    else
        sum[w / 64] &= ~bit;
}

/* The only writer of words[]: keeps count, nz and full exact. Returns the
 * number of bits that changed. */
static uint64_t put_word(struct bj_bitmap *b, uint64_t w, uint64_t v)
{
    uint64_t old = b->words[w];
    if (old == v)
        return 0;
    b->count = b->count - (uint64_t)__builtin_popcountll(old) + (uint64_t)__builtin_popcountll(v);
    b->words[w] = v;
    sum_put(b->nz, w, v != 0);
    sum_put(b->full, w, v == word_mask(b, w));
    return (uint64_t)__builtin_popcountll(old ^ v);
}

/* Recompute count and both summaries from the words. */
static void rebuild_index(struct bj_bitmap *b)
{
    memset(b->nz, 0, b->nsum * sizeof(uint64_t));
    memset(b->full, 0, b->nsum * sizeof(uint64_t));
    b->count = 0;
    for (uint64_t w = 0; w < b->nwords; w++) {
        uint64_t v = b->words[w];
        b->count += (uint64_t)__builtin_popcountll(v);
        if (v)
            sum_put(b->nz, w, 1);
        if (v == word_mask(b, w))
            sum_put(b->full, w, 1);
    }
}

/* First word index in [w, limit) whose summary bit equals want, or limit. */
static uint64_t sum_find(const uint64_t *sum, uint64_t w, uint64_t limit, int want)
{
    while (w < limit) {
        uint64_t v = sum[w / 64];
        if (!want)
            v = ~v;
        v &= ONES << (w % 64);
        if (v) {
            uint64_t r = (w & ~(uint64_t)63) + (uint64_t)__builtin_ctzll(v);
            return r < limit ? r : limit;
        }
        w = (w | 63) + 1;
    }
    return limit;
}

/* First set (want=1) or clear (want=0) granule in [i, limit), limit <= nbits;
 * returns limit if none. */
static uint64_t find_bit(const struct bj_bitmap *b, uint64_t i, uint64_t limit, int want)
{
    if (i >= limit)
        return limit;
    uint64_t w = i / 64;
    uint64_t v = want ? b->words[w] : (~b->words[w] & word_mask(b, w));
    v &= ONES << (i % 64);
    if (!v) {
        uint64_t lastw = (limit - 1) / 64;
        /* A word with a set bit is nz; a word with a clear bit is not full. */
        w = sum_find(want ? b->nz : b->full, w + 1, lastw + 1, want);
        if (w > lastw)
            return limit;
        v = want ? b->words[w] : (~b->words[w] & word_mask(b, w));
    }
    uint64_t r = w * 64 + (uint64_t)__builtin_ctzll(v);
    return r < limit ? r : limit;
}

/* Set (on=1) or clear granules [first, first+n), n >= 1. Returns changes. */
static uint64_t put_bits(struct bj_bitmap *b, uint64_t first, uint64_t n, int on)
{
    uint64_t last = first + n - 1, changed = 0;
    for (uint64_t w = first / 64; w <= last / 64; w++) {
        unsigned lo = w == first / 64 ? (unsigned)(first % 64) : 0;
        unsigned hi = w == last / 64 ? (unsigned)(last % 64) : 63;
        uint64_t m = bits_mask(lo, hi);
        changed += put_word(b, w, on ? (b->words[w] | m) : (b->words[w] & ~m));
    }
    return changed;
}

static uint64_t granules_of(uint64_t size, unsigned shift)
{
    return size ? ((size - 1) >> shift) + 1 : 0;
}

static int valid_granularity(uint64_t g)
{
    return g >= BJ_BITMAP_MIN_GRANULARITY && g <= BJ_BITMAP_MAX_GRANULARITY && (g & (g - 1)) == 0;
}

/* Allocate the arrays for `size` into the out-parameters (zeroed). */
static int alloc_arrays(uint64_t size, unsigned shift, uint64_t **words, uint64_t **nz,
                        uint64_t **full, uint64_t *nbits, uint64_t *nwords, uint64_t *nsum)
{
    *nbits = granules_of(size, shift);
    *nwords = (*nbits + 63) / 64;
    *nsum = (*nwords + 63) / 64;
    if (*nwords > SIZE_MAX / sizeof(uint64_t))
        return -ENOMEM;
    /* Allocate at least one element each so size 0 needs no special case. */
    *words = calloc(*nwords ? (size_t)*nwords : 1, sizeof(uint64_t));
    *nz = calloc(*nsum ? (size_t)*nsum : 1, sizeof(uint64_t));
    *full = calloc(*nsum ? (size_t)*nsum : 1, sizeof(uint64_t));
    if (!*words || !*nz || !*full) {
        free(*words);
        free(*nz);
        free(*full);
        return -ENOMEM;
    }
    return 0;
}

int bj_bitmap_new(struct bj_bitmap **out, uint64_t size, uint64_t granularity)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (!valid_granularity(granularity) || size > BJ_BITMAP_MAX_SIZE)
        return -EINVAL;
    struct bj_bitmap *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    b->size = size;
    b->gran = granularity;
    b->shift = (unsigned)__builtin_ctzll(granularity);
    int rc = alloc_arrays(size, b->shift, &b->words, &b->nz, &b->full, &b->nbits, &b->nwords,
                          &b->nsum);
    if (rc < 0) {
        free(b);
        return rc;
    }
    rc = pthread_mutex_init(&b->lock, NULL);
    if (rc != 0) {
        free(b->words);
        free(b->nz);
        free(b->full);
        free(b);
        return -rc;
    }
    /* All words 0: count 0, no nz bit, and no word is full (every word
     * has at least one valid bit), so the zeroed index is exact. */
    *out = b;
    return 0;
}

void bj_bitmap_free(struct bj_bitmap *b)
{
    if (!b)
        return;
    pthread_mutex_destroy(&b->lock);
    free(b->words);
    free(b->nz);
    free(b->full);
    free(b);
}

int bj_bitmap_copy(struct bj_bitmap **out, struct bj_bitmap *src)
{
    if (!out || !src)
        return -EINVAL;
    *out = NULL;
    pthread_mutex_lock(&src->lock);
    struct bj_bitmap *b;
    int rc = bj_bitmap_new(&b, src->size, src->gran);
    if (rc == 0) {
        memcpy(b->words, src->words, src->nwords * sizeof(uint64_t));
        memcpy(b->nz, src->nz, src->nsum * sizeof(uint64_t));
        memcpy(b->full, src->full, src->nsum * sizeof(uint64_t));
        b->count = src->count;
        *out = b;
    }
    pthread_mutex_unlock(&src->lock);
    return rc;
}

uint64_t bj_bitmap_size(struct bj_bitmap *b)
{
    if (!b)
        return 0;
    pthread_mutex_lock(&b->lock);
    uint64_t s = b->size;
    pthread_mutex_unlock(&b->lock);
    return s;
}

uint64_t bj_bitmap_granularity(struct bj_bitmap *b)
{
    return b ? b->gran : 0; /* never changes after creation */
}

/* offset <= size and length <= size - offset (no overflow). */
static int range_ok(const struct bj_bitmap *b, uint64_t offset, uint64_t length)
{
    return offset <= b->size && length <= b->size - offset;
}

/* A range that starts and ends on a multiple of align (either may be size). */
static int range_aligned(const struct bj_bitmap *b, uint64_t offset, uint64_t length, uint64_t align)
{
    uint64_t end = offset + length;
    return (offset % align == 0 || offset == b->size) && (end % align == 0 || end == b->size);
}

int64_t bj_bitmap_set(struct bj_bitmap *b, uint64_t offset, uint64_t length)
{
    if (!b)
        return -EINVAL;
    int64_t rc = 0;
    pthread_mutex_lock(&b->lock);
    if (!range_ok(b, offset, length))
        rc = -EINVAL;
    else if (length) {
        uint64_t first = offset >> b->shift, last = (offset + length - 1) >> b->shift;
        rc = (int64_t)put_bits(b, first, last - first + 1, 1);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

/* Clear [offset, offset+length), validated by the caller. */
static uint64_t reset_locked(struct bj_bitmap *b, uint64_t offset, uint64_t length)
{
    if (!length)
        return 0;
    uint64_t first = offset >> b->shift;
    uint64_t end = granules_of(offset + length, b->shift);
    return put_bits(b, first, end - first, 0);
}

int64_t bj_bitmap_reset(struct bj_bitmap *b, uint64_t offset, uint64_t length)
{
    if (!b)
        return -EINVAL;
    int64_t rc;
    pthread_mutex_lock(&b->lock);
    if (!range_ok(b, offset, length))
        rc = -EINVAL;
    else if (!length)
        rc = 0;
    else if (!range_aligned(b, offset, length, b->gran))
        rc = -EINVAL;
    else
        rc = (int64_t)reset_locked(b, offset, length);
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int bj_bitmap_test(struct bj_bitmap *b, uint64_t offset)
{
    if (!b)
        return -EINVAL;
    int rc;
    pthread_mutex_lock(&b->lock);
    if (offset >= b->size) {
        rc = -EINVAL;
    } else {
        uint64_t i = offset >> b->shift;
        rc = (int)((b->words[i / 64] >> (i % 64)) & 1);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int64_t bj_bitmap_count(struct bj_bitmap *b)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    int64_t n = (int64_t)b->count;
    pthread_mutex_unlock(&b->lock);
    return n;
}

int64_t bj_bitmap_dirty_bytes(struct bj_bitmap *b)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    uint64_t n = b->count << b->shift;
    if (b->nbits) {
        uint64_t i = b->nbits - 1;
        uint64_t beyond = (b->nbits << b->shift) - b->size; /* unused tail */
        if ((b->words[i / 64] >> (i % 64)) & 1)
            n -= beyond;
    }
    pthread_mutex_unlock(&b->lock);
    return (int64_t)n;
}

/* next_dirty / next_clean with the lock held. */
static int64_t next_locked(struct bj_bitmap *b, uint64_t offset, int want)
{
    if (offset > b->size)
        return -EINVAL;
    if (offset == b->size) /* may be inside a partial last granule */
        return -ENOENT;
    uint64_t i = find_bit(b, offset >> b->shift, b->nbits, want);
    if (i >= b->nbits)
        return -ENOENT;
    uint64_t at = i << b->shift;
    return (int64_t)(at > offset ? at : offset);
}

int64_t bj_bitmap_next_dirty(struct bj_bitmap *b, uint64_t offset)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    int64_t rc = next_locked(b, offset, 1);
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int64_t bj_bitmap_next_clean(struct bj_bitmap *b, uint64_t offset)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    int64_t rc = next_locked(b, offset, 0);
    pthread_mutex_unlock(&b->lock);
    return rc;
}

static int area_locked(struct bj_bitmap *b, uint64_t offset, uint64_t max_len,
                       uint64_t *start, uint64_t *length)
{
    int64_t s = next_locked(b, offset, 1);
    if (s == -ENOENT)
        return 0;
    if (s < 0)
        return (int)s;
    uint64_t st = (uint64_t)s;
    /* Search for the run's end no further than st + max_len needs. */
    uint64_t cap = max_len < b->size - st ? st + max_len : b->size;
    uint64_t end_g = find_bit(b, st >> b->shift, granules_of(cap, b->shift), 0);
    uint64_t end = end_g << b->shift;
    if (end > cap)
        end = cap;
    *start = st;
    *length = end - st;
    return 1;
}

int bj_bitmap_next_dirty_area(struct bj_bitmap *b, uint64_t offset, uint64_t max_len,
                              uint64_t *start, uint64_t *length)
{
    if (!b || !start || !length)
        return -EINVAL;
    *start = *length = 0;
    if (!max_len)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    int rc = area_locked(b, offset, max_len, start, length);
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int bj_bitmap_take_dirty_area(struct bj_bitmap *b, uint64_t offset, uint64_t max_len,
                              uint64_t *start, uint64_t *length)
{
    if (!b || !start || !length)
        return -EINVAL;
    *start = *length = 0;
    if (max_len < b->gran)
        return -EINVAL;
    max_len &= ~(b->gran - 1);
    int rc;
    pthread_mutex_lock(&b->lock);
    if (offset > b->size || (offset % b->gran && offset != b->size)) {
        rc = -EINVAL;
    } else {
        rc = area_locked(b, offset, max_len, start, length);
        if (rc == 1)
            reset_locked(b, *start, *length);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

/* Lock two bitmaps in address order; a == b locks once. */
static void lock_pair(struct bj_bitmap *a, struct bj_bitmap *b)
{
    if (a == b) {
        pthread_mutex_lock(&a->lock);
    } else if ((uintptr_t)a < (uintptr_t)b) {
        pthread_mutex_lock(&a->lock);
        pthread_mutex_lock(&b->lock);
    } else {
        pthread_mutex_lock(&b->lock);
        pthread_mutex_lock(&a->lock);
    }
}

static void unlock_pair(struct bj_bitmap *a, struct bj_bitmap *b)
{
    pthread_mutex_unlock(&a->lock);
    if (a != b)
        pthread_mutex_unlock(&b->lock);
}

static int64_t combine(struct bj_bitmap *dst, struct bj_bitmap *src, int merge)
{
    if (!dst || !src)
        return -EINVAL;
    int64_t rc = 0;
    lock_pair(dst, src);
    if (dst->size != src->size || dst->gran != src->gran) {
        rc = -EINVAL;
    } else {
        uint64_t changed = 0;
        /* Only words with dirt in src can change dst: walk src's nz index.
         * For dst == src, put_word changes src->nz behind us, which is
         * harmless: a word is visited when found set and then cleared. */
        for (uint64_t w = sum_find(src->nz, 0, src->nwords, 1); w < src->nwords;
             w = sum_find(src->nz, w + 1, src->nwords, 1)) {
            uint64_t s = src->words[w];
            changed += put_word(dst, w, merge ? (dst->words[w] | s) : (dst->words[w] & ~s));
        }
        rc = (int64_t)changed;
    }
    unlock_pair(dst, src);
    return rc;
}

int64_t bj_bitmap_merge(struct bj_bitmap *dst, struct bj_bitmap *src)
{
    return combine(dst, src, 1);
}

int64_t bj_bitmap_subtract(struct bj_bitmap *dst, struct bj_bitmap *src)
{
    return combine(dst, src, 0);
}

int bj_bitmap_clear(struct bj_bitmap *b)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    memset(b->words, 0, b->nwords * sizeof(uint64_t));
    rebuild_index(b);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

int bj_bitmap_set_all(struct bj_bitmap *b)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    for (uint64_t w = 0; w < b->nwords; w++)
        b->words[w] = word_mask(b, w);
    rebuild_index(b);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

int bj_bitmap_resize(struct bj_bitmap *b, uint64_t size)
{
    if (!b)
        return -EINVAL;
    if (size > BJ_BITMAP_MAX_SIZE)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    uint64_t *words, *nz, *full, nbits, nwords, nsum;
    int rc = alloc_arrays(size, b->shift, &words, &nz, &full, &nbits, &nwords, &nsum);
    if (rc == 0) {
        uint64_t keep = nwords < b->nwords ? nwords : b->nwords;
        memcpy(words, b->words, keep * sizeof(uint64_t));
        free(b->words);
        free(b->nz);
        free(b->full);
        b->words = words;
        b->nz = nz;
        b->full = full;
        b->size = size;
        b->nbits = nbits;
        b->nwords = nwords;
        b->nsum = nsum;
        if (nwords)
            b->words[nwords - 1] &= word_mask(b, nwords - 1); /* drop cut granules */
        rebuild_index(b);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

/* Validate a serialization range; returns its first granule and count. */
static int ser_range(const struct bj_bitmap *b, uint64_t offset, uint64_t length,
                     uint64_t *first, uint64_t *n)
{
    if (!range_ok(b, offset, length) || !range_aligned(b, offset, length, b->gran * 8))
        return -EINVAL;
    *first = offset >> b->shift;
    *n = granules_of(offset + length, b->shift) - *first;
    if (!length)
        *n = 0;
    return 0;
}

int64_t bj_bitmap_serialized_size(struct bj_bitmap *b, uint64_t offset, uint64_t length)
{
    if (!b)
        return -EINVAL;
    uint64_t first, n;
    pthread_mutex_lock(&b->lock);
    int rc = ser_range(b, offset, length, &first, &n);
    pthread_mutex_unlock(&b->lock);
    return rc < 0 ? rc : (int64_t)((n + 7) / 8);
}

int64_t bj_bitmap_serialize(struct bj_bitmap *b, uint64_t offset, uint64_t length,
                            void *buf, size_t buf_len)
{
    if (!b || (!buf && buf_len))
        return -EINVAL;
    uint64_t first, n;
    int64_t rc;
    pthread_mutex_lock(&b->lock);
    rc = ser_range(b, offset, length, &first, &n);
    if (rc == 0) {
        uint64_t nbytes = (n + 7) / 8;
        if (buf_len < nbytes) {
            rc = -ENOBUFS;
        } else {
            /* first is a multiple of 8: byte k is bits first+8k.. of a word.
             * Bits past the range are past nbits (the range ends on a byte
             * boundary otherwise), hence 0. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            /* The words' bytes are already in qcow2 order. */
            if (nbytes) /* buf may be NULL when nbytes is 0 */
                memcpy(buf, (const unsigned char *)b->words + first / 8, (size_t)nbytes);
#else
            unsigned char *p = buf;
            for (uint64_t k = 0; k < nbytes; k++) {
                uint64_t i = first + 8 * k;
                p[k] = (unsigned char)(b->words[i / 64] >> (i % 64));
            }
#endif
            rc = (int64_t)nbytes;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

int64_t bj_bitmap_deserialize(struct bj_bitmap *b, uint64_t offset, uint64_t length,
                              const void *buf, size_t buf_len)
{
    if (!b || (!buf && buf_len))
        return -EINVAL;
    uint64_t first, n;
    int64_t rc;
    pthread_mutex_lock(&b->lock);
    rc = ser_range(b, offset, length, &first, &n);
    if (rc == 0 && n) {
        uint64_t nbytes = (n + 7) / 8, last = first + n - 1;
        const unsigned char *p = buf;
        if (buf_len < nbytes) {
            rc = -ENOBUFS;
        } else {
            for (uint64_t w = first / 64; w <= last / 64; w++) {
                unsigned lo = w == first / 64 ? (unsigned)(first % 64) : 0;
                unsigned hi = w == last / 64 ? (unsigned)(last % 64) : 63;
                uint64_t v = 0;
                /* lo is a multiple of 8; gather the word's bytes in range:
                 * byte j of the word is p[(w*64 + 8j - first) / 8]. */
                const unsigned char *src = p + (w * 64 + lo - first) / 8;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
                memcpy((unsigned char *)&v + lo / 8, src, hi / 8 - lo / 8 + 1);
#else
                for (unsigned j = lo / 8; j <= hi / 8; j++)
                    v |= (uint64_t)src[j - lo / 8] << (8 * j);
#endif
                uint64_t m = bits_mask(lo, hi); /* also drops padding bits */
                put_word(b, w, (b->words[w] & ~m) | (v & m));
            }
            rc = (int64_t)nbytes;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}
