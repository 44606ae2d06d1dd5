"""conv_transpose2d on the conv kernels, as a custom op: a transposed conv is the input gradient of the conv
it transposes, so its three passes are the conv's three kernels with the roles swapped.

For a transposed conv of x [N, C_in, H, W] with weight [C_in, C_out / groups, kH, kW] to y [N, C_out, Ho, Wo],
take the conv from [N, C_out, Ho, Wo] to [N, C_in, H, W] with the same weight and geometry:

    y      = dgrad(dz=x)            (conv_dgrad: every stride phase in one launch)
    dL/dx  = conv forward of dL/dy  (conv_fwd)
    dL/dw  = wgrad(dz=x, x=dL/dy)   (conv_wgrad)

Bias and activation are applied by the elementwise passes after the dgrad (its epilogue has neither yet).
"""

from __future__ import annotations

from typing import Optional

import torch

from triton_workbench.kernels import ops
from triton_workbench.kernels.conv_dgrad import conv2d_input_grad
from triton_workbench.kernels.conv_fwd import conv2d_forward
from triton_workbench.kernels.conv_geometry import ConvGeometry, empty_in_layout_of, memory_format_of
from triton_workbench.kernels.conv_wgrad import conv2d_bias_grad, conv2d_weight_grad

_EMPTY = (0,)


def _geometry(stride: list[int], padding: list[int], dilation: list[int], groups: int) -> ConvGeometry:
    return ConvGeometry(*stride, padding[0], padding[0], padding[1], padding[1], *dilation, groups)


@torch.library.custom_op("workbench::conv_transpose2d", mutates_args=())
def _conv_transpose_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
                       padding: list[int], output_padding: list[int], dilation: list[int], groups: int
                       ) -> torch.Tensor:
    """conv_transpose2d(x, weight, bias): the dgrad kernel, then the bias (x's memory format)."""
    y = conv2d_input_grad(x, weight, _like_output(x, weight, stride, padding, output_padding, dilation, groups),
                          _geometry(stride, padding, dilation, groups))
    return y.add_(bias.view(1, -1, 1, 1).to(y.dtype)) if bias is not None else y


@_conv_transpose_op.register_fake
def _(x, weight, bias, stride, padding, output_padding, dilation, groups):
    return _like_output(x, weight, stride, padding, output_padding, dilation, groups)


def _like_output(x, weight, stride, padding, output_padding, dilation, groups) -> torch.Tensor:
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    sizes = [(size - 1) * s - 2 * p + d * (k - 1) + op + 1
             for size, s, p, d, k, op in zip((h, w), stride, padding, dilation, (kh, kw), output_padding)]
    return empty_in_layout_of(x, (n, weight.shape[1] * groups, *sizes))


@torch.library.custom_op("workbench::conv_transpose2d_backward", mutates_args=())
def _conv_transpose_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                                padding: list[int], dilation: list[int], groups: int, need_x: bool,
                                need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx: the conv forward of grad_y, dL/dw: the wgrad with the roles swapped, dL/dbias); empty where not
    needed."""
    geometry = _geometry(stride, padding, dilation, groups)
    grad_y = grad_y.contiguous(memory_format=memory_format_of(x))
    grad_x = conv2d_forward(grad_y, weight, None, geometry).y if need_x else x.new_empty(_EMPTY)
    grad_weight = conv2d_weight_grad(x, grad_y, weight, geometry, bias_grad=False)[0] if need_weight \
        else x.new_empty(_EMPTY)
    grad_bias = conv2d_bias_grad(grad_y, weight.dtype) if need_bias else x.new_empty(_EMPTY)
    return grad_x, grad_weight, grad_bias


@_conv_transpose_backward_op.register_fake
def _(grad_y, x, weight, stride, padding, dilation, groups, need_x, need_weight, need_bias):
    return (empty_in_layout_of(x, x.shape) if need_x else x.new_empty(_EMPTY),
            empty_in_layout_of(weight, weight.shape) if need_weight else x.new_empty(_EMPTY),
            x.new_empty(grad_y.shape[1]) if need_bias else x.new_empty(_EMPTY))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, _, dilation, groups = inputs
    ctx.geometry_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x, grad_weight, grad_bias = _conv_transpose_backward_op(
        grad_y, x, weight, *ctx.geometry_args, need_x, need_weight, need_bias and ctx.has_bias)
    return (grad_x if need_x else None, grad_weight if need_weight else None,
            grad_bias if need_bias and ctx.has_bias else None, None, None, None, None, None)


_conv_transpose_op.register_autograd(_backward, setup_context=_setup_context)
ops.refuse_double_backward(_conv_transpose_backward_op)


def _pair(value: int | tuple[int, int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return pair


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     output_padding: int | tuple[int, int] = 0, groups: int = 1, dilation: int | tuple[int, int] = 1,
                     activation: str | None = None, **activation_kwargs: object) -> torch.Tensor:
    """act(F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)) on the conv
    kernels: x [N, C_in, H, W] (NCHW or channels_last, kept), weight [C_in, C_out / groups, kH, kW]."""
    x, weight, bias = ops.autocast_inputs(x, weight, bias)
    ops.check_tensor("x", x, 4)
    ops.check_tensor("weight", weight, 4, like=x)
    if bias is not None:
        ops.check_tensor("bias", bias, 1, like=x)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    output_padding = _pair(output_padding, "output_padding")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be positive, got {stride} and {dilation}")
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(f"output_padding {output_padding} must be smaller than stride {stride} or dilation "
                         f"{dilation}")
    if x.shape[1] != weight.shape[0] or weight.shape[0] % groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} (C_in, C_out / groups, "
                         f"kH, kW) with groups={groups} expects {weight.shape[0]}, a multiple of groups")
    if bias is not None and bias.shape[0] != weight.shape[1] * groups:
        raise ValueError(f"bias must have C_out = {weight.shape[1] * groups} elements, got {tuple(bias.shape)}")
    y = _conv_transpose_op(x, weight, bias, stride, padding, output_padding, dilation, groups)
    return ops.activation(y, activation, **activation_kwargs) if activation is not None else y
