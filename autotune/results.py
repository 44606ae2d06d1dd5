"""Tuning results in the workbench database: every trial, the configs being evaluated, the best configs.

`TuningDatabase` is the workbench's `database.Database` with the three tuning tables added to its
schema. A subclass, rather than functions taking a Database, because a tuning result is stored in
the same file, under the same transactions and connection as the runs it belongs to: the subclass
reuses that machinery without exposing it, and call sites stay `db.trials(run_id)`,
`db.record_trial(...)`, `db.lookup_best(spec, problem)`. Code that only needs runs and series
(training, monitoring, benches) keeps the plain `Database`; both open the same file.

A trial row belongs to the run that measured it: the unique key is (kernel, source hash, problem,
device, versions, config, run), so a resumed sweep neither loses nor duplicates a trial (each is
committed as it finishes), a run re-measuring a config replaces only its own row, and storing a trial
never replaces another run's. Two runs that both measured a config (rare: see the claims below) both
keep their row; the best config of a key is decided from all of them.

Sweeps on one database at once share the work through claims, rows of `running_trials`: before
measuring a config a sweep claims it in one IMMEDIATE transaction (owner pid, host, run, claimed_at,
heartbeat_at), refreshes the heartbeat while it measures (`holding`, a background thread) and
releases the claim when the trial is stored. A config already stored is not claimed; one whose claim
is live (fresh heartbeat, owner alive) is left to its owner; a stale one (heartbeat older than
`ClaimTimes.stale_s`, or owner pid gone from this host) is taken over. Only an owner known to be dead
(its pid gone from this host) counts as a death against the config: the tuner records a config whose
measuring owners died twice as a timeout, and a live owner's claim never counts, however stale.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from triton_workbench.database import TRIAL_STATUSES, Database, Table
from triton_workbench.database.environment import DeviceKey, device_key
from triton_workbench.database.store import process_alive, runs_match, seconds_since, sql_value, this_host, utc_now
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, canonical_json, problem_id

TRIAL_MEASURES = (
    "time_ms", "time_ms_p20", "time_ms_p80", "timer", "compile_time_s", "shared_bytes", "registers", "spills",
    "tflops", "gbps", "energy_j_per_call", "avg_power_w", "peak_power_w", "start_temp_c", "end_temp_c",
    "mean_sm_clock_mhz", "throttled", "started_at", "static_tensor_ceiling", "static_memory_ceiling",
    "throttle_reasons", "remeasured",
)  # fmt: skip
# trial measures added after the trials table's first version: an older file gains them when opened
_ADDED_TRIAL_COLUMNS = ("static_tensor_ceiling REAL", "static_memory_ceiling REAL", "throttle_reasons REAL",
                        "remeasured INTEGER")  # fmt: skip
TRIAL_COLUMNS = ("run_id", "trial_id", "kernel", "problem", "config", "status", "reason") + TRIAL_MEASURES
KEY_COLUMNS = ("kernel", "source_hash", "problem", "device", "capability", "triton_version", "torch_version")
_KEY_MATCH = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
_KEYS = ", ".join(KEY_COLUMNS)
_KEY_TEXT = ", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)
# claim columns added to running_trials after its first version (a row then was a note: attempts = deaths)
_CLAIM_COLUMNS = ("died INTEGER NOT NULL DEFAULT 0", "measuring INTEGER NOT NULL DEFAULT 1", "owner_pid INTEGER",
                  "owner_host TEXT", "run_id INTEGER", "claimed_at TEXT", "heartbeat_at TEXT")  # fmt: skip
_STORED_TRIAL_COLUMNS = ("trial_id", "run_id", *KEY_COLUMNS, "config", "status", "reason", *TRIAL_MEASURES)

log = logging.getLogger("triton_workbench.autotune")


def config_id(config: Mapping[str, Any]) -> str:
    """A canonical string for a config (the database key)."""
    return canonical_json(config)


@dataclass(frozen=True)
class TuningKey:
    """What a tuning result belongs to: the kernel source, the problem and the device + versions."""

    kernel: str
    source_hash: str
    problem: str  # problem_id(problem)
    device: str
    capability: str
    triton_version: str
    torch_version: str

    @classmethod
    def of(cls, spec: KernelSpec, problem: Problem, device: DeviceKey | None = None) -> "TuningKey":
        device = device or device_key()
        return cls(spec.name, spec.source_hash, problem_id(problem), **asdict(device))

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, column) for column in KEY_COLUMNS)


@dataclass(frozen=True)
class ClaimTimes:
    """How claims on configs age (seconds): the owner refreshes its heartbeat every `heartbeat_s`; a
    claim whose heartbeat is older than `stale_s` is stale (its owner frozen, or on another host and
    gone) and may be taken over; a sweep that found configs claimed by live owners waits for them at its
    end at most `wait_s`, then leaves them to those owners."""

    heartbeat_s: float = 5.0
    stale_s: float = 60.0
    wait_s: float = 300.0

    def __post_init__(self):
        for name in ("heartbeat_s", "stale_s", "wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not self.heartbeat_s < self.stale_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than stale_s ({self.stale_s})")


# what `TuningDatabase.claim` found
TAKEN = "taken"  # the claim is this process's now: measure the config, store its trial (which releases it)
BUSY = "busy"  # another live process is measuring it
STORED = "stored"  # a trial of it is stored already (one usable as asked): nothing to measure


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming one config: `state` (TAKEN, BUSY or STORED); for TAKEN, `died` is how many
    owners that were measuring it died (this one not counted); for BUSY, `owner` says who holds it."""

    key: TuningKey
    config: Config
    state: str
    died: int = 0
    owner: str = ""


def _holder(pid: int | None, host: str | None, claimed_at: str | None, heartbeat_at: str | None,
            stale_s: float) -> str:  # fmt: skip
    """How a claim's owner stands, seen from this process: live, stale (frozen, or on another host and
    silent; or this very process's leftover) or dead (its pid gone from this host; a row without an
    owner is a note of the earlier version, left by a process that died)."""
    if pid is None:
        return "dead"
    if host == this_host():
        if not process_alive(pid, claimed_at):
            return "dead"
        if pid == os.getpid():
            return "stale"
    fresh = heartbeat_at is not None and seconds_since(heartbeat_at) < stale_s
    return "live" if fresh else "stale"


def _deaths(attempts: int, died: int, measuring: int, ownerless: bool, holder: str) -> int:
    """The deaths against a config once a claim's owner is counted: a dead owner that was measuring it
    adds one; a note of the earlier version (ownerless) counted every attempt as a death."""
    if holder != "dead":
        return int(died)
    return int(attempts) if ownerless else int(died) + int(measuring)


class TuningDatabase(Database):
    """A workbench database with the tuning tables: trials, running_trials and best_configs."""

    SCHEMA = {
        **Database.SCHEMA,
        Table.TRIALS: f"""CREATE TABLE IF NOT EXISTS {Table.TRIALS} (
            trial_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, {_KEY_TEXT}, config TEXT NOT NULL,
            status TEXT NOT NULL, reason TEXT, {", ".join(TRIAL_MEASURES)}, UNIQUE ({_KEYS}, config, run_id))""",
        Table.BEST_CONFIGS: f"""CREATE TABLE IF NOT EXISTS {Table.BEST_CONFIGS} (
            {_KEY_TEXT}, config TEXT NOT NULL, objective TEXT NOT NULL, value REAL, time_ms REAL, run_id INTEGER,
            updated_at TEXT NOT NULL, PRIMARY KEY ({_KEYS}))""",
        Table.RUNNING_TRIALS: f"""CREATE TABLE IF NOT EXISTS {Table.RUNNING_TRIALS} (
            {_KEY_TEXT}, config TEXT NOT NULL, attempts INTEGER NOT NULL, {", ".join(_CLAIM_COLUMNS)},
            PRIMARY KEY ({_KEYS}, config))""",
    }  # fmt: skip
    ADDED_COLUMNS = {**Database.ADDED_COLUMNS, Table.RUNNING_TRIALS: _CLAIM_COLUMNS, Table.TRIALS: _ADDED_TRIAL_COLUMNS}

    def _schema_changes(self, connection) -> list[str]:
        """`Database._schema_changes`, and a trials table keyed without the run (before runs kept their own
        trials) rebuilt with the run in its key, its rows kept."""
        statements = super()._schema_changes(connection)
        unique_keys = [{info[2] for info in connection.execute(f'PRAGMA index_info("{index[1]}")')}
                       for index in connection.execute(f"PRAGMA index_list({Table.TRIALS})") if index[2]]  # fmt: skip
        if unique_keys and not any("run_id" in columns for columns in unique_keys):
            columns, former = ", ".join(_STORED_TRIAL_COLUMNS), f"{Table.TRIALS}_keyed_without_run"
            statements += [f"ALTER TABLE {Table.TRIALS} RENAME TO {former}", self.SCHEMA[Table.TRIALS],
                           f"INSERT INTO {Table.TRIALS} ({columns}) SELECT {columns} FROM {former}",
                           f"DROP TABLE {former}"]  # fmt: skip
        return statements

    # ------------------------------------------------------------------ trials
    def record_trial(self, run_id: int, key: TuningKey, config: Config, status: str, reason: str = "",
                     **measures: Any) -> None:  # fmt: skip
        """Store one finished trial of run `run_id`, committed at once, and release this process's claim on
        the config. A run re-measuring a config replaces its own earlier row; other runs' rows stay."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRIAL_STATUSES)}, got {status!r}")
        unknown = set(measures) - set(TRIAL_MEASURES)
        if unknown:
            raise ValueError(f"unknown trial fields {sorted(unknown)}: expected some of {', '.join(TRIAL_MEASURES)}")
        measures.setdefault("started_at", utc_now())
        fields = ["run_id", *KEY_COLUMNS, "config", "status", "reason", *TRIAL_MEASURES]
        values = [int(run_id), *key.values(), config_id(config), str(status), reason or ""]
        values += [sql_value(measures.get(name)) for name in TRIAL_MEASURES]
        updates = ", ".join(f"{f} = excluded.{f}" for f in fields if f not in (*KEY_COLUMNS, "config", "run_id"))
        with self._write() as connection:
            self._release(connection, key, config)
            connection.execute(
                f"INSERT INTO {Table.TRIALS} ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) "
                f"ON CONFLICT ({_KEYS}, config, run_id) DO UPDATE SET {updates}",
                values,
            )

    # ------------------------------------------------------------------ claims on configs being measured
    def claim(self, run_id: int, key: TuningKey, config: Config, *, stale_s: float = ClaimTimes.stale_s,
              needs: Sequence[str] = (), measuring: bool = True) -> Claim:  # fmt: skip
        """Claim `config` for this process and run `run_id`, in one IMMEDIATE transaction (see the module
        docstring): STORED if a trial of it is stored (by any run; with `needs`, an ok trial counts only
        if it has those measures, e.g. energy_j_per_call), BUSY if another process holds a live claim on
        it, else TAKEN. `measuring`: this process measures it right away (False: it holds it for a batch
        several ranks measure in turn, so its death is no evidence against this config)."""
        unknown = set(needs) - set(TRIAL_MEASURES)
        if unknown:
            raise ValueError(f"needs: unknown trial fields {sorted(unknown)}")
        usable = " AND ".join(f"{name} IS NOT NULL" for name in needs) or "1"
        config_text, now = config_id(config), utc_now()
        with self._write() as connection:
            stored = connection.execute(
                f"SELECT 1 FROM {Table.TRIALS} WHERE {_KEY_MATCH} AND config = ? AND (status != 'ok' OR ({usable}))",
                (*key.values(), config_text),
            ).fetchone()
            if stored:
                return Claim(key, dict(config), STORED)
            row = connection.execute(
                f"SELECT attempts, died, measuring, owner_pid, owner_host, run_id, claimed_at, heartbeat_at "
                f"FROM {Table.RUNNING_TRIALS} WHERE {_KEY_MATCH} AND config = ?",
                (*key.values(), config_text),
            ).fetchone()
            attempts, died = 0, 0
            if row is not None:
                attempts, died, was_measuring, pid, host, holder_run, claimed_at, heartbeat_at = row
                holder = _holder(pid, host, claimed_at, heartbeat_at, stale_s)
                if holder == "live":
                    return Claim(key, dict(config), BUSY, died, f"pid {pid} on {host}, run {holder_run}")
                died = _deaths(attempts, died, was_measuring, pid is None, holder)
            connection.execute(
                f"INSERT OR REPLACE INTO {Table.RUNNING_TRIALS} ({_KEYS}, config, attempts, died, measuring, "
                f"owner_pid, owner_host, run_id, claimed_at, heartbeat_at) "
                f"VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 9))})",
                (*key.values(), config_text, attempts + 1, died, int(measuring), os.getpid(), this_host(),
                 int(run_id), now, now),
            )  # fmt: skip
        return Claim(key, dict(config), TAKEN, died)

    def refresh(self, claims: Iterable[Claim]) -> list[Claim]:
        """Renew the heartbeat of this process's claims; returns those it no longer holds (taken over)."""
        lost = []
        with self._write() as connection:
            for claim in claims:
                renewed = connection.execute(
                    f"UPDATE {Table.RUNNING_TRIALS} SET heartbeat_at = ? "
                    f"WHERE {_KEY_MATCH} AND config = ? AND owner_pid = ? AND owner_host = ?",
                    (utc_now(), *claim.key.values(), config_id(claim.config), os.getpid(), this_host()),
                ).rowcount
                if not renewed:
                    lost.append(claim)
        return lost

    def release(self, key: TuningKey, config: Config) -> None:
        """Drop this process's claim on a config without storing a trial (no-op if another holds it)."""
        with self._write() as connection:
            self._release(connection, key, config)

    @staticmethod
    def _release(connection, key: TuningKey, config: Config) -> None:
        connection.execute(
            f"DELETE FROM {Table.RUNNING_TRIALS} WHERE {_KEY_MATCH} AND config = ? AND owner_pid = ? AND owner_host = ?",
            (*key.values(), config_id(config), os.getpid(), this_host()),
        )

    @contextmanager
    def holding(self, claims: Sequence[Claim], heartbeat_s: float = ClaimTimes.heartbeat_s) -> Iterator[None]:
        """Keep this process's `claims` fresh while the block runs (a background thread renews them every
        `heartbeat_s`); at the end, release those still held (storing a trial releases its own)."""
        stop = threading.Event()

        def beat() -> None:
            warned: set[str] = set()
            while not stop.wait(heartbeat_s):
                try:
                    lost = self.refresh(claims)
                except Exception as error:  # a busy or briefly unreachable file: try again at the next beat
                    log.warning("could not renew claims (%s: %s)", type(error).__name__, error)
                    continue
                for claim in lost:
                    if config_id(claim.config) not in warned:
                        warned.add(config_id(claim.config))
                        log.info("the claim on %s went stale and was taken over; its trial is still stored "
                                 "for this run", config_id(claim.config))  # fmt: skip

        thread = threading.Thread(target=beat, name="claim heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with self._write() as connection:
                for claim in claims:
                    self._release(connection, claim.key, claim.config)

    def claims(self, key: TuningKey | None = None, stale_s: float = ClaimTimes.stale_s) -> pd.DataFrame:
        """The claims held now (of one key or all): config, run_id, owner_pid, owner_host, claimed_at,
        heartbeat_at, attempts (claims taken since it was last stored), died, measuring, and `holder`: live,
        stale (taken over if claimed) or dead (its owner's pid is gone from this host)."""
        sql = (f"SELECT {_KEYS}, config, run_id, owner_pid, owner_host, claimed_at, heartbeat_at, attempts, died, "
               f"measuring FROM {Table.RUNNING_TRIALS}")  # fmt: skip
        frame = self._query(sql + f" WHERE {_KEY_MATCH}" if key else sql, key.values() if key else ())
        pids = [None if pd.isna(pid) else int(pid) for pid in frame["owner_pid"]]
        frame["owner_pid"] = pd.array(pids, dtype="Int64")
        frame["holder"] = [_holder(*owner, stale_s) for owner in
                           zip(pids, frame["owner_host"], frame["claimed_at"], frame["heartbeat_at"])]  # fmt: skip
        return frame

    def died_running(self, key: TuningKey) -> dict[str, int]:
        """config_id -> how many processes died while measuring it (its owner now, if dead, included), for
        one tuning key: what the tuner's died-twice rule reads. Configs with no death are left out."""
        frame = self.claims(key)
        rows = zip(frame["attempts"], frame["died"], frame["measuring"], frame["owner_pid"].isna(), frame["holder"])
        deaths = [_deaths(*row) for row in rows]
        return {config: n for config, n in zip(frame["config"], deaths) if n}

    def trials(self, run_id: int | Sequence[int] | None = None, key: TuningKey | None = None,
               config: Config | None = None) -> pd.DataFrame:  # fmt: skip
        """Tuning trials (of all runs, one or several; of one tuning key or all; of one config or all), in
        the order first stored: one row per run that measured a config (see the module docstring)."""
        runs, parameters = runs_match(run_id)
        where, parameters = [runs] if runs else [], list(parameters)
        if key is not None:
            where.append(_KEY_MATCH)
            parameters += key.values()
        if config is not None:
            where.append("config = ?")
            parameters.append(config_id(config))
        extras = ("source_hash", "device", "capability", "triton_version", "torch_version")
        sql = f"SELECT {', '.join(TRIAL_COLUMNS + extras)} FROM {Table.TRIALS}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        frame = self._query(sql + " ORDER BY trial_id", tuple(parameters))
        for column in TRIAL_MEASURES:
            if column not in ("timer", "started_at"):
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        return frame

    # ------------------------------------------------------------------ best configs
    def set_best(self, key: TuningKey, config: Config, objective: str, value: float, time_ms: float | None,
                 run_id: int | None) -> None:  # fmt: skip
        """Store the winning config for a tuning key (replacing any earlier one)."""
        with self._write() as connection:
            self._set_best(connection, key, config, objective, value, time_ms, run_id)

    def set_best_configs(self, rows: Iterable[tuple[TuningKey, Config, str, float, float | None, int | None]]) -> None:
        """Store many winning configs (`set_best`'s arguments, one tuple each) in one transaction: all of them
        or, on any error or Ctrl-C, none."""
        with self._write() as connection:
            for row in rows:
                self._set_best(connection, *row)

    @staticmethod
    def _set_best(connection, key: TuningKey, config: Config, objective: str, value: float, time_ms: float | None,
                  run_id: int | None) -> None:  # fmt: skip
        connection.execute(
            f"INSERT OR REPLACE INTO {Table.BEST_CONFIGS} ({_KEYS}, config, objective, value, time_ms, "
            f"run_id, updated_at) VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 6))})",
            (*key.values(), config_id(config), objective, sql_value(value), sql_value(time_ms), run_id, utc_now()),
        )

    def store_best(self, key: TuningKey, objective: str, values_of: Callable[[pd.DataFrame], pd.Series],
                   config_of: Callable[[Config], Config] = dict) -> Config | None:  # fmt: skip
        """Decide the best config of `key` from every stored trial, whoever measured it, and store it; in one
        transaction, so that two sweeps finishing at once cannot store a winner chosen from fewer trials.

        `values_of(trials)` gives the objective values of the stored trials, computed inside the transaction
        (a value may depend on other trials, e.g. the fastest one): a Series indexed as `trials`' rows; a row
        left out, inf or NaN is not usable. The lowest wins, the first stored on a tie; returns the winner, or
        None (nothing stored) when no trial has a finite value. `config_of(winner)` is what is stored as the
        best config: the kernel's part of a config that also holds device knobs (which the kernels cannot
        launch with; the winner's trial keeps them).
        """
        with self._write() as connection:
            trials = self.trials(key=key)
            values = values_of(trials).astype(float).sort_index()
            values = values[np.isfinite(values)]
            if values.empty:
                return None
            index = values.idxmin()
            row = trials.loc[index]
            winner = config_of(json.loads(row["config"]))
            self._set_best(connection, key, winner, objective, values[index], row["time_ms"], int(row["run_id"]))
        return winner

    def best_configs(self, kernel: str | None = None) -> pd.DataFrame:
        """Stored best configs (all, or one kernel's): key columns, config (JSON), objective, value, time_ms."""
        sql = f"SELECT * FROM {Table.BEST_CONFIGS}"
        if kernel is None:
            return self._query(sql + " ORDER BY kernel, problem")
        return self._query(sql + " WHERE kernel = ? ORDER BY problem", (kernel,))

    def lookup_best(self, spec: KernelSpec, problem: Problem) -> Config | None:
        """The best config for exactly `problem`, else for the nearest tuned shape, on this device; else None.

        Candidates must match the kernel name, its source hash and this device; results from the
        same Triton/PyTorch versions are preferred. "Nearest" compares the problems' `spec.shape_keys`
        by summed log distance, among problems whose other entries (dtype, activation...) are equal.
        """
        device = device_key()
        frame = self._query(
            f"SELECT problem, config, triton_version, torch_version FROM {Table.BEST_CONFIGS} "
            "WHERE kernel = ? AND source_hash = ? AND device = ? AND capability = ?",
            (spec.name, spec.source_hash, device.device, device.capability),
        )
        if frame.empty:
            return None
        wanted = problem_id(problem)
        shape_keys = set(spec.shape_keys)
        ranked = []
        for row in frame.itertuples(index=False):
            stored = json.loads(row.problem)
            if {k: v for k, v in stored.items() if k not in shape_keys} != {
                k: v for k, v in problem.items() if k not in shape_keys
            }:
                continue
            if row.problem == wanted:
                distance = 0.0
            else:
                try:
                    distance = sum(
                        abs(math.log(max(float(stored[k]), 1.0)) - math.log(max(float(problem[k]), 1.0)))
                        for k in shape_keys
                    )
                except (KeyError, TypeError, ValueError):
                    continue
                distance += 1e-9  # an exact match always wins over a bucket at distance 0
            same_versions = row.triton_version == device.triton_version and row.torch_version == device.torch_version
            ranked.append((distance, not same_versions, row.config))
        if not ranked:
            return None
        return json.loads(min(ranked)[2])
