"""A sweep sharded over two torchrun processes (gloo, interpreter) lands in one database, written by rank 0."""

import json
import os
import subprocess
import sys

from triton_workbench.autotune import TuningDatabase


def test_two_ranks_share_the_configs_and_rank_0_stores_them_all():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "triton_workbench.workbench", "tune", "gemm", "--shape", "17,5,11", "--dtype", "fp32", "--activation", "relu",
               "--strategy", "random", "--budget", "4", "--no-compile-ahead"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("4 trials stored: 4 ok") == 1  # rank 0 alone prints the summary
    assert "rank 1 of 2 evaluated 2 configs" in result.stdout + result.stderr  # the other half ran on rank 1
    db = TuningDatabase()
    trials = db.trials()
    assert len(trials) == 4 and trials["config"].is_unique and (trials["status"] == "ok").all()
    assert {json.loads(p)["M"] for p in trials["problem"]} == {17}
    runs = db.runs()
    assert len(runs) == 1 and runs["status"][0] == "done" and runs["meta"][0]["world_size"] == 2
    assert trials["run_id"].unique().tolist() == [runs["run_id"][0]]
