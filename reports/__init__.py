"""Plotly figures and the self-contained HTML report built from the workbench database."""

from triton_workbench.reports.build import build_sections, write_report

__all__ = ["build_sections", "write_report"]
