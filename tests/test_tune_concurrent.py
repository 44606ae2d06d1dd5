"""Several sweeps of one problem on one database at once, some frozen (SIGSTOP) or killed (SIGKILL).

Each sweep is a forked process running `tune` on the tiny spec, whose launch is slowed down and
announces each config it starts (so a test can stop or kill a sweep in the middle of a trial) and
whose `on_trial` notes each trial it stored. Claim times are short (`ClaimTimes`) to keep it quick.
"""

import dataclasses
import json
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from triton_workbench.autotune import ClaimTimes, TuningDatabase, TuningKey, tune
from triton_workbench.autotune.results import config_id
from triton_workbench.database.store import seconds_since
from tiny_spec import SPEC

CLAIMS = ClaimTimes(heartbeat_s=0.1, stale_s=1.5, wait_s=30.0)
CONFIGS = 8  # the tiny spec's space: BLOCK 16/24/32/64 x BROKEN 0/1


def _expected_status(config: str) -> str:
    config = json.loads(config)
    if config["BLOCK"] == 24:
        return "runtime_error"  # not a power of 2
    return "wrong" if config["BROKEN"] else "ok"


def _sweep(path: str, problem: dict, folder: str, slow_s: float) -> None:
    """The body of one sweep process: announces each config it starts in entered-PID, each trial it stored
    in recorded-PID."""
    entered, recorded, seen = Path(folder, f"entered-{os.getpid()}"), Path(folder, f"recorded-{os.getpid()}"), set()

    def launch(inputs, config):
        if config_id(config) not in seen:  # the first call of a trial: say so, then take a while
            seen.add(config_id(config))
            with entered.open("a") as file:
                file.write(config_id(config) + "\n")
            time.sleep(slow_s)
        return SPEC.launch(inputs, config)

    def note(trial):
        with recorded.open("a") as file:
            file.write(config_id(trial.config) + "\n")

    spec = dataclasses.replace(SPEC, launch=launch)  # same name and kernel source: the same tuning key
    tune(spec, problem, strategy="exhaustive", budget=CONFIGS, db=path, progress=False, interpreter_reps=1,
         timeout_s=30, claims=CLAIMS, on_trial=note)  # fmt: skip


def _start(path, problem, folder, slow_s, count):
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_sweep, args=(str(path), problem, str(folder), slow_s)) for _ in range(count)]
    for process in processes:
        process.start()
    return processes


def _lines(folder, kind, pid) -> list[str]:
    path = Path(folder, f"{kind}-{pid}")
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(condition, timeout_s=60.0, what="a condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _stop_outside_a_write(pid: int, path) -> None:
    """SIGSTOP `pid` at a moment it holds no write transaction: a writer frozen mid-transaction keeps the
    database locked for every other process (SQLite's own limit, not the workbench's)."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        _wait_for(lambda: _state(pid) == "T", 10, "the process to stop")
        probe = sqlite3.connect(path, timeout=0.2)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        finally:
            probe.close()
    raise AssertionError("the process was always inside a write")


def _check_invariants(db: TuningDatabase, key: TuningKey, folder) -> None:
    """What the database guarantees once every sweep of `key` ended, however it ended."""
    runs = db.runs()
    assert set(runs["status"]) <= {"done", "failed", "interrupted"}, runs[["run_id", "status", "meta"]]
    trials = db.trials(key=key)
    assert not trials.duplicated(["run_id", "config"]).any()  # no run stores a config twice
    assert trials["config"].nunique() == CONFIGS  # every config has a trial
    for config, status in zip(trials["config"], trials["status"]):
        assert status == _expected_status(config), (config, status)  # no healthy config failed or timed out
    own = set(zip(trials["run_id"], trials["config"]))
    for pid, run_id in zip(runs["owner_pid"], runs["run_id"]):  # every trial a sweep stored is still its own
        assert {(run_id, config) for config in _lines(folder, "recorded", pid)} <= own
    ok = trials[trials["status"] == "ok"]
    best = db.best_configs("tiny_scale").set_index("problem").loc[key.problem]
    assert best["config"] == ok.loc[ok["time_ms"].idxmin(), "config"]  # chosen from every run's trials
    assert best["value"] == ok["time_ms"].min()
    assert db.claims(key).empty and db.died_running(key) == {}


def test_three_sweeps_at_once_one_frozen_one_killed_share_the_work_and_lose_nothing(tmp_path):
    path, problem = tmp_path / "shared.db", {"n": 37, "dtype": "fp32"}
    key = TuningKey.of(SPEC, problem)
    frozen, killed, healthy = processes = _start(path, problem, tmp_path, 0.5, 3)
    try:
        _wait_for(lambda: _lines(tmp_path, "entered", frozen.pid), what="the first sweep to start a trial")
        _stop_outside_a_write(frozen.pid, path)
        held = _lines(tmp_path, "entered", frozen.pid)[-1]  # the config it is measuring, frozen
        db = TuningDatabase(path)
        claim = db.claims(key, CLAIMS.stale_s).set_index("config").loc[held]
        assert claim["owner_pid"] == frozen.pid and claim["holder"] == "live"  # its heartbeat is fresh
        last_heartbeat = claim["heartbeat_at"]

        started = len(_lines(tmp_path, "entered", killed.pid))
        _wait_for(lambda: len(_lines(tmp_path, "entered", killed.pid)) > started, what="the second sweep's next trial")
        killed.kill()  # SIGKILL, in the middle of a trial
        killed.join()

        _wait_for(lambda: seconds_since(last_heartbeat) > CLAIMS.stale_s + 0.2, what="the frozen claim to age")
        after = db.claims(key, CLAIMS.stale_s).set_index("config")
        if held in after.index and after.loc[held, "owner_pid"] == frozen.pid:
            assert after.loc[held, "holder"] == "stale"  # alive but silent: stale, to be taken over, no death
        healthy.join(60)
        assert healthy.exitcode == 0
        again = db.trials(key=key, config=json.loads(held))
        assert len(again) == 1 and (again["started_at"] >= last_heartbeat).all()  # measured by another sweep...
        taken_after = (again["started_at"].map(lambda t: seconds_since(last_heartbeat) - seconds_since(t)))
        assert (taken_after >= CLAIMS.stale_s).all()  # ...only once the frozen one's claim had gone stale
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
    frozen.join(60)
    assert frozen.exitcode == 0  # woken up, it stores its own trial of `held` and finds the rest stored

    runs = db.runs().set_index("owner_pid")
    assert runs.loc[frozen.pid, "status"] == "done" and runs.loc[healthy.pid, "status"] == "done"
    assert runs.loc[killed.pid, "status"] == "interrupted" and "ended without" in runs.loc[killed.pid, "meta"]["reason"]
    trials = db.trials(key=key)
    assert set(trials[trials["config"] == held]["run_id"]) == {runs.loc[frozen.pid, "run_id"], runs.loc[healthy.pid, "run_id"]}
    assert trials.groupby("run_id").size().sum() < 2 * CONFIGS  # shared, not each measuring everything
    _check_invariants(db, key, tmp_path)
    assert not (trials["reason"].str.contains("died twice")).any()


def test_sweeps_killed_at_random_points_leave_a_consistent_database(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "shared.db"
    for iteration in range(6):  # a new problem (tuning key) each time, in one database
        problem = {"n": 37 + iteration, "dtype": "fp32"}
        folder = tmp_path / f"iteration-{iteration}"
        folder.mkdir()
        processes = _start(path, problem, folder, 0.1, 3)
        victim = rng.choice(processes)
        time.sleep(rng.uniform(0.0, 1.5))  # before, during or after any of its trials, claims or writes
        victim.kill()
        for process in processes:
            process.join(60)
        assert victim.exitcode in (0, -signal.SIGKILL)
        assert all(process.exitcode == 0 for process in processes if process is not victim)
        db = TuningDatabase(path)
        key = TuningKey.of(SPEC, problem)
        _check_invariants(db, key, folder)
        rerun = tune(SPEC, problem, strategy="exhaustive", budget=CONFIGS, db=db, progress=False, claims=CLAIMS)
        assert rerun.attrs["run_id"] is None and len(rerun) == len(db.trials(key=key))  # nothing left to measure
        assert math.isfinite(rerun["time_ms"].min())
