/* What the physical layout of a 1 MiB O_DIRECT buffer costs, and where a
 * layout comes from (benchmarks/README.md, "Why blkjobs' 1 MiB writes were
 * 9% slower"). Linux, root (page frame numbers in /proc/self/pagemap).
 *
 *   cc -O2 -o /tmp/buffer_segments benchmarks/buffer_segments.c
 *   /tmp/buffer_segments cost FILE [REQUESTS]   # FILE: >= 1 GiB, laid out
 *   /tmp/buffer_segments refault [DRAIN_MIB]
 *
 * cost: 1 MiB O_DIRECT writes over the first GiB of FILE from five buffers
 * in turn, each made of the 256 pages of one transparent huge page moved
 * (mremap, a page at a time) into an order giving 1, 16, 128, 254 or 256
 * physically contiguous runs; prints each buffer's segments and its p10,
 * p50, p90 latency (REQUESTS each, default 400).
 *
 * refault: faults a 1 MiB buffer in (4 KiB pages, in order), prints its
 * segments, frees it and at once faults the next, six times; DRAIN_MIB
 * first faults that many MiB so that the CPU's free list is refilled. Run
 * it pinned (taskset -c 0) to keep to one CPU's list. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BS (1u << 20)
#define PG 4096u
#define NPG (BS / PG)
#define HUGE (2u << 20)

static void die(const char *what)
{
    fprintf(stderr, "buffer_segments: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Physically contiguous runs of the 256 pages at buf; -1 without PFNs. */
static int segments(const void *buf)
{
    uint64_t e[NPG], prev = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        die("/proc/self/pagemap");
    ssize_t n = pread(fd, e, sizeof e, (off_t)((uintptr_t)buf / PG * 8));
    close(fd);
    if (n != (ssize_t)sizeof e)
        die("reading /proc/self/pagemap");
    int s = 0;
    for (unsigned i = 0; i < NPG; i++) {
        uint64_t pfn = e[i] & ((1ull << 55) - 1);
        if (!pfn)
            return -1; /* not root: the kernel hides the frame numbers */
        if (i == 0 || pfn != prev + 1)
            s++;
        prev = pfn;
    }
    return s;
}

static void *map(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

/* A buffer whose page i is page order[i] of one transparent huge page. */
static char *build(const unsigned *order)
{
    char *m = map(2 * HUGE);
    char *h = (char *)(((uintptr_t)m + HUGE - 1) & ~((uintptr_t)HUGE - 1));
    if (madvise(h, HUGE, MADV_HUGEPAGE) < 0)
        die("madvise(MADV_HUGEPAGE)");
    memset(h, 0x5a, HUGE);
    char *dst = map(BS);
    for (unsigned i = 0; i < NPG; i++)
        if (mremap(h + (size_t)order[i] * PG, PG, PG, MREMAP_MAYMOVE | MREMAP_FIXED,
                   dst + (size_t)i * PG) == MAP_FAILED)
            die("mremap");
    return dst;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cost(const char *path, int n)
{
    int fd = open(path, O_WRONLY | O_DIRECT);
    if (fd < 0)
        die(path);
    if (lseek(fd, 0, SEEK_END) < (off_t)1 << 30) {
        fprintf(stderr, "buffer_segments: %s: needs at least 1 GiB\n", path);
        return 1;
    }
    /* contiguous run length per buffer; 0: 254 segments (pages 0-2 in
     * order, then 255 down to 3) */
    const unsigned runs[5] = {256, 16, 2, 0, 1};
    char *bufs[5];
    int segs[5];
    uint64_t *lat[5];
    for (int k = 0; k < 5; k++) {
        unsigned order[NPG];
        if (runs[k] == 0) {
            for (unsigned i = 0; i < NPG; i++)
                order[i] = i < 3 ? i : NPG + 2 - i;
        } else { /* blocks of runs[k] pages in order, the blocks in reverse */
            unsigned len = runs[k], nb = NPG / len;
            for (unsigned b = 0; b < nb; b++)
                for (unsigned j = 0; j < len; j++)
                    order[b * len + j] = (nb - 1 - b) * len + j;
        }
        bufs[k] = build(order);
        segs[k] = segments(bufs[k]);
        lat[k] = calloc((size_t)n, sizeof(uint64_t));
        if (!lat[k])
            die("calloc");
    }
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 5; k++) {
            int b = (k + i) % 5; /* each buffer takes each place in turn */
            off_t off = (off_t)(((uint64_t)i * 5 + (uint64_t)k) % 1024) * BS;
            uint64_t t0 = now_ns();
            if (pwrite(fd, bufs[b], BS, off) != (ssize_t)BS)
                die("pwrite");
            lat[b][i] = now_ns() - t0;
        }
    }
    for (int k = 0; k < 5; k++) {
        qsort(lat[k], (size_t)n, sizeof(uint64_t), cmp);
        printf("%3d segments: p50 %6.1f us  p10 %6.1f  p90 %6.1f\n", segs[k],
               (double)lat[k][n / 2] / 1e3, (double)lat[k][n / 10] / 1e3,
               (double)lat[k][9 * n / 10] / 1e3);
        free(lat[k]);
    }
    close(fd);
    return 0;
}

static int refault(size_t drain_mib)
{
    if (drain_mib) {
        char *d = map(drain_mib << 20);
        madvise(d, drain_mib << 20, MADV_NOHUGEPAGE);
        memset(d, 1, drain_mib << 20);
    }
    for (int i = 0; i < 6; i++) {
        char *b = map(BS);
        madvise(b, BS, MADV_NOHUGEPAGE);
        memset(b, 1, BS);
        printf("%d ", segments(b));
        munmap(b, BS);
    }
    printf("\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "cost"))
        return cost(argv[2], argc > 3 ? atoi(argv[3]) : 400);
    if (argc >= 2 && !strcmp(argv[1], "refault"))
        return refault(argc > 2 ? (size_t)atol(argv[2]) : 0);
    fprintf(stderr, "usage: buffer_segments cost FILE [REQUESTS] | refault [DRAIN_MIB]\n");
    return 2;
}
