"""Declared strategy options, as Kernel Tuner's `strategy_options`: each strategy that has
hyperparameters declares them as a frozen dataclass deriving from `StrategyOptions`, one `option(...)`
field each, with its default, its documentation and its range. Values are checked when the record is
made; names are checked by `parse_options`, which also reads the strings of the command line
(`workbench tune --strategy-option KEY=VALUE`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import numpy as np

from triton_workbench.kernels.errors import UsageError

_KINDS = {bool: "a boolean", int: "an integer", float: "a number"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option(default: bool | int | float, doc: str, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A field of a `StrategyOptions` dataclass: its default (whose type is the option's type), what it
    does, and the least and greatest values it may take."""
    return dataclasses.field(default=default, metadata={"doc": doc, "minimum": minimum, "maximum": maximum})


def expected(field: dataclasses.Field) -> str:
    """What an option accepts, in words: 'an integer >= 1', 'a number >= 0.01 and <= 1'."""
    bounds = [f"{word} {field.metadata.get(key):g}" for key, word in (("minimum", ">="), ("maximum", "<="))
              if field.metadata.get(key) is not None]
    return " ".join([_KINDS[type(field.default)], " and ".join(bounds)]).strip()


def _accepts(field: dataclasses.Field, value: Any) -> bool:
    kind, minimum, maximum = type(field.default), field.metadata.get("minimum"), field.metadata.get("maximum")
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    numbers = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers):
        return False
    return math.isfinite(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


@dataclasses.dataclass(frozen=True)
class StrategyOptions:
    """Base of every strategy's options record: checks each value against its field."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _accepts(field, value):
                raise UsageError(f"strategy option {field.name}: expected {expected(field)}, got {value!r}")
            object.__setattr__(self, field.name, type(field.default)(value))  # numpy scalars, ints for floats

    @classmethod
    def documentation(cls) -> list[tuple[str, Any, str]]:
        """(name, default, doc) of every option, in declaration order."""
        return [(field.name, field.default, field.metadata["doc"]) for field in dataclasses.fields(cls)]


def _from_text(field: dataclasses.Field, text: str) -> Any:
    """A command-line string as the option's type; the string itself when it is not one (rejected later)."""
    kind, word = type(field.default), text.strip().lower()
    if kind is bool:
        return True if word in _TRUE else False if word in _FALSE else text
    try:
        return kind(word)
    except ValueError:
        return text


def parse_options(strategy: str, options_type: type[StrategyOptions] | None,
                  values: Mapping[str, Any] | None) -> StrategyOptions | None:  # fmt: skip
    """The options record of strategy `strategy` (named in messages) with `values` set, the rest default;
    None for a strategy without options. Strings are read as the option's type (the command line's
    KEY=VALUE). UsageError (a ValueError) naming the option, and listing the valid ones, for an unknown name or a bad
    value; for any option at all given to a strategy that has none."""
    values = dict(values or {})
    if options_type is None:
        if values:
            raise UsageError(f"strategy {strategy!r} takes no options, got {', '.join(sorted(values))}")
        return None
    fields = {field.name: field for field in dataclasses.fields(options_type)}
    for name, value in values.items():
        if name not in fields:
            raise UsageError(f"strategy {strategy!r} has no option {name!r}; its options are {', '.join(fields)}")
        if isinstance(value, str):
            values[name] = _from_text(fields[name], value)
    return options_type(**values)


def parse_assignments(items: Iterable[str], flag: str = "--strategy-option") -> dict[str, str]:
    """['trees=8', 'local_radius=1'] -> {'trees': '8', 'local_radius': '1'}: the KEY=VALUE arguments of a
    repeatable command-line flag. UsageError naming `flag` when one is malformed or a key repeats."""
    assignments: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
        if key in assignments:
            raise UsageError(f"{flag}: {key} is given twice")
        assignments[key] = value.strip()
    return assignments
