"""`workbench bench KERNEL [--shapes ...]`: the kernel (with its tuned config) against PyTorch, on a GPU.

Uses the same timing harness as `workbench tune`. Interpreter timings say nothing about GPU speed,
so on a machine without a GPU it says so and exits 0. Results go to the database ("baselines").

`workbench bench conv` is the conv2d op against cuDNN, forward and forward+backward
(workbench.conv_bench): without --shapes over ResNet-18's convolutions (224 and 32 input, batch 64
and 256, fp16/bf16 channels_last and fp32), narrowed by --batch, --input-size and --dtype. The
single conv kernels are benched on their own as conv_fwd, conv_dgrad and conv_wgrad.

`workbench bench model MODEL` times a whole training step of a model, swapped against eager
(workbench.step_timing), on a GPU; with --traffic it counts the step's launches and bytes instead,
without one (workbench.traffic).
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.spec import problem_id
from triton_workbench.workbench.commands.tune import baseline_time_ms, build_problem, performance_table, spec_for
from triton_workbench.workbench.conv_bench import BATCHES, BENCH_DTYPES, INPUT_SIZES
from triton_workbench.workbench.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time a kernel (tuned config) against PyTorch's op (needs a GPU)",
        description="Time KERNEL with its tuned (or default) config and PyTorch's own op for each shape: "
                    "time, TFLOP/s, GB/s, % of peak and speed-up, stored as a 'bench' run.")  # fmt: skip
    parser.add_argument("kernel", help="kernel name in kernels.SPECS (gemm, activation, conv_fwd, ...), or conv: "
                                       "the conv2d op vs cuDNN, fwd and fwd+bwd, on ResNet-18's convs by default, "
                                       "or model: a whole model's training step, swapped against eager (timed on a GPU, or --traffic)")
    parser.add_argument("model", nargs="?", default=None,
                        help="bench model only: resnet18, resnet50 (torchvision-style) or demo (the demo's ResNet)")
    parser.add_argument("--per-block", action="store_true",
                        help="bench model --traffic: also print the table per block (layer1.0, ...)")
    parser.add_argument("--traffic", action="store_true",
                        help="bench model: kernel launches and bytes of one training step (shapes only, an analytic "
                             "model, no GPU needed), the swapped model against eager PyTorch")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                        help="comma-separated sizes per problem, e.g. 1024,1024,1024 4096,4096,4096 "
                             "(default: the kernel's example problems)")  # fmt: skip
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="element type (conv: default all three; fp16/bf16 run channels_last, fp32 NCHW)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, metavar="N",
                        help="conv sweep: batch sizes (default 64 256); bench model: the batch (default 64)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, choices=INPUT_SIZES, metavar="PX",
                        help="conv sweep only: network input resolution, 224 (ImageNet) and/or 32 (CIFAR-style "
                             "stem) (default both)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="conv: allow TF32 for fp32 on both sides (sets torch.backends.cudnn.allow_tf32 and "
                             "torch.backends.cuda.matmul.allow_tf32; default on, PyTorch's conv default)")
    parser.add_argument("--activation", default=None, help="fused activation (none for identity)")
    parser.add_argument("--problem", default=None, metavar="JSON", help="further problem entries as a JSON object")
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.set_defaults(func=run)


def specs_named(name: str) -> list:
    """The spec registered as `name`, or every spec of the family `name_*` (e.g. conv -> conv_fwd, ...)."""
    from triton_workbench import kernels

    family = sorted(key for key in kernels.SPECS if key.startswith(f"{name}_"))
    return [spec_for(name)] if name in kernels.SPECS or not family else [kernels.SPECS[key] for key in family]


def run(args: argparse.Namespace) -> int:
    if args.kernel == "model":
        return run_model(args)
    if args.model is not None or args.traffic:
        raise UsageError("MODEL and --traffic apply to `workbench bench model` only")
    if args.kernel == "conv":
        return run_conv(args)
    if args.batch is not None or args.input_size is not None:
        raise UsageError("--batch and --input-size apply to `workbench bench conv` only")
    return run_specs(args)


def conv_cases(args: argparse.Namespace) -> list:
    """The conv cases the arguments ask for: the ResNet-18 sweep, or the --shapes problems in each dtype."""
    from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
    from triton_workbench.workbench import conv_bench

    dtypes = [args.dtype] if args.dtype is not None else list(BENCH_DTYPES)
    activation = None if args.activation is not None and args.activation.lower() == "none" else args.activation
    if args.shapes is None:
        if args.problem is not None:
            raise UsageError("--problem applies to --shapes problems, not to the ResNet-18 sweep")
        return conv_bench.resnet18_cases(args.batch or BATCHES, args.input_size or INPUT_SIZES, dtypes, args.tf32,
                                         "relu" if args.activation is None else activation)
    if args.batch is not None or args.input_size is not None:
        raise UsageError("--batch and --input-size narrow the ResNet-18 sweep: give the batch inside --shapes "
                         "(n,c_in,h,w,c_out) instead")
    problems = [build_problem(CONV_FWD_SPEC, shape, dtype, args.activation, args.problem)
                for dtype in dtypes for shape in args.shapes]
    return conv_bench.explicit_cases(problems, args.tf32)


def run_model(args: argparse.Namespace) -> int:
    """`workbench bench model MODEL`: a training step's time on a GPU, or with --traffic its launches and bytes
    (shapes only, any machine); the swapped model against eager in both."""
    from triton_workbench.kernels.spec import DTYPES
    from triton_workbench.workbench import traffic

    models = traffic.bench_models()
    if args.model not in models:
        raise UsageError(f"bench model needs MODEL, one of {', '.join(models)}; got {args.model!r}")
    for option, values in (("--batch", args.batch), ("--input-size", args.input_size)):
        if values is not None and len(values) != 1:
            raise UsageError(f"{option} takes one value for bench model, got {values}")
    batch = args.batch[0] if args.batch else 64
    size = args.input_size[0] if args.input_size else traffic.default_image_size(args.model)
    if batch < 1:
        raise UsageError(f"--batch must be positive, got {batch}")
    dtype = args.dtype or "fp16"
    setting = {"batch": batch, "image_size": size, "dtype": dtype}
    described = (f"{args.model}: one training step (forward + backward), batch {batch}, {size}x{size}, {dtype} "
                 f"channels_last")
    if args.traffic:
        return _model_traffic(args, setting, described, DTYPES[dtype])
    return _model_step_time(args, setting, described, DTYPES[dtype])


def _model_traffic(args: argparse.Namespace, setting: dict, described: str, dtype) -> int:
    from triton_workbench.database import Database, RunKind, SeriesTable
    from triton_workbench.workbench import traffic

    table, by_block, records = traffic.compare(args.model, setting["batch"], setting["image_size"], dtype)
    print(f"{described}, counted on the meta device: an analytic model of launches and DRAM bytes, not a "
          f"measurement")
    print(format_table(table, float_format="{:.3f}"))
    total = table.set_index("category").loc["total"]
    print(f"swapped / eager: {total['launches_ratio']:.2f}x the launches, {total['bytes_ratio']:.2f}x the bytes")
    if args.per_block:
        print(format_table(by_block, float_format="{:.3f}"))
        print("(each kernel counts for the block of the parameter it reads, else of the tensor it reads: an add or "
              "activation at a block's edge may count for its neighbour; the totals are exact)")
    db = Database(args.db)
    try:
        with db.run(RunKind.BENCH, f"model:{args.model}", setting) as run_id:
            db.append(SeriesTable.TRAFFIC, run_id, table)
            db.append(SeriesTable.TRAFFIC_BY_BLOCK, run_id, by_block)
            db.append(SeriesTable.FUSED_CHAINS, run_id, pd.DataFrame([vars(r) for r in records]))
    finally:
        db.close()
    return 0


def _model_step_time(args: argparse.Namespace, setting: dict, described: str, dtype) -> int:
    import torch

    from triton_workbench.database import Database, RunKind, SeriesTable
    from triton_workbench.kernels import runtime
    from triton_workbench.workbench import step_timing, traffic

    if args.per_block:
        raise UsageError("--per-block applies to bench model --traffic")
    if runtime.timer_name() != "cuda_events":
        print(f"workbench bench model needs a GPU to time a step: this machine runs Triton kernels in the "
              f"interpreter, whose timings say nothing about GPU speed. Nothing was measured; "
              f"`workbench bench model {args.model} --traffic` counts its launches and bytes without one.")
        return 0
    torch.manual_seed(0)  # the same initial weights every run, so that first losses compare across runs
    table = step_timing.compare(traffic.bench_models()[args.model](), setting["batch"], setting["image_size"],
                                traffic.num_classes(args.model), dtype)
    print(f"{described} on {torch.cuda.get_device_name()}, timed with CUDA events (median of the repetitions, "
          f"after a first step that compiles the kernels)")
    print(format_table(table, float_format="{:.3f}"))
    swapped = table.set_index("side").loc["swapped"]
    print(f"eager time / swapped time: {swapped['speedup']:.2f}x launched op by op, {swapped['graph_speedup']:.2f}x "
          f"replayed as CUDA graphs (graph_ms: the GPU's time without the host's launch work); > 1: swapped faster")
    db = Database(args.db)
    try:
        with db.run(RunKind.BENCH, f"step:{args.model}", setting) as run_id:
            db.append(SeriesTable.STEP_TIMES, run_id, table)
    finally:
        db.close()
    return 0


def run_conv(args: argparse.Namespace) -> int:
    """`workbench bench conv`: our conv2d vs cuDNN (+ separate bias and activation), fwd and fwd+bwd."""
    from triton_workbench.kernels import runtime
    from triton_workbench.workbench import conv_bench

    cases = conv_cases(args)
    if runtime.timer_name() != "cuda_events":
        print(f"workbench bench conv needs a GPU: this machine runs Triton kernels in the interpreter, whose "
              f"timings say nothing about GPU speed. Nothing was measured ({len(cases)} case(s) x "
              f"{len(conv_bench.PASSES)} passes against cuDNN).")  # fmt: skip
        return 0
    conv_bench.run_sweep(cases, args.db, args.tf32)
    return 0


def run_specs(args: argparse.Namespace) -> int:
    """`workbench bench KERNEL` for kernels in kernels.SPECS (or a family of them): each spec vs its baseline."""
    from triton_workbench.kernels import runtime

    specs = specs_named(args.kernel)
    work = []
    for spec in specs:
        if args.shapes is None:
            problems = [dict(p) for p in spec.example_problems if args.dtype in (None, p.get("dtype"))]
        else:
            problems = [build_problem(spec, shape, args.dtype, args.activation, args.problem) for shape in args.shapes]
        work.append((spec, problems))
    if runtime.timer_name() != "cuda_events":
        count = sum(len(problems) for _, problems in work)
        print(f"workbench bench needs a GPU: this machine runs Triton kernels in the interpreter, whose timings "
              f"say nothing about GPU speed. Nothing was measured ({count} problem(s) of "
              f"{', '.join(spec.name for spec in specs)}).")  # fmt: skip
        return 0
    for spec, problems in work:
        bench(spec, problems, args.db)
    return 0


def bench(spec, problems: list[dict], db: str | None) -> None:
    """Time `spec` (tuned or default config) and its PyTorch baseline on each problem; print and store."""
    from triton_workbench.autotune.pipeline import relative_error
    from triton_workbench.autotune.timing import measure
    from triton_workbench.database import Database, RunKind, SeriesTable
    from triton_workbench.database.environment import device_key
    from triton_workbench.kernels import runtime, tuned

    device = device_key().device
    database = Database(db)
    rows, tables = [], []
    with database.run(RunKind.BENCH, spec.name, {"problems": problems}) as run_id:
        for problem in problems:
            config = tuned.config_for(spec, problem)
            inputs = spec.make_inputs(problem, runtime.default_device())
            error = relative_error(spec.launch(inputs, config), spec.reference(inputs))
            timing = measure(lambda: spec.launch(inputs, config))
            baseline_ms = baseline_time_ms(spec, problem)
            seconds = timing.time_ms / 1e3
            trial = pd.DataFrame({
                "config": [json.dumps(config)], "time_ms": [timing.time_ms], "time_ms_p20": [timing.time_ms_p20],
                "time_ms_p80": [timing.time_ms_p80], "tflops": [spec.flops(problem) / seconds / 1e12],
                "gbps": [spec.bytes(problem) / seconds / 1e9],
            })  # fmt: skip
            table = performance_table(trial, problem, baseline_ms, device, interpreter=False)
            shape = ",".join(str(problem[k]) for k in spec.shape_keys)
            table.insert(0, "shape", [f"{shape} {problem.get('dtype', '')}"])
            table["rel err"] = [f"{error:.2g}"]
            tables.append(table)
            rows.append({"kernel": spec.name, "problem": problem_id(problem),
                         "time_ms": timing.time_ms, "baseline_time_ms": baseline_ms,
                         "ratio": baseline_ms / timing.time_ms})  # fmt: skip
        database.append(SeriesTable.BASELINES, run_id, pd.DataFrame(rows))
    print(f"{spec.name} on {device} (tuned or default configs; vs torch = PyTorch time / Triton time)")
    print(format_table(pd.concat(tables, ignore_index=True)))
