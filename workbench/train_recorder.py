"""What a training run stores in the database: its run, a row per step and per epoch, and extra tables.

Rows are buffered and flushed just before each checkpoint; rows for steps or epochs the run already
holds are dropped, so a resumed run never records a step twice.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from triton_workbench.database import Database, RunKind, RunStatus, SeriesTable
from triton_workbench.workbench.train_config import TrainConfig

log = logging.getLogger("triton_workbench.workbench.train")


class TrainRecorder:
    """Rank 0's database writer: buffers rows and flushes them before each checkpoint, never twice per step."""

    def __init__(self, config: TrainConfig, resumed_run_id: int | None) -> None:
        self.db = Database(config.db_path)
        self.run_id = self._open_run(config, resumed_run_id)
        recorded_steps = self.db.read(SeriesTable.TRAIN_STEPS, self.run_id)
        recorded_epochs = self.db.read(SeriesTable.TRAIN_EPOCHS, self.run_id)
        self.last_step = int(recorded_steps["step"].max()) if len(recorded_steps) else 0
        self.last_epoch = int(recorded_epochs["epoch"].max()) if len(recorded_epochs) else 0
        self._steps: list[dict[str, Any]] = []
        self._epochs: list[dict[str, Any]] = []

    def _open_run(self, config: TrainConfig, resumed_run_id: int | None) -> int:
        """The checkpoint's run when this database holds it, else a new run."""
        runs = self.db.runs()
        if resumed_run_id is not None and len(runs) and resumed_run_id in set(runs["run_id"]):
            log.info("resuming database run %d", resumed_run_id)
            return resumed_run_id
        meta = config.recorded()
        if resumed_run_id is not None:
            meta["resumed_from_run_id"] = resumed_run_id  # the checkpoint's run lives in another database
        name = f"{config.model}-{config.data}-{config.kernels}"
        return self.db.start_run(RunKind.TRAIN, name, meta)

    def step(self, row: dict[str, Any]) -> None:
        if row["step"] > self.last_step:
            self._steps.append(row)

    def epoch(self, row: dict[str, Any]) -> None:
        if row["epoch"] > self.last_epoch:
            self._epochs.append(row)

    def flush(self) -> None:
        if self._steps:
            frame = pd.DataFrame(self._steps)
            self.db.append(SeriesTable.TRAIN_STEPS, self.run_id, frame)
            self.last_step = int(frame["step"].max())
            self._steps.clear()
        if self._epochs:
            self.db.append(SeriesTable.TRAIN_EPOCHS, self.run_id, pd.DataFrame(self._epochs))
            self.last_epoch = max(row["epoch"] for row in self._epochs)
            self._epochs.clear()

    def append(self, table: SeriesTable, frame: pd.DataFrame) -> None:
        """Store `frame` in `table` at once (nothing when empty)."""
        if len(frame):
            self.db.append(table, self.run_id, frame)

    def read(self, table: SeriesTable) -> pd.DataFrame:
        """The rows of `table` this run holds."""
        return self.db.read(table, self.run_id)

    def finish(self, status: RunStatus) -> None:
        self.db.finish_run(self.run_id, status=status)
