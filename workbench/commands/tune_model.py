"""`workbench tune-model`: tune every conv, GEMM and activation problem one training step of a model runs.

The problems are recorded from a real forward and backward pass with the kernels swapped in, then
each is tuned with `autotune.tune`; the best configs land in the database, where the kernels look
them up at launch, so a later `workbench train` on the same shapes uses them without being told.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

from triton_workbench.database import RunKind, TrialStatus
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.commands.tune import add_strategy_option_argument, strategy_options_from
from triton_workbench.workbench.models import MODEL_NAMES, build_model
from triton_workbench.workbench.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune-model", help="tune every kernel problem of a model's training step",
                                   description=__doc__)
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input", default="3,32,32", help="channels,height,width of one image (e.g. 1,8,8 for digits)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--budget", type=int, default=30, help="configs tried per problem (stored trials count)")
    parser.add_argument("--strategy", default="auto")
    add_strategy_option_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="database path (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="skip compiling each batch for the GPU target in worker processes (configs over a "
                             "GPU's resource limits are then caught only on a GPU)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def parse_input(text: str) -> tuple[int, int, int]:
    """'3,32,32' -> (3, 32, 32)."""
    try:
        channels, height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input must be channels,height,width (three ints, e.g. 3,32,32), got {text!r}") from None
    if height != width or min(channels, height) < 1:
        raise UsageError(f"--input must be positive with square images, got {text!r}")
    return channels, height, width


def run(args: argparse.Namespace) -> int:
    from triton_workbench.autotune.pipeline import CompilePool
    from triton_workbench.autotune.results import TuningDatabase
    from triton_workbench.kernels import runtime
    from triton_workbench.workbench.model_problems import record_model_problems

    channels, height, width = parse_input(args.input)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.budget < 1:
        raise UsageError(f"--budget must be >= 1, got {args.budget}")
    options = strategy_options_from(args, [args.strategy])
    runtime.announce()
    # One compile pool serves every problem; it starts before this process runs a kernel (see CompilePool).
    pool = None if args.no_compile_ahead else CompilePool()
    try:
        torch.manual_seed(args.seed)
        model = build_model(args.model, channels, args.num_classes, height).to(runtime.default_device())
        recorded = record_model_problems(model, (args.batch_size, channels, height, width), args.num_classes)
        print(f"{args.model} at batch {args.batch_size}, input {channels}x{height}x{width}: "
              f"{len(recorded.problems)} distinct kernel problems in one forward + backward step")
        if recorded.left_to_torch:
            print(f"skipped (no Triton kernel swapped in, runs PyTorch's): {', '.join(recorded.left_to_torch)}")
        for item in recorded.problems:  # all of them before the run starts: one that cannot be tuned stores nothing
            item.spec.validate_problem(item.problem)
        db = TuningDatabase(args.db)
        meta = {"model": args.model, "batch_size": args.batch_size, "input": [channels, height, width],
                "budget": args.budget, "strategy": args.strategy, "problems": len(recorded.problems)}
        if options:
            meta["strategy_options"] = options
        with db.run(RunKind.TUNE, f"{args.model} model, batch {args.batch_size}", meta) as run_id:
            rows = [_tune_problem(args, options, item, db, pool, run_id) for item in recorded.problems]
    finally:
        if pool is not None:
            pool.close()
    print(f"times: {runtime.timer_name()}" + (" (Triton interpreter on the CPU, not GPU figures)" if runtime.INTERPRETER else ""))
    print(format_table(pd.DataFrame(rows), float_format="{:.3f}"))
    return 0


def _tune_problem(args: argparse.Namespace, options: dict[str, str], item, db, pool, run_id: int) -> dict:
    """Tune one recorded problem into the model's run; its row of the summary table."""
    from triton_workbench.autotune.results import config_id
    from triton_workbench.autotune.tuner import tune

    trials = tune(item.spec, item.problem, strategy=args.strategy, strategy_options=options,
                  budget=args.budget, db=db, seed=args.seed, progress=not args.no_progress,
                  compile_ahead=pool or False, run_id=run_id)  # fmt: skip
    ok = trials[trials["status"] == TrialStatus.OK]
    best_ms = float(ok["time_ms"].min()) if len(ok) else math.nan
    default = ok[ok["config"] == config_id(item.spec.default_config(item.problem))]  # sweeps measure it first
    default_ms = float(default["time_ms"].iloc[0]) if len(default) else math.nan
    return {"problem": item.describe(), "kernel": item.kernel, "calls": item.calls, "trials": len(trials),
            "best_ms": best_ms, "default_ms": default_ms,
            "vs_default": f"{default_ms / best_ms:.2f}x" if best_ms > 0 and default_ms > 0 else "-"}
