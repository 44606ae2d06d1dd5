"""The kernels' tuned configs from the workbench database, installed with `use_database`.

A kernel launch asks `kernels.tuned.config_for`, which asks the one installed `ConfigSource`;
this module provides the database-backed source. Importing it (or any package) installs nothing.
It is installed explicitly, by:

- the `workbench` command line, before each command: the command's database (`--db`, else
  $WORKBENCH_DB, else the user cache), so every command's kernels use what that database holds;
- `autotune.tune`, once it has stored a best config: the database it stored into, so launches
  later in the same process use what was just tuned;
- a library user: `use_database(path)`, or `use_database()` for the default database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.database import Database
from triton_workbench.kernels import tuned
from triton_workbench.kernels.spec import Config, KernelSpec, Problem


@dataclass(frozen=True)
class DatabaseConfigSource:
    """A `kernels.tuned.ConfigSource`: the best config stored in one database file (`TuningDatabase.lookup_best`).

    A file that does not exist gives None and is not created; errors (a damaged file) propagate, and
    `kernels.tuned` turns them into a warning and the kernel's default config.
    """

    path: Path

    def __call__(self, spec: KernelSpec, problem: Problem) -> Config | None:
        if not self.path.exists():
            return None
        database = TuningDatabase(self.path)
        try:
            return database.lookup_best(spec, problem)
        finally:
            database.close()


def use_database(db: Database | str | os.PathLike | None = None) -> DatabaseConfigSource:
    """Make the kernels launch with the best configs stored in `db` (default: $WORKBENCH_DB, else the user
    cache, resolved now) for the rest of this process, or until another source is installed; returns it."""
    path = db.path if isinstance(db, Database) else Database(db).path
    source = DatabaseConfigSource(path)
    tuned.install_config_source(source)
    return source
