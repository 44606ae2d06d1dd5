"""Which config a kernel launches with: the one hook between the kernels and whoever holds tuned configs.

`config_for(spec, problem)` asks the installed `ConfigSource` and falls back to the kernel's
heuristic default when it has no answer, its answer is invalid for the problem, or it fails (a
broken source must never stop a launch: it is logged as a warning). Answers are cached per
process; `install_config_source` and `clear_cache()` forget them (call the latter when the
installed source's answers change, as `autotune.transfer.import_best` does).

Nothing is installed on import: until something is, every launch uses the default config. The
kernels import nothing from the packages above them; autotune provides the database-backed source
(`autotune.use_database(path)`), which the `workbench` command line installs for its --db and
`autotune.tune` for the database it stored into.

`observing(observer)` shows every lookup (spec, problem, chosen config) to `observer` while a
block runs: how `workbench.model_problems` records the problems a model launches.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

from triton_workbench.kernels.spec import Config, KernelSpec, Problem, problem_id

log = logging.getLogger("triton_workbench.kernels")

ConfigSource = Callable[[KernelSpec, Problem], "Config | None"]  # a stored config for the problem, or None
LaunchObserver = Callable[[KernelSpec, Problem, Config], None]  # sees each lookup and the config it chose

_source: ConfigSource | None = None
_observers: list[LaunchObserver] = []


def install_config_source(source: ConfigSource | None) -> ConfigSource | None:
    """Make `source` the one every launch asks (None: default configs only); returns the one it replaces."""
    global _source
    if source is not None and not callable(source):
        raise TypeError(f"source must be callable as source(spec, problem) or None, got {type(source).__name__}")
    previous, _source = _source, source
    clear_cache()
    return previous


def config_source() -> ConfigSource | None:
    """The installed source (None when nothing is installed)."""
    return _source


@contextmanager
def observing(observer: LaunchObserver) -> Iterator[None]:
    """Call `observer(spec, problem, config)` on every `config_for` while the block runs (blocks may nest)."""
    if not callable(observer):
        raise TypeError(f"observer must be callable as observer(spec, problem, config), got {type(observer).__name__}")
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def config_for(spec: KernelSpec, problem: Problem) -> Config:
    """The config to launch `spec` with for `problem`."""
    config = dict(_cached(spec, problem_id(problem)))
    for observer in tuple(_observers):
        observer(spec, problem, dict(config))
    return config


@functools.lru_cache(maxsize=4096)
def _cached(spec: KernelSpec, key: str) -> tuple[tuple[str, int], ...]:
    problem = json.loads(key)
    config = _stored(spec, problem)
    if config is None or not spec.is_valid(config, problem):
        config = spec.default_config(problem)
    return tuple(sorted(config.items()))


def _stored(spec: KernelSpec, problem: Problem) -> Config | None:
    source = _source
    if source is None:
        return None
    try:
        return source(spec, problem)
    except Exception as error:  # a broken database (or any source) must never stop a launch
        log.warning("tuned config lookup for %s failed (%s); using the default", spec.name, error)
        return None


def clear_cache() -> None:
    _cached.cache_clear()
