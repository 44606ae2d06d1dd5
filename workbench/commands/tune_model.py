"""`workbench tune-model`: tune every conv, GEMM and activation problem one training step of a model runs.

The problems are recorded from a real forward and backward pass with the kernels swapped in, then
each is tuned with `autotune.tune`; the best configs land in the database, where the kernels look
them up at launch, so a later `workbench train` on the same shapes uses them without being told.
"""

from __future__ import annotations

import argparse
import math
import os

import pandas as pd
import torch

from workbench.models import MODEL_NAMES, build_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune-model", help="tune every kernel problem of a model's training step",
                                   description=__doc__)
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input", default="3,32,32", help="channels,height,width of one image (e.g. 1,8,8 for digits)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--budget", type=int, default=30, help="configs tried per problem (stored trials count)")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="database path (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="skip compiling each batch for the GPU target in worker processes (saves their start-up "
                             "per problem; configs over a GPU's resource limits are then caught only on a GPU)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def parse_input(text: str) -> tuple[int, int, int]:
    """'3,32,32' -> (3, 32, 32)."""
    try:
        channels, height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--input must be channels,height,width (three ints, e.g. 3,32,32), got {text!r}") from None
    if height != width or min(channels, height) < 1:
        raise ValueError(f"--input must be positive with square images, got {text!r}")
    return channels, height, width


def run(args: argparse.Namespace) -> int:
    from autotune import tuner
    from autotune.database import Database, config_id
    from kernels import runtime
    from workbench.model_problems import record_model_problems

    channels, height, width = parse_input(args.input)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.db:
        os.environ["WORKBENCH_DB"] = args.db  # the kernels look tuned configs up in the same database
    runtime.announce()
    torch.manual_seed(args.seed)
    model = build_model(args.model, channels, args.num_classes, height).to(runtime.default_device())
    recorded = record_model_problems(model, (args.batch_size, channels, height, width), args.num_classes)
    print(f"{args.model} at batch {args.batch_size}, input {channels}x{height}x{width}: "
          f"{len(recorded.problems)} distinct kernel problems in one forward + backward step")
    if recorded.left_to_torch:
        print(f"skipped (no Triton kernel swapped in, runs PyTorch's): {', '.join(recorded.left_to_torch)}")
    db = Database(args.db)
    rows = []
    for item in recorded.problems:
        trials = tuner.tune(item.spec, item.problem, strategy=args.strategy, budget=args.budget, db=db,
                            seed=args.seed, progress=not args.no_progress,
                            compile_ahead=not args.no_compile_ahead)  # fmt: skip
        ok = trials[trials["status"] == "ok"]
        best_ms = float(ok["time_ms"].min()) if len(ok) else math.nan
        default_ms = _default_time_ms(item.spec, item.problem, trials, config_id)
        rows.append({
            "problem": item.describe(), "kernel": item.kernel, "calls": item.calls, "trials": len(trials),
            "best_ms": best_ms, "default_ms": default_ms, "vs_default": f"{default_ms / best_ms:.2f}x" if best_ms > 0 else "-",
        })
    table = pd.DataFrame(rows)
    print(f"times: {runtime.timer_name()}" + (" (Triton interpreter on the CPU, not GPU figures)" if runtime.INTERPRETER else ""))
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    return 0


def _default_time_ms(spec, problem, trials: pd.DataFrame, config_id) -> float:
    """The heuristic default config's time: from the stored trials, else measured now (not stored)."""
    from autotune.pipeline import Pipeline

    default = spec.default_config(problem)
    stored = trials[(trials["config"] == config_id(default)) & (trials["status"] == "ok")]
    if len(stored):
        return float(stored["time_ms"].iloc[0])
    trial = Pipeline(spec, problem).evaluate(default)
    return trial.time_ms if trial.status == "ok" else math.nan
