"""Activations as `@triton.jit` device functions, and a standalone elementwise kernel.

The device functions are shared by every fused epilogue (GEMM, conv) through `apply` and
`derivative`, selected by a `tl.constexpr` integer code (`CODES`), so an unused activation costs
nothing. Derivatives are taken from the *pre-activation* value, which the forward keeps when a
gradient is needed. Only core `tl.*` math is used (no libdevice), so everything runs in Triton's
interpreter too: tanh is written through the sigmoid, gelu through `tl.math.erf`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.spec import (DTYPE_ENTRY, DTYPES, Config, KernelSpec, Problem, choice, dtype_name, flag,
                                          size)

# constexpr code of each activation; None (identity) is 0 so `if ACTIVATION:` means "has one"
CODES: dict[str | None, int] = {
    None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "sigmoid": 6, "tanh": 7,
}
NAMES: tuple[str, ...] = tuple(name for name in CODES if name is not None)
ACTIVATION_ENTRY = choice(None, *NAMES)  # the "activation" of a problem (kernels write None, never "identity")
DEFAULT_NEGATIVE_SLOPE = 0.01


def activation_code(name: str | None) -> int:
    """The constexpr code for an activation name (None or "identity" mean no activation)."""
    if name == "identity":
        name = None
    if name not in CODES:
        raise ValueError(f"activation must be None or one of {', '.join(NAMES)}, got {name!r}")
    return CODES[name]


# Constants inside the kernels, written out (jit code cannot read plain module globals):
# 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2*pi), 1.5957691216057308 = 2*sqrt(2/pi),
# 0.044715 = the cubic coefficient of gelu's tanh approximation.


@jit
def _sigmoid(x):
    # evaluated on -|x| so exp never overflows and tiny results keep their relative precision
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@jit
def _sigmoid_slope(x):
    # sigmoid'(x) = e / (1 + e)^2 with e = exp(-|x|): s * (1 - s) would round to 0 once s rounds to 1
    e = tl.exp(-tl.abs(x))
    return e / ((1.0 + e) * (1.0 + e))


@jit
def _tanh(x):
    # tanh(x) = (1 - e) / (1 + e) with e = exp(-2|x|), so exp never overflows to inf/inf; below
    # |x| = 1/16, where 1 - e cancels, its Taylor series (truncation error < 1e-11 relative), which
    # also keeps tiny and denormal inputs exact as PyTorch does (tanh(1e-40) = 1e-40, not 0)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 - x2 * (0.3333333333333333 - x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
    return tl.where(tl.abs(x) < 0.0625, series, t)


@jit
def apply(x, ACTIVATION: tl.constexpr, negative_slope):
    """activation(x) for an fp32 tile `x`; ACTIVATION is a code from `CODES`."""
    if ACTIVATION == 1:
        y = tl.where(x < 0, 0.0, x)  # NaN and -0.0 stay what they are, as in PyTorch (tl.maximum drops NaN)
    elif ACTIVATION == 2:
        y = tl.where(x > 0, x, x * negative_slope)
    elif ACTIVATION == 3:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 4:
        # 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u): no cancellation where tanh(u) -> -1
        y = x * _sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == 5:
        y = x * _sigmoid(x)
    elif ACTIVATION == 6:
        y = _sigmoid(x)
    elif ACTIVATION == 7:
        y = _tanh(x)
    else:
        y = x
    return y


@jit
def derivative(x, ACTIVATION: tl.constexpr, negative_slope):
    """d activation / dx at the pre-activation fp32 tile `x` (PyTorch's conventions at kinks)."""
    if ACTIVATION == 1:
        d = tl.where(x <= 0, 0.0, 1.0)  # at NaN the gradient passes, as PyTorch's threshold_backward does
    elif ACTIVATION == 2:
        d = tl.where(x > 0, 1.0, negative_slope)
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == 4:
        s = _sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        d = s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == 5:
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == 6:
        d = _sigmoid_slope(x)
    elif ACTIVATION == 7:
        d = 4.0 * _sigmoid_slope(2.0 * x)  # 1 - tanh(x)^2, without the cancellation near |x| large
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@jit
def activation_kernel(x_ptr, grad_ptr, out_ptr, n_elements, negative_slope,
                      ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """out = act(x) (forward) or out = grad * act'(x) (BACKWARD) over contiguous flat tensors."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out = grad * derivative(x, ACTIVATION, negative_slope)
    else:
        out = apply(x, ACTIVATION, negative_slope)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launcher


def _problem(x: torch.Tensor, name: str | None, backward: bool) -> Problem:
    return {"numel": x.numel(), "dtype": dtype_name(x.dtype), "activation": name, "backward": backward}


def _read_in_place(x: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether the flat kernel can walk x (and grad) where they lie: contiguous or channels_last, grad with x's strides."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return dense and (grad is None or grad.stride() == x.stride())


def output_like(x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """An empty tensor laid out as `run`'s result for these inputs (the ops' fake kernels use it too)."""
    return torch.empty_like(x, memory_format=torch.preserve_format if _read_in_place(x, grad)
                            else torch.contiguous_format)


def run(x: torch.Tensor, name: str | None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        grad: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """act(x), or grad * act'(x) when `grad` is given; a new tensor shaped like x.

    The kernel walks flat memory: a contiguous or channels_last x with a grad of the same strides is read
    in place and the result keeps that layout (`output_like`); other inputs are made contiguous first.
    """
    runtime.announce()
    code = activation_code(name)
    out = output_like(x, grad)
    if not _read_in_place(x, grad):
        x, grad = x.contiguous(), grad.contiguous() if grad is not None else None
    grad = x if grad is None else grad
    backward = grad is not x
    if x.numel() == 0:
        return out
    problem = _problem(x, name, backward)
    config = config if config is not None else tuned.config_for(ACTIVATION_SPEC, problem)
    activation_kernel[_grid(problem, config)](
        x, grad, out, x.numel(), float(negative_slope),
        ACTIVATION=code, BACKWARD=backward, BLOCK_SIZE=config["BLOCK_SIZE"], num_warps=config["num_warps"],
        **runtime.LAUNCH_OPTIONS)
    return out


# ---------------------------------------------------------------------------------------------
# KernelSpec


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    return (triton.cdiv(problem["numel"], config["BLOCK_SIZE"]),)


def _default_config(problem: Problem) -> Config:
    block = 1024 if problem["numel"] >= 1024 else max(128, triton.next_power_of_2(problem["numel"]))
    return {"BLOCK_SIZE": block, "num_warps": 4 if block >= 512 else 2}


def _make_inputs(problem: Problem, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[problem["dtype"]]
    x = (torch.randn(problem["numel"], generator=generator) * 3).to(device=device, dtype=dtype)
    inputs: dict[str, Any] = {"x": x, "activation": problem["activation"]}
    if problem.get("backward"):
        inputs["grad"] = torch.randn(problem["numel"], generator=generator).to(device=device, dtype=dtype)
    return inputs


def _launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return run(inputs["x"], inputs["activation"], grad=inputs.get("grad"), config=config)


def torch_activation(x: torch.Tensor, name: str | None,
                     negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """The same activation computed by PyTorch (the reference and the unfused baseline)."""
    functions = {
        None: lambda t: t,
        "relu": torch.nn.functional.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, negative_slope),
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }
    return functions[None if name == "identity" else name](x)


def _torch_result(inputs: dict[str, Any], dtype: torch.dtype | None) -> torch.Tensor:
    x = inputs["x"].detach().to(dtype or inputs["x"].dtype)
    if "grad" not in inputs:
        return torch_activation(x, inputs["activation"])
    x.requires_grad_(True)
    (grad_x,) = torch.autograd.grad(torch_activation(x, inputs["activation"]), x, inputs["grad"].to(x.dtype))
    return grad_x


def _bytes(problem: Problem) -> int:
    tensors = 3 if problem.get("backward") else 2
    return tensors * problem["numel"] * DTYPES[problem["dtype"]].itemsize


ACTIVATION_SPEC = KernelSpec(
    name="activation",
    kernel=activation_kernel,
    params={"BLOCK_SIZE": [128, 256, 512, 1024, 2048, 4096, 8192], "num_warps": [1, 2, 4, 8, 16]},
    constraints=[
        # every thread owns at least one element and at most 32 (at 64 ptxas spills on sm_90)
        lambda config, problem: 32 * config["num_warps"] <= config["BLOCK_SIZE"] <= 32 * 32 * config["num_warps"],
    ],
    default_config=_default_config,
    make_inputs=_make_inputs,
    launch=_launch,
    reference=lambda inputs: _torch_result(inputs, torch.float64),
    flops=lambda problem: problem["numel"] * (2 if problem.get("backward") else 1),
    bytes=_bytes,
    grid=_grid,
    baseline=lambda inputs: _torch_result(inputs, None),
    example_problems=tuple(
        {"numel": 1 << 20, "dtype": dtype, "activation": "gelu", "backward": False} for dtype in ("fp32", "fp16", "bf16")
    ),
    shape_keys=("numel",),
    problem_schema={"numel": size(), "dtype": DTYPE_ENTRY, "activation": ACTIVATION_ENTRY, "backward": flag()},
)

__all__ = ["ACTIVATION_SPEC", "CODES", "NAMES", "activation_code", "apply", "derivative", "run", "torch_activation"]
