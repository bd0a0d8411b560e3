"""What every part that talks to an S3-compatible object store shares.

The s3 tier stores blocks in a bucket; the remote tier may find its peers through
an S3 prefix. Both read the same connection keys the same way: ``S3Connection``
(endpoint, region, addressing style, credentials as ``SecretStr``, timeouts), the
checks of a bucket name and a key prefix, the redaction of credentials in a URL,
and ``s3_client``, the one place a boto3 client is built.

The core has light dependencies only: boto3 and botocore are imported inside
``s3_client``, when a chain first uses an object store, never at import.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "S3Connection",
    "S3ConnectionSettings",
    "check_bucket_name",
    "check_endpoint_url",
    "hide_url_credentials",
    "normalize_prefix",
    "redact_url",
    "reject_unexpanded",
    "s3_client",
]

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNEXPANDED_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


# -- credentials in URLs ---------------------------------------------------------------
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


# -- checks of single keys (shared by every config that names a bucket) -----------------
def check_bucket_name(v: str) -> str:
    """``v`` if it is a valid S3 bucket name, else ValueError saying what one looks like."""
    if not _BUCKET_RE.match(v):
        raise ValueError(
            "must be 3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return v


def normalize_prefix(v: str) -> str:
    """A key prefix without leading or trailing '/'; ValueError for one that is not a
    plain path of names (S3-compatible stores on a file system map keys to paths, and
    some clients resolve '..')."""
    # 'prod/' and '/prod' name the same place; keys join parts with '/'.
    v = v.strip("/")
    if not v:
        return v
    if len(v) > 512:
        raise ValueError("must be at most 512 characters; a prefix names a folder of blocks")
    parts = v.split("/")
    if any(p in ("", ".", "..") for p in parts) or _CONTROL_RE.search(v):
        raise ValueError("must be names separated by single '/', without '.' or '..' parts or "
                         "control characters, e.g. prod/kvbm")
    return v


def reject_unexpanded(v: object) -> object:
    """A credential-like value as given, with an unset ``${VAR}`` reference refused.

    The YAML reader expands ``${VAR}``; an unset variable stays literal and would be
    sent as a credential. The error names the variable, never the value around it.
    """
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # a numeric secret in YAML; an error would print it
    if isinstance(v, SecretStr):
        # The core's skeleton wraps secrets as soon as it sees them: look inside, and
        # keep the wrapper.
        inner = v.get_secret_value()
        return v if reject_unexpanded(inner) is not None else None
    if isinstance(v, str):
        m = _UNEXPANDED_RE.fullmatch(v.strip())
        if m:
            raise ValueError(
                f"environment variable {m.group(1)} is not set; export it or remove the key"
            )
        if v.strip() == "":
            return None
    return v


def check_endpoint_url(v: str | None) -> str | None:
    """``v`` if it is an http(s) URL without credentials in it, else ValueError."""
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


# -- the connection keys -------------------------------------------------------------------
class S3Connection(BaseModel):
    """Where an S3-compatible store keeps things and how to reach it: the keys (and
    their checks) a config that uses one inherits; it may redeclare a key to change
    its default or description.

    Credentials come from boto3's standard chain (environment, shared profile, instance
    role) unless given, typically as ``${ENV}`` references that the config loader
    expands. Secrets are ``SecretStr``: they print as ``**********`` in ``repr``,
    logs, errors and ``kvbm config check``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str = Field(..., description="bucket name (it must exist)")
    prefix: str = Field("", description="key prefix of every object")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; AWS when unset")
    region: str | None = Field(None, description="region name; boto3's default chain when unset")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket in the path (MinIO, moto) or in the host name (AWS)"
    )
    profile: str | None = Field(None, description="shared-config profile for boto3's chain")
    aws_access_key_id: SecretStr | None = Field(None, description="else boto3's chain")
    aws_secret_access_key: SecretStr | None = Field(None, description="else boto3's chain")
    aws_session_token: SecretStr | None = Field(None, description="else boto3's chain")
    connect_timeout_s: float = Field(
        2.0, gt=0, le=300, description="TCP connect timeout per attempt")
    read_timeout_s: float = Field(10.0, gt=0, le=3600, description="socket read timeout per attempt")

    @model_validator(mode="before")
    @classmethod
    def _hide_url_credentials(cls, data: object) -> object:
        return hide_url_credentials(data)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_bucket_name(v)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return normalize_prefix(v)

    @field_validator(
        "endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
        "profile", "region", mode="before",
    )
    @classmethod
    def _expanded(cls, v: object) -> object:
        return reject_unexpanded(v)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return check_endpoint_url(v)

    @model_validator(mode="after")
    def _key_pair(self) -> S3Connection:
        # boto3 takes a key id and secret only as a pair; one alone fails deep inside
        # the first request's signing.
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            given, missing = (("aws_access_key_id", "aws_secret_access_key")
                              if self.aws_secret_access_key is None
                              else ("aws_secret_access_key", "aws_access_key_id"))
            raise ValueError(f"key {given!r} is given without {missing!r}; give both, or "
                             "neither to use boto3's credential chain (environment, profile, role)")
        if self.aws_session_token is not None and self.aws_access_key_id is None:
            raise ValueError("key 'aws_session_token' is given without 'aws_access_key_id' and "
                             "'aws_secret_access_key'; a session token goes with temporary keys")
        return self


class S3ConnectionSettings(Protocol):
    """What ``s3_client`` reads: ``S3Connection`` or any config with the same keys."""

    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def addressing_style(self) -> str: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def aws_access_key_id(self) -> SecretStr | None: ...
    @property
    def aws_secret_access_key(self) -> SecretStr | None: ...
    @property
    def aws_session_token(self) -> SecretStr | None: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def read_timeout_s(self) -> float: ...


# -- the client ----------------------------------------------------------------------------
_loader: Any = None
_loader_lock = threading.Lock()


def _shared_loader() -> Any:
    """One botocore data loader per process: it caches the parsed service models, so a
    second client (another TP rank, the rendezvous, a test) is built in milliseconds,
    not 0.3 s."""
    global _loader
    import botocore.loaders

    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def s3_client(cfg: S3ConnectionSettings, *, max_pool_connections: int, **config: Any) -> Any:
    """A boto3 S3 client built from ``cfg``'s connection keys.

    botocore's own retries are off: its standard mode waits up to 20 s per attempt,
    longer than an engine step should ever stall; callers retry (or wait for their
    next interval) themselves. ``config`` adds ``botocore.config.Config`` options.
    Raises ImportError when boto3 is not installed (``pip install 'kvbm[s3]'``).
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    def secret(v: SecretStr | None) -> str | None:
        return None if v is None else str(v.get_secret_value())

    bsession = botocore.session.get_session()
    bsession.register_component("data_loader", _shared_loader())
    session = boto3.session.Session(
        botocore_session=bsession,
        aws_access_key_id=secret(cfg.aws_access_key_id),
        aws_secret_access_key=secret(cfg.aws_secret_access_key),
        aws_session_token=secret(cfg.aws_session_token),
        region_name=cfg.region,
        profile_name=cfg.profile,
    )
    bcfg = Config(
        region_name=cfg.region,
        s3={"addressing_style": cfg.addressing_style},
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        **config,
    )
    return session.client("s3", endpoint_url=cfg.endpoint_url, config=bcfg)
