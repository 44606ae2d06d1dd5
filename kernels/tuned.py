"""The one narrow door from `kernels` to the tuning database: which config to launch with.

Order: the stored best config for the exact problem, then the nearest tuned shape bucket,
then the kernel's heuristic default. Lookups are cached per process; `clear_cache()` forgets them
(the autotuner calls it after storing a new best).
"""

from __future__ import annotations

import functools
import json
import logging

from triton_workbench.kernels.spec import Config, KernelSpec, Problem, problem_id

log = logging.getLogger("triton_workbench.kernels")


def config_for(spec: KernelSpec, problem: Problem) -> Config:
    """The config to launch `spec` with for `problem`."""
    return dict(_cached(spec, problem_id(problem)))


@functools.lru_cache(maxsize=4096)
def _cached(spec: KernelSpec, key: str) -> tuple[tuple[str, int], ...]:
    problem = json.loads(key)
    config = _stored(spec, problem)
    if config is None or not spec.is_valid(config, problem):
        config = spec.default_config(problem)
    return tuple(sorted(config.items()))


def _stored(spec: KernelSpec, problem: Problem) -> Config | None:
    try:
        from triton_workbench.autotune.database import lookup_best  # imported late: autotune depends on kernels
    except ImportError:
        return None
    try:
        return lookup_best(spec, problem)
    except Exception as error:  # a broken database must never stop a launch
        log.warning("tuned config lookup for %s failed (%s); using the default", spec.name, error)
        return None


def clear_cache() -> None:
    _cached.cache_clear()
