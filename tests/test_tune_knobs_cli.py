"""`workbench tune --power-limits/--sm-clocks` on a fake GPU: knobs in the configs, refused permissions said
once, constrained objectives parsed, the GPU left as it was."""

from __future__ import annotations

import json
import re
import sys

import pytest

from fake_pynvml import FakeGpu, make_pynvml
from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.workbench.cli import main


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    gpu = FakeGpu(power_w=120.0)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return gpu


def test_power_limits_are_tuned_with_the_kernel_and_restored(gpu, capsys):
    gpu.clock_events = lambda t: 0x4  # held at a power cap throughout
    assert main(["tune", "gemm", "--shape", "8,8,8", "--budget", "2", "--profile", "--power-limits", "2",
                 "--objective", "time:power<=300", "--no-compile-ahead"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "device knobs: power_limit_w [200, 700]" in out
    rows = [line for line in out.splitlines() if line.startswith("BLOCK_K=")]
    assert len(rows) == 2 and all(re.search(r"power_limit_w=\d+ +[\d.]+ +120 +power ", r) for r in rows)
    configs = [json.loads(c) for c in TuningDatabase().trials()["config"]]
    assert len(configs) == 2 and all("power_limit_w" in c for c in configs)
    assert configs[0]["power_limit_w"] == 700  # the default config on the GPU as it was goes first
    best = json.loads(TuningDatabase().best_configs("gemm")["config"].iloc[0])
    assert "power_limit_w" not in best  # the kernels launch with the kernel's part
    assert ("power_limit", 700_000) in gpu.settings_log and gpu.settings == gpu.default_settings()


def test_refused_permission_is_said_once_and_the_sweep_goes_on_without_knobs(gpu, caplog, capsys):
    gpu.refuse = {"power_limit", "locked_clocks", "applications_clocks"}
    with caplog.at_level("WARNING", logger="triton_workbench.profiler"):
        assert main(["tune", "gemm", "--shape", "8,8,8", "--budget", "1", "--power-limits", "3", "--sm-clocks", "2",
                     "--no-compile-ahead"]) == 0  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "device knobs" in r.getMessage()]
    assert len(notes) == 2 and all("permission refused" in n for n in notes)
    configs = [json.loads(c) for c in TuningDatabase().trials()["config"]]
    assert configs and all("power_limit_w" not in c and "sm_clock_mhz" not in c for c in configs)


def test_a_constraint_no_config_meets_stores_nothing_and_says_so(gpu, capsys):
    assert main(["tune", "gemm", "--shape", "8,8,8", "--budget", "2", "--profile", "--power-limits", "2",
                 "--objective", "time:power<=50", "--no-compile-ahead"]) == 0  # the fake draws 120 W
    out = capsys.readouterr().out
    assert "no config met the objective time:power<=50: nothing stored" in out and "best:" not in out
    assert TuningDatabase().best_configs("gemm").empty


@pytest.mark.parametrize("arguments, message", [
    (["--objective", "fast"], "--objective: objective must be one of"),
    (["--objective", "time:power<=300"], "needs --profile"),
    (["--power-limits", "1"], "--power-limits must be 0"),
    (["--remeasure-below", "60"], "--remeasure-below needs --profile"),
])  # fmt: skip
def test_bad_knob_and_objective_arguments_are_one_line_errors(arguments, message, capsys):
    assert main(["tune", "gemm", "--shape", "8,8,8", *arguments]) == 2
    assert message in capsys.readouterr().err
