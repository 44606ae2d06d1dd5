"""The ask/tell interface every strategy implements.

`ask()` hands out a valid config never handed out before (None once the space is exhausted);
`tell(config, value)` reports its objective (lower is better; math.inf for a failed config). Several
configs may be asked before any is told, and results may be told in any order: strategies treat asked
but untold configs as pending.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from triton_workbench.autotune.space import Config, Space
from triton_workbench.autotune.strategies.options import StrategyOptions


class Strategy(ABC):
    """Bookkeeping shared by all strategies; subclasses choose the next row of `space.table`.

    A strategy with hyperparameters declares them as `options_type` (a `StrategyOptions` dataclass) and
    reads them from `self.options`; one without leaves it None and takes no options.
    """

    name: str = ""
    options_type: type[StrategyOptions] | None = None

    def __init__(self, space: Space, seed: int = 0, options: StrategyOptions | None = None):
        if not isinstance(space, Space):
            raise ValueError(f"space: expected an autotune.Space, got {type(space).__name__}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        if self.options_type is None and options is not None:
            raise ValueError(f"options: strategy {self.name!r} takes no options, got {options!r}")
        if self.options_type is not None and not isinstance(options, (self.options_type, type(None))):
            raise ValueError(f"options: expected a {self.options_type.__name__}, got {options!r}")
        if options is None and self.options_type is not None:
            options = self.options_type()  # the defaults
        self.options = options
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.asked = np.zeros(space.size, dtype=bool)
        self.pending: set[int] = set()
        self.observed_rows: list[int] = []
        self.observed_values: list[float] = []
        self.queued: list[int] = []  # rows to ask before the strategy chooses (see `enqueue`)
        self.enqueued: set[int] = set()  # every row ever enqueued: a strategy's own order may reach it later

    def enqueue(self, config: Mapping[str, Any]) -> bool:
        """Ask `config` before anything the strategy would choose (a known-good default, say), like
        optuna's enqueue_trial. False if it is not a valid config of the space or was already asked."""
        row = self.space.row(config)
        if row is None or self.asked[row] or row in self.queued:
            return False
        self.queued.append(row)
        self.enqueued.add(row)
        return True

    def ask(self) -> Config | None:
        """The next config to evaluate, or None when every valid config has been asked."""
        if self.asked.all():
            return None
        row = self.queued.pop(0) if self.queued else self._next_row()
        while row is not None and self.asked[row] and row in self.enqueued:
            row = self._next_row()
        if row is None:
            return None
        if self.asked[row]:
            raise RuntimeError(f"{type(self).__name__} proposed row {row} twice")
        self.asked[row] = True
        self.pending.add(row)
        return self.space.config(row)

    def tell(self, config: Mapping[str, Any], value: float) -> None:
        """Report the objective of an asked config (lower is better, math.inf if it failed)."""
        row = self.space.row(config)
        if row is None or row not in self.pending:
            raise ValueError(f"config: {dict(config)!r} was not asked, or was already told")
        if not isinstance(value, (int, float, np.floating, np.integer)) or math.isnan(value):
            raise ValueError(f"value: expected a number or math.inf, got {value!r}")
        self.pending.discard(row)
        self.observed_rows.append(row)
        self.observed_values.append(float(value))
        self._observe(row, float(value))

    @abstractmethod
    def _next_row(self) -> int | None:
        """An unasked row of `space.table` (at least one exists when this is called)."""

    def _observe(self, row: int, value: float) -> None:
        """Hook for strategies that learn from results."""

    def _unasked_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.asked)
