"""`Space`: the configs a strategy may try, i.e. tunable parameters, candidate values and constraints.

A config is a dict parameter -> value. Valid configs are enumerated once, lazily, into `table`: an
integer array with one row per valid config and one column per parameter holding the index of the
config's value in that parameter's candidate list. Strategies work on rows (cheap, vectorised) and
hand out dicts.
"""

from __future__ import annotations

import itertools
import math
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

Config = dict[str, Any]


class Space:
    """Cartesian product of candidate values, filtered by constraints (each `config -> bool`)."""

    def __init__(self, params: Mapping[str, Sequence[Any]], constraints: Sequence[Callable[[Config], bool]] = ()):
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"params: expected a non-empty dict of parameter -> list of values, got {params!r}")
        for name, values in params.items():
            if not isinstance(name, str):
                raise ValueError(f"params: parameter names must be strings, got {name!r}")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"params: {name!r} needs a non-empty list of values, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"params: {name!r} has duplicate values {list(values)!r}")
        if isinstance(constraints, Callable) or not all(callable(c) for c in constraints):
            raise ValueError(f"constraints: expected a list of callables config -> bool, got {constraints!r}")
        self.params: dict[str, list[Any]] = {name: list(values) for name, values in params.items()}
        self.constraints: list[Callable[[Config], bool]] = list(constraints)
        self.names: list[str] = list(self.params)
        self._value_index = [{repr(v): i for i, v in enumerate(values)} for values in self.params.values()]

    @classmethod
    def from_spec(cls, spec: Any, problem: Mapping[str, Any],
                  extra_params: Mapping[str, Sequence[Any]] | None = None) -> "Space":  # fmt: skip
        """The space of a `KernelSpec` for one problem: its params, constraints bound to the problem, and
        `extra_params` beside them (device knobs, which the kernel's constraints do not look at)."""
        if not hasattr(spec, "params") or not hasattr(spec, "constraints"):
            raise ValueError(f"spec: expected a KernelSpec, got {type(spec).__name__}")
        if not isinstance(problem, Mapping):
            raise ValueError(f"problem: expected a dict, got {type(problem).__name__}")
        clash = set(extra_params or {}) & set(spec.params)
        if clash:
            raise ValueError(f"extra_params: {sorted(clash)} are already parameters of {spec.name}")
        bound = [lambda config, c=constraint: c(config, problem) for constraint in spec.constraints]
        return cls({**spec.params, **(extra_params or {})}, bound)

    @property
    def cardinality(self) -> int:
        """Number of configs before constraints."""
        return math.prod(len(values) for values in self.params.values())

    @cached_property
    def table(self) -> np.ndarray:
        """Value indices of every valid config, one row per config, in lexicographic order."""
        rows = [
            indices
            for indices in itertools.product(*(range(len(v)) for v in self.params.values()))
            if self._satisfies(self._config(indices))
        ]
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(self.names))

    @cached_property
    def _codes(self) -> np.ndarray:
        """Each valid config's position in the full product (ascending: `table` is in lexicographic order)."""
        return np.ravel_multi_index(self.table.T, self._shape) if self.size else np.zeros(0, dtype=np.int64)

    @property
    def _shape(self) -> list[int]:
        return [len(values) for values in self.params.values()]

    def rows_of(self, indices: np.ndarray) -> np.ndarray:
        """Rows of `table` holding the value indices of each row of `indices`; -1 where that config is not valid."""
        codes = np.ravel_multi_index(np.asarray(indices).T, self._shape)
        if not self.size:
            return np.full(len(codes), -1)
        rows = np.minimum(np.searchsorted(self._codes, codes), self.size - 1)
        return np.where(self._codes[rows] == codes, rows, -1)

    @property
    def size(self) -> int:
        """Number of valid configs."""
        return len(self.table)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Config]:
        return (self.config(row) for row in range(self.size))

    def __repr__(self) -> str:
        return f"Space({len(self.names)} params, {self.cardinality} configs, constraints={len(self.constraints)})"

    def _config(self, indices: Sequence[int]) -> Config:
        return {name: self.params[name][i] for name, i in zip(self.names, indices)}

    def _satisfies(self, config: Config) -> bool:
        return all(constraint(config) for constraint in self.constraints)

    def config(self, row: int) -> Config:
        """The config in row `row` of `table`."""
        return self._config(self.table[row])

    def row(self, config: Mapping[str, Any]) -> int | None:
        """The row of a valid config in `table`, None if it is not a valid config of this space."""
        indices = self._indices(config)
        row = -1 if indices is None else int(self.rows_of([indices])[0])
        return None if row < 0 else row

    def _indices(self, config: Mapping[str, Any]) -> tuple[int, ...] | None:
        if not isinstance(config, Mapping) or set(config) != set(self.names):
            return None
        indices = tuple(lookup.get(repr(config[name])) for name, lookup in zip(self.names, self._value_index))
        return None if None in indices else indices

    def is_valid(self, config: Mapping[str, Any]) -> bool:
        """Whether `config` names every parameter with a candidate value and meets every constraint."""
        indices = self._indices(config)
        return indices is not None and self._satisfies(self._config(indices))

    def sample(self, n: int, seed: int | np.random.Generator | None = None) -> list[Config]:
        """`n` distinct valid configs drawn uniformly at random (fewer if the space is smaller)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        rng = np.random.default_rng(seed)
        rows = rng.choice(self.size, size=min(n, self.size), replace=False)
        return [self.config(row) for row in rows]

    def neighbour_rows(self, row: int, method: str = "adjacent") -> np.ndarray:
        """Rows of the valid neighbours of a row: configs differing in exactly one parameter.

        method "adjacent": that parameter moves to the next lower or higher candidate value;
        "hamming": it takes any other candidate value.
        """
        if method not in ("adjacent", "hamming"):
            raise ValueError(f"method: expected 'adjacent' or 'hamming', got {method!r}")
        if method == "adjacent":  # index steps summing to 1: one parameter, one position
            return np.flatnonzero(np.abs(self.table - self.table[row]).sum(axis=1) == 1)
        return np.flatnonzero(self.hamming_distances(row) == 1)

    def hamming_distances(self, row: int) -> np.ndarray:
        """For every valid config, the number of parameters in which it differs from row `row`."""
        return np.count_nonzero(self.table != self.table[row], axis=1)

    @cached_property
    def positions(self) -> np.ndarray:
        """`table` scaled to [0, 1] per parameter (value index / (number of values - 1)): a geometry in
        which every parameter spans the same range, for spreading configs out."""
        last = np.array([max(len(values) - 1, 1) for values in self.params.values()], dtype=float)
        return self.table / last

    def neighbours(self, config: Mapping[str, Any], method: str = "adjacent") -> list[Config]:
        """Valid neighbours of a valid config (see `neighbour_rows`)."""
        row = self.row(config)
        if row is None:
            raise ValueError(f"config: {dict(config)!r} is not a valid config of {self!r}")
        return [self.config(r) for r in self.neighbour_rows(row, method)]
