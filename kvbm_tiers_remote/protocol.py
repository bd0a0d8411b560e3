"""The remote tier's control plane: msgpack maps framed by a 4-byte length, over TCP.

Requests (``op``) and replies:

- ``hello {from_id, from_addr}`` → ``{ok, id, agent, metadata, epoch, namespace, block_bytes}``
- ``probe {from_id, from_addr, keys}`` → ``{ok, found: [bool]}``
- ``lease {from_id, from_addr, keys, ttl}`` → ``{ok, lease, blocks: [[addr, xxh3] | None]}``
  (each found block is pinned until ``release`` or ``ttl`` seconds pass)
- ``release {lease}`` → no reply (one-way, so the reader does not wait for it); only
  the connection that took a lease may release it
- ``pump {from_id, from_addr}`` → no reply: a READ of this reader waits on a
  transport that needs the serving side to progress its NIXL worker (UCX over TCP);
  the server progresses it for a second (it does so after ``hello`` too, for the
  endpoint's wire-up)
- ``suspect {from_id, from_addr, keys}`` → no reply: these blocks failed the reader's
  checksum; the server forgets their remembered checksums

A refusal is ``{ok: False, error: "..."}``. Bytes move through NIXL, never here.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

_LEN = struct.Struct("!I")
MAX_FRAME = 64 << 20


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this protocol."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    """Send one framed message."""
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(_LEN.pack(len(body)) + body)


def send_msgs(sock: socket.socket, msgs: list[dict[str, Any]]) -> None:
    """Send several framed messages in one system call."""
    out = bytearray()
    for msg in msgs:
        body = msgpack.packb(msg, use_bin_type=True)
        out += _LEN.pack(len(body))
        out += body
    sock.sendall(out)


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    """Receive one framed message; ConnectionError when the peer is gone."""
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {MAX_FRAME}")
    msg = msgpack.unpackb(_recv_exact(sock, n), raw=False)
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a map, got {type(msg).__name__}")
    return msg


def split_addr(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:7100"`` → ``("127.0.0.1", 7100)``."""
    host, _, port = addr.rpartition(":")
    return host, int(port)
