"""The workbench database: one SQLite file (WAL) holding runs, tuning trials, best configs and series.

It is the source of truth for everything measured. Safe for several processes at once (WAL, a busy
timeout, every write one short IMMEDIATE transaction) and for interruption: each trial is committed
as it finishes, and a unique key on (kernel, source hash, problem, device, versions, config) means a
resumed sweep neither loses nor duplicates one.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import platformdirs

from triton_workbench.autotune.environment import DeviceKey, device_key, environment
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, canonical_json, problem_id

RUN_KINDS = ("tune", "train", "monitor", "strategies", "bench")
RUN_STATUSES = ("running", "done", "failed", "interrupted")
TRIAL_STATUSES = ("ok", "wrong", "compile_error", "out_of_resources", "runtime_error", "timeout")
TRIAL_MEASURES = (
    "time_ms", "time_ms_p20", "time_ms_p80", "timer", "compile_time_s", "shared_bytes", "registers", "spills",
    "tflops", "gbps", "energy_j_per_call", "avg_power_w", "peak_power_w", "start_temp_c", "end_temp_c",
    "mean_sm_clock_mhz", "throttled", "started_at",
)  # fmt: skip
TRIAL_COLUMNS = ("run_id", "trial_id", "kernel", "problem", "config", "status", "reason") + TRIAL_MEASURES
KEY_COLUMNS = ("kernel", "source_hash", "problem", "device", "capability", "triton_version", "torch_version")
_KEY_MATCH = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
_RESERVED_TABLES = {"runs", "trials", "best_configs", "running_trials"}
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, meta TEXT, environment TEXT);
CREATE TABLE IF NOT EXISTS trials (
    trial_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER,
    {", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)}, config TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, {", ".join(f"{c}" for c in TRIAL_MEASURES)},
    UNIQUE ({", ".join(KEY_COLUMNS)}, config));
CREATE TABLE IF NOT EXISTS best_configs (
    {", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)}, config TEXT NOT NULL, objective TEXT NOT NULL,
    value REAL, time_ms REAL, run_id INTEGER, updated_at TEXT NOT NULL,
    PRIMARY KEY ({", ".join(KEY_COLUMNS)}));
CREATE TABLE IF NOT EXISTS running_trials (
    {", ".join(f"{c} TEXT NOT NULL" for c in KEY_COLUMNS)}, config TEXT NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY ({", ".join(KEY_COLUMNS)}, config));
"""


class DatabaseFileError(ValueError):
    """The database file exists but SQLite cannot use it (damaged, or not a database)."""


def default_path() -> Path:
    """$WORKBENCH_DB, else workbench.db in the user's cache directory."""
    override = os.environ.get("WORKBENCH_DB")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("triton-workbench")) / "workbench.db"


def config_id(config: Mapping[str, Any]) -> str:
    """A canonical string for a config (the database key)."""
    return canonical_json(config)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


def _sql_value(value: Any) -> Any:
    """A Python value SQLite stores as is: numpy scalars unwrapped, NaN -> NULL, dicts/lists -> JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, int, bytes)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


class Database:
    """A handle on one workbench database file; cheap to create, one connection per process."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    # ------------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._translate_errors():
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                         check_same_thread=False)  # fmt: skip
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not _RESERVED_TABLES <= tables:  # a new (or older) file: create what is missing, once
                connection.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    connection.execute(statement)
                connection.execute("COMMIT")
        self._connection, self._pid = connection, os.getpid()
        return connection

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as error:
            message = str(error)
            damaged = "not a database" in message or "malformed" in message or "corrupt" in message
            if not damaged:
                raise
            raise DatabaseFileError(
                f"workbench database {self.path} is damaged or not a SQLite database ({message}); "
                "move it away or choose another file with --db / $WORKBENCH_DB"
            ) from error

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: other writers wait (busy timeout), readers go on (WAL)."""
        with self._lock, self._translate_errors():
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _query(self, sql: str, parameters: tuple = ()) -> pd.DataFrame:
        with self._lock, self._translate_errors():
            return pd.read_sql_query(sql, self._connect(), params=parameters)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    # ------------------------------------------------------------------ runs
    def start_run(self, kind: str, name: str, meta: dict | None = None) -> int:
        """Open a run (status 'running'); the environment is recorded with it."""
        if kind not in RUN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO runs (kind, name, status, started_at, meta, environment) VALUES (?, ?, 'running', ?, ?, ?)",
                (kind, str(name), _now(), json.dumps(meta or {}, default=str), json.dumps(environment())),
            )
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str = "done") -> None:
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES[1:])}, got {status!r}")
        with self._write() as connection:
            updated = connection.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", (status, _now(), int(run_id))
            ).rowcount
        if not updated:
            raise ValueError(f"run_id {run_id} does not exist in {self.path}")

    @contextmanager
    def run(self, kind: str, name: str, meta: dict | None = None) -> Iterator[int]:
        """A run around a block: yields its id and finishes it 'done', 'interrupted' (Ctrl-C) or 'failed'."""
        run_id = self.start_run(kind, name, meta)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.finish_run(run_id, "interrupted")
            raise
        except BaseException:
            self.finish_run(run_id, "failed")
            raise
        self.finish_run(run_id, "done")

    def runs(self) -> pd.DataFrame:
        frame = self._query("SELECT run_id, kind, name, status, started_at, finished_at, meta, environment FROM runs")
        for column in ("meta", "environment"):
            frame[column] = [json.loads(text) if text else {} for text in frame[column]]
        return frame

    # ------------------------------------------------------------------ per-run series
    def _columns(self, connection: sqlite3.Connection, table: str) -> list[str]:
        return [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]

    def append(self, table: str, run_id: int, frame: pd.DataFrame) -> None:
        """Append `frame`'s rows (plus run_id) to a per-run series table, creating columns as needed."""
        if not isinstance(table, str) or not _TABLE_NAME.match(table) or table in _RESERVED_TABLES:
            raise ValueError(f"table must be a lower-case identifier other than {sorted(_RESERVED_TABLES)}, got {table!r}")
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
        columns = [str(c) for c in frame.columns if str(c) != "run_id"]
        for column in columns:
            if not _TABLE_NAME.match(column):
                raise ValueError(f"column names must be lower-case identifiers, got {column!r}")
        with self._write() as connection:
            connection.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (run_id INTEGER)')
            existing = set(self._columns(connection, table))
            for column in columns:
                if column not in existing:
                    connection.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}"')
            if frame.empty:
                return
            rows = [
                (int(run_id), *(_sql_value(value) for value in row))
                for row in frame[columns].itertuples(index=False, name=None)
            ]
            names = ", ".join(f'"{c}"' for c in ["run_id", *columns])
            marks = ", ".join("?" * (len(columns) + 1))
            connection.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', rows)

    def read(self, table: str, run_id: int | Sequence[int] | None = None) -> pd.DataFrame:
        """A per-run series (all runs, one, or several); an empty DataFrame if the table does not exist."""
        if not isinstance(table, str) or not _TABLE_NAME.match(table):
            raise ValueError(f"table must be a lower-case identifier, got {table!r}")
        with self._lock, self._translate_errors():
            exists = self._connect().execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
        if not exists:
            return pd.DataFrame()
        where, parameters = _runs_match(run_id)
        return self._query(f'SELECT * FROM "{table}"{" WHERE " + where if where else ""} ORDER BY rowid', parameters)

    # ------------------------------------------------------------------ trials
    def record_trial(self, run_id: int, key: TuningKey, config: Config, status: str, reason: str = "",
                     **measures: Any) -> None:  # fmt: skip
        """Store one finished trial, committed at once; a re-measured config replaces its earlier row."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRIAL_STATUSES)}, got {status!r}")
        unknown = set(measures) - set(TRIAL_MEASURES)
        if unknown:
            raise ValueError(f"unknown trial fields {sorted(unknown)}: expected some of {', '.join(TRIAL_MEASURES)}")
        measures.setdefault("started_at", _now())
        fields = ["run_id", *KEY_COLUMNS, "config", "status", "reason", *TRIAL_MEASURES]
        values = [int(run_id), *key.values(), config_id(config), status, reason or ""]
        values += [_sql_value(measures.get(name)) for name in TRIAL_MEASURES]
        updates = ", ".join(f"{f} = excluded.{f}" for f in fields if f not in KEY_COLUMNS and f != "config")
        with self._write() as connection:
            connection.execute(
                f"DELETE FROM running_trials WHERE {_KEY_MATCH} AND config = ?",
                (*key.values(), config_id(config)),
            )
            connection.execute(
                f"INSERT INTO trials ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) "
                f"ON CONFLICT ({', '.join(KEY_COLUMNS)}, config) DO UPDATE SET {updates}",
                values,
            )

    def mark_running(self, key: TuningKey, config: Config) -> None:
        """Note that a config is being evaluated (cleared by record_trial or forget_running).

        A note left behind means the process died during that trial (killed, crashed, or hung and
        killed); the tuner retries such a config once and records it as 'timeout' the second time.
        """
        with self._write() as connection:
            connection.execute(
                f"INSERT INTO running_trials ({', '.join(KEY_COLUMNS)}, config, attempts) "
                f"VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 2))}) "
                f"ON CONFLICT ({', '.join(KEY_COLUMNS)}, config) DO UPDATE SET attempts = attempts + 1",
                (*key.values(), config_id(config), 1),
            )

    def forget_running(self, key: TuningKey, config: Config) -> None:
        with self._write() as connection:
            connection.execute(
                f"DELETE FROM running_trials WHERE {_KEY_MATCH} AND config = ?",
                (*key.values(), config_id(config)),
            )

    def died_running(self, key: TuningKey) -> dict[str, int]:
        """config_id -> how many processes died while evaluating it, for one tuning key."""
        frame = self._query(
            f"SELECT config, attempts FROM running_trials WHERE {_KEY_MATCH}",
            key.values(),
        )
        return dict(zip(frame["config"], frame["attempts"].astype(int)))

    def trials(self, run_id: int | Sequence[int] | None = None, key: TuningKey | None = None) -> pd.DataFrame:
        """Tuning trials (of all runs, one or several; of one tuning key or all), in the order first stored."""
        runs, parameters = _runs_match(run_id)
        where, parameters = [runs] if runs else [], list(parameters)
        if key is not None:
            where.append(_KEY_MATCH)
            parameters += key.values()
        extras = ("source_hash", "device", "capability", "triton_version", "torch_version")
        sql = f"SELECT {', '.join(TRIAL_COLUMNS + extras)} FROM trials"
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
                f"INSERT OR REPLACE INTO best_configs ({', '.join(KEY_COLUMNS)}, config, objective, value, time_ms, "
                f"run_id, updated_at) VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 6))})",
                (*key.values(), config_id(config), objective, _sql_value(value), _sql_value(time_ms), run_id, _now()),
            )

    def best_configs(self, kernel: str | None = None) -> pd.DataFrame:
        """Stored best configs (all, or one kernel's): key columns, config (JSON), objective, value, time_ms."""
        sql = "SELECT * FROM best_configs"
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
            "SELECT problem, config, triton_version, torch_version FROM best_configs "
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


def lookup_best(spec: KernelSpec, problem: Problem) -> Config | None:
    """`Database().lookup_best` on the default database; None when that file does not exist yet."""
    database = Database()
    if not database.path.exists():
        return None
    try:
        return database.lookup_best(spec, problem)
    finally:
        database.close()


def _runs_match(run_id: int | Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    """SQL condition and parameters selecting rows of one run or several ("" for all runs)."""
    if run_id is None:
        return "", ()
    ids = (int(run_id),) if isinstance(run_id, (int, np.integer)) else tuple(int(i) for i in run_id)
    return f"run_id IN ({', '.join('?' * len(ids))})", ids
