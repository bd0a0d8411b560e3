"""KV events for routers: a real ZMQ SUB socket decodes what a manager publishes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from kvbm import ConfigError, ContiguousBlocks, KvBlockManager, build_plugins
from kvbm import observability_plugin as obs
from kvbm.hashing import BlockHasher, dynamo_sequence_hashes
from kvbm.kv_events import KvEventPublisher, RecordingHasher, int64_block_hash

from conftest import PAGE, SMALL_MODEL

TOKENS = list(range(1000, 1000 + 6 * PAGE))  # six full blocks


def _manager(tiers: list[dict[str, Any]] | None = None, **kv_events: Any) -> KvBlockManager:
    cfg = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": tiers or [{"type": "host", "num_blocks": 16}],
        "kv_events": {"enabled": True, **kv_events},
    }
    return KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))


class Subscriber:
    """A SUB socket connected to a publisher, past ZMQ's slow-joiner window."""

    def __init__(self, pub: KvEventPublisher) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(pub.endpoint)
        # PUB drops messages until the subscription has arrived: publish markers until
        # one comes through, then ignore every message up to the last marker.
        for _ in range(200):
            pub.clear()
            if self.sock.poll(50):
                break
        else:
            raise AssertionError(f"no message reached a subscriber of {pub.endpoint}")
        self.start_seq = pub.sent_batches

    def batches(self, timeout_ms: int = 2000) -> Iterator[tuple[bytes, int, bytes]]:
        """(topic, seq, payload) of every message after the handshake, until quiet."""
        while self.sock.poll(timeout_ms):
            topic, seq, payload = self.sock.recv_multipart()
            n = int.from_bytes(seq, "big")
            if n >= self.start_seq:
                yield topic, n, payload
                timeout_ms = 300

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _, _, payload in self.batches():
            ts, events, dp_rank = msgpack.unpackb(payload)
            assert isinstance(ts, float) and dp_rank == 0
            out.extend(events)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def mgr() -> Iterator[KvBlockManager]:
    m = _manager()
    yield m
    m.close()


def _subscribe(m: KvBlockManager) -> Subscriber:
    pub = obs.kv_event_publisher(m)
    assert pub is not None
    return Subscriber(pub)


def _offload(m: KvBlockManager, hashes: list[Any]) -> None:
    src = np.random.default_rng(0).integers(0, 256, (len(hashes), m.block_bytes), dtype=np.uint8)
    m.offload(hashes, ContiguousBlocks(src, m.layout))
    m.flush()
    m.events.drain()


def test_block_stored_carries_hashes_tokens_parent_and_medium(mgr: KvBlockManager) -> None:
    sub = _subscribe(mgr)
    hashes = mgr.hash_tokens(TOKENS)
    _offload(mgr, hashes)
    events = sub.events()
    sub.close()
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": [int64_block_hash(h) for h in hashes],
            "parent_block_hash": None,
            "token_ids": TOKENS,
            "block_size": PAGE,
            "lora_id": None,
            "medium": "CPU",
            "lora_name": None,
        }
    ]


def test_payload_bytes_equal_vllm_encoding_and_decode_with_vllm_classes(
    mgr: KvBlockManager,
) -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    sub = _subscribe(mgr)
    hashes = mgr.hash_tokens(TOKENS[: 2 * PAGE])
    _offload(mgr, hashes)
    ((_, _, payload),) = list(sub.batches())
    sub.close()
    batch = msgspec.msgpack.Decoder(kv.KVEventBatch).decode(payload)
    (ev,) = batch.events
    assert isinstance(ev, kv.BlockStored)
    assert ev.block_hashes == [int64_block_hash(h) for h in hashes]
    assert ev.token_ids == TOKENS[: 2 * PAGE] and ev.medium == kv.MEDIUM_CPU
    assert batch.data_parallel_rank == 0
    theirs = kv.KVEventBatch(
        ts=batch.ts,
        events=[
            kv.BlockStored(
                block_hashes=ev.block_hashes,
                parent_block_hash=None,
                token_ids=TOKENS[: 2 * PAGE],
                block_size=PAGE,
                lora_id=None,
                medium="CPU",
                lora_name=None,
            )
        ],
        data_parallel_rank=0,
    )
    assert msgspec.msgpack.encode(theirs) == payload


def test_evicted_blocks_are_published_as_block_removed() -> None:
    m = _manager(tiers=[{"type": "host", "num_blocks": 4}])
    try:
        sub = _subscribe(m)
        first = m.hash_tokens(TOKENS[: 4 * PAGE])
        _offload(m, first)
        other = m.hash_tokens(list(range(50_000, 50_000 + 2 * PAGE)))
        _offload(m, other)
        events = sub.events()
        sub.close()
    finally:
        m.close()
    removed = [e for e in events if e["type"] == "BlockRemoved"]
    assert removed == [
        {
            "type": "BlockRemoved",
            "block_hashes": [int64_block_hash(h) for h in first[:2]],
            "medium": "CPU",
        }
    ]


def test_a_continued_prompt_names_the_block_before_it_as_parent(mgr: KvBlockManager) -> None:
    sub = _subscribe(mgr)
    hashes = mgr.hash_tokens(TOKENS)
    _offload(mgr, hashes[:2])
    _offload(mgr, hashes[2:])
    stored = [e for e in sub.events() if e["type"] == "BlockStored"]
    sub.close()
    assert [e["parent_block_hash"] for e in stored] == [None, int64_block_hash(hashes[1])]
    assert stored[1]["token_ids"] == TOKENS[2 * PAGE :]


def test_closing_the_manager_publishes_all_blocks_cleared() -> None:
    m = _manager()
    sub = _subscribe(m)
    m.close()
    events = sub.events()
    sub.close()
    assert events == [{"type": "AllBlocksCleared"}]


def test_two_instances_bind_different_ports_on_loopback() -> None:
    a, b = _manager(), _manager()
    try:
        pa, pb = obs.kv_event_publisher(a), obs.kv_event_publisher(b)
        assert pa is not None and pb is not None
        assert pa.endpoint.startswith("tcp://127.0.0.1:") and pb.endpoint.startswith(
            "tcp://127.0.0.1:"
        )
        assert pa.port != pb.port
    finally:
        a.close()
        b.close()


def test_int64_hash_is_the_last_8_bytes_big_endian_as_vllm_converts() -> None:
    key = bytes(range(16))
    # vLLM: int.from_bytes(hash_bytes, "big") & ((1 << 64) - 1)
    assert int64_block_hash(key) == int.from_bytes(key, "big") & ((1 << 64) - 1)
    assert int64_block_hash(key) == 0x08090A0B0C0D0E0F


def test_dynamo_hash_format_publishes_dynamos_sequence_hashes() -> None:
    m = _manager(hash_format="dynamo")
    try:
        sub = _subscribe(m)
        hashes = m.hash_tokens(TOKENS)
        _offload(m, hashes[:3])
        _offload(m, hashes[3:])
        stored = [e for e in sub.events() if e["type"] == "BlockStored"]
        sub.close()
    finally:
        m.close()
    want = dynamo_sequence_hashes(TOKENS, PAGE, 1337)
    assert [e["block_hashes"] for e in stored] == [want[:3], want[3:]]
    assert [e["parent_block_hash"] for e in stored] == [None, want[2]]


def test_blocks_with_unknown_tokens_are_skipped_by_default(mgr: KvBlockManager) -> None:
    sub = _subscribe(mgr)
    # Hashed by another hasher: the publisher never saw these blocks' tokens.
    foreign = BlockHasher(mgr.namespace, PAGE).hash_tokens(list(range(7_000, 7_000 + 2 * PAGE)))
    _offload(mgr, foreign)
    pub = obs.kv_event_publisher(mgr)
    assert pub is not None
    pub.clear()  # an end marker: everything before it has been sent
    events = sub.events()
    sub.close()
    assert events == [{"type": "AllBlocksCleared"}]
    assert pub.skipped_unknown_tokens == 2


def test_unknown_tokens_empty_publishes_hashes_without_tokens() -> None:
    m = _manager(unknown_tokens="empty")
    try:
        sub = _subscribe(m)
        foreign = BlockHasher(m.namespace, PAGE).hash_tokens(list(range(7_000, 7_000 + 2 * PAGE)))
        _offload(m, foreign)
        (ev,) = sub.events()
        sub.close()
    finally:
        m.close()
    assert ev["block_hashes"] == [int64_block_hash(h) for h in foreign]
    assert ev["token_ids"] == [] and ev["parent_block_hash"] is None


def test_write_through_publishes_each_tier_with_its_medium() -> None:
    tiers = [{"type": "host", "num_blocks": 8}, {"type": "host", "name": "slow", "num_blocks": 16}]
    m = _manager(tiers=tiers, media={"slow": "DISK"})
    try:
        sub = _subscribe(m)
        _offload(m, m.hash_tokens(TOKENS[: 2 * PAGE]))
        stored = [e for e in sub.events() if e["type"] == "BlockStored"]
        sub.close()
    finally:
        m.close()
    assert sorted(e["medium"] for e in stored) == ["CPU", "DISK"]


def test_topic_frame_and_sequence_numbers_follow_vllm() -> None:
    m = _manager(topic="kvbm-a")
    try:
        pub = obs.kv_event_publisher(m)
        assert pub is not None
        sub = Subscriber(pub)
        _offload(m, m.hash_tokens(TOKENS[:PAGE]))
        _offload(m, m.hash_tokens(TOKENS[PAGE : 2 * PAGE]))
        got = [(topic, seq) for topic, seq, _ in sub.batches()]
        sub.close()
    finally:
        m.close()
    assert got == [(b"kvbm-a", sub.start_seq), (b"kvbm-a", sub.start_seq + 1)]


def test_disabled_events_start_no_publisher(small_config: dict[str, Any]) -> None:
    m = KvBlockManager.from_config(small_config, plugins=build_plugins(extra_plugins=[obs]))
    try:
        assert obs.kv_event_publisher(m) is None
        assert not isinstance(m.hasher, RecordingHasher)
    finally:
        m.close()


def test_a_port_in_use_is_an_error_naming_the_fix() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        with pytest.raises(ConfigError, match=r"kv_events\.port to 0"):
            _manager(port=s.getsockname()[1])
    finally:
        s.close()


def test_an_endpoint_with_a_port_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'endpoint'"):
        _manager(endpoint="tcp://127.0.0.1:5557")


def test_every_event_type_encodes_to_the_bytes_msgspec_writes_for_vllm() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    from kvbm.kv_events import all_blocks_cleared, block_removed, block_stored, encode_batch

    ours = encode_batch(
        12.5,
        [
            block_stored(
                [1, 2], 7, [5] * 8, 4, "CPU", "lora-a", [("lora-a", "salt"), ("lora-a",)], "REMOTE"
            ),
            block_removed([2**64 - 1], "DISK", "REMOTE"),
            all_blocks_cleared(),
        ],
        3,
    )
    theirs = kv.KVEventBatch(
        ts=12.5,
        data_parallel_rank=3,
        events=[
            kv.BlockStored(
                block_hashes=[1, 2],
                parent_block_hash=7,
                token_ids=[5] * 8,
                block_size=4,
                lora_id=None,
                medium="CPU",
                lora_name="lora-a",
                extra_keys=[("lora-a", "salt"), ("lora-a",)],
                locality="REMOTE",
            ),
            kv.BlockRemoved(block_hashes=[2**64 - 1], medium="DISK", locality="REMOTE"),
            kv.AllBlocksCleared(),
        ],
    )
    assert ours == msgspec.msgpack.encode(theirs)


def test_bytes_hash_format_sends_the_16_byte_keys() -> None:
    m = _manager(hash_format="bytes")
    try:
        sub = _subscribe(m)
        hashes = m.hash_tokens(TOKENS[: 2 * PAGE])
        _offload(m, hashes)
        (ev,) = sub.events()
        sub.close()
    finally:
        m.close()
    assert ev["block_hashes"] == list(hashes) and all(len(h) == 16 for h in ev["block_hashes"])
