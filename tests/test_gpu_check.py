"""The GPU check's plan and its bookkeeping, on any machine: every step is a valid command, the GPU-marked
tests are every test that skips without CUDA, a failing or hanging step is recorded and the check goes
on, and without a GPU nothing runs."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from triton_workbench import kernels
from triton_workbench.database import Database, RunKind, RunStatus, SeriesTable
from triton_workbench.profiler.windows import WINDOW_COLUMNS
from triton_workbench.workbench import gpu_check
from triton_workbench.workbench.cli import build_parser
from triton_workbench.workbench.cli import main as workbench
from triton_workbench.workbench.commands.tune import build_problem
from triton_workbench.workbench.gpu_check import COMPILE_TEST, Step, StepStatus, judge, run_steps, steps

TESTS = Path(__file__).resolve().parent
WORKBENCH = (sys.executable, "-m", "triton_workbench.workbench")


def workbench_arguments(argv: tuple[str, ...]) -> list[str]:
    assert argv[:3] == WORKBENCH, argv
    return list(argv[3:])


def test_every_step_is_a_workbench_command_or_a_pytest_run_against_the_check_database(tmp_path):
    db = tmp_path / "workbench.db"
    plan = steps(tmp_path, db)
    parser = build_parser()
    commands = []
    for step in plan:
        if step.judge == "pytest":
            assert step.argv[:3] == (sys.executable, "-m", "pytest"), step.name
            continue
        parsed = parser.parse_args(workbench_arguments(step.argv))  # argparse exits on a bad step
        assert parsed.command == "check-compile" or str(parsed.db) == str(db), step.name  # it stores nothing
        commands.append(parsed.command)
        if parsed.command == "monitor":  # the monitored sweep is a workbench command too, on the same database
            monitored = parser.parse_args(workbench_arguments(tuple(parsed.cmd[1:])))
            assert parsed.cmd[0] == "--" and monitored.command == "tune" and str(monitored.db) == str(db)
            assert int(monitored.budget) <= 8
            tuned_problem = build_problem(kernels.SPECS["gemm"], monitored.shape, monitored.dtype,
                                          monitored.activation, monitored.problem)
        if parsed.command == "bench" and parsed.kernel == "gemm":  # it measures the config the sweep stored
            assert parsed.shapes is None and tuned_problem in [dict(p) for p in kernels.SPECS["gemm"].example_problems]
        if parsed.command == "bench" and parsed.kernel == "model":  # timed, so its judge finds the run it stores
            assert not parsed.traffic and step.subject == f"step:{parsed.model}"
    assert commands == ["monitor", "check-compile", "bench", "bench", "bench", "report"]
    assert plan[-1].name == "report" and (tmp_path / "report.html").as_posix() in plan[-1].argv
    assert len({step.name for step in plan}) == len(plan)
    # the step limits and the budget keep the whole check under 8 minutes, with room for its own start and summary
    assert gpu_check.BUDGET_S <= 8 * 60 - 20 and all(step.timeout_s <= gpu_check.BUDGET_S for step in plan)


def test_the_pytest_steps_name_the_gpu_marker_and_the_torch_compile_test():
    gpu_tests, compile_test = [step.argv for step in steps(Path("out"), Path("out/db")) if step.judge == "pytest"]
    options = gpu_tests[3:]  # after `python -m pytest`
    assert options[options.index("-m") + 1] == "gpu or device_portable" and options[-1] == str(TESTS)
    assert options[options.index("-k") + 1] == f"not {COMPILE_TEST}"
    path, _, name = compile_test[-1].partition("::")
    assert name == COMPILE_TEST and "pytest.mark.gpu" in decorators_of_tests(Path(path))[name]


def decorators_of_tests(path: Path) -> dict[str, list[str]]:
    """{test name: the source of its decorators} for the test functions of `path`."""
    return {node.name: [ast.unparse(d) for d in node.decorator_list] for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_that_skips_without_cuda_is_marked_gpu():
    """`pytest -m gpu` (the check's first step) then runs all of them."""
    unmarked, marked = [], 0
    for path in sorted(TESTS.glob("test_*.py")):
        for name, decorators in decorators_of_tests(path).items():
            if any(re.search(r"skipif\(not .*cuda|needs_cuda", d) for d in decorators):
                marked += "pytest.mark.gpu" in decorators
                if "pytest.mark.gpu" not in decorators:
                    unmarked.append(f"{path.name}::{name}")
    assert not unmarked, f"skipped without CUDA but not marked gpu, so gpu-check would not run them: {unmarked}"
    assert marked >= 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, monkeypatch, capsys):
    def no_process(*args, **kwargs):
        raise AssertionError(f"gpu-check started a process without a GPU: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    out = tmp_path / "gpu-check"
    assert workbench(["gpu-check", "--out", str(out)]) == 1
    assert "gpu-check needs a GPU: no CUDA device" in capsys.readouterr().out
    assert not out.exists()


def test_plan_lists_every_step_with_its_command(tmp_path, capsys):
    assert gpu_check.run_gpu_check(tmp_path / "out", plan_only=True) == 0
    printed = capsys.readouterr().out
    for step in steps(tmp_path / "out", tmp_path / "out" / "workbench.db"):
        assert step.title in printed and step.command() in printed
    assert not (tmp_path / "out").exists()


def python_step(name: str, code: str, timeout_s: float = 30) -> Step:
    return Step(name, name, (sys.executable, "-c", code), timeout_s, "pytest")


def test_failures_and_a_hang_are_recorded_the_check_goes_on_and_the_last_step_keeps_its_slot(tmp_path):
    plan = [
        python_step("ok", "print('2 passed in 0.1s')"),
        python_step("fails", "print('1 failed, 1 passed in 0.1s'); raise SystemExit(1)"),
        python_step("skips", "print('1 skipped in 0.1s')"),  # exit 0, but a GPU should have run it
        python_step("hangs", "import time; print('started', flush=True); time.sleep(60)"),  # cut by the budget
        python_step("late", "print('1 passed')"),  # no time left for it
        python_step("last", "print('1 passed in 0.1s')", timeout_s=20),
    ]
    outcomes = run_steps(plan, tmp_path, tmp_path / "workbench.db", budget_s=20 + 5, min_step_s=1)
    status = {o.step: o.status for o in outcomes}
    assert status == {"ok": "passed", "fails": "failed", "skips": "failed", "hangs": "timed out",
                      "late": "not run", "last": "passed"}  # fmt: skip
    by_name = {o.step: o for o in outcomes}
    assert by_name["fails"].result == "exit status 1; 1 failed, 1 passed in 0.1s"
    # cut well before its 60 s sleep: by SIGINT, or where that does not end it in time, by SIGKILL after GRACE_S (15 s)
    assert by_name["hangs"].result.startswith("stopped at its") and by_name["hangs"].seconds < 45
    assert "started" in Path(by_name["hangs"].log).read_text()  # the log keeps what it printed before the limit
    assert by_name["late"].result == "the time budget was spent"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["01-ok.log", "02-fails.log", "03-skips.log",
                                                                     "04-hangs.log", "06-last.log"]


def test_summary_is_written_and_copied_to_OUT(tmp_path):
    outcomes = [
        gpu_check.Outcome("gpu-tests", StepStatus.PASSED, 12.3, "3 passed in 11.9s", "pytest -m gpu", "logs/01.log"),
        gpu_check.Outcome("bench-conv", StepStatus.TIMED_OUT, 180.0, "stopped", "workbench bench conv", "logs/05.log"),
    ]
    out = tmp_path / "gpu-check"
    out.mkdir()
    text = gpu_check.write_summary(outcomes, out, "NVIDIA H200", 192.4)
    assert text.startswith("gpu-check on NVIDIA H200: 1 of 2 steps passed in 192 s")
    assert "gpu-tests" in text and "timed out" in text and (out / "summary.txt").read_text() == text
    stored = json.loads((out / "summary.json").read_text())
    assert stored["passed"] == 1 and [s["status"] for s in stored["steps"]] == ["passed", "timed out"]
    assert gpu_check.copy_to(None, out) is None
    copied = gpu_check.copy_to(str(tmp_path / "OUT"), out)
    assert copied == tmp_path / "OUT" / "gpu-check" and (copied / "summary.txt").read_text() == text


def test_make_gpu_check_runs_the_command_after_setup():
    makefile = (TESTS.parent / "Makefile").read_text()
    assert re.search(r"^gpu-check: setup\n\t\$\(VENV\)/bin/workbench gpu-check$", makefile, flags=re.MULTILINE)


def test_bench_and_monitor_steps_pass_only_when_they_stored_measurements(tmp_path):
    db_path = tmp_path / "workbench.db"
    bench, monitor = [step for step in steps(tmp_path, db_path) if step.name in ("bench-gemm", "monitor-tune")][::-1]
    assert (bench.subject, monitor.judge) == ("gemm", "monitor")
    db = Database(db_path)
    with db.run(RunKind.BENCH, "gemm"):
        pass
    assert judge(bench, 0, "", db_path) == (False, "nothing measured")  # e.g. a bench that found no GPU
    with db.run(RunKind.BENCH, "gemm") as run_id:
        db.append(SeriesTable.BASELINES, run_id, pd.DataFrame({"kernel": ["gemm"] * 2, "ratio": [0.5, 1.5]}))
    passed, result = judge(bench, 0, "", db_path)
    assert passed and result.startswith("2 measurements; cuBLAS time / ours: median 1.00x (min 0.50x, max 1.50x)")
    assert judge(bench, 3, "", db_path)[0] is False

    run_id = db.start_run(RunKind.MONITOR, "tune", {"nvml_reason": "NVML Shared Library Not Found"})
    db.finish_run(run_id, RunStatus.DONE)
    passed, result = judge(monitor, 0, "", db_path)
    assert not passed and result.startswith("no NVML samples (NVML Shared Library Not Found)")

    samples = pd.DataFrame({"time_s": [0.0, 0.5, 1.0], "power_w": [100.0, 140.0, 120.0]})
    window = {"name": "command", "start_s": 0.0, "end_s": 1.0, "duration_s": 1.0, "energy_j": 120.0, "avg_power_w": 120.0,
              "peak_power_w": 140.0, "peak_gpu_temp_c": 55.0, "mean_sm_clock_mhz": 1980.0, "throttled": False,
              "throttle_reasons": 0}
    assert set(window) == set(WINDOW_COLUMNS)
    run_id = db.start_run(RunKind.MONITOR, "tune", {})
    db.append(SeriesTable.SAMPLES, run_id, samples)
    db.append(SeriesTable.WINDOWS, run_id, pd.DataFrame([window]))
    db.finish_run(run_id, RunStatus.DONE)
    passed, result = judge(monitor, 0, "", db_path)  # power measured, but the monitored sweep stored no trial
    assert not passed and result == ("3 NVML samples, 120 J over 1.0 s, avg 120 W, peak 140 W, peak 55 C; "
                                     "0 trials, none correct")


def test_the_model_step_passes_only_when_both_sides_were_timed_and_their_losses_agree(tmp_path):
    db_path = tmp_path / "workbench.db"
    (step,) = [step for step in steps(tmp_path, db_path) if step.name == "bench-model"]
    db = Database(db_path)
    with db.run(RunKind.BENCH, step.subject):
        pass
    assert judge(step, 0, "", db_path) == (False, "nothing measured")  # e.g. no GPU: it prints so and exits 0

    def timed(swapped_loss: float) -> None:
        with db.run(RunKind.BENCH, step.subject) as run_id:
            db.append(SeriesTable.STEP_TIMES, run_id, pd.DataFrame({
                "side": ["eager", "swapped"], "time_ms": [80.0, 100.0], "speedup": [1.0, 0.8],
                "graph_ms": [5.0, 10.0], "first_loss": [6.9, swapped_loss], "first_step_s": [2.0, 61.0]}))

    timed(6.91)
    assert judge(step, 0, "", db_path) == (True, "eager 80.0 ms, swapped 100.0 ms a step (eager / swapped 0.80x); "
                                                  "as CUDA graphs 5.0 / 10.0 ms; first loss 6.9000 / 6.9100; "
                                                  "first step (compiling) 61 s swapped")
    timed(float("nan"))
    assert judge(step, 0, "", db_path)[0] is False
    timed(7.2)  # finite, but not the eager model's numbers
    assert judge(step, 0, "", db_path)[0] is False


def test_the_compile_step_passes_only_when_nothing_failed_to_compile(tmp_path):
    (step,) = [step for step in steps(tmp_path, tmp_path / "workbench.db") if step.name == "compile-model"]
    closing = "55 distinct compilations of 113 launches for sm_80, sm_90 in 9.1 s wall: {} failed"
    assert judge(step, 0, "table\n" + closing.format(0), tmp_path) == (True, closing.format(0))
    assert judge(step, 1, closing.format(2), tmp_path) == (False, f"exit status 1; {closing.format(2)}")
    assert judge(step, 0, "Traceback ...", tmp_path) == (False, "no compilation summary")
