"""kvbm as a TensorRT-LLM KV-cache connector: the leader and worker classes TRT-LLM builds.

Enable it in the LLM API config, with the names Dynamo documents::

    backend: pytorch
    cuda_graph_config: null
    kv_cache_config: {enable_partial_reuse: false}
    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

(or ``connector: kvbm``, TRT-LLM's preset for the same three names) and configure
kvbm by its environment: Dynamo's ``DYN_KVBM_CPU_CACHE_GB``, ``DYN_KVBM_DISK_CACHE_GB``,
``DYN_KVBM_DISK_CACHE_DIR`` …, or ``KVBM_CONFIG`` / ``KVBM_*``.

The classes translate TRT-LLM's calls, nothing more: the leader (rank 0) drives the
core ``Planner`` (``kvbm_trtllm.leader``), each rank's worker runs the core
``Executor`` on its shard (``kvbm_trtllm.worker``); plans go down in the connector
metadata TRT-LLM broadcasts, reports come back through ``kvbm_trtllm._link``. Loads
are layer-wise (TRT-LLM's synchronous path). TRT-LLM's ``stream`` arguments are not
used: copies go through the core adapter (``kvbm.engine_blocks``), which orders them
against the engine's work as it does for kvbm's vLLM worker.
"""

from __future__ import annotations

import logging
from typing import Any

from kvbm.config import load_settings
from kvbm.plan import Plan

from ._link import Collective, collective_for, drop_link, link_for
from .api import KvCacheConnectorScheduler, KvCacheConnectorWorker, SchedulerOutput
from .config import ranks
from .leader import LeaderSide
from .messages import KvbmTrtllmMetadata
from .worker import KvbmLoadError, WorkerSide

log = logging.getLogger("kvbm.trtllm")


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """kvbm's leader (TRT-LLM's ``KvCacheConnectorScheduler``), on rank 0.

    ``consolidator_trtllm_endpoint`` is accepted for Dynamo's signature and unused:
    kvbm publishes no consolidated KV events for TensorRT-LLM.
    """

    def __init__(self, llm_args: Any, consolidator_trtllm_endpoint: str | None = None) -> None:
        super().__init__(llm_args)
        self.settings = load_settings(None)
        self.side = LeaderSide(self.settings, ranks(llm_args).tp_size, link_for(llm_args))

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` kvbm holds (pinned), never asynchronous."""
        return self.side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """Turn the pinned match into a layer-wise load into the blocks TRT-LLM allocated."""
        self.side.update_state_after_alloc(request, block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmTrtllmMetadata:
        """This step's loads, saves of newly complete blocks, cascade copies and discards."""
        return self.side.build_meta(scheduler_output)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """Drop the request's pins; False: its blocks may be freed at once."""
        return self.side.request_finished(request)

    def wait_for_initialization(self) -> None:
        """Wait (``leader_worker_init_timeout_secs``) for the workers' layouts."""
        self.side.poll(timeout=float(self.settings.leader_worker_init_timeout_secs))
        if self.side.planner is None and self.side.disabled is None:
            log.error("kvbm: the workers did not register their KV-cache pools within %ss "
                      "(leader_worker_init_timeout_secs); reuse stays off until they do",
                      self.settings.leader_worker_init_timeout_secs)

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        """TRT-LLM consumes less than offered: release the pins beyond ``start``."""
        self.side.cancel_load(request, start, end)

    def request_reset(self, request: Any) -> None:
        """The request starts over: forget its blocks and match."""
        self.side.request_finished(request)

    def stats(self) -> dict[str, Any]:
        """The leader's counters: blocks loaded, failed, saved, per-tier hits."""
        return self.side.stats()


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """kvbm's worker (TRT-LLM's ``KvCacheConnectorWorker``), one per rank.

    ``collective`` replaces TRT-LLM's MPI between ranks (tests drive several ranks in
    one process with it).
    """

    def __init__(self, llm_args: Any, *, collective: Collective | None = None) -> None:
        super().__init__(llm_args)
        r = ranks(llm_args)
        self.side = WorkerSide(load_settings(None), llm_args, r.rank, r.tp_size,
                               collective or collective_for(r.rank, r.tp_size),
                               link_for(llm_args) if r.rank == 0 else None)

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        """Take this rank's pool (``get_unique_primary_pool()``), build its tiers."""
        self.side.register(kv_cache_tensor)

    def start_load_kv(self, stream: Any) -> None:
        """Start this step's loads (layer by layer, on the load thread) and cascade copies."""
        meta = self.get_connector_meta()
        # A step TRT-LLM bound no metadata for must not run the last step's plan again.
        self._clear_connector_meta()
        if meta is not None and not isinstance(meta, KvbmTrtllmMetadata):
            raise TypeError(f"kvbm's TensorRT-LLM worker got {type(meta).__name__} metadata; "
                            "the leader and worker classes must both be kvbm's")
        self.side.start(meta.plan if meta is not None else Plan())

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Block until this step's loads have written layer ``layer_idx``."""
        self.side.wait_for_layer(layer_idx)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Copy layer ``layer_idx`` of the step's newly complete blocks into the first tier."""
        self.side.save_layer(layer_idx)

    def wait_for_save(self, stream: Any) -> None:
        """Finish the step's loads and saves; raise ``KvbmLoadError`` if a load failed."""
        self.side.finish_step()

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        """Send this rank's reports to the leader; kvbm holds no request past its step."""
        self.side.report()
        return list(finished_gen_req_ids), list(started_loading_req_ids)

    def close(self) -> None:
        """Finish background copies and close this rank's tiers."""
        self.side.drain(timeout=60)
        self.side.close()
        if self.side.link is not None:
            drop_link(self._llm_args)


__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker", "KvbmLoadError",
           "KvbmTrtllmMetadata"]
