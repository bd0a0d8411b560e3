"""One request to the object store: retries, the deadline watchdog, the breaker, and
what an answer or error means.

Transport errors, timeouts, 5xx and throttling answers (503 SlowDown) are retried
``retries`` times with capped exponential backoff and full jitter. ``read_timeout_s``
bounds one socket read only; a deadline bounds a whole request, retries included: a
watchdog thread cuts the connection of an attempt that outlives it (a server
trickling a byte at a time, or one stopped dead), and the request counts as a timeout
and a breaker failure. Reads and HEADs, which an engine waits on (onboard, the probes
of match_prefix, the bucket check at start), get the short ``read_deadline_s``;
writes and deletes, which run in the background cascade, ``request_deadline_s``.
``close`` cuts every request still running, so a tier closes in moments whatever the
server does. Answers from a live server (404, 412, an object that is not ours, a pointer
to follow) are raised as exceptions of their own and count as breaker successes.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import botocore.exceptions as bexc
import urllib3.exceptions

from .breaker import CircuitBreaker
from .config import S3TierConfig
from .objects import PackPointer

log = logging.getLogger("kvbm.s3")
T = TypeVar("T")

# Answers that say the server is overloaded or broken for now: retry, then count
# against the breaker.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
})
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
)


class Refused(Exception):
    """The circuit breaker is open: the request was not sent."""


class Truncated(Exception):
    """The body ended before the bytes its headers promised."""


class Missing(Exception):
    """The object does not exist (404)."""


class Exists(Exception):
    """A conditional put found the object already there (412)."""


class BadObject(Exception):
    """The object is not a block of this namespace and layout, or not the one asked for."""


class Redirect(Exception):
    """The object is a pointer: the block lives in the pack it names."""

    def __init__(self, pointer: PackPointer) -> None:
        super().__init__(pointer.pack.hex())
        self.pointer = pointer


class DeadlineExceeded(TimeoutError):
    """A request (retries included) ran past its deadline (``read_deadline_s`` or
    ``request_deadline_s``)."""


#: How much earlier than its deadline an attempt may be cut when another one expires:
#: attempts sent together to a stopped server expire together.
EXPIRY_GRACE_S = 0.05

#: The wire functions (``_wire``) whose requests an engine call waits on: they get
#: ``read_deadline_s`` unless the caller names a deadline.
ENGINE_READS = frozenset({"get_blocks", "head_meta"})


RETRYABLE: tuple[type[BaseException], ...] = (Truncated, *TRANSPORT_ERRORS)
ANSWERS: tuple[type[BaseException], ...] = (Missing, Exists, BadObject, Redirect)


def error_code(e: bexc.ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a client error."""
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code", ""))
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    if not status and code.isdigit():
        status = int(code)
    return code, status


def short(e: BaseException) -> str:
    """An exception as one line without request details (no signatures or headers)."""
    if isinstance(e, bexc.ClientError):
        code, status = error_code(e)
        return f"HTTP {status} {code}"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:200]


class Counters:
    """The tier's counters, safe to bump from every pool thread."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(names, 0)

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)


# -- the deadline watchdog -----------------------------------------------------------------
class _Armed:
    """One request attempt the watchdog guards: its deadline and its connections."""

    __slots__ = ("conns", "counted", "deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[Any] = []
        self.expired = False
        #: The watchdog already counted this attempt's expiry against the breaker.
        self.counted = False


def _cut(conn: Any) -> None:
    """Shut the socket down: a read or send blocked on it returns at once."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already shut or closed
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Cuts the connections of request attempts that outlive their deadline.

    botocore's ``read_timeout`` applies to each socket read, so a server that sends
    a byte now and then keeps a request alive indefinitely. The tier's connection
    pools report each connection they hand out (``attach``) to the attempt running
    on that thread; one thread per tier wakes at the earliest deadline and shuts
    down the sockets of expired attempts, which fails the blocked read or send.
    """

    def __init__(self, name: str, on_expire: Callable[[], None] | None = None) -> None:
        self._name = name
        self._on_expire = on_expire
        self._local = threading.local()
        self._armed: set[_Armed] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_at = float("inf")  # when the watchdog thread wakes next

    def arm(self, deadline: float) -> _Armed:
        """Guard the attempt about to run on this thread until ``disarm``."""
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
        """The attempt ended: stop guarding it."""
        self._local.armed = None
        with self._cv:
            self._armed.discard(a)

    def attach(self, conn: Any) -> None:
        """``conn`` serves the attempt armed on this thread (if any)."""
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
                # Attempts sent together to a stopped server expire a few ms apart; once
                # one expires, those about to are cut with it, so that all of them count
                # against the breaker before any of their threads sends the next request
                # (else every round of hung requests costs the engine another deadline).
                cutoff = now
                if any(now >= a.deadline and not a.expired for a in self._armed):
                    cutoff = now + EXPIRY_GRACE_S
                wait: float | None = None
                for a in self._armed:
                    if cutoff >= a.deadline:
                        if not a.expired and self._on_expire is not None:
                            a.counted = True
                            self._on_expire()
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

    def cut_all(self) -> None:
        """Expire every attempt now and cut its connections (the tier is closing)."""
        with self._cv:
            for a in self._armed:
                a.expired = True
                a.counted = True  # closing is not the server's failure
                for c in a.conns:
                    _cut(c)

    def close(self) -> None:
        """Cut every attempt still running and stop the watchdog thread."""
        self.cut_all()
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _watched_pool(base: type[Any], watchdog: Watchdog) -> type[Any]:
    """``base`` (a urllib3 connection pool class) reporting each connection it hands out."""

    def _get_conn(self: Any, timeout: float | None = None) -> Any:
        conn = base._get_conn(self, timeout)
        watchdog.attach(conn)
        return conn

    return type(f"Watched{base.__name__}", (base,), {"_get_conn": _get_conn})


# -- one request ---------------------------------------------------------------------------
class Requests:
    """Runs the tier's requests: retries, deadline, breaker bookkeeping, counters."""

    def __init__(self, cfg: S3TierConfig, name: str, where: str, counters: Counters) -> None:
        self.cfg = cfg
        self.name = name
        self.where = where
        self.counters = counters
        self.breaker = CircuitBreaker(
            cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.breaker_max_cooldown_s
        )
        self.watchdog = Watchdog(name, on_expire=self._expired)
        self._closed = False

    def deadline_for(self, fn: Callable[[], Any]) -> tuple[float, str]:
        """The deadline of ``fn``'s request and the key that sets it: reads and HEADs
        (an engine waits on them) ``read_deadline_s``, the rest ``request_deadline_s``
        (which bounds reads too, when it is the shorter)."""
        cfg = self.cfg
        target = getattr(fn, "func", fn)  # a functools.partial of a _wire function
        if (getattr(target, "__name__", "") in ENGINE_READS
                and cfg.read_deadline_s < cfg.request_deadline_s):
            return cfg.read_deadline_s, "read_deadline_s"
        return cfg.request_deadline_s, "request_deadline_s"

    def watch(self, client: Any) -> bool:
        """Make ``client``'s connection pools report to the deadline watchdog.

        botocore has no public hook that sees the connection of a request, so this
        reaches into its http session; if a botocore version lays it out otherwise,
        the deadline still stops retries but cannot cut a trickling attempt short.
        """
        try:
            session = client._endpoint.http_session
            classes: dict[str, type[Any]] = session._pool_classes_by_scheme
            manager = session._manager
        except AttributeError:
            log.warning("kvbm s3 tier %r: this botocore version hides its connection pools; "
                        "request_deadline_s bounds retries but not one slow attempt", self.name)
            return False
        for scheme, base in list(classes.items()):
            classes[scheme] = _watched_pool(base, self.watchdog)
        manager.pool_classes_by_scheme = classes
        return True

    def call(self, fn: Callable[[], T], deadline_s: float | None = None,
             key: str = "request_deadline_s") -> T:
        """Run one request: retries with backoff and jitter within its deadline
        (``deadline_s``, named ``key`` in messages; else ``deadline_for(fn)``), breaker
        bookkeeping.

        Raises ``Missing``/``Exists``/``BadObject``/``Redirect`` (answers, not faults),
        ``Refused`` (breaker open, or the tier closing), ``DeadlineExceeded`` or the last
        transient error.
        """
        cfg = self.cfg
        if deadline_s is None:
            deadline_s, key = self.deadline_for(fn)
        deadline = time.monotonic() + deadline_s
        attempt = 0
        while True:
            if self._closed:
                raise Refused()
            if not self.breaker.allow():
                self.counters.inc("refused")
                raise Refused()
            armed = self.watchdog.arm(deadline)
            try:
                out = fn()
            except Exception as e:
                if armed.expired:
                    # The watchdog cut this attempt: whatever the cut caused (an error,
                    # or headers cut short that parse as a shorter answer), it is a
                    # timeout, and the budget is spent.
                    if not armed.counted:
                        self.breaker_failure(e)
                    raise self._deadline_exceeded(deadline_s, key) from None
                if isinstance(e, ANSWERS):
                    self.breaker.success()
                    raise
                err = self._classify(e)
            else:
                if armed.expired:
                    # A cut in the headers can end them early and still parse as a
                    # complete answer (a PUT's "200" without its ETag): not trusted.
                    exc = self._deadline_exceeded(deadline_s, key)
                    if not armed.counted:
                        self.breaker_failure(exc)
                    raise exc
                self.breaker.success()
                return out
            finally:
                self.watchdog.disarm(armed)
            if attempt >= cfg.retries:
                raise err
            attempt += 1
            cap = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
            pause = random.uniform(0, cap)  # full jitter: instances don't retry in step
            if time.monotonic() + pause >= deadline:
                raise self._deadline_exceeded(deadline_s, key) from err
            self.counters.inc("retries")
            time.sleep(pause)

    def _expired(self) -> None:
        """The watchdog cut an attempt at its deadline: one failure for the breaker."""
        self.breaker_failure(DeadlineExceeded("an attempt ran past its deadline"))

    def _classify(self, e: Exception) -> BaseException:
        """Breaker and counter bookkeeping for a failed attempt; returns ``e`` if it
        may be retried, else raises (an answer from a live server, or an unknown error)."""
        if isinstance(e, bexc.ClientError):
            code, status = error_code(e)
            if status == 404 or code in MISSING_CODES:
                self.breaker.success()
                raise Missing() from None
            if status == 412 or code == "PreconditionFailed":
                self.breaker.success()
                raise Exists() from None
            if status == 501:
                # "NotImplemented": the server is alive but lacks a feature.
                self.breaker.success()
                raise e
            if status < 500 and code not in TRANSIENT_CODES and status != 429:
                # The server answered: it is alive, the request was wrong.
                self.breaker.success()
                raise e
            self.breaker_failure(e)
            self.counters.inc("transient_errors")
            transient: BaseException = e
            return transient
        if isinstance(e, RETRYABLE):
            self.breaker_failure(e)
            self.counters.inc("transient_errors")
            if isinstance(e, Truncated):
                self.counters.inc("truncated")
            if isinstance(e, (bexc.ReadTimeoutError, bexc.ConnectTimeoutError, TimeoutError)):
                self.counters.inc("timeouts")
            retryable: BaseException = e
            return retryable
        # Anything else (a response botocore cannot parse, ...) is a fault too, not
        # retried; it must count, or a half-open breaker would wait for its trial
        # request's verdict forever.
        self.breaker_failure(e)
        raise e

    def _deadline_exceeded(self, seconds: float, key: str) -> DeadlineExceeded:
        self.counters.inc("timeouts")
        self.counters.inc("deadline_exceeded")
        if self._closed:
            return DeadlineExceeded("cut short: the tier is closing")
        return DeadlineExceeded(
            f"no complete answer within {key}={seconds} s (retries included); the server is "
            f"overloaded, trickling or stopped: check it, or raise {key}"
        )

    def breaker_failure(self, e: BaseException) -> None:
        """Count a failed request against the breaker; log when that opens it."""
        opens = self.breaker.opens
        self.breaker.failure()
        if self.breaker.opens != opens:
            log.warning(
                "kvbm s3 tier %r: circuit breaker open after %s (%s); reads miss and writes "
                "are skipped until a trial request succeeds", self.name, self.where, short(e),
            )

    def close(self) -> None:
        """Refuse new requests, cut the ones still running, stop the watchdog."""
        self._closed = True
        self.watchdog.close()
