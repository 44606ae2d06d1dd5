"""`workbench gpu-check`: what only a GPU can verify, in one command of under 8 minutes (`make gpu-check`).

Runs the GPU-marked tests, the torch.compile test, a real-NVML `workbench monitor` of a short tuning
sweep, `workbench bench gemm` and `workbench bench conv` (a quick subset, against cuBLAS and cuDNN)
and `workbench report`, each in its own process with a time limit; a failing step is recorded and the
check goes on. Writes summary.txt, summary.json, logs/ and report.html in --out (and copies them to
$OUT/gpu-check when $OUT is set). Exits 0 when every step passed, 1 otherwise, and 1 without running
anything on a machine with no GPU. --plan lists the steps and their commands (any machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_workbench.workbench.gpu_check import BUDGET_S, DEFAULT_OUT, run_gpu_check


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gpu-check", help="run the GPU-only tests, benchmarks and NVML checks (needs a GPU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=_positive_seconds, default=BUDGET_S,
                        help=f"seconds for all the steps together (default {BUDGET_S:.0f})")
    parser.add_argument("--plan", action="store_true", help="list the steps and their commands; run nothing")
    parser.set_defaults(func=run)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def run(args: argparse.Namespace) -> int:
    return run_gpu_check(args.out, args.budget_s, plan_only=args.plan)
