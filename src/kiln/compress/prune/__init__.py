"""Pruning: zero the smallest weights (unstructured) or remove whole channels (structured).

* :mod:`kiln.compress.prune.core`: masks, schedules, sparsity and
  :func:`~kiln.compress.prune.core.prune_model`.
* :mod:`kiln.compress.prune.structured`: channels really removed, shapes rebuilt.
* :mod:`kiln.compress.prune.io`: pruned files that rebuild their model.
* :mod:`kiln.compress.prune.run`: fine-tuning, rewinds and BatchNorm re-estimation for runs.
"""
