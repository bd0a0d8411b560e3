"""What every engine connector with a leader and per-rank workers shares (vLLM, TensorRT-LLM).

Such an engine splits the data path across processes: the leader (scheduler) drives
the planner, each tensor-parallel rank runs the executor on its own shard. Three
things follow from that and are written once here:

- ``engine_settings``: the user's settings with the engine's block layout filled in
  (a model or page size the user gave that disagrees with the engine is refused);
- ``namespace_for``: rank ``r``'s namespace (a request's LoRA and cache salt in it);
- ``Hashers``: the leader's block hashers, one per (LoRA, cache salt), bounded;
- ``RankReports``: an operation is applied to the planner only once every rank
  reported it (a slot is committed when all ranks wrote it, a load's pins dropped
  when all read it), with the union of their failures;
- ``restore_ranks``: blocks recovered at start are registered only where every rank
  found the same key in the same slot (one registry serves all ranks).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from .config import KvbmSettings
from .errors import ConfigError
from .hashing import BlockHasher, Namespace, SequenceHash
from .layout import BlockLayout
from .planner import Planner

log = logging.getLogger("kvbm")

#: Hashers kept for (LoRA, cache salt) pairs; the least recently used goes first.
MAX_HASHERS = 64


def engine_settings(user: KvbmSettings, layout: BlockLayout, tp_size: int, *, engine: str,
                    page_what: str, page_fix: str) -> KvbmSettings:
    """``user`` with the engine's per-rank layout, page size and tensor-parallel size.

    ``engine`` names the engine's KV cache in errors ("vLLM's KV cache"); ``page_what``
    and ``page_fix`` name its page size and how to change it. A ``model`` the user gave
    keeps its name; its shape must be the engine's (KV heads per rank or in all).
    """
    m = layout.model
    if "model" in user.model_fields_set:
        um = user.model
        heads_ok = um.num_kv_heads in (m.num_kv_heads, m.num_kv_heads * tp_size)
        if (um.num_layers, um.head_dim, um.dtype, um.outer_dim) != (
            m.num_layers, m.head_dim, m.dtype, m.outer_dim
        ) or not heads_ok:
            raise ConfigError(
                f"kvbm config key 'model': layers={um.num_layers} kv_heads={um.num_kv_heads} "
                f"head_dim={um.head_dim} dtype={um.dtype} outer_dim={um.outer_dim} does not "
                f"match {engine} (layers={m.num_layers} kv_heads={m.num_kv_heads} per "
                f"rank x tp {tp_size}, head_dim={m.head_dim} dtype={m.dtype} "
                f"outer_dim={m.outer_dim}); remove 'model' from the kvbm config or fix it")
    if "page_size" in user.model_fields_set and user.page_size != layout.page_size:
        raise ConfigError(
            f"kvbm config key 'page_size': {user.page_size} differs from {page_what} "
            f"{layout.page_size}; remove it from the kvbm config or {page_fix}")
    name = user.model.name if "model" in user.model_fields_set else m.name
    model = {"name": name, "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads,
             "head_dim": m.head_dim, "dtype": m.dtype, "outer_dim": m.outer_dim}
    return user.model_copy(update={"model": type(user.model)(**model),
                                   "page_size": layout.page_size, "tp_size": tp_size})


def namespace_for(settings: KvbmSettings, layout: BlockLayout, rank: int,
                  lora: str | None = None, salt: str | None = None) -> Namespace:
    """The namespace of rank ``rank``'s blocks (a request's LoRA and cache salt included)."""
    return Namespace(model_id=settings.model.name, layout_digest=layout.digest, tp_rank=rank,
                     tp_size=settings.tp_size, lora_name=lora or settings.lora_name,
                     cache_salt=salt or settings.cache_salt)


class Hashers:
    """The leader's hashers by (LoRA, cache salt), at most ``limit``, least recent dropped.

    Keys are hashed under rank 0's namespace: every rank stores a block under the same
    key, each in its own storage (whose namespace holds the rank).
    """

    def __init__(self, settings: KvbmSettings, layout: BlockLayout,
                 limit: int = MAX_HASHERS) -> None:
        self.settings = settings
        self.layout = layout
        self.limit = limit
        self._by: OrderedDict[tuple[str | None, str | None], BlockHasher] = OrderedDict()

    def get(self, lora: str | None, salt: str | None) -> BlockHasher:
        """The hasher of (``lora``, ``salt``), made on first use."""
        key = (lora, salt)
        h = self._by.get(key)
        if h is None:
            ns = namespace_for(self.settings, self.layout, 0, lora, salt)
            h = self._by[key] = BlockHasher(ns, self.layout.page_size,
                                            self.settings.hash_algorithm)
            if len(self._by) > self.limit:
                self._by.popitem(last=False)
        else:
            self._by.move_to_end(key)
        return h

    def relayout(self, layout: BlockLayout) -> None:
        """Hash under ``layout`` from now on (the engine's physical layout became known)."""
        self.layout = layout
        self._by.clear()

    def __getitem__(self, key: tuple[str | None, str | None]) -> BlockHasher:
        return self.get(*key)

    def __len__(self) -> int:
        return len(self._by)


class RankReports:
    """Sums of the ranks' reports per operation until all ``tp_size`` ranks reported."""

    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size
        self._acc: dict[int, tuple[int, set[int]]] = {}

    def add(self, op: int, ranks: int, failed: Iterable[int]) -> set[int] | None:
        """Count ``ranks`` more reports of ``op``; its united failures once complete, else None."""
        m, f = self._acc.get(op, (0, set()))
        m += ranks
        f = f | set(failed)
        if m < self.tp_size:
            self._acc[op] = (m, f)
            return None
        self._acc.pop(op, None)
        return f

    def drop(self, op: int) -> None:
        """Forget an operation nobody waits for any more."""
        self._acc.pop(op, None)

    def __bool__(self) -> bool:
        return bool(self._acc)

    def __len__(self) -> int:
        return len(self._acc)


def restore_ranks(planner: Planner, tp_size: int,
                  blocks_of: Sequence[Callable[[int], set[tuple[int, SequenceHash]]]]) -> int:
    """Register the blocks every rank recovered in the same slot; returns how many.

    ``blocks_of[r](t)`` is rank ``r``'s (slot, key) set for tier ``t``; a rank missing
    from ``blocks_of`` recovered nothing, so nothing is registered.
    """
    total = 0
    for ts in planner.tiers:
        if len(blocks_of) < tp_size:
            break
        common = set.intersection(*(b(ts.index) for b in blocks_of))
        if common:
            n = planner.restore(ts.index, sorted(common))
            total += n
            log.info("kvbm tier %r: %d blocks recovered by all %d ranks are matchable",
                     ts.name, n, tp_size)
    return total
