"""Tuning-run figures: config heatmaps, top configs, best-so-far and the time/energy Pareto front.

All functions take the trials DataFrame of `TuningDatabase.trials()` (one kernel and problem at a
time where it matters); `prepare_trials` adds the parsed config and readable labels once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from triton_workbench.autotune.objectives import pareto_front
from triton_workbench.database import TrialStatus
from triton_workbench.profiler.device_settings import POWER_LIMIT, SM_CLOCK
from triton_workbench.profiler.windows import throttle_words
from triton_workbench.reports.html import escape, style_figure
from triton_workbench.reports.labels import (BYTE_RATE_UNITS, FLOP_RATE_UNITS, parameters_label, parse_json_object, problem_label,
                            rate_unit)

FAILED_GREY = "#c4c8cd"
MAX_FACET_COLUMNS = 6
MAX_FACET_ROWS = 4
TOP_CONFIGS = 10
# The compiled code's static ceilings (`kernels.ceilings`), shown beside measured times: never measurements.
STATIC_COLUMNS = {"static_tensor_ceiling": "tensor/issue ceiling (static estimate)",
                  "static_memory_ceiling": "memory ceiling (static estimate)"}
# Parameters worth a panel of their own before any other (configs are stored with sorted keys).
PREFERRED_FACETS = ("BLOCK_K", "num_warps", "num_stages")


@dataclass(frozen=True)
class Metric:
    """The quantity a tuning run is judged by, and how to show it."""

    column: str  # trials column
    label: str  # axis / colour-bar label, with the display unit
    scale: float  # display value = column value * scale
    higher_is_better: bool

    def best_index(self, values: pd.Series) -> int:
        return values.idxmax() if self.higher_is_better else values.idxmin()


def choose_metric(trials: pd.DataFrame) -> Metric:
    """TFLOP/s when flops are known, else GB/s, else time; rates scaled to readable units."""
    ok = trials[trials["status"] == TrialStatus.OK]
    suffix = " (interpreter)" if (ok["timer"] == "interpreter").any() else ""
    for column, units in (("tflops", FLOP_RATE_UNITS), ("gbps", BYTE_RATE_UNITS)):
        values = ok[column].dropna()
        if (values > 0).any():
            unit, scale = rate_unit(float(values.max()), units)
            return Metric(column, unit + suffix, scale, True)
    return Metric("time_ms", "time (ms)" + suffix, 1.0, False)


def prepare_trials(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`trials` with one column per tunable parameter, config_label and problem_label added.

    Returns the frame and the parameter names in stored order (the database sorts config keys by name).
    """
    configs = [parse_json_object(config) for config in trials["config"]]
    params: list[str] = []
    for config in configs:
        params.extend(key for key in config if key not in params)
    frame = trials.reset_index(drop=True).copy()
    for param in params:  # object columns: integers stay integers where other kernels lack the parameter
        frame[param] = pd.Series([config.get(param) for config in configs], dtype=object)
    frame["config_label"] = [parameters_label(config) for config in configs]
    frame["problem_label"] = frame["problem"].map(problem_label)
    frame["reason"] = frame["reason"].fillna("").astype(str)
    return frame, params


def _facets(frame: pd.DataFrame, params: list[str]) -> tuple[str, str | None, str | None, str | None, list[str]]:
    """(y, x, facet column, facet row, aggregated) parameters for the heatmap."""
    y = "BLOCK_M" if "BLOCK_M" in params else params[0]
    rest = [param for param in params if param != y]
    x = "BLOCK_N" if "BLOCK_N" in rest else (rest[0] if rest else None)
    varying = [param for param in params if param not in (x, y) and frame[param].nunique(dropna=False) > 1]
    varying.sort(key=lambda p: PREFERRED_FACETS.index(p) if p in PREFERRED_FACETS else len(PREFERRED_FACETS))
    column = next((param for param in varying if frame[param].nunique() <= MAX_FACET_COLUMNS), None)
    row = next((param for param in varying if param != column and frame[param].nunique() <= MAX_FACET_ROWS), None)
    aggregated = [param for param in varying if param not in (column, row)]
    return y, x, column, row, aggregated


def _sorted_values(series: pd.Series) -> list:
    values = series.dropna().unique().tolist()
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def _cell(group: pd.DataFrame, metric: Metric, cell_label: str) -> tuple[float, float, str]:
    """(metric value or NaN, failed marker or NaN, hover text) for one heatmap cell."""
    ok = group[(group["status"] == TrialStatus.OK) & group[metric.column].notna()]
    failed = group[group["status"] != TrialStatus.OK]
    counts = f"{len(group)} config{'s' if len(group) != 1 else ''}" + (f", {len(failed)} failed" if len(failed) else "")
    if not ok.empty:
        best = ok.loc[metric.best_index(ok[metric.column])]
        value = float(best[metric.column]) * metric.scale
        text = (f"{escape(cell_label)}<br><b>{value:.3g} {escape(metric.label)}</b><br>"
                f"best: {escape(best['config_label'])}<br>{counts}")
        return value, math.nan, text
    if failed.empty:
        return math.nan, math.nan, f"{escape(cell_label)}<br>no {escape(metric.label)} measured ({counts})"
    reasons = (failed["status"] + ": " + failed["reason"]).drop_duplicates().head(3)
    text = f"{escape(cell_label)}<br><b>all failed</b> ({counts})<br>" + "<br>".join(
        escape(reason[:120]) for reason in reasons)
    return math.nan, 0.0, text


def config_heatmap(frame: pd.DataFrame, params: list[str], metric: Metric, title: str) -> tuple[go.Figure, str]:
    """Best metric per (BLOCK_M, BLOCK_N) cell, faceted by up to two other parameters.

    Parameters beyond the facets are aggregated (each cell shows the best over them); cells whose
    configs all failed are grey with the reasons on hover; blank cells were never evaluated.
    """
    y, x, col, row, aggregated = _facets(frame, params)
    frame = frame.copy()
    if x is None:
        x, frame["_x"] = "_x", ""
    row_values = _sorted_values(frame[row]) if row else [None]
    col_values = _sorted_values(frame[col]) if col else [None]
    x_values, y_values = _sorted_values(frame[x]), _sorted_values(frame[y])
    titles = [" ".join(part for part in (f"{row}={r}" if row else "", f"{col}={c}" if col else "") if part)
              for r in row_values for c in col_values]
    fig = make_subplots(rows=len(row_values), cols=len(col_values), shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[escape(t) for t in titles] if (row or col) else None,
                        horizontal_spacing=0.03, vertical_spacing=0.12 / max(1, len(row_values) - 1) + 0.04)
    for i, row_value in enumerate(row_values):
        for j, col_value in enumerate(col_values):
            panel = frame
            if row:
                panel = panel[panel[row] == row_value]
            if col:
                panel = panel[panel[col] == col_value]
            values = np.full((len(y_values), len(x_values)), np.nan)
            failed = np.full_like(values, np.nan)
            text = np.full(values.shape, "not evaluated", dtype=object)
            for (y_value, x_value), group in panel.groupby([y, x]):
                a, b = y_values.index(y_value), x_values.index(x_value)
                label = f"{y}={y_value} {x}={x_value}" if x != "_x" else f"{y}={y_value}"
                values[a, b], failed[a, b], text[a, b] = _cell(group, metric, label)
            xs, ys = [str(v) for v in x_values], [str(v) for v in y_values]
            fig.add_trace(go.Heatmap(z=failed, x=xs, y=ys, text=text, hovertemplate="%{text}<extra></extra>",
                                     colorscale=[[0, FAILED_GREY], [1, FAILED_GREY]], showscale=False,
                                     xgap=2, ygap=2), row=i + 1, col=j + 1)
            fig.add_trace(go.Heatmap(z=values, x=xs, y=ys, text=text, hovertemplate="%{text}<extra></extra>",
                                     coloraxis="coloraxis", xgap=2, ygap=2), row=i + 1, col=j + 1)
    fig.update_xaxes(type="category", title_text=x if x != "_x" else "", row=len(row_values))
    fig.update_yaxes(type="category", title_text=y, col=1)
    fig.update_layout(coloraxis=dict(colorscale="Viridis" if metric.higher_is_better else "Viridis_r",
                                     colorbar=dict(title=dict(text=escape(metric.label), side="right"))),
                      title=escape(title))
    style_figure(fig, 150 + 230 * len(row_values))
    parts = [f"Each cell shows the best {metric.label} of the configs with that {y}"
             + (f" and {x}" if x != "_x" else "")]
    if col or row:
        parts.append("panels split by " + " and ".join(p for p in (row, col) if p))
    if aggregated:
        parts.append("taking the best over " + ", ".join(aggregated))
    note = ", ".join(parts) + ". Grey: every config in the cell failed (reason on hover); blank: not evaluated."
    return fig, note


def top_configs_table(frame: pd.DataFrame, metric: Metric, limit: int = TOP_CONFIGS) -> pd.DataFrame:
    """The best `limit` successful configs with their timing spread, the static estimates of their compiled code
    (fractions of peak, labelled as such) and resource use."""
    ok = frame[(frame["status"] == TrialStatus.OK) & frame[metric.column].notna()]
    ok = ok.sort_values(metric.column, ascending=not metric.higher_is_better).head(limit)
    columns = {
        "config": ok["config_label"],
        metric.label: ok[metric.column] * metric.scale,
        "time (ms)": ok["time_ms"],
        "p20-p80 (ms)": [f"{a:.3g}-{b:.3g}" if a == a and b == b else None for a, b in
                         zip(ok["time_ms_p20"], ok["time_ms_p80"])],
        **{label: ok[column] if column in ok else np.nan for column, label in STATIC_COLUMNS.items()},
        "GB/s": ok["gbps"] if metric.column != "gbps" else np.nan,
        "energy/call (J)": ok["energy_j_per_call"],
        "registers": ok["registers"],
        "spills": ok["spills"],
        "shared (bytes)": ok["shared_bytes"],
    }
    if metric.column == "time_ms":
        del columns[metric.label]
    return pd.DataFrame(columns).dropna(axis=1, how="all")


def failures_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed (and pruned: not measured, see `tune --prune-static`) configs counted by status, with one example
    reason each."""
    failed = frame[frame["status"] != TrialStatus.OK]
    grouped = failed.groupby("status", sort=True)
    return pd.DataFrame({"status": list(grouped.groups),
                         "configs": grouped.size().tolist(),
                         "example reason": [group["reason"].iloc[0][:160] for _, group in grouped]})


def best_so_far_figure(frame: pd.DataFrame, metric: Metric) -> go.Figure | None:
    """Every successful evaluation and the best found so far, in evaluation order."""
    ordered = frame.sort_values("trial_id").reset_index(drop=True)
    ordered["evaluation"] = np.arange(1, len(ordered) + 1)
    ok = ordered[(ordered["status"] == TrialStatus.OK) & ordered[metric.column].notna()]
    if ok.empty:
        return None
    values = ok[metric.column] * metric.scale
    best = values.cummax() if metric.higher_is_better else values.cummin()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ok["evaluation"], y=values, mode="markers", name="evaluation",
                             marker=dict(size=6, color="#8aa4c8"), text=ok["config_label"].map(escape),
                             hovertemplate="#%{x}: %{y:.3g}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=ok["evaluation"], y=best, mode="lines", name="best so far",
                             line=dict(shape="hv", width=2.5, color="#d1495b"), hoverinfo="skip"))
    failed = len(ordered) - len(ok)
    fig.update_layout(title=f"Best so far over {len(ordered)} evaluations"
                      + (f" ({failed} failed, not shown)" if failed else ""))
    fig.update_xaxes(title="evaluation", dtick=1 if len(ordered) <= 10 else None)
    fig.update_yaxes(title=escape(metric.label))
    return style_figure(fig, 360)


DEVICE_KNOBS = {POWER_LIMIT: ("power limit", "W"), SM_CLOCK: ("SM clock", "MHz")}  # name and unit in words


def _device_label(config: dict) -> str:
    """A config's device settings in words ('-' when it has none): 'power limit 300 W, SM clock unlocked'."""
    parts = [f"{name} {config[knob]} {unit}" if config[knob] is not None else f"{name} unlocked"
             for knob, (name, unit) in DEVICE_KNOBS.items() if knob in config]  # fmt: skip
    return ", ".join(parts) or "-"


def pareto_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The time/energy Pareto front, fastest first: kernel parameters and device settings apart, with power
    and what held the clocks down (`profiler.windows.throttle_words`: a power cap, heat, or neither)."""
    ok = frame[(frame["status"] == TrialStatus.OK) & frame["energy_j_per_call"].notna() & frame["time_ms"].notna()]
    if ok.empty:
        return pd.DataFrame()
    front = ok.loc[pareto_front(ok["time_ms"], ok["energy_j_per_call"])]
    configs = [json.loads(c) for c in front["config"]]
    return pd.DataFrame({
        "kernel parameters": [parameters_label({k: v for k, v in c.items() if k not in DEVICE_KNOBS}) for c in configs],
        "device settings": [_device_label(c) for c in configs],
        "time (ms)": front["time_ms"].to_list(), "energy/call (J)": front["energy_j_per_call"].to_list(),
        "avg power (W)": front["avg_power_w"].to_list(),
        "throttled": [throttle_words(r, m) for r, m in zip(front["throttle_reasons"], front["remeasured"])],
    })  # fmt: skip


def energy_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Time against energy per call with the Pareto front and the fastest, least-energy, least-EDP configs."""
    ok = frame[(frame["status"] == TrialStatus.OK) & frame["energy_j_per_call"].notna() & frame["time_ms"].notna()]
    if ok.empty:
        return None
    unit, scale = ("mJ", 1e3) if ok["energy_j_per_call"].max() < 1 else ("J", 1.0)
    energy = ok["energy_j_per_call"] * scale
    hover = "%{text}<br>%{x:.3g} ms, %{y:.3g} " + unit + "<extra>%{fullData.name}</extra>"
    labels = ok["config_label"].map(escape)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ok["time_ms"], y=energy, mode="markers", name="config", text=labels,
                             marker=dict(size=7, color="#8aa4c8"), hovertemplate=hover))
    front = pareto_front(ok["time_ms"], ok["energy_j_per_call"])
    fig.add_trace(go.Scatter(x=ok.loc[front, "time_ms"], y=energy[front], mode="lines+markers", name="Pareto front",
                             text=labels[front], line=dict(color="#d1495b", shape="hv"), hovertemplate=hover))
    edp = ok["time_ms"] * ok["energy_j_per_call"]
    # Decreasing sizes, so a config that is several of these at once shows every mark.
    marks = (("fastest", ok["time_ms"].idxmin(), "star", 22),
             ("least energy", ok["energy_j_per_call"].idxmin(), "diamond", 16), ("least EDP", edp.idxmin(), "square", 10))
    for name, index, symbol, size in marks:
        fig.add_trace(go.Scatter(x=[ok.at[index, "time_ms"]], y=[energy[index]], mode="markers", name=name,
                                 text=[labels[index]], hovertemplate=hover,
                                 marker=dict(symbol=symbol, size=size, line=dict(width=1.5, color="#222"))))
    fig.update_layout(title="Time against energy per call")
    fig.update_xaxes(title="time per call (ms)")
    fig.update_yaxes(title=f"energy per call ({unit})")
    return style_figure(fig, 400)
