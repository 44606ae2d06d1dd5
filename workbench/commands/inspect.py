"""`workbench inspect KERNEL`: compile what a launch compiles for a GPU target and read its machine code.

For one problem and one or more configs (--config, the --top N of the database's trials, else the config a
launch would use), per target architecture and per kernel launch of the op (one, or e.g. one per stride
phase): registers, spills, shared memory, CTAs and CTAs per SM, the MMA instructions and their shapes, the
global load path, the innermost MMA loop's instruction mix, and two static ceilings (kernels/ceilings.py:
tensor/issue, and memory against a GPU's peaks; the latter is the whole op's). No GPU needed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd

from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.hardware import COMPILE_TARGETS
from triton_workbench.workbench.commands.tune import add_problem_arguments, build_problem, spec_for
from triton_workbench.workbench.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="compile a config for a GPU target and report its SASS: resources, MMA, loads, ceilings",
        description="Compile KERNEL for one problem, as its launch would, for each --arch (no GPU needed) and "
                    "report registers, spills, shared memory, CTAs, the MMA instructions, the load path, the "
                    "innermost MMA loop's instruction mix, and the static tensor/issue and memory ceilings.")
    add_problem_arguments(parser)
    configs = parser.add_mutually_exclusive_group()
    configs.add_argument("--config", default=None, metavar="JSON", help="the config as a JSON object")
    configs.add_argument("--top", type=int, default=None, metavar="N",
                         help="the N fastest configs of the database's successful trials of this problem")
    parser.add_argument("--arch", type=int, nargs="+", default=[COMPILE_TARGETS[-1]], metavar="CC",
                        help=f"compute capabilities to compile for, e.g. 80 90 (default {COMPILE_TARGETS[-1]})")
    parser.add_argument("--gpu", default=None,
                        help="GPU model whose peaks bound the memory ceiling (default: the architecture's reference, "
                             "H100 SXM for sm_90, A100 80GB SXM for sm_80)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triton_workbench.kernels import aot, ceilings

    spec = spec_for(args.kernel)
    problem = build_problem(spec, args.shape, args.dtype, args.activation, args.problem)
    configs = _configs(spec, problem, args)
    gpus = {arch: _gpu(arch, args.gpu) for arch in args.arch}
    jobs = [(problem, config, arch) for config in configs for arch in args.arch]
    reports = []
    for (_, config, arch), outcome in zip(jobs, aot.compile_kernels(spec, jobs, workers=args.workers)):
        launches = [outcome] if isinstance(outcome, aot.CompileResult) else outcome
        reports += [ceilings.inspect(spec, problem, config, arch, compiled, gpus[arch])
                    | {"launch": index + 1, "launches": len(launches)} for index, compiled in enumerate(launches)]
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
    else:
        print(f"{spec.name} {json.dumps(problem)}")
        print(format_table(table(reports)))
        print("\ntensor/issue ceiling: tensor-core clocks / max(tensor-core, issue clocks) per iteration of the "
              "innermost MMA loop;\nmemory ceiling: compute time at peak / max(compute, memory time) for the "
              "problem's FLOPs and minimum bytes (kernels/ceilings.py)")
    return 0 if all(report["ok"] for report in reports) else 1


def _configs(spec: Any, problem: dict[str, Any], args: argparse.Namespace) -> list[dict[str, int]]:
    """--config, else the --top N, else the config a launch uses (`kernels.tuned`); parameters in the spec's order."""
    from triton_workbench.kernels import tuned

    if args.config is not None:
        configs = [_parsed_config(spec, args.config)]
    elif args.top is not None:
        configs = _top_configs(spec, problem, args.top, args.db)
    else:
        configs = [tuned.config_for(spec, problem)]
    return [{name: config[name] for name in spec.params if name in config} for config in configs]


def _parsed_config(spec: Any, text: str) -> dict[str, int]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--config must be a JSON object: {error}") from None
    if not isinstance(config, dict) or not all(type(value) is int for value in config.values()):
        raise UsageError(f"--config must be a JSON object of integers, got {text!r}")
    if set(config) != set(spec.params):
        raise UsageError(f"--config for {spec.name} needs exactly {', '.join(spec.params)}; got {', '.join(config)}")
    return config


def _top_configs(spec: Any, problem: dict[str, Any], count: int, db: str | None) -> list[dict[str, int]]:
    """The `count` fastest distinct configs among the database's successful trials of exactly this problem (any
    device, any run)."""
    from triton_workbench.autotune import TuningDatabase
    from triton_workbench.database import TrialStatus
    from triton_workbench.kernels.spec import problem_id

    if count < 1:
        raise UsageError(f"--top must be a positive number of configs, got {count}")
    database = TuningDatabase(db)
    if not database.path.exists():  # read only: no empty database is made
        raise UsageError(f"--top: there is no database at {database.path}")
    try:
        trials = database.trials()
    finally:
        database.close()
    mine = trials[(trials["kernel"] == spec.name) & (trials["problem"] == problem_id(problem))
                  & (trials["status"] == TrialStatus.OK) & trials["time_ms"].notna()]
    if mine.empty:
        raise UsageError(f"no successful trials of {spec.name} for {problem_id(problem)} in {database.path}")
    best = mine.sort_values("time_ms").drop_duplicates("config").head(count)
    return [json.loads(config) for config in best["config"]]


def _gpu(arch: int, name: str | None) -> Any:
    from triton_workbench.kernels import hardware

    if hardware.architecture(arch) is None:
        known = ", ".join(map(str, hardware.ARCHITECTURES))
        raise UsageError(f"--arch {arch} is not a known compute capability (known: {known})")
    if name is None:
        return hardware.reference_gpu(arch)
    gpu = hardware.gpu_by_name(name)
    if gpu is None or gpu.architecture.capability != arch:
        models = ", ".join(g.name for g in hardware.gpus_of(arch)) or "none"
        raise UsageError(f"--gpu {name!r} is not a known sm_{arch} model (known: {models})")
    return gpu


def table(reports: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per measure, one column per compilation: sm_90, sm_80 (sm_90 #2 ... for the second config on;
    "launch 2/4" where an op launches its kernel more than once)."""
    configs = list(dict.fromkeys(json.dumps(report["config"], sort_keys=True) for report in reports))
    columns = {}
    for report in reports:
        number = configs.index(json.dumps(report["config"], sort_keys=True)) + 1
        name = f"sm_{report['arch']}" + (f" #{number}" if len(configs) > 1 else "")
        if report.get("launches", 1) > 1:
            name += f" launch {report['launch']}/{report['launches']}"
        columns[name] = _column(report)
    measures = list(dict.fromkeys(measure for column in columns.values() for measure in column))
    return pd.DataFrame({"": measures, **{name: [column.get(measure, "") for measure in measures]
                                          for name, column in columns.items()}})


def _column(report: dict[str, Any]) -> dict[str, str]:
    cells = {name: str(value) for name, value in report["config"].items()}
    cells["compiled"] = "ok" if report["ok"] else f"failed: {report['reason']}"
    if "registers" not in report:  # the compiler failed
        return cells
    loop = report["loop"]
    return cells | {
        "registers": str(report["registers"]),
        "spills (bytes)": str(report["spill_bytes"]),
        "shared memory (KiB)": f"{report['shared_bytes'] / 1024:g}",
        "CTAs": f"{report['ctas']} ({'x'.join(map(str, report['grid']))})",
        "CTAs per SM": _number(report["ctas_per_sm"]),
        "MMA": ", ".join(f"{m['opcode']} x{m['count']} ({m['shape']})" for m in report["mma"]) or "none",
        "global loads": _counted(report["global_loads"]),
        "MMA loop": "none" if loop is None else
        f"{loop['start']:#06x}-{loop['end']:#06x}: {loop['instructions']} instructions",
        "loop global loads": "-" if loop is None else _counted(loop["global_loads"]),
        "loop mix": "-" if loop is None else _counted(loop["categories"], " "),
        "loop opcodes (top 6)": "-" if loop is None else _counted(dict(list(loop["mnemonics"].items())[:6]), " "),
        "tensor clocks / iteration": _number(report["tensor_clocks_per_iteration"]),
        "issue clocks / iteration": _number(report["issue_clocks_per_iteration"]),
        "tensor/issue ceiling": _percent(report["tensor_issue_ceiling"]),
        "memory ceiling": _percent(report["memory_ceiling"]),
        "GPU peaks": "-" if report["peak_tflops"] is None else
        f"{report['gpu']}: {report['peak']} {report['peak_tflops']:g} TFLOP/s, {report['bandwidth_gbps']:g} GB/s",
    }


def _counted(counts: dict[str, int], separator: str = " x") -> str:
    return ", ".join(f"{name}{separator}{count}" for name, count in counts.items()) or "none"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"
