"""Global average pooling inside the BatchNorm kernels (a classifier's head: ... -> BN [+ residual] -> activation
-> AdaptiveAvgPool2d(1)): the forward averages each image's activations per channel in the normalise kernel,
which never stores them; the backward passes read the pooled gradient, spread evenly over the image.

As PyTorch computes it from a stored activation: the values averaged are the activation as rounded to the
output's dtype, summed in fp32, the mean rounded once.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import nn

from triton_workbench.kernels.conv_tiles import offsets
from triton_workbench.kernels.runtime import jit


@jit
def averaged_gradient(grad_ptr, rows, cols, mask, HW, sg_n, sg_c, INT64: tl.constexpr):
    """d loss / d input (fp32) at the pool's input rows (n, h, w: flat over HW) and columns (channels): the
    pooled gradient of the row's image and channel (strides sg_n, sg_c), over HW."""
    at = offsets(rows // HW, INT64)[:, None] * sg_n + offsets(cols, INT64)[None, :] * sg_c
    return tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32) / HW


class GlobalAveragePool:
    """An AdaptiveAvgPool2d to 1 x 1: every position of an image's channel averaged."""

    CODE = 2  # the kernels' POOL constexpr (a max-pool's is 1)

    @staticmethod
    def takes(module: nn.Module) -> bool:
        """Whether `module` is such a pool (output size 1, or (1, 1))."""
        size = getattr(module, "output_size", None)
        return isinstance(module, nn.AdaptiveAvgPool2d) and size in (1, (1, 1), [1, 1])

    @staticmethod
    def output_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:2], 1, 1)
