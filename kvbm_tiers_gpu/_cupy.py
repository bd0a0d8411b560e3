"""CuPy as an alternative for raw device copies, used only where it is installed.

``cudaMemcpyAsync`` through CuPy skips torch's per-call dispatch (shape checks,
dtype promotion, the TensorIterator), which is most of the cost of a small copy.
Only contiguous runs go this way; both pointers come from torch tensors.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kvbm.errors import ConfigError

# cudaMemcpyDefault: the driver infers the direction from the unified address space.
_MEMCPY_DEFAULT = 4


def cupy_available() -> bool:
    """Whether CuPy can be imported (never imports it)."""
    return importlib.util.find_spec("cupy") is not None


class CupyCopier:
    """Issues ``cudaMemcpyAsync`` on a torch CUDA stream for contiguous tensors."""

    def __init__(self, device: Any) -> None:
        if device.type != "cuda":
            raise ConfigError(
                f"copy_backend: value 'cupy' copies device memory and needs a CUDA device, "
                f"got {device}; use copy_backend: torch"
            )
        if not cupy_available():
            raise ConfigError(
                "copy_backend: value 'cupy' needs CuPy, which is not installed: "
                "pip install cupy-cuda12x (or use copy_backend: torch)"
            )
        import cupy

        self._memcpy_async = cupy.cuda.runtime.memcpyAsync

    def copy(self, dst: Any, src: Any, stream: Any) -> None:
        """Copy ``src`` into ``dst`` (same byte size, both contiguous) on ``stream``."""
        n = src.numel() * src.element_size()
        self._memcpy_async(dst.data_ptr(), src.data_ptr(), n, _MEMCPY_DEFAULT, stream.cuda_stream)
