"""The vLLM connector's scheduler side finds blocks it did not write itself.

Two sources, both against vLLM's real scheduler on CPU (the harness of
``test_vllm_connector``): a disk tier a previous run filled (each worker recovers its
rank's slot files at start and hands them over vLLM's start-up handshake), and an s3
tier another instance filled (the workers probe it; moto's server runs as a real
process on 127.0.0.1). Under tensor parallelism a block counts only when every rank
can read its own shard.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_vllm_connector as base
from test_vllm_connector import Engine, prompt, settle

pytest.importorskip("moto.server")

from s3server import BUCKET, MotoServer  # noqa: E402

# The harness's fixtures: vLLM's modules (v) and engines closed after each test (make).
v = base.v
make = base.make

HOST = {"type": "host", "num_blocks": 64}


def disk(path: Path) -> dict[str, Any]:
    return {"type": "disk", "num_blocks": 64, "path": str(path), "admission": "all"}


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = MotoServer()
    s.start()
    yield s
    s.stop()


def s3(server: MotoServer, prefix: str, **keys: Any) -> dict[str, Any]:
    return server.tier_config(prefix=prefix, admission="all", **keys)


def fill(make: Any, tiers: list[dict[str, Any]], tokens: list[int], tp: int = 2) -> Engine:
    """An instance that computes ``tokens`` and writes their blocks down the whole chain."""
    e: Engine = make(tp=tp, tiers=tiers)
    e.add("w", tokens, max_tokens=1)
    e.run()
    settle(e)
    n = (len(tokens) - 1) // 16
    assert e.side.tiers[-1].registry.num_used == n, "the blocks reached the last tier"
    return e


def load_from_lower_tier(e: Engine, v: Any, tokens: list[int]) -> tuple[Any, int]:
    """Run a request for ``tokens`` until it computes; return it and the tokens it computed."""
    e.scrub()  # whatever the request finds in its blocks can only come from kvbm
    b = e.add("b", tokens, max_tokens=3)
    e.step()
    e.run(until=lambda: "b" in e.step_outputs[-1].num_scheduled_tokens)
    return b, e.step_outputs[-1].num_scheduled_tokens["b"]


def zero_header(tier_dir: Path, block_bytes: int, slot: int) -> None:
    """Invalidate one slot's header in a (closed) disk tier's single stripe file."""
    from kvbm_tiers_disk.format import HEADER_BYTES, Geometry

    (path,) = tier_dir.glob("kvbm-*/blocks-0.kvc")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(HEADER_BYTES), Geometry(block_bytes).header_offset(slot))
    finally:
        os.close(fd)


# --- a restarted disk tier --------------------------------------------------------------


def test_restarted_disk_tier_blocks_are_matched_and_load_byte_exact_on_every_rank(
    make: Any, v: Any, tmp_path: Path
) -> None:
    tokens = prompt(50, seed=21)
    fill(make, [HOST, disk(tmp_path)], tokens).close()
    e = make(tp=2, tiers=[HOST, disk(tmp_path)])
    assert e.side.restored_blocks == 3
    assert e.side.tiers[0].registry.num_used == 0, "the host tier starts empty"
    b, computed = load_from_lower_tier(e, v, tokens)
    assert computed == 50 - 48
    assert all(t == 1 for op in e.step_outputs[0].kv_connector_metadata.loads for t in op.tiers)
    e.assert_prefix_kv(b, 3)  # each rank got its own shard back from its rank<r> folder
    e.run()
    assert e.side.loaded_blocks == 3 and e.side.failed_blocks == 0


def test_disk_block_that_one_rank_lost_is_not_matched(make: Any, v: Any, tmp_path: Path) -> None:
    tokens = prompt(50, seed=22)
    w = fill(make, [HOST, disk(tmp_path)], tokens)
    h = w.side._hashers[(None, None)].hash_tokens(tokens)
    slot = w.side.tiers[1].registry.lookup(h[1])
    block_bytes = w.workers[1].worker_side.block_bytes
    w.close()
    zero_header(tmp_path / "rank1", block_bytes, slot)  # rank 0 still holds block 1
    e = make(tp=2, tiers=[HOST, disk(tmp_path)])
    assert e.side.restored_blocks == 2  # blocks 0 and 2: the match ends at block 1
    b, computed = load_from_lower_tier(e, v, tokens)
    assert computed == 50 - 16
    e.assert_prefix_kv(b, 1)
    e.run()


def test_single_rank_restart_restores_the_disk_tier(make: Any, v: Any, tmp_path: Path) -> None:
    tokens = prompt(40, seed=23)
    fill(make, [HOST, disk(tmp_path)], tokens, tp=1).close()
    e = make(tiers=[HOST, disk(tmp_path)])
    assert e.side.restored_blocks == 2
    b, computed = load_from_lower_tier(e, v, tokens)
    assert computed == 40 - 32
    e.assert_prefix_kv(b, 2)
    e.run()


def test_recovered_blocks_cross_the_process_boundary_intact(make: Any, tmp_path: Path) -> None:
    tokens = prompt(40, seed=26)
    w = fill(make, [HOST, disk(tmp_path)], tokens, tp=1)
    h = w.side._hashers[(None, None)].hash_tokens(tokens)
    w.close()
    e = make(tiers=[HOST, disk(tmp_path)])
    hs = e.workers[0].get_handshake_metadata()
    got = pickle.loads(pickle.dumps(hs))  # how vLLM's executors carry it to the scheduler
    assert got.rank == 0 and got.blocks(0) == set()
    assert got.blocks(1) == {(s, k) for k, s in e.side.tiers[1].registry.registered()}
    assert {k for _, k in got.blocks(1)} == set(h)


def test_handshake_after_scheduling_began_registers_nothing(
    make: Any, v: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvbm.connectors.vllm import KvbmConnector

    tokens = prompt(40, seed=24)
    fill(make, [HOST, disk(tmp_path)], tokens, tp=1).close()
    # An engine whose handshake comes late: vLLM re-sends it after a wake-up.
    monkeypatch.setattr(KvbmConnector, "set_xfer_handshake_metadata_pp_aware",
                        lambda self, metadata: None)
    e = make(tiers=[HOST, disk(tmp_path)])
    monkeypatch.undo()
    e.add("x", prompt(40, seed=25), max_tokens=1)
    e.run()
    settle(e)  # x's blocks now sit in disk slots the old run's headers named
    e.conn.set_xfer_handshake_metadata({0: e.workers[0].get_handshake_metadata()})
    assert e.side.restored_blocks == 0
    b, computed = load_from_lower_tier(e, v, tokens)
    assert computed == 40, "stale recovered slots never become matches"
    e.run()


# --- a shared s3 tier that another instance filled ------------------------------------------


@pytest.mark.parametrize("pack", [1, 3])
def test_blocks_another_instance_put_in_s3_are_found_and_load_byte_exact(
    make: Any, v: Any, server: MotoServer, pack: int
) -> None:
    tokens = prompt(50, seed=31 + pack)
    # pack 3: the writer stores the three blocks as one object; the worker that probed
    # learned where each block lies in it, and reads them from there.
    fill(make, [HOST, s3(server, f"found{pack}", pack_blocks=pack)], tokens).close()
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"found{pack}/")
    data = [o for o in listed.get("Contents", []) if o["Size"] > 0]  # not pack pointers
    assert len(data) == 2 * (3 // pack), "one object per block, or per pack, on each rank"
    e = make(tp=2, tiers=[HOST, s3(server, f"found{pack}", pack_blocks=pack)])
    e.scrub()
    b = e.add("b", tokens, max_tokens=3)
    so = e.step()
    assert "b" not in so.num_scheduled_tokens, "the request waits for the workers' probe"
    assert [p.tier for p in so.kv_connector_metadata.probes] == [1]
    e.run(until=lambda: "b" in e.step_outputs[-1].num_scheduled_tokens)
    assert e.step_outputs[-1].num_scheduled_tokens["b"] == 50 - 48
    assert e.side.adopted_blocks == 3
    e.assert_prefix_kv(b, 3)
    e.run()
    assert e.side.loaded_blocks == 3 and e.pins() == 0


def test_s3_block_that_one_rank_lacks_ends_the_match(
    make: Any, v: Any, server: MotoServer
) -> None:
    tokens = prompt(50, seed=32)
    w = fill(make, [HOST, s3(server, "partial")], tokens)
    h = w.side._hashers[(None, None)].hash_tokens(tokens)
    rank1_s3 = w.workers[1].worker_side.tiers[1]
    server.client().delete_object(Bucket=BUCKET, Key=rank1_s3.object_key(h[1]))
    w.close()
    e = make(tp=2, tiers=[HOST, s3(server, "partial")])
    b, computed = load_from_lower_tier(e, v, tokens)
    assert e.side.adopted_blocks == 1  # rank 0 holds all three; rank 1 only block 0
    assert computed == 50 - 16
    e.assert_prefix_kv(b, 1)
    e.run()


def test_prompt_no_instance_stored_probes_once_and_computes_everything(
    make: Any, v: Any, server: MotoServer
) -> None:
    e = make(tiers=[HOST, s3(server, "empty")])
    b, computed = load_from_lower_tier(e, v, prompt(50, seed=33))
    assert computed == 50
    assert sum(len(so.kv_connector_metadata.probes) for so in e.step_outputs) == 1
    assert not any(so.kv_connector_metadata.loads for so in e.step_outputs)
    e.run()


def test_probe_without_an_answer_times_out_as_a_miss(
    make: Any, v: Any, server: MotoServer
) -> None:
    e = make(tiers=[HOST, s3(server, "mute")], extra={"probe_timeout_s": 0.2})
    e.workers[0].worker_side._probe = lambda op: None  # a worker that never answers
    b, computed = load_from_lower_tier(e, v, prompt(50, seed=34))
    assert computed == 50
    assert not e.side._probes, "the unanswered probe was abandoned"
    e.run()
