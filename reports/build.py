"""Read the database and assemble the report: one section per kind of data, shown only where it exists."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from triton_workbench.autotune.compare import HOLDOUT
from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.database import SERIES_TABLES, RunKind, SeriesTable, Table, TrialStatus
from triton_workbench.kernels.errors import UsageError
from triton_workbench.reports.baselines import baseline_figure, speedups
from triton_workbench.reports.environment import device_label, environment_section, interpreter_banner, is_interpreter
from triton_workbench.reports.html import Section, anchor_for, render_page
from triton_workbench.reports.roofline import roofline_figure
from triton_workbench.reports.strategies import final_budget_table, regret_figure, strategies_figure
from triton_workbench.reports.timeline import timeline_figure
from triton_workbench.reports.training import TrainingRun, curves_figure, energy_figure as training_energy_figure
from triton_workbench.reports.training import op_times_figure, power_limit_table, summary_table
from triton_workbench.reports.tuning import (best_so_far_figure, pareto_table, choose_metric, config_heatmap, energy_figure, failures_table,
                            prepare_trials, top_configs_table)

TITLE = "Triton workbench report"


class ReportData:
    """The selected runs and every stored series of theirs, read once."""

    def __init__(self, db: TuningDatabase, run_ids: Sequence[int] | None):
        runs = db.runs().sort_values("run_id").reset_index(drop=True)
        if run_ids:
            missing = sorted(set(int(run_id) for run_id in run_ids) - set(runs["run_id"]))
            if missing:
                raise UsageError(f"run_ids {missing} are not in {db.path} (it has runs "
                                 f"{', '.join(map(str, runs['run_id'])) or 'none'})")
            runs = runs[runs["run_id"].isin([int(run_id) for run_id in run_ids])].reset_index(drop=True)
        self.runs = runs
        selected = runs["run_id"].tolist() if run_ids else None  # None: every run, no filter to send
        tables = {table: db.read(table, selected) for table in SERIES_TABLES}
        tables[Table.TRIALS] = db.trials(selected)
        self._by_run = {table: _split_by_run(frame) for table, frame in tables.items()}

    def series(self, table: str, run_id: int) -> pd.DataFrame:
        """The rows of `table` (a series table, or "trials") for one run; empty if it has none."""
        groups, empty = self._by_run[table]
        return groups.get(int(run_id), empty)

    def runs_of(self, kind: str | None = None, having: str | None = None) -> list[pd.Series]:
        """Runs of `kind`, or runs with rows in table `having` (trials included)."""
        return [run for _, run in self.runs.iterrows()
                if (kind is not None and run["kind"] == kind)
                or (having is not None and int(run["run_id"]) in self._by_run[having][0])]


def _split_by_run(frame: pd.DataFrame) -> tuple[dict[int, pd.DataFrame], pd.DataFrame]:
    """A table's rows per run, read once for every section, and its empty frame for runs without rows."""
    if frame.empty:
        return {}, frame
    groups = {int(run_id): rows.reset_index(drop=True) for run_id, rows in frame.groupby("run_id", sort=False)}
    return groups, frame.iloc[:0]


def _run_title(run: pd.Series) -> str:
    return f"Run {run['run_id']}: {run['name']}"


def _when(timestamp: object) -> str:
    """A stored ISO timestamp (UTC) as "2026-11-21 05:43:27 UTC"; '' when missing."""
    if not isinstance(timestamp, str) or not timestamp:
        return ""
    return timestamp.replace("T", " ")[:19] + " UTC"


def _run_meta_text(run: pd.Series) -> str:
    finished = f", finished {_when(run['finished_at'])}" if _when(run["finished_at"]) else ""
    return (f"{run['kind']} run, status {run['status']}, started {_when(run['started_at'])}{finished}; "
            f"device: {device_label(run['environment'])}.")


def _timeline_section(data: ReportData, run: pd.Series, window_kind: str, title: str,
                      intro: str = "") -> Section | None:  # fmt: skip
    """The run's power/temperature/clock trace as a section of its own; None without samples."""
    result = timeline_figure(data.series(SeriesTable.SAMPLES, run["run_id"]), data.series(SeriesTable.WINDOWS, run["run_id"]),
                             window_kind)
    if result is None:
        return None
    section = Section(title, anchor_for(run["kind"], run["run_id"], "timeline"))
    if intro:
        section.add_text(intro, "note")
    figure, note = result
    section.add_figure(figure, note)
    return section


def runs_section(data: ReportData) -> Section:
    section = Section("Runs", "runs")
    section.add_table(pd.DataFrame({
        "run": data.runs["run_id"], "kind": data.runs["kind"], "name": data.runs["name"],
        "status": data.runs["status"], "started": data.runs["started_at"].map(_when),
        "device": [device_label(environment) for environment in data.runs["environment"]],
    }))
    return section


def tuning_run_section(data: ReportData, run: pd.Series) -> Section:
    """Heatmap, top configs, failures, best-so-far and energy per kernel/problem; roofline and timeline per run."""
    section = Section(_run_title(run), anchor_for(RunKind.TUNE, run["run_id"]))
    section.add_text(_run_meta_text(run), "note")
    trials = data.series(Table.TRIALS, run["run_id"])
    interpreter = is_interpreter(run["environment"])
    if trials.empty:
        section.add_text("No trials were recorded in this run.")
    else:
        frame, params = prepare_trials(trials)
        for (kernel, problem), group in frame.groupby(["kernel", "problem_label"], sort=False):
            part = Section(f"{kernel}: {problem}", anchor_for(RunKind.TUNE, run["run_id"], kernel, problem))
            metric = choose_metric(group)
            ok_count = int((group["status"] == TrialStatus.OK).sum())
            part.add_text(f"{len(group)} configs evaluated, {ok_count} succeeded.")
            used = [param for param in params if group[param].notna().any()]
            if used:
                figure, note = config_heatmap(group, used, metric, f"{metric.label} by config")
                part.add_figure(figure, note)
            top = top_configs_table(group, metric)
            if not top.empty:
                part.add_table(top, f"Top {len(top)} configs by {metric.label}")
            if ok_count < len(group):
                pruned = (group["status"] == TrialStatus.PRUNED).any()
                part.add_table(failures_table(group), "Failed or pruned configs" if pruned else "Failed configs")
            best = best_so_far_figure(group, metric)
            if best is not None:
                part.add_figure(best)
            energy = energy_figure(group)
            if energy is not None:
                part.add_figure(energy, "Pareto front: no other config is both faster and uses less energy. "
                                        "EDP: energy-delay product (energy × time).")
                part.add_table(pareto_table(group), "The Pareto front, kernel parameters and device settings apart "
                                                    "(throttled: power or heat held the clocks down in the trial)")
            section.add(part)
        roofline = roofline_figure(frame, run["environment"].get("gpu"), interpreter)
        if roofline is not None:
            part = Section("Roofline", anchor_for(RunKind.TUNE, run["run_id"], "roofline"))
            figure, note = roofline
            part.add_figure(figure, note)
            section.add(part)
    timeline = _timeline_section(data, run, "trial", "Power, temperature and clocks")
    if timeline is not None:
        section.add(timeline)
    return section


def baselines_section(data: ReportData) -> Section | None:
    runs = data.runs_of(having=SeriesTable.BASELINES)
    if not runs:
        return None
    section = Section("Baselines: our kernels against PyTorch", "baselines")
    for run in runs:
        baselines = data.series(SeriesTable.BASELINES, run["run_id"])
        part = Section(_run_title(run), anchor_for("baselines", run["run_id"]))
        part.add_text(_run_meta_text(run), "note")
        figure = baseline_figure(baselines, is_interpreter(run["environment"]))
        if figure is None:
            part.add_text("No complete baseline measurements in this run.")
        else:
            part.add_figure(figure)
            table = speedups(baselines).rename(columns={
                "series": "kernel", "problem_label": "problem", "time_ms": "ours (ms)",
                "baseline_time_ms": "PyTorch (ms)", "speedup": "speed-up"})
            part.add_table(table)
        section.add(part)
    return section


def training_section(data: ReportData) -> Section | None:
    runs = data.runs_of(kind=RunKind.TRAIN)
    if not runs:
        return None
    section = Section("Training runs", "training")
    training = [TrainingRun(int(run["run_id"]), str(run["name"]), is_interpreter(run["environment"]),
                            data.series(SeriesTable.TRAIN_STEPS, run["run_id"]),
                            data.series(SeriesTable.TRAIN_EPOCHS, run["run_id"]),
                            data.series(SeriesTable.OP_TIMES, run["run_id"]),
                            data.series(SeriesTable.POWER_LIMIT_PROFILE, run["run_id"])) for run in runs]
    interpreter = any(run.interpreter for run in training)
    section.add_text("Every run is overlaid: Triton kernels solid, PyTorch kernels dashed."
                     + (" Times are interpreter measurements on the CPU." if interpreter else ""), "note")
    section.add_table(summary_table(training), "Side by side (median step time excludes the first, compiling step)")
    for run in training:
        limits = power_limit_table(run)
        if not limits.empty:
            section.add_table(limits, f"{run.label}: power limit chosen by --power-limit auto (cost = eta × energy "
                                      "+ (1 − eta) × max power × time, per profiled step)")
    for figure in (curves_figure(training, interpreter), training_energy_figure(training),
                   op_times_figure(training, interpreter)):
        if figure is not None:
            section.add_figure(figure)
    for run in runs:
        timeline = _timeline_section(data, run, "step", f"{_run_title(run)}: power, temperature and clocks")
        if timeline is not None:
            section.add(timeline)
    return section


def _model_setting(run: pd.Series) -> str:
    """A `bench model` run's setting, from its meta: batch, image size, dtype."""
    meta = run["meta"] if isinstance(run["meta"], dict) else {}
    return (f"batch {meta.get('batch')}, {meta.get('image_size')}x{meta.get('image_size')}, "
            f"{meta.get('dtype')} channels_last")


def fusion_section(data: ReportData) -> Section | None:
    """`bench model --traffic` runs: the chains swap fused (and what it left in PyTorch), and the launches and
    bytes of a training step against eager PyTorch."""
    runs = data.runs_of(having=SeriesTable.TRAFFIC)
    if not runs:
        return None
    section = Section("Fusion: what the swapped model runs", "fusion")
    section.add_text("Launches and bytes are an analytic model of one training step counted on the meta device "
                     "(shapes only: each kernel reads its inputs and writes its outputs once), not a measurement.",
                     "note")
    for run in runs:
        part = Section(_run_title(run), anchor_for("fusion", run["run_id"]))
        part.add_text(f"{_model_setting(run)}.", "note")
        traffic = data.series(SeriesTable.TRAFFIC, run["run_id"]).drop(columns=["run_id"], errors="ignore")
        part.add_table(traffic, "Per kind of kernel and in total: eager PyTorch against the swapped model")
        chains = data.series(SeriesTable.FUSED_CHAINS, run["run_id"]).drop(columns=["run_id"], errors="ignore")
        part.add_table(chains, "What kernels.nn.swap fused, swapped alone and left in PyTorch, and why")
        section.add(part)
    return section


def step_time_section(data: ReportData) -> Section | None:
    """`bench model` runs on a GPU: a training step's time and peak memory, eager against the swapped model."""
    runs = data.runs_of(having=SeriesTable.STEP_TIMES)
    if not runs:
        return None
    section = Section("Training step time: eager against swapped", "step-time")
    for run in runs:
        part = Section(_run_title(run), anchor_for("step-time", run["run_id"]))
        part.add_text(f"{_model_setting(run)}; forward, cross-entropy and backward on one batch.", "note")
        times = data.series(SeriesTable.STEP_TIMES, run["run_id"]).drop(columns=["run_id"], errors="ignore")
        part.add_table(times, "Median step time with 20th/80th percentiles; speedup = eager time / this side's")
        section.add(part)
    return section


def strategies_section(data: ReportData) -> Section | None:
    runs = data.runs_of(having=SeriesTable.STRATEGY_RESULTS)
    if not runs:
        return None
    section = Section("Search strategies", "strategies")
    for run in runs:
        results = data.series(SeriesTable.STRATEGY_RESULTS, run["run_id"])
        part = Section(_run_title(run), anchor_for(RunKind.STRATEGIES, run["run_id"]))
        part.add_figure(strategies_figure(results), "Workbench strategies solid, Kernel Tuner's dashed; "
                                                    "fraction = best possible / best found (1 is the optimum).")
        meta = run["meta"] if isinstance(run["meta"], dict) else {}
        holdout = meta.get("holdout", HOLDOUT)
        regret = regret_figure(results, holdout)
        if regret is not None:
            part.add_figure(regret, "Regret = 1 − fraction of the optimum found = 1 − best possible / best found "
                                    "(0 at the optimum), averaged over the panel's landscapes; log axes, regret "
                                    "clipped at 1e-4 so that 0 shows. Error bars: one standard error over seeds, "
                                    "each seed's mean over the landscapes being one sample. Held out (no design "
                                    f"choice made on them): {', '.join(holdout) or 'none'}; a strategy is drawn in "
                                    "a panel only if it has results on every landscape of it.")
        part.add_table(final_budget_table(results), "At the largest budget")
        section.add(part)
    return section


def monitoring_section(data: ReportData, shown: set[int]) -> Section | None:
    """Timelines of runs with samples that no other section showed (monitor runs, benches)."""
    runs = [run for run in data.runs_of(having=SeriesTable.SAMPLES) if run["run_id"] not in shown]
    if not runs:
        return None
    section = Section("Power and thermals", "monitoring")
    for run in runs:
        part = _timeline_section(data, run, "measurement", _run_title(run), _run_meta_text(run))
        if part is not None:
            section.add(part)
    return section if section.subsections else None


def build_sections(db: TuningDatabase, run_ids: Sequence[int] | None = None) -> tuple[list[Section], str]:
    """The report's sections for `run_ids` (all runs when None or empty) and the banner for the page top."""
    data = ReportData(db, run_ids)
    if data.runs.empty:
        return [], f"The database {db.path} has no runs yet: nothing to report."
    sections: list[Section | None] = [runs_section(data), environment_section(data.runs)]
    tuning_runs = data.runs_of(kind=RunKind.TUNE, having=Table.TRIALS)
    if tuning_runs:
        tuning = Section("Tuning runs", "tuning")
        for run in tuning_runs:
            tuning.add(tuning_run_section(data, run))
        sections.append(tuning)
    sections += [baselines_section(data), fusion_section(data), step_time_section(data), training_section(data),
                 strategies_section(data)]
    shown = {int(run["run_id"]) for run in tuning_runs + data.runs_of(kind=RunKind.TRAIN)}
    sections.append(monitoring_section(data, shown))
    return [section for section in sections if section is not None], interpreter_banner(data.runs)


def write_report(db: TuningDatabase, run_ids: Sequence[int] | None, path: str | Path) -> Path:
    """Write the self-contained HTML report of `run_ids` (all runs when None or empty) to `path`."""
    if not isinstance(db, TuningDatabase):
        raise TypeError(f"db must be an autotune.results.TuningDatabase, got {type(db).__name__}")
    path = Path(path)
    sections, banner = build_sections(db, run_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(TITLE, sections, banner, source=str(db.path)), encoding="utf-8")
    return path
