"""TensorRT-LLM's KV-cache connector interface, as kvbm's own copy for when TRT-LLM is absent.

TensorRT-LLM defines the interface in ``tensorrt_llm._torch.pyexecutor.connectors.
kv_cache_connector`` (``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` before 1.2):
two abstract classes an engine instantiates itself, by module and class name, from
``kv_connector_config``:

- ``KvCacheConnectorScheduler(llm_args)`` — the leader, on rank 0 only;
- ``KvCacheConnectorWorker(llm_args)`` — one per rank, next to its KV-cache pool;

and the per-step data the leader receives (``SchedulerOutput`` of ``RequestData``).
``kvbm_trtllm.api`` hands on TRT-LLM's own classes when ``tensorrt_llm`` is
importable and these otherwise, so the connector module imports (and its tests run)
on a machine without CUDA. The names, arguments, defaults and return types follow
TRT-LLM; the engine's objects (``TorchLlmArgs``, ``LlmRequest``, ``torch.Tensor``,
``torch.cuda.Stream``) are typed ``Any`` here, since none of them is importable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: TensorRT-LLM's page index for "no page in this layer group" (a sliding window passed it).
BAD_PAGE_INDEX = -1


@dataclass
class RequestData:
    """One in-flight request as ``build_connector_meta`` sees it.

    ``new_tokens`` and ``new_block_ids`` are what was added since the request's last
    appearance (everything, the first time). ``computed_position`` counts the tokens
    whose KV was valid before this step; for a request seen for the first time it
    leaves out the tokens the connector promised (TRT-LLM subtracts them).
    ``num_scheduled_tokens`` is what this step computes.
    """

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    priorities: list[int] | None = None
    cache_salt: str | None = None
    new_block_ids_by_layer_group: list[list[int]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """The requests of one step: seen for the first time, and seen before."""

    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)
    attention_dp_rank: int | None = None


class KvCacheConnectorWorker(ABC):
    """The worker half: runs on every rank, moves KV in and out of that rank's pool."""

    #: Attention data parallelism needs owner-local transfers; opt in explicitly.
    supports_attention_dp: bool = False

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        """Take this step's metadata (the leader's ``build_connector_meta``, broadcast)."""
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        """The metadata bound for this step."""
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        """A callable TRT-LLM runs at the end of the forward pass (None: none)."""
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        """Called once at start with this rank's pool tensor
        (``KVCacheManager.get_unique_primary_pool()``)."""

    def register_kv_cache_layout(self, layout: Any) -> None:
        """Called instead of ``register_kv_caches`` by ``KVCacheManagerV2``; the default
        hands a cache one pool tensor describes to ``register_kv_caches``."""
        tensor = layout.as_single_pool_tensor()
        if tensor is None:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement register_kv_cache_layout, and "
                "this KV cache cannot be described as one pool tensor")
        self.register_kv_caches(tensor)

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None:
        """Begin this step's loads (named by the bound metadata) before the forward pass."""

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Called just before layer ``layer_idx``'s work is queued: wait for its loads."""

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Called just after layer ``layer_idx``'s work is queued: begin saving it."""

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None:
        """Called at the end of the forward pass: finish the step's synchronous saves."""

    @abstractmethod
    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        """Requests whose asynchronous save and load finished on this rank.

        Only ids given before in ``finished_gen_req_ids`` / ``started_loading_req_ids``
        may be returned; TRT-LLM acts on an id once every rank returned it.
        """


class KvCacheConnectorScheduler(ABC):
    """The leader half: runs on rank 0, decides what every worker loads and saves."""

    supports_attention_dp: bool = False

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        """This step's metadata for the workers (picklable: TRT-LLM broadcasts it)."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` the connector can load, and whether
        asynchronously. Called once per request allocation; the count is final."""

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """The request ended; True keeps its blocks until ``get_finished`` returns it."""

    def request_finished_by_layer_group(self, request: Any,
                                        cache_block_ids_by_layer_group: list[list[int]]) -> bool:
        """Per-layer-group form of ``request_finished``; one group folds to the flat form."""
        if len(cache_block_ids_by_layer_group) != 1:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement request_finished_by_layer_group, "
                f"and this KV cache has {len(cache_block_ids_by_layer_group)} layer groups")
        return self.request_finished(request, cache_block_ids_by_layer_group[0])

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """The blocks allocated for a request, after ``get_num_new_matched_tokens``."""

    def update_state_after_alloc_by_layer_group(self, request: Any,
                                                block_ids_by_layer_group: list[list[int]]) -> None:
        """Per-layer-group form of ``update_state_after_alloc``; one group folds to flat."""
        if len(block_ids_by_layer_group) != 1:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement "
                "update_state_after_alloc_by_layer_group, and this KV cache has "
                f"{len(block_ids_by_layer_group)} layer groups")
        self.update_state_after_alloc(request, block_ids_by_layer_group[0])

    def wait_for_initialization(self) -> None:
        """Called once the workers registered their caches; may wait for them."""
        return

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        """The engine will not consume prompt tokens ``[start, end)`` it was offered
        (``KVCacheManagerV2``); release what holds them. No-op by default."""
        return

    def request_reset(self, request: Any) -> None:
        """The request's allocation was released and it will run again from the start
        (``KVCacheManagerV2``); drop state keyed to its pages. No-op by default."""
        return


__all__ = ["BAD_PAGE_INDEX", "KvCacheConnectorScheduler", "KvCacheConnectorWorker",
           "RequestData", "SchedulerOutput"]
