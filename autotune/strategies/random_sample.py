"""Random search: valid configs uniformly at random, without replacement."""

from __future__ import annotations

from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies.base import Strategy
from triton_workbench.autotune.strategies.options import StrategyOptions


class RandomSample(Strategy):
    name = "random"

    def __init__(self, space: Space, seed: int = 0, options: StrategyOptions | None = None):
        super().__init__(space, seed, options)
        self._order = iter(self.rng.permutation(space.size).tolist())

    def _next_row(self) -> int | None:
        return next(self._order)
