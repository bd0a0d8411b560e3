"""Registers the ``fs`` tier. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import FsTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``fs`` tier type."""
    registry.add(
        "fs",
        factory="kvbm_tiers_fs.tier:FsTier",
        config_model=FsTierConfig,
        extra="fs",
        description="one file per block in a directory many instances share (NFS, Lustre, "
        "3FS, any POSIX path)",
        # Beside s3: a chain naming both keeps the order the YAML gives.
        order=3,
    )
