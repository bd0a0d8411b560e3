"""Sequence hashes: chained, salted by namespace, deterministic, Dynamo-compatible."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvbm import BlockHasher, Namespace, TokenError
from kvbm.hashing import dynamo_block_hash, dynamo_sequence_hashes

NS = Namespace(model_id="m", layout_digest="abc")


def hasher(ns: Namespace = NS, page: int = 4, algorithm: str = "xxh3_128") -> BlockHasher:
    return BlockHasher(ns, page, algorithm)  # type: ignore[arg-type]


def test_only_complete_blocks_get_a_hash() -> None:
    assert len(hasher().hash_tokens(list(range(11)))) == 2


def test_hashes_are_16_bytes() -> None:
    assert all(len(h) == 16 for h in hasher().hash_tokens(list(range(8))))


def test_a_block_hash_depends_on_every_earlier_block() -> None:
    a = hasher().hash_tokens([1, 2, 3, 4, 5, 6, 7, 8])
    b = hasher().hash_tokens([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]


def test_shared_prefix_gives_shared_leading_hashes() -> None:
    a = hasher().hash_tokens([1, 2, 3, 4, 5, 6, 7, 8])
    b = hasher().hash_tokens([1, 2, 3, 4, 9, 9, 9, 9])
    assert a[0] == b[0] and a[1] != b[1]


def test_parent_continues_a_chain() -> None:
    whole = hasher().hash_tokens(list(range(12)))
    tail = hasher().hash_tokens(list(range(4, 12)), parent=whole[0])
    assert tail == whole[1:]


@pytest.mark.parametrize(
    "field", [{"model_id": "other"}, {"layout_digest": "x"}, {"tp_rank": 1}, {"tp_size": 2},
              {"lora_name": "l"}, {"cache_salt": "s"}])
def test_every_namespace_field_salts_the_hash(field: dict[str, object]) -> None:
    other = Namespace(**{**NS.__dict__, **field})  # type: ignore[arg-type]
    assert hasher(other).hash_tokens([1, 2, 3, 4]) != hasher().hash_tokens([1, 2, 3, 4])


def test_list_numpy_and_torch_tokens_hash_the_same() -> None:
    torch = pytest.importorskip("torch")
    toks = [5, 6, 7, 8, 9, 10, 11, 12]
    h = hasher()
    assert h.hash_tokens(toks) == h.hash_tokens(np.array(toks, dtype=np.int64)) == h.hash_tokens(torch.tensor(toks))


def test_hashes_are_the_same_in_another_process() -> None:
    code = ("from kvbm import BlockHasher, Namespace;"
            "h = BlockHasher(Namespace(model_id='m', layout_digest='abc'), 4);"
            "print(b''.join(h.hash_tokens(list(range(64)))).hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip()
            for seed in (1, 2)}
    assert runs == {b"".join(hasher().hash_tokens(list(range(64)))).hex()}


def test_sha256_algorithm_differs_from_xxh3_and_is_chained() -> None:
    a = hasher(algorithm="sha256").hash_tokens(list(range(8)))
    assert a != hasher().hash_tokens(list(range(8))) and a[0] != a[1]


@pytest.mark.parametrize("bad", [[1.5, 2.0], ["a", "b"], [[1, 2], [3, 4]]])
def test_non_integer_or_non_flat_tokens_are_rejected(bad: object) -> None:
    with pytest.raises(TokenError):
        hasher().hash_tokens(bad)


def test_out_of_range_token_ids_are_rejected() -> None:
    with pytest.raises(TokenError, match="min -1"):
        hasher().hash_tokens([-1, 2, 3, 4])


def test_dynamo_block_hash_matches_published_vector() -> None:
    assert dynamo_block_hash([1, 2, 3, 4], seed=1337) == 14643705804678351452


def test_dynamo_sequence_hash_matches_published_vector() -> None:
    assert dynamo_sequence_hashes([1, 2, 3, 4, 5, 6, 7, 8], page_size=4, seed=1337) == [
        14643705804678351452, 4945711292740353085]
