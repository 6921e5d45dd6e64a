"""TorchServe: package a run as a ``.mar`` that answers like ``kiln serve``, and run it.

* :mod:`kiln.deploy.torchserve.archive`: the generated handler and the model archive.
* :mod:`kiln.deploy.torchserve.process`: start and stop a real TorchServe on free ports.
"""
