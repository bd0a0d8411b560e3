"""The disk tier's per-block I/O loop in C: a batch's blocks written or read, and
checksummed, without the GIL between one block and the next.

In Python each block is several GIL hand-offs: the thread takes the GIL back after its
``pwritev`` returns, again after its checksum, again after its header write. On a
machine whose CPUs are shared (more runnable threads than cores) a thread that holds
the GIL can be preempted, and then every other I/O thread that finished a request
waits for it before it may issue its next one: the device sits idle behind the GIL.
fio's threads never meet. Here a batch is one ``ctypes`` call (the GIL released for
all of it): the calling thread and ``io_threads - 1`` threads started in C take blocks
from a shared counter until none is left, so ``io_threads`` requests stay in flight
(fio's ``numjobs``) and the GIL is taken back once per batch, not a few times per
block. (Pool threads each making the call would each need the GIL to start and to
return: with a busy Python thread in the process, up to a switch interval apiece.)
Per block the loop does what the Python path does, in the same order:

- write: invalidate the old header if it may be valid, write the data, checksum the
  bytes written (xxHash's own function, the one ``_xxh`` checked), put the checksum
  into the header Python packed for the block, seal the header with its own checksum,
  write it. A block whose data write failed or came back short gets no header. Into a
  slot of a file the tier created and never wrote (its header page zeros), the data
  goes with a zeroed header page in one request (``inval`` 2): ext4 converts the
  slot's unwritten extent once, and the header write after it overwrites written space.
- read: read the data, checksum it. Python compares the checksum with the index's.

The requests go through the kernel's AIO (``AIO``; one context per thread, kept in a
process-wide pool): a thread submits a block's data write and checksums the same bytes
while the device takes them, then reaps the write and only then submits the header,
which it reaps with the next block's data (the last one before the call returns); a
recycled slot's invalidation is submitted while the block before it is in flight and
reaped before the slot's data is submitted. So each step of a block still starts only
once the one before it is complete, but none of the three waits alone: per thread one
data request, one header and one invalidation may be in flight together. Reading, a
thread submits its next block as soon as the last one is back and checksums that one
while the next is in flight. Each thread has one data request in flight at a time
(fio's ``psync`` jobs). Where AIO is missing or refused, a request is a plain
``pread``/``pwrite``.

Every outcome comes back per block (the stage that failed and its errno), and Python
updates the index and the counters exactly as on its own path. The source is
compiled once per process with the system's C compiler (``kvbm._cc``); without one,
or if the loaded loop seals a test header differently from ``pack_header``, the
tier keeps its Python loop.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm import _cc
from kvbm.blockfile import HEADER_BYTES, HEADER_USED, BlockHeader, pack_header

from . import _xxh

log = logging.getLogger("kvbm.disk")

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<linux/aio_abi.h>) && defined(SYS_io_setup)
#include <linux/aio_abi.h>
#define KVBM_AIO 1
#endif
#endif

typedef uint64_t (*hash_fn)(const void *, size_t);

/* status: 0, or stage << 32 | errno (errno 0: a short transfer) */
static int64_t fail(int64_t stage, ssize_t got) {
    return (stage << 32) | (uint32_t)(got < 0 ? errno : 0);
}

/* A thread's requests through the kernel's AIO (its own context): up to three in
 * flight, one per kind (a block's data, the header of the block before it, the
 * invalidation of the block after it), each told apart by its tag. Without AIO (or
 * when a submit is refused) the same request is made with pread/pwrite. */
enum { T_DATA, T_HDR, T_INV, T_KINDS };

struct aio {
#ifdef KVBM_AIO
    aio_context_t ctx;
    struct iocb cb[T_KINDS];
#endif
    int busy[T_KINDS];    /* submitted, result not yet taken */
    int got[T_KINDS];     /* reaped (its result in res) */
    int64_t res[T_KINDS]; /* bytes, or -errno */
    int on;
};

/* Contexts are kept for the process's life and handed from batch to batch: making
 * one is cheap, but io_destroy waits for an RCU grace period (about 30 ms here), which
 * per thread and batch cost more than the overlap gained. A context goes back to the
 * pool only with nothing in flight (every request reaped). */
#ifdef KVBM_AIO
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static aio_context_t pool[256];
static int pooled;
static pid_t pool_pid; /* a forked child's contexts are not its own: it starts afresh */
#endif

static void aio_open(struct aio *a, int64_t want) {
    a->on = 0;
    memset(a->busy, 0, sizeof a->busy);
    memset(a->got, 0, sizeof a->got);
#ifdef KVBM_AIO
    if (!want) return;
    a->ctx = 0;
    pthread_mutex_lock(&pool_lock);
    if (pool_pid != getpid()) { pooled = 0; pool_pid = getpid(); }
    if (pooled) { a->ctx = pool[--pooled]; a->on = 1; }
    pthread_mutex_unlock(&pool_lock);
    if (!a->on && syscall(SYS_io_setup, 2 * T_KINDS, &a->ctx) == 0) a->on = 1;
#else
    (void)want;
#endif
}

/* After requests that could not be reaped: io_destroy waits for them, so their buffers
 * are the caller's again; their outcome is unknown, so each counts as failed (errno e).
 * The thread goes on without AIO. */
static void aio_drop(struct aio *a, int e) {
#ifdef KVBM_AIO
    if (a->on) syscall(SYS_io_destroy, a->ctx);
#endif
    a->on = 0;
    for (int t = 0; t < T_KINDS; t++)
        if (a->busy[t] && !a->got[t]) { a->got[t] = 1; a->res[t] = -e; }
}

static void aio_close(struct aio *a) {
#ifdef KVBM_AIO
    if (a->on) {
        pthread_mutex_lock(&pool_lock);
        int kept = pooled < 256 && pool_pid == getpid();
        if (kept) pool[pooled++] = a->ctx;
        pthread_mutex_unlock(&pool_lock);
        if (!kept) syscall(SYS_io_destroy, a->ctx);
    }
#endif
    a->on = 0;
}

/* 1: submitted (take its result with aio_take); 0: not (do it synchronously). op: 0 read,
 * 1 write, 2 vectored write (buf: an iovec array of len entries, copied at submit) */
static int aio_start(struct aio *a, int tag, int op, int64_t fd, int64_t buf, int64_t len,
                     int64_t off) {
#ifdef KVBM_AIO
    if (!a->on) return 0;
    struct iocb *cb = &a->cb[tag];
    memset(cb, 0, sizeof *cb);
    cb->aio_data = (uint64_t)tag;
    cb->aio_lio_opcode = op == 2 ? IOCB_CMD_PWRITEV : op ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)buf;
    cb->aio_nbytes = (uint64_t)len;
    cb->aio_offset = off;
    struct iocb *list[1] = {cb};
    if (syscall(SYS_io_submit, a->ctx, 1, list) != 1) return 0;
    a->busy[tag] = 1;
    a->got[tag] = 0;
    return 1;
#else
    (void)a; (void)tag; (void)op; (void)fd; (void)buf; (void)len; (void)off;
    return 0;
#endif
}

/* The result of the request of kind `tag` (submitted), as pread/pwrite's (bytes, or -1
 * with errno set); the thread's other requests that complete meanwhile are reaped too. */
static ssize_t aio_take(struct aio *a, int tag) {
#ifdef KVBM_AIO
    while (!a->got[tag]) {
        struct io_event ev[T_KINDS];
        long r = syscall(SYS_io_getevents, a->ctx, 1, T_KINDS, ev, NULL);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) { aio_drop(a, r < 0 ? errno : EIO); break; }
        for (long k = 0; k < r; k++) {
            int t = (int)ev[k].data;
            if (t >= 0 && t < T_KINDS) { a->got[t] = 1; a->res[t] = ev[k].res; }
        }
    }
#endif
    a->busy[tag] = 0;
    a->got[tag] = 0;
    if (a->res[tag] < 0) { errno = (int)-a->res[tag]; return -1; }
    return (ssize_t)a->res[tag];
}

void kvbm_disk_seal(char *hp, uint64_t sum, int64_t sum_at, int64_t used, hash_fn h) {
    memcpy(hp + sum_at, &sum, 8);
    uint64_t hs = h(hp, (size_t)used);
    memcpy(hp + used, &hs, 8);
}

static int64_t take(int64_t *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }

/* Per block, in this order: the old header invalidated (where it may be valid), the data,
 * the header. Each step starts only once the one before it is complete (reaped), so a
 * valid header is never on disk over data other than its own. With AIO nothing of
 * that waits on its own: block i's invalidation was submitted while the block before
 * it was in flight, and i's header is reaped with the next block's data (or at the
 * end, before the call returns): i's data, i-1's header and i+1's invalidation are in
 * flight together, and the thread checksums i meanwhile. */
int64_t kvbm_disk_write(int64_t n, int64_t *next, const int64_t *fd, const int64_t *buf,
                        const int64_t *len, const int64_t *doff, const int64_t *hoff,
                        const int64_t *inval, int64_t hashed, const char *zero,
                        char *headers, int64_t page, int64_t sum_at, int64_t used,
                        hash_fn h, uint64_t *sums, int64_t *status, int64_t use_aio,
                        int64_t *async_done) {
    int64_t done = 0, async = 0, hi = -1; /* hi: the block whose header is in flight */
    struct aio a;
    aio_open(&a, use_aio);
    int64_t i = take(next);
    int iv = i < n && inval[i] == 1 && aio_start(&a, T_INV, 1, fd[i], (int64_t)zero, page, hoff[i]);
    while (i < n) {
        done++;
        int64_t j = -1;
        ssize_t got;
        uint64_t s;
        int out, fresh;
        int64_t want;
        struct iovec iov[2];
        char *hp;
        if (inval[i] == 1) {
            got = iv ? aio_take(&a, T_INV) : pwrite((int)fd[i], zero, (size_t)page, hoff[i]);
            if (got != page) { status[i] = fail(1, got); goto next; }
        }
        /* a fresh slot (inval 2): its zeroed header page and its data in one request */
        fresh = inval[i] == 2;
        want = fresh ? page + len[i] : len[i];
        iov[0].iov_base = (void *)zero;
        iov[0].iov_len = (size_t)page;
        iov[1].iov_base = (void *)buf[i];
        iov[1].iov_len = (size_t)len[i];
        out = fresh ? aio_start(&a, T_DATA, 2, fd[i], (int64_t)iov, 2, hoff[i])
                    : aio_start(&a, T_DATA, 1, fd[i], buf[i], len[i], doff[i]);
        j = take(next);
        iv = j < n && inval[j] == 1 && aio_start(&a, T_INV, 1, fd[j], (int64_t)zero, page, hoff[j]);
        if (out) {
            /* the bytes handed to the kernel, checksummed while it writes them */
            s = h((const void *)buf[i], (size_t)hashed);
            got = aio_take(&a, T_DATA);
            async++;
        } else {
            got = fresh ? pwritev((int)fd[i], iov, 2, hoff[i])
                        : pwrite((int)fd[i], (const void *)buf[i], (size_t)len[i], doff[i]);
            s = got == want ? h((const void *)buf[i], (size_t)hashed) : 0;
        }
        if (got != want) { status[i] = fail(2, got); goto next; }
        sums[i] = s;
        if (!headers) { status[i] = 0; goto next; }
        hp = headers + i * page;
        kvbm_disk_seal(hp, s, sum_at, used, h);
        if (hi >= 0) { got = aio_take(&a, T_HDR); status[hi] = got == page ? 0 : fail(3, got); hi = -1; }
        if (aio_start(&a, T_HDR, 1, fd[i], (int64_t)hp, page, hoff[i])) {
            hi = i;
        } else {
            got = pwrite((int)fd[i], hp, (size_t)page, hoff[i]);
            status[i] = got == page ? 0 : fail(3, got);
        }
    next:
        if (j < 0) {
            j = take(next);
            iv = j < n && inval[j] == 1 && aio_start(&a, T_INV, 1, fd[j], (int64_t)zero, page, hoff[j]);
        }
        i = j;
    }
    if (hi >= 0) { ssize_t got = aio_take(&a, T_HDR); status[hi] = got == page ? 0 : fail(3, got); }
    aio_close(&a);
    __atomic_fetch_add(async_done, async, __ATOMIC_RELAXED);
    return done;
}

static void read_done(int64_t i, ssize_t got, const int64_t *buf, const int64_t *len,
                      int64_t hashed, hash_fn h, uint64_t *sums, int64_t *status) {
    if (got != len[i]) { status[i] = fail(2, got); sums[i] = got < 0 ? 0 : (uint64_t)got; return; }
    sums[i] = h((const void *)buf[i], (size_t)hashed);
    status[i] = 0;
}

/* With AIO a thread keeps its next block's read in flight while it checksums the one
 * that just arrived: block j is submitted as soon as block i is back, then i hashed. */
int64_t kvbm_disk_read(int64_t n, int64_t *next, const int64_t *fd, const int64_t *buf,
                       const int64_t *len, const int64_t *off, int64_t hashed, hash_fn h,
                       uint64_t *sums, int64_t *status, int64_t use_aio, int64_t *async_done) {
    int64_t done = 0, async = 0;
    struct aio a;
    aio_open(&a, use_aio);
    int64_t i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    int out = i < n && aio_start(&a, T_DATA, 0, fd[i], buf[i], len[i], off[i]); /* i in flight */
    while (i < n) {
        done++;
        int64_t j = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
        ssize_t got;
        if (out) {
            got = aio_take(&a, T_DATA);
            async++;
        } else {
            got = pread((int)fd[i], (void *)buf[i], (size_t)len[i], off[i]);
        }
        out = j < n && aio_start(&a, T_DATA, 0, fd[j], buf[j], len[j], off[j]);
        read_done(i, got, buf, len, hashed, h, sums, status);
        i = j;
    }
    aio_close(&a);
    __atomic_fetch_add(async_done, async, __ATOMIC_RELAXED);
    return done;
}

/* The same loops on `threads` threads: the caller's and threads - 1 started here (fewer
 * if the system refuses some: the shared counter still hands every block to one). */
struct job {
    int write;
    int64_t n, *next;
    const int64_t *fd, *buf, *len, *doff, *hoff, *inval;
    int64_t hashed;
    const char *zero;
    char *headers;
    int64_t page, sum_at, used;
    hash_fn h;
    uint64_t *sums;
    int64_t *status, use_aio, *async_done;
};

static void *run_job(void *p) {
    struct job *j = p;
    if (j->write)
        kvbm_disk_write(j->n, j->next, j->fd, j->buf, j->len, j->doff, j->hoff, j->inval,
                        j->hashed, j->zero, j->headers, j->page, j->sum_at, j->used, j->h,
                        j->sums, j->status, j->use_aio, j->async_done);
    else
        kvbm_disk_read(j->n, j->next, j->fd, j->buf, j->len, j->doff, j->hashed, j->h,
                       j->sums, j->status, j->use_aio, j->async_done);
    return NULL;
}

static int64_t run_threads(struct job *j, int64_t threads) {
    pthread_t tid[256];
    int64_t started = 0;
    for (int64_t t = 1; t < threads && started < 256; t++)
        if (pthread_create(&tid[started], NULL, run_job, j) == 0) started++;
    run_job(j);
    for (int64_t t = 0; t < started; t++) pthread_join(tid[t], NULL);
    return started + 1;
}

/* next[0]: the shared block counter; next[1]: blocks moved through AIO (out) */
int64_t kvbm_disk_write_mt(int64_t threads, int64_t n, int64_t *next, const int64_t *fd,
                           const int64_t *buf, const int64_t *len, const int64_t *doff,
                           const int64_t *hoff, const int64_t *inval, int64_t hashed,
                           const char *zero, char *headers, int64_t page, int64_t sum_at,
                           int64_t used, hash_fn h, uint64_t *sums, int64_t *status,
                           int64_t use_aio) {
    struct job j = {1, n, next, fd, buf, len, doff, hoff, inval, hashed, zero, headers, page,
                    sum_at, used, h, sums, status, use_aio, next + 1};
    return run_threads(&j, threads);
}

int64_t kvbm_disk_read_mt(int64_t threads, int64_t n, int64_t *next, const int64_t *fd,
                          const int64_t *buf, const int64_t *len, const int64_t *off,
                          int64_t hashed, hash_fn h, uint64_t *sums, int64_t *status,
                          int64_t use_aio) {
    struct job j = {0, n, next, fd, buf, len, off, NULL, NULL, hashed, NULL, NULL, 0, 0, 0, h,
                    sums, status, use_aio, next + 1};
    return run_threads(&j, threads);
}
"""

#: Whether new tiers' native loops move data through the kernel's AIO (Linux; each
#: thread keeps its one request in flight while it checksums); off, or where the
#: kernel refuses a context or a request, the loop uses pread/pwrite.
AIO = True

#: Stages a status names.
INVALIDATE, DATA, HEADER = 1, 2, 3

_P = ctypes.c_void_p
_I = ctypes.c_int64


@dataclass(frozen=True)
class NativeIO:
    """The compiled loops and the checksum function they call."""

    write_fn: Any
    read_fn: Any
    seal_fn: Any
    hash_ptr: int
    sum_at: int


def _checksum_offset() -> int:
    """Where ``pack_header`` puts the data checksum (found, not assumed)."""
    a, b = bytearray(HEADER_BYTES), bytearray(HEADER_BYTES)
    h = BlockHeader(b"k" * 16, b"n" * 16, b"l" * 8, 4096, 0, 7, 3)
    pack_header(memoryview(a), h)
    pack_header(memoryview(b), BlockHeader(h.key, h.namespace, h.layout, h.length, 2**64 - 1,
                                           h.seq, h.slot))
    diff = [i for i in range(HEADER_USED - 8) if a[i] != b[i]]
    if len(diff) != 8 or diff != list(range(diff[0], diff[0] + 8)):
        raise RuntimeError("cannot find the checksum field of a block header")
    return diff[0]


def _build() -> NativeIO | None:
    fn = _xxh.native_function()
    if fn is None or sys.byteorder != "little":
        return None
    lib = _cc.build(SOURCE, "the disk tier's I/O loop", "Python I/O threads",
                    flags=("-O2", "-pthread"))
    if lib is None:
        return None
    w, r, s = lib.kvbm_disk_write_mt, lib.kvbm_disk_read_mt, lib.kvbm_disk_seal
    w.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _P, _P, _P, _I]
    w.restype = _I
    r.argtypes = [_I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _P, _I]
    r.restype = _I
    s.argtypes = [_P, ctypes.c_uint64, _I, _I, _P]
    s.restype = None
    try:
        sum_at = _checksum_offset()
    except RuntimeError as e:
        log.debug("kvbm disk: %s; using Python I/O threads", e)
        return None
    nio = NativeIO(w, r, s, fn, sum_at)
    # The C seal must give pack_header's bytes exactly, or the Python loop is kept.
    want = np.zeros(HEADER_BYTES, np.uint8)
    got = np.zeros(HEADER_BYTES, np.uint8)
    h = BlockHeader(bytes(range(16)), bytes(range(16, 32)), b"layout!!", 2 << 20,
                    0x0123456789ABCDEF, 12345, 678)
    pack_header(memoryview(want), h)
    pack_header(memoryview(got), BlockHeader(h.key, h.namespace, h.layout, h.length, 0, h.seq,
                                             h.slot))
    nio.seal_fn(got.ctypes.data, h.checksum, sum_at, HEADER_USED - 8, fn)
    if not np.array_equal(want, got):
        log.debug("kvbm disk: the native header seal differs from pack_header; using Python")
        return None
    return nio


_loaded = _cc.Once(_build)


def load() -> NativeIO | None:
    """The compiled loops (built on first use, once per process), or None."""
    return _loaded()
