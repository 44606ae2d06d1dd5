"""The synthetic suite: deterministic, each landscape showing the stress it is named for, and readable by
Kernel Tuner's cache format through `write_cache_file` / `load_landscape`."""

import gzip
import json
import math

import numpy as np
import pytest

from triton_workbench.autotune.landscape import load_landscape
from triton_workbench.autotune.synthetic import SUITE, synthetic_landscape, synthetic_suite, write_cache_file
from triton_workbench.kernels.errors import UsageError


def times(landscape) -> np.ndarray:
    return np.array(list(landscape.values.values()))


def test_same_kind_and_seed_same_landscape_other_seed_another():
    assert synthetic_landscape("noisy", 3).values == synthetic_landscape("noisy", 3).values
    assert synthetic_landscape("noisy", 3).values != synthetic_landscape("noisy", 4).values
    assert [landscape.name for landscape in synthetic_suite(2)] == [f"synthetic_{kind}_2" for kind in SUITE]


def test_invalid_kind_removes_seventy_percent_and_fails_ten_percent_of_the_rest():
    landscape = synthetic_landscape("invalid")
    assert len(landscape.values) / landscape.space.cardinality == pytest.approx(0.3, abs=0.02)
    failed = ~np.isfinite(times(landscape))
    assert failed.mean() == pytest.approx(0.1, abs=0.02)
    assert landscape.space.size == len(landscape.values)  # only the recorded configs are valid


def test_needle_is_one_config_in_a_narrow_basin_above_plateaus():
    landscape = synthetic_landscape("needle")
    keys = np.array(list(landscape.values))
    values = times(landscape)
    needle = keys[np.argmin(values)]
    changes = np.count_nonzero(keys != needle, axis=1)
    basin = changes == 1
    outside = changes >= 3
    assert values[changes > 0].min() >= values.min() / 0.8  # 20% ahead of everything else
    assert values[basin].max() < values[outside].min()  # one change away still beats every plateau
    assert basin.sum() == sum(len(v) - 1 for v in landscape.params.values())  # the basin is narrow
    assert len(np.unique(np.round(np.log(values[outside]), 9))) <= 9  # plateaus: a few levels


def test_many_params_has_twelve_parameters_and_interactions_bend_the_optimum():
    assert len(synthetic_landscape("many_params").params) == 12
    landscape = synthetic_landscape("interactions")
    best = min(landscape.values, key=landscape.values.get)
    # coordinate descent from the slowest config, one parameter at a time, stops short of the optimum
    config = list(max(landscape.values, key=landscape.values.get))
    for _ in range(3):
        for j, candidates in enumerate(landscape.params.values()):
            config[j] = min(candidates, key=lambda v: landscape.values[tuple(config[:j] + [v] + config[j + 1:])])
    assert tuple(config) != best and landscape.values[tuple(config)] > 1.1 * landscape.optimum
    assert np.median(times(landscape)) > 5 * landscape.optimum


def test_cache_file_round_trip_and_failures_as_kernel_tuner_writes_them(tmp_path):
    landscape = synthetic_landscape("invalid", 1)
    path = write_cache_file(landscape, tmp_path / "invalid.json.gz")
    loaded = load_landscape(path)
    assert loaded.name == "invalid" and loaded.params == landscape.params and loaded.values == landscape.values
    with gzip.open(path, "rt") as handle:
        data = json.load(handle)
    failed = [entry for entry in data["cache"].values() if entry["time"] == "RuntimeFailedConfig"]
    assert len(failed) == sum(not math.isfinite(t) for t in landscape.values.values()) > 0
    assert data["tune_params_keys"] == list(landscape.params)


def test_bad_arguments_name_them():
    with pytest.raises(UsageError, match="kind: unknown synthetic landscape 'bumpy'"):
        synthetic_landscape("bumpy")
    with pytest.raises(UsageError, match="seed"):
        synthetic_landscape("noisy", -1)
