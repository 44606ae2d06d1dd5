"""What a fused chain runs: the functions the fusion pass (`kernels.fusion`) puts into a model's graph.

Each takes the model's own modules and reads them at call time -- parameters, running stats,
train/eval mode -- so the swapped model keeps the same Parameter and buffer objects and switches
behaviour with `model.train()` / `model.eval()` exactly as the original.

    conv_bn_act:  act(bn(conv(x)) [+ residual])   batch statistics: the conv kernel with BN's statistics
                                                  and running-stat update in its launch, then one fused
                                                  normalise + residual + activation kernel;
                                                  running statistics: BN folded into the conv's weight and bias
                                                  (from the current running stats, every call), one conv kernel
                                                  with bias + residual + activation in its epilogue
    bn_act:       act(bn(y) [+ residual])         the statistics and the fused kernel
    ... -> max-pool (either, no residual)         batch statistics: the pool in the fused kernel, which
    ... -> AdaptiveAvgPool2d(1) (either)          stores only the pooled values (and a max's window tap);
                                                  running statistics with a conv: PyTorch's pool after it
    conv_act, conv1d_act, linear_act              one kernel with the activation in its epilogue (a Conv1d
                                                  as a 2-D conv of unit height)
    conv_transpose_act                            the conv's dgrad kernel, then bias and activation
    prelu                                         a PReLU module's learnable slopes, one kernel

A chain whose output only a conv_bn_act reads hands that call its `ChainSums` (`hand_sums`, `x_chain`): the
conv's dgrad launch forms the chain's backward sums, and the chain's backward is one elementwise pass.

A residual that is itself a conv -> BN (a downsample shortcut) comes in raw, with its BN as
`residual_bn` and that BN's batch statistics from the conv's launch as `residual_stats`, when that BN
uses batch statistics: its normalisation happens inside the consumer's fused kernel instead of in a
pass of its own (its producer is `conv_bn_act(..., defer=True)`).
"""

from __future__ import annotations

import torch
from torch import nn

from triton_workbench.kernels import ops
from triton_workbench.kernels.batch_norm import ChainSums
from triton_workbench.kernels.batch_norm_ops import (batch_norm_act, batch_norm_act_chain, check_input, running_of,
                                                     uses_batch_stats)
from triton_workbench.kernels.conv_geometry import make_geometry
from triton_workbench.kernels.conv_transpose import conv_transpose2d
from triton_workbench.kernels.global_average_pool import GlobalAveragePool
from triton_workbench.kernels.max_pool import MaxPool
from triton_workbench.kernels.prelu import prelu as prelu_kernel


def conv_act(x: torch.Tensor, conv: nn.Conv2d, activation: str | None = None,
             negative_slope: float | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(x) [+ residual]) in one conv kernel."""
    return _conv(x, conv, conv.weight, conv.bias, activation, negative_slope, residual)


def _conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
          negative_slope: float | None, residual: torch.Tensor | None) -> torch.Tensor:
    """ops.conv2d with `conv`'s geometry and the given weight and bias (its own, or with a BN folded in)."""
    return ops.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation,
                      residual=residual, **ops.activation_kwargs(activation, negative_slope))


def conv1d_act(x: torch.Tensor, conv: nn.Conv1d, activation: str | None = None,
               negative_slope: float | None = None) -> torch.Tensor:
    """act(conv1d(x)) as the 2-D conv of x with a unit height: [N, C, L] -> [N, C, 1, L], one conv kernel."""
    padding = conv.padding if isinstance(conv.padding, str) else (0, *conv.padding)
    y = ops.conv2d(x.unsqueeze(-2), conv.weight.unsqueeze(-2), conv.bias, (1, *conv.stride), padding,
                   (1, *conv.dilation), conv.groups, activation, **ops.activation_kwargs(activation, negative_slope))
    return y.squeeze(-2)


def conv_transpose_act(x: torch.Tensor, conv: nn.ConvTranspose2d, activation: str | None = None,
                       negative_slope: float | None = None) -> torch.Tensor:
    """act(conv_transpose2d(x)) on the conv kernels (kernels.conv_transpose), the activation in a pass after."""
    return conv_transpose2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.output_padding, conv.groups,
                            conv.dilation, activation, **ops.activation_kwargs(activation, negative_slope))


def linear_act(x: torch.Tensor, linear: nn.Linear, activation: str | None = None,
               negative_slope: float | None = None) -> torch.Tensor:
    """act(linear(x)) in one GEMM kernel."""
    return ops.linear(x, linear.weight, linear.bias, activation, **ops.activation_kwargs(activation, negative_slope))


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv's weight and bias with `bn`'s running-statistics normalisation folded in (computed in fp32, returned
    in the weight's dtype); differentiable with respect to both modules' parameters."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    shift = -bn.running_mean.float() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.float(), shift * bn.weight.float()
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), shift.to(conv.weight.dtype)


def _residual_for(residual: torch.Tensor | None, residual_bn: nn.BatchNorm2d | None
                  ) -> tuple[torch.Tensor | None, nn.BatchNorm2d | None]:
    """(residual, its BN still to apply): a deferred residual is raw only while its BN uses batch statistics."""
    return residual, residual_bn if residual_bn is not None and uses_batch_stats(residual_bn) else None


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                residual_bn: nn.BatchNorm2d | None = None, activation: str | None = None,
                negative_slope: float | None = None, defer: bool = False, in_place: bool = False,
                hand_on: bool = False, residual_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                pool: nn.Module | None = None, hand_sums: bool = False, x_chain: ChainSums | None = None
                ) -> torch.Tensor | tuple:
    """act(bn(conv(x)) [+ residual]), then `pool` (a max-pool, no residual, or an AdaptiveAvgPool2d to 1 x 1) in
    the same kernel; with `defer`,
    (conv(x), bn's batch statistics of it) while bn uses batch statistics -- the consumer normalises it with
    them (`residual_stats`, see the module docstring) -- else (bn(conv(x)), None). `in_place`: the add was
    `out += residual`, whose result keeps out's dtype. With `hand_on` or `hand_sums`, (the result, x handed
    on, the chain for the result's reader to form its backward sums with: `batch_norm_act_chain`); x's other
    readers read the x handed on, and the conv's dgrad launch adds their gradient of x where it can
    (`ops.conv2d_with_statistics`). `x_chain`: the chain whose output x is, this call its only reader."""
    if defer:
        return _deferred(x, conv, bn)
    out, handed, chain = _conv_bn_act(x, conv, bn, residual, residual_bn, activation, negative_slope, in_place,
                                      residual_stats, pool, hand_sums, x_chain)
    return (out, handed, chain) if hand_on or hand_sums else out


def _deferred(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(conv(x), bn's batch statistics of it from the conv's launch) while bn uses batch statistics, its
    consumer normalising it; else (bn(conv(x)), None)."""
    if not uses_batch_stats(bn):
        return _conv_bn_act(x, conv, bn, None, None, None, None, False, None)[0], None
    check_input(_conv_output_shape(x, conv), bn)
    y, mean, invstd, _ = ops.conv2d_with_statistics(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                                    conv.dilation, conv.groups, running_of(bn))
    return y, (mean, invstd)


def _conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: torch.Tensor | None,
                 residual_bn: nn.BatchNorm2d | None, activation: str | None, negative_slope: float | None,
                 in_place: bool, residual_stats: tuple[torch.Tensor, torch.Tensor] | None,
                 pool: nn.Module | None = None, hand_sums: bool = False, x_chain: ChainSums | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, ChainSums | None]:
    """(`conv_bn_act`'s result, x handed on: x itself but where the batch-statistics conv hands it on, the
    result's chain where `hand_sums` asks and there is one)."""
    residual, residual_bn = _residual_for(residual, residual_bn)
    if residual is not None and not _fuses(residual, _conv_output_shape(x, conv), _compute_dtype(x), in_place):
        out, handed, _ = _conv_bn_act(x, conv, bn, None, None, None, None, False, None, x_chain=x_chain)
        out = _add_in_pytorch(out, residual, residual_bn, residual_stats, activation, negative_slope, in_place)
        return (pool(out) if pool is not None else out), handed, None
    if uses_batch_stats(bn):  # the statistics come from the conv's launch
        check_input(_conv_output_shape(x, conv), bn)
        y, mean, invstd, handed = ops.conv2d_with_statistics(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                                             conv.dilation, conv.groups, running_of(bn), x_chain)
        out, chain = batch_norm_act_chain(y, bn, residual, residual_bn, activation, negative_slope, (mean, invstd),
                                          in_place, residual_stats, _window(pool), hand_sums)
        return out, handed, chain
    if residual_bn is not None:  # this BN runs on running stats but the shortcut's on the batch's: apply it first
        residual, residual_bn = batch_norm_act(residual, residual_bn, stats=residual_stats), None
    out = _conv(x, conv, *folded(conv, bn), activation, negative_slope, residual)
    return (pool(out) if pool is not None else out), x, None  # folded: the conv's epilogue ends it, PyTorch pools


def bn_act(y: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
           residual_bn: nn.BatchNorm2d | None = None, activation: str | None = None,
           negative_slope: float | None = None, in_place: bool = False,
           residual_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
           pool: nn.Module | None = None, hand_sums: bool = False) -> torch.Tensor | tuple:
    """act(bn(y) [+ residual]), then `pool` (as `conv_bn_act`), in one fused kernel after the statistics;
    with `hand_sums`, (that, the chain for its reader to form the backward sums with) as `conv_bn_act`."""
    residual, residual_bn = _residual_for(residual, residual_bn)
    if residual is not None and not _fuses(residual, y.shape, None, in_place):
        out = _add_in_pytorch(bn_act(y, bn), residual, residual_bn, residual_stats, activation, negative_slope,
                              in_place)
        out = pool(out) if pool is not None else out
        return (out, None) if hand_sums else out
    out, chain = batch_norm_act_chain(y, bn, residual, residual_bn, activation, negative_slope, in_place=in_place,
                                      residual_stats=residual_stats, pool=_window(pool), hand_sums=hand_sums)
    return (out, chain) if hand_sums else out


def _window(pool: nn.Module | None) -> MaxPool | GlobalAveragePool | None:
    """The kernels' form of a pool module (an nn.MaxPool2d, or an nn.AdaptiveAvgPool2d to 1 x 1)."""
    if pool is None:
        return None
    return GlobalAveragePool() if GlobalAveragePool.takes(pool) else MaxPool.of_module(pool)


def _conv_output_shape(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, ...]:
    kh, kw = conv.weight.shape[2:]
    geometry = make_geometry((kh, kw), conv.stride, conv.padding, conv.dilation, conv.groups)
    return (*x.shape[:-3], conv.out_channels, *geometry.output_hw(*x.shape[-2:], kh, kw))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv of x computes and returns in: autocast's where it is on, else x's."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fuses(residual: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None, in_place: bool) -> bool:
    """Whether the fused kernels can add `residual`: the output's shape (no broadcasting), and -- where the
    kernel's dtype is fixed (`dtype`) -- that dtype, unless the add casts to it anyway (`in_place`)."""
    return tuple(residual.shape) == tuple(shape) and (dtype is None or in_place or residual.dtype == dtype)


def _add_in_pytorch(out: torch.Tensor, residual: torch.Tensor, residual_bn: nn.BatchNorm2d | None,
                    residual_stats: tuple[torch.Tensor, torch.Tensor] | None, name: str | None,
                    negative_slope: float, in_place: bool) -> torch.Tensor:
    """act(out + residual) with PyTorch's add (broadcasting, type promotion; `out +=` keeps out's dtype)."""
    if residual_bn is not None:
        residual = batch_norm_act(residual, residual_bn, stats=residual_stats)
    total = out + residual
    total = total.to(out.dtype) if in_place else total
    return activation(total, name, negative_slope) if name is not None else total


def prelu(x: torch.Tensor, module: nn.PReLU) -> torch.Tensor:
    """PReLU with the module's learnable slopes, in one kernel."""
    return prelu_kernel(x, module.weight)


def activation(x: torch.Tensor, name: str, negative_slope: float | None = None) -> torch.Tensor:
    """The activation alone, in the elementwise kernel."""
    return ops.activation(x, name, **ops.activation_kwargs(name, negative_slope))
