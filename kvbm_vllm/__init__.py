"""kvbm's vLLM connector: vLLM's calls over the core planner and executor.

vLLM loads it by module path: ``kvbm.connectors.vllm`` (kvbm's own name) or
``kvbm.vllm_integration.connector`` (Dynamo's), both thin re-exports of
``kvbm_vllm.connector``. Importing this package imports no vLLM; its submodules do.
"""
