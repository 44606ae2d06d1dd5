"""Synthetic tuning landscapes that stress the ways a search strategy fails on real kernels.

Each landscape is a GPU-kernel-like response over parameters with power-of-two style values:
log(time) is a sum of per-parameter terms (a preferred value position each) plus pairwise
interactions (log-additive, i.e. multiplicative in time: "threads = block_x * block_y should be near
256"), then shaped by one stress:

- many_params:  twelve parameters, most of them weakly relevant, several interactions.
- needle:       coarse plateaus (time rounded to a few levels) and one config 30% faster than the best
                plateau, in a narrow basin: 10% faster one parameter change away, level two away.
- invalid:      70% of the grid invalid (a resource budget over several parameters, as shared memory
                or registers limit real kernels) and 10% of the valid configs failing at run time
                next to that boundary.
- interactions: strong multiplicative interactions, so one parameter's best value depends on others
                and no single change improves towards the optimum.
- noisy:        a moderately structured response measured with 5% log-normal noise per config.

Landscapes are deterministic in (kind, seed), so a comparison can be rerun exactly, and can be written
as Kernel Tuner cache files (`write_cache_file`) for Kernel Tuner's strategies to replay the same data.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triton_workbench.autotune.landscape import Landscape
from triton_workbench.kernels.errors import UsageError


@dataclass(frozen=True)
class Stress:
    """The shape of one synthetic kind: value counts per parameter and how the response is distorted."""

    values: tuple[int, ...]  # candidate values per parameter
    relevant: float = 1.0  # fraction of parameters with a sizeable main effect
    interactions: int = 2  # pairwise interaction terms
    interaction_weight: float = 0.3  # their weight relative to the main effects
    invalid: float = 0.0  # fraction of the grid removed by a resource budget
    failed: float = 0.0  # fraction of valid configs that fail, nearest the budget's edge
    plateau_levels: int = 0  # round log(time) to this many levels (0: no rounding)
    needle: bool = False  # one config 30% faster than the best plateau, in a narrow basin
    noise: float = 0.0  # sigma of log-normal measurement noise


SUITE: dict[str, Stress] = {
    "many_params": Stress(values=(2, 2, 2, 2, 3, 2, 3, 2, 2, 2, 3, 2), relevant=0.5, interactions=4),
    "needle": Stress(values=(6, 5, 5, 4, 4, 3), plateau_levels=8, needle=True),
    "invalid": Stress(values=(6, 6, 5, 4, 4, 3), invalid=0.7, failed=0.1, interactions=3),
    "interactions": Stress(values=(5, 5, 4, 4, 4, 3), interactions=6, interaction_weight=1.5),
    "noisy": Stress(values=(6, 5, 5, 4, 4, 3), interactions=3, noise=0.05),
}


def _power_values(count: int) -> list[int]:
    return [2 ** (i + 2) for i in range(count)]


def synthetic_landscape(kind: str, seed: int = 0) -> Landscape:
    """The landscape of stress `kind` (a key of SUITE) drawn with `seed`; named "synthetic_<kind>_<seed>"."""
    if kind not in SUITE:
        raise UsageError(f"kind: unknown synthetic landscape {kind!r}, expected one of {', '.join(SUITE)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed: expected a non-negative int, got {seed!r}")
    stress = SUITE[kind]
    rng = np.random.default_rng([seed, list(SUITE).index(kind)])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in stress.values], indexing="ij"), axis=-1)
    grid = grid.reshape(-1, len(stress.values))
    scaled = grid / np.maximum(np.array(stress.values) - 1, 1)  # every parameter spans [0, 1]

    dims = len(stress.values)
    weights = np.where(rng.random(dims) < stress.relevant, rng.uniform(0.4, 1.2, dims), rng.uniform(0, 0.05, dims))
    preferred = rng.random(dims)
    log_time = ((scaled - preferred) ** 2 * weights).sum(axis=1)
    for _ in range(stress.interactions):  # the sum of two log-sizes should sit at a target
        a, b = rng.choice(dims, size=2, replace=False)
        target = rng.uniform(0.5, 1.5)
        log_time += stress.interaction_weight * (scaled[:, a] + scaled[:, b] - target) ** 2
    log_time += 0.02 * rng.standard_normal(len(grid))  # the small ruggedness of any real kernel
    if stress.plateau_levels:
        low, high = log_time.min(), log_time.max()
        log_time = low + np.round((log_time - low) / (high - low) * stress.plateau_levels) / stress.plateau_levels * (
            high - low)
    if stress.needle:  # 30% faster than the best plateau; one change away 10% faster, two away 15% slower than it
        needle = [rng.integers(n) for n in stress.values]
        changes = np.count_nonzero(grid != needle, axis=1)
        log_time = np.minimum(log_time, log_time.min() + math.log(0.7) + 0.25 * changes)
    valid = np.ones(len(grid), dtype=bool)
    if stress.invalid:  # a weighted resource use over half the parameters must stay under a budget
        users = rng.choice(dims, size=max(2, dims // 2), replace=False)
        usage = (scaled[:, users] * rng.uniform(0.5, 1.5, len(users))).sum(axis=1)
        budget = np.quantile(usage, 1 - stress.invalid)
        valid = usage <= budget
        if stress.failed:
            edge = np.quantile(usage[valid], 1 - stress.failed)
            failed = valid & (usage > edge)
            log_time[failed] = math.inf
    if stress.noise:
        log_time += stress.noise * rng.standard_normal(len(grid))
    time = np.exp(log_time)
    names = [f"p{i}" for i in range(dims)]
    params = {name: _power_values(n) for name, n in zip(names, stress.values)}
    value_lists = [params[name] for name in names]
    values = {tuple(value_lists[j][i] for j, i in enumerate(row)): float(t) for row, t in zip(grid[valid], time[valid])}
    return Landscape(f"synthetic_{kind}_{seed}", params, values)


def synthetic_suite(seed: int = 0) -> list[Landscape]:
    """One landscape of every stress in SUITE, drawn with `seed`."""
    return [synthetic_landscape(kind, seed) for kind in SUITE]


def write_cache_file(landscape: Landscape, path: str | Path) -> Path:
    """`landscape` as a gzipped Kernel Tuner cache file (failed configs as "RuntimeFailedConfig"),
    readable by `load_landscape` and by Kernel Tuner's simulation mode."""
    path = Path(path)
    names = list(landscape.params)
    cache = {}
    for key, time in landscape.values.items():
        entry = {name: value for name, value in zip(names, key)}
        entry["time"] = time if math.isfinite(time) else "RuntimeFailedConfig"
        cache[",".join(str(v) for v in key)] = entry
    data = {"device_name": "synthetic", "kernel_name": landscape.name, "tune_params_keys": names,
            "tune_params": landscape.params, "objective": "time", "cache": cache}
    with gzip.open(path, "wt") as handle:
        json.dump(data, handle)
    return path
