"""Moved to ``kvbm_observability.plugin``; this path stays for code that imports it.

The name is bound to that module itself, not to a copy of its functions, so passing
it to ``build_plugins(extra_plugins=[...])`` beside the entry point registers its
hooks once.
"""

import sys

import kvbm_observability.plugin as _plugin

sys.modules[__name__] = _plugin
