"""Training runs side by side: loss and accuracy, step time and throughput, energy, time per op.

Runs are overlaid in every figure (Triton kernels solid, PyTorch kernels dashed) so a Triton run
and a torch run of the same model read against each other directly. Frames are the "train_steps",
"train_epochs" and "op_times" tables of the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from triton_workbench.reports.html import escape, style_figure

TOP_OPS = 12
DASH = {"triton": "solid", "torch": "dash"}


@dataclass
class TrainingRun:
    """One training run's stored series."""

    run_id: int
    name: str
    interpreter: bool
    steps: pd.DataFrame  # train_steps
    epochs: pd.DataFrame  # train_epochs
    op_times: pd.DataFrame  # op_times
    power_limits: pd.DataFrame = field(default_factory=pd.DataFrame)  # power_limit_profile (train --power-limit)

    @property
    def kernels(self) -> str:
        """'triton', 'torch' or '' as the steps record it."""
        if self.steps.empty or "kernels" not in self.steps:
            return ""
        return "/".join(sorted(self.steps["kernels"].dropna().astype(str).unique()))

    @property
    def label(self) -> str:
        kernels = f" ({self.kernels} kernels)" if self.kernels else ""
        return f"#{self.run_id} {self.name}{kernels}"

    def ordered_steps(self) -> pd.DataFrame:
        """Steps in training order, numbered 1.. across epochs (`global_step`)."""
        steps = self.steps.sort_values(["epoch", "step"], kind="stable").reset_index(drop=True)
        return steps.assign(global_step=range(1, len(steps) + 1))


def _colours(runs: list[TrainingRun]) -> dict[int, str]:
    palette = px.colors.qualitative.D3
    return {run.run_id: palette[i % len(palette)] for i, run in enumerate(runs)}


def curves_figure(runs: list[TrainingRun], interpreter: bool) -> go.Figure | None:
    """Loss, accuracy, step time and images/s against step, one colour per run."""
    runs = [run for run in runs if not run.steps.empty]
    if not runs:
        return None
    where = " (interpreter)" if interpreter else ""
    panels = (("loss", "loss"), ("accuracy", "accuracy"), ("step_time_ms", f"step time (ms){where}"),
              ("images_per_s", f"images/s{where}"))
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, subplot_titles=[title for _, title in panels],
                        vertical_spacing=0.12, horizontal_spacing=0.08)
    colours = _colours(runs)
    for run in runs:
        steps = run.ordered_steps()
        for index, (column, _) in enumerate(panels):
            if column not in steps or steps[column].isna().all():
                continue
            fig.add_trace(go.Scatter(
                x=steps["global_step"], y=steps[column], mode="lines", name=escape(run.label),
                legendgroup=str(run.run_id), showlegend=index == 0,
                line=dict(color=colours[run.run_id], dash=DASH.get(run.kernels, "dot"), width=1.5),
                hovertemplate="step %{x}: %{y:.4g}<extra>" + escape(run.label) + "</extra>"),
                row=index // 2 + 1, col=index % 2 + 1)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(title="Training curves", legend=dict(orientation="h", y=-0.12))
    return style_figure(fig, 620)


def energy_figure(runs: list[TrainingRun]) -> go.Figure | None:
    """Energy per step against step; None when no run measured energy."""
    runs = [run for run in runs if "energy_j" in run.steps and run.steps["energy_j"].notna().any()]
    if not runs:
        return None
    fig = go.Figure()
    colours = _colours(runs)
    for run in runs:
        steps = run.ordered_steps()
        fig.add_trace(go.Scatter(x=steps["global_step"], y=steps["energy_j"], mode="lines", name=escape(run.label),
                                 line=dict(color=colours[run.run_id], dash=DASH.get(run.kernels, "dot"))))
    fig.update_layout(title="Energy per step")
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="energy (J)", rangemode="tozero")
    return style_figure(fig, 360)


def op_device(op_times: pd.DataFrame) -> str:
    """'cuda' when the trace holds GPU kernel times, else 'cpu' (host time; the interpreter's includes the kernels)."""
    return "cuda" if (op_times["device"] == "cuda").any() else "cpu"


def op_share(op_times: pd.DataFrame) -> pd.DataFrame:
    """op, source, self_time_ms and share_pct of the total, on the trace's main device (see `op_device`)."""
    rows = op_times[op_times["device"] == op_device(op_times)]
    totals = rows.groupby("op", as_index=False).agg(self_time_ms=("self_time_ms", "sum"), source=("source", "first"))
    total = totals["self_time_ms"].sum()
    totals["share_pct"] = 100 * totals["self_time_ms"] / total if total > 0 else 0.0
    return totals.sort_values("self_time_ms", ascending=False).reset_index(drop=True)


def op_times_figure(runs: list[TrainingRun], interpreter: bool) -> go.Figure | None:
    """Share of self time per op (the TOP_OPS largest over all runs), grouped by run."""
    runs = [run for run in runs if not run.op_times.empty]
    if not runs:
        return None
    shares = {run.run_id: op_share(run.op_times) for run in runs}
    ranked = pd.concat(shares.values()).groupby("op")["share_pct"].max().sort_values(ascending=False)
    top_ops = list(ranked.index[:TOP_OPS])
    fig = go.Figure()
    colours = _colours(runs)
    for run in runs:
        share = shares[run.run_id].set_index("op").reindex(top_ops)
        fig.add_trace(go.Bar(y=[escape(op) for op in top_ops], x=share["share_pct"], orientation="h",
                             name=escape(run.label), marker_color=colours[run.run_id],
                             customdata=share[["self_time_ms", "source"]].to_numpy(),
                             hovertemplate="%{y} (%{customdata[1]}): %{x:.1f}% "
                                           "(%{customdata[0]:.4g} ms self time)<extra></extra>"))
    devices = {op_device(run.op_times) for run in runs}
    if devices == {"cuda"}:
        measured = "GPU kernel time"
    elif interpreter:
        measured = "CPU time, interpreter: includes the kernels"
    else:
        measured = "CPU time" if devices == {"cpu"} else "GPU kernel time where traced on a GPU, else CPU time"
    fig.update_layout(title=f"Where a step's time goes: self time per op ({measured})", barmode="group",
                      yaxis=dict(autorange="reversed", automargin=True))
    fig.update_xaxes(title="share of the profiled steps' self time (%)", rangemode="tozero")
    return style_figure(fig, max(320, 120 + 22 * len(top_ops) * len(runs)))


def summary_table(runs: list[TrainingRun]) -> pd.DataFrame:
    """One row per run: the numbers to compare Triton and torch kernels by."""
    rows = []
    for run in runs:
        steps = run.ordered_steps()
        row = {"run": run.label, "steps": len(steps)}
        if not steps.empty:
            later = steps.iloc[1:] if len(steps) > 1 else steps  # the first step pays for compilation
            row.update({"median step (ms)": later["step_time_ms"].median(),
                        "median images/s": later["images_per_s"].median(),
                        "final loss": steps["loss"].iloc[-1], "final accuracy": steps["accuracy"].iloc[-1]})
            if "energy_j" in steps and steps["energy_j"].notna().any():
                row["mean energy/step (J)"] = steps["energy_j"].mean()
        if not run.epochs.empty:
            last = run.epochs.sort_values("epoch").iloc[-1]
            row.update({"eval loss": last.get("eval_loss"), "eval accuracy": last.get("eval_accuracy"),
                        "J/image": last.get("j_per_image")})
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def power_limit_table(run: TrainingRun) -> pd.DataFrame:
    """The power-limit optimiser's profile of one run: each limit's step time, energy, power and cost, the
    chosen one marked (empty when the run did not choose its limit)."""
    profile = run.power_limits
    if profile.empty:
        return pd.DataFrame()
    profile = profile.sort_values("power_limit_w", ascending=False)
    return pd.DataFrame({
        "power limit (W)": profile["power_limit_w"].to_list(), "steps": profile["steps"].astype(int).to_list(),
        "step time (ms)": (profile["time_s"] * 1e3).to_list(), "energy/step (J)": profile["energy_j"].to_list(),
        "avg power (W)": profile["avg_power_w"].to_list(), "cost (J)": profile["cost"].to_list(),
        "eta": profile["eta"].to_list(), "chosen": profile["chosen"].map(lambda c: "yes" if c else "").to_list(),
    })  # fmt: skip
