"""Best configs moved between databases as JSON (plain data: nothing executable is ever loaded).

Every imported entry is validated against the kernels of this checkout before anything is stored:
the kernel must exist, the problem must be one of its problems (`KernelSpec.validate_problem`: its
entries, types and ranges; not the memory of this device, since a file may come from a larger GPU),
the config must name exactly the kernel's parameters with candidate values and satisfy the kernel's
constraints for the problem, and the numbers must be finite. One bad entry rejects the file, and a
valid file is stored in one transaction: all of it or, interrupted, none.
"""

from __future__ import annotations

import json
import math
from typing import Any

from triton_workbench.autotune.results import KEY_COLUMNS, TuningDatabase, TuningKey
from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.spec import ProblemError, problem_id

FORMAT = "triton-workbench best configs"
VERSION = 1


def export_best(database: TuningDatabase, kernel: str | None = None) -> dict[str, Any]:
    """The stored best configs (all, or one kernel's) as a JSON-ready document."""
    entries = []
    for row in database.best_configs(kernel).to_dict("records"):
        entry = {column: row[column] for column in KEY_COLUMNS}
        entry["problem"] = json.loads(row["problem"])
        entry["config"] = json.loads(row["config"])
        entry["objective"] = row["objective"]
        for column in ("value", "time_ms"):
            entry[column] = None if row[column] is None or math.isnan(row[column]) else float(row[column])
        entries.append(entry)
    return {"format": FORMAT, "version": VERSION, "configs": entries}


def _validated(index: int, entry: Any, specs: dict) -> tuple[TuningKey, dict[str, int], str, float | None, float | None]:
    where = f"configs[{index}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{where} must be an object, got {type(entry).__name__}")
    missing = [name for name in (*KEY_COLUMNS, "config", "objective") if name not in entry]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}")
    spec = specs.get(entry["kernel"]) if isinstance(entry["kernel"], str) else None
    if spec is None:
        raise UsageError(f"{where}: unknown kernel {entry['kernel']!r}, expected one of {', '.join(sorted(specs))}")
    problem, config = entry["problem"], entry["config"]
    try:
        spec.validate_problem(problem, check_memory=False)
    except ProblemError as error:
        raise UsageError(f"{where}: {error}") from None
    if not isinstance(config, dict) or set(config) != set(spec.params):
        raise UsageError(f"{where}: config of {spec.name} must have exactly the parameters "
                         f"{', '.join(spec.params)}, got {config!r}")  # fmt: skip
    for name, value in config.items():
        if type(value) is not int or value not in list(spec.params[name]):
            raise UsageError(f"{where}: {name}={value!r} is not a candidate of {spec.name} "
                             f"({', '.join(map(str, spec.params[name]))})")  # fmt: skip
    if not spec.is_valid(config, problem):
        raise UsageError(f"{where}: config {config} is invalid for {spec.name} on problem {problem}")
    if entry["objective"] not in ("time", "energy", "edp"):
        raise UsageError(f"{where}: objective must be time, energy or edp, got {entry['objective']!r}")
    text = {column: entry[column] for column in KEY_COLUMNS if column != "problem"}
    if not all(isinstance(value, str) for value in text.values()):
        raise UsageError(f"{where}: {', '.join(text)} must be strings")
    key = TuningKey(problem=problem_id(problem), **text)
    numbers = []
    for column in ("value", "time_ms"):
        value = entry.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise UsageError(f"{where}: {column} must be a finite number >= 0 or null, got {value!r}")
        numbers.append(None if value is None else float(value))
    return key, {name: int(value) for name, value in config.items()}, entry["objective"], numbers[0], numbers[1]


def import_best(database: TuningDatabase, document: Any) -> dict[str, int]:
    """Validate a document from `export_best` and store its configs; returns counts (stored, stale).

    stale: entries tuned for another version of the kernel's source (they are stored, but
    `lookup_best` uses them only if that source comes back).
    """
    from triton_workbench import kernels
    from triton_workbench.kernels import tuned

    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UsageError(f"not a {FORMAT!r} document (expected an object with format {FORMAT!r})")
    if document.get("version") != VERSION:
        raise UsageError(f"unsupported version {document.get('version')!r}: this workbench reads version {VERSION}")
    entries = document.get("configs")
    if not isinstance(entries, list):
        raise UsageError("configs must be a list")
    validated = [_validated(i, entry, kernels.SPECS) for i, entry in enumerate(entries)]
    database.set_best_configs((key, config, objective, math.nan if value is None else value, time_ms, None)
                              for key, config, objective, value, time_ms in validated)  # all or nothing
    stale = sum(key.source_hash != kernels.SPECS[key.kernel].source_hash for key, *_ in validated)
    tuned.clear_cache()  # the installed config source may read this database: forget its earlier answers
    return {"stored": len(validated), "stale": stale}
