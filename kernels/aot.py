"""Ahead-of-time compilation of a kernel config for a GPU target, with no GPU present.

`compile_config` compiles one (problem, config) for one architecture and reports its resources;
`compile_space` does it for many in a process pool. Triton decides when a kernel is *defined*
whether it is interpreted, so compilation happens in processes started with TRITON_INTERPRET=0
(spawned workers that look the kernel up by name in `kernels.SPECS`); the calling process may
itself run in the interpreter. Identical compilations (e.g. configs differing only in a runtime
argument such as GEMM's GROUP_M) are compiled once and their result shared.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import pandas as pd
from tqdm import tqdm

from triton_workbench.kernels import hardware
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, canonical_json, problem_id


@dataclass
class CompileResult:
    """What compiling one config for one target gave.

    shared_bytes: static + dynamic shared memory per block. registers: per thread (from the
    cubin). spills: bytes of per-thread stack frame, where ptxas puts spilled registers (0: none).
    """

    ok: bool
    reason: str  # "" when ok; else why not (compile error, resource limit exceeded)
    shared_bytes: float = float("nan")
    registers: float = float("nan")
    spills: float = float("nan")
    compile_time_s: float = float("nan")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, read by Triton's bundled cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(cubin)
    try:
        output = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", file.name],
                                capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(file.name)
    match = re.search(r"REG:(\d+) STACK:(\d+)", output)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {output[:200]!r}")
    return int(match.group(1)), int(match.group(2))


def compile_config(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> CompileResult:
    """Compile `spec`'s kernel for `problem` and `config` for sm_`arch` (e.g. 80, 90).

    A failure is returned, not raised. Where this process runs kernels in the interpreter, the
    compilation runs in one spawned worker instead (slower to start, same result).
    """
    from triton_workbench.kernels import runtime

    if runtime.INTERPRETER:
        row = compile_space(spec, [(config, problem)], archs=(arch,), workers=1, progress=False).iloc[0]
        numbers = {name: float(row[name]) for name in ("shared_bytes", "registers", "spills", "compile_time_s")}
        return CompileResult(bool(row["ok"]), str(row["reason"]), **numbers)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    try:
        signature, constexprs = spec.aot_signature(problem, config)
        compiled = triton.compile(
            ASTSource(spec.kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)})
        registers, spills = _resource_usage(compiled.asm["cubin"])
    except Exception as error:  # any compiler failure is a result to report
        message = str(error).strip().splitlines()
        return CompileResult(False, f"{type(error).__name__}: {message[0] if message else ''}"[:300],
                             compile_time_s=time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    shared = int(compiled.metadata.shared)
    known = hardware.architecture(arch)
    limit = None if known is None else known.shared_bytes_per_block
    if limit is not None and shared > limit:
        return CompileResult(False, f"shared memory {shared} B > sm_{arch} limit {limit} B", shared, registers,
                             spills, elapsed)
    return CompileResult(True, "", shared, registers, spills, elapsed)


# ---------------------------------------------------------------------------------------------
# many configs in parallel


def _die_with_parent() -> None:
    """Pool initializer: on Linux, end this worker when the parent dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def compile_in_worker(spec_name: str, problem: Problem, config: Config, arch: int) -> dict:
    """`compile_config` for a spec registered in `kernels.SPECS`, as a dict: the task a compile pool runs."""
    from triton_workbench import kernels

    return asdict(compile_config(kernels.SPECS[spec_name], problem, config, arch))


def compile_pool(workers: int, first_tasks: Iterable[tuple] = ()) -> tuple[ProcessPoolExecutor, list]:
    """A spawned process pool for `compile_in_worker`, and the futures of `first_tasks` (argument tuples).

    Its workers define kernels with TRITON_INTERPRET=0 (a spawned child copies the environment as it
    starts, and the spawn pool starts one per submission while none is idle), so every worker is
    started here, with the variable set: by the first tasks, or by trivial ones. Workers end with
    their parent, even when it is killed.
    """
    with _compiling_environment():
        pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_die_with_parent)
        futures = [pool.submit(compile_in_worker, *task) for task in first_tasks]
        for _ in range(max(1, workers) - len(futures)):
            pool.submit(int)
    return pool, futures


@contextmanager
def _compiling_environment() -> Iterator[None]:
    """TRITON_INTERPRET=0 while workers start (spawned children copy the environment)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _compile_key(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> str:
    signature, constexprs = spec.aot_signature(problem, config)
    return json.dumps([signature, constexprs, config.get("num_warps"), config.get("num_stages"), arch],
                      sort_keys=True, default=str)


def compile_space(spec: KernelSpec, configs_and_problems: Iterable[tuple[Config, Problem]],
                  archs: Iterable[int] = hardware.COMPILE_TARGETS, workers: int | None = None,
                  progress: bool = True, on_result: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Compile every (config, problem) pair for every arch, in parallel; one row per pair and arch.

    Columns: kernel, problem (JSON), config (JSON), arch, ok, reason, shared_bytes, registers,
    spills, compile_time_s. `spec` must be registered in `kernels.SPECS` (workers look it up by
    name). `on_result(row)` is called as each row is done, so a caller can store results as they
    come (an interrupted run keeps them). `workers` defaults to the number of CPUs.
    """
    from triton_workbench import kernels

    if kernels.SPECS.get(spec.name) is not spec:
        raise ValueError(f"spec {spec.name!r} is not registered in kernels.SPECS: workers could not find it")
    jobs = [(config, problem, arch) for config, problem in configs_and_problems for arch in archs]
    keys = [_compile_key(spec, problem, config, arch) for config, problem, arch in jobs]
    unique = {key: job for key, job in zip(keys, jobs)}
    results: dict[str, dict] = {}
    rows: list[dict] = []

    def row_of(index: int) -> dict:
        config, problem, arch = jobs[index]
        return {"kernel": spec.name, "problem": problem_id(problem), "config": canonical_json(config),
                "arch": arch, **results[keys[index]]}

    waiting: dict[str, list[int]] = defaultdict(list)  # compile key -> the jobs it answers
    for index, key in enumerate(keys):
        waiting[key].append(index)
    bar = tqdm(total=len(jobs), desc=f"compile {spec.name}", unit="cfg", disable=not progress)
    tasks = [(spec.name, problem, config, arch) for config, problem, arch in unique.values()]
    pool, submitted = compile_pool(min(workers or os.cpu_count() or 1, len(unique)), tasks)
    futures = dict(zip(submitted, unique))
    try:
        failures = 0
        for future in as_completed(futures):
            key = futures[future]
            try:
                results[key] = future.result()
            except Exception as error:  # a crashed worker is a failed compilation, not a stopped sweep
                results[key] = asdict(CompileResult(False, f"worker failed: {type(error).__name__}: {error}"[:300]))
            for index in waiting[key]:
                row = row_of(index)
                rows.append(row)
                failures += not row["ok"]
                if on_result is not None:
                    on_result(row)
            bar.update(len(waiting[key]))
            bar.set_postfix(failures=failures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    columns = ["kernel", "problem", "config", "arch", *CompileResult.__dataclass_fields__]
    return pd.DataFrame(rows, columns=columns).sort_values(["problem", "config", "arch"], ignore_index=True)


def default_space(spec: KernelSpec, problem: Problem) -> list[Config]:
    """Every valid config of `spec` for `problem`: the product of its candidates, filtered by constraints."""
    names = list(spec.params)
    configs = (dict(zip(names, values)) for values in itertools.product(*(spec.params[n] for n in names)))
    return [config for config in configs if spec.is_valid(config, problem)]
