"""Claims on configs being measured, runs owned by processes, each run's own trials, and older files."""

import json
import math
import multiprocessing
import os
import sqlite3
import time

import pandas as pd
import pytest

from triton_workbench.autotune import ClaimTimes, TuningDatabase, TuningKey
from triton_workbench.autotune.results import BUSY, KEY_COLUMNS, STORED, TAKEN, TRIAL_MEASURES
from triton_workbench.database import Database, RunStatus
from triton_workbench.database.environment import device_key
from triton_workbench.database.store import this_host
from triton_workbench.kernels.spec import problem_id

KEY = TuningKey("scale", "0" * 16, problem_id({"n": 100, "dtype": "fp32"}), **device_key().__dict__)
FAST = {"BLOCK": 16}
SLOW = {"BLOCK": 64}


def _child(path, config, hold, pipe):
    """Claims `config` (or only starts a run when it is None), says so, then exits at once or holds on."""
    db = TuningDatabase(path)
    run = db.start_run("tune", "child")
    if config is not None:
        assert db.claim(run, KEY, config).state == TAKEN
    pipe.send(run)
    if hold:
        pipe.recv()  # alive until told
    os._exit(0)


def _in_child(path, config, hold=False):
    """Run `_child` in a forked process; returns (process, pipe, run_id) once it claimed."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    process = context.Process(target=_child, args=(str(path), config, hold, theirs))
    process.start()
    run = ours.recv()
    if not hold:
        process.join(30)
    return process, ours, run


def test_claims_are_live_stale_or_dead_and_only_a_dead_owner_counts(tmp_path):
    db = TuningDatabase()
    run = db.start_run("tune", "here")
    holder, pipe, _ = _in_child(db.path, FAST, hold=True)  # alive, its heartbeat never renewed
    try:
        busy = db.claim(run, KEY, FAST, stale_s=60)
        assert busy.state == BUSY and f"pid {holder.pid}" in busy.owner
        assert db.claims(KEY, stale_s=60)["holder"].tolist() == ["live"]
        time.sleep(0.1)
        assert db.claims(KEY, stale_s=0.05)["holder"].tolist() == ["stale"]  # frozen or silent: alive all the same
        taken = db.claim(run, KEY, FAST, stale_s=0.05)
        assert taken.state == TAKEN and taken.died == 0 and db.died_running(KEY) == {}  # no death: it lives
    finally:
        pipe.send("exit")
        holder.join(30)
    assert db.claims(KEY)["owner_pid"].tolist() == [os.getpid()]

    _in_child(db.path, SLOW)  # claims and dies without a trial
    assert db.claims(KEY).set_index("config").loc[json.dumps(SLOW).replace(" ", ""), "holder"] == "dead"
    assert db.died_running(KEY) == {'{"BLOCK":64}': 1}
    retaken = db.claim(run, KEY, SLOW, stale_s=60)  # a dead owner's claim is taken at once, however fresh
    assert retaken.state == TAKEN and retaken.died == 1

    with db.holding([taken, retaken], heartbeat_s=0.02):
        before = db.claims(KEY)["heartbeat_at"].tolist()
        time.sleep(0.2)
        assert db.claims(KEY)["heartbeat_at"].tolist() > before  # renewed while held
        db.record_trial(run, KEY, FAST, "ok", time_ms=1.0)  # storing releases its claim
        assert db.claims(KEY)["config"].tolist() == ['{"BLOCK":64}']
    assert db.claims(KEY).empty  # the end of the block releases the rest
    assert db.claim(run, KEY, FAST).state == STORED
    assert db.claim(run, KEY, FAST, needs=("energy_j_per_call",)).state == TAKEN  # stored without energy
    with pytest.raises(ValueError, match="needs"):
        db.claim(run, KEY, FAST, needs=("speed",))


def test_a_claim_taken_over_is_lost_to_its_owner_and_other_hosts_are_judged_by_their_heartbeat():
    db = TuningDatabase()
    run = db.start_run("tune", "here")
    claim = db.claim(run, KEY, FAST)
    with sqlite3.connect(db.path) as connection:  # as if a process elsewhere had taken it over
        connection.execute("UPDATE running_trials SET owner_host = 'elsewhere', heartbeat_at = ?",
                           (time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),))  # fmt: skip
    assert db.refresh([claim]) == [claim]
    db.release(KEY, FAST)  # not ours any more: left alone
    assert db.claim(run, KEY, FAST, stale_s=60).state == BUSY  # its pid cannot be checked here; it is fresh
    time.sleep(0.1)
    stale = db.claim(run, KEY, FAST, stale_s=0.05)
    assert stale.state == TAKEN and stale.died == 0  # silent elsewhere: taken over, but no proof of a death
    with pytest.raises(ValueError, match="shorter"):
        ClaimTimes(heartbeat_s=2, stale_s=1)


def test_runs_whose_process_is_gone_become_interrupted_and_failures_keep_their_reason():
    db = Database()
    _, _, gone = _in_child(db.path, None)
    mine = db.start_run("tune", "alive")  # this process: alive, so it stays running
    elsewhere = db.start_run("tune", "elsewhere")
    with sqlite3.connect(db.path) as connection:
        connection.execute("UPDATE runs SET owner_host = 'elsewhere', owner_pid = 1 WHERE run_id = ?", (elsewhere,))
    with pytest.raises(ValueError):
        with db.run("tune", "fails"):
            raise ValueError("the sweep broke")
    with pytest.raises(KeyboardInterrupt):
        with db.run("tune", "stopped"):
            raise KeyboardInterrupt
    runs = db.runs().set_index("run_id")
    assert runs["status"].tolist() == ["interrupted", "running", "running", "failed", "interrupted"]
    assert "ended without finishing it" in runs.loc[gone, "meta"]["reason"] and pd.isna(runs.loc[gone, "finished_at"])
    assert runs.loc[mine, "owner_pid"] == os.getpid() and runs.loc[mine, "owner_host"] == this_host()
    assert runs["meta"].iloc[3] == {"reason": "ValueError: the sweep broke"}
    assert runs["meta"].iloc[4]["reason"].startswith("KeyboardInterrupt")
    db.finish_run(mine, RunStatus.FAILED, "out of memory")
    assert db.runs().set_index("run_id").loc[mine, "meta"] == {"reason": "out of memory"}


def test_each_run_keeps_its_trials_and_the_best_comes_from_all_of_them():
    db = TuningDatabase()
    first, second = db.start_run("tune", "a"), db.start_run("tune", "b")
    db.record_trial(first, KEY, FAST, "ok", time_ms=2.0)
    db.record_trial(first, KEY, SLOW, "ok", time_ms=5.0)
    db.record_trial(second, KEY, FAST, "ok", time_ms=3.0)  # the same config, measured by another run
    db.record_trial(second, KEY, FAST, "ok", time_ms=1.5)  # a run re-measuring replaces only its own row
    trials = db.trials(key=KEY)
    assert trials[["run_id", "config", "time_ms"]].values.tolist() == [
        [first, '{"BLOCK":16}', 2.0], [first, '{"BLOCK":64}', 5.0], [second, '{"BLOCK":16}', 1.5]]
    assert len(db.trials(key=KEY, config=FAST)) == 2
    assert db.store_best(KEY, "time", lambda trials: trials["time_ms"]) == FAST
    best = db.best_configs().iloc[0]
    assert best["value"] == 1.5 and best["run_id"] == second
    assert db.store_best(KEY, "time", lambda trials: trials["time_ms"] * math.inf) is None  # nothing usable: the stored best stays
    assert db.best_configs()["value"].tolist() == [1.5]


def test_a_file_of_the_earlier_schema_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    key_text = ", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)
    keys, measures = ", ".join(KEY_COLUMNS), ", ".join(TRIAL_MEASURES)
    with sqlite3.connect(path) as connection:  # what the workbench wrote before claims and run owners
        connection.executescript(f"""
            CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
                status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, meta TEXT, environment TEXT);
            CREATE TABLE trials (trial_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, {key_text},
                config TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, {measures}, UNIQUE ({keys}, config));
            CREATE TABLE running_trials ({key_text}, config TEXT NOT NULL, attempts INTEGER NOT NULL,
                PRIMARY KEY ({keys}, config));
            INSERT INTO runs (kind, name, status, started_at, meta) VALUES ('tune', 'old', 'running', '2024-01-01', '{{}}');
        """)
        marks = ", ".join("?" * len(KEY_COLUMNS))
        connection.execute(f"INSERT INTO trials (run_id, {keys}, config, status, time_ms) VALUES (1, {marks}, ?, 'ok', 4.0)",
                           (*KEY.values(), '{"BLOCK":16}'))  # fmt: skip
        connection.execute(f"INSERT INTO running_trials ({keys}, config, attempts) VALUES ({marks}, ?, 2)",
                           (*KEY.values(), '{"BLOCK":64}'))  # a note: two processes died running it
    db = TuningDatabase(path)
    assert db.runs()["status"].tolist() == ["running"]  # no owner recorded: nothing known about its process
    assert db.trials()[["trial_id", "run_id", "config", "time_ms"]].values.tolist() == [[1, 1, '{"BLOCK":16}', 4.0]]
    assert db.died_running(KEY) == {'{"BLOCK":64}': 2}
    run = db.start_run("tune", "new")
    db.record_trial(run, KEY, FAST, "ok", time_ms=3.0)  # now keyed by run too: the old row stays
    assert db.trials(key=KEY)["run_id"].tolist() == [1, run]
    assert db.claim(run, KEY, SLOW).died == 2  # the old note's deaths still count
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
