"""A tuning sweep: a strategy proposes configs, the pipeline evaluates them, the database keeps them.

`tune(spec, problem, ...)` is the Python API (the CLI and `workbench tune-model` call it). It is
resumable and idempotent: trials already stored for the same tuning key (kernel source, problem,
device, versions) are fed back to the strategy instead of being evaluated again, so re-running a
finished sweep returns at once and an interrupted one goes on where it stopped. Each trial is
committed as it finishes.

Several sweeps of one problem on one database at once share the work: each claims a config before
measuring it (`TuningDatabase.claim`, kept fresh by a heartbeat while it runs), skips configs that
others hold live claims on, and at its end waits (at most `ClaimTimes.wait_s`) for those to be stored,
taking over any whose owner died or froze. The best config is chosen from every stored trial of the
problem, whichever sweep measured it.

Distributed: under `torchrun`, rank 0 asks the strategy for a batch, broadcasts it, every rank
evaluates its share (config i goes to rank i mod world size), and rank 0 gathers the trials and is
the only one writing the database.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import pandas as pd
from tqdm.auto import tqdm

from triton_workbench.autotune.config_source import use_database
from triton_workbench.autotune.distributed import Distributed
from triton_workbench.autotune.objectives import Objective
from triton_workbench.autotune.pipeline import (CompilePool, DeviceKnobs, EnergyMeter, Pipeline, Trial, compiled_trial,
                                                over_limits)
from triton_workbench.autotune.timing import Timing
from triton_workbench.autotune.results import STORED, TAKEN, Claim, ClaimTimes, TuningDatabase, TuningKey, config_id
from triton_workbench.database import RunKind, TrialStatus
from triton_workbench.kernels.ceilings import static_bound_tflops
from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, problem_id

log = logging.getLogger("triton_workbench.autotune")


def tune(spec: KernelSpec, problem: Problem, *, strategy: str = "auto",
         strategy_options: Mapping[str, Any] | None = None, budget: int = 200,
         db: TuningDatabase | str | os.PathLike | None = None, objective: str = "time", seed: int = 0,
         energy_meter: EnergyMeter | None = None, compile_ahead: bool | CompilePool | None = None,
         workers: int | None = None,
         timeout_s: float | None = 120.0, interpreter_reps: int = 3, progress: bool = True,
         distributed: Distributed | None = None, on_trial: Callable[[Trial], None] | None = None,
         run_id: int | None = None, claims: ClaimTimes | None = None,
         prune_static: float | None = None, device_knobs: DeviceKnobs | None = None,
         timer: Callable[[Callable[[], object]], Timing] | None = None) -> pd.DataFrame:  # fmt: skip
    """Tune `spec` for `problem`; returns every stored trial of this kernel/problem/device over the same
    parameters (a DataFrame, one row per run that measured a config, whichever sweep that was; the trials of a
    sweep with other device knobs, or none, are neither returned nor reused nor ranked).

    `.attrs["run_id"]` of the result is this sweep's run (None if everything was already stored).

    db: the database the trials and the best config go to (default: $WORKBENCH_DB, else the user
    cache). Once the best config is stored, `db` becomes the kernels' config source
    (`autotune.use_database(db)`): later launches in this process use what was tuned.
    strategy/strategy_options/seed: passed to `autotune.strategies.make_strategy` (strategy_options: the
    strategy's declared hyperparameters by name, e.g. {"trees": 48} for auto); budget: how many configs the
    strategy may propose in all (stored ones count); objective: 'time', 'energy', 'edp', 'time:power<=P' or
    'energy:time<=X%' (see `autotune.objectives`), all but 'time' needing an `energy_meter`; compile_ahead: compile each batch for the GPU target in a process pool
    (`workers`, default all cores) one batch ahead of the measurements (default: for specs
    registered in kernels.SPECS, the only ones the pool can find), or a `CompilePool` to borrow
    (shared by many sweeps; the caller closes it); timeout_s: per-trial
    watchdog; distributed: set under torchrun (default: detected from the environment); run_id: record
    the trials in this run, which the caller started and finishes (one run for a whole model's problems),
    instead of a run of the sweep's own; claims: how often claims on configs are renewed, when they go
    stale and how long to wait for configs other sweeps are measuring (default `ClaimTimes()`);
    prune_static: R in (0, 1], or None (default: off): a config compiled ahead whose static ceiling
    (`kernels.ceilings.static_bound_tflops`: the lower of its tensor/issue and memory ceilings, in TFLOP/s
    on the target's reference GPU) is below R x the highest one of the configs this sweep measured correct
    so far is not measured but recorded as 'pruned', both figures in its reason. The heuristic default
    (measured first) is never pruned, and a pruned trial is never the best config; like any stored trial,
    a later sweep of the same key does not measure it again. Needs compile_ahead (without it nothing is
    pruned: there are no ceilings).
    device_knobs: device settings (power limit, SM clock: the profiler's `DeviceKnobs`) searched with the
    kernel's parameters; each trial's config holds them, the stored best config is the kernel's part of the
    winner. Single process only. timer: how a call is timed (default `autotune.timing.measure`).
    Non-zero ranks return an empty DataFrame.
    """
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec must be a kernels.spec.KernelSpec, got {type(spec).__name__}")
    if not isinstance(problem, dict):
        raise TypeError(f"problem must be a dict of sizes and dtype, got {type(problem).__name__}")
    spec.validate_problem(problem)  # ProblemError: entries, types, ranges, the device's memory; nothing stored yet
    parsed = Objective.parse(objective)
    if parsed.needs_energy and energy_meter is None:
        raise ValueError(f"objective {objective!r} needs an energy meter (workbench tune --profile, on a GPU with NVML)")
    if not isinstance(budget, int) or budget < 1:
        raise UsageError(f"budget must be a positive integer, got {budget!r}")
    check_prune_static(prune_static)
    if claims is not None and not isinstance(claims, ClaimTimes):
        raise TypeError(f"claims must be an autotune.ClaimTimes or None, got {type(claims).__name__}")
    from triton_workbench.autotune.strategies import strategy_options as check_strategy_options

    check_strategy_options(strategy, strategy_options)  # before any run starts or pool is made
    if compile_ahead is None or not CompilePool.supports(spec):
        compile_ahead = CompilePool.supports(spec)  # a borrowed pool cannot compile an unregistered spec
    distributed = distributed or Distributed.from_environment()
    if device_knobs is not None and distributed is not None:
        raise UsageError("device knobs are set on this process's GPU only: tune them without torchrun")
    pipeline = Pipeline(spec, problem, timeout_s=timeout_s, energy_meter=energy_meter,
                        interpreter_reps=interpreter_reps, device_knobs=device_knobs, timer=timer)  # fmt: skip
    if distributed is not None and distributed.rank != 0:
        _follow(pipeline, distributed)
        return pd.DataFrame()
    database = db if isinstance(db, TuningDatabase) else TuningDatabase(db)
    sweep = _Sweep(spec, problem, database, pipeline, parsed, run_id, claims or ClaimTimes(), prune_static)
    try:
        return sweep.run(strategy, dict(strategy_options or {}), budget, seed, compile_ahead, workers, progress,
                         distributed, on_trial)
    finally:
        if distributed is not None:
            distributed.broadcast(None)  # releases the other ranks, also when rank 0 failed


def check_prune_static(value: Any, name: str = "prune_static") -> None:
    """UsageError naming `name` unless `value` is None or a number R with 0 < R <= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UsageError(f"{name} must be a number R with 0 < R <= 1 (prune configs whose static ceiling is below "
                         f"R x the best so far), got {value!r}")


def _follow(pipeline: Pipeline, distributed: Distributed) -> None:
    """A non-zero rank: evaluate its share of each broadcast batch until rank 0 says stop (None)."""
    evaluated = 0
    while (batch := distributed.broadcast(None)) is not None:
        share = _evaluate_share(pipeline, batch, distributed)
        distributed.gather(share)
        evaluated += len(share)
    log.info("rank %d of %d evaluated %d configs", distributed.rank, distributed.world_size, evaluated)


def _evaluate_share(pipeline: Pipeline, batch: list[tuple[Config, dict | None]],
                    distributed: Distributed) -> list[tuple[int, Trial]]:  # fmt: skip
    """This rank's part of a batch of (config, compile report): config i goes to rank i mod world size."""
    return [(i, pipeline.evaluate(config, report)) for i, (config, report) in enumerate(batch)
            if i % distributed.world_size == distributed.rank]  # fmt: skip


class _Sweep:
    """Rank 0's (or a single process's) side of `tune`."""

    def __init__(self, spec: KernelSpec, problem: Problem, database: TuningDatabase, pipeline: Pipeline,
                 objective: Objective, run_id: int | None, claims: ClaimTimes, prune_static: float | None = None):  # fmt: skip
        self.spec, self.problem, self.database, self.pipeline = spec, problem, database, pipeline
        self.prune_static = prune_static
        knobs = pipeline.device_knobs
        self.knob_params = dict(knobs.params) if knobs is not None else {}
        # measured first, never pruned: the kernel's heuristic default on the device as it was
        self.default = {**spec.default_config(problem), **(knobs.default if knobs is not None else {})}
        self.default_id = config_id(self.default)
        self.bounds: dict[str, float] = {}  # config_id -> static bound (TFLOP/s) of the configs compiled ahead
        self.best_bound: tuple[float, str] | None = None  # the highest bound of a config measured correct, its id
        self.objective, self.claims = objective, claims
        self.needs = ("energy_j_per_call",) if objective.needs_energy else ()  # what a stored ok trial must have
        self.key = TuningKey.of(spec, problem)  # shared by sweeps with other device knobs: see `_ours`
        self.names = set(spec.params) | set(self.knob_params)
        self.compiling: dict[str, Future] = {}  # config_id of a kernel config -> its compile report
        self.values: dict[str, float] = {}  # config_id -> best objective value of its usable stored trials
        self._learn(database.trials(key=self.key))
        self.deferred: list[tuple[Config, Callable[[], dict | None]]] = []  # claimed by live sweeps elsewhere
        self.run_id = run_id
        self.owns_run = run_id is None  # a sweep of its own starts and finishes its run
        self.best = min(self.values.values(), default=math.inf)

    def run(self, strategy_name: str, strategy_options: dict[str, Any], budget: int, seed: int,
            compile_ahead: bool | CompilePool, workers: int | None,
            progress: bool, distributed: Distributed | None, on_trial: Callable[[Trial], None] | None) -> pd.DataFrame:  # fmt: skip
        from triton_workbench.autotune.space import Space
        from triton_workbench.autotune.strategies import make_strategy

        self.on_trial = on_trial
        space = Space.from_spec(self.spec, self.problem, extra_params=self.knob_params)
        if len(self.values) < min(budget, len(space)):
            world = distributed.world_size if distributed else 1
            borrowed = compile_ahead if isinstance(compile_ahead, CompilePool) else None
            pool = borrowed or (CompilePool(workers) if compile_ahead else None)
            self.batch_size = max(world, pool.workers if pool else 1)
            self.strategy = make_strategy(strategy_name, space, seed, **strategy_options)
            # the heuristic default goes first: a tuned config is then never worse than the untuned one
            self.strategy.enqueue(self.default)
            meta = {"problem": json.loads(problem_id(self.problem)), "strategy": strategy_name, "budget": budget,
                    "seed": seed, "objective": self.objective.name, "world_size": world}  # fmt: skip
            if self.knob_params:
                meta["device_knobs"] = self.knob_params
            if strategy_options:
                meta["strategy_options"] = strategy_options
            self.asked, self.budget = 0, budget
            self.bar = tqdm(total=min(budget, len(space)), desc=f"tune {self.spec.name}", unit="cfg", disable=not progress)
            run = self.database.run(RunKind.TUNE, self.spec.name, meta) if self.owns_run else nullcontext(self.run_id)
            try:
                with run as self.run_id:
                    self._loop(pool, distributed)
            finally:
                self.bar.close()
                if pool is not None and pool is not borrowed:
                    pool.close()
        self._store_best()
        trials = self._ours(self.database.trials(key=self.key))
        trials.attrs["run_id"] = self.run_id  # None when a sweep of its own had nothing left to evaluate
        return trials

    def _ours(self, trials: pd.DataFrame) -> pd.DataFrame:
        """The stored trials over exactly this sweep's parameters: a sweep with device knobs and one without
        (or with others) share a tuning key, and neither may take the other's trials for its own."""
        return trials[trials["config"].map(lambda config: set(json.loads(config)) == self.names).astype(bool)]

    def _usable(self, trials: pd.DataFrame) -> pd.DataFrame:
        """`_ours`, less ok trials without the energy this objective needs (timed without a meter)."""
        ours = self._ours(trials)
        return ours[(ours["status"] != TrialStatus.OK) | ours["energy_j_per_call"].notna()] if self.needs else ours

    def _learn(self, trials: pd.DataFrame) -> None:
        """Take stored trials into `values` (a config measured by several runs keeps its best value)."""
        usable = self._usable(trials)
        for config, value in zip(usable["config"], self.objective.row_values(usable)):
            self.values[config] = min(value, self.values.get(config, math.inf))

    def _next_batch(self) -> list[Config]:
        """Ask the strategy for up to batch_size configs that still need evaluating; stored ones are told back."""
        batch: list[Config] = []
        while len(batch) < self.batch_size and self.asked < self.budget:
            config = self.strategy.ask()
            if config is None:
                break
            self.asked += 1
            known = self.values.get(config_id(config))
            if known is not None:
                self.strategy.tell(config, known)
                self.bar.update(1)
            else:
                batch.append(dict(config))
        return batch

    def _loop(self, pool: CompilePool | None, distributed: Distributed | None) -> None:
        batch = self._next_batch()
        futures = [self._compile(pool, config) for config in batch] if pool else []
        while batch:
            following = self._next_batch()  # asked now so that it compiles while this batch is measured
            following_futures = [self._compile(pool, config) for config in following] if pool else []
            self._measure([(config, self._reporter(futures, index)) for index, config in enumerate(batch)], distributed)
            batch, futures = following, following_futures
        self._wait_for_others(distributed)

    def _compile(self, pool: CompilePool, config: Config) -> Future:
        """The compile report of `config`'s kernel part: submitted once, however many device settings run it."""
        kernel_config = self.pipeline.kernel_config(config)
        key = config_id(kernel_config)
        if key not in self.compiling:
            self.compiling[key] = pool.submit(self.spec, self.problem, kernel_config)
        return self.compiling[key]

    def _reporter(self, futures: list[Future], index: int) -> Callable[[], dict | None]:
        return lambda: self._report(futures, index)

    def _measure(self, pairs: list[tuple[Config, Callable[[], dict | None]]], distributed: Distributed | None) -> None:
        """Claim and measure configs (with their compile reports, fetched when needed); those stored or
        claimed elsewhere meanwhile are told back or deferred by `_claim`."""
        if distributed is None:  # claimed one at a time, right before it runs: a death then concerns this config
            for config, report in pairs:
                claim = self._claim(config, report, measuring=True)
                if claim is not None:
                    with self.database.holding([claim], self.claims.heartbeat_s):
                        compiled = report()
                        self._record(self._pruned(config, compiled) or self.pipeline.evaluate(config, compiled))
            return
        claimed = [(claim, report) for config, report in pairs
                   if (claim := self._claim(config, report, measuring=False)) is not None]  # fmt: skip
        if not claimed:
            return
        with self.database.holding([claim for claim, _ in claimed], self.claims.heartbeat_s):
            batch = []
            for claim, report in claimed:
                compiled = report()
                pruned = self._pruned(claim.config, compiled)
                if pruned is not None:
                    self._record(pruned)
                else:
                    batch.append((claim.config, compiled))
            distributed.broadcast(batch)
            shares = distributed.gather(_evaluate_share(self.pipeline, batch, distributed))
            for _, trial in sorted((pair for share in shares for pair in share), key=lambda pair: pair[0]):
                self._record(trial)

    def _pruned(self, config: Config, compiled: dict | None) -> Trial | None:
        """The 'pruned' trial of `config` when `prune_static` skips it (see `tune`), else None (measure it)."""
        if self.prune_static is None or not compiled or not compiled.get("ok", True):
            return None
        tensor, memory = compiled.get("static_tensor_ceiling"), compiled.get("static_memory_ceiling")
        bound = static_bound_tflops(tensor, memory, compiled.get("static_peak_tflops"))
        if bound is None:
            return None
        self.bounds[config_id(config)] = bound
        if config_id(config) == self.default_id or self.best_bound is None:
            return None
        best, best_id = self.best_bound
        if bound >= self.prune_static * best:
            return None
        if over_limits(compiled, config, self.pipeline.limits) or not self.spec.is_valid(self.pipeline.kernel_config(config), self.problem):
            return None  # cannot run at all: the pipeline records why
        unit = " TFLOP/s" if compiled.get("static_peak_tflops") else " of peak"

        def fraction(value: Any) -> str:
            return "-" if value is None else f"{value:.3g}"

        reason = (f"static estimate {bound:.4g}{unit} (tensor/issue ceiling {fraction(tensor)}, memory ceiling "
                  f"{fraction(memory)}) < {self.prune_static:g} x the best so far, {best:.4g}{unit} of {best_id}")
        return compiled_trial(config, compiled, TrialStatus.PRUNED, reason)

    def _claim(self, config: Config, report: Callable[[], dict | None], measuring: bool) -> Claim | None:
        """The claim on `config` when this sweep is to measure it, else None: stored meanwhile (told back),
        claimed by another live sweep (deferred), or its measuring owners died twice (recorded as timeout)."""
        claim = self.database.claim(self.run_id, self.key, config, stale_s=self.claims.stale_s, needs=self.needs,
                                    measuring=measuring)  # fmt: skip
        if claim.state == STORED:
            self._learn(self.database.trials(key=self.key, config=config))
            self._tell(config, self.values[config_id(config)])
            return None
        if claim.state != TAKEN:
            log.info("%s is being measured by %s: coming back to it at the end", config_id(config), claim.owner)
            self.deferred.append((config, report))
            return None
        if claim.died >= 2:
            with self.database.holding([claim], self.claims.heartbeat_s):
                self._record(Trial(config=config, status=TrialStatus.TIMEOUT,
                                   reason="the sweep's process died twice while running this config (hang or crash)"))  # fmt: skip
            return None
        return claim

    def _wait_for_others(self, distributed: Distributed | None) -> None:
        """Come back to the configs other sweeps were measuring: take the stored ones, measure those whose
        owner died or froze, and wait for the rest, at most `claims.wait_s`."""
        deadline = time.monotonic() + self.claims.wait_s
        while self.deferred:
            waiting, self.deferred = self.deferred, []
            self._measure(waiting, distributed)
            if self.deferred and time.monotonic() >= deadline:
                log.warning("left %d configs to the sweeps still measuring them after waiting %g s: %s",
                            len(self.deferred), self.claims.wait_s, ", ".join(config_id(c) for c, _ in self.deferred))  # fmt: skip
                return
            if len(self.deferred) == len(waiting):  # nothing moved: give the owners time
                time.sleep(min(self.claims.heartbeat_s, 1.0, max(deadline - time.monotonic(), 0.0)))

    @staticmethod
    def _report(futures: list[Future], index: int) -> dict | None:
        """A config's compile report; None (it is compiled when it runs) without one or if the pool broke."""
        if not futures:
            return None
        try:
            return futures[index].result()
        except Exception as error:
            log.warning("compiling ahead failed (%s: %s); the config is compiled when it runs", type(error).__name__, error)
            return None

    def _record(self, trial: Trial) -> None:
        """Store a trial this sweep measured (which releases its claim) and tell the strategy."""
        self.database.record_trial(self.run_id, self.key, trial.config, trial.status, trial.reason, **trial.measures())
        power_w = trial.energy.avg_power_w if trial.energy is not None else math.nan
        value = self.objective.value(trial.time_ms, trial.energy_j_per_call, avg_power_w=power_w, status=trial.status)
        self.values[config_id(trial.config)] = value
        bound = self.bounds.get(config_id(trial.config))
        if trial.status == TrialStatus.OK and bound is not None and (self.best_bound is None or bound > self.best_bound[0]):
            self.best_bound = (bound, config_id(trial.config))
        self._tell(trial.config, value)
        if self.on_trial is not None:
            self.on_trial(trial)

    def _tell(self, config: Config, value: float) -> None:
        self.strategy.tell(config, value)
        self.best = min(self.best, value)
        if math.isfinite(self.best):
            self.bar.set_postfix_str(f"best {self.best:.4g} {self.objective.unit}")
        self.bar.update(1)

    def _store_best(self) -> None:
        """Store the best of this sweep's usable stored trials, whichever sweep measured them, and make the
        kernels launch with it: this database becomes their config source (`use_database`). For
        energy:time<=X% the fastest of them bounds the candidates (`Objective.values`, inside store_best's
        transaction)."""
        def values_of(trials: pd.DataFrame) -> pd.Series:
            return self.objective.values(self._usable(trials))

        if self.database.store_best(self.key, self.objective.name, values_of, self.pipeline.kernel_config) is not None:
            use_database(self.database)
