"""Readable labels for the JSON problems and configs stored with trials and baselines."""

from __future__ import annotations

import json
from typing import Any, Mapping


def parse_json_object(text: Any) -> dict:
    """The dict a JSON string encodes; {} when it is missing or not a JSON object."""
    try:
        parsed = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def parameters_label(parameters: Mapping[str, Any]) -> str:
    """"BLOCK_M=64 BLOCK_N=128": a config or problem on one line."""
    return " ".join(f"{key}={value}" for key, value in parameters.items())


def problem_label(problem: Any) -> str:
    """A stored problem (JSON) as "M=512 N=512 K=512 dtype=fp16", or the text itself if not JSON."""
    parsed = parse_json_object(problem)
    return parameters_label(parsed) if parsed else str(problem)


FLOP_RATE_UNITS = ("TFLOP/s", "GFLOP/s", "MFLOP/s", "kFLOP/s")  # each 1000x smaller than the one before
BYTE_RATE_UNITS = ("GB/s", "MB/s", "kB/s")


def rate_unit(max_value: float, units: tuple[str, ...]) -> tuple[str, float]:
    """The largest of `units` in which `max_value` (given in units[0]) shows as at least 0.1, and its scale."""
    scale = 1.0
    for unit in units[:-1]:
        if max_value * scale >= 0.1:
            return unit, scale
        scale *= 1000
    return units[-1], scale
