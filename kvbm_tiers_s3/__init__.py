"""kvbm's s3 tier plugin: blocks as objects in an S3-compatible bucket, shared by instances.

``plugin`` registers the ``s3`` tier type (light: kvbm and the standard library);
``config`` holds its keys (the connection keys are the core's
``kvbm.objectstore.S3Connection``); ``tier`` (boto3) does the work. Beside it, private
helpers: ``_requests`` (retries, the deadline watchdog, what an error means),
``_wire`` (one GET or HEAD and its metadata), ``_existence`` (the bounded existence
cache), ``_packbook`` (which packs may be deleted), ``_setup`` (client and bucket
check), ``breaker`` and ``objects`` (object names and metadata). Nothing here imports
boto3 until a chain uses the tier.
"""
