"""Implicit-GEMM conv2d forward with a fused bias (+ residual) + activation epilogue: its kernel, launcher and
KernelSpec.

    y[(n,oh,ow), co] = act(sum over (kh, kw, ci) of x[n, ci, ih, iw] * w[co, ci, kh, kw] + bias[co] + r[...])

The residual r (a tensor shaped and laid out as y: a residual block's shortcut) is added before the
activation; the pre-activation can be kept for the backward (SAVE_PREACT).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import triton.language as tl

from triton_workbench.kernels import arrival, runtime, tuned
from triton_workbench.kernels.host_math import cdiv
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import activation_code, apply, parameter
from triton_workbench.kernels.arrival import last_to_arrive
from triton_workbench.kernels.batch_norm import (MOMENT_GROUP, MOMENT_ROWS, Running, finalize, finalize_channels,
                                                 merge_moments, moment_groups, moments_rows, moments_table,
                                                 pointer_or, store_moments, store_tile_moments)
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, dot_precision, empty_in_layout_of,
                                                    gemm_dims_fwd, needs_int64, pad_channels, problem_of,
                                                    stem_channels)
from triton_workbench.kernels.conv_spec import (EXAMPLE_PROBLEMS, PROBLEM_RULES, PROBLEM_SCHEMA, SHAPE_KEYS,
                                                elements, flops, make_inputs, torch_forward)
from triton_workbench.kernels.conv_tiles import (TILE_PARAMS, next_block, offsets, position, spatial_offsets,
                                                 tile_constraints, tile_default_config, tile_offsets)
from triton_workbench.kernels.gemm import tile_coordinates
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, r_ptr, y_ptr, z_ptr,
    moments_ptr, stats_ptr, running_mean_ptr, running_var_ptr, batches_ptr, counter_ptr, tile_rows, momentum, eps,
    N, H, W, Ho, Wo, C_in_g, C_out_g, negative_slope, GROUP_M,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_PREACT: tl.constexpr,
    STATISTICS: tl.constexpr, UPDATE: tl.constexpr, COUNT: tl.constexpr, CUMULATIVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT64: tl.constexpr, EVEN_K: tl.constexpr, C_FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = act(conv(x, w) + bias) for one (output-position tile, output-channel tile, group).

    The geometry is constexpr: each row's input position at tap (0, 0) is computed once, and the
    loop over (tap, channel block) advances its counters without division, so an iteration spends
    its integer work on one bounds check per row and the operands' addresses.

    With STATISTICS, a following BatchNorm's batch statistics of y as stored: each program writes its
    tile's moments; per channel block, the last tile of each group of tiles to finish (`arrival`) merges the
    group's moments into a group row, and the last group to finish merges those into mean and
    1 / sqrt(var + eps) (stats [2, C]) and updates the running stats (`batch_norm.finalize_channels`); the
    last of those counts the batch in num_batches_tracked. (With one program merging every tile's moments,
    6272 table rows in ResNet-18's layer1, that layer's forward took 240 us on an H200, its dgrad 45.)
    """
    group = tl.program_id(1)
    M = N * Ho * Wo
    offs_m, offs_n, m_ok, n_ok = tile_offsets(M, C_out_g, GROUP_M, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    image, oh, ow = position(offs_m, Ho, Wo, INT64)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # padding rows fail the unsigned bounds check (negative positions wrap to large values)
    ih0 = tl.where(m_ok, ih0, -1 - DIL_H * (KH - 1))
    x_row_offsets = (image * sxn + offsets(group * C_in_g, INT64) * sxc
                     + offsets(ih0, INT64) * sxh + offsets(iw0, INT64) * sxw)
    x_rows = x_ptr + x_row_offsets
    c_out = offsets(group * C_out_g + offs_n, INT64)
    w_cols = w_ptr + c_out * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if C_FLAT:
        # few channels (the stem's 3, padded to 4): in dense channels_last tensors the (kw, channel)
        # pairs of one kernel row are one contiguous run of KW * C_FLAT values, so a K tile covers a
        # whole kernel row with vector loads; the width bounds are set once, the loop walks the rows
        kw_k = offs_k // C_FLAT
        k_ok = offs_k < KW * C_FLAT
        iw = iw0[:, None] + kw_k[None, :]
        a_ok = (iw.to(tl.uint32, bitcast=True) < W) & k_ok[None, :]
        b_ok = n_ok[:, None] & k_ok[None, :]
        a_ptrs = x_ptr + tl.multiple_of(x_row_offsets, C_FLAT)[:, None] + offs_k[None, :]
        b_ptrs = w_ptr + tl.multiple_of(c_out * swo, C_FLAT)[:, None] + offs_k[None, :]  # (N, K): K contiguous
        a_row_step = DIL_H * sxh // C_FLAT  # the rows' steps in whole channel runs, so that their alignment shows
        b_row_step = swh // C_FLAT
        for kh in range(0, KH):
            ih = ih0 + kh * DIL_H
            a = tl.load(a_ptrs + (kh * a_row_step) * C_FLAT, mask=a_ok & (ih.to(tl.uint32, bitcast=True) < H)[:, None],
                        other=0.0)
            b = tl.trans(tl.load(b_ptrs + (kh * b_row_step) * C_FLAT, mask=b_ok, other=0.0))
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        channel = 0
        kh = 0
        kw = 0
        for _ in range(0, KH * KW * tl.cdiv(C_in_g, BLOCK_K)):
            ih = ih0 + kh * DIL_H
            iw = iw0 + kw * DIL_W
            row_ok = (ih.to(tl.uint32, bitcast=True) < H) & (iw.to(tl.uint32, bitcast=True) < W)
            channels = channel + offs_k
            a_mask = row_ok[:, None]
            b_mask = n_ok[None, :]
            if not EVEN_K:
                a_mask = a_mask & (channels < C_in_g)[None, :]
                b_mask = b_mask & (channels < C_in_g)[:, None]
            a_ptrs = x_rows[:, None] + channels[None, :] * sxc
            b_ptrs = w_cols[None, :] + channels[:, None] * swi
            if KH * KW > 1:  # (a 1x1 weight's unit tap strides would hide its rows' 16-byte alignment)
                a_ptrs += (kh * DIL_H) * sxh + (kw * DIL_W) * sxw
                b_ptrs += kh * swh + kw * sww
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            channel, kw, kh = next_block(channel, kw, kh, C_in_g, KW, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = spatial_offsets(image, oh, ow, syn, syh, syw, INT64)[:, None] + c_out[None, :] * syc
    out_mask = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + y_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if SAVE_PREACT:
        tl.store(z_ptr + y_offsets, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(y_ptr + y_offsets, apply(acc, ACTIVATION, negative_slope).to(y_ptr.dtype.element_ty), mask=out_mask)
    if STATISTICS:
        C = C_out_g * tl.num_programs(1)
        pid_m, pid_n = tile_coordinates(M, C_out_g, GROUP_M, BLOCK_M, BLOCK_N)
        store_tile_moments(moments_ptr, acc.to(y_ptr.dtype.element_ty).to(tl.float32), pid_m * BLOCK_M, M, C,
                           c_out, n_ok, BLOCK_M)
        channel_blocks = tl.cdiv(C_out_g, BLOCK_N) * tl.num_programs(1)
        block = group * tl.cdiv(C_out_g, BLOCK_N) + pid_n
        # first the last tile of each group of MOMENT_GROUP table rows merges the group's rows into a group row
        # (after the tiles' rows), then the last group merges the group rows: two short merges instead of one
        # program merging every tile's rows
        tl.static_assert(MOMENT_GROUP * MOMENT_ROWS % BLOCK_M == 0, "a moments group must hold whole tiles")
        TILES: tl.constexpr = MOMENT_GROUP * MOMENT_ROWS // BLOCK_M  # a group's tiles
        moment_group = pid_m // TILES
        groups = tl.cdiv(tile_rows, MOMENT_GROUP)
        tiles = tl.minimum(TILES, tl.cdiv(M, BLOCK_M) - moment_group * TILES)
        if last_to_arrive(counter_ptr + channel_blocks + 1 + moment_group * channel_blocks + block, tiles):
            first = moment_group * MOMENT_GROUP
            seen, mean, m2 = merge_moments(moments_ptr, first, tl.minimum(MOMENT_GROUP, tile_rows - first), C,
                                           c_out, n_ok, min(MOMENT_GROUP, 4096 // BLOCK_N))
            # the group row after the tiles' rows; each channel block writes its row count too (the same value),
            # since a block's last group reads only what its own block's programs wrote before arriving
            store_moments(moments_ptr, tile_rows + moment_group, C, c_out, n_ok, mean, m2, tl.max(seen, 0))
            if last_to_arrive(counter_ptr + block, groups):
                batches = 0
                if COUNT:
                    batches = tl.load(batches_ptr) + 1  # read by every block before the last one stores it
                finalize_channels(moments_ptr, tile_rows, groups, stats_ptr, stats_ptr + C, running_mean_ptr,
                                  running_var_ptr, c_out, n_ok, C, momentum, eps, batches, UPDATE, CUMULATIVE,
                                  4096 // BLOCK_N)
                if COUNT:
                    if last_to_arrive(counter_ptr + channel_blocks, channel_blocks):
                        tl.store(batches_ptr, batches)


def flat_row(problem: Problem) -> int:
    """Values in one kernel row's (kw, channel) run when the K tile covers whole kernel rows (channels_last,
    fewer than 16 channels, one group, unit width dilation), else 0: the smallest BLOCK_K the problem runs with."""
    c_in = problem["c_in"]
    if problem["layout"] != "nhwc" or c_in >= 16 or problem["groups"] != 1 or problem["dilation"][1] != 1:
        return 0
    return problem["kw"] * stem_channels(c_in, DTYPES[problem["dtype"]].itemsize)


def flat_channels(problem: Problem, block_k: int) -> int:
    """C_FLAT: the channel count the kernel computes with (`stem_channels`) when its K tiles of `block_k` cover
    whole kernel rows (`flat_row`), else 0."""
    row = flat_row(problem)
    return row // problem["kw"] if row and block_k >= row else 0


class ForwardOutputs(NamedTuple):
    y: torch.Tensor  # act(conv2d(x, weight) + bias + residual)
    pre: torch.Tensor | None  # the pre-activation, when kept
    stats: torch.Tensor | None  # y's batch mean and 1 / sqrt(var + eps) per channel (fp32 [2, C]), when asked for
    padded: torch.Tensor | None  # x with the channels the kernel computed with (`pad_channels`), where it padded


def conv2d_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
    activation_name: str | None = None, negative_slope: float | None = None,
    keep_pre: bool = False, config: Config | None = None, residual: torch.Tensor | None = None,
    statistics: Running | None = None,
) -> ForwardOutputs:
    """act(conv2d(x, weight) + bias + residual), the pre-activation if keep_pre and there is an activation,
    and with `statistics` (no activation, no residual) y's batch statistics for a following BatchNorm,
    whose running stats they update, all in the one launch (see the kernel); and x as the kernel read it where
    it padded its few channels (the stem's: the wgrad can read the same instead of padding again).

    x is 4-D; the outputs have its memory format, and so must the residual (shaped as the output). Arguments
    are assumed validated (kernels.conv2d does that).
    """
    if statistics and (activation_name is not None or residual is not None):
        raise ValueError("statistics are of the raw conv output: no activation or residual may be fused with them")
    group_rows = MOMENT_GROUP.value * MOMENT_ROWS.value
    if statistics and config is not None and (config["BLOCK_M"] % MOMENT_ROWS.value or group_rows % config["BLOCK_M"]):
        raise ValueError(f"statistics need BLOCK_M a multiple of {MOMENT_ROWS.value} dividing {group_rows}, "
                         f"got {config['BLOCK_M']}")
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = geometry.output_hw(h, w, kh, kw)
    problem = problem_of(x, weight.shape, geometry, activation_name, bias is not None)
    config = config if config is not None else tuned.config_for(CONV_FWD_SPEC, problem)
    y = empty_in_layout_of(x, (n, c_out, ho, wo))
    pre = empty_in_layout_of(x, y.shape) if keep_pre and activation_name is not None else None
    tile_rows, row_groups = moments_rows(n * ho * wo), moment_groups(n * ho * wo)  # the table: tiles' rows, groups'
    table = moments_table(tile_rows + row_groups, c_out, x.device) if statistics else None
    stats = torch.empty((2, c_out), device=x.device, dtype=torch.float32) if statistics else None
    if y.numel() == 0:
        return ForwardOutputs(y, pre, torch.stack(finalize(table, statistics)) if statistics else None, None)
    runtime.announce()
    c_flat = flat_channels(problem, config["BLOCK_K"])
    padded = None
    if c_flat:
        x, weight = pad_channels(x, c_flat), pad_channels(weight, c_flat)
        padded = x if c_flat > c_in_g else None
    if channels_last(x):
        weight = weight.contiguous(memory_format=torch.channels_last)  # channel runs along K, as x's
    c_in_g = weight.shape[1]
    grid = _grid(problem, config)
    running = statistics or Running(None, None, None, None, 0.0)
    channel_blocks = cdiv(c_out // geometry.groups, config["BLOCK_N"]) * geometry.groups
    # a counter per channel block, one for them all, one per channel block and moments group
    counters = channel_blocks * (1 + row_groups) + 1
    with arrival.counters(x.device, counters) if statistics else nullcontext(y) as counter:
        conv2d_fwd_kernel[grid](
            x, weight, bias.contiguous() if bias is not None else y, residual if residual is not None else y,
            y, pre if pre is not None else y, pointer_or(table, y), pointer_or(stats, y), *running.pointers(y), counter,
            tile_rows, *running.constants(),
            n, h, w, ho, wo, c_in_g, c_out // geometry.groups, parameter(activation_name, negative_slope),
            config["GROUP_M"], *x.stride(), *weight.stride(), *y.stride(), *geometry.constexprs(kh, kw),
            HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
            ACTIVATION=activation_code(activation_name), SAVE_PREACT=pre is not None,
            STATISTICS=statistics is not None, **running.flags(),
            DOT_PRECISION=dot_precision(x.dtype), INT64=needs_int64(x, weight, y),
            EVEN_K=c_in_g % config["BLOCK_K"] == 0, C_FLAT=c_flat,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"], **runtime.LAUNCH_OPTIONS,
        )
    return ForwardOutputs(y, pre, stats, padded)


def padded_input(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry, bias: bool) -> torch.Tensor | None:
    """An empty tensor shaped and laid out as `conv2d_forward`'s x padded to the channels the kernel computes with
    (`ForwardOutputs.padded`) when it runs with the tuned config, or None where it reads x as it is (or launches
    nothing): a fake op's output. Every config of the space covers a kernel row (its k_floor, `flat_row`), and
    `tuned.config_for` serves valid configs only, so that config pads exactly where the problem has rows."""
    problem = problem_of(x, weight.shape, geometry, None, bias)
    c_flat = flat_row(problem) // problem["kw"]
    ho, wo = geometry.output_hw(*x.shape[2:], *weight.shape[2:])
    if c_flat <= weight.shape[1] or x.shape[0] * weight.shape[0] * ho * wo == 0:
        return None
    return torch.empty((x.shape[0], c_flat, *x.shape[2:]), device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = gemm_dims_fwd(problem)
    return cdiv(rows, config["BLOCK_M"]) * cdiv(cols, config["BLOCK_N"]), problem["groups"]


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    return (e["x"] + e["weight"] + e["y"] + e["bias"]) * DTYPES[problem["dtype"]].itemsize


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["geometry"], inputs["activation"],
                          config=config)[0]


CONV_FWD_SPEC = KernelSpec(
    name="conv_fwd",
    kernel=conv2d_fwd_kernel,
    params=TILE_PARAMS,
    constraints=tile_constraints(gemm_dims_fwd, k_floor=flat_row),
    default_config=tile_default_config(gemm_dims_fwd, k_floor=flat_row),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_forward(inputs, torch.float64),
    flops=flops,
    bytes=_bytes,
    grid=_grid,
    baseline=torch_forward,
    example_problems=EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
    problem_schema=PROBLEM_SCHEMA,
    problem_rules=PROBLEM_RULES,
)
