"""PReLU (a learnable slope per channel, or one shared) as a custom op: its forward kernel, and a backward kernel
that writes dx and per-strip partial sums of the slopes' gradient in one pass over x and dy.

    y = x if x > 0 else slope[c] * x;   dx = dy * (1 if x > 0 else slope[c]);   dslope[c] = sum of dy * x where x <= 0

It walks tensors through BatchNorm's [rows, channels] view (kernels.batch_norm: channels_last or contiguous
4-D tensors; other ranks as [N, C, rest, 1]); the partial sums are added in strip order, so the slopes'
gradient is deterministic.
"""

from __future__ import annotations

import torch
import triton.language as tl

from triton_workbench.kernels import ops, runtime
from triton_workbench.kernels.batch_norm import _channel, _tile, rows_view
from triton_workbench.kernels.conv_geometry import memory_format_of
from triton_workbench.kernels.runtime import jit


@jit
def prelu_kernel(x_ptr, slope_ptr, grad_ptr, out_ptr, part_ptr, ROWS, C, HW, stride_n, stride_hw, stride_c,
                 STRIP, SHARED: tl.constexpr, BACKWARD: tl.constexpr, INT64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward: out = prelu(x) over rows [strip * STRIP, + STRIP). BACKWARD: out = dx, and the strip's partial
    slope gradient per channel in part[strip, c]."""
    strip = tl.program_id(0)
    pid_c = tl.program_id(1)
    first = strip * STRIP
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if SHARED:
        slope = tl.load(slope_ptr).to(tl.float32)
    else:
        slope = _channel(slope_ptr, cols, cols < C, 0.0)[None, :]
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(first, tl.minimum(first + STRIP, ROWS), BLOCK_M):
        offs, mask, cols, c_ok = _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, start, pid_c, INT64, BLOCK_M,
                                       BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        positive = x > 0
        if BACKWARD:
            grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = tl.where(positive, grad, grad * slope)
            total += tl.sum(tl.where(positive, 0.0, grad * x), 0)  # masked lanes: grad 0
        else:
            out = tl.where(positive, x, x * slope)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        tl.store(part_ptr + strip * C + cols, total, mask=cols < C)


def _launch(x: torch.Tensor, slope: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prelu(x) or dx, the slopes' gradient or an empty tensor) for x viewed as 4-D (`as_4d`)."""
    view = rows_view(x)
    strip, strips = view.strips()
    out = torch.empty_like(x)
    part = torch.empty((strips, view.channels), device=x.device, dtype=torch.float32)
    runtime.announce()
    prelu_kernel[(strips, view.channel_blocks)](
        x, slope, grad if grad is not None else x, out, part, view.rows, view.channels, view.hw, *view.strides,
        strip, SHARED=slope.numel() == 1, BACKWARD=grad is not None, INT64=view.int64, BLOCK_M=view.block_m,
        BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    if grad is None:
        return out, x.new_empty((0,))
    per_channel = part.sum(0)  # strip order: deterministic
    return out, (per_channel.sum().reshape(1) if slope.numel() == 1 else per_channel).to(slope.dtype)


def as_4d(x: torch.Tensor) -> torch.Tensor:
    """x as the 4-D tensor the rows view walks: 4-D dense tensors as they are, others as [N, C, rest, 1]."""
    if x.dim() == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return x
    x = x.contiguous()
    if x.dim() < 2:
        return x.reshape(1, 1, -1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1, 1)


@torch.library.custom_op("workbench::prelu", mutates_args=())
def _prelu_op(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """prelu(x) with the slopes `slope` ([C] or [1]), shaped and laid out as x (4-D, see `as_4d`)."""
    return _launch(x, slope, None)[0]


@_prelu_op.register_fake
def _(x, slope):
    return torch.empty_like(x)


@torch.library.custom_op("workbench::prelu_backward", mutates_args=())
def _prelu_backward_op(grad: torch.Tensor, x: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dslope) of prelu; grad laid out as x."""
    return _launch(x, slope, grad)


@_prelu_backward_op.register_fake
def _(grad, x, slope):
    return torch.empty_like(x), torch.empty_like(slope)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, slope = ctx.saved_tensors
    dx, dslope = _prelu_backward_op(grad.contiguous(memory_format=memory_format_of(x)), x, slope)
    return dx, dslope


_prelu_op.register_autograd(_backward, setup_context=_setup_context)
ops.refuse_double_backward(_prelu_backward_op)


def prelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.prelu(x, weight) in one Triton kernel: weight holds one slope per channel (dim 1 of x) or one for all."""
    x, weight = ops.autocast_inputs(x, weight)
    ops.check_tensor("x", x)
    ops.check_tensor("weight", weight, 1)
    channels = x.shape[1] if x.dim() >= 2 else 1
    if weight.numel() not in (1, channels):
        raise ValueError(f"weight must have 1 or {channels} (x's channels) elements, got {weight.numel()}")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return _prelu_op(as_4d(x), weight).reshape(x.shape)
