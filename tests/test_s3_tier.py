"""The s3 tier against a real moto server process on 127.0.0.1 (no boto3 mocking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from kvbm import ContiguousBlocks, KvBlockManager, Namespace, build_plugins  # noqa: E402
from kvbm.cli import main as kvbm_main  # noqa: E402
from kvbm.errors import ConfigError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.tier import TierContext  # noqa: E402
from kvbm_tiers_s3.config import S3TierConfig  # noqa: E402
from kvbm_tiers_s3.tier import S3Tier  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from s3server import BUCKET, SECRET_KEY, MotoServer  # noqa: E402

MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}
PAGE = 16
LAYOUT = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16",
                               name="tiny"), PAGE)
BB = LAYOUT.bytes_per_block


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = MotoServer()
    s.start()
    yield s
    s.stop()


def make_tier(server: MotoServer, ns: str, endpoint: str | None = None, **over: Any) -> S3Tier:
    """An S3Tier on its own namespace (one per test keeps tests apart in one bucket);
    ``endpoint`` points it elsewhere than ``server`` (a fault proxy in front of it)."""
    cfg = S3TierConfig.model_validate({**server.tier_config(endpoint, **over), "name": "s3"})
    namespace = Namespace(model_id=ns, layout_digest=LAYOUT.digest)
    return S3Tier(cfg, TierContext("s3", namespace, LAYOUT, cfg.resolve_num_blocks(BB)))


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BB), dtype=np.uint8)


def keys(n: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed + 1000)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(n)]


def manager_config(server: MotoServer, model: str, host_blocks: int = 4, **s3: Any) -> dict[str, Any]:
    return {
        "model": {**MODEL, "name": model}, "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": host_blocks, "touch": False},
                  server.tier_config(**s3)],
    }


# -- plugin and config --------------------------------------------------------
def test_plugin_registers_s3_tier_needing_boto3() -> None:
    entry = build_plugins().tiers.get("s3")
    assert entry.factory == "kvbm_tiers_s3.tier:S3Tier"
    assert entry.extra == "s3" and entry.requires == ("boto3",)
    assert entry.available and entry.load() is S3Tier
    assert S3Tier.shared is True and S3Tier.medium == "OBJECT" and S3Tier.kind == "s3"


def test_config_check_never_prints_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVBM_TEST_S3_KEY_ID", "AKIAKVBMTESTKEYID")
    monkeypatch.setenv("KVBM_TEST_S3_SECRET", "sup3r-s3cret-value")
    monkeypatch.setenv("KVBM_TEST_S3_TOKEN", "t0ken-value")
    f = tmp_path / "kvbm.yaml"
    f.write_text(textwrap.dedent("""\
        model: {name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 16, dtype: float16}
        tiers:
          - {type: host, num_blocks: 4}
          - type: s3
            bucket: kv-cache
            endpoint_url: http://127.0.0.1:9
            aws_access_key_id: ${KVBM_TEST_S3_KEY_ID}
            aws_secret_access_key: ${KVBM_TEST_S3_SECRET}
            aws_session_token: $KVBM_TEST_S3_TOKEN
        """))
    assert kvbm_main(["config", "check", str(f)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "aws_secret_access_key" in text and "ok" in text
    for secret in ("AKIAKVBMTESTKEYID", "sup3r-s3cret-value", "t0ken-value"):
        assert secret not in text


def test_config_error_never_prints_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVBM_TEST_S3_SECRET", "sup3r-s3cret-value")
    f = tmp_path / "kvbm.yaml"
    f.write_text(textwrap.dedent("""\
        tiers:
          - type: s3
            bucket: Not_A_Bucket
            endpoint_url: http://user:pa55word@127.0.0.1:9
            aws_secret_access_key: ${KVBM_TEST_S3_SECRET}
        """))
    assert kvbm_main(["config", "check", str(f)]) == 2
    err = capsys.readouterr().err
    assert "'bucket'" in err and "'endpoint_url'" in err
    assert "pa55word" not in err and "sup3r-s3cret-value" not in err


def test_unset_environment_variable_is_named_in_the_error() -> None:
    os.environ.pop("KVBM_TEST_S3_UNSET", None)
    with pytest.raises(ConfigError, match="KVBM_TEST_S3_UNSET is not set"):
        KvBlockManager.from_config({"tiers": [{"type": "s3", "bucket": "kv-cache",
                                               "aws_secret_access_key": "${KVBM_TEST_S3_UNSET}"}]})


def test_missing_bucket_is_a_config_error_naming_it(server: MotoServer) -> None:
    with pytest.raises(ConfigError, match="'no-such-bucket' does not exist"):
        make_tier(server, "missing-bucket", bucket="no-such-bucket")


# -- objects ------------------------------------------------------------------
def test_object_key_is_prefix_namespace_hash(server: MotoServer) -> None:
    tier = make_tier(server, "naming", prefix="/team/kv/")
    k = keys(1, 1)[0]
    assert tier.write([0], [k], [blocks(1, 1)[0]]) == [True]
    ns = Namespace(model_id="naming", layout_digest=LAYOUT.digest).hex
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"team/kv/{ns}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"team/kv/{ns}/{k.hex()}"]
    tier.close()


def test_written_blocks_read_back_byte_exact(server: MotoServer) -> None:
    tier = make_tier(server, "roundtrip")
    data, ks = blocks(6, 2), keys(6, 2)
    assert tier.write(range(6), ks, list(data)) == [True] * 6
    out = np.zeros_like(data)
    assert tier.read(range(6), ks, list(out)) == [True] * 6
    assert np.array_equal(out, data)
    tier.close()


def test_overwritten_object_fails_its_checksum_and_is_a_miss(server: MotoServer) -> None:
    tier = make_tier(server, "tamper")
    data, ks = blocks(3, 3), keys(3, 3)
    tier.write(range(3), ks, list(data))
    raw = server.client()
    obj = tier.object_key(ks[1])
    meta = raw.head_object(Bucket=BUCKET, Key=obj)["Metadata"]
    bad = data[1].copy()
    bad[100] ^= 0xFF
    raw.put_object(Bucket=BUCKET, Key=obj, Body=bad.tobytes(), Metadata=meta)
    fresh = make_tier(server, "tamper")
    out = np.zeros_like(data)
    assert fresh.read(range(3), ks, list(out)) == [True, False, True]
    assert fresh.stats()["checksum_failures"] == 1
    tier.close()
    fresh.close()


def test_rewrite_replaces_an_object_that_failed_its_checksum(server: MotoServer) -> None:
    tier = make_tier(server, "heal")
    data, ks = blocks(1, 4), keys(1, 4)
    raw = server.client()
    tier.write([0], ks, list(data))
    obj = tier.object_key(ks[0])
    meta = raw.head_object(Bucket=BUCKET, Key=obj)["Metadata"]
    raw.put_object(Bucket=BUCKET, Key=obj, Body=bytes(BB), Metadata=meta)
    fresh = make_tier(server, "heal")
    out = np.zeros_like(data)
    assert fresh.read([0], ks, list(out)) == [False]
    assert fresh.write([0], ks, list(data)) == [True]  # unconditional: replaces the bad copy
    assert fresh.read([0], ks, list(out)) == [True]
    assert np.array_equal(out, data)
    tier.close()
    fresh.close()


def test_object_of_another_layout_is_a_miss(server: MotoServer) -> None:
    tier = make_tier(server, "layout")
    data, ks = blocks(2, 5), keys(2, 5)
    tier.write(range(2), ks, list(data))
    raw = server.client()
    obj = tier.object_key(ks[0])
    meta = raw.head_object(Bucket=BUCKET, Key=obj)["Metadata"]
    raw.put_object(Bucket=BUCKET, Key=obj, Body=data[0].tobytes(),
                   Metadata={**meta, "kvbm-layout": "0123456789abcdef"})
    fresh = make_tier(server, "layout")
    assert fresh.probe(ks) == [False, False]
    out = np.zeros_like(data)
    assert fresh.read(range(2), ks, list(out)) == [False, True]
    tier.close()
    fresh.close()


def test_short_object_is_a_miss(server: MotoServer) -> None:
    tier = make_tier(server, "short")
    data, ks = blocks(1, 6), keys(1, 6)
    tier.write([0], ks, list(data))
    raw = server.client()
    obj = tier.object_key(ks[0])
    meta = raw.head_object(Bucket=BUCKET, Key=obj)["Metadata"]
    raw.put_object(Bucket=BUCKET, Key=obj, Body=data[0].tobytes()[: BB // 2], Metadata=meta)
    fresh = make_tier(server, "short")
    assert fresh.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
    tier.close()
    fresh.close()


def test_conditional_put_keeps_the_first_upload(server: MotoServer) -> None:
    a, b = make_tier(server, "cond"), make_tier(server, "cond")
    k = keys(1, 7)
    first, second = blocks(2, 7)
    assert a.write([0], k, [first]) == [True]
    assert b.write([0], k, [second]) == [True]
    assert b.stats()["put_exists"] == 1 and b.stats()["puts"] == 0
    body = server.client().get_object(Bucket=BUCKET, Key=a.object_key(k[0]))["Body"].read()
    assert body == first.tobytes()
    a.close()
    b.close()


def test_head_mode_checks_existence_before_put(server: MotoServer) -> None:
    a = make_tier(server, "headmode")
    b = make_tier(server, "headmode", conditional_put="head")
    k = keys(1, 8)
    a.write([0], k, list(blocks(1, 8)))
    assert b.write([0], k, list(blocks(1, 9))) == [True]
    st = b.stats()
    assert st["heads"] == 1 and st["put_exists"] == 1 and st["puts"] == 0
    a.close()
    b.close()


def test_probe_stops_at_the_first_missing_block(server: MotoServer) -> None:
    tier = make_tier(server, "probe")
    ks, data = keys(4, 10), blocks(4, 10)
    tier.write([0, 1, 3], [ks[0], ks[1], ks[3]], [data[0], data[1], data[3]])
    fresh = make_tier(server, "probe")
    assert fresh.probe(ks) == [True, True, False, False]
    tier.close()
    fresh.close()


def test_packed_run_is_one_object_per_pack_and_reads_back(server: MotoServer) -> None:
    tier = make_tier(server, "pack", pack_blocks=4)
    data, ks = blocks(10, 11), keys(10, 11)
    assert tier.write(range(10), ks, list(data)) == [True] * 10
    ns = Namespace(model_id="pack", layout_digest=LAYOUT.digest).hex
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"t/{ns}/")
    sizes = sorted(o["Size"] for o in listed["Contents"])
    assert sizes == [0] * 7 + [2 * BB, 4 * BB, 4 * BB]  # 3 packs, a pointer per later block
    fresh = make_tier(server, "pack", pack_blocks=4)
    assert fresh.probe(ks) == [True] * 10
    assert fresh.stats()["heads"] == 3  # one per pack: the rest is vouched for by metadata
    out = np.zeros_like(data)
    middle = [2, 3, 4, 5]  # spans two packs: two ranged GETs
    assert fresh.read(middle, [ks[i] for i in middle], [out[i] for i in middle]) == [True] * 4
    assert np.array_equal(out[2:6], data[2:6])
    tier.close()
    fresh.close()


def test_delete_on_evict_deletes_discarded_objects(server: MotoServer) -> None:
    tier = make_tier(server, "evict", delete_on_evict=True)
    data, ks = blocks(3, 12), keys(3, 12)
    tier.write(range(3), ks, list(data))
    tier.discard([0, 1], ks[:2])
    tier.close()  # waits for the background delete
    ns = Namespace(model_id="evict", layout_digest=LAYOUT.digest).hex
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"t/{ns}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"t/{ns}/{ks[2].hex()}"]


# -- through the manager ---------------------------------------------------------
def test_a_cascade_into_s3_sends_no_put_while_a_load_is_in_flight_then_every_block(
        server: MotoServer) -> None:
    """The cascade writes S3 in one part, so it yields request by request: no PUT
    leaves while a load is in flight; after it, every block reads back byte-exact."""
    cfg = {**manager_config(server, "yields", host_blocks=8), "background_yield_ms": 30000}
    mgr = KvBlockManager.from_config(cfg)
    tokens = list(range(4 * PAGE))
    hashes = mgr.hash_tokens(tokens)
    data = blocks(4, 17)
    with mgr.executor.foreground.active():  # a load that takes its time
        mgr.offload(hashes, ContiguousBlocks(data, mgr.layout))
        assert mgr.flush(timeout=0.5) is False, "the cascade did not wait for the load"
        assert mgr.stats()["tiers"]["s3"].get("puts", 0) == 0
    assert mgr.flush(timeout=30)
    assert mgr.stats()["tiers"]["s3"]["puts"] == 4
    mgr.close()
    only_s3 = KvBlockManager.from_config({**cfg, "tiers": cfg["tiers"][1:]})
    with only_s3.match_prefix(tokens) as m:
        assert m.num_blocks == 4 and m.tiers == ["s3"] * 4
        out = np.zeros_like(data)
        assert only_s3.onboard(m, ContiguousBlocks(out, only_s3.layout)).loaded == 4
    only_s3.close()
    assert np.array_equal(out, data)


def test_blocks_roundtrip_through_a_host_and_s3_chain(server: MotoServer) -> None:
    mgr = KvBlockManager.from_config(manager_config(server, "chain", host_blocks=4))
    tokens = list(range(12 * PAGE))
    hashes = mgr.hash_tokens(tokens)
    data = blocks(12, 13)
    src = ContiguousBlocks(data, mgr.layout)
    for s in range(0, 12, 4):  # one engine step at a time: the host tier holds 4
        mgr.offload(hashes[s : s + 4], src, indices=range(s, s + 4))
        mgr.flush()
    with mgr.match_prefix(tokens) as m:
        assert m.num_blocks == 12 and "s3" in m.tiers
        out = np.zeros_like(data)
        assert mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded == 12
    assert np.array_equal(out, data)
    assert mgr.stats()["tiers"]["s3"]["puts"] == 12
    mgr.close()


WRITER = """
import json, sys
import numpy as np
from kvbm import ContiguousBlocks, KvBlockManager
cfg, n, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mgr = KvBlockManager.from_config(cfg)
tokens = list(range(n * 16))
data = np.random.default_rng(seed).integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
hashes = mgr.hash_tokens(tokens)
mgr.offload(hashes, ContiguousBlocks(data, mgr.layout))
mgr.flush()
print(json.dumps(mgr.stats()["tiers"]["s3"]["puts"]))
mgr.close()
"""


def test_second_process_onboards_blocks_byte_exact(server: MotoServer) -> None:
    cfg = manager_config(server, "shared", host_blocks=8)
    n = 6
    r = subprocess.run([sys.executable, "-c", WRITER, json.dumps(cfg), str(n), "14"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == n
    mgr = KvBlockManager.from_config(cfg)
    with mgr.match_prefix(list(range(n * PAGE))) as m:
        assert m.tiers == ["s3"] * n
        out = np.zeros((n, BB), np.uint8)
        assert mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded == n
    assert np.array_equal(out, blocks(n, 14))
    mgr.close()


def test_secret_never_appears_in_tier_stats_or_repr(server: MotoServer) -> None:
    tier = make_tier(server, "repr")
    assert SECRET_KEY not in repr(tier.cfg) and SECRET_KEY not in json.dumps(tier.stats())
    tier.close()


def test_pack_whose_first_block_exists_alone_still_stores_the_others(server: MotoServer) -> None:
    single = make_tier(server, "pack-clash")
    packer = make_tier(server, "pack-clash", pack_blocks=4)
    data, ks = blocks(4, 15), keys(4, 15)
    single.write([0], ks[:1], [data[0]])
    assert packer.write(range(4), ks, list(data)) == [True] * 4
    fresh = make_tier(server, "pack-clash")
    assert fresh.probe(ks) == [True] * 4
    out = np.zeros_like(data)
    assert fresh.read(range(4), ks, list(out)) == [True] * 4
    assert np.array_equal(out, data)
    for t in (single, packer, fresh):
        t.close()


def test_first_block_of_an_unknown_pack_reads_without_a_probe(server: MotoServer) -> None:
    packer = make_tier(server, "pack-unknown", pack_blocks=4)
    data, ks = blocks(4, 16), keys(4, 16)
    packer.write(range(4), ks, list(data))
    fresh = make_tier(server, "pack-unknown")
    out = np.zeros(BB, np.uint8)
    assert fresh.read([0], ks[:1], [out]) == [True]
    assert np.array_equal(out, data[0])
    packer.close()
    fresh.close()


def test_probe_of_a_prompt_never_stored_sends_one_head(server: MotoServer) -> None:
    tier = make_tier(server, "probe-cold")
    assert tier.probe(keys(64, 17)) == [False] * 64
    assert tier.stats()["heads"] == 1
    tier.close()


def test_put_body_reads_the_block_in_pieces_and_rewinds_without_copying_it() -> None:
    from kvbm_tiers_s3._wire import BlockBody

    data = blocks(1, 21)[0]
    body = BlockBody(data.data)
    pieces = [body.read(1000) for _ in range(-(-BB // 1000))]
    assert b"".join(pieces) == data.tobytes() and len(body.read(1000)) == 0
    assert all(isinstance(p, memoryview) and p.obj is not None for p in pieces)  # slices, no copies
    assert body.seek(0, 2) == BB and body.tell() == BB  # botocore's length: end minus position
    assert body.seek(0) == 0 and bytes(body.read()) == data.tobytes()  # a retry reads it again


def test_probe_sends_a_lone_head_from_the_calling_thread(server: MotoServer) -> None:
    # A match waits on its probe: a wave of one HEAD must not hop through the read pool.
    import threading

    tier = make_tier(server, "probe-thread")
    tier.write([0], keys(1, 19), list(blocks(1, 19)))
    fresh = make_tier(server, "probe-thread")
    threads: list[int] = []
    head = fresh._head

    def spy(obj: str, key: Any) -> Any:
        threads.append(threading.get_ident())
        return head(obj, key)

    fresh._head = spy  # type: ignore[method-assign]
    assert fresh.probe(keys(1, 19) + keys(3, 20)) == [True, False, False, False]
    assert threads[0] == threading.get_ident()
    tier.close()
    fresh.close()


def test_fresh_tier_probes_and_reads_a_block_from_the_middle_of_a_pack(server: MotoServer) -> None:
    packer = make_tier(server, "pack-middle", pack_blocks=4)
    data, ks = blocks(8, 18), keys(8, 18)
    assert packer.write(range(8), ks, list(data)) == [True] * 8
    fresh = make_tier(server, "pack-middle")  # empty existence cache, packs nothing itself
    assert fresh.probe(ks[2:]) == [True] * 6
    out = np.zeros(BB, np.uint8)
    assert fresh.read([0], [ks[2]], [out]) == [True]
    assert np.array_equal(out, data[2])
    packer.close()
    fresh.close()


def test_mid_pack_block_reads_without_a_probe_through_its_pointer(server: MotoServer) -> None:
    packer = make_tier(server, "pack-pointer-read", pack_blocks=4)
    data, ks = blocks(4, 19), keys(4, 19)
    packer.write(range(4), ks, list(data))
    fresh = make_tier(server, "pack-pointer-read")
    out = np.zeros(BB, np.uint8)
    assert fresh.read([0], [ks[3]], [out]) == [True]
    assert np.array_equal(out, data[3]) and fresh.stats()["pointer_redirects"] == 1
    packer.close()
    fresh.close()


def test_mid_pack_block_that_fails_the_pack_checksum_is_a_miss(server: MotoServer) -> None:
    packer = make_tier(server, "pack-pointer-bad", pack_blocks=4)
    data, ks = blocks(4, 20), keys(4, 20)
    packer.write(range(4), ks, list(data))
    obj = packer.object_key(ks[0])
    c = server.client()
    head = c.head_object(Bucket=BUCKET, Key=obj)
    body = bytearray(data.tobytes())
    body[2 * BB + 7] ^= 0xFF  # block 2 of the pack, same length and metadata
    c.put_object(Bucket=BUCKET, Key=obj, Body=bytes(body), Metadata=head["Metadata"])
    fresh = make_tier(server, "pack-pointer-bad")
    assert fresh.read([0], [ks[2]], [np.zeros(BB, np.uint8)]) == [False]
    assert fresh.stats()["checksum_failures"] == 1
    packer.close()
    fresh.close()


def test_pointer_to_a_pack_that_is_gone_is_a_miss(server: MotoServer) -> None:
    packer = make_tier(server, "pack-pointer-gone", pack_blocks=4)
    data, ks = blocks(4, 21), keys(4, 21)
    packer.write(range(4), ks, list(data))
    server.client().delete_object(Bucket=BUCKET, Key=packer.object_key(ks[0]))
    fresh = make_tier(server, "pack-pointer-gone")
    assert fresh.probe(ks[1:]) == [False] * 3
    assert fresh.read([0], [ks[1]], [np.zeros(BB, np.uint8)]) == [False]
    packer.close()
    fresh.close()


def test_delete_on_evict_deletes_a_pack_with_its_pointers(server: MotoServer) -> None:
    tier = make_tier(server, "pack-evict", pack_blocks=4, delete_on_evict=True)
    data, ks = blocks(4, 22), keys(4, 22)
    tier.write(range(4), ks, list(data))
    tier.discard(range(4), ks)
    tier.close()  # waits for the background delete
    ns = Namespace(model_id="pack-evict", layout_digest=LAYOUT.digest).hex
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"t/{ns}/")
    assert listed["KeyCount"] == 0
