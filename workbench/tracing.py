"""A torch.profiler trace of a few training steps: a Chrome trace file and a per-op time table.

Ops registered by our kernels live in the `workbench::` namespace; the table labels them (and
their autograd nodes, `GeneratedBackwardFor_workbench_*`) source 'triton' and everything else
'torch', so a report can show where a step's time goes.
In the interpreter the 'triton' times are interpreter times (CPU), never GPU figures.

Reading the table: torch runs a custom op's forward inside an event it names
`GeneratedBackwardFor_workbench_<op>_default` (despite the name, the forward kernels), a child of
`workbench::<op>`; so `workbench::<op>` total time is the op's forward, and the
`workbench::<op>_backward` rows are its backward kernels.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from triton_workbench.database import SeriesTable
from triton_workbench.workbench.tables import format_table
from triton_workbench.workbench.train_recorder import TrainRecorder

TRITON_OP_NAMESPACE = "workbench"
OP_TIME_COLUMNS = ["op", "calls", "self_time_ms", "total_time_ms", "device", "source"]


class StepTracer:
    """Profile steps `warmup_steps + 1 .. warmup_steps + active_steps` of a loop; call `step()` after each.

    The trace is written when the active steps are done or at `finish()`, whichever comes first.
    """

    def __init__(self, trace_path: Path, warmup_steps: int = 1, active_steps: int = 3) -> None:
        if active_steps < 1:
            raise ValueError(f"active_steps must be >= 1, got {active_steps}")
        self.trace_path = trace_path
        self._warmup_steps = warmup_steps
        self._active_steps = active_steps
        self._seen = 0
        self._traced = 0
        self._profile: profile | None = None
        self.op_times: pd.DataFrame | None = None
        if warmup_steps == 0:
            self._start()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(activities=activities)
        self._profile.__enter__()

    def step(self) -> None:
        """Mark the end of one training step."""
        self._seen += 1
        if self._profile is not None:
            self._traced += 1
            if self._traced >= self._active_steps:
                self.finish()
        elif self.op_times is None and self._seen == self._warmup_steps:
            self._start()

    def finish(self) -> pd.DataFrame | None:
        """Stop profiling (if running), write the trace, and return the per-op table (None if nothing ran)."""
        if self._profile is None:
            return self.op_times
        running, self._profile = self._profile, None
        running.__exit__(None, None, None)
        if self._traced == 0:
            return None
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        running.export_chrome_trace(str(self.trace_path))
        self.op_times = op_time_table(running)
        return self.op_times

    @property
    def steps_traced(self) -> int:
        return self._traced


def record_trace(tracer: StepTracer, recorder: TrainRecorder | None) -> None:
    """Finish `tracer`, store its op table with the run (rank 0) and print the ops that took longest."""
    op_times = tracer.finish()
    if op_times is None:
        print("trace: no step was traced (the run ended before the first traced step)")
        return
    if recorder is not None:
        recorder.append(SeriesTable.OP_TIMES, op_times)
    print(f"trace: {tracer.steps_traced} steps traced -> {tracer.trace_path}")
    from triton_workbench.reports.training import op_device  # the report's rule for where a step's kernel time is

    top = op_times[op_times["device"] == op_device(op_times)].nlargest(12, "self_time_ms")
    print(format_table(top, float_format="{:.3f}"))


def is_triton_op(name: str) -> bool:
    """Whether a profiler event is one of our kernels' ops (or its autograd node)."""
    return name.startswith(f"{TRITON_OP_NAMESPACE}::") or f"_{TRITON_OP_NAMESPACE}_" in name


def op_time_table(finished: profile) -> pd.DataFrame:
    """One row per op and device: calls, self and total time in ms, source ('triton' | 'torch').

    CPU rows hold host time (in the interpreter that includes the kernels themselves); on a GPU,
    CUDA rows hold the device time of the kernels each op launched.
    """
    rows = []
    for event in finished.key_averages():
        source = "triton" if is_triton_op(event.key) else "torch"
        rows.append((event.key, event.count, event.self_cpu_time_total / 1e3, event.cpu_time_total / 1e3, "cpu", source))
        device_total_us = getattr(event, "device_time_total", 0.0)
        if device_total_us > 0:
            self_device_us = getattr(event, "self_device_time_total", 0.0)
            rows.append((event.key, event.count, self_device_us / 1e3, device_total_us / 1e3, "cuda", source))
    frame = pd.DataFrame(rows, columns=OP_TIME_COLUMNS)
    return frame.sort_values(["device", "self_time_ms"], ascending=[True, False], ignore_index=True)
