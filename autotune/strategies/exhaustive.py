"""Exhaustive search: every valid config, in the space's order."""

from __future__ import annotations

from triton_workbench.autotune.strategies.base import Strategy


class Exhaustive(Strategy):
    name = "exhaustive"

    def _next_row(self) -> int | None:
        return int(self._unasked_rows()[0])
