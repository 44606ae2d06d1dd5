"""What the three conv kernels share about their tiles: the @jit helpers that address a tile's
operands, the tile parameter space, and the constraints and default-config heuristic over it.

Channel counts below tl.dot's minimum of 16 are handled by masking the K tile. Offsets are
computed in 64 bits only when some tensor needs it (INT64; conv_geometry.needs_int64).
"""

from __future__ import annotations

from typing import Callable

import triton
import triton.language as tl

from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import derivative
from triton_workbench.kernels.gemm import fits_shared_memory
from triton_workbench.kernels.spec import Config, Problem

TILE_PARAMS = {
    "BLOCK_M": [32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "BLOCK_K": [16, 32, 64],
    "GROUP_M": [1, 8],
    "num_warps": [2, 4, 8],
    "num_stages": [2, 3, 4],
}


@jit
def offsets(index, INT64: tl.constexpr):
    """index in the integer type offsets are computed in: int64 when some tensor spans 2**31 elements or more."""
    if INT64:
        index = index.to(tl.int64)
    return index


@jit
def position(index, H, W, INT64: tl.constexpr):
    """Flat (image, row, column) index over H x W images -> image (in the offset type), row, column."""
    return offsets(index // (H * W), INT64), (index % (H * W)) // W, index % W


@jit
def spatial_offsets(image, h, w, stride_n, stride_h, stride_w, INT64: tl.constexpr):
    """Element offset of (image, h, w) in a tensor with these strides; the caller adds the channel."""
    return image * stride_n + offsets(h, INT64) * stride_h + offsets(w, INT64) * stride_w


@jit
def output_grad(dy_ptr, z_ptr, dy_offsets, z_offsets, mask, negative_slope, ACTIVATION: tl.constexpr):
    """dz = dy * act'(z) in fp32 (z is only read when there is an activation)."""
    grad = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        preact = tl.load(z_ptr + z_offsets, mask=mask, other=0.0).to(tl.float32)
        grad = grad * derivative(preact, ACTIVATION, negative_slope)
    return grad


def _fits_shared_memory(config: Config, problem: Problem, backward: bool) -> bool:
    """The GEMM's estimate (pipelined A and B tiles, or the fp32 epilogue tile) fits sm_80 and sm_90;
    the backward kernels load the pre-activation beside operand A when there is an activation."""
    view = {"dtype": problem["dtype"], "backward": backward, "activation": problem.get("activation")}
    return fits_shared_memory(config, view)


def _fits_registers(config: Config, problem: Problem) -> bool:
    """At most 32 fp32 accumulator values per thread: beside the gathered operands' addresses and masks,
    every config with 64 spilled when the full fp16 forward space was compiled for sm_80/sm_90."""
    return config["BLOCK_M"] * config["BLOCK_N"] <= 32 * 32 * config["num_warps"]


def _fits_operand_registers(config: Config, problem: Problem, backward: bool) -> bool:
    """At most 32 gathered operand elements per thread (A, B and, in the backward with an activation, the
    pre-activation tile beside A): each carries an address and a mask, and beyond 32 the kernels spilled
    when the full default spaces were compiled for sm_80/sm_90."""
    a_tiles = 2 if backward and problem.get("activation") is not None else 1
    operands = config["BLOCK_M"] * config["BLOCK_K"] * a_tiles + config["BLOCK_K"] * config["BLOCK_N"]
    return operands <= 32 * 32 * config["num_warps"]


def _uses_its_warps(config: Config, problem: Problem) -> bool:
    """Every warp gets at least a 16x16 piece of the tile."""
    return config["BLOCK_M"] * config["BLOCK_N"] >= 256 * config["num_warps"]


def constraints(dims: Callable[[Problem], tuple[int, int, int]], backward: bool) -> tuple:
    """The constraints of a conv spec whose GEMM view per group is `dims(problem)` = (rows, columns, depth)."""

    def fits_shared_memory(config: Config, problem: Problem) -> bool:
        return _fits_shared_memory(config, problem, backward)

    def fits_operand_registers(config: Config, problem: Problem) -> bool:
        return _fits_operand_registers(config, problem, backward)

    def fits_problem(config: Config, problem: Problem) -> bool:
        """No tile extends more than one power of two beyond the problem (16 and 32 stay allowed)."""
        rows, cols, depth = dims(problem)
        return (config["BLOCK_M"] <= max(32, triton.next_power_of_2(rows))
                and config["BLOCK_N"] <= max(16, triton.next_power_of_2(cols))
                and config["BLOCK_K"] <= max(16, triton.next_power_of_2(depth)))

    return (fits_shared_memory, _fits_registers, fits_operand_registers, _uses_its_warps, fits_problem)


def default_config(dims: Callable[[Problem], tuple[int, int, int]], backward: bool,
                   finish: Callable[[Problem, Config], Config] | None = None) -> Callable[[Problem], Config]:
    """Tiles as large as the problem warrants (up to 128x64, K up to 32) within the register limits, 3 stages
    if they fit in shared memory."""

    def default_config(problem: Problem) -> Config:
        rows, cols, depth = dims(problem)
        block_m = min(128, max(32, triton.next_power_of_2(rows)))
        block_n = min(64 if rows >= 4 * cols else 128, max(16, triton.next_power_of_2(cols)))
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": min(32, max(16, triton.next_power_of_2(depth))),
                  "GROUP_M": 8, "num_warps": max(2, min(8, block_m * block_n // 1024)), "num_stages": 3}
        # registers: narrower K, then more warps, then a smaller tile
        while not (_fits_operand_registers(config, problem, backward) and _fits_registers(config, problem)):
            if not _fits_operand_registers(config, problem, backward) and config["BLOCK_K"] > 16:
                config["BLOCK_K"] //= 2
            elif config["num_warps"] < 8 and _uses_its_warps(config | {"num_warps": 2 * config["num_warps"]}, problem):
                config["num_warps"] *= 2
            elif config["BLOCK_N"] >= config["BLOCK_M"] and config["BLOCK_N"] > 16:
                config["BLOCK_N"] //= 2
            elif config["BLOCK_M"] > 32:
                config["BLOCK_M"] //= 2
            else:
                break
        while not _fits_shared_memory(config, problem, backward) and config["num_stages"] > 2:
            config["num_stages"] -= 1
        return finish(problem, config) if finish is not None else config

    return default_config
