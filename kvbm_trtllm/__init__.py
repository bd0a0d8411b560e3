"""kvbm's TensorRT-LLM connector: TRT-LLM's KV-cache connector calls over the core
planner (the leader, in the scheduler) and executor (each worker, on its shard).

TRT-LLM loads it by module path, as Dynamo documents:
``kvbm.trtllm_integration.connector`` with ``DynamoKVBMConnectorLeader`` and
``DynamoKVBMConnectorWorker``, a thin re-export of ``kvbm_trtllm.connector``.
Importing this package imports neither TensorRT-LLM nor torch; its submodules may.
"""
