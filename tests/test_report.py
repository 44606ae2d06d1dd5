"""The HTML report: sections from a real database, escaping, the CLI, and the figures' arithmetic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from triton_workbench.autotune import TuningDatabase, TuningKey
from triton_workbench.reports import build_sections, write_report
from triton_workbench.reports.baselines import baseline_figure, speedups
from triton_workbench.reports.roofline import roofline_figure
from triton_workbench.reports.timeline import throttled_samples, timeline_figure
from triton_workbench.reports.training import op_share
from triton_workbench.reports.tuning import (best_so_far_figure, choose_metric, config_heatmap, energy_figure, pareto_front,
                            prepare_trials)
from triton_workbench.workbench.cli import main

HOSTILE = "<script>alert(1)</script>"
GEMM_PROBLEM = {"M": 96, "N": 80, "K": 64, "dtype": "fp32"}


def _key(kernel: str, problem: dict) -> TuningKey:
    return TuningKey(kernel, "test-hash", json.dumps(problem, sort_keys=True, separators=(",", ":")),
                     "no GPU: Triton interpreter", "", "3.9.0", "2.13.0")


def _record_sweep(db: TuningDatabase, run_id: int, kernel: str, rng: np.random.Generator) -> int:
    """A GEMM-like sweep: 3x3 block sizes x 2 BLOCK_K x 2 num_warps x 2 num_stages, some failing."""
    flops = 2 * GEMM_PROBLEM["M"] * GEMM_PROBLEM["N"] * GEMM_PROBLEM["K"]
    count = 0
    for block_m in (16, 32, 64):
        for block_n in (16, 32, 64):
            for block_k in (16, 32):
                for warps in (2, 4):
                    for stages in (2, 3):
                        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                  "num_warps": warps, "num_stages": stages}
                        count += 1
                        if block_m == 64 and block_n == 64:
                            db.record_trial(run_id, _key(kernel, GEMM_PROBLEM), config, "out_of_resources",
                                            f"shared memory {HOSTILE} exceeds 232448 bytes")
                            continue
                        time_ms = 5.0 / (block_m * block_n) ** 0.3 * (1 + 0.1 * stages) * rng.uniform(0.9, 1.1)
                        bytes_moved = 4 * (96 * 64 + 64 * 80 + 96 * 80)  # per problem, as spec.bytes counts
                        db.record_trial(run_id, _key(kernel, GEMM_PROBLEM), config, "ok", timer="interpreter",
                                        time_ms=time_ms, time_ms_p20=time_ms * 0.97, time_ms_p80=time_ms * 1.04,
                                        tflops=flops / time_ms / 1e9, gbps=bytes_moved / time_ms / 1e6,
                                        energy_j_per_call=time_ms * rng.uniform(0.05, 0.3), registers=64,
                                        spills=0, shared_bytes=block_k * (block_m + block_n) * 4 * stages)
    return count


def populate(db: TuningDatabase) -> dict[str, int]:
    """A database with one run of every kind, through the public API, names made hostile on purpose."""
    rng = np.random.default_rng(7)
    ids = {"tune": db.start_run("tune", f"gemm sweep {HOSTILE}", {"strategy": "grid"})}
    ids["trials"] = _record_sweep(db, ids["tune"], f"gemm{HOSTILE}", rng)
    times = np.arange(0, 12, 0.05)
    reasons = np.where((times > 6) & (times < 7), 0x20, 0x1)
    db.append("samples", ids["tune"], pd.DataFrame({
        "time_s": times, "power_w": 200 + 150 * np.sin(times) ** 2, "energy_j": np.cumsum(np.full(times.size, 12.0)),
        "gpu_temp_c": 50 + times, "mem_temp_c": 45 + times, "sm_clock_mhz": 1980 - 200 * (reasons == 0x20),
        "mem_clock_mhz": 2619.0, "gpu_util_pct": 90.0, "mem_used_bytes": 2e9, "clock_event_reasons": reasons}))
    starts = np.arange(0.5, 11, 1.0)
    db.append("windows", ids["tune"], pd.DataFrame({
        "name": [f"trial {i} {HOSTILE}" for i in range(starts.size)], "start_s": starts, "end_s": starts + 0.6,
        "duration_s": 0.6, "energy_j": 120.0, "avg_power_w": 200.0, "peak_power_w": 350.0,
        "peak_gpu_temp_c": 60.0, "mean_sm_clock_mhz": 1900.0, "throttled": (starts > 5.5) & (starts < 7)}))

    ids["bench"] = db.start_run("bench", "baselines")
    db.append("baselines", ids["bench"], pd.DataFrame({
        "kernel": ["gemm", "gemm", HOSTILE], "problem": [json.dumps(GEMM_PROBLEM), '{"M": 1, "N": 7, "K": 13}',
                                                        json.dumps({"n": 4099})],
        "time_ms": [2.0, 1.0, 4.0], "baseline_time_ms": [3.0, 0.5, 4.0], "ratio": [1.5, 0.5, 1.0]}))

    for kernels in ("triton", "torch"):
        run_id = ids[f"train_{kernels}"] = db.start_run("train", f"cnn {kernels}")
        steps = np.arange(40)
        db.append("train_steps", run_id, pd.DataFrame({
            "epoch": steps // 20, "step": steps % 20, "loss": 2.3 * np.exp(-steps / 15) + rng.uniform(0, 0.1, 40),
            "accuracy": 1 - np.exp(-steps / 12),
            "step_time_ms": rng.uniform(40, 60, 40) * (1.3 if kernels == "torch" else 1),
            "images_per_s": rng.uniform(900, 1100, 40), "kernels": kernels, "energy_j": np.nan}))
        db.append("train_epochs", run_id, pd.DataFrame({
            "epoch": [0, 1], "train_loss": [1.2, 0.5], "eval_loss": [1.0, 0.6], "eval_accuracy": [0.7, 0.85],
            "energy_j": np.nan, "j_per_image": np.nan}))
        db.append("op_times", run_id, pd.DataFrame({
            "op": [f"{kernels}::conv2d", "aten::relu", "aten::addmm", HOSTILE], "calls": [80, 80, 40, 1],
            "self_time_ms": [500.0, 80.0, 120.0, 1.0], "total_time_ms": [520.0, 80.0, 130.0, 1.0],
            "device": "cpu", "source": kernels}))

    ids["strategies"] = db.start_run("strategies", "strategy study")
    rows = [{"landscape": landscape, "budget": budget, "strategy": strategy, "seed": seed,
             "fraction": min(1.0, budget / 64 * (1.2 if strategy == "random" else 1.0) + 0.1 * seed),
             "source": source}
            for landscape in ("gemm-fp32", "conv-fp16") for budget in (4, 16, 64)
            for strategy, source in (("random", "workbench"), ("genetic", "kernel_tuner")) for seed in (0, 1)]
    db.append("strategy_results", ids["strategies"], pd.DataFrame(rows))
    for run_id in (value for key, value in ids.items() if key != "trials"):
        db.finish_run(run_id)
    return ids


def expected_figures() -> int:
    """Figures `populate` should give: heatmap, best-so-far, energy, roofline, timeline (tune);
    baselines; curves and op times (train, no energy); strategies (per landscape, regret over time)."""
    return 5 + 1 + 2 + 2


@pytest.fixture
def database(tmp_path: Path) -> TuningDatabase:
    db = TuningDatabase(tmp_path / "report.db")
    yield db
    db.close()


@pytest.fixture
def populated(database: TuningDatabase) -> tuple[TuningDatabase, dict[str, int]]:
    return database, populate(database)


def test_full_report_has_every_section_plotly_once_and_no_raw_user_markup(populated, tmp_path):
    db, ids = populated
    path = write_report(db, None, tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")

    # plotly.js inlined exactly once, every figure rendered without its own copy, nothing fetched
    assert page.count("window.PlotlyConfig") == 1
    assert page.count("<script") == 2 + expected_figures()
    assert not re.search(r'<script[^>]+src=|<link[^>]+href="http', page)
    assert f'data-figures="{expected_figures()}"' in page
    assert page.count('class="plotly-graph-div"') == expected_figures()

    for title in ("Contents", "Environment", "Tuning runs", "Baselines", "Training runs", "Search strategies"):
        assert f">{title}" in page
    assert "no GPU: Triton interpreter" in page
    assert "interpreter measurements" in page  # roofline labelled, no GPU ceilings

    # the hostile string is escaped everywhere: in HTML, and as text inside the figure JSON
    assert HOSTILE not in page
    assert page.count("alert(1)") == page.count("&lt;script&gt;alert(1)") > 10
    assert f"{ids['trials']} configs evaluated, {ids['trials'] - 8} succeeded" in page


def test_sections_only_for_selected_runs(populated, tmp_path):
    db, ids = populated
    sections, banner = build_sections(db, [ids["strategies"]])
    assert [section.title for section in sections] == ["Runs", "Environment", "Search strategies"]
    assert sum(section.figure_count for section in sections) == 2
    assert "interpreter" in banner
    with pytest.raises(ValueError, match="run_ids \\[999\\]"):
        build_sections(db, [999])


def test_empty_database_report_says_so_and_exits_0(tmp_path, capsys):
    output = tmp_path / "empty.html"
    assert main(["report", "--db", str(tmp_path / "new.db"), "-o", str(output)]) == 2  # no such file
    TuningDatabase(tmp_path / "new.db").runs()  # creates the file, with no runs
    assert main(["report", "--db", str(tmp_path / "new.db"), "-o", str(output)]) == 0
    page = output.read_text(encoding="utf-8")
    assert "has no runs yet" in page
    assert "Plotly" not in page  # no figures, so no 4 MB of plotly.js either
    assert "wrote" in capsys.readouterr().out


def test_cli_selects_runs_and_rejects_unknown_ones(populated, tmp_path, capsys):
    db, ids = populated
    output = tmp_path / "bench.html"
    assert main(["report", "--db", str(db.path), "--run", str(ids["bench"]), "-o", str(output)]) == 0
    page = output.read_text(encoding="utf-8")
    assert "Baselines" in page and "Tuning runs" not in page and "Training runs" not in page
    assert main(["report", "--db", str(db.path), "--run", "12345", "-o", str(output)]) == 2
    assert "12345" in capsys.readouterr().err


def test_heatmap_takes_best_over_aggregated_params_and_greys_failed_cells(populated):
    db, ids = populated
    frame, params = prepare_trials(db.trials(ids["tune"]))
    metric = choose_metric(frame)
    assert metric.column == "tflops" and metric.higher_is_better and "interpreter" in metric.label
    fig, note = config_heatmap(frame, params, metric, "t")
    assert "panels split by num_warps and BLOCK_K" in note and "best over num_stages" in note
    # 2 BLOCK_K panels x 2 num_warps rows, each a grey (failed) and a coloured heatmap trace
    assert len(fig.data) == 8
    failed, values = fig.data[0], fig.data[1]
    first_panel = frame[(frame["BLOCK_K"] == 16) & (frame["num_warps"] == 2)]
    ok = first_panel[first_panel["status"] == "ok"]
    best = ok.groupby(["BLOCK_M", "BLOCK_N"])["tflops"].max()
    row, col = list(values.y).index("32"), list(values.x).index("16")
    assert values.z[row][col] == pytest.approx(best.loc[(32, 16)] * metric.scale)
    grey_row, grey_col = list(failed.y).index("64"), list(failed.x).index("64")
    assert failed.z[grey_row][grey_col] == 0 and np.isnan(values.z[grey_row][grey_col])
    assert "out_of_resources" in failed.text[grey_row][grey_col]
    assert "<script>" not in failed.text[grey_row][grey_col]


def test_pareto_front_keeps_only_undominated_points():
    times = pd.Series([1.0, 2.0, 3.0, 1.5, 2.5])
    energies = pd.Series([5.0, 2.0, 1.0, 6.0, 2.5])
    assert sorted(pareto_front(times, energies)) == [0, 1, 2]


def test_roofline_x_range_is_explicit_when_every_config_shares_one_intensity():
    # Every config of one problem moves the same bytes for the same flops: one intensity. Plotly's
    # log autorange of such an axis drew ticks at y="-Infinity" (console errors in the browser).
    trials = pd.DataFrame({"status": "ok", "tflops": [1.2e-5, 0.7e-5, 1.6e-5], "gbps": [8.9e-4, 5.2e-4, 11.8e-4],
                           "kernel": "gemm", "problem_label": "M=96", "config_label": ["a", "b", "c"]})
    trials["gbps"] = trials["tflops"] * 1e3 / 13.53  # 13.53 FLOP/byte for all three
    fig, _ = roofline_figure(trials, None, interpreter=True)
    low, high = fig.layout.xaxis.range
    assert np.isfinite([low, high]).all() and low < np.log10(13.53) < high


def test_roofline_on_a_gpu_draws_ceilings_that_bound_by_bandwidth_then_compute():
    trials = pd.DataFrame({"status": ["ok", "ok", "wrong"], "tflops": [300.0, 20.0, 1.0], "gbps": [1500.0, 2500.0, 1.0],
                           "kernel": "gemm", "problem_label": "M=4096", "config_label": ["a", "b", "c"]})
    fig, note = roofline_figure(trials, "NVIDIA H100 80GB HBM3", interpreter=False)
    points = fig.data[0]
    assert list(points.x) == pytest.approx([200.0, 8.0])  # flops / bytes
    roofs = {trace.name: trace for trace in fig.data[1:]}
    assert set(roofs) == {"FP32 roof", "TF32 tensor roof", "FP16/BF16 tensor roof"}
    fp16 = roofs["FP16/BF16 tensor roof"]
    assert max(fp16.y) == pytest.approx(989.4)
    assert fp16.y[0] == pytest.approx(3350e9 * fp16.x[0] / 1e12)
    assert "3,350 GB/s" in note
    _, unknown_note = roofline_figure(trials, "Some Future GPU", interpreter=False)
    assert "No published peaks" in unknown_note
    interpreter_fig, interpreter_note = roofline_figure(trials, None, interpreter=True)
    assert len(interpreter_fig.data) == 1 and "no GPU bandwidth or compute ceilings" in interpreter_note
    assert "interpreter" in interpreter_fig.layout.title.text


def test_timeline_marks_only_power_or_thermal_throttling_and_groups_many_windows():
    samples = pd.DataFrame({"time_s": np.arange(6.0), "power_w": 100.0, "gpu_temp_c": 60.0, "sm_clock_mhz": 1800.0,
                            "clock_event_reasons": [0x1, 0x4, 0x20 | 0x1, 0x2, np.nan, 0x10]})
    assert list(throttled_samples(samples)) == [False, True, True, False, False, False]
    assert not throttled_samples(samples.drop(columns="clock_event_reasons")).any()  # a trace without the field
    starts = np.linspace(0, 5, 700)
    windows = pd.DataFrame({"name": [f"trial {i}" for i in range(700)], "start_s": starts, "end_s": starts + 0.005,
                            "duration_s": 0.005, "energy_j": np.nan,
                            "throttled": pd.array([True] + [None] * 699, dtype="boolean")})  # as the sampler gives
    fig, note = timeline_figure(samples, windows)
    assert len(fig.layout.shapes) == 234  # 700 windows shaded in groups of 3
    assert "groups of 3" in note and "1 throttled ones red" in note and "2 samples were" in note
    throttle_marks = next(trace for trace in fig.data if trace.name == "throttled")
    assert list(throttle_marks.x) == [1.0, 2.0]


def test_op_share_uses_gpu_kernel_time_when_the_trace_has_it():
    op_times = pd.DataFrame({"op": ["conv", "conv", "relu", "relu"], "calls": 3, "self_time_ms": [9.0, 3.0, 1.0, 1.0],
                             "total_time_ms": 0.0, "device": ["cpu", "cuda", "cpu", "cuda"], "source": "torch"})
    share = op_share(op_times)
    assert list(share["op"]) == ["conv", "relu"]
    assert list(share["self_time_ms"]) == [3.0, 1.0] and list(share["share_pct"]) == [75.0, 25.0]
    assert list(op_share(op_times[op_times["device"] == "cpu"])["share_pct"]) == [90.0, 10.0]


def test_energy_figure_marks_fastest_least_energy_and_least_edp_and_best_so_far_is_monotone(populated):
    db, ids = populated
    frame, _ = prepare_trials(db.trials(ids["tune"]))
    fig = energy_figure(frame)
    traces = {trace.name: trace for trace in fig.data}
    ok = frame[frame["status"] == "ok"]
    fastest = ok.loc[ok["time_ms"].idxmin()]
    frugal = ok.loc[ok["energy_j_per_call"].idxmin()]
    balanced = ok.loc[(ok["time_ms"] * ok["energy_j_per_call"]).idxmin()]
    assert traces["fastest"].x[0] == fastest["time_ms"]
    assert traces["least energy"].y[0] == pytest.approx(frugal["energy_j_per_call"] * 1e3)  # shown in mJ
    assert traces["least EDP"].text[0] == balanced["config_label"]
    front_x = list(traces["Pareto front"].x)
    assert front_x[0] == fastest["time_ms"] and front_x[-1] == frugal["time_ms"]

    best = best_so_far_figure(frame, choose_metric(frame)).data[1]
    assert list(best.y) == sorted(best.y) and max(best.y) == pytest.approx(ok["tflops"].max() * 1e3)  # GFLOP/s


def test_baselines_of_several_passes_are_separate_series():
    # `bench conv` times each problem forward and forward+backward: two bars per problem, not one label twice
    problem = json.dumps({"n": 64, "c_in": 64, "h": 56, "w": 56, "c_out": 64})
    baselines = pd.DataFrame({"kernel": "conv2d", "problem": problem, "pass": ["fwd", "fwd+bwd"],
                              "time_ms": [1.0, 4.0], "baseline_time_ms": [1.5, 3.0]})
    frame = speedups(baselines)
    assert frame["series"].tolist() == ["conv2d fwd", "conv2d fwd+bwd"]
    assert frame["speedup"].tolist() == pytest.approx([1.5, 0.75])
    fig = baseline_figure(baselines, interpreter=False)
    assert sorted(trace.name for trace in fig.data) == ["conv2d fwd", "conv2d fwd+bwd"]
