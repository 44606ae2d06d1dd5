"""Direct depthwise conv2d forward (groups == C_in, C_out = multiplier * C_in) with a fused bias (+ residual) +
activation epilogue: its kernel, launcher and KernelSpec, and the tile space the depthwise kernels share.

    y[n, co, oh, ow] = act(sum over (kh, kw) of x[n, co // M, oh*s - p + kh*d, ow*s - p + kw*d] * w[co, 0, kh, kw]
                           + bias[co] + r[n, co, oh, ow])

A depthwise conv does KH*KW multiply-adds per output value: memory-bound, nothing for tensor cores. So it is not
an implicit GEMM (whose reduction would be KH*KW values long, with one output column per group) but a direct
stencil: a program owns a BLOCK_H x BLOCK_W tile of one image's output positions and BLOCK_C channels, and
applies every tap (unrolled) to fp32 accumulators in registers. In channels_last each tap's load is, per
position, a run of BLOCK_C contiguous channels (vectorised); the taps' overlapping windows (the tile and its
halo) are re-read from L1, not from memory. The weight is read taps-major ([KH, KW, C_out], a copy of
C_out*KH*KW values) so that a tap's BLOCK_C weights are contiguous too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import activation_code, apply, parameter
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
from triton_workbench.kernels.conv_geometry import (ConvGeometry, conv_problem, empty_in_layout_of, make_geometry,
                                                    needs_int64, output_hw, problem_of)
from triton_workbench.kernels.conv_tiles import offsets, spatial_offsets
from triton_workbench.kernels.spec import Config, KernelSpec, Problem

# per dtype: a MobileNetV2 3x3 depthwise conv at 56x56 (144 channels), batch 32, bias + ReLU, channels_last
EXAMPLE_PROBLEMS = tuple(
    conv_problem(32, 144, 56, 56, 144, 3, 3, make_geometry((3, 3), 1, 1, 1, 144), dtype, "nhwc", "relu", True)
    | ({"tf32": True} if dtype == "fp32" else {})
    for dtype in ("fp32", "fp16", "bf16"))
SPATIAL_PARAMS = {"BLOCK_H": [1, 2, 4, 8], "BLOCK_W": [4, 8, 16, 32], "BLOCK_C": [8, 16, 32, 64, 128],
                  "num_warps": [1, 2, 4, 8]}
Dims = Callable[[Problem], tuple[int, int, int]]  # (rows, columns, channels) a kernel's programs tile


def is_depthwise(c_in: int, c_out: int, groups: int) -> bool:
    """Whether a conv2d is one the depthwise kernels run: a group per input channel (more than one: a
    single-channel conv stays on the implicit GEMM), whole multipliers."""
    return groups == c_in > 1 and c_out % c_in == 0


def _depthwise(problem: Problem) -> str:
    """A problem rule of the depthwise specs: one group per input channel."""
    if problem["groups"] != problem["c_in"]:
        return f"groups ({problem['groups']}) must equal c_in ({problem['c_in']}): the kernel is depthwise"
    return ""


def depthwise_spec(base: KernelSpec, name: str, kernel: Any, params: dict, constraints: tuple,
                   default_config: Callable[[Problem], Config], launch: Callable, grid: Callable,
                   examples: tuple) -> KernelSpec:
    """The conv spec `base` (its problem schema, inputs, reference, baseline, FLOP and byte counts) with a
    depthwise kernel, its space, default, launch and grid, and problems restricted to depthwise ones."""
    return dataclasses.replace(
        base, name=name, kernel=kernel, params=params, constraints=constraints, default_config=default_config,
        launch=launch, grid=grid, example_problems=examples, problem_rules=(*base.problem_rules, _depthwise))


def holds_tile(values: int, num_warps: int) -> bool:
    """Every thread holds at least one and at most 64 of a tile's fp32 accumulators (registers only: the
    depthwise kernels use no shared memory)."""
    return 32 * num_warps <= values <= 64 * 32 * num_warps


def spatial_constraints(dims: Dims) -> tuple[Callable[[Config, Problem], bool], ...]:
    """The constraints of a spec whose programs tile `dims(problem)` = (rows, columns, channels)."""

    def threads_fit(config: Config, problem: Problem) -> bool:
        return holds_tile(config["BLOCK_H"] * config["BLOCK_W"] * config["BLOCK_C"], config["num_warps"])

    def fits_problem(config: Config, problem: Problem) -> bool:
        """No block extends more than one power of two beyond the problem (4 columns, 8 channels stay allowed)."""
        rows, cols, channels = dims(problem)
        return (config["BLOCK_H"] <= next_power_of_2(rows)
                and config["BLOCK_W"] <= max(4, next_power_of_2(cols))
                and config["BLOCK_C"] <= max(8, next_power_of_2(channels)))

    return threads_fit, fits_problem


def spatial_default_config(dims: Dims) -> Callable[[Problem], Config]:
    """4 x 8 positions x 64 channels and a warp per 512 tile values in channels_last (whole 16-byte channel
    runs per thread); 4 x 32 positions x 8 channels and a warp per 256 values in NCHW (rows contiguous there;
    its taps' loads are scalar, and at 16 values a thread they take ~180-220 registers for sm_90, at 8 ~100);
    shrunk to the problem, up to 4 warps."""

    def default_config(problem: Problem) -> Config:
        rows, cols, channels = dims(problem)
        nhwc = problem["layout"] == "nhwc"
        config = {"BLOCK_H": min(4, next_power_of_2(rows)),
                  "BLOCK_W": min(8 if nhwc else 32, max(4, next_power_of_2(cols))),
                  "BLOCK_C": min(64 if nhwc else 8, max(8, next_power_of_2(channels)))}
        values = config["BLOCK_H"] * config["BLOCK_W"] * config["BLOCK_C"]
        config["num_warps"] = max(1, min(4, values // (512 if nhwc else 256)))
        return config

    return default_config


def spatial_grid(dims: Dims) -> Callable[[Problem, Config], tuple[int, ...]]:
    def grid(problem: Problem, config: Config) -> tuple[int, ...]:
        rows, cols, channels = dims(problem)
        tiles = cdiv(rows, config["BLOCK_H"]) * cdiv(cols, config["BLOCK_W"])
        return problem["n"] * tiles, cdiv(channels, config["BLOCK_C"])

    return grid


@jit
def spatial_tile(rows, cols, INT64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's BLOCK_H x BLOCK_W tile of one image's rows x cols positions (program axis 0 walks images,
    then tile rows, then tile columns), flattened: image (in the offset type), row, column, in range."""
    tiles_w = tl.cdiv(cols, BLOCK_W)
    tiles = tl.cdiv(rows, BLOCK_H) * tiles_w
    pid = tl.program_id(0)
    tile = pid % tiles
    index = tl.arange(0, BLOCK_H * BLOCK_W)
    row = (tile // tiles_w) * BLOCK_H + index // BLOCK_W
    col = (tile % tiles_w) * BLOCK_W + index % BLOCK_W
    return offsets(pid // tiles, INT64), row, col, (row < rows) & (col < cols)


def taps_major(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise weight [C_out, 1, KH, KW] as [KH, KW, C_out], contiguous: a tap's channels side by side."""
    return weight[:, 0].permute(1, 2, 0).contiguous()


@jit
def depthwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, r_ptr, y_ptr, z_ptr,
    H, W, Ho, Wo, C_out, negative_slope,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr, MULT: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_PREACT: tl.constexpr,
    INT64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act(depthwise conv(x, w) + bias + r) for one (output tile, channel block); w is taps-major."""
    image, oh, ow, p_ok = spatial_tile(Ho, Wo, INT64, BLOCK_H, BLOCK_W)
    c_out = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_out < C_out
    x_cols = x_ptr + image * sxn + offsets(c_out // MULT, INT64) * sxc
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = p_ok & (ih.to(tl.uint32, bitcast=True) < H)  # padding rows wrap to large unsigned values
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            ok = row_ok & (iw.to(tl.uint32, bitcast=True) < W)
            x_rows = offsets(ih, INT64) * sxh + offsets(iw, INT64) * sxw
            x = tl.load(x_cols[None, :] + x_rows[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + (kh * KW + kw) * C_out + c_out, mask=c_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_out, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = spatial_offsets(image, oh, ow, syn, syh, syw, INT64)[:, None] + offsets(c_out, INT64)[None, :] * syc
    out_mask = p_ok[:, None] & c_ok[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + y_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if SAVE_PREACT:
        tl.store(z_ptr + y_offsets, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(y_ptr + y_offsets, apply(acc, ACTIVATION, negative_slope).to(y_ptr.dtype.element_ty), mask=out_mask)


def depthwise_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
    activation_name: str | None = None, negative_slope: float | None = None,
    keep_pre: bool = False, config: Config | None = None, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`conv_fwd.conv2d_forward` for a depthwise conv (`is_depthwise`): (act(conv2d(x, weight) + bias +
    residual), the pre-activation if keep_pre and there is an activation, else None), in x's memory format.
    The residual is shaped and laid out as the output. Arguments are assumed validated."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = geometry.output_hw(h, w, kh, kw)
    problem = problem_of(x, weight.shape, geometry, activation_name, bias is not None)
    config = config if config is not None else tuned.config_for(DEPTHWISE_FWD_SPEC, problem)
    y = empty_in_layout_of(x, (n, c_out, ho, wo))
    pre = empty_in_layout_of(x, y.shape) if keep_pre and activation_name is not None else None
    if y.numel() == 0:
        return y, pre
    runtime.announce()
    depthwise_fwd_kernel[DEPTHWISE_FWD_SPEC.grid(problem, config)](
        x, taps_major(weight), bias.contiguous() if bias is not None else y,
        residual if residual is not None else y, y, pre if pre is not None else y,
        h, w, ho, wo, c_out, parameter(activation_name, negative_slope), *x.stride(), *y.stride(), *geometry.constexprs(kh, kw),
        c_out // c_in, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        ACTIVATION=activation_code(activation_name), SAVE_PREACT=pre is not None, INT64=needs_int64(x, weight, y),
        BLOCK_H=config["BLOCK_H"], BLOCK_W=config["BLOCK_W"], BLOCK_C=config["BLOCK_C"],
        num_warps=config["num_warps"], **runtime.LAUNCH_OPTIONS,
    )
    return y, pre


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return depthwise_forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["geometry"], inputs["activation"],
                             config=config)[0]


def _output_dims(problem: Problem) -> tuple[int, int, int]:
    return (*output_hw(problem), problem["c_out"])


DEPTHWISE_FWD_SPEC = depthwise_spec(
    CONV_FWD_SPEC, "depthwise_fwd", depthwise_fwd_kernel, SPATIAL_PARAMS, spatial_constraints(_output_dims),
    spatial_default_config(_output_dims), _launch, spatial_grid(_output_dims), EXAMPLE_PROBLEMS)
