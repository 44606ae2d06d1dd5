"""autotune.Space: enumeration, validity, sampling, neighbours, distances, KernelSpec binding, bad arguments."""

import itertools

import pytest

from triton_workbench.autotune.space import Space


def small_space() -> Space:
    return Space({"block": [16, 32, 64, 128], "warps": [1, 2, 4], "flag": [0, 1]},
                 [lambda c: c["block"] * c["warps"] <= 256, lambda c: not (c["flag"] and c["block"] == 16)])


def test_enumerates_exactly_the_configs_meeting_every_constraint():
    space = small_space()
    expected = [dict(block=b, warps=w, flag=f)
                for b, w, f in itertools.product([16, 32, 64, 128], [1, 2, 4], [0, 1])
                if b * w <= 256 and not (f and b == 16)]
    assert list(space) == expected
    assert len(space) == space.size == len(expected) < space.cardinality == 24
    for config in expected:
        assert space.is_valid(config)
        assert space.config(space.row(config)) == config
    assert not space.is_valid({"block": 128, "warps": 4, "flag": 0})  # breaks a constraint
    assert not space.is_valid({"block": 48, "warps": 1, "flag": 0})  # not a candidate value
    assert not space.is_valid({"block": 16, "warps": 1})  # missing parameter
    assert space.row({"block": 16, "warps": 1, "flag": 1}) is None


def test_sample_is_distinct_valid_and_reproducible():
    space = small_space()
    drawn = space.sample(7, seed=3)
    assert len({tuple(c.values()) for c in drawn}) == 7
    assert all(space.is_valid(c) for c in drawn)
    assert drawn == space.sample(7, seed=3)
    assert len(space.sample(1000, seed=0)) == space.size


def test_neighbours_change_one_parameter():
    space = small_space()
    config = {"block": 32, "warps": 2, "flag": 1}
    adjacent = space.neighbours(config)
    # block 16 with flag 1 breaks a constraint, so only the upper block neighbour is valid
    assert sorted(tuple(c.values()) for c in adjacent) == sorted([(64, 2, 1), (32, 1, 1), (32, 4, 1), (32, 2, 0)])
    hamming = {tuple(c.values()) for c in space.neighbours(config, "hamming")}
    assert (128, 2, 1) in hamming and (128, 2, 1) not in {tuple(c.values()) for c in adjacent}
    for other in space.neighbours(config, "hamming"):
        assert sum(other[k] != config[k] for k in config) == 1 and space.is_valid(other)


def test_hamming_distances_and_positions():
    space = small_space()
    row = space.row({"block": 32, "warps": 2, "flag": 1})
    distances = space.hamming_distances(row)
    for other, distance in zip(space, distances):
        assert distance == sum(other[k] != v for k, v in space.config(row).items())
    assert distances[row] == 0
    positions = space.positions  # value index / (number of values - 1), per parameter
    assert positions.min() == 0 and positions.max() == 1
    assert positions[space.row({"block": 64, "warps": 4, "flag": 0})].tolist() == [2 / 3, 1.0, 0.0]


def test_rows_of_value_indices_and_minus_one_for_invalid_configs():
    space = small_space()
    every = list(itertools.product(range(4), range(3), range(2)))
    rows = space.rows_of(every)
    for indices, row in zip(every, rows):
        config = {name: space.params[name][i] for name, i in zip(space.names, indices)}
        assert row == (space.row(config) if space.is_valid(config) else -1)
    assert sorted(rows[rows >= 0].tolist()) == list(range(space.size))
    empty = Space({"a": [1, 2]}, [lambda c: False])
    assert empty.rows_of([[0], [1]]).tolist() == [-1, -1]


def test_from_spec_binds_the_problem():
    class Spec:
        params = {"BLOCK": [16, 32, 64], "num_warps": [2, 4]}
        constraints = [lambda config, problem: config["BLOCK"] <= problem["n"]]

    assert len(Space.from_spec(Spec, {"n": 32})) == 4
    assert len(Space.from_spec(Spec, {"n": 64})) == 6
    with pytest.raises(ValueError, match="spec"):
        Space.from_spec(object(), {"n": 1})
    with pytest.raises(ValueError, match="problem"):
        Space.from_spec(Spec, [1])


@pytest.mark.parametrize("params, constraints, argument", [
    ({}, [], "params"),
    ({"a": []}, [], "params"),
    ({"a": "abc"}, [], "params"),
    ({"a": [1, 1]}, [], "params"),
    ({"a": [1, 2]}, [1], "constraints"),
    ({"a": [1, 2]}, lambda c: True, "constraints"),
])
def test_bad_arguments_name_the_argument(params, constraints, argument):
    with pytest.raises(ValueError, match=argument):
        Space(params, constraints)


def test_bad_sample_and_neighbour_arguments():
    space = small_space()
    with pytest.raises(ValueError, match="n"):
        space.sample(-1)
    with pytest.raises(ValueError, match="method"):
        space.neighbours({"block": 32, "warps": 2, "flag": 1}, "diagonal")
    with pytest.raises(ValueError, match="config"):
        space.neighbours({"block": 128, "warps": 4, "flag": 0})
