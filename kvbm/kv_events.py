"""Moved to ``kvbm_observability.kv_events``; this path stays for code that imports it.

The name is bound to that module itself, so everything it holds is reachable here.
"""

import sys

import kvbm_observability.kv_events as _impl

sys.modules[__name__] = _impl
