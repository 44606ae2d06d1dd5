"""The workbench database: one SQLite file (WAL) holding the runs of every kind and their per-run series.

It is the source of truth for everything measured, and the one store that autotune, profiler,
reports and the workbench all write to. Safe for several processes at once (WAL, a busy timeout,
every write one short IMMEDIATE transaction) and for interruption: each write is committed as it
happens, so a killed process loses nothing it stored.

The tables with a fixed schema are created on first use; a subclass adds its own to `SCHEMA`
(`autotune.results.TuningDatabase` adds the tuning trials and best configs). Per-run series
(`append` / `read`) are free-form tables whose columns grow as frames bring new ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import platformdirs

from triton_workbench.database.environment import environment
from triton_workbench.database.names import FINISHED_STATUSES, FIXED_TABLES, RUN_KINDS, RunStatus, Table

BUSY_TIMEOUT_MS = 60_000
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


class DatabaseFileError(ValueError):
    """The database file exists but SQLite cannot use it (damaged, or not a database)."""


def default_path() -> Path:
    """$WORKBENCH_DB, else workbench.db in the user's cache directory."""
    override = os.environ.get("WORKBENCH_DB")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("triton-workbench")) / "workbench.db"


def utc_now() -> str:
    """Now as the ISO timestamp (UTC, milliseconds) every stored time uses."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sql_value(value: Any) -> Any:
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


def runs_match(run_id: int | Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    """SQL condition and parameters selecting rows of one run or several ("" for all runs)."""
    if run_id is None:
        return "", ()
    ids = (int(run_id),) if isinstance(run_id, (int, np.integer)) else tuple(int(i) for i in run_id)
    return f"run_id IN ({', '.join('?' * len(ids))})", ids


class Database:
    """A handle on one workbench database file; cheap to create, one connection per process."""

    # CREATE TABLE statement of each fixed-schema table this class writes; subclasses extend it
    SCHEMA: dict[str, str] = {
        Table.RUNS: f"""CREATE TABLE IF NOT EXISTS {Table.RUNS} (
            run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
            status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, meta TEXT, environment TEXT)""",
    }

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

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
            if not set(self.SCHEMA) <= tables:  # a new (or older) file: create what is missing, once
                connection.execute("BEGIN IMMEDIATE")
                for statement in self.SCHEMA.values():
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
        """Open a run (status RunStatus.RUNNING); the environment is recorded with it."""
        if kind not in RUN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
        with self._write() as connection:
            cursor = connection.execute(
                f"INSERT INTO {Table.RUNS} (kind, name, status, started_at, meta, environment) VALUES (?, ?, ?, ?, ?, ?)",
                (str(kind), str(name), str(RunStatus.RUNNING), utc_now(), json.dumps(meta or {}, default=str),
                 json.dumps(environment())),
            )  # fmt: skip
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str = RunStatus.DONE) -> None:
        if status not in FINISHED_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINISHED_STATUSES)}, got {status!r}")
        with self._write() as connection:
            updated = connection.execute(
                f"UPDATE {Table.RUNS} SET status = ?, finished_at = ? WHERE run_id = ?",
                (str(status), utc_now(), int(run_id)),
            ).rowcount
        if not updated:
            raise ValueError(f"run_id {run_id} does not exist in {self.path}")

    @contextmanager
    def run(self, kind: str, name: str, meta: dict | None = None) -> Iterator[int]:
        """A run around a block: yields its id and finishes it done, interrupted (Ctrl-C) or failed."""
        run_id = self.start_run(kind, name, meta)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.finish_run(run_id, RunStatus.INTERRUPTED)
            raise
        except BaseException:
            self.finish_run(run_id, RunStatus.FAILED)
            raise
        self.finish_run(run_id, RunStatus.DONE)

    def runs(self) -> pd.DataFrame:
        frame = self._query(f"SELECT run_id, kind, name, status, started_at, finished_at, meta, environment "
                            f"FROM {Table.RUNS}")  # fmt: skip
        for column in ("meta", "environment"):
            frame[column] = [json.loads(text) if text else {} for text in frame[column]]
        return frame

    # ------------------------------------------------------------------ per-run series
    def _columns(self, connection: sqlite3.Connection, table: str) -> list[str]:
        return [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]

    def append(self, table: str, run_id: int, frame: pd.DataFrame) -> None:
        """Append `frame`'s rows (plus run_id) to a per-run series table, creating columns as needed."""
        if not isinstance(table, str) or not _TABLE_NAME.match(table) or table in FIXED_TABLES:
            raise ValueError(f"table must be a lower-case identifier other than {', '.join(FIXED_TABLES)}, "
                             f"got {table!r}")  # fmt: skip
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
                (int(run_id), *(sql_value(value) for value in row))
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
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (str(table),)
            ).fetchone()
        if not exists:
            return pd.DataFrame()
        where, parameters = runs_match(run_id)
        return self._query(f'SELECT * FROM "{table}"{" WHERE " + where if where else ""} ORDER BY rowid', parameters)
