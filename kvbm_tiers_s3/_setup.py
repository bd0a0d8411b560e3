"""Setting up the tier's connection: the client, and a first look at the bucket.

The first look is bounded like every read (``read_deadline_s``): a server that does
not answer starts the tier with its circuit breaker open instead of holding the
engine's start-up. A server that answers "no" is a ``ConfigError`` saying which key
to fix: the bucket, the region, the key id, the secret, the session token, or the
bucket's policy.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import botocore.exceptions as bexc

from kvbm.errors import ConfigError
from kvbm.objectstore import redact_url, s3_client

from ._requests import (
    TRANSPORT_ERRORS,
    Counters,
    DeadlineExceeded,
    Missing,
    Refused,
    Requests,
    error_code,
    short,
)
from .config import S3TierConfig

log = logging.getLogger("kvbm.s3")

# What a refusal's S3 error code means, and the key that fixes it ({src}: where the
# credentials came from).
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the server knows no such access key id; check {id}",
    "SignatureDoesNotMatch": "the secret key does not match the access key id; check {secret}",
    "ExpiredToken": "the session token has expired; renew {token}",
    "TokenRefreshRequired": "the session token has expired; renew {token}",
    "InvalidToken": "the session token is not valid; check {token}",
    "InvalidSecurity": "the credentials are not valid; check {id} and {secret}",
    "AuthorizationHeaderMalformed": "the request was signed for another region; set region "
                                    "(the bucket's region)",
    "PermanentRedirect": "the bucket is in another region; set region (the bucket's region)",
    "AccessDenied": "the credentials are valid but may not read this bucket; grant "
                    "s3:ListBucket, s3:GetObject and s3:PutObject on it, or use other credentials",
    "AllAccessDisabled": "all access to this bucket is disabled; use another bucket",
}


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


def _keys(cfg: S3TierConfig) -> dict[str, str]:
    """How messages name each credential: the config key, or boto3's chain."""
    if cfg.aws_access_key_id is not None:
        return {"id": "aws_access_key_id", "secret": "aws_secret_access_key",
                "token": "aws_session_token"}
    chain = "(boto3's chain: AWS_* variables, the profile, the instance role)"
    return {"id": f"the access key id {chain}", "secret": f"the secret key {chain}",
            "token": f"the session token {chain}"}


def explain_refusal(client: Any, cfg: S3TierConfig, code: str, status: int,
                    req: Requests | None = None) -> str:
    """What a 4xx answer to a request on the bucket means and which key fixes it.

    A HEAD answer has no body, so its code is only the status: a ListObjectsV2 of one
    key asks again and reads the server's own code.
    """
    if code in ("", "400", "403", "301") and status in (301, 400, 403):
        ask = functools.partial(client.list_objects_v2, Bucket=cfg.bucket, MaxKeys=1)
        try:
            if req is not None:
                req.call(ask, min(cfg.read_deadline_s, cfg.request_deadline_s), "read_deadline_s")
            else:
                ask()
        except bexc.ClientError as e:
            code, status = error_code(e)
        except Exception as e:  # the first answer is explained as it is
            log.debug("kvbm s3: asking the bucket again failed (%s)", short(e))
    text = _CREDENTIAL_CODES.get(code)
    if text is not None:
        return f"{text.format(**_keys(cfg))} ({code}, HTTP {status})"
    if status in (401, 403):
        return (f"access denied ({code or status}); check the credentials ({_keys(cfg)['id']}, "
                f"{_keys(cfg)['secret']}) and the bucket's policy")
    if status == 400:
        return (f"the server refused the request ({code or 'HTTP 400'}); a wrong region, a "
                f"malformed {_keys(cfg)['token']} or key, or addressing_style 'virtual' on a "
                "server that needs 'path' gives this: check them")
    return f"{code} (HTTP {status})"


def check_bucket(client: Any, cfg: S3TierConfig, name: str, where: str, req: Requests) -> None:
    """ConfigError if the bucket is missing (unless created here), forbidden or
    refused; a server that does not answer within ``read_deadline_s`` starts the tier
    with its breaker open."""
    bucket = cfg.bucket
    deadline = min(cfg.read_deadline_s, cfg.request_deadline_s)
    try:
        req.call(lambda: client.head_bucket(Bucket=bucket), deadline, "read_deadline_s")
        return
    except (bexc.NoCredentialsError, bexc.PartialCredentialsError):
        raise ConfigError(
            f"s3 tier {name!r}: no AWS credentials found for {where}; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or the keys "
            "aws_access_key_id/aws_secret_access_key (e.g. '${MY_KEY_ID}')"
        ) from None
    except Missing:
        if cfg.create_bucket:
            _create_bucket(client, bucket, name)
            return
        raise ConfigError(
            f"s3 tier {name!r}: key 'bucket': bucket {bucket!r} does not exist "
            f"({where}); create it or set create_bucket: true"
        ) from None
    except bexc.ClientError as e:
        code, status = error_code(e)
        if status < 500 and code not in ("SlowDown", "Throttling", "RequestTimeout"):
            raise ConfigError(
                f"s3 tier {name!r}: bucket {bucket!r} at {where}: "
                f"{explain_refusal(client, cfg, code, status, req)}"
            ) from None
        reason = f"HTTP {status} {code}"
    except (DeadlineExceeded, Refused) as e:
        reason = str(e) or "no answer"
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


def probe_bucket(cfg: S3TierConfig, name: str, timeout_s: float) -> tuple[bool, str]:
    """``kvbm config check --probe``: HEAD the bucket with the tier's credentials within
    ``timeout_s``; (ok, one line saying what answered or which key to fix)."""
    where = f"s3://{cfg.bucket}" + (f" at {redact_url(cfg.endpoint_url)}" if cfg.endpoint_url
                                    else "")
    head = f"tier {name!r}: bucket {cfg.bucket!r} ({where})"
    try:
        client = make_client(cfg, name, where)
    except ConfigError as e:
        return False, str(e)
    req = Requests(cfg, name, where, Counters(_PROBE_COUNTERS))
    req.watch(client)
    t0 = time.monotonic()
    try:
        req.call(lambda: client.head_bucket(Bucket=cfg.bucket), timeout_s, "the probe's timeout")
        ms = (time.monotonic() - t0) * 1000
        return True, f"{head}: HEAD answered in {ms:.0f} ms with these credentials"
    except Missing:
        if cfg.create_bucket:
            return True, f"{head}: does not exist yet; the tier will create it (create_bucket)"
        return False, f"{head}: does not exist; create it or set create_bucket: true"
    except (bexc.NoCredentialsError, bexc.PartialCredentialsError):
        return False, (f"{head}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY, a profile, or aws_access_key_id/aws_secret_access_key")
    except bexc.ClientError as e:
        code, status = error_code(e)
        return False, f"{head}: {explain_refusal(client, cfg, code, status, req)}"
    except (DeadlineExceeded, Refused):
        return False, (f"{head}: no answer within {timeout_s:g} s; check endpoint_url and that "
                       "the server runs")
    except Exception as e:  # a transport error after the retries, or anything botocore raises
        return False, f"{head}: {short(e)}; check endpoint_url and that the server runs"
    finally:
        req.close()
        client.close()


_PROBE_COUNTERS = ("refused", "retries", "transient_errors", "timeouts", "deadline_exceeded",
                   "truncated")
