"""The workbench database: the contract other packages code against (runs, series), tuning results, safety."""

import multiprocessing
import sqlite3

import pandas as pd
import pytest

from triton_workbench.autotune import DatabaseConfigSource, TuningDatabase, TuningKey, use_database
from triton_workbench.database import (FIXED_TABLES, Database, DatabaseFileError, RunKind, RunStatus, SeriesTable,
                                       Table, TrialStatus, default_path)
from triton_workbench.database.environment import device_key
from triton_workbench.kernels import tuned
from triton_workbench.kernels.spec import KernelSpec, problem_id


def _scale(x, factor):  # the "kernel" of the spec below: only its source hash and name matter here
    return x * factor


SPEC = KernelSpec(
    name="scale", kernel=_scale, params={"BLOCK": [16, 32, 64]}, constraints=(),
    default_config=lambda problem: {"BLOCK": 16}, make_inputs=None, launch=None, reference=None,
    flops=lambda p: p["n"], bytes=lambda p: 8 * p["n"], grid=None, shape_keys=("n",),
)  # fmt: skip


def test_default_path_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DB", str(tmp_path / "x.db"))
    assert default_path() == tmp_path / "x.db"
    assert Database().path == tmp_path / "x.db"
    monkeypatch.delenv("WORKBENCH_DB")
    assert default_path().name == "workbench.db" and "triton-workbench" in str(default_path())


def test_runs_record_status_meta_and_environment():
    db = Database()
    first = db.start_run(RunKind.TUNE, "gemm", {"budget": 3})
    second = db.start_run("train", "resnet")  # the names are plain strings: either spelling is stored the same
    db.finish_run(first, RunStatus.INTERRUPTED)
    runs = db.runs().set_index("run_id")
    assert list(runs.index) == [first, second]
    assert runs.loc[first, "status"] == "interrupted" and runs.loc[second, "status"] == RunStatus.RUNNING
    assert runs.loc[first, "kind"] == "tune" and type(runs.loc[first, "kind"]) is str
    assert runs.loc[first, "meta"] == {"budget": 3} and runs.loc[second, "meta"] == {}
    assert runs.loc[first, "finished_at"] and runs.loc[first, "started_at"] <= runs.loc[first, "finished_at"]
    environment = runs.loc[first, "environment"]
    assert environment["gpu"] == device_key().device and environment["triton"] and environment["torch"]
    with pytest.raises(ValueError, match="kind"):
        db.start_run("nonsense", "x")
    with pytest.raises(ValueError, match="status"):
        db.finish_run(first, "ok")
    with pytest.raises(ValueError, match="run_id 999"):
        db.finish_run(999)


def test_append_and_read_series_grow_columns_and_keep_runs_apart():
    db = Database()
    run_a, run_b = db.start_run("monitor", "a"), db.start_run("monitor", "b")
    db.append("samples", run_a, pd.DataFrame({"time_s": [0.0, 0.5], "power_w": [100.0, float("nan")]}))
    db.append("samples", run_b, pd.DataFrame({"time_s": [1.0], "gpu_temp_c": [55], "throttled": [True]}))
    everything = db.read("samples")
    assert list(everything.columns) == ["run_id", "time_s", "power_w", "gpu_temp_c", "throttled"]
    assert len(everything) == 3
    only_a = db.read("samples", run_a)
    assert only_a["time_s"].tolist() == [0.0, 0.5] and pd.isna(only_a["power_w"][1])
    assert db.read("samples", run_b)["gpu_temp_c"].tolist() == [55]
    assert db.read("samples", [run_b, run_a])["time_s"].tolist() == [0.0, 0.5, 1.0]  # several runs, stored order
    assert db.read("samples", []).empty
    assert db.read("windows").empty and db.read("windows", run_a).empty
    for table in ("trials", "runs", "Bad-Name", "1x"):
        with pytest.raises(ValueError, match="table"):
            db.append(table, run_a, pd.DataFrame({"x": [1]}))
    with pytest.raises(TypeError, match="frame"):
        db.append("samples", run_a, {"x": [1]})


def test_the_store_creates_only_its_tables_and_the_tuning_database_adds_its_own(tmp_path):
    path = tmp_path / "shared.db"
    plain = Database(path)
    with plain.run(RunKind.MONITOR, "sleep 1") as run_id:
        plain.append(SeriesTable.SAMPLES, run_id, pd.DataFrame({"time_s": [0.0]}))
    tables = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {Table.RUNS, SeriesTable.SAMPLES} <= tables and not tables & {Table.TRIALS, Table.BEST_CONFIGS}
    tuning = TuningDatabase(path)  # the same file, with the tuning tables added on first use
    assert tuning.runs()["status"].tolist() == [RunStatus.DONE] and tuning.trials().empty
    assert set(FIXED_TABLES) <= {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    for table in FIXED_TABLES:  # no series may write over a fixed schema, whichever class holds the file
        with pytest.raises(ValueError, match="table"):
            plain.append(table, run_id, pd.DataFrame({"x": [1]}))


def test_trials_are_unique_per_key_and_config_and_rerecording_replaces():
    db = TuningDatabase()
    run = db.start_run("tune", "scale")
    key = TuningKey.of(SPEC, {"n": 100, "dtype": "fp32"})
    db.record_trial(run, key, {"BLOCK": 16}, TrialStatus.OK, time_ms=2.0, timer="interpreter")
    db.record_trial(run, key, {"BLOCK": 32}, TrialStatus.WRONG, "relative error 1 exceeds tolerance 0.0001")
    db.record_trial(run, key, {"BLOCK": 16}, "ok", time_ms=1.5, timer="interpreter", energy_j_per_call=0.25)
    trials = db.trials(run)
    assert trials["config"].tolist() == ['{"BLOCK":16}', '{"BLOCK":32}']
    assert trials["time_ms"].iloc[0] == 1.5 and trials["energy_j_per_call"].iloc[0] == 0.25
    assert trials["status"].tolist() == ["ok", "wrong"] and "tolerance" in trials["reason"].iloc[1]
    assert trials["problem"].iloc[0] == problem_id({"n": 100, "dtype": "fp32"})
    assert pd.isna(trials["time_ms"].iloc[1]) and trials["started_at"].notna().all()
    assert db.trials(key=TuningKey.of(SPEC, {"n": 7, "dtype": "fp32"})).empty
    other = db.start_run("tune", "other")
    db.record_trial(other, key, {"BLOCK": 64}, "ok", time_ms=3.0, timer="interpreter")
    assert len(db.trials([run, other])) == 3 and len(db.trials(other)) == 1 and db.trials([]).empty
    assert db.trials(key=key, run_id=[other])["config"].tolist() == ['{"BLOCK":64}']
    with pytest.raises(ValueError, match="status"):
        db.record_trial(run, key, {"BLOCK": 64}, "fine")
    with pytest.raises(ValueError, match="unknown trial fields"):
        db.record_trial(run, key, {"BLOCK": 64}, "ok", speed=3)


def test_lookup_best_exact_then_nearest_bucket_same_dtype_and_source():
    db = TuningDatabase()
    run = db.start_run("tune", "scale")
    for n, block in ((1000, 16), (100_000, 64)):
        db.set_best(TuningKey.of(SPEC, {"n": n, "dtype": "fp32"}), {"BLOCK": block}, "time", 1.0, 1.0, run)
    lookup_best = DatabaseConfigSource(db.path)  # what the kernels ask once the database is installed
    assert lookup_best(SPEC, {"n": 1000, "dtype": "fp32"}) == {"BLOCK": 16}
    assert lookup_best(SPEC, {"n": 3000, "dtype": "fp32"}) == {"BLOCK": 16}  # log-nearer to 1000
    assert lookup_best(SPEC, {"n": 40_000, "dtype": "fp32"}) == {"BLOCK": 64}
    assert lookup_best(SPEC, {"n": 1000, "dtype": "fp16"}) is None  # no tuned problem with this dtype
    other_source = TuningKey(**{**TuningKey.of(SPEC, {"n": 5, "dtype": "fp16"}).__dict__, "source_hash": "0" * 16})
    db.set_best(other_source, {"BLOCK": 32}, "time", 1.0, 1.0, run)
    assert lookup_best(SPEC, {"n": 5, "dtype": "fp16"}) is None  # tuned for an older kernel source
    assert tuned.config_for(SPEC, {"n": 2000, "dtype": "fp32"}) == {"BLOCK": 16}  # nothing installed: the default
    assert use_database() == lookup_best and tuned.config_source() == lookup_best  # $WORKBENCH_DB, resolved now
    assert tuned.config_for(SPEC, {"n": 2000, "dtype": "fp32"}) == {"BLOCK": 16}
    assert tuned.config_for(SPEC, {"n": 2000, "dtype": "fp16"}) == {"BLOCK": 16}  # the default


def test_lookup_best_without_a_database_file_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DB", str(tmp_path / "absent" / "w.db"))
    assert DatabaseConfigSource(default_path())(SPEC, {"n": 1, "dtype": "fp32"}) is None
    use_database()
    assert tuned.config_for(SPEC, {"n": 1, "dtype": "fp32"}) == {"BLOCK": 16}
    assert not (tmp_path / "absent").exists()


def _writer(path: str, label: str, barrier) -> None:
    db = TuningDatabase(path)
    run = db.start_run("tune", label)
    key = TuningKey.of(SPEC, {"n": 1, "dtype": "fp32"})
    barrier.wait()
    for i in range(60):
        db.append("samples", run, pd.DataFrame({"time_s": [float(i)], "writer": [label]}))
        db.record_trial(run, key, {"BLOCK": i, "writer": len(label)}, "ok", time_ms=float(i))
    db.finish_run(run)


def test_two_processes_writing_at_once_corrupt_nothing(tmp_path):
    path = str(tmp_path / "shared.db")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    writers = [context.Process(target=_writer, args=(path, label, barrier)) for label in ("a", "bb")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    db = TuningDatabase(path)
    assert sorted(db.runs()["status"]) == ["done", "done"]
    samples = db.read("samples")
    assert samples.groupby("writer").size().to_dict() == {"a": 60, "bb": 60}
    assert len(db.trials()) == 120 and db.trials()["config"].is_unique
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_damaged_file_gives_a_clear_error_naming_it_and_never_stops_a_launch(tmp_path, caplog):
    path = tmp_path / "damaged.db"
    path.write_bytes(b"this is not a database, it only sits where one should be" * 100)
    with pytest.raises(DatabaseFileError, match=str(path)):
        Database(path).runs()
    with pytest.raises(DatabaseFileError, match=str(path)):
        DatabaseConfigSource(path)(SPEC, {"n": 1, "dtype": "fp32"})
    use_database(path)
    with caplog.at_level("WARNING", logger="triton_workbench.kernels"):
        assert tuned.config_for(SPEC, {"n": 1, "dtype": "fp32"}) == {"BLOCK": 16}  # the default, with a warning
    assert "tuned config lookup for scale failed" in caplog.text and str(path) in caplog.text
