"""Comparing a swapped model or Triton op with PyTorch in float64: the error measure and the step the tests share."""

import torch
from torch import nn


def relative_error(ours: torch.Tensor, reference: torch.Tensor, floor: float = 1e-2) -> float:
    """Largest error relative to the reference's largest value, that value floored at `floor` (a reference that
    is zero in exact arithmetic, such as a conv bias's gradient before batch-statistics BN, is rounding noise)."""
    return ((ours.double() - reference).abs().max() / reference.abs().max().clamp_min(floor)).item()


def output_after_backward(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`net(inputs)`, with fresh gradients of ones back-propagated through it."""
    net.zero_grad()
    out = net(inputs)
    out.backward(torch.ones_like(out))
    return out
