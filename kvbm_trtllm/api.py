"""TensorRT-LLM's connector base classes: TRT-LLM's own when installed, kvbm's copy otherwise.

TRT-LLM 1.2 and later define them in ``tensorrt_llm._torch.pyexecutor.connectors.
kv_cache_connector``; 1.1 in ``tensorrt_llm._torch.pyexecutor.kv_cache_connector``.
Where ``tensorrt_llm`` is not installed (it needs CUDA), ``kvbm_trtllm._interface``
stands in, so the connector classes subclass the same interface either way. A TRT-LLM
that is installed but fails to import raises its own error: the connector cannot run
there, and hiding that behind the copy would only move the failure.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

#: Where TRT-LLM keeps the connector interface, newest first.
TRTLLM_MODULES = (
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
)


def _load() -> tuple[Any, str]:
    """The module that defines the interface, and its name."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        from . import _interface

        return _interface, _interface.__name__
    missing: list[str] = []
    for name in TRTLLM_MODULES:
        try:
            return importlib.import_module(name), name
        except ModuleNotFoundError as e:
            if not (e.name and name.startswith(e.name)):
                raise  # something the module imports is missing: TRT-LLM's own error
            missing.append(name)
    raise ImportError(f"tensorrt_llm is installed but defines none of {missing}; kvbm's "
                      "connector needs TensorRT-LLM 1.1 or newer")


if TYPE_CHECKING:
    from ._interface import (
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        RequestData,
        SchedulerOutput,
    )

    SOURCE: str
else:
    _module, SOURCE = _load()
    KvCacheConnectorScheduler = _module.KvCacheConnectorScheduler
    KvCacheConnectorWorker = _module.KvCacheConnectorWorker
    SchedulerOutput = _module.SchedulerOutput
    RequestData = _module.RequestData

#: True when the base classes are TensorRT-LLM's own.
REAL_TRTLLM = SOURCE != "kvbm_trtllm._interface"

__all__ = ["REAL_TRTLLM", "SOURCE", "TRTLLM_MODULES", "KvCacheConnectorScheduler",
           "KvCacheConnectorWorker", "RequestData", "SchedulerOutput"]
