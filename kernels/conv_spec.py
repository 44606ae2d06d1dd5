"""What the three conv KernelSpecs share: example problems, bench inputs, the PyTorch references,
element and FLOP counts, and the ahead-of-time signature."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from triton_workbench.kernels.activation import activation_code, torch_activation
from triton_workbench.kernels.conv_geometry import (ConvGeometry, conv_problem, gemm_dims_fwd, make_geometry,
                                                    output_hw, problem_geometry)
from triton_workbench.kernels.gemm import INT32_MAX
from triton_workbench.kernels.spec import DTYPES, TRITON_POINTER_TYPES, Config, Problem

# one per dtype: ResNet-18's layer1 conv (64 -> 64 channels, 56x56, 3x3) at batch 32, bias + ReLU, channels_last;
# fp32 as a GPU runs it by default (cuDNN's allow_tf32 is on unless a user turns it off)
EXAMPLE_PROBLEMS = tuple(
    conv_problem(32, 64, 56, 56, 64, 3, 3, make_geometry((3, 3), 1, 1), dtype, "nhwc", "relu", True)
    | ({"tf32": True} if dtype == "fp32" else {})
    for dtype in ("fp32", "fp16", "bf16"))
SHAPE_KEYS = ("n", "c_in", "h", "w", "c_out")


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


def aot_signature(kernel, pointer_overrides: dict[str, str], constexprs_of):
    """Signature from the kernel's argument names: *_ptr are pointers of the problem's dtype (unless
    overridden), negative_slope is fp32, every other runtime argument i32."""

    def aot_signature(problem: Problem, config: Config) -> tuple[dict[str, str], dict[str, Any]]:
        constexprs = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                      "ACTIVATION": activation_code(problem["activation"]),
                      "DOT_PRECISION": "tf32" if problem.get("tf32") else "ieee",
                      "INT64": max(elements(problem).values()) >= INT32_MAX // 2} | constexprs_of(problem)
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
