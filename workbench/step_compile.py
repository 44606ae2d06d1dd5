"""Every Triton launch of a swapped model's training step, compiled ahead of time for GPU targets, no GPU
needed: `workbench check-compile model MODEL`.

The step runs on the meta device as `bench model --traffic` runs it (workbench.traffic), each launch is
bound as `JITFunction.run` binds it (`kernels.aot.bind`), and each distinct specialisation is compiled
once, in parallel compile workers. What it shows that the kernels' own spaces cannot: the kernels only
a model's step launches (BatchNorm's, the fused conv epilogues' variants) compile for the target, with
their registers, spills and shared memory. Compiling also fills Triton's cache, so on a GPU machine a
first training step afterwards compiles little (on the H200: 7-10 s, the rest cache hits). Meta tensors
have no addresses, so every pointer binds as 16-byte aligned, as fresh allocations are; a launch on a
view at an unaligned offset specialises otherwise, compiles on its first call, and is not checked here.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Sequence

import pandas as pd
from torch import nn
from tqdm import tqdm

from triton_workbench.kernels import aot
from triton_workbench.kernels.errors import UsageError


def kernel_reference(kernel: Any) -> str:
    """`module:name` of a project kernel, by which a compile worker finds it."""
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def _resolve(reference: str) -> Any:
    """The object `module:name` names."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def build_model(model: str) -> nn.Module:
    """A fresh model: one of `bench model`'s (resnet18, resnet50, demo) by name, or `module:function`, a
    function of no arguments returning an nn.Module (a user's own model; compile workers import it)."""
    from triton_workbench.workbench import traffic

    models = traffic.bench_models()
    if model in models:
        return models[model]()
    if ":" not in model:
        raise UsageError(f"MODEL must be one of {', '.join(models)} or module:function, got {model!r}")
    try:
        build = _resolve(model)
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"MODEL {model!r} names no function: {error}") from None
    built = build()
    if not isinstance(built, nn.Module):
        raise UsageError(f"MODEL {model!r} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def step_specialisations(model: str, batch: int, image_size: int, dtype: str,
                         arch: int) -> list[tuple[str, aot.Specialisation]]:
    """(kernel reference, specialisation for sm_`arch`) of each Triton launch of one training step of the
    swapped `model` (see `build_model`); runs where kernels are `JITFunction`s (a compile worker)."""
    from triton_workbench.kernels.nn import swap
    from triton_workbench.kernels.spec import DTYPES
    from triton_workbench.workbench import traffic

    found: list[tuple[str, aot.Specialisation]] = []

    def bind(kernel: Any, launch: aot.Launch) -> None:
        found.append((kernel_reference(kernel), aot.bind(kernel, launch, arch)))

    swapped = swap(build_model(model).to("meta"))  # meta: swap takes it on any machine
    traffic.step_kernels(swapped, (batch, 3, image_size, image_size), DTYPES[dtype], on_launch=bind)
    return found


def compile_in_worker(reference: str, specialisation: aot.Specialisation, arch: int) -> dict:
    """Compile one specialisation; a compile error is a result (ok False, reason), not raised."""
    started = time.perf_counter()
    try:
        compiled = aot.compile_specialisation(_resolve(reference), specialisation, arch)
    except Exception as error:
        return asdict(aot.failure(error, started))
    return asdict(aot.CompileResult(True, "", compiled.shared_bytes, compiled.registers, compiled.spills,
                                    compiled.compile_time_s))


def compile_step(model: str, batch: int, image_size: int, dtype: str, archs: Sequence[int],
                 workers: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per distinct compilation of the step's launches and arch: arch, kernel, launches (how many of
    the step's launches it serves), ok, reason, shared_bytes, registers, spills, compile_time_s."""
    pool = aot.compile_pool(workers or os.cpu_count() or 1)
    try:
        traced = {arch: pool.submit(step_specialisations, model, batch, image_size, dtype, arch) for arch in archs}
        launched = {arch: future.result() for arch, future in traced.items()}
        jobs: dict[tuple[int, str], tuple[str, aot.Specialisation]] = {}
        launches: Counter = Counter()
        for arch, found in launched.items():
            for reference, specialisation in found:
                key = (arch, f"{reference} {specialisation.key}")
                jobs.setdefault(key, (reference, specialisation))
                launches[key] += 1
        futures = {key: pool.submit(compile_in_worker, reference, specialisation, key[0])
                   for key, (reference, specialisation) in jobs.items()}
        rows = []
        for key, future in tqdm(futures.items(), desc=f"compile {model}'s step", unit="kernel",
                                disable=not progress):
            reference = jobs[key][0]
            rows.append({"arch": key[0], "kernel": reference.split(":")[1], "launches": launches[key],
                         **future.result()})
    finally:
        pool.shutdown(cancel_futures=True)
    return pd.DataFrame(rows)


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per arch and kernel: launches, distinct compilations, failures, and the largest resources."""
    return results.groupby(["arch", "kernel"]).agg(launches=("launches", "sum"), compilations=("ok", "size"),
                                                   **aot.RESOURCE_SUMMARY).reset_index()
