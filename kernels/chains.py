"""What a fused chain runs: the functions the fusion pass (`kernels.fusion`) puts into a model's graph.

Each takes the model's own modules and reads them at call time -- parameters, running stats,
train/eval mode -- so the swapped model keeps the same Parameter and buffer objects and switches
behaviour with `model.train()` / `model.eval()` exactly as the original.

    conv_bn_act:  act(bn(conv(x)) [+ residual])   batch statistics: the conv kernel with BN's moments in its
                                                  epilogue, a one-program finalize, and one fused normalise +
                                                  residual + activation kernel;
                                                  running statistics: BN folded into the conv's weight and bias
                                                  (from the current running stats, every call), one conv kernel
                                                  with bias + residual + activation in its epilogue
    bn_act:       act(bn(y) [+ residual])         the statistics and the fused kernel
    conv_act, linear_act                          one kernel with the activation in its epilogue

A residual that is itself a conv -> BN (a downsample shortcut) comes in raw, with its BN as
`residual_bn`, when that BN uses batch statistics: its normalisation happens inside the consumer's
fused kernel instead of in a pass of its own (its producer is `conv_bn_act(..., defer=True)`).
"""

from __future__ import annotations

import torch
from torch import nn

from triton_workbench.kernels import ops
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE
from triton_workbench.kernels.batch_norm_ops import batch_norm_act, uses_batch_stats


def _activation_kwargs(activation: str | None, negative_slope: float) -> dict[str, float]:
    return {"negative_slope": negative_slope} if activation == "leaky_relu" else {}


def conv_act(x: torch.Tensor, conv: nn.Conv2d, activation: str | None = None,
             negative_slope: float = DEFAULT_NEGATIVE_SLOPE, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(x) [+ residual]) in one conv kernel."""
    return ops.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation,
                      residual=residual, **_activation_kwargs(activation, negative_slope))


def linear_act(x: torch.Tensor, linear: nn.Linear, activation: str | None = None,
               negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """act(linear(x)) in one GEMM kernel."""
    return ops.linear(x, linear.weight, linear.bias, activation, **_activation_kwargs(activation, negative_slope))


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
                negative_slope: float = DEFAULT_NEGATIVE_SLOPE, defer: bool = False) -> torch.Tensor:
    """act(bn(conv(x)) [+ residual]); with `defer`, conv(x) alone while bn uses batch statistics (the consumer
    normalises it, see the module docstring), else bn(conv(x))."""
    residual, residual_bn = _residual_for(residual, residual_bn)
    if uses_batch_stats(bn) and defer:
        return conv_act(x, conv)
    if uses_batch_stats(bn):  # the statistics come from the conv's epilogue
        y, moments = ops.conv2d_with_moments(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                             conv.groups)
        return batch_norm_act(y, bn, residual, residual_bn, activation, negative_slope, moments)
    if residual_bn is not None:  # this BN runs on running stats but the shortcut's on the batch's: apply it first
        residual, residual_bn = batch_norm_act(residual, residual_bn), None
    weight, bias = folded(conv, bn)
    return ops.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation,
                      residual=residual, **_activation_kwargs(activation, negative_slope))


def bn_act(y: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
           residual_bn: nn.BatchNorm2d | None = None, activation: str | None = None,
           negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """act(bn(y) [+ residual]) in one fused kernel after the statistics."""
    residual, residual_bn = _residual_for(residual, residual_bn)
    return batch_norm_act(y, bn, residual, residual_bn, activation, negative_slope)


def activation(x: torch.Tensor, name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """The activation alone, in the elementwise kernel."""
    return ops.activation(x, name, **_activation_kwargs(name, negative_slope))
