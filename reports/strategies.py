"""Search-strategy comparisons: mean fraction of the optimum found against the evaluation budget.

From the "strategy_results" table (landscape, budget, strategy, seed, fraction, source): one panel
per landscape, one colour per strategy, workbench strategies solid and Kernel Tuner's dashed.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from triton_workbench.reports.html import escape, style_figure

PANELS_PER_ROW = 3
DASH = {"workbench": "solid", "kernel_tuner": "dash"}


def mean_fractions(results: pd.DataFrame) -> pd.DataFrame:
    """landscape, source, strategy, budget, mean, std, seeds: the fraction averaged over seeds."""
    grouped = results.groupby(["landscape", "source", "strategy", "budget"], as_index=False)["fraction"]
    frame = grouped.agg(mean="mean", std="std", seeds="count")
    return frame.sort_values(["landscape", "source", "strategy", "budget"]).reset_index(drop=True)


def strategies_figure(results: pd.DataFrame) -> go.Figure | None:
    """Mean fraction of optimum (± one standard deviation on hover) per budget, a panel per landscape."""
    if results.empty:
        return None
    means = mean_fractions(results)
    landscapes = list(dict.fromkeys(means["landscape"]))
    columns = min(PANELS_PER_ROW, len(landscapes))
    rows = math.ceil(len(landscapes) / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[escape(name) for name in landscapes],
                        shared_yaxes=True, horizontal_spacing=0.05, vertical_spacing=0.16 if rows > 1 else 0.1)
    palette = px.colors.qualitative.D3
    strategies = list(dict.fromkeys(means["strategy"] + "|" + means["source"]))
    shown: set[str] = set()
    for index, landscape in enumerate(landscapes):
        for key, group in means[means["landscape"] == landscape].groupby(means["strategy"] + "|" + means["source"],
                                                                          sort=False):
            strategy, source = key.split("|", 1)
            label = f"{strategy} ({source})"
            fig.add_trace(go.Scatter(
                x=group["budget"], y=group["mean"], mode="lines+markers", name=escape(label), legendgroup=key,
                showlegend=key not in shown, customdata=group[["std", "seeds"]].to_numpy(),
                line=dict(color=palette[strategies.index(key) % len(palette)], dash=DASH.get(source, "dot")),
                hovertemplate="budget %{x}: %{y:.3f} ± %{customdata[0]:.3f} over %{customdata[1]} seeds"
                              "<extra>" + escape(label) + "</extra>"),
                row=index // columns + 1, col=index % columns + 1)
            shown.add(key)
    budgets = sorted(means["budget"].unique())
    fig.update_xaxes(type="log", tickvals=budgets, ticktext=[f"{budget:g}" for budget in budgets])
    fig.update_xaxes(title_text="evaluations (budget)", row=rows)
    fig.update_yaxes(title_text="mean fraction of optimum", col=1)
    fig.update_layout(title="Strategies: fraction of the optimum found within a budget")
    return style_figure(fig, 180 + 300 * rows)


def final_budget_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per landscape and strategy: the mean fraction at the largest budget tried."""
    means = mean_fractions(results)
    last = means.loc[means.groupby(["landscape", "source", "strategy"])["budget"].idxmax()]
    table = last.rename(columns={"mean": "mean fraction", "std": "std"})
    return table[["landscape", "source", "strategy", "budget", "mean fraction", "std", "seeds"]].reset_index(drop=True)
