"""Kiln's built-in networks and the builders that size them from the data.

Every model here is a plain ``nn.Module`` a user can also build by hand; the ``build_*``
functions only read sizes from a :class:`kiln.data.base.DataInfo`. Configs pick a model by name
through :data:`kiln.registry.MODELS`.

Example:
    >>> from kiln.models import MLP
    >>> MLP(in_features=4, out_features=2, hidden=(8,)).fc.out_features
    2
"""

from kiln.models.bow import BagOfWords, build_bow
from kiln.models.features import create_feature_extractor, feature_names, get_features
from kiln.models.gpt import GPT, build_gpt
from kiln.models.mlp import MLP, build_mlp
from kiln.models.multihead import MultiHead, build_multihead
from kiln.models.pretrained import (
    LoadReport,
    layer_groups,
    layerwise_lr_decay,
    load_pretrained,
    read_state_dict,
)
from kiln.models.resnet import BasicBlock, ResNet, build_resnet
from kiln.models.summary import count_parameters
from kiln.models.surgery import (
    Adapter,
    FreezeReport,
    freeze,
    insert_adapter,
    replace_head,
    truncate,
    unfreeze,
)
from kiln.models.text_encoder import SentenceEncoder, TextClassifier, build_minilm
from kiln.models.wrappers import unwrap_model

__all__ = [
    "GPT",
    "MLP",
    "Adapter",
    "BagOfWords",
    "BasicBlock",
    "FreezeReport",
    "LoadReport",
    "MultiHead",
    "ResNet",
    "SentenceEncoder",
    "TextClassifier",
    "build_bow",
    "build_gpt",
    "build_minilm",
    "build_mlp",
    "build_multihead",
    "build_resnet",
    "count_parameters",
    "create_feature_extractor",
    "feature_names",
    "freeze",
    "get_features",
    "insert_adapter",
    "layer_groups",
    "layerwise_lr_decay",
    "load_pretrained",
    "read_state_dict",
    "replace_head",
    "truncate",
    "unfreeze",
    "unwrap_model",
]
