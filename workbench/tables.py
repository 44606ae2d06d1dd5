"""Aligned plain-text tables for the terminal: one formatter for every command that prints one."""

from __future__ import annotations

import numbers

import pandas as pd


def format_table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """`frame` as text: a header, a rule, numbers right-aligned and text left-aligned."""
    if frame.empty:
        return "(no rows)"
    columns = [str(column) for column in frame.columns]
    cells = [[_cell(value, float_format) for value in row] for row in frame.itertuples(index=False)]
    numeric = [all(isinstance(row[i], numbers.Number) and not isinstance(row[i], bool) for row in
                   frame.itertuples(index=False)) for i in range(len(columns))]  # fmt: skip
    widths = [max(len(columns[i]), *(len(row[i]) for row in cells)) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric))

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _cell(value: object, float_format: str) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else float_format.format(value)
    return str(value)
