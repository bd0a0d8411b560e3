"""kvbm as a vLLM KV connector (``KVConnectorBase_V1``).

Enable it with::

    --kv-transfer-config '{"kv_connector":"KvbmConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvbm.connectors.vllm"}'

and configure it from ``kv_connector_extra_config`` (``{"kvbm": {...settings...}}`` or
``{"kvbm_config": "/path/kvbm.yaml"}``) or from kvbm's own ``KVBM_CONFIG`` / ``KVBM_*`` /
``DYN_KVBM_*`` environment. The model part of the layout (layers, KV heads, head size,
dtype, page size) always comes from vLLM's KV-cache spec; a kvbm config that names a
different one is an error.

The two halves of the design run in vLLM's two kinds of process:

- the **scheduler** side (one process) holds the metadata: one ``BlockRegistry`` per
  tier of the chain, the pins, the admission filters, and every slot decision. It
  turns vLLM's scheduling into slot-level instructions (``KvbmConnectorMetadata``):
  *load engine block b from tier t slot s*, *save engine block b into tier 0 slot s*,
  *copy tier t slot s to tier t+1 slot s'*, *forget these slots*.
- each **worker** (one per tensor-parallel rank) holds its own storage for every tier
  of the chain and executes the same instructions on its own shard of the KV heads.
  One registry therefore serves all ranks: slot ``s`` of tier ``t`` holds the same
  block on every rank, each rank's bytes in that rank's own storage (a host arena per
  process, a disk file under a ``rank<r>`` folder, S3 objects under the rank's
  namespace). A rank can never read another rank's shard because it never holds one.
  Workers report every instruction back (``KvbmWorkerMetadata``); a slot becomes
  matchable only when all ``tp_size`` ranks wrote it, and a load's pins are dropped
  only when all ranks read it.

The scheduler side also finds blocks it did not write itself, without holding any
storage:

- **recovered** blocks: each worker calls ``Tier.recover()`` at start (a restarted
  disk tier reads its slot headers) and hands the result to vLLM's start-up handshake
  (``get_handshake_metadata``); the scheduler side receives every rank's set
  (``set_xfer_handshake_metadata``) before the first step and registers the blocks
  that *all* ranks hold in the same slot, as ``BlockRegistry.restore`` does for
  ``KvBlockManager``;
- blocks **other instances** put in shared tiers (``Tier.shared``: s3, remote): when
  the registries end a request's match early, the scheduler sends a ``ProbeOp`` per
  shared tier and keeps the request waiting (``get_num_new_matched_tokens`` returns
  None). Each rank probes its own storage and reports where its found prefix ends;
  the shortest prefix over all ranks is adopted into the registry (as
  ``KvBlockManager._match_shared`` does) and matched on the next step. The worker that
  probed is the one that reads, so what a probe learns (an s3 pack's layout, the peer
  holding a block) serves the load. A request probes once; no answer within
  ``probe_timeout_s`` is a miss.

Each worker also **serves** its own host arena to peers through a ``remote`` tier (it
calls ``RemoteTier.serve``, not ``attach``: the registries are in the scheduler
process). The worker keeps the arena's key -> slot map (``SlotMap``) from the
instructions it executes: a slot leaves service when a ``DiscardOp`` or a write into
it arrives (``claim``, at the start of the step) and serves its new key only once all
its layers were written (``commit``, at the end of the step), so a peer never reads a
half-written block. A slot a peer's lease pins is never written: that block's save
(or cascade copy) is skipped and reported failed, so the scheduler aborts the slot;
the forward pass never waits for a lease. With tensor parallelism each rank serves
its own shard: rank ``r`` listens on ``listen``'s port + ``r`` and reads each peer at
that peer's port + ``r`` (a ``rendezvous_dir`` is per rank already, as its folder is
named by the namespace, which holds the rank), and ``hello``'s namespace check
refuses a reader of another rank.

Loads are layer-wise when the matched blocks sit in the first tier: ``start_load_kv``
hands the step's loads to a worker thread that copies layer 0 of every block, sets
layer 0's event, then layer 1, and so on, while ``wait_for_layer_load`` blocks on one
layer's event only, so attention of layer ``i`` overlaps the copy of layer ``i+1``.
Blocks from lower tiers load asynchronously between steps (the request waits in
``WAITING_FOR_REMOTE_KVS``). A block that fails its read is reported through
``get_block_ids_with_load_errors``, never marked loaded, and dropped from the registry.
Saves are layer-wise too: ``save_kv_layer`` copies each layer of the step's newly
complete blocks into the first tier as soon as vLLM has written it.

Stored bytes use kvbm's canonical block order ``[layers, 2 (K,V), page, heads x
head_dim]`` whatever physical KV-cache layout vLLM picked, so a block saved under one
attention backend reads back under another.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.config import KvbmSettings, load_settings
from kvbm.errors import ConfigError, LayoutError, PluginError
from kvbm.hashing import BlockHasher, Namespace, SequenceHash
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.manager import resolve_chain
from kvbm.plugins import build_plugins
from kvbm.policy import AdmissionPolicy
from kvbm.registry import BlockRegistry
from kvbm.staging import StagingPool
from kvbm.tier import Tier, TierContext

try:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorWorkerMetadata,
    )
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as e:  # pragma: no cover - exercised only without vLLM
    raise PluginError(
        f"kvbm.connectors.vllm needs vLLM and torch ({e}); install vLLM, then "
        "pip install 'kvbm[vllm]'"
    ) from e

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvbm_tiers_remote.server import SlotMap

log = logging.getLogger("kvbm.vllm")

_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
}
_MEDIUM = {"gpu": "GPU", "host": "CPU"}
_HIT_SOURCE = {"gpu": CacheHitSource.DEVICE, "host": CacheHitSource.HOST,
               "disk": CacheHitSource.DISK, "remote": CacheHitSource.P2P}


# --- what the scheduler tells the workers ---------------------------------------


@dataclass
class LoadOp:
    """Copy ``tier[i]`` slot ``slots[i]`` (block ``keys[i]``) into engine block ``block_ids[i]``."""

    op_id: int
    req_id: str
    block_ids: list[int]
    tiers: list[int]
    slots: list[int]
    keys: list[bytes]
    layerwise: bool


@dataclass
class SaveOp:
    """Copy engine block ``block_ids[i]`` (of request ``req_ids[i]``) into first-tier slot ``slots[i]``.

    A worker fails every block of a request whose load in the same step failed: those
    blocks were computed on top of KV that never arrived.
    """

    op_id: int
    block_ids: list[int]
    slots: list[int]
    keys: list[bytes]
    req_ids: list[str]


@dataclass
class CopyOp:
    """The write-through cascade: copy ``src_tier`` slots into ``dst_tier`` slots."""

    op_id: int
    src_tier: int
    src_slots: list[int]
    dst_tier: int
    dst_slots: list[int]
    keys: list[bytes]


@dataclass
class DiscardOp:
    """The registry dropped these blocks: let the tier forget them (no report)."""

    tier: int
    slots: list[int]
    keys: list[bytes]


@dataclass
class ProbeOp:
    """Ask shared tier ``tier`` which leading ``keys`` it holds (another instance wrote them).

    Each rank probes its own storage (its own namespace) and reports the index of the
    first key it lacks as a failure; the scheduler side takes the smallest over all
    ranks, so a block counts as found only when every rank can read it.
    """

    op_id: int
    tier: int
    keys: list[bytes]


class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's slot-level instructions, the same for every tensor-parallel rank."""

    def __init__(self) -> None:
        self.loads: list[LoadOp] = []
        self.saves: list[SaveOp] = []
        self.copies: list[CopyOp] = []
        self.discards: list[DiscardOp] = []
        self.probes: list[ProbeOp] = []

    def __repr__(self) -> str:
        return (f"KvbmConnectorMetadata(loads={len(self.loads)}, saves={len(self.saves)}, "
                f"copies={len(self.copies)}, discards={len(self.discards)}, "
                f"probes={len(self.probes)})")


class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """What workers finished: ``op_id -> (number of ranks reporting, failed block indices)``.

    vLLM aggregates one object per rank each step; the scheduler side adds the counts
    up across steps until every rank has reported an instruction.
    """

    def __init__(self, reports: dict[int, tuple[int, frozenset[int]]] | None = None) -> None:
        self.reports: dict[int, tuple[int, frozenset[int]]] = dict(reports or {})

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Sum the rank counts and unite the failures of two reports."""
        assert isinstance(other, KvbmWorkerMetadata), (
            f"KvbmWorkerMetadata cannot aggregate {type(other).__name__}"
        )
        out = dict(self.reports)
        for op, (n, failed) in other.reports.items():
            if op in out:
                m, f = out[op]
                out[op] = (m + n, f | failed)
            else:
                out[op] = (n, failed)
        return KvbmWorkerMetadata(out)


class KvbmHandshakeMetadata(KVConnectorHandshakeMetadata):
    """One rank's blocks that its persistent tiers found at start (``Tier.recover``).

    vLLM collects one per worker once the KV caches are registered and hands them to
    the scheduler side (``set_xfer_handshake_metadata``) before the first step. Per
    tier: the slots as little-endian int64 and the 16-byte keys, concatenated, so a
    million recovered blocks cross the process boundary as two flat byte strings.
    """

    KEY_BYTES = 16

    def __init__(self, rank: int, tiers: list[tuple[bytes, bytes]]) -> None:
        self.rank = rank
        self.tiers = tiers

    @classmethod
    def of(cls, rank: int, recovered: list[list[tuple[int, SequenceHash]]]) -> KvbmHandshakeMetadata:
        """Encode ``recovered[t]`` (slot, key) of every tier ``t``."""
        tiers = []
        for blocks in recovered:
            ok = [(s, k) for s, k in blocks if len(k) == cls.KEY_BYTES]
            slots = np.asarray([s for s, _ in ok], dtype="<i8").tobytes()
            tiers.append((slots, b"".join(k for _, k in ok)))
        return cls(rank, tiers)

    def blocks(self, tier: int) -> set[tuple[int, SequenceHash]]:
        """(slot, key) of every block this rank recovered in tier ``tier``."""
        if tier >= len(self.tiers):
            return set()
        slots_raw, keys = self.tiers[tier]
        slots = np.frombuffer(slots_raw, dtype="<i8").tolist()
        kb = self.KEY_BYTES
        return {(int(s), SequenceHash(keys[i * kb : (i + 1) * kb])) for i, s in enumerate(slots)}

    @property
    def num_blocks(self) -> int:
        """Blocks recovered over all tiers."""
        return sum(len(s) // 8 for s, _ in self.tiers)

    def __repr__(self) -> str:
        return f"KvbmHandshakeMetadata(rank={self.rank}, blocks={self.num_blocks})"


# --- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineLayout:
    """What vLLM's KV-cache spec fixes: the per-rank block layout and the layer order."""

    layout: BlockLayout
    layer_names: tuple[str, ...]


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> EngineLayout:
    """The per-rank block layout of vLLM's KV cache; ``LayoutError`` when kvbm cannot hold it.

    kvbm supports one KV-cache group of full attention (MHA/GQA with equal K and V head
    sizes, or MLA), unquantized. Hybrid models (sliding window groups, Mamba), packed
    or quantized pages are refused with the reason.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise LayoutError(
            f"vLLM KV cache has {len(groups)} groups ({', '.join(kinds)}): a hybrid-attention "
            "model, which kvbm does not support; run it without kvbm or with "
            "--disable-hybrid-kv-cache-manager"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec):
        raise LayoutError(
            f"vLLM KV-cache spec {type(spec).__name__} is not full attention; kvbm supports "
            "FullAttentionSpec and MLAAttentionSpec"
        )
    for attr, ok in (("num_head_slots", None), ("state_content_bytes", None),
                     ("page_size_padded", None)):
        if getattr(spec, attr, None) is not ok:
            raise LayoutError(
                f"vLLM KV-cache spec has {attr}={getattr(spec, attr)!r} (packed pages); "
                "kvbm supports plain [blocks, heads, tokens, K|V] pages"
            )
    if getattr(spec, "tokens_per_state", 1) != 1:
        raise LayoutError(f"vLLM KV-cache spec stores {spec.tokens_per_state} tokens per "
                          "state; kvbm supports one token per state")
    quant = getattr(spec, "kv_quant_mode", None)
    if quant is not None and getattr(quant, "name", "NONE") != "NONE":
        raise LayoutError(f"vLLM KV cache is quantized ({quant.name}); kvbm supports "
                          "unquantized KV caches only")
    dtype = _TORCH_DTYPES.get(spec.dtype)
    if dtype is None:
        raise LayoutError(f"vLLM KV-cache dtype {spec.dtype} is not supported; use one of "
                          f"{sorted(_TORCH_DTYPES.values())}")
    if isinstance(spec, MLAAttentionSpec):
        model = ModelSpec(num_layers=len(groups[0].layer_names), num_kv_heads=1,
                          head_dim=spec.head_size, dtype=dtype, outer_dim=1,
                          name=str(vllm_config.model_config.model))
    else:
        if spec.head_size_v != spec.head_size:
            raise LayoutError(f"vLLM KV cache has K head size {spec.head_size} and V head "
                              f"size {spec.head_size_v}; kvbm needs them equal")
        model = ModelSpec(num_layers=len(groups[0].layer_names),
                          num_kv_heads=spec.num_kv_heads, head_dim=spec.head_size,
                          dtype=dtype, outer_dim=2, name=str(vllm_config.model_config.model))
    return EngineLayout(BlockLayout(model, spec.block_size, kind="layer_separate"),
                        tuple(groups[0].layer_names))


def connector_settings(vllm_config: VllmConfig, eng: EngineLayout) -> KvbmSettings:
    """kvbm settings for this engine: the user's config with vLLM's layout filled in.

    The user's config is ``kv_connector_extra_config["kvbm"]`` (a dict of settings),
    else ``kv_connector_extra_config["kvbm_config"]`` (a YAML path), else kvbm's own
    environment (``KVBM_CONFIG``, ``KVBM_*``, ``DYN_KVBM_*``). A model or page size
    given there that disagrees with vLLM's is a ``ConfigError``.
    """
    ktc = vllm_config.kv_transfer_config
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    source: Any = extra.get("kvbm")
    if source is None:
        source = extra.get("kvbm_config")
    user = load_settings(source)
    m = eng.layout.model
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    if "model" in user.model_fields_set:
        um = user.model
        heads_ok = um.num_kv_heads in (m.num_kv_heads, m.num_kv_heads * tp)
        if (um.num_layers, um.head_dim, um.dtype, um.outer_dim) != (
            m.num_layers, m.head_dim, m.dtype, m.outer_dim
        ) or not heads_ok:
            raise ConfigError(
                f"kvbm config key 'model': layers={um.num_layers} kv_heads={um.num_kv_heads} "
                f"head_dim={um.head_dim} dtype={um.dtype} outer_dim={um.outer_dim} does not "
                f"match vLLM's KV cache (layers={m.num_layers} kv_heads={m.num_kv_heads} per "
                f"rank x tp {tp}, head_dim={m.head_dim} dtype={m.dtype} outer_dim={m.outer_dim}); "
                "remove 'model' from the kvbm config or fix it"
            )
    if "page_size" in user.model_fields_set and user.page_size != eng.layout.page_size:
        raise ConfigError(
            f"kvbm config key 'page_size': {user.page_size} differs from vLLM's block size "
            f"{eng.layout.page_size}; remove it from the kvbm config or pass "
            f"--block-size {user.page_size} to vLLM"
        )
    name = user.model.name if "model" in user.model_fields_set else m.name
    model = {"name": name, "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads,
             "head_dim": m.head_dim, "dtype": m.dtype, "outer_dim": m.outer_dim}
    return user.model_copy(update={
        "model": type(user.model)(**model),
        "page_size": eng.layout.page_size,
        "tp_size": tp,
    })


def _namespace(settings: KvbmSettings, layout: BlockLayout, rank: int,
               lora: str | None = None, salt: str | None = None) -> Namespace:
    return Namespace(model_id=settings.model.name, layout_digest=layout.digest, tp_rank=rank,
                     tp_size=settings.tp_size, lora_name=lora or settings.lora_name,
                     cache_salt=salt or settings.cache_salt)


# --- scheduler side ----------------------------------------------------------------


@dataclass
class _TierMeta:
    name: str
    type: str
    registry: BlockRegistry
    admission: AdmissionPolicy
    shared: bool = False
    hits: int = 0
    lookups: int = 0


@dataclass
class _Probe:
    """A request's question to the shared tiers: which of ``keys`` other instances wrote."""

    keys: list[SequenceHash]
    ops: dict[int, int]  # unanswered op id -> tier
    deadline: float
    found: dict[int, int] = field(default_factory=dict)  # tier -> leading keys all ranks hold


@dataclass
class _ReqState:
    request: Any
    supported: bool
    hasher: BlockHasher | None
    hashes: list[SequenceHash] = field(default_factory=list)
    pins: list[tuple[int, int]] = field(default_factory=list)  # (tier, slot), pending match
    first_block: int = 0
    load_async: bool = False
    saved: int = 0  # leading blocks already considered for saving
    inflight_load: int | None = None  # op id of the latest load instruction
    awaiting_recv: bool = False  # vLLM waits for this request in finished_recving
    probe: _Probe | None = None  # shared tiers being asked; the request waits meanwhile
    probed: bool = False  # asked once already (answered or timed out): never again

    def hashes_upto(self, n: int) -> list[SequenceHash]:
        """Sequence hashes of the first ``n`` complete blocks (computed once, extended)."""
        have = len(self.hashes)
        if n > have and self.hasher is not None:
            page = self.hasher.page_size
            toks = self.request.all_token_ids[have * page : n * page]
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.extend(self.hasher.hash_tokens(list(toks), parent=parent))
        return self.hashes[:n]


@dataclass
class _Pending:
    kind: str  # "load" | "save" | "copy"
    keys: list[SequenceHash]
    tiers: list[int]  # load: tier of each block; save/copy: destination tier of each
    slots: list[int]  # load: pinned slots; save/copy: WRITING slots
    req_id: str | None = None
    src_tier: int = 0
    src_slots: list[int] = field(default_factory=list)
    ext: list[Any] = field(default_factory=list)  # (vllm hash, tokens) for KV events
    reports: int = 0
    failed: set[int] = field(default_factory=set)


class SchedulerSide:
    """The metadata half: registries, pins and slot decisions for one vLLM scheduler."""

    def __init__(self, settings: KvbmSettings, layout: BlockLayout, load_mode: str,
                 publish_events: bool, lora_names: bool = True,
                 probe_timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.layout = layout
        self.page = layout.page_size
        self.tp_size = settings.tp_size
        plugins = build_plugins()
        links = resolve_chain(settings, plugins, load=False)
        self.tiers = [
            _TierMeta(link.name, link.config.type, BlockRegistry(link.name, link.num_blocks,
                                                                  link.eviction), link.admission,
                      shared=_is_shared(plugins, link.name, link.config.type))
            for link in links
        ]
        # Shared tiers (s3, remote) hold blocks other instances wrote: the workers probe
        # them for what the registries lack (the scheduler holds no storage).
        self.shared = [t for t, tm in enumerate(self.tiers) if tm.shared]
        if probe_timeout_s <= 0:
            raise ConfigError(f"kv_connector_extra_config key 'probe_timeout_s': "
                              f"{probe_timeout_s!r} must be a positive number of seconds")
        self.probe_timeout_s = float(probe_timeout_s)
        self._probes: list[ProbeOp] = []
        self._restored = False
        self.restored_blocks = 0
        self.adopted_blocks = 0
        if load_mode not in ("auto", "async", "layerwise"):
            raise ConfigError(f"kv_connector_extra_config key 'load_mode': {load_mode!r} is not "
                              "one of auto, async, layerwise")
        self.load_mode = load_mode
        self.reqs: dict[str, _ReqState] = {}
        self.pending: dict[int, _Pending] = {}
        self._next_op = 1
        self._hashers: dict[tuple[str | None, str | None], BlockHasher] = {}
        self._loads: list[LoadOp] = []
        self._copies: list[CopyOp] = []
        self._discards: list[DiscardOp] = []
        self._said: set[str] = set()
        self.publish_events = publish_events
        self._events: list[Any] = []
        self._ext_of: dict[SequenceHash, tuple[Any, int]] = {}  # key -> (vllm hash, tiers holding)
        self.loaded_blocks = 0
        self.failed_blocks = 0
        self.saved_blocks = 0

    # -- helpers -----------------------------------------------------------------
    def _say_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    def _op_id(self) -> int:
        op = self._next_op
        self._next_op += 1
        return op

    def _hasher(self, request: Any) -> BlockHasher:
        lora = request.lora_request.lora_name if getattr(request, "lora_request", None) else None
        salt = getattr(request, "cache_salt", None)
        h = self._hashers.get((lora, salt))
        if h is None:
            ns = _namespace(self.settings, self.layout, 0, lora, salt)
            h = self._hashers[(lora, salt)] = BlockHasher(ns, self.page,
                                                          self.settings.hash_algorithm)
        return h

    def _state(self, request: Any) -> _ReqState:
        st = self.reqs.get(request.request_id)
        if st is None or st.request is not request:
            supported = True
            if getattr(request, "mm_features", None):
                supported = False
                self._say_once("mm", "kvbm: requests with multimodal inputs are passed through "
                               "without reuse (their KV depends on more than token ids)")
            elif getattr(request, "prompt_embeds", None) is not None:
                supported = False
                self._say_once("embeds", "kvbm: requests given as prompt embeddings are passed "
                               "through without reuse (they carry no token ids to hash)")
            st = _ReqState(request, supported, self._hasher(request) if supported else None)
            self.reqs[request.request_id] = st
        return st

    def _unpin(self, pins: Iterable[tuple[int, int]]) -> None:
        for t, s in pins:
            self.tiers[t].registry.unpin(s)

    def _drain_evicted(self, t: int) -> None:
        tm = self.tiers[t]
        evicted = tm.registry.take_evicted()
        if evicted:
            self._discards.append(DiscardOp(t, [s for _, s in evicted], [k for k, _ in evicted]))
            if self.publish_events:
                self._removed(t, [k for k, _ in evicted])

    # -- KV events ---------------------------------------------------------------
    def _stored(self, t: int, keys: list[SequenceHash], ext: list[Any]) -> None:
        from vllm.distributed.kv_events import BlockStored

        hashes, tokens = [], []
        for k, (vh, toks) in zip(keys, ext):
            prev = self._ext_of.get(k)
            self._ext_of[k] = (vh, (prev[1] if prev else 0) + 1)
            hashes.append(vh)
            tokens.extend(toks)
        if hashes:
            self._events.append(BlockStored(
                block_hashes=hashes, parent_block_hash=None, token_ids=tokens,
                block_size=self.page, lora_id=None,
                medium=_MEDIUM.get(self.tiers[t].type, "STORAGE"), lora_name=None))

    def _removed(self, t: int, keys: list[SequenceHash]) -> None:
        from vllm.distributed.kv_events import BlockRemoved

        hashes = []
        for k in keys:
            prev = self._ext_of.get(k)
            if prev is None:
                continue
            hashes.append(prev[0])
            if prev[1] <= 1:
                del self._ext_of[k]
            else:
                self._ext_of[k] = (prev[0], prev[1] - 1)
        if hashes:
            self._events.append(BlockRemoved(block_hashes=hashes,
                                             medium=_MEDIUM.get(self.tiers[t].type, "STORAGE")))

    def take_events(self) -> list[Any]:
        out, self._events = self._events, []
        return out

    # -- blocks found in storage: recovered at start, or written by other instances ----
    def restore(self, ranks: dict[int, KvbmHandshakeMetadata]) -> int:
        """Register the blocks every rank's persistent tiers recovered at start.

        A block is registered only where all ``tp_size`` ranks found the same key in the
        same slot: one registry serves all ranks, and a load needs every rank's shard.
        Runs once, before the first step; a late call (vLLM re-sends the handshake after
        a wake-up) is ignored, as the registries already hold this run's writes.
        Returns the number of blocks registered.
        """
        if self._restored:
            return 0
        self._restored = True
        if self._next_op > 1 or any(tm.registry.num_used for tm in self.tiers):
            log.warning("kvbm: the workers' recovered blocks arrived after scheduling began; "
                        "they are not used (the slots may have been written since)")
            return 0
        lacking = [r for r in range(self.tp_size) if r not in ranks]
        total = 0
        for t, tm in enumerate(self.tiers):
            common: set[tuple[int, SequenceHash]] | None = None
            for r in range(self.tp_size):
                got = ranks[r].blocks(t) if r in ranks else set()
                common = got if common is None else common & got
            if common:
                n = tm.registry.restore(sorted(common))
                total += n
                log.info("kvbm tier %r: %d blocks recovered by all %d ranks are matchable",
                         tm.name, n, self.tp_size)
        if lacking and any(m.num_blocks for m in ranks.values()):
            log.info("kvbm: rank(s) %s recovered no blocks; the blocks other ranks recovered "
                     "are not used (a load needs every rank's shard)",
                     ", ".join(map(str, lacking)))
        self.restored_blocks = total
        return total

    def _wait_for_probe(self, st: _ReqState, rest: list[SequenceHash]) -> bool:
        """True while the workers probe the shared tiers for ``rest`` (the request waits).

        A request asks once: the first call sends one ``ProbeOp`` per shared tier; the
        answers adopt the found prefix into that tier's registry (``_adopt``), so the
        call after them matches it like any registered block. No answer from every rank
        within ``probe_timeout_s`` counts as a miss.
        """
        if not self.shared or st.probed or not rest:
            return False
        if st.probe is None:
            if getattr(st.request, "skip_reading_prefix_cache", False):
                return False
            probe = _Probe(list(rest), {}, time.monotonic() + self.probe_timeout_s)
            raw = [bytes(k) for k in rest]
            for t in self.shared:
                op = self._op_id()
                self.pending[op] = _Pending("probe", probe.keys, [t], [],
                                            req_id=st.request.request_id)
                self._probes.append(ProbeOp(op, t, raw))
                probe.ops[op] = t
            st.probe = probe
            return True
        if st.probe.ops:
            if time.monotonic() < st.probe.deadline:
                return True
            self._say_once("probe-timeout", "kvbm: shared tiers did not answer a probe within "
                           "%.1fs (probe_timeout_s); those blocks count as misses",
                           self.probe_timeout_s)
            for op in st.probe.ops:
                self.pending.pop(op, None)
        st.probe = None
        st.probed = True
        return False

    def _adopt(self, probe: _Probe) -> None:
        """Register the found prefix in the first shared tier (chain order) that has one."""
        for t in self.shared:
            n = probe.found.get(t, 0)
            if not n:
                continue
            reg = self.tiers[t].registry
            for k in probe.keys[:n]:
                if k in reg:
                    continue
                slot = reg.allocate(k)
                if slot is None:
                    break
                reg.commit(slot)
                self.adopted_blocks += 1
            self._drain_evicted(t)
            return

    def _pin_prefix(self, hashes: list[SequenceHash]) -> list[tuple[int, int]]:
        pins: list[tuple[int, int]] = []
        for h in hashes:
            for t, tm in enumerate(self.tiers):
                tm.lookups += 1
                slot = tm.registry.pin(h)
                if slot is not None:
                    tm.hits += 1
                    pins.append((t, slot))
                    break
            else:
                break
        return pins

    # -- match ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        self._unpin(st.pins)
        st.pins = []
        if not st.supported:
            return 0, False
        # Never the whole prompt: vLLM must compute at least one token to sample from.
        usable = max(0, request.num_tokens - 1) // self.page
        start = num_computed_tokens // self.page
        if usable <= start:
            return 0, False
        hashes = st.hashes_upto(usable)
        pins = self._pin_prefix(hashes)
        if len(pins) < usable and self._wait_for_probe(st, hashes[len(pins):]):
            # None: vLLM keeps the request waiting and asks again next step.
            self._unpin(pins)
            return None, False
        # vLLM already holds the first ``start`` blocks; only the rest is loaded.
        self._unpin(pins[:start])
        if len(pins) <= start:
            return 0, False
        st.pins = pins[start:]
        st.first_block = start
        lower = any(t > 0 for t, _ in st.pins)
        st.load_async = self.load_mode == "async" or (self.load_mode == "auto" and lower)
        return len(pins) * self.page - num_computed_tokens, st.load_async

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        st = self.reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0 or st.inflight_load is None:
            return {}
        p = self.pending.get(st.inflight_load)
        if p is None:
            return {}
        out: dict[Any, int] = {}
        for t in p.tiers:
            src = _HIT_SOURCE.get(self.tiers[t].type, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + self.page
        extra = num_external_tokens - sum(out.values())
        if extra:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def update_state_after_alloc(self, request: Any, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            self._unpin(st.pins)
            st.pins = []
            return
        n = -(-num_external_tokens // self.page)
        assert n <= len(st.pins), (
            f"vLLM asked to load {num_external_tokens} tokens of request {request.request_id} "
            f"but kvbm matched only {len(st.pins)} blocks"
        )
        self._unpin(st.pins[n:])
        pins = st.pins[:n]
        st.pins = []
        engine = block_ids[st.first_block : st.first_block + n]
        keys = st.hashes[st.first_block : st.first_block + n]
        op = self._op_id()
        tiers = [t for t, _ in pins]
        slots = [s for _, s in pins]
        self.pending[op] = _Pending("load", list(keys), tiers, slots, req_id=request.request_id)
        self._loads.append(LoadOp(op, request.request_id, list(engine), tiers, slots,
                                  [bytes(k) for k in keys], layerwise=not st.load_async))
        st.inflight_load = op
        st.awaiting_recv = st.load_async

    # -- save planning -----------------------------------------------------------------
    def build_meta(self, scheduler_output: SchedulerOutput, block_ids_of: Any) -> KvbmConnectorMetadata:
        meta = KvbmConnectorMetadata()
        meta.loads, self._loads = self._loads, []
        if self.tiers:
            self._plan_saves(scheduler_output, block_ids_of, meta)
        meta.copies, self._copies = self._copies, []
        meta.discards, self._discards = self._discards, []
        meta.probes, self._probes = self._probes, []
        return meta

    def _plan_saves(self, so: SchedulerOutput, block_ids_of: Any,
                    meta: KvbmConnectorMetadata) -> None:
        top = self.tiers[0]
        keys: list[SequenceHash] = []
        engine: list[int] = []
        owners: list[str] = []
        ext: list[Any] = []
        for req_id, n_sched in so.num_scheduled_tokens.items():
            st = self.reqs.get(req_id)
            if st is None or not st.supported:
                continue
            req = st.request
            # Blocks complete once this step ran: only tokens vLLM already knows (spec
            # decode drafts may be rejected, so they never complete a block here).
            done = min(req.num_computed_tokens + n_sched, req.num_tokens) // self.page
            if done <= st.saved:
                continue
            ids = block_ids_of(req_id)
            hashes = st.hashes_upto(done)
            vhashes = getattr(req, "block_hashes", [])
            for i in range(st.saved, min(done, len(ids))):
                keys.append(hashes[i])
                engine.append(ids[i])
                owners.append(req_id)
                if self.publish_events:
                    vh = vhashes[i] if i < len(vhashes) else hashes[i]
                    toks = list(req.all_token_ids[i * self.page : (i + 1) * self.page])
                    ext.append((vh, toks))
            st.saved = done
        if not keys:
            return
        try:
            admit = top.admission.admit(keys, [0] * len(keys))
        except Exception as e:
            self._say_once("admit", "kvbm tier %r: admission filter failed (%s); admitting "
                           "nothing", top.name, e)
            admit = [False] * len(keys)
        w_keys, w_engine, w_slots, w_ext, w_owner = [], [], [], [], []
        for i, (k, b, a) in enumerate(zip(keys, engine, admit)):
            if k in top.registry or not a:
                continue
            slot = top.registry.allocate(k)
            if slot is None:
                continue
            w_keys.append(k)
            w_engine.append(b)
            w_slots.append(slot)
            w_owner.append(owners[i])
            if self.publish_events:
                w_ext.append(ext[i])
        self._drain_evicted(0)
        if w_keys:
            op = self._op_id()
            self.pending[op] = _Pending("save", w_keys, [0] * len(w_keys), w_slots, ext=w_ext)
            meta.saves.append(SaveOp(op, w_engine, w_slots, [bytes(k) for k in w_keys],
                                     w_owner))

    def _plan_copy(self, src: int, keys: list[SequenceHash], slots: list[int],
                   ext: list[Any]) -> None:
        """Reserve slots in tier ``src + 1`` for blocks pinned in ``src``; unpin the rest."""
        dst = src + 1
        dm = self.tiers[dst]
        try:
            admit = dm.admission.admit(keys, [0] * len(keys))
        except Exception as e:
            self._say_once(f"admit{dst}", "kvbm tier %r: admission filter failed (%s); "
                           "admitting nothing", dm.name, e)
            admit = [False] * len(keys)
        c_keys, c_src, c_dst, c_ext = [], [], [], []
        for i, (k, s, a) in enumerate(zip(keys, slots, admit)):
            d = None if (k in dm.registry or not a) else dm.registry.allocate(k)
            if d is None:
                self.tiers[src].registry.unpin(s)
                continue
            c_keys.append(k)
            c_src.append(s)
            c_dst.append(d)
            if ext:
                c_ext.append(ext[i])
        self._drain_evicted(dst)
        if c_keys:
            op = self._op_id()
            self.pending[op] = _Pending("copy", c_keys, [dst] * len(c_keys), c_dst,
                                        src_tier=src, src_slots=c_src, ext=c_ext)
            self._copies.append(CopyOp(op, src, c_src, dst, c_dst, [bytes(k) for k in c_keys]))

    # -- worker reports ----------------------------------------------------------------
    def on_reports(self, reports: dict[int, tuple[int, frozenset[int]]]) -> None:
        for op, (n, failed) in reports.items():
            p = self.pending.get(op)
            if p is None:
                continue
            p.reports += n
            p.failed |= failed
            if p.reports >= self.tp_size:
                del self.pending[op]
                self._finish(op, p)

    def _finish(self, op: int, p: _Pending) -> None:
        if p.kind == "probe":
            st = self.reqs.get(p.req_id or "")
            if st is None or st.probe is None or op not in st.probe.ops:
                return  # the request ended or stopped waiting
            t = st.probe.ops.pop(op)
            # Each rank reported the first key it lacks: the smallest is where the
            # prefix that every rank can read ends.
            st.probe.found[t] = min(p.failed) if p.failed else len(p.keys)
            if not st.probe.ops:
                self._adopt(st.probe)
            return
        if p.kind == "load":
            self._unpin(zip(p.tiers, p.slots))
            for i in sorted(p.failed):
                # A block that failed its read (or checksum) on any rank is not served
                # again: drop it now that nothing pins it.
                tm = self.tiers[p.tiers[i]]
                if tm.registry.remove(p.keys[i]):
                    if self.publish_events:
                        self._removed(p.tiers[i], [p.keys[i]])
                    self._discards.append(DiscardOp(p.tiers[i], [p.slots[i]], [p.keys[i]]))
            self.loaded_blocks += len(p.keys) - len(p.failed)
            self.failed_blocks += len(p.failed)
            st = self.reqs.get(p.req_id or "")
            if st is not None:
                if st.inflight_load == op:
                    st.inflight_load = None
                if p.failed:
                    # vLLM recomputes from the first failed block: save those blocks again.
                    st.saved = min(st.saved, st.first_block + min(p.failed))
            return
        t = p.tiers[0]
        tm = self.tiers[t]
        cascade = self.settings.write_through and t + 1 < len(self.tiers)
        ok_keys, ok_slots, ok_ext = [], [], []
        for i, (k, s) in enumerate(zip(p.keys, p.slots)):
            if i in p.failed:
                tm.registry.abort(s)
                continue
            tm.registry.commit(s, pinned=cascade)
            ok_keys.append(k)
            ok_slots.append(s)
            if p.ext:
                ok_ext.append(p.ext[i])
        if p.kind == "save":
            self.saved_blocks += len(ok_keys)
        else:
            for s in p.src_slots:
                self.tiers[p.src_tier].registry.unpin(s)
        if self.publish_events and ok_ext:
            self._stored(t, ok_keys, ok_ext)
        if cascade and ok_keys:
            self._plan_copy(t, ok_keys, ok_slots, ok_ext)

    # -- request end -------------------------------------------------------------------
    def request_finished(self, request: Any) -> bool:
        st = self.reqs.pop(request.request_id, None)
        if st is None:
            return False
        self._unpin(st.pins)
        st.pins = []
        if st.probe is not None:
            for op in st.probe.ops:
                self.pending.pop(op, None)
            st.probe = None
        # vLLM still expects this request in finished_recving: keep its blocks until
        # then (vLLM frees them when it arrives, and asserts the request still exists).
        return st.awaiting_recv

    def on_finished_recving(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            st = self.reqs.get(r)
            if st is not None:
                st.awaiting_recv = False

    def stats(self) -> dict[str, Any]:
        return {
            "tiers": {tm.name: {"used_blocks": tm.registry.num_used, "hits": tm.hits,
                                "lookups": tm.lookups, "evictions": tm.registry.evictions}
                      for tm in self.tiers},
            "loaded_blocks": self.loaded_blocks,
            "failed_blocks": self.failed_blocks,
            "saved_blocks": self.saved_blocks,
            "restored_blocks": self.restored_blocks,
            "adopted_blocks": self.adopted_blocks,
            "pending_ops": len(self.pending),
        }


def _is_shared(plugins: Any, name: str, type_name: str) -> bool:
    """Whether tier type ``type_name`` holds blocks other instances write (``Tier.shared``)."""
    try:
        cls = plugins.tiers.get(type_name).load()
    except Exception as e:
        # The worker loads the same class and fails loudly; here the tier is only not probed.
        log.warning("kvbm tier %r: cannot load tier type %r (%s); it is not probed for blocks "
                    "other instances wrote", name, type_name, e)
        return False
    return bool(getattr(cls, "shared", False))


# --- worker side --------------------------------------------------------------------


class WorkerSide:
    """The data half on one tensor-parallel rank: this rank's tiers and the copies."""

    def __init__(self, settings: KvbmSettings, eng: EngineLayout, rank: int) -> None:
        self.settings = settings
        self.layout = eng.layout
        self.layer_names = eng.layer_names
        self.rank = rank
        plugins = build_plugins()
        ns = _namespace(settings, eng.layout, rank)
        self.tiers: list[Tier] = []
        # Tier index -> the served keys of that host arena, for the remote tier's server.
        self.served: dict[int, SlotMap] = {}
        try:
            for link in resolve_chain(settings, plugins):
                cfg = link.config
                path = getattr(cfg, "path", None)
                if path is not None and settings.tp_size > 1:
                    # A shared path would put two ranks' shards in the same slots. The
                    # disk tier's path is a list of directories (one per device).
                    sub = ([f"{p}/rank{rank}" for p in path] if isinstance(path, list)
                           else f"{path}/rank{rank}")
                    cfg = cfg.model_copy(update={"path": sub})
                if cfg.type == "remote" and settings.tp_size > 1:
                    cfg = _remote_for_rank(cfg, rank, settings.tp_size)
                ctx = TierContext(link.name, ns, eng.layout, link.num_blocks)
                self.tiers.append(link.tier_cls(cfg, ctx))
        except Exception:
            self.close()
            raise
        # Blocks persistent tiers (disk) hold from an earlier run. Recovering also builds
        # the tier's own index, without which it serves none of them. The scheduler side
        # gets them through vLLM's handshake (``handshake``) and registers those that
        # every rank holds in the same slot.
        recovered: list[list[tuple[int, SequenceHash]]] = []
        for t in self.tiers:
            try:
                recovered.append(list(t.recover()))
            except Exception as e:
                log.warning("kvbm rank %d tier %r: recovering stored blocks failed (%s); "
                            "starting it empty", rank, t.name, e)
                recovered.append([])
        self.handshake: KvbmHandshakeMetadata | None = (
            KvbmHandshakeMetadata.of(rank, recovered) if any(recovered) else None
        )
        m = eng.layout.model
        self.bpl = eng.layout.bytes_per_layer
        self.block_bytes = eng.layout.bytes_per_block
        self.dtype = getattr(torch, m.dtype)
        self.staging = StagingPool(self.block_bytes)
        self._layers: list[Any] = []
        self._layer_idx = {n: i for i, n in enumerate(self.layer_names)}
        self._lock = threading.Lock()
        self._reports: dict[int, set[int]] = {}
        self._recving: set[str] = set()
        self._errors: set[int] = set()
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-load{rank}")
        self._io_pool = ThreadPoolExecutor(max(1, settings.io_threads),
                                           thread_name_prefix=f"kvbm-io{rank}")
        self._events: list[threading.Event] | None = None
        self._sync: Future[None] | None = None
        self._inflight: set[Future[None]] = set()
        self._saves: list[SaveOp] = []
        self._save_bufs: list[list[np.ndarray]] = []
        self._save_staged: list[bool] = []
        self._saved_layers: set[int] = set()
        self._bad_reqs: set[str] = set()
        self._save_refused: list[set[int]] = []
        try:
            self._serve_remote()
        except Exception:
            self.close()
            raise

    # -- engine tensors --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any], num_blocks: int | None = None) -> None:
        """Take vLLM's per-layer KV views ``[blocks, heads, tokens, K|V]`` in layer order."""
        m = self.layout.model
        page = self.layout.page_size
        missing = [n for n in self.layer_names if n not in kv_caches]
        names = list(self.layer_names) if not missing else list(kv_caches)
        if len(names) != m.num_layers:
            raise LayoutError(f"register_kv_caches: expected {m.num_layers} layers "
                              f"{list(self.layer_names)}, got {list(kv_caches)}")
        self._layer_idx = {n: i for i, n in enumerate(names)}
        layers = []
        for n in names:
            t = kv_caches[n]
            if t.dim() != 4:
                raise LayoutError(f"kv cache {n!r}: expected 4 dims [blocks, heads, tokens, "
                                  f"K|V], got shape {list(t.shape)}")
            if t.dtype != self.dtype:
                raise LayoutError(f"kv cache {n!r}: dtype {t.dtype}, kvbm layout expects "
                                  f"{self.dtype}")
            nb = int(t.shape[0])
            ratio = 1
            if num_blocks is not None and nb != num_blocks:
                if nb % num_blocks:
                    raise LayoutError(f"kv cache {n!r}: {nb} kernel blocks is not a multiple "
                                      f"of {num_blocks} blocks")
                ratio = nb // num_blocks
            b, h, toks, c = t.shape
            if h != m.num_kv_heads or toks * ratio != page or c != m.outer_dim * m.head_dim:
                raise LayoutError(
                    f"kv cache {n!r}: shape {list(t.shape)} does not hold blocks of "
                    f"{page} tokens x {m.num_kv_heads} heads x {m.outer_dim}x{m.head_dim}"
                )
            if t.stride(3) != 1:
                raise LayoutError(f"kv cache {n!r}: the K|V dim must be innermost (stride 1), "
                                  f"got strides {t.stride()}")
            # Manager blocks on dim 0, each [kernel blocks, heads, tokens, K|V].
            layers.append(t.unflatten(0, (nb // ratio, ratio)))
        self._layers = layers

    def _engine_view(self, li: int, b: int) -> Any:
        """Block ``b`` of layer ``li`` as ``[outer, r, n, heads, head_dim]`` over engine memory."""
        m = self.layout.model
        t = self._layers[li][b]
        r, h, n, _ = t.shape
        return t.view(r, h, n, m.outer_dim, m.head_dim).permute(3, 0, 2, 1, 4)

    def _slot_view(self, buf: np.ndarray, li: int) -> Any:
        """Layer ``li`` of a canonical block buffer as ``[outer, r, n, heads, head_dim]``."""
        m = self.layout.model
        t = self._layers[li]
        r, n = int(t.shape[1]), int(t.shape[3])
        raw = torch.from_numpy(buf[li * self.bpl : (li + 1) * self.bpl])
        return raw.view(self.dtype).view(m.outer_dim, r, n, m.num_kv_heads, m.head_dim)

    # -- reports ---------------------------------------------------------------------
    def _report(self, op: int, failed: Iterable[int] = ()) -> None:
        with self._lock:
            self._reports.setdefault(op, set()).update(failed)

    def take_reports(self) -> KvbmWorkerMetadata | None:
        with self._lock:
            reps, self._reports = self._reports, {}
        if not reps:
            return None
        return KvbmWorkerMetadata({op: (1, frozenset(f)) for op, f in reps.items()})

    def take_finished_recving(self) -> set[str]:
        with self._lock:
            out, self._recving = self._recving, set()
        return out

    def take_load_errors(self) -> set[int]:
        with self._lock:
            out, self._errors = self._errors, set()
        return out

    # -- loads -----------------------------------------------------------------------
    def _sources(self, op: LoadOp, held: list[np.ndarray]) -> list[np.ndarray | None]:
        """Each block's bytes in its tier (a view, or a staging buffer read into)."""
        srcs: list[np.ndarray | None] = [None] * len(op.slots)
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(op.tiers):
            groups.setdefault(t, []).append(i)
        for t, members in groups.items():
            tier = self.tiers[t]
            slots = [op.slots[i] for i in members]
            keys = [SequenceHash(op.keys[i]) for i in members]
            try:
                views = tier.views(slots)
                if views is not None:
                    for i, v in zip(members, views):
                        srcs[i] = v
                    continue
                bufs = self.staging.acquire(len(members))
                held.extend(bufs)
                ok = tier.read(slots, keys, bufs)
            except Exception as e:
                log.warning("kvbm rank %d tier %r: read of %d blocks failed (%s); treated as "
                            "load errors", self.rank, tier.name, len(members), e)
                continue
            for i, b, g in zip(members, bufs, ok):
                if g:
                    srcs[i] = b
        return srcs

    def _run_loads(self, ops: list[LoadOp], events: list[threading.Event] | None) -> None:
        held: list[np.ndarray] = []
        try:
            srcs = [self._sources(op, held) for op in ops]
            bad: list[set[int]] = [set() for _ in ops]
            for k, src in enumerate(srcs):
                for i, s in enumerate(src):
                    if s is None:
                        bad[k].add(i)
            for li in range(len(self._layers)):
                for k, (op, src) in enumerate(zip(ops, srcs)):
                    for i, (b, s) in enumerate(zip(op.block_ids, src)):
                        if i in bad[k] or s is None:
                            continue
                        try:
                            self._engine_view(li, b).copy_(self._slot_view(s, li))
                        except Exception as e:  # a bad block id: that block fails, not the step
                            log.warning("kvbm rank %d: load of block %d failed (%s)",
                                        self.rank, b, e)
                            bad[k].add(i)
                if events is not None:
                    events[li].set()
            for k, op in enumerate(ops):
                self._finish_load(op, bad[k])
        except Exception as e:
            log.error("kvbm rank %d: load failed (%s); every block of it is a load error",
                      self.rank, e)
            for op in ops:
                self._finish_load(op, set(range(len(op.block_ids))))
        finally:
            if events is not None:
                for ev in events:
                    ev.set()
            if held:
                self.staging.release(held)

    def _finish_load(self, op: LoadOp, bad: set[int]) -> None:
        with self._lock:
            if bad:
                self._bad_reqs.add(op.req_id)
            self._errors.update(op.block_ids[i] for i in bad)
            self._reports.setdefault(op.op_id, set()).update(bad)
            if not op.layerwise:
                # Errors are recorded before the request is: vLLM must see a failed
                # block no later than the step that reports the request done.
                self._recving.add(op.req_id)

    def start(self, meta: KvbmConnectorMetadata) -> None:
        """Begin the step: layer-wise loads on the load thread, the rest in the background."""
        # Reset before any load of this step can record a failure.
        with self._lock:
            self._bad_reqs = set()
        for d in meta.discards:
            m = self.served.get(d.tier)
            if m is not None:
                m.drop(d.slots)  # before any write of this step reuses those slots
            self._submit(self._discard, d)
        for c in meta.copies:
            self._submit(self._copy, c, self._claim(c.dst_tier, c.dst_slots))
        for p in getattr(meta, "probes", ()):
            self._submit(self._probe, p)
        for op in meta.loads:
            if not op.layerwise:
                self._submit(self._run_loads, [op], None)
        sync = [op for op in meta.loads if op.layerwise]
        if sync:
            if not self._layers:
                for op in sync:
                    self._finish_load(op, set(range(len(op.block_ids))))
            else:
                self._events = [threading.Event() for _ in self._layers]
                self._sync = self._load_pool.submit(self._run_loads, sync, self._events)
        self._saves = list(meta.saves)
        # Claimed now, before save_kv_layer writes the first layer into the arena.
        self._save_refused = [self._claim(0, op.slots) for op in self._saves]
        self._save_bufs = []
        self._save_staged = []
        self._saved_layers = set()

    def wait_for_layer(self, layer_name: str) -> None:
        """Block until this step's loads have written layer ``layer_name``."""
        events = self._events
        if events is None:
            return
        li = self._layer_idx.get(layer_name)
        if li is None:
            return
        events[li].wait()

    def _submit(self, fn: Any, *args: Any) -> None:
        fut = self._io_pool.submit(fn, *args)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(fut)
        exc = fut.exception()
        if exc is not None:
            log.error("kvbm rank %d: background transfer failed: %r", self.rank, exc)

    # -- saves -----------------------------------------------------------------------
    def _save_targets(self) -> None:
        if self._save_bufs or not self._saves:
            return
        top = self.tiers[0]
        for op in self._saves:
            views = top.views(op.slots)
            if views is None:
                self._save_bufs.append(self.staging.acquire(len(op.slots)))
                self._save_staged.append(True)
            else:
                self._save_bufs.append(list(views))
                self._save_staged.append(False)

    def save_layer(self, layer_name: str) -> None:
        """Copy one layer of this step's newly complete blocks into the first tier."""
        if not self._saves or not self._layers:
            return
        li = self._layer_idx.get(layer_name)
        if li is None or li in self._saved_layers:
            return
        self._save_targets()
        self._copy_layer_out(li)

    def _copy_layer_out(self, li: int) -> None:
        self._saved_layers.add(li)
        refused = self._save_refused or [set()] * len(self._saves)
        for op, bufs, skip in zip(self._saves, self._save_bufs, refused):
            for i, (b, buf) in enumerate(zip(op.block_ids, bufs)):
                if i in skip:
                    continue  # a peer's lease pins that slot: its bytes must not change
                self._slot_view(buf, li).copy_(self._engine_view(li, b))

    def finish_step(self) -> None:
        """End of the step: wait for layer-wise loads, finish and report the saves."""
        if self._sync is not None:
            self._sync.result()
            self._sync = None
            self._events = None
        if not self._saves:
            return
        try:
            if not self._layers:
                raise LayoutError("no KV caches registered (register_kv_caches not called)")
            self._save_targets()
            # Layers the engine did not hand to save_kv_layer (e.g. under CUDA graphs).
            for li in range(len(self._layers)):
                if li not in self._saved_layers:
                    self._copy_layer_out(li)
            with self._lock:
                bad_reqs = set(self._bad_reqs)
            refused = self._save_refused or [set()] * len(self._saves)
            for op, bufs, staged, skip in zip(self._saves, self._save_bufs, self._save_staged,
                                              refused):
                # Blocks of a request whose load failed this step hold KV computed on
                # top of garbage: never store them.
                failed = {i for i, r in enumerate(op.req_ids) if r in bad_reqs} | skip
                todo = [i for i in range(len(op.slots)) if i not in failed]
                if staged and todo:
                    try:
                        ok = self.tiers[0].write([op.slots[i] for i in todo],
                                                 [SequenceHash(op.keys[i]) for i in todo],
                                                 [bufs[i] for i in todo])
                    except Exception as e:
                        log.warning("kvbm rank %d tier %r: write failed (%s)", self.rank,
                                    self.tiers[0].name, e)
                        ok = [False] * len(todo)
                    failed |= {i for i, g in zip(todo, ok) if not g}
                self._commit(0, op.slots, op.keys, failed)
                self._report(op.op_id, failed)
        except Exception as e:
            log.error("kvbm rank %d: save failed (%s); its blocks are not stored", self.rank, e)
            for op in self._saves:
                self._report(op.op_id, range(len(op.slots)))
        finally:
            for bufs, staged in zip(self._save_bufs, self._save_staged):
                if staged:
                    self.staging.release(bufs)
            self._saves = []
            self._save_bufs = []
            self._save_staged = []
            self._save_refused = []

    # -- cascade and discards ------------------------------------------------------------
    def _copy(self, op: CopyOp, refused: set[int] | None = None) -> None:
        """Run one cascade copy; ``refused`` destination slots (leased by a peer) are skipped."""
        src, dst = self.tiers[op.src_tier], self.tiers[op.dst_tier]
        keys = [SequenceHash(k) for k in op.keys]
        bufs: list[np.ndarray] = []
        skip = refused or set()
        try:
            views = src.views(op.src_slots)
            if views is None:
                bufs = self.staging.acquire(len(keys))
                good = list(src.read(op.src_slots, keys, bufs))
                views = bufs
            else:
                good = [True] * len(keys)
            good = [g and i not in skip for i, g in enumerate(good)]
            dviews = dst.views(op.dst_slots)
            if dviews is not None:
                for d, v, g in zip(dviews, views, good):
                    if g:
                        np.copyto(d, v)
                ok = good
            else:
                todo = [i for i in range(len(keys)) if i not in skip]
                w = dst.write([op.dst_slots[i] for i in todo], [keys[i] for i in todo],
                              [views[i] for i in todo]) if todo else []
                ok = [False] * len(keys)
                for i, g in zip(todo, w):
                    ok[i] = g and good[i]
            failed = {i for i, g in enumerate(ok) if not g}
            self._commit(op.dst_tier, op.dst_slots, op.keys, failed)
            self._report(op.op_id, failed)
        except Exception as e:
            log.warning("kvbm rank %d: copy %r -> %r failed (%s); blocks skipped", self.rank,
                        src.name, dst.name, e)
            self._report(op.op_id, range(len(keys)))
        finally:
            if bufs:
                self.staging.release(bufs)

    # -- serving this rank's host arena to peers (the remote tier) ---------------------
    def _serve_remote(self) -> None:
        """Hand each serving remote tier this rank's host arena and its key -> slot map.

        The registries live in the scheduler process, so the map is kept here from
        the instructions this worker executes: ``_claim`` before a write into a served
        slot, ``_commit`` once all its bytes are there, ``DiscardOp`` drops.
        """
        for tier in self.tiers:
            cfg: Any = tier.config
            serve = getattr(tier, "serve", None)
            if cfg.type != "remote" or serve is None or not getattr(cfg, "serve", False):
                continue
            h = self._served_index(cfg.serve_tier)
            if h is None:
                log.warning("kvbm rank %d tier %r: serve is on but the chain has no host tier "
                            "to expose%s; add {type: host} above it or set serve: false",
                            self.rank, tier.name,
                            f" named {cfg.serve_tier!r}" if cfg.serve_tier else "")
                continue
            from kvbm_tiers_remote.server import SlotMap

            if h not in self.served:
                self.served[h] = SlotMap(self.tiers[h].slots)  # type: ignore[attr-defined]
            serve(self.served[h])

    def _served_index(self, name: str | None) -> int | None:
        for h, tier in enumerate(self.tiers):
            if not hasattr(tier, "slots"):
                continue
            if (name is None and tier.config.type == "host") or tier.name == name:
                return h
        return None

    def _claim(self, tier: int, slots: list[int]) -> set[int]:
        """Take served slots out of service before writing them; the indices a lease pins.

        A peer may be reading a leased slot's bytes: that block's write is skipped and
        reported failed (the scheduler then aborts the slot), rather than making the
        forward pass wait for the lease. The slot's old key is no longer served from
        here on, so no new lease can pin it mid-write.
        """
        m = self.served.get(tier)
        if m is None:
            return set()
        refused = {i for i, ok in enumerate(m.claim(slots)) if not ok}
        if refused:
            log.info("kvbm rank %d tier %r: %d block(s) not stored: a peer's lease holds "
                     "their slots", self.rank, self.tiers[tier].name, len(refused))
        return refused

    def _commit(self, tier: int, slots: list[int], keys: list[bytes], failed: set[int]) -> None:
        """Serve the blocks whose bytes are now completely written."""
        m = self.served.get(tier)
        if m is None:
            return
        done = [i for i in range(len(slots)) if i not in failed]
        m.commit([slots[i] for i in done], [keys[i] for i in done])

    def _probe(self, op: ProbeOp) -> None:
        """Report the index of the first key this rank's shared tier lacks (none: all found)."""
        tier = self.tiers[op.tier]
        n = 0
        try:
            found = list(tier.probe([SequenceHash(k) for k in op.keys]))
            if len(found) != len(op.keys):
                raise RuntimeError(f"probe returned {len(found)} flags for {len(op.keys)} keys")
            while n < len(found) and found[n]:
                n += 1
        except Exception as e:
            log.warning("kvbm rank %d tier %r: probe failed (%s); treated as misses", self.rank,
                        tier.name, e)
            n = 0
        self._report(op.op_id, [n] if n < len(op.keys) else [])

    def _discard(self, op: DiscardOp) -> None:
        try:
            self.tiers[op.tier].discard(op.slots, [SequenceHash(k) for k in op.keys])
        except Exception as e:
            log.warning("kvbm rank %d tier %r: discard failed (%s)", self.rank,
                        self.tiers[op.tier].name, e)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every background load, copy and discard (tests, shutdown)."""
        with self._lock:
            futs = list(self._inflight)
        for f in futs:
            with contextlib.suppress(Exception):
                f.result(timeout=timeout)

    def close(self) -> None:
        for attr in ("_load_pool", "_io_pool"):
            pool = getattr(self, attr, None)
            if pool is not None:
                pool.shutdown(wait=True)
        # Reverse chain order: a remote tier stops serving before the arena it serves goes.
        for t in reversed(getattr(self, "tiers", [])):
            try:
                t.close()
            except Exception as e:
                log.warning("kvbm tier %r: close failed (%s)", t.name, e)


def _remote_for_rank(cfg: Any, rank: int, tp_size: int) -> Any:
    """Rank ``rank``'s remote tier config: its own server, reading its peers' rank ``rank``.

    Each rank serves only its own shard, so a rank-``r`` reader must reach rank-``r``
    servers. With ``peers``, rank ``r`` listens on ``listen``'s port + ``r`` and reads
    each peer at that peer's port + ``r`` (every instance uses the same convention, so
    ``peers`` and ``listen`` name rank 0's ports); a ``rendezvous_dir`` is already per
    rank (its folder is named by the namespace, which holds the rank). A reader that
    still reaches another rank's server is refused by the namespace check of ``hello``.
    """

    def shifted(addr: str, key: str) -> str:
        host, _, port = addr.rpartition(":")
        p = int(port)
        if p == 0:
            return addr  # any free port: found through the rendezvous directory
        if p + rank > 65535:
            raise ConfigError(
                f"remote tier key {key!r}: {addr} + tensor-parallel rank {rank} is past port "
                "65535; rank r uses port + r, so choose a port below "
                f"{65536 - tp_size}"
            )
        return f"{host}:{p + rank}"

    update: dict[str, Any] = {
        "listen": shifted(cfg.listen, "listen"),
        "peers": [shifted(a, "peers") for a in cfg.peers],
    }
    if cfg.instance_id:
        update["instance_id"] = f"{cfg.instance_id}-rank{rank}"
    return cfg.model_copy(update=update)


def _tp_rank(vllm_config: VllmConfig) -> int:
    """This worker's tensor-parallel rank."""
    try:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            model_parallel_is_initialized,
        )

        if model_parallel_is_initialized():  # type: ignore[no-untyped-call]
            return int(get_tensor_model_parallel_rank())
    except Exception:  # pragma: no cover - older vLLM layouts
        pass
    pc = vllm_config.parallel_config
    return int(pc.rank) % max(1, int(pc.tensor_parallel_size))


# --- the connector ------------------------------------------------------------------


class KvbmConnector(KVConnectorBase_V1):
    """kvbm behind vLLM's ``KVConnectorBase_V1``: metadata in the scheduler, data in workers.

    ``kv_connector_extra_config`` keys: ``kvbm`` (a dict of kvbm settings) or
    ``kvbm_config`` (a YAML path); ``load_mode`` (``auto``: layer-wise from the first
    tier, asynchronous from lower ones; ``layerwise``; ``async``); ``publish_events``
    (KV events for the blocks kvbm stores and evicts, default: vLLM's
    ``enable_kv_cache_events``); ``probe_timeout_s`` (how long a request waits for the
    workers' answer from shared tiers before counting them as misses, default 5).
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        self.passthrough: str | None = None
        try:
            eng = engine_layout(vllm_config, kv_cache_config)
        except LayoutError as e:
            # Said once, at start: the engine runs, without reuse.
            self.passthrough = str(e)
            log.warning("kvbm: %s; the connector passes every request through without reuse",
                        e)
            return
        self._num_blocks = int(kv_cache_config.num_blocks)
        settings = connector_settings(vllm_config, eng)
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kvbm: kv_load_failure_policy is %r: a block kvbm fails to read fails "
                        "its request; set kv_load_failure_policy='recompute' in "
                        "--kv-transfer-config to recompute it instead",
                        self._kv_transfer_config.kv_load_failure_policy)
        if role == KVConnectorRole.SCHEDULER:
            kec = getattr(vllm_config, "kv_events_config", None)
            events = extra.get("publish_events",
                               bool(getattr(kec, "enable_kv_cache_events", False)))
            try:
                probe_timeout = float(extra.get("probe_timeout_s", 5.0))
            except (TypeError, ValueError):
                raise ConfigError(f"kv_connector_extra_config key 'probe_timeout_s': "
                                  f"{extra.get('probe_timeout_s')!r} is not a number of "
                                  "seconds; give e.g. 5.0") from None
            self.scheduler_side = SchedulerSide(settings, eng.layout,
                                                str(extra.get("load_mode", "auto")),
                                                bool(events), probe_timeout_s=probe_timeout)
        else:
            self.worker_side = WorkerSide(settings, eng, _tp_rank(vllm_config))

    @property
    def requires_kv_delivery(self) -> bool:
        """kvbm is a cache: a dropped save is a later miss, never a lost hand-off."""
        return False

    # -- scheduler side ----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` kvbm holds (pinned), and whether async."""
        if self.scheduler_side is None:
            return 0, False
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Turn the pinned match into a load instruction into the blocks vLLM allocated."""
        if self.scheduler_side is None:
            return
        ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.scheduler_side.update_state_after_alloc(request, ids, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request,
                                       num_external_tokens: int) -> dict[Any, int]:
        """Split the loaded tokens by the tier they come from."""
        if self.scheduler_side is None or num_external_tokens == 0:
            return {}
        got = self.scheduler_side.hit_sources(request, num_external_tokens)
        return got or super().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads, saves of newly complete blocks, cascade copies and discards."""
        if self.scheduler_side is None:
            return KvbmConnectorMetadata()
        state = getattr(scheduler_output, "kv_connector_block_state", None)

        def block_ids_of(req_id: str) -> list[int]:
            ids = state.get_block_ids(req_id) if state is not None else None
            if ids is None:
                assert self._kv_cache_manager is not None, "vLLM bound no KV cache manager"
                ids = self._kv_cache_manager.get_block_ids(req_id)
            return list(ids[0])

        return self.scheduler_side.build_meta(scheduler_output, block_ids_of)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Count the workers' reports; commit, abort, unpin and cascade what all ranks did."""
        if self.scheduler_side is None:
            return
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, KvbmWorkerMetadata):
            self.scheduler_side.on_reports(wm.reports)
        if connector_output.finished_recving:
            self.scheduler_side.on_finished_recving(connector_output.finished_recving)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Drop the request's pins; keep its blocks only while an async load writes them."""
        if self.scheduler_side is None:
            return False, None
        return self.scheduler_side.request_finished(request), None

    def take_events(self) -> Iterable[Any]:
        """KV events (``BlockStored``/``BlockRemoved``) of kvbm's tiers since the last call."""
        if self.scheduler_side is None or not self.scheduler_side.publish_events:
            return ()
        return self.scheduler_side.take_events()

    # -- start-up handshake: blocks persistent tiers recovered ----------------------------
    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """Worker: the blocks this rank's tiers recovered at start (None: none)."""
        if self.worker_side is None:
            return None
        return self.worker_side.handshake

    def set_xfer_handshake_metadata(self,
                                    metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """Scheduler: register the recovered blocks that every rank holds in the same slot."""
        if self.scheduler_side is None:
            return
        ranks = {m.rank: m for m in metadata.values() if isinstance(m, KvbmHandshakeMetadata)}
        self.scheduler_side.restore(ranks)

    # -- worker side -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take this rank's per-layer KV tensors (checked against the layout)."""
        if self.worker_side is not None:
            self.worker_side.register_kv_caches(kv_caches, self._num_blocks)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads (layer-wise ones on the load thread) and cascade copies."""
        if self.worker_side is None:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmConnectorMetadata), (
            f"KvbmConnector got {type(meta).__name__} metadata"
        )
        self.worker_side.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until this step's loads have written ``layer_name``'s KV."""
        if self.worker_side is not None:
            self.worker_side.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Copy this layer of the step's newly complete blocks into the first tier."""
        if self.worker_side is not None:
            self.worker_side.save_layer(layer_name)

    def wait_for_save(self) -> None:
        """Finish this step's loads and saves; the saves are reported to the scheduler."""
        if self.worker_side is not None:
            self.worker_side.finish_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load finished (with or without errors)."""
        if self.worker_side is None:
            return None, None
        return None, (self.worker_side.take_finished_recving() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Engine blocks whose load failed: vLLM recomputes them, never uses them."""
        if self.worker_side is None:
            return set()
        return self.worker_side.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """This rank's finished instructions, for the scheduler side."""
        if self.worker_side is None:
            return None
        return self.worker_side.take_reports()

    def shutdown(self) -> None:
        """Finish background transfers and close this rank's tiers."""
        if self.worker_side is not None:
            self.worker_side.drain(timeout=60)
            self.worker_side.close()
            self.worker_side = None


def digest_of(key: bytes) -> str:  # pragma: no cover - debugging aid
    """A short printable name of a block key."""
    return hashlib.blake2b(key, digest_size=4).hexdigest()


__all__ = [
    "CopyOp",
    "DiscardOp",
    "EngineLayout",
    "KvbmConnector",
    "KvbmConnectorMetadata",
    "KvbmHandshakeMetadata",
    "KvbmWorkerMetadata",
    "LoadOp",
    "ProbeOp",
    "SaveOp",
    "SchedulerSide",
    "WorkerSide",
    "connector_settings",
    "engine_layout",
]
