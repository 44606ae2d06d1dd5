"""`workbench tune KERNEL --shape ...`: autotune one kernel on one problem, store every trial, show the best.

Also usable under torchrun (`torchrun --nproc-per-node N -m workbench tune ...`): the configs are
shared across the ranks and rank 0 writes the database and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pandas as pd

from triton_workbench.autotune.objectives import Objective
from triton_workbench.database import SeriesTable, TrialStatus
from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.hardware import gpu_by_name, peak_label
from triton_workbench.profiler.device_settings import POWER_LIMIT, SM_CLOCK
from triton_workbench.profiler.windows import throttle_words
from triton_workbench.reports.labels import parameters_label
from triton_workbench.workbench.tables import format_table

TOP_CONFIGS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="autotune a kernel for one problem (every trial stored in the database)",
        description="Search KERNEL's configs for one problem: compile ahead for the GPU target, reject "
                    "configs over the device's limits, check each result against PyTorch, time it, store it. "
                    "Re-running a finished sweep evaluates nothing; an interrupted one resumes.")  # fmt: skip
    add_problem_arguments(parser)
    parser.add_argument("--strategy", default="auto", help="search strategy (auto, exhaustive, random, forest)")
    add_strategy_option_argument(parser)
    parser.add_argument("--budget", type=int, default=200, help="configs to try at most (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="strategy seed (default 0)")
    parser.add_argument("--objective", default="time",
                        help="what to minimise: time, energy, edp, time:power<=WATTS (fastest at most that average "
                             "power) or energy:time<=PERCENT%% (least energy within that much of the fastest); all "
                             "but time need --profile (default time)")  # fmt: skip
    parser.add_argument("--power-limits", type=int, default=0, metavar="N",
                        help="also tune the GPU's power limit: N limits spread over its range (needs root; restored "
                             "after the sweep, or at the next start if the process was killed)")
    parser.add_argument("--sm-clocks", type=int, default=0, metavar="N",
                        help="also tune the SM clock: unlocked and N supported clocks, locked (else application clocks)")
    parser.add_argument("--remeasure-below", type=float, default=None, metavar="DEG_C",
                        help="with --profile: measure a trial that ran throttled by heat again once the GPU is this cool")
    parser.add_argument("--profile", action="store_true", help="measure energy, power, temperature per trial (NVML)")
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("--workers", type=int, default=None, help="ahead-of-time compile processes (default: CPUs)")
    parser.add_argument("--no-compile-ahead", action="store_true", help="compile each config only when it runs")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a trial may take (default 120)")
    parser.add_argument("--prune-static", type=float, default=None, metavar="R",
                        help="0 < R <= 1: do not measure a config whose static ceiling (from its compiled code, on the "
                             "target's reference GPU) is below R x the best of those measured so far; it is recorded "
                             "as 'pruned' with both figures (default: off; needs compiling ahead)")  # fmt: skip
    parser.set_defaults(func=run)


def add_strategy_option_argument(parser: argparse.ArgumentParser) -> None:
    """--strategy-option KEY=VALUE, repeatable (args.strategy_options), shared with tune-model and strategies."""
    from triton_workbench.autotune.strategies import options_summary

    parser.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE", dest="strategy_options",
                        help=f"set a hyperparameter of the strategy, repeatable (defaults: {options_summary()}; "
                             "other strategies take none; see autotune/strategies/forest.py ForestOptions)")


def strategy_options_from(args: argparse.Namespace, strategies: list[str]) -> dict[str, str]:
    """The --strategy-option assignments, checked against each of `strategies` (ValueError naming the option)."""
    from triton_workbench.autotune.strategies import parse_assignments, strategy_options

    options = parse_assignments(args.strategy_options)
    for strategy in strategies:
        strategy_options(strategy, options)
    return options


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """--shape/--dtype/--activation/--problem, shared with `workbench bench`."""
    parser.add_argument("kernel", help="kernel name (gemm, activation, conv, ...: see kernels.SPECS)")
    parser.add_argument("--shape", default=None,
                        help="comma-separated sizes in the kernel's shape order (gemm: M,N,K; activation: numel)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="element type")
    parser.add_argument("--activation", default=None, help="fused activation (e.g. gelu, relu; none for identity)")
    parser.add_argument("--problem", default=None, metavar="JSON", help="further problem entries as a JSON object")


def spec_for(name: str):
    """The KernelSpec registered under `name` in kernels.SPECS (looked up at run time)."""
    from triton_workbench import kernels

    if name not in kernels.SPECS:
        raise UsageError(f"unknown kernel {name!r}: expected one of {', '.join(sorted(kernels.SPECS))}")
    return kernels.SPECS[name]


def build_problem(spec, shape: str | None, dtype: str | None, activation: str | None,
                  extra: str | None) -> dict[str, Any]:  # fmt: skip
    """A problem from the command line: the spec's example problem for the dtype, with the given entries,
    checked against the kernel (`KernelSpec.validate_problem`: entries, types, ranges, the device's memory)."""
    examples = [dict(p) for p in spec.example_problems if dtype is None or p.get("dtype") == dtype]
    if not examples:
        raise UsageError(f"--dtype {dtype} is not supported by {spec.name}")
    problem = examples[0]
    if shape is not None:
        try:
            sizes = [int(part) for part in shape.split(",")]
        except ValueError:
            raise UsageError(f"--shape must be comma-separated integers, got {shape!r}") from None
        if len(sizes) != len(spec.shape_keys) or min(sizes) < 1:
            raise UsageError(f"--shape for {spec.name} needs {len(spec.shape_keys)} positive sizes "
                             f"({','.join(spec.shape_keys)}), got {shape!r}")  # fmt: skip
        problem.update(zip(spec.shape_keys, sizes))
    if activation is not None:
        if "activation" not in problem:
            raise UsageError(f"--activation: {spec.name} has no fused activation")
        problem["activation"] = None if activation.lower() in ("none", "identity") else activation
    if extra is not None:
        try:
            entries = json.loads(extra)
        except json.JSONDecodeError as error:
            raise UsageError(f"--problem must be a JSON object: {error}") from None
        except RecursionError:
            raise UsageError("--problem is nested too deeply to be a problem") from None
        if not isinstance(entries, dict):
            raise UsageError(f"--problem must be a JSON object, got {extra!r}")
        problem.update(entries)
    spec.validate_problem(problem)
    return problem


def baseline_time_ms(spec, problem: dict[str, Any]) -> float:
    """PyTorch's own op for the problem, timed with the same harness (NaN when the spec has none)."""
    from triton_workbench.autotune.timing import measure
    from triton_workbench.kernels import runtime

    if spec.baseline is None:
        return math.nan
    inputs = spec.make_inputs(problem, runtime.default_device())
    return measure(lambda: spec.baseline(inputs)).time_ms


def performance_table(trials: pd.DataFrame, problem: dict[str, Any], baseline_ms: float, device: str,
                      interpreter: bool) -> pd.DataFrame:  # fmt: skip
    """Aligned-ready columns: config, time (p20-p80), TFLOP/s, GB/s, % of peak (GPU only), speed-up vs PyTorch."""
    label = "interpreter ms" if interpreter else "time ms"
    table = pd.DataFrame({
        "config": [parameters_label(json.loads(c)) for c in trials["config"]],
        label: [f"{t:.4g} ({lo:.4g}-{hi:.4g})" for t, lo, hi in
                zip(trials["time_ms"], trials["time_ms_p20"], trials["time_ms_p80"])],
        "TFLOP/s": trials["tflops"].map(lambda v: f"{v:.3g}"),
        "GB/s": trials["gbps"].map(lambda v: f"{v:.3g}"),
    })  # fmt: skip
    peaks = None if interpreter else gpu_by_name(device)
    if peaks is not None:
        flop_peak = peaks.compute_tflops.get(peak_label(problem.get("dtype"), bool(problem.get("tf32"))), math.nan)
        table["% peak FLOP"] = (100 * trials["tflops"] / flop_peak).map(lambda v: f"{v:.1f}")
        table["% peak BW"] = (100 * trials["gbps"] / peaks.bandwidth_gbps).map(lambda v: f"{v:.1f}")
    if not math.isnan(baseline_ms):
        table["vs torch CPU" if interpreter else "vs torch"] = (baseline_ms / trials["time_ms"]).map(lambda v: f"{v:.3g}x")
    for column in ("compile s", "shared KiB", "regs"):
        source = {"compile s": "compile_time_s", "shared KiB": "shared_bytes", "regs": "registers"}[column]
        if source in trials and trials[source].notna().any():
            scale = 1024 if column == "shared KiB" else 1
            table[column] = (trials[source] / scale).map(lambda v: "-" if math.isnan(v) else f"{v:.3g}")
    ceiling = static_ceiling(trials)
    if ceiling is not None:
        table["static ceiling"] = ceiling.to_list()
    return table


def static_ceiling(trials: pd.DataFrame) -> pd.Series | None:
    """Each trial's static estimates as "tensor/issue / memory" fractions of peak ('-' where unknown); None when
    no trial has one (not compiled ahead)."""
    columns = ["static_tensor_ceiling", "static_memory_ceiling"]
    if not set(columns) <= set(trials) or not trials[columns].notna().any().any():
        return None

    def text(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.2f}"

    return pd.Series([f"{text(t)} / {text(m)}" for t, m in
                      zip(trials["static_tensor_ceiling"], trials["static_memory_ceiling"])],
                     index=trials.index)


def run(args: argparse.Namespace) -> int:
    from triton_workbench.autotune.distributed import Distributed, leave_process_group
    from triton_workbench.autotune.results import TuningDatabase
    from triton_workbench.autotune.tuner import check_prune_static, tune
    from triton_workbench.database.environment import device_key
    from triton_workbench.workbench.tune_energy import device_knobs, energy_meter_for

    spec = spec_for(args.kernel)
    problem = build_problem(spec, args.shape, args.dtype, args.activation, args.problem)
    options = strategy_options_from(args, [args.strategy])
    check_prune_static(args.prune_static, "--prune-static")
    if args.prune_static is not None and args.no_compile_ahead:
        raise UsageError("--prune-static needs the static ceilings of compiling ahead: drop --no-compile-ahead")
    try:
        objective = Objective.parse(args.objective)
    except ValueError as error:
        raise UsageError(f"--objective: {error}") from None
    if objective.needs_energy and not args.profile:
        raise UsageError(f"--objective {args.objective} needs --profile")
    if args.remeasure_below is not None and not args.profile:
        raise UsageError("--remeasure-below needs --profile (it re-measures energy trials)")
    for option, count in (("--power-limits", args.power_limits), ("--sm-clocks", args.sm_clocks)):
        if count < 0 or count == 1:
            raise UsageError(f"{option} must be 0 (not tuned) or a number of candidates >= 2, got {count}")
    distributed = Distributed.from_environment()
    lead = distributed is None or distributed.rank == 0
    database = TuningDatabase(args.db)
    meter, sampler = energy_meter_for(args.profile, args.objective, args.remeasure_below)
    key = device_key()
    interpreter = key.capability == ""
    if lead:
        where = "the Triton interpreter (CPU): times are interpreter times, not GPU times" if interpreter else key.device
        print(f"tuning {spec.name} for {json.dumps(problem)} on {where}; database {database.path}")
    if sampler is not None:
        sampler.start()
    finished = False
    try:
        with device_knobs(args.power_limits, args.sm_clocks, distributed) as knobs:
            trials = tune(spec, problem, strategy=args.strategy, strategy_options=options, budget=args.budget,
                          db=database, objective=args.objective, seed=args.seed, energy_meter=meter,
                          compile_ahead=False if args.no_compile_ahead else None, workers=args.workers,
                          timeout_s=args.timeout, progress=lead, distributed=distributed,
                          prune_static=args.prune_static, device_knobs=knobs)  # fmt: skip
        finished = True
    finally:
        if sampler is not None:
            sampler.stop()
        leave_process_group(together=finished)
    if not lead:
        return 0
    if sampler is not None and trials.attrs.get("run_id") is not None:  # the power trace beside the trials
        database.append(SeriesTable.SAMPLES, trials.attrs["run_id"], sampler.frame())
        database.append(SeriesTable.WINDOWS, trials.attrs["run_id"], sampler.windows())
    print(summary(spec, problem, trials, args.objective, key.device, interpreter))
    return 0


def summary(spec, problem: dict[str, Any], trials: pd.DataFrame, objective: str, device: str,
            interpreter: bool) -> str:  # fmt: skip
    """Counts by status, the top configs as an aligned table, and the winner."""
    counts = trials["status"].value_counts()
    lines = [f"{len(trials)} trials stored: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    ok = trials[trials["status"] == TrialStatus.OK].copy()
    if ok.empty:
        lines.append("no config produced a correct result; the kernel keeps its default config")
        failures = trials[["config", "status", "reason"]].head(TOP_CONFIGS)
        return "\n".join(lines + [format_table(failures)])
    ok["objective"] = Objective.parse(objective).values(ok)
    top = ok.sort_values("objective").head(TOP_CONFIGS)
    table = performance_table(top, problem, baseline_time_ms(spec, problem), device, interpreter)
    if objective != "time":
        table.insert(1, "J/call", top["energy_j_per_call"].map(lambda v: f"{v:.4g}").to_list())
        table.insert(2, "W", top["avg_power_w"].map(lambda v: f"{v:.4g}").to_list())
        table.insert(3, "throttled", [throttle_words(r, m) for r, m in zip(top["throttle_reasons"], top["remeasured"])])
    title = f"top {len(top)} of {len(ok)} correct configs by {objective}"
    if "static ceiling" in table:
        title += "; static ceiling: static estimate, tensor/issue / memory fraction of peak (reference GPU)"
    if interpreter:
        title += " (interpreter timings on CPU: not GPU performance)"
    lines += [title, format_table(table)]
    if not math.isfinite(top["objective"].iloc[0]):
        return "\n".join(lines + [f"no config met the objective {objective}: nothing stored; the kernel keeps the config "
                                  "it had (its default unless tuned before)"])  # fmt: skip
    best = json.loads(top["config"].iloc[0])
    settings = {name: best.pop(name) for name in (POWER_LIMIT, SM_CLOCK) if name in best}
    lines.append(f"best: {best} (stored; kernels.tuned.config_for now returns it)")
    if settings:
        lines.append(f"best device settings: {settings} (in its trial; the GPU's own settings are restored)")
    return "\n".join(lines)

