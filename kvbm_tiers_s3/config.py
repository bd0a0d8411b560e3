"""Config keys of the s3 tier.

Credentials come from boto3's standard chain (environment, shared profile, instance
role) unless the YAML gives them, typically as ``${ENV}`` references that the config
loader expands. Secrets are ``SecretStr``: they print as ``**********`` in ``repr``,
logs, errors and ``kvbm config check``.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from kvbm.config import TierConfig

#: Blocks the tier's index holds when neither ``capacity`` nor ``num_blocks`` is set:
#: the bucket (with its lifecycle rules) is the real bound, the index only remembers.
DEFAULT_NUM_BLOCKS = 1 << 20

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_UNEXPANDED_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def redact_url(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part, for logs and errors."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def hide_url_credentials(data: object) -> object:
    """Redact the password of ``endpoint_url`` in raw config input.

    Validation errors print the input value; run this before any validator can fail,
    so an error shows '***@host' instead of the secret.
    """
    if isinstance(data, dict):
        url = data.get("endpoint_url")
        if isinstance(url, str) and redact_url(url) != url:
            data = {**data, "endpoint_url": redact_url(url)}
    return data


class S3TierConfig(TierConfig):
    """``{type: s3, bucket: kv-cache, prefix: prod, endpoint_url: http://minio:9000}``."""

    type: Literal["s3"] = "s3"
    bucket: str = Field(..., description="bucket that holds the blocks (must exist unless create_bucket)")
    prefix: str = Field("kvbm", description="key prefix; objects are {prefix}/{namespace}/{hash}")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; AWS when unset")
    region: str | None = Field(None, description="region name; boto3's default chain when unset")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket in the path (MinIO, moto) or in the host name (AWS)"
    )
    profile: str | None = Field(None, description="shared-config profile for boto3's chain")
    aws_access_key_id: SecretStr | None = Field(None, description="else boto3's chain")
    aws_secret_access_key: SecretStr | None = Field(None, description="else boto3's chain")
    aws_session_token: SecretStr | None = Field(None, description="else boto3's chain")
    max_concurrency: int = Field(
        16, ge=1, le=512, description="requests in flight for reads and for writes (each)"
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="TCP connect timeout per attempt")
    read_timeout_s: float = Field(10.0, gt=0, description="socket read timeout per attempt")
    request_deadline_s: float = Field(
        30.0, gt=0,
        description="total time one GET/PUT/HEAD may take, retries included; read_timeout_s "
        "bounds one socket read, so a server trickling bytes could stall longer without it",
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
        False, description="delete objects the tier's index evicts; else the bucket's lifecycle rules do"
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

    @model_validator(mode="before")
    @classmethod
    def _hide_url_credentials(cls, data: object) -> object:
        return hide_url_credentials(data)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET_RE.match(v):
            raise ValueError(
                "must be 3-63 characters of lowercase letters, digits, '.' and '-', "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # 'prod/' and '/prod' name the same place; keys join parts with '/'.
        return v.strip("/")

    @field_validator(
        "endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
        "profile", "region", mode="before",
    )
    @classmethod
    def _expanded(cls, v: object) -> object:
        # read_yaml expands ${VAR}; an unset variable stays literal and would be sent as
        # a credential. Name the variable, never the value around it.
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # a numeric secret in YAML; an error would print it
        if isinstance(v, str):
            m = _UNEXPANDED_RE.fullmatch(v.strip())
            if m:
                raise ValueError(
                    f"environment variable {m.group(1)} is not set; export it or remove the key"
                )
            if v.strip() == "":
                return None
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{redact_url(v)!r} is not an http(s) URL; write e.g. http://127.0.0.1:9000"
            )
        if parts.username or parts.password:
            raise ValueError(
                "credentials in the URL are not accepted; use aws_access_key_id and "
                "aws_secret_access_key (or boto3's environment variables)"
            )
        return v

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Index size: ``num_blocks``/``capacity`` if given, else ``DEFAULT_NUM_BLOCKS``."""
        if self.num_blocks is None and self.capacity is None:
            return DEFAULT_NUM_BLOCKS
        return super().resolve_num_blocks(block_bytes)
