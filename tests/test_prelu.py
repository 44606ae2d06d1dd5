"""PReLU (kernels.prelu) against PyTorch in float64: per-channel and shared slopes, ranks 1-4, both layouts,
special values, the slopes' gradient; and swap of nn.PReLU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import prelu as prelu_module
from triton_workbench.kernels.prelu import prelu

SHAPES = [((3, 5, 7, 6), 5, False), ((3, 5, 7, 6), 5, True), ((3, 5, 7, 6), 1, True), ((4, 6), 6, False),
          ((2, 3, 9), 3, False), ((7,), 1, False)]


@pytest.mark.parametrize("shape, slopes, channels_last", SHAPES)
def test_matches_pytorch_values_and_gradients(shape, slopes, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(slopes, generator=generator) * 0.5).requires_grad_()
    y = prelu(x, weight)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
    expected = F.prelu(*leaves)
    assert y.shape == expected.shape and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(torch.signbit(y[y == 0]), torch.signbit(expected[expected == 0]))  # -0.0 kept
    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    y.backward(grad.float())
    expected.backward(grad)
    torch.testing.assert_close(x.grad.double(), leaves[0].grad, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(weight.grad.double(), leaves[1].grad, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_op_passes_opcheck_and_bad_weights_are_refused():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(prelu_module._prelu_op, (x, torch.rand(3, requires_grad=True)))
    with pytest.raises(ValueError, match="weight must have 1 or 3"):
        prelu(x, torch.rand(2))


def test_swap_runs_prelu_modules_and_trains_their_slopes():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(36, 2), nn.PReLU())
    swapped = knn.swap(copy.deepcopy(model))
    records = {r.path: (r.action, r.detail) for r in swapped.swap_records}
    assert records["1"] == ("swapped", "1") and records["4"] == ("swapped", "4")
    x = torch.randn(2, 3, 5, 5)
    out, expected = swapped(x), model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(swapped.get_submodule("1").weight.grad, model[1].weight.grad, rtol=1e-4, atol=1e-5)
