"""The kernels as PyTorch ops: torch.library custom ops in the `workbench` namespace.

Each op has a fake (meta) implementation and a registered autograd whose backward is itself a
custom op, so `torch.library.opcheck` passes and models run under `torch.compile`. The public
functions (`gemm`, `linear`, `activation`) check their arguments and follow PyTorch semantics.

Extending (conv appends its own section below): validate with `check_tensor`, resolve the fused
activation with `resolve_activation`, then define `workbench::<op>` the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from triton_workbench.kernels.activation import PARAMETERS, activation_code, default_parameter
from triton_workbench.kernels.activation import output_like, run as run_activation
from triton_workbench.kernels.batch_norm import ChainSums, Running, batch_moments
from triton_workbench.kernels.conv_depthwise import depthwise_forward, is_depthwise
from triton_workbench.kernels.conv_depthwise_grad import depthwise_input_grad, depthwise_weight_grad
from triton_workbench.kernels.conv_dgrad import conv2d_input_grad, conv2d_input_grad_with_sums
from triton_workbench.kernels.conv_fwd import conv2d_forward, padded_input
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, empty_in_layout_of, make_geometry,
                                                    memory_format_of)
from triton_workbench.kernels.conv_wgrad import conv2d_bias_grad, conv2d_weight_grad
from triton_workbench.kernels import gemm as gemm_kernels
from triton_workbench.kernels import runtime
from triton_workbench.kernels.spec import DTYPES

# ---------------------------------------------------------------------------------------------
# argument checks shared by every op


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Input dtypes the kernels take here: bf16 only on a GPU (the interpreter has no bfloat16)."""
    return tuple(dtype for dtype in DTYPES.values() if not (runtime.INTERPRETER and dtype == torch.bfloat16))


def check_tensor(name: str, tensor: object, ndim: int | tuple[int, ...] | None = None,
                 like: torch.Tensor | None = None) -> torch.Tensor:
    """Check that argument `name` is a tensor kernels can take (rank, dtype, device, matching `like`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if ranks is not None and tensor.dim() not in ranks:
        raise ValueError(f"{name} must have {' or '.join(map(str, ranks))} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in supported_dtypes():
        names = ", ".join(str(dtype) for dtype in supported_dtypes())
        raise TypeError(f"{name} has dtype {tensor.dtype}: expected one of {names}")
    if like is not None and tensor.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but the input has {like.dtype}: they must match")
    if like is not None and tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but the input is on {like.device}: they must match")
    runtime.check_device(name, tensor)
    return tensor


def resolve_activation(activation: str | None, **kwargs: object) -> tuple[str | None, float]:
    """(kernel activation name, the activation's parameter) from a PyTorch-style name and keyword arguments.

    Accepts None/"identity" and the names in `kernels.activation.NAMES` with PyTorch's keywords:
    `negative_slope=` (leaky_relu) and `alpha=` (elu, celu; celu's not 0) become the kernels' one float
    parameter, `approximate="tanh"|"none"` selects gelu's form, and softplus takes `beta=` and `threshold=` at
    PyTorch's defaults (1, 20) only: the kernel has those built in.
    """
    activation_code(activation)  # raises ValueError naming the choices
    name = None if activation == "identity" else activation
    keyword = PARAMETERS[name][0] if name in PARAMETERS else None
    for given in sorted({other for other, _ in PARAMETERS.values()} & kwargs.keys() - {keyword}):
        takers = ", ".join(taker for taker, (other, _) in PARAMETERS.items() if other == given)
        raise TypeError(f"{given} applies to {takers} only, not to {name!r}")
    parameter = kwargs.pop(keyword, default_parameter(name)) if keyword else default_parameter(name)
    approximate = kwargs.pop("approximate", "none")
    if approximate not in ("none", "tanh") or (approximate == "tanh" and name != "gelu"):
        raise ValueError(f"approximate must be 'none' or 'tanh' (gelu only), got {approximate!r} for {name!r}")
    for setting, default in (("beta", 1.0), ("threshold", 20.0)):
        if setting not in kwargs:
            continue
        value = kwargs.pop(setting)
        if name != "softplus":
            raise TypeError(f"{setting} applies to softplus only, not to {name!r}")
        if value != default:
            raise ValueError(f"softplus runs with beta=1 and threshold=20 only (PyTorch's defaults), "
                             f"got {setting}={value!r}")
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s) for activation {name!r}: {', '.join(kwargs)}")
    if isinstance(parameter, bool) or not isinstance(parameter, (int, float)):
        raise TypeError(f"{keyword} must be a number, got {type(parameter).__name__}")
    if name == "celu" and parameter == 0:
        raise ValueError("alpha must not be 0 for celu (it divides by alpha; PyTorch raises too)")
    return ("gelu_tanh" if approximate == "tanh" else name), float(parameter)


def activation_kwargs(name: str | None, parameter: float | None) -> dict[str, float]:
    """The keyword arguments of `resolve_activation` (and so of every op here) that give activation `name` the
    kernels' parameter `parameter`: {"negative_slope": p} for leaky_relu, {"alpha": p} for elu and celu, else
    {} (and {} for None: the activation's default)."""
    return {PARAMETERS[name][0]: parameter} if name in PARAMETERS and parameter is not None else {}


# ---------------------------------------------------------------------------------------------
# GEMM: c = act(a @ b + bias)

_EMPTY = (0,)  # shape of the placeholder returned for an output that is not needed


@torch.library.custom_op("workbench::gemm", mutates_args=())
def _gemm_op(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
             negative_slope: float, keep_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a @ b + bias), pre-activation if keep_pre and there is an activation, else empty)."""
    c, pre = gemm_kernels.forward(a, b, bias, activation, negative_slope, keep_pre=keep_pre)
    return c, pre if pre is not None else a.new_empty(_EMPTY)


@_gemm_op.register_fake
def _(a, b, bias, activation, negative_slope, keep_pre):
    shape = (a.shape[0], b.shape[1])
    return a.new_empty(shape), a.new_empty(shape if keep_pre and activation is not None else _EMPTY)


@torch.library.custom_op("workbench::gemm_backward", mutates_args=())
def _gemm_backward_op(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor,
                      activation: Optional[str], negative_slope: float, need_a: bool, need_b: bool,
                      need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for a, b and bias (empty where not needed); `pre` is unused without activation."""
    grads = gemm_kernels.backward(grad_out, a, b, pre if activation is not None else None, activation,
                                  negative_slope, (need_a, need_b, need_bias))
    return tuple(grad if grad is not None else a.new_empty(_EMPTY) for grad in grads)


@_gemm_backward_op.register_fake
def _(grad_out, a, b, pre, activation, negative_slope, need_a, need_b, need_bias):
    return (torch.empty_like(a) if need_a else a.new_empty(_EMPTY),
            torch.empty_like(b) if need_b else a.new_empty(_EMPTY),
            a.new_empty(b.shape[1]) if need_bias else a.new_empty(_EMPTY))


def _gemm_setup_context(ctx, inputs, output) -> None:
    a, b, bias, activation, negative_slope, keep_pre = inputs
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.kept_pre = keep_pre and activation is not None
    ctx.save_for_backward(a, b, bias, output[1])
    ctx.mark_non_differentiable(output[1])


def _gemm_backward(ctx, grad_c, _grad_pre):
    a, b, bias, pre = ctx.saved_tensors
    if ctx.activation is not None and not ctx.kept_pre:  # forward ran without grad: recompute z
        pre = _gemm_op(a, b, bias, None, 0.0, False)[0]
    need_a, need_b, need_bias = ctx.needs_input_grad[:3]
    grad_a, grad_b, grad_bias = _gemm_backward_op(grad_c, a, b, pre, ctx.activation, ctx.negative_slope,
                                                  need_a, need_b, need_bias and bias is not None)
    return (grad_a if need_a else None, grad_b if need_b else None,
            grad_bias if need_bias and bias is not None else None, None, None, None)


_gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


def autocast_inputs(*tensors: object) -> tuple:
    """Floating tensors cast to the autocast dtype when autocast is on for their device, as torch's own
    matmul and conv2d do under `torch.autocast` (so `--amp fp16` runs our GEMM and conv in fp16 too)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    # the devices our kernels run on (not meta, which has no autocast); a constant test, which torch.compile
    # traces (PyTorch 2.11's dynamo cannot trace torch.amp.is_autocast_available)
    if first is None or first.device.type not in ("cuda", "cpu"):
        return tensors
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _keep_pre(activation: str | None, *tensors: torch.Tensor | None) -> bool:
    return activation is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
         **activation_kwargs: object) -> torch.Tensor:
    """act(a @ b + bias) for a [M, K], b [K, N], bias [N], in one fused Triton kernel.

    `activation` is None or a name from `kernels.activation.NAMES` (gelu also takes
    approximate="tanh", leaky_relu negative_slope=). Gradients flow to every input.
    """
    a, b, bias = autocast_inputs(a, b, bias)
    check_tensor("a", a, 2)
    check_tensor("b", b, 2, like=a)
    if bias is not None:
        check_tensor("bias", bias, 1, like=a)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a [M, K] and b [K, N] must share K: got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if bias is not None and bias.shape[0] != b.shape[1]:
        raise ValueError(f"bias must have N = {b.shape[1]} elements, got shape {tuple(bias.shape)}")
    name, slope = resolve_activation(activation, **activation_kwargs)
    return _gemm_op(a, b, bias, name, slope, _keep_pre(name, a, b, bias))[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
           **activation_kwargs: object) -> torch.Tensor:
    """act(F.linear(x, weight, bias)): x [..., in], weight [out, in], bias [out] -> [..., out]."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_tensor("x", x)
    check_tensor("weight", weight, 2, like=x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({weight.shape[1]})")
    if bias is not None:
        check_tensor("bias", bias, 1, like=x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have out_features = {weight.shape[0]} elements, got {tuple(bias.shape)}")
    name, slope = resolve_activation(activation, **activation_kwargs)
    rows = x.reshape(-1, x.shape[-1])  # a view whenever the leading dims allow one
    out = _gemm_op(rows, weight.t(), bias, name, slope, _keep_pre(name, x, weight, bias))[0]
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# elementwise activation


@torch.library.custom_op("workbench::activation", mutates_args=())
def _activation_op(x: torch.Tensor, name: str, negative_slope: float) -> torch.Tensor:
    return run_activation(x, name, negative_slope).view(x.shape)


@_activation_op.register_fake
def _(x, name, negative_slope):
    return output_like(x)


@torch.library.custom_op("workbench::activation_backward", mutates_args=())
def _activation_backward_op(grad_out: torch.Tensor, x: torch.Tensor, name: str, negative_slope: float) -> torch.Tensor:
    return run_activation(x, name, negative_slope, grad=grad_out).view(x.shape)


@_activation_backward_op.register_fake
def _(grad_out, x, name, negative_slope):
    return output_like(x, grad_out)


def _activation_setup_context(ctx, inputs, output) -> None:
    x, ctx.name, ctx.negative_slope = inputs
    ctx.save_for_backward(x)


def _activation_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _activation_backward_op(grad_out, x, ctx.name, ctx.negative_slope), None, None


_activation_op.register_autograd(_activation_backward, setup_context=_activation_setup_context)


def activation(x: torch.Tensor, name: str | None, **kwargs: object) -> torch.Tensor:
    """The activation `name` applied elementwise (PyTorch semantics; None/"identity" returns x).

    Keyword arguments as in torch.nn.functional (see `resolve_activation`): negative_slope (leaky_relu), alpha
    (elu, celu), approximate (gelu).
    """
    check_tensor("x", x)
    kernel_name, slope = resolve_activation(name, **kwargs)
    if kernel_name is None:
        return x
    return _activation_op(x, kernel_name, slope)


# ---------------------------------------------------------------------------------------------
# conv2d: y = act(conv2d(x, weight) + bias); geometry travels as int lists (padding: top, bottom, left, right)


def _geometry(stride: list[int], padding: list[int], dilation: list[int], groups: int) -> ConvGeometry:
    return ConvGeometry(*stride, *padding, *dilation, groups)


@torch.library.custom_op("workbench::conv2d", mutates_args=())
def _conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
               padding: list[int], dilation: list[int], groups: int, activation: Optional[str],
               negative_slope: float, keep_pre: bool, residual: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(conv2d(x, weight) + bias + residual) in x's memory format, pre-activation if keep_pre and an
    activation, else empty)."""
    geometry = _geometry(stride, padding, dilation, groups)
    if is_depthwise(x.shape[1], weight.shape[0], groups):  # the direct kernel
        y, pre = depthwise_forward(x, weight, bias, geometry, activation, negative_slope, keep_pre, residual=residual)
    else:
        y, pre = conv2d_forward(x, weight, bias, geometry, activation, negative_slope, keep_pre, residual=residual)[:2]
    return y, pre if pre is not None else x.new_empty(_EMPTY)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, negative_slope, keep_pre, residual):
    y = _empty_conv_output(x, weight, stride, padding, dilation, groups)
    return y, torch.empty_like(y) if keep_pre and activation is not None else x.new_empty(_EMPTY)


def _empty_conv_output(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                       dilation: list[int], groups: int) -> torch.Tensor:
    ho, wo = _geometry(stride, padding, dilation, groups).output_hw(*x.shape[2:], *weight.shape[2:])
    return empty_in_layout_of(x, (x.shape[0], weight.shape[0], ho, wo))


@torch.library.custom_op("workbench::conv2d_statistics",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _conv2d_statistics_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
                          padding: list[int], dilation: list[int], groups: int,
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                          num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float], eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv2d(x, weight) + bias, its batch mean and 1 / sqrt(var + eps) per channel as fp32 [2, C], x as the
    kernel read it where it padded its few channels, else empty) for a following BatchNorm, whose running stats
    (those given) they update: one launch of the conv kernel, or for a depthwise conv the direct kernel and a
    statistics pass. (The padded x is the stem's: its wgrad reads it instead of padding x again.)"""
    geometry = _geometry(stride, padding, dilation, groups)
    running = Running(running_mean, running_var, num_batches_tracked, momentum, eps)
    if is_depthwise(x.shape[1], weight.shape[0], groups):
        y, _ = depthwise_forward(x, weight, bias, geometry)
        return y, torch.stack(batch_moments(y, running)), x.new_empty(_EMPTY)
    y, _, stats, padded = conv2d_forward(x, weight, bias, geometry, statistics=running)
    return y, stats, padded if padded is not None else x.new_empty(_EMPTY)


@_conv2d_statistics_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, running_mean, running_var, num_batches_tracked, momentum,
      eps):
    geometry = _geometry(stride, padding, dilation, groups)
    padded = padded_input(x, weight, geometry, bias is not None) if not is_depthwise(x.shape[1], weight.shape[0],
                                                                                      groups) else None
    return (_empty_conv_output(x, weight, stride, padding, dilation, groups),
            x.new_empty((2, weight.shape[0]), dtype=torch.float32),
            padded if padded is not None else x.new_empty(_EMPTY))


@torch.library.custom_op("workbench::conv2d_backward", mutates_args=())
def _conv2d_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
                        stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        activation: Optional[str], negative_slope: float, need_x: bool, need_weight: bool,
                        need_bias: bool, need_residual: bool, add_to_x: Optional[torch.Tensor],
                        x_padded: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x (dgrad kernel, plus `add_to_x`: x's gradient from its other readers, added in the same
    launch), weight and bias (wgrad kernel, reading `x_padded`, the forward's padded x, where there is one) and
    the residual (dz itself) from dz = dy * act'(pre), formed once by the activation kernel for all; empty where
    not needed."""
    geometry = _geometry(stride, padding, dilation, groups)
    dz = run_activation(pre, activation, negative_slope, grad=grad_out) if activation is not None else grad_out
    depthwise = is_depthwise(x.shape[1], weight.shape[0], groups)
    input_grad = depthwise_input_grad if depthwise else conv2d_input_grad
    weight_grad = depthwise_weight_grad if depthwise else conv2d_weight_grad
    grad_x = grad_weight = grad_bias = None
    if need_x and depthwise:
        grad_x = input_grad(dz, weight, x, geometry)
        grad_x = grad_x if add_to_x is None else grad_x.add_(add_to_x)
    elif need_x:
        grad_x = input_grad(dz, weight, x, geometry, add=add_to_x)
    if need_weight:
        padded = {} if depthwise else {"padded": x_padded}
        grad_weight, grad_bias = weight_grad(dz, x, weight, geometry, bias_grad=need_bias, **padded)
    elif need_bias:
        grad_bias = conv2d_bias_grad(dz, weight.dtype)
    return (grad_x if grad_x is not None else x.new_empty(_EMPTY),
            grad_weight if need_weight else x.new_empty(_EMPTY),
            grad_bias if grad_bias is not None else x.new_empty(_EMPTY),
            (dz.clone() if dz is grad_out else dz) if need_residual else x.new_empty(_EMPTY))


@_conv2d_backward_op.register_fake
def _(grad_out, x, weight, pre, stride, padding, dilation, groups, activation, negative_slope, need_x, need_weight,
      need_bias, need_residual, add_to_x, x_padded=None):
    return (empty_in_layout_of(x, x.shape) if need_x else x.new_empty(_EMPTY),
            empty_in_layout_of(weight, weight.shape) if need_weight else x.new_empty(_EMPTY),
            x.new_empty(weight.shape[0]) if need_bias else x.new_empty(_EMPTY),
            output_like(pre if activation is not None else grad_out, grad_out) if need_residual
            else x.new_empty(_EMPTY))


@torch.library.custom_op("workbench::conv2d_input_grad_chain_sums", mutates_args=())
def _input_grad_sums_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, add_to_x: Optional[torch.Tensor],
                        y: torch.Tensor, residual: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                        bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                        r_mean: Optional[torch.Tensor], r_invstd: Optional[torch.Tensor],
                        r_weight: Optional[torch.Tensor], r_bias: Optional[torch.Tensor], activation: Optional[str],
                        negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x [+ add_to_x], the backward sums [3, C] of the BN chain whose output x is (its y, residual, norms,
    activation: `batch_norm.ChainSums`), empty where the dgrad launched nothing: the chain forms them) in one
    dgrad launch."""
    chain = ChainSums.of((y, residual, mean, invstd, bn_weight, bn_bias, r_mean, r_invstd, r_weight, r_bias),
                         activation, negative_slope)
    grad_x, sums = conv2d_input_grad_with_sums(grad_out, weight, x, _geometry(stride, padding, dilation, groups),
                                               chain, add=add_to_x)
    return grad_x, sums if sums is not None else x.new_empty(_EMPTY, dtype=torch.float32)


@_input_grad_sums_op.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, add_to_x, y, residual, mean, invstd, bn_weight, bn_bias,
      r_mean, r_invstd, r_weight, r_bias, activation, negative_slope):
    sums = (3, x.shape[1]) if x.numel() and grad_out.numel() else _EMPTY
    return empty_in_layout_of(x, x.shape), x.new_empty(sums, dtype=torch.float32)


def _conv2d_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups, activation, negative_slope, keep_pre, residual = inputs
    ctx.geometry_args = (stride, padding, dilation, groups)
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.kept_pre = keep_pre and activation is not None
    ctx.save_for_backward(x, weight, bias, output[1], residual)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for it: a launch, for nothing


def _conv2d_backward(ctx, grad_y, _grad_pre):
    if grad_y is None:  # only the non-differentiable output was used
        return (None,) * 11
    x, weight, bias, pre, residual = ctx.saved_tensors
    if ctx.activation is not None and not ctx.kept_pre:  # forward ran without keeping z: recompute it
        pre = _conv2d_op(x, weight, bias, *ctx.geometry_args, None, 0.0, False, residual)[0]
    grad_x, grad_weight, grad_bias, grad_residual = _conv_grads(ctx, grad_y, x, weight, bias, pre,
                                                                ctx.needs_input_grad[10] and residual is not None)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, grad_residual


def _conv_grads(ctx, grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                pre: torch.Tensor, need_residual: bool, add_to_x: torch.Tensor | None = None, skip_x: bool = False,
                x_padded: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(grad x [+ add_to_x], grad weight, grad bias, grad residual) of a conv whose ctx holds its geometry and
    activation, None where not needed (its first three inputs are x, weight, bias) or `skip_x`; `x_padded`: the
    forward's padded x, for the wgrad."""
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    needed = (need_x and not skip_x, need_weight, need_bias and bias is not None, need_residual)
    grads = _conv2d_backward_op(grad_y, x, weight, pre, *ctx.geometry_args, ctx.activation, ctx.negative_slope,
                                *needed, add_to_x if needed[0] else None, x_padded)
    return tuple(grad if need else None for grad, need in zip(grads, needed))


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


class _ConvStatistics(torch.autograd.Function):
    """`workbench::conv2d_statistics` with the conv's gradients (an op that updates buffers in place cannot
    register its autograd formula with torch.library). The statistics carry none: the BatchNorm backward
    that uses them differentiates through them itself. With `hand_on`, x is also an output (a view of it):
    its other readers read that instead, so their gradient of x arrives here and is added in the dgrad launch,
    not by an add of autograd's. With `chain` (x is that BN chain's output, and this conv's gradient of x its
    whole gradient), the dgrad launch also forms the chain's backward sums, returned as the gradient of the
    chain's `token`: its backward reads them there instead of launching their pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, running_mean, running_var,
                num_batches_tracked, momentum, eps, hand_on, token, chain):
        y, stats, padded = _conv2d_statistics_op(x, weight, bias, stride, padding, dilation, groups, running_mean,
                                                 running_var, num_batches_tracked, momentum, eps)
        ctx.geometry_args = (stride, padding, dilation, groups)
        ctx.activation, ctx.negative_slope = None, 0.0
        ctx.chain = (chain.activation, chain.negative_slope) if chain is not None else None  # its tensors: saved
        kept = padded if padded.numel() and ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x, weight, bias, kept, *(chain.tensors() if chain is not None else ()))
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return (y, stats, x) if hand_on else (y, stats)

    @staticmethod
    def backward(ctx, grad_y, _grad_stats, grad_handed=None):
        x, weight, bias, padded, *chain = ctx.saved_tensors
        if grad_y is None:
            return (grad_handed,) + (None,) * 14
        fused = ctx.chain is not None and ctx.needs_input_grad[0] and ctx.needs_input_grad[13] and \
            ChainSums.of(chain, *ctx.chain).fits(_dx_layout(x))  # else the chain forms its sums itself
        if fused:
            fused_x, sums = _input_grad_sums_op(grad_y, x, weight, *ctx.geometry_args, grad_handed, *chain,
                                                *ctx.chain)
        grad_x, grad_weight, grad_bias, _ = _conv_grads(ctx, grad_y, x, weight, bias, x.new_empty(_EMPTY), False,
                                                        grad_handed, skip_x=fused, x_padded=padded)
        if not fused:
            return (grad_x, grad_weight, grad_bias) + (None,) * 12
        return (fused_x, grad_weight, grad_bias) + (None,) * 10 + (sums if sums.numel() else None, None)


def _dx_layout(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor shaped and laid out as the dgrad lays out x's gradient (`empty_in_layout_of`), for its
    strides: no memory, no copy."""
    return torch.empty(x.shape, device="meta", memory_format=memory_format_of(x))


def conv2d_with_statistics(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           stride: int | tuple[int, int], padding: int | tuple[int, ...] | str,
                           dilation: int | tuple[int, int], groups: int, running: Running,
                           chain: ChainSums | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F.conv2d(x, weight, bias, ...), its batch mean and 1 / sqrt(var + eps) per channel, fp32, and x handed
    on): what a following BatchNorm needs, computed in the conv's launch instead of passes over y, that BN's
    `running` stats updated there as torch.nn.BatchNorm2d does in training. x's other readers should read the
    x handed on: their gradient of x is then added in this conv's dgrad launch (where x needs a gradient and
    runs as it is given: no dtype or layout conversion). x is 4-D. `chain`: the BN chain whose output x is,
    when this conv's gradient of x is all of x's gradient (x's other readers read it handed on): its backward
    sums are then formed in the dgrad launch (`_ConvStatistics`), where that runs x as it is given."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W] for batch statistics, got shape {tuple(x.shape)}")
    batched, weight, bias, _, geometry_args = _checked_conv(x, weight, bias, stride, padding, dilation, groups, None)
    hand_on = batched is x and x.requires_grad and torch.is_grad_enabled()
    fused = hand_on and chain is not None and chain.fits(x) and not is_depthwise(x.shape[1], weight.shape[0], groups)
    y, stats, *handed = _ConvStatistics.apply(batched, weight, bias, *geometry_args, running.mean, running.var,
                                              running.batches, running.momentum, running.eps, hand_on,
                                              chain.token if fused else None, chain if fused else None)
    return y, stats[0], stats[1], handed[0] if handed else x


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, ...] | str = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1, activation: str | None = None,
           residual: torch.Tensor | None = None, **activation_kwargs: object) -> torch.Tensor:
    """act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual) in one implicit-GEMM Triton
    kernel.

    x is [N, C_in, H, W] or unbatched [C_in, H, W], NCHW or channels_last (the output keeps x's
    memory format); weight [C_out, C_in / groups, kH, kW]; padding an int, a pair, 'same', 'valid'
    or four ints (top, bottom, left, right: asymmetric, without a copy of x); residual (optional)
    shaped as the output. `activation` as in `gemm`. Gradients flow to x, weight, bias and residual.
    """
    name, slope = resolve_activation(activation, **activation_kwargs)
    batched, weight, bias, residual, geometry_args = _checked_conv(x, weight, bias, stride, padding, dilation, groups,
                                                                   residual)
    y = _conv2d_op(batched, weight, bias, *geometry_args, name, slope, _keep_pre(name, x, weight, bias, residual),
                   residual)[0]
    return y.squeeze(0) if x.dim() == 3 else y


def _checked_conv(x, weight, bias, stride, padding, dilation, groups, residual) -> tuple:
    """(x batched and laid out as the conv runs it, weight, bias and residual as it takes them, the geometry as
    the ops' (stride, padding, dilation, groups) arguments): the checks and conversions both conv ops share."""
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    check_tensor("x", x, (3, 4))
    check_tensor("weight", weight, 4, like=x)
    if bias is not None:
        check_tensor("bias", bias, 1, like=x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have C_out = {weight.shape[0]} elements, got shape {tuple(bias.shape)}")
    geometry = make_geometry(tuple(weight.shape[2:]), stride, padding, dilation, groups)
    _check_conv_sizes(x, weight, groups)
    if x.shape[-3] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with groups={groups} "
                         f"expects {weight.shape[1] * groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight's C_out ({weight.shape[0]}) must be divisible by groups ({groups})")
    ho, wo = geometry.output_hw(*x.shape[-2:], *weight.shape[2:])
    if ho < 1 or wo < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[-2:])} is too small for weight {tuple(weight.shape)} "
                         f"with this padding and dilation: output would be {ho}x{wo}")
    batched = x.unsqueeze(0) if x.dim() == 3 else x
    if channels_last(weight) and not channels_last(batched):
        # as PyTorch's convs: a channels_last weight runs the conv channels_last (one copy where x is not;
        # none for a single channel, dense in both layouts)
        batched = batched.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = _residual_like(residual, batched, (batched.shape[0], weight.shape[0], ho, wo))
    g = geometry
    padding = [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right]
    return batched, weight, bias, residual, ([g.stride_h, g.stride_w], padding, [g.dilation_h, g.dilation_w], groups)


def _residual_like(residual: torch.Tensor, batched: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The residual checked against the conv's output shape and dtype, batched and laid out as the output."""
    check_tensor("residual", residual, (3, 4), like=batched)
    batched_residual = residual.unsqueeze(0) if residual.dim() == 3 else residual
    if tuple(batched_residual.shape) != tuple(shape):
        raise ValueError(f"residual must have the conv's output shape {tuple(shape)}, got {tuple(residual.shape)}")
    return batched_residual.contiguous(memory_format=memory_format_of(batched))


def _check_conv_sizes(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    """The sizes F.conv2d refuses (no output channel, a kernel with no tap), refused with a ValueError naming
    them; and no input channel, for which PyTorch returns an output of 0 channels whatever C_out is."""
    c_out, c_in_g, kh, kw = weight.shape
    if c_out < groups:
        raise ValueError(f"weight has {c_out} output channels (dimension 0 of {tuple(weight.shape)}): conv2d needs "
                         f"at least groups = {groups}")
    if kh < 1 or kw < 1:
        raise ValueError(f"weight's kernel size must be at least 1x1, got {kh}x{kw} (weight {tuple(weight.shape)})")
    if x.shape[-3] == 0 or c_in_g == 0:
        raise ValueError(f"x has {x.shape[-3]} input channels and weight {tuple(weight.shape)} {c_in_g} per group: "
                         "conv2d needs at least one")


# ---------------------------------------------------------------------------------------------
# FLOP counts for torch.utils.flop_counter.FlopCounterMode (the matmuls only, as PyTorch counts its own ops)


@register_flop_formula(torch.ops.workbench.gemm)
def _gemm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@register_flop_formula(torch.ops.workbench.gemm_backward)
def _gemm_backward_flops(grad_shape, a_shape, b_shape, pre_shape, activation, negative_slope, need_a, need_b,
                         need_bias, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1] * (int(need_a) + int(need_b))


@register_flop_formula([torch.ops.workbench.conv2d, torch.ops.workbench.conv2d_statistics])
def _conv2d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape[0])


@register_flop_formula(torch.ops.workbench.conv2d_backward)
def _conv2d_backward_flops(grad_shape, x_shape, w_shape, pre_shape, stride, padding, dilation, groups, activation,
                           negative_slope, need_x, need_weight, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, grad_shape) * (int(need_x) + int(need_weight))


@register_flop_formula(torch.ops.workbench.conv2d_input_grad_chain_sums)
def _input_grad_sums_flops(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, grad_shape)  # (the chain's sums: elementwise work, not counted)


# ---------------------------------------------------------------------------------------------
# double backward: not implemented, said so plainly instead of a hint to register a formula


def refuse_double_backward(*backward_ops) -> None:
    """Register, for each backward op, a backward that raises NotImplementedError naming the op."""
    for backward_op in backward_ops:
        name = backward_op._qualname

        def backward(ctx, *grads, name=name):
            raise NotImplementedError(
                f"{name}: double backward (gradients of gradients, e.g. torch.autograd.grad(..., "
                f"create_graph=True) for a gradient penalty) is not supported by the Triton kernels; run that "
                f"model with PyTorch's ops")

        backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


refuse_double_backward(_gemm_backward_op, _activation_backward_op, _conv2d_backward_op, _input_grad_sums_op)
