"""Kiln's built-in networks and the builders that size them from the data.

Every model here is a plain ``nn.Module`` a user can also build by hand; the ``build_*``
functions only read sizes from a :class:`kiln.data.base.DataInfo`. Configs pick a model by name
through :data:`kiln.registry.MODELS`.

Example:
    >>> from kiln.models import MLP
    >>> MLP(in_features=4, out_features=2, hidden=(8,)).fc.out_features
    2
"""

from kiln.models.gpt import GPT, build_gpt
from kiln.models.mlp import MLP, build_mlp
from kiln.models.resnet import BasicBlock, ResNet, build_resnet

__all__ = ["GPT", "MLP", "BasicBlock", "ResNet", "build_gpt", "build_mlp", "build_resnet"]
