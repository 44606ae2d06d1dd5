"""Replay a strategy on a recorded landscape: a tuning run with looked-up instead of measured times."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from triton_workbench.autotune.landscape import Landscape, load_landscape
from triton_workbench.autotune.strategies import make_strategy


def replay(
    path_or_frame: str | Path | pd.DataFrame | Landscape, strategy: str = "auto", budget: int = 100, seed: int = 0,
    strategy_options: Mapping[str, Any] | None = None, batch: int = 1,
) -> pd.DataFrame:
    """The trajectory of `strategy` on a recorded landscape: one row per config visited, in order.

    Columns: the parameters, `value` (the recorded time; inf for a failed config) and `best_value`
    (the best so far). Budget counting matches Kernel Tuner's simulation mode: each first visit of a
    recorded config costs one evaluation, failed ones included; configs absent from the recording are
    invalid (the space's constraint excludes them), so they are never asked and cost nothing.
    The run stops after `budget` evaluations or when every recorded config has been visited.
    `strategy_options`: the strategy's hyperparameters by name (see `make_strategy`). `batch`: configs
    asked before any of them is told, as `tune` asks a batch to compile ahead of its measurement.
    """
    for name, count in (("budget", budget), ("batch", batch)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{name}: expected a positive int, got {count!r}")
    landscape = path_or_frame if isinstance(path_or_frame, Landscape) else load_landscape(path_or_frame)
    search = make_strategy(strategy, landscape.space, seed=seed, **(strategy_options or {}))
    rows = []
    while len(rows) < budget:
        asked = [config for _ in range(min(batch, budget - len(rows))) if (config := search.ask()) is not None]
        if not asked:
            break
        for config in asked:
            value = landscape.value(config)
            search.tell(config, value)
            rows.append({**config, "value": value})
    trajectory = pd.DataFrame(rows, columns=[*landscape.params, "value"])
    trajectory["best_value"] = np.minimum.accumulate(trajectory["value"].to_numpy(dtype=float))
    return trajectory
