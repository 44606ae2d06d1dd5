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

from kernels.activation import DEFAULT_NEGATIVE_SLOPE, activation_code
from kernels.activation import run as run_activation
from kernels import gemm as gemm_kernels
from kernels import runtime
from kernels.spec import DTYPES

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
    """(kernel activation name, negative slope) from a PyTorch-style name and keyword arguments.

    Accepts None/"identity", the names in `kernels.activation.NAMES`, `negative_slope=` for
    leaky_relu and `approximate="tanh"|"none"` for gelu (PyTorch's spelling).
    """
    activation_code(activation)  # raises ValueError naming the choices
    name = None if activation == "identity" else activation
    slope = kwargs.pop("negative_slope", DEFAULT_NEGATIVE_SLOPE)
    if "negative_slope" in kwargs or (slope != DEFAULT_NEGATIVE_SLOPE and name != "leaky_relu"):
        raise TypeError(f"negative_slope applies to leaky_relu only, not to {name!r}")
    approximate = kwargs.pop("approximate", "none")
    if approximate not in ("none", "tanh") or (approximate == "tanh" and name != "gelu"):
        raise ValueError(f"approximate must be 'none' or 'tanh' (gelu only), got {approximate!r} for {name!r}")
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s) for activation {name!r}: {', '.join(kwargs)}")
    if not isinstance(slope, (int, float)):
        raise TypeError(f"negative_slope must be a number, got {type(slope).__name__}")
    return ("gelu_tanh" if approximate == "tanh" else name), float(slope)


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


def _keep_pre(activation: str | None, *tensors: torch.Tensor | None) -> bool:
    return activation is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
         **activation_kwargs: object) -> torch.Tensor:
    """act(a @ b + bias) for a [M, K], b [K, N], bias [N], in one fused Triton kernel.

    `activation` is None or a name from `kernels.activation.NAMES` (gelu also takes
    approximate="tanh", leaky_relu negative_slope=). Gradients flow to every input.
    """
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
    return x.new_empty(x.shape)


@torch.library.custom_op("workbench::activation_backward", mutates_args=())
def _activation_backward_op(grad_out: torch.Tensor, x: torch.Tensor, name: str, negative_slope: float) -> torch.Tensor:
    return run_activation(x, name, negative_slope, grad=grad_out).view(x.shape)


@_activation_backward_op.register_fake
def _(grad_out, x, name, negative_slope):
    return x.new_empty(x.shape)


def _activation_setup_context(ctx, inputs, output) -> None:
    x, ctx.name, ctx.negative_slope = inputs
    ctx.save_for_backward(x)


def _activation_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _activation_backward_op(grad_out, x, ctx.name, ctx.negative_slope), None, None


_activation_op.register_autograd(_activation_backward, setup_context=_activation_setup_context)


def activation(x: torch.Tensor, name: str | None, **kwargs: object) -> torch.Tensor:
    """The activation `name` applied elementwise (PyTorch semantics; None/"identity" returns x).

    Keyword arguments as in torch.nn.functional: negative_slope (leaky_relu), approximate (gelu).
    """
    check_tensor("x", x)
    kernel_name, slope = resolve_activation(name, **kwargs)
    if kernel_name is None:
        return x
    return _activation_op(x, kernel_name, slope)
