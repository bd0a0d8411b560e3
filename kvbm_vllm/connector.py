"""kvbm as a vLLM KV connector (``KVConnectorBase_V1``).

Enable it with::

    --kv-transfer-config '{"kv_connector":"KvbmConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvbm.connectors.vllm"}'

(Dynamo's ``kvbm.vllm_integration.connector:DynamoConnector`` is the same class) and
configure it from ``kv_connector_extra_config`` (``{"kvbm": {...settings...}}`` or
``{"kvbm_config": "/path/kvbm.yaml"}``) or from kvbm's own ``KVBM_CONFIG`` / ``KVBM_*`` /
``DYN_KVBM_*`` environment. The model part of the layout always comes from vLLM's
KV-cache spec.

The connector translates vLLM's calls, nothing more: the scheduler process drives the
core ``Planner`` (``kvbm_vllm.scheduler``), each worker runs the core ``Executor`` on
its own shard (``kvbm_vllm.worker``); plans go down in the connector metadata, reports
come back in the worker metadata, recovered blocks in the start-up handshake.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvbm.errors import ConfigError, LayoutError, PluginError

try:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorWorkerMetadata,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError as e:  # pragma: no cover - exercised only without vLLM
    raise PluginError(
        f"kvbm's vLLM connector needs vLLM and torch ({e}); install vLLM, then "
        "pip install 'kvbm[vllm]'"
    ) from e

from .config import EngineLayout, connector_settings, engine_layout
from .metadata import (
    KvbmConnectorMetadata,
    KvbmConnectorStats,
    KvbmHandshakeMetadata,
    KvbmWorkerMetadata,
)
from .scheduler import SchedulerSide
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.vllm")


def _probe_timeout(extra: dict[str, Any]) -> float:
    try:
        return float(extra.get("probe_timeout_s", 5.0))
    except (TypeError, ValueError):
        raise ConfigError(f"kv_connector_extra_config key 'probe_timeout_s': "
                          f"{extra.get('probe_timeout_s')!r} is not a number of seconds; "
                          "give e.g. 5.0") from None


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
            probe_timeout = _probe_timeout(extra)
            self.scheduler_side = SchedulerSide(settings, eng.layout,
                                                str(extra.get("load_mode", "auto")),
                                                bool(events), probe_timeout_s=probe_timeout)
        else:
            self.worker_side = WorkerSide(settings, eng, _tp_rank(vllm_config),
                                          probe_timeout_s=_probe_timeout(extra),
                                          vllm_config=vllm_config)

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

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Scheduler: blocks loaded, failed, saved and not saved since the last call."""
        if self.scheduler_side is None:
            return None
        return self.scheduler_side.interval_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        """kvbm's stats object for the counters vLLM's logger receives."""
        return KvbmConnectorStats(data=dict(data or {}))

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


__all__ = [
    "EngineLayout",
    "KvbmConnector",
    "KvbmConnectorMetadata",
    "KvbmHandshakeMetadata",
    "KvbmWorkerMetadata",
    "SchedulerSide",
    "WorkerSide",
    "connector_settings",
    "engine_layout",
]
