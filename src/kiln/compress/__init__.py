"""Compression: quantization, pruning and operator fusion, each measured against fp32.

Every method reads a run directory (or takes a user's model and data loader from Python) and
writes a new model plus a table: size on disk, latency at batch 1 and 64, and accuracy (or loss)
on the test split, each as a ratio to the fp32 eager model measured in the same run
(:mod:`kiln.compress.report`).
"""
