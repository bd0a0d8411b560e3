"""Where remote-tier instances publish their peer record and find each other's.

Each serving instance publishes one record (a msgpack blob: id, address, NIXL agent
metadata, namespace, block size, served hashes, heartbeat) under
``{namespace}/{instance_id}.kvbm-peer`` of a rendezvous, rewrites it every
``publish_interval_s`` and removes it on a clean shutdown. Readers list the
rendezvous, fetch the records that changed since the last listing and ignore those
whose heartbeat is stale (the tier's peer set does that part; see
``_peers.PeerSet.scan_dir``).

Two backends:

- ``DirectoryRendezvous``: a directory the instances share (one host, or NFS).
  Records are replaced atomically; a listing stamps each record with its
  ``(mtime_ns, size)``.
- ``S3Rendezvous``: objects ``{prefix}/{namespace}/{instance_id}.kvbm-peer`` in an
  S3-compatible bucket, for instances on hosts that share no file system. A listing
  is one ListObjectsV2 (paginated) and stamps each record with its ETag, so an
  unchanged record is not downloaded again. S3 is off the data path: requests have
  short timeouts and no retries, and a failing S3 (down, 5xx, timeout) is logged once
  per outage while the tier keeps the peers it last knew (peers are reached over
  NIXL and TCP, not through S3; a dead one fails its transfer and is dropped).

Usage, in the chain's YAML (boto3 comes with ``pip install 'kvbm[s3]'``)::

    tiers:
      - {type: host, capacity: 64GiB}
      - type: remote
        listen: 10.0.0.5:7100           # an address the peers can reach
        publish_interval_s: 1.0         # the default with rendezvous_s3
        rendezvous_s3:
          bucket: kv-peers
          prefix: prod
          endpoint_url: http://minio.local:9000   # unset: AWS
          region: us-east-1
          aws_access_key_id: ${AWS_ACCESS_KEY_ID}
          aws_secret_access_key: ${AWS_SECRET_ACCESS_KEY}

Give the bucket a lifecycle rule or leave it be: a killed instance's record stays
behind but is ignored once its heartbeat is stale, and is overwritten when an
instance of the same ``instance_id`` starts again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kvbm.errors import ConfigError, PluginError
from kvbm.safepaths import UnsafePath, check_name, open_directory, shared_subdir

if TYPE_CHECKING:
    from .config import RemoteTierConfig, RendezvousS3Config

log = logging.getLogger("kvbm.remote")

#: The name of an instance's record is its instance id with this suffix.
PEER_SUFFIX = ".kvbm-peer"


class _Outage:
    """Logs a failing operation once per outage (and its recovery), not every interval."""

    def __init__(self, tier: str, where: str) -> None:
        self.tier = tier
        self.where = where
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, what: str, err: BaseException) -> None:
        with self._lock:
            first = what not in self._failing
            self._failing.add(what)
        if first:
            log.warning("kvbm tier %r: %s at %s failed (%s); keeping the peers known so far "
                        "and trying again every interval", self.tier, what, self.where, err)
        else:
            log.debug("kvbm tier %r: %s at %s failed again (%s)", self.tier, what, self.where, err)

    def ok(self, what: str) -> None:
        if what not in self._failing:  # the common case, without the lock
            return
        with self._lock:
            self._failing.discard(what)
        log.info("kvbm tier %r: %s at %s works again", self.tier, what, self.where)


class Rendezvous(ABC):
    """One namespace of a rendezvous: publish this instance's record, list the others.

    No method raises on a failing store: a failure is logged (once per outage) and
    reported by the return value, so a broken rendezvous never stops the engine.
    """

    #: Whether a listing goes over the network (then the tier lists in the background).
    remote: ClassVar[bool] = False

    def __init__(self, tier: str, where: str, instance_id: str) -> None:
        try:
            # The id names this instance's record: a '/' or '..' in it would publish
            # outside the rendezvous (the config checks a given id; this also covers
            # the default one, built from the host name).
            check_name(instance_id)
        except ValueError as e:
            raise ConfigError(f"tier {tier!r}: key 'instance_id': value {instance_id!r}: {e}; "
                              "set instance_id") from None
        self.tier = tier
        self.where = where
        self.instance_id = instance_id
        self._outage = _Outage(tier, where)

    @abstractmethod
    def publish(self, blob: bytes) -> bool:
        """Write (or replace) this instance's record; False when that failed."""

    @abstractmethod
    def unpublish(self) -> None:
        """Remove this instance's record (a clean shutdown); failures are only logged."""

    @abstractmethod
    def listing(self) -> dict[str, Hashable] | None:
        """Instance id -> stamp of every record but this instance's; None when listing
        failed (the caller keeps what it knew). A record whose stamp is unchanged since
        the last listing has not been rewritten."""

    @abstractmethod
    def fetch(self, instance_id: str) -> bytes | None:
        """The record of ``instance_id``; None when it is gone or cannot be read."""

    @abstractmethod
    def knows(self, instance_id: str) -> bool:
        """Whether ``instance_id`` publishes here (it may then be served)."""

    def describe(self, instance_id: str) -> str:
        """Where the record of ``instance_id`` lives, for messages."""
        return f"{self.where}/{instance_id}{PEER_SUFFIX}"

    def close(self) -> None:
        """Release the backend's resources (not the record: see ``unpublish``)."""


def _instance_of(name: str) -> str | None:
    """The instance id a record's name stands for, or None for anything else there."""
    if not name.endswith(PEER_SUFFIX) or name.startswith(".") or "/" in name:
        return None  # dot files are a writer's temporary files
    return name[: -len(PEER_SUFFIX)] or None


class DirectoryRendezvous(Rendezvous):
    """Records are files in ``{rendezvous_dir}/{namespace}``, replaced atomically.

    The directory is shared by design, so it is made and opened without following a
    symlink another user planted (``kvbm.safepaths``), and a record is written to a
    new temporary file (``O_EXCL | O_NOFOLLOW``) that is renamed over the old one:
    nothing planted under either name is ever written through.
    """

    def __init__(self, tier: str, root: str, namespace: str, instance_id: str) -> None:
        self.dir = Path(root) / namespace
        super().__init__(tier, str(self.dir), instance_id)
        try:
            check_name(namespace)
            rfd = open_directory(root, mode=0o777)
            try:
                os.close(shared_subdir(rfd, namespace, str(self.dir)))
            finally:
                os.close(rfd)
        except (UnsafePath, ValueError) as e:
            raise ConfigError(f"tier {tier!r}: key 'rendezvous_dir': {e}") from None
        except OSError as e:
            raise ConfigError(
                f"tier {tier!r}: key 'rendezvous_dir': cannot create {self.dir} "
                f"({e.strerror}); give a writable directory"
            ) from None

    @property
    def path(self) -> Path:
        """This instance's record."""
        return self.dir / (self.instance_id + PEER_SUFFIX)

    def publish(self, blob: bytes) -> bool:
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a killed run of this pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)  # readers see the old file or the new one, never half
        except OSError as e:
            self._outage.failed("publishing", e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self._outage.ok("publishing")
        return True

    def unpublish(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def listing(self) -> dict[str, Hashable] | None:
        try:
            entries = list(os.scandir(self.dir))
        except OSError as e:
            self._outage.failed("listing", e)
            return None
        self._outage.ok("listing")
        out: dict[str, Hashable] = {}
        for ent in entries:
            pid = _instance_of(ent.name)
            if pid is None or pid == self.instance_id:
                continue
            try:
                st = ent.stat()
            except OSError:
                continue  # removed since the listing: a clean shutdown
            out[pid] = (st.st_mtime_ns, st.st_size)
        return out

    def fetch(self, instance_id: str) -> bytes | None:
        try:
            return (self.dir / (instance_id + PEER_SUFFIX)).read_bytes()
        except OSError as e:
            log.debug("kvbm tier %r: cannot read %s (%s)", self.tier, self.describe(instance_id), e)
            return None

    def knows(self, instance_id: str) -> bool:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            return False
        return (self.dir / (instance_id + PEER_SUFFIX)).exists()


class S3Rendezvous(Rendezvous):
    """Records are objects ``{prefix}/{namespace}/{instance_id}.kvbm-peer`` in a bucket."""

    remote: ClassVar[bool] = True

    def __init__(self, tier: str, cfg: RendezvousS3Config, namespace: str, instance_id: str,
                 min_refresh_s: float) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.folder = f"{cfg.prefix}/{namespace}/" if cfg.prefix else f"{namespace}/"
        super().__init__(tier, f"s3://{cfg.bucket}/{self.folder.rstrip('/')}", instance_id)
        try:
            check_name(namespace)
        except ValueError as e:
            raise ConfigError(f"tier {tier!r}: namespace {namespace!r}: {e}") from None
        self.key = self.folder + instance_id + PEER_SUFFIX
        self._client = _client(tier, cfg)
        self._known: frozenset[str] = frozenset()
        # ``knows`` may list again for an unknown reader, but only after this (monotonic):
        # a stream of requests from strangers must not become a stream of LISTs, nor,
        # while S3 fails, a stream of requests that each wait for their timeout.
        self._next_refresh = 0.0
        self._min_refresh_s = min_refresh_s
        self._refresh_lock = threading.Lock()
        # A PUT still in flight when the instance shuts down must not land after the
        # DELETE and bring the record back: both hold this lock, and none follows.
        self._record_lock = threading.Lock()
        self._unpublished = False

    def publish(self, blob: bytes) -> bool:
        with self._record_lock:
            if self._unpublished:
                return False
            try:
                self._client.put_object(Bucket=self.bucket, Key=self.key, Body=blob,
                                        ContentType="application/msgpack")
            except Exception as e:  # any failure of the store: the engine carries on
                self._outage.failed("publishing", e)
                return False
        self._outage.ok("publishing")
        return True

    def unpublish(self) -> None:
        with self._record_lock:
            self._unpublished = True
            self._delete()

    def _delete(self) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            log.warning("kvbm tier %r: removing s3://%s/%s failed (%s); readers ignore it "
                        "once its heartbeat is stale", self.tier, self.bucket, self.key, e)

    def listing(self) -> dict[str, Hashable] | None:
        out: dict[str, Hashable] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.folder, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    pid = _instance_of(str(obj["Key"])[len(self.folder):])
                    if pid is None or pid == self.instance_id:
                        continue
                    out[pid] = str(obj.get("ETag", "")).strip('"') or obj.get("LastModified")
        except Exception as e:
            self._next_refresh = time.monotonic() + max(2.0, 4 * self._min_refresh_s)
            self._outage.failed("listing", e)
            return None
        self._next_refresh = time.monotonic() + self._min_refresh_s
        self._outage.ok("listing")
        self._known = frozenset(out)
        return out

    def fetch(self, instance_id: str) -> bytes | None:
        key = self.folder + instance_id + PEER_SUFFIX
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None  # removed since the listing: a clean shutdown
            self._outage.failed("reading a peer record", e)
            return None

    def knows(self, instance_id: str) -> bool:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            return False
        if instance_id in self._known:
            return True
        # A reader that started after the last listing: look once more (rate-limited).
        with self._refresh_lock:
            if instance_id in self._known:
                return True
            if time.monotonic() < self._next_refresh:
                return False
            self.listing()
            return instance_id in self._known

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _client(tier: str, cfg: RendezvousS3Config) -> Any:
    """A boto3 S3 client with short timeouts and no retries (the next interval retries)."""
    try:
        import boto3  # noqa: F401  (s3_client imports it only when called)

        # The core's client builder, with its process-wide model loader: a second
        # client costs milliseconds.
        from kvbm.objectstore import s3_client
    except ImportError:
        raise PluginError(
            f"tier {tier!r}: key 'rendezvous_s3' needs boto3, which is not installed: "
            "pip install 'kvbm[s3]'"
        ) from None
    try:
        return s3_client(cfg, max_pool_connections=4)
    except Exception as e:  # a bad profile or region: the user's to fix, at start
        raise ConfigError(
            f"tier {tier!r}: key 'rendezvous_s3': cannot build an S3 client for "
            f"s3://{cfg.bucket} ({e}); check its endpoint_url, region and credentials"
        ) from None


def open_rendezvous(
    config: RemoteTierConfig, tier: str, namespace: str, instance_id: str
) -> Rendezvous | None:
    """The rendezvous ``config`` names (None with a peer list only); ConfigError or
    PluginError (with the pip command) when it cannot be used at all."""
    if config.rendezvous_s3 is not None:
        return S3Rendezvous(tier, config.rendezvous_s3, namespace, instance_id,
                            min_refresh_s=config.publish_interval_s / 2)
    if config.rendezvous_dir:
        return DirectoryRendezvous(tier, config.rendezvous_dir, namespace, instance_id)
    return None


def probe_rendezvous(config: RemoteTierConfig, tier: str, timeout_s: float) -> list[tuple[bool, str]]:
    """``kvbm config check --probe``: whether this instance could publish its record
    where ``config`` says, one (ok, line) per place; nothing is left behind."""
    if config.rendezvous_dir:
        return [_probe_dir(config.rendezvous_dir, tier)]
    if config.rendezvous_s3 is not None:
        return [_probe_s3(config.rendezvous_s3, tier, timeout_s)]
    return [(True, f"tier {tier!r}: peers listed by address; no rendezvous to touch")]


def _probe_dir(root: str, tier: str) -> tuple[bool, str]:
    where = f"tier {tier!r}: rendezvous_dir {root!r}"
    if not os.path.lexists(root):
        return True, f"{where}: does not exist yet; the first instance creates it"
    try:
        fd = open_directory(root, create=False)
    except UnsafePath as e:
        return False, f"{where}: {e}"
    except OSError as e:
        return False, f"{where}: cannot be opened ({e.strerror}); give a directory"
    name = f".kvbm-probe-{os.getpid()}{PEER_SUFFIX}"
    try:
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        os.close(f)
        os.unlink(name, dir_fd=fd)
    except OSError as e:
        return False, f"{where}: cannot create a record there ({e.strerror}); give a directory " \
                      "every instance may write"
    finally:
        os.close(fd)
    return True, f"{where}: a record file was created and removed"


def _probe_s3(cfg: RendezvousS3Config, tier: str, timeout_s: float) -> tuple[bool, str]:
    where = f"tier {tier!r}: rendezvous_s3 bucket {cfg.bucket!r}"
    try:
        short = cfg.model_copy(update={"connect_timeout_s": min(cfg.connect_timeout_s, timeout_s),
                                       "read_timeout_s": min(cfg.read_timeout_s, timeout_s)})
        client = _client(tier, short)
    except (PluginError, ConfigError) as e:
        return False, str(e)
    try:
        client.head_bucket(Bucket=cfg.bucket)
    except Exception as e:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) or type(e).__name__
        fix = {"404": "create it", "NoSuchBucket": "create it",
               "403": "check the credentials and the bucket's policy"}.get(
                   code, "check endpoint_url, the credentials and that the server runs")
        return False, f"{where}: {code}; {fix}"
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return True, f"{where}: HEAD answered with these credentials"
