"""BatchNorm's kernels: batch statistics, and the fused normalise + affine (+ residual) + activation
with its backward, over a [rows, channels] view of 4-D activations.

A tensor [N, C, H, W], contiguous or channels_last, is walked as rows
m = (n, h, w) and channels c, at offset (m // HW) * stride_n + (m % HW) * stride_hw + c * stride_c:
one kernel serves both memory formats, with contiguous channel vectors in channels_last.

Every reduction is deterministic: a program reduces a fixed strip of rows into partial results,
merged in strip order. Forward statistics are per strip (mean, M2) -- centred, so the variance does
not cancel in fp32 as sum-of-squares does -- merged by Chan et al.'s formula. The backward's per-strip
sums are merged by the last strip of each channel block to finish (`kernels.arrival`), in its launch,
so the elementwise pass reads one row of sums per channel; where a conv's dgrad forms the gradient of
the chain's output, its epilogue forms the sums instead (`ChainSums`, `tile_sums`) and the sums pass
does not run.

    forward:  out = act((y - mean) * invstd * weight + bias  [+ residual, itself optionally normalised])
    backward: dz = grad * act'(pre); dbias = sum dz, dweight = sum dz * x_hat;
              dy = invstd * weight * (dz - mean(dz) - x_hat * mean(dz * x_hat))  (batch statistics)
              dy = invstd * weight * dz                                         (running statistics)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton.language as tl

from triton_workbench.kernels import arrival, runtime
from triton_workbench.kernels.activation import activation_code, apply, derivative
from triton_workbench.kernels.conv_geometry import memory_format_of, needs_int64
from triton_workbench.kernels.arrival import last_to_arrive
from triton_workbench.kernels.conv_tiles import offsets
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.global_average_pool import GlobalAveragePool, averaged_gradient
from triton_workbench.kernels.max_pool import MaxPool, pooled_gradient, window_max
from triton_workbench.kernels.runtime import jit

MAX_STRIPS = 128  # partial results per channel: enough programs to fill a GPU, few enough to merge in one pass
BACKWARD_STRIPS = 512  # the backward's sums: merged by their last strip, a tile of strips per load, so more of them


@jit
def _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, first_row, pid_c, INT64: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets, mask and in-range channels of the [BLOCK_M, BLOCK_C] tile at (first_row, channel block pid_c)."""
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    row_offsets = offsets(rows // HW, INT64) * stride_n + offsets(rows % HW, INT64) * stride_hw
    return (row_offsets[:, None] + offsets(cols, INT64)[None, :] * stride_c, (rows < ROWS)[:, None] & c_ok[None, :],
            cols, c_ok)


@jit
def _channel(ptr, cols, c_ok, other: tl.constexpr):
    return tl.load(ptr + cols, mask=c_ok, other=other).to(tl.float32)


@jit
def _normalize(v, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, AFFINE: tl.constexpr):
    """(x_hat, x_hat * weight + bias) for an fp32 tile v, per column (channel)."""
    x_hat = (v - _channel(mean_ptr, cols, c_ok, 0.0)[None, :]) * _channel(invstd_ptr, cols, c_ok, 0.0)[None, :]
    if AFFINE:
        return x_hat, x_hat * _channel(weight_ptr, cols, c_ok, 1.0)[None, :] + _channel(bias_ptr, cols, c_ok, 0.0)[None, :]
    return x_hat, x_hat


@jit
def store_moments(part_ptr, strip, C, cols, c_ok, mean, m2, count):
    """Row `strip` of the moments table [strips, 2 C + 1]: per-channel mean and M2, then the strip's row count
    (fp32: exact up to 2**24 rows per strip)."""
    row = part_ptr + strip.to(tl.int64) * (2 * C + 1)
    tl.store(row + cols, mean, mask=c_ok)
    tl.store(row + C + cols, m2, mask=c_ok)
    tl.store(row + 2 * C, count)


@jit
def _merge(seen, mean, m2, count, other_mean, other_m2):
    """Chan et al.'s merge of two (row count, mean, M2) sets: returns the merged (count, mean, M2)."""
    total = seen + count
    weight = count / tl.maximum(total, 1.0)
    delta = other_mean - mean
    return total, mean + delta * weight, m2 + other_m2 + delta * delta * seen * weight


@jit
def tile_moments(v, mask, count):
    """(mean, M2) per column of the `count` valid rows of an fp32 tile (masked entries ignored)."""
    mean = tl.sum(tl.where(mask, v, 0.0), 0) / tl.maximum(count, 1.0)
    deviation = tl.where(mask, v - mean[None, :], 0.0)
    return mean, tl.sum(deviation * deviation, 0)


@jit
def store_tile_moments(part_ptr, v, first_row, ROWS, C, cols, c_ok, BLOCK_M: tl.constexpr):
    """A conv epilogue's moments of its fp32 output tile v (BLOCK_M rows from `first_row`, a multiple of 32):
    one table row per 32 output rows (MOMENT_ROWS), so that the table's shape is the problem's alone, whatever
    the config (`moments_rows`)."""
    GROUPS: tl.constexpr = BLOCK_M // MOMENT_ROWS
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = tl.reshape(rows < ROWS, (GROUPS, MOMENT_ROWS))
    mask = row_ok[:, :, None] & c_ok[None, None, :]
    v3 = tl.reshape(v, (GROUPS, MOMENT_ROWS, v.shape[1]))
    count = tl.sum(row_ok.to(tl.float32), 1)
    mean = tl.sum(tl.where(mask, v3, 0.0), 1) / tl.maximum(count, 1.0)[:, None]
    deviation = tl.where(mask, v3 - mean[:, None, :], 0.0)
    group = first_row // MOMENT_ROWS + tl.arange(0, GROUPS)
    group_ok = group * MOMENT_ROWS < ROWS
    row = part_ptr + group.to(tl.int64) * (2 * C + 1)
    store_ok = group_ok[:, None] & c_ok[None, :]
    tl.store(row[:, None] + cols[None, :], mean, mask=store_ok)
    tl.store(row[:, None] + C + cols[None, :], tl.sum(deviation * deviation, 1), mask=store_ok)
    tl.store(row + 2 * C, count, mask=group_ok)


@jit
def partial_moments_kernel(y_ptr, part_ptr, ROWS, C, HW, stride_n, stride_hw, stride_c, STRIP,
                           INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel, the mean and M2 (sum of squared deviations) of rows [strip * STRIP, + STRIP), merged block
    by block (Chan et al.), stored with `store_moments`."""
    strip = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # the loop's tiles have these columns too; stored after it
    c_ok = cols < C
    first = strip * STRIP
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    last = tl.minimum(first + STRIP, ROWS)
    for start in range(first, last, BLOCK_M):
        offs, mask, _, _ = _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, start, pid_c, INT64, BLOCK_M, BLOCK_C)
        seen = (start - first) * 1.0  # rows merged so far: every block before the last is full
        count = tl.minimum(BLOCK_M, last - start) * 1.0  # > 0: the loop stops at the strip's last row
        block_mean, block_m2 = tile_moments(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask, count)
        _, mean, m2 = _merge(seen, mean, m2, count, block_mean, block_m2)
    store_moments(part_ptr, strip, C, cols, c_ok, mean, m2, tl.minimum(STRIP, ROWS - first) * 1.0)


@jit
def merge_moments(part_ptr, first, rows, C, cols, c_ok, BLOCK_R: tl.constexpr):
    """(count, mean, M2) of channels `cols` over table rows [first, first + rows) of a moments table
    (`store_moments`), each a vector over `cols` (count: the output rows merged, the same in every entry),
    merged BLOCK_R table rows at a time (merged at once, then into the running result, in order:
    deterministic)."""
    mean = tl.zeros(cols.shape, dtype=tl.float32)
    m2 = tl.zeros(cols.shape, dtype=tl.float32)
    seen = tl.zeros(cols.shape, dtype=tl.float32)
    for start in range(first, first + rows, BLOCK_R):
        table_rows = start + tl.arange(0, BLOCK_R)
        r_ok = table_rows < first + rows
        row = part_ptr + table_rows.to(tl.int64) * (2 * C + 1)
        mask = r_ok[:, None] & c_ok[None, :]
        count = tl.load(row + 2 * C, mask=r_ok, other=0.0, cache_modifier=".cg")
        means = tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        m2s = tl.load(row[:, None] + C + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        n = tl.sum(count, 0)
        chunk_mean = tl.sum(count[:, None] * means, 0) / tl.maximum(n, 1.0)
        deviation = means - chunk_mean[None, :]
        chunk_m2 = tl.sum(m2s + count[:, None] * deviation * deviation, 0)
        seen, mean, m2 = _merge(seen, mean, m2, n, chunk_mean, chunk_m2)
    return seen, mean, m2


@jit
def finalize_channels(part_ptr, first, rows, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, cols, c_ok, C,
                      momentum, eps, batches, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Channels `cols` of table rows [first, first + rows) merged (`merge_moments`) into mean and
    1 / sqrt(var + eps) (biased var, as BN normalises). With UPDATE, running = (1 - f) * running + f * batch
    with the unbiased var, where f is momentum or, CUMULATIVE, 1 / batches (num_batches_tracked, this batch
    counted), as torch.nn.BatchNorm2d does."""
    seen, mean, m2 = merge_moments(part_ptr, first, rows, C, cols, c_ok, BLOCK_R)
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(m2 / seen + eps), mask=c_ok)
    if UPDATE:
        if CUMULATIVE:
            factor = 1.0 / batches.to(tl.float32)
        else:
            factor = momentum
        running_mean = _channel(running_mean_ptr, cols, c_ok, 0.0)
        running_var = _channel(running_var_ptr, cols, c_ok, 0.0)
        tl.store(running_mean_ptr + cols, ((1.0 - factor) * running_mean + factor * mean).to(
            running_mean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(running_var_ptr + cols, ((1.0 - factor) * running_var + factor * (m2 / (seen - 1.0))).to(
            running_var_ptr.dtype.element_ty), mask=c_ok)


@jit
def finalize_kernel(part_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, batches_ptr,
                    C, STRIPS, momentum, eps, UPDATE: tl.constexpr, COUNT: tl.constexpr,
                    CUMULATIVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: `finalize_channels` of every channel, BLOCK_C at a time; COUNT adds this batch to
    num_batches_tracked (before the cumulative factor, as torch.nn.BatchNorm2d does), so no launch of its own
    counts it: one program, so nothing races on it."""
    batches = 0
    if COUNT:
        batches = tl.load(batches_ptr) + 1
    for first in range(0, C, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C)
        finalize_channels(part_ptr, 0, STRIPS, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, cols,
                          cols < C, C, momentum, eps, batches, UPDATE, CUMULATIVE, BLOCK_R)
    if COUNT:
        tl.store(batches_ptr, batches)


@jit
def _pre_activation(y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                    r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                    AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr):
    """(x_hat, the residual's x_hat (or 0), the pre-activation) of a tile."""
    x_hat, pre = _normalize(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32), cols, c_ok,
                            mean_ptr, invstd_ptr, weight_ptr, bias_ptr, AFFINE)
    r_hat = tl.zeros_like(x_hat)
    if RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if R_NORM:
            r_hat, r = _normalize(r, cols, c_ok, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr, R_AFFINE)
        pre += r
    return x_hat, r_hat, pre


@jit
def normalize_kernel(y_ptr, r_ptr, out_ptr, token_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                     r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                     ROWS, C, HW, stride_n, stride_hw, stride_c, negative_slope,
                     AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
                     ACTIVATION: tl.constexpr, TOKEN: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """out = act(normalise(y) [+ residual or normalise(residual)]) for one tile; out and residual share y's strides.
    With TOKEN, the first row block zeroes token[3, C] (`ChainSums`: an output's defined value, no launch of its
    own)."""
    offs, mask, cols, c_ok = _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, tl.program_id(0) * BLOCK_M,
                                   tl.program_id(1), INT64, BLOCK_M, BLOCK_C)
    _, _, pre = _pre_activation(y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                                r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr, AFFINE, RESIDUAL, R_NORM, R_AFFINE)
    tl.store(out_ptr + offs, apply(pre, ACTIVATION, negative_slope).to(out_ptr.dtype.element_ty), mask=mask)
    if TOKEN:
        if tl.program_id(0) == 0:
            for k in tl.static_range(3):
                tl.store(token_ptr + k * C + cols, tl.zeros(cols.shape, dtype=tl.float32), mask=c_ok)


@jit
def normalize_max_pool_kernel(y_ptr, out_ptr, tap_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                              ROWS, C, H, W, PH, PW, sy_n, sy_h, sy_w, sy_c, so_n, so_h, so_w, so_c, negative_slope,
                              AFFINE: tl.constexpr, ACTIVATION: tl.constexpr,
                              KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                              PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                              INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = max-pool(act(normalise(y))) for a tile of pooled rows (n, ph, pw) and channels, and tap = the window
    tap each maximum came from (`max_pool`); the pool's input is never stored. Values are compared as stored
    (rounded to out's dtype), as a pool reading a stored activation compares them."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    image = offsets(rows // (PH * PW), INT64)
    p_h = rows % (PH * PW) // PW
    p_w = rows % PW
    row_ok = rows < ROWS
    column = offsets(cols, INT64)[None, :]
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    tap = tl.full((BLOCK_M, BLOCK_C), -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = p_h * STRIDE_H - PAD_H + kh * DIL_H
        for kw in tl.static_range(KW):
            iw = p_w * STRIDE_W - PAD_W + kw * DIL_W
            ok = (row_ok & (ih.to(tl.uint32, bitcast=True) < H) & (iw.to(tl.uint32, bitcast=True) < W))[:, None] \
                & c_ok[None, :]
            at = (image * sy_n + offsets(ih, INT64) * sy_h + offsets(iw, INT64) * sy_w)[:, None] + column * sy_c
            _, pre = _normalize(tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32), cols, c_ok,
                                mean_ptr, invstd_ptr, weight_ptr, bias_ptr, AFFINE)
            value = apply(pre, ACTIVATION, negative_slope).to(out_ptr.dtype.element_ty).to(tl.float32)
            best, tap = window_max(best, tap, value, ok, kh * KW + kw)
    at = (image * so_n + offsets(p_h, INT64) * so_h + offsets(p_w, INT64) * so_w)[:, None] + column * so_c
    mask = row_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + at, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(tap_ptr + at, tap.to(tl.int8), mask=mask)


@jit
def normalize_average_kernel(y_ptr, r_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                             r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                             C, HW, stride_n, stride_hw, stride_c, so_n, so_c, negative_slope,
                             AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
                             ACTIVATION: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """out[n, c] = the mean over image n's positions of act(normalise(y) [+ residual or normalise(residual)]), for
    one (image, channel block): the activation is never stored; averaged as stored (rounded to out's dtype)."""
    image = tl.program_id(0)
    first = image * HW
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(first, first + HW, BLOCK_M):
        offs, mask, cols, c_ok = _tile(first + HW, C, HW, stride_n, stride_hw, stride_c, start, tl.program_id(1),
                                       INT64, BLOCK_M, BLOCK_C)
        _, _, pre = _pre_activation(y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr,
                                    bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr, AFFINE, RESIDUAL,
                                    R_NORM, R_AFFINE)
        value = apply(pre, ACTIVATION, negative_slope).to(out_ptr.dtype.element_ty).to(tl.float32)
        total += tl.sum(tl.where(mask, value, 0.0), 0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + offsets(image, INT64) * so_n + offsets(cols, INT64) * so_c,
             (total / HW).to(out_ptr.dtype.element_ty), mask=cols < C)


@jit
def _activation_grad(grad_ptr, tap_ptr, offs, mask, rows, cols, HW, W, PH, PW, sp_n, sp_h, sp_w, sp_c,
                     POOL: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr,
                     STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr,
                     DIL_W: tl.constexpr, INT64: tl.constexpr):
    """d loss / d activation output (fp32) of a tile: grad's, or that of the pool that read the activation (POOL:
    1 a max-pool, gathered through its taps, `max_pool.pooled_gradient`; 2 a global average,
    `global_average_pool.averaged_gradient`; grad laid out as the pool's output, strides sp_*)."""
    if POOL == 1:
        return pooled_gradient(grad_ptr, tap_ptr, rows, cols, mask, HW, W, PH, PW, sp_n, sp_h, sp_w, sp_c,
                               KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, INT64)
    if POOL == 2:
        return averaged_gradient(grad_ptr, rows, cols, mask, HW, sp_n, sp_c, INT64)
    return tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@jit
def backward_sums_kernel(grad_ptr, y_ptr, r_ptr, part_ptr, sums_ptr, counter_ptr, mean_ptr, invstd_ptr, weight_ptr,
                         bias_ptr,
                         r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                         ROWS, C, HW, stride_n, stride_hw, stride_c, negative_slope, STRIP, STRIPS,
                         tap_ptr, W, PH, PW, sp_n, sp_h, sp_w, sp_c,
                         AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
                         ACTIVATION: tl.constexpr, POOL: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                         STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                         DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                         INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel over a strip of rows: sum dz, sum dz * x_hat and (R_NORM) sum dz * r_hat -> part[0|1|2, strip, c];
    the last strip of a channel block to finish sums every strip's into sums[0|1|2, c] (`_merge_strips`).
    With POOL, grad is the gradient of the max-pool that followed the activation (`_activation_grad`)."""
    strip = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # the loop's tiles have these columns too; stored after it
    c_ok = cols < C
    sum_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dz_x = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dz_r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(strip * STRIP, strip * STRIP + STRIP, BLOCK_M):
        offs, mask, _, _ = _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, start, pid_c, INT64, BLOCK_M, BLOCK_C)
        grad = _activation_grad(grad_ptr, tap_ptr, offs, mask, start + tl.arange(0, BLOCK_M), cols, HW, W, PH, PW,
                                sp_n, sp_h, sp_w, sp_c, POOL, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                                INT64)
        dz, dz_x, dz_r = tile_sums(grad, y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr,
                                   bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr, negative_slope,
                                   AFFINE, RESIDUAL, R_NORM, R_AFFINE, ACTIVATION)
        sum_dz += dz
        sum_dz_x += dz_x
        sum_dz_r += dz_r
    store_sums(part_ptr, strip, STRIPS, C, cols, c_ok, sum_dz, sum_dz_x, sum_dz_r, R_NORM)
    if last_to_arrive(counter_ptr + pid_c, STRIPS):
        merge_sums(part_ptr, STRIPS, 0, STRIPS, sums_ptr, 0, 1, C, cols, c_ok, 3 if R_NORM else 2)


@jit
def tile_sums(grad, y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
              r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr, negative_slope,
              AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
              ACTIVATION: tl.constexpr):
    """Per column of a tile: (sum dz, sum dz * x_hat, sum dz * r_hat (0 without R_NORM)), dz = grad * act'(pre),
    grad (fp32) the gradient of the chain's output at the tile, whose y (and residual) are at `offs`."""
    x_hat, r_hat, pre = _pre_activation(y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr,
                                        bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                                        AFFINE, RESIDUAL, R_NORM, R_AFFINE)
    dz = tl.where(mask, grad * derivative(pre, ACTIVATION, negative_slope), 0.0)
    sum_dz_r = tl.zeros((dz.shape[1],), dtype=tl.float32)
    if R_NORM:
        sum_dz_r = tl.sum(dz * r_hat, 0)
    return tl.sum(dz, 0), tl.sum(dz * x_hat, 0), sum_dz_r


@jit
def store_sums(part_ptr, row, ROWS, C, cols, c_ok, sum_dz, sum_dz_x, sum_dz_r, R_NORM: tl.constexpr):
    """Row `row` of a sums table part[3, ROWS, C] (the third sum with R_NORM only; int64 offsets, as everywhere in
    the table: 3 x ROWS x C may pass 2**31 where the tensor summed does)."""
    row = tl.cast(row, tl.int64)
    tl.store(part_ptr + row * C + cols, sum_dz, mask=c_ok)
    tl.store(part_ptr + (ROWS + row) * C + cols, sum_dz_x, mask=c_ok)
    if R_NORM:
        tl.store(part_ptr + (2 * ROWS + row) * C + cols, sum_dz_r, mask=c_ok)


@jit
def sum_rows(part_ptr, first, count, C, cols, c_ok):
    """Per column, rows [first, first + count) of the fp32 table part[:, C] summed, SUM_ROWS rows a load, in row
    order (deterministic: the same bits whichever program runs it)."""
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for start in range(first, first + count, SUM_ROWS):
        rows = start + tl.arange(0, SUM_ROWS)
        tile = tl.load(part_ptr + tl.cast(rows, tl.int64)[:, None] * C + cols[None, :],
                       mask=(rows < first + count)[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
        total += tl.sum(tile, 0)
    return total


@jit
def merge_sums(part_ptr, ROWS, first, count, out_ptr, out_row, OUT_ROWS, C, cols, c_ok, SUMS: tl.constexpr):
    """out[k, out_row, c] = part[k, first:first + count, c] summed (`sum_rows`) for the first SUMS of the k, both
    sums tables ([3, ROWS, C] and [3, OUT_ROWS, C]; they may be one)."""
    for k in tl.static_range(SUMS):
        total = sum_rows(part_ptr + tl.cast(k * ROWS, tl.int64) * C, first, count, C, cols, c_ok)
        tl.store(out_ptr + (k * OUT_ROWS + tl.cast(out_row, tl.int64)) * C + cols, total, mask=c_ok)


@jit
def _input_grad(dz, x_hat, sum_dz, sum_dz_x, rows, cols, c_ok, invstd_ptr, weight_ptr,
                AFFINE: tl.constexpr, BATCH_STATS: tl.constexpr):
    """d loss / d y of y -> x_hat * weight + bias, through the batch's mean and variance when BATCH_STATS."""
    scale = _channel(invstd_ptr, cols, c_ok, 0.0)
    if AFFINE:
        scale = scale * _channel(weight_ptr, cols, c_ok, 1.0)
    if BATCH_STATS:
        dz = dz - (sum_dz / rows)[None, :] - x_hat * (sum_dz_x / rows)[None, :]
    return dz * scale[None, :]


@jit
def backward_apply_kernel(grad_ptr, y_ptr, r_ptr, sums_ptr, dy_ptr, dr_ptr, dweight_ptr, dbias_ptr,
                          dr_weight_ptr, dr_bias_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                          r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                          ROWS, C, HW, stride_n, stride_hw, stride_c, negative_slope,
                          tap_ptr, W, PH, PW, sp_n, sp_h, sp_w, sp_c,
                          AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
                          ACTIVATION: tl.constexpr, POOL: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                          DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                          BATCH_STATS: tl.constexpr, R_BATCH_STATS: tl.constexpr,
                          NEED_DY: tl.constexpr, NEED_DR: tl.constexpr, NEED_PARAMS: tl.constexpr,
                          INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy (and d residual) of one tile from the channels' sums (`backward_sums_kernel`); the first row block also
    writes the affine parameters' gradients (the sums themselves) of each BN that has them."""
    pid_m = tl.program_id(0)
    offs, mask, cols, c_ok = _tile(ROWS, C, HW, stride_n, stride_hw, stride_c, pid_m * BLOCK_M, tl.program_id(1),
                                   INT64, BLOCK_M, BLOCK_C)
    sum_dz = _channel(sums_ptr, cols, c_ok, 0.0)
    sum_dz_x = _channel(sums_ptr + C, cols, c_ok, 0.0)
    sum_dz_r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if R_NORM:
        sum_dz_r = _channel(sums_ptr + 2 * C, cols, c_ok, 0.0)
    x_hat, r_hat, pre = _pre_activation(y_ptr, r_ptr, offs, mask, cols, c_ok, mean_ptr, invstd_ptr, weight_ptr,
                                        bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                                        AFFINE, RESIDUAL, R_NORM, R_AFFINE)
    grad = _activation_grad(grad_ptr, tap_ptr, offs, mask, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), cols, HW, W, PH,
                            PW, sp_n, sp_h, sp_w, sp_c, POOL, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                            INT64)
    dz = grad * derivative(pre, ACTIVATION, negative_slope)
    rows = ROWS.to(tl.float32)
    if NEED_DY:
        dy = _input_grad(dz, x_hat, sum_dz, sum_dz_x, rows, cols, c_ok, invstd_ptr, weight_ptr, AFFINE, BATCH_STATS)
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if NEED_DR:
        if R_NORM:
            dr = _input_grad(dz, r_hat, sum_dz, sum_dz_r, rows, cols, c_ok, r_invstd_ptr, r_weight_ptr, R_AFFINE,
                             R_BATCH_STATS)
        else:
            dr = dz
        tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=mask)
    if NEED_PARAMS:
        if pid_m == 0:
            if AFFINE:
                tl.store(dweight_ptr + cols, sum_dz_x.to(dweight_ptr.dtype.element_ty), mask=c_ok)
                tl.store(dbias_ptr + cols, sum_dz.to(dbias_ptr.dtype.element_ty), mask=c_ok)
            if R_AFFINE:
                tl.store(dr_weight_ptr + cols, sum_dz_r.to(dr_weight_ptr.dtype.element_ty), mask=c_ok)
                tl.store(dr_bias_ptr + cols, sum_dz.to(dr_bias_ptr.dtype.element_ty), mask=c_ok)


# ---------------------------------------------------------------------------------------------
# launchers


@dataclass(frozen=True)
class RowsView:
    """A 4-D tensor seen as [rows, channels]: its sizes, strides and the tile shape its kernels use."""

    rows: int
    channels: int
    hw: int
    strides: tuple[int, int, int]  # (image, spatial position, channel)
    int64: bool
    block_m: int
    block_c: int

    @property
    def row_blocks(self) -> int:
        return cdiv(self.rows, self.block_m)

    @property
    def channel_blocks(self) -> int:
        return cdiv(self.channels, self.block_c)

    def strips(self, limit: int | None = None) -> tuple[int, int]:
        """(rows per strip, strips): at most `limit` (default MAX_STRIPS) strips of whole row blocks."""
        per_strip = cdiv(self.row_blocks, limit or MAX_STRIPS) * self.block_m
        return per_strip, cdiv(self.rows, per_strip)


def rows_view(y: torch.Tensor) -> RowsView:
    """The [rows, channels] view of y (4-D, contiguous or channels_last) and its tile shape: channels fastest in the tile
    when they are in memory (channels_last), else rows; about 4096 elements per tile."""
    n, c, h, w = y.shape
    sn, sc, _, sw = y.stride()
    block_c = min(64, next_power_of_2(c)) if sc == 1 else min(16, next_power_of_2(c))
    block_m = max(16, min(4096 // block_c, next_power_of_2(n * h * w)))
    return RowsView(n * h * w, c, h * w, (sn, sw, sc), needs_int64(y), block_m, block_c)


def pointer_or(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else fallback  # a pointer the kernel never reads (its flag is off)


# constexpr: the conv epilogue reads them too (host code takes .value)
MOMENT_ROWS = tl.constexpr(32)  # output rows per moments-table row a conv epilogue writes: the spaces' least BLOCK_M
MOMENT_GROUP = tl.constexpr(64)  # table rows a conv epilogue merges into one group row first (2048 output rows)
SUM_ROWS = tl.constexpr(32)  # sums-table rows `sum_rows` loads at once


def moments_rows(rows: int) -> int:
    """Table rows of a conv epilogue's moments of `rows` output rows (one per MOMENT_ROWS)."""
    return cdiv(rows, MOMENT_ROWS.value)


def moment_groups(rows: int) -> int:
    """Group rows of a conv epilogue's moments of `rows` output rows (one per MOMENT_GROUP table rows)."""
    return cdiv(moments_rows(rows), MOMENT_GROUP.value)


def moments_table(strips: int, channels: int, device: torch.device) -> torch.Tensor:
    """An empty moments table: per strip, each channel's mean and M2, then the strip's row count."""
    return torch.empty((strips, 2 * channels + 1), device=device, dtype=torch.float32)


def moments_of(y: torch.Tensor, strip: int | None = None) -> torch.Tensor:
    """y's moments table: strips of `strip` rows (a multiple of the tile's rows), by default at most
    MAX_STRIPS strips."""
    view = rows_view(y)
    if view.rows == 0:  # an empty batch: no strips
        return moments_table(0, view.channels, y.device)
    strip = strip or view.strips()[0]
    view = replace(view, block_m=min(view.block_m, strip))
    strips = cdiv(view.rows, strip)
    part = moments_table(strips, view.channels, y.device)
    runtime.announce()
    partial_moments_kernel[(strips, view.channel_blocks)](
        y, part, view.rows, view.channels, view.hw, *view.strides, strip,
        INT64=view.int64, BLOCK_M=view.block_m, BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    return part


@dataclass(frozen=True)
class Running:
    """What a batch's statistics update, as torch.nn.BatchNorm2d: its running mean and var and
    num_batches_tracked (None where it keeps none, or in eval), momentum (None: the cumulative average), eps."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    batches: torch.Tensor | None
    momentum: float | None
    eps: float

    def pointers(self, fallback: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pointer_or(self.mean, fallback), pointer_or(self.var, fallback), pointer_or(self.batches, fallback)

    def constants(self) -> tuple[float, float]:
        return float(self.momentum or 0.0), float(self.eps)

    def flags(self) -> dict[str, bool]:
        update = self.mean is not None
        return {"UPDATE": update, "COUNT": self.batches is not None, "CUMULATIVE": update and self.momentum is None}


def batch_moments(y: torch.Tensor, running: Running) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / sqrt(var + eps)) of y's batch per channel, fp32: the strips' moments, then `finalize`."""
    return finalize(moments_of(y), running)


def finalize(part: torch.Tensor, running: Running) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / sqrt(var + eps)) per channel from a moments table (`moments_table`, filled by
    `partial_moments_kernel`); updates the running stats and counts the batch in num_batches_tracked when
    given (momentum None: their cumulative average), as torch.nn.BatchNorm2d (an empty batch is counted,
    nothing else)."""
    channels = (part.shape[1] - 1) // 2
    mean = torch.empty(channels, device=part.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    if part.shape[0] == 0:  # an empty batch: PyTorch counts it and leaves the running stats as they were
        if running.batches is not None:
            running.batches.add_(1)
        return mean.fill_(float("nan")), invstd.fill_(float("nan"))
    block_c = min(64, next_power_of_2(channels))
    runtime.announce()
    finalize_kernel[(1,)](
        part, mean, invstd, *running.pointers(mean), channels, part.shape[0], *running.constants(),
        **running.flags(), BLOCK_R=max(16, 4096 // block_c), BLOCK_C=block_c, **runtime.LAUNCH_OPTIONS)
    return mean, invstd


@dataclass
class Norm:
    """One BatchNorm's part in a fused launch: statistics (fp32 [C]), affine parameters, and whether the
    statistics are the batch's (then the backward differentiates through them)."""

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    batch_stats: bool

    def pointers(self, fallback: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.mean, self.invstd, pointer_or(self.weight, fallback), pointer_or(self.bias, fallback)


@dataclass
class ChainSums:
    """A fused BN chain, act(norm(y) [+ residual or residual_norm(residual)]) (`normalize`), whose backward sums
    the kernel that forms the gradient of its output forms too, in its epilogue (a conv's dgrad:
    `conv_dgrad.conv2d_input_grad_with_sums`); `token`, an output of the chain's op, carries them back to the
    chain's backward as its gradient, so that the sums launch is saved (None where nothing carries them)."""

    token: torch.Tensor | None
    y: torch.Tensor
    norm: Norm
    residual: torch.Tensor | None
    residual_norm: Norm | None
    activation: str | None
    negative_slope: float

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """y, the residual, the norm's and the residual norm's (mean, invstd, weight, bias): what `of` takes."""
        r = self.residual_norm
        return (self.y, self.residual, self.norm.mean, self.norm.invstd, self.norm.weight, self.norm.bias,
                *((r.mean, r.invstd, r.weight, r.bias) if r else (None,) * 4))

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor | None, ...], activation: str | None, negative_slope: float
           ) -> "ChainSums":
        """The chain (without its token) from `tensors()`'s tensors (the norms' batch_stats flags, which the sums
        do not read, False)."""
        y, residual, mean, invstd, weight, bias, r_mean, r_invstd, r_weight, r_bias = tensors
        residual_norm = Norm(r_mean, r_invstd, r_weight, r_bias, False) if r_mean is not None else None
        return cls(None, y, Norm(mean, invstd, weight, bias, False), residual, residual_norm, activation,
                   negative_slope)

    def fits(self, output: torch.Tensor) -> bool:
        """Whether the chain's output is `output`'s shape and layout, size-1 dims aside (the epilogue reads y
        where it writes)."""
        return all(t is None or (t.shape == output.shape and all(
            a == b for a, b, size in zip(t.stride(), output.stride(), output.shape) if size > 1))
            for t in (self.y, self.residual))

    def count(self) -> int:
        """The sums formed: of dz and dz * x_hat, and dz * r_hat for a normalised residual."""
        return 3 if self.residual_norm is not None else 2

    def arguments(self) -> tuple:
        """The kernel's tensors: y, the residual, the two norms' (mean, invstd, weight, bias)."""
        return (self.y, pointer_or(self.residual, self.y), *self.norm.pointers(self.y),
                *(self.residual_norm or self.norm).pointers(self.y))

    def constexprs(self) -> dict[str, object]:
        return {**_flags(self.norm, self.residual, self.residual_norm), "ACTIVATION": activation_code(self.activation)}


def _check_layout(y: torch.Tensor, y_name: str = "y", **others: torch.Tensor | None) -> None:
    """The kernels address every tensor with y's strides: others must be laid out as y (size-1 dims aside)."""
    for name, other in others.items():
        if other is not None and (other.shape != y.shape or any(
                a != b for a, b, size in zip(other.stride(), y.stride(), y.shape) if size > 1)):
            raise ValueError(f"{name} must have {y_name}'s shape and strides {tuple(y.stride())}, got shape "
                             f"{tuple(other.shape)} and strides {tuple(other.stride())}")


def normalize(y: torch.Tensor, norm: Norm, residual: torch.Tensor | None, residual_norm: Norm | None,
              activation_code: int, negative_slope: float, token: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(norm(y) [+ residual or residual_norm(residual)]): a new tensor laid out as y (and residual, which
    must share y's strides), with `token` a [3, C] fp32 tensor of zeros (`ChainSums`), else None)."""
    _check_layout(y, residual=residual)
    view = rows_view(y)
    out = torch.empty_like(y)
    zeros = torch.empty((3, view.channels), device=y.device, dtype=torch.float32) if token else None
    if out.numel() == 0:
        return out, zeros.zero_() if token else None
    runtime.announce()
    normalize_kernel[(view.row_blocks, view.channel_blocks)](
        y, pointer_or(residual, y), out, pointer_or(zeros, y), *norm.pointers(y), *(residual_norm or norm).pointers(y),
        view.rows, view.channels, view.hw, *view.strides, float(negative_slope),
        **_flags(norm, residual, residual_norm), ACTIVATION=activation_code, TOKEN=token, INT64=view.int64,
        BLOCK_M=view.block_m, BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    return out, zeros


def normalize_max_pool(y: torch.Tensor, norm: Norm, activation_code: int, negative_slope: float, pool: MaxPool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool(act(norm(y))), the window tap of each maximum, int8): one launch, laid out as y; the activation
    itself is never stored (`normalize_backward` with `pool` gathers its gradient from the pooled one)."""
    out = torch.empty(pool.output_shape(y.shape), device=y.device, dtype=y.dtype,
                      memory_format=memory_format_of(y))
    taps = torch.empty_like(out, dtype=torch.int8)
    if out.numel() == 0:
        return out, taps
    view = _pooled_tiles(rows_view(out))
    runtime.announce()
    normalize_max_pool_kernel[(view.row_blocks, view.channel_blocks)](
        y, out, taps, *norm.pointers(y), view.rows, view.channels, *y.shape[2:], *out.shape[2:],
        *_nhwc_strides(y), *_nhwc_strides(out), float(negative_slope), AFFINE=norm.weight is not None,
        ACTIVATION=activation_code, **_window_constexprs(pool), INT64=needs_int64(y, out), BLOCK_M=view.block_m,
        BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    return out, taps


def normalize_average(y: torch.Tensor, norm: Norm, residual: torch.Tensor | None, residual_norm: Norm | None,
                      activation_code: int, negative_slope: float) -> torch.Tensor:
    """GlobalAveragePool(act(norm(y) [+ residual or residual_norm(residual)])): [N, C, 1, 1] in y's memory format,
    one launch; the activation itself is never stored (`normalize_backward` with the pool spreads the pooled
    gradient)."""
    _check_layout(y, residual=residual)
    out = torch.empty(GlobalAveragePool.output_shape(y.shape), device=y.device, dtype=y.dtype,
                      memory_format=memory_format_of(y))
    if y.numel() == 0:
        return out.fill_(float("nan"))  # PyTorch's mean of no positions
    view = rows_view(y)
    runtime.announce()
    normalize_average_kernel[(y.shape[0], view.channel_blocks)](
        y, pointer_or(residual, y), out, *norm.pointers(y), *(residual_norm or norm).pointers(y),
        view.channels, view.hw, *view.strides, out.stride(0), out.stride(1), float(negative_slope),
        **_flags(norm, residual, residual_norm), ACTIVATION=activation_code, INT64=view.int64,
        BLOCK_M=min(view.block_m, next_power_of_2(view.hw)), BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    return out


def _pooled_tiles(view: RowsView) -> RowsView:
    """A quarter of the usual tile for the kernels that walk a pool's windows (taps unrolled, one load or gather
    each): at 4096 elements they take 255 registers and spill on sm_80 and sm_90 (`workbench check-compile`)."""
    return replace(view, block_m=max(16, view.block_m // 4))


def _nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """t's (image, row, column, channel) strides."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def _window_constexprs(pool: MaxPool | GlobalAveragePool | None) -> dict[str, int]:
    """The pool's window as the kernels' constexprs (unit values without a max-pool's)."""
    names = ("KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W")
    return dict(zip(names, pool.constexprs() if isinstance(pool, MaxPool) else (1,) * 8))


def _flags(norm: Norm, residual: torch.Tensor | None, residual_norm: Norm | None) -> dict[str, bool]:
    return {"AFFINE": norm.weight is not None, "RESIDUAL": residual is not None, "R_NORM": residual_norm is not None,
            "R_AFFINE": residual_norm is not None and residual_norm.weight is not None}


def parameter_grad(parameter: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """An empty gradient for an affine parameter: its own dtype, or fp32 [C] where it has none (never read)."""
    if parameter is not None:
        return torch.empty_like(parameter)
    return torch.empty(y.shape[1], device=y.device, dtype=torch.float32)


def normalize_backward(grad: torch.Tensor, y: torch.Tensor, norm: Norm, residual: torch.Tensor | None,
                       residual_norm: Norm | None, activation_code: int, negative_slope: float,
                       need_dy: bool, need_dr: bool, need_params: bool,
                       pool: tuple[MaxPool, torch.Tensor] | GlobalAveragePool | None = None,
                       sums: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dy, d residual, d weight, d bias, d residual weight, d residual bias) of `normalize`, the parameter
    gradients in their parameters' dtypes; None where not needed. grad must share y's strides; with `pool`
    (the window and the taps of `normalize_max_pool`, or the global average of `normalize_average`), grad is
    the pooled output's (with the taps' strides for a max-pool). `sums` ([3, C] fp32): the channels' sums,
    formed already where grad was (`ChainSums`): one launch, not two."""
    maximum = pool if isinstance(pool, tuple) else None
    r_norm = residual_norm or norm
    dy = torch.empty_like(y) if need_dy else None
    dr = torch.empty_like(y) if need_dr and residual is not None else None
    params = [parameter_grad(p, y) if need_params else None
              for p in (norm.weight, norm.bias, r_norm.weight if residual_norm else None,
                        r_norm.bias if residual_norm else None)]
    if y.numel() == 0:  # no rows (an empty batch): nothing flows, the parameters' gradients are zero, as PyTorch's
        return dy, dr, *(p.zero_() if p is not None else None for p in params)
    _check_layout(y, residual=residual, **({} if pool else {"grad": grad}))
    if pool is not None and not maximum and tuple(grad.shape) != GlobalAveragePool.output_shape(y.shape):
        raise ValueError(f"an average's gradient must have shape {GlobalAveragePool.output_shape(y.shape)}, "
                         f"got {tuple(grad.shape)}")
    if maximum:
        _check_layout(maximum[1], grad=grad)
    taps = maximum[1] if maximum else grad if pool else y
    pooled = (taps, y.shape[3], *taps.shape[2:], *_nhwc_strides(taps))
    pool_constexprs = {"POOL": MaxPool.CODE if maximum else pool.CODE if pool else 0,
                       **_window_constexprs(maximum[0] if maximum else None)}
    view = _pooled_tiles(rows_view(y)) if maximum else rows_view(y)
    flags = _flags(norm, residual, residual_norm)
    pointers = (*norm.pointers(y), *r_norm.pointers(y))
    shape = (view.rows, view.channels, view.hw, *view.strides, float(negative_slope))
    runtime.announce()
    if sums is not None:
        if pool is not None:
            raise ValueError("sums are formed by grad's producer only without a pool")
        if sums.shape != (3, view.channels) or sums.dtype != torch.float32:
            raise ValueError(f"sums must be fp32 [3, {view.channels}], got {sums.dtype} {tuple(sums.shape)}")
        sums = sums.contiguous()
    else:
        strip, strips = view.strips(BACKWARD_STRIPS)
        part = torch.empty((3, strips, view.channels), device=y.device, dtype=torch.float32)
        sums = torch.empty((3, view.channels), device=y.device, dtype=torch.float32)
        with arrival.counters(y.device, view.channel_blocks) as counter:
            backward_sums_kernel[(strips, view.channel_blocks)](
                grad, y, pointer_or(residual, y), part, sums, counter, *pointers, *shape, strip, strips, *pooled,
                **flags, ACTIVATION=activation_code, **pool_constexprs, INT64=view.int64, BLOCK_M=view.block_m,
                BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    backward_apply_kernel[(view.row_blocks, view.channel_blocks)](
        grad, y, pointer_or(residual, y), sums, pointer_or(dy, y), pointer_or(dr, y),
        *(pointer_or(p, sums) for p in params), *pointers, *shape, *pooled, **flags, ACTIVATION=activation_code, **pool_constexprs,
        BATCH_STATS=norm.batch_stats, R_BATCH_STATS=residual_norm is not None and residual_norm.batch_stats,
        NEED_DY=dy is not None, NEED_DR=dr is not None, NEED_PARAMS=need_params,
        INT64=view.int64, BLOCK_M=view.block_m, BLOCK_C=view.block_c, **runtime.LAUNCH_OPTIONS)
    return dy, dr, *params
