"""Config keys of the host tier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvbm.config import TierConfig


class HostTierConfig(TierConfig):
    """``{type: host, capacity: 64GiB}``; ``pin`` chooses pinned memory."""

    type: Literal["host"] = "host"
    pin: Literal["auto", "always", "never"] = Field(
        "auto", description="pin through CUDA when present (auto), require it, or never"
    )
    touch: bool = Field(True, description="fault every page in at start")
    copy_threads: int = Field(2, ge=1, le=64, description="threads a batch copy is split across")
