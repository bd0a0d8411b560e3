"""The C source of the frequency and queue policies' replay loops: W-TinyLFU, ARC,
S3-FIFO, priority then LRU, LFU with dynamic aging, and the FIFO floor. Part of
``_native_src.SOURCE``, compiled after its shared definitions and the recency loops;
see that module for the conventions."""

FREQUENCY = r"""
/* ---------------------------------------------------------------- W-TinyLFU */
enum { W_ = 0, P_ = 1, Q_ = 2, C_ = 3 };
typedef struct {
    i64 *pv, *nx; int8_t *seg, *linked;
    const uint32_t *pa, *pb, *pc, *pd;
    uint8_t *r0, *r1, *r2, *r3; i64 width;
    List od[4]; i64 size[4];
    i64 wmax, pmax, cap, adaptive, sample, hits, misses, added, sk_sample, resets, climbs;
    double pratio, prev_rate, step;
} WT;

static void wt_reset(WT *s) {  /* FrequencySketch.reset */
    for (i64 i = 0; i < 4 * s->width; i++) s->r0[i] >>= 1;
    s->added = 0; s->resets++;
}
static inline void wt_incr(WT *s, i64 k) {  /* FrequencySketch.increment, conservative */
    uint32_t a = s->pa[k], b = s->pb[k], c = s->pc[k], d = s->pd[k];
    uint8_t ta = s->r0[a], tb = s->r1[b], tc = s->r2[c], td = s->r3[d], lo = ta;
    if (tb < lo) lo = tb;
    if (tc < lo) lo = tc;
    if (td < lo) lo = td;
    if (lo < 15) {
        if (ta == lo) s->r0[a] = lo + 1;
        if (tb == lo) s->r1[b] = lo + 1;
        if (tc == lo) s->r2[c] = lo + 1;
        if (td == lo) s->r3[d] = lo + 1;
    }
    if (++s->added >= s->sk_sample) wt_reset(s);
}
static inline uint8_t wt_freq(WT *s, i64 k) {
    uint8_t lo = s->r0[s->pa[k]], x = s->r1[s->pb[k]];
    if (x < lo) lo = x;
    x = s->r2[s->pc[k]]; if (x < lo) lo = x;
    x = s->r3[s->pd[k]]; if (x < lo) lo = x;
    return lo;
}
static void wt_demote(WT *s) {  /* _demote_protected */
    while (s->size[Q_] > s->pmax && s->od[Q_].n) {
        i64 k = s->od[Q_].head;
        l_del(&s->od[Q_], s->pv, s->nx, k); l_push(&s->od[P_], s->pv, s->nx, k);
        s->seg[k] = P_; s->size[Q_]--; s->size[P_]++;
    }
}
static void wt_spill(WT *s) {  /* _spill_window */
    while (s->size[W_] > s->wmax && s->od[W_].n) {
        i64 k = s->od[W_].head;
        l_del(&s->od[W_], s->pv, s->nx, k); l_push(&s->od[C_], s->pv, s->nx, k);
        s->seg[k] = C_; s->size[W_]--; s->size[C_]++;
    }
}
static void wt_climb(WT *s) {  /* _climb: Caffeine's hill climber */
    i64 total = s->hits + s->misses;
    double rate = (double)s->hits / (double)total, delta = rate - s->prev_rate;
    double step = delta >= 0 ? s->step : -s->step;
    double m = fabs(step) * 0.98;
    s->step = (m > 1.0 ? m : 1.0) * (step >= 0 ? 1 : -1);
    s->prev_rate = rate; s->hits = s->misses = 0;
    i64 c = s->cap, hi = c > 1 ? c - 1 : 1;
    i64 nw = s->wmax + (i64)nearbyint(s->step);  /* round(): half to even */
    if (nw < 1) nw = 1;
    if (nw > hi) nw = hi;
    s->wmax = nw;
    s->pmax = (i64)(s->pratio * (double)(c - nw));
    s->climbs++;
    wt_demote(s); wt_spill(s);
}
static void wt_insert(WT *s, i64 k) {
    wt_incr(s, k);
    int old = s->seg[k];
    if (old >= 0) {  /* re-registered while known: start over in the window */
        if (s->linked[k]) { l_del(&s->od[old], s->pv, s->nx, k); s->linked[k] = 0; }
        s->size[old]--;
    }
    s->seg[k] = W_; s->size[W_]++;
    l_push(&s->od[W_], s->pv, s->nx, k); s->linked[k] = 1;
    if (s->size[W_] > s->wmax) {  /* the inlined spill: size[C] is not counted */
        while (s->size[W_] > s->wmax && s->od[W_].n) {
            i64 j = s->od[W_].head;
            l_del(&s->od[W_], s->pv, s->nx, j); l_push(&s->od[C_], s->pv, s->nx, j);
            s->seg[j] = C_; s->size[W_]--;
        }
    }
    s->misses++;
    if (s->adaptive && s->hits + s->misses >= s->sample) wt_climb(s);
}
static void wt_touch(WT *s, i64 k) {
    s->hits++;
    int g = s->seg[k];
    if (g < 0) { wt_incr(s, k); return; }
    wt_incr(s, k);
    if (g == P_ || g == C_) {
        if (s->linked[k]) {
            l_del(&s->od[g], s->pv, s->nx, k);
            l_push(&s->od[Q_], s->pv, s->nx, k);
        }
        s->seg[k] = Q_; s->size[g]--; s->size[Q_]++;
        if (s->size[Q_] > s->pmax) wt_demote(s);
    } else if (s->linked[k]) {
        l_end(&s->od[g], s->pv, s->nx, k);
    }
}
static inline void wt_pin(WT *s, i64 k) {
    int g = s->seg[k];
    if (g >= 0 && s->linked[k]) { l_del(&s->od[g], s->pv, s->nx, k); s->linked[k] = 0; }
}
static inline void wt_unpin(WT *s, i64 k) {
    int g = s->seg[k];
    if (g < 0) { wt_insert(s, k); return; }
    if (!s->linked[k]) { l_push(&s->od[g], s->pv, s->nx, k); s->linked[k] = 1; }
}
static inline i64 wt_drop(WT *s, i64 k) {
    int g = s->seg[k];
    s->seg[k] = -1; l_del(&s->od[g], s->pv, s->nx, k); s->linked[k] = 0; s->size[g]--;
    return k;
}
static i64 wt_victim(WT *s) {
    if (s->od[C_].n) {
        i64 cand = s->od[C_].head, mv = -1;
        if (s->od[P_].n) mv = s->od[P_].head;
        else if (s->od[Q_].n) mv = s->od[Q_].head;
        if (mv >= 0 && wt_freq(s, cand) > wt_freq(s, mv)) {
            l_del(&s->od[C_], s->pv, s->nx, cand); l_push(&s->od[P_], s->pv, s->nx, cand);
            s->seg[cand] = P_;
            return wt_drop(s, mv);
        }
        s->seg[cand] = -1; l_del(&s->od[C_], s->pv, s->nx, cand); s->linked[cand] = 0;
        return cand;
    }
    if (s->od[P_].n) return wt_drop(s, s->od[P_].head);
    if (s->od[Q_].n) return wt_drop(s, s->od[Q_].head);
    if (s->od[W_].n) return wt_drop(s, s->od[W_].head);
    return -1;
}

/* params: cap, wmax, pmax, adaptive, sample, sk_sample, width; dparams: pratio, step,
 * prev_rate. out: hits, evictions, window_max, climbs, resets. */
int kvbm_replay_wtinylfu(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                         int reverse, const uint32_t *pos, const i64 *params,
                         const double *dparams, i64 *out, i64 *vout) {
    WT st, *s = &st;
    memset(s, 0, sizeof st);
    s->cap = params[0]; s->wmax = params[1]; s->pmax = params[2]; s->adaptive = params[3];
    s->sample = params[4]; s->sk_sample = params[5]; s->width = params[6];
    s->pratio = dparams[0]; s->step = dparams[1]; s->prev_rate = dparams[2];
    s->pa = pos; s->pb = pos + nkeys; s->pc = pos + 2 * nkeys; s->pd = pos + 3 * nkeys;
    uint8_t *table = calloc((size_t)(4 * s->width), 1);
    s->pv = malloc(sizeof(i64) * (size_t)(nkeys + 1));
    s->nx = malloc(sizeof(i64) * (size_t)(nkeys + 1));
    s->seg = malloc((size_t)nkeys + 1);
    s->linked = calloc((size_t)nkeys + 1, 1);
    uint8_t *cached = calloc((size_t)nkeys + 1, 1);
    if (!table || !s->pv || !s->nx || !s->seg || !s->linked || !cached) {
        free(table); free(s->pv); free(s->nx); free(s->seg); free(s->linked); free(cached);
        return -1;
    }
    memset(s->seg, -1, (size_t)nkeys + 1);
    s->r0 = table; s->r1 = table + s->width; s->r2 = table + 2 * s->width;
    s->r3 = table + 3 * s->width;
    for (int i = 0; i < 4; i++) l_init(&s->od[i]);
    i64 hits = 0, evictions = 0;
    REPLAY(wt, s)
    out[2] = s->wmax; out[3] = s->climbs; out[4] = s->resets;
    free(table); free(s->pv); free(s->nx); free(s->seg); free(s->linked); free(cached);
    return 0;
}
/* ---------------------------------------------------------------- ARC */
enum { T1 = 0, T2 = 1, B1 = 2, B2 = 3 };
typedef struct {
    i64 *pv, *nx; int8_t *where, *pinned;  /* pinned: 0 no, 1 in T1, 2 in T2 */
    List l[4]; i64 pinned_t1, npinned, c; double p;
} ARC;
static inline void arc_push(ARC *s, int w, i64 k) { l_push(&s->l[w], s->pv, s->nx, k); s->where[k] = (int8_t)w; }
static inline void arc_del(ARC *s, i64 k) { l_del(&s->l[s->where[k]], s->pv, s->nx, k); s->where[k] = -1; }
static inline void arc_trim(ARC *s) {  /* _trim_ghosts */
    i64 n1 = s->l[T1].n + s->pinned_t1;
    while (s->l[B1].n && n1 + s->l[B1].n > s->c) arc_del(s, s->l[B1].head);
    i64 resident = s->l[T1].n + s->l[T2].n + s->npinned;
    while (s->l[B2].n && resident + s->l[B1].n + s->l[B2].n > 2 * s->c) arc_del(s, s->l[B2].head);
}
static void arc_insert(ARC *s, i64 k) {
    int w = s->where[k];
    if (w == B1) {
        double r = (double)s->l[B2].n / (double)s->l[B1].n, q = s->p + (r > 1.0 ? r : 1.0);
        s->p = (double)s->c < q ? (double)s->c : q;
        arc_del(s, k); arc_push(s, T2, k);
    } else if (w == B2) {
        double r = (double)s->l[B1].n / (double)s->l[B2].n, q = s->p - (r > 1.0 ? r : 1.0);
        s->p = 0.0 > q ? 0.0 : q;
        arc_del(s, k); arc_push(s, T2, k);
    } else if (w != T1) {
        arc_push(s, T1, k);
    }
    arc_trim(s);
}
static inline void arc_touch(ARC *s, i64 k) {
    int pw = s->pinned[k];
    if (pw) {
        if (pw == 1) { s->pinned[k] = 2; s->pinned_t1--; }
        return;
    }
    if (s->where[k] == T1) { arc_del(s, k); arc_push(s, T2, k); }
    else if (s->where[k] == T2) l_end(&s->l[T2], s->pv, s->nx, k);
}
static inline void arc_pin(ARC *s, i64 k) {
    if (s->where[k] == T1) { arc_del(s, k); s->pinned[k] = 1; s->pinned_t1++; s->npinned++; }
    else if (s->where[k] == T2) { arc_del(s, k); s->pinned[k] = 2; s->npinned++; }
}
static inline void arc_unpin(ARC *s, i64 k) {
    int pw = s->pinned[k];
    if (!pw) { arc_insert(s, k); return; }
    s->pinned[k] = 0; s->npinned--;
    if (pw == 1) { s->pinned_t1--; arc_push(s, T1, k); }
    else arc_push(s, T2, k);
}
static i64 arc_victim(ARC *s) {
    i64 k;
    if (s->l[T1].n && ((double)(s->l[T1].n + s->pinned_t1) > s->p || !s->l[T2].n)) {
        k = s->l[T1].head; arc_del(s, k); arc_push(s, B1, k);
    } else if (s->l[T2].n) {
        k = s->l[T2].head; arc_del(s, k); arc_push(s, B2, k);
    } else return -1;
    arc_trim(s);
    return k;
}

int kvbm_replay_arc(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                    int reverse, i64 cap, i64 *out, i64 *vout) {
    ARC st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->where = malloc(n); s->pinned = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    int rc = -1;
    if (s->pv && s->nx && s->where && s->pinned && cached) {
        memset(s->where, -1, n);
        for (int i = 0; i < 4; i++) l_init(&s->l[i]);
        s->c = cap;
        i64 hits = 0, evictions = 0;
        REPLAY(arc, s)
        rc = 0;
    }
    free(s->pv); free(s->nx); free(s->where); free(s->pinned); free(cached);
    return rc;
}

/* ---------------------------------------------------------------- S3-FIFO */
enum { SM = 0, MA = 1, GH = 2 };
typedef struct {
    i64 *pv, *nx; int8_t *where, *freq, *pinned;  /* freq -1: unknown; pinned 1 small, 2 main */
    List l[3]; i64 pinned_small, promote, small_target, cap;
} S3;
static inline void s3_push(S3 *s, int w, i64 k) { l_push(&s->l[w], s->pv, s->nx, k); s->where[k] = (int8_t)w; }
static inline void s3_del(S3 *s, i64 k) { l_del(&s->l[s->where[k]], s->pv, s->nx, k); s->where[k] = -1; }
static void s3_insert(S3 *s, i64 k) {
    s->freq[k] = 0;
    if (s->where[k] == GH) { s3_del(s, k); s3_push(s, MA, k); }  /* remembered: to main */
    else if (s->where[k] != SM) s3_push(s, SM, k);
}
static inline void s3_touch(S3 *s, i64 k) { int f = s->freq[k]; if (f >= 0 && f < 3) s->freq[k] = (int8_t)(f + 1); }
static inline void s3_pin(S3 *s, i64 k) {
    if (s->where[k] == SM) { s3_del(s, k); s->pinned[k] = 1; s->pinned_small++; }
    else if (s->where[k] == MA) { s3_del(s, k); s->pinned[k] = 2; }
}
static inline void s3_unpin(S3 *s, i64 k) {
    int pw = s->pinned[k];
    if (!pw) { if (s->freq[k] < 0) s3_insert(s, k); return; }
    s->pinned[k] = 0;
    if (pw == 2) { if (s->where[k] != MA) s3_push(s, MA, k); }
    else { s->pinned_small--; if (s->where[k] != SM) s3_push(s, SM, k); }
}
static i64 s3_victim(S3 *s) {
    while (s->l[SM].n || s->l[MA].n) {
        i64 k;
        if (s->l[SM].n && (s->l[SM].n + s->pinned_small >= s->small_target || !s->l[MA].n)) {
            k = s->l[SM].head; s3_del(s, k);
            if (s->freq[k] >= s->promote) { s3_push(s, MA, k); continue; }
            s3_push(s, GH, k);
            if (s->l[GH].n > s->cap) s3_del(s, s->l[GH].head);
        } else {
            k = s->l[MA].head;
            int f = s->freq[k];
            if (f > 0) { s->freq[k] = (int8_t)(f - 1); l_end(&s->l[MA], s->pv, s->nx, k); continue; }
            s3_del(s, k);
        }
        s->freq[k] = -1;
        return k;
    }
    return -1;
}

int kvbm_replay_s3fifo(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                       int reverse, i64 cap, i64 small_target, i64 promote, i64 *out, i64 *vout) {
    S3 st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->where = malloc(n); s->freq = malloc(n);
    s->pinned = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    int rc = -1;
    if (s->pv && s->nx && s->where && s->freq && s->pinned && cached) {
        memset(s->where, -1, n); memset(s->freq, -1, n);
        for (int i = 0; i < 3; i++) l_init(&s->l[i]);
        s->cap = cap; s->small_target = small_target; s->promote = promote;
        i64 hits = 0, evictions = 0;
        REPLAY(s3, s)
        rc = 0;
    }
    free(s->pv); free(s->nx); free(s->where); free(s->freq); free(s->pinned); free(cached);
    return rc;
}

/* ------------------------------------------- priority then LRU, every priority 0 */
/* One level (the replay inserts at priority 0): the policy's heap of levels only ever
 * holds 0, and a level emptied and made again is as empty as one kept. */
typedef struct { i64 *pv, *nx; uint8_t *known, *in; List l; } PR;
static inline void pr_drop(PR *s, i64 k) {
    if (s->known[k] && s->in[k]) { l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0; }
}
static inline void pr_add(PR *s, i64 k) {
    if (s->in[k]) l_end(&s->l, s->pv, s->nx, k); else { l_push(&s->l, s->pv, s->nx, k); s->in[k] = 1; }
}
static inline void pr_insert(PR *s, i64 k) { pr_drop(s, k); s->known[k] = 1; pr_add(s, k); }
static inline void pr_touch(PR *s, i64 k) { if (s->known[k] && s->in[k]) l_end(&s->l, s->pv, s->nx, k); }
static inline void pr_pin(PR *s, i64 k) { pr_drop(s, k); }
static inline void pr_unpin(PR *s, i64 k) { s->known[k] = 1; pr_add(s, k); }
static inline i64 pr_victim(PR *s) {
    if (!s->l.n) return -1;
    i64 k = s->l.head; l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0; s->known[k] = 0;
    return k;
}

int kvbm_replay_priority(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                         int reverse, i64 *out, i64 *vout) {
    PR st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->known = calloc(n, 1); s->in = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    int rc = -1;
    if (s->pv && s->nx && s->known && s->in && cached) {
        l_init(&s->l);
        i64 hits = 0, evictions = 0;
        REPLAY(pr, s)
        rc = 0;
    }
    free(s->pv); free(s->nx); free(s->known); free(s->in); free(cached);
    return rc;
}

/* ---------------------------------------------------------------- LFU with dynamic aging */
/* Buckets by value in a hash map (a bucket, once made, keeps its record; ``live`` says
 * whether the policy's dict holds it, which is when its value is in the heap). */
typedef struct { i64 value; List l; int live; } BK;
typedef struct {
    i64 *pv, *nx, *kb, *count;  /* kb: the key's bucket while evictable, -1 otherwise */
    BK *bk; i64 nbk, capbk;
    i64 *slot; i64 mask;        /* value -> bucket index, open addressing, -1 empty */
    i64 *heap; i64 hn, hcap;
    i64 age; int oom;
} LF;
static inline uint64_t lf_mix(i64 v) { uint64_t h = (uint64_t)v * 0x9E3779B97F4A7C15ull; return h ^ (h >> 29); }
static int lf_grow(LF *s) {
    i64 nm = s->mask ? 2 * (s->mask + 1) - 1 : 1023;
    i64 *ns = malloc(8 * (size_t)(nm + 1));
    if (!ns) return -1;
    memset(ns, -1, 8 * (size_t)(nm + 1));
    for (i64 b = 0; b < s->nbk; b++) {
        i64 i = (i64)(lf_mix(s->bk[b].value) & (uint64_t)nm);
        while (ns[i] >= 0) i = (i + 1) & nm;
        ns[i] = b;
    }
    free(s->slot); s->slot = ns; s->mask = nm;
    return 0;
}
static i64 lf_bucket(LF *s, i64 v) {  /* the bucket record of value v, made if new */
    if (!s->slot || 2 * (s->nbk + 1) > s->mask + 1) { if (lf_grow(s)) { s->oom = 1; return -1; } }
    i64 i = (i64)(lf_mix(v) & (uint64_t)s->mask);
    while (s->slot[i] >= 0) {
        if (s->bk[s->slot[i]].value == v) return s->slot[i];
        i = (i + 1) & s->mask;
    }
    if (s->nbk == s->capbk) {
        i64 nc = s->capbk ? 2 * s->capbk : 1024;
        BK *nb = realloc(s->bk, sizeof(BK) * (size_t)nc);
        if (!nb) { s->oom = 1; return -1; }
        s->bk = nb; s->capbk = nc;
    }
    BK *b = &s->bk[s->nbk];
    b->value = v; l_init(&b->l); b->live = 0;
    s->slot[i] = s->nbk;
    return s->nbk++;
}
static void lf_hpush(LF *s, i64 v) {
    if (s->hn == s->hcap) {
        i64 nc = s->hcap ? 2 * s->hcap : 1024;
        i64 *h = realloc(s->heap, 8 * (size_t)nc);
        if (!h) { s->oom = 1; return; }
        s->heap = h; s->hcap = nc;
    }
    i64 i = s->hn++;
    while (i > 0) { i64 p = (i - 1) / 2; if (s->heap[p] <= v) break; s->heap[i] = s->heap[p]; i = p; }
    s->heap[i] = v;
}
static void lf_hpop(LF *s) {
    i64 e = s->heap[--s->hn], i = 0, n = s->hn;
    for (;;) {
        i64 c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && s->heap[c + 1] < s->heap[c]) c++;
        if (s->heap[c] >= e) break;
        s->heap[i] = s->heap[c]; i = c;
    }
    if (n) s->heap[i] = e;
}
static inline void lf_unplace(LF *s, i64 k) {  /* value.pop(key); del buckets[v][key] */
    i64 b = s->kb[k];
    if (b < 0) return;
    l_del(&s->bk[b].l, s->pv, s->nx, k);
    s->kb[k] = -1;
}
static inline void lf_place(LF *s, i64 k, i64 v) {
    i64 b = lf_bucket(s, v);
    if (b < 0) return;
    if (!s->bk[b].live) { s->bk[b].live = 1; lf_hpush(s, v); }
    l_push(&s->bk[b].l, s->pv, s->nx, k);
    s->kb[k] = b;
}
static inline void lf_insert(LF *s, i64 k) { lf_unplace(s, k); s->count[k] = 1; lf_place(s, k, s->age + 1); }
static inline void lf_touch(LF *s, i64 k) {
    i64 c = s->count[k];
    if (!c) return;
    s->count[k] = c + 1;
    if (s->kb[k] >= 0) { lf_unplace(s, k); lf_place(s, k, s->age + c + 1); }
}
static inline void lf_pin(LF *s, i64 k) { lf_unplace(s, k); }
static inline void lf_unpin(LF *s, i64 k) {
    i64 c = s->count[k];
    if (!c) c = s->count[k] = 1;
    lf_unplace(s, k);
    lf_place(s, k, s->age + c);
}
static i64 lf_victim(LF *s) {
    while (s->hn) {
        i64 v = s->heap[0], b = lf_bucket(s, v);
        if (b < 0) return -1;
        if (s->bk[b].l.n) {
            i64 k = s->bk[b].l.head;
            l_del(&s->bk[b].l, s->pv, s->nx, k);
            s->kb[k] = -1; s->count[k] = 0; s->age = v;
            return k;
        }
        lf_hpop(s); s->bk[b].live = 0;  /* an emptied bucket: dropped */
    }
    return -1;
}

int kvbm_replay_lfu(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                    int reverse, i64 *out, i64 *vout) {
    LF st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->kb = malloc(8 * n); s->count = calloc(n, 8);
    uint8_t *cached = calloc(n, 1);
    int rc = -1;
    if (s->pv && s->nx && s->kb && s->count && cached) {
        memset(s->kb, -1, 8 * n);
        i64 hits = 0, evictions = 0;
        REPLAY(lf, s)
        rc = s->oom ? -1 : 0;
    }
    free(s->pv); free(s->nx); free(s->kb); free(s->count); free(cached);
    free(s->bk); free(s->slot); free(s->heap);
    return rc;
}

/* ------------------------------------------------- FIFO: the floor of the bench */
/* bench/policies.py's FIFOPolicy: first in, first out, hits ignored, a pinned block out
 * of the queue until released: the least work a policy can do in this loop. */
typedef struct { i64 *pv, *nx; uint8_t *in; List l; } FF;
static inline void ff_insert(FF *s, i64 k) { if (!s->in[k]) { l_push(&s->l, s->pv, s->nx, k); s->in[k] = 1; } }
static inline void ff_touch(FF *s, i64 k) { (void)s; (void)k; }
static inline void ff_pin(FF *s, i64 k) { if (s->in[k]) { l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0; } }
static inline void ff_unpin(FF *s, i64 k) { ff_insert(s, k); }
static inline i64 ff_victim(FF *s) {
    if (!s->l.n) return -1;
    i64 k = s->l.head; l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0;
    return k;
}

int kvbm_replay_fifo(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                     int reverse, i64 *out, i64 *vout) {
    FF st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->in = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    int rc = -1;
    if (s->pv && s->nx && s->in && cached) {
        l_init(&s->l);
        i64 hits = 0, evictions = 0;
        REPLAY(ff, s)
        rc = 0;
    }
    free(s->pv); free(s->nx); free(s->in); free(cached);
    return rc;
}
"""
