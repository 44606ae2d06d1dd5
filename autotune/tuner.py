"""A tuning sweep: a strategy proposes configs, the pipeline evaluates them, the database keeps them.

`tune(spec, problem, ...)` is the Python API (the CLI and `workbench tune-model` call it). It is
resumable and idempotent: trials already stored for the same tuning key (kernel source, problem,
device, versions) are fed back to the strategy instead of being evaluated again, so re-running a
finished sweep returns at once and an interrupted one goes on where it stopped. Each trial is
committed as it finishes.

Distributed: under `torchrun`, rank 0 asks the strategy for a batch, broadcasts it, every rank
evaluates its share (config i goes to rank i mod world size), and rank 0 gathers the trials and is
the only one writing the database.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import pandas as pd
from tqdm.auto import tqdm

from triton_workbench.autotune.config_source import use_database
from triton_workbench.autotune.distributed import Distributed
from triton_workbench.autotune.pipeline import OBJECTIVES, CompilePool, EnergyMeter, Pipeline, Trial, objective_value
from triton_workbench.autotune.results import TuningDatabase, TuningKey, config_id
from triton_workbench.database import RunKind, TrialStatus
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, problem_id

log = logging.getLogger("triton_workbench.autotune")


def tune(spec: KernelSpec, problem: Problem, *, strategy: str = "auto",
         strategy_options: Mapping[str, Any] | None = None, budget: int = 200,
         db: TuningDatabase | str | os.PathLike | None = None, objective: str = "time", seed: int = 0,
         energy_meter: EnergyMeter | None = None, compile_ahead: bool | CompilePool | None = None,
         workers: int | None = None,
         timeout_s: float | None = 120.0, interpreter_reps: int = 3, progress: bool = True,
         distributed: Distributed | None = None, on_trial: Callable[[Trial], None] | None = None,
         run_id: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Tune `spec` for `problem`; returns every stored trial of this kernel/problem/device (a DataFrame).

    `.attrs["run_id"]` of the result is this sweep's run (None if everything was already stored).

    db: the database the trials and the best config go to (default: $WORKBENCH_DB, else the user
    cache). Once the best config is stored, `db` becomes the kernels' config source
    (`autotune.use_database(db)`): later launches in this process use what was tuned.
    strategy/strategy_options/seed: passed to `autotune.strategies.make_strategy` (strategy_options: the
    strategy's declared hyperparameters by name, e.g. {"trees": 48} for auto); budget: how many configs the
    strategy may propose in all (stored ones count); objective: 'time', or 'energy' / 'edp' which
    need an `energy_meter`; compile_ahead: compile each batch for the GPU target in a process pool
    (`workers`, default all cores) one batch ahead of the measurements (default: for specs
    registered in kernels.SPECS, the only ones the pool can find), or a `CompilePool` to borrow
    (shared by many sweeps; the caller closes it); timeout_s: per-trial
    watchdog; distributed: set under torchrun (default: detected from the environment); run_id: record
    the trials in this run, which the caller started and finishes (one run for a whole model's problems),
    instead of a run of the sweep's own.
    Non-zero ranks return an empty DataFrame.
    """
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec must be a kernels.spec.KernelSpec, got {type(spec).__name__}")
    if not isinstance(problem, dict):
        raise TypeError(f"problem must be a dict of sizes and dtype, got {type(problem).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "time" and energy_meter is None:
        raise ValueError(f"objective {objective!r} needs an energy meter (workbench tune --profile, on a GPU with NVML)")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    from triton_workbench.autotune.strategies import strategy_options as check_strategy_options

    check_strategy_options(strategy, strategy_options)  # before any run starts or pool is made
    if compile_ahead is None or not CompilePool.supports(spec):
        compile_ahead = CompilePool.supports(spec)  # a borrowed pool cannot compile an unregistered spec
    distributed = distributed or Distributed.from_environment()
    pipeline = Pipeline(spec, problem, timeout_s=timeout_s, energy_meter=energy_meter,
                        interpreter_reps=interpreter_reps)  # fmt: skip
    if distributed is not None and distributed.rank != 0:
        _follow(pipeline, distributed)
        return pd.DataFrame()
    database = db if isinstance(db, TuningDatabase) else TuningDatabase(db)
    sweep = _Sweep(spec, problem, database, pipeline, objective, run_id)
    try:
        return sweep.run(strategy, dict(strategy_options or {}), budget, seed, compile_ahead, workers, progress,
                         distributed, on_trial)
    finally:
        if distributed is not None:
            distributed.broadcast(None)  # releases the other ranks, also when rank 0 failed


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

    def __init__(self, spec: KernelSpec, problem: Problem, database: TuningDatabase, pipeline: Pipeline, objective: str,
                 run_id: int | None):  # fmt: skip
        self.spec, self.problem, self.database, self.pipeline = spec, problem, database, pipeline
        self.objective = objective
        self.key = TuningKey.of(spec, problem)
        self.values: dict[str, float] = {}  # config_id -> objective value of every usable stored trial
        for row in database.trials(key=self.key).itertuples(index=False):
            if row.status == TrialStatus.OK and objective != "time" and math.isnan(row.energy_j_per_call):
                continue  # timed without energy: measure again for this objective
            self.values[row.config] = objective_value(objective, row.time_ms, row.energy_j_per_call, row.status)
        self.run_id = run_id
        self.owns_run = run_id is None  # a sweep of its own starts and finishes its run
        self.best = min(self.values.values(), default=math.inf)

    def run(self, strategy_name: str, strategy_options: dict[str, Any], budget: int, seed: int,
            compile_ahead: bool | CompilePool, workers: int | None,
            progress: bool, distributed: Distributed | None, on_trial: Callable[[Trial], None] | None) -> pd.DataFrame:  # fmt: skip
        from triton_workbench.autotune.space import Space
        from triton_workbench.autotune.strategies import make_strategy

        self.on_trial = on_trial
        space = Space.from_spec(self.spec, self.problem)
        if len(self.values) < min(budget, len(space)):
            world = distributed.world_size if distributed else 1
            borrowed = compile_ahead if isinstance(compile_ahead, CompilePool) else None
            pool = borrowed or (CompilePool(workers) if compile_ahead else None)
            self.batch_size = max(world, pool.workers if pool else 1)
            self.strategy = make_strategy(strategy_name, space, seed, **strategy_options)
            # the heuristic default goes first: a tuned config is then never worse than the untuned one
            self.strategy.enqueue(self.spec.default_config(self.problem))
            meta = {"problem": json.loads(problem_id(self.problem)), "strategy": strategy_name, "budget": budget,
                    "seed": seed, "objective": self.objective, "world_size": world}  # fmt: skip
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
        trials = self.database.trials(key=self.key)
        self._store_best(trials)
        trials.attrs["run_id"] = self.run_id  # None when a sweep of its own had nothing left to evaluate
        return trials

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
        died = self.database.died_running(self.key)
        batch = self._next_batch()
        futures = [pool.submit(self.spec, self.problem, config) for config in batch] if pool else []
        while batch:
            following = self._next_batch()  # asked now so that it compiles while this batch is measured
            following_futures = [pool.submit(self.spec, self.problem, config) for config in following] if pool else []
            if distributed is None:
                for index, config in enumerate(batch):
                    self._evaluate_here(config, self._report(futures, index), died)
            else:
                pairs = [(config, self._report(futures, index)) for index, config in enumerate(batch)]
                distributed.broadcast(pairs)
                shares = distributed.gather(_evaluate_share(self.pipeline, pairs, distributed))
                for _, trial in sorted((pair for share in shares for pair in share), key=lambda pair: pair[0]):
                    self._record(trial)
            batch, futures = following, following_futures

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

    def _evaluate_here(self, config: Config, report: dict | None, died: dict[str, int]) -> None:
        if died.get(config_id(config), 0) >= 2:
            trial = Trial(config=config, status=TrialStatus.TIMEOUT,
                          reason="the sweep's process died twice while running this config (hang or crash)")  # fmt: skip
        else:
            self.database.mark_running(self.key, config)
            try:
                trial = self.pipeline.evaluate(config, report)
            except KeyboardInterrupt:
                self.database.forget_running(self.key, config)
                raise
        self._record(trial)

    def _record(self, trial: Trial) -> None:
        self.database.record_trial(self.run_id, self.key, trial.config, trial.status, trial.reason, **trial.measures())
        value = objective_value(self.objective, trial.time_ms, trial.energy_j_per_call, trial.status)
        self.values[config_id(trial.config)] = value
        self.strategy.tell(trial.config, value)
        self.best = min(self.best, value)
        if math.isfinite(self.best):
            self.bar.set_postfix_str(f"best {self.best:.4g} {_UNITS[self.objective]}")
        self.bar.update(1)
        if self.on_trial is not None:
            self.on_trial(trial)

    def _store_best(self, trials: pd.DataFrame) -> None:
        """Store the best ok trial (of `trials`, all stored for this key) and make the kernels launch with it:
        this database becomes their config source (`use_database`)."""
        if not self.values or not math.isfinite(min(self.values.values())):
            return
        winner = min(self.values, key=self.values.get)
        row = trials[trials["config"] == winner].iloc[0]
        self.database.set_best(self.key, json.loads(winner), self.objective, self.values[winner], row["time_ms"],
                               int(row["run_id"]))  # fmt: skip
        use_database(self.database)


_UNITS = {"time": "ms", "energy": "J", "edp": "J*s"}
