"""The Hugging Face transformers connector: a ``DynamicCache`` that reuses cached prefixes.

A plugin (entry point ``hf`` in the group ``kvbm.plugins``) that registers the
connector ``hf``. The connector lives in ``kvbm_hf.cache`` (``KvbmCache``,
``manager_for_model``, ``prefill``, ``generate``), also importable as
``kvbm.connectors.hf``; it needs torch and transformers (``pip install 'kvbm[hf]'``),
which importing this package does not import.
"""
