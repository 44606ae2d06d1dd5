"""Implicit-GEMM conv2d forward with a fused bias + activation epilogue: its kernel, launcher and KernelSpec.

    y[(n,oh,ow), co] = act(sum over (kh, kw, ci) of x[n, ci, ih, iw] * w[co, ci, kh, kw] + bias[co])

The pre-activation can be kept for the backward (SAVE_PREACT).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE, activation_code, apply
from triton_workbench.kernels.conv_geometry import (ConvGeometry, dot_precision, empty_in_layout_of, gemm_dims_fwd,
                                                    needs_int64, problem_of)
from triton_workbench.kernels.conv_spec import (EXAMPLE_PROBLEMS, SHAPE_KEYS, aot_signature, elements, flops,
                                                make_inputs, torch_forward)
from triton_workbench.kernels.conv_tiles import (TILE_PARAMS, constraints, default_config, offsets, position,
                                                 spatial_offsets)
from triton_workbench.kernels.gemm import tile_coordinates
from triton_workbench.kernels.spec import DTYPES, Config, KernelSpec, Problem


@jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    N, H, W, Ho, Wo, KH, KW, C_in_g, C_out_g,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, negative_slope, GROUP_M,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_PREACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = act(conv(x, w) + bias) for one (output-position tile, output-channel tile, group)."""
    group = tl.program_id(1)
    M = N * Ho * Wo
    pid_m, pid_n = tile_coordinates(M, C_out_g, GROUP_M, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out_g
    image, oh, ow = position(offs_m, Ho, Wo, INT64)
    c_out = offsets(group * C_out_g + offs_n, INT64)
    x_image = x_ptr + image * sxn + offsets(group * C_in_g, INT64) * sxc
    w_cols = w_ptr + c_out * swo

    # one flat loop over (tap, channel block) so Triton's software pipeliner sees a single loop
    channel_blocks = tl.cdiv(C_in_g, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, KH * KW * channel_blocks):
        tap = step // channel_blocks
        channel = (step % channel_blocks) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = channel < C_in_g
        x_rows = x_image + offsets(ih, INT64) * sxh + offsets(iw, INT64) * sxw
        a = tl.load(x_rows[:, None] + offsets(channel, INT64)[None, :] * sxc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + offsets(channel, INT64)[:, None] * swi,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = spatial_offsets(image, oh, ow, syn, syh, syw, INT64)[:, None] + c_out[None, :] * syc
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SAVE_PREACT:
        tl.store(z_ptr + y_offsets, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(y_ptr + y_offsets, apply(acc, ACTIVATION, negative_slope).to(y_ptr.dtype.element_ty), mask=out_mask)


def conv2d_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
    activation_name: str | None = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    keep_pre: bool = False, config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(conv2d(x, weight) + bias), the pre-activation if keep_pre and there is an activation, else None).

    x is 4-D; the outputs have its memory format. Arguments are assumed validated (kernels.conv2d does that).
    """
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = geometry.output_hw(h, w, kh, kw)
    problem = problem_of(x, weight.shape, geometry, activation_name, bias is not None)
    config = config if config is not None else tuned.config_for(CONV_FWD_SPEC, problem)
    y = empty_in_layout_of(x, (n, c_out, ho, wo))
    pre = empty_in_layout_of(x, y.shape) if keep_pre and activation_name is not None else None
    if y.numel() == 0:
        return y, pre
    runtime.announce()
    conv2d_fwd_kernel[_grid(problem, config)](
        x, weight, bias.contiguous() if bias is not None else y, y, pre if pre is not None else y,  # C_out values
        n, h, w, ho, wo, kh, kw, c_in_g, c_out // geometry.groups,
        *geometry.kernel_args(), float(negative_slope), config["GROUP_M"],
        *x.stride(), *weight.stride(), *y.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation_name), SAVE_PREACT=pre is not None,
        DOT_PRECISION=dot_precision(x.dtype), INT64=needs_int64(x, weight, y),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y, pre


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = gemm_dims_fwd(problem)
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"]


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
    constraints=constraints(gemm_dims_fwd, backward=False),
    default_config=default_config(gemm_dims_fwd, backward=False),
    make_inputs=make_inputs,
    launch=_launch,
    reference=lambda inputs: torch_forward(inputs, torch.float64),
    flops=flops,
    bytes=_bytes,
    aot_signature=aot_signature(conv2d_fwd_kernel, {}, lambda problem: {
        "HAS_BIAS": bool(problem["bias"]), "SAVE_PREACT": False}),
    grid=_grid,
    baseline=torch_forward,
    example_problems=EXAMPLE_PROBLEMS,
    shape_keys=SHAPE_KEYS,
)
