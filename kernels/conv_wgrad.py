"""Implicit-GEMM conv2d weight gradient (wgrad): its kernel, launcher and KernelSpec.

    dw[co, ci, kh, kw] = sum over (n,oh,ow) of dz[n, co, oh, ow] * x[n, ci, oh*s - p + kh*d, ow*s - p + kw*d]

A program's columns are one tap's input channels (its x tile a row of channels, one bounds check per
position), or in dense channels_last x the whole kernel's (kh, kw, channel) triples, dw's own order
(`flat_rows`: few channels per tap fill whole tiles). Its K steps walk boxes of output positions whose
offsets do not change from step to step (`position_box`). The (n,oh,ow) reduction is split into
SPLIT_K fp32 partials until the grid fills the GPU, and the last split of a tile to finish sums them in
a fixed order (deterministic) in the same launch (`kernels.arrival`). dz = dy * act'(z) comes in formed
(`ops` forms it once for dgrad and wgrad); the bias gradient, dz summed over positions, is reduced apart
from the GEMM.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import Any

import torch
import triton.language as tl

from triton_workbench.kernels import arrival, hardware, runtime, tuned
from triton_workbench.kernels.arrival import last_to_arrive
from triton_workbench.kernels.host_math import cdiv
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, dot_precision, needs_int64, output_hw,
                                                    pad_channels, problem_geometry, problem_of, stem_channels)
from triton_workbench.kernels.conv_spec import (BACKWARD_EXAMPLE_PROBLEMS, BACKWARD_PROBLEM_RULES, PROBLEM_SCHEMA,
                                                SHAPE_KEYS,
                                                elements, flops, make_inputs, torch_backward)
from triton_workbench.kernels.conv_tiles import (TILE_PARAMS, offsets, tile_constraints, tile_default_config,
                                                 tile_fits_shared_memory, tile_offsets)
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_wgrad_kernel(
    dz_ptr, x_ptr, partial_ptr, dw_ptr, counter_ptr,
    N, H, W, C_in_g, C_out_g, C_out, boxes_per_split, GROUP_M,
    sdzn, sdzc, sdzh, sdzw, sxn, sxc, sxh, sxw,
    HO: tl.constexpr, WO: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    BOX_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, WHOLE_BOXES: tl.constexpr,
    C_FLAT: tl.constexpr, SPLIT: tl.constexpr, UNMASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[co, kh, kw, ci] of one (co tile, column tile) of one group, from one split of the (n,oh,ow)
    reduction: with SPLIT, its fp32 partial stored, and the last split to finish (`arrival`) sums all of
    the tile's partials in split order into dw; else the tile straight into dw. A program's columns are
    the input channels of one tap (kh, kw), or with C_FLAT (dense channels_last x, one group) the
    kernel's (kh, kw, channel) triples, C_FLAT channels each.

    A K step is one box of BOX_N images x BOX_H rows x BOX_W columns of output positions (`position_box`):
    a position's offsets inside its box are the same at every step, so a step moves the box's corner (a
    few scalar operations) instead of splitting BLOCK_K flat indices into (n, oh, ow)."""
    if C_FLAT:  # the columns: every (kh, kw, channel) of the kernel, in dw's order
        group = 0
        kh = 0
        kw = 0
        cols = KH * KW * C_FLAT
    else:
        group = tl.program_id(1) // (KH * KW)
        kh = (tl.program_id(1) % (KH * KW)) // KW
        kw = tl.program_id(1) % KW
        cols = C_in_g
    split = tl.program_id(2)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(C_out_g, cols, GROUP_M, BLOCK_M, BLOCK_N)
    c_out = offsets(group * C_out_g + offs_m, INT64)
    dz_cols = dz_ptr + c_out * sdzc
    if C_FLAT:  # a kernel row's (kw, channel) pairs are one contiguous run of x, a row down is sxh further
        kh_n = offs_n // C_FLAT // KW
        kw_n = offs_n // C_FLAT % KW
        x_cols = x_ptr + offsets(kh_n * DIL_H, INT64) * sxh + (offs_n - kh_n * (KW * C_FLAT))
    else:
        x_cols = x_ptr + offsets(group * C_in_g + offs_n, INT64) * sxc

    offs_k = tl.arange(0, BLOCK_K)  # a position in the box: image, row, column
    in_n = offs_k // (BOX_H * BOX_W)
    in_h = (offs_k // BOX_W) % BOX_H
    in_w = offs_k % BOX_W
    dz_box = offsets(in_n, INT64) * sdzn + offsets(in_h, INT64) * sdzh + offsets(in_w, INT64) * sdzw
    x_box = offsets(in_n, INT64) * sxn + offsets(in_h * STRIDE_H, INT64) * sxh + offsets(in_w * STRIDE_W, INT64) * sxw
    BOXES_H: tl.constexpr = (HO + BOX_H - 1) // BOX_H
    BOXES_W: tl.constexpr = (WO + BOX_W - 1) // BOX_W
    start = split * boxes_per_split
    end = tl.minimum(tl.cdiv(N, BOX_N) * (BOXES_H * BOXES_W), start + boxes_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for box in range(start, end):
        image = offsets(box // (BOXES_H * BOXES_W) * BOX_N, INT64)
        oh = box // BOXES_W % BOXES_H * BOX_H
        ow = box % BOXES_W * BOX_W
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H  # the box's first row and column of this tap in x
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        dz_rows = image * sdzn + offsets(oh, INT64) * sdzh + offsets(ow, INT64) * sdzw + dz_box
        x_rows = image * sxn + offsets(ih, INT64) * sxh + offsets(iw, INT64) * sxw + x_box
        if C_FLAT:
            x_rows = tl.multiple_of(x_rows, C_FLAT)
        if UNMASKED:  # whole tiles and boxes, every tap inside x: no bounds to check
            a = tl.load(dz_cols[:, None] + dz_rows[None, :])
            b = tl.load(x_cols[None, :] + x_rows[:, None])
        else:
            if WHOLE_BOXES:
                p_ok = offs_k < BLOCK_K
            else:
                p_ok = (image + in_n < N) & (oh + in_h < HO) & (ow + in_w < WO)
            ih_k = ih + in_h * STRIDE_H
            iw_k = iw + in_w * STRIDE_W
            if C_FLAT:
                x_ok = (p_ok[:, None] & n_ok[None, :]
                        & ((ih_k[:, None] + kh_n[None, :] * DIL_H).to(tl.uint32, bitcast=True) < H)
                        & ((iw_k[:, None] + kw_n[None, :]).to(tl.uint32, bitcast=True) < W))
            else:
                x_ok = (p_ok & (ih_k.to(tl.uint32, bitcast=True) < H) & (iw_k.to(tl.uint32, bitcast=True) < W))[:, None] \
                    & n_ok[None, :]
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
    """Whether the columns are the whole kernel's (kh, kw, channel) triples (a kernel row's (kw, channel) pairs
    contiguous in x): channels_last, one group, unit width dilation, a kernel wider than 1, and channel runs
    of whole 16-byte vectors, or fewer channels than one vector holds (the stem's 3, padded to
    `stem_channels`' 4: 196 columns in 4 tiles of 64, where per tap 3 of a 16-column tile would be
    channels). Tiles then span taps; layer1's 576 columns fill 4.5 of 128, against 1.5 per kernel row."""
    vector = 16 // DTYPES[problem["dtype"]].itemsize
    return (problem["layout"] == "nhwc" and problem["groups"] == 1 and problem["dilation"][1] == 1
            and problem["kw"] > 1 and (problem["c_in"] % vector == 0 or problem["c_in"] < vector))


def _channels(problem: Problem) -> int:
    """Input channels per group the kernel computes with: `stem_channels` for kernel-row programs."""
    c_in_g = problem["c_in"] // problem["groups"]
    return stem_channels(c_in_g, DTYPES[problem["dtype"]].itemsize) if flat_rows(problem) else c_in_g


@functools.cache
def position_box(n: int, ho: int, wo: int, block_k: int) -> tuple[int, int, int]:
    """(images, rows, columns) of the box of output positions a K step of `block_k` covers: powers of two,
    the fewest padded positions over the output (n x ho x wo in whole boxes), then the widest, as rows
    hold contiguous positions. ResNet's 56x56 at 64 positions: 1 x 8 x 8, no padding."""
    def padded(box: tuple[int, int, int]) -> int:
        return math.prod(-(-size // side) * side for size, side in zip((n, ho, wo), box))

    sides = [1 << i for i in range(block_k.bit_length()) if block_k % (1 << i) == 0]
    boxes = [(block_k // (h * w), h, w) for w in sides for h in sides if block_k % (h * w) == 0]
    return min(boxes, key=lambda box: (padded(box), -box[2], -box[1]))


def conv2d_weight_grad(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                       bias_grad: bool = True, config: Config | None = None, padded: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_weight shaped, typed and laid out like weight, grad_bias or None) of conv2d(x, weight) + b for the
    output gradient dz, in one launch: the SPLIT_K fp32 partials are summed in split order by the kernel.
    `padded`: x with zero channels appended, channels_last (the forward's, `ForwardOutputs.padded`), read
    instead of padding x again where the kernel computes with that many channels."""
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = dz.shape[2:]
    problem = problem_of(x, weight.shape, geometry, None, bias_grad)
    config = config if config is not None else tuned.config_for(CONV_WGRAD_SPEC, problem)
    grid = _grid(problem, config)
    channels = _channels(problem)
    if channels > c_in_g:
        x = padded if padded is not None and padded.shape[1] == channels else pad_channels(x, channels)
    # (co, kh, kw, ci): channels_last strides once permuted. Every tile is stored whole: nothing is left unwritten
    dw = torch.empty((c_out, kh, kw, channels), device=x.device, dtype=weight.dtype)
    split = grid[2] > 1
    partial = torch.empty((grid[2], *dw.shape), device=x.device, dtype=torch.float32) if split else dw
    if dz.numel() and dw.numel():
        runtime.announce()
        box = position_box(n, ho, wo, config["BLOCK_K"])
        with arrival.counters(x.device, grid[0] * grid[1]) if split else nullcontext(dw) as counter:
            conv2d_wgrad_kernel[grid](
                dz, x, partial, dw, counter,
                n, h, w, channels, c_out // geometry.groups, c_out, _boxes_per_split(problem, config),
                config["GROUP_M"], *dz.stride(), *x.stride(), ho, wo, *geometry.constexprs(kh, kw),
                *box, _whole_boxes(problem, config), C_FLAT=channels if flat_rows(problem) else 0, SPLIT=split,
                UNMASKED=_unmasked(problem, config), DOT_PRECISION=dot_precision(x.dtype),
                INT64=needs_int64(dz, x, partial, dw),
                BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                num_warps=config["num_warps"], num_stages=config["num_stages"], **runtime.LAUNCH_OPTIONS,
            )
    else:
        dw.zero_()  # no position to reduce over (an empty batch): the gradient is zero
    dw = dw[..., :c_in_g].permute(0, 3, 1, 2)
    if not channels_last(weight):
        dw = dw.contiguous()
    elif channels > c_in_g:
        dw = dw.contiguous(memory_format=torch.channels_last)
    return dw, conv2d_bias_grad(dz, weight.dtype) if bias_grad else None


def conv2d_bias_grad(dz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient: dz summed over (n, oh, ow) in fp32, apart from the weight GEMM."""
    return dz.sum(dim=(0, 2, 3), dtype=torch.float32).to(dtype)


def _boxes(problem: Problem, config: Config) -> int:
    """`position_box`es over the output."""
    ho, wo = output_hw(problem)
    box = position_box(problem["n"], ho, wo, config["BLOCK_K"])
    return math.prod(cdiv(size, side) for size, side in zip((problem["n"], ho, wo), box))


def _whole_boxes(problem: Problem, config: Config) -> bool:
    """Whether the output's positions fill every box."""
    return _boxes(problem, config) * config["BLOCK_K"] == _dims(problem)[2]


def _unmasked(problem: Problem, config: Config) -> bool:
    """Whether the wgrad loop may load without masks: whole tiles of output channels and columns, whole boxes of
    positions, and every tap of every output position inside x (no leading padding, and the last position's
    last tap inside too)."""
    rows, cols, _ = _dims(problem)
    g = problem_geometry(problem)
    ho, wo = output_hw(problem)
    inside = (g.pad_top == g.pad_left == 0 and (ho - 1) * g.stride_h + (problem["kh"] - 1) * g.dilation_h < problem["h"]
              and (wo - 1) * g.stride_w + (problem["kw"] - 1) * g.dilation_w < problem["w"])
    return (inside and rows % config["BLOCK_M"] == 0 and cols % config["BLOCK_N"] == 0
            and _whole_boxes(problem, config))


def _boxes_per_split(problem: Problem, config: Config) -> int:
    return cdiv(max(_boxes(problem, config), 1), config["SPLIT_K"])


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = _dims(problem)
    splits = cdiv(max(_boxes(problem, config), 1), _boxes_per_split(problem, config))  # no empty split
    return cdiv(rows, config["BLOCK_M"]) * cdiv(cols, config["BLOCK_N"]), _tap_programs(problem), splits


def _dims(problem: Problem) -> tuple[int, int, int]:
    """(output channels, columns, positions) per group of one program's GEMM: its columns are one tap's input
    channels, or the kernel's (kh, kw, channel) triples (`flat_rows`)."""
    ho, wo = output_hw(problem)
    columns = _channels(problem) * problem["kh"] * problem["kw"] if flat_rows(problem) else _channels(problem)
    return problem["c_out"] // problem["groups"], columns, problem["n"] * ho * wo


def _tap_programs(problem: Problem) -> int:
    """Programs per column tile across the groups and taps: one per group and tap, or one (`flat_rows`)."""
    return 1 if flat_rows(problem) else problem["groups"] * problem["kh"] * problem["kw"]


def _programs_per_tile(problem: Problem) -> int:
    """Programs per (co, column) tile as large as the reduction allows, to size the tiles by: `_tap_programs`, and
    up to 64 splits of the positions (`_split` picks the count, up to 128, once the tile is chosen)."""
    return _tap_programs(problem) * min(64, max(1, _dims(problem)[2] // 512))


MIN_STEPS = 4  # K steps per split, at least: below it the pipeline's fill and the partial tile's store dominate


def _splits_have_work(config: Config, problem: Problem) -> bool:
    """A split of the wgrad reduction is worth launching only if the splits get a K step (BLOCK_K positions) each
    on average."""
    return config["SPLIT_K"] == 1 or config["SPLIT_K"] * config["BLOCK_K"] <= _dims(problem)[2]


def _finish(problem: Problem, config: Config) -> Config:
    """wgrad's default config past the shared tile heuristic: K steps of 128 positions for tiles of 64x64 or
    less whose columns span taps (`flat_rows`: a bounds check per element), so that a step's fixed issue cost
    (the box's corner, the pipeline's barriers: about 60 instructions) meets 256 tensor-core clocks, not 128
    (the stem on sm_90: tensor/issue ceiling 0.72 -> 0.91); then the split (`_split`)."""
    if (flat_rows(problem) and config["BLOCK_M"] * config["BLOCK_N"] <= 64 * 64
            and _dims(problem)[2] >= 128 * MIN_STEPS * hardware.H100_SXM.sm_count):
        config = config | {"BLOCK_K": 128}
        while not tile_fits_shared_memory(config, problem) and config["num_stages"] > 2:
            config["num_stages"] -= 1
    return _split(problem, config)


def _split(problem: Problem, config: Config) -> Config:
    """The fewest splits of the (n, oh, ow) reduction whose grid fills an H100 SXM's SMs (132,
    `kernels.hardware`) once, keeping at least MIN_STEPS K steps per split."""
    split = 1
    for candidate in CONV_WGRAD_SPEC.params["SPLIT_K"]:
        if _programs(problem, config | {"SPLIT_K": split}) >= hardware.H100_SXM.sm_count:
            break
        if _boxes_per_split(problem, config | {"SPLIT_K": candidate}) < MIN_STEPS:
            break
        split = candidate
    return config | {"SPLIT_K": split}


def _programs(problem: Problem, config: Config) -> int:
    return math.prod(_grid(problem, config))


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    return (e["y"] + e["x"]) * DTYPES[problem["dtype"]].itemsize + (e["weight"] + e["bias"]) * 4


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_weight_grad(inputs["grad_output"], inputs["x"], inputs["weight"], inputs["geometry"],
                              bias_grad=inputs["bias"] is not None, config=config)[0]


CONV_WGRAD_SPEC = KernelSpec(
    name="conv_wgrad",
    kernel=conv2d_wgrad_kernel,
    params=TILE_PARAMS | {"SPLIT_K": [1, 2, 4, 8, 16, 32, 64, 128]},
    constraints=tile_constraints(_dims) + (_splits_have_work,),
    default_config=tile_default_config(_dims, programs_per_tile=_programs_per_tile, finish=_finish),
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
