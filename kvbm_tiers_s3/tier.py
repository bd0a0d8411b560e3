"""The s3 tier: blocks as objects in an S3-compatible bucket, shared by every instance.

Objects are named by namespace and sequence hash (see ``objects``), so any instance
with the same model, layout and TP rank finds what another wrote: the manager asks
``probe`` for hashes its registry lacks, and adopts the leading hits.

Data path. One boto3 client with a connection pool sized to two pools of
``max_concurrency`` threads: one for reads and probes (the engine waits on them),
one for writes and deletes (the write-through cascade), so a large upload never
queues in front of an onboard. Reads are ranged GETs whose body is received straight
into the destination buffer; every block is checked against the checksum in the
object's metadata before it counts as read.

Faults. Transport errors, timeouts, 5xx and throttling answers (503 SlowDown) are
retried ``retries`` times with capped exponential backoff and full jitter, then
count as a miss or a skipped write. ``read_timeout_s`` bounds one socket read only;
``request_deadline_s`` bounds a whole request, retries included: a watchdog thread
cuts the connection of an attempt that outlives it (a server trickling a byte at a
time), and the request counts as a timeout and a breaker failure. A circuit breaker opened by consecutive failures
turns every request into an immediate miss until a trial request succeeds, so a dead
server costs the engine no time per step and service resumes by itself.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import botocore.exceptions as bexc
import numpy as np
import urllib3.exceptions

from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.objectstore import redact_url, s3_client
from kvbm.tier import Tier, TierContext

from .breaker import OPEN, CircuitBreaker
from .config import S3TierConfig
from .objects import MetaCodec, ObjectMeta, PackPointer, checksum

log = logging.getLogger("kvbm.s3")
T = TypeVar("T")

# Answers that say the server is overloaded or broken for now: retry, then count
# against the breaker.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
})
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
)


class _Refused(Exception):
    """The circuit breaker is open: the request was not sent."""


class _Truncated(Exception):
    """The body ended before the bytes its headers promised."""


_RETRYABLE: tuple[type[BaseException], ...] = (_Truncated, *_TRANSPORT_ERRORS)


class _Missing(Exception):
    """The object does not exist (404)."""


class _Exists(Exception):
    """A conditional put found the object already there (412)."""


class _BadObject(Exception):
    """The object is not a block of this namespace and layout, or not the one asked for."""


class _Redirect(Exception):
    """The object is a pointer: the block lives in the pack it names."""

    def __init__(self, pointer: PackPointer) -> None:
        super().__init__(pointer.pack.hex())
        self.pointer = pointer


class _DeadlineExceeded(TimeoutError):
    """A request (retries included) ran past ``request_deadline_s``."""


_ANSWERS: tuple[type[BaseException], ...] = (_Missing, _Exists, _BadObject, _Redirect)


class _Armed:
    """One request attempt the watchdog guards: its deadline and its connections."""

    __slots__ = ("conns", "deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[Any] = []
        self.expired = False


def _cut(conn: Any) -> None:
    """Shut the socket down: a read or send blocked on it returns at once."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already shut or closed
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Cuts the connections of request attempts that outlive their deadline.

    botocore's ``read_timeout`` applies to each socket read, so a server that sends
    a byte now and then keeps a request alive indefinitely. The tier's connection
    pools report each connection they hand out (``attach``) to the attempt running
    on that thread; one thread per tier wakes at the earliest deadline and shuts
    down the sockets of expired attempts, which fails the blocked read or send.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._local = threading.local()
        self._armed: set[_Armed] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_at = float("inf")  # when the watchdog thread wakes next

    def arm(self, deadline: float) -> _Armed:
        a = _Armed(deadline)
        with self._cv:
            self._armed.add(a)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name=f"kvbm-{self._name}-deadline", daemon=True
                )
                self._thread.start()
            if deadline < self._wake_at:
                # Wake the thread only for an earlier deadline: requests arm and disarm
                # in the thousands per second, and all share the same budget.
                self._cv.notify()
        self._local.armed = a
        return a

    def disarm(self, a: _Armed) -> None:
        self._local.armed = None
        with self._cv:
            self._armed.discard(a)

    def attach(self, conn: Any) -> None:
        a: _Armed | None = getattr(self._local, "armed", None)
        if a is not None:
            with self._cv:
                a.conns.append(conn)
                if a.expired:
                    _cut(conn)

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                wait: float | None = None
                for a in self._armed:
                    if now >= a.deadline:
                        a.expired = True
                        for c in a.conns:
                            _cut(c)
                        # A new connection has no socket until it connects: look again.
                        left = 0.05
                    else:
                        left = a.deadline - now
                    wait = left if wait is None else min(wait, left)
                self._wake_at = float("inf") if wait is None else now + wait
                self._cv.wait(wait)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _watched_pool(base: type[Any], watchdog: _Watchdog) -> type[Any]:
    """``base`` (a urllib3 connection pool class) reporting each connection it hands out."""

    def _get_conn(self: Any, timeout: float | None = None) -> Any:
        conn = base._get_conn(self, timeout)
        watchdog.attach(conn)
        return conn

    return type(f"Watched{base.__name__}", (base,), {"_get_conn": _get_conn})


@dataclass(frozen=True, slots=True)
class _Loc:
    """Where a block lives: object ``obj``, position ``index`` of ``count`` blocks."""

    obj: str
    index: int
    count: int


class ExistenceCache:
    """Bounded answers to "is this block in the bucket, and where?".

    Positive answers are kept until evicted (least recently used first) or found
    wrong by a read; negative answers expire after ``negative_ttl_s`` because another
    instance may upload the block at any time.
    """

    def __init__(self, size: int, negative_ttl_s: float) -> None:
        self.size = size
        self.negative_ttl_s = negative_ttl_s
        self._pos: OrderedDict[bytes, _Loc] = OrderedDict()
        self._neg: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> _Loc | None:
        with self._lock:
            loc = self._pos.get(key)
            if loc is not None:
                self._pos.move_to_end(key)
            return loc

    def put(self, key: bytes, loc: _Loc) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._neg.pop(key, None)
            self._pos[key] = loc
            self._pos.move_to_end(key)
            while len(self._pos) > self.size:
                self._pos.popitem(last=False)

    def drop(self, key: bytes) -> None:
        with self._lock:
            self._pos.pop(key, None)
            self._neg.pop(key, None)

    def put_missing(self, key: bytes) -> None:
        if self.size <= 0 or self.negative_ttl_s <= 0:
            return
        with self._lock:
            self._pos.pop(key, None)
            self._neg[key] = time.monotonic() + self.negative_ttl_s
            self._neg.move_to_end(key)
            while len(self._neg) > self.size:
                self._neg.popitem(last=False)

    def is_missing(self, key: bytes) -> bool:
        with self._lock:
            t = self._neg.get(key)
            if t is None:
                return False
            if time.monotonic() >= t:
                del self._neg[key]
                return False
            return True

    def __len__(self) -> int:
        return len(self._pos)


class S3Tier(Tier):
    """Blocks as objects in one bucket, keyed by namespace and sequence hash."""

    kind: ClassVar[str] = "s3"
    shared: ClassVar[bool] = True

    def __init__(self, config: S3TierConfig, ctx: TierContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        ns_hex = ctx.namespace.hex
        self._key_prefix = f"{config.prefix}/{ns_hex}/" if config.prefix else f"{ns_hex}/"
        self._codec = MetaCodec(ns_hex, ctx.layout.digest, self.block_bytes)
        self._bucket = config.bucket
        self._where = f"s3://{config.bucket}/{self._key_prefix}"
        if config.endpoint_url:
            self._where += f" at {redact_url(config.endpoint_url)}"
        self._breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_cooldown_s, config.breaker_max_cooldown_s
        )
        self._cache = ExistenceCache(config.exist_cache_size, config.negative_ttl_s)
        self._cond = config.conditional_put
        # Keys whose stored object failed its check: the next write replaces it
        # instead of trusting a conditional put that would keep the bad copy.
        self._bad: set[bytes] = set()
        # Live members of packs this instance wrote, and their pointer objects (for
        # delete_on_evict).
        self._pack_live: dict[str, int] = {}
        self._pack_pointers: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._last_warn = -1e9
        self._counts: dict[str, int] = dict.fromkeys(
            ("puts", "put_bytes", "put_exists", "put_failures", "gets", "get_bytes",
             "get_misses", "get_failures", "checksum_failures", "bad_objects", "truncated",
             "heads", "probe_hits", "probe_cache_hits", "retries", "transient_errors",
             "timeouts", "deadline_exceeded", "deletes", "refused", "pointer_puts",
             "pointer_failures", "pointer_redirects"), 0)
        self._watchdog = _Watchdog(self.name)
        self._client = self._make_client()
        self._deadline_enforced = self._watch_connections()
        c = config.max_concurrency
        self._reads = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-r")
        self._writes = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-w")
        # Pointer PUTs run beside the pack PUTs that wait on them, never in their pool
        # (a pool waiting on itself can deadlock when every worker waits).
        self._pointers = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-p")
        self._check_bucket()

    # -- set-up ----------------------------------------------------------------
    def _make_client(self) -> Any:
        try:
            return s3_client(
                self.cfg,
                max_pool_connections=3 * self.cfg.max_concurrency + 2,
                # Every block carries its own xxh3 checksum, verified on read; a second
                # CRC over every body would only cost CPU.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            )
        except bexc.BotoCoreError as e:
            raise ConfigError(f"s3 tier {self.name!r}: cannot build a client for {self._where}: {e}") from None

    def _watch_connections(self) -> bool:
        """Make the client's connection pools report to the deadline watchdog.

        botocore has no public hook that sees the connection of a request, so this
        reaches into its http session; if a botocore version lays it out otherwise,
        the deadline still stops retries but cannot cut a trickling attempt short.
        """
        try:
            session = self._client._endpoint.http_session
            classes: dict[str, type[Any]] = session._pool_classes_by_scheme
            manager = session._manager
        except AttributeError:
            log.warning("kvbm s3 tier %r: this botocore version hides its connection pools; "
                        "request_deadline_s bounds retries but not one slow attempt", self.name)
            return False
        for scheme, base in list(classes.items()):
            classes[scheme] = _watched_pool(base, self._watchdog)
        manager.pool_classes_by_scheme = classes
        return True

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except bexc.NoCredentialsError:
            raise ConfigError(
                f"s3 tier {self.name!r}: no AWS credentials found for {self._where}; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or the keys "
                "aws_access_key_id/aws_secret_access_key (e.g. '${MY_KEY_ID}')"
            ) from None
        except bexc.ClientError as e:
            code, status = _error_code(e)
            if status == 404 or code in ("NoSuchBucket", "404"):
                if self.cfg.create_bucket:
                    self._create_bucket()
                    return
                raise ConfigError(
                    f"s3 tier {self.name!r}: key 'bucket': bucket {self._bucket!r} does not exist "
                    f"({self._where}); create it or set create_bucket: true"
                ) from None
            if status in (401, 403):
                raise ConfigError(
                    f"s3 tier {self.name!r}: access to bucket {self._bucket!r} denied ({code}); "
                    "check the credentials and the bucket policy"
                ) from None
            if status < 500:
                raise ConfigError(
                    f"s3 tier {self.name!r}: bucket {self._bucket!r}: {code} (HTTP {status})"
                ) from None
            reason = f"HTTP {status} {code}"
        except _TRANSPORT_ERRORS as e:
            reason = _short(e)
        # A server that is down now may be up in a second: start with the breaker
        # open (every request a miss) and let its trial requests find the server.
        log.warning(
            "kvbm s3 tier %r: %s is not reachable (%s); starting with the circuit breaker "
            "open: reads miss and writes are skipped until it answers",
            self.name, self._where, reason,
        )
        for _ in range(self.cfg.breaker_failures):
            self._breaker.failure()

    def _create_bucket(self) -> None:
        kw: dict[str, Any] = {"Bucket": self._bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kw)
        except bexc.ClientError as e:
            code, status = _error_code(e)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise ConfigError(
                    f"s3 tier {self.name!r}: cannot create bucket {self._bucket!r}: {code} "
                    f"(HTTP {status}); create it yourself or fix the permissions"
                ) from None
        log.info("kvbm s3 tier %r: created bucket %r", self.name, self._bucket)

    # -- names and counters ----------------------------------------------------
    def object_key(self, key: SequenceHash) -> str:
        """The object name of a block stored on its own (or first in its pack)."""
        return self._key_prefix + key.hex()

    def _inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _warn(self, msg: str, *args: Any) -> None:
        """A warning at most every 5 s: a dead server must not flood the log."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_warn < 5.0:
                return
            self._last_warn = now
        log.warning("kvbm s3 tier %r: " + msg, self.name, *args)

    # -- one request, with retries and the breaker ----------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Run one request: retries with backoff and jitter within ``request_deadline_s``,
        breaker bookkeeping.

        Raises ``_Missing``/``_Exists``/``_BadObject``/``_Redirect`` (answers, not
        faults), ``_Refused`` (breaker open), ``_DeadlineExceeded`` or the last
        transient error.
        """
        cfg = self.cfg
        deadline = time.monotonic() + cfg.request_deadline_s
        attempt = 0
        while True:
            if not self._breaker.allow():
                self._inc("refused")
                raise _Refused()
            armed = self._watchdog.arm(deadline)
            try:
                out = fn()
            except Exception as e:
                if armed.expired:
                    # The watchdog cut this attempt: whatever the cut caused (an error,
                    # or headers cut short that parse as a shorter answer), it is a
                    # timeout, and the budget is spent.
                    self._breaker_failure(e)
                    raise self._deadline_exceeded() from None
                if isinstance(e, _ANSWERS):
                    self._breaker.success()
                    raise
                err = self._classify(e)
            else:
                if armed.expired:
                    # A cut in the headers can end them early and still parse as a
                    # complete answer (a PUT's "200" without its ETag): not trusted.
                    exc = self._deadline_exceeded()
                    self._breaker_failure(exc)
                    raise exc
                self._breaker.success()
                return out
            finally:
                self._watchdog.disarm(armed)
            if attempt >= cfg.retries:
                raise err
            attempt += 1
            cap = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
            pause = random.uniform(0, cap)  # full jitter: instances don't retry in step
            if time.monotonic() + pause >= deadline:
                raise self._deadline_exceeded() from err
            self._inc("retries")
            time.sleep(pause)

    def _classify(self, e: Exception) -> BaseException:
        """Breaker and counter bookkeeping for a failed attempt; returns ``e`` if it
        may be retried, else raises (an answer from a live server, or an unknown error)."""
        if isinstance(e, bexc.ClientError):
            code, status = _error_code(e)
            if status == 404 or code in _MISSING_CODES:
                self._breaker.success()
                raise _Missing() from None
            if status == 412 or code == "PreconditionFailed":
                self._breaker.success()
                raise _Exists() from None
            if status == 501:
                # "NotImplemented": the server is alive but lacks a feature.
                self._breaker.success()
                raise e
            if status < 500 and code not in _TRANSIENT_CODES and status != 429:
                # The server answered: it is alive, the request was wrong.
                self._breaker.success()
                raise e
            self._breaker_failure(e)
            self._inc("transient_errors")
            transient: BaseException = e
            return transient
        if isinstance(e, _RETRYABLE):
            self._breaker_failure(e)
            self._inc("transient_errors")
            if isinstance(e, _Truncated):
                self._inc("truncated")
            if isinstance(e, (bexc.ReadTimeoutError, bexc.ConnectTimeoutError, TimeoutError)):
                self._inc("timeouts")
            retryable: BaseException = e
            return retryable
        # Anything else (a response botocore cannot parse, ...) is a fault too, not
        # retried; it must count, or a half-open breaker would wait for its trial
        # request's verdict forever.
        self._breaker_failure(e)
        raise e

    def _deadline_exceeded(self) -> _DeadlineExceeded:
        self._inc("timeouts")
        self._inc("deadline_exceeded")
        return _DeadlineExceeded(
            f"no complete answer within request_deadline_s={self.cfg.request_deadline_s} s "
            "(retries included); the server is overloaded or trickling: check it, or raise "
            "request_deadline_s"
        )

    def _breaker_failure(self, e: BaseException) -> None:
        opens = self._breaker.opens
        self._breaker.failure()
        if self._breaker.opens != opens:
            log.warning(
                "kvbm s3 tier %r: circuit breaker open after %s (%s); reads miss and writes "
                "are skipped until a trial request succeeds", self.name, self._where, _short(e),
            )

    # -- reads ----------------------------------------------------------------
    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        ok = [False] * len(keys)
        if not keys:
            return ok
        groups: dict[str, list[tuple[int, int]]] = {}
        counts: dict[str, int] = {}
        for i, k in enumerate(keys):
            # Unknown blocks are looked for under their own name, as single objects.
            loc = self._cache.get(k) or _Loc(self.object_key(k), 0, 1)
            groups.setdefault(loc.obj, []).append((loc.index, i))
            counts[loc.obj] = loc.count
        jobs = [(obj, sorted(members), counts[obj]) for obj, members in groups.items()]
        if len(jobs) == 1:
            obj, members, count = jobs[0]
            results = [self._read_object(obj, members, count, keys, dst)]
        else:
            results = list(self._reads.map(
                lambda j: self._read_object(j[0], j[1], j[2], keys, dst), jobs))
        for (_, members, _), flags in zip(jobs, results, strict=True):
            for (_, i), good in zip(members, flags, strict=True):
                ok[i] = good
        return ok

    def _read_object(
        self,
        obj: str,
        members: list[tuple[int, int]],
        count: int,
        keys: Sequence[SequenceHash],
        dst: Sequence[np.ndarray],
        follow: bool = True,
    ) -> list[bool]:
        """One GET covering ``members`` (object position, batch index) of an object
        thought to hold ``count`` blocks; ranged unless it covers the whole object.
        A pointer object is followed once (``follow``) to its pack."""
        bb = self.block_bytes
        first, last = members[0][0], members[-1][0]
        want = {pos: i for pos, i in members}
        span = last - first + 1
        kw: dict[str, Any] = {}
        ranged = first != 0 or last + 1 != count
        if ranged:
            kw["Range"] = f"bytes={first * bb}-{(last + 1) * bb - 1}"

        def get() -> ObjectMeta:
            r = self._client.get_object(Bucket=self._bucket, Key=obj, **kw)
            body = r["Body"]
            try:
                meta = self._codec.decode(r.get("Metadata") or {})
                if isinstance(meta, str):
                    raise _BadObject(meta)
                if isinstance(meta, PackPointer):
                    if not follow or ranged or r.get("ContentLength") != 0 or any(
                        meta.key != keys[i] for _, i in members
                    ):
                        raise _BadObject("a pack pointer, but not one for the block asked for")
                    body.read()  # nothing; ends the response so the connection is reused
                    self._finish(body)
                    raise _Redirect(meta)
                length = r.get("ContentLength")
                total = _range_total(r.get("ContentRange"), length)
                # Unranged, the object may still be a pack this instance did not know
                # of: its first blocks are the ones asked for.
                short = length != span * bb if ranged else (length or 0) < span * bb
                if total != meta.count * bb or short:
                    raise _BadObject(
                        f"{length} bytes of {total}, expected {span * bb} of {meta.count * bb}"
                    )
                for pos, i in members:
                    if pos >= meta.count or meta.keys[pos] != keys[i]:
                        raise _BadObject("holds other blocks than the ones asked for")
                scratch: np.ndarray | None = None
                for pos in range(first, last + 1):
                    at = want.get(pos)
                    if at is None:
                        if scratch is None:
                            scratch = np.empty(bb, dtype=np.uint8)
                        buf = scratch
                    else:
                        buf = dst[at]
                    self._readinto(body, buf)
                if length == span * bb:
                    self._finish(body)
                else:
                    body.close()  # the rest of an unexpected pack: drop, don't drain
                return meta
            except _Redirect:
                raise
            except BaseException:
                body.close()  # a half-read connection must not go back to the pool
                raise

        out = [False] * len(members)
        self._inc("gets")
        try:
            meta = self._call(get)
        except _Refused:
            return out
        except _Redirect as e:
            ptr = e.pointer
            self._inc("pointer_redirects")
            # The pack's own metadata (returned with the ranged GET) is what the bytes
            # are checked against, and that it holds this block at this position.
            return self._read_object(self.object_key(ptr.pack), [(ptr.pos, i) for _, i in members],
                                     ptr.count, keys, dst, follow=False)
        except _Missing:
            self._inc("get_misses", len(members))
            for _, i in members:
                self._cache.drop(keys[i])
            return out
        except _BadObject as e:
            self._inc("bad_objects")
            self._report_bad(obj, str(e), [keys[i] for _, i in members])
            return out
        except Exception as e:
            self._inc("get_failures")
            self._warn("GET %s failed (%s); treated as a miss", obj, _short(e))
            return out
        bad: list[SequenceHash] = []
        for j, (pos, i) in enumerate(members):
            if checksum(dst[i]) == meta.sums[pos]:
                out[j] = True
            else:
                bad.append(keys[i])
        if bad:
            self._inc("checksum_failures", len(bad))
            self._report_bad(obj, f"{len(bad)} block(s) fail their xxh3 checksum", bad)
        good = out.count(True)
        self._inc("get_bytes", good * bb)
        for pos, k in enumerate(meta.keys):
            if k not in bad:
                self._cache.put(k, _Loc(obj, pos, meta.count))
        return out

    def _report_bad(self, obj: str, why: str, keys: list[SequenceHash]) -> None:
        log.warning("kvbm s3 tier %r: object %s is not intact (%s); treated as a miss",
                    self.name, obj, why)
        with self._lock:
            self._bad.update(keys)
        for k in keys:
            self._cache.drop(k)

    def _readinto(self, body: Any, buf: np.ndarray) -> None:
        """Fill ``buf`` from the response body; ``_Truncated`` if the body ends early."""
        mv = buf.data.cast("B")
        n, total = 0, len(mv)
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        if (
            self.cfg.zero_copy_reads
            and raw is not None
            and isinstance(fp, http.client.HTTPResponse)
            and not raw.headers.get("content-encoding")
        ):
            # Straight from the socket into the destination: urllib3's readinto would
            # read into a temporary bytes object and copy it (twice the memory traffic).
            while n < total:
                k = fp.readinto(mv[n:])
                if not k:
                    raise _Truncated(f"body ended after {n} of {total} bytes")
                n += k
            return
        while n < total:
            k = body.readinto(mv[n:])
            if not k:
                raise _Truncated(f"body ended after {n} of {total} bytes")
            n += k

    @staticmethod
    def _finish(body: Any) -> None:
        """Hand the connection back to the pool after the last byte was received."""
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        if raw is not None and isinstance(fp, http.client.HTTPResponse) and fp.isclosed():
            raw.release_conn()
        else:
            body.close()

    # -- writes ---------------------------------------------------------------
    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        n = len(keys)
        if not n:
            return []
        p = self.cfg.pack_blocks
        groups = [list(range(s, min(s + p, n))) for s in range(0, n, p)]
        if len(groups) == 1:
            results = [self._write_object(groups[0], keys, src)]
        else:
            results = list(self._writes.map(lambda g: self._write_object(g, keys, src), groups))
        ok = [False] * n
        for g, good in zip(groups, results, strict=True):
            for i in g:
                ok[i] = good
        return ok

    def _write_object(
        self, members: list[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> bool:
        """One PUT of the blocks ``members`` (batch indices) as one object."""
        gkeys = [keys[i] for i in members]
        obj = self.object_key(gkeys[0])
        count = len(gkeys)
        with self._lock:
            overwrite = any(k in self._bad for k in gkeys)
        if not overwrite and all(self._cache.get(k) is not None for k in gkeys):
            self._inc("put_exists")  # another instance's upload, seen by probe or read
            return True
        sums = [checksum(src[i]) for i in members]
        meta = self._codec.encode(gkeys, sums)
        # One contiguous body: botocore takes bytes (not a memoryview), and a single
        # buffer goes out in one sendall.
        body = bytes(src[members[0]]) if count == 1 else b"".join(src[i].data for i in members)

        def put(conditional: bool) -> None:
            kw: dict[str, Any] = {}
            if conditional:
                kw["IfNoneMatch"] = "*"
            self._client.put_object(
                Bucket=self._bucket, Key=obj, Body=body, Metadata=meta,
                ContentType="application/octet-stream", **kw,
            )

        try:
            cond = self._cond
            if overwrite or cond == "off":
                self._call(lambda: put(False))
            elif cond in ("auto", "if_none_match"):
                try:
                    self._call(lambda: put(True))
                except bexc.ClientError as e:
                    code, status = _error_code(e)
                    if cond != "auto" or status not in (400, 501) or code not in (
                        "NotImplemented", "InvalidArgument", "InvalidRequest"
                    ):
                        raise
                    log.warning("kvbm s3 tier %r: the server refuses If-None-Match (%s); "
                                "checking existence with HEAD instead", self.name, code)
                    self._cond = "head"
                    return self._write_object(members, keys, src)
            else:
                if self._head(obj, gkeys[0]) is not None:
                    raise _Exists()
                self._call(lambda: put(False))
        except _Exists:
            self._inc("put_exists")
            if count > 1:
                return self._write_rest_of_pack(obj, members, keys, src)
        except _Refused:
            return False
        except Exception as e:
            self._inc("put_failures")
            self._warn("PUT %s failed (%s); write skipped", obj, _short(e))
            return False
        else:
            self._inc("puts")
            self._inc("put_bytes", len(body))
            if overwrite:
                with self._lock:
                    self._bad.difference_update(gkeys)
            if count > 1:
                with self._lock:
                    self._pack_live[obj] = count
                if self.cfg.pack_pointers:
                    self._write_pointers(obj, gkeys, sums, overwrite)
        for j, k in enumerate(gkeys):
            self._cache.put(k, _Loc(obj, j, count))
        return True

    def _write_pointers(
        self, obj: str, gkeys: list[SequenceHash], sums: list[int], overwrite: bool
    ) -> None:
        """An empty pointer object under the name of each block of pack ``obj`` but the
        first, so a probe or read that starts mid-pack finds it. A pointer that fails
        costs only that: the block stays in the pack, found from its first block."""
        names = [self.object_key(k) for k in gkeys[1:]]
        with self._lock:
            self._pack_pointers[obj] = names
        jobs = [(gkeys[j], sums[j], j) for j in range(1, len(gkeys))]
        list(self._pointers.map(
            lambda job: self._write_pointer(job[0], job[1], gkeys[0], job[2], len(gkeys), overwrite),
            jobs,
        ))

    def _write_pointer(
        self, key: SequenceHash, sum_: int, pack: SequenceHash, pos: int, count: int,
        overwrite: bool,
    ) -> bool:
        obj = self.object_key(key)
        meta = self._codec.encode_pointer(key, sum_, pack, pos, count)

        def put(conditional: bool) -> None:
            kw: dict[str, Any] = {"IfNoneMatch": "*"} if conditional else {}
            self._client.put_object(
                Bucket=self._bucket, Key=obj, Body=b"", Metadata=meta,
                ContentType="application/octet-stream", **kw,
            )

        try:
            if overwrite or self._cond == "off":
                self._call(lambda: put(False))
            elif self._cond in ("auto", "if_none_match"):
                # Never replace what the name already leads to: a block stored alone,
                # another pack (whose pointers may name it), or another pointer.
                self._call(lambda: put(True))
            else:
                if self._head(obj, key) is not None:
                    raise _Exists()
                self._call(lambda: put(False))
        except _Exists:
            return True
        except _Refused:
            return False
        except Exception as e:
            self._inc("pointer_failures")
            self._warn("PUT of pointer %s failed (%s); the block is found only from its "
                       "pack's first block", obj, _short(e))
            return False
        self._inc("pointer_puts")
        return True

    def _write_rest_of_pack(
        self, obj: str, members: list[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> bool:
        """A pack's name was taken (another instance wrote its first block, alone or in
        another pack): keep what that object holds, write the other blocks anew."""
        try:
            meta = self._head(obj, keys[members[0]])
        except Exception:
            return False
        if meta is None:
            return False
        if isinstance(meta, PackPointer):
            # The first block is already in another instance's pack.
            self._cache.put(meta.key, _Loc(self.object_key(meta.pack), meta.pos, meta.count))
            held = {meta.key}
        else:
            for j, k in enumerate(meta.keys):
                self._cache.put(k, _Loc(obj, j, meta.count))
            held = set(meta.keys)
        rest = [i for i in members if keys[i] not in held]
        return self._write_object(rest, keys, src) if rest else True

    # -- probe ----------------------------------------------------------------
    def _head(self, obj: str, key: SequenceHash) -> ObjectMeta | PackPointer | None:
        """The metadata of the object named after ``key`` (a block, a pack starting
        with it, or a pointer to the pack holding it); None if absent or not ours."""
        def head() -> ObjectMeta | PackPointer | None:
            r = self._client.head_object(Bucket=self._bucket, Key=obj)
            meta = self._codec.decode(r.get("Metadata") or {})
            if isinstance(meta, PackPointer):
                return meta if meta.key == key and r.get("ContentLength") == 0 else None
            if isinstance(meta, str) or meta.keys[0] != key:
                return None
            if r.get("ContentLength") != meta.count * self.block_bytes:
                return None
            return meta

        self._inc("heads")
        try:
            return self._call(head)
        except _Missing:
            return None

    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        """Which leading keys are in the bucket; stops at the first miss.

        Answers come from the existence cache where it knows, else from HEADs sent
        in waves that start at one and double while every answer is a hit. A pack
        found by its first block vouches for the rest of its blocks.
        """
        out = [False] * len(keys)
        n = len(keys)
        i = 0
        # The first HEAD goes alone: most probes are for prompts never stored, and
        # one answer settles them. Hits double the next wave.
        wave = 1
        while i < n:
            if self._cache.get(keys[i]) is not None:
                out[i] = True
                self._inc("probe_cache_hits")
                i += 1
                continue
            if self._cache.is_missing(keys[i]) or self._breaker.state == OPEN:
                break
            batch: list[int] = []
            j = i
            while j < n and len(batch) < wave:
                if self._cache.is_missing(keys[j]):
                    break
                if self._cache.get(keys[j]) is None:
                    batch.append(j)
                j += 1
            answers = list(self._reads.map(self._probe_one, [keys[b] for b in batch]))
            for b, found in zip(batch, answers, strict=True):
                # A 404 for a block that a found pack holds is no miss.
                if found is False and self._cache.get(keys[b]) is None:
                    self._cache.put_missing(keys[b])
            # Walk the window in order: the cache now holds every hit (and every
            # block of a found pack); the first unknown key ends the prefix.
            stop = False
            while i < j:
                if self._cache.get(keys[i]) is None:
                    stop = True
                    break
                out[i] = True
                i += 1
            if stop:
                break
            if any(a is not None and a > 1 for a in answers):
                # The writer packs: the next unknown key starts a pack, and HEADs of
                # the keys after it would only find its members missing.
                wave = 1
            else:
                wave = min(wave * 2, 8 * self.cfg.max_concurrency)
        self._inc("probe_hits", out.count(True))
        return out

    def _probe_one(self, key: SequenceHash) -> int | bool | None:
        """The found object's block count (cached); False: absent; None: unknown (fault)."""
        obj = self.object_key(key)
        try:
            meta = self._head(obj, key)
        except Exception:
            return None
        if isinstance(meta, PackPointer):
            # A block in the middle of a pack: its pack's metadata (one more HEAD)
            # must still hold it, with the same checksum, and vouches for the rest.
            ptr = meta
            obj = self.object_key(ptr.pack)
            try:
                meta = self._head(obj, ptr.pack)
            except Exception:
                return None
            if not isinstance(meta, ObjectMeta) or meta.count != ptr.count or (
                meta.keys[ptr.pos] != key or meta.sums[ptr.pos] != ptr.sum
            ):
                return False  # a stale pointer: its pack is gone or was replaced
        if meta is None:
            return False
        for j, k in enumerate(meta.keys):
            self._cache.put(k, _Loc(obj, j, meta.count))
        return meta.count

    # -- eviction -------------------------------------------------------------
    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """Delete evicted blocks' objects if ``delete_on_evict``; else keep them.

        Without deletion the objects stay (the bucket's lifecycle rules age them
        out) and a later probe may adopt them again. A pack is deleted when the
        last of its blocks this instance wrote is evicted.
        """
        if not self.cfg.delete_on_evict or not keys:
            return
        doomed: list[str] = []
        with self._lock:
            for k in keys:
                loc = self._cache.get(k)
                if loc is None or loc.count == 1:
                    doomed.append(self.object_key(k))
                elif loc.obj in self._pack_live:
                    self._pack_live[loc.obj] -= 1
                    if self._pack_live[loc.obj] <= 0:
                        del self._pack_live[loc.obj]
                        doomed.append(loc.obj)
                        doomed.extend(self._pack_pointers.pop(loc.obj, ()))
        for k in keys:
            self._cache.drop(k)
        if doomed:
            # Deletion runs on the write pool: discard is called from match paths.
            self._writes.submit(self._delete, doomed)

    def _delete(self, objs: list[str]) -> None:
        for s in range(0, len(objs), 1000):
            part = objs[s : s + 1000]
            req = functools.partial(
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": o} for o in part], "Quiet": True},
            )
            try:
                self._call(req)
                self._inc("deletes", len(part))
            except Exception as e:
                self._warn("delete of %d objects failed (%s)", len(part), _short(e))

    # -- the rest -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        out["breaker_state"] = self._breaker.state
        out["breaker_opens"] = self._breaker.opens
        out["exist_cache_entries"] = len(self._cache)
        out["conditional_put"] = self._cond
        out["deadline_enforced"] = self._deadline_enforced
        return out

    def close(self) -> None:
        self._reads.shutdown(wait=True)
        self._writes.shutdown(wait=True)
        self._pointers.shutdown(wait=True)
        self._watchdog.close()
        close = getattr(self._client, "close", None)
        if close is not None:
            close()


def _error_code(e: bexc.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code", ""))
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    if not status and code.isdigit():
        status = int(code)
    return code, status


def _range_total(content_range: str | None, content_length: int | None) -> int | None:
    """The object size from ``Content-Range: bytes a-b/total`` (or the length if absent)."""
    if not content_range:
        return content_length
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def _short(e: BaseException) -> str:
    """An exception as one line without request details (no signatures or headers)."""
    if isinstance(e, bexc.ClientError):
        code, status = _error_code(e)
        return f"HTTP {status} {code}"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:200]
