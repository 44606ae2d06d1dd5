"""The one timing harness: every time the workbench reports (tune, bench) is taken here.

On a GPU it is `triton.testing.do_bench`: CUDA events, the L2 cache flushed before each call,
warm-up first, and the median with the 20th/80th percentiles of the repetitions. In Triton's
interpreter (no GPU) it is the wall clock around whole calls, median and percentiles of a few
repetitions, labelled timer='interpreter' so it is never mistaken for a GPU figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from triton_workbench.kernels import runtime


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentile of a call's time, and how it was taken."""

    time_ms: float
    time_ms_p20: float
    time_ms_p80: float
    timer: str  # 'cuda_events' | 'interpreter'


def measure(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            interpreter_reps: int = 3) -> Timing:  # fmt: skip
    """Time `fn()` on this machine's timer (see the module docstring).

    `warmup_ms`/`rep_ms` are do_bench's time budgets on a GPU; in the interpreter `fn` runs once
    to warm up and `interpreter_reps` times measured (each call takes milliseconds to seconds).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if runtime.timer_name() == "cuda_events":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(p20), float(p80), "cuda_events")
    if interpreter_reps < 1:
        raise ValueError(f"interpreter_reps must be >= 1, got {interpreter_reps}")
    fn()
    times_ms = []
    for _ in range(interpreter_reps):
        start = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = np.quantile(times_ms, [0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), "interpreter")
