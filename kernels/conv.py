"""Implicit-GEMM conv2d in Triton: forward with a fused bias + activation epilogue, dgrad and wgrad.

None of the kernels materialises the unrolled (im2col) input: each tile gathers its operands
straight from the NCHW or channels_last tensors through their strides. The GEMM views, per group:

- forward  y[(n,oh,ow), co]  = sum over (kh, kw, ci) of x[n, ci, ih, iw] * w[co, ci, kh, kw]
- dgrad    dx[(n,ih,iw), ci] = sum over (kh, kw, co) of dz[n, co, oh, ow] * w[co, ci, kh, kw],
           where oh = (ih + pad - kh*dil) / stride must be a whole number in range (the stride is
           handled by masking inside the kernel, no zero-inserted copy of dz is built)
- wgrad    dw[co, (ci,kh,kw)] = sum over (n,oh,ow) of dz[n, co, oh, ow] * x[n, ci, ih, iw],
           split along (n,oh,ow) into SPLIT_K fp32 partials; grad_bias is the same reduction of dz.

dz = dy * activation'(z) is formed on the fly from the saved pre-activation z. Channel counts
below tl.dot's minimum of 16 are handled by masking the K tile. Offsets are 64-bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE, activation_code, apply, derivative, torch_activation
from triton_workbench.kernels.gemm import INT32_MAX, fits_shared_memory, max_offset, tile_coordinates
from triton_workbench.kernels.spec import DTYPES, TRITON_POINTER_TYPES, Config, KernelSpec, Problem, dtype_name


# ----------------------------------------------------------------------------------------------
# Geometry: everything besides the tensors that fixes one convolution.


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, explicit per-side padding, dilation and groups of a conv2d (ints, height first)."""

    stride_h: int = 1
    stride_w: int = 1
    pad_top: int = 0
    pad_bottom: int = 0
    pad_left: int = 0
    pad_right: int = 0
    dilation_h: int = 1
    dilation_w: int = 1
    groups: int = 1

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        ho = (h + self.pad_top + self.pad_bottom - self.dilation_h * (kh - 1) - 1) // self.stride_h + 1
        wo = (w + self.pad_left + self.pad_right - self.dilation_w * (kw - 1) - 1) // self.stride_w + 1
        return ho, wo

    def kernel_args(self) -> tuple[int, ...]:
        """stride_h, stride_w, pad_h, pad_w, dil_h, dil_w: the leading padding is all a kernel needs."""
        return (self.stride_h, self.stride_w, self.pad_top, self.pad_left, self.dilation_h, self.dilation_w)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif (isinstance(value, (tuple, list)) and len(value) in (1, 2)
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        pair = (value[0], value[-1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def make_geometry(
    weight_hw: tuple[int, int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> ConvGeometry:
    """Validate F.conv2d-style arguments and resolve 'same'/'valid' padding to explicit sides."""
    stride_h, stride_w = _pair(stride, "stride")
    dilation_h, dilation_w = _pair(dilation, "dilation")
    if min(stride_h, stride_w) < 1:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if min(dilation_h, dilation_w) < 1:
        raise ValueError(f"dilation must be positive, got {dilation!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (stride_h, stride_w) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
            total_h = dilation_h * (weight_hw[0] - 1)
            total_w = dilation_w * (weight_hw[1] - 1)
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pad_h, pad_w = _pair(padding, "padding")
        if min(pad_h, pad_w) < 0:
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        pads = (pad_h, pad_h, pad_w, pad_w)
    return ConvGeometry(stride_h, stride_w, *pads, dilation_h, dilation_w, groups)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x (4-D) is laid out channels_last and not also plain contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def empty_in_layout_of(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised 4-D tensor of `shape` and x's dtype in x's memory format (channels_last or contiguous)."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether offsets must be 64-bit: some tensor spans half of 2**31 elements or more (the other half is
    headroom for the out-of-range positions of masked-off lanes). 32-bit offsets save registers."""
    return max(max_offset(tensor) for tensor in tensors) >= INT32_MAX // 2


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 on a GPU when cuDNN is allowed it (PyTorch's conv policy); exact otherwise."""
    if dtype == torch.float32 and not runtime.INTERPRETER and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------
# Kernels


@jit
def _offsets(index, INT64: tl.constexpr):
    """index in the integer type offsets are computed in: int64 when some tensor spans 2**31 elements or more."""
    if INT64:
        index = index.to(tl.int64)
    return index


@jit
def _position(index, H, W, INT64: tl.constexpr):
    """Flat (image, row, column) index over H x W images -> image (in the offset type), row, column."""
    return _offsets(index // (H * W), INT64), (index % (H * W)) // W, index % W


@jit
def _spatial_offsets(image, h, w, stride_n, stride_h, stride_w, INT64: tl.constexpr):
    """Element offset of (image, h, w) in a tensor with these strides; the caller adds the channel."""
    return image * stride_n + _offsets(h, INT64) * stride_h + _offsets(w, INT64) * stride_w


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
    image, oh, ow = _position(offs_m, Ho, Wo, INT64)
    c_out = _offsets(group * C_out_g + offs_n, INT64)
    x_image = x_ptr + image * sxn + _offsets(group * C_in_g, INT64) * sxc
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
        x_rows = x_image + _offsets(ih, INT64) * sxh + _offsets(iw, INT64) * sxw
        a = tl.load(x_rows[:, None] + _offsets(channel, INT64)[None, :] * sxc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + _offsets(channel, INT64)[:, None] * swi,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = _spatial_offsets(image, oh, ow, syn, syh, syw, INT64)[:, None] + c_out[None, :] * syc
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SAVE_PREACT:
        tl.store(z_ptr + y_offsets, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(y_ptr + y_offsets, apply(acc, ACTIVATION, negative_slope).to(y_ptr.dtype.element_ty), mask=out_mask)


@jit
def _output_grad(dy_ptr, z_ptr, dy_offsets, z_offsets, mask, negative_slope, ACTIVATION: tl.constexpr):
    """dz = dy * act'(z) in fp32 (z is only read when there is an activation)."""
    grad = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        preact = tl.load(z_ptr + z_offsets, mask=mask, other=0.0).to(tl.float32)
        grad = grad * derivative(preact, ACTIVATION, negative_slope)
    return grad


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
    image, ih, iw = _position(offs_m, H, W, INT64)
    c_in = _offsets(group * C_in_g + offs_n, INT64)
    c_out0 = _offsets(group * C_out_g, INT64)

    w_cols = w_ptr + _offsets(offs_n, INT64) * swi
    channel_blocks = tl.cdiv(C_out_g, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, KH * KW * channel_blocks):  # flat (tap, channel block) loop, as in the forward
        tap = step // channel_blocks
        channel = _offsets((step % channel_blocks) * BLOCK_K + offs_k, INT64)
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        row_ok = m_ok & (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0) & (oh < Ho) & (ow < Wo)
        k_ok = channel < C_out_g
        mask = row_ok[:, None] & k_ok[None, :]
        dy_rows = _spatial_offsets(image, oh, ow, sdyn, sdyh, sdyw, INT64)
        z_rows = _spatial_offsets(image, oh, ow, szn, szh, szw, INT64)
        grad = _output_grad(dy_ptr, z_ptr, dy_rows[:, None] + (c_out0 + channel)[None, :] * sdyc,
                            z_rows[:, None] + (c_out0 + channel)[None, :] * szc, mask, negative_slope, ACTIVATION)
        b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + (c_out0 + channel)[:, None] * swo,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(grad.to(b.dtype), b, acc, input_precision=DOT_PRECISION)

    dx_rows = _spatial_offsets(image, ih, iw, sdxn, sdxh, sdxw, INT64)
    dx_offsets = dx_rows[:, None] + c_in[None, :] * sdxc
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    c_out = _offsets(group * C_out_g + offs_m, INT64)
    c_in = _offsets(group * C_in_g + offs_n // taps, INT64)
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
        image, oh, ow = _position(p, Ho, Wo, INT64)
        mask = m_ok[:, None] & p_ok[None, :]
        grad = _output_grad(
            dy_ptr, z_ptr,
            c_out[:, None] * sdyc + _spatial_offsets(image, oh, ow, sdyn, sdyh, sdyw, INT64)[None, :],
            c_out[:, None] * szc + _spatial_offsets(image, oh, ow, szn, szh, szw, INT64)[None, :],
            mask, negative_slope, ACTIVATION)
        if HAS_BIAS:
            bias_acc += tl.sum(grad, axis=1)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        x_ok = p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offsets = _spatial_offsets(image[:, None], ih, iw, sxn, sxh, sxw, INT64) + c_in[None, :] * sxc
        b = tl.load(x_ptr + x_offsets, mask=x_ok, other=0.0)
        acc = tl.dot(grad.to(b.dtype), b, acc, input_precision=DOT_PRECISION)

    split_offset = _offsets(split, INT64)
    dw_offsets = split_offset * C_out * cols + c_out[:, None] * cols + offs_n[None, :]
    tl.store(dw_ptr + dw_offsets, acc, mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        if pid_n == 0:  # one column of tiles stores the bias gradient
            tl.store(db_ptr + split_offset * C_out + c_out, bias_acc, mask=m_ok)


# ----------------------------------------------------------------------------------------------
# Launchers


def conv_problem(
    n: int, c_in: int, h: int, w: int, c_out: int, kh: int, kw: int, geometry: ConvGeometry = ConvGeometry(),
    dtype: str = "fp32", layout: str = "nchw", activation_name: str | None = None, bias: bool = True,
) -> Problem:
    """The problem dict (JSON-serialisable) the three conv specs share; fp32 records its TF32 policy."""
    activation_code(activation_name)  # validates the name
    problem: Problem = {
        "n": n, "c_in": c_in, "h": h, "w": w, "c_out": c_out, "kh": kh, "kw": kw,
        "stride": [geometry.stride_h, geometry.stride_w],
        "padding": [geometry.pad_top, geometry.pad_bottom, geometry.pad_left, geometry.pad_right],
        "dilation": [geometry.dilation_h, geometry.dilation_w], "groups": geometry.groups,
        "dtype": dtype, "layout": layout, "activation": activation_name, "bias": bias,
    }
    if dtype == "fp32":
        problem["tf32"] = _dot_precision(torch.float32) == "tf32"
    return problem


def _problem_of(x: torch.Tensor, weight_shape: Sequence[int], geometry: ConvGeometry,
                activation_name: str | None, bias: bool) -> Problem:
    return conv_problem(*x.shape, weight_shape[0], *weight_shape[2:], geometry, dtype_name(x.dtype),
                        "nhwc" if _channels_last(x) else "nchw", activation_name, bias)


def problem_geometry(problem: Problem) -> ConvGeometry:
    return ConvGeometry(*problem["stride"], *problem["padding"], *problem["dilation"], problem["groups"])


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
    problem = _problem_of(x, weight.shape, geometry, activation_name, bias is not None)
    config = config if config is not None else tuned.config_for(CONV_FWD_SPEC, problem)
    y = empty_in_layout_of(x, (n, c_out, ho, wo))
    pre = empty_in_layout_of(x, y.shape) if keep_pre and activation_name is not None else None
    if y.numel() == 0:
        return y, pre
    runtime.announce()
    conv2d_fwd_kernel[_grid_fwd(problem, config)](
        x, weight, bias.contiguous() if bias is not None else y, y, pre if pre is not None else y,  # C_out values
        n, h, w, ho, wo, kh, kw, c_in_g, c_out // geometry.groups,
        *geometry.kernel_args(), float(negative_slope), config["GROUP_M"],
        *x.stride(), *weight.stride(), *y.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation_name), SAVE_PREACT=pre is not None,
        DOT_PRECISION=_dot_precision(x.dtype), INT64=_needs_int64(x, weight, y),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y, pre


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
    problem = _problem_of(x, weight.shape, geometry, activation_name, False)
    config = config if config is not None else tuned.config_for(CONV_DGRAD_SPEC, problem)
    dx = empty_in_layout_of(x, (n, c_in, h, w))
    if dx.numel() == 0:
        return dx
    if grad_output.numel() == 0:
        return dx.zero_()
    pre = pre if activation_name is not None else grad_output
    runtime.announce()
    conv2d_dgrad_kernel[_grid_dgrad(problem, config)](
        grad_output, pre, weight, dx,
        n, h, w, ho, wo, kh, kw, c_in_g, c_out // geometry.groups,
        *geometry.kernel_args(), float(negative_slope), config["GROUP_M"],
        *grad_output.stride(), *pre.stride(), *weight.stride(), *dx.stride(),
        ACTIVATION=activation_code(activation_name), DOT_PRECISION=_dot_precision(weight.dtype),
        INT64=_needs_int64(grad_output, pre, weight, dx),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dx


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
    problem = _problem_of(x, weight.shape, geometry, activation_name, bias_grad)
    config = config if config is not None else tuned.config_for(CONV_WGRAD_SPEC, problem)
    grid = _grid_wgrad(problem, config)
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
            ACTIVATION=activation_code(activation_name), HAS_BIAS=bias_grad, DOT_PRECISION=_dot_precision(x.dtype),
            INT64=_needs_int64(grad_output, pre, x, dw_partial),
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    dw = dw_partial.sum(0).to(weight.dtype)
    if _channels_last(weight):
        dw = dw.contiguous(memory_format=torch.channels_last)
    return dw, (db_partial.sum(0).to(weight.dtype) if bias_grad else None)


# ----------------------------------------------------------------------------------------------
# KernelSpecs: one per kernel, so each is tuned on its own


def _output_hw(problem: Problem) -> tuple[int, int]:
    return problem_geometry(problem).output_hw(problem["h"], problem["w"], problem["kh"], problem["kw"])


def _gemm_dims_fwd(problem: Problem) -> tuple[int, int, int]:
    """(rows, columns, channels per K loop) of the forward's GEMM view, per group."""
    ho, wo = _output_hw(problem)
    return problem["n"] * ho * wo, problem["c_out"] // problem["groups"], problem["c_in"] // problem["groups"]


def _gemm_dims_dgrad(problem: Problem) -> tuple[int, int, int]:
    g = problem["groups"]
    return problem["n"] * problem["h"] * problem["w"], problem["c_in"] // g, problem["c_out"] // g


def _gemm_dims_wgrad(problem: Problem) -> tuple[int, int, int]:
    ho, wo = _output_hw(problem)
    g = problem["groups"]
    return problem["c_out"] // g, problem["c_in"] // g * problem["kh"] * problem["kw"], problem["n"] * ho * wo


def _grid_fwd(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = _gemm_dims_fwd(problem)
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"]


def _grid_dgrad(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, _ = _gemm_dims_dgrad(problem)
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"]


def _positions_per_split(problem: Problem, config: Config) -> int:
    positions = _gemm_dims_wgrad(problem)[2]
    return triton.cdiv(triton.cdiv(max(positions, 1), config["SPLIT_K"]), config["BLOCK_K"]) * config["BLOCK_K"]


def _grid_wgrad(problem: Problem, config: Config) -> tuple[int, ...]:
    rows, cols, positions = _gemm_dims_wgrad(problem)
    splits = triton.cdiv(max(positions, 1), _positions_per_split(problem, config))  # no empty split
    return triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]), problem["groups"], splits


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


def _constraints(dims: Callable[[Problem], tuple[int, int, int]], backward: bool) -> tuple:
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


def _default_config(dims: Callable[[Problem], tuple[int, int, int]], backward: bool,
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


def _splits_have_work(config: Config, problem: Problem) -> bool:
    """A split of the wgrad reduction is worth launching only if each gets at least BLOCK_K positions."""
    return config["SPLIT_K"] == 1 or config["SPLIT_K"] * config["BLOCK_K"] <= _gemm_dims_wgrad(problem)[2]


def _wgrad_split(problem: Problem, config: Config) -> Config:
    """Split the (n, oh, ow) reduction until about two waves of 132 SMs are busy, keeping >= 8 K steps per split."""
    rows, cols, positions = _gemm_dims_wgrad(problem)
    tiles = triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]) * problem["groups"]
    split = 1
    for candidate in CONV_WGRAD_SPEC.params["SPLIT_K"]:
        if tiles * candidate <= 264 and candidate * config["BLOCK_K"] * 8 <= positions:
            split = candidate
    return config | {"SPLIT_K": split}


def _randn(generator: torch.Generator, shape: Sequence[int], problem: Problem, device: torch.device,
           std: float = 1.0, layout: bool = True) -> torch.Tensor:
    tensor = (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=DTYPES[problem["dtype"]])
    if layout and problem["layout"] == "nhwc":
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _make_inputs(problem: Problem, device: torch.device) -> dict[str, Any]:
    """x, weight (fan-in scaled), bias, and the output gradient and pre-activation the backward reads."""
    generator = torch.Generator().manual_seed(0)
    n, c_in, h, w, c_out, kh, kw = (problem[key] for key in ("n", "c_in", "h", "w", "c_out", "kh", "kw"))
    c_in_g = c_in // problem["groups"]
    ho, wo = _output_hw(problem)
    return {
        "x": _randn(generator, (n, c_in, h, w), problem, device),
        "weight": _randn(generator, (c_out, c_in_g, kh, kw), problem, device, std=max(c_in_g * kh * kw, 1) ** -0.5),
        "bias": _randn(generator, (c_out,), problem, device, layout=False) if problem["bias"] else None,
        "grad_output": _randn(generator, (n, c_out, ho, wo), problem, device),
        "pre": _randn(generator, (n, c_out, ho, wo), problem, device),
        "geometry": problem_geometry(problem),
        "activation": problem["activation"],
    }


def torch_conv2d(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """PyTorch's conv2d with the geometry's (possibly asymmetric) padding: cuDNN on a GPU."""
    if (geometry.pad_top, geometry.pad_left) != (geometry.pad_bottom, geometry.pad_right):
        x = F.pad(x, (geometry.pad_left, geometry.pad_right, geometry.pad_top, geometry.pad_bottom))
        padding: tuple[int, int] = (0, 0)
    else:
        padding = (geometry.pad_top, geometry.pad_left)
    return F.conv2d(x, weight, None, (geometry.stride_h, geometry.stride_w), padding,
                    (geometry.dilation_h, geometry.dilation_w), geometry.groups)


def _torch_forward(inputs: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """What an unfused model computes: conv, then a separate bias add, then the activation."""
    x, weight, bias = (t.to(dtype) if t is not None and dtype is not None else t
                       for t in (inputs["x"], inputs["weight"], inputs["bias"]))
    z = torch_conv2d(x, weight, inputs["geometry"])
    if bias is not None:
        z = z + bias[:, None, None]
    return torch_activation(z, inputs["activation"])


def _torch_backward(inputs: dict[str, Any], wrt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """grad of act(conv) w.r.t. "x" or "weight" by PyTorch's autograd: the activation backward, then the conv's."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    pre = cast(inputs["pre"]).detach().requires_grad_(True)
    (grad_pre,) = torch.autograd.grad(torch_activation(pre, inputs["activation"]), pre,
                                      cast(inputs["grad_output"]))
    x = cast(inputs["x"]).detach().requires_grad_(wrt == "x")
    weight = cast(inputs["weight"]).detach().requires_grad_(wrt == "weight")
    (grad,) = torch.autograd.grad(torch_conv2d(x, weight, inputs["geometry"]), x if wrt == "x" else weight, grad_pre)
    return grad


def _launch_fwd(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["geometry"], inputs["activation"],
                          config=config)[0]


def _launch_dgrad(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_input_grad(inputs["grad_output"], inputs["pre"], inputs["weight"], inputs["x"],
                             inputs["geometry"], inputs["activation"], config=config)


def _launch_wgrad(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return conv2d_weight_grad(inputs["grad_output"], inputs["pre"], inputs["x"], inputs["weight"],
                              inputs["geometry"], inputs["activation"], bias_grad=inputs["bias"] is not None,
                              config=config)[0]


def _aot_signature(kernel, pointer_overrides: dict[str, str], constexprs_of):
    """Signature from the kernel's argument names: *_ptr are pointers of the problem's dtype (unless
    overridden), negative_slope is fp32, every other runtime argument i32."""

    def aot_signature(problem: Problem, config: Config) -> tuple[dict[str, str], dict[str, Any]]:
        constexprs = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                      "ACTIVATION": activation_code(problem["activation"]),
                      "DOT_PRECISION": "tf32" if problem.get("tf32") else "ieee",
                      "INT64": max(_elements(problem).values()) >= INT32_MAX // 2} | constexprs_of(problem)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer_overrides.get(name, TRITON_POINTER_TYPES[problem["dtype"]])
            else:
                signature[name] = "fp32" if name == "negative_slope" else "i32"
        return signature, constexprs

    return aot_signature


def _flops(problem: Problem) -> int:
    rows, cols, depth = _gemm_dims_fwd(problem)
    return 2 * rows * cols * depth * problem["kh"] * problem["kw"] * problem["groups"]


def _elements(problem: Problem) -> dict[str, int]:
    ho, wo = _output_hw(problem)
    return {"x": problem["n"] * problem["c_in"] * problem["h"] * problem["w"],
            "weight": problem["c_out"] * problem["c_in"] // problem["groups"] * problem["kh"] * problem["kw"],
            "y": problem["n"] * problem["c_out"] * ho * wo, "bias": problem["c_out"] if problem["bias"] else 0}


def _bytes_fwd(problem: Problem) -> int:
    e = _elements(problem)
    return (e["x"] + e["weight"] + e["y"] + e["bias"]) * DTYPES[problem["dtype"]].itemsize


def _bytes_dgrad(problem: Problem) -> int:
    e = _elements(problem)
    grad_output_reads = 2 if problem["activation"] is not None else 1  # dy, and the pre-activation
    return (e["y"] * grad_output_reads + e["weight"] + e["x"]) * DTYPES[problem["dtype"]].itemsize


def _bytes_wgrad(problem: Problem) -> int:
    e = _elements(problem)
    grad_output_reads = 2 if problem["activation"] is not None else 1
    return (e["y"] * grad_output_reads + e["x"]) * DTYPES[problem["dtype"]].itemsize + (e["weight"] + e["bias"]) * 4


# ResNet-18's convolutions at ImageNet resolution (224x224): (name, c_in, h_w, c_out, k, stride, padding).
RESNET18_CONV_SHAPES: tuple[dict[str, Any], ...] = tuple(
    {"name": name, "c_in": c_in, "h": hw, "w": hw, "c_out": c_out, "kh": k, "kw": k, "stride": s, "padding": p}
    for name, c_in, hw, c_out, k, s, p in (
        ("conv1", 3, 224, 64, 7, 2, 3),
        ("layer1", 64, 56, 64, 3, 1, 1),
        ("layer2.0.conv1", 64, 56, 128, 3, 2, 1),
        ("layer2.0.downsample", 64, 56, 128, 1, 2, 0),
        ("layer2", 128, 28, 128, 3, 1, 1),
        ("layer3.0.conv1", 128, 28, 256, 3, 2, 1),
        ("layer3.0.downsample", 128, 28, 256, 1, 2, 0),
        ("layer3", 256, 14, 256, 3, 1, 1),
        ("layer4.0.conv1", 256, 14, 512, 3, 2, 1),
        ("layer4.0.downsample", 256, 14, 512, 1, 2, 0),
        ("layer4", 512, 7, 512, 3, 1, 1),
    )
)


def resnet18_problem(shape: dict[str, Any], batch: int = 32, dtype: str = "fp16", layout: str = "nhwc",
                     activation_name: str | None = "relu", bias: bool = True) -> Problem:
    """A conv problem for one RESNET18_CONV_SHAPES entry (ResNet's conv has BN after it; the fused
    bias + ReLU stands for BN folded into the conv at inference)."""
    geometry = make_geometry((shape["kh"], shape["kw"]), shape["stride"], shape["padding"])
    return conv_problem(batch, shape["c_in"], shape["h"], shape["w"], shape["c_out"], shape["kh"], shape["kw"],
                        geometry, dtype, layout, activation_name, bias)


# one per dtype; fp32 as a GPU runs it by default (cuDNN's allow_tf32 is on unless a user turns it off)
_EXAMPLE_PROBLEMS = tuple(
    resnet18_problem(RESNET18_CONV_SHAPES[1], dtype=dtype) | ({"tf32": True} if dtype == "fp32" else {})
    for dtype in ("fp32", "fp16", "bf16"))
_TILE_PARAMS = {
    "BLOCK_M": [32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "BLOCK_K": [16, 32, 64],
    "GROUP_M": [1, 8],
    "num_warps": [2, 4, 8],
    "num_stages": [2, 3, 4],
}
_SHAPE_KEYS = ("n", "c_in", "h", "w", "c_out")

CONV_FWD_SPEC = KernelSpec(
    name="conv_fwd",
    kernel=conv2d_fwd_kernel,
    params=_TILE_PARAMS,
    constraints=_constraints(_gemm_dims_fwd, backward=False),
    default_config=_default_config(_gemm_dims_fwd, backward=False),
    make_inputs=_make_inputs,
    launch=_launch_fwd,
    reference=lambda inputs: _torch_forward(inputs, torch.float64),
    flops=_flops,
    bytes=_bytes_fwd,
    aot_signature=_aot_signature(conv2d_fwd_kernel, {}, lambda problem: {
        "HAS_BIAS": bool(problem["bias"]), "SAVE_PREACT": False}),
    grid=_grid_fwd,
    baseline=_torch_forward,
    example_problems=_EXAMPLE_PROBLEMS,
    shape_keys=_SHAPE_KEYS,
)

CONV_DGRAD_SPEC = KernelSpec(
    name="conv_dgrad",
    kernel=conv2d_dgrad_kernel,
    params=_TILE_PARAMS,
    constraints=_constraints(_gemm_dims_dgrad, backward=True),
    default_config=_default_config(_gemm_dims_dgrad, backward=True),
    make_inputs=_make_inputs,
    launch=_launch_dgrad,
    reference=lambda inputs: _torch_backward(inputs, "x", torch.float64),
    flops=_flops,
    bytes=_bytes_dgrad,
    aot_signature=_aot_signature(conv2d_dgrad_kernel, {}, lambda problem: {}),
    grid=_grid_dgrad,
    baseline=lambda inputs: _torch_backward(inputs, "x"),
    example_problems=_EXAMPLE_PROBLEMS,
    shape_keys=_SHAPE_KEYS,
)

CONV_WGRAD_SPEC = KernelSpec(
    name="conv_wgrad",
    kernel=conv2d_wgrad_kernel,
    params={"BLOCK_M": [32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "BLOCK_K": [16, 32, 64], "GROUP_M": [1, 8],
            "SPLIT_K": [1, 4, 16, 64], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4]},
    constraints=_constraints(_gemm_dims_wgrad, backward=True) + (
        _splits_have_work,),
    default_config=_default_config(_gemm_dims_wgrad, backward=True, finish=_wgrad_split),
    make_inputs=_make_inputs,
    launch=_launch_wgrad,
    reference=lambda inputs: _torch_backward(inputs, "weight", torch.float64),
    flops=_flops,
    bytes=_bytes_wgrad,
    aot_signature=_aot_signature(conv2d_wgrad_kernel, {"dw_ptr": "*fp32", "db_ptr": "*fp32"},
                                 lambda problem: {"HAS_BIAS": bool(problem["bias"])}),
    grid=_grid_wgrad,
    baseline=lambda inputs: _torch_backward(inputs, "weight"),
    example_problems=_EXAMPLE_PROBLEMS,
    shape_keys=_SHAPE_KEYS,
)
