"""Models: output shapes, the reference parameter counts, argument errors that name the key."""

from __future__ import annotations

import pytest
import torch

from lightning_seng.recipes.models import MLP, SmallCNN, resnet18_cifar, resnet50


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_flattens_and_classifies():
    model = MLP(in_features=64, num_classes=10, hidden=[32, 16])
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert n_params(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


def test_small_cnn_on_16x16_digits():
    assert SmallCNN(in_channels=1, num_classes=10)(torch.randn(3, 1, 16, 16)).shape == (3, 10)


def test_resnet18_cifar_has_the_reference_parameter_count():
    model = resnet18_cifar(num_classes=10)
    assert n_params(model) == 11_173_962
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_has_the_reference_parameter_count():
    model = resnet50(num_classes=1000)
    assert n_params(model) == 25_557_032
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    # zero-init residual: every bottleneck starts as the identity on its residual branch
    assert all(not block.bn3.weight.detach().any() for stage in (model.layer1, model.layer4) for block in stage)


@pytest.mark.parametrize("build, pattern", [
    (lambda: MLP(in_features=0, num_classes=10), r"model.in_features must be a positive integer \(got 0\)"),
    (lambda: MLP(in_features=4, num_classes=2, activation="swish"), r"model.activation must be one of"),
    (lambda: SmallCNN(channels=[]), r"model.channels must list at least one"),
    (lambda: resnet18_cifar(num_classes=-1), r"model.num_classes must be a positive integer"),
])
def test_bad_arguments_name_the_key(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_resnet_needs_four_stages():
    from lightning_seng.recipes.models import BasicBlock, ResNet

    with pytest.raises(ValueError, match=r"model.blocks must list 4 positive block counts.* \(got \[2, 2, 2\]\)"):
        ResNet(BasicBlock, [2, 2, 2], num_classes=10)
