"""Search spaces, strategies, the evaluation pipeline and the tuning results in the workbench database.

    from triton_workbench.autotune import tune, use_database, TuningDatabase
    trials = tune(GEMM_SPEC, problem, strategy="auto", budget=200)   # a DataFrame, stored in the database
    # the kernels now launch with the stored best (tune installed its database as their config source);
    # in a later process, `use_database()` (or `use_database(path)`) makes them use it again

Importing autotune installs nothing: the kernels use their default configs until `use_database`
or `tune` says which database to take tuned configs from.
"""

from triton_workbench.autotune.config_source import DatabaseConfigSource, use_database
from triton_workbench.autotune.results import ClaimTimes, TuningDatabase, TuningKey
from triton_workbench.autotune.timing import Timing, measure
from triton_workbench.autotune.tuner import tune
from triton_workbench.autotune.space import Space
from triton_workbench.autotune.strategies import make_strategy
from triton_workbench.autotune.replay import replay

__all__ = ["ClaimTimes", "DatabaseConfigSource", "Space", "Timing", "TuningDatabase", "TuningKey", "make_strategy", "measure",
           "replay", "tune", "use_database"]
