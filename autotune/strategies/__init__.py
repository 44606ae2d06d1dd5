"""Search strategies behind one ask/tell interface (see `base.Strategy`), made by name."""

from __future__ import annotations

from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies.base import Strategy
from triton_workbench.autotune.strategies.exhaustive import Exhaustive
from triton_workbench.autotune.strategies.forest import ForestSearch
from triton_workbench.autotune.strategies.random_sample import RandomSample

STRATEGIES: dict[str, type[Strategy]] = {
    "exhaustive": Exhaustive,
    "random": RandomSample,
    "forest": ForestSearch,
    "auto": ForestSearch,  # the best strategy here; see autotune/strategies/forest.py for why
}


def make_strategy(name: str, space: Space, seed: int = 0) -> Strategy:
    """A strategy by name ("auto" is the default choice): `ask()` configs, `tell(config, value)` results."""
    if name not in STRATEGIES:
        raise ValueError(f"name: unknown strategy {name!r}, expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](space, seed=seed)


__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
