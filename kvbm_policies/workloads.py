"""Block-access traces for the policy simulator: the trace type, multi-turn chat, Mooncake files.

A trace is a list of requests, each the list of its prompt's block keys in order. Two
requests that share a prefix share its leading keys, as sequence hashes do, so a
request's hit is the leading run of its keys already cached. The other workload
families are in ``kvbm_policies.families``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MOONCAKE_NAME", "Trace", "find_mooncake", "load_mooncake", "multi_turn_trace",
           "request_tokens"]

#: The public Mooncake trace's file, in ``shared/traces/`` beside the repository (its
#: README there says where it comes from).
MOONCAKE_NAME = "mooncake_synthetic_trace.jsonl"


def find_mooncake() -> Path | None:
    """The public Mooncake trace in ``../shared/traces/`` of this checkout or of the current
    directory, or None when neither has it."""
    here = Path(__file__).resolve().parents[1]
    for base in (here, Path.cwd()):
        p = base.parent / "shared" / "traces" / MOONCAKE_NAME
        if p.is_file():
            return p
    return None


@dataclass
class Trace:
    """Requests as lists of block keys (ints), in arrival order."""

    name: str
    requests: list[list[int]]
    #: What one key stands for, for the report ("16-token block", "512-token id").
    unit: str = "block"
    info: dict[str, object] = field(default_factory=dict)
    #: Tokens one key covers (16 for a 16-token block, 512 for a Mooncake id): what a
    #: written key costs in bytes is this many tokens of KV.
    tokens_per_key: int = 16
    #: Arrival time of each request in seconds, when the trace has them (Mooncake's
    #: timestamps); generated traces have none (the chain simulator then spaces
    #: requests evenly).
    times: list[float] | None = None

    @property
    def accesses(self) -> int:
        """Block accesses: the sum of the requests' lengths."""
        return sum(len(r) for r in self.requests)

    @property
    def has_repeats(self) -> bool:
        """Whether some request names one key twice (the registry then counts pins)."""
        return any(len(set(r)) != len(r) for r in self.requests)

    @property
    def working_set(self) -> int:
        """Distinct keys in the trace."""
        seen: set[int] = set()
        for r in self.requests:
            seen.update(r)
        return len(seen)

    def keys_as_bytes(self) -> list[list[bytes]]:
        """The requests with each key as 16 bytes, the form of a sequence hash."""
        memo: dict[int, bytes] = {}
        out: list[list[bytes]] = []
        for r in self.requests:
            row: list[bytes] = []
            for k in r:
                b = memo.get(k)
                if b is None:
                    b = memo[k] = k.to_bytes(16, "little", signed=True)
                row.append(b)
            out.append(row)
        return out


def request_tokens(trace: Trace, page_size: int) -> Iterator[np.ndarray]:
    """Each request as token ids whose chained block hashes share exactly as its keys do.

    Block ``k`` is ``page_size`` tokens derived from its key alone; since a key names its
    whole prefix, two prompts then agree on their first ``i`` blocks exactly when their
    keys do, so ``KvBlockManager.hash_tokens`` reproduces the trace's sharing. For
    replaying any family against a real chain (``kvbm bench``).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    col = np.arange(page_size, dtype=np.uint64)
    for keys in trace.requests:
        k = np.asarray(keys, dtype=np.uint64)[:, None]
        yield ((k * np.uint64(page_size) + col) & np.uint64(0xFFFFFFFF)).astype(np.uint32).ravel()


def multi_turn_trace(
    users: int = 32,
    rounds: int = 8,
    system_tokens: int = 1024,
    user_tokens: tuple[int, int] = (256, 768),
    answer_tokens: int = 128,
    page_size: int = 16,
    seed: int = 0,
) -> Trace:
    """The built-in multi-turn workload as block keys.

    ``users`` conversations of ``rounds`` turns share one system prompt. Each turn's
    prompt is the user's whole history (system prompt, earlier messages and answers)
    plus a new message of ``user_tokens`` tokens (uniform, inclusive); the answer of
    ``answer_tokens`` joins the history. Turns go round-robin across users, as in
    ``kvbm bench``, so a user's history must survive while the others take turns.
    Only complete pages are blocks; as a history only grows, block ``i`` of a user is
    the same block in every later turn. Deterministic for a seed.
    """
    if users < 1 or rounds < 1 or page_size < 1:
        raise ValueError(f"multi-turn trace: users, rounds and page_size must be >= 1, "
                         f"got {users}, {rounds}, {page_size}")
    lo, hi = user_tokens
    if not 0 <= lo <= hi:
        raise ValueError(f"multi-turn trace: user_tokens must be (lo, hi) with 0 <= lo <= hi, got {user_tokens}")
    rng = np.random.default_rng(seed)
    shared = system_tokens // page_size  # blocks every user has in common
    next_key = shared
    keys: list[list[int]] = [list(range(shared)) for _ in range(users)]
    length = [system_tokens] * users
    requests: list[list[int]] = []
    for _ in range(rounds):
        for u in range(users):
            length[u] += int(rng.integers(lo, hi + 1))
            n = length[u] // page_size
            mine = keys[u]
            while len(mine) < n:
                mine.append(next_key)
                next_key += 1
            requests.append(mine[:n])
            length[u] += answer_tokens
    return Trace(
        f"multi-turn ({users} users x {rounds} rounds, seed {seed})",
        requests,
        unit=f"{page_size}-token block", tokens_per_key=page_size,
        info={"family": "multi-turn", "users": users, "rounds": rounds, "system_tokens": system_tokens,
              "user_tokens": list(user_tokens), "answer_tokens": answer_tokens,
              "page_size": page_size, "seed": seed},
    )


def load_mooncake(
    path: str | os.PathLike[str], blocks_per_id: int = 1, limit: int | None = None
) -> Trace:
    """A Mooncake-format trace: one JSON object per line with ``hash_ids``.

    Each hash id stands for 512 tokens; ``blocks_per_id`` expands it into that many
    consecutive block keys (32 for 16-token pages), or keeps ids as keys (1).
    """
    if blocks_per_id < 1:
        raise ValueError(f"blocks_per_id must be >= 1, got {blocks_per_id}")
    requests: list[list[int]] = []
    times: list[float] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                ids: Sequence[int] = row["hash_ids"]
                times.append(float(row.get("timestamp", 0)) / 1000.0)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace line with 'hash_ids' ({e})") from None
            if blocks_per_id == 1:
                requests.append([int(i) for i in ids])
            else:
                requests.append([int(i) * blocks_per_id + j for i in ids for j in range(blocks_per_id)])
            if limit is not None and len(requests) >= limit:
                break
    unit = "512-token id" if blocks_per_id == 1 else f"{512 // blocks_per_id}-token block"
    return Trace(f"mooncake {os.path.basename(os.fspath(path))}", requests, unit=unit,
                 tokens_per_key=max(1, 512 // blocks_per_id), times=times,
                 info={"family": "mooncake", "file": os.path.basename(os.fspath(path)),
                       "blocks_per_id": blocks_per_id, "limit": limit})
