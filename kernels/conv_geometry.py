"""Conv2d geometry and problems: F.conv2d-style arguments, output sizes, memory layouts and the
implicit-GEMM view each conv kernel computes.

None of the kernels materialises the unrolled (im2col) input: each tile gathers its operands
straight from the NCHW or channels_last tensors through their strides. The GEMM views, per group:

- forward  y[(n,oh,ow), co]  = sum over (kh, kw, ci) of x[n, ci, ih, iw] * w[co, ci, kh, kw]   (conv_fwd)
- dgrad    dx[(n,ih,iw), ci] = sum over (kh, kw, co) of dz[n, co, oh, ow] * w[co, ci, kh, kw]  (conv_dgrad)
- wgrad    dw[co, (ci,kh,kw)] = sum over (n,oh,ow) of dz[n, co, oh, ow] * x[n, ci, ih, iw]     (conv_wgrad)

where dz = dy * activation'(z) is formed on the fly from the saved pre-activation z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from triton_workbench.kernels import runtime
from triton_workbench.kernels.activation import activation_code
from triton_workbench.kernels.gemm import INT32_MAX, max_offset
from triton_workbench.kernels.spec import Problem, dtype_name


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

    def constexprs(self, kh: int, kw: int) -> tuple[int, ...]:
        """KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W as a kernel specialised on its geometry takes
        them (the leading padding is all a kernel needs)."""
        return (kh, kw, self.stride_h, self.stride_w, self.pad_top, self.pad_left, self.dilation_h, self.dilation_w)


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An F.conv2d-style int or pair of ints (a 1-tuple too) as (height, width); TypeError naming `name`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        both = (value, value)
    elif (isinstance(value, (tuple, list)) and len(value) in (1, 2)
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        both = (value[0], value[-1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return both


def make_geometry(
    weight_hw: tuple[int, int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> ConvGeometry:
    """Validate F.conv2d-style arguments and resolve 'same'/'valid' padding to explicit sides; padding may also
    be four ints (top, bottom, left, right), which the kernels take as they are."""
    stride_h, stride_w = pair(stride, "stride")
    dilation_h, dilation_w = pair(dilation, "dilation")
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
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:  # per side, as TF 'SAME' needs (kernels.conv2d_same)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in padding):
            raise ValueError(f"padding (top, bottom, left, right) must be non-negative ints, got {padding!r}")
        pads = tuple(padding)
    else:
        pad_h, pad_w = pair(padding, "padding")
        if min(pad_h, pad_w) < 0:
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        pads = (pad_h, pad_h, pad_w, pad_w)
    return ConvGeometry(stride_h, stride_w, *pads, dilation_h, dilation_w, groups)


def channels_last(x: torch.Tensor) -> bool:
    """Whether x (4-D) is laid out channels_last and not also plain contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """x's memory format: channels_last where it is that and not also plain contiguous, else contiguous."""
    return torch.channels_last if channels_last(x) else torch.contiguous_format


def empty_in_layout_of(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised 4-D tensor of `shape` and x's dtype in x's memory format (channels_last or contiguous)."""
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))


def stem_channels(c_in_g: int, itemsize: int) -> int:
    """The channel count the kernels compute with for few channels: rounded up to whole 8-byte channel runs
    (the stem's 3 -> 4 in fp16), so that a kernel row's (kw, channel) run loads as vectors."""
    unit = max(1, 8 // itemsize)
    return -(-c_in_g // unit) * unit


def pad_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """t (N, C, H, W) with zero channels appended up to `channels`, channels_last."""
    if channels > t.shape[1]:
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, channels - t.shape[1]))
    return t.contiguous(memory_format=torch.channels_last)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether offsets must be 64-bit: some tensor spans half of 2**31 elements or more (the other half is
    headroom for the out-of-range positions of masked-off lanes). 32-bit offsets save registers."""
    return max(max_offset(tensor) for tensor in tensors) >= INT32_MAX // 2


def dot_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 on a GPU when cuDNN is allowed it (PyTorch's conv policy); exact otherwise."""
    if dtype == torch.float32 and not runtime.INTERPRETER and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


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
        problem["tf32"] = dot_precision(torch.float32) == "tf32"
    return problem


def problem_of(x: torch.Tensor, weight_shape: Sequence[int], geometry: ConvGeometry,
               activation_name: str | None, bias: bool) -> Problem:
    """The problem a launch on x (its dtype and layout) with a weight of `weight_shape` solves."""
    return conv_problem(*x.shape, weight_shape[0], *weight_shape[2:], geometry, dtype_name(x.dtype),
                        "nhwc" if channels_last(x) else "nchw", activation_name, bias)


def problem_geometry(problem: Problem) -> ConvGeometry:
    return ConvGeometry(*problem["stride"], *problem["padding"], *problem["dilation"], problem["groups"])


def output_hw(problem: Problem) -> tuple[int, int]:
    return problem_geometry(problem).output_hw(problem["h"], problem["w"], problem["kh"], problem["kw"])


def gemm_dims_fwd(problem: Problem) -> tuple[int, int, int]:
    """(rows, columns, channels per K loop) of the forward's GEMM view, per group."""
    ho, wo = output_hw(problem)
    return problem["n"] * ho * wo, problem["c_out"] // problem["groups"], problem["c_in"] // problem["groups"]


def gemm_dims_dgrad(problem: Problem) -> tuple[int, int, int]:
    g = problem["groups"]
    return problem["n"] * problem["h"] * problem["w"], problem["c_in"] // g, problem["c_out"] // g
