"""The training flow: database rows, resume without lost or duplicated steps, parity of kernels, trace."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from triton_workbench.database import Database
from triton_workbench.workbench.checkpoint import load_checkpoint
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.train_config import TrainConfig
from triton_workbench.workbench.training import train


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores torch's default 2 threads make small convolutions ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(out_dir=tmp_path / "out", kernels="torch", batch_size=16, steps=6, checkpoint_every=2, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_run_is_recorded_with_steps_and_epochs(tmp_path):
    # digits train split: 1438 images -> 89 steps of 16 per epoch; 2 epochs of 3 steps via tiny batches is
    # not possible, so train one whole epoch of 4 batches of 359 (batch size close to a quarter of the set)
    result = train(_config(tmp_path, batch_size=359, steps=None, epochs=2))
    db = Database()
    runs = db.runs()
    assert list(runs["kind"]) == ["train"] and list(runs["status"]) == ["done"]
    steps, epochs = db.read("train_steps", result.run_id), db.read("train_epochs", result.run_id)
    assert list(steps["step"]) == list(range(1, 9)) and list(steps["epoch"]) == [1] * 4 + [2] * 4
    assert set(steps["kernels"]) == {"torch"} and (steps["images_per_s"] > 0).all()
    assert list(epochs["epoch"]) == [1, 2]
    assert epochs["eval_accuracy"].iloc[-1] == pytest.approx(result.final_eval_accuracy)
    assert steps["loss"].iloc[-1] < steps["loss"].iloc[0]
    assert all(value is None or math.isnan(value) for value in steps["energy_j"])  # no --profile: no energy


def test_resume_continues_the_same_run_without_duplicates_and_matches_an_uninterrupted_run(tmp_path):
    straight = train(_config(tmp_path / "straight", steps=7))
    first = train(_config(tmp_path / "resumed", steps=4))
    resumed = train(_config(tmp_path / "resumed", steps=7, resume=True))
    assert resumed.run_id == first.run_id
    db = Database()
    steps = db.read("train_steps", first.run_id)
    assert list(steps["step"]) == list(range(1, 8))
    assert steps["loss"].tolist() == pytest.approx(db.read("train_steps", straight.run_id)["loss"].tolist(), rel=1e-6)
    assert resumed.parameters_sha256 == straight.parameters_sha256
    checkpoint = load_checkpoint(resumed.checkpoint_path)
    assert checkpoint["progress"]["global_step"] == 7 and checkpoint["run_id"] == first.run_id


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(_config(tmp_path, resume=True))
    train(_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="settings differ \\(batch_size: checkpoint 16 vs now 8\\)"):
        train(_config(tmp_path, steps=4, batch_size=8, resume=True))


def test_bad_options_are_named(tmp_path, capsys):
    assert main(["train", "--kernels", "torch", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Triton's interpreter has no bfloat16"):
        train(_config(tmp_path, kernels="triton", amp="bf16"))


def test_triton_kernels_match_torch_kernels_and_trace_shows_them(tmp_path):
    """Same seed, data order and initial parameters (swap after init), fp32: the loss curves agree."""
    common = dict(batch_size=4, steps=3, eval_images=16)
    reference = train(_config(tmp_path / "torch", kernels="torch", **common))
    triton = train(_config(tmp_path / "triton", kernels="triton", trace=True, **common))
    assert triton.skipped_modules == []  # every conv, linear and ReLU of the ResNet runs a Triton kernel
    torch_loss, triton_loss = reference.steps["loss"].to_numpy(), triton.steps["loss"].to_numpy()
    assert len(triton_loss) == 3 and abs(triton_loss - torch_loss).max() <= 1e-3 * abs(torch_loss).max()
    assert abs(triton.final_eval_accuracy - reference.final_eval_accuracy) <= 1 / 16

    op_times = Database().read("op_times", triton.run_id)
    triton_ops = set(op_times.loc[op_times["source"] == "triton", "op"])
    # every conv is followed by a BN: the conv's launch computes the BN's statistics (conv2d_statistics)
    assert {"workbench::conv2d_statistics", "workbench::conv2d_backward", "workbench::gemm",
            "workbench::batch_norm_act", "workbench::batch_norm_act_backward"} <= triton_ops
    ops = set(op_times["op"])  # BatchNorm and ReLU run inside the fused kernels (the adds: tests/test_fusion.py)
    assert sorted(ops & {"aten::native_batch_norm", "aten::batch_norm", "aten::relu", "aten::relu_"}) == []
    trace = json.loads((tmp_path / "triton" / "out" / "trace.json").read_text())
    assert any(event.get("name") == "workbench::conv2d_statistics" for event in trace["traceEvents"])


def test_profile_stores_energy_per_step_epoch_and_image(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from fake_pynvml import FakeGpu, make_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([FakeGpu(power_w=100.0, temp_c=lambda t: 50.0)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = train(_config(tmp_path, batch_size=359, steps=None, profile=True))
    db = Database()
    steps, epochs = db.read("train_steps", result.run_id), db.read("train_epochs", result.run_id)
    # a window's energy is the power integral over it: 100 W for at least the step's measured time
    assert (steps["energy_j"] >= 0.1 * steps["step_time_ms"] * 0.99).all()
    epoch = epochs.iloc[0]
    assert epoch["energy_j"] >= steps["energy_j"].sum() * 0.99
    assert epoch["j_per_image"] == pytest.approx(epoch["energy_j"] / (4 * 359))
    windows = db.read("windows", result.run_id)
    assert {"step 1", "step 4", "epoch 1"} <= set(windows["name"]) and len(db.read("samples", result.run_id)) > 0


def test_profile_without_nvml_says_so_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    result = train(_config(tmp_path, steps=1, profile=True, eval_images=8))
    assert "profile: no power data exists on this machine" in capsys.readouterr().out
    assert result.global_step == 1 and len(result.steps) == 1


def test_ctrl_c_stops_after_the_step_saves_and_resume_loses_nothing(tmp_path):
    out, db_path = tmp_path / "out", tmp_path / "sigint.db"
    command = [sys.executable, "-m", "triton_workbench.workbench", "train", "--kernels", "torch", "--batch-size", "16", "--steps", "500",
               "--checkpoint-every", "2", "--eval-images", "8", "--out", str(out), "--db", str(db_path), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    stopped_at = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    db = Database(db_path)
    assert db.runs()["status"].tolist() == ["interrupted"]
    assert list(db.read("train_steps")["step"]) == list(range(1, stopped_at + 1))  # every finished step kept

    assert main(["train", "--kernels", "torch", "--batch-size", "16", "--steps", str(stopped_at + 2), "--resume",
                 "--eval-images", "8", "--out", str(out), "--db", str(db_path), "--no-progress"]) == 0
    assert db.runs()["status"].tolist() == ["done"]
    assert list(db.read("train_steps")["step"]) == list(range(1, stopped_at + 3))


def test_trains_on_cifar_binary_files(tmp_path):
    from test_data import _write_cifar

    _write_cifar(tmp_path / "cifar-10-batches-bin", records_per_file=4)
    result = train(_config(tmp_path, model="convnet", data="cifar10", data_dir=str(tmp_path), batch_size=4, steps=2))
    assert result.global_step == 2 and 0.0 <= result.final_eval_accuracy <= 1.0
    assert Database().runs()["name"].tolist() == ["convnet-cifar10-torch"]
