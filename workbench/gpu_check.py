"""The GPU check (`make gpu-check`): everything that only a GPU can verify, in one command of under 8 minutes.

Steps, each a separate process with its own time limit, run in order against one database in the
output folder (default runs/gpu-check):

1. the GPU-marked tests (`pytest -m gpu`: bf16/TF32 GEMM, real-NVML energy, racing merges, every ResNet-18 conv
   launch against float64) and the device-portable ones (the BatchNorm kernels), torch.compile's aside;
2. a real-NVML `workbench monitor` of a short tuning sweep (the fused GEMM, 4096^3 fp16, 4 configs);
3. `workbench check-compile model resnet18`: every launch of the swapped ResNet-18's training step compiled
   with this machine's Triton, in parallel (which fills Triton's cache for the next step);
4. `workbench bench model resnet18`: a ResNet-18 training step (batch 64, 224x224, fp16), swapped against eager;
5. `workbench bench conv`: ResNet-18's convs at batch 64, 32x32 input, fp16, against cuDNN;
6. `workbench bench gemm`: the GEMM's example problems against cuBLAS (TFLOP/s, % of peak, ratio);
7. the torch.compile test (a swapped model under `torch.compile(fullgraph=True)` against eager);
8. `workbench report` of all of it.

The order puts first what the budget should not cut: correctness, NVML, then the whole model.
A step that fails, or runs past its limit, is recorded and the check goes on; a step that exits 0
without having measured anything (tests skipped, no NVML samples, no benchmark rows) counts as
failed. The whole check stops starting steps once its time budget is spent (the report keeps its
slot). At the end it prints and writes one summary table (summary.txt, summary.json), with each
step's output in logs/, and copies the folder to $OUT/gpu-check when $OUT is set. On a machine
without a GPU it says so and runs nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable

import pandas as pd

from triton_workbench.database import Database, RunKind, SeriesTable, TrialStatus
from triton_workbench.workbench.tables import format_table

DEFAULT_OUT = Path("runs/gpu-check")
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"  # the checkout's tests (not in an installed wheel)
COMPILE_TEST = "test_model_under_torch_compile_matches_eager"  # in tests/test_ops.py
GPU_MARKERS = "gpu or device_portable"  # the pytest markers of the tests the GPU check runs
BUDGET_S = 450.0  # every step together; the check itself adds a few seconds (imports, summary)
MIN_STEP_S = 10.0  # a step with less time left than this is not started
GRACE_S = 15.0  # after Ctrl-C at its time limit, a step gets this long to store what it measured
STEP_LOSS_TOLERANCE = 1e-2  # relative: the swapped step's first loss against eager's, both fp16
MONITORED_GEMM = ("4096,4096,4096", "fp16", "gelu")  # shape, dtype, activation: one of the GEMM's example problems


@dataclass(frozen=True)
class Step:
    """One command of the check."""

    name: str  # short and file-name safe: the log is logs/NN-name.log
    title: str
    argv: tuple[str, ...]
    timeout_s: float
    judge: str  # how success is told beyond exit status 0: a key of JUDGES
    subject: str = ""  # what the judge looks for: the bench run's name (the kernel, or step:MODEL)

    def command(self) -> str:
        return shlex.join(self.argv)


class StepStatus(StrEnum):
    """How a step of the check ended (the summary's `status` column)."""

    PASSED = "passed"
    FAILED = "failed"  # a non-zero exit, or nothing measured
    TIMED_OUT = "timed out"
    INTERRUPTED = "interrupted"  # Ctrl-C: the check stops there
    NOT_RUN = "not run"  # the time budget was spent, or the check was interrupted


@dataclass
class Outcome:
    """What one step did."""

    step: str
    status: StepStatus
    seconds: float
    result: str
    command: str
    log: str


def workbench_argv(python: str, *arguments: str) -> tuple[str, ...]:
    """A `workbench` command line run with `python` (the console script may not be on PATH)."""
    return (python, "-m", "triton_workbench.workbench", *arguments)


def steps(out_dir: Path, db: Path, tests_dir: Path = TESTS_DIR, python: str = sys.executable) -> list[Step]:
    """The check as Steps, in order; the report is last (it keeps its slot of the time budget)."""
    database = ("--db", str(db))
    pytest = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    shape, dtype, activation = MONITORED_GEMM
    tune = workbench_argv(python, "tune", "gemm", "--shape", shape, "--dtype", dtype, "--activation", activation,
                          "--budget", "4", *database)
    return [
        Step("gpu-tests", "GPU-marked and device-portable tests (bf16/TF32 GEMM, real NVML, ResNet-18's convs, "
             "BatchNorm), torch.compile aside",
             (*pytest, "-m", GPU_MARKERS, "-k", f"not {COMPILE_TEST}", str(tests_dir)), 240, "pytest"),
        Step("monitor-tune", "Real-NVML monitor of a 4-config GEMM sweep (4096^3 fp16)",
             workbench_argv(python, "monitor", *database, "--", *tune), 120, "monitor"),
        Step("compile-model", "Every launch of the swapped ResNet-18's step compiled (fills Triton's cache)",
             workbench_argv(python, "check-compile", "model", "resnet18"), 90, "compile"),
        Step("bench-model", "ResNet-18 training step (batch 64, 224x224, fp16), swapped against eager",
             workbench_argv(python, "bench", "model", "resnet18", *database), 240, "step", "step:resnet18"),
        Step("bench-conv", "Fused conv2d against cuDNN (ResNet-18 convs, batch 64, 32x32 input, fp16)",
             workbench_argv(python, "bench", "conv", "--batch", "64", "--input-size", "32", "--dtype", "fp16",
                            *database), 180, "bench", "conv2d"),
        Step("bench-gemm", "Fused GEMM against cuBLAS (its example problems, fp32/TF32, fp16, bf16)",
             workbench_argv(python, "bench", "gemm", *database), 90, "bench", "gemm"),
        Step("torch-compile", "A swapped model under torch.compile(fullgraph=True) against eager",
             (*pytest, f"{tests_dir / 'test_ops.py'}::{COMPILE_TEST}"), 150, "pytest"),
        Step("report", "HTML report of every run",
             workbench_argv(python, "report", "--all", "-o", str(out_dir / "report.html"), *database), 45, "report"),
    ]  # fmt: skip


def gpu_missing_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    from triton_workbench.kernels import runtime

    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    if runtime.INTERPRETER:
        return "Triton kernels run in the interpreter here (TRITON_INTERPRET is set)"
    return None


# ---------------------------------------------------------------------------------------------- running
def run_process(argv: tuple[str, ...], log_path: Path, timeout_s: float, env: dict[str, str],
                tail_lines: int = 400) -> tuple[int | None, str, bool]:
    """Run `argv` in its own process group, its output to the console and `log_path`.

    Returns (exit status, None when it ran past `timeout_s`; the last `tail_lines` lines of output; whether
    Ctrl-C interrupted it). At the limit (or on Ctrl-C) the group gets SIGINT, so a workbench command stores
    what it measured, then SIGKILL after GRACE_S: compile workers and monitored commands go with it.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, text=True, errors="replace", bufsize=1)

        def pump() -> None:
            try:
                for line in process.stdout:
                    log.write(line)
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    tail.append(line.rstrip("\n"))
            except ValueError:  # the log was closed: something outside the group kept the pipe open
                pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        returncode, interrupted = None, False
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process)
        except KeyboardInterrupt:
            interrupted = True
            _stop_group(process)
        reader.join(timeout=5)
    return returncode, "\n".join(tail), interrupted


def _stop_group(process: subprocess.Popen) -> None:
    """SIGINT to the step's process group; after GRACE_S, SIGKILL to whatever of it is left."""
    _signal_group(process, signal.SIGINT)
    try:
        process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)  # the leader if it is still there, and what it left (compile workers)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the group is gone
        pass


def run_steps(plan: list[Step], out_dir: Path, db: Path, budget_s: float = BUDGET_S,
              min_step_s: float = MIN_STEP_S, clock: Callable[[], float] = time.monotonic) -> list[Outcome]:
    """Run every step that fits the budget, each recorded whatever happens; the last step keeps its slot."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORKBENCH_DB": str(db), "PYTHONUNBUFFERED": "1"}
    deadline = clock() + budget_s
    outcomes: list[Outcome] = []
    stopped = False
    for number, step in enumerate(plan, 1):
        log_path = logs / f"{number:02d}-{step.name}.log"
        last = number == len(plan)
        allowed = step.timeout_s if last else min(step.timeout_s, deadline - clock() - plan[-1].timeout_s)
        if stopped or allowed < min_step_s:
            why = "the check was interrupted" if stopped else "the time budget was spent"
            outcomes.append(Outcome(step.name, StepStatus.NOT_RUN, 0.0, why, step.command(), ""))
            continue
        print(f"\n== {number}. {step.title} (limit {allowed:.0f} s)\n$ {step.command()}", flush=True)
        started = clock()
        returncode, output, interrupted = run_process(step.argv, log_path, allowed, env)
        seconds = clock() - started
        passed, result = judge(step, returncode, output, db)
        if interrupted:
            status, stopped = StepStatus.INTERRUPTED, True
        elif returncode is None:
            status = StepStatus.TIMED_OUT
            result = f"stopped at its {allowed:.0f} s limit; {result}"
        else:
            status = StepStatus.PASSED if passed else StepStatus.FAILED
        outcomes.append(Outcome(step.name, status, round(seconds, 1), result, step.command(), str(log_path)))
    return outcomes


# ---------------------------------------------------------------------------------------------- judging
def judge(step: Step, returncode: int | None, output: str, db: Path) -> tuple[bool, str]:
    """(passed, one-line result) of a finished step: exit status 0 and what its judge finds."""
    try:
        passed, result = JUDGES[step.judge](step, output, db)
    except Exception as error:  # a judge must never end the check: a broken database is a result too
        passed, result = False, f"could not read its result ({type(error).__name__}: {error})"
    if returncode not in (0, None):
        return False, f"exit status {returncode}; {result}"
    return passed and returncode == 0, result


def _judge_pytest(step: Step, output: str, db: Path) -> tuple[bool, str]:
    """pytest's closing line; anything skipped, failed or in error is not a pass (a GPU should run them all)."""
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|"
                                                                          r"no tests ran|deselected)\b", line)]
    summary = lines[-1] if lines else (output.splitlines()[-1] if output.strip() else "no output")
    passed = bool(re.search(r"\d+ passed", summary)) and not re.search(r"failed|error|skipped", summary)
    return passed, summary


def _latest_run(database: Database, kind: RunKind, name: str | None = None) -> pd.Series | None:
    runs = database.runs()
    runs = runs[runs["kind"] == kind]
    if name is not None:
        runs = runs[runs["name"] == name]
    return None if runs.empty else runs.iloc[-1]


def _latest_bench_rows(db: Path, name: str, table: SeriesTable) -> pd.DataFrame:
    """`table`'s rows of the latest bench run called `name` (empty when there is none)."""
    database = Database(db)
    try:
        run = _latest_run(database, RunKind.BENCH, name)
        return database.read(table, int(run["run_id"])) if run is not None else pd.DataFrame()
    finally:
        database.close()


def _judge_monitor(step: Step, output: str, db: Path) -> tuple[bool, str]:
    """Passed when the monitor stored NVML samples and the monitored sweep stored correct trials."""
    from triton_workbench.autotune.results import TuningDatabase

    database = TuningDatabase(db)
    try:
        run = _latest_run(database, RunKind.MONITOR)
        if run is None:
            return False, "no monitor run stored"
        samples = database.read(SeriesTable.SAMPLES, int(run["run_id"]))
        windows = database.read(SeriesTable.WINDOWS, int(run["run_id"]))
        tuning = _latest_run(database, RunKind.TUNE)
        trials = database.trials(int(tuning["run_id"])) if tuning is not None else pd.DataFrame()
    finally:
        database.close()
    ok = trials[trials["status"] == TrialStatus.OK] if len(trials) else trials
    sweep = (f"{len(trials)} trials, {len(ok)} correct, best {ok['time_ms'].min():.3g} ms" if len(ok)
             else f"{len(trials)} trials, none correct")
    if samples.empty:
        return False, f"no NVML samples ({run['meta'].get('nvml_reason') or 'NVML unavailable'}); {sweep}"
    measured = f"{len(samples)} NVML samples"
    if len(windows):
        window = windows.iloc[-1]
        measured += (f", {window['energy_j']:.0f} J over {window['duration_s']:.1f} s, "
                     f"avg {window['avg_power_w']:.0f} W, peak {window['peak_power_w']:.0f} W, "
                     f"peak {window['peak_gpu_temp_c']:.0f} C")
    return len(ok) > 0, f"{measured}; {sweep}"


def _judge_bench(step: Step, output: str, db: Path) -> tuple[bool, str]:
    """Passed when the bench run stored rows: how many, and the ratio (PyTorch time / ours; > 1: ours faster)."""
    rows = _latest_bench_rows(db, step.subject, SeriesTable.BASELINES)
    if rows.empty:
        return False, "nothing measured"
    ratio = rows["ratio"].astype(float)
    against = "cuDNN" if step.subject == "conv2d" else "cuBLAS"
    return True, (f"{len(rows)} measurements; {against} time / ours: median {ratio.median():.2f}x "
                  f"(min {ratio.min():.2f}x, max {ratio.max():.2f}x); TFLOP/s and % of peak in its log")


def _judge_step(step: Step, output: str, db: Path) -> tuple[bool, str]:
    """Passed when both sides of the training step were timed and their first losses (same weights, same batch)
    agree to fp16's rounding: a swapped model that computes wrong numbers fast is not a pass."""
    rows = _latest_bench_rows(db, step.subject, SeriesTable.STEP_TIMES)
    if len(rows) != 2:
        return False, "nothing measured"
    eager, swapped = (rows[rows["side"] == side].iloc[0] for side in ("eager", "swapped"))
    agree = math.isfinite(eager["first_loss"]) and math.isclose(swapped["first_loss"], eager["first_loss"],
                                                                 rel_tol=STEP_LOSS_TOLERANCE)
    return agree, (f"eager {eager['time_ms']:.1f} ms, swapped {swapped['time_ms']:.1f} ms a step "
                    f"(eager / swapped {swapped['speedup']:.2f}x); as CUDA graphs {eager['graph_ms']:.1f} / "
                    f"{swapped['graph_ms']:.1f} ms; first loss {eager['first_loss']:.4f} / "
                    f"{swapped['first_loss']:.4f}; first step (compiling) {swapped['first_step_s']:.0f} s swapped")


def _judge_compile(step: Step, output: str, db: Path) -> tuple[bool, str]:
    """check-compile's closing line; passed when nothing failed to compile."""
    lines = [line.strip() for line in output.splitlines() if "distinct compilations" in line]
    if not lines:
        return False, "no compilation summary"
    return lines[-1].endswith(": 0 failed"), lines[-1]


def _judge_report(step: Step, output: str, db: Path) -> tuple[bool, str]:
    report = Path(step.argv[step.argv.index("-o") + 1])
    if not report.is_file():
        return False, f"{report} was not written"
    return True, f"{report} ({report.stat().st_size / 1e6:.1f} MB)"


JUDGES: dict[str, Callable[[Step, str, Path], tuple[bool, str]]] = {
    "pytest": _judge_pytest, "monitor": _judge_monitor, "bench": _judge_bench, "step": _judge_step,
    "compile": _judge_compile, "report": _judge_report,
}


# ---------------------------------------------------------------------------------------------- summary
def summary_table(outcomes: list[Outcome]) -> pd.DataFrame:
    return pd.DataFrame([{"step": number, "name": o.step, "status": o.status, "seconds": o.seconds, "result": o.result}
                         for number, o in enumerate(outcomes, 1)])


def write_summary(outcomes: list[Outcome], out_dir: Path, device: str, seconds: float) -> str:
    """Write summary.txt and summary.json in `out_dir`; return the text."""
    passed = sum(o.status == StepStatus.PASSED for o in outcomes)
    text = (f"gpu-check on {device}: {passed} of {len(outcomes)} steps passed in {seconds:.0f} s\n\n"
            f"{format_table(summary_table(outcomes), float_format='{:.1f}')}\n")
    (out_dir / "summary.txt").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(
        {"device": device, "seconds": round(seconds, 1), "passed": passed, "steps": [asdict(o) for o in outcomes]},
        indent=2) + "\n")
    return text


def copy_to(destination_root: str | None, out_dir: Path) -> Path | None:
    """Copy `out_dir` to DESTINATION_ROOT/gpu-check (the $OUT of a device session); None when unset."""
    if not destination_root:
        return None
    destination = Path(destination_root) / "gpu-check"
    shutil.copytree(out_dir, destination, dirs_exist_ok=True)
    return destination


def fresh_output(out_dir: Path, db: Path) -> None:
    """Remove what an earlier check left (a finished sweep in the database would evaluate nothing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), out_dir / "report.html",
                 out_dir / "summary.txt", out_dir / "summary.json"):
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "logs", ignore_errors=True)


def _device_name() -> str:
    from triton_workbench.database.environment import device_key

    try:
        return device_key().device
    except Exception as error:  # the summary is written whatever state the GPU is in
        return f"an unknown device ({type(error).__name__}: {error})"


def print_plan(plan: list[Step], budget_s: float) -> None:
    print(f"workbench gpu-check runs {len(plan)} steps, at most {budget_s:.0f} s in all:")
    for number, step in enumerate(plan, 1):
        print(f"{number}. {step.title} (limit {step.timeout_s:.0f} s)\n   $ {step.command()}")


def run_gpu_check(out_dir: Path = DEFAULT_OUT, budget_s: float = BUDGET_S, plan_only: bool = False) -> int:
    """The check; 0 when every step passed, 1 when one did not or when there is no GPU (then nothing runs)."""
    db = out_dir / "workbench.db"
    plan = steps(out_dir, db)
    if plan_only:
        print_plan(plan, budget_s)
        return 0
    reason = gpu_missing_reason()
    if reason is not None:
        print(f"workbench gpu-check needs a GPU: {reason}. Nothing was run ({len(plan)} steps; "
              f"`workbench gpu-check --plan` lists them).")  # fmt: skip
        return 1
    fresh_output(out_dir, db)
    print(f"workbench gpu-check: {len(plan)} steps, output in {out_dir}")
    started = time.monotonic()
    outcomes = run_steps(plan, out_dir, db, budget_s)
    text = write_summary(outcomes, out_dir, _device_name(), time.monotonic() - started)
    print(f"\n== Summary\n{text}\nwritten to {out_dir / 'summary.txt'}; report {out_dir / 'report.html'}")
    copied = copy_to(os.environ.get("OUT"), out_dir)
    if copied is not None:
        print(f"copied to {copied}")
    return 0 if all(o.status == StepStatus.PASSED for o in outcomes) else 1
