"""``kiln serve``: an HTTP JSON model server with dynamic batching, on the standard library only.

* :mod:`kiln.deploy.serve.server`: :class:`~kiln.deploy.serve.server.ModelServer`, start and stop.
* :mod:`kiln.deploy.serve.http`: the HTTP protocol layer (routes, limits, status codes).
* :mod:`kiln.deploy.serve.batcher`: the bounded queue and the dynamic batcher.
* :mod:`kiln.deploy.serve.backends`: what runs a batch (eager, TorchScript, ``.pt2``, ONNX).
* :mod:`kiln.deploy.serve.inputs`, :mod:`kiln.deploy.serve.validate`: request decoding and checks.
* :mod:`kiln.deploy.serve.metrics`, :mod:`kiln.deploy.serve.log`: Prometheus text, access log.
"""

from kiln.deploy.serve.server import ModelServer

__all__ = ["ModelServer"]
