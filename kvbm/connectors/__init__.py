"""Engine connectors (Hugging Face transformers, vLLM, SGLang)."""
