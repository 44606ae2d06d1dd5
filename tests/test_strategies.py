"""Strategies: the ask/tell contract (no repeats, exhaustion, batches told out of order) and that `auto`
finds good configs on a synthetic landscape with far fewer evaluations than random search."""

import math

import numpy as np
import pytest

from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies import STRATEGIES, make_strategy


NAMES = ["exhaustive", "random", "auto"]  # "forest" is the class behind "auto"


def small_space() -> Space:
    return Space({"x": [0, 1, 2, 3, 4], "y": [1, 4, 16], "flag": [0, 1]}, [lambda c: c["x"] + c["y"] != 5])


def grid_space() -> Space:
    return Space({"x": list(range(12)), "y": [1, 2, 4, 8, 16, 32], "flag": [0, 1]},
                 [lambda c: (c["x"] + c["y"]) % 7 != 3])


def objective(config: dict) -> float:
    """A smooth bowl with a flag penalty; failures where x == 11 and y == 32."""
    if config["x"] == 11 and config["y"] == 32:
        return math.inf
    return 1.0 + (config["x"] - 7) ** 2 + 3 * (math.log2(config["y"]) - 2) ** 2 + 4 * config["flag"]


def test_every_name_makes_a_strategy():
    assert set(NAMES) <= set(STRATEGIES)
    for name in STRATEGIES:
        assert make_strategy(name, small_space()).ask() is not None


@pytest.mark.parametrize("name", NAMES)
def test_asks_every_valid_config_once_then_none(name):
    space = small_space()
    strategy = make_strategy(name, space, seed=1)
    seen = []
    while (config := strategy.ask()) is not None:
        assert space.is_valid(config)
        seen.append(tuple(config.values()))
        strategy.tell(config, objective(config))
    assert len(seen) == len(set(seen)) == space.size
    assert strategy.ask() is None


@pytest.mark.parametrize("name", NAMES)
def test_batches_told_out_of_order(name):
    space = grid_space()
    strategy = make_strategy(name, space, seed=2)
    seen = set()
    for _ in range(6):
        batch = [strategy.ask() for _ in range(4)]
        for config in batch:
            key = tuple(config.values())
            assert key not in seen
            seen.add(key)
        for config in reversed(batch):
            strategy.tell(config, objective(config))
    assert len(seen) == 24


def test_same_seed_same_sequence_and_exhaustive_order():
    space = grid_space()

    def sequence(name, seed):
        strategy, configs = make_strategy(name, space, seed=seed), []
        for _ in range(20):
            configs.append(strategy.ask())
            strategy.tell(configs[-1], objective(configs[-1]))
        return configs

    assert sequence("auto", 5) == sequence("auto", 5)
    assert sequence("random", 5) != sequence("random", 6)
    assert sequence("exhaustive", 0) == list(space)[:20]


def test_auto_beats_random_search_on_a_smooth_landscape():
    space = grid_space()
    optimum = min(objective(c) for c in space)

    def best_after(name, seed, budget=30):
        strategy, best = make_strategy(name, space, seed=seed), math.inf
        for _ in range(budget):
            config = strategy.ask()
            value = objective(config)
            strategy.tell(config, value)
            best = min(best, value)
        return optimum / best

    auto = np.mean([best_after("auto", seed) for seed in range(4)])
    random = np.mean([best_after("random", seed) for seed in range(4)])
    assert auto > random
    assert auto > 0.9


def test_auto_spreads_its_first_configs_to_the_extremes_of_every_parameter():
    space = Space({"a": list(range(10)), "b": list(range(10)), "c": list(range(10))})
    for seed in range(3):
        strategy = make_strategy("auto", space, seed=seed)
        first = [strategy.ask() for _ in range(strategy.initial_samples)]
        for name in space.names:  # ten random configs would miss one of the six extremes 9 times in 10
            assert {0, 9} <= {config[name] for config in first}, (seed, name)


def test_auto_refines_within_two_changes_of_the_best_on_every_other_ask_from_50_on():
    space = Space({name: [1, 2, 3, 4, 5] for name in "abcdef"})

    def bowl(config: dict) -> float:
        return 1.0 + sum((value - 2) ** 2 for value in config.values())

    strategy = make_strategy("auto", space, seed=1, basins=1)  # the refinement centre stays the best
    best, far_from_best = None, {"refining": 0, "exploring": 0}
    for told in range(90):
        config = strategy.ask()
        if best is not None and sum(config[k] != best[k] for k in config) > 2:
            far_from_best["refining" if told >= 50 and told % 2 == 0 else "exploring"] += 1
        strategy.tell(config, bowl(config))
        best = min(best or config, config, key=bowl)
    assert far_from_best["refining"] == 0
    assert far_from_best["exploring"] > 0  # the other asks do explore away from the best


def told(strategy, values: dict[tuple, float]) -> None:
    """Ask every config of `values` (enqueued) and tell its value, in the given order."""
    for key in values:
        strategy.enqueue(dict(zip(strategy.space.names, key)))
    for _ in values:
        config = strategy.ask()
        strategy.tell(config, values[tuple(config.values())])


def six_by_five() -> Space:
    return Space({name: [0, 1, 2, 3, 4] for name in "abcdef"})


def test_offspring_recombine_the_elite_as_a_genetic_algorithm_would():
    strategy = make_strategy("auto", six_by_five(), seed=0, elite=2, offspring=2000)
    first, second = (0, 0, 0, 4, 4, 4), (4, 4, 4, 0, 0, 0)
    told(strategy, {first: 1.0, second: 1.1, (2, 2, 2, 2, 2, 2): 9.0, (1, 3, 1, 3, 1, 3): 8.0})
    children = strategy.space.table[strategy._offspring_rows()]
    from_parents = (children == 0) | (children == 4)
    assert from_parents.mean() > 0.8  # mutation (1 in 6 values) is the only way to other values
    mixed = [row for row in children if set(row[:3]) == {0} and set(row[3:]) == {0}]
    assert mixed  # the first half of one parent with the second half of the other
    assert not any((row == [2, 2, 2, 2, 2, 2]).all() for row in children)  # never bred from outside the elite


def test_stagnation_moves_refinement_to_the_next_elite_config():
    space = six_by_five()
    options = dict(elite=3, stagnation=4, exploit_after=0, exploit_every=1, local_radius=1, explore_every=0)
    strategy = make_strategy("auto", space, seed=0, **options)
    best, second = (0, 0, 0, 0, 0, 0), (4, 4, 4, 4, 4, 4)
    told(strategy, {best: 1.0, second: 2.0, (2, 2, 2, 2, 2, 2): 3.0})
    near = lambda centre: {tuple(space.table[row]) for row in strategy._local_candidates(0.0)[0]} <= {
        tuple(space.table[row]) for row in np.flatnonzero(space.hamming_distances(space.row(dict(zip("abcdef", centre)))) <= 1)}
    assert near(best)  # 2 evaluations since the best: still refining around it
    told(strategy, {(1, 2, 3, 4, 0, 1): 5.0, (3, 1, 4, 0, 2, 2): 5.0})
    assert near(second)  # 4 without improvement: the next of the elite
    told(strategy, {(0, 4, 0, 4, 0, 4): 5.0, (4, 0, 4, 0, 4, 0): 5.0, (1, 1, 1, 3, 3, 3): 5.0, (3, 3, 3, 1, 1, 1): 5.0})
    assert near((2, 2, 2, 2, 2, 2))  # 8 without improvement: the third
    told(strategy, {(0, 1, 0, 1, 0, 1): 0.5})
    assert near((0, 1, 0, 1, 0, 1))  # an improvement: back to the (new) best


def test_basin_centres_are_the_best_configs_farther_than_the_radius_from_every_better_one():
    strategy = make_strategy("auto", six_by_five(), seed=0, local_radius=2)
    best, tie, near_best, far, near_far = (0,) * 6, (4,) * 6, (0, 0, 1, 1, 0, 0), (0, 0, 0, 4, 4, 4), (0, 0, 0, 4, 4, 3)
    tie_near_best = (0, 0, 0, 0, 0, 1)  # as good as the best, observed later, one change from it
    told(strategy, {best: 1.0, near_far: 1.5, tie: 1.0, near_best: 1.1, far: 1.2, (2, 2, 2, 2, 2, 2): math.inf,
                    tie_near_best: 1.0})
    centres = [tuple(strategy.space.table[row]) for row in strategy._basin_centres(5)]
    assert centres == [best, tie, far]  # the others sit in better (or earlier) basins; failures never count
    assert [tuple(strategy.space.table[row]) for row in strategy._basin_centres(2)] == [best, tie]


def test_stagnant_refinement_spreads_over_the_basins_each_judged_by_its_own_best():
    space = six_by_five()
    strategy = make_strategy("auto", space, seed=0, basins=2, basin_stagnation=3, local_radius=1)
    best, second = (0,) * 6, (4,) * 6
    told(strategy, {best: 1.0, second: 2.0})
    ball = lambda centre: set(np.flatnonzero(space.hamming_distances(space.row(dict(zip("abcdef", centre)))) <= 1))
    rows, baselines = strategy._local_candidates(0.0)
    assert set(rows) == ball(best) - set(strategy.observed_rows)  # 1 evaluation since the best: around it only
    told(strategy, {(1, 2, 3, 4, 0, 1): 5.0, (3, 1, 4, 0, 2, 2): 5.0})
    rows, baselines = strategy._local_candidates(0.0)
    assert set(rows) == (ball(best) | ball(second)) - set(strategy.observed_rows)
    around_second = np.isin(rows, list(ball(second)))
    assert np.allclose(baselines[~around_second], math.log(1.0))
    assert np.allclose(baselines[around_second], math.log(2.0))
    told(strategy, {(0, 0, 0, 0, 0, 1): 0.5})
    rows, _ = strategy._local_candidates(math.log(0.5))
    assert not set(rows) & ball(second)  # an improvement: back to the (new) best alone


def test_a_candidate_two_centres_reach_is_judged_by_the_better_and_none_left_falls_back_to_the_pool():
    space = six_by_five()
    strategy = make_strategy("auto", space, seed=0, basins=2, basin_stagnation=0, local_radius=1)
    best, second = (0,) * 6, (0, 0, 0, 0, 1, 1)  # two changes apart: both centres, their balls overlap
    told(strategy, {best: 1.0, second: 2.0})
    rows, baselines = strategy._local_candidates(0.0)
    shared = [space.row(dict(zip("abcdef", key))) for key in ((0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0))]
    assert np.allclose(baselines[np.isin(rows, shared)], math.log(1.0))
    small = Space({"a": [0, 1, 2], "b": [0, 1, 2]})
    lone = make_strategy("auto", small, seed=0, basins=1, local_radius=1)
    told(lone, {(0, 0): 1.0, (1, 0): 2.0, (2, 0): 2.0, (0, 1): 2.0, (0, 2): 2.0})  # the best's ball, all asked
    rows, baseline = lone._local_candidates(-1.0)
    assert sorted(rows) == sorted(np.flatnonzero(~lone.asked)) and baseline == -1.0


def test_elite_stagnation_ignores_the_basins_and_judges_against_the_best_and_failures_are_no_centres():
    space = six_by_five()
    strategy = make_strategy("auto", space, seed=0, stagnation=2, elite=2, basin_stagnation=0, local_radius=1)
    told(strategy, {(0,) * 6: 1.0, (4,) * 6: 2.0, (2,) * 6: 3.0})  # 2 without improvement: the second elite
    rows, baseline = strategy._local_candidates(-5.0)
    second = space.row(dict(zip("abcdef", (4,) * 6)))
    assert set(rows) == set(np.flatnonzero(space.hamming_distances(second) == 1)) and baseline == -5.0
    failing = make_strategy("auto", space, seed=0)
    told(failing, {(0,) * 6: math.inf, (4,) * 6: math.inf})
    assert len(failing._basin_centres(4)) == 0
    rows, baseline = failing._local_candidates(0.0)  # the usual pool, against the best
    assert len(rows) == 3000 and not failing.asked[rows].any() and baseline == 0.0


class _FixedTree:
    """Stands in for a fitted tree: predicts `means[row] + offset` for the features of `row`."""

    def __init__(self, means: dict[int, float], offset: float):
        self.tree_ = self
        self.means, self.offset = means, offset

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.array([[self.means.get(int(row), 9.0) + self.offset] for row in features[:, 0]])


def test_refining_asks_weigh_each_candidate_against_its_own_basin():
    space = six_by_five()
    strategy = make_strategy("auto", space, seed=0, basins=2, basin_stagnation=0, local_radius=1, exploit_after=0,
                             exploit_every=1, initial_samples=2)
    best, second = (0,) * 6, (4,) * 6
    told(strategy, {best: 1.0, second: 2.0})
    ball = lambda centre: np.flatnonzero(space.hamming_distances(space.row(dict(zip("abcdef", centre)))) == 1)
    # the model: a little worse than the incumbent around it, a little better than the second basin around that one
    means = {int(r): math.log(1.0) + 0.05 for r in ball(best)} | {int(r): math.log(2.0) - 0.1 for r in ball(second)}
    strategy._features = np.arange(space.size, dtype=np.float32)[:, None]  # a row's feature is its index
    strategy._fit = lambda: [_FixedTree(means, -0.01), _FixedTree(means, 0.01)]
    assert strategy._next_row() in ball(second)  # judged against the incumbent, a config near it would win


def test_spreads_one_ask_in_explore_every_while_stagnating_and_never_on_a_refining_one():
    strategy = make_strategy("auto", six_by_five(), seed=0, stagnation=3, explore_every=4, exploit_after=0)
    values = {tuple(int(v) for v in row): 1.0 + i for i, row in enumerate(six_by_five().table[::97][:12])}
    told(strategy, values)  # the first config is the best: 11 evaluations without improvement
    pattern = []
    for _ in range(8):
        pattern.append(strategy._spreading())
        config = strategy.ask()
        strategy.tell(config, 100.0)
    assert pattern == [False, True, False, False, False, True, False, False]  # observed 13, 17: 1 mod 4, odd
    fresh = make_strategy("auto", six_by_five(), seed=0, stagnation=3, explore_every=4, exploit_after=0)
    told(fresh, dict(reversed(list(values.items()))))  # improving on every evaluation: no spreading
    assert not fresh._spreading()


def test_bad_arguments():
    space = grid_space()
    with pytest.raises(ValueError, match="name"):
        make_strategy("annealing", space)
    with pytest.raises(ValueError, match="space"):
        make_strategy("random", {"x": [1]})
    with pytest.raises(ValueError, match="seed"):
        make_strategy("random", space, seed="0")
    strategy = make_strategy("random", space)
    config = strategy.ask()
    with pytest.raises(ValueError, match="value"):
        strategy.tell(config, float("nan"))
    strategy.tell(config, 1.0)
    with pytest.raises(ValueError, match="config"):
        strategy.tell(config, 1.0)  # told twice


@pytest.mark.parametrize("name", NAMES)
def test_enqueued_config_is_asked_first_and_only_once(name):
    space = small_space()
    strategy = make_strategy(name, space, seed=3)
    default = {"x": 4, "y": 16, "flag": 1}
    assert strategy.enqueue(default)
    assert not strategy.enqueue({"x": 2, "y": 3, "flag": 0})  # y=3 is not a candidate
    assert not strategy.enqueue({"x": 4, "y": 1, "flag": 0})  # x + y == 5 breaks the constraint
    assert strategy.ask() == default
    assert not strategy.enqueue(default)  # already asked
    strategy.tell(default, objective(default))
    rest = []
    while (config := strategy.ask()) is not None:
        rest.append(config)
        strategy.tell(config, objective(config))
    assert default not in rest and len(rest) == len(space) - 1
