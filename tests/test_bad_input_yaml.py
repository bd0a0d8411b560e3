"""The YAML reader: bounded work on hostile files, ``$VAR`` only in scalar values."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvbm import ConfigError, load_settings
from kvbm.cli import main
from kvbm.config_yaml import MAX_CONFIG_BYTES

# The 450-byte, 8-level alias bomb: 9**8 (43 million) leaves when expanded.
ALIAS_BOMB = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 8)]
    + ["tiers: *l7\n"]
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kvbm.yaml"
    p.write_text(text)
    return p


def test_an_alias_bomb_is_refused_before_anything_expands_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert len(ALIAS_BOMB) < 600
    f = write(tmp_path, ALIAS_BOMB)
    t0 = time.monotonic()
    assert main(["config", "check", str(f)]) == 2
    assert time.monotonic() - t0 < 2.0  # the issue measured 62 s
    assert "anchors and aliases are not accepted" in capsys.readouterr().err


def test_a_file_above_the_size_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    f = tmp_path / "huge.yaml"
    with open(f, "wb") as out:
        out.truncate(64 * MAX_CONFIG_BYTES)  # sparse: 64 MiB of zeros that take no disk
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_settings(f)
    assert time.monotonic() - t0 < 1.0


def test_a_variable_is_expanded_in_a_scalar_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_NAME", "llama-3-70b")
    monkeypatch.setenv("PAGE", "32")
    s = load_settings(write(tmp_path, "model: {name: \"${MODEL_NAME}\"}\npage_size: $PAGE\n"))
    assert (s.model.name, s.page_size) == ("llama-3-70b", 32)


def test_a_variable_is_expanded_in_a_list_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NVME0", "/mnt/nvme0")
    s = load_settings(write(tmp_path, "tiers:\n  - {type: disk, num_blocks: 4, "
                                      "path: [\"$NVME0/kvbm\", /mnt/nvme1/kvbm]}\n"))
    assert s.tiers[0].model_dump()["path"] == ["/mnt/nvme0/kvbm", "/mnt/nvme1/kvbm"]


def test_a_single_quoted_value_is_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/root")
    s = load_settings(write(tmp_path, "model: {name: 'cost-$HOME-${HOME}'}\n"))
    assert s.model.name == "cost-$HOME-${HOME}"


def test_a_double_dollar_is_a_literal_dollar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/root")
    s = load_settings(write(tmp_path, "model: {name: \"a$$HOME\"}\n"))
    assert s.model.name == "a$HOME"


def test_a_variable_is_never_expanded_in_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEY", "page_size")
    with pytest.raises(ConfigError, match=r"key '\$KEY': unknown key"):
        load_settings(write(tmp_path, "$KEY: 32\n"))


def test_a_variables_value_never_becomes_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Expanded over the file's text, this value would close the quoted name and set
    # num_layers; expanded in the parsed value it stays one name.
    monkeypatch.setenv("NAME", 'tiny", num_layers: "99')
    s = load_settings(write(tmp_path, "model: {name: \"$NAME\"}\n"))
    assert (s.model.name, s.model.num_layers) == ('tiny", num_layers: "99', 32)


def test_an_unset_variable_stays_as_written(tmp_path: Path) -> None:
    os.environ.pop("KVBM_TEST_NOT_SET", None)
    s = load_settings(write(tmp_path, "model: {name: \"m-$KVBM_TEST_NOT_SET\"}\n"))
    assert s.model.name == "m-$KVBM_TEST_NOT_SET"


def test_a_kvbm_variable_the_file_refers_to_is_not_an_unknown_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVBM_MY_MODEL", "mine")
    assert load_settings(write(tmp_path, "model: {name: $KVBM_MY_MODEL}\n")).model.name == "mine"
