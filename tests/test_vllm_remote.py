"""The remote tier under vLLM: a worker serves its own host arena to peers over NIXL.

Process A is this test process: vLLM's real scheduler and a worker connector on CPU
(the harness of ``test_vllm_connector``), with the chain ``[host, remote]``. Its
worker keeps the key -> slot map of its host arena from the slot instructions it
executes and serves it through the remote tier's ``BlockServer``. Process B is a
child started as this file's script: a plain ``KvBlockManager`` whose remote tier
lists A as its peer; it onboards A's blocks through NIXL (UCX on loopback) and
writes them to a file. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if __name__ != "__main__":
    pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
    pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")
    import test_vllm_connector as base
    import torch
    import xxhash
    from test_vllm_connector import HEAD, HEADS, LAYERS, PAGE, kv_value, prompt

    v = base.v
    make = base.make

FAST = {"ucx_net_devices": "lo", "retry_after_s": 0.2, "request_timeout_s": 2.0,
        "transfer_timeout_s": 5.0, "lease_timeout_s": 20.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_pair() -> int:
    """A port ``p`` with ``p + 1`` free too (rank 1 listens on ``p + 1``)."""
    for _ in range(50):
        p = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


# --- process B: a plain manager that reads from A ---------------------------------------


def _reader(args: dict[str, Any]) -> None:
    """Child: onboard the blocks of each token list read from stdin; write their bytes."""
    from kvbm import ContiguousBlocks, KvBlockManager

    mgr = KvBlockManager.from_config({
        "model": args["model"], "page_size": args["page"],
        "tiers": [{"type": "host", "num_blocks": 16},
                  {"type": "remote", "listen": args["listen"], "peers": [args["peer"]], **FAST}],
    }, physical=args["physical"])
    print("READY", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        tokens, n = job["tokens"], len(job["tokens"]) // args["page"]
        out = np.zeros((n, mgr.block_bytes), dtype=np.uint8)
        with mgr.match_prefix(tokens) as m:
            tiers = list(m.tiers)
            res = mgr.onboard(m, ContiguousBlocks(out[: m.num_blocks], mgr.layout),
                              promote=False)
        out[: res.loaded].tofile(job["out"])
        print("DONE", res.loaded, ",".join(tiers) or "-", flush=True)
    mgr.close()


class Reader:
    """Process B: started once, asked to onboard token lists one at a time."""

    def __init__(self, model: dict[str, Any], listen: str, peer: str, physical: str) -> None:
        env = dict(os.environ, UCX_NET_DEVICES="lo")
        arg = json.dumps({"model": model, "page": PAGE, "listen": listen, "peer": peer,
                          "physical": physical})
        self.proc = subprocess.Popen([sys.executable, __file__, "read", arg],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.addr = listen

    def _line(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # NIXL logs to stdout too: skip to our line
            parts = raw.split()
            if parts and parts[0] == word:
                return parts[1:]
        raise RuntimeError(f"reader exited ({self.proc.wait()}) before saying {word}")

    def ready(self) -> Reader:
        self._line("READY")
        return self

    def onboard(self, tokens: list[int], out: Path) -> tuple[int, list[str], np.ndarray]:
        """Onboard ``tokens`` from A; the number loaded, the tiers matched, their bytes."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"tokens": tokens, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        loaded, tiers = self._line("DONE")
        data = np.fromfile(out, dtype=np.uint8) if int(loaded) else np.zeros(0, np.uint8)
        return int(loaded), tiers.split(","), data

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- process A: the vLLM engine ----------------------------------------------------------


def physical() -> str:
    """The physical block layout A's workers report (the test has no attention layers,
    so the backend is "unknown"; the shape is one layer's [heads, tokens, K|V]): B must
    name it to read A's blocks."""
    return f"vllm:unknown:{[HEADS, PAGE, 2 * HEAD]}:float32"



@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    """(A's port, B's port): each lists the other as its peer."""
    return _free_port(), _free_port()


@pytest.fixture(scope="module")
def reader(v: Any, ports: tuple[int, int]) -> Iterator[Reader]:
    a, b = ports
    model = {"name": v.model_dir, "num_layers": len(LAYERS), "num_kv_heads": HEADS,
             "head_dim": HEAD, "dtype": "float32", "outer_dim": 2}
    r = Reader(model, f"127.0.0.1:{b}", f"127.0.0.1:{a}", physical())
    try:
        yield r.ready()
    finally:
        r.close()


def engine(make: Any, ports: tuple[int, int], host_blocks: int = 64, tp: int = 1) -> Any:
    a, b = ports
    return make(tp=tp, tiers=[
        {"type": "host", "num_blocks": host_blocks},
        {"type": "remote", "listen": f"127.0.0.1:{a}", "peers": [f"127.0.0.1:{b}"], **FAST},
    ])


def expected_block(tokens: list[int], i: int) -> bytes:
    """Block ``i`` of rank 0 in kvbm's canonical order ``[layer, K|V, token, head, dim]``."""
    pos = torch.arange(i * PAGE, (i + 1) * PAGE)
    toks = torch.tensor(tokens[i * PAGE : (i + 1) * PAGE])
    out = b""
    for li in range(len(LAYERS)):
        kv = kv_value(0, li, toks, pos).view(PAGE, HEADS, 2, HEAD).permute(2, 0, 1, 3)
        out += kv.contiguous().numpy().tobytes()
    return out


def keys_of(e: Any, tokens: list[int]) -> list[bytes]:
    """The scheduler's block keys of ``tokens`` (no LoRA, no cache salt)."""
    plain = types.SimpleNamespace(lora_request=None, cache_salt=None)
    return [bytes(k) for k in e.side._hasher(plain).hash_tokens(tokens)]


class Peer:
    """A raw control-plane client of A's server (the reads' lease side, without NIXL)."""

    def __init__(self, addr: str, from_addr: str) -> None:
        from kvbm_tiers_remote.protocol import split_addr

        self.sock = socket.create_connection(split_addr(addr), timeout=5)
        self.from_addr = from_addr

    def ask(self, op: str, **msg: Any) -> dict[str, Any]:
        from kvbm_tiers_remote.protocol import recv_msg, send_msg

        send_msg(self.sock, {"op": op, "from_id": "test", "from_addr": self.from_addr, **msg})
        return recv_msg(self.sock)

    def close(self) -> None:
        self.sock.close()


# --- tests -----------------------------------------------------------------------------


def test_blocks_a_vllm_worker_saved_are_onboarded_byte_exact_by_another_process(
    make: Any, ports: tuple[int, int], reader: Reader, tmp_path: Path
) -> None:
    e = engine(make, ports)
    tokens = prompt(50, seed=41)
    e.add("a", tokens, max_tokens=1)
    e.run()
    served = e.workers[0].worker_side.served[0]
    assert len(served) == 3, "the worker serves the three blocks it saved"
    assert e.workers[0].worker_side.layout.physical == physical()
    loaded, tiers, data = reader.onboard(tokens[:48], tmp_path / "b.bin")
    assert loaded == 3 and tiers == ["remote"] * 3
    for i in range(3):
        bb = len(data) // 3
        assert data[i * bb : (i + 1) * bb].tobytes() == expected_block(tokens, i), f"block {i}"
    remote = e.workers[0].worker_side.tiers[1]
    assert remote.stats()["served_blocks"] == 3


def test_block_is_served_only_after_all_its_layers_are_written(
    make: Any, ports: tuple[int, int]
) -> None:
    e = engine(make, ports)
    tokens = prompt(40, seed=42)
    keys = keys_of(e, tokens)[:2]
    remote = e.workers[0].worker_side.tiers[1]
    peer = Peer(remote.identity.addr, f"127.0.0.1:{ports[1]}")
    mid_write: list[list[bool]] = []

    def ask_between_layers(rank: int, li: int, so: Any) -> None:
        if li == 1 and so.kv_connector_metadata.saves:
            # Layer 0 of the step's new blocks is in the arena; layer 1 is not yet.
            mid_write.append(peer.ask("probe", keys=keys)["found"])

    try:
        e.add("a", tokens, max_tokens=1)
        deadline = time.monotonic() + 10
        while not mid_write and time.monotonic() < deadline:
            e.step(after_layer_load=ask_between_layers)
            time.sleep(0.002)  # the first steps wait for the workers' probe of the peer
        assert mid_write == [[False, False]], "never served while half written"
        assert peer.ask("probe", keys=keys)["found"] == [True, True]
    finally:
        peer.close()
    e.run()


def test_slot_a_peer_leases_is_not_overwritten_while_the_lease_lasts(
    make: Any, ports: tuple[int, int]
) -> None:
    # Four host slots: the next prompt's four blocks must reuse the three leased ones.
    e = engine(make, ports, host_blocks=4)
    ws = e.workers[0].worker_side
    served = ws.served[0]
    arena = ws.tiers[0].slots
    first = prompt(50, seed=43)
    e.add("a", first, max_tokens=1)
    e.run()
    keys = keys_of(e, first)[:3]
    slots = [served.lookup(k) for k in keys]
    assert None not in slots
    peer = Peer(ws.tiers[1].identity.addr, f"127.0.0.1:{ports[1]}")
    try:
        lease = peer.ask("lease", keys=keys, ttl=20.0)
        sums = [b[1] for b in lease["blocks"]]
        e.add("b", prompt(66, seed=44), max_tokens=1)
        e.run()
        base.settle(e)
        assert served.refused_claims == 3, "each save into a leased slot was skipped"
        assert [xxhash.xxh3_64_intdigest(arena[s]) for s in slots] == sums, "bytes unchanged"
        assert [served.lookup(k) for k in keys] == [None] * 3, "evicted: no longer served"
        assert e.side.saved_blocks == 3 + 1, "only the save into the free slot counted"
        peer.ask("probe", keys=[])  # the connection is live while the lease is held
    finally:
        peer.close()  # the server drops a closed connection's leases
    for _ in range(200):
        if not any(served.pins_at(s) for s in slots):
            break
        time.sleep(0.01)
    e.add("c", prompt(66, seed=45), max_tokens=1)
    e.run()
    base.settle(e)
    assert served.refused_claims == 3, "no lease: the slots are written again"
    assert [xxhash.xxh3_64_intdigest(arena[s]) for s in slots] != sums


def test_tp2_ranks_serve_their_own_shard_on_consecutive_ports(make: Any) -> None:
    ports = (_free_pair(), _free_pair())
    e = engine(make, ports, tp=2)
    addrs = [w.worker_side.tiers[1].identity.addr for w in e.workers]
    assert addrs == [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[0] + 1}"]
    peers = [w.worker_side.tiers[1].cfg.peers for w in e.workers]
    assert peers == [[f"127.0.0.1:{ports[1]}"], [f"127.0.0.1:{ports[1] + 1}"]]
    hello = []
    for r, a in enumerate(addrs):
        p = Peer(a, f"127.0.0.1:{ports[1] + r}")  # rank r serves the peers' rank r
        try:
            hello.append(p.ask("hello")["namespace"])
        finally:
            p.close()
    # A rank-0 reader that reached rank 1's server would be refused on this check.
    assert hello[0] != hello[1]


def test_listen_port_past_65535_for_a_rank_is_a_config_error() -> None:
    from kvbm.errors import ConfigError
    from kvbm_tiers_remote.config import RemoteTierConfig
    from kvbm_tiers_remote.tier import RemoteTier

    cfg = RemoteTierConfig(name="remote", listen="127.0.0.1:65535", peers=["127.0.0.1:7100"])
    with pytest.raises(ConfigError, match="'listen'.*65535"):
        RemoteTier.config_for_rank(cfg, 1, 2)


if __name__ == "__main__" and sys.argv[1:2] == ["read"]:
    _reader(json.loads(sys.argv[2]))


def test_worker_publishes_its_served_blocks_in_a_rendezvous_dir_and_a_peer_reads_them(
    v: Any, make: Any, tmp_path: Path
) -> None:
    from kvbm import ContiguousBlocks, KvBlockManager

    rdir = str(tmp_path / "rendezvous")
    e = make(tiers=[{"type": "host", "num_blocks": 64},
                    {"type": "remote", "rendezvous_dir": rdir, "publish_interval_s": 0.05, **FAST}])
    tokens = prompt(50, seed=46)
    e.add("a", tokens, max_tokens=1)
    e.run()
    model = {"name": v.model_dir, "num_layers": len(LAYERS), "num_kv_heads": HEADS,
             "head_dim": HEAD, "dtype": "float32", "outer_dim": 2}
    b = KvBlockManager.from_config({
        "model": model, "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 16},
                  {"type": "remote", "rendezvous_dir": rdir, "publish_interval_s": 0.05, **FAST}],
    }, physical=e.workers[0].worker_side.layout.physical)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the worker republishes its keys every 0.05 s
            with b.match_prefix(tokens[:48]) as m:
                if m.num_blocks == 3:
                    break
            time.sleep(0.05)
        out = np.zeros((3, b.block_bytes), dtype=np.uint8)
        with b.match_prefix(tokens[:48]) as m:
            assert list(m.tiers) == ["remote"] * 3
            assert b.onboard(m, ContiguousBlocks(out, b.layout), promote=False).loaded == 3
        for i in range(3):
            assert out[i].tobytes() == expected_block(tokens, i), f"block {i}"
    finally:
        b.close()


def test_tp2_instance_reads_each_ranks_shard_from_the_same_rank_of_another_instance(
    make: Any, v: Any
) -> None:
    # Two vLLM instances at TP=2 in one process, each listing the other as its peer:
    # B's rank r probes and reads A's rank r, on listen port + r.
    pa, pb = _free_pair(), _free_pair()
    a = engine(make, (pa, pb), tp=2)
    tokens = prompt(50, seed=47)
    a.add("w", tokens, max_tokens=1)
    a.run()
    base.settle(a)
    assert [len(w.worker_side.served[0]) for w in a.workers] == [3, 3]  # host tier (0)
    b = engine(make, (pb, pa), tp=2)
    b.scrub()  # whatever the request finds in its blocks can only come from kvbm
    req = b.add("b", tokens, max_tokens=3)
    b.step()
    b.run(until=lambda: "b" in b.step_outputs[-1].num_scheduled_tokens)
    assert b.step_outputs[-1].num_scheduled_tokens["b"] == 50 - 48
    assert b.side.adopted_blocks == 3
    b.assert_prefix_kv(req, 3)  # each rank's own shard, byte for byte
    b.run()
    assert b.side.loaded_blocks == 3 and b.pins() == 0
    served = [w.worker_side.tiers[1].stats()["served_blocks"] for w in a.workers]
    assert served == [3, 3]
