"""Roofline: achieved FLOP/s against arithmetic intensity, under the device's published ceilings.

Arithmetic intensity is flops / bytes; each trial carries both rates (tflops, gbps), so the
intensity is tflops * 1e12 / (gbps * 1e9). Ceilings come from `kernels.hardware`'s table of known
GPUs, keyed by the NVML device name; interpreter measurements are plotted without GPU ceilings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from triton_workbench.database import TrialStatus
from triton_workbench.kernels.hardware import gpu_by_name
from triton_workbench.reports.html import escape, style_figure
from triton_workbench.reports.labels import FLOP_RATE_UNITS, rate_unit


def roofline_points(trials: pd.DataFrame) -> pd.DataFrame:
    """Successful trials with both rates known, plus intensity (flop/byte) and achieved TFLOP/s."""
    ok = trials[(trials["status"] == TrialStatus.OK) & (trials["tflops"] > 0) & (trials["gbps"] > 0)].copy()
    ok["intensity"] = ok["tflops"] * 1e12 / (ok["gbps"] * 1e9)
    return ok


def roofline_figure(trials: pd.DataFrame, device_name: str | None, interpreter: bool) -> tuple[go.Figure, str] | None:
    """The roofline of `trials` (one trace per kernel/problem) and a note on the ceilings shown.

    `trials` needs status, tflops, gbps, kernel, problem_label, config_label. None when no
    trial has both rates.
    """
    points = roofline_points(trials)
    if points.empty:
        return None
    peaks = None if interpreter else gpu_by_name(device_name)
    # GPU rooflines stay in TFLOP/s; interpreter rates are scaled to a readable unit.
    unit, scale = ("TFLOP/s", 1.0) if peaks else rate_unit(float(points["tflops"].max()), FLOP_RATE_UNITS)
    # A decade-wide margin either side; set explicitly, because a log axis whose points all share one
    # intensity (every config of one problem does) autoranges to nothing and draws no ticks.
    low, high = points["intensity"].min() / 4, points["intensity"].max() * 4
    fig = go.Figure()
    for (kernel, problem), group in points.groupby(["kernel", "problem_label"], sort=False):
        fig.add_trace(go.Scatter(
            x=group["intensity"], y=group["tflops"] * scale, mode="markers", name=escape(f"{kernel} {problem}"),
            marker=dict(size=8, opacity=0.75), text=group["config_label"].map(escape),
            hovertemplate="%{text}<br>%{x:.3g} FLOP/byte<br>%{y:.3g} " + unit + "<extra></extra>"))
    if interpreter:
        title = "Roofline: interpreter measurements (CPU)"
        note = "Measured in Triton's interpreter on the CPU, so no GPU bandwidth or compute ceilings are drawn."
    elif peaks is None:
        title = f"Roofline on {device_name}"
        note = f"No published peaks are known for {device_name}; ceilings are omitted."
    else:
        title = f"Roofline on {device_name}"
        note = (f"Ceilings: {peaks.name} datasheet, {peaks.bandwidth_gbps:,.0f} GB/s memory bandwidth and dense "
                + ", ".join(f"{label} {value:g} TFLOP/s" for label, value in peaks.compute_tflops.items()) + ".")
        low, high = min(low, 0.1), max(high, 1e4)
        intensity = np.geomspace(low, high, 200)
        for label, compute in peaks.compute_tflops.items():
            fig.add_trace(go.Scatter(
                x=intensity, y=np.minimum(compute, peaks.bandwidth_gbps * 1e9 * intensity / 1e12),
                mode="lines", name=f"{label} roof", line=dict(dash="dot", width=1.5), hoverinfo="skip"))
    fig.update_xaxes(type="log", range=[np.log10(low), np.log10(high)], title="arithmetic intensity (FLOP / byte)")
    fig.update_yaxes(type="log", title=f"achieved {unit}" + (" (interpreter)" if interpreter else ""))
    fig.update_layout(title=escape(title))
    return style_figure(fig, 440), note
