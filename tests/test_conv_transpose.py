"""conv_transpose2d on the conv kernels (kernels.conv_transpose) against PyTorch in float64, and through swap."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import conv_transpose
from triton_workbench.kernels.conv_transpose import conv_transpose2d

CASES = [  # C_in, C_out, kernel, stride, padding, output_padding, dilation, groups
    (4, 6, 3, 2, 1, 1, 1, 1),  # a U-Net up-sampling step
    (6, 4, 2, 2, 0, 0, 1, 2),
    (3, 5, 3, 1, 1, 0, 2, 1),
    (4, 4, 4, 3, 1, 2, 1, 4),
    (1, 3, (3, 2), (2, 1), (0, 1), (1, 0), (1, 2), 1),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_matches_pytorch_forward_and_every_gradient(case, layout):
    c_in, c_out, kernel, stride, padding, output_padding, dilation, groups = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 5, 4, generator=generator).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(c_in, c_out // groups, kh, kw, generator=generator).requires_grad_()
    bias = torch.randn(c_out, generator=generator).requires_grad_()
    y = conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation, activation="silu")
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = F.silu(F.conv_transpose2d(*leaves, stride, padding, output_padding, groups, dilation))
    assert y.shape == expected.shape
    assert y.is_contiguous(memory_format=layout) or c_in == 1  # (one channel: dense in both layouts, NCHW kept)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    y.backward(grad.float())
    expected.backward(grad)
    for ours, leaf in zip((x, weight, bias), leaves):
        torch.testing.assert_close(ours.grad.double(), leaf.grad, rtol=1e-4, atol=1e-4)


def test_the_op_passes_opcheck():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 5, generator=generator).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)
    bias = torch.randn(3, generator=generator, requires_grad=True)
    torch.library.opcheck(conv_transpose._conv_transpose_op, (x, weight, bias, [2, 2], [1, 1], [1, 0], [1, 1], 1))


def test_bad_arguments_are_refused_naming_them():
    x, weight = torch.randn(1, 4, 3, 3), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose2d(x, weight, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="channels"):
        conv_transpose2d(torch.randn(1, 3, 3, 3), weight)
    with pytest.raises(ValueError, match="bias"):
        conv_transpose2d(x, weight, torch.randn(3))


def test_swap_runs_a_unet_decoder_step_on_the_kernels():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
            self.conv, self.bn = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x, skip):
            return torch.relu(self.bn(self.conv(torch.cat([torch.relu(self.up(x)), skip], dim=1))))

    torch.manual_seed(2)
    block = Up()
    swapped = knn.swap(copy.deepcopy(block))
    records = {r.path: (r.action, r.detail) for r in swapped.swap_records}
    assert records["up"] == ("fused", "up -> relu") and records["conv"] == ("fused", "conv -> bn -> relu")
    x, skip = torch.randn(2, 6, 3, 4), torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(swapped(x, skip), block(x, skip), rtol=1e-4, atol=1e-5)
