"""`workbench check-compile KERNEL`: compile a kernel's default space for GPU targets, no GPU needed.

`workbench check-compile model MODEL` compiles every Triton launch of the swapped model's training step
instead (workbench.step_compile): the kernels only a model launches (BatchNorm's, the fused epilogues'
variants) as that step specialises them."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.hardware import COMPILE_TARGETS
from triton_workbench.workbench.tables import format_table

_DEFAULT_ARCHS = ",".join(map(str, COMPILE_TARGETS))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-compile", help="compile a kernel's whole default space (or a sample) for "
                                          + "/".join(f"sm_{arch}" for arch in COMPILE_TARGETS),
        description="Compile every valid config of KERNEL for each of its example problems, or every launch "
                    "of MODEL's swapped training step (KERNEL model), for each architecture, in parallel; print "
                    "failures and resources; exit 1 on any failure.")
    parser.add_argument("kernel", help="kernel name (see kernels.SPECS), or model (with MODEL)")
    parser.add_argument("model", nargs="?", default=None,
                        help="check-compile model only: resnet18, resnet50 (torchvision-style), demo, or "
                             "module:function returning your own nn.Module (3-channel input)")
    parser.add_argument("--batch", type=int, default=None, help="check-compile model: the batch (default 64)")
    parser.add_argument("--input-size", type=int, default=None, metavar="PX",
                        help="check-compile model: the input resolution (default 224, the demo's 32)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="check-compile model: the model's dtype, channels_last (default fp16)")
    parser.add_argument("--arch", default=None,
                        help=f"comma-separated compute capabilities (default {_DEFAULT_ARCHS}; for check-compile "
                             f"model this machine's GPU where there is one: the cache its first step reads)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="compile a seeded sample of N configs per problem instead of the whole space")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sample (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.set_defaults(func=run)


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--arch must be comma-separated integers such as 80,90, got {text!r}") from None
    if not archs:
        raise UsageError("--arch names no architecture")
    return archs


def model_archs() -> str:
    """check-compile model's default --arch: this machine's GPU (the compilations its first step would look up
    in Triton's cache), else every compile target."""
    import torch

    if not torch.cuda.is_available():
        return _DEFAULT_ARCHS
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def run(args: argparse.Namespace) -> int:
    from triton_workbench import kernels
    from triton_workbench.kernels.aot import RESOURCE_SUMMARY, compile_space, default_space

    if args.kernel == "model":
        return run_model(args)
    given = [option for option, value in (("MODEL", args.model), ("--batch", args.batch),
                                          ("--input-size", args.input_size), ("--dtype", args.dtype)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to `workbench check-compile model` only")
    if args.kernel not in kernels.SPECS:
        raise UsageError(f"unknown kernel {args.kernel!r}: expected one of {', '.join(sorted(kernels.SPECS))}")
    if args.sample is not None and args.sample < 1:
        raise UsageError(f"--sample must be a positive number of configs, got {args.sample}")
    spec, archs = kernels.SPECS[args.kernel], _archs(args.arch or _DEFAULT_ARCHS)
    pairs = []
    for problem in spec.example_problems:
        configs = default_space(spec, problem)
        if args.sample is not None and args.sample < len(configs):
            configs = random.Random(args.seed or 0).sample(configs, args.sample)
        pairs += [(config, problem) for config in configs]
    started = time.perf_counter()
    results = compile_space(spec, pairs, archs=archs, workers=args.workers)
    wall_s = time.perf_counter() - started

    results["dtype"] = [json.loads(problem)["dtype"] for problem in results["problem"]]
    summary = results.groupby(["dtype", "arch"]).agg(
        configs=("ok", "size"), **RESOURCE_SUMMARY,
        compile_s_mean=("compile_time_s", lambda t: round(t.mean(), 2))).reset_index()
    print(format_table(summary))
    failures = results[~results["ok"]]
    print(f"\n{len(results)} compilations of {args.kernel} for sm_{', sm_'.join(map(str, archs))} "
          f"in {wall_s:.1f} s wall: {len(failures)} failed")
    if len(failures):
        print(format_table(failures[["dtype", "arch", "config", "shared_bytes", "reason"]]))
        return 1
    return 0


def run_model(args: argparse.Namespace) -> int:
    """`workbench check-compile model MODEL`: every launch of the swapped model's training step."""
    from triton_workbench.workbench import step_compile, traffic

    if args.model is None:
        raise UsageError("check-compile model needs MODEL: resnet18, resnet50, demo or module:function")
    if args.sample is not None or args.seed is not None:
        raise UsageError("--sample and --seed apply to a kernel's space, not to check-compile model")
    batch = 64 if args.batch is None else args.batch
    size = traffic.default_image_size(args.model) if args.input_size is None else args.input_size
    dtype = args.dtype or "fp16"
    for option, value in (("--batch", batch), ("--input-size", size)):
        if value < 1:
            raise UsageError(f"{option} must be positive, got {value}")
    if os.getcwd() not in sys.path:  # as `python -m` does: the working directory's modules are importable
        sys.path.insert(0, os.getcwd())
    step_compile.build_model(args.model)  # a bad MODEL fails here, in one line, not in a worker
    archs = _archs(args.arch or model_archs())
    started = time.perf_counter()
    results = step_compile.compile_step(args.model, batch, size, dtype, archs, args.workers)
    wall_s = time.perf_counter() - started
    print(f"{args.model}'s swapped training step, batch {batch}, {size}x{size}, {dtype} channels_last:")
    print(format_table(step_compile.summary(results)))
    failures = results[~results["ok"]]
    print(f"\n{len(results)} distinct compilations of {int(results['launches'].sum())} launches for "
          f"sm_{', sm_'.join(map(str, archs))} in {wall_s:.1f} s wall: {len(failures)} failed")
    if len(failures):
        print(format_table(failures[["arch", "kernel", "reason"]]))
        return 1
    return 0
