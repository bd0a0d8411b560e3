"""One object on the wire: a GET received straight into the destination buffers, a
HEAD, and what their metadata says (see ``objects``).

These functions send one attempt and raise what the answer means (``BadObject``,
``Redirect`` to a pack, ``Truncated``); the tier runs them through
``Requests.call`` for retries, the deadline and the breaker.
"""

from __future__ import annotations

import http.client
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.hashing import SequenceHash

from ._requests import BadObject, Redirect, Truncated
from .objects import MetaCodec, ObjectMeta, PackPointer


def get_blocks(
    client: Any,
    bucket: str,
    obj: str,
    codec: MetaCodec,
    members: list[tuple[int, int]],
    count: int,
    keys: Sequence[SequenceHash],
    dst: Sequence[np.ndarray],
    *,
    follow: bool,
    zero_copy: bool,
) -> ObjectMeta:
    """GET ``members`` (object position, batch index) of object ``obj``, thought to
    hold ``count`` blocks, into ``dst``; ranged unless it covers the whole object.

    Returns the object's metadata (the checksums to check the bytes against).
    Raises ``Redirect`` for a pointer (if ``follow``), ``BadObject`` for an object
    that is not ours or not the blocks asked for, ``Truncated`` for a short body.
    """
    bb = codec.block_bytes
    first, last = members[0][0], members[-1][0]
    want = {pos: i for pos, i in members}
    span = last - first + 1
    kw: dict[str, Any] = {}
    ranged = first != 0 or last + 1 != count
    if ranged:
        kw["Range"] = f"bytes={first * bb}-{(last + 1) * bb - 1}"
    r = client.get_object(Bucket=bucket, Key=obj, **kw)
    body = r["Body"]
    try:
        meta = codec.decode(r.get("Metadata") or {})
        if isinstance(meta, str):
            raise BadObject(meta)
        if isinstance(meta, PackPointer):
            if not follow or ranged or r.get("ContentLength") != 0 or any(
                meta.key != keys[i] for _, i in members
            ):
                raise BadObject("a pack pointer, but not one for the block asked for")
            body.read()  # nothing; ends the response so the connection is reused
            finish(body)
            raise Redirect(meta)
        length = r.get("ContentLength")
        total = range_total(r.get("ContentRange"), length)
        # Unranged, the object may still be a pack this instance did not know
        # of: its first blocks are the ones asked for.
        short_body = length != span * bb if ranged else (length or 0) < span * bb
        if total != meta.count * bb or short_body:
            raise BadObject(
                f"{length} bytes of {total}, expected {span * bb} of {meta.count * bb}"
            )
        for pos, i in members:
            if pos >= meta.count or meta.keys[pos] != keys[i]:
                raise BadObject("holds other blocks than the ones asked for")
        scratch: np.ndarray | None = None
        for pos in range(first, last + 1):
            at = want.get(pos)
            if at is None:
                if scratch is None:
                    scratch = np.empty(bb, dtype=np.uint8)
                buf = scratch
            else:
                buf = dst[at]
            readinto(body, buf, zero_copy)
        if length == span * bb:
            finish(body)
        else:
            body.close()  # the rest of an unexpected pack: drop, don't drain
        return meta
    except Redirect:
        raise
    except BaseException:
        body.close()  # a half-read connection must not go back to the pool
        raise


def head_meta(
    client: Any, bucket: str, obj: str, key: SequenceHash, codec: MetaCodec
) -> ObjectMeta | PackPointer | None:
    """The metadata of object ``obj``, named after ``key`` (a block, a pack starting
    with it, or a pointer to the pack holding it); None if it is not ours."""
    r = client.head_object(Bucket=bucket, Key=obj)
    meta = codec.decode(r.get("Metadata") or {})
    if isinstance(meta, PackPointer):
        return meta if meta.key == key and r.get("ContentLength") == 0 else None
    if isinstance(meta, str) or meta.keys[0] != key:
        return None
    if r.get("ContentLength") != meta.count * codec.block_bytes:
        return None
    return meta


class BlockBody:
    """A read-only, seekable file over a block's memory: the body of a PUT without a copy.

    botocore turns a ``bytes`` body into a ``BytesIO`` anyway, then hashes it (SigV4 over
    plain HTTP signs the payload) and urllib3 sends it, both reading it piece by piece:
    slices of the block's own memory serve both, where a ``bytes`` body costs one copy
    of the block first (and every piece read from it another). The memory must stay
    unchanged until the request returns: the executor holds a cascade's source slots
    until the copy is settled, and a block changed under an upload would fail its
    checksum on every read (a miss, never data).
    """

    def __init__(self, data: memoryview) -> None:
        self._mv = data.cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> memoryview:
        """Up to ``n`` bytes from the position (all that is left if ``n`` < 0)."""
        end = len(self._mv) if n is None or n < 0 else min(len(self._mv), self._pos + n)
        out = self._mv[self._pos : end]
        self._pos = max(self._pos, end)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        """Move the position (``whence`` as ``io``: 0 start, 1 here, 2 end)."""
        base = (0, self._pos, len(self._mv))[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        """The position."""
        return self._pos


def readinto(body: Any, buf: np.ndarray, zero_copy: bool) -> None:
    """Fill ``buf`` from a response body; ``Truncated`` if the body ends early."""
    mv = buf.data.cast("B")
    n, total = 0, len(mv)
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        zero_copy
        and raw is not None
        and isinstance(fp, http.client.HTTPResponse)
        and not raw.headers.get("content-encoding")
    ):
        # Straight from the socket into the destination: urllib3's readinto would
        # read into a temporary bytes object and copy it (twice the memory traffic).
        while n < total:
            k = fp.readinto(mv[n:])
            if not k:
                raise Truncated(f"body ended after {n} of {total} bytes")
            n += k
        return
    while n < total:
        k = body.readinto(mv[n:])
        if not k:
            raise Truncated(f"body ended after {n} of {total} bytes")
        n += k


def finish(body: Any) -> None:
    """Hand the connection back to the pool after the last byte was received."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if raw is not None and isinstance(fp, http.client.HTTPResponse) and fp.isclosed():
        raw.release_conn()
    else:
        body.close()


def range_total(content_range: str | None, content_length: int | None) -> int | None:
    """The object size from ``Content-Range: bytes a-b/total`` (or the length if absent)."""
    if not content_range:
        return content_length
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None
