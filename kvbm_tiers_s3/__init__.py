"""kvbm's s3 tier plugin: blocks as objects in an S3-compatible bucket, shared by instances.

``plugin`` registers the ``s3`` tier type (light: kvbm and the standard library);
``config`` holds its keys; ``tier`` (boto3) does the work, with ``breaker`` and
``objects`` beside it. Nothing here imports boto3 until a chain uses the tier.
"""
