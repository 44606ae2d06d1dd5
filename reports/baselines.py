"""Our kernels against PyTorch's own ops, per problem: speed-up bars from the "baselines" table.

The speed-up is recomputed as baseline_time_ms / time_ms (above 1: our kernel is faster) so the
bars mean one thing whatever convention the stored `ratio` used.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from triton_workbench.reports.html import escape, style_figure
from triton_workbench.reports.labels import problem_label


def speedups(baselines: pd.DataFrame) -> pd.DataFrame:
    """series, problem_label, time_ms, baseline_time_ms, speedup: one row per measured pair.

    A series is the kernel, and its pass ('fwd', 'fwd+bwd') where the benchmark timed several.
    """
    frame = baselines.dropna(subset=["time_ms", "baseline_time_ms"])
    frame = frame[(frame["time_ms"] > 0) & (frame["baseline_time_ms"] > 0)]
    series = frame["kernel"].astype(str)
    if "pass" in frame.columns:
        series = series + frame["pass"].map(lambda value: f" {value}" if isinstance(value, str) and value else "")
    return pd.DataFrame({
        "series": series,
        "problem_label": frame["problem"].map(problem_label),
        "time_ms": frame["time_ms"].astype(float),
        "baseline_time_ms": frame["baseline_time_ms"].astype(float),
        "speedup": frame["baseline_time_ms"].astype(float) / frame["time_ms"].astype(float),
    }).reset_index(drop=True)


def baseline_figure(baselines: pd.DataFrame, interpreter: bool) -> go.Figure | None:
    """Horizontal bars of speed-up over PyTorch per problem, one colour per series; None without data."""
    frame = speedups(baselines)
    if frame.empty:
        return None
    fig = go.Figure()
    for series, group in frame.groupby("series", sort=True):
        fig.add_trace(go.Bar(
            y=group["problem_label"].map(escape), x=group["speedup"], orientation="h", name=escape(series),
            text=[f"{value:.2f}×" for value in group["speedup"]], textposition="outside",
            customdata=group[["time_ms", "baseline_time_ms"]].to_numpy(),
            hovertemplate="%{y}<br>%{x:.3g}× (ours %{customdata[0]:.3g} ms, PyTorch %{customdata[1]:.3g} ms)"
                          "<extra>%{fullData.name}</extra>"))
    fig.add_vline(x=1, line=dict(color="#444", dash="dash", width=1))
    where = " (interpreter: relative only)" if interpreter else ""
    fig.update_layout(title=f"Speed-up over PyTorch per problem{where}", barmode="group",
                      yaxis=dict(autorange="reversed", automargin=True))
    fig.update_xaxes(title="PyTorch time / our time (>1: ours is faster)",
                     range=[0, max(1.0, float(frame["speedup"].max())) * 1.15])
    return style_figure(fig, max(300, 110 + 34 * len(frame)))
