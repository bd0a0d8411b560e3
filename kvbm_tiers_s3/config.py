"""Config keys of the s3 tier.

The keys that say where the bucket is and how to reach it are the core's
``kvbm.objectstore.S3Connection`` (shared with the remote tier's S3 rendezvous):
credentials come from boto3's standard chain unless the YAML gives them, and
secrets are ``SecretStr``, printed as ``**********`` in ``repr``, logs, errors and
``kvbm config check``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvbm.config import ProbeContext, ProbeResult, TierConfig
from kvbm.objectstore import S3Connection, hide_url_credentials, redact_url

__all__ = ["DEFAULT_NUM_BLOCKS", "S3TierConfig", "hide_url_credentials", "redact_url"]

#: Blocks the tier's index holds when neither ``capacity`` nor ``num_blocks`` is set:
#: the bucket (with its lifecycle rules) is the real bound, the index only remembers.
DEFAULT_NUM_BLOCKS = 1 << 20


class S3TierConfig(TierConfig, S3Connection):
    """``{type: s3, bucket: kv-cache, prefix: prod, endpoint_url: http://minio:9000}``.

    The object-store keys (``bucket``, ``prefix``, ``endpoint_url``, ``region``,
    ``addressing_style``, ``profile``, ``aws_*``, ``connect_timeout_s``,
    ``read_timeout_s``) and their checks come from ``kvbm.objectstore.S3Connection``.
    """

    type: Literal["s3"] = "s3"
    bucket: str = Field(..., description="bucket that holds the blocks (must exist unless create_bucket)")
    prefix: str = Field("kvbm", description="key prefix; objects are {prefix}/{namespace}/{hash}")
    max_concurrency: int = Field(
        16, ge=1, le=512, description="requests in flight for reads and for writes (each)"
    )
    request_deadline_s: float = Field(
        10.0, gt=0, le=3600,
        description="total time one request may take, retries included (PUTs and deletes of "
        "the background cascade; reads too when shorter than read_deadline_s); read_timeout_s "
        "bounds one socket read, so a server trickling bytes could stall longer without it",
    )
    read_deadline_s: float = Field(
        2.0, gt=0, le=3600,
        description="total time one GET or HEAD may take, retries included: an engine waits "
        "on them (onboard, the probes of match_prefix, the bucket check at start), so a "
        "stopped server costs it this long at most, then the circuit breaker answers at once",
    )
    retries: int = Field(2, ge=0, le=10, description="extra attempts after a transient failure")
    backoff_base_s: float = Field(0.05, gt=0, description="first retry waits up to this long")
    backoff_max_s: float = Field(1.0, gt=0, description="cap of one retry's wait")
    breaker_failures: int = Field(
        5, ge=1, description="consecutive failed requests that open the circuit breaker"
    )
    breaker_cooldown_s: float = Field(
        1.0, gt=0, description="first open period; doubles while trial requests fail"
    )
    breaker_max_cooldown_s: float = Field(30.0, gt=0, description="cap of the open period")
    conditional_put: Literal["auto", "if_none_match", "head", "off"] = Field(
        "auto",
        description="avoid uploading a block twice: If-None-Match: * (auto falls back to a "
        "HEAD check when the server refuses it), a HEAD check, or off",
    )
    pack_blocks: int = Field(
        1, ge=1, le=32, description="consecutive blocks of one write packed into one object"
    )
    pack_pointers: bool = Field(
        True,
        description="write an empty pointer object under each later block of a pack, so a "
        "probe or read of that block finds it without knowing where its pack starts",
    )
    delete_on_evict: bool = Field(
        False,
        description="delete objects the tier's index evicts (a pack this instance wrote once "
        "none of its blocks is held; never a pack another instance wrote); else the bucket's "
        "lifecycle rules do",
    )
    exist_cache_size: int = Field(
        65536, ge=0, description="existence answers remembered (positive: where the block lives)"
    )
    negative_ttl_s: float = Field(
        2.0, ge=0, description="how long a 'not there' answer is trusted (another instance may upload)"
    )
    create_bucket: bool = Field(False, description="create the bucket at start if missing")
    zero_copy_reads: bool = Field(
        True, description="receive object bodies straight into the destination buffer"
    )

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Index size: ``num_blocks``/``capacity`` if given, else ``DEFAULT_NUM_BLOCKS``."""
        if self.num_blocks is None and self.capacity is None:
            return DEFAULT_NUM_BLOCKS
        return super().resolve_num_blocks(block_bytes)

    def probe(self, ctx: ProbeContext) -> list[ProbeResult]:
        """HEAD the bucket with the tier's credentials (boto3 imported only here)."""
        try:
            from ._setup import probe_bucket
        except ImportError:
            return [ProbeResult(False, f"tier {ctx.name!r}: boto3 is not installed; "
                                       "pip install 'kvbm[s3]'")]
        ok, line = probe_bucket(self, ctx.name, ctx.timeout_s)
        return [ProbeResult(ok, line)]
