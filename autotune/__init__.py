"""Search spaces, strategies, the evaluation pipeline and the results database.

    from autotune import tune, Database, lookup_best
    trials = tune(GEMM_SPEC, problem, strategy="auto", budget=200)   # a DataFrame, stored in the database
"""

from kernels import runtime  # noqa: F401  first: Triton must see TRITON_INTERPRET before it is imported
from autotune.database import Database, lookup_best
from autotune.timing import Timing, measure
from autotune.tuner import tune
from autotune.space import Space
from autotune.strategies import make_strategy
from autotune.replay import replay

__all__ = ["Database", "Space", "Timing", "lookup_best", "make_strategy", "measure", "replay", "tune"]
