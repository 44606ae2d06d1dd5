"""tune-model: every kernel problem of a real forward + backward step is recorded, tuned and then used."""

import re

from torch import nn

from triton_workbench.autotune import TuningDatabase
from triton_workbench.kernels import tuned
from triton_workbench.kernels.spec import problem_id
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.commands import tune_model
from triton_workbench.workbench.model_problems import record_model_problems


def _tiny_model(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Two identical inner convs (one problem, two calls), a fused conv+ReLU, a lone Tanh, a linear."""
    flat = 2 * image_size * image_size
    return nn.Sequential(
        nn.Conv2d(in_channels, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Tanh(), nn.Linear(flat, num_classes),
    )


def test_records_forward_and_backward_problems_deduplicated():
    recorded = record_model_problems(_tiny_model(1, 3, 4), (2, 1, 4, 4), 3)
    assert recorded.left_to_torch == []
    kernels = [item.kernel for item in recorded.problems]
    assert {"conv_fwd", "conv_dgrad", "conv_wgrad", "gemm", "activation"} <= set(kernels)
    assert len({(item.kernel, problem_id(item.problem)) for item in recorded.problems}) == len(kernels)
    inner = [item for item in recorded.problems if item.kernel == "conv_fwd" and item.problem["c_in"] == 2]
    assert len(inner) == 1 and inner[0].calls == 2 and inner[0].problem["n"] == 2
    assert {item.problem.get("backward", False) for item in recorded.problems if item.kernel == "activation"} == {False, True}
    assert "c_in=2" in inner[0].describe() and "dilation" not in inner[0].describe()


def test_bad_input_is_named(capsys):
    assert main(["tune-model", "--input", "3,32"]) == 2
    assert "--input must be channels,height,width" in capsys.readouterr().err


def test_tune_model_tunes_each_problem_and_the_kernels_use_the_best(monkeypatch, capsys):
    monkeypatch.setattr(tune_model, "build_model", lambda name, c, k, s: _tiny_model(c, k, s))
    problems = record_model_problems(_tiny_model(1, 3, 4), (2, 1, 4, 4), 3).problems
    tuned.clear_cache()
    assert main(["tune-model", "--input", "1,4,4", "--batch-size", "2", "--num-classes", "3", "--budget", "2",
                 "--no-compile-ahead", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "times: interpreter" in out or "times: cuda_events" in out
    rows = [line for line in out.splitlines() if re.search(r"\d+\.\d{3}\s+\d+\.\d{3}\s+\d+\.\d{2}x\s*$", line)]
    assert len(rows) == len(problems)
    db = TuningDatabase()
    runs = db.runs().query("kind == 'tune'")  # one run holds the whole model's problems
    assert len(runs) == 1 and runs["status"].iloc[0] == "done"
    assert len(db.trials(int(runs["run_id"].iloc[0]))[["kernel", "problem"]].drop_duplicates()) == len(problems)
    for item in problems:  # what a later training step launches with is the stored best
        best = db.lookup_best(item.spec, item.problem)
        assert best is not None and tuned.config_for(item.spec, item.problem) == best
    header = out.splitlines()[[i for i, line in enumerate(out.splitlines()) if "vs_default" in line][0]]
    assert header.split() == ["problem", "kernel", "calls", "trials", "best_ms", "default_ms", "vs_default"]
