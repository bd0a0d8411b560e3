"""The C source of the recency policies' replay loops: prefix-aware LRU, LIRS (and
LRU, its LR half) and the adaptive policy over them. Part of ``_native_src.SOURCE``,
compiled after its shared definitions; see that module for the conventions."""

RECENCY = r"""
/* ---------------------------------------------------------------- prefix LRU */
enum { LEAF = 0, OLD = 1, INNER = 2 };
typedef struct { i64 w, k; } HE;
typedef struct {
    i64 *pv, *nx;            /* leaves / inner links */
    i64 *where;              /* tick << 2 | place, -1: not evictable */
    i64 *parent, *nkids, *kfirst, *sprev, *snext;
    uint8_t *known;
    List leaves, inner;
    HE *heap; i64 hn, hcap; int oom;
    i64 clock, chain, pinned_last, inserted_last;
} PX;

static inline int he_lt(HE a, HE b) { return a.w < b.w || (a.w == b.w && a.k < b.k); }
static void h_push(PX *s, i64 w, i64 k) {
    if (s->hn == s->hcap) {
        i64 nc = s->hcap ? 2 * s->hcap : 1024;
        HE *h = realloc(s->heap, sizeof(HE) * (size_t)nc);
        if (!h) { s->oom = 1; return; }
        s->heap = h; s->hcap = nc;
    }
    HE e = {w, k}; i64 i = s->hn++;
    while (i > 0) {
        i64 p = (i - 1) / 2;
        if (!he_lt(e, s->heap[p])) break;
        s->heap[i] = s->heap[p]; i = p;
    }
    s->heap[i] = e;
}
static HE h_pop(PX *s) {
    HE top = s->heap[0], e = s->heap[--s->hn];
    i64 i = 0, n = s->hn;
    for (;;) {
        i64 c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && he_lt(s->heap[c + 1], s->heap[c])) c++;
        if (!he_lt(s->heap[c], e)) break;
        s->heap[i] = s->heap[c]; i = c;
    }
    if (n) s->heap[i] = e;
    return top;
}
static inline void kid_add(PX *s, i64 p, i64 c) {
    s->sprev[c] = -1; s->snext[c] = s->kfirst[p];
    if (s->kfirst[p] >= 0) s->sprev[s->kfirst[p]] = c;
    s->kfirst[p] = c; s->nkids[p]++;
}
static inline void kid_del(PX *s, i64 p, i64 c) {
    if (s->sprev[c] >= 0) s->snext[s->sprev[c]] = s->snext[c]; else s->kfirst[p] = s->snext[c];
    if (s->snext[c] >= 0) s->sprev[s->snext[c]] = s->sprev[c];
    s->nkids[p]--;
}
static void px_became_parent(PX *s, i64 k) {
    i64 w = s->where[k];
    if (w < 0 || (w & 3) == INNER) return;
    if ((w & 3) == LEAF) l_del(&s->leaves, s->pv, s->nx, k);
    s->where[k] = w - (w & 3) + INNER;
    l_push(&s->inner, s->pv, s->nx, k);
}
static void px_became_leaf(PX *s, i64 k) {
    i64 w = s->where[k];
    if (w >= 0 && (w & 3) == INNER) {
        l_del(&s->inner, s->pv, s->nx, k);
        s->where[k] = w = w - INNER + OLD;
        h_push(s, w, k);
    }
}
static void px_link(PX *s, i64 child, i64 parent) {
    i64 old = s->parent[child];
    if (old == parent) return;
    if (old >= 0) {
        s->parent[child] = -1;
        kid_del(s, old, child);
        if (!s->nkids[old]) px_became_leaf(s, old);
    }
    if (parent >= 0 && parent != child && s->known[parent]) {
        s->parent[child] = parent;
        kid_add(s, parent, child);
        if (s->nkids[parent] == 1) px_became_parent(s, parent);
    }
}
static void px_use(PX *s, i64 k) {
    i64 w = s->where[k], c = ++s->clock;
    if (w < 0 || (w & 3) == OLD) {
        if (s->nkids[k]) { s->where[k] = c << 2 | INNER; l_push(&s->inner, s->pv, s->nx, k); }
        else { s->where[k] = c << 2 | LEAF; l_push(&s->leaves, s->pv, s->nx, k); }
    } else if ((w & 3) == LEAF) {
        l_end(&s->leaves, s->pv, s->nx, k); s->where[k] = c << 2 | LEAF;
    } else {
        l_end(&s->inner, s->pv, s->nx, k); s->where[k] = c << 2 | INNER;
    }
}
static void px_unplace(PX *s, i64 k) {
    i64 w = s->where[k];
    if (w < 0) return;
    s->where[k] = -1;
    if ((w & 3) == LEAF) l_del(&s->leaves, s->pv, s->nx, k);
    else if ((w & 3) == INNER) l_del(&s->inner, s->pv, s->nx, k);
}
static void px_forget(PX *s, i64 k) {
    px_unplace(s, k);
    s->known[k] = 0;
    if (k == s->chain || k == s->pinned_last || k == s->inserted_last)
        s->chain = s->pinned_last = s->inserted_last = -1;
    px_link(s, k, -1);
    for (i64 c = s->kfirst[k]; c >= 0; c = s->snext[c]) s->parent[c] = -1;
    s->kfirst[k] = -1; s->nkids[k] = 0;
}
static void px_insert(PX *s, i64 k) {
    if (s->known[k]) px_forget(s, k);
    s->known[k] = 1;
    i64 chain = s->chain;
    if (chain >= 0) {
        if (s->parent[k] >= 0) px_link(s, k, chain);
        else if (chain != k && s->known[chain]) {
            s->parent[k] = chain;
            kid_add(s, chain, k);
            if (s->nkids[chain] == 1) px_became_parent(s, chain);
        }
        s->chain = k;
    }
    s->pinned_last = -1; s->inserted_last = k;
    px_use(s, k);
}
static inline void px_touch(PX *s, i64 k) { if (s->where[k] >= 0) px_use(s, k); }
static void px_pin(PX *s, i64 k) {
    px_unplace(s, k);
    i64 last = s->pinned_last;
    if (s->inserted_last != k && s->parent[k] != last) px_link(s, k, last);
    s->pinned_last = s->chain = k; s->inserted_last = -1;
}
static void px_unpin(PX *s, i64 k) {
    if (!s->known[k]) px_insert(s, k); else px_use(s, k);
    s->chain = s->pinned_last = s->inserted_last = -1;
}
static i64 px_victim(PX *s) {
    while (s->hn && s->where[s->heap[0].k] != s->heap[0].w) h_pop(s);
    i64 k;
    if (s->hn && (!s->leaves.n || s->heap[0].w < s->where[s->leaves.head])) {
        k = h_pop(s).k; s->where[k] = -1;
    } else if (s->leaves.n) {
        k = s->leaves.head; s->where[k] = -1; l_del(&s->leaves, s->pv, s->nx, k);
    } else if (s->inner.n) {
        k = s->inner.head; px_forget(s, k); return k;
    } else return -1;
    s->known[k] = 0;
    if (k == s->chain || k == s->pinned_last || k == s->inserted_last)
        s->chain = s->pinned_last = s->inserted_last = -1;
    i64 p = s->parent[k];
    s->parent[k] = -1;
    if (p >= 0) {
        kid_del(s, p, k);
        if (!s->nkids[p]) px_became_leaf(s, p);
    }
    return k;
}

int kvbm_replay_prefix(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                       int reverse, i64 *out, i64 *vout) {
    PX st, *s = &st;
    memset(s, 0, sizeof st);
    size_t n = (size_t)nkeys + 1;
    i64 **arrs[] = {&s->pv, &s->nx, &s->where, &s->parent, &s->kfirst, &s->sprev, &s->snext};
    int ok = 1;
    for (int i = 0; i < 7; i++) { *arrs[i] = malloc(sizeof(i64) * n); ok = ok && *arrs[i]; }
    s->nkids = calloc(n, sizeof(i64));
    s->known = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    i64 hits = 0, evictions = 0;
    int rc = -1;
    if (ok && s->nkids && s->known && cached) {
        for (size_t i = 0; i < n; i++) s->where[i] = s->parent[i] = s->kfirst[i] = -1;
        l_init(&s->leaves); l_init(&s->inner);
        s->chain = s->pinned_last = s->inserted_last = -1;
        REPLAY(px, s)
        rc = s->oom ? -1 : 0;
    }
    for (int i = 0; i < 7; i++) free(*arrs[i]);
    free(s->nkids); free(s->known); free(cached); free(s->heap);
    return rc;
}

/* ---------------------------------------------------------------- LIRS, LRU */
enum { LIR = 0, HIR = 1, NONRES = 2 };
enum { OQ = 0, OL = 1, ON = 2 };  /* which of Q, the LIR order, non-resident a key is in */
typedef struct {
    i64 *spv, *snx, *opv, *onx;
    int8_t *state, *ins, *where, *pinned;
    List s, o[3];
    i64 lir_count, lir_max, cap;
} LI;

static int li_alloc(LI *s, i64 nkeys, i64 cap, i64 lir_max) {
    size_t n = (size_t)nkeys + 1;
    memset(s, 0, sizeof *s);
    s->spv = malloc(8 * n); s->snx = malloc(8 * n); s->opv = malloc(8 * n); s->onx = malloc(8 * n);
    s->state = malloc(n); s->ins = calloc(n, 1); s->where = malloc(n); s->pinned = calloc(n, 1);
    if (!s->spv || !s->snx || !s->opv || !s->onx || !s->state || !s->ins || !s->where || !s->pinned)
        return -1;
    memset(s->state, -1, n); memset(s->where, -1, n);
    l_init(&s->s); for (int i = 0; i < 3; i++) l_init(&s->o[i]);
    s->cap = cap; s->lir_max = lir_max;
    return 0;
}
static void li_free(LI *s) {
    free(s->spv); free(s->snx); free(s->opv); free(s->onx);
    free(s->state); free(s->ins); free(s->where); free(s->pinned);
}
static inline void s_push(LI *s, i64 k) { l_push(&s->s, s->spv, s->snx, k); s->ins[k] = 1; }
static inline void s_del(LI *s, i64 k) { l_del(&s->s, s->spv, s->snx, k); s->ins[k] = 0; }
static inline void s_top(LI *s, i64 k) { if (s->ins[k]) l_end(&s->s, s->spv, s->snx, k); else s_push(s, k); }
static inline void o_push(LI *s, int w, i64 k) { l_push(&s->o[w], s->opv, s->onx, k); s->where[k] = (int8_t)w; }
static inline void o_del(LI *s, i64 k) { l_del(&s->o[s->where[k]], s->opv, s->onx, k); s->where[k] = -1; }
static inline i64 o_pop(LI *s, int w) { i64 k = s->o[w].head; o_del(s, k); return k; }

static void li_prune(LI *s) {
    while (s->s.n) {
        i64 k = s->s.head;
        int st = s->state[k];
        if (st == LIR) return;
        s_del(s, k);
        if (st == NONRES) { s->state[k] = -1; o_del(s, k); }
    }
}
static void li_demote_bottom(LI *s) {
    i64 k = s->s.head;
    while (k >= 0 && s->state[k] != LIR) k = s->snx[k];
    if (k < 0) return;
    s_del(s, k); s->state[k] = HIR; s->lir_count--;
    if (!s->pinned[k]) { o_del(s, k); o_push(s, OQ, k); }
}
static void li_lir_on(LI *s, i64 k) {
    s->state[k] = LIR;
    i64 n = ++s->lir_count;
    s_top(s, k);
    if (!s->pinned[k] && s->where[k] != OL) o_push(s, OL, k);
    if (n > s->lir_max) {
        i64 b = s->s.head;
        if (s->state[b] == LIR) {
            s_del(s, b); s->state[b] = HIR; s->lir_count = n - 1;
            if (!s->pinned[b]) { o_del(s, b); o_push(s, OQ, b); }
        } else li_demote_bottom(s);
    }
    if (s->state[s->s.head] != LIR) li_prune(s);
}
static void li_insert(LI *s, i64 k) {
    int st = s->state[k];
    if (st == NONRES) { o_del(s, k); li_lir_on(s, k); }
    else if (st < 0 && s->lir_count < s->lir_max) li_lir_on(s, k);
    else {
        s->state[k] = HIR;
        s_top(s, k);
        if (!s->pinned[k]) {
            if (s->where[k] == OQ) l_end(&s->o[OQ], s->opv, s->onx, k);
            else o_push(s, OQ, k);
        }
    }
}
static void li_touch(LI *s, i64 k) {
    int st = s->state[k];
    if (st == LIR) {
        int bottom = s->s.head == k;
        l_end(&s->s, s->spv, s->snx, k);
        if (s->where[k] == OL) l_end(&s->o[OL], s->opv, s->onx, k);
        if (bottom) li_prune(s);
    } else if (st == HIR) {
        if (s->ins[k]) {
            if (s->where[k] == OQ) o_del(s, k);
            li_lir_on(s, k);
        } else {
            s_push(s, k);
            if (s->where[k] == OQ) l_end(&s->o[OQ], s->opv, s->onx, k);
        }
    }
}
static inline void li_pin(LI *s, i64 k) {
    s->pinned[k] = 1;
    if (s->where[k] == OL || s->where[k] == OQ) o_del(s, k);
}
static void li_unpin(LI *s, i64 k) {
    s->pinned[k] = 0;
    int st = s->state[k];
    if (st == LIR) { if (s->where[k] != OL) o_push(s, OL, k); }
    else if (st == HIR) { if (s->where[k] != OQ) o_push(s, OQ, k); }
    else li_insert(s, k);
}
static i64 li_victim(LI *s) {
    if (s->o[OQ].n) {
        i64 k = o_pop(s, OQ);
        if (s->ins[k]) {
            s->state[k] = NONRES; o_push(s, ON, k);
            if (s->o[ON].n > s->cap) {
                i64 old = o_pop(s, ON);
                s_del(s, old); s->state[old] = -1;
            }
        } else s->state[k] = -1;
        return k;
    }
    if (s->o[OL].n) {
        i64 k = o_pop(s, OL);
        s->state[k] = -1; s_del(s, k); s->lir_count--;
        if (s->s.n && s->state[s->s.head] != LIR) li_prune(s);
        return k;
    }
    return -1;
}

int kvbm_replay_lirs(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                     int reverse, i64 cap, i64 lir_max, i64 *out, i64 *vout) {
    LI st, *s = &st;
    memset(s, 0, sizeof st);
    uint8_t *cached = calloc((size_t)nkeys + 1, 1);
    int rc = -1;
    if (cached && li_alloc(s, nkeys, cap, lir_max) == 0) {
        i64 hits = 0, evictions = 0;
        REPLAY(li, s)
        rc = 0;
    }
    li_free(s); free(cached);
    return rc;
}
/* ---------------------------------------------------------------- adaptive (lru, lirs) */
typedef struct { i64 *pv, *nx; uint8_t *in; List l; } LR;  /* kvbm.policy.LRUPolicy by key */
static int lr_alloc(LR *s, i64 nkeys) {
    size_t n = (size_t)nkeys + 1;
    memset(s, 0, sizeof *s);
    s->pv = malloc(8 * n); s->nx = malloc(8 * n); s->in = calloc(n, 1);
    l_init(&s->l);
    return s->pv && s->nx && s->in ? 0 : -1;
}
static void lr_free(LR *s) { free(s->pv); free(s->nx); free(s->in); }
static inline void lr_insert(LR *s, i64 k) { if (!s->in[k]) { l_push(&s->l, s->pv, s->nx, k); s->in[k] = 1; } }
static inline void lr_touch(LR *s, i64 k) { if (s->in[k]) l_end(&s->l, s->pv, s->nx, k); }
static inline void lr_pin(LR *s, i64 k) { if (s->in[k]) { l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0; } }
static inline void lr_unpin(LR *s, i64 k) {
    if (s->in[k]) l_end(&s->l, s->pv, s->nx, k); else { l_push(&s->l, s->pv, s->nx, k); s->in[k] = 1; }
}
static inline i64 lr_victim(LR *s) {
    if (!s->l.n) return -1;
    i64 k = s->l.head; l_del(&s->l, s->pv, s->nx, k); s->in[k] = 0; return k;
}

typedef struct { int kind; LR lr; LI li; } CP;  /* a candidate: 0 lru, 1 lirs */
static int cp_new(CP *p, int kind, i64 nkeys, i64 cap, i64 lir_max) {
    p->kind = kind;
    memset(&p->lr, 0, sizeof p->lr); memset(&p->li, 0, sizeof p->li);
    return kind == 0 ? lr_alloc(&p->lr, nkeys) : li_alloc(&p->li, nkeys, cap, lir_max);
}
static void cp_free(CP *p) { if (p->kind == 0) lr_free(&p->lr); else li_free(&p->li); }
static inline void cp_insert(CP *p, i64 k) { if (p->kind == 0) lr_insert(&p->lr, k); else li_insert(&p->li, k); }
static inline void cp_touch(CP *p, i64 k) { if (p->kind == 0) lr_touch(&p->lr, k); else li_touch(&p->li, k); }
static inline void cp_pin(CP *p, i64 k) { if (p->kind == 0) lr_pin(&p->lr, k); else li_pin(&p->li, k); }
static inline void cp_unpin(CP *p, i64 k) { if (p->kind == 0) lr_unpin(&p->lr, k); else li_unpin(&p->li, k); }
static inline i64 cp_victim(CP *p) { return p->kind == 0 ? lr_victim(&p->lr) : li_victim(&p->li); }

/* CPython's own set for the pinned keys: _switch iterates it, and its order is the
 * set's (hash table) order, so the loop keeps a real set through the C API. */
typedef int (*set_fn)(void *, void *);
typedef void *(*obj_fn)(void *);
typedef long long (*ll_fn)(void *);
typedef void (*ref_fn)(void *);
enum { MAXC = 8 };
typedef struct {
    i64 nkeys, cap, lir_max, ncand, li, switches, sampled, period, scap;
    int kinds[MAXC];
    double margin, shits[MAXC];
    CP lead, sh[MAXC];
    uint8_t *sres[MAXC]; i64 scount[MAXC];
    const i64 *sid, *uniq;
    i64 *ring, rn, rpos, *order, *pins;
    uint8_t *fres, *fseen;
    void *pinned; void *const *objs;
    set_fn set_add, set_discard; obj_fn get_iter, iter_next; ll_fn as_ll; ref_fn decref;
    int err;
} AD;

static inline void ad_remember(AD *a, i64 k) {
    a->ring[a->rpos] = k;
    if (++a->rpos == a->cap) a->rpos = 0;
    if (a->rn < a->cap) a->rn++;
}
static i64 ad_rank(AD *a, long long v) {  /* a key's dense id: its rank among the keys */
    i64 lo = 0, hi = a->nkeys - 1;
    while (lo < hi) { i64 m = (lo + hi) / 2; if (a->uniq[m] < v) lo = m + 1; else hi = m; }
    return lo;
}
static void ad_switch(AD *a, int idx) {
    CP nw;
    if (cp_new(&nw, a->kinds[idx], a->nkeys, a->cap, a->lir_max) != 0) { cp_free(&nw); a->err = 1; return; }
    i64 no = 0, np = 0, k;
    while ((k = cp_victim(&a->lead)) >= 0) a->order[no++] = k;
    for (i64 i = 0; i < no; i++) { cp_insert(&nw, a->order[i]); a->fres[a->order[i]] = 1; }
    void *it = a->get_iter(a->pinned), *item;
    if (!it) { a->err = 1; cp_free(&nw); return; }
    while ((item = a->iter_next(it)) != NULL) {
        long long v = a->as_ll(item);
        a->decref(item);
        k = ad_rank(a, v);
        cp_insert(&nw, k); cp_pin(&nw, k);
        a->fres[k] = 1; a->pins[np++] = k;
    }
    a->decref(it);
    i64 start = a->rn < a->cap ? 0 : a->rpos;
    for (i64 i = 0; i < a->rn; i++) {
        i64 j = start + i; if (j >= a->cap) j -= a->cap;
        k = a->ring[j];
        if (a->fseen[k] && a->fres[k]) cp_touch(&nw, k);
        a->fseen[k] = 1;
    }
    for (i64 i = 0; i < a->rn; i++) a->fseen[a->ring[i]] = 0;
    for (i64 i = 0; i < no; i++) a->fres[a->order[i]] = 0;
    for (i64 i = 0; i < np; i++) a->fres[a->pins[i]] = 0;
    cp_free(&a->lead);
    a->lead = nw; a->li = idx; a->switches++;
}
static void ad_decide(AD *a) {
    double lead = a->shits[a->li];
    i64 best = 0;
    for (i64 i = 1; i < a->ncand; i++) {  /* max by (hits, is leader), first of equals */
        double hb = a->shits[best], hi = a->shits[i];
        if (hi > hb || (hi == hb && i == a->li && best != a->li)) best = i;
    }
    if (best != a->li && a->shits[best] > lead * (1 + a->margin)) ad_switch(a, (int)best);
    for (i64 i = 0; i < a->ncand; i++) a->shits[i] /= 2;
}
static void ad_sample(AD *a, i64 k) {
    i64 sk = a->sid[k];
    for (i64 c = 0; c < a->ncand; c++) {
        uint8_t *res = a->sres[c];
        if (res[sk]) { a->shits[c] += 1; cp_touch(&a->sh[c], sk); continue; }
        if (a->scount[c] >= a->scap) {
            i64 v = cp_victim(&a->sh[c]);
            if (v >= 0) { res[v] = 0; a->scount[c]--; }
        }
        res[sk] = 1; a->scount[c]++;
        cp_insert(&a->sh[c], sk);
    }
    if (++a->sampled >= a->period) { a->sampled = 0; ad_decide(a); }
}
static inline void ad_insert(AD *a, i64 k) {
    cp_insert(&a->lead, k); ad_remember(a, k);
    if (a->sid[k] >= 0) ad_sample(a, k);
}
static inline void ad_touch(AD *a, i64 k) {
    cp_touch(&a->lead, k); ad_remember(a, k);
    if (a->sid[k] >= 0) ad_sample(a, k);
}
static inline void ad_pin(AD *a, i64 k) {
    if (a->set_add(a->pinned, a->objs[k]) != 0) a->err = 1;
    cp_pin(&a->lead, k);
}
static inline void ad_unpin(AD *a, i64 k) {
    if (a->set_discard(a->pinned, a->objs[k]) < 0) a->err = 1;
    cp_unpin(&a->lead, k);
}
static inline i64 ad_victim(AD *a) { return cp_victim(&a->lead); }

/* params: cap, lir_max (leader), ncand, period, scap, lir_max (shadow), nsampled, then
 * the candidates' kinds; sid: each key's shadow id (-1: not sampled); objs: each key's
 * int object; api: PySet_Add, PySet_Discard, PyObject_GetIter, PyIter_Next,
 * PyLong_AsLongLong, Py_DecRef. out: hits, evictions, switches, leader. Called with the
 * GIL held (ctypes.PyDLL). */
int kvbm_replay_adaptive(i64 nkeys, i64 nreq, const i64 *off, const i64 *keys, i64 avail,
                         int reverse, const i64 *params, double margin, const i64 *sid,
                         const i64 *uniq, void *const *objs, void *pinned, void *const *api,
                         i64 *out, i64 *vout) {
    AD st, *a = &st;
    memset(a, 0, sizeof st);
    a->nkeys = nkeys; a->cap = params[0]; a->lir_max = params[1]; a->ncand = params[2];
    a->period = params[3]; a->scap = params[4];
    i64 sh_lir_max = params[5], nsampled = params[6];
    if (a->ncand < 1 || a->ncand > MAXC) return -1;
    for (i64 i = 0; i < a->ncand; i++) a->kinds[i] = (int)params[7 + i];
    a->margin = margin; a->sid = sid; a->uniq = uniq; a->objs = objs; a->pinned = pinned;
    a->set_add = (set_fn)api[0]; a->set_discard = (set_fn)api[1];
    a->get_iter = (obj_fn)api[2]; a->iter_next = (obj_fn)api[3];
    a->as_ll = (ll_fn)api[4]; a->decref = (ref_fn)api[5];
    size_t n = (size_t)nkeys + 1;
    a->ring = malloc(8 * (size_t)(a->cap + 1)); a->order = malloc(8 * n); a->pins = malloc(8 * n);
    a->fres = calloc(n, 1); a->fseen = calloc(n, 1);
    uint8_t *cached = calloc(n, 1);
    int ok = a->ring && a->order && a->pins && a->fres && a->fseen && cached;
    int made = 0, lead_made = 0;
    if (ok) { ok = cp_new(&a->lead, a->kinds[0], nkeys, a->cap, a->lir_max) == 0; lead_made = 1; }
    for (; ok && made < a->ncand; made++) {
        a->sres[made] = calloc((size_t)nsampled + 1, 1);
        ok = cp_new(&a->sh[made], a->kinds[made], nsampled, a->scap, sh_lir_max) == 0 && a->sres[made];
    }
    int rc = -1;
    if (ok) {
        i64 hits = 0, evictions = 0;
        REPLAY(ad, a)
        out[2] = a->switches; out[3] = a->li;
        rc = a->err ? -1 : 0;
    }
    if (lead_made) cp_free(&a->lead);
    for (int i = 0; i < made; i++) { cp_free(&a->sh[i]); free(a->sres[i]); }
    free(a->ring); free(a->order); free(a->pins); free(a->fres); free(a->fseen); free(cached);
    return rc;
}
"""
