"""Import paths of the engine connectors, kept where users and engines type them.

The Hugging Face and SGLang connectors live in their own plugin packages
(``kvbm_hf``, ``kvbm_sglang``); ``kvbm.connectors.hf`` and ``kvbm.connectors.sglang``
are those modules under their old names. The vLLM connector is ``kvbm.connectors.vllm``.
"""
