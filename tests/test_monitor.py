"""`workbench monitor`: runs a command under the sampler, stores the trace, exits with the command's status."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from triton_workbench.database import Database
from fake_pynvml import FakeGpu, make_pynvml
from triton_workbench.profiler import SAMPLE_COLUMNS, WINDOW_COLUMNS
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.commands import monitor

CHILD = [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(3)"]


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGpu:
    gpu = FakeGpu(power_w=120.0, temp_c=lambda t: 55.0)  # the real clock: the monitor's thread samples it
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return gpu


def test_monitor_stores_the_trace_and_exits_with_the_command_status(fake_gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(monitor, "FLUSH_EVERY_S", 0.05)  # several flushes during the command: none lost or doubled
    csv = tmp_path / "trace.csv"
    assert main(["monitor", "--interval-s", "0.005", "--csv", str(csv), "--", *CHILD]) == 3
    out = capsys.readouterr().out
    assert "exited with 3" in out and "avg power 120.0 W" in out and "peak GPU temp 55 C" in out

    db = Database()
    run = db.runs().iloc[-1]
    assert (run["kind"], run["status"]) == ("monitor", "failed") and run["meta"]["command"] == CHILD
    samples, windows = db.read("samples", run["run_id"]), db.read("windows", run["run_id"])
    assert list(samples.columns) == ["run_id", *SAMPLE_COLUMNS] and len(samples) >= 20
    assert samples["time_s"].is_monotonic_increasing and samples["time_s"].is_unique
    assert list(windows.columns) == ["run_id", *WINDOW_COLUMNS] and windows["name"].tolist() == ["command"]
    window = windows.iloc[0]
    assert window["duration_s"] >= 0.3 and window["avg_power_w"] == pytest.approx(120.0, rel=1e-3)
    assert window["energy_j"] == pytest.approx(120.0 * window["duration_s"], rel=1e-3)

    trace = pd.read_csv(csv)
    assert list(trace.columns) == list(SAMPLE_COLUMNS) and len(trace) == len(samples)
    exported = tmp_path / "exported.csv"
    assert main(["monitor", "--export", str(run["run_id"]), "--csv", str(exported)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(exported), trace)


def test_without_nvml_the_command_runs_and_the_summary_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    path = tmp_path / "monitor.db"  # the command runs with it as $WORKBENCH_DB: its own runs land beside the trace
    child = f"import os, sys; sys.exit(os.environ['WORKBENCH_DB'] != {str(path)!r})"
    assert main(["monitor", "--db", str(path), "--", sys.executable, "-c", child]) == 0
    out = capsys.readouterr().out
    assert "exited with 0" in out and "no power data" in out
    db = Database(path)
    run = db.runs().iloc[-1]
    assert run["status"] == "done" and not run["meta"]["nvml_available"]
    assert db.read("samples", run["run_id"]).empty
    assert db.read("windows", run["run_id"])["duration_s"].iloc[0] > 0
    assert main(["monitor", "--export", str(run["run_id"]), "--csv", "unused.csv"]) == 2
    assert "has no samples" in capsys.readouterr().err


def test_ctrl_c_marks_the_run_interrupted_and_keeps_the_trace(fake_gpu, monkeypatch, capsys):
    class InterruptedChild:
        """A child that was stopped by the same Ctrl-C: the first wait is interrupted, then it dies of SIGINT."""

        def __init__(self, cmd, env):
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return -2

    monkeypatch.setattr(subprocess, "Popen", InterruptedChild)
    assert main(["monitor", "--", "anything"]) == 130
    db = Database()
    run = db.runs().iloc[-1]
    assert run["status"] == "interrupted" and len(db.read("samples", run["run_id"])) >= 2


@pytest.mark.parametrize(
    "argv, message",
    [(["monitor"], "give the command"), (["monitor", "--", "no-such-command-xyz"], "no-such-command-xyz"),
     (["monitor", "--interval-s", "0", "--", "true"], "interval-s"), (["monitor", "--export", "1"], "--csv")],
)  # fmt: skip
def test_bad_use_is_reported(monkeypatch, capsys, argv, message):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    if "no-such-command-xyz" in argv:
        assert Database().runs().iloc[-1]["status"] == "failed"
