"""Config keys of the fs tier: a directory many instances mount and share."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from kvbm.blockfile import padded_bytes
from kvbm.config import TierConfig
from kvbm.errors import ConfigError
from kvbm.sizes import parse_size


class FsTierConfig(TierConfig):
    """``{type: fs, path: /mnt/shared/kvbm, capacity: 2TiB}``.

    ``capacity`` is the byte budget of this namespace's files in ``path`` (header
    page and padding included), shared by every instance that runs the same model
    and layout there. Each instance's index holds at most that much and deletes what
    it wrote when its policy evicts it; the janitor removes the oldest files of the
    namespace (or, with ``directory_budget``, of the whole directory) when several
    instances together pass the budget.
    """

    type: Literal["fs"] = "fs"
    path: str = Field(
        ...,
        description="shared directory (NFS, Lustre, 3FS, any POSIX path); blocks go in a "
        "kvbm-<namespace> subdirectory of it",
    )
    o_direct: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: O_DIRECT where a test file at start accepts it, buffered where "
        "not; on: refuse to start without it; off: buffered I/O",
    )
    io_threads: int = Field(
        16, ge=1, le=512, description="worker threads, hence files read or written in flight"
    )
    fanout: int = Field(
        2, ge=0, le=3,
        description="levels of 256-way subdirectories above the block files (2: 65536 "
        "directories, so a million blocks make ~16 files per directory)",
    )
    fsync: bool = Field(
        False,
        description="fsync each file before its rename, so a power loss (not only a killed "
        "process) never leaves a name over unwritten data; a torn file fails its checksum "
        "either way",
    )
    temp_max_age_s: float = Field(
        600.0, gt=0,
        description="a temporary file older than this is a crashed writer's and is removed "
        "(one of a dead process on this host is removed at once)",
    )
    janitor: bool = Field(
        True,
        description="run the janitor on a background thread every janitor_interval_s (it "
        "also runs once at start); off: call FsTier.janitor() yourself",
    )
    janitor_interval_s: float = Field(30.0, gt=0, description="seconds between janitor passes")
    janitor_by: Literal["atime", "mtime"] = Field(
        "atime",
        description="which files the janitor removes first: least recently read (atime, "
        "which the tier sets on reads itself, so noatime mounts work) or oldest written",
    )
    janitor_low_water: float = Field(
        0.9, gt=0, le=1,
        description="a janitor pass that finds the budget passed removes files until this "
        "fraction of it is used",
    )
    directory_budget: int | None = Field(
        None,
        description="byte budget of everything under path (all namespaces) that the "
        "janitor enforces too; none: only this namespace's capacity",
    )
    touch_interval_s: float = Field(
        60.0, ge=0,
        description="a read sets a file's atime when it is older than this (bounds the "
        "metadata writes a hot block costs on NFS)",
    )

    @field_validator("path")
    @classmethod
    def _path_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("give a directory, e.g. path: /mnt/shared/kvbm")
        return v

    @field_validator("directory_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    def file_bytes(self, block_bytes: int) -> int:
        """Bytes one block's file takes: the header page and the page-padded data."""
        return padded_bytes(block_bytes)

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Blocks this instance's index holds: ``num_blocks``, else the files that fit
        in ``capacity`` (each a header page and the padded data)."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.capacity is None:
            raise ConfigError(
                f"fs tier {self.name!r}: key 'capacity' is not set; give the byte budget of "
                "this namespace's files in the shared directory, e.g. capacity: 1TiB"
            )
        fb = self.file_bytes(block_bytes)
        n = self.capacity // fb
        if n < 1:
            raise ConfigError(
                f"fs tier {self.name!r}: key 'capacity': {self.capacity} bytes holds no block "
                f"file of {fb} bytes (header and padding included); give at least {fb}"
            )
        return n
