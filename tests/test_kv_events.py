"""KV events for routers: a real ZMQ SUB socket decodes what a manager publishes."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from kvbm import ConfigError, ContiguousBlocks, KvBlockManager, build_plugins
from kvbm.config import KvEventsConfig
from kvbm.hashing import BlockHasher, dynamo_sequence_hashes
from kvbm_observability import plugin as obs
from kvbm_observability.kv_events import (
    KvEventPublisher,
    RecordingHasher,
    event_medium,
    int64_block_hash,
)

from conftest import PAGE, SMALL_MODEL

TOKENS = list(range(1000, 1000 + 6 * PAGE))  # six full blocks


def _manager(tiers: list[dict[str, Any]] | None = None, **kv_events: Any) -> KvBlockManager:
    # Port 0 unless a test names one: tests run beside other processes that may hold
    # the default port (vLLM's 5557).
    cfg = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": tiers or [{"type": "host", "num_blocks": 16}],
        "kv_events": {"enabled": True, "port": 0, **kv_events},
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


def _default_port_manager() -> KvBlockManager:
    """A manager whose kv_events name no port, retried while another test holds 5557."""
    cfg = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 4}],
        "kv_events": {"enabled": True},
    }
    deadline = time.monotonic() + 10
    while True:
        try:
            return KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))
        except ConfigError as e:
            if "5557" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_publisher_binds_vllms_default_port_5557_when_no_port_is_configured() -> None:
    m = _default_port_manager()
    try:
        pub = obs.kv_event_publisher(m)
        assert pub is not None
        assert pub.endpoint == "tcp://127.0.0.1:5557" and pub.port == 5557
    finally:
        m.close()


def test_the_default_port_is_the_one_vllm_binds_by_default() -> None:
    kv = pytest.importorskip("vllm.config.kv_events")
    vllm_port = int(kv.KVEventsConfig().endpoint.rsplit(":", 1)[1])
    assert KvEventsConfig().port == vllm_port


def test_start_up_says_where_events_and_metrics_listen_in_one_warning_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kvbm")
    cfg = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 4}],
        "kv_events": {"enabled": True, "port": 0, "replay": True},
        "metrics": True,
        "metrics_port": 0,
    }
    m = KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))
    try:
        pub, exp = obs.kv_event_publisher(m), obs.metrics_exporter(m)
        assert pub is not None and exp is not None
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        m.close()
    said = [ln for ln in lines if pub.endpoint in ln]
    assert len(said) == 1, lines
    assert exp.url in said[0] and f"replay on {pub.replay_endpoint}" in said[0]


def test_a_second_instance_on_the_default_port_is_told_to_pick_another() -> None:
    m = _default_port_manager()
    try:
        with pytest.raises(ConfigError, match=r"5557.*vLLM's default.*kv_events\.port"):
            KvBlockManager.from_config(
                {
                    "model": dict(SMALL_MODEL),
                    "page_size": PAGE,
                    "tiers": [{"type": "host", "num_blocks": 4}],
                    "kv_events": {"enabled": True},
                },
                plugins=build_plugins(extra_plugins=[obs]),
            )
    finally:
        m.close()


def test_two_instances_with_port_0_bind_different_ports_on_loopback() -> None:
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


def _free_ports(*offsets: int) -> int:
    """A port ``p`` with ``p + o`` free for every offset, checked by binding each."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with contextlib.ExitStack() as stack:
            try:
                for o in offsets:
                    sk = stack.enter_context(socket.socket())
                    sk.bind(("127.0.0.1", port + o))
            except OSError:
                continue
        return port
    raise AssertionError(f"no port with {offsets} free found")


def test_data_parallel_ranks_sharing_a_fixed_port_bind_port_plus_rank_as_vllm_does() -> None:
    port = _free_ports(0, 1, 10, 11)
    ranks = [_manager(port=port, replay=True, replay_port=port + 10, dp_rank=r) for r in (0, 1)]
    try:
        pubs = [obs.kv_event_publisher(m) for m in ranks]
        assert [p.port for p in pubs if p is not None] == [port, port + 1]
        assert [p.replay_port for p in pubs if p is not None] == [port + 10, port + 11]
    finally:
        for m in ranks:
            m.close()


def test_ipc_endpoint_of_a_data_parallel_rank_gets_a_dp_suffix(tmp_path: Any) -> None:
    m = _manager(endpoint=f"ipc://{tmp_path}/kv", dp_rank=2)
    try:
        pub = obs.kv_event_publisher(m)
        assert pub is not None and pub.endpoint == f"ipc://{tmp_path}/kv_dp2"
    finally:
        m.close()


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


def test_each_tier_publishes_the_medium_its_class_declares(tmp_path: Any) -> None:
    pytest.importorskip("kvbm_tiers_disk.tier")
    tiers = [
        {"type": "host", "num_blocks": 8},
        {"type": "disk", "num_blocks": 16, "path": str(tmp_path), "admission": "all"},
    ]
    m = _manager(tiers=tiers)
    try:
        sub = _subscribe(m)
        _offload(m, m.hash_tokens(TOKENS[: 2 * PAGE]))
        m.flush()
        stored = [e for e in sub.events() if e["type"] == "BlockStored"]
        sub.close()
    finally:
        m.close()
    assert sorted(e["medium"] for e in stored) == ["CPU", "STORAGE"]
    assert all("locality" not in e for e in stored)


def test_a_disk_is_sent_with_vllms_storage_medium() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    assert event_medium("DISK") == kv.MEDIUM_STORAGE == "STORAGE"
    assert (event_medium("CPU"), event_medium("GPU")) == (kv.MEDIUM_CPU, kv.MEDIUM_GPU)


def test_an_object_store_medium_is_sent_as_dynamos_external() -> None:
    assert (event_medium("OBJECT"), event_medium("CPU"), event_medium("REMOTE")) == (
        "EXTERNAL", "CPU", "REMOTE")


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
        with pytest.raises(ConfigError, match=r"kv_events\.port to another port, or to 0"):
            _manager(port=s.getsockname()[1])
    finally:
        s.close()


def test_an_endpoint_with_a_port_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'endpoint'"):
        _manager(endpoint="tcp://127.0.0.1:5557")


def test_every_event_type_encodes_to_the_bytes_msgspec_writes_for_vllm() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    from kvbm_observability.kv_events import (
        all_blocks_cleared,
        block_removed,
        block_stored,
        encode_batch,
    )

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


# --- replay -------------------------------------------------------------------------


def _replay(endpoint: str, start_seq: int) -> list[list[bytes]]:
    """Ask a replay socket for every batch from ``start_seq`` with a real DEALER, as
    vLLM's subscribers do; the frames of each reply after the empty delimiter, up to and
    including the end marker."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        out: list[list[bytes]] = []
        while sock.poll(5000):
            delim, *frames = sock.recv_multipart()
            assert delim == b""
            out.append(frames)
            if frames[1] == (-1).to_bytes(8, "big", signed=True):
                return out
        raise AssertionError(f"no end-of-replay marker from {endpoint} after {out!r}")
    finally:
        sock.close(linger=0)


def _replay_publisher(m: KvBlockManager) -> tuple[KvEventPublisher, str]:
    """The manager's publisher and its bound replay address."""
    pub = obs.kv_event_publisher(m)
    assert pub is not None and pub.replay_endpoint is not None
    return pub, pub.replay_endpoint


def test_late_subscriber_recovers_missed_batches_by_replay_byte_exact() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    m = _manager(replay=True, topic="kvbm")
    try:
        pub, where = _replay_publisher(m)
        live = Subscriber(pub)
        hashes = m.hash_tokens(TOKENS)
        for i in range(3):  # three batches a late router never saw
            _offload(m, hashes[2 * i : 2 * i + 2])
        seen = list(live.batches())
        live.close()
        got = _replay(where, live.start_seq)
    finally:
        m.close()
    assert len(seen) == 3
    *batches, end = got
    assert end == [b"", b"\xff" * 8, b""]
    assert [(t, int.from_bytes(s, "big"), p) for t, s, p in batches] == seen
    decoder = msgspec.msgpack.Decoder(kv.KVEventBatch)
    stored = [ev for _, _, p in batches for ev in decoder.decode(p).events]
    assert [ev.block_hashes for ev in stored] == [
        [int64_block_hash(h) for h in hashes[2 * i : 2 * i + 2]] for i in range(3)
    ]


def test_replay_older_than_the_buffer_starts_at_the_oldest_kept_batch_as_vllm_does() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    theirs_pub = kv.ZmqEventPublisher(
        0,
        endpoint="inproc://kvbm-test-vllm",
        replay_endpoint=f"tcp://127.0.0.1:{port}",
        buffer_steps=3,
        topic="kvbm",
    )
    m = _manager(replay=True, buffer_steps=3, topic="kvbm")
    try:
        ours_pub, ours_where = _replay_publisher(m)
        for _ in range(5):  # seq 0..4; the ring keeps 2, 3, 4
            theirs_pub.publish(kv.KVEventBatch(ts=1.0, events=[kv.AllBlocksCleared()]))
            ours_pub.clear()
        theirs_pub._event_queue.join()  # vLLM's thread has sent all five
        theirs = _replay(f"tcp://127.0.0.1:{port}", 1)
        ours = _replay(ours_where, 1)
    finally:
        m.close()
        theirs_pub.shutdown()
    frames = [[t, sq] for t, sq, _ in ours]
    assert frames == [[t, sq] for t, sq, _ in theirs]
    assert [int.from_bytes(sq, "big", signed=True) for _, sq in frames] == [2, 3, 4, -1]
    assert [len(ours[-1][2]), len(theirs[-1][2])] == [0, 0]


def test_replay_from_a_sequence_beyond_the_newest_sends_only_the_end_marker() -> None:
    m = _manager(replay=True)
    try:
        pub, where = _replay_publisher(m)
        pub.clear()
        got = _replay(where, 10)
    finally:
        m.close()
    assert got == [[b"", b"\xff" * 8, b""]]


def test_live_and_replayed_sequence_numbers_are_one_contiguous_stream() -> None:
    m = _manager(replay=True)
    try:
        pub, where = _replay_publisher(m)
        sub = Subscriber(pub)
        _offload(m, m.hash_tokens(TOKENS[:PAGE]))
        live = [seq for _, seq, _ in sub.batches()]
        sub.close()
        replayed = [int.from_bytes(sq, "big", signed=True) for _, sq, _ in _replay(where, 0)]
    finally:
        m.close()
    assert replayed[:-1] == list(range(pub.sent_batches - 1)) and replayed[-1] == -1
    assert live == [pub.sent_batches - 2]  # the last batch before the AllBlocksCleared


def test_two_instances_get_different_replay_ports_and_report_them() -> None:
    a, b = _manager(replay=True), _manager(replay=True)
    try:
        (pa, wa), (pb, _) = _replay_publisher(a), _replay_publisher(b)
        ports = {pa.port, pb.port, pa.replay_port, pb.replay_port}
        assert len(ports) == 4 and None not in ports
        assert pa.stats()["replay_endpoint"] == pa.replay_endpoint
        assert wa.startswith("tcp://127.0.0.1:")
    finally:
        a.close()
        b.close()


def test_replay_is_off_unless_asked(mgr: KvBlockManager) -> None:
    pub = obs.kv_event_publisher(mgr)
    assert pub is not None
    assert pub.replay_endpoint is None and pub.stats()["replay_endpoint"] is None


def test_close_stops_the_replay_thread() -> None:
    m = _manager(replay=True)
    pub, _ = _replay_publisher(m)
    thread = pub._replay_thread
    assert thread is not None and thread.is_alive()
    m.close()
    assert not thread.is_alive()


# --- order within a batch -----------------------------------------------------------


def _events_of(m: KvBlockManager, ops: Any) -> list[dict[str, Any]]:
    """Run registry operations on a one-slot tier named ``host`` and publish everything
    they emitted as one manager batch; the events a subscriber decodes."""
    from kvbm.policy import LRUPolicy
    from kvbm.registry import BlockRegistry

    sub = _subscribe(m)
    reg = BlockRegistry("host", 1, LRUPolicy(1), m.events)
    ops(reg)
    m.events.publish(reg.take_events())
    m.events.drain()
    events = sub.events()
    sub.close()
    return events


def _store(reg: Any, key: bytes) -> None:
    slot = reg.allocate(key)
    assert slot is not None
    reg.commit(slot)


def test_a_block_evicted_and_stored_again_in_one_batch_keeps_that_order() -> None:
    m = _manager()
    a, b = m.hash_tokens(TOKENS[: 2 * PAGE])

    def ops(reg: Any) -> None:
        _store(reg, a)
        _store(reg, b)  # evicts a (one slot)
        assert reg.remove(b)
        _store(reg, a)  # a is back: the router must end up holding it

    try:
        events = _events_of(m, ops)
    finally:
        m.close()
    ia, ib = int64_block_hash(a), int64_block_hash(b)
    assert [(e["type"], e["block_hashes"]) for e in events] == [
        ("BlockStored", [ia]),
        ("BlockRemoved", [ia]),
        ("BlockStored", [ib]),
        ("BlockRemoved", [ib]),
        ("BlockStored", [ia]),
    ]


def test_stores_on_both_sides_of_a_removal_are_not_grouped_across_it() -> None:
    m = _manager()
    a, b, c = m.hash_tokens(TOKENS[: 3 * PAGE])

    def ops(reg: Any) -> None:
        _store(reg, a)
        _store(reg, b)  # evicts a
        _store(reg, c)  # evicts b; nothing removed sits between b's and c's storing

    try:
        events = _events_of(m, ops)
    finally:
        m.close()
    ia, ib, ic = (int64_block_hash(h) for h in (a, b, c))
    assert [(e["type"], e["block_hashes"]) for e in events] == [
        ("BlockStored", [ia]),
        ("BlockRemoved", [ia]),
        ("BlockStored", [ib]),
        ("BlockRemoved", [ib]),
        ("BlockStored", [ic]),
    ]
    assert events[2]["parent_block_hash"] == ia and events[4]["parent_block_hash"] == ib


def test_a_replay_endpoint_with_a_port_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'replay_endpoint'.*'replay_port'"):
        _manager(replay=True, replay_endpoint="tcp://127.0.0.1:5558")
