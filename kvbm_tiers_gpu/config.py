"""Config keys of the gpu tier and of device transfers. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from kvbm.config import TierConfig
from kvbm.errors import ConfigError

Strategy = Literal["auto", "gather", "direct", "per_block"]
CopyBackend = Literal["auto", "torch", "numpy", "cupy"]

#: ``auto`` gathers through staging when one contiguous run of a block in engine memory
#: is smaller than this on a CUDA device. cudaMemcpyAsync costs a few µs per call, about
#: what PCIe moves in 64-256 KiB, so runs below 256 KiB pay more in calls than a gather
#: kernel plus one large copy costs. Replace it with ``bench/gpu.py``'s crossover once
#: measured on the target GPU.
CUDA_GATHER_BELOW_BYTES = 256 * 1024
#: The same threshold for CPU tensors, from ``bench/gpu.py``'s run-size sweep on CPU.
#: With torch's copies (~5 µs a call) gathering won at 2-32 KiB runs (vLLM's
#: Llama-3-8B K or V page is 32 KiB) and per-block copies won or tied from 128 KiB;
#: with numpy's (~1 µs a call, the CPU default) per-block copies won or tied at every
#: run from 2 KiB up, since the gather is one more pass over the bytes.
CPU_TORCH_GATHER_BELOW_BYTES = 64 * 1024
CPU_NUMPY_GATHER_BELOW_BYTES = 0


@dataclass(frozen=True)
class TransferConfig:
    """How ``DeviceBlocks`` moves blocks between device and host.

    ``strategy``: ``gather`` stages a batch's per-layer slices in one contiguous
    (pinned) buffer and moves it with one copy per batch (per layer when onboarding
    layer by layer), the host scattering it into the block buffers; ``direct``
    gathers on the device in the host buffers' order and copies each block (or run of
    adjacent blocks) straight to or from its host buffer, with no host-side copy
    (layer-wise onboard gathers; a contiguous pool copies per block); ``per_block``
    issues one copy per block and contiguous run;
    ``auto`` picks ``gather`` when the run is smaller than ``gather_below_bytes``.
    ``staging_bytes`` bounds the staging buffers; larger batches go in chunks.
    ``copy_backend`` issues the per-block copies: ``torch`` (``Tensor.copy_``), ``numpy``
    (``np.copyto`` on byte views; CPU tensors only, a fifth of torch's per-call cost),
    ``cupy`` (``cudaMemcpyAsync``; CUDA only, where CuPy is installed), or ``auto``
    (torch on CUDA, numpy on CPU).
    """

    strategy: Strategy = "auto"
    gather_below_bytes: int | None = None
    staging_bytes: int = 64 * 1024 * 1024
    copy_backend: CopyBackend = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in ("auto", "gather", "direct", "per_block"):
            raise ConfigError(
                f"transfer strategy: value {self.strategy!r} is not one of 'auto', 'gather', "
                "'direct', 'per_block'"
            )
        if self.copy_backend not in ("auto", "torch", "numpy", "cupy"):
            raise ConfigError(
                f"copy_backend: value {self.copy_backend!r} is not one of 'auto', 'torch', "
                "'numpy', 'cupy'"
            )
        if self.staging_bytes <= 0:
            raise ConfigError(f"staging_bytes: expected a positive size, got {self.staging_bytes}")
        if self.gather_below_bytes is not None and self.gather_below_bytes < 0:
            raise ConfigError(
                f"gather_below_bytes: expected a size >= 0, got {self.gather_below_bytes}"
            )

    def threshold(self, on_cuda: bool, backend: str = "torch") -> int:
        """The run size below which ``auto`` gathers, for this device and copy backend."""
        if self.gather_below_bytes is not None:
            return self.gather_below_bytes
        if on_cuda:
            return CUDA_GATHER_BELOW_BYTES
        return CPU_NUMPY_GATHER_BELOW_BYTES if backend == "numpy" else CPU_TORCH_GATHER_BELOW_BYTES


class GpuTierConfig(TierConfig):
    """``{type: gpu, capacity: 8GiB, device: cuda:0}``: a pool of blocks in device memory.

    Without CUDA (``device: auto``) the pool is CPU memory, so chains and tests that
    name a gpu tier run everywhere; ``device: cuda`` refuses to start without CUDA.
    """

    type: Literal["gpu"] = "gpu"
    device: str = Field(
        "auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda' or 'cuda:N'"
    )
    strategy: Strategy = Field("auto", description="gather, direct, per_block, or auto by run size")
    gather_below_bytes: int | None = Field(
        None, ge=0, description="auto gathers runs smaller than this; default per device"
    )
    staging_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="bound of one staging buffer; bigger batches chunk"
    )
    copy_backend: CopyBackend = Field(
        "auto", description="auto (torch on CUDA, numpy on CPU), torch, numpy, or cupy"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        # Caught here, not when torch first sees it at start-up.
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)")
        return v

    def transfer(self) -> TransferConfig:
        """The transfer settings these keys name."""
        return TransferConfig(
            strategy=self.strategy,
            gather_below_bytes=self.gather_below_bytes,
            staging_bytes=self.staging_bytes,
            copy_backend=self.copy_backend,
        )
