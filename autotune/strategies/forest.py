"""Surrogate search: an extremely randomised tree ensemble (scikit-learn) models log(objective) over the
valid configs, and each ask takes the candidate with the highest expected improvement.

Why this design:
- The valid configs of a kernel space are few enough (thousands to ~10^5) to score every one, or a
  large random pool plus the neighbourhood of the best configs, so the acquisition is maximised over
  real valid configs: no rounding of a continuous optimiser, no wasted proposals on invalid configs.
- Tree ensembles fit the step-like, interacting response of block sizes, vector widths and flags
  better than a stationary GP kernel, need no hyper-parameter fitting and work for categorical values;
  the spread of the trees' predictions gives the uncertainty for expected improvement (as in SMAC).
- Features are each parameter's value index plus, for numeric parameters, log2 of pairwise products
  and ratios (e.g. threads per block = block_x * block_y): generic, no kernel-specific knowledge.
  On the first round's development landscapes (GEMM A100/V100, convolution A100) dropping them, starting from 20
  initial configs instead of 10, or spending every 4th ask on a random config were all worse.
- log(time) makes relative differences count equally on fast and slow configs; a failed config is
  told as inf and modelled as a little worse than the worst success, so its region is avoided.
- The first `initial_samples` configs are spread out (greedy maximin: each is the config, of a random
  pool, farthest from every config asked so far, in value positions scaled to [0, 1]) rather than
  drawn at random, so the first model sees the extremes of every parameter. This was the largest
  single gain: at 25 evaluations +0.04 of the optimum on GEMM, +0.05 on the TITAN RTX convolution.
- From `exploit_after` observations on, every other ask takes the highest-EI unasked config within
  `local_radius` parameter changes of a refinement centre, the best config (local refinement; see the basins
  below): the random pool rarely holds the few configs next to an isolated optimum, and two changes at
  once reach optima that no single change improves towards (tile and block sizes that only pay off
  together). Keyed off the observation count, since strategies do not know the budget. Starting at 50
  rather than 100 observations, and radius 2 rather than 1, together raised the 100- and 200-evaluation
  results on all five landscapes.
- After `basin_stagnation` (10) evaluations without improvement, refinement spreads over the best config of
  each of the `basins` (4) best basins -- observed configs more than `local_radius` changes from every better one --
  and judges each candidate by the improvement expected over its own basin's best, not the incumbent's.
  Refining around the incumbent alone walks its plateau while a worse basin, the slope of an isolated optimum,
  is not followed: on the synthetic needle 5 of 15 seeds were still on the plateau 0.7 of the optimum at 200,
  having seen configs two changes from the optimum by their 40th-170th. Judged against the incumbent, that
  slope's candidates never win (its configs are worse); judged against their own basin, they do (needle at
  200: 0.900 -> 0.960). The cost: refining asks go to worse basins while the incumbent's neighbourhood
  still holds the optimum (15 seeds: convolution_A100 0.906 -> 0.891 at 200 and 0.916 -> 0.909 at 500;
  at 100 all ten landscapes 0.959 -> 0.956, the interactions 0.988 -> 0.972; at 500 the eight development
  landscapes 0.989 -> 0.988).
- Asked but untold configs (parallel compile) are fitted at the mean observed value ("constant liar"),
  so a batch of asks spreads out instead of piling onto one spot.
- Tried for the late phase (100-500 evaluations) and left off by default, because none was clearly
  better on the development suite (three recorded landscapes and the synthetic suite, two seeds;
  benchmarks/strategy_ablation.py, its rows in benchmarks/results/strategy_ablation.csv): offspring of
  the elite in the scored pool (`offspring`, a genetic algorithm's recombination judged by the model),
  moving the refinement centre through the elite after `stagnation` evaluations without improvement with
  one ask in `explore_every` spread out, and splits over a random 30% of the features (`split_features`,
  1.8x faster fits). The spread-out asks and the 30% splits each lost the synthetic needle in a seed where
  one basin finds it by 500 evaluations (all against one basin, the defaults of the time).

Every number above is an option (`ForestOptions`; `make_strategy("auto", space, trees=48)`, `tune(...,
strategy_options={...})`, `workbench tune --strategy-option trees=48`); the defaults are the choices
described here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies.base import Strategy
from triton_workbench.autotune.strategies.options import StrategyOptions, option

# scikit-learn and scipy are imported where first used: importing scikit-learn sets environment variables
# (KMP_DUPLICATE_LIB_OK, KMP_INIT_AT_FORK), and importing the package must set none; scipy.stats is slow to import.
if TYPE_CHECKING:
    from sklearn.tree import DecisionTreeRegressor


@dataclass(frozen=True)
class ForestOptions(StrategyOptions):
    """The hyperparameters of `ForestSearch` ("auto", "forest"); the defaults are the tuned choices."""

    initial_samples: int = option(
        10, "Configs spread out over the space (greedy maximin) before the first model is fitted.", minimum=1)
    trees: int = option(
        24, "Trees in the extra-trees ensemble; the spread of their predictions is the uncertainty "
            "that expected improvement weighs.", minimum=1)
    split_features: float = option(
        1.0, "Fraction of the features each tree node draws a random split for, keeping the best (extra-trees' "
             "max_features); lower fits faster.", minimum=0.01, maximum=1)
    pool_size: int = option(
        3000, "Random unasked configs scored per ask once the space is larger than this (also the pool "
              "the spread-out start picks from).", minimum=1)
    neighbourhood_of: int = option(
        3, "The Hamming-1 neighbours of this many best configs always join the scored pool.", minimum=0)
    exploit_after: int = option(
        50, "Observations after which local refinement starts (every `exploit_every`-th ask).", minimum=0)
    exploit_every: int = option(
        2, "Once refining, one ask in this many refines around a refinement centre (see `basins`); 1 refines "
           "on every ask.",
        minimum=1)
    local_radius: int = option(
        2, "Parameters a refinement step may change at once (Hamming radius around a refinement centre).",
        minimum=1)
    basins: int = option(
        4, "After `basin_stagnation` evaluations without improvement, refinement spreads over the "
           "best config of each of this many basins (observed configs more than `local_radius` changes from "
           "every better one), each candidate judged by the improvement expected over its own basin's best; "
           "1 refines around the best config only.", minimum=1)
    basin_stagnation: int = option(
        10, "Evaluations without improvement after which refinement spreads over `basins` basins (0: from "
            "the first refining ask; not used when `stagnation` is set).", minimum=0)
    elite: int = option(
        8, "The best observed configs that parent offspring and serve as refinement centres when "
           "`stagnation` is set.", minimum=1)
    offspring: int = option(
        0, "Offspring of the elite (uniform crossover, then each parameter mutated with probability "
           "1/parameters) added to the scored pool per ask: recombination, judged by the surrogate.", minimum=0)
    stagnation: int = option(
        0, "Evaluations without improvement after which refinement moves to the next elite config's "
           "neighbourhood (cycling through the elite, instead of spreading over `basins`); 0 never.", minimum=0)
    explore_every: int = option(
        4, "While stagnating by `stagnation` (not `basin_stagnation`), one ask in this many is spread out "
           "(farthest from every config asked so far) instead of chosen by the model; 0 never.", minimum=0)
    failure_penalty: float = option(
        0.5, "A failed config is modelled this many observed log-ranges above the worst success.", minimum=0)


def config_features(space: Space) -> np.ndarray:
    """Feature matrix of every valid config (rows of `space.table`)."""
    columns = [space.table[:, j].astype(float) for j in range(len(space.names))]
    logs = []
    for j, values in enumerate(space.params.values()):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
        if numeric and len(values) > 1:
            logs.append(np.log2(np.asarray(values, dtype=float))[space.table[:, j]])
    for a in range(len(logs)):
        for b in range(a + 1, len(logs)):
            columns += [logs[a] + logs[b], logs[a] - logs[b]]
    return np.ascontiguousarray(np.column_stack(columns), dtype=np.float32)


class ForestSearch(Strategy):
    """Expected-improvement search with an extra-trees surrogate (see the module docstring)."""

    name = "forest"
    options_type = ForestOptions
    options: ForestOptions

    def __init__(self, space: Space, seed: int = 0, options: ForestOptions | None = None):
        super().__init__(space, seed, options)
        self._features = config_features(space)

    @property
    def initial_samples(self) -> int:
        """Configs spread out before the first model (`options.initial_samples`)."""
        return self.options.initial_samples

    def _next_row(self) -> int | None:
        finite = [v for v in self.observed_values if math.isfinite(v)]
        starting = len(finite) < min(self.initial_samples, 2) or len(self.observed_rows) < self.initial_samples
        if starting or self._spreading():
            return self._spread_row()
        best = math.log(min(finite))
        candidates, baseline = self._local_candidates(best) if self._exploiting() else (self._candidates(), best)
        features = self._features[candidates]
        per_tree = np.stack([tree.tree_.predict(features)[:, 0] for tree in self._fit()])
        mean, std = per_tree.mean(axis=0), per_tree.std(axis=0) + 1e-9
        z = (baseline - mean) / std
        from scipy.stats import norm

        improvement = (baseline - mean) * norm.cdf(z) + std * norm.pdf(z)
        return int(candidates[np.argmax(improvement)])

    def _spread_row(self) -> int:
        """The unasked config of a random pool farthest (L1, scaled positions) from every asked one."""
        unasked = self._unasked_rows()
        pool = self.rng.choice(unasked, size=min(self.options.pool_size, len(unasked)), replace=False)
        asked = np.flatnonzero(self.asked)
        if not len(asked):
            return int(pool[0])
        from scipy.spatial.distance import cdist

        positions = self.space.positions
        distances = cdist(positions[pool], positions[asked], metric="cityblock")
        return int(pool[np.argmax(distances.min(axis=1))])

    def _fit(self) -> list[DecisionTreeRegressor]:
        """Extra-trees (random splits, no bootstrap) on log(value); built tree by tree, as sklearn's
        ExtraTreesRegressor would, without its per-fit estimator cloning, which dominated the cost."""
        values = np.asarray(self.observed_values)
        logs = np.log(np.where(np.isfinite(values), values, np.nan))
        worst, spread = np.nanmax(logs), max(np.nanmax(logs) - np.nanmin(logs), 1e-3)
        targets = np.where(np.isnan(logs), worst + self.options.failure_penalty * spread, logs)
        rows = list(self.observed_rows)
        if self.pending:
            rows += sorted(self.pending)
            targets = np.concatenate([targets, np.full(len(self.pending), targets.mean())])
        features = self._features[rows]
        seeds = self.rng.integers(2**31, size=self.options.trees)
        import sklearn
        from sklearn.tree import DecisionTreeRegressor

        # the features are float32, C-contiguous and finite by construction (`config_features`): skip sklearn's checks
        with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
            return [DecisionTreeRegressor(splitter="random", max_features=self.options.split_features,
                                          random_state=int(s)).fit(features, targets, check_input=False)
                    for s in seeds]

    def _exploiting(self) -> bool:
        observed = len(self.observed_rows)
        return observed >= self.options.exploit_after and observed % self.options.exploit_every == 0

    def _spreading(self) -> bool:
        """Whether this ask explores: stagnating, on one ask in `options.explore_every` (never a refining one).
        Counted in told configs, as `_exploiting` is: every ask of a batch asked at such a count spreads."""
        every, observed = self.options.explore_every, len(self.observed_rows)
        stagnating = self.options.stagnation and self._stagnant_for() >= self.options.stagnation
        return bool(every and stagnating and observed % every == 1 % every and not self._exploiting())

    def _best_rows(self, count: int) -> np.ndarray:
        """The `count` best observed rows that did not fail, best first."""
        values = np.asarray(self.observed_values)
        order = np.argsort(values, kind="stable")[:count]  # ties: the first observed first
        return np.asarray(self.observed_rows, dtype=np.int64)[order[np.isfinite(values[order])]]

    def _stagnant_for(self) -> int:
        """Evaluations since the best value so far was first observed."""
        return len(self.observed_values) - 1 - int(np.argmin(self.observed_values))

    def _local_candidates(self, best: float) -> tuple[np.ndarray, np.ndarray | float]:
        """Unasked configs within `options.local_radius` changes of a refinement centre, and the log value each
        must improve on: its centre's (the better one's where two centres reach it). The centres: the best
        config; after `options.basin_stagnation` evaluations without improvement the best of each of
        `options.basins` basins; with `options.stagnation` one elite config in turn, judged against `best` (the
        best log value). The usual pool, against `best`, if none is left."""
        if self.options.stagnation:
            elite = self._best_rows(self.options.elite)
            centres = elite[[self._stagnant_for() // self.options.stagnation % len(elite)]]
        else:
            stagnating = self._stagnant_for() >= self.options.basin_stagnation
            centres = self._basin_centres(self.options.basins if stagnating else 1)
        near = [np.flatnonzero((self.space.hamming_distances(centre) <= self.options.local_radius) & ~self.asked)
                for centre in centres]
        if not sum(map(len, near)):
            return self._candidates(), best
        if self.options.stagnation:
            return np.concatenate(near), best
        values = dict(zip(self.observed_rows, self.observed_values))
        baselines = np.concatenate([np.full(len(rows), math.log(values[c])) for rows, c in zip(near, centres)])
        rows, first = np.unique(np.concatenate(near), return_index=True)  # centres best first: the better baseline
        return rows, baselines[first]

    def _basin_centres(self, count: int) -> np.ndarray:
        """The best observed config of each of the `count` best basins, best first: configs that did not fail,
        more than `options.local_radius` changes from every better observed config (ties: from every earlier
        one), so that a second, worse basin -- the slope of an isolated optimum -- is refined too, not only the
        incumbent's plateau. O(n * d) memory; time O(n^2 * d) at worst (fewer than `count` basins), the scan
        stopping at the `count`-th centre (at once for 1)."""
        ranked = self._best_rows(len(self.observed_rows))
        table, centres = self.space.table[ranked], []
        for i in range(len(ranked)):
            if len(centres) == count:
                break
            if not i or np.count_nonzero(table[:i] != table[i], axis=1).min() > self.options.local_radius:
                centres.append(ranked[i])
        return np.asarray(centres, dtype=np.int64)

    def _offspring_rows(self) -> np.ndarray:
        """Valid rows of `options.offspring` children of random pairs of the elite (uniform crossover and
        mutation, as a genetic algorithm breeds), asked or not."""
        parents = self.space.table[self._best_rows(self.options.elite)]
        count, width = self.options.offspring, parents.shape[1]
        first, second = (parents[self.rng.integers(len(parents), size=count)] for _ in range(2))
        children = np.where(self.rng.random((count, width)) < 0.5, first, second)
        sizes = np.array([len(values) for values in self.space.params.values()])
        mutated = self.rng.random((count, width)) < 1 / width
        children = np.where(mutated, (self.rng.random((count, width)) * sizes).astype(np.int64), children)
        rows = self.space.rows_of(children)
        return rows[rows >= 0]

    def _candidates(self) -> np.ndarray:
        unasked = self._unasked_rows()
        if len(unasked) <= self.options.pool_size:
            return unasked
        pool = [self.rng.choice(unasked, size=self.options.pool_size, replace=False)]
        for row in self._best_rows(self.options.neighbourhood_of):
            pool.append(self.space.neighbour_rows(row, "hamming"))
        if self.options.offspring:
            pool.append(self._offspring_rows())
        pool = np.unique(np.concatenate(pool))
        return pool[~self.asked[pool]]
