"""Tuning results in the workbench database: every trial, the configs being evaluated, the best configs.

`TuningDatabase` is the workbench's `database.Database` with the three tuning tables added to its
schema. A subclass, rather than functions taking a Database, because a tuning result is stored in
the same file, under the same transactions and connection as the runs it belongs to: the subclass
reuses that machinery without exposing it, and call sites stay `db.trials(run_id)`,
`db.record_trial(...)`, `db.lookup_best(spec, problem)`. Code that only needs runs and series
(training, monitoring, benches) keeps the plain `Database`; both open the same file.

A unique key on (kernel, source hash, problem, device, versions, config) means a resumed sweep
neither loses nor duplicates a trial: each is committed as it finishes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from triton_workbench.database import TRIAL_STATUSES, Database, Table
from triton_workbench.database.environment import DeviceKey, device_key
from triton_workbench.database.store import runs_match, sql_value, utc_now
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, canonical_json, problem_id

TRIAL_MEASURES = (
    "time_ms", "time_ms_p20", "time_ms_p80", "timer", "compile_time_s", "shared_bytes", "registers", "spills",
    "tflops", "gbps", "energy_j_per_call", "avg_power_w", "peak_power_w", "start_temp_c", "end_temp_c",
    "mean_sm_clock_mhz", "throttled", "started_at",
)  # fmt: skip
TRIAL_COLUMNS = ("run_id", "trial_id", "kernel", "problem", "config", "status", "reason") + TRIAL_MEASURES
KEY_COLUMNS = ("kernel", "source_hash", "problem", "device", "capability", "triton_version", "torch_version")
_KEY_MATCH = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
_KEYS = ", ".join(KEY_COLUMNS)
_KEY_TEXT = ", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)


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


class TuningDatabase(Database):
    """A workbench database with the tuning tables: trials, running_trials and best_configs."""

    SCHEMA = {
        **Database.SCHEMA,
        Table.TRIALS: f"""CREATE TABLE IF NOT EXISTS {Table.TRIALS} (
            trial_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, {_KEY_TEXT}, config TEXT NOT NULL,
            status TEXT NOT NULL, reason TEXT, {", ".join(TRIAL_MEASURES)}, UNIQUE ({_KEYS}, config))""",
        Table.BEST_CONFIGS: f"""CREATE TABLE IF NOT EXISTS {Table.BEST_CONFIGS} (
            {_KEY_TEXT}, config TEXT NOT NULL, objective TEXT NOT NULL, value REAL, time_ms REAL, run_id INTEGER,
            updated_at TEXT NOT NULL, PRIMARY KEY ({_KEYS}))""",
        Table.RUNNING_TRIALS: f"""CREATE TABLE IF NOT EXISTS {Table.RUNNING_TRIALS} (
            {_KEY_TEXT}, config TEXT NOT NULL, attempts INTEGER NOT NULL, PRIMARY KEY ({_KEYS}, config))""",
    }  # fmt: skip

    # ------------------------------------------------------------------ trials
    def record_trial(self, run_id: int, key: TuningKey, config: Config, status: str, reason: str = "",
                     **measures: Any) -> None:  # fmt: skip
        """Store one finished trial, committed at once; a re-measured config replaces its earlier row."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRIAL_STATUSES)}, got {status!r}")
        unknown = set(measures) - set(TRIAL_MEASURES)
        if unknown:
            raise ValueError(f"unknown trial fields {sorted(unknown)}: expected some of {', '.join(TRIAL_MEASURES)}")
        measures.setdefault("started_at", utc_now())
        fields = ["run_id", *KEY_COLUMNS, "config", "status", "reason", *TRIAL_MEASURES]
        values = [int(run_id), *key.values(), config_id(config), str(status), reason or ""]
        values += [sql_value(measures.get(name)) for name in TRIAL_MEASURES]
        updates = ", ".join(f"{f} = excluded.{f}" for f in fields if f not in KEY_COLUMNS and f != "config")
        with self._write() as connection:
            connection.execute(
                f"DELETE FROM {Table.RUNNING_TRIALS} WHERE {_KEY_MATCH} AND config = ?",
                (*key.values(), config_id(config)),
            )
            connection.execute(
                f"INSERT INTO {Table.TRIALS} ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) "
                f"ON CONFLICT ({_KEYS}, config) DO UPDATE SET {updates}",
                values,
            )

    def mark_running(self, key: TuningKey, config: Config) -> None:
        """Note that a config is being evaluated (cleared by record_trial or forget_running).

        A note left behind means the process died during that trial (killed, crashed, or hung and
        killed); the tuner retries such a config once and records it as TrialStatus.TIMEOUT the second time.
        """
        with self._write() as connection:
            connection.execute(
                f"INSERT INTO {Table.RUNNING_TRIALS} ({_KEYS}, config, attempts) "
                f"VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 2))}) "
                f"ON CONFLICT ({_KEYS}, config) DO UPDATE SET attempts = attempts + 1",
                (*key.values(), config_id(config), 1),
            )

    def forget_running(self, key: TuningKey, config: Config) -> None:
        with self._write() as connection:
            connection.execute(
                f"DELETE FROM {Table.RUNNING_TRIALS} WHERE {_KEY_MATCH} AND config = ?",
                (*key.values(), config_id(config)),
            )

    def died_running(self, key: TuningKey) -> dict[str, int]:
        """config_id -> how many processes died while evaluating it, for one tuning key."""
        frame = self._query(f"SELECT config, attempts FROM {Table.RUNNING_TRIALS} WHERE {_KEY_MATCH}", key.values())
        return dict(zip(frame["config"], frame["attempts"].astype(int)))

    def trials(self, run_id: int | Sequence[int] | None = None, key: TuningKey | None = None) -> pd.DataFrame:
        """Tuning trials (of all runs, one or several; of one tuning key or all), in the order first stored."""
        runs, parameters = runs_match(run_id)
        where, parameters = [runs] if runs else [], list(parameters)
        if key is not None:
            where.append(_KEY_MATCH)
            parameters += key.values()
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
            connection.execute(
                f"INSERT OR REPLACE INTO {Table.BEST_CONFIGS} ({_KEYS}, config, objective, value, time_ms, "
                f"run_id, updated_at) VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 6))})",
                (*key.values(), config_id(config), objective, sql_value(value), sql_value(time_ms), run_id, utc_now()),
            )

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
