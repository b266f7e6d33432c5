/* Write structures for a page-cache raw -> raw copy, outside the engine
 * (benchmarks/README.md, "Issue 15, part 7"): N threads claim 2 MiB
 * requests of SRC, map them (mmap MAP_POPULATE, as csrc/copy.c does) and
 * write them to DST in one of these ways:
 *   0  per 256 KiB piece: touch it (a stand-in for the zero scan), then
 *      pwrite it under one write lock (csrc/copy.c's structure)
 *   1  DST mapped too, memcpy in parallel, write faults one page at a time
 *   2  as 1, the DST range first populated (MADV_POPULATE_WRITE)
 *   4  the whole request touched, one 2 MiB pwrite under the lock
 *   5  the lock held for the whole request, pieces touched and written in it
 *   6  the whole request touched outside the lock, its pieces written in it
 *   7  as 0, the source mapped once (whole file), each request populated
 *      with MADV_POPULATE_READ and released with MADV_DONTNEED instead of
 *      mmap/munmap (which take the process's mmap lock for writing)
 * Prints wall, user and system seconds. Not a copier: no zero detection,
 * DST is created at SRC's size, whose size must be a multiple of 256 KiB.
 *
 *   cc -O2 -pthread -o /var/tmp/write_structure benchmarks/write_structure.c
 *   /var/tmp/write_structure SRC DST MODE THREADS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdatomic.h>
#include <time.h>
#include <sys/resource.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static int sfd, dfd, mode; static uint64_t size; static atomic_ulong next;
static char *whole;
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
static pthread_mutex_t wl = PTHREAD_MUTEX_INITIALIZER;
#define REQ (2u<<20)
#define PIECE (256u<<10)
static void *w(void *a) {
  (void)a;
  for (;;) {
    uint64_t off = atomic_fetch_add(&next, REQ);
    if (off >= size) break;
    uint64_t len = size - off < REQ ? size - off : REQ;
    char *s;
    if (mode == 7) { s = whole + off; if (madvise(s, len, MADV_POPULATE_READ)) { perror("pop"); exit(1);} }
    else s = mmap(NULL, len, PROT_READ, MAP_SHARED|MAP_POPULATE, sfd, off);
    if (s == MAP_FAILED) { perror("mmap"); exit(1); }
    if (mode == 5) {
      pthread_mutex_lock(&wl);
      for (uint64_t p = 0; p < len; p += PIECE) {
        volatile char x = 0; for (uint64_t q = 0; q < PIECE; q += 64) x += s[p+q];
        if (pwrite(dfd, s + p, PIECE, off + p) != PIECE) { perror("pwrite"); exit(1);}
      }
      pthread_mutex_unlock(&wl);
    } else if (mode == 6) {
      volatile char x = 0; for (uint64_t q = 0; q < len; q += 64) x += s[q];
      pthread_mutex_lock(&wl);
      for (uint64_t p = 0; p < len; p += PIECE)
        if (pwrite(dfd, s + p, PIECE, off + p) != PIECE) { perror("pwrite"); exit(1);}
      pthread_mutex_unlock(&wl);
    } else if (mode == 4) {
      volatile char x = 0; for (uint64_t p = 0; p < len; p += 4096) x += s[p];
      pthread_mutex_lock(&wl);
      if (pwrite(dfd, s, len, off) != (ssize_t)len) { perror("pwrite"); exit(1);}
      pthread_mutex_unlock(&wl);
    } else if (mode == 0 || mode == 7) {
      for (uint64_t p = 0; p < len; p += PIECE) {
        volatile char x = 0; for (uint64_t q = 0; q < PIECE; q += 64) x += s[p+q];
        pthread_mutex_lock(&wl);
        if (pwrite(dfd, s + p, PIECE, off + p) != PIECE) { perror("pwrite"); exit(1);}
        pthread_mutex_unlock(&wl);
      }
    } else {
      char *d = mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, dfd, off);
      if (d == MAP_FAILED) { perror("mmap d"); exit(1); }
      if (mode == 2 && madvise(d, len, MADV_POPULATE_WRITE)) { perror("madvise"); exit(1); }
      for (uint64_t p = 0; p < len; p += PIECE) memcpy(d + p, s + p, PIECE);
      munmap(d, len);
    }
    if (mode == 7) madvise(s, len, MADV_DONTNEED); else munmap(s, len);
  }
  return NULL;
}
int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: %s SRC DST MODE THREADS\n", argv[0]); return 2; }
  mode = atoi(argv[3]); int n = atoi(argv[4]);
  if (n < 1 || n > 64) { fprintf(stderr, "THREADS: 1..64\n"); return 2; }
  sfd = open(argv[1], O_RDONLY); struct stat st;
  if (sfd < 0 || fstat(sfd, &st) < 0) { perror(argv[1]); return 1; }
  size = st.st_size;
  dfd = open(argv[2], O_RDWR|O_CREAT|O_TRUNC, 0644);
  if (dfd < 0 || ftruncate(dfd, size) < 0) { perror(argv[2]); return 1; }
  if (mode == 7 && (whole = mmap(NULL, size, PROT_READ, MAP_SHARED, sfd, 0)) == MAP_FAILED) { perror("mmap"); return 1; }
  struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  pthread_t t[64]; for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, w, NULL);
  for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  printf("mode %d threads %d wall %.3f user %.3f sys %.3f\n", mode, n, (t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)/1e9,
    ru.ru_utime.tv_sec+ru.ru_utime.tv_usec/1e6, ru.ru_stime.tv_sec+ru.ru_stime.tv_usec/1e6);
  return 0;
}
