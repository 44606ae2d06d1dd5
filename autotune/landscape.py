"""Recorded tuning landscapes: Kernel Tuner cache files (JSON, optionally gzipped) or DataFrames.

A cache file holds `tune_params` (parameter -> candidate values), `tune_params_keys` (their order)
and `cache`: one entry per measured config with the parameter values and `time`, a number, or a
string such as "RuntimeFailedConfig" for a config that failed. Configs of `tune_params` that are not
in the cache are invalid (Kernel Tuner's restrictions removed them), so the landscape's space has the
constraint "is in the cache", exactly as Kernel Tuner's `tune_cache` infers it.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from triton_workbench.autotune.space import Config, Space
from triton_workbench.kernels.errors import UsageError


@dataclass(frozen=True)
class Landscape:
    """Objective (time; math.inf for a failed config) of every recorded config of one kernel on one GPU."""

    name: str
    params: dict[str, list[Any]]
    values: dict[tuple, float]  # parameter values in `params` order -> time

    @property
    def optimum(self) -> float:
        """The best recorded value (used only to score a finished search, never by a strategy)."""
        return min(self.values.values())

    @cached_property
    def space(self) -> Space:
        """The recorded configs as a Space, built once: every replay of this landscape shares it."""
        recorded = self.values
        names = list(self.params)
        return Space(self.params, [lambda config: tuple(config[n] for n in names) in recorded])

    def value(self, config: Config) -> float:
        return self.values[tuple(config[name] for name in self.params)]


def _time(entry_time: Any) -> float:
    return float(entry_time) if isinstance(entry_time, (int, float)) and not isinstance(entry_time, bool) else math.inf


def load_landscape(source: str | Path | pd.DataFrame, name: str | None = None) -> Landscape:
    """A landscape from a Kernel Tuner cache file, or from a frame of parameter columns plus `time`."""
    if isinstance(source, pd.DataFrame):
        if "time" not in source.columns or len(source.columns) < 2 or source.empty:
            raise UsageError("path_or_frame: a frame needs parameter columns, a 'time' column and at least one row")
        names = [c for c in source.columns if c != "time"]
        params = {n: sorted(source[n].unique().tolist()) for n in names}
        values = {tuple(row[:-1]): _time(row[-1]) for row in source[names + ["time"]].itertuples(index=False)}
        return Landscape(name or "frame", params, values)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"path_or_frame: expected a path or a DataFrame, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"path_or_frame: no such file {path}")
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as handle:
        data = json.load(handle)
    missing = {"tune_params", "tune_params_keys", "cache"} - set(data)
    if missing:
        raise UsageError(f"path_or_frame: {path} is not a Kernel Tuner cache file (missing {sorted(missing)})")
    names = list(data["tune_params_keys"])
    params = {n: list(data["tune_params"][n]) for n in names}
    values = {tuple(entry[n] for n in names): _time(entry["time"]) for entry in data["cache"].values()}
    return Landscape(name or path.name.split(".json")[0], params, values)
