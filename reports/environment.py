"""The Environment section: which device and software each run measured on (runs.environment)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from triton_workbench.reports.html import Section, format_value

# (label shown, key in runs.environment, unit suffix)
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("GPU", "gpu", ""),
    ("Compute capability", "compute_capability", ""),
    ("Driver", "driver", ""),
    ("CUDA", "cuda", ""),
    ("Triton", "triton", ""),
    ("PyTorch", "torch", ""),
    ("Python", "python", ""),
    ("Max SM clock", "max_sm_clock_mhz", " MHz"),
    ("Max memory clock", "max_mem_clock_mhz", " MHz"),
    ("Power limit", "power_limit_w", " W"),
    ("Platform", "platform", ""),
)


def is_interpreter(environment: dict[str, Any] | None) -> bool:
    """True when a run measured in Triton's interpreter on the CPU (or its device is unknown)."""
    environment = environment or {}
    if "interpreter" in environment and environment["interpreter"] is not None:
        return bool(environment["interpreter"])
    return not environment.get("gpu")


def device_label(environment: dict[str, Any] | None) -> str:
    """The device in plain words: the GPU's name, or that there was none."""
    if is_interpreter(environment):
        return "no GPU: Triton interpreter on CPU"
    return str((environment or {}).get("gpu"))


def interpreter_banner(runs: pd.DataFrame) -> str:
    """A plain-words warning for the top of the page when some or all runs had no GPU; '' otherwise."""
    flags = [is_interpreter(env if isinstance(env, dict) else {}) for env in runs["environment"]]
    if flags and all(flags):
        return ("No GPU: every measurement in this report was taken in Triton's interpreter on the CPU. "
                "Interpreter timings show relative behaviour only, never GPU speed.")
    if any(flags):
        return ("Some runs measured on a GPU and some in Triton's interpreter on the CPU (no GPU); "
                "each section says which.")
    return ""


def _present(value: Any) -> bool:
    return value is not None and value == value and value != ""


def environment_section(runs: pd.DataFrame) -> Section | None:
    """One column per distinct environment among `runs`, listing which runs used it."""
    if runs.empty:
        return None
    section = Section("Environment", "environment")
    groups: dict[tuple, dict[str, Any]] = {}
    run_ids: dict[tuple, list[int]] = {}
    for run in runs.itertuples(index=False):
        environment = run.environment if isinstance(run.environment, dict) else {}
        key = tuple(sorted((k, str(v)) for k, v in environment.items()))
        groups.setdefault(key, environment)
        run_ids.setdefault(key, []).append(int(run.run_id))
    environments = list(groups.values())
    rows = {"Runs": [", ".join(map(str, ids)) for ids in run_ids.values()]}
    for label, key, unit in FIELDS:
        values = [environment.get(key) for environment in environments]
        if key == "gpu":
            values = [device_label(environment) for environment in environments]
        if any(_present(value) for value in values):
            rows[label] = [f"{format_value(value)}{unit}" if _present(value) else "unknown" for value in values]
    names = ["value"] if len(environments) == 1 else [f"environment {i + 1}" for i in range(len(environments))]
    table = pd.DataFrame({"": list(rows), **{name: [rows[label][i] for label in rows] for i, name in enumerate(names)}})
    section.add_table(table)
    return section
