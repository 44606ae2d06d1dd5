"""Search strategies behind one ask/tell interface (see `base.Strategy`), made by name."""

from __future__ import annotations

from typing import Any, Mapping

from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies.base import Strategy
from triton_workbench.autotune.strategies.exhaustive import Exhaustive
from triton_workbench.autotune.strategies.forest import ForestOptions, ForestSearch
from triton_workbench.autotune.strategies.options import StrategyOptions, parse_assignments, parse_options
from triton_workbench.autotune.strategies.random_sample import RandomSample
from triton_workbench.kernels.errors import UsageError

STRATEGIES: dict[str, type[Strategy]] = {
    "exhaustive": Exhaustive,
    "random": RandomSample,
    "forest": ForestSearch,
    "auto": ForestSearch,  # the best strategy here; see autotune/strategies/forest.py for why
}


def _strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise UsageError(f"name: unknown strategy {name!r}, expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def strategy_options(name: str, options: Mapping[str, Any] | None = None) -> StrategyOptions | None:
    """The options record strategy `name` would run with given `options` (None if it has none): what
    `make_strategy` checks, callable ahead of it. UsageError (a ValueError) for an unknown strategy, option or value."""
    return parse_options(name, _strategy_class(name).options_type, options)


def make_strategy(name: str, space: Space, seed: int = 0, **options: Any) -> Strategy:
    """A strategy by name ("auto" is the default choice): `ask()` configs, `tell(config, value)` results.

    `options` set the strategy's declared hyperparameters (`auto`/`forest`: `ForestOptions`), as
    Kernel Tuner's strategy_options; strategies without any reject every option.
    """
    return _strategy_class(name)(space, seed=seed, options=strategy_options(name, options))


def options_summary() -> str:
    """One line per strategy with options: its option names and defaults (for help texts)."""
    names: dict[type[Strategy], list[str]] = {}
    for name, strategy in STRATEGIES.items():
        if strategy.options_type is not None:
            names.setdefault(strategy, []).append(name)
    return "; ".join("/".join(aliases) + ": " + ", ".join(f"{option}={default}" for option, default, _ in
                                                           strategy.options_type.documentation())
                     for strategy, aliases in names.items())


__all__ = ["STRATEGIES", "ForestOptions", "Strategy", "StrategyOptions", "make_strategy", "options_summary",
           "parse_assignments", "strategy_options"]
