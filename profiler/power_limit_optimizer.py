"""A training job's power limit, chosen from a few profiled steps at each candidate (Zeus-style).

Zeus's GlobalPowerLimitOptimizer profiles a job at each power limit and keeps the one minimising

    cost = eta * energy + (1 - eta) * max_power * time

per unit of work (here: per step). eta = 1 minimises energy alone, eta = 0 time alone; max_power (the
highest candidate limit) turns time into joules so the two terms are comparable. The optimiser is pure
logic: the caller sets the limit it asks for before each step (`limit_for_step`) and reports each step's
time and energy (`observe`). Steps are profiled from the highest limit down, after `warmup_steps`
(compilation, caches and clocks settling are not the limit's doing) and, at each limit, after `settle_steps`
(the clocks and power take a moment to follow a new limit); once every limit has `steps_per_limit` profiled
steps the cheapest one is chosen and held for the rest of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LimitProfile:
    """What the steps profiled at one power limit measured, per step, and their cost."""

    power_limit_w: float
    steps: int
    time_s: float
    energy_j: float
    avg_power_w: float
    cost: float


@dataclass(frozen=True)
class PowerLimitChoice:
    """The limit held for the rest of the run, the trade-off it was chosen for, and every limit's profile."""

    power_limit_w: float
    eta: float
    max_power_w: float
    profile: tuple[LimitProfile, ...]


def step_cost(eta: float, max_power_w: float, time_s: float, energy_j: float) -> float:
    """Zeus's cost of one step: eta * energy + (1 - eta) * max_power * time (joules)."""
    return eta * energy_j + (1 - eta) * max_power_w * time_s


class PowerLimitOptimizer:
    """Profiles each of `limits_w` for `steps_per_limit` steps (after `warmup_steps`, and `settle_steps` at each
    limit), then holds the cheapest."""

    def __init__(self, limits_w: list[float], eta: float = 0.5, warmup_steps: int = 2, steps_per_limit: int = 3,
                 settle_steps: int = 1):  # fmt: skip
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if not limits_w or any(not isinstance(w, (int, float)) or not w > 0 for w in limits_w):
            raise ValueError(f"limits_w must be a non-empty list of positive watts, got {limits_w!r}")
        for name, value, least in (("warmup_steps", warmup_steps, 0), ("steps_per_limit", steps_per_limit, 1),
                                   ("settle_steps", settle_steps, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.limits_w = sorted(set(limits_w), reverse=True)
        self.eta, self.steps_per_limit = float(eta), steps_per_limit
        self.max_power_w = float(self.limits_w[0])
        # each step's limit and whether it is profiled: warm-up at the highest, then per limit settle and profile
        self._schedule = [(self.limits_w[0], False)] * warmup_steps
        for limit_w in self.limits_w:
            self._schedule += [(limit_w, False)] * settle_steps + [(limit_w, True)] * steps_per_limit
        self._seen = 0  # steps observed
        self._measured: dict[float, list[tuple[float, float]]] = {w: [] for w in self.limits_w}
        self.choice: PowerLimitChoice | None = None

    def limit_for_step(self) -> float:
        """The power limit the next step runs at: the highest during warm-up, then each in turn, then the choice."""
        if self.choice is not None:
            return self.choice.power_limit_w
        return self._schedule[self._seen][0]

    def observe(self, time_s: float, energy_j: float) -> PowerLimitChoice | None:
        """Take the step just run (at `limit_for_step()`'s limit); returns the choice on the step that makes it."""
        if self.choice is not None:
            return None
        limit_w, profiled = self._schedule[self._seen]
        self._seen += 1
        if profiled:
            if math.isnan(energy_j) or math.isnan(time_s):
                raise ValueError("a profiled step needs its time and energy (NVML gave none)")
            self._measured[limit_w].append((float(time_s), float(energy_j)))
        if self._seen < len(self._schedule):
            return None
        profile = tuple(self._profile(w) for w in self.limits_w)
        chosen = min(profile, key=lambda p: (p.cost, -p.power_limit_w))  # a tie keeps the higher limit
        self.choice = PowerLimitChoice(chosen.power_limit_w, self.eta, self.max_power_w, profile)
        return self.choice

    def _profile(self, limit_w: float) -> LimitProfile:
        steps = self._measured[limit_w]
        time_s = sum(t for t, _ in steps) / len(steps)
        energy_j = sum(e for _, e in steps) / len(steps)
        return LimitProfile(limit_w, len(steps), time_s, energy_j, energy_j / time_s if time_s > 0 else math.nan,
                            step_cost(self.eta, self.max_power_w, time_s, energy_j))  # fmt: skip
