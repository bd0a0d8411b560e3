"""Moved to ``kvbm_bench.hf`` (``kvbm bench --engine hf``); this path stays for code
that imports it."""

import sys

import kvbm_bench.hf as _impl

sys.modules[__name__] = _impl
