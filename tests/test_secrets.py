"""No secret reaches a repr, an error, a log line, stats or ``kvbm config check``.

Credentials are planted (through ``${VAR}`` in YAML, ``KVBM_TIERS`` JSON and a dict)
and everything a user or a log collector could see is scanned for them: the
settings' and every tier config's repr and JSON, the manager's stats after real
traffic to a moto server, kvbm's log records at DEBUG and everyone's at INFO, config
errors, and the command's output with and without ``--probe``. Wrong credentials
against a moto server that checks signatures name the key to fix, never its value.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from s3server import BUCKET, REGION, MotoServer  # noqa: E402

from kvbm import ConfigError, ContiguousBlocks, KvBlockManager, load_settings  # noqa: E402
from kvbm.chain import resolve_chain  # noqa: E402
from kvbm.cli import main  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402

from conftest import PAGE, SMALL_MODEL  # noqa: E402

KEY_ID = "AKIAPLANTED7Q3XKEY"
SECRET = "planted-secret-6d1f0c"
TOKEN = "planted-token-a9e2"
PLANTED = (KEY_ID, SECRET, TOKEN)
HEAD = ("model: {name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 8, dtype: float32}\n"
        "page_size: 4\n")


def leaks(*texts: str) -> list[str]:
    """The planted secrets found in ``texts``."""
    return [s for s in PLANTED for t in texts if s in t]


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = MotoServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANTED_KEY_ID", KEY_ID)
    monkeypatch.setenv("PLANTED_SECRET", SECRET)
    monkeypatch.setenv("PLANTED_TOKEN", TOKEN)


def yaml_with_secrets(tmp_path: Path, endpoint: str, bucket: str = BUCKET) -> Path:
    f = tmp_path / "kvbm.yaml"
    f.write_text(HEAD + f"""tiers:
  - {{type: host, num_blocks: 8}}
  - type: s3
    bucket: {bucket}
    prefix: secrets
    endpoint_url: {endpoint}
    region: {REGION}
    addressing_style: path
    aws_access_key_id: ${{PLANTED_KEY_ID}}
    aws_secret_access_key: ${{PLANTED_SECRET}}
    aws_session_token: $PLANTED_TOKEN
    read_deadline_s: 2
""")
    return f


def test_settings_and_tier_configs_show_no_planted_secret(tmp_path: Path, planted: None) -> None:
    f = tmp_path / "kvbm.yaml"
    f.write_text(HEAD + """tiers:
  - {type: host, num_blocks: 8}
  - {type: s3, bucket: kv-cache, aws_access_key_id: $PLANTED_KEY_ID,
     aws_secret_access_key: "${PLANTED_SECRET}", aws_session_token: "${PLANTED_TOKEN}"}
  - type: remote
    rendezvous_s3: {bucket: kv-peers, aws_access_key_id: "${PLANTED_KEY_ID}",
                    aws_secret_access_key: "${PLANTED_SECRET}"}
""")
    settings = load_settings(f)
    links = resolve_chain(settings, build_plugins())
    seen = [repr(settings), str(settings), settings.model_dump_json(),
            repr(settings.model_dump()), repr(settings.tiers)]
    seen += [repr(link.config) for link in links] + [link.config.model_dump_json() for link in links]
    assert len(links) == 3 and not leaks(*seen)
    # The secrets are there for the tier that needs them, behind get_secret_value().
    assert links[1].config.aws_secret_access_key.get_secret_value() == SECRET  # type: ignore[attr-defined]


def test_a_chain_in_use_shows_no_planted_secret_in_reprs_stats_or_logs(
    tmp_path: Path, planted: None, server: MotoServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kvbm")
    mgr = KvBlockManager.from_config(yaml_with_secrets(tmp_path, server.url))
    try:
        eng = ContiguousBlocks(np.ones((8, mgr.block_bytes), np.uint8), mgr.layout)
        hashes = mgr.hash_tokens(list(range(8 * PAGE)))
        mgr.offload(hashes, eng)
        assert mgr.flush(10)
        mgr.release_all_evictable()
        with mgr.match_prefix(hashes) as m:
            mgr.onboard(m, eng, indices=list(range(m.num_blocks)))
        stats = json.dumps(mgr.stats(), default=str)
        assert mgr.stats()["tiers"]["s3"]["puts"] == 8  # the credentials were used
        seen = [repr(mgr.settings), stats, repr(mgr.chain)]
        seen += [repr(ts.config) for ts in mgr.chain]
    finally:
        mgr.close()
    assert not leaks(*seen, caplog.text)


@pytest.mark.parametrize("entry", [
    "{type: s3, bucket: Not_A_Bucket, aws_access_key_id: $PLANTED_KEY_ID, "
    "aws_secret_access_key: $PLANTED_SECRET}",
    "{type: s3, bucket: kv-cache, aws_access_key_id: $PLANTED_KEY_ID, "
    "aws_secret_access_key: [$PLANTED_SECRET]}",
    "{type: s3, bucket: kv-cache, aws_secret_acess_key: $PLANTED_SECRET}",
    "{type: s3, bucket: kv-cache, endpoint_url: 'http://user:$PLANTED_SECRET@127.0.0.1:9'}",
    "{type: s3, bucket: kv-cache, aws_session_token: $PLANTED_TOKEN}",
    "{type: remote, rendezvous_s3: {bucket: UPPER, aws_access_key_id: $PLANTED_KEY_ID, "
    "aws_secret_access_key: $PLANTED_SECRET}}",
], ids=["bad-bucket", "secret-as-list", "secret-under-a-typo", "secret-in-url", "token-alone",
        "rendezvous-bad-bucket"])
def test_a_config_error_shows_no_planted_secret(
    entry: str, tmp_path: Path, planted: None, capsys: pytest.CaptureFixture[str],
) -> None:
    f = tmp_path / "kvbm.yaml"
    f.write_text(HEAD + f"tiers:\n  - {{type: host, num_blocks: 4}}\n  - {entry}\n")
    assert main(["config", "check", str(f)]) == 2
    err = capsys.readouterr().err
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(f)
    assert err.startswith("kvbm: error: tier ") and not leaks(err, str(e.value))


@pytest.mark.parametrize("tiers", [
    f'[{{"type": "s3", "bucket": "kv-cache", "aws_secret_access_key": "{SECRET}"',
    f'[{{"type": "s3", "bucket": "Bad_Bucket", "aws_access_key_id": "{KEY_ID}", '
    f'"aws_secret_access_key": "{SECRET}"}}]',
], ids=["not-json", "bad-bucket"])
def test_a_kvbm_tiers_variable_with_secrets_is_never_echoed(
    tiers: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVBM_TIERS", tiers)
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE})
    assert "KVBM_TIERS" in str(e.value) and not leaks(str(e.value))


def test_config_check_with_probe_prints_no_planted_secret(
    tmp_path: Path, planted: None, server: MotoServer, capsys: pytest.CaptureFixture[str],
) -> None:
    ok = yaml_with_secrets(tmp_path, server.url)
    assert main(["config", "check", "--probe", str(ok)]) == 0
    missing = yaml_with_secrets(tmp_path, server.url, bucket="no-such-bucket")
    assert main(["config", "check", "--probe", str(missing)]) == 2
    out = capsys.readouterr()
    assert "aws_secret_access_key: ***" in out.out and "HEAD answered" in out.out
    assert "does not exist" in out.out and not leaks(out.out, out.err)


# -- wrong credentials, against a server that checks them -----------------------------------
@pytest.fixture(scope="module")
def checking_server() -> Iterator[tuple[MotoServer, dict[str, str]]]:
    """A moto server that checks signatures, with one IAM user allowed s3:*."""
    import boto3

    s = MotoServer()
    s.start()
    iam = boto3.client("iam", endpoint_url=s.url, region_name=REGION,
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="kvbm")
    key = iam.create_access_key(UserName="kvbm")["AccessKey"]
    iam.put_user_policy(UserName="kvbm", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    # From now on every request must be signed by a known key.
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    c.request("POST", "/moto-api/reset-auth", body=b"0")
    assert c.getresponse().status == 200
    yield s, {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    s.stop()


def _checked(server: MotoServer, key_id: str, secret: str) -> dict[str, Any]:
    s3 = server.tier_config(name="s3", prefix="auth", aws_access_key_id=key_id,
                            aws_secret_access_key=secret)
    return {"model": SMALL_MODEL, "page_size": PAGE, "tiers": [s3]}


def test_a_wrong_secret_is_named_as_the_key_to_fix(
    checking_server: tuple[MotoServer, dict[str, str]],
) -> None:
    server, key = checking_server
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(_checked(server, key["id"], SECRET))
    assert str(e.value) == (
        f"s3 tier 's3': bucket '{BUCKET}' at s3://{BUCKET}/auth/60916a60ac09ea324d95678f9bef0da1/"
        f" at {server.url}: the secret key does not match the access key id; check "
        "aws_secret_access_key (SignatureDoesNotMatch, HTTP 403)")


def test_an_unknown_key_id_is_named_as_the_key_to_fix(
    checking_server: tuple[MotoServer, dict[str, str]],
) -> None:
    server, _ = checking_server
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(_checked(server, KEY_ID, SECRET))
    assert str(e.value).endswith("the server knows no such access key id; check "
                                 "aws_access_key_id (InvalidAccessKeyId, HTTP 403)")
    assert not leaks(str(e.value))


def test_the_right_credentials_start_the_tier(
    checking_server: tuple[MotoServer, dict[str, str]],
) -> None:
    server, key = checking_server
    KvBlockManager.from_config(_checked(server, key["id"], key["secret"])).close()
