"""A tiny KernelSpec for the autotune tests: out = x * factor, with deliberately bad configs.

BROKEN=1 adds 1 to every element (a wrong result the pipeline must record as 'wrong'); HANG=1
makes the launcher never return (a hang the watchdog must stop). Importable by subprocesses
(torchrun, a killed sweep), which is why it is a module and not a fixture.
"""

import time

import torch
import triton
import triton.language as tl

from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.spec import DTYPES, KernelSpec


@jit
def scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr, BROKEN: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    y = tl.load(x_ptr + offsets, mask=mask) * factor
    if BROKEN:
        y = y + 1.0
    tl.store(out_ptr + offsets, y, mask=mask)


def make_inputs(problem, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(problem["n"], generator=generator, dtype=DTYPES[problem["dtype"]]).to(device)
    return {"x": x, "factor": 3.0}


def launch(inputs, config):
    if config.get("HANG"):
        while True:
            time.sleep(0.01)
    x = inputs["x"]
    out = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), config["BLOCK"]),)
    scale_kernel[grid](x, out, x.numel(), inputs["factor"], BLOCK=config["BLOCK"], BROKEN=config["BROKEN"])
    return out


SPEC = KernelSpec(
    name="tiny_scale",
    kernel=scale_kernel,
    params={"BLOCK": [16, 24, 32, 64], "BROKEN": [0, 1], "HANG": [0]},
    constraints=(),
    default_config=lambda problem: {"BLOCK": 32, "BROKEN": 0, "HANG": 0},
    make_inputs=make_inputs,
    launch=launch,
    reference=lambda inputs: inputs["x"].double() * inputs["factor"],
    flops=lambda problem: problem["n"],
    bytes=lambda problem: 2 * problem["n"] * DTYPES[problem["dtype"]].itemsize,
    grid=lambda problem, config: (triton.cdiv(problem["n"], config["BLOCK"]),),
    baseline=lambda inputs: inputs["x"] * inputs["factor"],
    example_problems=({"n": 1000, "dtype": "fp32"},),
    shape_keys=("n",),
)
