"""Activations as `@triton.jit` device functions, and a standalone elementwise kernel.

The device functions are shared by every fused epilogue (GEMM, conv) through `apply` and
`derivative`, selected by a `tl.constexpr` integer code (`CODES`), so an unused activation costs
nothing. Derivatives are taken from the *pre-activation* value, which the forward keeps when a
gradient is needed. Only core `tl.*` math is used (no libdevice), so everything runs in Triton's
interpreter too: tanh is written through the sigmoid, gelu through `tl.math.erf`, expm1 and log1p
through exp and log with their rounding error corrected.

Every kernel carries one float, the activation's parameter (`negative_slope` in the kernels'
signatures): leaky_relu's negative_slope, elu's and celu's alpha; the other activations ignore it.
Semantics are PyTorch's as its scalar CPU and its CUDA kernels agree on them; its vectorised CPU kernels
(taken on longer tensors) give some gradients at NaN differently (relu6: 0, elu/celu/selu/hardswish: NaN,
where the others give the gradient passing through).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton.language as tl

from triton_workbench.kernels import runtime, tuned
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.spec import (DTYPE_ENTRY, DTYPES, Config, KernelSpec, Problem, choice, dtype_name, flag,
                                          size)

# constexpr code of each activation; None (identity) is 0 so `if ACTIVATION:` means "has one"
CODES: dict[str | None, int] = {
    None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "sigmoid": 6, "tanh": 7,
    "relu6": 8, "hardswish": 9, "hardsigmoid": 10, "mish": 11, "elu": 12, "celu": 13, "selu": 14, "softplus": 15,
}
NAMES: tuple[str, ...] = tuple(name for name in CODES if name is not None)
ACTIVATION_ENTRY = choice(None, *NAMES)  # the "activation" of a problem (kernels write None, never "identity")
DEFAULT_NEGATIVE_SLOPE = 0.01
# the activations that take the parameter: PyTorch's keyword for it and its default there
PARAMETERS: dict[str, tuple[str, float]] = {
    "leaky_relu": ("negative_slope", DEFAULT_NEGATIVE_SLOPE), "elu": ("alpha", 1.0), "celu": ("alpha", 1.0),
}


def default_parameter(name: str | None) -> float:
    """The parameter `name` runs with when none is given (PyTorch's default; any value for those that ignore it)."""
    return PARAMETERS[name][1] if name in PARAMETERS else DEFAULT_NEGATIVE_SLOPE


def parameter(name: str | None, value: float | None) -> float:
    """The parameter a launch of activation `name` passes: `value`, or `default_parameter(name)` when None."""
    return default_parameter(name) if value is None else float(value)


def activation_code(name: str | None) -> int:
    """The constexpr code for an activation name (None or "identity" mean no activation)."""
    if name == "identity":
        name = None
    if name not in CODES:
        raise ValueError(f"activation must be None or one of {', '.join(NAMES)}, got {name!r}")
    return CODES[name]


# Constants inside the kernels, written out (jit code cannot read plain module globals):
# 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2*pi), 1.5957691216057308 = 2*sqrt(2/pi),
# 0.044715 = the cubic coefficient of gelu's tanh approximation, 1.0507009873554805 = selu's scale,
# 1.7580993408473766 = selu's alpha * scale (PyTorch's constants), 0.16666666666666666 = 1/6.


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
def _expm1(x):
    # exp(x) - 1 by Kahan's correction (u - 1) * x / log(u): the rounding of u = exp(x) cancels, so results
    # near 0 keep their relative precision and -0.0 / tiny inputs come back exact, as PyTorch's expm1 does
    u = tl.exp(x)
    um1 = u - 1.0
    y = tl.where(u == 1.0, x, um1 * (x / tl.log(u)))
    return tl.where(um1 == -1.0, -1.0, tl.where(x > 88.0, u, y))  # u - 1 = u there, and inf past exp's range


@jit
def _log1p(x):
    # log(1 + x) for x >= 0 by Goldberg's correction log(u) * x / (u - 1): exact where 1 + x rounds to 1
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@jit
def _clamp(x, low, high):
    # min(max(x, low), high) that keeps NaN and -0.0 (tl.maximum / tl.minimum drop NaN), as torch.clamp does
    return tl.where(x < low, low, tl.where(x > high, high, x))


@jit
def _mish_parts(x):
    # (tanh(softplus(x)), 1 - tanh(softplus(x))^2) with e = exp(-|x|), never overflowing and without cancellation:
    # tanh(log(1 + E)) = n / (n + 2) with n = E (E + 2), E = exp(x); for x > 0 numerator and denominator are
    # divided by E^2, and 1 - t^2 = 4 (n + 1) / (n + 2)^2 with n + 1 = (1 + E)^2
    e = tl.exp(-tl.abs(x))
    positive = x > 0
    numerator = tl.where(positive, 1.0 + 2.0 * e, e * (e + 2.0))
    denominator = tl.where(positive, 1.0 + 2.0 * e + 2.0 * e * e, e * (e + 2.0) + 2.0)
    slope = 4.0 * (1.0 + e) * (1.0 + e) * tl.where(positive, e * e, 1.0) / (denominator * denominator)
    return numerator / denominator, slope


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
    elif ACTIVATION == 8:
        y = _clamp(x, 0.0, 6.0)  # hardtanh(x, 0, 6): relu6(-0.0) = -0.0
    elif ACTIVATION == 9:
        y = x * _clamp(x + 3.0, 0.0, 6.0) / 6.0  # as PyTorch writes it: -inf * 0 = NaN, x <= -3 gives -0.0
    elif ACTIVATION == 10:
        y = _clamp(x + 3.0, 0.0, 6.0) / 6.0
    elif ACTIVATION == 11:
        t, _ = _mish_parts(x)
        y = x * t  # mish(-inf) = -inf * 0 = NaN, as PyTorch's x * tanh(log1p(exp(x)))
    elif ACTIVATION == 12:
        y = tl.where(x > 0, x, _expm1(x) * negative_slope)  # negative_slope carries alpha
    elif ACTIVATION == 13:
        y = tl.where(x > 0, x, _expm1(x * (1.0 / negative_slope)) * negative_slope)  # elu with input_scale 1/alpha
    elif ACTIVATION == 14:
        y = tl.where(x > 0, x * 1.0507009873554805, _expm1(x) * 1.7580993408473766)
    elif ACTIVATION == 15:
        y = tl.where(x > 20.0, x, _log1p(tl.exp(x)))  # beta 1, threshold 20: x itself only strictly above 20
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
    elif ACTIVATION == 8:
        d = tl.where((x <= 0) | (x >= 6.0), 0.0, 1.0)  # 0 at both kinks, 1 at NaN (hardtanh_backward)
    elif ACTIVATION == 9:
        d = tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, x / 3.0 + 0.5, 1.0))  # 0 at -3, 1 at 3 and at NaN
    elif ACTIVATION == 10:
        d = tl.where((x > -3.0) & (x < 3.0), 0.16666666666666666, 0.0)  # 0 at +-3 and at NaN
    elif ACTIVATION == 11:
        t, slope = _mish_parts(x)
        d = t + x * _sigmoid(x) * slope  # NaN at +-inf (inf * 0), as PyTorch's mish_backward
    elif ACTIVATION == 12:
        d = tl.where(x <= 0, negative_slope * tl.exp(x), 1.0)  # alpha at 0 (the x <= 0 side), 1 at NaN
    elif ACTIVATION == 13:
        d = tl.where(x <= 0, tl.exp(x * (1.0 / negative_slope)), 1.0)
    elif ACTIVATION == 14:
        d = tl.where(x <= 0, 1.7580993408473766 * tl.exp(x), 1.0507009873554805)
    elif ACTIVATION == 15:
        d = tl.where(x > 20.0, 1.0, _sigmoid(x))  # exp(x) / (exp(x) + 1) up to the threshold
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


def run(x: torch.Tensor, name: str | None, negative_slope: float | None = None,
        grad: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """act(x), or grad * act'(x) when `grad` is given; a new tensor shaped like x. `negative_slope` is the
    activation's parameter (None: its default, see `default_parameter`).

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
    value = parameter(name, negative_slope)
    activation_kernel[_grid(problem, config)](
        x, grad, out, x.numel(), float(value),
        ACTIVATION=code, BACKWARD=backward, BLOCK_SIZE=config["BLOCK_SIZE"], num_warps=config["num_warps"],
        **runtime.LAUNCH_OPTIONS)
    return out


# ---------------------------------------------------------------------------------------------
# KernelSpec


def _grid(problem: Problem, config: Config) -> tuple[int, ...]:
    return (cdiv(problem["numel"], config["BLOCK_SIZE"]),)


def _default_config(problem: Problem) -> Config:
    block = 1024 if problem["numel"] >= 1024 else max(128, next_power_of_2(problem["numel"]))
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


def torch_activation(x: torch.Tensor, name: str | None, negative_slope: float | None = None) -> torch.Tensor:
    """The same activation computed by PyTorch (the reference and the unfused baseline); `negative_slope` is the
    activation's parameter (None: its default)."""
    value = parameter(name, negative_slope)
    functions = {
        None: lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, value),
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu6": F.relu6,
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "mish": F.mish,
        "elu": lambda t: F.elu(t, value),
        "celu": lambda t: F.celu(t, value),
        "selu": F.selu,
        "softplus": F.softplus,
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

__all__ = ["ACTIVATION_SPEC", "CODES", "NAMES", "PARAMETERS", "activation_code", "apply", "default_parameter",
           "derivative", "run", "torch_activation"]
