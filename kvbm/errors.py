"""Errors kvbm raises. Each message names the thing, the value and the fix."""

from __future__ import annotations


class KvbmError(Exception):
    """Base class of every error kvbm raises on purpose."""


class ConfigError(KvbmError, ValueError):
    """A configuration that cannot start: names the tier, the key, the value and what is allowed."""


class PluginError(KvbmError):
    """A plugin that cannot be loaded, conflicts with another, or is missing its packages."""


class LayoutError(KvbmError, ValueError):
    """Tensors or buffers whose shape, dtype or size does not match the block layout."""


class TokenError(KvbmError, ValueError):
    """Token ids of the wrong type or range."""
