"""Dynamo KVBM's vLLM module path, served by kvbm.

Dynamo documents ``"kv_connector":"DynamoConnector"`` with
``"kv_connector_module_path":"kvbm.vllm_integration.connector"``; that command line
works unchanged with kvbm installed and loads :class:`kvbm_vllm.connector.KvbmConnector`
under Dynamo's name, configured by the same ``DYN_KVBM_*`` variables.
"""
