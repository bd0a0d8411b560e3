"""Is there an online signal for which Mooncake blocks come back? (issue 15)

Every figure is a hit rate ÷ Belady's OPT on the public Mooncake synthetic trace at a
quarter of its distinct ids (``kvbm_policies.replay``, strict prefix hits, tail-first
release), printed beside LRU's in the same run. Sections:

1. Where the hits are: an infinite cache's hits on blocks never hit before (a
   conversation's first return) and on blocks hit before, and what each policy gets.
2. Oracles on an LRU that puts a block at its cold end: told at insertion whether the
   block is ever read again, told at release whether a hit block is, both.
3. Class oracles: the same LRU told, for each block, the *exact* share of its class's
   blocks that are read again (computed from the whole trace: more than any online
   learner can know), cold when that share is under a threshold (best of 0.1–0.5).
   Classes: what the ``learned`` policy can see (behind a hit or not, log2 depth in its
   run), and, though no policy hook carries them, the request's length, output length
   and input length.
4. Bayes error: the share of new blocks misclassified (read again or not) by the best
   rule on each feature set, against the prior's, in-sample (optimistic).
5. How good a per-request predictor must be: the per-request oracle with a share of
   its verdicts flipped at random.
6. Conversations: P(another turn | k turns so far).

Usage: ``.venv/bin/python bench/mooncake_signals.py [--trace FILE]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.policy import EvictionPolicy, LRUPolicy  # noqa: E402
from kvbm_policies.eviction import ARCPolicy  # noqa: E402
from kvbm_policies.learned import LearnedPolicy  # noqa: E402
from kvbm_policies.replay import belady, replay  # noqa: E402
from kvbm_policies.workloads import Trace, find_mooncake, load_mooncake  # noqa: E402
from kvbm_policies.wrap import ForwardingPolicy  # noqa: E402


def hinted_lru(t: Trace, cap: int, cold_insert: Callable[[int, Counter[int]], bool],
               cold_release: Callable[[int, Counter[int]], bool]) -> float:
    """Hit rate of an LRU that puts a block at its cold end when told to; the hints get
    the block and each key's count of accesses still to come (the oracle's future)."""
    rem: Counter[int] = Counter(k for r in t.requests for k in r)
    order: OrderedDict[int, None] = OrderedDict()
    cached: set[int] = set()
    hits = 0
    for keys in t.requests:
        for k in keys:
            rem[k] -= 1
        n = 0
        while n < len(keys) and keys[n] in cached:
            order.pop(keys[n], None)
            n += 1
        hits += n
        for k in keys[n:]:
            if k in cached:
                continue
            if len(cached) >= cap:
                cached.discard(order.popitem(last=False)[0])
            cached.add(k)
            order[k] = None
            if cold_insert(k, rem):
                order.move_to_end(k, last=False)
        for k in reversed(keys[:n]):
            order[k] = None
            if cold_release(k, rem):
                order.move_to_end(k, last=False)
    return hits / t.accesses


class _CountingHits(ForwardingPolicy):
    """Passes every call on to ``inner``; counts hits (``touch``) on blocks hit before or not."""

    def __init__(self, inner: EvictionPolicy) -> None:
        super().__init__(inner)
        self.hit_before: set[Any] = set()
        self.first = self.again = 0

    def touch(self, key: Any) -> None:
        if key in self.hit_before:
            self.again += 1
        else:
            self.first += 1
            self.hit_before.add(key)
        self.inner.touch(key)


def never(k: int, rem: Counter[int]) -> bool:
    """The oracle: no access of ``k`` is left."""
    return rem[k] == 0


def no(k: int, rem: Counter[int]) -> bool:
    """No hint."""
    return False


def _below(value: dict[int, float], th: float) -> Callable[[int, Counter[int]], bool]:
    """A hint: cold when the block's value is under ``th``."""
    def hint(k: int, rem: Counter[int]) -> bool:
        return value[k] < th
    return hint


def features(t: Trace, rows: list[dict[str, Any]]) -> dict[int, dict[str, Hashable]]:
    """Per new block (at its first access): the classes of section 3."""
    seen: set[int] = set()
    out: dict[int, dict[str, Hashable]] = {}
    fresh_before = False
    depth = 0
    for i, r in enumerate(t.requests):
        n = 0
        while n < len(r) and r[n] in seen:
            n += 1
        if n:
            depth = n  # a run behind a hit
        elif not fresh_before:
            depth = 0  # a run with no hit, after a request with hits
        for k in r[n:]:
            if k not in seen:
                seen.add(k)
                out[k] = {"visible": (n > 0, depth.bit_length()),
                          "request length": len(r).bit_length(),
                          "output length": int(rows[i]["output_length"]).bit_length(),
                          "input length": int(rows[i]["input_length"]) // 256,
                          "request x output length": (len(r).bit_length(),
                                                      int(rows[i]["output_length"]).bit_length())}
            depth += 1
        fresh_before = n == 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=find_mooncake())
    args = ap.parse_args(argv)
    if args.trace is None:
        print("no Mooncake trace: pass --trace FILE (see shared/traces/README.md)")
        return 2
    with open(args.trace, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    t = load_mooncake(args.trace)
    cap = max(1, t.working_set // 4)
    opt = belady(t, cap).hit_rate
    count = Counter(k for r in t.requests for k in r)
    lru = replay(t, LRUPolicy(cap), cap).hit_rate
    print(f"capacity {cap} ids, OPT {opt:.2%}, LRU {lru:.2%} = {lru / opt:.3f} of OPT\n")

    print("## 1. Where the hits are (share of accesses)")
    seen: set[int] = set()
    hc: Counter[int] = Counter()
    first = again = 0
    for r in t.requests:
        n = 0
        while n < len(r) and r[n] in seen:
            n += 1
        for k in r[:n]:
            first += hc[k] == 0
            again += hc[k] > 0
            hc[k] += 1
        seen.update(r)
    print(f"infinite cache: first return {first / t.accesses:.1%}, "
          f"blocks hit before {again / t.accesses:.1%}")
    for name, pol in (("lru", LRUPolicy(cap)), ("arc", ARCPolicy(cap)),
                      ("learned", LearnedPolicy(cap))):
        counting = _CountingHits(pol)
        res = replay(t, counting, cap)
        print(f"{name}: {res.hit_rate:.2%} = {res.hit_rate / opt:.3f} of OPT; first return "
              f"{counting.first / t.accesses:.1%}, blocks hit before {counting.again / t.accesses:.1%}")

    print("\n## 2. Oracles on LRU (of OPT)")
    for label, ci, cr in (("told at insertion", never, no), ("told at release", no, never),
                          ("both", never, never)):
        print(f"{label}: {hinted_lru(t, cap, ci, cr) / opt:.3f}")

    feats = features(t, rows)
    names = list(next(iter(feats.values())))
    print("\n## 3. Class oracles on LRU (exact class reuse rates; of OPT, best threshold)")
    for name in names:
        tally: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
        for k, feat in feats.items():
            tally[feat[name]][0] += 1
            tally[feat[name]][1] += count[k] > 1
        rate = {c: v[1] / v[0] for c, v in tally.items()}
        cls = {k: rate[feat[name]] for k, feat in feats.items()}
        best = max((hinted_lru(t, cap, _below(cls, th), no) / opt, th)
                   for th in (0.1, 0.2, 0.3, 0.4, 0.5))
        print(f"{name} ({len(tally)} classes): {best[0]:.3f} (threshold {best[1]})")

    print("\n## 4. Bayes error on 'read again', per new block (prior: always guess 'not')")
    n_all = len(feats)
    pos = sum(count[k] > 1 for k in feats)
    print(f"prior: {min(pos, n_all - pos) / n_all:.3f}")
    for name in names:
        tally = defaultdict(lambda: [0, 0])
        for k, feat in feats.items():
            tally[feat[name]][count[k] > 1] += 1
        print(f"{name}: {sum(min(v) for v in tally.values()) / n_all:.3f}")

    print("\n## 5. Per-request oracle (a request whose new blocks are mostly read again "
          "stays hot), with verdicts flipped at random (of OPT)")
    owner: dict[int, int] = {}
    for i, r in enumerate(t.requests):
        for k in r:
            owner.setdefault(k, i)
    share: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for k, i in owner.items():
        share[i][0] += 1
        share[i][1] += count[k] > 1
    good = {i: 2 * v[1] > v[0] for i, v in share.items()}
    for eps in (0.0, 0.05, 0.1, 0.2):
        rnd = random.Random(1)
        hot = {i: g != (rnd.random() < eps) for i, g in good.items()}
        kept = {k: 1.0 if hot[i] else 0.0 for k, i in owner.items()}
        hit = hinted_lru(t, cap, _below(kept, 0.5), no)
        print(f"flipped {eps:.0%}: {hit / opt:.3f}")

    print("\n## 6. Conversations (requests sharing their first id)")
    turns = Counter(Counter(r[0] for r in t.requests).values())
    for k in range(1, 6):
        ge = sum(v for n, v in turns.items() if n >= k)
        ge1 = sum(v for n, v in turns.items() if n > k)
        print(f"P(turn {k + 1} | {k} turns) = {ge1 / ge:.2f} of {ge}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
