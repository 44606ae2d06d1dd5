"""Static view of one ResNet-18 training step's conv launches, without a GPU.

Compiles every conv launch of a training step (the 11 distinct layers of RESNET18_CONV_SHAPES:
forward, dgrad except the stem's, whose input needs no gradient, and wgrad) at batch 64, fp16,
channels_last, bias + ReLU, default configs, for sm_90 and sm_80, exactly as the launch specialises
it, and prints per launch: CTAs, registers, spill bytes, the MMA instruction and the tensor/issue
ceiling of the innermost MMA loop (kernels/ceilings.py). Static estimates, not speeds.

    python benchmarks/resnet18_static.py [--arch 90 80] [--batch 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from triton_workbench.kernels import aot, ceilings, hardware
from triton_workbench.kernels.conv_dgrad import CONV_DGRAD_SPEC
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
from triton_workbench.kernels.conv_wgrad import CONV_WGRAD_SPEC
from triton_workbench.workbench.conv_bench import RESNET18_CONV_SHAPES, resnet18_problem
from triton_workbench.workbench.tables import format_table


def launches(batch: int) -> list[tuple[str, object, dict]]:
    """(layer, spec, problem) of every conv launch of a training step; dgrad and wgrad take dz formed."""
    rows = []
    for shape in RESNET18_CONV_SHAPES:
        forward = resnet18_problem(shape, batch=batch)
        backward = forward | {"activation": None, "bias": False}
        rows.append((shape["name"], CONV_FWD_SPEC, forward))
        if shape["name"] != "conv1":
            rows.append((shape["name"], CONV_DGRAD_SPEC, backward))
        rows.append((shape["name"], CONV_WGRAD_SPEC, backward | {"bias": True}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="also write every launch's report to this file")
    args = parser.parse_args()
    rows, reports = [], []
    for layer, spec, problem in launches(args.batch):
        config = spec.default_config(problem)
        jobs = [(problem, config, arch) for arch in args.arch]
        for arch, outcome in zip(args.arch, aot.compile_kernels(spec, jobs)):
            compiled = [outcome] if isinstance(outcome, aot.CompileResult) else outcome
            found = [ceilings.inspect(spec, problem, config, arch, launch, hardware.reference_gpu(arch))
                     for launch in compiled]
            reports += found
            with_mma = [r for r in found if r.get("tensor_issue_ceiling") is not None] or found
            worst = min(with_mma, key=lambda r: r.get("tensor_issue_ceiling") or 0.0)
            mma = ", ".join(m["opcode"] for m in worst.get("mma", [])[:1]) or "-"
            ceiling = worst.get("tensor_issue_ceiling")
            rows.append({"layer": layer, "kernel": spec.name, "arch": arch,
                         "tile": f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']}",
                         "launches": len(found), "ctas": sum(r.get("ctas", 0) for r in found),
                         "regs": max(r.get("registers", 0) for r in found),
                         "spill_bytes": max(r.get("spill_bytes", 0) for r in found), "mma": mma,
                         "loop_instr": worst["loop"]["instructions"] if worst.get("loop") else "-",
                         "ceiling": "-" if ceiling is None else f"{ceiling:.2f}"})
    print(format_table(pd.DataFrame(rows)))
    print("\nstatic estimates from the compiled SASS (no GPU): ceiling = tensor-core clocks / max(tensor-core, issue "
          "clocks)\nper iteration of the innermost MMA loop ('-': no MMA loop, e.g. fully unrolled); ctas summed over "
          "a layer's launches; the worst launch's loop shown")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(reports, file, indent=1, default=str)


if __name__ == "__main__":
    main()
