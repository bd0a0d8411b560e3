"""Config keys of the remote tier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kvbm.config import ProbeContext, ProbeResult, TierConfig
from kvbm.objectstore import S3Connection
from kvbm.safepaths import check_name

#: ``publish_interval_s`` with ``rendezvous_s3`` unless given: each publish is a PUT
#: and each listing a LIST, which S3 bills per request.
S3_PUBLISH_INTERVAL_S = 1.0


def _check_addr(value: str, key: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{key} {value!r} is not host:port; write e.g. '127.0.0.1:7100'")
    return value


class RendezvousS3Config(S3Connection):
    """``rendezvous_s3: {bucket: kv-peers, prefix: prod, endpoint_url: http://minio:9000}``.

    Each instance publishes its peer record as the object
    ``{prefix}/{namespace}/{instance_id}.kvbm-peer``. The connection keys and their
    checks are the core's ``kvbm.objectstore.S3Connection``, as the s3 tier's, so both
    read them the same way (bucket names, unset ``${VAR}`` references, credentials
    as ``SecretStr``, never printed). Only the defaults differ: the prefix, and short
    timeouts because a rendezvous request must never stall the engine (a failed one
    is retried at the next interval).
    """

    bucket: str = Field(..., description="bucket the instances share (it must exist)")
    prefix: str = Field("kvbm-peers", description="key prefix of the peer records")
    connect_timeout_s: float = Field(1.0, gt=0, description="TCP connect timeout of a request")
    read_timeout_s: float = Field(2.0, gt=0, description="socket read timeout of a request")


class RemoteTierConfig(TierConfig):
    """``{type: remote, peers: [127.0.0.1:7101], listen: 127.0.0.1:7100}``.

    The remote tier reads blocks from the host tiers of configured peers over NIXL,
    and serves this instance's host tier to them. Peers are found through a list of
    addresses (``peers``), a shared directory (``rendezvous_dir``) or an S3 prefix
    (``rendezvous_s3``), or a list and one of the two; only configured peers are
    served. It stores nothing itself (it takes no offloads), so its ``num_blocks``
    only bounds how many peer blocks the registry tracks.
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
    rendezvous_s3: RendezvousS3Config | None = Field(
        None,
        description="an S3 prefix shared by the instances, used as rendezvous_dir is (for "
        "hosts without a shared file system); needs boto3: pip install 'kvbm[s3]'",
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
        0.25, gt=0,
        description="how often the served hashes and heartbeat are republished (rendezvous_dir; "
        f"with rendezvous_s3 the default is {S3_PUBLISH_INTERVAL_S}s: each publish is a PUT)",
    )
    stale_intervals: int = Field(
        8, ge=2,
        description="a peer's record (rendezvous_dir or rendezvous_s3) whose heartbeat is older "
        "than this many of the peer's publish intervals is ignored (the peer was killed without cleaning up)",
    )
    pipeline_bytes: int = Field(
        256 << 20,
        gt=0,
        description="bytes per leased step of one batch (the first step is one READ long); "
        "fewer, larger steps cost the peer fewer requests",
    )
    verify_bytes: int = Field(
        8 << 20,
        gt=0,
        description="bytes per READ inside a step; the thread that READ a part hashes it "
        "right after, so keep it well under the last-level cache (the bytes are hashed while still cached); "
        "each READ also costs NIXL's per-transfer set-up (4 MiB READs: a tenth of the copy)",
    )
    read_threads: int = Field(
        2,
        ge=1,
        le=8,
        description="threads that READ one batch, each with its own NIXL agent (one agent "
        "runs one transfer at a time) and each hashing what it READ while the others copy; "
        "1: the calling thread READs and hashes every part itself",
    )
    verify: Literal["checksum", "lease"] = Field(
        "checksum",
        description="how a reader trusts the bytes it READ: 'checksum' hashes every block "
        "(xxh3) against the peer's sum; 'lease' trusts a block whose READ ended while its "
        "lease still pinned it (the peer cannot have rewritten it), without hashing: for "
        "links faster than one core hashes, at the cost of end-to-end corruption checks",
    )
    speculative_reads: bool = Field(
        True,
        description="with 'verify: checksum', READ a batch's first step (pipeline_bytes) from "
        "the addresses its blocks' last lease gave while the lease request is on its way; a block "
        "is kept only if the reply puts it at the same address and its bytes match the sum taken "
        "under the pin",
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

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, v: str | None) -> str | None:
        # It names this instance's record file in rendezvous_dir and its object key in
        # rendezvous_s3: '../../x' would write outside them.
        return None if v is None else check_name(v)

    @field_validator("rendezvous_dir")
    @classmethod
    def _rendezvous_dir(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "\x00" in v):
            raise ValueError("give a directory the instances share, e.g. /shared/kvbm-peers")
        return v

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
        if self.rendezvous_dir and self.rendezvous_s3 is not None:
            raise ValueError(
                "'rendezvous_dir' and 'rendezvous_s3' are both set, but an instance publishes "
                "to one rendezvous; keep one of them ('peers' may be given beside either)"
            )
        if not self.peers and not self.rendezvous_dir and self.rendezvous_s3 is None:
            raise ValueError(
                "no rendezvous: give 'peers' (a list of host:port), 'rendezvous_dir' "
                "(a directory the instances share) or 'rendezvous_s3' (an S3 prefix they share)"
            )
        if self.rendezvous_s3 is not None and "publish_interval_s" not in self.model_fields_set:
            self.publish_interval_s = S3_PUBLISH_INTERVAL_S
        return self

    def probe(self, ctx: ProbeContext) -> list[ProbeResult]:
        """The rendezvous: a record file made and removed in ``rendezvous_dir``, or a
        HEAD of ``rendezvous_s3``'s bucket with its credentials."""
        from .rendezvous import probe_rendezvous

        return [ProbeResult(ok, line) for ok, line in probe_rendezvous(self, ctx.name,
                                                                       ctx.timeout_s)]
