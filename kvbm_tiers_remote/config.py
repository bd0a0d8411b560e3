"""Config keys of the remote tier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kvbm.config import TierConfig


def _check_addr(value: str, key: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{key} {value!r} is not host:port; write e.g. '127.0.0.1:7100'")
    return value


class RemoteTierConfig(TierConfig):
    """``{type: remote, peers: [127.0.0.1:7101], listen: 127.0.0.1:7100}``.

    The remote tier reads blocks from the host tiers of configured peers over NIXL,
    and serves this instance's host tier to them. Peers are found through a list of
    addresses (``peers``), a shared directory (``rendezvous_dir``) or both; only
    configured peers are served. It stores nothing itself (it takes no offloads), so
    its ``num_blocks`` only bounds how many peer blocks the registry tracks.
    """

    type: Literal["remote"] = "remote"
    num_blocks: int | None = Field(65536, gt=0, description="peer blocks the registry tracks")
    listen: str = Field(
        "127.0.0.1:0",
        description="host:port of this instance's metadata server (port 0 picks a free one; "
        "give a fixed port when peers list this instance by address)",
    )
    peers: list[str] = Field(
        default_factory=list, description="host:port of each peer's metadata server"
    )
    rendezvous_dir: str | None = Field(
        None,
        description="a directory shared by the instances: each publishes its NIXL metadata, "
        "address and served hashes there, and serves the others that publish there",
    )
    instance_id: str | None = Field(
        None, description="this instance's name among its peers (default: host-pid-random)"
    )
    serve: bool = Field(True, description="expose this instance's host tier to the peers")
    serve_tier: str | None = Field(
        None, description="name of the tier to expose (default: the first host tier)"
    )
    lease_timeout_s: float = Field(
        30.0, gt=0, description="a reader's pins on served blocks are dropped after this"
    )
    request_timeout_s: float = Field(2.0, gt=0, description="timeout of one metadata request")
    transfer_timeout_s: float = Field(10.0, gt=0, description="timeout of one NIXL READ")
    retry_after_s: float = Field(
        2.0, ge=0, description="a peer that failed is tried again after this"
    )
    publish_interval_s: float = Field(
        0.25, gt=0, description="how often the served hashes are republished (rendezvous_dir)"
    )
    stale_intervals: int = Field(
        8, ge=2,
        description="a peer's file in rendezvous_dir whose heartbeat is older than this many of "
        "the peer's publish intervals is ignored (the peer was killed without cleaning up)",
    )
    pipeline_bytes: int = Field(
        32 << 20, gt=0, description="bytes per pipelined lease + READ step of one batch"
    )
    checksum_cache: bool = Field(
        True,
        description="serving side: remember each block's xxh3 from its first lease instead of "
        "hashing it on every lease (a stale sum only causes a miss, then a recompute)",
    )
    progress_thread: bool = Field(
        False,
        description="run NIXL's progress thread (it polls a core even when idle); when off, "
        "the reader progresses its own transfers and the server only while readers are active",
    )
    ucx_net_devices: str | None = Field(
        None, description="UCX_NET_DEVICES for this process, e.g. 'lo' to stay on loopback"
    )
    ucx_tls: str | None = Field(None, description="UCX_TLS for this process, e.g. 'sm,cma,self'")
    ucx_error_handling_mode: Literal["none", "peer"] | None = Field(
        None, description="UCX backend option; 'none' is needed with UCX_TLS=sm,cma,self"
    )

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        return [_check_addr(p, "peer") for p in v]

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_addr(v, "listen address")

    @model_validator(mode="after")
    def _some_rendezvous(self) -> RemoteTierConfig:
        if not self.peers and not self.rendezvous_dir:
            raise ValueError(
                "no rendezvous: give 'peers' (a list of host:port) or 'rendezvous_dir' "
                "(a directory the instances share)"
            )
        return self
