"""Implicit-GEMM conv2d weight (and bias) gradient (wgrad): its kernel, launcher and KernelSpec.

    dw[co, (ci,kh,kw)] = sum over (n,oh,ow) of dz[n, co, oh, ow] * x[n, ci, ih, iw]

split along (n,oh,ow) into SPLIT_K fp32 partials; grad_bias is the same reduction of dz.
dz = dy * act'(z) is formed on the fly.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from triton_workbench.kernels import hardware, runtime, tuned
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE, activation_code
from triton_workbench.kernels.conv_geometry import (ConvGeometry, channels_last, dot_precision, gemm_dims_wgrad,
                                                    needs_int64, problem_of)
from triton_workbench.kernels.conv_spec import (EXAMPLE_PROBLEMS, SHAPE_KEYS, aot_signature, elements, flops,
                                                make_inputs, torch_backward)
from triton_workbench.kernels.conv_tiles import (constraints, default_config, offsets, output_grad, position,
                                                 spatial_offsets)
from triton_workbench.kernels.gemm import tile_coordinates
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_wgrad_kernel(
    dy_ptr, z_ptr, x_ptr, dw_ptr, db_ptr,
    N, H, W, Ho, Wo, KH, KW, C_in_g, C_out_g, positions_per_split,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, negative_slope, GROUP_M,
    sdyn, sdyc, sdyh, sdyw, szn, szc, szh, szw, sxn, sxc, sxh, sxw,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 partial dw (and db) of one split of the (n,oh,ow) reduction, per (co tile, (ci,kh,kw) tile, group)."""
    group = tl.program_id(1)
    split = tl.program_id(2)
    taps = KH * KW
    cols = C_in_g * taps
    C_out = C_out_g * tl.num_programs(1)
    pid_m, pid_n = tile_coordinates(C_out_g, cols, GROUP_M, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < C_out_g
    n_ok = offs_n < cols
    c_out = offsets(group * C_out_g + offs_m, INT64)
    c_in = offsets(group * C_in_g + offs_n // taps, INT64)
    kh = (offs_n % taps) // KW
    kw = offs_n % KW

    positions = N * Ho * Wo
    start = split * positions_per_split
    end = tl.minimum(positions, start + positions_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < end
        image, oh, ow = position(p, Ho, Wo, INT64)
        mask = m_ok[:, None] & p_ok[None, :]
        grad = output_grad(
            dy_ptr, z_ptr,
            c_out[:, None] * sdyc + spatial_offsets(image, oh, ow, sdyn, sdyh, sdyw, INT64)[None, :],
            c_out[:, None] * szc + spatial_offsets(image, oh, ow, szn, szh, szw, INT64)[None, :],
            mask, negative_slope, ACTIVATION)
        if HAS_BIAS:
            bias_acc += tl.sum(grad, axis=1)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        x_ok = p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offsets = spatial_offsets(image[:, None], ih, iw, sxn, sxh, sxw, INT64) + c_in[None, :] * sxc
        b = tl.load(x_ptr + x_offsets, mask=x_ok, other=0.0)
        acc = tl.dot(grad.to(b.dtype), b, acc, input_precision=DOT_PRECISION)

    split_offset = offsets(split, INT64)
    dw_offsets = split_offset * C_out * cols + c_out[:, None] * cols + offs_n[None, :]
    tl.store(dw_ptr + dw_offsets, acc, mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        if pid_n == 0:  # one column of tiles stores the bias gradient
            tl.store(db_ptr + split_offset * C_out + c_out, bias_acc, mask=m_ok)


def conv2d_weight_grad(
    grad_output: torch.Tensor, pre: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
    geometry: ConvGeometry, activation_name: str | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE, bias_grad: bool = True, config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_weight shaped, typed and laid out like weight, grad_bias or None) of act(conv2d(x, weight) + b).

    Each of SPLIT_K programs along the (n, oh, ow) reduction writes an fp32 partial; the partials are summed here.
    """
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = grad_output.shape[2:]
    problem = problem_of(x, weight.shape, geometry, activation_name, bias_grad)
    config = config if config is not None else tuned.config_for(CONV_WGRAD_SPEC, problem)
    grid = _grid(problem, config)
    split_k = grid[2]
    dw_partial = torch.zeros((split_k, c_out, c_in_g, kh, kw), device=x.device, dtype=torch.float32)
    db_partial = torch.zeros((split_k, c_out), device=x.device, dtype=torch.float32)
    if grad_output.numel() and dw_partial.numel():
        pre = pre if activation_name is not None else grad_output
        runtime.announce()
        conv2d_wgrad_kernel[grid](
            grad_output, pre, x, dw_partial, db_partial,
            n, h, w, ho, wo, kh, kw, c_in_g, c_out // geometry.groups, _positions_per_split(problem, config),
            *geometry.kernel_args(), float(negative_slope), config["GROUP_M"],
            *grad_output.stride(), *pre.stride(), *x.stride(),
            ACTIVATION=activation_code(activation_name), HAS_BIAS=bias_grad, DOT_PRECISION=dot_precision(x.dtype),
            INT64=needs_int64(grad_output, pre, x, dw_partial),
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    dw = dw_partial.sum(0).to(weight.dtype)
    if channels_last(weight):
        dw = dw.contiguous(memory_format=torch.channels_last)
    return dw, (db_partial.sum(0).to(weight.dtype) if bias_grad else None)


def _positions_per_split(problem: Problem, config: Config) -> int:
    positions = gemm_dims_wgrad(problem)[2]
    return triton.cdiv(triton.cdiv(max(positions, 1), config["SPLIT_K"]), config["BLOCK_K"]) * config["BLOCK_K"]


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, positions = gemm_dims_wgrad(problem)
    splits = triton.cdiv(max(positions, 1), _positions_per_split(problem, config))  # no empty split
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"], splits


def _splits_have_work(config: Config, problem: Problem) -> bool:
    """A split of the wgrad reduction is worth launching only if each gets at least BLOCK_K positions."""
    return config["SPLIT_K"] == 1 or config["SPLIT_K"] * config["BLOCK_K"] <= gemm_dims_wgrad(problem)[2]


def _split(problem: Problem, config: Config) -> Config:
    """Split the (n, oh, ow) reduction until about two waves of an H100 SXM's SMs (132, `kernels.hardware`)
    are busy, keeping >= 8 K steps per split."""
    rows, cols, positions = gemm_dims_wgrad(problem)
    tiles = triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]) * problem["groups"]
    split = 1
    for candidate in CONV_WGRAD_SPEC.params["SPLIT_K"]:
        if tiles * candidate <= 2 * hardware.H100_SXM.sm_count and candidate * config["BLOCK_K"] * 8 <= positions:
            split = candidate
    return config | {"SPLIT_K": split}


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    grad_output_reads = 2 if problem["activation"] is not None else 1
    return (e["y"] * grad_output_reads + e["x"]) * DTYPES[problem["dtype"]].itemsize + (e["weight"] + e["bias"]) * 4


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_weight_grad(inputs["grad_output"], inputs["pre"], inputs["x"], inputs["weight"],
                              inputs["geometry"], inputs["activation"], bias_grad=inputs["bias"] is not None,
                              config=config)[0]


CONV_WGRAD_SPEC = KernelSpec(
    name="conv_wgrad",
    kernel=conv2d_wgrad_kernel,
    params={"BLOCK_M": [32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "BLOCK_K": [16, 32, 64], "GROUP_M": [1, 8],
            "SPLIT_K": [1, 4, 16, 64], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4]},
    constraints=constraints(gemm_dims_wgrad, backward=True) + (_splits_have_work,),
    default_config=default_config(gemm_dims_wgrad, backward=True, finish=_split),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_backward(inputs, "weight", torch.float64),
    flops=flops,
    bytes=_bytes,
    aot_signature=aot_signature(conv2d_wgrad_kernel, {"dw_ptr": "*fp32", "db_ptr": "*fp32"},
                                lambda problem: {"HAS_BIAS": bool(problem["bias"])}),
    grid=_grid,
    baseline=lambda inputs: torch_backward(inputs, "weight"),
    example_problems=EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
)
