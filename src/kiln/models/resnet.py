"""A small CIFAR-style ResNet built from :class:`BasicBlock` s, for image classification.

Why this shape: a 3x3 stem without max-pool keeps small images (8x8 digits, 32x32 CIFAR) from
being downsampled away, and ``depths``/``width`` scale it from a seconds-long CPU test up to a
ResNet-20-like network (``depths=(3, 3, 3)``). Each block's forward is kept to three lines so
later techniques (stochastic depth, surgery, hooks) have one obvious place to attach.
Stochastic depth (``drop_path``) drops each block's branch per sample with a rate that grows
linearly over the blocks (:func:`kiln.models.layers.drop_path_rates`).

Example:
    >>> import torch
    >>> net = ResNet(num_classes=10, in_channels=1, depths=(1, 1), width=8)
    >>> net(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln.models.layers import DropPath, drop_path_rates

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = ["BasicBlock", "ResNet", "build_resnet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No conv bias: the BatchNorm right after it has its own.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual shortcut: ``relu(branch(x) + shortcut(x))``.

    The shortcut is the identity when shape is kept, else a strided 1x1 conv + BN projection.
    ReLUs are not in-place so forward/backward hooks (saliency, feature extraction) see the
    tensors they expect. With ``drop_path > 0`` the branch is dropped per sample in training
    (``relu(drop_path(branch(x)) + shortcut(x))``); ``self.drop_path`` has no parameters, so
    the state_dict keys do not depend on it.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: 2 halves the spatial size (first block of a stage), 1 keeps it.
        drop_path: stochastic-depth rate of this block's branch, in ``[0, 1)``.

    Example:
        >>> import torch
        >>> block = BasicBlock(8, 16, stride=2)
        >>> block(torch.randn(2, 8, 8, 8)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            OrderedDict(
                conv1=_conv3x3(in_channels, out_channels, stride),
                bn1=nn.BatchNorm2d(out_channels),
                act1=nn.ReLU(),
                conv2=_conv3x3(out_channels, out_channels),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act = nn.ReLU()
        self.drop_path = DropPath(drop_path)

    def zero_init_last(self) -> None:
        """Set the branch's last BN scale to 0, so the block starts as ``relu(shortcut(x))``."""
        bn = self.branch.bn2
        assert isinstance(bn, nn.BatchNorm2d)  # for the type checker
        nn.init.zeros_(bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
        out = self.drop_path(self.branch(x))  # per-sample stochastic depth (training only)
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (3x3 conv + BN + ReLU), stages of :class:`BasicBlock` s, global average pool, fc.

    Stage ``i`` has ``depths[i]`` blocks and ``width * 2**i`` channels; every stage after the
    first starts with a stride-2 block. Convs use Kaiming-normal init (fan_out, relu), BN
    weights 1 and biases 0.

    Args:
        num_classes: outputs of the final linear layer (``self.fc``).
        in_channels: channels of the input images.
        depths: blocks per stage.
        width: channels of the stem and the first stage.
        dropout: dropout probability before ``fc`` (0 disables it).
        zero_init_residual: start each block's last BN at gamma 0, so every block begins as
            (ReLU of) its shortcut; often helps deeper nets train at high learning rates.
        drop_path: stochastic-depth rate of the last block, in ``[0, 1)``; block ``i`` of ``n``
            (counted over all stages) uses ``drop_path * i / (n - 1)``, so the first block is
            never dropped. 0 disables it.

    Example:
        >>> import torch
        >>> net = ResNet(num_classes=4, in_channels=3, depths=(2, 2, 2), width=16)
        >>> net(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depths: Sequence[int] = (1, 1, 1),
        width: int = 16,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        depths = list(depths)
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty list of positive ints, got {depths}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        rates = iter(drop_path_rates(drop_path, sum(depths)))
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        channels = width
        for i, depth in enumerate(depths):
            out_channels = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(channels, out_channels, stride, drop_path=next(rates))]
            blocks += [
                BasicBlock(out_channels, out_channels, drop_path=next(rates))
                for _ in range(depth - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, num_classes)`` logits."""
        features = self.pool(self.stages(self.stem(x)))
        return self.fc(self.drop(features))


def build_resnet(
    info: DataInfo,
    *,
    depths: Sequence[int] = (1, 1, 1),
    width: int = 16,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    drop_path: float = 0.0,
) -> ResNet:
    """A :class:`ResNet` for the data's image shape and classes.

    Args:
        info: the data's description; must be classification of ``(C, H, W)`` images.
        depths: see :class:`ResNet`.
        width: see :class:`ResNet`.
        dropout: see :class:`ResNet`.
        zero_init_residual: see :class:`ResNet`.
        drop_path: see :class:`ResNet`.

    Raises:
        ValueError: the task is not classification, or the inputs are not images.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> info = DataInfo("classification", (1, 8, 8), num_classes=10)
        >>> build_resnet(info, depths=(1, 1), width=8).fc.out_features
        10
    """
    if info.task != "classification":
        raise ValueError(
            f"model 'resnet' is a classifier but the data's task is {info.task!r}; use "
            "classification data, or model.name=mlp (regression) / model.name=gpt (lm)"
        )
    if info.num_classes is None:
        raise ValueError("classification data must say num_classes to size the ResNet's fc")
    if len(info.input_shape) != 3:
        raise ValueError(
            f"model 'resnet' needs image inputs of shape (C, H, W), got {info.input_shape}; "
            "for digits set data.layout=image, or use model.name=mlp for flat features"
        )
    return ResNet(
        num_classes=info.num_classes,
        in_channels=info.input_shape[0],
        depths=depths,
        width=width,
        dropout=dropout,
        zero_init_residual=zero_init_residual,
        drop_path=drop_path,
    )
