"""Hash 128K tokens with kvbm and with vLLM's style, in the same run.

vLLM's style (its ``sha256`` block hasher): per block,
``sha256(pickle.dumps((parent_hash, tuple(tokens), None)))``, chained. kvbm: xxh3-128
over ``namespace/parent ‖ tokens as u32 LE`` (and its optional sha256 mode over the
same bytes). Run: ``python bench/hashing.py [--tokens 131072] [--json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle

import numpy as np

from kvbm import BlockHasher, Namespace
from kvbm_bench.limits import best_of


def vllm_style(tokens: list[int], page: int) -> list[bytes]:
    parent = b"\0" * 32
    out = []
    for i in range(len(tokens) // page):
        blob = pickle.dumps((parent, tuple(tokens[i * page : (i + 1) * page]), None),
                            protocol=pickle.HIGHEST_PROTOCOL)
        parent = hashlib.sha256(blob).digest()
        out.append(parent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=128 * 1024)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    toks = np.random.default_rng(0).integers(0, 128000, a.tokens).tolist()
    ns = Namespace(model_id="bench", layout_digest="0")
    kv = BlockHasher(ns, a.page)
    kv_sha = BlockHasher(ns, a.page, "sha256")
    # kvbm takes the list as the engine hands it over; the conversion is part of the time.
    t_kvbm = best_of(lambda: kv.hash_tokens(toks), a.repeats)
    t_kvbm_sha = best_of(lambda: kv_sha.hash_tokens(toks), a.repeats)
    t_vllm = best_of(lambda: vllm_style(toks, a.page), a.repeats)
    res = {
        "tokens": a.tokens, "blocks": a.tokens // a.page,
        "kvbm_xxh3_128_ms": t_kvbm * 1e3, "kvbm_sha256_ms": t_kvbm_sha * 1e3,
        "vllm_sha256_pickle_ms": t_vllm * 1e3,
        "speedup_xxh3": t_vllm / t_kvbm, "speedup_sha256": t_vllm / t_kvbm_sha,
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{a.tokens} tokens, {a.tokens // a.page} blocks of {a.page} (best of {a.repeats})")
    print(f"  vLLM style sha256(pickle)   {t_vllm * 1e3:8.2f} ms  (baseline)")
    print(f"  kvbm xxh3-128 (default)     {t_kvbm * 1e3:8.2f} ms  {res['speedup_xxh3']:.1f}x faster")
    print(f"  kvbm sha256 mode            {t_kvbm_sha * 1e3:8.2f} ms  {res['speedup_sha256']:.1f}x faster")


if __name__ == "__main__":
    main()
