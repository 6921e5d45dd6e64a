"""Checks that run on a weights or checkpoint file *before* a library reads it.

A file from elsewhere may be corrupt (truncated, bad header) or hostile (a pickle that runs code,
a small archive that unpacks to gigabytes, a dtype changed in a header). Each module here looks at
one kind of file and raises :class:`kiln.errors.CorruptFileError` or
:class:`kiln.errors.UnsafeFileError` naming the file, so a loader never gets to misbehave:

* :mod:`kiln.safeio.torchfile`: ``torch.save`` archives (zip sizes, ``weights_only`` loading).
* :mod:`kiln.safeio.tensorfile`: ``.safetensors`` headers, and dtypes/shapes against a model.
* :mod:`kiln.safeio.dcp`: ``torch.distributed.checkpoint`` folders (restricted metadata unpickler).

Example:
    >>> from kiln.safeio.torchfile import unpacked_limit
    >>> unpacked_limit(1000, None) >= 4000
    True
"""
