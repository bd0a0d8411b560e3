"""Config keys of the disk tier (and the ``DYN_KVBM_DISK_*`` variables that set them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from kvbm.config import ProbeContext, ProbeResult, TierConfig


class DiskTierConfig(TierConfig):
    """``{type: disk, capacity: 1TiB, path: /mnt/nvme/kvbm}``.

    ``path`` may list several directories (one per device): slots are striped across
    them. Boolean keys also accept the strings Dynamo's variables carry ("true", "0").
    """

    size_hint: ClassVar[str] = ("capacity or num_blocks (DYN_KVBM_DISK_CACHE_GB, "
                                "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS)")
    type: Literal["disk"] = "disk"
    path: list[str] = Field(
        default_factory=lambda: ["/tmp/"],
        description="directory, or list of directories to stripe slots across "
        "(DYN_KVBM_DISK_CACHE_DIR); files go in a kvbm-<namespace> subdirectory",
    )
    zerofill_fallback: bool = Field(
        False,
        description="where fallocate is unsupported, reserve the file by writing zeros "
        "(DYN_KVBM_DISK_ZEROFILL_FALLBACK)",
    )
    disable_o_direct: bool = Field(
        False, description="buffered I/O instead of O_DIRECT (DYN_KVBM_DISK_DISABLE_O_DIRECT)"
    )
    allocator_type: Literal["default", "open-direct"] = Field(
        "default",
        description="default: create and reserve the file, then set O_DIRECT with fcntl; "
        "open-direct: open with O_DIRECT from the start (DYN_KVBM_DISK_ALLOCATOR_TYPE)",
    )
    io_threads: int = Field(
        8, ge=1, le=256, description="worker threads, hence blocks in flight per batch"
    )
    io_engine: Literal["posix", "nixl"] = Field(
        "posix",
        description="posix: preadv/pwritev on a thread pool; nixl: NIXL's POSIX backend "
        "(needs the nixl package)",
    )
    durable: bool = Field(
        False,
        description="fdatasync a batch's data before its headers, so that a power loss "
        "(not only a killed process) never leaves a header naming unwritten data",
    )
    recover_threads: int = Field(
        16, ge=1, le=256, description="threads reading slot headers at start"
    )
    verify_on_recover: bool = Field(
        False,
        description="read and checksum every block at start (reads the whole cache: slow); "
        "without it a block is checked on every read instead",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        # One directory is the common case (and what DYN_KVBM_DISK_CACHE_DIR gives).
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("path")
    @classmethod
    def _path_nonempty(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("give at least one directory, e.g. path: /mnt/nvme/kvbm")
        if any("\x00" in p or len(p) > 4096 for p in v):
            raise ValueError("a directory path has a NUL byte or is longer than 4096 characters")
        if len(set(v)) != len(v):
            raise ValueError("a directory is listed twice; list each device's directory once")
        return v

    @field_validator("allocator_type", mode="before")
    @classmethod
    def _allocator(cls, v: Any) -> Any:
        # Dynamo spells it in various cases and with underscores.
        return v.strip().lower().replace("_", "-") if isinstance(v, str) else v

    def probe(self, ctx: ProbeContext) -> list[ProbeResult]:
        """Each directory: a file made, written and read with O_DIRECT (unless off), then
        removed; and free space against this tier's share of the slot files."""
        from .files import probe_directory
        from .format import Geometry

        geom = Geometry(ctx.block_bytes)
        n = len(self.path)
        out: list[ProbeResult] = []
        for i, p in enumerate(self.path):
            need = geom.file_size(len(range(i, ctx.num_blocks, n)))
            out += [ProbeResult(ok, line) for ok, line in
                    probe_directory(ctx.name, p, need, not self.disable_o_direct)]
        return out
