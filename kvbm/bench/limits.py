"""Moved to ``kvbm_bench.limits``; this path stays for the scripts in ``bench/``.

The name is bound to that module itself, so everything it holds is reachable here.
"""

import sys

import kvbm_bench.limits as _impl

sys.modules[__name__] = _impl
