"""Plumbing that knows no stage: the error type, arches, running tools, files, image references, doit glue.

Nothing here imports another package of `tasks`.
"""
