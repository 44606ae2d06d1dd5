"""Search-strategy comparisons: mean fraction of the optimum found against the evaluation budget.

From the "strategy_results" table (landscape, budget, strategy, seed, fraction, source): one panel
per landscape, and the regret over time averaged over the development and the held-out landscapes;
one colour per strategy, workbench strategies solid and Kernel Tuner's dashed.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from triton_workbench.autotune.compare import HOLDOUT, landscape_groups, summary_with_errors
from triton_workbench.reports.html import escape, style_figure

PANELS_PER_ROW = 3
DASH = {"workbench": "solid", "kernel_tuner": "dash"}
REGRET_FLOOR = 1e-4  # regret is clipped here on the log axis, so that finding the optimum (0) shows
REGRET_GROUPS = ("development", "held out")


def _colours(frame: pd.DataFrame) -> dict[str, str]:
    """One colour per "strategy|source", the same in every figure of a run."""
    palette = px.colors.qualitative.D3
    keys = sorted(set(frame["strategy"] + "|" + frame["source"]))
    return {key: palette[index % len(palette)] for index, key in enumerate(keys)}


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
    colours = _colours(results)
    shown: set[str] = set()
    for index, landscape in enumerate(landscapes):
        for key, group in means[means["landscape"] == landscape].groupby(means["strategy"] + "|" + means["source"],
                                                                          sort=False):
            strategy, source = key.split("|", 1)
            label = f"{strategy} ({source})"
            fig.add_trace(go.Scatter(
                x=group["budget"], y=group["mean"], mode="lines+markers", name=escape(label), legendgroup=key,
                showlegend=key not in shown, customdata=group[["std", "seeds"]].to_numpy(),
                line=dict(color=colours[key], dash=DASH.get(source, "dot")),
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


def regret_figure(results: pd.DataFrame, holdout: Sequence[str] = HOLDOUT) -> go.Figure | None:
    """Mean regret (1 - fraction of the optimum) over the development landscapes and over the held-out ones
    against the evaluations, log-log, with error bars of one standard error over seeds (`summary_with_errors`)."""
    summary = summary_with_errors(results, holdout)
    summary = summary[summary["group"].isin(REGRET_GROUPS)].sort_values("budget", kind="stable")
    if summary.empty:
        return None
    groups = [group for group in REGRET_GROUPS if group in set(summary["group"])]
    sizes = {group: len(members) for group, members in landscape_groups(results["landscape"], holdout).items()}
    titles = [f"{group} ({sizes[group]} landscape{'s' * (sizes[group] != 1)})" for group in groups]
    fig = make_subplots(rows=1, cols=len(groups), shared_yaxes=True, horizontal_spacing=0.05, subplot_titles=titles)
    colours = _colours(results)
    shown: set[str] = set()
    for column, group in enumerate(groups, 1):
        rows = summary[summary["group"] == group]
        for key, line in rows.groupby(rows["strategy"] + "|" + rows["source"], sort=True):
            strategy, source = key.split("|", 1)
            label = f"{strategy} ({source})"
            regret = (1 - line["mean"]).clip(lower=REGRET_FLOOR)
            se = line["se"].fillna(0.0)
            below = regret - (regret - se).clip(lower=REGRET_FLOOR)  # the bar stops at the floor, not below 0
            fig.add_trace(go.Scatter(
                x=line["budget"], y=regret, mode="lines+markers", name=escape(label), legendgroup=key,
                showlegend=key not in shown, customdata=line[["se", "seeds"]].to_numpy(),
                error_y=dict(type="data", array=se.to_numpy(), arrayminus=below.to_numpy(), thickness=1),
                line=dict(color=colours[key], dash=DASH.get(source, "dot")),
                hovertemplate="budget %{x}: regret %{y:.4f} ± %{customdata[0]:.4f} over %{customdata[1]} seeds"
                              "<extra>" + escape(label) + "</extra>"),
                row=1, col=column)
            shown.add(key)
    budgets = sorted(summary["budget"].unique())
    fig.update_xaxes(type="log", tickvals=budgets, ticktext=[f"{budget:g}" for budget in budgets],
                     title_text="evaluations (budget)")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="mean regret (1 − fraction of optimum)", col=1)
    fig.update_layout(title="Strategies: regret over time, development and held-out landscapes")
    return style_figure(fig, 480)


def final_budget_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per landscape and strategy: the mean fraction at the largest budget tried."""
    means = mean_fractions(results)
    last = means.loc[means.groupby(["landscape", "source", "strategy"])["budget"].idxmax()]
    table = last.rename(columns={"mean": "mean fraction", "std": "std"})
    return table[["landscape", "source", "strategy", "budget", "mean fraction", "std", "seeds"]].reset_index(drop=True)
