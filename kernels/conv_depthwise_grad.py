"""Direct depthwise conv2d backward: the input gradient (dgrad) and the weight + bias gradient (wgrad), their
kernels, launchers and KernelSpecs (the forward and the shared tile space are in `conv_depthwise`).

    dx[n, ci, ih, iw] = sum over (m, kh, kw) of dz[n, ci*M + m, oh, ow] * w[ci*M + m, 0, kh, kw],
                        oh = (ih + p - kh*d) / s a whole number in range
    dw[co, 0, kh, kw] = sum over (n, oh, ow) of dz[n, co, oh, ow] * x[n, co // M, oh*s - p + kh*d, ow*s - p + kw*d]
    db[co]            = sum over (n, oh, ow) of dz[n, co, oh, ow]

dz = dy * act'(z) comes in formed (`ops` forms it once for both). dgrad runs by stride phases as
`conv_dgrad` does (its `stride_phases`): each phase of the input is one launch of a stride-1 stencil over dz
with the phase's taps only, so no tap is tested per position. wgrad gives each program one row (a tap, or the
bias) of a channel block and one split of the positions; the fp32 partials are summed in split order. The
rows of one split are neighbours in launch order, so they read the same dz and x positions at about the same
time (the re-reads per tap come from L2).
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from triton_workbench.kernels import hardware, runtime, tuned
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.conv_depthwise import (SPATIAL_PARAMS, depthwise_spec, holds_tile, spatial_constraints,
                                                     spatial_default_config, spatial_grid, spatial_tile, taps_major)
from triton_workbench.kernels.conv_dgrad import CONV_DGRAD_SPEC, stride_phases
from triton_workbench.kernels.conv_geometry import (ConvGeometry, conv_problem, empty_in_layout_of, make_geometry,
                                                    needs_int64, output_hw, problem_of)
from triton_workbench.kernels.conv_tiles import offsets, position, spatial_offsets
from triton_workbench.kernels.conv_wgrad import CONV_WGRAD_SPEC
from triton_workbench.kernels.spec import Config, Problem

# per dtype: a MobileNetV2 3x3 depthwise conv (144 channels, 56x56, batch 32), channels_last; wgrad with
# its bias gradient (fused in the kernel)
BACKWARD_EXAMPLE_PROBLEMS = tuple(
    conv_problem(32, 144, 56, 56, 144, 3, 3, make_geometry((3, 3), 1, 1, 1, 144), dtype, "nhwc", None, False)
    | ({"tf32": True} if dtype == "fp32" else {})
    for dtype in ("fp32", "fp16", "bf16"))


@jit
def depthwise_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    Hq, Wq, Ho, Wo, C_in,
    sdzn, sdzc, sdzh, sdzw, sdxn, sdxc, sdxh, sdxw,
    PHASE_H: tl.constexpr, PHASE_W: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    FIRST_KH: tl.constexpr, FIRST_KW: tl.constexpr, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    STEP_H: tl.constexpr, STEP_W: tl.constexpr, BASE_H: tl.constexpr, BASE_W: tl.constexpr,
    OH_STEP: tl.constexpr, OW_STEP: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    INT64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx of one stride phase (positions ih = PHASE_H + STRIDE_H * qh, ...) for one (qh x qw tile, input-channel
    block): a stride-1 stencil of dz with the phase's TAPS_H x TAPS_W taps of each of the MULT output channels
    per input channel; w is taps-major."""
    image, qh, qw, q_ok = spatial_tile(Hq, Wq, INT64, BLOCK_H, BLOCK_W)
    c_in = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_in < C_in
    oh0 = qh + BASE_H
    ow0 = qw + BASE_W
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for m in range(0, MULT):
        c_out = c_in * MULT + m
        dz_cols = dz_ptr + image * sdzn + offsets(c_out, INT64) * sdzc
        w_cols = w_ptr + (FIRST_KH * KW + FIRST_KW) * C_in * MULT + c_out
        for th in tl.static_range(TAPS_H):
            oh = oh0 - th * OH_STEP
            row_ok = q_ok & (oh.to(tl.uint32, bitcast=True) < Ho)
            for tw in tl.static_range(TAPS_W):
                ow = ow0 - tw * OW_STEP
                ok = row_ok & (ow.to(tl.uint32, bitcast=True) < Wo)
                dz_rows = offsets(oh, INT64) * sdzh + offsets(ow, INT64) * sdzw
                dz = tl.load(dz_cols[None, :] + dz_rows[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
                w = tl.load(w_cols + (th * STEP_H * KW + tw * STEP_W) * C_in * MULT, mask=c_ok, other=0.0)
                acc += dz.to(tl.float32) * w.to(tl.float32)[None, :]
    dx_rows = spatial_offsets(image, PHASE_H + STRIDE_H * qh, PHASE_W + STRIDE_W * qw, sdxn, sdxh, sdxw, INT64)
    dx_offsets = dx_rows[:, None] + offsets(c_in, INT64)[None, :] * sdxc
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


def depthwise_input_grad(dz: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry,
                         config: Config | None = None) -> torch.Tensor:
    """`conv_dgrad.conv2d_input_grad` for a depthwise conv: grad_input for the output gradient dz, shaped, typed
    and laid out like x (only its metadata is read). One launch per stride phase."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = dz.shape[2:]
    problem = problem_of(x, weight.shape, geometry, None, False)
    config = config if config is not None else tuned.config_for(DEPTHWISE_DGRAD_SPEC, problem)
    dx = empty_in_layout_of(x, (n, c_in, h, w))
    if dx.numel() == 0:
        return dx
    if dz.numel() == 0:
        return dx.zero_()
    runtime.announce()
    weight = taps_major(weight)
    for taps_h, taps_w in stride_phases(problem):
        grid = (n * cdiv(taps_h.rows, config["BLOCK_H"]) * cdiv(taps_w.rows, config["BLOCK_W"]),
                cdiv(c_in, config["BLOCK_C"]))
        depthwise_dgrad_kernel[grid](
            dz, weight, dx, taps_h.rows, taps_w.rows, ho, wo, c_in, *dz.stride(), *dx.stride(),
            taps_h.phase, taps_w.phase, geometry.stride_h, geometry.stride_w, taps_h.first, taps_w.first,
            taps_h.count, taps_w.count, taps_h.step, taps_w.step, taps_h.base, taps_w.base,
            taps_h.oh_step, taps_w.oh_step, kw, c_out // c_in, INT64=needs_int64(dz, weight, dx),
            BLOCK_H=config["BLOCK_H"], BLOCK_W=config["BLOCK_W"], BLOCK_C=config["BLOCK_C"],
            num_warps=config["num_warps"], **runtime.LAUNCH_OPTIONS,
        )
    return dx


def _phase_dims(problem: Problem) -> tuple[int, int, int]:
    """(rows, columns, channels) of the largest stride phase: what a dgrad program's tile is sized against."""
    stride_h, stride_w = problem["stride"]
    return -(-problem["h"] // stride_h), -(-problem["w"] // stride_w), problem["c_in"]


def _dgrad_grid(problem: Problem, config: Config) -> tuple[int, ...]:
    """All phases' programs together (one launch each)."""
    per_phase = [spatial_grid(lambda _: (taps_h.rows, taps_w.rows, problem["c_in"]))(problem, config)
                 for taps_h, taps_w in stride_phases(problem)]
    return sum(tiles for tiles, _ in per_phase), cdiv(problem["c_in"], config["BLOCK_C"])


def _dgrad_launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return depthwise_input_grad(inputs["grad_output"], inputs["weight"], inputs["x"], inputs["geometry"], config)


DEPTHWISE_DGRAD_SPEC = depthwise_spec(
    CONV_DGRAD_SPEC, "depthwise_dgrad", depthwise_dgrad_kernel, SPATIAL_PARAMS, spatial_constraints(_phase_dims),
    spatial_default_config(_phase_dims), _dgrad_launch, _dgrad_grid, BACKWARD_EXAMPLE_PROBLEMS)


@jit
def depthwise_wgrad_kernel(
    dz_ptr, x_ptr, partial_ptr,
    H, W, C_out, positions, positions_per_split,
    sdzn, sdzc, sdzh, sdzw, sxn, sxc, sxh, sxw,
    HO: tl.constexpr, WO: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, MULT: tl.constexpr,
    INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 partial[split, row, co] for one channel block, one row and one split of the (n, oh, ow) positions:
    row kh * KW + kw is dw's tap (kh, kw), row KH * KW (launched when the bias gradient is wanted) is db (x
    read as 1). Products accumulate elementwise over BLOCK_P x BLOCK_C and are reduced over positions once."""
    c_out = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_out < C_out
    row = tl.program_id(1)
    split = tl.program_id(2)
    is_bias = row == KH * KW
    kh = row // KW
    kw = row % KW
    dz_cols = dz_ptr + offsets(c_out, INT64) * sdzc
    x_cols = x_ptr + offsets(c_out // MULT, INT64) * sxc
    x_c_ok = c_out < tl.where(row < KH * KW, C_out, 0)  # the bias row reads no x
    start = split * positions_per_split
    end = tl.minimum(positions, start + positions_per_split)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        image, oh, ow = position(p, HO, WO, INT64)
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        x_ok = p_ok & (ih.to(tl.uint32, bitcast=True) < H) & (iw.to(tl.uint32, bitcast=True) < W)
        dz_rows = spatial_offsets(image, oh, ow, sdzn, sdzh, sdzw, INT64)
        x_rows = spatial_offsets(image, ih, iw, sxn, sxh, sxw, INT64)
        dz = tl.load(dz_cols[None, :] + dz_rows[:, None], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        x = tl.load(x_cols[None, :] + x_rows[:, None], mask=x_ok[:, None] & x_c_ok[None, :], other=0.0)
        acc += dz.to(tl.float32) * tl.where(is_bias, 1.0, x.to(tl.float32))
    partial_offsets = (offsets(split, INT64) * tl.num_programs(1) + row) * C_out + c_out
    tl.store(partial_ptr + partial_offsets, tl.sum(acc, axis=0), mask=c_ok)


def depthwise_weight_grad(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                          bias_grad: bool = True, config: Config | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`conv_wgrad.conv2d_weight_grad` for a depthwise conv: (grad_weight shaped, typed and laid out like weight,
    grad_bias or None) for the output gradient dz, from one launch; its SPLIT fp32 partials summed in split order."""
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = dz.shape[2:]
    problem = problem_of(x, weight.shape, geometry, None, bias_grad)
    config = config if config is not None else tuned.config_for(DEPTHWISE_WGRAD_SPEC, problem)
    grid = _wgrad_grid(problem, config)
    # every program stores its whole (split, row, channel block): no element is left unwritten
    partial = torch.empty((grid[2], grid[1], c_out), device=x.device, dtype=torch.float32)
    if dz.numel() and partial.numel():
        runtime.announce()
        depthwise_wgrad_kernel[grid](
            dz, x, partial, h, w, c_out, n * ho * wo, _positions_per_split(problem, config),
            *dz.stride(), *x.stride(), ho, wo, *geometry.constexprs(kh, kw), c_out // x.shape[1],
            INT64=needs_int64(dz, x, partial), BLOCK_P=config["BLOCK_P"], BLOCK_C=config["BLOCK_C"],
            num_warps=config["num_warps"], **runtime.LAUNCH_OPTIONS,
        )
    else:
        partial.zero_()  # no position to reduce over (an empty batch): the gradients are zero
    sums = partial.sum(0)
    grad_weight = torch.empty_like(weight).copy_(sums[:kh * kw].t().reshape(weight.shape))
    return grad_weight, sums[kh * kw].to(weight.dtype) if bias_grad else None


def _wgrad_dims(problem: Problem) -> tuple[int, int]:
    """(positions reduced over, channels)."""
    ho, wo = output_hw(problem)
    return problem["n"] * ho * wo, problem["c_out"]


def _rows(problem: Problem) -> int:
    """Programs per channel block and split: one per tap, and one for the bias gradient when it is wanted."""
    return problem["kh"] * problem["kw"] + problem["bias"]


def _positions_per_split(problem: Problem, config: Config) -> int:
    positions = _wgrad_dims(problem)[0]
    return cdiv(cdiv(max(positions, 1), config["SPLIT"]), config["BLOCK_P"]) * config["BLOCK_P"]


def _wgrad_grid(problem: Problem, config: Config) -> tuple[int, ...]:
    positions, channels = _wgrad_dims(problem)
    splits = cdiv(max(positions, 1), _positions_per_split(problem, config))  # no empty split
    return cdiv(channels, config["BLOCK_C"]), _rows(problem), splits


def _wgrad_threads_fit(config: Config, problem: Problem) -> bool:
    return holds_tile(config["BLOCK_P"] * config["BLOCK_C"], config["num_warps"])


def _wgrad_fits_problem(config: Config, problem: Problem) -> bool:
    """No block extends more than one power of two beyond the problem (16 positions, 8 channels stay allowed),
    and every split gets at least BLOCK_P positions."""
    positions, channels = _wgrad_dims(problem)
    return (config["BLOCK_P"] <= max(16, next_power_of_2(positions))
            and config["BLOCK_C"] <= max(8, next_power_of_2(channels))
            and (config["SPLIT"] == 1 or config["SPLIT"] * config["BLOCK_P"] <= positions))


def _wgrad_default_config(problem: Problem) -> Config:
    """64 positions x up to 64 channels on 4 warps (32 accumulators a thread), shrunk to the problem; the
    positions split until the grid has 8 programs per SM of an H100 SXM (enough warps in flight to keep a
    memory-bound loop busy), keeping >= 8 position blocks per split."""
    positions, channels = _wgrad_dims(problem)
    config = {"BLOCK_P": min(64, max(16, next_power_of_2(positions))),
              "BLOCK_C": min(64, max(8, next_power_of_2(channels))), "SPLIT": 1}
    config["num_warps"] = max(1, min(4, config["BLOCK_P"] * config["BLOCK_C"] // 1024))
    programs = cdiv(channels, config["BLOCK_C"]) * _rows(problem)
    for split in DEPTHWISE_WGRAD_SPEC.params["SPLIT"]:
        if split * config["BLOCK_P"] * 8 > positions:
            break
        config["SPLIT"] = split
        if programs * split >= 8 * hardware.H100_SXM.sm_count:
            break
    return config


def _wgrad_launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return depthwise_weight_grad(inputs["grad_output"], inputs["x"], inputs["weight"], inputs["geometry"],
                                 bias_grad=inputs["bias"] is not None, config=config)[0]


DEPTHWISE_WGRAD_SPEC = depthwise_spec(
    CONV_WGRAD_SPEC, "depthwise_wgrad", depthwise_wgrad_kernel,
    {"BLOCK_P": [16, 32, 64, 128, 256], "BLOCK_C": [8, 16, 32, 64, 128], "SPLIT": [1, 2, 4, 8, 16, 32, 64],
     "num_warps": [1, 2, 4, 8]},
    (_wgrad_threads_fit, _wgrad_fits_problem), _wgrad_default_config, _wgrad_launch, _wgrad_grid,
    tuple(problem | {"bias": True} for problem in BACKWARD_EXAMPLE_PROBLEMS))
