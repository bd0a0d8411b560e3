"""kvbm's fs tier plugin: one file per block in a directory many instances share.

``plugin`` registers the ``fs`` tier type (light: kvbm and the standard library);
``config`` holds its keys; ``tier`` does the work.
"""
