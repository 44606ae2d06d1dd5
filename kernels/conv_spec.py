"""What the three conv KernelSpecs share: example problems, the problem schema, bench inputs, the PyTorch
references, element and FLOP counts."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from triton_workbench.kernels.activation import ACTIVATION_ENTRY, torch_activation
from triton_workbench.kernels.conv_geometry import (ConvGeometry, conv_problem, gemm_dims_fwd, make_geometry,
                                                    output_hw, problem_geometry)
from triton_workbench.kernels.spec import DTYPE_ENTRY, DTYPES, Problem, choice, flag, ints, size, tf32_with_fp32

# one per dtype: ResNet-18's layer1 conv (64 -> 64 channels, 56x56, 3x3) at batch 32, bias + ReLU, channels_last;
# fp32 as a GPU runs it by default (cuDNN's allow_tf32 is on unless a user turns it off)
EXAMPLE_PROBLEMS = tuple(
    conv_problem(32, 64, 56, 56, 64, 3, 3, make_geometry((3, 3), 1, 1), dtype, "nhwc", "relu", True)
    | ({"tf32": True} if dtype == "fp32" else {})
    for dtype in ("fp32", "fp16", "bf16"))
# dgrad and wgrad take dz = dy * act'(z) formed, so their problems have neither activation nor bias
BACKWARD_EXAMPLE_PROBLEMS = tuple(problem | {"activation": None, "bias": False} for problem in EXAMPLE_PROBLEMS)
SHAPE_KEYS = ("n", "c_in", "h", "w", "c_out")
# the entries `conv_geometry.conv_problem` writes ("tf32" with fp32 only)
PROBLEM_SCHEMA = {
    **{key: size() for key in ("n", "c_in", "h", "w", "c_out", "kh", "kw")},
    "stride": ints(2, 1), "padding": ints(4, 0), "dilation": ints(2, 1), "groups": size(),
    "dtype": DTYPE_ENTRY, "layout": choice("nchw", "nhwc"), "activation": ACTIVATION_ENTRY, "bias": flag(),
    "tf32": flag(required=False),
}


def _groups_and_output(problem: Problem) -> str:
    """A problem rule: the groups split both channel counts, and the output has at least one position."""
    c_in, c_out, groups = problem["c_in"], problem["c_out"], problem["groups"]
    if c_in % groups or c_out % groups:
        return f"groups ({groups}) must divide c_in ({c_in}) and c_out ({c_out})"
    ho, wo = output_hw(problem)
    if ho < 1 or wo < 1:
        return (f"the output would be {ho}x{wo}: an input of {problem['h']}x{problem['w']} is too small for a "
                f"{problem['kh']}x{problem['kw']} kernel with this padding and dilation")
    return ""


PROBLEM_RULES = (tf32_with_fp32, _groups_and_output)


def _formed_gradient(problem: Problem) -> str:
    """A problem rule of dgrad and wgrad: they take dz = dy * act'(z) formed, so a problem names no activation
    (a launch looks its config up without one)."""
    if problem["activation"] is not None:
        return f"activation must be null: the conv backward kernels take dz formed, got {problem['activation']!r}"
    return ""


BACKWARD_PROBLEM_RULES = PROBLEM_RULES + (_formed_gradient,)


def _randn(generator: torch.Generator, shape: Sequence[int], problem: Problem, device: torch.device,
           std: float = 1.0, layout: bool = True) -> torch.Tensor:
    tensor = (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=DTYPES[problem["dtype"]])
    if layout and problem["layout"] == "nhwc":
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def make_inputs(problem: Problem, device: torch.device) -> dict[str, Any]:
    """x, weight (fan-in scaled), bias, and the output gradient and pre-activation the backward reads."""
    generator = torch.Generator().manual_seed(0)
    n, c_in, h, w, c_out, kh, kw = (problem[key] for key in ("n", "c_in", "h", "w", "c_out", "kh", "kw"))
    c_in_g = c_in // problem["groups"]
    ho, wo = output_hw(problem)
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


def torch_forward(inputs: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """What an unfused model computes: conv, then a separate bias add, then the activation."""
    x, weight, bias = (t.to(dtype) if t is not None and dtype is not None else t
                       for t in (inputs["x"], inputs["weight"], inputs["bias"]))
    z = torch_conv2d(x, weight, inputs["geometry"])
    if bias is not None:
        z = z + bias[:, None, None]
    return torch_activation(z, inputs["activation"])


def torch_backward(inputs: dict[str, Any], wrt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """grad of act(conv) w.r.t. "x" or "weight" by PyTorch's autograd: the activation backward, then the conv's."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    pre = cast(inputs["pre"]).detach().requires_grad_(True)
    (grad_pre,) = torch.autograd.grad(torch_activation(pre, inputs["activation"]), pre,
                                      cast(inputs["grad_output"]))
    x = cast(inputs["x"]).detach().requires_grad_(wrt == "x")
    weight = cast(inputs["weight"]).detach().requires_grad_(wrt == "weight")
    (grad,) = torch.autograd.grad(torch_conv2d(x, weight, inputs["geometry"]), x if wrt == "x" else weight, grad_pre)
    return grad


def elements(problem: Problem) -> dict[str, int]:
    """Element counts of x, weight, y and bias (0 without one)."""
    ho, wo = output_hw(problem)
    return {"x": problem["n"] * problem["c_in"] * problem["h"] * problem["w"],
            "weight": problem["c_out"] * problem["c_in"] // problem["groups"] * problem["kh"] * problem["kw"],
            "y": problem["n"] * problem["c_out"] * ho * wo, "bias": problem["c_out"] if problem["bias"] else 0}


def flops(problem: Problem) -> int:
    rows, cols, depth = gemm_dims_fwd(problem)
    return 2 * rows * cols * depth * problem["kh"] * problem["kw"] * problem["groups"]
