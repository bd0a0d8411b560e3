"""The policies plugin: not implemented yet, so it registers nothing (LRU is in the core)."""

from __future__ import annotations

KVBM_PLUGIN_NOTE = "not implemented yet"
