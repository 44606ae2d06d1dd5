"""BatchNorm on the Triton kernels: custom ops for the batch statistics and for the fused
normalise + affine (+ residual, itself optionally normalised) + activation, and `batch_norm_act`,
which runs a `torch.nn.BatchNorm2d` module's semantics through them.

The statistics op updates the module's running stats in place (momentum, or the cumulative average
when momentum is None, the unbiased variance) exactly as `torch.nn.BatchNorm2d`; the fused op's
backward differentiates through the batch statistics when they were used, so the mean and inverse
std themselves carry no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from triton_workbench.kernels import batch_norm as kernels
from triton_workbench.kernels.activation import activation_code, parameter
from triton_workbench.kernels.batch_norm import Norm
from triton_workbench.kernels.conv_geometry import memory_format_of
from triton_workbench.kernels.global_average_pool import GlobalAveragePool
from triton_workbench.kernels.max_pool import MaxPool
from triton_workbench.kernels.ops import refuse_double_backward

_EMPTY = (0,)


@torch.library.custom_op("workbench::batch_norm_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _stats_op(y: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
              num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float], eps: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / sqrt(var + eps)) of y's batch per channel (fp32), updating the running stats and counting the
    batch in num_batches_tracked when given."""
    return kernels.batch_moments(y, kernels.Running(running_mean, running_var, num_batches_tracked, momentum, eps))


@_stats_op.register_fake
def _(y, running_mean, running_var, num_batches_tracked, momentum, eps):
    return y.new_empty(y.shape[1], dtype=torch.float32), y.new_empty(y.shape[1], dtype=torch.float32)


def _norms(mean, invstd, weight, bias, batch_stats, r_mean, r_invstd, r_weight, r_bias, r_batch_stats
           ) -> tuple[Norm, Norm | None]:
    residual_norm = Norm(r_mean, r_invstd, r_weight, r_bias, r_batch_stats) if r_mean is not None else None
    return Norm(mean, invstd, weight, bias, batch_stats), residual_norm


@torch.library.custom_op("workbench::batch_norm_act", mutates_args=())
def _normalize_op(y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], batch_stats: bool, residual: Optional[torch.Tensor],
                  r_mean: Optional[torch.Tensor], r_invstd: Optional[torch.Tensor], r_weight: Optional[torch.Tensor],
                  r_bias: Optional[torch.Tensor], r_batch_stats: bool, activation: Optional[str],
                  negative_slope: float, hand_sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(act((y - mean) * invstd * weight + bias [+ residual, or the same of the residual's own statistics]), a
    token): with `hand_sums` the token is [3, C] fp32 zeros whose gradient, where it has one, is the backward
    sums, formed by the output's reader (`kernels.batch_norm.ChainSums`); else it is empty."""
    norm, residual_norm = _norms(mean, invstd, weight, bias, batch_stats, r_mean, r_invstd, r_weight, r_bias,
                                 r_batch_stats)
    out, token = kernels.normalize(y, norm, residual, residual_norm, activation_code(activation), negative_slope,
                                   hand_sums)
    return out, token if token is not None else _token(y, False)


@_normalize_op.register_fake
def _(y, mean, invstd, weight, bias, batch_stats, residual, r_mean, r_invstd, r_weight, r_bias, r_batch_stats,
      activation, negative_slope, hand_sums):
    return torch.empty_like(y), _token(y, hand_sums)


def _token(y: torch.Tensor, hand_sums: bool) -> torch.Tensor:
    return y.new_empty((3, y.shape[1]) if hand_sums else _EMPTY, dtype=torch.float32)


@torch.library.custom_op("workbench::batch_norm_act_max_pool", mutates_args=())
def _normalize_max_pool_op(y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], batch_stats: bool, activation: Optional[str],
                           negative_slope: float, pool: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(max-pool(act((y - mean) * invstd * weight + bias)), the window tap of each maximum): `pool` is a
    `MaxPool`'s arguments."""
    return kernels.normalize_max_pool(y, Norm(mean, invstd, weight, bias, batch_stats), activation_code(activation),
                                      negative_slope, MaxPool.of(pool))


@_normalize_max_pool_op.register_fake
def _(y, mean, invstd, weight, bias, batch_stats, activation, negative_slope, pool):
    out = y.new_empty(MaxPool.of(pool).output_shape(y.shape)).contiguous(memory_format=memory_format_of(y))
    return out, torch.empty_like(out, dtype=torch.int8)


@torch.library.custom_op("workbench::batch_norm_act_average", mutates_args=())
def _normalize_average_op(y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], batch_stats: bool, residual: Optional[torch.Tensor],
                          r_mean: Optional[torch.Tensor], r_invstd: Optional[torch.Tensor],
                          r_weight: Optional[torch.Tensor], r_bias: Optional[torch.Tensor], r_batch_stats: bool,
                          activation: Optional[str], negative_slope: float) -> torch.Tensor:
    """AdaptiveAvgPool2d(1) of `_normalize_op`'s output, [N, C, 1, 1], that output never stored."""
    norm, residual_norm = _norms(mean, invstd, weight, bias, batch_stats, r_mean, r_invstd, r_weight, r_bias,
                                 r_batch_stats)
    return kernels.normalize_average(y, norm, residual, residual_norm, activation_code(activation), negative_slope)


@_normalize_average_op.register_fake
def _(y, mean, invstd, weight, bias, batch_stats, residual, r_mean, r_invstd, r_weight, r_bias, r_batch_stats,
      activation, negative_slope):
    return torch.empty(GlobalAveragePool.output_shape(y.shape), device=y.device, dtype=y.dtype,
                       memory_format=memory_format_of(y))


@torch.library.custom_op("workbench::batch_norm_act_backward", mutates_args=())
def _normalize_backward_op(grad: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], batch_stats: bool,
                           residual: Optional[torch.Tensor], r_mean: Optional[torch.Tensor],
                           r_invstd: Optional[torch.Tensor], r_weight: Optional[torch.Tensor],
                           r_bias: Optional[torch.Tensor], r_batch_stats: bool, activation: Optional[str],
                           negative_slope: float, need_y: bool, need_residual: bool, need_params: bool,
                           taps: Optional[torch.Tensor] = None, pool: Optional[list[int]] = None,
                           sums: Optional[torch.Tensor] = None, average: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor]:
    """(dy, d residual, d weight, d bias, d residual weight, d residual bias), each parameter gradient in its
    parameter's dtype (written so by the kernel); empty where not needed. With `pool` and `taps`, grad is that of
    `_normalize_max_pool_op`'s output, with `average` `_normalize_average_op`'s; `sums`: the backward sums,
    formed by grad's producer."""
    norm, residual_norm = _norms(mean, invstd, weight, bias, batch_stats, r_mean, r_invstd, r_weight, r_bias,
                                 r_batch_stats)
    window = (MaxPool.of(pool), taps) if pool is not None else GlobalAveragePool() if average else None
    grads = kernels.normalize_backward(grad, y, norm, residual, residual_norm, activation_code(activation),
                                       negative_slope, need_y, need_residual, need_params, window, sums)
    return tuple(g if g is not None else y.new_empty(_EMPTY) for g in grads)


@_normalize_backward_op.register_fake
def _(grad, y, mean, invstd, weight, bias, batch_stats, residual, r_mean, r_invstd, r_weight, r_bias, r_batch_stats,
      activation, negative_slope, need_y, need_residual, need_params, taps=None, pool=None, sums=None,
      average=False):
    params = [kernels.parameter_grad(p, y) if need_params else y.new_empty(_EMPTY)
              for p in (weight, bias, r_weight, r_bias)]
    return (torch.empty_like(y) if need_y else y.new_empty(_EMPTY),
            torch.empty_like(y) if need_residual and residual is not None else y.new_empty(_EMPTY), *params)


def _setup_context(ctx, inputs, output) -> None:
    (y, mean, invstd, weight, bias, batch_stats, residual, r_mean, r_invstd, r_weight, r_bias, r_batch_stats,
     activation, negative_slope, _) = inputs
    ctx.flags = (batch_stats, r_batch_stats, activation, negative_slope)
    ctx.set_materialize_grads(False)  # the token's gradient: None unless its reader formed the sums
    ctx.save_for_backward(y, mean, invstd, weight, bias, residual, r_mean, r_invstd, r_weight, r_bias)


def _backward(ctx, grad, sums):
    if grad is None:  # only the token was read: nothing reached the output
        return (None,) * 15
    return _chain_grads(ctx, grad, sums=sums if sums is not None and sums.numel() else None) + (None,)  # token: empty


def _average_backward(ctx, grad):
    return (None,) * 14 if grad is None else _chain_grads(ctx, grad, average=True)


def _chain_grads(ctx, grad: torch.Tensor, **how: object) -> tuple[torch.Tensor | None, ...]:
    """The gradients of `_normalize_op`'s (or a pooled variant's) first 14 inputs, `how` passed to the backward op
    (sums formed by grad's producer, or a global average's grad)."""
    y, mean, invstd, weight, bias, residual, r_mean, r_invstd, r_weight, r_bias = ctx.saved_tensors
    batch_stats, r_batch_stats, activation, negative_slope = ctx.flags
    needs = ctx.needs_input_grad
    need_params = any(needs[index] for index in (3, 4, 9, 10))
    layout = grad if how.get("average") else y  # (a pooled gradient keeps its own: the kernels read its strides)
    dy, dr, dweight, dbias, dr_weight, dr_bias = _normalize_backward_op(
        grad.contiguous(memory_format=memory_format_of(layout)), y, mean, invstd, weight, bias, batch_stats, residual,
        r_mean, r_invstd, r_weight, r_bias, r_batch_stats, activation, negative_slope, needs[0], needs[6],
        need_params, **how)

    def wanted(index: int, gradient: torch.Tensor, of: torch.Tensor | None) -> torch.Tensor | None:
        return gradient if needs[index] and of is not None else None

    return (wanted(0, dy, y), None, None, wanted(3, dweight, weight), wanted(4, dbias, bias), None,
            wanted(6, dr, residual), None, None, wanted(9, dr_weight, r_weight), wanted(10, dr_bias, r_bias),
            None, None, None)


def _setup_average_context(ctx, inputs, output) -> None:
    _setup_context(ctx, (*inputs, False), output)


_normalize_op.register_autograd(_backward, setup_context=_setup_context)
_normalize_average_op.register_autograd(_average_backward, setup_context=_setup_average_context)
refuse_double_backward(_normalize_backward_op)


def _setup_max_pool_context(ctx, inputs, output) -> None:
    y, mean, invstd, weight, bias, batch_stats, activation, negative_slope, pool = inputs
    ctx.flags = (batch_stats, activation, negative_slope, pool)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the taps' gradient: None, not a tensor of zeros
    ctx.save_for_backward(y, mean, invstd, weight, bias, output[1])


def _max_pool_backward(ctx, grad, _):
    y, mean, invstd, weight, bias, taps = ctx.saved_tensors
    batch_stats, activation, negative_slope, pool = ctx.flags
    needs = ctx.needs_input_grad
    dy, _, dweight, dbias, _, _ = _normalize_backward_op(
        grad.contiguous(memory_format=memory_format_of(taps)), y, mean, invstd, weight, bias, batch_stats, None, None,
        None, None, None, False, activation, negative_slope, needs[0], False, needs[3] or needs[4], taps, pool)
    return (dy if needs[0] else None, None, None, dweight if needs[3] and weight is not None else None,
            dbias if needs[4] and bias is not None else None, None, None, None, None)


_normalize_max_pool_op.register_autograd(_max_pool_backward, setup_context=_setup_max_pool_context)


# ---------------------------------------------------------------------------------------------
# a BatchNorm2d module's semantics


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether `bn` normalises with the batch's statistics now (training, or no running stats), as PyTorch decides."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def running_of(bn: nn.BatchNorm2d) -> kernels.Running:
    """What a batch's statistics update in `bn` now: its running stats and num_batches_tracked in training
    (when it tracks them), nothing otherwise, as PyTorch decides; with its momentum and eps."""
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if update else (None, None, None)
    return kernels.Running(*buffers, bn.momentum, bn.eps)


def check_input(shape: torch.Size | tuple[int, ...], bn: nn.BatchNorm2d) -> None:
    """`bn`'s checks of its input's shape, as torch.nn.BatchNorm2d and F.batch_norm make them."""
    if len(shape) != 4 or shape[1] != bn.num_features:
        raise ValueError(f"BatchNorm2d({bn.num_features}) expects a 4-D input with {bn.num_features} channels, "
                         f"got shape {tuple(shape)}")
    if uses_batch_stats(bn) and shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


def statistics(y: torch.Tensor, bn: nn.BatchNorm2d, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> Norm:
    """`bn`'s normalisation of y: the batch's statistics (updating the running stats and num_batches_tracked
    in training, as PyTorch does) -- `stats` (mean, 1 / sqrt(var + eps)) when y's producer computed them
    (`ops.conv2d_with_statistics`, which made those updates) -- or the running ones."""
    check_input(y.shape, bn)
    if not uses_batch_stats(bn):
        mean, invstd = bn.running_mean.float(), torch.rsqrt(bn.running_var.float() + bn.eps)
        return Norm(mean, invstd, bn.weight, bn.bias, batch_stats=False)
    if stats is None:
        running = running_of(bn)
        stats = _stats_op(y.detach(), running.mean, running.var, running.batches, running.momentum, running.eps)
    return Norm(*stats, bn.weight, bn.bias, batch_stats=True)


def _rows_ready(y: torch.Tensor) -> torch.Tensor:
    """y dense in one of the two memory formats (the kernels' rows view, and a layout other tensors can copy)."""
    dense = y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)
    return y if dense else y.contiguous()


def batch_norm_act(y: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                   residual_bn: nn.BatchNorm2d | None = None, activation: str | None = None,
                   negative_slope: float | None = None, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                   in_place: bool = False, residual_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                   pool: MaxPool | GlobalAveragePool | None = None) -> torch.Tensor:
    """act(bn(y) [+ residual, or residual_bn(residual)]) in one Triton kernel after the statistics, with
    `torch.nn.BatchNorm2d`'s semantics for each BN (train/eval, running stats, affine, eps, momentum); y's
    batch statistics are `stats` when its producer computed them (`ops.conv2d_with_statistics`), and the
    residual's `residual_stats`. With `pool`, pooled in that kernel: a max-pool (no residual) or a global
    average.

    The output has y's memory format; a residual of another dtype is added in the promoted one, or, with
    `in_place` (the model wrote `y += residual`), cast to y's as PyTorch's in-place add does.
    """
    return batch_norm_act_chain(y, bn, residual, residual_bn, activation, negative_slope, stats, in_place,
                                residual_stats, pool)[0]


def batch_norm_act_chain(y: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                         residual_bn: nn.BatchNorm2d | None = None, activation: str | None = None,
                         negative_slope: float | None = None, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                         in_place: bool = False, residual_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                         pool: MaxPool | GlobalAveragePool | None = None, hand_sums: bool = False
                         ) -> tuple[torch.Tensor, kernels.ChainSums | None]:
    """(`batch_norm_act`'s output, the chain for its reader to form its backward sums with, `hand_sums` asking:
    `ops.conv2d_with_statistics(chain=...)` -- None where no backward will run, or with a pool)."""
    residual_norm = None
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but the normalised tensor {tuple(y.shape)}")
        dtype = y.dtype if in_place else torch.promote_types(y.dtype, residual.dtype)
        y = _rows_ready(y.to(dtype))
        residual = residual.to(dtype).contiguous(memory_format=memory_format_of(y))
        residual_norm = statistics(residual, residual_bn, residual_stats) if residual_bn is not None else None
    y = _rows_ready(y)
    norm = statistics(y, bn, stats)
    slope = parameter(activation, negative_slope)
    if isinstance(pool, MaxPool):
        if residual is not None:
            raise ValueError("a max-pool after the activation is fused without a residual only")
        return _normalize_max_pool_op(y, norm.mean, norm.invstd, norm.weight, norm.bias, norm.batch_stats, activation,
                                      slope, pool.arguments())[0], None
    r = residual_norm
    arguments = (y, norm.mean, norm.invstd, norm.weight, norm.bias, norm.batch_stats, residual, r.mean if r else None,
                 r.invstd if r else None, r.weight if r else None, r.bias if r else None, bool(r and r.batch_stats),
                 activation, slope)
    if pool is not None:
        return _normalize_average_op(*arguments), None
    out, token = _normalize_op(*arguments, hand_sums)
    if not (hand_sums and out.requires_grad):
        return out, None
    return out, kernels.ChainSums(token, y, norm, residual, residual_norm, activation, slope)
