"""Two CPU processes under torchrun (gloo) train with the Triton kernels; rank 0 alone writes; ranks agree."""

import os
import re
import subprocess
import sys

import torch

from triton_workbench.database import Database
from triton_workbench.workbench.checkpoint import load_checkpoint, parameters_sha256
from triton_workbench.workbench.models import build_model


def test_two_process_ddp_trains_swapped_kernels_and_records_one_run(tmp_path):
    db_path, out = tmp_path / "ddp.db", tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "triton_workbench.workbench", "train", "--kernels", "triton", "--steps", "3", "--batch-size", "4",
        "--db", str(db_path), "--out", str(out), "--no-progress", "--eval-images", "16",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]

    # rank 0's all_gather compared every rank's parameters; its checksum is the saved checkpoint's
    match = re.search(r"ddp: parameters identical on all 2 ranks \(sha256 ([0-9a-f]{64})\)", finished.stdout)
    assert match, finished.stdout[-2000:]
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    model = build_model("resnet", 1, 10, 8)
    model.load_state_dict(checkpoint["model"])
    assert parameters_sha256(model) == checkpoint["parameters_sha256"] == match.group(1)
    torch.manual_seed(0)
    assert parameters_sha256(build_model("resnet", 1, 10, 8)) != match.group(1)  # it did train

    db = Database(db_path)
    runs = db.runs()
    assert len(runs) == 1 and runs["kind"].iloc[0] == "train" and runs["status"].iloc[0] == "done"
    steps = db.read("train_steps", int(runs["run_id"].iloc[0]))
    assert list(steps["step"]) == [1, 2, 3] and set(steps["kernels"]) == {"triton"}
    assert finished.stdout.count("epoch 1 step 1:") + finished.stderr.count("epoch 1 step 1:") == 1  # rank 0 logs
