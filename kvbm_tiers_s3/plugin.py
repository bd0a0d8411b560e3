"""Registers the ``s3`` tier. Imports only kvbm and the standard library (not boto3)."""

from __future__ import annotations

from kvbm.config import EnvAlias, truthy
from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import S3TierConfig


def _bucket(text: str) -> str:
    # Dynamo fills {worker_id} per worker; kvbm keys objects by namespace (the rank
    # included), so every worker shares one bucket.
    if "{" in text:
        raise ValueError("kvbm fills no template in a bucket name; give one bucket for every "
                         "worker (objects are kept apart by namespace, the rank included)")
    return text


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
        env={
            # Dynamo KVBM's object-storage variables; ENABLED=1 adds an s3 tier.
            "DYN_KVBM_OBJECT_ENABLED": EnvAlias("type", convert=lambda _: "s3", when=truthy),
            "DYN_KVBM_OBJECT_BUCKET": EnvAlias("bucket", _bucket, adds_tier=False),
            "DYN_KVBM_OBJECT_ENDPOINT": EnvAlias("endpoint_url", adds_tier=False),
            "DYN_KVBM_OBJECT_REGION": EnvAlias("region", adds_tier=False),
            "DYN_KVBM_OBJECT_ACCESS_KEY": EnvAlias("aws_access_key_id", adds_tier=False),
            "DYN_KVBM_OBJECT_SECRET_KEY": EnvAlias("aws_secret_access_key", adds_tier=False),
            "DYN_KVBM_OBJECT_NUM_BLOCKS": EnvAlias("num_blocks", int, adds_tier=False),
        },
    )
