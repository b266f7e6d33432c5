/* Tests of csrc/ioloop.c's buffers: a loop's request buffers outlive it and
 * the next loop of the same request size takes them back (the pages stay
 * where they are, none is faulted in again), a loop of another size gets
 * its own, and bj_ioloop_release_buffers() frees the kept ones. Why it
 * matters is in ioloop.c: a buffer freed and faulted anew at once comes back
 * on the pages just freed, in reverse order, physically scattered. */
#include "check.h"
#include "ioloop.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#define BS (8u << 20)   /* 2,048 pages: far above a loop's other faults */

static long minflt(void)
{
    struct rusage ru;
    CHECK_EQ(getrusage(RUSAGE_SELF, &ru), 0);
    return ru.ru_minflt;
}

/* Page faults taken by starting a loop of bs over fd (workers allocate and
 * touch their buffers in bj_ioloop_new), after which it runs and is freed. */
static long faults_of_loop(int fd, uint64_t bs)
{
    struct bj_ioloop_opts o = {.fd = fd, .write = 1, .random = 0, .threads = 1,
                               .bs = bs, .size = bs, .fsync_end = 0, .seed = 3};
    struct bj_ioloop *b = NULL;
    long before = minflt();
    CHECK_EQ(bj_ioloop_new(&b, &o), 0);
    long faults = minflt() - before;
    int rc;
    while ((rc = bj_ioloop_run(b, 1000)) == 2)
        ;
    CHECK_EQ(rc, 0);
    struct bj_ioloop_result r;
    bj_ioloop_get_result(b, &r);
    CHECK_EQ(r.ops, 1);
    CHECK_EQ(r.bytes, bs);
    bj_ioloop_free(b);
    return faults;
}

static void test_buffers_are_kept(void)
{
    char path[] = "/tmp/bj-test-ioloop.XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK_EQ(ftruncate(fd, BS), 0);
    const long pages = BS / 4096;
    /* the first loop faults its whole buffer in */
    long first = faults_of_loop(fd, BS);
    CHECK(first >= pages);
    /* the second takes the first's buffer: no page of it is faulted again */
    long second = faults_of_loop(fd, BS);
    CHECK(second < pages / 4);
    /* another size: a buffer of its own */
    long other = faults_of_loop(fd, BS / 2);
    CHECK(other >= pages / 2);
    /* released: the next loop faults a new buffer in */
    bj_ioloop_release_buffers();
    long after = faults_of_loop(fd, BS);
    CHECK(after >= pages);
    bj_ioloop_release_buffers();
    bj_ioloop_release_buffers();   /* twice: nothing left to free */
    close(fd);
}

int main(void)
{
    test_buffers_are_kept();
    puts("test_ioloop: ok");
    return 0;
}
