"""Evaluating configs of one kernel on one problem: compile ahead, reject, run, check, time.

For each config, in order:
1. its ahead-of-time compile result for the GPU target (`kernels.aot.compile_config` in a process
   pool, running ahead of the measurements, see `CompilePool`): a compile error is recorded, and the
   shared memory / registers it reports are checked against the device's limits *before* anything
   runs (on a machine without a GPU this proves the config compiles for sm_90 and gives its
   resources, while the run itself happens in Triton's interpreter);
2. one launch, compared with `spec.reference` (max-abs error over max-abs reference, against
   `spec.tolerance(problem)`): a wrong result is recorded as status 'wrong' and never chosen;
3. the timing harness (`autotune.timing.measure`) and, when an energy meter is given, the energy.

Every failure becomes a recorded outcome with its reason; nothing stops the sweep except Ctrl-C.

Hangs: each trial runs under a watchdog (`timeout_s`, SIGALRM in the main thread). It interrupts
anything that returns to Python, which covers the interpreter (a hung kernel there is a Python
loop) and host-side hangs on a GPU. A GPU kernel that never finishes blocks inside the CUDA
driver, where no signal is acted on and the CUDA context is lost anyway: the realistic remedy is
to kill the process and run the sweep again. It resumes from the database: before each trial the
tuner claims the config there (`TuningDatabase.claim`), so a config whose process died while
measuring it is run once more (the death may have been a plain kill -9), and recorded as 'timeout'
if a second process died during it too (single-process sweeps; a process that is alive, even frozen,
never counts as dead; see `tuner`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from functools import cached_property
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from triton_workbench.autotune.timing import Timing, measure
from triton_workbench.database import TrialStatus
from triton_workbench.database.environment import device_key, device_limits
from triton_workbench.database.store import short_reason
from triton_workbench.kernels import runtime
from triton_workbench.kernels.aot import compile_in_worker, compile_pool
from triton_workbench.kernels.spec import Config, KernelSpec, Problem

STORED_CEILINGS = ("static_tensor_ceiling", "static_memory_ceiling")
"""The static ceilings of a compile report (`kernels.ceilings.static_ceilings`) a trial stores."""


class EnergyRecord(Protocol):
    """What an EnergyMeter returns: a record with these attributes (NaN, or None for `throttled`, where
    unknown), such as the profiler's `EnergyStats`. They are what a trial stores of it."""

    energy_j_per_call: float
    avg_power_w: float
    peak_power_w: float
    start_temp_c: float
    end_temp_c: float
    mean_sm_clock_mhz: float
    throttled: bool | None
    throttle_reasons: float  # NVML clock-event reasons seen in the window, OR-ed (a bitmask), NaN if unknown
    remeasured: bool  # throttled by heat, so measured again after the GPU cooled


ENERGY_FIELDS: tuple[str, ...] = tuple(EnergyRecord.__annotations__)


class EnergyMeter(Protocol):
    """Measures a callable's energy: `meter(name, fn)` runs `fn` and returns an `EnergyRecord`.

    autotune does not import the profiler; `workbench tune --profile` passes one built on it.
    """

    def __call__(self, name: str, fn: Callable[[], object]) -> EnergyRecord: ...


class DeviceKnobs(Protocol):
    """Device settings tuned beside the kernel's parameters (the profiler's `DeviceKnobs` is one).

    `params`: knob -> candidate values (names distinct from the kernel's), `default`: the values in force
    before the sweep, `apply(settings)`: set them on the device before a trial. autotune does not import
    the profiler; `workbench tune --power-limits/--sm-clocks` passes one.
    """

    params: dict[str, list[Any]]
    default: dict[str, Any]

    def apply(self, settings: dict[str, Any]) -> None: ...


@dataclass
class Trial:
    """The outcome of evaluating one config (NaN where not measured)."""

    config: Config
    status: str = TrialStatus.OK
    reason: str = ""
    time_ms: float = math.nan
    time_ms_p20: float = math.nan
    time_ms_p80: float = math.nan
    timer: str | None = None
    compile_time_s: float = math.nan
    shared_bytes: float = math.nan
    registers: float = math.nan
    spills: float = math.nan
    tflops: float = math.nan
    gbps: float = math.nan
    static_tensor_ceiling: float = math.nan  # static estimates of the compiled code (`kernels.ceilings`), NaN
    static_memory_ceiling: float = math.nan  # when not compiled ahead or not known: fractions of peak, not measures
    energy: EnergyRecord | None = None  # None when no energy meter measured it

    @property
    def energy_j_per_call(self) -> float:
        return math.nan if self.energy is None else self.energy.energy_j_per_call

    def measures(self) -> dict[str, Any]:
        """The database fields of this trial beyond config/status/reason."""
        values = asdict(self)
        for name in ("config", "status", "reason", "energy"):
            values.pop(name)
        energy = {name: math.nan if self.energy is None else getattr(self.energy, name) for name in ENERGY_FIELDS}
        values.update(energy)
        return values


def compiled_trial(config: Config, compiled: dict[str, Any] | None, status: str = TrialStatus.OK,
                   reason: str = "") -> Trial:  # fmt: skip
    """A trial of `config` holding what its compile report says (resources, compile time, static ceilings)."""
    trial = Trial(config=dict(config), status=status, reason=reason)
    for name in ("compile_time_s", "shared_bytes", "registers", "spills", *STORED_CEILINGS):
        value = (compiled or {}).get(name)
        setattr(trial, name, math.nan if value is None else float(value))
    return trial


class TrialTimeout(Exception):
    """Raised inside a trial by the watchdog."""


@contextmanager
def watchdog(timeout_s: float | None) -> Iterator[None]:
    """Raise TrialTimeout in the main thread after `timeout_s` (no-op elsewhere or when None)."""
    if not timeout_s or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TrialTimeout(f"did not finish within {timeout_s:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """max |result - reference| / max |reference| in float64 (inf on a shape mismatch or NaN)."""
    if not isinstance(result, torch.Tensor) or result.shape != reference.shape:
        return math.inf
    difference = (result.detach().to("cpu", torch.float64) - reference.to("cpu", torch.float64)).abs().max()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    error = float(difference / scale) if result.numel() else 0.0
    return math.inf if math.isnan(error) else error


def classify(error: BaseException) -> str:
    """The trial status for an exception raised while compiling or running a config."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    if isinstance(error, TrialTimeout):
        return TrialStatus.TIMEOUT
    if isinstance(error, OutOfResources) or "out of resource" in str(error).lower():
        return TrialStatus.OUT_OF_RESOURCES
    if isinstance(error, CompilationError):
        return TrialStatus.COMPILE_ERROR
    return TrialStatus.RUNTIME_ERROR


def over_limits(report: dict[str, Any], config: Config, limits: dict[str, int]) -> str:
    """Why a compiled config cannot launch on the device ('' if it can)."""
    shared = report.get("shared_bytes")
    if shared is not None and not math.isnan(float(shared)) and shared > limits["shared_bytes"]:
        return f"needs {int(shared)} bytes of shared memory, device allows {limits['shared_bytes']}"
    registers = report.get("registers")
    if registers is not None and not math.isnan(float(registers)):
        threads = 32 * int(config.get("num_warps", 4))
        if registers > limits["registers_per_thread"] or registers * threads > limits["registers_per_sm"]:
            return (f"needs {int(registers)} registers x {threads} threads, device allows "
                    f"{limits['registers_per_thread']} per thread and {limits['registers_per_sm']} per SM")  # fmt: skip
    return ""


class CompilePool:
    """Compiles configs for the GPU target with `kernels.aot.compile_config` in a process pool.

    `submit(spec, problem, config)` returns a future at once; its result is the compile report (ok,
    reason, shared_bytes, registers, spills, compile_time_s and, when it compiled, the static ceilings of its
    code on the target's reference GPU: `kernels.ceilings.static_ceilings`). The caller measures earlier configs
    while the pool (one process per core) compiles later ones. One pool can serve many sweeps
    (tune-model tunes every problem of a model with one). The target is this GPU's architecture, or
    sm_90 where there is none.

    The pool (`kernels.aot.compile_pool`) starts all its workers in the constructor: make it before
    this process runs a kernel (its TRITON_INTERPRET is switched while the workers start). Only specs
    registered in `kernels.SPECS` can be compiled: the workers look them up by name.
    """

    def __init__(self, workers: int | None = None):
        capability = device_key().capability
        self.arch = int(capability.replace(".", "")) if capability else 90
        self.workers = workers or os.cpu_count() or 1
        self._pool = compile_pool(self.workers)

    @staticmethod
    def supports(spec: KernelSpec) -> bool:
        from triton_workbench import kernels

        return kernels.SPECS.get(spec.name) is spec

    def submit(self, spec: KernelSpec, problem: Problem, config: Config) -> Future:
        if not self.supports(spec):
            raise ValueError(f"spec {spec.name!r} is not registered in kernels.SPECS: it cannot be compiled ahead")
        return self._pool.submit(compile_in_worker, spec.name, problem, dict(config), self.arch, True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Pipeline:
    """Evaluates configs of `spec` on `problem` on this machine's device (see the module docstring)."""

    def __init__(self, spec: KernelSpec, problem: Problem, *, timeout_s: float | None = 120.0,
                 energy_meter: EnergyMeter | None = None, interpreter_reps: int = 3,
                 device_knobs: DeviceKnobs | None = None, timer: Callable[[Callable[[], object]], Timing] | None = None):  # fmt: skip
        """device_knobs: set before each trial from the config's knob entries (the rest is the kernel's config);
        timer: how a call is timed (default `autotune.timing.measure`; a test double's clock in tests)."""
        self.spec, self.problem = spec, problem
        self.device_knobs = device_knobs
        self.knob_names = set(device_knobs.params) if device_knobs is not None else set()
        clash = self.knob_names & set(spec.params)
        if clash:
            raise ValueError(f"device_knobs: {sorted(clash)} are also parameters of kernel {spec.name}")
        self.timer = timer
        self.timeout_s, self.energy_meter, self.interpreter_reps = timeout_s, energy_meter, interpreter_reps
        self.device = runtime.default_device()
        self.limits = device_limits()
        self.tolerance = spec.tolerance(problem)
        self.flops, self.bytes = spec.flops(problem), spec.bytes(problem)

    @cached_property
    def inputs(self) -> Any:
        """The problem's inputs, made at the first evaluation: a re-run sweep with nothing left makes none."""
        return self.spec.make_inputs(self.problem, self.device)

    @cached_property
    def reference(self) -> Any:
        """The reference result every config is checked against, computed at the first check."""
        return self.spec.reference(self.inputs)

    def kernel_config(self, config: Config) -> Config:
        """The kernel's part of a config (without the device knobs' entries)."""
        return {name: value for name, value in config.items() if name not in self.knob_names}

    def evaluate(self, config: Config, compiled: dict[str, Any] | None = None) -> Trial:
        """One config's trial; `compiled` is its ahead-of-time compile report, when there is one. The device
        knobs in `config` are set first; a setting the device refuses is a failed trial (runtime_error)."""
        trial = compiled_trial(config, compiled)
        if compiled is not None:
            if not compiled.get("ok", True):
                reason = str(compiled.get("reason") or "compile failed")
                trial.status = TrialStatus.OUT_OF_RESOURCES if "out of resource" in reason.lower() else TrialStatus.COMPILE_ERROR
                trial.reason = reason
                return trial
            trial.reason = over_limits(compiled, config, self.limits)
            if trial.reason:
                trial.status = TrialStatus.OUT_OF_RESOURCES
                return trial
        if not self.spec.is_valid(self.kernel_config(config), self.problem):
            trial.status, trial.reason = TrialStatus.COMPILE_ERROR, "violates the kernel's constraints for this problem"
            return trial
        self.reference  # inputs and reference are made once, here: outside the watchdog and the compile timing
        try:
            if self.device_knobs is not None:
                self.device_knobs.apply({name: config[name] for name in self.knob_names})
            with watchdog(self.timeout_s):
                self._run(trial)
        except Exception as error:  # a failed config is an outcome, not the end of the sweep
            trial.status, trial.reason = classify(error), short_reason(error)
        return trial

    def _run(self, trial: Trial) -> None:
        kernel_config = self.kernel_config(trial.config)

        def call() -> torch.Tensor:
            return self.spec.launch(self.inputs, kernel_config)

        started = time.perf_counter()
        result = call()
        if runtime.timer_name() == "cuda_events":
            torch.cuda.synchronize()
        if math.isnan(trial.compile_time_s):  # the first call's JIT compile (+ one run) when nothing ran ahead
            trial.compile_time_s = time.perf_counter() - started
        error = relative_error(result, self.reference)
        if not error <= self.tolerance:
            trial.status = TrialStatus.WRONG
            trial.reason = f"relative error {error:.3g} exceeds tolerance {self.tolerance:g}"
            return
        timing = self.timer(call) if self.timer is not None else measure(call, interpreter_reps=self.interpreter_reps)
        trial.time_ms, trial.time_ms_p20, trial.time_ms_p80, trial.timer = (
            timing.time_ms, timing.time_ms_p20, timing.time_ms_p80, timing.timer)  # fmt: skip
        seconds = timing.time_ms / 1e3
        trial.tflops = self.flops / seconds / 1e12 if seconds > 0 else math.nan
        trial.gbps = self.bytes / seconds / 1e9 if seconds > 0 else math.nan
        if self.energy_meter is not None:
            trial.energy = self.energy_meter(f"{self.spec.name} {trial.config}", call)
