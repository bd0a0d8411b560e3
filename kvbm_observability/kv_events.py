"""KV events for routers: block stored / removed, published over ZMQ in vLLM's format.

A KV-aware router (vLLM's examples, Dynamo's KV router, llm-d) subscribes to each
instance's events and keeps a prefix index of which instance holds which blocks. This
module turns the manager's ``BlockEvent`` batches into the messages vLLM's
``ZmqEventPublisher`` sends, so the same subscriber code reads kvbm:

* one ZMQ multipart message per batch: ``(topic, seq, payload)`` with ``seq`` an
  8-byte big-endian counter;
* ``payload`` is msgpack of ``[timestamp, events, dp_rank]`` (vLLM's ``KVEventBatch``,
  an ``array_like`` msgspec struct);
* each event is a msgspec *tagged* struct, which msgspec writes as a map whose first
  key is ``"type"``: ``BlockStored`` (``block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name`` and the optional ``extra_keys`` and
  ``locality``), ``BlockRemoved`` (``block_hashes, medium``) and ``AllBlocksCleared``.
  Fields are written in vLLM's declaration order and optional ones only when set, so
  the bytes equal msgspec's encoding of vLLM's own classes.

Which kvbm events become which messages: a block registered in a tier is
``BlockStored`` with that tier's medium; a block evicted or removed from a tier is
``BlockRemoved``; a manager that closes sends ``AllBlocksCleared``. A tier's medium is
what its class declares (``Tier.medium``), in vLLM's words where vLLM has one:
GPU, CPU, and STORAGE for a disk (vLLM's ``MEDIUM_STORAGE``, what its offloading
connector sends for its disk tier; Dynamo's router reads it as its disk tier too); an
object store's OBJECT is sent as Dynamo's EXTERNAL, a peer's as REMOTE. ``media`` in
the config names another for a tier's name or type; a tier whose medium is REMOTE
also sets ``locality``. Allocation and match events are not published (vLLM has no
such messages).

Where. The PUB socket binds ``endpoint`` on ``port``, vLLM's default 5557 (offset by
``dp_rank``, as vLLM offsets its own); ``port: 0`` picks a free one per instance. The
bound address is in the start-up line (WARNING), ``stats()`` and ``kvbm status``.

Block hashes. kvbm keys blocks by a 16-byte ``SequenceHash``; vLLM's events carry
``int`` (or ``bytes``) hashes. ``hash_format``:

* ``int64`` (default): the key's last 8 bytes read big-endian, which is the very rule
  vLLM applies to its own byte hashes under ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``
  (``int.from_bytes(h, "big") & (2**64 - 1)``); deterministic across processes
  because the key is. Dynamo's router reads these as u64.
* ``bytes``: the 16-byte key itself (vLLM's default external hash type).
* ``dynamo``: Dynamo's 64-bit chained scheme (xxh3-64 of each block's u32 tokens,
  seeded; chained over ``[parent, block]`` u64 LE), computed from the token ids.

Token ids and parents. ``BlockEvent`` carries only keys, but ``BlockStored`` wants the
block's token ids and its parent's hash (Dynamo's router hashes the token ids itself).
The publisher therefore installs a ``RecordingHasher`` on the manager: every prompt
hashed by ``manager.hash_tokens`` (and so by ``match_prefix(tokens)``) leaves each
block's tokens and parent in a bounded ``TokenIndex`` (LRU, ``token_index_blocks``
entries). A block whose tokens are not in the index (hashed elsewhere, restored from
disk at start, or aged out) is skipped by default (``unknown_tokens: skip``, counted):
Dynamo's relay slices ``token_ids`` by ``block_size`` and fails on an empty list. With
``unknown_tokens: empty`` it is sent with ``token_ids: []`` and no parent, which vLLM's
decoder accepts.

Order. A manager batch's events are published in the order they happened: the
registry keeps one run per consecutive kind, and the publisher merges only adjacent
runs of one tier and one published kind (allocations and matches, which are not
published, sit between them). A block removed and stored again in one batch is thus
``BlockRemoved`` then ``BlockStored``, never the reverse.

Replay (``replay: true``), as vLLM's ``replay_endpoint``. Every published batch is also
kept, with its sequence number, in a ring of the last ``buffer_steps`` batches. A ROUTER
socket bound per instance (``replay_port: 0`` picks a free port; the bound address is
``replay_endpoint`` on the publisher, in ``stats()`` and in the start log line) answers
a request ``[b"", start_seq]`` (what a REQ socket sends for one 8-byte big-endian frame;
a DEALER sends the empty frame itself) with one message ``[b"", topic, seq, payload]``
per kept batch whose ``seq >= start_seq`` (oldest kept first; a start older than the
ring starts at its oldest batch) and then the end marker ``[b"", b"", -1 as 8 signed
bytes, b""]``: vLLM's framing, so its subscribers and Dynamo's work unchanged. Sequence
numbers count every batch, kept or dropped by the PUB socket, so live and replayed
numbers are one contiguous stream. ZMQ lets a REQ socket read only the first reply, so
a subscriber that wants the whole replay uses a DEALER (with vLLM's publisher too). The
ROUTER never blocks: a requester whose queue is full (sized, as vLLM does, for a whole
ring) loses replies instead. Requests are served on a small thread of their own;
the event thread only appends to the ring. The ring holds payloads as sent: its memory
is ``buffer_steps`` times the mean batch size.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from kvbm.events import BlockEvent, EventKind
from kvbm.hashing import BlockHasher, SequenceHash

from ._chain import tier_media
from ._sockets import bind, port_of
from ._tokens import KnownBlock, RecordingHasher, TokenIndex
from ._wire import (
    REPLAY_END_SEQ,
    all_blocks_cleared,
    block_removed,
    block_stored,
    encode_batch,
    int64_block_hash,
)

if TYPE_CHECKING:
    from kvbm.config import KvEventsConfig
    from kvbm.manager import KvBlockManager

__all__ = [
    "EVENT_MEDIA",
    "REPLAY_END_SEQ",
    "KnownBlock",
    "KvEventPublisher",
    "RecordingHasher",
    "TokenIndex",
    "all_blocks_cleared",
    "block_removed",
    "block_stored",
    "encode_batch",
    "event_medium",
    "int64_block_hash",
]

log = logging.getLogger("kvbm.kv_events")

#: The medium string of a tier's declared ``medium`` (``kvbm.tier.MEDIA``) where the
#: two differ: vLLM's strings where vLLM has one (``vllm.distributed.kv_events``:
#: MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE, the last for disk), else those Dynamo's
#: router maps to its storage tiers (EXTERNAL for an object store, REMOTE).
EVENT_MEDIA: dict[str, str] = {"DISK": "STORAGE", "OBJECT": "EXTERNAL"}
_PUBLISHED = {
    EventKind.REGISTERED: EventKind.REGISTERED,
    EventKind.EVICTED: EventKind.REMOVED,
    EventKind.REMOVED: EventKind.REMOVED,
}
_WAKE_IDS = itertools.count()
_U32 = np.dtype("<u4")


def event_medium(declared: str) -> str:
    """The KV-event medium of a tier whose class declares ``medium = declared``."""
    return EVENT_MEDIA.get(declared, declared)


# --- the publisher ----------------------------------------------------------------


@dataclass(frozen=True)
class _TierMedium:
    medium: str
    locality: str | None


class KvEventPublisher:
    """Publishes a manager's block events on a ZMQ PUB socket in vLLM's KV-event format.

    It is an ``EventBus`` subscriber: conversion, encoding and the send run on the
    bus's delivery thread, never in the engine's step. ``endpoint`` is the bound
    address (``tcp://127.0.0.1:PORT``) a router connects its SUB socket to;
    ``replay_endpoint`` (None unless ``replay`` is on) the one its REQ/DEALER socket
    asks for missed batches, served by a thread of its own.
    """

    def __init__(
        self,
        config: KvEventsConfig,
        page_size: int,
        tier_media: dict[str, _TierMedium],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        index: TokenIndex | None = None,
    ) -> None:
        self.config = config
        self.page_size = page_size
        self.tier_media = tier_media
        self.lora_name = lora_name
        self.cache_salt = cache_salt
        self.index = (
            index
            if index is not None
            else TokenIndex(
                page_size,
                config.token_index_blocks,
                config.dynamo_seed if config.hash_format == "dynamo" else None,
            )
        )
        self.topic = config.topic.encode()
        self.dp_rank = config.dp_rank
        self.sent_batches = 0
        self.sent_events = 0
        self.dropped_batches = 0
        self.skipped_unknown_tokens = 0
        self.replay_requests = 0
        self.replayed_batches = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._unsubscribe: Any = None
        # Every published (seq, payload), for replay; None when replay is off.
        self._buffer: deque[tuple[int, bytes]] | None = None
        self._wake: zmq.Socket[bytes] | None = None
        self._replay_thread: threading.Thread | None = None
        self.replay_endpoint: str | None = None
        self.replay_port: int | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self.endpoint = bind(self._sock, config.endpoint, config.port, config.dp_rank)
            if config.replay:
                self._start_replay()
        except Exception:
            self._sock.close(linger=0)
            self._sock = None
            raise
        self.port = port_of(self.endpoint)

    # -- replay ------------------------------------------------------------------
    def _start_replay(self) -> None:
        """Bind the ROUTER socket and start the thread that alone uses it."""
        cfg = self.config
        where = cfg.replay_endpoint
        if not where:
            where = cfg.endpoint
            if where.startswith(("ipc://", "inproc://")):
                where += "-replay"
        router = self._ctx.socket(zmq.ROUTER)
        # vLLM's sizing: a full replay plus its end marker always fits the queue of a
        # slow requester (ZMQ acknowledges reads only every HWM/2 messages).
        router.setsockopt(zmq.SNDHWM, 2 * (cfg.buffer_steps + 1))
        wake_addr = f"inproc://kvbm-kv-events-wake-{next(_WAKE_IDS)}"
        wake_rx = self._ctx.socket(zmq.PAIR)
        wake_tx = self._ctx.socket(zmq.PAIR)
        try:
            self.replay_endpoint = bind(
                router, where, cfg.replay_port, cfg.dp_rank, "replay_endpoint", "replay_port"
            )
            wake_rx.bind(wake_addr)
            wake_tx.connect(wake_addr)
        except Exception:
            for sk in (router, wake_rx, wake_tx):
                sk.close(linger=0)
            raise
        self.replay_port = port_of(self.replay_endpoint)
        self._buffer = deque(maxlen=cfg.buffer_steps)
        self._wake = wake_tx
        self._replay_thread = threading.Thread(
            target=self._replay_loop, args=(router, wake_rx), name="kvbm-kv-replay", daemon=True
        )
        self._replay_thread.start()

    def _replay_loop(self, router: zmq.Socket[bytes], wake: zmq.Socket[bytes]) -> None:
        # Both sockets are used by this thread only (ZMQ sockets are not thread-safe).
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if wake in ready:
                    return
                if router in ready:
                    try:
                        self._service_replay(router)
                    except Exception:  # one bad request must not end the service
                        log.exception("kvbm: KV-event replay request failed")
        finally:
            router.close(linger=0)
            wake.close(linger=0)

    def _service_replay(self, router: zmq.Socket[bytes]) -> None:
        frames = router.recv_multipart()
        if len(frames) != 3:
            # vLLM ignores a request that is not [identity, b"", start_seq] too.
            log.warning(
                "kvbm: KV-event replay request of %d frames ignored; send one 8-byte "
                "big-endian start sequence number from a REQ socket (or b'' and it from a "
                "DEALER)",
                len(frames) - 1,
            )
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        assert self._buffer is not None
        with self._lock:
            kept = list(self._buffer)  # a C-level copy; sends happen outside the lock
        # Sequence numbers in the ring are contiguous: index straight to the start.
        first = max(0, start_seq - kept[0][0]) if kept else 0
        sent = 0
        for seq, payload in kept[first:]:
            router.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), payload))
            sent += 1
        router.send_multipart((client, b"", b"", REPLAY_END_SEQ, b""))
        self.replay_requests += 1
        self.replayed_batches += sent

    # -- wiring ------------------------------------------------------------------
    @classmethod
    def attach(
        cls, manager: KvBlockManager, config: KvEventsConfig | None = None
    ) -> KvEventPublisher:
        """Bind, record token ids through the manager's hasher, and subscribe to its events.

        Blocks the chain already holds (restored at start) are published first.
        """
        config = config or manager.settings.kv_events
        media: dict[str, _TierMedium] = {}
        declared = tier_media(manager)
        for rt in manager.chain:
            medium = (
                config.media.get(rt.name)
                or config.media.get(rt.config.type)
                or event_medium(declared[rt.name])
            )
            # Blocks of a tier whose medium is a peer live in another instance.
            remote = declared[rt.name] == "REMOTE"
            media[rt.name] = _TierMedium(medium, "REMOTE" if remote else None)
        pub = cls(
            config,
            manager.page_size,
            media,
            manager.settings.lora_name,
            manager.settings.cache_salt,
        )
        if config.token_index_blocks > 0 and not isinstance(manager.hasher, RecordingHasher):
            manager.hasher = RecordingHasher(manager.hasher, pub.index)
        elif isinstance(manager.hasher, RecordingHasher):
            pub.index = manager.hasher.index
        now = time.time()
        snapshot = [
            BlockEvent(
                EventKind.REGISTERED, rt.name, tuple(k for k, _ in rt.registry.registered()), now
            )
            for rt in manager.chain
        ]
        pub([e for e in snapshot if e.hashes])
        pub._unsubscribe = manager.events.subscribe(pub)
        log.info(
            "kvbm: KV events published on %s (topic %r, hashes %s, replay %s)",
            pub.endpoint,
            config.topic,
            config.hash_format,
            pub.replay_endpoint or "off",
        )
        return pub

    def detach(self, manager: KvBlockManager) -> None:
        """Deliver what is queued, send ``AllBlocksCleared``, unsubscribe and close."""
        manager.events.drain()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if isinstance(manager.hasher, RecordingHasher) and manager.hasher.index is self.index:
            manager.hasher = BlockHasher(
                manager.hasher.namespace, manager.hasher.page_size, manager.hasher.algorithm
            )
        self.clear()
        self.close()

    # -- conversion --------------------------------------------------------------
    def __call__(self, events: Sequence[BlockEvent]) -> None:
        """Convert one batch of kvbm events, in order, and send it as one message."""
        out: list[dict[str, Any]] = []
        ts = max((ev.timestamp for ev in events), default=0.0)
        for kind, tier, hashes in _published_runs(events):
            if kind is EventKind.REGISTERED:
                out.extend(self._stored(tier, hashes))
            else:
                removed = self._removed(tier, hashes)
                if removed is not None:
                    out.append(removed)
        if out:
            self.send(out, ts)

    def _media(self, tier: str) -> _TierMedium:
        m = self.tier_media.get(tier)
        return m if m is not None else _TierMedium(tier.upper(), None)

    def _external(self, key: SequenceHash) -> Any:
        return key if self.config.hash_format == "bytes" else int64_block_hash(key)

    def _stored(self, tier: str, hashes: Sequence[SequenceHash]) -> list[dict[str, Any]]:
        media = self._media(tier)
        dynamo = self.config.hash_format == "dynamo"
        out: list[dict[str, Any]] = []
        run: list[Any] = []
        run_tokens: list[bytes] = []
        run_parent: Any = None
        run_first_parent: SequenceHash | None = None
        prev: SequenceHash | None = None
        unknown: list[SequenceHash] = []

        def flush() -> None:
            if run:
                out.append(
                    self._stored_event(
                        list(run),
                        run_parent,
                        b"".join(run_tokens),
                        media,
                        first_has_parent=run_first_parent is not None,
                    )
                )
                run.clear()
                run_tokens.clear()

        def flush_unknown() -> None:
            # In place, not after the known blocks, so the batch keeps its order.
            if not unknown:
                return
            if self.config.unknown_tokens == "empty" and not dynamo:
                out.append(
                    self._stored_event(
                        [self._external(k) for k in unknown],
                        None,
                        b"",
                        media,
                        first_has_parent=True,
                    )
                )
            else:
                self.skipped_unknown_tokens += len(unknown)
            unknown.clear()

        for key, known in zip(hashes, self.index.lookup(hashes)):
            if known is None or (dynamo and known.dynamo is None):
                flush()
                prev = None
                unknown.append(key)
                continue
            flush_unknown()
            ext = known.dynamo if dynamo else self._external(key)
            # One BlockStored holds a chain: each block's parent is the one before it,
            # as routers link them.
            if not run or known.parent != prev:
                flush()
                run_first_parent = known.parent
                if dynamo:
                    run_parent = known.dynamo_parent
                else:
                    run_parent = None if known.parent is None else self._external(known.parent)
            run.append(ext)
            run_tokens.append(known.tokens)
            prev = key
        flush()
        flush_unknown()
        return out

    def _stored_event(
        self,
        hashes: list[Any],
        parent: Any,
        tokens: bytes,
        media: _TierMedium,
        first_has_parent: bool,
    ) -> dict[str, Any]:
        extra: list[tuple[Any, ...] | None] | None = None
        if self.lora_name is not None or self.cache_salt is not None:
            # vLLM's per-block extra keys: the LoRA name on every block, the cache salt
            # on a prompt's first block only (the chain carries it onward).
            extra = []
            for i in range(len(hashes)):
                keys: list[Any] = [self.lora_name] if self.lora_name is not None else []
                if self.cache_salt is not None and i == 0 and not first_has_parent:
                    keys.append(self.cache_salt)
                extra.append(tuple(keys) if keys else None)
        return block_stored(
            hashes,
            parent,
            np.frombuffer(tokens, dtype=_U32).tolist(),
            self.page_size,
            media.medium,
            self.lora_name,
            extra,
            media.locality,
        )

    def _removed(self, tier: str, keys: Sequence[SequenceHash]) -> dict[str, Any] | None:
        media = self._media(tier)
        if self.config.hash_format == "dynamo":
            hashes = [
                k.dynamo for k in self.index.lookup(keys) if k is not None and k.dynamo is not None
            ]
            self.skipped_unknown_tokens += len(keys) - len(hashes)
        else:
            hashes = [self._external(k) for k in keys]
        if not hashes:
            return None
        return block_removed(hashes, media.medium, media.locality)

    # -- sending -----------------------------------------------------------------
    def send(self, events: list[dict[str, Any]], timestamp: float | None = None) -> None:
        """Encode ``events`` as one batch and publish it; never blocks (dropped, counted)."""
        payload = encode_batch(
            time.time() if timestamp is None else timestamp, events, self.dp_rank
        )
        with self._lock:
            if self._sock is None:
                return
            seq = self._seq
            self._seq += 1
            # Kept before the send: a batch the PUB socket drops can still be replayed,
            # and the ring's numbers stay contiguous with the live stream's.
            if self._buffer is not None:
                self._buffer.append((seq, payload))
            try:
                self._sock.send_multipart(
                    (self.topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK
                )
            except zmq.Again:
                self.dropped_batches += 1
                return
            self.sent_batches += 1
            self.sent_events += len(events)

    def clear(self) -> None:
        """Tell subscribers this instance holds no block any more (``AllBlocksCleared``)."""
        self.send([all_blocks_cleared()])

    def close(self, linger_ms: int = 500) -> None:
        """Close the PUB socket, giving queued messages ``linger_ms`` to leave, and stop
        the replay service (its thread closes its own sockets)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=linger_ms)
                self._sock = None
            wake, self._wake = self._wake, None
        if wake is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            wake.send(b"", flags=zmq.NOBLOCK)
        thread = self._replay_thread
        if thread is not None:
            thread.join(timeout=5)
            if thread.is_alive():
                log.warning("kvbm: KV-event replay thread still busy after 5 s; left as daemon")
        wake.close(linger=0)

    def stats(self) -> dict[str, Any]:
        """Where it publishes, and counters of what was sent, dropped, skipped and replayed."""
        return {
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "replay_requests": self.replay_requests,
            "replayed_batches": self.replayed_batches,
            "replay_buffer_batches": len(self._buffer) if self._buffer is not None else 0,
            "sent_batches": self.sent_batches,
            "sent_events": self.sent_events,
            "dropped_batches": self.dropped_batches,
            "skipped_unknown_tokens": self.skipped_unknown_tokens,
            "token_index_blocks": len(self.index),
        }


def _published_runs(
    events: Sequence[BlockEvent],
) -> Iterator[tuple[EventKind, str, list[SequenceHash]]]:
    """(REGISTERED or REMOVED, tier, keys) of the published events, in order.

    Events that are not published (allocations, matches) are dropped, and adjacent
    runs of one tier and one published kind merged: nothing published lies between
    them, so merging moves no event across another.
    """
    kind: EventKind | None = None
    tier = ""
    keys: list[SequenceHash] = []
    for ev in events:
        k = _PUBLISHED.get(ev.kind)
        if k is None or not ev.hashes:
            continue
        if k is kind and ev.tier == tier:
            keys.extend(ev.hashes)
            continue
        if kind is not None:
            yield kind, tier, keys
        kind, tier, keys = k, ev.tier, list(ev.hashes)
    if kind is not None:
        yield kind, tier, keys
