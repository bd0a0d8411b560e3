"""Shared fixtures: a small model so tests move kilobytes, not megabytes."""

from __future__ import annotations

import logging
from typing import Any

import pytest

SMALL_MODEL: dict[str, Any] = {
    "name": "tiny",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 8,
    "dtype": "float32",
}
PAGE = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_kvbm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no KVBM_*/DYN_KVBM_* variables from the developer's shell."""
    import os

    for k in list(os.environ):
        if k.startswith(("KVBM_", "DYN_KVBM_")):
            monkeypatch.delenv(k)


@pytest.fixture
def small_config() -> dict[str, Any]:
    """A config dict with a tiny model and one 16-block host tier."""
    return {"model": dict(SMALL_MODEL), "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": 16}]}


@pytest.fixture
def caplog_kvbm(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="kvbm")
    return caplog
