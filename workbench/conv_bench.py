"""Our fused conv2d against cuDNN on ResNet-18's convolutions: the `workbench bench conv` sweep.

Two sides, each timed forward and forward+backward with the one timing harness (autotune.timing):

- ours: `kernels.conv2d(x, w, b, ..., activation="relu")`, one Triton kernel per direction with the
  bias and activation fused, launched with its tuned config (kernels.tuned lookup) or the default;
- cuDNN: what an unfused model pays, `F.conv2d(x, w)`, then `+ b[:, None, None]`, then the activation,
  as separate PyTorch ops (cuDNN picks its algorithms itself: `cudnn.benchmark` is on during the sweep).

forward+backward is one forward with autograd recording and `torch.autograd.grad` of the output
with respect to x, w and b (no .grad accumulation), on both sides; its FLOPs are counted as three
convolutions (forward, input gradient, weight gradient), the elementwise work not at all.

The cases are RESNET18_CONV_SHAPES (ImageNet, 224x224 input) and their 32x32-input (CIFAR-style)
counterparts, at batch 64 and 256, in fp16 and bf16 channels_last and fp32 NCHW. The 32x32
network is the usual CIFAR ResNet-18: the stem is a 3x3 stride-1 conv (3 -> 64 channels) at 32x32
with no max-pool, so layer1 runs at the input resolution; every other layer keeps its channels,
kernel, stride and padding, and its spatial size is the ImageNet one scaled by 32/56 (layer1 runs
at 56x56 in the 224 network): 56 -> 32, 28 -> 16, 14 -> 8, 7 -> 4.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch

from triton_workbench import kernels
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
from triton_workbench.kernels.conv_geometry import conv_problem, make_geometry, problem_geometry
from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.spec import Problem, problem_id

INPUT_SIZES = (224, 32)
BATCHES = (64, 256)
BENCH_DTYPES = ("fp16", "bf16", "fp32")
LAYOUTS = {"fp16": "nhwc", "bf16": "nhwc", "fp32": "nchw"}  # half precision channels_last, fp32 NCHW
PASSES = ("fwd", "fwd+bwd")
KERNEL = "conv2d"  # the op both passes run (conv_fwd, and conv_dgrad + conv_wgrad behind its autograd)
IMAGENET_LAYER1_HW = 56  # 224 after the stride-2 stem and the stride-2 max-pool
CIFAR_STEM = {"name": "conv1", "c_in": 3, "h": 32, "w": 32, "c_out": 64, "kh": 3, "kw": 3, "stride": 1, "padding": 1}

Outputs = tuple[torch.Tensor, ...]

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


@dataclass(frozen=True)
class ConvBenchCase:
    """One conv to time: a ResNet-18 layer (or an explicit problem) at one batch size and dtype."""

    layer: str
    input_size: int | None  # the network's input resolution; None for an explicit --shapes problem
    problem: Problem  # a conv_geometry.conv_problem: sizes, geometry, dtype, layout, activation, bias, tf32 (fp32)

    @property
    def batch(self) -> int:
        return self.problem["n"]

    @property
    def dtype(self) -> str:
        return self.problem["dtype"]

    def describe(self) -> str:
        """The conv in one short phrase, e.g. '64x56x56 -> 128 3x3/2'."""
        p = self.problem
        stride = p["stride"][0] if len(set(p["stride"])) == 1 else "x".join(map(str, p["stride"]))
        return f"{p['c_in']}x{p['h']}x{p['w']} -> {p['c_out']} {p['kh']}x{p['kw']}/{stride}"


def resnet18_shapes(input_size: int) -> tuple[dict[str, Any], ...]:
    """ResNet-18's conv shapes for a 224x224 input (as recorded) or a 32x32 one (derived: module docstring)."""
    if input_size == 224:
        return RESNET18_CONV_SHAPES
    if input_size == 32:
        scaled = tuple(shape | {"h": shape["h"] * 32 // IMAGENET_LAYER1_HW, "w": shape["w"] * 32 // IMAGENET_LAYER1_HW}
                       for shape in RESNET18_CONV_SHAPES if shape["name"] != "conv1")
        return (CIFAR_STEM, *scaled)
    raise UsageError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")


def resnet18_problem(shape: dict[str, Any], batch: int = 32, dtype: str = "fp16", layout: str = "nhwc",
                     activation_name: str | None = "relu", bias: bool = True) -> Problem:
    """A conv problem for one RESNET18_CONV_SHAPES entry (ResNet's conv has BN after it; the fused
    bias + ReLU stands for BN folded into the conv at inference)."""
    geometry = make_geometry((shape["kh"], shape["kw"]), shape["stride"], shape["padding"])
    return conv_problem(batch, shape["c_in"], shape["h"], shape["w"], shape["c_out"], shape["kh"], shape["kw"],
                        geometry, dtype, layout, activation_name, bias)


def with_policy(problem: Problem, tf32: bool) -> Problem:
    """The problem as this sweep runs it: fp32 states the TF32 policy, half precision nothing more."""
    problem = dict(problem)
    if problem["dtype"] == "fp32":
        problem["tf32"] = tf32
    else:
        problem.pop("tf32", None)
    return problem


def resnet18_cases(batches: Sequence[int] = BATCHES, input_sizes: Sequence[int] = INPUT_SIZES,
                   dtypes: Sequence[str] = BENCH_DTYPES, tf32: bool = True,
                   activation: str | None = "relu") -> list[ConvBenchCase]:  # fmt: skip
    """Every layer of resnet18_shapes(size) x batch x dtype, ordered by input size, batch, dtype, layer."""
    for batch in batches:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"batch sizes must be positive ints, got {batch!r}")
    for dtype in dtypes:
        if dtype not in BENCH_DTYPES:
            raise UsageError(f"dtype must be one of {BENCH_DTYPES}, got {dtype!r}")
    return [
        ConvBenchCase(shape["name"], size, with_policy(
            resnet18_problem(shape, batch, dtype, LAYOUTS[dtype], activation, bias=True), tf32))
        for size in input_sizes for batch in batches for dtype in dtypes for shape in resnet18_shapes(size)
    ]


def explicit_cases(problems: Sequence[Problem], tf32: bool = True) -> list[ConvBenchCase]:
    """Cases for explicit problems (from --shapes), named by their sizes."""
    return [ConvBenchCase(",".join(str(p[k]) for k in CONV_FWD_SPEC.shape_keys), None, with_policy(p, tf32))
            for p in problems]


# ----------------------------------------------------------------------------------------------
# What is timed


def _ours(problem: Problem) -> Callable[..., torch.Tensor]:
    """y = kernels.conv2d(x, w, b, ...) with the problem's geometry and fused activation."""
    g = problem_geometry(problem)
    if (g.pad_top, g.pad_left) != (g.pad_bottom, g.pad_right):
        raise UsageError(f"problem padding must be symmetric for kernels.conv2d, got {problem['padding']}")
    return lambda x, w, b: kernels.conv2d(x, w, b, (g.stride_h, g.stride_w), (g.pad_top, g.pad_left),
                                          (g.dilation_h, g.dilation_w), g.groups, problem["activation"])


def _unfused(problem: Problem) -> Callable[..., torch.Tensor]:
    """y = act(F.conv2d(x, w) + b[:, None, None]): three PyTorch ops (the conv spec's baseline)."""
    fixed = {"geometry": problem_geometry(problem), "activation": problem["activation"]}
    return lambda x, w, b: CONV_FWD_SPEC.baseline({"x": x, "weight": w, "bias": b, **fixed})


IMPLEMENTATIONS: dict[str, Callable[[Problem], Callable[..., torch.Tensor]]] = {"ours": _ours, "cudnn": _unfused}


def pass_callables(implementation: str, problem: Problem, inputs: dict[str, Any]) -> dict[str, Callable[[], Outputs]]:
    """{"fwd": ..., "fwd+bwd": ...}: zero-argument calls of one side on `inputs` (CONV_FWD_SPEC.make_inputs).

    fwd returns (y,) computed under no_grad; fwd+bwd returns (y, dx, dw[, db]) from one forward with
    autograd and torch.autograd.grad against inputs["grad_output"].
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {sorted(IMPLEMENTATIONS)}, got {implementation!r}")
    forward = IMPLEMENTATIONS[implementation](problem)
    tensors = (inputs["x"], inputs["weight"], inputs["bias"])
    leaves = tuple(t.detach().requires_grad_(True) if t is not None else None for t in tensors)
    grad_output = inputs["grad_output"]

    def fwd() -> Outputs:
        with torch.no_grad():
            return (forward(*tensors),)

    def fwd_bwd() -> Outputs:
        y = forward(*leaves)
        return (y.detach(), *torch.autograd.grad(y, [t for t in leaves if t is not None], grad_output))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def pass_flops(problem: Problem, pass_name: str) -> int:
    """FLOPs of a pass: one convolution forward, three (forward, dgrad, wgrad) forward+backward."""
    return CONV_FWD_SPEC.flops(problem) * {"fwd": 1, "fwd+bwd": 3}[pass_name]


def max_relative_difference(outputs: Outputs, references: Outputs) -> float:
    """The largest `relative_error` over paired outputs (inf if they do not pair up): a check that both
    sides compute the same thing, not an accuracy measurement."""
    from triton_workbench.autotune.pipeline import relative_error

    if len(outputs) != len(references):
        return math.inf
    return max((relative_error(a, b) for a, b in zip(outputs, references)), default=0.0)


# ----------------------------------------------------------------------------------------------
# The sweep


@contextmanager
def tf32_policy(enabled: bool) -> Iterator[None]:
    """cuDNN's and cuBLAS's TF32 switches set to `enabled` (our fp32 kernels follow cudnn.allow_tf32), and
    cuDNN's own algorithm autotuning on, while the block runs; the previous settings come back after."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        # cuDNN's flags through its own context manager, which works also where global flag setting
        # is disabled (torch.testing does that)
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=enabled):
            yield
    finally:
        matmul.allow_tf32 = saved


def measure_case(case: ConvBenchCase, device: torch.device) -> list[dict[str, Any]]:
    """One row per pass: both sides timed with autotune.timing.measure, after one checked call each."""
    from triton_workbench.autotune.timing import measure

    inputs = CONV_FWD_SPEC.make_inputs(case.problem, device)
    inputs.pop("pre")  # the spec's saved pre-activation for its backward kernels: neither side reads it
    ours, cudnn = (pass_callables(side, case.problem, inputs) for side in ("ours", "cudnn"))
    rows = []
    for pass_name in PASSES:
        difference = max_relative_difference(ours[pass_name](), cudnn[pass_name]())
        time_ms = measure(ours[pass_name]).time_ms
        baseline_ms = measure(cudnn[pass_name]).time_ms
        flops = pass_flops(case.problem, pass_name)
        rows.append({
            "layer": case.layer, "conv": case.describe(), "batch": case.batch,
            "input size": case.input_size if case.input_size is not None else "-", "dtype": case.dtype,
            "pass": pass_name, "our time_ms": time_ms, "cuDNN time_ms": baseline_ms,
            "our TFLOP/s": flops / time_ms / 1e9, "cuDNN TFLOP/s": flops / baseline_ms / 1e9,
            "ratio": baseline_ms / time_ms, "max rel diff": difference,
        })  # fmt: skip
    return rows


def database_rows(case: ConvBenchCase, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The "baselines" rows of one case: kernel, problem JSON, pass, times, ratio (plus layer and sizes)."""
    return pd.DataFrame([{
        "kernel": KERNEL, "problem": problem_id(case.problem), "pass": row["pass"],
        "layer": case.layer, "input_size": case.input_size, "time_ms": row["our time_ms"],
        "baseline_time_ms": row["cuDNN time_ms"], "ratio": row["ratio"], "baseline": "cudnn",
        "max_rel_diff": row["max rel diff"],
    } for row in rows])  # fmt: skip


def epilogue(cases: Sequence[ConvBenchCase]) -> str:
    """What both sides add after the conv, e.g. 'bias + relu' (as the cases have it)."""
    activations = {case.problem["activation"] for case in cases}
    parts = ["bias"] if any(case.problem["bias"] for case in cases) else []
    if activations != {None}:
        parts.append(str(activations.pop()) if len(activations) == 1 else "activation")
    return " + ".join(parts)


def title(device: str, tf32: bool, cases: Sequence[ConvBenchCase]) -> str:
    """The table's title: both sides, the TF32 policy and how to read the ratio."""
    added = epilogue(cases)
    unfused = f"conv, then {added.replace(' + ', ', then ')} as separate ops" if added else "conv"
    return (f"conv2d{' + ' + added if added else ''} on {device}: ours (fused Triton, tuned or default config) vs "
            f"cuDNN (PyTorch {torch.__version__}: {unfused}; cudnn.benchmark on).\nfp32 TF32 {'on' if tf32 else 'off'} "
            f"on both sides (torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = {tf32}). "
            f"ratio = cuDNN time / ours (> 1: ours faster); fwd+bwd counts 3 convs of FLOPs.")


def run_sweep(cases: Sequence[ConvBenchCase], db: str | None, tf32: bool, progress: bool = True) -> pd.DataFrame:
    """Time every case (a GPU is expected), store each case's rows as it finishes, print the table; return it.

    A case that runs out of GPU memory is skipped with a note. Ctrl-C keeps the cases already stored (the run
    is marked interrupted) and still prints the table of what was measured.
    """
    from tqdm import tqdm

    from triton_workbench.database import Database, RunKind, SeriesTable
    from triton_workbench.database.environment import device_key
    from triton_workbench.kernels import runtime
    from triton_workbench.workbench.tables import format_table

    device = device_key().device
    meta = {"cases": len(cases), "passes": list(PASSES), "tf32": tf32, "cudnn_benchmark": True,
            "problems": [case.problem for case in cases]}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    database = Database(db)
    bar = tqdm(cases, desc="bench conv", unit="case", disable=not progress)
    try:
        with tf32_policy(tf32), database.run(RunKind.BENCH, KERNEL, meta) as run_id:
            best_ratio = 0.0
            for case in bar:
                label = f"{case.input_size or 'explicit'}/{case.layer}/n{case.batch}/{case.dtype}"
                case_rows = None
                try:
                    case_rows = measure_case(case, runtime.default_device())
                except torch.OutOfMemoryError:
                    pass  # handled below, once the traceback no longer holds the case's tensors
                if case_rows is None:
                    torch.cuda.empty_cache()
                    skipped.append(f"{label}: out of GPU memory, skipped")
                    bar.write(f"note: {skipped[-1]}")
                    continue
                database.append(SeriesTable.BASELINES, run_id, database_rows(case, case_rows))
                rows.extend(case_rows)
                best_ratio = max(best_ratio, *(row["ratio"] for row in case_rows))
                bar.set_postfix_str(f"{label}, best ratio {best_ratio:.3g}")
    finally:  # what was measured is shown even when Ctrl-C ends the sweep early
        bar.close()
        print(title(device, tf32, cases))
        print(format_table(pd.DataFrame(rows)))
        for note in skipped:
            print(f"note: {note}")
    return pd.DataFrame(rows)
