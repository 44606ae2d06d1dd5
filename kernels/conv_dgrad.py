"""Implicit-GEMM conv2d input gradient (dgrad) by stride phases: its kernel, launcher and KernelSpec.

    dx[(n,ih,iw), ci] = sum over (kh, kw, co) of dz[n, co, oh, ow] * w[co, ci, kh, kw],
    oh = (ih + pad - kh*dil) / stride, a whole number in range

Only the taps with kh*dil = ih + pad (mod stride) reach an input row, and which those are depends on
the row's phase ih mod stride alone. So the input is split into its stride x stride phases, and
each phase is a stride-1 correlation of dz with that phase's taps: no tensor-core work is spent on
the zeros a strided forward leaves between outputs, and no tap is tested per row. All phases run
in one launch, a grid dimension picking the phase, each phase's code specialised to its taps.
dz = dy * act'(z) comes in formed (`ops` forms it once for dgrad and wgrad). Where x is a fused BN
chain's output (`batch_norm.ChainSums`), the epilogue also forms that chain's backward sums from the
dx it stores, merged in the launch (`_chain_sums`), so that the chain's backward skips its sums pass.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

from triton_workbench.kernels import arrival, runtime, tuned
from triton_workbench.kernels.arrival import last_to_arrive
from triton_workbench.kernels.batch_norm import ChainSums, merge_sums, pointer_or, store_sums, sum_rows, tile_sums
from triton_workbench.kernels.gemm import tile_coordinates
from triton_workbench.kernels.host_math import cdiv
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, dot_precision, empty_in_layout_of,
                                                    gemm_dims_dgrad, memory_format_of, needs_int64, problem_geometry,
                                                    problem_of)
from triton_workbench.kernels.conv_spec import (BACKWARD_EXAMPLE_PROBLEMS, BACKWARD_PROBLEM_RULES, PROBLEM_SCHEMA,
                                                SHAPE_KEYS,
                                                elements, flops, make_inputs, torch_backward)
from triton_workbench.kernels.conv_tiles import (TILE_PARAMS, next_block, offsets, position, spatial_offsets,
                                                 tile_constraints, tile_default_config, tile_offsets)
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@dataclass(frozen=True)
class PhaseTaps:
    """The taps of one kernel dimension that reach the input positions of one stride phase.

    phase: ih mod stride; first: the first such tap kh; count: how many (kh = first + t * step, t < count);
    step: stride / gcd(stride, dilation); base: oh - qh at t = 0 (ih = phase + stride * qh), and oh
    falls by dilation / gcd(stride, dilation) per further tap; rows: how many ih have this phase.
    """

    phase: int
    first: int
    count: int
    step: int
    base: int
    oh_step: int
    rows: int


def phase_taps(size: int, kernel: int, stride: int, pad: int, dilation: int) -> tuple[PhaseTaps, ...]:
    """PhaseTaps of every phase of one dimension (input size, kernel size, stride, leading pad, dilation)."""
    g = math.gcd(stride, dilation)
    step = stride // g
    phases = []
    for phase in range(stride):
        first = next((kh for kh in range(step) if (phase + pad - kh * dilation) % stride == 0), kernel)
        count = max(0, -(-(kernel - first) // step)) if first < kernel else 0
        base = (phase + pad - first * dilation) // stride if count else 0
        phases.append(PhaseTaps(phase, first, count, step, base, dilation // g, max(0, -(-(size - phase) // stride))))
    return tuple(phases)


@jit
def _phase_dgrad(
    dz_ptr, w_ptr, dx_ptr, add_ptr, N, H, W, Ho, Wo, C_in_g, C_out_g, GROUP_M,
    sdzn, sdzc, sdzh, sdzw, swo, swi, swh, sww, sdxn, sdxc, sdxh, sdxw,
    y_ptr, r_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
    part_ptr, sums_ptr, counter_ptr, SUM_GROUPS, negative_slope,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PHASES_H: tl.constexpr, PHASES_W: tl.constexpr,
    I: tl.constexpr, J: tl.constexpr, ADD: tl.constexpr, SUMS: tl.constexpr, SUM_GROUP: tl.constexpr,
    AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx of the stride phase PHASES_H[I] x PHASES_W[J] (each a `PhaseTaps` as a tuple) for this program's
    tile, a stride-1 correlation of dz with the phase's taps, plus with ADD the tile of `add`, and with SUMS
    the backward sums of the BN chain whose output x is (`_chain_sums`); programs past the phase's tiles do
    nothing. (The phase is indexed here rather than passed: Triton 3.6, PyTorch 2.11's,
    cannot pass a tuple element of a constexpr tuple to a jit function.)"""
    PHASE_H, FIRST_KH, COUNT_H, STEP_H, BASE_H, OH_STEP = PHASES_H[I]
    PHASE_W, FIRST_KW, COUNT_W, STEP_W, BASE_W, OW_STEP = PHASES_W[J]
    Hq = _phase_size(H, PHASE_H, STRIDE_H)  # the input rows and columns of this phase
    Wq = _phase_size(W, PHASE_W, STRIDE_W)
    M = N * Hq * Wq
    if tl.program_id(0) < tl.cdiv(M, BLOCK_M) * tl.cdiv(C_in_g, BLOCK_N):
        group = tl.program_id(1)
        offs_m, offs_n, m_ok, n_ok = tile_offsets(M, C_in_g, GROUP_M, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        image, qh, qw = position(offs_m, Hq, Wq, INT64)
        oh0 = tl.where(m_ok, qh + BASE_H, -1 - OH_STEP * COUNT_H)  # rows past M fail every bounds check
        ow0 = qw + BASE_W
        c_out0 = offsets(group * C_out_g, INT64)
        dz_rows = dz_ptr + image * sdzn + c_out0 * sdzc + offsets(oh0, INT64) * sdzh + offsets(ow0, INT64) * sdzw
        w_cols = w_ptr + c_out0 * swo + offsets(offs_n, INT64) * swi + (FIRST_KH * swh + FIRST_KW * sww)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        channel = 0
        th = 0
        tw = 0
        for _ in range(0, COUNT_H * COUNT_W * tl.cdiv(C_out_g, BLOCK_K)):
            oh = oh0 - th * OH_STEP
            ow = ow0 - tw * OW_STEP
            row_ok = (oh.to(tl.uint32, bitcast=True) < Ho) & (ow.to(tl.uint32, bitcast=True) < Wo)
            channels = channel + offs_k
            a_mask = row_ok[:, None]
            b_mask = n_ok[None, :]
            if not EVEN_K:
                a_mask = a_mask & (channels < C_out_g)[None, :]
                b_mask = b_mask & (channels < C_out_g)[:, None]
            a_ptrs = dz_rows[:, None] + channels[None, :] * sdzc
            if COUNT_H * COUNT_W > 1:  # (unit tap strides would hide the rows' 16-byte alignment, as in the forward)
                a_ptrs -= (th * OH_STEP) * sdzh + (tw * OW_STEP) * sdzw
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = w_cols[None, :] + channels[:, None] * swo
            if COUNT_H * COUNT_W > 1:
                b_ptrs += (th * STEP_H) * swh + (tw * STEP_W) * sww
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            channel, tw, th = next_block(channel, tw, th, C_out_g, COUNT_W, BLOCK_K)

        ih = PHASE_H + STRIDE_H * qh
        iw = PHASE_W + STRIDE_W * qw
        dx_offsets = spatial_offsets(image, ih, iw, sdxn, sdxh, sdxw, INT64)[:, None] + \
            offsets(group * C_in_g + offs_n, INT64)[None, :] * sdxc
        dx_ok = m_ok[:, None] & n_ok[None, :]
        if ADD:  # another reader's gradient of x, laid out as dx
            acc += tl.load(add_ptr + dx_offsets, mask=dx_ok, other=0.0).to(tl.float32)
        dx = acc.to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + dx_offsets, dx, mask=dx_ok)
        if SUMS:
            _chain_sums(dx.to(tl.float32), dx_offsets, dx_ok, group * C_in_g + offs_n, n_ok, M, N, H, W, C_in_g,
                        GROUP_M, y_ptr, r_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr,
                        r_weight_ptr, r_bias_ptr, part_ptr, sums_ptr, counter_ptr, SUM_GROUPS, negative_slope,
                        STRIDE_H, STRIDE_W, PHASES_H, PHASES_W, I, J, SUMS, SUM_GROUP, AFFINE, RESIDUAL, R_NORM,
                        R_AFFINE, ACTIVATION, BLOCK_M, BLOCK_N)


@jit
def _phase_size(size, PHASE: tl.constexpr, STRIDE: tl.constexpr):
    """The positions ih < size with ih mod STRIDE = PHASE."""
    return (size - PHASE + STRIDE - 1) // STRIDE


@jit
def _chain_sums(dx, dx_offsets, dx_ok, channels, c_ok, M, N, H, W, C_in_g, GROUP_M,
                y_ptr, r_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr,
                r_bias_ptr, part_ptr, sums_ptr, counter_ptr, SUM_GROUPS, negative_slope,
                STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PHASES_H: tl.constexpr, PHASES_W: tl.constexpr,
                I: tl.constexpr, J: tl.constexpr, SUMS: tl.constexpr, SUM_GROUP: tl.constexpr,
                AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, R_NORM: tl.constexpr, R_AFFINE: tl.constexpr,
                ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The BN chain's backward sums (`batch_norm.tile_sums`) of this tile of dx (fp32, as stored: what the BN's
    elementwise backward reads), merged in the launch as the forward's statistics are: each tile writes a row of
    a sums table part[3, rows, C] -- rows: every phase's tiles, then every phase's groups of SUM_GROUP tiles --,
    the last tile of a group to finish sums the group's rows into its group row, and the last group of a channel
    block, every group row into sums[3, C], in (phase, group) order: deterministic."""
    PHASES: tl.constexpr = len(PHASES_H) * len(PHASES_W)
    tiles_m = tl.num_programs(0) // tl.cdiv(C_in_g, BLOCK_N)  # the first (largest) phase's row tiles
    groups_m = tl.cdiv(tiles_m, SUM_GROUP)
    rows = PHASES * (tiles_m + groups_m)
    C = C_in_g * tl.num_programs(1)
    phase = I * len(PHASES_W) + J
    pid_m, pid_n = tile_coordinates(M, C_in_g, GROUP_M, BLOCK_M, BLOCK_N)
    sum_dz, sum_dz_x, sum_dz_r = tile_sums(dx, y_ptr, r_ptr, dx_offsets, dx_ok, channels, c_ok, mean_ptr, invstd_ptr,
                                           weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
                                           negative_slope, AFFINE, RESIDUAL, R_NORM, R_AFFINE, ACTIVATION)
    store_sums(part_ptr, phase * tiles_m + pid_m, rows, C, channels, c_ok, sum_dz, sum_dz_x, sum_dz_r, R_NORM)
    blocks = tl.cdiv(C_in_g, BLOCK_N) * tl.num_programs(1)
    block = tl.program_id(1) * tl.cdiv(C_in_g, BLOCK_N) + pid_n
    sum_group = pid_m // SUM_GROUP
    group_row = PHASES * tiles_m + phase * groups_m + sum_group
    tiles = tl.minimum(SUM_GROUP, tl.cdiv(M, BLOCK_M) - sum_group * SUM_GROUP)
    if last_to_arrive(counter_ptr + blocks + (phase * groups_m + sum_group) * blocks + block, tiles):
        merge_sums(part_ptr, rows, phase * tiles_m + sum_group * SUM_GROUP, tiles, part_ptr, group_row, rows, C,
                   channels, c_ok, SUMS)
        if last_to_arrive(counter_ptr + block, SUM_GROUPS):
            for k in tl.static_range(SUMS):
                total = tl.zeros(channels.shape, dtype=tl.float32)
                for i in tl.static_range(len(PHASES_H)):
                    for j in tl.static_range(len(PHASES_W)):
                        phase_rows = N * _phase_size(H, PHASES_H[i][0], STRIDE_H) * \
                            _phase_size(W, PHASES_W[j][0], STRIDE_W)
                        first = PHASES * tiles_m + (i * len(PHASES_W) + j) * groups_m
                        total += sum_rows(part_ptr + tl.cast(k * rows, tl.int64) * C, first,
                                          tl.cdiv(tl.cdiv(phase_rows, BLOCK_M), SUM_GROUP), C, channels, c_ok)
                tl.store(sums_ptr + k * C + channels, total, mask=c_ok)


@jit
def conv2d_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr, add_ptr,
    N, H, W, Ho, Wo, C_in_g, C_out_g, GROUP_M,
    sdzn, sdzc, sdzh, sdzw, swo, swi, swh, sww, sdxn, sdxc, sdxh, sdxw,
    y_ptr, r_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, r_bias_ptr,
    part_ptr, sums_ptr, counter_ptr, SUM_GROUPS, negative_slope,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PHASES_H: tl.constexpr, PHASES_W: tl.constexpr,
    ADD: tl.constexpr, SUMS: tl.constexpr, SUM_GROUP: tl.constexpr, AFFINE: tl.constexpr, RESIDUAL: tl.constexpr,
    R_NORM: tl.constexpr, R_AFFINE: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx for one (input-position tile, input-channel tile, group, stride phase): program_id(2) picks the
    phase (PHASES_H x PHASES_W, each phase's `PhaseTaps` as a tuple), whose code is specialised to its
    taps at compile time, one branch per phase. With SUMS (2 or 3), also the backward sums of the BN chain
    whose output x is (its y, residual and norms: `batch_norm.ChainSums`) into sums[SUMS, C]."""
    for i in tl.static_range(len(PHASES_H)):
        for j in tl.static_range(len(PHASES_W)):
            if tl.program_id(2) == i * len(PHASES_W) + j:
                _phase_dgrad(dz_ptr, w_ptr, dx_ptr, add_ptr, N, H, W, Ho, Wo, C_in_g, C_out_g, GROUP_M,
                             sdzn, sdzc, sdzh, sdzw, swo, swi, swh, sww, sdxn, sdxc, sdxh, sdxw,
                             y_ptr, r_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, r_mean_ptr, r_invstd_ptr,
                             r_weight_ptr, r_bias_ptr, part_ptr, sums_ptr, counter_ptr, SUM_GROUPS, negative_slope,
                             STRIDE_H, STRIDE_W, PHASES_H, PHASES_W, i, j, ADD, SUMS, SUM_GROUP, AFFINE, RESIDUAL,
                             R_NORM, R_AFFINE, ACTIVATION, DOT_PRECISION, INT64, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)


def conv2d_input_grad(dz: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry,
                      config: Config | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """grad_input of conv2d(x, weight) for the output gradient dz [+ `add`, x's gradient from its other readers,
    shaped as x], shaped, typed and laid out like x (only its metadata is read). One launch: every stride
    phase's programs in it."""
    return _input_grad(dz, weight, x, geometry, config, add, None)[0]


def conv2d_input_grad_with_sums(dz: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry,
                                chain: ChainSums, config: Config | None = None, add: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(`conv2d_input_grad`, the backward sums [3, C] fp32 of the BN chain whose output x is, `chain`, which
    must be laid out as dx, i.e. as x where x is dense): the chain's backward then runs without its sums launch.
    One launch; no sums (None) where nothing launches (an empty x or dz): the chain forms them itself."""
    return _input_grad(dz, weight, x, geometry, config, add, chain)


def _input_grad(dz: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry,
                config: Config | None, add: torch.Tensor | None, chain: ChainSums | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = dz.shape[2:]
    problem = problem_of(x, weight.shape, geometry, None, False)
    config = config if config is not None else tuned.config_for(CONV_DGRAD_SPEC, problem)
    dx = empty_in_layout_of(x, (n, c_in, h, w))
    if chain is not None and not chain.fits(dx):
        raise ValueError(f"the BN chain's tensors must have dx's shape {tuple(dx.shape)} and strides {dx.stride()}")
    if dx.numel() == 0:
        return dx, None
    if add is not None:
        add = add.contiguous(memory_format=memory_format_of(dx))
    if dz.numel() == 0:
        return (dx.copy_(add) if add is not None else dx.zero_()), None
    sums = torch.empty((3, c_in), device=x.device, dtype=torch.float32) if chain else None
    if channels_last(x):
        weight = weight.contiguous(memory_format=torch.channels_last)  # input channels contiguous, as dx's
    runtime.announce()
    phases_h, phases_w = _phases(problem)
    grid = _grid(problem, config)
    part, sum_groups, counters = dx, 0, 0
    if chain is not None:  # the sums table: every phase's row tiles (the grid's), then every phase's groups of them
        tiles_m = grid[0] // cdiv(c_in_g, config["BLOCK_N"])
        groups_m = cdiv(tiles_m, SUM_GROUP)
        part = torch.empty((3, len(phases_h) * len(phases_w) * (tiles_m + groups_m), c_in), device=x.device,
                           dtype=torch.float32)
        sum_groups = sum(cdiv(cdiv(n * taps_h.rows * taps_w.rows, config["BLOCK_M"]), SUM_GROUP)
                         for taps_h in phases_h for taps_w in phases_w)
        # per channel block: a counter for its groups, one per phase and group for its tiles
        counters = cdiv(c_in_g, config["BLOCK_N"]) * geometry.groups * (1 + len(phases_h) * len(phases_w) * groups_m)
    with arrival.counters(x.device, counters) if chain else nullcontext(dx) as counter:
        conv2d_dgrad_kernel[grid](
            dz, weight, dx, add if add is not None else dx,
            n, h, w, ho, wo, c_in_g, c_out // geometry.groups, config["GROUP_M"],
            *dz.stride(), *weight.stride(), *dx.stride(), *(chain.arguments() if chain else (dx,) * 10),
            part, pointer_or(sums, dx), counter, sum_groups, float(chain.negative_slope) if chain else 0.0,
            geometry.stride_h, geometry.stride_w,
            tuple(_constants(t) for t in phases_h), tuple(_constants(t) for t in phases_w), ADD=add is not None,
            SUMS=chain.count() if chain else 0, SUM_GROUP=SUM_GROUP, **(chain.constexprs() if chain else _NO_CHAIN),
            DOT_PRECISION=dot_precision(weight.dtype), INT64=needs_int64(dz, weight, dx),
            EVEN_K=(c_out // geometry.groups) % config["BLOCK_K"] == 0,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"], **runtime.LAUNCH_OPTIONS,
        )
    return dx, sums


_NO_CHAIN = {"AFFINE": False, "RESIDUAL": False, "R_NORM": False, "R_AFFINE": False, "ACTIVATION": 0}
SUM_GROUP = 32  # row tiles whose chain sums the last of them to finish merges into one group row


def _constants(taps: PhaseTaps) -> tuple[int, ...]:
    """A phase's taps as the kernel's constexpr tuple (rows aside: the kernel derives them from H, W)."""
    return taps.phase, taps.first, taps.count, taps.step, taps.base, taps.oh_step


def _phases(problem: Problem) -> tuple[list[PhaseTaps], list[PhaseTaps]]:
    """The height and width phases of the problem's input that have rows (the launch's phases: their product)."""
    g = problem_geometry(problem)
    heights = phase_taps(problem["h"], problem["kh"], g.stride_h, g.pad_top, g.dilation_h)
    widths = phase_taps(problem["w"], problem["kw"], g.stride_w, g.pad_left, g.dilation_w)
    return [t for t in heights if t.rows], [t for t in widths if t.rows]


def stride_phases(problem: Problem) -> list[tuple[PhaseTaps, PhaseTaps]]:
    """(height taps, width taps) of every stride phase of the problem's input that has rows."""
    heights, widths = _phases(problem)
    return [(taps_h, taps_w) for taps_h in heights for taps_w in widths]


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    """Programs for the phase with the most rows (the first), per group, per phase: others' extra ones idle."""
    _, cols, _ = gemm_dims_dgrad(problem)
    phases_h, phases_w = _phases(problem)
    rows = problem["n"] * phases_h[0].rows * phases_w[0].rows if phases_h and phases_w else 0
    return (cdiv(rows, config["BLOCK_M"]) * cdiv(cols, config["BLOCK_N"]), problem["groups"],
            len(phases_h) * len(phases_w))


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    return (e["y"] + e["weight"] + e["x"]) * DTYPES[problem["dtype"]].itemsize


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_input_grad(inputs["grad_output"], inputs["weight"], inputs["x"], inputs["geometry"], config=config)


CONV_DGRAD_SPEC = KernelSpec(
    name="conv_dgrad",
    kernel=conv2d_dgrad_kernel,
    params=TILE_PARAMS,
    constraints=tile_constraints(gemm_dims_dgrad),
    default_config=tile_default_config(gemm_dims_dgrad),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_backward(inputs, "x", torch.float64),
    flops=flops,
    bytes=_bytes,
    grid=_grid,
    baseline=lambda inputs: torch_backward(inputs, "x"),
    example_problems=BACKWARD_EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
    problem_schema=PROBLEM_SCHEMA,
    problem_rules=BACKWARD_PROBLEM_RULES,
)
