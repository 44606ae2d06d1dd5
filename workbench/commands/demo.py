"""`workbench demo`: the main job. Tunes the GEMM and conv kernels, tunes the demo ResNet's layers,
trains it on digits with Triton and with PyTorch kernels (profiled with NVML where there is a GPU),
compares search strategies on recorded landscapes, and writes runs/demo/report.html.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_workbench.workbench.demo import DEFAULT_LANDSCAPES, SIZES, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="tune, train, profile and report end to end (the main job)",
                                   description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--size", choices=["auto", *SIZES], default="auto",
                        help="problem sizes: cpu (interpreter), gpu (realistic), auto (by machine; default)")
    parser.add_argument("--landscapes", type=Path, default=DEFAULT_LANDSCAPES,
                        help="folder of Kernel Tuner cache files for the strategy comparison")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, args.size, args.landscapes)
    return 0
