"""timm's Conv2dSame on the Triton conv: TensorFlow's 'SAME' padding, computed from each input's size.

timm's `Conv2dSame` pads in its own forward (`pad_same`, then F.conv2d without padding), so `swap` cannot put
it on the kernels as an nn.Conv2d; its adapter (registered in `kernels.adapters`, matched by class name so
that timm is never imported) replaces it by `TritonConv2dSame`, which passes the padding, asymmetric where
it must be, to the conv kernel as it is: no padded copy of the input, unlike F.pad.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from triton_workbench.kernels import adapters, ops


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
                 ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of TensorFlow's 'SAME' padding for an input of spatial `size`: per dim
    pad = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0), pad // 2 before, the rest after (timm's pad_same)."""
    pads = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, k, s, d in zip(size, kernel, stride, dilation)]
    return pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2


class TritonConv2dSame(nn.Conv2d):
    """timm's Conv2dSame on the Triton conv: the 'SAME' padding, asymmetric where it must be, computed from
    each input's size and taken by the kernel as it is (no padded copy of the input, unlike F.pad)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "TritonConv2dSame":
        """A TritonConv2dSame sharing `conv`'s Parameter objects."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        return adapters.share(conv, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.check_tensor("x", x, (3, 4))
        padding = same_padding(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation)
        return ops.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME (TensorFlow's, from the input size)"


def describe(module: nn.Module, parent: nn.Module) -> str:
    """The swap table's detail for an adapted Conv2dSame."""
    return "TF 'SAME' padding from the input size, on the Triton conv (adapter)"
