#ifndef BJ_NBDSRV_H
#define BJ_NBDSRV_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* The NBD export's data path (nbdsrv.c): one session per client connection
 * in its transmission phase. Python (blkjobs.nbd.transmission) drives it:
 *
 *   bj_nbds_next    reads request headers (GIL released);
 *   bj_nbds_submit  queues READs and BLOCK_STATUS requests (base:allocation)
 *                   Python has checked and mapped (under the I/O lock, in
 *                   one batch) as segments of file descriptors: the
 *                   session's worker threads pread them into their own
 *                   buffer (holes of raw files found with SEEK_DATA/
 *                   SEEK_HOLE, not read) and send the reply (simple, or
 *                   structured with OFFSET_DATA / OFFSET_HOLE chunks; the
 *                   extents of a block status), in the order they finish;
 *   bj_nbds_send    sends a reply Python made (the other requests), whole,
 *                   under the same lock as the workers' replies;
 *   bj_nbds_recv    a WRITE's payload (bytes bj_nbds_next read ahead first);
 *   bj_nbds_wait_done  the tokens of reads done (bytes in a worker's
 *                   buffer, before the reply is sent), for Python to end
 *                   their tracking (its own thread: the reader may wait
 *                   for a Python worker that waits for such a read).
 *
 * Every function returns >= 0 or -errno; none crashes on what a client
 * sends (a bad magic, a DISC, a request Python refuses are Python's). */
struct bj_nbds;

/* A request header as read (magic checked by Python: a bad one ends it). */
struct bj_nbds_req {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t handle;
    uint64_t offset;
    uint32_t length;
};

/* sock: the connected socket (not closed by the session); structured:
 * structured replies negotiated; workers: threads (1..64), taken from the
 * process's pool as requests come (none for a session that reads
 * nothing). NULL: out of
 * memory (errno set). */
struct bj_nbds *bj_nbds_new(int sock, int structured, int workers);

/* Wait until request headers are there: up to max of them go to reqs (it
 * stops after a WRITE, whose payload follows, a DISC or a bad magic).
 * Returns their number, or -ECONNRESET at EOF, -errno on a socket error. */
int bj_nbds_next(struct bj_nbds *s, struct bj_nbds_req *reqs, int max);

/* Read exactly len bytes of the stream (after the headers bj_nbds_next
 * returned). 0 or -errno (-ECONNRESET at EOF). */
int bj_nbds_recv(struct bj_nbds *s, void *buf, uint64_t len);

/* Queue nreq reads and block status requests. reqs: 6 words each
 * (handle, offset, length, flags, token, number of segments); flags: the
 * request's NBD flags (bits 0-15), its command (bits 16-31: NBD_CMD_READ
 * 0, or NBD_CMD_BLOCK_STATUS 7 -- structured replies only) and, for block
 * status, the id of its meta context base:allocation (bits 32-63); for a
 * READ, BJ_NBDS_STABLE (bit 32: it may be sent zero-copy, below). segs:
 * 4 words per segment (kind, fd, host offset, length), the requests'
 * segments one after the other, covering each request's length in order.
 * kind: BJ_NBDS_DATA (a raw file: bytes past its end are an error, EIO;
 * its holes, found with SEEK_DATA/SEEK_HOLE, are holes), BJ_NBDS_DATA_PAD
 * (qcow2 data clusters: data; bytes past the end of the file read as
 * zeroes, clusters preallocated past EOF), BJ_NBDS_ZERO (zeroes, fd
 * unused).
 *
 * A READ goes out as a simple reply, or structured: with DF one
 * OFFSET_DATA chunk, else OFFSET_DATA chunks for data and OFFSET_HOLE
 * chunks for zero segments and file holes (not read). A BLOCK_STATUS
 * goes out as one BLOCK_STATUS chunk of extents: data 0, zeroes and holes
 * HOLE|ZERO, neighbours with equal flags merged, at most one with
 * NBD_CMD_FLAG_REQ_ONE, else 65536.
 *
 * Then waits until half the workers (at least one) are free and returns
 * the number of free workers; -EINVAL (segments that do not add up, an
 * unknown command: nothing queued), -ENOMEM, -EAGAIN (not one worker
 * thread could be started: nothing queued). */
int bj_nbds_submit(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                   int nsegs);
/* The same without the wait: the number of free workers now (maybe 0).
 * For the last reads of a batch: the caller's next planning waits for a
 * free worker anyway (bj_nbds_wait_slots), so it need not be woken here
 * -- a wake-up less per batch. */
int bj_nbds_queue(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                  int nsegs);
/* Serve one such request (reqs: its 6 words) in the caller's thread, as
 * a worker would, and no thread woken for it: a batch of one READ or
 * BLOCK_STATUS (nbdinfo's read, a client waiting for each reply) costs no
 * hand-off to a worker and none to the reaper. The token is the caller's
 * to end: 1 and *token once the reply is out; 0 when a wait for the
 * socket (a client not reading) handed it to the reaper first, as a
 * worker's -- the tracking of a read never waits for its client. -EINVAL,
 * -ENOMEM: nothing served. */
int bj_nbds_serve_one(struct bj_nbds *s, const uint64_t *req, const uint64_t *segs, int nsegs,
                      uint64_t *token);

/* Send n buffers as one reply (whole, under the send lock). 0 or -errno
 * (the session is then broken: the socket is shut down). */
int bj_nbds_send(struct bj_nbds *s, const void *const *bufs, const size_t *lens, int n);

/* Wait until every queued read is finished (its reply sent or dropped). */
void bj_nbds_wait_idle(struct bj_nbds *s);

/* Tokens of reads whose bytes were read (the reply may still be on its
 * way; up to maxdone into done): waits until there are DONE_BATCH (16) of
 * them, or some and none in flight, or some and a worker about to wait
 * for the socket or the send lock; returns 0 once bj_nbds_stop_done was
 * called and none is left. */
int bj_nbds_wait_done(struct bj_nbds *s, uint64_t *done, int maxdone);
void bj_nbds_stop_done(struct bj_nbds *s);

/* The process's reaper, instead of one bj_nbds_wait_done caller per
 * session: bj_nbds_global (before the first submit) makes the tokens of
 * session s go to bj_nbds_reap, one thread's for every such session: it
 * waits until a session has tokens to take (the same moments as
 * bj_nbds_wait_done's) and returns them, up to maxdone in done, by
 * session: the number of sessions (runs), each run's session (a struct
 * bj_nbds * as an integer) in keys and its number of tokens in counts
 * (keys and counts have room for maxdone), its tokens next in done -- or
 * 0 once bj_nbds_reap_stop(1) was called and none is queued; after ending
 * those reads the caller calls bj_nbds_reaped. bj_nbds_drain (at a
 * session's end, after bj_nbds_wait_idle): stops the session's workers
 * (they go back to the pool), waits until the reaper's batch with tokens
 * of s (if any) is reaped, and returns the tokens of s still to take (up
 * to maxdone: call again until 0), for the caller to end; then
 * bj_nbds_free. */
void bj_nbds_global(struct bj_nbds *s);
int bj_nbds_reap(uint64_t *keys, uint32_t *counts, uint64_t *done, int maxdone);
void bj_nbds_reaped(void);
void bj_nbds_reap_stop(int stop);
int bj_nbds_drain(struct bj_nbds *s, uint64_t *done, int maxdone);

/* Wait until a worker is free; the number of free workers. The caller
 * plans (tracks, pins) and submits no more reads than that: a planned
 * read is read at once, and none waits tracked behind workers stuck
 * sending to a client that does not read. */
int bj_nbds_wait_slots(struct bj_nbds *s);

/* Wait until want workers are free, or half of them (at least one) if
 * fewer: a caller with want reads to plan plans them in fewer, larger
 * chunks (one planning and one submit per chunk). The number free. */
int bj_nbds_wait_free(struct bj_nbds *s, int want);

/* Reads queued and not finished. */
int bj_nbds_inflight(struct bj_nbds *s);

/* Zero-copy reads (docs/nbd.md, "Zero-copy reads"). A READ whose flags
 * word has BJ_NBDS_STABLE (bit 32; Python's promise that its files cannot
 * change until bj_nbds_zc_busy says 0) may go out with sendfile on an
 * AF_UNIX socket, when its data is inside its files, in the page cache and
 * not O_DIRECT; else as any read.
 *
 * bj_nbds_zc_busy: 1 while stable reads are queued or being sent, or the
 * socket holds bytes the peer has not read (SIOCOUTQ), else 0; -errno.
 * bj_nbds_zc_revoke: no zero-copy any more on this session (stable reads
 * queued go the pread way). bj_nbds_zc_stats: out[0] the data bytes sent
 * zero-copy, out[1] the reads. bj_nbds_outq: the bytes of socket sock its
 * peer has not read yet (SIOCOUTQ), or -errno. */
int bj_nbds_zc_busy(struct bj_nbds *s);
void bj_nbds_zc_revoke(struct bj_nbds *s);
void bj_nbds_zc_stats(struct bj_nbds *s, uint64_t *out);
int64_t bj_nbds_outq(int sock);

/* The worker threads are one pool for the process: a session takes them
 * as its requests come, and they go back parked when it ends (at most 64
 * parked; more end). bj_nbds_pool_idle: the threads parked now;
 * bj_nbds_pool_trim: end (and join) parked threads until keep are left
 * (the tests; a program about to exit); returns those left. */
int bj_nbds_pool_idle(void);
int bj_nbds_pool_trim(int keep);

/* Stop the workers (after finishing what is queued) and free the session.
 * The tokens of reads finished meanwhile must have been taken first
 * (bj_nbds_wait_idle, bj_nbds_stop_done, bj_nbds_wait_done until 0). */
void bj_nbds_free(struct bj_nbds *s);

/* -- the handshake's common options, answered in C --------------------------
 *
 * bj_nbdh_step runs the fixed-newstyle handshake (no TLS) as far as it can
 * alone: the greeting and the client's flags (the first call), then the
 * options it knows an answer to without the block graph -- STRUCTURED_REPLY
 * (first time, no payload: ACK), SET_META_CONTEXT of exactly
 * base:allocation for an export in names (META_CONTEXT 1 and ACK),
 * LIST_META_CONTEXT of an export without bitmaps with no query, "base:" or
 * "base:allocation" (META_CONTEXT 0 base:allocation and ACK) -- and
 * NBD_OPT_GO or NBD_OPT_INFO for an export in names, well formed: taken from
 * the stream and returned for the caller to answer (and attach). Anything
 * else -- LIST, ABORT, EXPORT_NAME, STARTTLS, an unknown option, an unknown
 * export, other meta contexts, a malformed or too long option --
 * is left at buf[rpos] (its header complete or not) for the caller's own
 * handshake code, which calls again after answering it. So what a client
 * sees is the same bytes either way.
 *
 * buf/cap: the caller's read-ahead buffer (bytes [rpos, rlen) not taken
 * yet; recv fills it, after moving those to its start). names: the
 * exports' names, each as a 4-byte big-endian length, its bytes, then a
 * flags byte (BJ_NBDH_EXPORT_BITMAPS: it has dirty-bitmap contexts).
 * Replies are sent before the next recv and before returning. */
struct bj_nbdh {
    uint32_t rpos, rlen;
    /* BJ_NBDH_* bits below */
    uint32_t state;
    /* the export (index in names) base:allocation was set for; -1 none */
    int32_t ctx_export;
    /* returned GO or INFO: the export's index in names, the NBD_INFO_*
     * types asked (bit t for type t < 32) */
    int32_t go_export;
    uint32_t go_info;
};

/* Returns BJ_NBDH_GO, BJ_NBDH_INFO, BJ_NBDH_OPTION (the next option is the caller's),
 * BJ_NBDH_HANGUP (unknown client flags: close), or -errno (-ECONNRESET at
 * EOF; -EAGAIN: the socket's SO_RCVTIMEO/SO_SNDTIMEO ran out). */
int bj_nbdh_step(int sock, struct bj_nbdh *h, unsigned char *buf, uint32_t cap,
                 const unsigned char *names, uint32_t names_len);

/* The handshake's time limit on each receive and send of sock
 * (SO_RCVTIMEO and SO_SNDTIMEO; 0: none). 0 or -errno. */
int bj_nbdh_timeouts(int sock, uint64_t usec);
/* cdef-end */

#define BJ_NBDH_GREETED 1u
#define BJ_NBDH_NO_ZEROES 2u
#define BJ_NBDH_STRUCTURED 4u
#define BJ_NBDH_BASE_ALLOC 8u

#define BJ_NBDH_GO 1
#define BJ_NBDH_OPTION 0
#define BJ_NBDH_HANGUP 2
#define BJ_NBDH_INFO 3
#define BJ_NBDH_EXPORT_BITMAPS 1u

#define BJ_NBDS_DATA 0
#define BJ_NBDS_DATA_PAD 1
#define BJ_NBDS_ZERO 2
/* a READ's flags word: stable (bj_nbds_zc_busy) */
#define BJ_NBDS_STABLE (1ull << 32)

#endif
