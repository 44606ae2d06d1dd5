"""What Triton's own `JITFunction.run` compiles when an op launches on real tensors: the oracle the
ahead-of-time specialisation (`kernels.aot.specialise`) is checked against.

Run in a compile worker (TRITON_INTERPRET=0, see `kernels.aot.compile_pool`), which is why it is a module
and not a fixture: the op launches on CPU tensors from `spec.make_inputs` with a stand-in for the CUDA
driver (an sm_`arch` device) and a `jit_cache_hook` that records what `run` would compile and skips it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from triton_workbench import kernels
from triton_workbench.kernels import aot


class _Device:
    """What `JITFunction.run` asks of the active driver."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> str:
        return f"sm_{self.arch}"  # a cache key per target: run builds one binder per device

    def get_current_stream(self, device: Any) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, aot.WARP_SIZE)


@functools.lru_cache(maxsize=4)
def _inputs(spec_name: str, problem_json: str) -> dict:
    return kernels.SPECS[spec_name].make_inputs(json.loads(problem_json), torch.device("cpu"))


def launched(spec_name: str, problem: dict, config: dict, arch: int) -> list[dict]:
    """What `JITFunction.run` compiles, per launch, when `spec.launch` runs the problem's real CPU inputs (TF32
    switches as the problem records them)."""
    from triton import knobs
    from triton.runtime.driver import driver

    spec = kernels.SPECS[spec_name]
    seen: list[dict] = []

    def hook(*, compile: dict, **_: Any) -> bool:
        seen.append(compile)
        return True  # handled: run compiles nothing and launches nothing

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(problem.get("tf32"))
    previous_hook, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    previous_driver = driver._active  # (reset_active would look for a real GPU)
    driver.set_active(_Device(arch))
    try:
        spec.launch(_inputs(spec_name, json.dumps(problem, sort_keys=True)), dict(config))
    finally:
        driver.set_active(previous_driver)
        knobs.runtime.jit_cache_hook = previous_hook
    return [{"signature": compiled["signature"], "constexprs": compiled["constants"], "attrs": compiled["configs"][0],
             "num_warps": compiled["num_warps"], "num_stages": compiled["num_stages"]} for compiled in seen]


def specialised(spec_name: str, problem: dict, config: dict, arch: int) -> list[dict]:
    """`aot.specialise`, in the form of `launched`."""
    return [{"signature": found.signature, "constexprs": found.constexprs, "attrs": found.attrs,
             "num_warps": found.options["num_warps"], "num_stages": found.options["num_stages"]}
            for found in aot.specialise(kernels.SPECS[spec_name], problem, config, arch)]


def both(spec_name: str, problem: dict, config: dict, arch: int) -> tuple[list[dict], list[dict]]:
    return specialised(spec_name, problem, config, arch), launched(spec_name, problem, config, arch)
