"""The built-in multi-turn conversation workload.

``users`` conversations of ``rounds`` turns share one system prompt; each turn's
prompt is that user's whole history (system prompt, earlier user messages and
answers) plus a new user message. Turns are interleaved round-robin across users,
so a user's history must survive in the cache while the others take their turns.
Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Turn:
    """One request: which user and round, and its prompt's token ids."""

    user: int
    round: int
    tokens: np.ndarray


def multi_turn_workload(
    users: int = 8,
    rounds: int = 6,
    system_tokens: int = 1024,
    user_tokens: tuple[int, int] = (256, 768),
    answer_tokens: int = 128,
    vocab: int = 32000,
    seed: int = 0,
) -> Iterator[Turn]:
    """Yield the turns of the workload in arrival order."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, system_tokens, dtype=np.uint32)
    history = [system.copy() for _ in range(users)]
    for r in range(rounds):
        for u in range(users):
            n = int(rng.integers(user_tokens[0], user_tokens[1] + 1))
            msg = rng.integers(0, vocab, n, dtype=np.uint32)
            prompt = np.concatenate([history[u], msg])
            yield Turn(u, r, prompt)
            answer = rng.integers(0, vocab, answer_tokens, dtype=np.uint32)
            history[u] = np.concatenate([prompt, answer])

