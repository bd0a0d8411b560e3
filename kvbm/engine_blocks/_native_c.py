"""The C source of ``kvbm.engine_blocks._native`` (compiled once per process there, by
``kvbm._cc.build``): the run copier (``memcpy`` or streaming stores, shared between
copy threads), the address tables of a batch of engine blocks, the id checks and the
strided row copy. Documented where each function is loaded (``_native``)."""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Streaming (non-temporal) stores: a large batch is written straight to memory
 * without first reading each destination line into the cache (the read-for-ownership
 * that plain stores pay), so a copy moves 2 bytes of traffic per byte, not 3. glibc's
 * memcpy streams only past a threshold of most of the last-level cache, which a
 * 32 KiB run never reaches. Destination aligned to 64 bytes, source read unaligned.
 *
 * Four streams at once: the runs are cut into pieces of at most KVBM_PIECE bytes and
 * four pieces are copied together, one 64-byte line of each in turn, so four reads
 * are in flight where one run's would be one (the hardware prefetcher stops at each
 * 4 KiB page of a scattered run; with four streams the misses overlap). A long run
 * (the bench limit's single call) is cut the same way, so the limit copies as fast.
 * At idle, one thread, 4,096 runs of 32 KiB (C microbenchmark): engine on 4 KiB pages
 * 5.2 -> 7.6 GB/s, on 2 MiB pages 8.8 -> 11.8, one 128 MiB run 10.4 -> 12.7. */
#define KVBM_PIECE ((size_t)32768)
#define KVBM_WAYS 4
typedef struct { char *d; const char *s; size_t n; } kvbm_piece;
#define STREAM_WAYS(NAME, TGT, LOAD, STORE, T, W)                               \
TGT static void NAME(kvbm_piece *p, int ways) {                                 \
    size_t lines[KVBM_WAYS], m = (size_t)-1;                                    \
    for (int j = 0; j < ways; j++) {                                            \
        size_t head = (64 - ((uintptr_t)p[j].d & 63)) & 63;                     \
        if (head > p[j].n) head = p[j].n;                                       \
        memcpy(p[j].d, p[j].s, head);                                           \
        p[j].d += head; p[j].s += head; p[j].n -= head;                         \
        lines[j] = p[j].n / 64;                                                 \
        if (lines[j] < m) m = lines[j];                                         \
    }                                                                           \
    if (ways == KVBM_WAYS) {                                                    \
        char *d0 = p[0].d, *d1 = p[1].d, *d2 = p[2].d, *d3 = p[3].d;           \
        const char *s0 = p[0].s, *s1 = p[1].s, *s2 = p[2].s, *s3 = p[3].s;     \
        for (size_t i = 0; i < m * 64; i += 64) {                               \
            T v0[64 / W], v1[64 / W], v2[64 / W], v3[64 / W];                   \
            for (int k = 0; k < 64 / W; k++) {                                  \
                v0[k] = LOAD((const T *)(s0 + i + k * W));                      \
                v1[k] = LOAD((const T *)(s1 + i + k * W));                      \
                v2[k] = LOAD((const T *)(s2 + i + k * W));                      \
                v3[k] = LOAD((const T *)(s3 + i + k * W));                      \
            }                                                                   \
            /* each line's stores together: a write-combining buffer fills whole */ \
            for (int k = 0; k < 64 / W; k++) STORE((T *)(d0 + i + k * W), v0[k]); \
            for (int k = 0; k < 64 / W; k++) STORE((T *)(d1 + i + k * W), v1[k]); \
            for (int k = 0; k < 64 / W; k++) STORE((T *)(d2 + i + k * W), v2[k]); \
            for (int k = 0; k < 64 / W; k++) STORE((T *)(d3 + i + k * W), v3[k]); \
        }                                                                       \
    } else m = 0;                                                               \
    for (int j = 0; j < ways; j++) {                                            \
        char *d = p[j].d + m * 64; const char *s = p[j].s + m * 64;             \
        for (size_t i = m; i < lines[j]; i++, d += 64, s += 64)                 \
            for (int k = 0; k < 64; k += W) STORE((T *)(d + k), LOAD((const T *)(s + k))); \
        memcpy(d, s, p[j].n - lines[j] * 64);                                   \
    }                                                                           \
}
STREAM_WAYS(stream_sse2, , _mm_loadu_si128, _mm_stream_si128, __m128i, 16)
STREAM_WAYS(stream_avx2, __attribute__((target("avx2"))), _mm256_loadu_si256,
            _mm256_stream_si256, __m256i, 32)
int kvbm_can_stream(void) { return 1; }
#else
int kvbm_can_stream(void) { return 0; }
#endif
/* Streams runs [0, n) (each `len` bytes), four pieces of at most KVBM_PIECE at a time. */
void kvbm_stream_runs(int64_t n, const int64_t *dst, const int64_t *src, int64_t len) {
#if defined(__x86_64__) && defined(__GNUC__)
    void (*f)(kvbm_piece *, int) = __builtin_cpu_supports("avx2") ? stream_avx2 : stream_sse2;
    kvbm_piece p[KVBM_WAYS];
    int k = 0;
    for (int64_t i = 0; i < n; i++) {
        char *d = (char *)(intptr_t)dst[i];
        const char *s = (const char *)(intptr_t)src[i];
        for (size_t o = 0; o < (size_t)len; o += KVBM_PIECE) {
            size_t left = (size_t)len - o;
            p[k].d = d + o; p[k].s = s + o; p[k].n = left < KVBM_PIECE ? left : KVBM_PIECE;
            if (++k == KVBM_WAYS) { f(p, k); k = 0; }
        }
    }
    if (k) f(p, k);
    _mm_sfence(); /* the streamed lines are in memory before this returns */
#else
    for (int64_t i = 0; i < n; i++)
        memcpy((void *)(intptr_t)dst[i], (const void *)(intptr_t)src[i], (size_t)len);
#endif
}
/* Calls that move at least this many bytes stream (set from Python; < 0: never). */
int64_t kvbm_stream_min = -1;
void kvbm_copy_runs(int64_t n, const int64_t *dst, const int64_t *src, int64_t len) {
    if (kvbm_stream_min >= 0 && n * len >= kvbm_stream_min) {
        kvbm_stream_runs(n, dst, src, len);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        memcpy((void *)(intptr_t)dst[i], (const void *)(intptr_t)src[i], (size_t)len);
}
/* Runs [0, n) in chunks of `chunk`, claimed one at a time from ctl[0] by every thread
 * that calls this with the same ctl (the caller and its helpers): a thread the
 * scheduler delays takes fewer chunks instead of holding back a fixed half. Each
 * finished chunk counts in ctl[1] (after its sfence: its bytes are in memory). With
 * `wait`, returns once every chunk is done (only chunks some thread claimed are waited
 * for: a helper that starts after the last claim takes nothing and returns). */
#include <sched.h>
void kvbm_copy_runs_shared(int64_t n, const int64_t *dst, const int64_t *src, int64_t len,
                           int64_t chunk, int64_t *ctl, int64_t stream, int64_t wait) {
    int64_t nch = (n + chunk - 1) / chunk;
    for (;;) {
        int64_t c = __atomic_fetch_add(&ctl[0], 1, __ATOMIC_RELAXED);
        if (c >= nch) break;
        int64_t a = c * chunk, m = n - a < chunk ? n - a : chunk;
        if (stream) kvbm_stream_runs(m, dst + a, src + a, len);
        else for (int64_t i = a; i < a + m; i++)
            memcpy((void *)(intptr_t)dst[i], (const void *)(intptr_t)src[i], (size_t)len);
        __atomic_fetch_add(&ctl[1], 1, __ATOMIC_RELEASE);
    }
    if (wait)
        while (__atomic_load_n(&ctl[1], __ATOMIC_ACQUIRE) < nch) sched_yield();
}
/* The address tables of a batch of engine blocks, in the engine's address order.
 * Block j (``blk[j]``, ascending) and its whole-block buffer at ``buf[j]``; layer l of
 * it at ``base[l] + blk[j] * stride[l]``, its R runs at ``eoff[l * R + r]`` from there
 * and at ``l * bpl + hoff[l * R + r]`` in the buffer. ``layers``: the nl layers to
 * copy, ascending by address. Layer-major (each layer's tensor walked upwards, run r
 * of every block, then the next run, then the next layer) where the layers' tensors
 * do not interleave; else block-major (a pool: block, layer, run). Writes n * nl * R
 * pairs into ``eng`` and ``host``. One pass, no Python per block: the numpy tables it
 * replaces (broadcasts and an argsort of every run) took 40-70 us a 64-block batch. */
void kvbm_block_table(int64_t n, const int64_t *blk, const int64_t *buf, int64_t nl,
                      const int64_t *layers, const int64_t *base, const int64_t *stride,
                      int64_t R, const int64_t *eoff, const int64_t *hoff, int64_t bpl,
                      int64_t layer_major, int64_t *eng, int64_t *host) {
    int64_t k = 0;
    if (layer_major) {
        for (int64_t a = 0; a < nl; a++) {
            int64_t l = layers[a], st = stride[l];
            for (int64_t r = 0; r < R; r++) {
                int64_t eo = base[l] + eoff[l * R + r], ho = l * bpl + hoff[l * R + r];
                for (int64_t j = 0; j < n; j++, k++) {
                    eng[k] = eo + blk[j] * st;
                    host[k] = buf[j] + ho;
                }
            }
        }
        return;
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t a = 0; a < nl; a++) {
            int64_t l = layers[a], e = base[l] + blk[j] * stride[l], h = buf[j] + l * bpl;
            for (int64_t r = 0; r < R; r++, k++) {
                eng[k] = e + eoff[l * R + r];
                host[k] = h + hoff[l * R + r];
            }
        }
}
/* 0 when all b[i] in [0, nb) (with `seen`, nb zero bytes: none twice) and r[i] in [0, nr). */
int64_t kvbm_check_ids(int64_t n, const int64_t *b, int64_t nb, const int64_t *r, int64_t nr,
                       unsigned char *seen) {
    for (int64_t i = 0; i < n; i++) {
        if ((uint64_t)b[i] >= (uint64_t)nb || (uint64_t)r[i] >= (uint64_t)nr) return 1;
        if (seen) { if (seen[b[i]]) return 1; seen[b[i]] = 1; }
    }
    return 0;
}
#define ROWS(L) for (int64_t i = 0; i < n; i++) { \
        char *d = (char *)(intptr_t)dst[i]; const char *s = (const char *)(intptr_t)src[i]; \
        for (int64_t r = 0; r < rows; r++) memcpy(d + r * dst_stride, s + r * src_stride, L); }
void kvbm_copy_rows(int64_t n, const int64_t *dst, const int64_t *src, int64_t rows,
                    int64_t len, int64_t dst_stride, int64_t src_stride) {
    /* Rows of one head_dim are short: fixed sizes let the compiler inline the copy. */
    if (len == 128) { ROWS(128) return; }
    if (len == 256) { ROWS(256) return; }
    if (len == 512) { ROWS(512) return; }
    for (int64_t i = 0; i < n; i++) {
        char *d = (char *)(intptr_t)dst[i];
        const char *s = (const char *)(intptr_t)src[i];
        for (int64_t r = 0; r < rows; r++)
            memcpy(d + r * dst_stride, s + r * src_stride, (size_t)len);
    }
}
/* copy_out_rows / copy_in_rows of a batch in one call: the checks of kvbm_check_ids
 * (block ids b in [0, nb), none twice with `seen`; row numbers r in [0, nr)), then
 * the blocks in ascending id order (stable: equal ids keep their order), each with its
 * row's address rows_base + r * row_stride, and kvbm_block_table's tables from them.
 * `tmp`: 4n int64 of scratch; `seen` (nb bytes, zero) is zero again on return. Returns 1 with nothing written when a check fails (the
 * caller's own checks then name the value), else 0. */
#include <stdlib.h>
static int kvbm_cmp_pair(const void *x, const void *y) {
    const int64_t *a = (const int64_t *)x, *b = (const int64_t *)y;
    return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : (a[1] > b[1]) - (a[1] < b[1]);
}
int64_t kvbm_rows_table(int64_t n, const int64_t *b, int64_t nb, const int64_t *r, int64_t nr,
                        unsigned char *seen, int64_t rows_base, int64_t row_stride,
                        int64_t *tmp, int64_t order, int64_t nl, const int64_t *layers,
                        const int64_t *base, const int64_t *stride, int64_t R,
                        const int64_t *eoff, const int64_t *hoff, int64_t bpl,
                        int64_t layer_major, int64_t *eng, int64_t *host) {
    int64_t bad = kvbm_check_ids(n, b, nb, r, nr, seen);
    if (seen)  /* left all zero again: the caller keeps it for its next batch */
        for (int64_t i = 0; i < n; i++)
            if ((uint64_t)b[i] < (uint64_t)nb) seen[b[i]] = 0;
    if (bad) return 1;
    int64_t *pairs = tmp, *blk = tmp + 2 * n, *buf = tmp + 3 * n;  /* (id, position) */
    int sorted = 1;
    for (int64_t i = 0; i < n; i++) {
        pairs[2 * i] = b[i];
        pairs[2 * i + 1] = i;
        if (i && b[i] < b[i - 1]) sorted = 0;
    }
    if (order && !sorted) qsort(pairs, (size_t)n, 2 * sizeof(int64_t), kvbm_cmp_pair);
    for (int64_t i = 0; i < n; i++) {
        int64_t k = order ? pairs[2 * i + 1] : i;
        blk[i] = b[k];
        buf[i] = rows_base + r[k] * row_stride;
    }
    kvbm_block_table(n, blk, buf, nl, layers, base, stride, R, eoff, hoff, bpl,
                     order ? layer_major : 0, eng, host);
    return 0;
}
"""
