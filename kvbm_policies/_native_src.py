"""The C source of the simulator's native replay loops (``kvbm_policies.native``).

Each ``kvbm_replay_<policy>`` function replays a whole trace exactly as
``replay._replay_fast`` does (pin and touch per hit, victim and insert per new block,
unpin per hit, last first or in order) against a port of the Python policy, call for
call: every branch below names the Python method it mirrors. Keys are dense ids
(0 .. n-1, in the order of the trace's sorted keys); ordered dicts are intrusive
doubly linked lists over arrays, appended at their tail, popped at their head.
"""

from ._native_frequency import FREQUENCY
from ._native_recency import RECENCY

_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef int64_t i64;
typedef struct { i64 head, tail, n; } List;

/* An ordered dict: append (d[k] = None for a new k), delete, move_to_end, front. */
static inline void l_init(List *l) { l->head = l->tail = -1; l->n = 0; }
static inline void l_push(List *l, i64 *pv, i64 *nx, i64 k) {
    pv[k] = l->tail; nx[k] = -1;
    if (l->tail >= 0) nx[l->tail] = k; else l->head = k;
    l->tail = k; l->n++;
}
static inline void l_del(List *l, i64 *pv, i64 *nx, i64 k) {
    i64 p = pv[k], q = nx[k];
    if (p >= 0) nx[p] = q; else l->head = q;
    if (q >= 0) pv[q] = p; else l->tail = p;
    l->n--;
}
static inline void l_end(List *l, i64 *pv, i64 *nx, i64 k) {
    if (l->tail == k) return;
    l_del(l, pv, nx, k); l_push(l, pv, nx, k);
}

/* The replay loop of replay._replay_fast (priorities None), over a policy prefix P;
 * vout (when given) receives every victim call's answer, -1 for none. */
#define REPLAY(P, S)                                                              \
    i64 ncalls = 0;                                                               \
    for (i64 r = 0; r < nreq; r++) {                                              \
        const i64 *ks = keys + off[r];                                            \
        i64 len = off[r + 1] - off[r], n = 0;                                     \
        while (n < len && cached[ks[n]]) {                                        \
            P##_pin(S, ks[n]); P##_touch(S, ks[n]); n++;                          \
        }                                                                         \
        hits += n;                                                                \
        for (i64 i = n; i < len; i++) {                                           \
            i64 k = ks[i];                                                        \
            if (cached[k]) continue;                                              \
            if (avail) avail--;                                                   \
            else {                                                                \
                i64 v = P##_victim(S);                                            \
                if (vout) vout[ncalls] = v;                                       \
                ncalls++;                                                         \
                if (v < 0) continue;                                              \
                cached[v] = 0; evictions++;                                       \
            }                                                                     \
            cached[k] = 1; P##_insert(S, k);                                      \
        }                                                                         \
        if (reverse) { for (i64 i = n - 1; i >= 0; i--) P##_unpin(S, ks[i]); }    \
        else { for (i64 i = 0; i < n; i++) P##_unpin(S, ks[i]); }                 \
    }                                                                             \
    out[0] = hits; out[1] = evictions; out[7] = ncalls;
"""

#: The whole translation unit: the shared definitions above, then the policies.
SOURCE = _COMMON + RECENCY + FREQUENCY
