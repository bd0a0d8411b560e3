"""Workload families: generators of block-key traces with documented parameters.

Every generator returns a ``Trace``: requests in arrival order, each the list of its
prompt's complete blocks. Keys follow the rule of sequence hashes: a block's key names
its whole prefix, so two requests share block ``i`` exactly when their first
``(i + 1) x page_size`` tokens agree. Content that many requests carry (a system
prompt, tool schemas, a document) gets its key through ``_Keys.child(parent, content)``,
so it is shared only behind an identical prefix; everything else gets a fresh key.
All generators are deterministic for a seed, and their parameters (with the defaults
filled in) are kept in ``Trace.info`` to be printed beside every figure.

Families (``FAMILIES`` maps the names ``kvbm simulate --workload`` takes):

- ``multi-turn``: many chat conversations taking turns round-robin (today's workload).
- ``agentic``: agent sessions behind a long shared system prompt and tool schemas; each
  step appends a tool call and its output, and some steps backtrack to an earlier step
  and branch from there.
- ``rag``: a shared instruction prompt, then documents drawn from a pool by popularity in
  varying orders, then a question; some requests are follow-ups on a recent request's
  documents.
- ``long-docs``: multi-turn chat with one-off long documents mixed in (a scan a good
  policy resists).
- ``tenants``: several tenants with different cache salts (no block is shared across
  tenants), each running its own family at its own size, interleaved.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from .workloads import Trace, multi_turn_trace

__all__ = ["FAMILIES", "agentic_trace", "long_docs_trace", "make_workload", "multi_turn_trace",
           "rag_trace", "tenants_trace"]


class _Keys:
    """Block keys as chained hashes make them: shared content behind a shared prefix."""

    def __init__(self) -> None:
        self._next = 0
        self._child: dict[tuple[int, Hashable], int] = {}

    def new(self) -> int:
        """A key no other block has (content seen nowhere else)."""
        k = self._next
        self._next += 1
        return k

    def child(self, parent: int, content: Hashable) -> int:
        """The key of ``content`` behind the block ``parent`` (-1: at the start)."""
        k = self._child.get((parent, content))
        if k is None:
            k = self._child[(parent, content)] = self.new()
        return k

    def shared(self, parent: int, content: Hashable, n: int) -> list[int]:
        """Keys of ``n`` blocks of shared content ``content`` behind ``parent``."""
        out: list[int] = []
        for i in range(n):
            parent = self.child(parent, (content, i))
            out.append(parent)
        return out


def _check(name: str, **values: Any) -> None:
    for key, v in values.items():
        if isinstance(v, tuple):
            lo, hi = v
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} workload: {key} must be (lo, hi) with 0 <= lo <= hi, got {v}")
        elif v < 1:
            raise ValueError(f"{name} workload: {key} must be at least 1, got {v}")


def _uniform(rng: np.random.Generator, span: tuple[int, int]) -> int:
    return int(rng.integers(span[0], span[1] + 1))


class _Line:
    """One line of an agent's work: its blocks and token length (the partial page unkeyed)."""

    __slots__ = ("keys", "length", "steps")

    def __init__(self, keys: list[int], length: int, steps: list[int]) -> None:
        self.keys = keys
        self.length = length
        self.steps = steps  # token length at the end of each step: where a branch may start

    def extend(self, tokens: int, page: int, ids: _Keys) -> None:
        self.length += tokens
        while len(self.keys) < self.length // page:
            self.keys.append(ids.new())


def agentic_trace(
    sessions: int = 64,
    concurrency: int = 32,
    steps: tuple[int, int] = (4, 12),
    system_tokens: int = 2048,
    tools_tokens: int = 6144,
    task_tokens: tuple[int, int] = (128, 512),
    call_tokens: tuple[int, int] = (32, 160),
    output_tokens: tuple[int, int] = (64, 1024),
    branch_prob: float = 0.2,
    page_size: int = 16,
    seed: int = 0,
) -> Trace:
    """Agent sessions: a long shared prefix, tool outputs appended, branches.

    Every session starts from the same system prompt (``system_tokens``) and tool
    schemas (``tools_tokens``), then its task (``task_tokens``). Each step is one model
    call whose prompt is the session's current line; the call's output (a tool call,
    ``call_tokens``) and the tool's output (``output_tokens``) are appended for the next
    step. With probability ``branch_prob`` a step first backtracks: the line restarts
    from the end of a random earlier step (a retry, or another branch of a search), so
    blocks before that point are shared and the abandoned tail is not reused. A session
    runs a uniform number of ``steps``; ``concurrency`` sessions run at once, their steps
    round-robin, and a finished session's place goes to the next of ``sessions``.
    """
    _check("agentic", sessions=sessions, concurrency=concurrency, page_size=page_size,
           steps=steps, task_tokens=task_tokens, call_tokens=call_tokens, output_tokens=output_tokens)
    if not 0.0 <= branch_prob <= 1.0:
        raise ValueError(f"agentic workload: branch_prob must be in [0, 1], got {branch_prob}")
    rng = np.random.default_rng(seed)
    ids = _Keys()
    prefix_tokens = system_tokens + tools_tokens
    head = ids.shared(-1, "system+tools", prefix_tokens // page_size)
    requests: list[list[int]] = []
    started = 0
    active: list[tuple[_Line, int]] = []  # (line, steps left)

    def start() -> tuple[_Line, int]:
        line = _Line(list(head), prefix_tokens, [])
        line.extend(_uniform(rng, task_tokens), page_size, ids)
        return line, _uniform(rng, steps)

    while started < min(concurrency, sessions):
        active.append(start())
        started += 1
    while active:
        i = 0
        while i < len(active):
            line, left = active[i]
            if line.steps and rng.random() < branch_prob:
                back = line.steps[int(rng.integers(0, len(line.steps)))]
                line.keys = line.keys[: back // page_size]
                line.length = back
                line.steps = [s for s in line.steps if s <= back]
            requests.append(list(line.keys))
            line.extend(_uniform(rng, call_tokens), page_size, ids)
            line.extend(_uniform(rng, output_tokens), page_size, ids)
            line.steps.append(line.length)
            left -= 1
            if left > 0:
                active[i] = (line, left)
                i += 1
            elif started < sessions:
                active[i] = start()
                started += 1
                i += 1
            else:
                active.pop(i)
    return Trace(
        f"agentic ({sessions} sessions, {concurrency} at once, seed {seed})", requests,
        unit=f"{page_size}-token block", tokens_per_key=page_size,
        info={"family": "agentic", "sessions": sessions, "concurrency": concurrency,
              "steps": list(steps), "system_tokens": system_tokens, "tools_tokens": tools_tokens,
              "task_tokens": list(task_tokens), "call_tokens": list(call_tokens),
              "output_tokens": list(output_tokens), "branch_prob": branch_prob,
              "page_size": page_size, "seed": seed},
    )


def rag_trace(
    requests: int = 1000,
    docs: int = 500,
    docs_per_request: tuple[int, int] = (3, 6),
    doc_tokens: tuple[int, int] = (256, 1024),
    zipf: float = 1.0,
    prompt_tokens: int = 512,
    question_tokens: tuple[int, int] = (32, 160),
    followup_prob: float = 0.3,
    page_size: int = 16,
    seed: int = 0,
) -> Trace:
    """Retrieval-augmented generation: shared documents recombined in different orders.

    A pool of ``docs`` documents (each ``doc_tokens`` long) is drawn from with Zipf
    popularity (exponent ``zipf``: document ``d`` has weight ``1 / (d + 1) ** zipf``). A
    request is the shared instruction prompt (``prompt_tokens``), then
    ``docs_per_request`` distinct documents in random order, then a question
    (``question_tokens``). A document's blocks are shared only behind the same prompt
    and the same documents before it, as sequence hashes are; so reuse is the prompt, a
    popular first document, and, with probability ``followup_prob``, a follow-up
    question on one of the last eight requests' documents in the same order.
    """
    _check("rag", requests=requests, docs=docs, page_size=page_size, docs_per_request=docs_per_request,
           doc_tokens=doc_tokens, question_tokens=question_tokens)
    if docs_per_request[1] > docs:
        raise ValueError(f"rag workload: docs_per_request {docs_per_request} exceeds the pool of {docs}")
    if not 0.0 <= followup_prob <= 1.0:
        raise ValueError(f"rag workload: followup_prob must be in [0, 1], got {followup_prob}")
    rng = np.random.default_rng(seed)
    ids = _Keys()
    sizes = [_uniform(rng, doc_tokens) for _ in range(docs)]
    weights = 1.0 / np.arange(1, docs + 1) ** zipf
    weights /= weights.sum()
    out: list[list[int]] = []
    recent: list[list[int]] = []
    for _ in range(requests):
        if recent and rng.random() < followup_prob:
            chosen = recent[int(rng.integers(0, len(recent)))]
        else:
            k = _uniform(rng, docs_per_request)
            chosen = [int(d) for d in rng.choice(docs, size=k, replace=False, p=weights)]
            recent = (recent + [chosen])[-8:]
        # Token stream: prompt, documents, question; a block's content is what it covers.
        segments: list[tuple[Hashable, int]] = [("prompt", prompt_tokens)]
        segments += [(("doc", d), sizes[d]) for d in chosen]
        keys: list[int] = []
        parent, pos = -1, 0
        total = sum(n for _, n in segments)
        for seg, n in segments:
            start = pos
            pos += n
            # Blocks that end inside this segment; their content names the segments they
            # cover, which the parent chain already pins down, so the position suffices.
            while (len(keys) + 1) * page_size <= pos:
                parent = ids.child(parent, (seg, (len(keys) + 1) * page_size - start))
                keys.append(parent)
        q = _uniform(rng, question_tokens)
        for _ in range((total + q) // page_size - len(keys)):
            keys.append(ids.new())
        out.append(keys)
    return Trace(
        f"rag ({requests} requests, {docs} documents, seed {seed})", out,
        unit=f"{page_size}-token block", tokens_per_key=page_size,
        info={"family": "rag", "requests": requests, "docs": docs,
              "docs_per_request": list(docs_per_request), "doc_tokens": list(doc_tokens),
              "zipf": zipf, "prompt_tokens": prompt_tokens, "question_tokens": list(question_tokens),
              "followup_prob": followup_prob, "page_size": page_size, "seed": seed},
    )


def long_docs_trace(
    users: int = 32,
    rounds: int = 8,
    doc_every: int = 8,
    doc_tokens: tuple[int, int] = (4096, 16384),
    page_size: int = 16,
    seed: int = 0,
) -> Trace:
    """Multi-turn chat (the ``multi-turn`` family's defaults) with one-off long documents.

    After every ``doc_every`` chat requests comes one request for a document of
    ``doc_tokens`` tokens that no request ever reads again (a summary of an upload, a
    batch job): a scan. LRU lets each scan push out conversation history; a
    scan-resistant policy keeps the history and lets the document pass.
    """
    _check("long-docs", users=users, rounds=rounds, doc_every=doc_every, page_size=page_size,
           doc_tokens=doc_tokens)
    chat = multi_turn_trace(users=users, rounds=rounds, page_size=page_size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    nxt = 1 + max((k for r in chat.requests for k in r), default=-1)
    out: list[list[int]] = []
    for i, r in enumerate(chat.requests, 1):
        out.append(r)
        if i % doc_every == 0:
            n = _uniform(rng, doc_tokens) // page_size
            out.append(list(range(nxt, nxt + n)))
            nxt += n
    info = dict(chat.info)
    info.update(family="long-docs", doc_every=doc_every, doc_tokens=list(doc_tokens))
    return Trace(f"long-docs ({users} users x {rounds} rounds, a document every {doc_every}, "
                 f"seed {seed})", out, unit=chat.unit, tokens_per_key=page_size, info=info)


def tenants_trace(
    tenants: int = 4,
    families: tuple[str, ...] = ("multi-turn", "agentic", "rag", "multi-turn"),
    scale: float = 0.5,
    zipf: float = 1.0,
    page_size: int = 16,
    seed: int = 0,
) -> Trace:
    """Several tenants with different salts, each running a family, interleaved.

    Tenant ``t`` runs ``families[t % len(families)]`` with its defaults scaled by
    ``scale / (t + 1) ** zipf`` (users, sessions or requests: the big tenant first) and
    its own seed. Their cache salts differ, so even the same system prompt is a
    different block per tenant: keys never collide across tenants. Requests are merged
    in a random order that keeps each tenant's own order, so every tenant is active
    throughout, each at its share of the traffic.
    """
    _check("tenants", tenants=tenants, page_size=page_size)
    if not families or any(f not in _SCALED for f in families):
        raise ValueError(f"tenants workload: families must name some of {sorted(_SCALED)}, got {families}")
    if scale <= 0:
        raise ValueError(f"tenants workload: scale must be positive, got {scale}")
    parts: list[list[list[int]]] = []
    offset = 0
    mix: list[str] = []
    for t in range(tenants):
        fam = families[t % len(families)]
        trace = _SCALED[fam](scale / (t + 1) ** zipf, page_size, seed + 101 * t)
        # A different salt: the same content hashes to different keys, so shift the keys.
        top = max((k for r in trace.requests for k in r), default=-1) + 1
        parts.append([[k + offset for k in r] for r in trace.requests])
        offset += top
        mix.append(fam)
    rng = np.random.default_rng(seed)
    order = np.repeat(np.arange(tenants), [len(p) for p in parts])
    rng.shuffle(order)
    pos = [0] * tenants
    out: list[list[int]] = []
    for t in order.tolist():
        out.append(parts[t][pos[t]])
        pos[t] += 1
    return Trace(f"tenants ({tenants}: {', '.join(mix)}; seed {seed})", out,
                 unit=f"{page_size}-token block", tokens_per_key=page_size,
                 info={"family": "tenants", "tenants": tenants, "families": list(families),
                       "scale": scale, "zipf": zipf, "page_size": page_size, "seed": seed,
                       "requests_per_tenant": [len(p) for p in parts]})


def _n(base: int, f: float) -> int:
    return max(1, round(base * f))


_SCALED: dict[str, Callable[[float, int, int], Trace]] = {
    "multi-turn": lambda f, p, s: multi_turn_trace(users=_n(32, f), page_size=p, seed=s),
    "agentic": lambda f, p, s: agentic_trace(sessions=_n(64, f), concurrency=_n(32, f), page_size=p,
                                             seed=s),
    "rag": lambda f, p, s: rag_trace(requests=_n(1000, f), docs=_n(500, f), page_size=p, seed=s),
    "long-docs": lambda f, p, s: long_docs_trace(users=_n(32, f), page_size=p, seed=s),
}

#: The families ``kvbm simulate --workload`` knows, by name.
FAMILIES: dict[str, Callable[..., Trace]] = {
    "multi-turn": multi_turn_trace,
    "agentic": agentic_trace,
    "rag": rag_trace,
    "long-docs": long_docs_trace,
    "tenants": tenants_trace,
}


def make_workload(name: str, **params: Any) -> Trace:
    """The trace of family ``name`` with ``params`` over its defaults."""
    gen = FAMILIES.get(name)
    if gen is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(FAMILIES)}")
    return gen(**params)
