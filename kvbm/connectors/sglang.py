"""Moved to ``kvbm_sglang.storage``; this path stays because SGLang's ``dynamic`` storage
backend loads ``KvbmHiCacheStorage`` from ``module_path: kvbm.connectors.sglang``.

The name is bound to that module itself, so everything it holds is reachable here.
"""

import sys

import kvbm_sglang.storage as _impl

sys.modules[__name__] = _impl
