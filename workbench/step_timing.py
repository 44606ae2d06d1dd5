"""A whole model's training step timed, eager PyTorch against the swapped model: `workbench bench model MODEL`.

Both sides start from the same weights (the swapped model is `kernels.nn.swap` of a copy of the eager
one, made after it was moved to the device, dtype and channels_last: swap keeps layers whose parameters
the kernels cannot take where they are in PyTorch). A step is forward, cross-entropy and backward on one
fixed batch, gradients set to None first (the optimizer step is the same for both and left out, as in
`bench model --traffic`). Each side is timed with the one timing harness (autotune.timing: CUDA events
and the L2 flushed between calls on a GPU); the first call compiles every kernel the step launches and
is not timed, but its wall-clock time is reported (first_step_s: mostly Triton's compilation on a fresh
cache). On CUDA each side is timed twice: launched op by op as a training loop runs it (time_ms: the host's
work for each launch included, where it is slower than the GPU), and replayed as one CUDA graph (graph_ms:
the GPU's time alone). Also reported: the peak device memory of a step and the loss of the first one, so a swapped
model that diverges shows beside its speed.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from triton_workbench.autotune.timing import measure
from triton_workbench.kernels import runtime

SIDES = ("eager", "swapped")
log = logging.getLogger("triton_workbench.workbench")


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward, cross-entropy and backward of `model` on (x, labels); returns the loss (detached)."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        return loss.detach()

    return step


def _peak_memory_gb(step: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def graph_replay(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None] | None:
    """The step captured as one CUDA graph, PyTorch's whole-network recipe (warm-up on a side stream, gradients
    then allocated by the capture), as its replay; None off CUDA. Replaying it runs the step's kernels with no
    host work between them: its time is the GPU's, whatever each launch costs the host."""
    if x.device.type != "cuda":
        return None
    step = training_step(model, x, labels)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # its zero_grad sets the gradients to None: the capture's backward allocates them
    return graph.replay


def _time_side(side: str, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, warmup_ms: float,
               rep_ms: float, interpreter_reps: int) -> dict:
    step = training_step(model, x, labels)
    started = time.perf_counter()
    first_loss = float(step())  # compiles every kernel the step launches (float() waits for the step)
    first_step_s = time.perf_counter() - started
    step()  # cuDNN's algorithm search (benchmark mode) done before the timing's first estimate
    timing = measure(step, warmup_ms=warmup_ms, rep_ms=rep_ms, interpreter_reps=interpreter_reps)
    return {"side": side, "time_ms": timing.time_ms, "time_ms_p20": timing.time_ms_p20,
            "time_ms_p80": timing.time_ms_p80, "images_per_s": x.shape[0] / timing.time_ms * 1e3,
            "peak_memory_gb": _peak_memory_gb(step, x.device), "first_loss": first_loss,
            "first_step_s": first_step_s, "graph_ms": _graph_ms(model, x, labels, warmup_ms, rep_ms),
            "timer": timing.timer}


def _graph_ms(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, warmup_ms: float, rep_ms: float) -> float:
    """The step's time replayed as a CUDA graph; NaN off CUDA or where capture fails (logged: the launched
    timing stands). The graph and its memory pool are released on return."""
    try:
        replay = graph_replay(model, x, labels)
    except RuntimeError as error:
        log.warning("the step could not be captured as a CUDA graph (%s); graph_ms left empty", error)
        return float("nan")
    return float("nan") if replay is None else measure(replay, warmup_ms=warmup_ms, rep_ms=rep_ms).time_ms


def compare(model: nn.Module, batch: int, image_size: int, num_classes: int, dtype: torch.dtype,
            device: torch.device | None = None, warmup_ms: float = 200.0, rep_ms: float = 1000.0,
            interpreter_reps: int = 3, seed: int = 0) -> pd.DataFrame:
    """One row per side (eager, swapped) for a training step of `model` (its initial weights, both sides):
    time_ms with p20/p80, images_per_s, peak_memory_gb, first_loss, first_step_s, graph_ms (NaN off CUDA), the
    timer, and speedup / graph_speedup (eager's time / this side's)."""
    from triton_workbench.kernels.nn import swap

    device = device or runtime.default_device()
    torch.manual_seed(seed)
    eager = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).train()
    models = {"eager": eager, "swapped": swap(copy.deepcopy(eager))}
    x = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):  # eager's convs: cuDNN's fastest, throughout
        rows = [_time_side(side, models[side], x, labels, warmup_ms, rep_ms, interpreter_reps) for side in SIDES]
    table = pd.DataFrame(rows)
    for time_column, speedup in (("time_ms", "speedup"), ("graph_ms", "graph_speedup")):
        table[speedup] = table[time_column].iloc[0] / table[time_column]  # eager's / this side's: > 1 is faster
    return table
