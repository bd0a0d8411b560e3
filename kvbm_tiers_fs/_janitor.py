"""The janitor: a crashed writer's temporaries, and the budget of the whole directory.

Instances share the directory without a lock on the data path. Each one deletes the
files it wrote when its own policy evicts them, so one instance alone stays within
``capacity``; several together can pass it. A janitor pass walks the namespace
directory (or, with ``directory_budget``, every ``kvbm-*`` directory under ``path``),
sums the block files, and when the sum passes the budget removes the least recently
used ones (``atime``, which reads set; or ``mtime``) until ``low_water`` of the budget
is used. The same walk removes temporaries whose writer died on this host, and any
older than ``temp_max_age_s``.

A pass takes an advisory ``flock`` on ``.janitor.lock`` so that instances do not
walk the directory at once; where the filesystem has no locks (ENOLCK) it runs
anyway, and two passes removing one file cost an ENOENT, nothing more. A file
removed while another instance reads it stays readable through its open descriptor;
one removed before the open is a miss.

Memory: one small tuple per block file for the pass (a million files take about
150 MB for the seconds the pass runs).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ._paths import BLOCK_SUFFIX, DIR_FLAGS, JANITOR_LOCK, NOFOLLOW, NS_PREFIX, parse_temp

log = logging.getLogger("kvbm.fs")


@dataclass
class JanitorReport:
    """What one janitor pass saw and did."""

    #: False when another instance's pass held the lock (nothing was walked).
    ran: bool = False
    scope: str = "namespace"
    budget: int = 0
    #: Block files and their bytes found before anything was removed.
    files: int = 0
    bytes: int = 0
    removed_files: int = 0
    removed_bytes: int = 0
    temps_seen: int = 0
    temps_removed: int = 0
    errors: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for ``stats()``)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _File:
    when: int
    size: int
    base: int  # index of the walked top directory
    rel: str


class Janitor:
    """Runs janitor passes over one namespace directory (or the whole shared one)."""

    def __init__(self, tier: str, ns_fd: int, root: str, *, budget: int,
                 directory_budget: int | None, by: Literal["atime", "mtime"],
                 low_water: float, temp_max_age_s: float) -> None:
        self.tier = tier
        self.ns_fd = ns_fd
        self.root = root
        self.budget = budget
        self.directory_budget = directory_budget
        self.by = by
        self.low_water = low_water
        self.temp_max_age_s = temp_max_age_s
        self._lock = threading.Lock()
        # Set by stop(): a pass in progress ends at the next directory or file, so
        # the tier can close the descriptor the pass works through.
        self._stopped = threading.Event()

    def stop(self) -> None:
        """End any pass in progress (waiting for it to reach its next directory or
        file), and every later one at once."""
        self._stopped.set()
        with self._lock:
            pass

    # -- one pass -----------------------------------------------------------------------
    def run(self) -> JanitorReport:
        """One pass: temporaries first, then the budget. Never raises for a file that
        vanished or cannot be removed (counted in ``errors``)."""
        t0 = time.perf_counter()
        whole = self.directory_budget is not None
        budget = self.directory_budget if self.directory_budget is not None else self.budget
        rep = JanitorReport(scope="directory" if whole else "namespace", budget=budget)
        # One pass at a time in this process; another process's pass holds the flock.
        with self._lock, self._flock() as held:
            if not held or self._stopped.is_set():
                return rep
            rep.ran = True
            files: list[_File] = []
            tops = self._tops() if whole else [(self.ns_fd, False)]
            try:
                for i, (top, _) in enumerate(tops):
                    self._walk(i, top, rep, files)
                rep.files = len(files)
                rep.bytes = sum(f.size for f in files)
                if rep.bytes > budget:
                    self._shrink(tops, files, rep, budget)
            finally:
                for fd, owned in tops:
                    if owned:
                        os.close(fd)
        rep.seconds = time.perf_counter() - t0
        if rep.removed_files or rep.temps_removed:
            log.info("kvbm fs tier %r: janitor removed %d files (%d bytes) over the %s budget "
                     "of %d bytes and %d temporaries", self.tier, rep.removed_files,
                     rep.removed_bytes, rep.scope, budget, rep.temps_removed)
        return rep

    @contextlib.contextmanager
    def _flock(self) -> Iterator[bool]:
        if self._stopped.is_set():
            yield False  # the tier is closing: its directory descriptor may be gone
            return
        try:
            fd = os.open(JANITOR_LOCK, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600, dir_fd=self.ns_fd)
        except OSError as e:
            log.warning("kvbm fs tier %r: cannot open %s (%s); the janitor runs unlocked",
                        self.tier, JANITOR_LOCK, e)
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False  # another instance's pass is walking now
                return
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # No locks on this filesystem: passes may overlap, which is harmless.
            yield True
        finally:
            os.close(fd)

    def _tops(self) -> list[tuple[int, bool]]:
        """Every ``kvbm-*`` directory under the shared path that this user owns, opened
        (this tier's own first, by its held descriptor)."""
        out: list[tuple[int, bool]] = [(self.ns_fd, False)]
        mine = os.fstat(self.ns_fd)
        me = os.geteuid()
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("kvbm fs tier %r: janitor cannot open %r (%s); only this namespace "
                        "is counted", self.tier, self.root, e)
            return out
        try:
            for name in os.listdir(root):
                if not name.startswith(NS_PREFIX):
                    continue
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=root)
                except OSError:
                    continue  # a symlink, a file, or gone
                st = os.fstat(fd)
                if st.st_uid != me or (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.close(fd)
                    continue
                out.append((fd, True))
        finally:
            os.close(root)
        return out

    def _walk(self, index: int, top: int, rep: JanitorReport, files: list[_File]) -> None:
        now = time.time()
        use_atime = self.by == "atime"
        # fwalk opens each directory without following symlinks: a link planted in
        # the tree is never entered.
        for dirpath, _dirs, names, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            if self._stopped.is_set():
                return
            for name in names:
                is_block = name.endswith(BLOCK_SUFFIX)
                owner = None if is_block else parse_temp(name)
                if not is_block and owner is None:
                    continue
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    rep.errors += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if owner is not None:
                    rep.temps_seen += 1
                    dead = owner.is_dead_here() or now - st.st_mtime > self.temp_max_age_s
                    if dead and self._unlink(name, dfd, rep):
                        rep.temps_removed += 1
                    continue
                when = max(st.st_atime_ns, st.st_mtime_ns) if use_atime else st.st_mtime_ns
                rel = name if dirpath == "." else f"{dirpath[2:]}/{name}"
                files.append(_File(when, st.st_size, index, rel))

    def _shrink(self, tops: list[tuple[int, bool]], files: list[_File], rep: JanitorReport,
                budget: int) -> None:
        target = int(budget * self.low_water)
        total = rep.bytes
        files.sort(key=lambda f: f.when)
        for f in files:
            if total <= target or self._stopped.is_set():
                break
            if self._unlink(f.rel, tops[f.base][0], rep):
                rep.removed_files += 1
                rep.removed_bytes += f.size
            # Gone already (another pass, its writer's eviction) frees the bytes too.
            total -= f.size

    def _unlink(self, rel: str, dir_fd: int, rep: JanitorReport) -> bool:
        try:
            os.unlink(rel, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            rep.errors += 1
            log.warning("kvbm fs tier %r: janitor cannot remove %s (%s)", self.tier, rel, e)
            return False


class JanitorThread(threading.Thread):
    """Runs ``pass_`` at once and then every ``interval_s`` until ``stop()``."""

    def __init__(self, name: str, pass_: Callable[[], object], interval_s: float) -> None:
        super().__init__(name=f"kvbm-{name}-janitor", daemon=True)
        self._pass = pass_
        self._interval = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Pass, wait, pass … ; a failing pass is logged and the next one runs on time."""
        while not self._stop_event.is_set():
            try:
                self._pass()
            except Exception as e:  # the thread must outlive one bad pass
                log.warning("kvbm fs janitor %r: pass failed (%s)", self.name, e)
            self._stop_event.wait(self._interval)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the thread to end and wait for the pass in progress (at most ``timeout``
        seconds; None: until it ends)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
