"""Config keys of the host tier."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kvbm.config import ProbeContext, ProbeResult, TierConfig
from kvbm.errors import ConfigError
from kvbm.machine import memory_available, memory_total
from kvbm.sizes import format_size

#: Where a size error points: the keys and the Dynamo variables that set them.
SIZE_HINT = ("capacity or num_blocks (DYN_KVBM_CPU_CACHE_GB, "
              "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS)")


class HostTierConfig(TierConfig):
    """``{type: host, capacity: 64GiB}``; ``pin`` chooses pinned memory."""

    size_hint: ClassVar[str] = SIZE_HINT
    type: Literal["host"] = "host"
    pin: Literal["auto", "always", "never"] = Field(
        "auto", description="pin through CUDA when present (auto), require it, or never"
    )
    touch: bool = Field(True, description="fault every page in at start")
    copy_threads: int = Field(2, ge=1, le=64, description="threads a batch copy is split across")

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Slots of the arena; a ``ConfigError`` when it would not fit in this machine's
        memory (its container's limit included) at all."""
        n = super().resolve_num_blocks(block_bytes)
        need, total = n * block_bytes, memory_total()
        if need > total:
            raise ConfigError(
                f"tier {self.name!r}: key {'num_blocks' if self.num_blocks else 'capacity'!r}: "
                f"{format_size(need)} ({n} blocks of {format_size(block_bytes)}) exceeds this "
                f"machine's memory ({format_size(total)}); lower {SIZE_HINT}")
        return n

    def probe(self, ctx: ProbeContext) -> list[ProbeResult]:
        """Whether the arena fits in the memory available now."""
        need, avail = ctx.num_blocks * ctx.block_bytes, memory_available()
        ok = need <= avail
        verdict = "fits" if ok else f"does not fit; lower {SIZE_HINT} or free memory"
        return [ProbeResult(ok, f"tier {ctx.name!r}: memory: {format_size(need)} arena, "
                                f"{format_size(avail)} available now: {verdict}")]
