"""Search spaces, strategies, the evaluation pipeline and the results database.

    from triton_workbench.autotune import tune, Database, lookup_best
    trials = tune(GEMM_SPEC, problem, strategy="auto", budget=200)   # a DataFrame, stored in the database
"""

from triton_workbench.autotune.database import Database, lookup_best
from triton_workbench.autotune.timing import Timing, measure
from triton_workbench.autotune.tuner import tune
from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies import make_strategy
from triton_workbench.autotune.replay import replay

__all__ = ["Database", "Space", "Timing", "lookup_best", "make_strategy", "measure", "replay", "tune"]
