"""What the three conv kernels share about their tiles: the @jit helpers that address a tile's
operands, the tile parameter space, and the constraints and default-config heuristic over it.

The constraints were derived from the kernels' sm_80 and sm_90 code compiled as the launch
specialises it (16-byte alignment, unit strides, constexpr geometry; `workbench inspect`): the
operands reach shared memory by cp.async without passing through registers, so the fp32
accumulator is what decides register pressure. Channel counts below tl.dot's minimum of 16 are
handled by masking the K tile. Offsets are computed in 64 bits only when some tensor needs it
(INT64; conv_geometry.needs_int64).
"""

from __future__ import annotations

from typing import Callable

import triton.language as tl

from triton_workbench.kernels import hardware
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.gemm import fits_shared_memory, tile_coordinates
from triton_workbench.kernels.spec import Config, Problem

TILE_PARAMS = {
    "BLOCK_M": [32, 64, 128, 256],
    "BLOCK_N": [16, 32, 64, 128, 256],
    "BLOCK_K": [16, 32, 64, 128],
    "GROUP_M": [1, 8],
    "num_warps": [2, 4, 8],
    "num_stages": [2, 3, 4],
}
Dims = Callable[[Problem], tuple[int, int, int]]  # a problem's GEMM view per group: (rows, columns, depth)
KFloor = Callable[[Problem], int]  # the smallest K tile a problem's kernel can run with


@jit
def tile_offsets(rows, cols, GROUP_M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a rows x cols GEMM view (GROUP_M row tiles walked together): its row and
    column offsets and which of them are in range."""
    pid_m, pid_n = tile_coordinates(rows, cols, GROUP_M, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < rows, offs_n < cols


@jit
def next_block(channel, column, row, channels, COLUMNS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (channel block, tap column, tap row) after this one in a loop over taps and channel blocks:
    channels fastest, then columns, then rows; counters instead of a division per iteration."""
    channel += BLOCK_K
    wrap = channel >= channels
    channel = tl.where(wrap, 0, channel)
    column = tl.where(wrap, column + 1, column)
    row = tl.where(column == COLUMNS, row + 1, row)
    column = tl.where(column == COLUMNS, 0, column)
    return channel, column, row


@jit
def offsets(index, INT64: tl.constexpr):
    """index in the integer type offsets are computed in: int64 when some tensor spans 2**31 elements or more."""
    if INT64:
        index = tl.cast(index, tl.int64)
    return index


@jit
def position(index, H, W, INT64: tl.constexpr):
    """Flat (image, row, column) index over H x W images -> image (in the offset type), row, column."""
    return offsets(index // (H * W), INT64), (index % (H * W)) // W, index % W


@jit
def spatial_offsets(image, h, w, stride_n, stride_h, stride_w, INT64: tl.constexpr):
    """Element offset of (image, h, w) in a tensor with these strides; the caller adds the channel."""
    return image * stride_n + offsets(h, INT64) * stride_h + offsets(w, INT64) * stride_w


def tile_fits_shared_memory(config: Config, problem: Problem) -> bool:
    """The GEMM's estimate (pipelined A and B tiles, or the fp32 epilogue tile) fits sm_80 and sm_90."""
    return fits_shared_memory(config, {"dtype": problem["dtype"]})


def _accumulator_fits(config: Config, problem: Problem) -> bool:
    """At most 64 fp32 accumulator values per thread: 128x128 on 8 warps and 128x64 on 4 compile with
    138-179 registers and no spill for sm_90 and sm_80 (ResNet-18's layers, fp16, channels_last)."""
    return config["BLOCK_M"] * config["BLOCK_N"] <= 64 * 32 * config["num_warps"]


def _gathers_fit(config: Config, problem: Problem) -> bool:
    """NCHW tensors are gathered element by element through registers (channels are not contiguous):
    there at most 32 gathered operand values per thread."""
    if problem["layout"] == "nhwc":
        return True
    operands = config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]
    return operands <= 32 * 32 * config["num_warps"]


def _uses_its_warps(config: Config, problem: Problem) -> bool:
    """Every warp gets at least a 16x16 piece of the tile."""
    return config["BLOCK_M"] * config["BLOCK_N"] >= 256 * config["num_warps"]


def tile_constraints(dims: Dims, k_floor: KFloor | None = None) -> tuple:
    """The constraints of a conv spec whose GEMM view per group is `dims(problem)`; `k_floor`, if given, is
    the smallest BLOCK_K its kernel can run a problem with."""

    def fits_problem(config: Config, problem: Problem) -> bool:
        """No tile extends more than one power of two beyond the problem (16 and 32 stay allowed)."""
        rows, cols, depth = dims(problem)
        return (config["BLOCK_M"] <= max(32, next_power_of_2(rows))
                and config["BLOCK_N"] <= max(16, next_power_of_2(cols))
                and config["BLOCK_K"] <= max(16, next_power_of_2(max(depth, k_floor(problem) if k_floor else 0))))

    def k_tile_fits(config: Config, problem: Problem) -> bool:
        return k_floor is None or config["BLOCK_K"] >= k_floor(problem)

    return (tile_fits_shared_memory, _accumulator_fits, _gathers_fit, _uses_its_warps, fits_problem, k_tile_fits)


def tile_default_config(dims: Dims, k_floor: KFloor | None = None, programs_per_tile: Callable[[Problem], int] | None
                        = None, finish: Callable[[Problem, Config], Config] | None = None) -> Callable[[Problem], Config]:
    """128-row tiles with up to 64 values of K (at least `k_floor`), as many columns as there are up to 128,
    shrunk until the grid (`programs_per_tile` programs per tile: the groups, unless given) fills an H100's
    SMs once; 8 warps for 128x128, 4 stages where they fit; then `finish`, if given."""

    def default_config(problem: Problem) -> Config:
        rows, cols, depth = dims(problem)
        floor = k_floor(problem) if k_floor else 0
        block_k = max(16, next_power_of_2(floor)) if floor else min(64, max(16, next_power_of_2(depth)))
        config = {"BLOCK_M": 128, "BLOCK_N": min(128, max(16, next_power_of_2(cols))), "BLOCK_K": block_k,
                  "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
        per_tile = programs_per_tile(problem) if programs_per_tile else problem["groups"]
        while (cdiv(rows, config["BLOCK_M"]) * cdiv(cols, config["BLOCK_N"]) * per_tile
               < hardware.H100_SXM.sm_count and max(config["BLOCK_M"], config["BLOCK_N"]) > 64):
            config["BLOCK_N" if config["BLOCK_N"] > 64 else "BLOCK_M"] //= 2
        config["BLOCK_M"] = min(config["BLOCK_M"], max(32, next_power_of_2(rows)))
        tile = config["BLOCK_M"] * config["BLOCK_N"]
        config["num_warps"] = 8 if tile > 64 * 32 * 4 else 4 if tile >= 256 * 4 else 2
        while not _gathers_fit(config, problem) and config["BLOCK_K"] > max(16, floor):
            config["BLOCK_K"] //= 2
        while not tile_fits_shared_memory(config, problem) and config["num_stages"] > 2:
            config["num_stages"] -= 1
        return finish(problem, config) if finish is not None else config

    return default_config
