"""Implicit-GEMM conv2d weight gradient (wgrad): its kernel, launcher and KernelSpec.

    dw[co, ci, kh, kw] = sum over (n,oh,ow) of dz[n, co, oh, ow] * x[n, ci, oh*s - p + kh*d, ow*s - p + kw*d]

Each program owns one tap (kh, kw) of one (co, ci) tile, so its x tile is a row of channels
(contiguous in channels_last) and its position bounds are one check per row; the (n,oh,ow)
reduction is split into SPLIT_K fp32 partials until the grid fills the GPU, and the last split of a
tile to finish sums them in a fixed order (deterministic) in the same launch (`kernels.arrival`). dz = dy * act'(z) comes in formed (`ops` forms it once for
dgrad and wgrad); the bias gradient, dz summed over positions, is reduced apart from the GEMM.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import triton
import triton.language as tl

from triton_workbench.kernels import arrival, hardware, runtime, tuned
from triton_workbench.kernels.arrival import last_to_arrive
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, dot_precision, gemm_dims_wgrad,
                                                    needs_int64, output_hw, problem_geometry, problem_of)
from triton_workbench.kernels.conv_spec import (BACKWARD_EXAMPLE_PROBLEMS, BACKWARD_PROBLEM_RULES, PROBLEM_SCHEMA,
                                                SHAPE_KEYS,
                                                elements, flops, make_inputs, torch_backward)
from triton_workbench.kernels.conv_tiles import TILE_PARAMS, offsets, tile_constraints, tile_default_config, tile_offsets
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_wgrad_kernel(
    dz_ptr, x_ptr, partial_ptr, dw_ptr, counter_ptr,
    N, H, W, C_in_g, C_out_g, C_out, positions_per_split, GROUP_M,
    sdzn, sdzc, sdzh, sdzw, sxn, sxc, sxh, sxw,
    HO: tl.constexpr, WO: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    C_FLAT: tl.constexpr, DENSE_DZ: tl.constexpr, SPLIT: tl.constexpr, UNMASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[co, kh, kw, ci] of one (co tile, column tile) of one group, from one split of the (n,oh,ow)
    reduction: with SPLIT, its fp32 partial stored, and the last split to finish (`arrival`) sums all of
    the tile's partials in split order into dw; else the tile straight into dw. A program's columns are
    the input channels of one tap (kh, kw), or with C_FLAT (dense channels_last x, one group) the
    (kw, channel) pairs of one kernel row, contiguous there."""
    if C_FLAT:
        group = 0
        kh = tl.program_id(1)
        kw = 0
        cols = KW * C_FLAT
    else:
        group = tl.program_id(1) // (KH * KW)
        kh = (tl.program_id(1) % (KH * KW)) // KW
        kw = tl.program_id(1) % KW
        cols = C_in_g
    split = tl.program_id(2)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(C_out_g, cols, GROUP_M, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    c_out = offsets(group * C_out_g + offs_m, INT64)
    dz_cols = dz_ptr + c_out * sdzc
    if C_FLAT:
        x_cols = x_ptr + offs_n  # (kw, channel) at kw * C_FLAT + channel from the row's first pixel
        kw_n = offs_n // C_FLAT
    else:
        x_cols = x_ptr + offsets(group * C_in_g + offs_n, INT64) * sxc

    start = split * positions_per_split
    end = tl.minimum(N * HO * WO, start + positions_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < end
        image = offsets(p // (HO * WO), INT64)
        oh = (p % (HO * WO)) // WO
        ow = p % WO
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        x_rows = image * sxn + offsets(ih, INT64) * sxh + offsets(iw, INT64) * sxw
        if C_FLAT:
            x_rows = tl.multiple_of(x_rows, C_FLAT)
        if DENSE_DZ:  # dz rows follow (n, oh, ow) in memory (channels_last): a position's row is p * sdzw
            dz_rows = offsets(p, INT64) * sdzw
        else:
            dz_rows = image * sdzn + offsets(oh, INT64) * sdzh + offsets(ow, INT64) * sdzw
        if UNMASKED:  # whole tiles, every tap inside x: no bounds to check
            a = tl.load(dz_cols[:, None] + dz_rows[None, :])
            b = tl.load(x_cols[None, :] + x_rows[:, None])
        else:
            row_ok = p_ok & (ih.to(tl.uint32, bitcast=True) < H)
            if C_FLAT:
                x_ok = row_ok[:, None] & ((iw[:, None] + kw_n[None, :]).to(tl.uint32, bitcast=True) < W) & \
                    n_ok[None, :]
            else:
                x_ok = (row_ok & (iw.to(tl.uint32, bitcast=True) < W))[:, None] & n_ok[None, :]
            a = tl.load(dz_cols[:, None] + dz_rows[None, :], mask=m_ok[:, None] & p_ok[None, :], other=0.0)
            b = tl.load(x_cols[None, :] + x_rows[:, None], mask=x_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    dw_offsets = (c_out * (KH * KW) + kh * KW + kw)[:, None] * C_in_g + offs_n[None, :]  # (co, kh, kw), columns
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if not SPLIT:
        tl.store(dw_ptr + dw_offsets, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
    else:
        splits = tl.num_programs(2)
        split_size = offsets(C_out, INT64) * (KH * KW) * C_in_g
        tl.store(partial_ptr + split * split_size + dw_offsets, acc, mask=tile_ok)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if last_to_arrive(counter_ptr + tile, splits):
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for other in range(0, splits):
                total += tl.load(partial_ptr + other * split_size + dw_offsets, mask=tile_ok,
                                 other=0.0, cache_modifier=".cg")
            tl.store(dw_ptr + dw_offsets, total.to(dw_ptr.dtype.element_ty), mask=tile_ok)


def flat_rows(problem: Problem) -> bool:
    """Whether a program's columns are a kernel row's (kw, channel) pairs: channels_last, one group, unit width
    dilation, a kernel wider than 1, and channel runs of whole 16-byte vectors, or fewer channels than one
    vector holds (the stem's 3: one program per kernel row instead of per tap, its 21 columns contiguous
    in x, where per tap 3 of a tile's 16 columns would be channels)."""
    vector = 16 // DTYPES[problem["dtype"]].itemsize
    return (problem["layout"] == "nhwc" and problem["groups"] == 1 and problem["dilation"][1] == 1
            and problem["kw"] > 1 and (problem["c_in"] % vector == 0 or problem["c_in"] < vector))


def conv2d_weight_grad(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                       bias_grad: bool = True, config: Config | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_weight shaped, typed and laid out like weight, grad_bias or None) of conv2d(x, weight) + b for the
    output gradient dz, in one launch: the SPLIT_K fp32 partials are summed in split order by the kernel."""
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = dz.shape[2:]
    problem = problem_of(x, weight.shape, geometry, None, bias_grad)
    config = config if config is not None else tuned.config_for(CONV_WGRAD_SPEC, problem)
    grid = _grid(problem, config)
    # (co, kh, kw, ci): channels_last strides once permuted. Every tile is stored whole: nothing is left unwritten
    dw = torch.empty((c_out, kh, kw, c_in_g), device=x.device, dtype=weight.dtype)
    split = grid[2] > 1
    partial = torch.empty((grid[2], *dw.shape), device=x.device, dtype=torch.float32) if split else dw
    if dz.numel() and dw.numel():
        runtime.announce()
        with arrival.counters(x.device, grid[0] * grid[1]) if split else nullcontext(dw) as counter:
            conv2d_wgrad_kernel[grid](
                dz, x, partial, dw, counter,
                n, h, w, c_in_g, c_out // geometry.groups, c_out, _positions_per_split(problem, config),
                config["GROUP_M"], *dz.stride(), *x.stride(), ho, wo, *geometry.constexprs(kh, kw),
                C_FLAT=c_in_g if flat_rows(problem) else 0, SPLIT=split, UNMASKED=_unmasked(problem, config),
                DENSE_DZ=dz.stride()[0] == ho * dz.stride()[2] and dz.stride()[2] == wo * dz.stride()[3],
                DOT_PRECISION=dot_precision(x.dtype), INT64=needs_int64(dz, x, partial, dw),
                BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                num_warps=config["num_warps"], num_stages=config["num_stages"], **runtime.LAUNCH_OPTIONS,
            )
    else:
        dw.zero_()  # no position to reduce over (an empty batch): the gradient is zero
    dw = dw.permute(0, 3, 1, 2)
    if not channels_last(weight):
        dw = dw.contiguous()
    return dw, conv2d_bias_grad(dz, weight.dtype) if bias_grad else None


def conv2d_bias_grad(dz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient: dz summed over (n, oh, ow) in fp32, apart from the weight GEMM."""
    return dz.sum(dim=(0, 2, 3), dtype=torch.float32).to(dtype)


def _unmasked(problem: Problem, config: Config) -> bool:
    """Whether the wgrad loop may load without masks: whole tiles of output channels, columns and positions
    (the splits' position ranges are whole BLOCK_K blocks), and every tap of every output position inside x
    (no leading padding, and the last position's last tap inside too)."""
    rows, cols, positions = _dims(problem)
    g = problem_geometry(problem)
    ho, wo = output_hw(problem)
    inside = (g.pad_top == g.pad_left == 0 and (ho - 1) * g.stride_h + (problem["kh"] - 1) * g.dilation_h < problem["h"]
              and (wo - 1) * g.stride_w + (problem["kw"] - 1) * g.dilation_w < problem["w"])
    return (inside and rows % config["BLOCK_M"] == 0 and cols % config["BLOCK_N"] == 0
            and positions % config["BLOCK_K"] == 0)


def _positions_per_split(problem: Problem, config: Config) -> int:
    positions = gemm_dims_wgrad(problem)[2]
    return triton.cdiv(triton.cdiv(max(positions, 1), config["SPLIT_K"]), config["BLOCK_K"]) * config["BLOCK_K"]


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, positions = _dims(problem)
    splits = triton.cdiv(max(positions, 1), _positions_per_split(problem, config))  # no empty split
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), _tap_programs(problem), splits


def _dims(problem: Problem) -> tuple[int, int, int]:
    """(output channels, columns, positions) per group of one program's GEMM: its columns are one tap's input
    channels, or a kernel row's (kw, channel) pairs (`flat_rows`)."""
    ho, wo = output_hw(problem)
    g = problem["groups"]
    c_in_g = problem["c_in"] // g
    return problem["c_out"] // g, c_in_g * problem["kw"] if flat_rows(problem) else c_in_g, problem["n"] * ho * wo


def _tap_programs(problem: Problem) -> int:
    """Programs per column tile across the groups and taps: one per group and tap, or per kernel row."""
    return problem["kh"] if flat_rows(problem) else problem["groups"] * problem["kh"] * problem["kw"]


def _programs_per_tile(problem: Problem) -> int:
    """Programs per (co, column) tile as large as the reduction allows: `_tap_programs`, and up to 64 splits of
    the positions (`_split` picks the count once the tile is chosen)."""
    return _tap_programs(problem) * min(64, max(1, _dims(problem)[2] // 512))


def _splits_have_work(config: Config, problem: Problem) -> bool:
    """A split of the wgrad reduction is worth launching only if each gets at least BLOCK_K positions."""
    return config["SPLIT_K"] == 1 or config["SPLIT_K"] * config["BLOCK_K"] <= _dims(problem)[2]


def _split(problem: Problem, config: Config) -> Config:
    """Split the (n, oh, ow) reduction until the grid fills an H100 SXM's SMs (132, `kernels.hardware`) once,
    up to twice, keeping >= 8 K steps per split."""
    rows, cols, positions = _dims(problem)
    tiles = triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]) * _tap_programs(problem)
    split = 1
    for candidate in CONV_WGRAD_SPEC.params["SPLIT_K"]:
        if tiles * split >= hardware.H100_SXM.sm_count:
            break
        if tiles * candidate <= 2 * hardware.H100_SXM.sm_count and candidate * config["BLOCK_K"] * 8 <= positions:
            split = candidate
    return config | {"SPLIT_K": split}


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    return (e["y"] + e["x"]) * DTYPES[problem["dtype"]].itemsize + (e["weight"] + e["bias"]) * 4


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_weight_grad(inputs["grad_output"], inputs["x"], inputs["weight"], inputs["geometry"],
                              bias_grad=inputs["bias"] is not None, config=config)[0]


CONV_WGRAD_SPEC = KernelSpec(
    name="conv_wgrad",
    kernel=conv2d_wgrad_kernel,
    params=TILE_PARAMS | {"SPLIT_K": [1, 2, 4, 8, 16, 32, 64]},
    constraints=tile_constraints(_dims) + (_splits_have_work,),
    default_config=tile_default_config(_dims, programs_per_tile=_programs_per_tile, finish=_split),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_backward(inputs, "weight", torch.float64),
    flops=flops,
    bytes=_bytes,
    grid=_grid,
    baseline=lambda inputs: torch_backward(inputs, "weight"),
    example_problems=BACKWARD_EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
    problem_schema=PROBLEM_SCHEMA,
    problem_rules=BACKWARD_PROBLEM_RULES,
)
