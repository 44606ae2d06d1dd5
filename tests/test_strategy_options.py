"""Declared strategy options: `auto`'s hyperparameters as data, set through the API and the CLI, checked."""

import dataclasses
import math

import pytest

from triton_workbench.autotune import tune
from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies import ForestOptions, make_strategy, parse_assignments, strategy_options
from triton_workbench.database import Database
from triton_workbench.workbench.cli import main
from test_replay import write_cache
from tiny_spec import SPEC


def bowl_space() -> Space:
    return Space({name: [1, 2, 3, 4, 5] for name in "abcdef"})


def bowl(config: dict) -> float:
    return 1.0 + sum((value - 2) ** 2 for value in config.values())


def sequence(asks: int, **options) -> list[dict]:
    strategy = make_strategy("auto", bowl_space(), seed=1, **options)
    asked = []
    for _ in range(asks):
        config = strategy.ask()
        strategy.tell(config, bowl(config))
        asked.append(config)
    return asked


def test_defaults_are_the_documented_choices():
    defaults = {name: default for name, default, _ in ForestOptions.documentation()}
    assert defaults == {"initial_samples": 10, "trees": 24, "pool_size": 3000, "neighbourhood_of": 3,
                        "exploit_after": 50, "exploit_every": 2, "local_radius": 2, "basins": 4, "basin_stagnation": 10,
                        "elite": 8, "offspring": 0,
                        "stagnation": 0, "explore_every": 4, "split_features": 1.0, "failure_penalty": 0.5}
    assert all(doc for _, _, doc in ForestOptions.documentation())
    assert make_strategy("auto", bowl_space()).options == ForestOptions()
    assert make_strategy("random", bowl_space()).options is None


def test_the_defaults_given_explicitly_change_nothing():
    assert sequence(60, **dataclasses.asdict(ForestOptions())) == sequence(60)


def test_an_option_changes_the_search():
    # refine within one change of the best (one basin) on every ask from the 12th observation on
    options = {"exploit_after": 12, "exploit_every": 1, "local_radius": 1, "basins": 1}
    asked = sequence(40, **options)
    best = None
    for told, config in enumerate(asked):
        if told >= 12:
            assert sum(config[k] != best[k] for k in config) <= 1, told
        best = min(best or config, config, key=bowl)
    assert asked != sequence(40)
    assert sequence(20, trees=4) != sequence(20) and sequence(20, initial_samples=3)[:3] == sequence(3)


def test_command_line_strings_are_read_as_the_options_type():
    assert strategy_options("auto", {"trees": "8", "failure_penalty": "1", "local_radius": " 3 "}) == \
        ForestOptions(trees=8, failure_penalty=1.0, local_radius=3)
    assert strategy_options("exhaustive", {}) is None
    assert parse_assignments(["trees=8", "local_radius = 1"]) == {"trees": "8", "local_radius": "1"}


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"strategy 'auto' has no option 'tree'; its options are initial_samples, "
                                         r"trees, split_features, pool_size,"):
        make_strategy("auto", bowl_space(), tree=8)
    with pytest.raises(ValueError, match="strategy 'random' takes no options, got trees"):
        make_strategy("random", bowl_space(), trees=8)
    with pytest.raises(ValueError, match="unknown strategy 'annealing'"):
        strategy_options("annealing", {"trees": 8})


@pytest.mark.parametrize("name, value, expected", [
    ("trees", 0, "an integer >= 1"), ("trees", 2.5, "an integer >= 1"), ("trees", "many", "an integer >= 1"),
    ("trees", True, "an integer >= 1"), ("neighbourhood_of", -1, "an integer >= 0"),
    ("failure_penalty", math.nan, "a number >= 0"), ("failure_penalty", "-1", "a number >= 0"),
    ("split_features", 1.5, "a number >= 0.01 and <= 1"), ("split_features", 0, "a number >= 0.01 and <= 1"),
])
def test_bad_values_name_the_option_and_what_it_takes(name, value, expected):
    with pytest.raises(ValueError, match=f"strategy option {name}: expected {expected}, got"):
        make_strategy("auto", bowl_space(), **{name: value})
    if not isinstance(value, str):
        with pytest.raises(ValueError, match=f"strategy option {name}"):
            ForestOptions(**{name: value})


@pytest.mark.parametrize("items, message", [
    (["trees"], "expected KEY=VALUE, got 'trees'"), (["=8"], "expected KEY=VALUE, got '=8'"),
    (["trees=8", "trees=9"], "trees is given twice"),
])
def test_malformed_assignments(items, message):
    with pytest.raises(ValueError, match=f"--strategy-option: {message}"):
        parse_assignments(items)


def test_tune_takes_strategy_options_and_records_them():
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        tune(SPEC, {"n": 37, "dtype": "fp32"}, strategy_options={"bogus": 1}, budget=2, progress=False)
    assert Database().runs().empty  # rejected before any run started
    trials = tune(SPEC, {"n": 37, "dtype": "fp32"}, strategy_options={"initial_samples": 2}, budget=3, progress=False,
                  interpreter_reps=1)
    assert len(trials) == 3
    assert Database().runs()["meta"].iloc[0]["strategy_options"] == {"initial_samples": 2}


@pytest.mark.parametrize("arguments, message", [
    (["--strategy-option", "trees"], "--strategy-option: expected KEY=VALUE"),
    (["--strategy-option", "bogus=1"], "has no option 'bogus'"),
    (["--strategy-option", "trees=0"], "strategy option trees: expected an integer >= 1, got 0"),
    (["--strategy", "random", "--strategy-option", "trees=8"], "strategy 'random' takes no options"),
])
def test_tune_and_tune_model_commands_reject_bad_options(arguments, message, capsys):
    assert main(["tune", "activation", "--shape", "64", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert main(["tune-model", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert Database().runs().empty


def test_strategies_command_applies_options_to_every_strategy(tmp_path, capsys):
    write_cache(tmp_path / "toy.json")
    common = ["strategies", "--landscapes", str(tmp_path), "--budgets", "4", "--seeds", "1",
              "--kernel-tuner-csv", "none"]
    assert main([*common, "--strategies", "auto", "--strategy-option", "initial_samples=2"]) == 0
    assert Database().runs()["meta"].iloc[0]["strategy_options"] == {"initial_samples": "2"}
    assert main([*common, "--strategies", "auto,random", "--strategy-option", "trees=8"]) == 2
    assert "strategy 'random' takes no options" in capsys.readouterr().err
