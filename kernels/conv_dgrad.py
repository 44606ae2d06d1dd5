"""Implicit-GEMM conv2d input gradient (dgrad): its kernel, launcher and KernelSpec.

    dx[(n,ih,iw), ci] = sum over (kh, kw, co) of dz[n, co, oh, ow] * w[co, ci, kh, kw]

where oh = (ih + pad - kh*dil) / stride must be a whole number in range: the stride is handled by
masking inside the kernel, no zero-inserted copy of dz is built. dz = dy * act'(z) is formed on the fly.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE, activation_code
from triton_workbench.kernels.conv_geometry import (ConvGeometry, dot_precision, empty_in_layout_of, gemm_dims_dgrad,
                                                    needs_int64, problem_of)
from triton_workbench.kernels.conv_spec import (EXAMPLE_PROBLEMS, SHAPE_KEYS, aot_signature, elements, flops,
                                                make_inputs, torch_backward)
from triton_workbench.kernels.conv_tiles import (TILE_PARAMS, constraints, default_config, offsets, output_grad,
                                                 position, spatial_offsets)
from triton_workbench.kernels.gemm import tile_coordinates
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_dgrad_kernel(
    dy_ptr, z_ptr, w_ptr, dx_ptr,
    N, H, W, Ho, Wo, KH, KW, C_in_g, C_out_g,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, negative_slope, GROUP_M,
    sdyn, sdyc, sdyh, sdyw, szn, szc, szh, szw, swo, swi, swh, sww, sdxn, sdxc, sdxh, sdxw,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx for one (input-position tile, input-channel tile, group); strided taps are masked."""
    group = tl.program_id(1)
    M = N * H * W
    pid_m, pid_n = tile_coordinates(M, C_in_g, GROUP_M, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_in_g
    image, ih, iw = position(offs_m, H, W, INT64)
    c_in = offsets(group * C_in_g + offs_n, INT64)
    c_out0 = offsets(group * C_out_g, INT64)

    w_cols = w_ptr + offsets(offs_n, INT64) * swi
    channel_blocks = tl.cdiv(C_out_g, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, KH * KW * channel_blocks):  # flat (tap, channel block) loop, as in the forward
        tap = step // channel_blocks
        channel = offsets((step % channel_blocks) * BLOCK_K + offs_k, INT64)
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        row_ok = m_ok & (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0) & (oh < Ho) & (ow < Wo)
        k_ok = channel < C_out_g
        mask = row_ok[:, None] & k_ok[None, :]
        dy_rows = spatial_offsets(image, oh, ow, sdyn, sdyh, sdyw, INT64)
        z_rows = spatial_offsets(image, oh, ow, szn, szh, szw, INT64)
        grad = output_grad(dy_ptr, z_ptr, dy_rows[:, None] + (c_out0 + channel)[None, :] * sdyc,
                           z_rows[:, None] + (c_out0 + channel)[None, :] * szc, mask, negative_slope, ACTIVATION)
        b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + (c_out0 + channel)[:, None] * swo,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(grad.to(b.dtype), b, acc, input_precision=DOT_PRECISION)

    dx_rows = spatial_offsets(image, ih, iw, sdxn, sdxh, sdxw, INT64)
    dx_offsets = dx_rows[:, None] + c_in[None, :] * sdxc
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def conv2d_input_grad(
    grad_output: torch.Tensor, pre: torch.Tensor | None, weight: torch.Tensor, x: torch.Tensor,
    geometry: ConvGeometry, activation_name: str | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE, config: Config | None = None,
) -> torch.Tensor:
    """grad_input of act(conv2d(x, weight) + b), shaped, typed and laid out like x (only its metadata is read).

    `pre` is the kept pre-activation (None when there is no activation).
    """
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = grad_output.shape[2:]
    problem = problem_of(x, weight.shape, geometry, activation_name, False)
    config = config if config is not None else tuned.config_for(CONV_DGRAD_SPEC, problem)
    dx = empty_in_layout_of(x, (n, c_in, h, w))
    if dx.numel() == 0:
        return dx
    if grad_output.numel() == 0:
        return dx.zero_()
    pre = pre if activation_name is not None else grad_output
    runtime.announce()
    conv2d_dgrad_kernel[_grid(problem, config)](
        grad_output, pre, weight, dx,
        n, h, w, ho, wo, kh, kw, c_in_g, c_out // geometry.groups,
        *geometry.kernel_args(), float(negative_slope), config["GROUP_M"],
        *grad_output.stride(), *pre.stride(), *weight.stride(), *dx.stride(),
        ACTIVATION=activation_code(activation_name), DOT_PRECISION=dot_precision(weight.dtype),
        INT64=needs_int64(grad_output, pre, weight, dx),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dx


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = gemm_dims_dgrad(problem)
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"]


def _bytes(problem: Problem) -> int:
    e = elements(problem)
    grad_output_reads = 2 if problem["activation"] is not None else 1  # dy, and the pre-activation
    return (e["y"] * grad_output_reads + e["weight"] + e["x"]) * DTYPES[problem["dtype"]].itemsize


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_input_grad(inputs["grad_output"], inputs["pre"], inputs["weight"], inputs["x"],
                             inputs["geometry"], inputs["activation"], config=config)


CONV_DGRAD_SPEC = KernelSpec(
    name="conv_dgrad",
    kernel=conv2d_dgrad_kernel,
    params=TILE_PARAMS,
    constraints=constraints(gemm_dims_dgrad, backward=True),
    default_config=default_config(gemm_dims_dgrad, backward=True),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_backward(inputs, "x", torch.float64),
    flops=flops,
    bytes=_bytes,
    aot_signature=aot_signature(conv2d_dgrad_kernel, {}, lambda problem: {}),
    grid=_grid,
    baseline=lambda inputs: torch_backward(inputs, "x"),
    example_problems=EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
)
