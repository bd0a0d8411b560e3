"""Registers the ``s3`` tier. Imports only kvbm and the standard library (not boto3)."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import S3TierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``s3`` tier type."""
    registry.add(
        "s3",
        factory="kvbm_tiers_s3.tier:S3Tier",
        config_model=S3TierConfig,
        extra="s3",
        requires=("boto3",),
        description="objects in an S3-compatible bucket, shared across instances",
        order=3,
    )
