"""The fs tier: one file per block in a directory many instances share.

Files (see ``_paths``): ``<path>/kvbm-<namespace>/ab/cd/<key>.kvb``, each the core's
block header page (``kvbm.blockfile``: key, namespace and layout digests, length,
checksum) followed by the block's bytes padded to a page. Any instance with the same
model, layout and TP rank finds what another wrote: the planner asks ``probe`` for
the keys its registry lacks and adopts the leading hits, as for the s3 tier.

Writes go to a temporary in the block's own directory and are published by
``rename``, which replaces a name atomically: a reader opens either the whole old
file, the whole new one, or nothing, never a torn block. A second writer of the same
key finds the file there and skips it; two writing at once both rename a complete
file, and the last one wins. A writer killed mid-write leaves only its temporary,
which the janitor removes (at once when the writer died on this host, else by age).

Reads open the file (no symlink followed), check it is a regular file of this user
and of the right size, read header and data in one ``preadv`` straight into the
destination (through a bounce buffer only when the destination is not aligned for
O_DIRECT), then check the header names this key, namespace and layout and the
checksum matches. Anything else is a miss, counted; a file that fails its checks is
removed so the next writer can replace it. A file that vanished (evicted by its
writer, removed by a janitor) is a miss.

The slots the planner hands this tier are only indices into its registry: the tier
keeps which key each slot it wrote holds, so that ``discard`` deletes the files this
instance wrote when its policy evicts them, and nothing else (blocks adopted from
other instances are theirs to evict, or the janitor's).

``recover`` reports nothing: a restarted instance finds blocks by ``probe``, like any
other instance, and the files it wrote before the restart are no longer its own to
evict; the janitor ages them out with the rest.

O_DIRECT is used where a test file at start accepts it (``o_direct: auto``); the
answer is in ``stats()`` and ``kvbm_tiers_fs.probe.probe_directory`` gives it for a
path before any tier starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

from kvbm.blockfile import (
    HEADER_BYTES,
    PAGE,
    BlockHeader,
    block_checksum,
    pack_header,
    padded_bytes,
    round_up,
    unpack_header,
)
from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty
from kvbm.tier import Tier, TierContext

from ._janitor import Janitor, JanitorReport, JanitorThread
from ._paths import NOFOLLOW, block_name, check_subdir, open_namespace_dir, prepare_root, temp_name
from .config import FsTierConfig
from .probe import O_DIRECT, detect_o_direct, filesystem_of

__all__ = ["FsTier"]

log = logging.getLogger("kvbm.fs")

_COUNTERS = (
    "blocks_written", "bytes_written", "put_exists", "write_errors", "enospc",
    "blocks_read", "bytes_read", "missing_files", "read_errors", "refused_files",
    "bad_files", "checksum_failures", "header_mismatches", "bad_files_removed",
    "probe_hits", "probe_misses", "files_deleted",
)


class _ThreadBuffers(threading.local):
    """Per-thread aligned buffers: a header page and a bounce buffer for odd callers."""

    header: np.ndarray | None = None
    bounce: np.ndarray | None = None


class FsTier(Tier):
    """Blocks as files in a shared directory, found by every instance of the namespace."""

    kind: ClassVar[str] = "fs"
    #: A shared filesystem is neither this machine's disk nor an object store: vLLM's
    #: events and Dynamo's metrics count it as storage below host memory.
    medium: ClassVar[str] = "STORAGE"
    #: Other instances write into the same directory; ``probe`` finds their blocks.
    shared: ClassVar[bool] = True

    def __init__(self, config: FsTierConfig, ctx: TierContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self.file_bytes = padded_bytes(self.block_bytes)
        self._stride = round_up(self.block_bytes)
        self._ns = ctx.namespace.digest
        self._layout = bytes.fromhex(ctx.layout.digest)
        self._uid = os.geteuid()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_log: dict[str, float] = {}
        self._tls = _ThreadBuffers()
        self._pad = np.zeros(PAGE, np.uint8)
        # key -> slot of every file this instance wrote and still holds in its registry.
        self._owned: dict[bytes, int] = {}
        self._dirs_ok: set[str] = set()
        self._closed = False
        self.root = prepare_root(self.name, config.path)
        self.directory, self._dir_fd = open_namespace_dir(self.name, self.root, ctx.namespace.hex)
        try:
            self.o_direct, self.o_direct_reason = self._decide_o_direct()
            self._read_flags = os.O_RDONLY | NOFOLLOW | (O_DIRECT if self.o_direct else 0)
            self.filesystem = filesystem_of(str(self.directory))[0]
            self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix=f"kvbm-{self.name}")
            self._probes = ThreadPoolExecutor(min(8, config.io_threads),
                                              thread_name_prefix=f"kvbm-{self.name}-probe")
            budget = config.capacity if config.capacity is not None else (
                self.num_slots * self.file_bytes)
            self._janitor = Janitor(
                self.name, self._dir_fd, str(self.root), budget=budget,
                directory_budget=config.directory_budget, by=config.janitor_by,
                low_water=config.janitor_low_water, temp_max_age_s=config.temp_max_age_s)
            self.janitor_passes = 0
            self.last_janitor = JanitorReport()
            self._janitor_thread: JanitorThread | None = None
            if config.janitor:
                self._janitor_thread = JanitorThread(self.name, self.janitor,
                                                     config.janitor_interval_s)
                self._janitor_thread.start()
        except BaseException:
            os.close(self._dir_fd)
            raise

    def _decide_o_direct(self) -> tuple[bool, str]:
        mode = self.cfg.o_direct
        if mode == "off":
            return False, "off in config (o_direct: off)"
        ok, why = detect_o_direct(self._dir_fd)
        if mode == "on" and not ok:
            raise ConfigError(
                f"fs tier {self.name!r}: key 'o_direct': on, but {str(self.directory)!r} "
                f"refuses it ({why}); set o_direct: auto (buffered where refused) or off"
            )
        if not ok:
            log.info("kvbm fs tier %r: O_DIRECT refused in %s (%s); buffered I/O",
                     self.name, self.directory, why)
        return ok, why

    # -- counters, buffers, names ---------------------------------------------------
    def _add(self, **kv: int) -> None:
        with self._lock:
            for k, v in kv.items():
                self._counts[k] += v

    def _fault(self, counter: str, err: BaseException | None, msg: str, *args: Any) -> None:
        extra = {counter: 1}
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            extra["enospc"] = 1
        self._add(**extra)
        now = time.monotonic()
        if now - self._last_log.get(counter, 0.0) >= 1.0:
            self._last_log[counter] = now
            why = f" ({err})" if err is not None else ""
            log.warning("kvbm fs tier %r: " + msg + why + "; counted as %s",
                        self.name, *args, counter)

    def _header_buf(self) -> np.ndarray:
        b = self._tls.header
        if b is None:
            b = self._tls.header = aligned_empty(HEADER_BYTES)
        return b

    def _bounce(self) -> np.ndarray:
        b = self._tls.bounce
        if b is None:
            # Zeroed once: the padding past block_bytes stays zero for every write.
            b = self._tls.bounce = aligned_empty(self._stride)
        return b

    def _direct_ok(self, a: np.ndarray) -> bool:
        """Whether ``a`` (flat, contiguous) can be handed to the kernel as it is."""
        if not self.o_direct:
            return True
        return a.ctypes.data % PAGE == 0 and a.nbytes % PAGE == 0

    def path_of(self, key: bytes) -> str:
        """The file of block ``key``, relative to ``self.directory``."""
        d, f = block_name(bytes(key), self.cfg.fanout)
        return f"{d}/{f}" if d else f

    def _subdir(self, d: str, create: bool) -> bool:
        if d in self._dirs_ok:
            return True
        if not check_subdir(self._dir_fd, d, create):
            return False
        with self._lock:
            self._dirs_ok.add(d)
        return True

    def _run(self, fn: Callable[[int], bool], count: int) -> list[bool]:
        """``fn(i)`` for every block ``i`` of a batch, ``io_threads`` files in flight."""
        if count == 1 or self.cfg.io_threads == 1:
            return [fn(i) for i in range(count)]
        return list(self._pool.map(fn, range(count)))

    # -- writes -------------------------------------------------------------------------
    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        """Publish each block as its own file (temporary, then rename); False where it failed."""
        ok = self._run(lambda i: self._write_one(slots[i], bytes(keys[i]), src[i]), len(slots))
        good = sum(ok)
        self._add(blocks_written=good, bytes_written=good * self.block_bytes)
        return ok

    def _write_one(self, slot: int, key: bytes, src: np.ndarray) -> bool:
        d, f = block_name(key, self.cfg.fanout)
        rel = f"{d}/{f}" if d else f
        fd_ = self._dir_fd
        try:
            st = os.stat(rel, dir_fd=fd_, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size == self.file_bytes and st.st_uid == self._uid:
                # Another instance (or an earlier write of ours) published it: a read
                # checks it, and a bad one is removed for the next writer to replace.
                self._add(put_exists=1)
                return True
        except FileNotFoundError:
            pass
        except OSError as e:
            self._fault("write_errors", e, "stat of %s failed", rel)
            return False
        tmp = None
        try:
            flat = src.reshape(-1)
            if flat.nbytes != self.block_bytes:
                raise ValueError(f"block of {flat.nbytes} bytes, expected {self.block_bytes}")
            self._subdir(d, create=True)
            hdr = self._header_buf()
            pack_header(hdr.data, BlockHeader(
                key, self._ns, self._layout, self.block_bytes, block_checksum(flat),
                time.time_ns(), 0))
            pad = self._stride - self.block_bytes
            if not self._direct_ok(flat):
                buf = self._bounce()
                np.copyto(buf[: self.block_bytes], flat)
                bufs = [hdr.data, buf.data]
            elif pad:
                # Buffered only (O_DIRECT took the bounce buffer above).
                bufs = [hdr.data, flat.data, self._pad[:pad].data]
            else:
                bufs = [hdr.data, flat.data]
            tmp = f"{d}/{temp_name(key)}" if d else temp_name(key)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
            if self.o_direct:
                flags |= O_DIRECT
            fd = os.open(tmp, flags, 0o600, dir_fd=fd_)
            try:
                _pwrite_all(fd, bufs, self.file_bytes)
                if self.cfg.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # The publication: a reader sees the whole file under this name, or none.
            os.rename(tmp, rel, src_dir_fd=fd_, dst_dir_fd=fd_)
        except (OSError, ValueError) as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd_)
            self._fault("write_errors", e, "write of %s failed", rel)
            return False
        with self._lock:
            self._owned[key] = slot
        return True

    # -- reads --------------------------------------------------------------------------
    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        """Fill ``dst[i]`` from block ``keys[i]``'s file; False where it is absent or not intact."""
        ok = self._run(lambda i: self._read_one(bytes(keys[i]), dst[i]), len(keys))
        good = sum(ok)
        self._add(blocks_read=good, bytes_read=good * self.block_bytes)
        return ok

    def _read_one(self, key: bytes, dst: np.ndarray) -> bool:
        d, f = block_name(key, self.cfg.fanout)
        rel = f"{d}/{f}" if d else f
        try:
            if d not in self._dirs_ok and not self._subdir(d, create=False):
                self._add(missing_files=1)
                return False
            fd = os.open(rel, self._read_flags, dir_fd=self._dir_fd)
        except FileNotFoundError:
            self._add(missing_files=1)  # never written here, evicted, or a janitor's
            return False
        except OSError as e:
            counter = "refused_files" if e.errno == errno.ELOOP else "read_errors"
            self._fault(counter, e, "open of %s failed", rel)
            return False
        try:
            return self._read_fd(fd, key, rel, dst)
        finally:
            os.close(fd)

    def _read_fd(self, fd: int, key: bytes, rel: str, dst: np.ndarray) -> bool:
        bb = self.block_bytes
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self._uid:
                self._fault("refused_files", None, "%s is not a regular file of uid %d", rel,
                            self._uid)
                return False
            if st.st_size != self.file_bytes:
                self._bad(rel, st, "size %d, expected %d", st.st_size, self.file_bytes)
                return False
            flat = dst.reshape(-1)
            if flat.nbytes != bb:
                raise ValueError(f"buffer of {flat.nbytes} bytes, expected {bb}")
            # reshape(-1) of a contiguous array is a view: the kernel fills dst itself.
            direct = dst.flags.c_contiguous and self._direct_ok(flat)
            # Through the bounce buffer, O_DIRECT reads the padded page run; buffered I/O
            # only the block.
            # Through the bounce buffer O_DIRECT reads the padded page run, buffered I/O
            # only the block.
            buf = flat if direct else self._bounce() if self.o_direct else self._bounce()[:bb]
            hdr = self._header_buf()
            got = _pread_all(fd, [hdr.data, buf.data], HEADER_BYTES + buf.nbytes)
        except (OSError, ValueError) as e:
            self._fault("read_errors", e, "read of %s failed", rel)
            return False
        if got != HEADER_BYTES + buf.nbytes:
            self._bad(rel, st, "read %d of %d bytes", got, HEADER_BYTES + buf.nbytes)
            return False
        h = unpack_header(hdr.data)
        if h is None or h.key != key or h.namespace != self._ns or h.layout != self._layout or (
            h.length != bb
        ):
            self._add(header_mismatches=1)
            self._bad(rel, st, "its header does not name this block, namespace and layout")
            return False
        if block_checksum(buf[:bb]) != h.checksum:
            self._add(checksum_failures=1)
            self._bad(rel, st, "its bytes fail their checksum")
            return False
        if not direct:
            np.copyto(dst, buf[:bb].view(dst.dtype).reshape(dst.shape))
        self._touch(fd, st)
        return True

    def _touch(self, fd: int, st: os.stat_result) -> None:
        """Set the file's atime to now (mtime kept) so the janitor removes the least
        recently read first, on noatime mounts too; at most once per touch_interval_s."""
        now = time.time_ns()
        if now - st.st_atime_ns < self.cfg.touch_interval_s * 1e9:
            return
        with contextlib.suppress(OSError):
            os.utime(fd, ns=(now, st.st_mtime_ns))

    def _bad(self, rel: str, st: os.stat_result, why: str, *args: Any) -> None:
        """A file under a block's name that is not that block: a miss; remove it (if it is
        still the file that was read) so that the next writer can replace it."""
        self._fault("bad_files", None, "%s is not intact (" + why + "); treated as a miss",
                    rel, *args)
        try:
            now = os.stat(rel, dir_fd=self._dir_fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(rel, dir_fd=self._dir_fd)
                self._add(bad_files_removed=1)
        except OSError:
            pass

    # -- probe --------------------------------------------------------------------------
    def _exists(self, key: SequenceHash) -> bool:
        try:
            st = os.stat(self.path_of(key), dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.file_bytes and st.st_uid == self._uid

    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        """Which leading keys have a file; stops at the first miss.

        One ``stat`` per key, in waves that start at one (most probes are for prompts
        never stored) and double while every answer is a hit.
        """
        n = len(keys)
        out = [False] * n
        i, wave = 0, 1
        while i < n:
            batch = list(keys[i : i + wave])
            answers = ([self._exists(batch[0])] if len(batch) == 1
                       else list(self._probes.map(self._exists, batch)))
            for a in answers:
                if not a:
                    break
                out[i] = True
                i += 1
            else:
                wave = min(wave * 2, 64)
                continue
            break
        hits = out.count(True)
        self._add(probe_hits=hits, probe_misses=1 if hits < n else 0)
        return out

    # -- eviction and the janitor ---------------------------------------------------------
    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """Delete the files of evicted blocks this instance wrote (others' stay).

        The unlinks run on the I/O pool: discard is called from match paths.
        """
        doomed: list[bytes] = []
        with self._lock:
            for s, k in zip(slots, keys, strict=True):
                kb = bytes(k)
                if self._owned.get(kb) == s:
                    del self._owned[kb]
                    doomed.append(kb)
        if doomed and not self._closed:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: close() raced
                self._pool.submit(self._delete, doomed)

    def _delete(self, keys: list[bytes]) -> None:
        n = 0
        for k in keys:
            with self._lock:
                if k in self._owned:
                    continue  # written again since it was evicted: it is held once more
            try:
                os.unlink(self.path_of(k), dir_fd=self._dir_fd)
                n += 1
            except FileNotFoundError:
                pass  # a janitor or a bad read removed it already
            except OSError as e:
                self._fault("write_errors", e, "delete of %s failed", self.path_of(k))
        self._add(files_deleted=n)

    def janitor(self) -> JanitorReport:
        """Run one janitor pass now (temporaries, then the budget); returns its report."""
        rep = self._janitor.run()
        with self._lock:
            self.janitor_passes += 1
            self.last_janitor = rep
        return rep

    # -- the rest of the contract ---------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters, the I/O mode found at start and the last janitor pass."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["owned_files"] = len(self._owned)
            out["janitor_passes"] = self.janitor_passes
            out["janitor"] = self.last_janitor.as_dict()
        out["owned_bytes"] = out["owned_files"] * self.file_bytes
        out.update(
            directory=str(self.directory),
            filesystem=self.filesystem,
            o_direct=self.o_direct,
            o_direct_reason=self.o_direct_reason,
            file_bytes=self.file_bytes,
            io_threads=self.cfg.io_threads,
        )
        return out

    def close(self) -> None:
        """Stop the janitor, finish queued deletes, close the directory."""
        if self._closed:
            return
        self._closed = True
        # A pass in progress stops at its next directory; the thread is joined before
        # the descriptor every pass works through is closed.
        self._janitor.stop()
        if self._janitor_thread is not None:
            self._janitor_thread.stop(timeout=None)
        self._probes.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)


def _pwrite_all(fd: int, bufs: list[memoryview], total: int) -> None:
    """Write ``bufs`` at offset 0: one ``pwritev``, more only if the kernel wrote less."""
    n = os.pwritev(fd, bufs, 0)
    if n == total:
        return
    views = [b.cast("B") for b in bufs]
    off = 0
    while views:
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {n} bytes at offset {off}")
        off += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
        if views:
            n = os.pwritev(fd, views, off)
    if off != total:
        raise OSError(errno.EIO, f"wrote {off} bytes, expected {total}")


def _pread_all(fd: int, bufs: list[memoryview], total: int) -> int:
    """Fill ``bufs`` from offset 0: one ``preadv``, more only if the kernel returned less;
    returns the bytes read (less than ``total`` only at the end of the file)."""
    n = os.preadv(fd, bufs, 0)
    if n == total or n <= 0:
        return max(n, 0)
    views = [b.cast("B") for b in bufs]
    off = 0
    while views and n > 0:
        off += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
        if views:
            n = os.preadv(fd, views, off)
    return off
