"""Moved to ``kvbm_hf.cache``; this path stays for code that imports it.

The name is bound to that module itself, so everything it holds is reachable here.
"""

import sys

import kvbm_hf.cache as _impl

sys.modules[__name__] = _impl
