"""The disk tier plugin: not implemented yet, so it registers nothing."""

from __future__ import annotations

KVBM_PLUGIN_NOTE = "not implemented yet"
