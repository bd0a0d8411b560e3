"""kvbm as an SGLang HiCache storage backend (the L3 tier behind SGLang's host cache).

A plugin (entry point ``sglang`` in the group ``kvbm.plugins``) that registers the
connector ``sglang``. The backend is ``kvbm_sglang.storage.KvbmHiCacheStorage``; SGLang
loads it by module path, ``kvbm.connectors.sglang`` (kept for that) or
``kvbm_sglang.storage``. Importing this package imports neither torch nor SGLang.
"""
