"""The workbench database: runs of every kind and their per-run series, in one SQLite file.

    from triton_workbench.database import Database, RunKind, SeriesTable
    db = Database()  # $WORKBENCH_DB, else the user cache
    with db.run(RunKind.MONITOR, "my command") as run_id:
        db.append(SeriesTable.SAMPLES, run_id, frame)

It sits below autotune and profiler (they, reports and the workbench all store here) and imports
none of them, only `kernels.runtime` (GPU or interpreter, for the device key of `environment`).
The tuning trials and best configs build on it in `autotune.results.TuningDatabase`.
"""

from triton_workbench.database.names import (FINISHED_STATUSES, FIXED_TABLES, RUN_KINDS, RUN_STATUSES, SERIES_TABLES,
                                             TRIAL_STATUSES, RunKind, RunStatus, SeriesTable, Table, TrialStatus)
from triton_workbench.database.store import Database, DatabaseFileError, default_path

__all__ = [
    "FINISHED_STATUSES", "FIXED_TABLES", "RUN_KINDS", "RUN_STATUSES", "SERIES_TABLES", "TRIAL_STATUSES",
    "Database", "DatabaseFileError", "RunKind", "RunStatus", "SeriesTable", "Table", "TrialStatus", "default_path",
]  # fmt: skip
