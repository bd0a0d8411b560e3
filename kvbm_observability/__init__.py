"""Observability of a kvbm manager: KV events for routers and Prometheus metrics.

A plugin (entry point ``observability`` in the group ``kvbm.plugins``): its
``kvbm_chain_built`` starts what the settings enable, ``kvbm_shutdown`` stops it.

- ``kv_events`` — block stored/removed events over ZMQ in vLLM's KV-event format,
  with vLLM's replay socket;
- ``metrics`` — the ``kvbm_`` Prometheus families, Dynamo KVBM's names included;
- ``plugin`` — the hooks, and ``kv_event_publisher(manager)`` /
  ``metrics_exporter(manager)`` to find what a manager started;
- ``cli`` — ``kvbm dashboard`` (``dashboards/kvbm-grafana.json``, package data) and
  ``kvbm status`` (a configuration's endpoints, and whether they answer).

Importing this package imports no pyzmq, msgpack or prometheus-client.
"""

from .plugin import kv_event_publisher, metrics_exporter

__all__ = ["kv_event_publisher", "metrics_exporter"]
