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

Faults (``_requests``). Transport errors, timeouts, 5xx and throttling answers are
retried within ``request_deadline_s``, then count as a miss or a skipped write. A
circuit breaker opened by consecutive failures turns every request into an immediate
miss until a trial request succeeds, so a dead server costs the engine no time per
step and service resumes by itself.

Memory. Everything the tier remembers is bounded: the existence cache
(``_existence``), the marks of copies that failed their check, and, only with
``delete_on_evict``, the book of packs it may delete (``_packbook``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import botocore.exceptions as bexc
import numpy as np

from kvbm.foreground import request_pause
from kvbm.hashing import SequenceHash
from kvbm.objectstore import redact_url
from kvbm.tier import Tier, TierContext

from ._existence import ExistenceCache, Loc, RecentKeys
from ._packbook import PackBook
from ._requests import (
    BadObject,
    Counters,
    Exists,
    Missing,
    Redirect,
    Refused,
    Requests,
    error_code,
    short,
)
from ._setup import check_bucket, make_client
from ._wire import BlockBody, get_blocks, head_meta
from .breaker import OPEN
from .config import S3TierConfig
from .objects import MetaCodec, ObjectMeta, PackPointer, checksum

__all__ = ["S3Tier"]

log = logging.getLogger("kvbm.s3")

#: How long ``close`` lets background requests finish before it cuts them.
_CLOSE_GRACE_S = 0.5

_COUNTERS = (
    "puts", "put_bytes", "put_exists", "put_failures", "gets", "get_bytes", "get_misses",
    "get_failures", "checksum_failures", "bad_objects", "truncated", "heads", "probe_hits",
    "probe_cache_hits", "retries", "transient_errors", "timeouts", "deadline_exceeded",
    "deletes", "refused", "pointer_puts", "pointer_failures", "pointer_redirects",
)


class S3Tier(Tier):
    """Blocks as objects in one bucket, keyed by namespace and sequence hash."""

    kind: ClassVar[str] = "s3"
    #: KV events and metrics name an object store as such.
    medium: ClassVar[str] = "OBJECT"
    #: Other instances upload into the same bucket; ``probe`` finds their blocks.
    shared: ClassVar[bool] = True
    cascade_part_blocks: ClassVar[int] = 0  # parts would drain the requests in flight

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
        self._cache = ExistenceCache(config.exist_cache_size, config.negative_ttl_s)
        self._cond = config.conditional_put
        # Keys whose stored object failed its check: the next write replaces it
        # instead of trusting a conditional put that would keep the bad copy.
        self._bad = RecentKeys(max(1024, config.exist_cache_size))
        # Without deletion nothing needs to know which packs are ours.
        self._book = PackBook(ctx.num_slots, self.object_key) if config.delete_on_evict else None
        self._lock = threading.Lock()
        self._last_warn = -1e9
        self._counts = Counters(_COUNTERS)
        self._req = Requests(config, self.name, self._where, self._counts)
        self._client = make_client(config, self.name, self._where)
        self._deadline_enforced = self._req.watch(self._client)
        c = config.max_concurrency
        self._reads = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-r")
        self._writes = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-w")
        # Pointer PUTs run beside the pack PUTs that wait on them, never in their pool
        # (a pool waiting on itself can deadlock when every worker waits).
        self._pointers = ThreadPoolExecutor(c, thread_name_prefix=f"kvbm-{self.name}-p")
        check_bucket(self._client, config, self.name, self._where, self._req)

    # -- names and counters ----------------------------------------------------
    def object_key(self, key: SequenceHash) -> str:
        """The object name of a block stored on its own (or first in its pack)."""
        return self._key_prefix + key.hex()

    def _inc(self, name: str, n: int = 1) -> None:
        self._counts.inc(name, n)

    def _warn(self, msg: str, *args: Any) -> None:
        """A warning at most every 5 s: a dead server must not flood the log."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_warn < 5.0:
                return
            self._last_warn = now
        log.warning("kvbm s3 tier %r: " + msg, self.name, *args)

    # -- reads ----------------------------------------------------------------
    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        """Fill ``dst[i]`` with block ``keys[i]``: one GET per object, checksums checked."""
        ok = [False] * len(keys)
        if not keys:
            return ok
        groups: dict[str, list[tuple[int, int]]] = {}
        counts: dict[str, int] = {}
        for i, k in enumerate(keys):
            # Unknown blocks are looked for under their own name, as single objects.
            loc = self._cache.get(k) or Loc(self.object_key(k), 0, 1)
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
        if self._book is not None:
            for i, good in enumerate(ok):
                if good:
                    self._book.hold(keys[i], slots[i])
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
        get = functools.partial(
            get_blocks, self._client, self._bucket, obj, self._codec, members, count, keys, dst,
            follow=follow, zero_copy=self.cfg.zero_copy_reads,
        )
        out = [False] * len(members)
        self._inc("gets")
        try:
            meta = self._req.call(get)
        except Refused:
            return out
        except Redirect as e:
            ptr = e.pointer
            self._inc("pointer_redirects")
            # The pack's own metadata (returned with the ranged GET) is what the bytes
            # are checked against, and that it holds this block at this position.
            return self._read_object(self.object_key(ptr.pack), [(ptr.pos, i) for _, i in members],
                                     ptr.count, keys, dst, follow=False)
        except Missing:
            self._inc("get_misses", len(members))
            for _, i in members:
                self._cache.drop(keys[i])
            return out
        except BadObject as e:
            self._inc("bad_objects")
            self._report_bad(obj, str(e), [keys[i] for _, i in members])
            return out
        except Exception as e:
            self._inc("get_failures")
            self._warn("GET %s failed (%s); treated as a miss", obj, short(e))
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
                self._cache.put(k, Loc(obj, pos, meta.count))
        return out

    def _report_bad(self, obj: str, why: str, keys: list[SequenceHash]) -> None:
        log.warning("kvbm s3 tier %r: object %s is not intact (%s); treated as a miss",
                    self.name, obj, why)
        self._bad.add_all(keys)
        for k in keys:
            self._cache.drop(k)

    # -- writes ---------------------------------------------------------------
    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        """Store the blocks, ``pack_blocks`` consecutive ones per object."""
        n = len(keys)
        if not n:
            return []
        p = self.cfg.pack_blocks
        groups = [list(range(s, min(s + p, n))) for s in range(0, n, p)]
        pause = request_pause()  # a cascade's write: each PUT first lets loads go by

        def put(g: list[int]) -> bool:
            if pause is not None:
                pause()
            return self._write_object(g, keys, src)
        results = [put(groups[0])] if len(groups) == 1 else list(self._writes.map(put, groups))
        ok = [False] * n
        for g, good in zip(groups, results, strict=True):
            for i in g:
                ok[i] = good
        if self._book is not None:
            for i, good in enumerate(ok):
                if good:
                    self._book.hold(keys[i], slots[i])
        return ok

    def _write_object(
        self, members: list[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> bool:
        """One PUT of the blocks ``members`` (batch indices) as one object."""
        gkeys = [keys[i] for i in members]
        obj = self.object_key(gkeys[0])
        count = len(gkeys)
        overwrite = self._bad.any_of(gkeys)
        if not overwrite and all(self._cache.get(k) is not None for k in gkeys):
            self._inc("put_exists")  # another instance's upload, seen by probe or read
            return True
        sums = [checksum(src[i]) for i in members]
        meta = self._codec.encode(gkeys, sums)
        # A block goes out from its own memory (``BlockBody``); a pack is joined first.
        data = src[members[0]].data if count == 1 else memoryview(
            b"".join(src[i].data for i in members))
        size = data.nbytes

        def put(conditional: bool) -> None:
            kw: dict[str, Any] = {}
            if conditional:
                kw["IfNoneMatch"] = "*"
            self._client.put_object(
                Bucket=self._bucket, Key=obj, Body=BlockBody(data), Metadata=meta,
                ContentType="application/octet-stream", **kw,
            )

        try:
            cond = self._cond
            if overwrite or cond == "off":
                self._req.call(lambda: put(False))
            elif cond in ("auto", "if_none_match"):
                try:
                    self._req.call(lambda: put(True))
                except bexc.ClientError as e:
                    code, status = error_code(e)
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
                    raise Exists()
                self._req.call(lambda: put(False))
        except Exists:
            self._inc("put_exists")
            if count > 1:
                return self._write_rest_of_pack(obj, members, keys, src)
            # The name is taken, by this block alone, by a pack starting with it or by
            # a pointer: where the block lives is not known, so nothing is cached (a
            # read or probe finds it under its name; an eviction looks before deleting).
            self._cache.drop(gkeys[0])
            return True
        except Refused:
            return False
        except Exception as e:
            self._inc("put_failures")
            self._warn("PUT %s failed (%s); write skipped", obj, short(e))
            return False
        self._inc("puts")
        self._inc("put_bytes", size)
        if overwrite:
            self._bad.remove_all(gkeys)
        doomed: list[str] = []
        if self._book is not None:
            self._book.claim(gkeys[0])
        if count > 1:
            created = self._write_pointers(gkeys, sums, overwrite) if self.cfg.pack_pointers else []
            if self._book is not None:
                doomed = self._book.wrote(obj, gkeys, created)
        for j, k in enumerate(gkeys):
            self._cache.put(k, Loc(obj, j, count))
        if doomed:
            self._writes.submit(self._delete, doomed, [])
        return True

    def _write_pointers(
        self, gkeys: list[SequenceHash], sums: list[int], overwrite: bool
    ) -> list[str]:
        """An empty pointer object under the name of each block of a pack but the
        first, so a probe or read that starts mid-pack finds it. A pointer that fails
        costs only that: the block stays in the pack, found from its first block.
        Returns the names of the pointers this call created."""
        jobs = [(gkeys[j], sums[j], j) for j in range(1, len(gkeys))]
        made = list(self._pointers.map(
            lambda job: self._write_pointer(job[0], job[1], gkeys[0], job[2], len(gkeys), overwrite),
            jobs,
        ))
        return [self.object_key(k) for (k, _, _), m in zip(jobs, made, strict=True) if m]

    def _write_pointer(
        self, key: SequenceHash, sum_: int, pack: SequenceHash, pos: int, count: int,
        overwrite: bool,
    ) -> bool:
        """One pointer PUT; True if it created the object (a name already taken by
        another object, or a failure, is False)."""
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
                self._req.call(lambda: put(False))
            elif self._cond in ("auto", "if_none_match"):
                # Never replace what the name already leads to: a block stored alone,
                # another pack (whose pointers may name it), or another pointer.
                self._req.call(lambda: put(True))
            else:
                if self._head(obj, key) is not None:
                    raise Exists()
                self._req.call(lambda: put(False))
        except (Exists, Refused):
            return False
        except Exception as e:
            self._inc("pointer_failures")
            self._warn("PUT of pointer %s failed (%s); the block is found only from its "
                       "pack's first block", obj, short(e))
            return False
        self._inc("pointer_puts")
        if self._book is not None:
            self._book.claim(key)
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
            self._cache.put(meta.key, Loc(self.object_key(meta.pack), meta.pos, meta.count))
            held = {meta.key}
        else:
            for j, k in enumerate(meta.keys):
                self._cache.put(k, Loc(obj, j, meta.count))
            held = set(meta.keys)
        rest = [i for i in members if keys[i] not in held]
        return self._write_object(rest, keys, src) if rest else True

    # -- probe ----------------------------------------------------------------
    def _head(self, obj: str, key: SequenceHash) -> ObjectMeta | PackPointer | None:
        """The metadata of the object named after ``key`` (a block, a pack starting
        with it, or a pointer to the pack holding it); None if absent or not ours."""
        head = functools.partial(head_meta, self._client, self._bucket, obj, key, self._codec)
        self._inc("heads")
        try:
            return self._req.call(head)
        except Missing:
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
            if self._cache.is_missing(keys[i]) or self._req.breaker.state == OPEN:
                break
            batch: list[int] = []
            j = i
            while j < n and len(batch) < wave:
                if self._cache.is_missing(keys[j]):
                    break
                if self._cache.get(keys[j]) is None:
                    batch.append(j)
                j += 1
            if len(batch) == 1:
                # The common wave (a match's first unknown block): sent from this thread.
                # A hop through the read pool and back costs the match two thread
                # wake-ups, each waiting for the GIL while uploads run (about 10 ms of a
                # 36 ms probe under `kvbm bench --local s3`).
                answers = [self._probe_one(keys[batch[0]])]
            else:
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
        if self._book is not None:
            # The manager may adopt what a probe finds: its pack must stay.
            for k, found in zip(keys, out, strict=True):
                if found:
                    self._book.hold(k, None)
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
            self._cache.put(k, Loc(obj, j, meta.count))
        return meta.count

    # -- eviction -------------------------------------------------------------
    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """Delete evicted blocks' objects if ``delete_on_evict``; else keep them.

        Without deletion the objects stay (the bucket's lifecycle rules age them
        out) and a later probe may adopt them again. With it, an object holding only
        the evicted block goes; a pack this instance wrote goes with its pointers
        once none of its blocks is held; a pack another instance wrote stays, since
        this instance may hold its other blocks.
        """
        if self._book is None or not keys:
            return
        doomed: list[str] = []
        unsure: list[SequenceHash] = []
        for slot, k in zip(slots, keys, strict=True):
            objs = self._book.release(k, slot)
            if objs is not None:
                doomed += objs
                continue
            loc = self._cache.get(k)
            if loc is None:
                unsure.append(k)  # what its name holds is forgotten: look before deleting
            elif loc.count == 1 and loc.obj == self.object_key(k):
                doomed.append(loc.obj)
        for k in keys:
            self._cache.drop(k)
        if doomed or unsure:
            # Deletion runs on the write pool: discard is called from match paths.
            self._writes.submit(self._delete, doomed, unsure)

    def _delete(self, objs: list[str], unsure: list[SequenceHash]) -> None:
        """Delete ``objs``, and the objects named after ``unsure`` keys that hold that
        block alone (never a pack: other blocks may live in it)."""
        objs = list(objs)
        for k in unsure:
            obj = self.object_key(k)
            try:
                meta = self._head(obj, k)
            except Exception as e:
                self._warn("HEAD %s before its delete failed (%s); object kept", obj, short(e))
                continue
            if isinstance(meta, ObjectMeta) and meta.count == 1:
                objs.append(obj)
        for s in range(0, len(objs), 1000):
            part = objs[s : s + 1000]
            req = functools.partial(
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": o} for o in part], "Quiet": True},
            )
            try:
                self._req.call(req)
                self._inc("deletes", len(part))
            except Exception as e:
                self._warn("delete of %d objects failed (%s)", len(part), short(e))

    # -- the rest -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Request, byte and fault counters, the breaker and the caches."""
        out: dict[str, Any] = dict(self._counts.snapshot())
        breaker = self._req.breaker
        out["breaker_state"] = breaker.state
        out["breaker_opens"] = breaker.opens
        out["exist_cache_entries"] = len(self._cache)
        out["conditional_put"] = self._cond
        out["deadline_enforced"] = self._deadline_enforced
        if self._book is not None:
            out["packs_tracked"] = len(self._book)
            out["packs_forgotten"] = self._book.forgotten
        return out

    def close(self) -> None:
        """Let background writes and deletes finish for a moment, cut the rest, release all.

        The manager (and a vLLM worker) has given the cascade ``close_timeout_s``
        already; a healthy server finishes what is left (deletes of evicted blocks) in
        milliseconds, so the tier waits at most ``_CLOSE_GRACE_S`` more, then cuts the
        requests still running on a slow or hung server (their blocks are not stored).
        """
        pools = (self._reads, self._writes, self._pointers)
        for pool in pools:
            pool.shutdown(wait=False)
        deadline = time.monotonic() + _CLOSE_GRACE_S
        for pool in pools:
            for t in list(getattr(pool, "_threads", ())):
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._req.close()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
