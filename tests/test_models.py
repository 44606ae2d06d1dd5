"""The CNNs: shapes for digits and CIFAR inputs, deterministic init, gradients reach every parameter."""

import pytest
import torch
from torch import nn

from triton_workbench.workbench.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels,image_size", [(1, 8), (3, 32)])
def test_models_classify_and_train_every_parameter(name, in_channels, image_size):
    torch.manual_seed(0)
    model = build_model(name, in_channels, 10, image_size)
    images = torch.randn(3, in_channels, image_size, image_size)
    logits = model(images)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_resnet_is_standard_torch_modules_with_batchnorm_and_residual_blocks():
    model = build_model("resnet", 1, 10, 8)
    kinds = {type(module) for module in model.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear} <= kinds
    assert sum(1 for m in model.modules() if type(m).__name__ == "ResidualBlock") == 2
    assert sum(p.numel() for p in model.parameters()) < 10_000  # small enough for the interpreter


def test_same_seed_same_parameters():
    def parameters(seed):
        torch.manual_seed(seed)
        return torch.cat([p.flatten() for p in build_model("resnet", 3, 10, 32).parameters()])

    assert torch.equal(parameters(1), parameters(1))
    assert not torch.equal(parameters(1), parameters(2))


def test_unknown_model_and_bad_sizes_are_named():
    with pytest.raises(ValueError, match="model 'vgg' is unknown: expected one of resnet, convnet"):
        build_model("vgg", 1, 10, 8)
    with pytest.raises(ValueError, match="image_size"):
        build_model("resnet", 1, 10, 6)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("convnet", 1, 0, 8)
