"""Where the KV-event sockets bind: vLLM's address rules, and errors naming the key."""

from __future__ import annotations

import zmq

from kvbm.errors import ConfigError

#: vLLM's default KV-event port (``KVEventsConfig.endpoint`` is ``tcp://*:5557``), kvbm's too.
DEFAULT_PORT = 5557


def bind(
    sock: zmq.Socket[bytes],
    endpoint: str,
    port: int,
    dp_rank: int,
    key: str = "endpoint",
    port_key: str = "port",
) -> str:
    """Bind ``sock`` where the config says and return the bound address.

    ``key``/``port_key`` name the config keys in errors (``endpoint``/``port`` or
    ``replay_endpoint``/``replay_port``).
    """
    # Data-parallel ranks on one host share a config, so, as vLLM does, a fixed
    # port is offset by the rank and an ipc/inproc address gets a "_dp{rank}" suffix.
    if endpoint.startswith(("ipc://", "inproc://")):
        where = f"{endpoint}_dp{dp_rank}" if dp_rank else endpoint
    elif endpoint.startswith("tcp://"):
        if endpoint.count(":") > 1 and not endpoint.endswith("]"):
            raise ConfigError(
                f"kv_events: key '{key}': value {endpoint!r} carries a port; give the "
                f"address alone (tcp://127.0.0.1) and the port in '{port_key}' "
                "(0 picks a free one)"
            )
        if port and port + dp_rank > 65535:
            raise ConfigError(
                f"kv_events: key '{port_key}': value {port} + dp_rank {dp_rank} is past "
                f"65535; choose a lower port or 0 to pick a free one"
            )
        where = f"{endpoint}:{port + dp_rank}" if port else f"{endpoint}:*"
    else:
        raise ConfigError(
            f"kv_events: key '{key}': value {endpoint!r} is not a ZMQ address; "
            "use tcp://127.0.0.1 (or ipc:///path)"
        )
    try:
        sock.bind(where)
    except zmq.ZMQError as e:
        held = " (vLLM's default: another engine or kvbm instance may hold it)" if (
            port == DEFAULT_PORT) else ""
        raise ConfigError(
            f"kv_events: cannot bind {where} ({e}){held}; set kv_events.{port_key} to another "
            "port, or to 0 to pick a free port per instance"
        ) from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def port_of(endpoint: str) -> int | None:
    """The TCP port of a bound ``tcp://`` address, else None."""
    if endpoint.startswith("tcp://"):
        try:
            return int(endpoint.rsplit(":", 1)[1])
        except ValueError:
            return None
    return None
