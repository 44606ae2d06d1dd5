"""The main job (`make demo`): tune, train, profile and report on the embedded digits data.

The demo is the same `workbench` commands a user would type, run in order against one database
in the output folder, so what it shows is what the CLI does. Sizes follow the machine: small
shapes in Triton's interpreter on a CPU (the whole demo fits in minutes on 2 cores), realistic
ones on a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.database import RunKind, SeriesTable, TrialStatus
from triton_workbench.kernels import runtime
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.cli import main as workbench
from triton_workbench.workbench.tables import format_table

# Kernel Tuner cache files recorded on real GPUs; the strategy comparison runs where they exist.
DEFAULT_LANDSCAPES = Path(__file__).resolve().parents[2] / "shared" / "landscapes"


@dataclass(frozen=True)
class DemoSize:
    """How big each step of the demo is."""

    gemm_shape: str  # M,N,K
    gemm_dtype: str
    conv_shape: str  # n,c_in,h,w,c_out (3x3 kernel, padding 1)
    conv_dtype: str
    budget: int  # configs per tuned kernel
    model_budget: int  # configs per problem of the model
    batch_size: int
    epochs: int
    steps: int | None  # cap on training steps (None: full epochs)
    strategy_seeds: int
    benchmark: bool  # time our kernels against cuBLAS/cuDNN (a GPU only: interpreter times say nothing of that)


SIZES = {
    "cpu": DemoSize(gemm_shape="96,80,72", gemm_dtype="fp32", conv_shape="2,4,8,8,8", conv_dtype="fp32", budget=6,
                    model_budget=2, batch_size=32, epochs=1, steps=None, strategy_seeds=3, benchmark=False),
    "gpu": DemoSize(gemm_shape="4096,4096,4096", gemm_dtype="fp16", conv_shape="64,64,56,56,64", conv_dtype="fp16",
                    budget=60, model_budget=20, batch_size=128, epochs=5, steps=None, strategy_seeds=20, benchmark=True),
}  # fmt: skip


def pick_size(size: str) -> str:
    """'auto' means 'gpu' when kernels run on a CUDA device, else 'cpu'."""
    if size == "auto":
        return "cpu" if runtime.INTERPRETER else "gpu"
    if size not in SIZES:
        raise UsageError(f"size must be auto, {' or '.join(SIZES)}, got {size!r}")
    return size


def steps(size: DemoSize, out_dir: Path, db: Path, landscapes: Path | None) -> list[tuple[str, list[str]]]:
    """The demo as (title, workbench arguments) pairs."""
    database = ["--db", str(db)]
    train = ["train", "--model", "resnet", "--data", "digits", "--epochs", str(size.epochs),
             "--batch-size", str(size.batch_size), "--seed", "0", "--trace", "--profile", *database]
    if size.steps is not None:
        train += ["--steps", str(size.steps)]
    plan = [
        ("Tune the fused GEMM (+bias, GELU)",
         ["tune", "gemm", "--shape", size.gemm_shape, "--dtype", size.gemm_dtype, "--activation", "gelu",
          "--budget", str(size.budget), *database]),
        ("Tune the fused conv2d forward (3x3, +bias, ReLU)",
         ["tune", "conv_fwd", "--shape", size.conv_shape, "--dtype", size.conv_dtype, "--activation", "relu",
          "--problem", json.dumps({"kh": 3, "kw": 3, "padding": [1, 1, 1, 1]}), "--budget", str(size.budget),
          *database]),
        ("Tune every kernel problem of the demo ResNet",
         ["tune-model", "--model", "resnet", "--input", "1,8,8", "--num-classes", "10",
          "--batch-size", str(size.batch_size), "--budget", str(size.model_budget), *database]),
        ("Train the ResNet on digits with Triton kernels", [*train, "--kernels", "triton",
                                                            "--out", str(out_dir / "train-triton")]),
        ("Train the ResNet on digits with PyTorch kernels", [*train, "--kernels", "torch",
                                                             "--out", str(out_dir / "train-torch")]),
        ("Count a ResNet-18 training step's kernel launches and bytes, fused against eager (batch 64, 224x224, "
         "shapes only)", ["bench", "model", "resnet18", "--traffic", *database]),
    ]  # fmt: skip
    if size.benchmark:
        plan += [("Benchmark the fused GEMM against cuBLAS", ["bench", "gemm", *database]),
                 ("Benchmark the fused conv against cuDNN (ResNet-18 layers, batch 64, fp16)",
                  ["bench", "conv", "--batch", "64", "--dtype", "fp16", *database])]
    if landscapes is not None:
        plan.append(("Compare search strategies on recorded GPU landscapes",
                     ["strategies", "--landscapes", str(landscapes), "--budgets", "25,50,100",
                      "--seeds", str(size.strategy_seeds), *database]))  # fmt: skip
    plan.append(("Write the HTML report", ["report", "--all", "-o", str(out_dir / "report.html"), *database]))
    return plan


def summary(db_path: Path) -> pd.DataFrame:
    """One row per run of the demo: what it was and its headline figure."""
    db = TuningDatabase(db_path)
    try:
        rows = []
        for run in db.runs().itertuples():
            rows.append({"run": run.run_id, "kind": run.kind, "name": run.name, "status": run.status,
                         "result": _headline(db, run)})  # fmt: skip
        return pd.DataFrame(rows)
    finally:
        db.close()


def _headline(db: TuningDatabase, run) -> str:
    if run.kind == RunKind.TUNE:
        trials = db.trials(run.run_id)
        ok = trials[trials["status"] == TrialStatus.OK]
        problems = len(trials[["kernel", "problem"]].drop_duplicates())
        if problems > 1:  # a whole model's problems in one run
            return f"{problems} problems, {len(trials)} trials, {len(ok)} correct"
        if ok.empty:
            return f"{len(trials)} trials, none correct"
        return f"{len(trials)} trials, best {ok['time_ms'].min():.3g} ms ({ok['timer'].iloc[0]})"
    if run.kind == RunKind.TRAIN:
        epochs = db.read(SeriesTable.TRAIN_EPOCHS, run.run_id)
        if epochs.empty:
            return "no epoch finished"
        last = epochs.iloc[-1]
        return f"eval accuracy {last['eval_accuracy']:.3f}, eval loss {last['eval_loss']:.3f}"
    if run.kind == RunKind.BENCH and run.name.startswith("model:"):
        total = db.read(SeriesTable.TRAFFIC, run.run_id).set_index("category").loc["total"]
        return (f"{total['launches_ratio']:.2f}x the launches, {total['bytes_ratio']:.2f}x the bytes of eager "
                f"(analytic)")
    if run.kind == RunKind.STRATEGIES:
        results = db.read(SeriesTable.STRATEGY_RESULTS, run.run_id)
        mine = results[results["strategy"] == "auto"]
        return f"auto: mean {mine['fraction'].mean():.3f} of the optimum" if len(mine) else ""
    return ""


def run_demo(out_dir: Path, size: str = "auto", landscapes: Path | None = DEFAULT_LANDSCAPES) -> Path:
    """Run every step; return the report's path. Raises RuntimeError naming the step that failed."""
    chosen = pick_size(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / "workbench.db"
    if landscapes is not None and not any(landscapes.glob("*.json*")):
        print(f"no landscapes in {landscapes}: the strategy comparison is left out")
        landscapes = None
    where = "Triton interpreter on the CPU" if runtime.INTERPRETER else "GPU"
    print(f"workbench demo: size {chosen} ({where}), output in {out_dir}")
    started = time.monotonic()
    for number, (title, arguments) in enumerate(steps(SIZES[chosen], out_dir, db, landscapes), 1):
        print(f"\n== {number}. {title}\n$ workbench {' '.join(arguments)}", flush=True)
        status = workbench(arguments)
        if status != 0:
            raise RuntimeError(f"demo step {number} ({title}) failed with status {status}")
    print(f"\n== Summary ({time.monotonic() - started:.0f} s)")
    print(format_table(summary(db)))
    report = out_dir / "report.html"
    print(f"\nreport: {report.resolve()}")
    return report
