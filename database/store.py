"""The workbench database: one SQLite file (WAL) holding the runs of every kind and their per-run series.

It is the source of truth for everything measured, and the one store that autotune, profiler,
reports and the workbench all write to. Safe for several processes at once (WAL, a busy timeout,
every write one short IMMEDIATE transaction) and for interruption: each write is committed as it
happens, so a killed process loses nothing it stored. A run records the process that owns it (pid and
host); a `running` run whose owner is gone from this host is marked `interrupted` the next time the runs
are read or a run is started, and a run that ends with an exception is `failed` with the reason in its meta.

The tables with a fixed schema are created on first use, and a file written by an earlier version
gets the columns added since (`ADDED_COLUMNS`); a subclass adds its own to `SCHEMA`
(`autotune.results.TuningDatabase` adds the tuning trials and best configs). Per-run series
(`append` / `read`) are free-form tables whose columns grow as frames bring new ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import platformdirs

from triton_workbench.database.environment import environment
from triton_workbench.database.names import FINISHED_STATUSES, FIXED_TABLES, RUN_KINDS, RunStatus, Table
from triton_workbench.kernels.errors import UsageError

BUSY_TIMEOUT_MS = 60_000
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


class DatabaseFileError(UsageError):
    """The database file cannot be used: damaged, not a database, a directory, or where it cannot be opened or
    written (a read-only or full disk, a missing permission). The message names the path."""


# SQLite's words for a file it cannot open or write, as opposed to a mistake in a statement
_UNUSABLE_FILE = ("unable to open", "readonly", "disk is full", "disk I/O error")


def default_path() -> Path:
    """$WORKBENCH_DB, else workbench.db in the user's cache directory."""
    override = os.environ.get("WORKBENCH_DB")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("triton-workbench")) / "workbench.db"


def utc_now() -> str:
    """Now as the ISO timestamp (UTC, milliseconds) every stored time uses."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def this_host() -> str:
    """This machine as stored beside a pid: the host name, and the pid namespace where Linux names it
    (containers sharing a host name and a database file do not share pids)."""
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def process_alive(pid: int, since: str | None = None) -> bool:
    """Whether process `pid` of this host still runs (a zombie does not), and when `since` (an ISO time)
    is given, is the process that was already running then rather than a later one given the same pid."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))  # fmt: skip
    except (OSError, IndexError, StopIteration, ValueError):
        return True  # no /proc: the pid exists, which is all that can be told
    if fields[0] in "ZX":  # zombie or dead: killed, not yet reaped by its parent
        return False
    if since is None:
        return True
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= datetime.fromisoformat(since).timestamp() + 1.0  # btime is whole seconds


def seconds_since(stamp: str) -> float:
    """Seconds from an ISO timestamp (as `utc_now` writes) to now."""
    return time.time() - datetime.fromisoformat(stamp).timestamp()


def short_reason(error: BaseException) -> str:
    """An exception as one stored line: its type and message, at most 500 characters."""
    text = f"{type(error).__name__}: {error}".strip().rstrip(":")
    return text if len(text) <= 500 else text[:497] + "..."


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


def _use_wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode (it stays so), unless another connection has. Switching takes an exclusive lock
    and SQLite answers "database is locked" at once, without the busy timeout, to the second of two processes
    opening a new file together: that one waits and looks again, up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Database:
    """A handle on one workbench database file; cheap to create, one connection per process."""

    # the definitions of columns added to a fixed table after files were first written with it: a file
    # that lacks one gets it when opened (and the CREATE statement of a new file has it)
    ADDED_COLUMNS: dict[str, tuple[str, ...]] = {Table.RUNS: ("owner_pid INTEGER", "owner_host TEXT")}
    # CREATE TABLE statement of each fixed-schema table this class writes; subclasses extend it
    SCHEMA: dict[str, str] = {
        Table.RUNS: f"""CREATE TABLE IF NOT EXISTS {Table.RUNS} (
            run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
            status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, meta TEXT, environment TEXT,
            {", ".join(ADDED_COLUMNS[Table.RUNS])})""",
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
            raise DatabaseFileError(f"workbench database {self.path}: its directory {self.path.parent} cannot be "
                                    f"made ({why or error})") from error
        with self._translate_errors():
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                         check_same_thread=False)  # fmt: skip
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")
            if self._schema_changes(connection):  # a new (or older) file: create or add what is missing, once
                connection.execute("BEGIN IMMEDIATE")
                try:
                    for statement in self._schema_changes(connection):  # again: another process may have done it
                        connection.execute(statement)
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
        self._connection, self._pid = connection, os.getpid()
        return connection

    def _schema_changes(self, connection: sqlite3.Connection) -> list[str]:
        """The statements that bring this file's fixed tables to `SCHEMA` (none when it is current)."""
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        statements = [create for table, create in self.SCHEMA.items() if table not in tables]
        for table, definitions in self.ADDED_COLUMNS.items():
            if table in tables:
                have = set(self._columns(connection, table))
                statements += [f'ALTER TABLE "{table}" ADD COLUMN {d}' for d in definitions if d.split()[0] not in have]
        return statements

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as error:
            message = str(error)
            if self.path.is_dir():
                raise DatabaseFileError(f"workbench database {self.path} is a directory: choose a file with --db / "
                                        "$WORKBENCH_DB") from error  # fmt: skip
            if any(words in message for words in ("not a database", "malformed", "corrupt")):
                raise DatabaseFileError(
                    f"workbench database {self.path} is damaged or not a SQLite database ({message}); "
                    "move it away or choose another file with --db / $WORKBENCH_DB"
                ) from error
            if isinstance(error, sqlite3.OperationalError) and any(words in message for words in _UNUSABLE_FILE):
                raise DatabaseFileError(f"workbench database {self.path} cannot be opened or written ({message}); "
                                        "check its disk and permissions, or choose another file with --db / "
                                        "$WORKBENCH_DB") from error  # fmt: skip
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: other writers wait (busy timeout), readers go on (WAL)."""
        with self._lock, self._translate_errors():
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")  # a full disk fails here, in WAL mode: rolled back below
            except BaseException:
                if connection.in_transaction:  # SQLite ends a transaction itself on some errors (a full disk)
                    connection.execute("ROLLBACK")
                raise

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
        """Open a run (status RunStatus.RUNNING) owned by this process; the environment is recorded with it."""
        if kind not in RUN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
        self.interrupt_abandoned_runs()
        with self._write() as connection:
            cursor = connection.execute(
                f"INSERT INTO {Table.RUNS} (kind, name, status, started_at, meta, environment, owner_pid, owner_host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (str(kind), str(name), str(RunStatus.RUNNING), utc_now(), json.dumps(meta or {}, default=str),
                 json.dumps(environment()), os.getpid(), this_host()),
            )  # fmt: skip
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str = RunStatus.DONE, reason: str | None = None) -> None:
        """Close a run with a finished status; `reason` (why it failed or stopped) goes into its meta."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINISHED_STATUSES)}, got {status!r}")
        with self._write() as connection:
            if not self._close_run(connection, run_id, status, reason, utc_now()):
                raise ValueError(f"run_id {run_id} does not exist in {self.path}")

    @staticmethod
    def _close_run(connection: sqlite3.Connection, run_id: int, status: str, reason: str | None,
                   finished_at: str | None, only_if: str | None = None) -> bool:  # fmt: skip
        """Set a run's status, finish time and meta["reason"] (when given); only if its status is `only_if`,
        when given. False if no such run was changed."""
        row = connection.execute(f"SELECT meta, status FROM {Table.RUNS} WHERE run_id = ?", (int(run_id),)).fetchone()
        if row is None or (only_if is not None and row[1] != only_if):
            return False
        meta = json.loads(row[0]) if row[0] else {}
        if reason:
            meta["reason"] = str(reason)
        connection.execute(f"UPDATE {Table.RUNS} SET status = ?, finished_at = ?, meta = ? WHERE run_id = ?",
                           (str(status), finished_at, json.dumps(meta, default=str), int(run_id)))  # fmt: skip
        return True

    @contextmanager
    def run(self, kind: str, name: str, meta: dict | None = None) -> Iterator[int]:
        """A run around a block: yields its id and finishes it done, interrupted (Ctrl-C) or failed (the
        exception, as meta["reason"])."""
        run_id = self.start_run(kind, name, meta)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.finish_run(run_id, RunStatus.INTERRUPTED, "KeyboardInterrupt (Ctrl-C)")
            raise
        except BaseException as error:
            self.finish_run(run_id, RunStatus.FAILED, short_reason(error))
            raise
        self.finish_run(run_id, RunStatus.DONE)

    def interrupt_abandoned_runs(self) -> list[int]:
        """Mark `interrupted` every `running` run whose owner process is gone from this host (killed, or
        crashed before it could say so), with the reason in its meta; returns their ids. Its finish time
        stays unknown (NULL). Runs of other hosts, and of files written before runs had owners, are left."""
        with self._lock, self._translate_errors():
            rows = self._connect().execute(
                f"SELECT run_id, owner_pid, started_at FROM {Table.RUNS} WHERE status = ? AND owner_host = ?",
                (str(RunStatus.RUNNING), this_host()),
            ).fetchall()
        gone = [(run_id, pid) for run_id, pid, started in rows if pid is not None and not process_alive(pid, started)]
        if gone:
            with self._write() as connection:
                for run_id, pid in gone:
                    self._close_run(connection, run_id, RunStatus.INTERRUPTED,
                                    f"its process (pid {pid}) ended without finishing it: killed, or crashed", None,
                                    only_if=RunStatus.RUNNING)  # fmt: skip
        return [run_id for run_id, _ in gone]

    def runs(self) -> pd.DataFrame:
        """Every run (runs whose process is gone from this host are marked interrupted first)."""
        self.interrupt_abandoned_runs()
        frame = self._query(f"SELECT run_id, kind, name, status, started_at, finished_at, meta, environment, "
                            f"owner_pid, owner_host FROM {Table.RUNS}")  # fmt: skip
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
