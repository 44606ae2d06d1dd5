"""Max-pooling inside the BatchNorm kernels (ResNet's stem: conv -> BN -> ReLU -> max-pool), the @jit helpers
both directions share: a window's running maximum with the tap holding it, and the gather of pooled gradients
back onto the pool's input. Ties and NaN as PyTorch's max_pool2d decides them: the first maximum in (kh, kw)
order wins, a NaN beats any number and a later NaN the earlier one.

The pool's window is the conv geometry's (`ConvGeometry.constexprs`: KH, KW, strides, leading padding,
dilations); the forward stores, per pooled value, the tap kh * KW + kw its maximum came from (int8), and the
backward sends each pooled gradient to that tap, summing in a fixed (kh, kw) order where windows overlap.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import nn

from triton_workbench.kernels.conv_geometry import ConvGeometry, make_geometry, pair
from triton_workbench.kernels.conv_tiles import offsets
from triton_workbench.kernels.runtime import jit

MAX_TAPS = 127  # a window's taps numbered in int8


@jit
def window_max(best, tap_of_best, value, ok, TAP: tl.constexpr):
    """(maximum, its tap) once `value` (fp32, where `ok`) at window tap TAP is seen; start from (-inf, -1): the
    first tap inside the input is taken whatever its value (a window of -inf sends its gradient there)."""
    take = ok & ((value > best) | (value != value) | (tap_of_best < 0))
    return tl.where(take, value, best), tl.where(take, TAP, tap_of_best)


@jit
def pooled_gradient(grad_ptr, tap_ptr, rows, cols, mask, HW, W, PH, PW, sp_n, sp_h, sp_w, sp_c,
                    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                    PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                    INT64: tl.constexpr):
    """d loss / d input (fp32) at the pool's input rows (n, h, w: flat over HW = H x W) and columns (channels): the
    sum of the pooled gradients (grad, laid out as the taps: strides sp_*) of the windows whose maximum is there."""
    image = offsets(rows // HW, INT64)
    h = rows % HW // W
    w = rows % W
    total = tl.zeros(mask.shape, dtype=tl.float32)
    for kh in tl.static_range(KH):
        t_h = h + PAD_H - kh * DIL_H  # the window whose tap kh is row h starts t_h / STRIDE_H windows down
        p_h = t_h // STRIDE_H
        ok_h = (t_h >= 0) & (t_h % STRIDE_H == 0) & (p_h < PH)
        for kw in tl.static_range(KW):
            t_w = w + PAD_W - kw * DIL_W
            p_w = t_w // STRIDE_W
            ok = mask & (ok_h & (t_w >= 0) & (t_w % STRIDE_W == 0) & (p_w < PW))[:, None]
            pooled = (image * sp_n + offsets(p_h, INT64) * sp_h + offsets(p_w, INT64) * sp_w)[:, None] + \
                offsets(cols, INT64)[None, :] * sp_c
            hit = ok & (tl.load(tap_ptr + pooled, mask=ok, other=-1) == kh * KW + kw)
            total += tl.load(grad_ptr + pooled, mask=hit, other=0.0).to(tl.float32)
    return total


class MaxPool:
    """A max-pool's window (an `nn.MaxPool2d`'s kernel_size, stride, padding, dilation; floor mode)."""

    CODE = 1  # the kernels' POOL constexpr (a global average's is 2)

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        self.kernel_size = kernel_size
        self.geometry: ConvGeometry = make_geometry(kernel_size, stride, padding, dilation)
        if kernel_size[0] * kernel_size[1] > MAX_TAPS:
            raise ValueError(f"max-pool kernel_size {kernel_size} has more than {MAX_TAPS} taps")
        if any(pad > size // 2 for pad, size in zip(padding, kernel_size)):  # PyTorch's rule: no empty window
            raise ValueError(f"max-pool padding {padding} should be at most half of kernel_size {kernel_size}")

    @classmethod
    def of_module(cls, module: nn.MaxPool2d) -> "MaxPool":
        """`module`'s window (ValueError where PyTorch refuses it); floor mode and no indices are the caller's
        to check."""
        return cls(*(pair(getattr(module, name), name) for name in ("kernel_size", "stride", "padding", "dilation")))

    @classmethod
    def of(cls, arguments: list[int]) -> "MaxPool":
        """From `arguments()`'s flat list (a custom op's schema takes ints)."""
        return cls(*(tuple(arguments[i:i + 2]) for i in range(0, 8, 2)))

    def arguments(self) -> list[int]:
        g = self.geometry
        return [*self.kernel_size, g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dilation_h, g.dilation_w]

    def constexprs(self) -> tuple[int, ...]:
        return self.geometry.constexprs(*self.kernel_size)

    def output_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        out = (*shape[:2], *self.geometry.output_hw(*shape[2:], *self.kernel_size))
        if min(out[2:]) < 1:
            raise ValueError(f"max-pool output size is too small: input {tuple(shape)} gives {out}")
        return out
