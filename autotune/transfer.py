"""Best configs moved between databases as JSON (plain data: nothing executable is ever loaded).

Every imported entry is validated against the kernels of this checkout before anything is stored:
the kernel must exist, the config must name exactly the kernel's parameters with candidate values,
and it must satisfy the kernel's constraints for the entry's problem. One bad entry rejects the file.
"""

from __future__ import annotations

import json
import math
from typing import Any

from triton_workbench.autotune.results import KEY_COLUMNS, TuningDatabase, TuningKey
from triton_workbench.kernels.spec import problem_id

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
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    missing = [name for name in (*KEY_COLUMNS, "config", "objective") if name not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    spec = specs.get(entry["kernel"])
    if spec is None:
        raise ValueError(f"{where}: unknown kernel {entry['kernel']!r}, expected one of {', '.join(sorted(specs))}")
    problem, config = entry["problem"], entry["config"]
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: problem must be an object, got {problem!r}")
    if not isinstance(config, dict) or set(config) != set(spec.params):
        raise ValueError(f"{where}: config of {spec.name} must have exactly the parameters "
                         f"{', '.join(spec.params)}, got {config!r}")  # fmt: skip
    for name, value in config.items():
        if isinstance(value, bool) or value not in list(spec.params[name]):
            raise ValueError(f"{where}: {name}={value!r} is not a candidate of {spec.name} "
                             f"({', '.join(map(str, spec.params[name]))})")  # fmt: skip
    try:
        valid = spec.is_valid(config, problem)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: problem {problem!r} does not fit {spec.name} ({error})") from None
    if not valid:
        raise ValueError(f"{where}: config {config} is invalid for {spec.name} on problem {problem}")
    if entry["objective"] not in ("time", "energy", "edp"):
        raise ValueError(f"{where}: objective must be time, energy or edp, got {entry['objective']!r}")
    text = {column: entry[column] for column in KEY_COLUMNS if column != "problem"}
    if not all(isinstance(value, str) for value in text.values()):
        raise ValueError(f"{where}: {', '.join(text)} must be strings")
    key = TuningKey(problem=problem_id(problem), **text)
    numbers = []
    for column in ("value", "time_ms"):
        value = entry.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {column} must be a number or null, got {value!r}")
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
        raise ValueError(f"not a {FORMAT!r} document (expected an object with format {FORMAT!r})")
    if document.get("version") != VERSION:
        raise ValueError(f"unsupported version {document.get('version')!r}: this workbench reads version {VERSION}")
    entries = document.get("configs")
    if not isinstance(entries, list):
        raise ValueError("configs must be a list")
    validated = [_validated(i, entry, kernels.SPECS) for i, entry in enumerate(entries)]
    stale = 0
    for key, config, objective, value, time_ms in validated:
        database.set_best(key, config, objective, math.nan if value is None else value, time_ms, None)
        stale += key.source_hash != kernels.SPECS[key.kernel].source_hash
    tuned.clear_cache()  # the installed config source may read this database: forget its earlier answers
    return {"stored": len(validated), "stale": stale}
