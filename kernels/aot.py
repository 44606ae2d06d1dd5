"""Ahead-of-time compilation of a kernel config for a GPU target, with no GPU present.

What is compiled is what a launch compiles. `launches_of` runs the spec's own launcher on meta tensors
(the shapes, strides and dtypes of the problem's inputs, no data, 16-byte-aligned addresses like every
fresh allocation) and captures the arguments it passes to its kernel instead of launching it (an op may
launch its kernel more than once, e.g. the depthwise dgrad once per stride phase). `specialise` binds them with Triton's
binder for the target, the steps `JITFunction.run` takes (`create_function_from_signature`, then
`JITFunction._pack_args`): the signature, the constants (constexprs, and integer arguments equal to 1)
and the attributes (tt.divisibility 16 of pointers and integers) that `ASTSource` compiles, and the
compile options (num_warps, num_stages, ...).

`compile_config` compiles one (problem, config) for one architecture and reports its resources (the
largest over its launches); `compile_space` does it for many in a process pool; `compile_kernels`
returns the cubins, one per launch (for `workbench inspect`). Triton decides when a kernel is *defined*
whether it is interpreted, so compilation happens in processes started with TRITON_INTERPRET=0 (spawned
workers that look the kernel up by name in `kernels.SPECS`); the calling process may itself run in the
interpreter. Identical compilations (the same specialisations: e.g. problems that differ only in sizes
with the same divisibility) are compiled once and their result shared.
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
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
from tqdm import tqdm

from triton_workbench.kernels import hardware
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, canonical_json, problem_id

WARP_SIZE = 32


@dataclass(frozen=True)
class Launch:
    """What a launcher passes to its kernel: `kernel[grid](*args, **kwargs)`."""

    args: tuple
    kwargs: dict[str, Any]  # constexprs by name, and the launch options (num_warps, num_stages)
    grid: Any  # a tuple, or a callable of the bound arguments


@dataclass(frozen=True)
class Specialisation:
    """What Triton compiles for one launch on one target: `ASTSource(kernel, signature, constexprs, attrs)`
    and `options`, as `JITFunction.run` forms them; and the launch's grid.

    signature: argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr"). constexprs and
    attrs are keyed by argument path, as Triton keys them ((index,), or deeper into tuple arguments):
    constexprs holds every constant (constexpr parameters and integer arguments equal to 1), attrs
    the specialisation attributes of the other arguments ([["tt.divisibility", 16]] or []).
    """

    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, list]
    options: dict[str, Any]  # the backend's options (CUDAOptions fields): num_warps, num_stages, arch, ...
    grid: tuple[int, int, int]

    def source(self, kernel: Any) -> Any:
        from triton.compiler import ASTSource

        return ASTSource(kernel, self.signature, self.constexprs, self.attrs)

    @property
    def key(self) -> str:
        """Equal for equal compilations: what `compile_space` compiles once."""
        return json.dumps([self.signature, sorted(self.constexprs.items(), key=str),
                           sorted(self.attrs.items(), key=str), self.options], sort_keys=True, default=str)

    def named(self) -> dict[str, Any]:
        """By argument name, for people and JSON: the signature, the constants, and the arguments with
        specialisation attributes (name -> attributes)."""
        names = list(self.signature)

        def name(path: tuple) -> str:
            return names[path[0]] + "".join(f"[{index}]" for index in path[1:])

        return {"signature": dict(self.signature),
                "constants": {name(path): value for path, value in self.constexprs.items()},
                "attributes": {name(path): value for path, value in self.attrs.items() if value},
                "num_warps": self.options["num_warps"], "num_stages": self.options["num_stages"],
                "grid": list(self.grid)}


_capture_lock = threading.Lock()


@contextmanager
def _launch_policy(problem: Problem) -> Iterator[None]:
    """PyTorch's TF32 switches as the problem records them ("tf32"): the launchers choose an fp32 dot's
    input precision from them (the GEMM from cuda.matmul's, the convs from cuDNN's)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(problem.get("tf32"))
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def launches_of(spec: KernelSpec, problem: Problem, config: Config) -> list[Launch]:
    """The kernel launches `spec.launch` makes for `problem` with `config`, captured instead of run.

    The launcher runs on `spec.make_inputs(problem)` made on the meta device, with PyTorch's TF32
    switches set as the problem records them; its kernel's `run` is replaced, for this thread only,
    while it does (a launch returns None, and the launcher goes on to its end). In a process that
    interprets kernels the launchers choose as they do there (no TF32): capture where TRITON_INTERPRET=0
    for what a GPU launch passes.
    """
    kernel = spec.kernel
    owner = threading.get_ident()
    original, own = kernel.run, vars(kernel).get("run")  # own: a `run` set on the kernel itself, kept
    captured: list[Launch] = []

    def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:  # another thread's launch goes on as usual
            return original(*args, grid=grid, warmup=warmup, **kwargs)
        captured.append(Launch(args, kwargs, grid))
        return None

    with _capture_lock, _launch_policy(problem), torch.device("meta"):
        kernel.run = run
        try:
            spec.launch(spec.make_inputs(problem, torch.device("meta")), dict(config))
        finally:
            if own is None:
                del kernel.run
            else:
                kernel.run = own
    if not captured:
        raise RuntimeError(f"{spec.name}'s launcher launched no kernel for {problem_id(problem)}")
    return captured


def specialise(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> list[Specialisation]:
    """What the launches of `spec` for `problem` with `config` compile for sm_`arch`, one per launch: their
    captured arguments (`launches_of`) bound by Triton's own binder for that target. Needs the kernel as a
    `JITFunction`, i.e. a process with TRITON_INTERPRET=0 (a compile worker) or a GPU."""
    return [bind(spec.kernel, launch, arch) for launch in launches_of(spec, problem, config)]


def bind(kernel: Any, launch: Launch, arch: int) -> Specialisation:
    """What `launch` of `kernel` compiles for sm_`arch`: the steps `JITFunction.run` takes before it compiles."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel.__name__} is interpreted in this process: specialise it where "
                           "TRITON_INTERPRET=0 (a compile worker, see compile_space)")
    backend = make_backend(GPUTarget("cuda", arch, WARP_SIZE))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    # the options JITFunction.run adds before it binds
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7 (a GPU machine's may be older)
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    grid = tuple(launch.grid(bound) if callable(launch.grid) else launch.grid)
    return Specialisation(signature, constexprs, attrs, dict(options.__dict__), (*grid, 1, 1)[:3])


# ---------------------------------------------------------------------------------------------
# one compilation


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


@dataclass(frozen=True)
class Compiled:
    """One launch's compiled kernel: its specialisation, cubin and resources."""

    specialisation: Specialisation
    cubin: bytes
    shared_bytes: int
    registers: int
    spills: int
    compile_time_s: float  # of its compilation (a specialisation launches share is compiled once)


def summary(launches: Sequence[Compiled], arch: int) -> CompileResult:
    """The launches of one (problem, config) as one `CompileResult`: the most shared memory, registers and
    spills of any, the time of their distinct compilations; not ok when the shared memory exceeds sm_`arch`'s
    per-block limit."""
    distinct = {compiled.specialisation.key: compiled for compiled in launches}.values()
    shared = max(compiled.shared_bytes for compiled in launches)
    numbers = (shared, max(c.registers for c in launches), max(c.spills for c in launches),
               sum(c.compile_time_s for c in distinct))
    known = hardware.architecture(arch)
    if known is not None and shared > known.shared_bytes_per_block:
        return CompileResult(False, f"shared memory {shared} B > sm_{arch} limit {known.shared_bytes_per_block} B",
                             *numbers)
    return CompileResult(True, "", *numbers)


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


def compile_launches(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> list[Compiled]:
    """Compile what the launches of `spec` for `problem` with `config` compile (`specialise`) for sm_`arch`,
    one `Compiled` per launch; a specialisation several launches share is compiled once.

    Raises what the compiler raises. Needs a process where kernels are `JITFunction`s (see `specialise`).
    """
    done: dict[str, Compiled] = {}
    launches = []
    for specialisation in specialise(spec, problem, config, arch):
        if specialisation.key not in done:
            done[specialisation.key] = compile_specialisation(spec.kernel, specialisation, arch)
        launches.append(replace(done[specialisation.key], specialisation=specialisation))  # its own grid
    return launches


def compile_specialisation(kernel: Any, specialisation: Specialisation, arch: int) -> Compiled:
    """Compile one specialisation of `kernel` for sm_`arch` with Triton's compiler (which also stores it in
    Triton's cache, under the key a launch of the same specialisation looks up) and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    started = time.perf_counter()
    compiled = triton.compile(specialisation.source(kernel), target=GPUTarget("cuda", arch, WARP_SIZE),
                              options=specialisation.options)
    cubin = compiled.asm["cubin"]
    registers, spills = _resource_usage(cubin)
    return Compiled(specialisation, cubin, int(compiled.metadata.shared), registers, spills,
                    time.perf_counter() - started)


def failure(error: Exception, started: float) -> CompileResult:
    """The error's first and last lines (Triton's CompilationError: where, the source, then what went wrong)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return CompileResult(False, f"{type(error).__name__}: {message}"[:300],
                         compile_time_s=time.perf_counter() - started)


def _attempt(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> list[Compiled] | CompileResult:
    """`compile_launches`, or the failure (a compile error is a result to report, not raised)."""
    started = time.perf_counter()
    try:
        return compile_launches(spec, problem, config, arch)
    except Exception as error:
        return failure(error, started)


def compile_config(spec: KernelSpec, problem: Problem, config: Config, arch: int) -> CompileResult:
    """Compile `spec`'s kernel for `problem` and `config` for sm_`arch` (e.g. 80, 90), as a launch would.

    A failure is returned, not raised. Where this process runs kernels in the interpreter, the
    compilation runs in one spawned worker instead (slower to start, same result).
    """
    from triton_workbench.kernels import runtime

    if runtime.INTERPRETER:
        row = compile_space(spec, [(config, problem)], archs=(arch,), workers=1, progress=False).iloc[0]
        numbers = {name: float(row[name]) for name in ("shared_bytes", "registers", "spills", "compile_time_s")}
        return CompileResult(bool(row["ok"]), str(row["reason"]), **numbers)
    outcome = _attempt(spec, problem, config, arch)
    return outcome if isinstance(outcome, CompileResult) else summary(outcome, arch)


# ---------------------------------------------------------------------------------------------
# in compile workers


def _die_with_parent() -> None:
    """Pool initializer: on Linux, end this worker when the parent dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def compile_in_worker(spec_name: str, problem: Problem, config: Config, arch: int, ceilings: bool = False) -> dict:
    """`compile_config` for a spec registered in `kernels.SPECS`, as a dict: the task a compile pool runs.

    ceilings: also the static ceilings of the compiled code when it compiled (`ceilings.static_ceilings`, from
    the cubins this worker has; the tuner's compile pool asks for them). An estimate that fails is left out
    (`static_error` says why), never a failed compilation.
    """
    from triton_workbench import kernels

    spec = kernels.SPECS[spec_name]
    if not ceilings:
        return asdict(compile_config(spec, problem, config, arch))
    outcome = _attempt(spec, problem, config, arch)
    if isinstance(outcome, CompileResult):
        return asdict(outcome)
    report = asdict(summary(outcome, arch))
    if report["ok"]:
        from triton_workbench.kernels.ceilings import static_ceilings

        try:
            report.update(static_ceilings(spec, problem, outcome, arch))
        except Exception as error:  # e.g. no nvdisasm: the trial goes on without the estimate
            report["static_error"] = f"{type(error).__name__}: {error}"[:300]
    return report


def _compiled_in_worker(spec_name: str, problem: Problem, config: Config,
                        arch: int) -> list[Compiled] | CompileResult:
    from triton_workbench import kernels

    return _attempt(kernels.SPECS[spec_name], problem, config, arch)


def _key_in_worker(spec_name: str, problem: Problem, config: Config, arch: int) -> str | None:
    """The keys of the launches' specialisations, or None where the launcher or binder fails (the compile
    reports why)."""
    from triton_workbench import kernels

    try:
        return json.dumps([found.key for found in specialise(kernels.SPECS[spec_name], problem, config, arch)])
    except Exception:
        return None


def compile_pool(workers: int) -> ProcessPoolExecutor:
    """A spawned process pool for compile tasks (`compile_in_worker`).

    Its workers define kernels with TRITON_INTERPRET=0 (a spawned child copies the environment as it
    starts, and the spawn pool starts one per submission while none is idle), so every worker is
    started here, with the variable set, by trivial tasks. Workers end with their parent, even when
    it is killed.
    """
    with _compiling_environment():
        pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_die_with_parent)
        for _ in range(max(1, workers)):
            pool.submit(int)
    return pool


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


def _registered(spec: KernelSpec) -> None:
    from triton_workbench import kernels

    if kernels.SPECS.get(spec.name) is not spec:
        raise ValueError(f"spec {spec.name!r} is not registered in kernels.SPECS: workers could not find it")


# pandas named aggregations over compile results (`compile_space`'s columns): failures and the largest resources
RESOURCE_SUMMARY: dict[str, tuple[str, Any]] = {
    "failures": ("ok", lambda ok: int((~ok).sum())),
    "shared_kib_max": ("shared_bytes", lambda b: round(b.max() / 1024, 1)),
    "registers_max": ("registers", "max"),
    "spilling": ("spills", lambda s: int((s > 0).sum())),
}


def compile_space(spec: KernelSpec, configs_and_problems: Iterable[tuple[Config, Problem]],
                  archs: Iterable[int] = hardware.COMPILE_TARGETS, workers: int | None = None,
                  progress: bool = True, on_result: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Compile every (config, problem) pair for every arch, in parallel; one row per pair and arch.

    Columns: kernel, problem (JSON), config (JSON), arch, ok, reason, shared_bytes, registers,
    spills, compile_time_s. `spec` must be registered in `kernels.SPECS` (workers look it up by
    name). The workers first specialise every job, then compile each distinct specialisation once.
    `on_result(row)` is called as each row is done, so a caller can store results as they come (an
    interrupted run keeps them). `workers` defaults to the number of CPUs.
    """
    _registered(spec)
    jobs = [(config, problem, arch) for config, problem in configs_and_problems for arch in archs]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"compile {spec.name}", unit="cfg", disable=not progress)
    pool = compile_pool(min(workers or os.cpu_count() or 1, max(len(jobs), 1)))
    try:
        tasks = [(spec.name, problem, config, arch) for config, problem, arch in jobs]
        keys = [key if key is not None else f"unspecialised {index}"  # compiled alone, to report why
                for index, key in enumerate(pool.map(_key_in_worker, *zip(*tasks)) if tasks else [])]
        waiting: dict[str, list[int]] = defaultdict(list)  # specialisation -> the jobs it answers
        for index, key in enumerate(keys):
            waiting[key].append(index)
        futures = {pool.submit(compile_in_worker, *tasks[indices[0]]): key for key, indices in waiting.items()}
        failures = 0
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as error:  # a crashed worker is a failed compilation, not a stopped sweep
                result = asdict(CompileResult(False, f"worker failed: {type(error).__name__}: {error}"[:300]))
            for index in waiting[futures[future]]:
                config, problem, arch = jobs[index]
                row = {"kernel": spec.name, "problem": problem_id(problem), "config": canonical_json(config),
                       "arch": arch, **result}
                rows.append(row)
                failures += not row["ok"]
                if on_result is not None:
                    on_result(row)
            bar.update(len(waiting[futures[future]]))
            bar.set_postfix(failures=failures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    columns = ["kernel", "problem", "config", "arch", *CompileResult.__dataclass_fields__]
    return pd.DataFrame(rows, columns=columns).sort_values(["problem", "config", "arch"], ignore_index=True)


def compile_kernels(spec: KernelSpec, jobs: Sequence[tuple[Problem, Config, int]],
                    workers: int | None = None) -> list[list[Compiled] | CompileResult]:
    """`compile_launches` for each (problem, config, arch), in order; a failure is its `CompileResult`.

    In spawned workers where this process interprets kernels (`spec` must then be registered in
    `kernels.SPECS`), else here.
    """
    from triton_workbench.kernels import runtime

    if not runtime.INTERPRETER:
        return [_attempt(spec, *job) for job in jobs]
    _registered(spec)
    pool = compile_pool(min(workers or os.cpu_count() or 1, max(len(jobs), 1)))
    try:
        return list(pool.map(_compiled_in_worker, *zip(*[(spec.name, *job) for job in jobs]))) if jobs else []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_space(spec: KernelSpec, problem: Problem) -> list[Config]:
    """Every valid config of `spec` for `problem`: the product of its candidates, filtered by constraints."""
    names = list(spec.params)
    configs = (dict(zip(names, values)) for values in itertools.product(*(spec.params[n] for n in names)))
    return [config for config in configs if spec.is_valid(config, problem)]
