"""Networks used by the recipes, written in plain torch (no torchvision).

- :class:`MLP`: flattens its input, ``Linear -> act`` blocks, linear head.
- :class:`SmallCNN`: two ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool`` stages, global average pool, linear head.
- :func:`resnet18_cifar`: ResNet-18 with a 3x3 stem and no max-pool, for 32x32 inputs (He et al. 2016).
- :func:`resnet50`: the ImageNet ResNet-50 (7x7 stem, max-pool, bottleneck blocks ``[3, 4, 6, 3]``).

Every constructor validates its arguments and names the offending key, since the values usually
come from a Hydra ``model`` config.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _check_positive(key: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{key} must be a positive integer (got {value!r})")


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    ``x (N, *) -> flatten (N, in_features) -> [Linear -> act -> Dropout] * len(hidden) -> Linear -> (N, num_classes)``
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("num_classes", num_classes)
        for width in hidden:
            _check_positive("hidden", width)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(_ACTIVATIONS)} (got {activation!r})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) (got {dropout!r})")
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in hidden:
            layers += [nn.Linear(width_in, width), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Small convolutional network for low-resolution images.

    ``x (N, in_channels, H, W) -> [Conv3x3 -> BN -> ReLU -> MaxPool2] * len(channels) -> mean over H, W
    -> Linear -> (N, num_classes)``
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        if len(channels) == 0:
            raise ValueError("model.channels must list at least one stage width (got [])")
        stages: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            _check_positive("channels", c_out)
            stages += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """``out = ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(x))))) + shortcut(x))`` (ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """``Conv1x1 -> Conv3x3(stride) -> Conv1x1(4 * width)`` with BN/ReLU and a residual (ResNet-50 block)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """Residual network: stem, four stages of ``blocks[i]`` blocks (widths 64, 128, 256, 512), pool, head.

    ``stem="cifar"``: Conv3x3(stride 1), no max-pool (32x32 inputs).
    ``stem="imagenet"``: Conv7x7(stride 2) + MaxPool3x3(stride 2) (224x224 inputs).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        stem: str = "cifar",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"model.stem must be one of ['cifar', 'imagenet'] (got {stem!r})")
        if len(blocks) != 4 or any(not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"model.blocks must list 4 positive block counts, one per stage (got {list(blocks)})")
        stages = []
        c_in = 64
        for i, (width, n_blocks) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(n_blocks):
                layers.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            # Each residual branch starts as zero, so every block is the identity at init (Goyal et al. 2017).
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 images: BasicBlock ``[2, 2, 2, 2]``, 3x3 stem; about 11.2M parameters."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels=in_channels, stem="cifar")


def resnet50(num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 for ImageNet: Bottleneck ``[3, 4, 6, 3]``, 7x7 stem; about 25.6M parameters at 1000 classes."""
    return ResNet(
        Bottleneck, (3, 4, 6, 3), num_classes, in_channels=in_channels, stem="imagenet",
        zero_init_residual=zero_init_residual,
    )
