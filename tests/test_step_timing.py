"""`bench model` timing a training step, eager against swapped: the table on any machine (interpreter times
on CPU, labelled so), and the command's refusal to time anything without a GPU."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from triton_workbench.database import Database, RunKind, SeriesTable
from triton_workbench.kernels import runtime
from triton_workbench.workbench import step_timing
from triton_workbench.workbench.cli import main as workbench


class OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_both_sides_start_from_the_same_weights_and_the_swapped_one_runs_the_kernels(device):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with OpNames() as ops:
        table = step_timing.compare(model, batch=3, image_size=9, num_classes=10, dtype=torch.float32,
                                    device=device, warmup_ms=1, rep_ms=1, interpreter_reps=1)
    assert {"workbench::conv2d_statistics", "aten::convolution"} <= ops.names
    assert list(table["side"]) == ["eager", "swapped"]
    assert (table["timer"] == runtime.timer_name()).all()
    assert (table["time_ms"] > 0).all() and (table["first_step_s"] > 0).all()
    assert table["speedup"].iloc[0] == 1.0 and math.isclose(
        table["speedup"].iloc[1], table["time_ms"].iloc[0] / table["time_ms"].iloc[1])
    assert table["graph_ms"].isna().all() == (device.type != "cuda")  # replayed as CUDA graphs on CUDA only
    eager, swapped = table["first_loss"]
    assert math.isfinite(eager) and swapped == pytest.approx(eager, rel=1e-4)  # fp32: the same weights and batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench model times the step")
def test_bench_model_without_traffic_times_nothing_without_a_gpu(tmp_path, capsys):
    db = tmp_path / "workbench.db"
    assert workbench(["bench", "model", "demo", "--db", str(db)]) == 0
    assert "bench model needs a GPU to time a step" in capsys.readouterr().out
    database = Database(db)
    try:
        assert database.runs().query("kind == @RunKind.BENCH").empty
    finally:
        database.close()


def test_per_block_belongs_to_traffic_and_the_batch_must_be_positive(capsys):
    assert workbench(["bench", "model", "demo", "--per-block"]) == 2
    assert "--per-block applies to bench model --traffic" in capsys.readouterr().err
    assert workbench(["bench", "model", "demo", "--batch", "0"]) == 2
    assert "--batch must be positive, got 0" in capsys.readouterr().err


def test_the_report_shows_stored_step_times(tmp_path):
    db_path = tmp_path / "workbench.db"
    table = step_timing.compare(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 5)), batch=2,
                                image_size=3, num_classes=5, dtype=torch.float32, warmup_ms=1, rep_ms=1,
                                interpreter_reps=1)
    db = Database(db_path)
    with db.run(RunKind.BENCH, "step:tiny", {"batch": 2, "image_size": 3, "dtype": "fp32"}) as run_id:
        db.append(SeriesTable.STEP_TIMES, run_id, table)
    db.close()
    assert workbench(["report", "--all", "-o", str(tmp_path / "report.html"), "--db", str(db_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Training step time: eager against swapped" in html and "batch 2, 3x3, fp32 channels_last" in html
    assert "first_step_s" in html and "swapped" in html
