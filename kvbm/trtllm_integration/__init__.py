"""Dynamo KVBM's TensorRT-LLM module path, served by kvbm.

Dynamo documents ``kv_connector_config`` with ``connector_module:
kvbm.trtllm_integration.connector``, ``connector_scheduler_class:
DynamoKVBMConnectorLeader`` and ``connector_worker_class: DynamoKVBMConnectorWorker``
(TensorRT-LLM's ``connector: kvbm`` preset names the same); that configuration works
unchanged with kvbm installed and loads ``kvbm_trtllm.connector``'s classes,
configured by the same ``DYN_KVBM_*`` variables. Importing this package imports
neither TensorRT-LLM nor the connector; its ``connector`` module does.
"""
