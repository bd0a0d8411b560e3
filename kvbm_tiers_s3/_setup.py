"""Setting up the tier's connection: the client, and a first look at the bucket."""

from __future__ import annotations

import logging
from typing import Any

import botocore.exceptions as bexc

from kvbm.errors import ConfigError
from kvbm.objectstore import s3_client

from ._requests import TRANSPORT_ERRORS, Requests, error_code, short
from .config import S3TierConfig

log = logging.getLogger("kvbm.s3")


def make_client(cfg: S3TierConfig, name: str, where: str) -> Any:
    """The tier's boto3 client: one pool for reads, writes and pointer writes."""
    try:
        return s3_client(
            cfg,
            max_pool_connections=3 * cfg.max_concurrency + 2,
            # Every block carries its own xxh3 checksum, verified on read; a second
            # CRC over every body would only cost CPU.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
    except bexc.BotoCoreError as e:
        raise ConfigError(f"s3 tier {name!r}: cannot build a client for {where}: {e}") from None


def check_bucket(client: Any, cfg: S3TierConfig, name: str, where: str, req: Requests) -> None:
    """ConfigError if the bucket is missing (unless created here), forbidden or
    refused; a server that does not answer starts the tier with its breaker open."""
    bucket = cfg.bucket
    try:
        client.head_bucket(Bucket=bucket)
        return
    except bexc.NoCredentialsError:
        raise ConfigError(
            f"s3 tier {name!r}: no AWS credentials found for {where}; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or the keys "
            "aws_access_key_id/aws_secret_access_key (e.g. '${MY_KEY_ID}')"
        ) from None
    except bexc.ClientError as e:
        code, status = error_code(e)
        if status == 404 or code in ("NoSuchBucket", "404"):
            if cfg.create_bucket:
                _create_bucket(client, bucket, name)
                return
            raise ConfigError(
                f"s3 tier {name!r}: key 'bucket': bucket {bucket!r} does not exist "
                f"({where}); create it or set create_bucket: true"
            ) from None
        if status in (401, 403):
            raise ConfigError(
                f"s3 tier {name!r}: access to bucket {bucket!r} denied ({code}); "
                "check the credentials and the bucket policy"
            ) from None
        if status < 500:
            raise ConfigError(
                f"s3 tier {name!r}: bucket {bucket!r}: {code} (HTTP {status})"
            ) from None
        reason = f"HTTP {status} {code}"
    except TRANSPORT_ERRORS as e:
        reason = short(e)
    # A server that is down now may be up in a second: start with the breaker
    # open (every request a miss) and let its trial requests find the server.
    log.warning(
        "kvbm s3 tier %r: %s is not reachable (%s); starting with the circuit breaker "
        "open: reads miss and writes are skipped until it answers",
        name, where, reason,
    )
    for _ in range(cfg.breaker_failures):
        req.breaker.failure()


def _create_bucket(client: Any, bucket: str, name: str) -> None:
    kw: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kw)
    except bexc.ClientError as e:
        code, status = error_code(e)
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise ConfigError(
                f"s3 tier {name!r}: cannot create bucket {bucket!r}: {code} "
                f"(HTTP {status}); create it yourself or fix the permissions"
            ) from None
    log.info("kvbm s3 tier %r: created bucket %r", name, bucket)

