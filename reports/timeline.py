"""Power, temperature and SM clock over a run, with its measurement windows shaded and throttling marked.

Takes the profiler's "samples" and "windows" frames (columns in profiler.nvml_sampler.SAMPLE_COLUMNS
and profiler.windows.WINDOW_COLUMNS). Long traces are binned for the page; many windows are
shaded in groups so the figure stays light.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from triton_workbench.profiler.windows import THROTTLE_REASONS_MASK
from triton_workbench.reports.html import escape, style_figure

MAX_POINTS = 4000
MAX_SHADED_WINDOWS = 300
WINDOW_COLOURS = ("rgba(70, 130, 180, 0.10)", "rgba(70, 130, 180, 0.20)")
THROTTLED_COLOUR = "rgba(214, 39, 40, 0.22)"

# (column, axis title, aggregation when binning)
ROWS: tuple[tuple[str, str, str], ...] = (
    ("power_w", "power (W)", "mean"),
    ("gpu_temp_c", "GPU temp (°C)", "max"),
    ("sm_clock_mhz", "SM clock (MHz)", "min"),
)


def throttled_samples(samples: pd.DataFrame) -> pd.Series:
    """True for samples whose clock-event reasons include power or thermal throttling."""
    if "clock_event_reasons" not in samples:
        return pd.Series(False, index=samples.index)
    reasons = pd.to_numeric(samples["clock_event_reasons"], errors="coerce")
    known = reasons.notna()
    flags = pd.Series(False, index=samples.index)
    flags[known] = (reasons[known].astype(np.int64) & THROTTLE_REASONS_MASK) != 0
    return flags


def _binned(samples: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """At most MAX_POINTS rows: equal time bins, each column aggregated as ROWS says."""
    if len(samples) <= MAX_POINTS:
        return samples
    bins = pd.cut(samples["time_s"], MAX_POINTS, labels=False)
    how = {"time_s": "mean", **{column: agg for column, _, agg in ROWS if column in columns}}
    if "mem_temp_c" in columns:
        how["mem_temp_c"] = "max"
    return samples.groupby(bins).agg(how).dropna(subset=["time_s"])


def _throttled_windows(windows: pd.DataFrame) -> pd.Series:
    """True for windows the profiler flagged as throttled (unknown counts as not)."""
    if "throttled" not in windows:
        return pd.Series(False, index=windows.index)
    return windows["throttled"].map(lambda value: not pd.isna(value) and bool(value)).astype(bool)


def _window_groups(windows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Windows to shade (consecutive ones merged when there are too many) and the group size."""
    size = max(1, int(np.ceil(len(windows) / MAX_SHADED_WINDOWS)))
    ordered = windows.assign(throttled_flag=_throttled_windows(windows)).sort_values("start_s").reset_index(drop=True)
    ordered = ordered.assign(group=np.arange(len(ordered)) // size)
    grouped = ordered.groupby("group").agg(start_s=("start_s", "min"), end_s=("end_s", "max"),
                                           throttled_flag=("throttled_flag", "any"))
    return grouped, size


def timeline_figure(samples: pd.DataFrame, windows: pd.DataFrame,
                    window_kind: str = "trial") -> tuple[go.Figure, str] | None:  # fmt: skip
    """The run's trace, one row per measured quantity; None when no quantity was sampled."""
    if samples.empty or "time_s" not in samples:
        return None
    samples = samples.sort_values("time_s")
    rows = [(column, title) for column, title, _ in ROWS if column in samples and samples[column].notna().any()]
    if not rows:
        return None
    flags = throttled_samples(samples)
    columns = [column for column, _ in rows]
    shown = _binned(samples, columns + (["mem_temp_c"] if "mem_temp_c" in samples else []))
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.06)
    for index, (column, title) in enumerate(rows, start=1):
        fig.add_trace(go.Scatter(x=shown["time_s"], y=shown[column], mode="lines", name=title,
                                   line=dict(width=1.4)), row=index, col=1)
        if column == "gpu_temp_c" and "mem_temp_c" in shown and shown["mem_temp_c"].notna().any():
            fig.add_trace(go.Scatter(x=shown["time_s"], y=shown["mem_temp_c"], mode="lines",
                                       name="memory temp (°C)", line=dict(width=1.2, dash="dot")), row=index, col=1)
        fig.update_yaxes(title_text=title, row=index, col=1)
    notes = []
    if flags.any():
        marks = samples[flags]
        marks = marks.iloc[:: max(1, len(marks) // MAX_POINTS)]
        column, _ = rows[-1]
        fig.add_trace(go.Scatter(x=marks["time_s"], y=marks[column], mode="markers", name="throttled",
                                   marker=dict(symbol="x", size=6, color="#d62728")), row=len(rows), col=1)
        notes.append(f"{int(flags.sum())} samples were power- or thermally throttled (red crosses)")
    if not windows.empty:
        groups, size = _window_groups(windows)
        # Shapes set in one go (add_vrect per window is quadratic), each spanning every row.
        fig.update_layout(shapes=[
            dict(type="rect", xref="x", yref="paper", x0=group.start_s, x1=group.end_s, y0=0, y1=1, line_width=0,
                 layer="below", fillcolor=THROTTLED_COLOUR if group.throttled_flag else WINDOW_COLOURS[group.Index % 2])
            for group in groups.itertuples()])
        top_column = rows[0][0]
        level = float(np.nanmax(samples[top_column].to_numpy(dtype=float)))
        middles = (windows["start_s"] + windows["end_s"]) / 2
        hover = [escape(f"{row.name}: {row.duration_s * 1e3:.3g} ms, {row.energy_j:.3g} J"
                        if row.energy_j == row.energy_j else f"{row.name}: {row.duration_s * 1e3:.3g} ms")
                 for row in windows.itertuples()]
        fig.add_trace(go.Scatter(x=middles, y=[level] * len(windows), mode="markers", name=f"{window_kind} windows",
                                   marker=dict(size=5, color="rgba(70,130,180,0.6)", symbol="triangle-down"),
                                   text=hover, hovertemplate="%{text}<extra></extra>"), row=1, col=1)
        shading = f"{window_kind} windows shaded blue" + (f" in groups of {size}" if size > 1 else "")
        throttled_windows = int(_throttled_windows(windows).sum())
        if throttled_windows:
            shading += f", {throttled_windows} throttled ones red"
        notes.insert(0, shading + " (hover the triangles for each window)")
    fig.update_xaxes(title_text="time (s)", row=len(rows), col=1)
    fig.update_layout(title="Power, temperature and SM clock", hovermode="x unified" if windows.empty else "closest")
    style_figure(fig, 130 + 170 * len(rows))
    note = "; ".join(notes)
    return fig, (note[:1].upper() + note[1:] + ".") if note else ""
