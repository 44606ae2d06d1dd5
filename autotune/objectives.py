"""What a sweep minimises: time, energy, EDP, or a constrained objective; and the time/energy Pareto front.

Objectives are named by text, as `workbench tune --objective` takes them:
- "time" (ms per call), "energy" (J per call), "edp" (energy x delay, J*s);
- "time:power<=P": the fastest config whose average power during its trial was at most P W;
- "energy:time<=X%": the least energy among configs within X % of the fastest correct time.

A trial's value (`Objective.value`) is what a strategy is told while it searches; inf means unusable (a
failed trial, one without energy for an energy objective, one over the power cap). The within-X% objective
depends on every trial (the fastest one), so a strategy searches it by energy and the winner is picked
from all stored trials by `Objective.values`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from triton_workbench.database import TrialStatus

OBJECTIVES = ("time", "energy", "edp")
UNITS = {"time": "ms", "energy": "J", "edp": "J*s"}
_POWER_CAP = re.compile(r"time:power<=(\d+(?:\.\d*)?)")
_TIME_SLACK = re.compile(r"energy:time<=(\d+(?:\.\d*)?)%")
OBJECTIVE_FORMS = "time, energy, edp, time:power<=WATTS or energy:time<=PERCENT%"


def objective_value(objective: str, time_ms: float, energy_j_per_call: float, status: str = TrialStatus.OK) -> float:
    """The number a sweep minimises for a plain objective: time_ms, energy_j_per_call, or energy x delay (J*s);
    inf unless the trial is ok and has it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if status != TrialStatus.OK:
        return math.inf
    value = {"time": time_ms, "energy": energy_j_per_call, "edp": energy_j_per_call * time_ms / 1e3}[objective]
    return math.inf if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class Objective:
    """A parsed objective: the plain one it minimises (`base`) and its constraint, if any."""

    name: str
    base: str
    max_power_w: float | None = None  # time:power<=P
    time_slack: float | None = None  # energy:time<=X%: X / 100

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """The objective named by `text` (ValueError naming the forms otherwise)."""
        if not isinstance(text, str):
            raise ValueError(f"objective must be one of {OBJECTIVE_FORMS}, got {text!r}")
        if text in OBJECTIVES:
            return cls(text, text)
        if match := _POWER_CAP.fullmatch(text):
            if float(match[1]) <= 0:
                raise ValueError(f"objective {text!r}: the power cap must be positive")
            return cls(text, "time", max_power_w=float(match[1]))
        if match := _TIME_SLACK.fullmatch(text):
            return cls(text, "energy", time_slack=float(match[1]) / 100)
        raise ValueError(f"objective must be one of {OBJECTIVE_FORMS}, got {text!r}")

    @property
    def needs_energy(self) -> bool:
        """Whether trials need an energy meter (energy or power) to be ranked."""
        return self.base != "time" or self.max_power_w is not None

    @property
    def unit(self) -> str:
        return UNITS[self.base]

    def value(self, time_ms: float, energy_j_per_call: float, *, avg_power_w: float = math.nan,
              status: str = TrialStatus.OK) -> float:  # fmt: skip
        """One trial's value as a strategy sees it (the time slack is applied over all trials by `values`)."""
        if self.max_power_w is not None and not avg_power_w <= self.max_power_w:  # NaN power: unknown, unusable
            return math.inf
        return objective_value(self.base, time_ms, energy_j_per_call, status)

    def row_values(self, trials: pd.DataFrame) -> pd.Series:
        """`value` of each trial (columns status, time_ms, energy_j_per_call and, if there, avg_power_w)."""
        power = trials["avg_power_w"] if "avg_power_w" in trials else pd.Series(math.nan, index=trials.index)
        return pd.Series([self.value(t, e, avg_power_w=p, status=s) for t, e, p, s in
                          zip(trials["time_ms"], trials["energy_j_per_call"], power, trials["status"])],
                         index=trials.index, dtype=float)  # fmt: skip

    def values(self, trials: pd.DataFrame) -> pd.Series:
        """Every trial's value for choosing the winner (`row_values`); for energy:time<=X%, trials slower than
        (1 + X) x the fastest ok time among `trials` are inf."""
        values = self.row_values(trials)
        if self.time_slack is not None:
            ok = trials.loc[trials["status"] == TrialStatus.OK, "time_ms"].dropna()
            fastest = ok.min() if len(ok) else math.nan
            values[~(trials["time_ms"] <= (1 + self.time_slack) * fastest)] = math.inf
        return values


def pareto_front(times: pd.Series, energies: pd.Series) -> pd.Index:
    """Index of the points no other point beats in both time and energy (lower is better), fastest first."""
    order = pd.DataFrame({"t": times, "e": energies}).dropna().sort_values(["t", "e"])
    front, lowest = [], np.inf
    for index, energy in zip(order.index, order["e"]):
        if energy < lowest:
            front.append(index)
            lowest = energy
    return pd.Index(front)
