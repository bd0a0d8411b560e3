"""Moved to ``kvbm_observability.kv_events``; this path stays for code that imports it."""

from kvbm_observability.kv_events import *  # noqa: F403
from kvbm_observability.kv_events import __all__  # noqa: F401
