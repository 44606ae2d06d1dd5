"""What the command line does when the environment or the user's files get in the way (issue 14, findings 4
and 5): one line naming the path or argument and exit status 2, nothing half written left behind, a run
that cannot finish marked failed with the reason, imports all or nothing; a bug still shows its traceback."""

import json
import sqlite3
import sys

import pytest

from triton_workbench.autotune import TuningDatabase, TuningKey
from triton_workbench.autotune import results
from triton_workbench.database import Database
from triton_workbench.kernels import GEMM_SPEC
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.commands import export

TUNE = ["tune", "gemm", "--shape", "4,4,4", "--budget", "1", "--no-compile-ahead"]
FP32_GEMM = {**next(p for p in GEMM_SPEC.example_problems if p["dtype"] == "fp32"), "M": 8, "N": 8, "K": 8}


def _one_line_naming(capsys, *words: str) -> str:
    error = capsys.readouterr().err  # besides the message, a sweep's progress bar may stand there
    messages = [line for line in error.splitlines() if line.startswith("workbench ")]
    assert "Traceback" not in error and len(messages) == 1 and "error: " in messages[0], error
    for word in words:
        assert word in messages[0], error
    return messages[0]


@pytest.mark.parametrize("command", [TUNE, ["export", "-o", "out.json"], ["report", "-o", "out.html"],
                                     ["import", "unused.json"]])  # fmt: skip
def test_a_db_that_is_a_directory(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unused.json").write_text(json.dumps({"format": "triton-workbench best configs", "version": 1,
                                                      "configs": []}))  # fmt: skip
    folder = tmp_path / "folder.db"
    folder.mkdir()
    assert main([*command, "--db", str(folder)]) == 2
    _one_line_naming(capsys, str(folder), "is a directory")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["/proc/workbench-test.db", "a-file/workbench.db"])
def test_a_db_that_cannot_be_written(where, tmp_path, monkeypatch, capsys):
    # (a read-only directory would do as well, but root writes into one anyway: these refuse root too)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    assert main([*TUNE, "--db", where]) == 2
    _one_line_naming(capsys, where, "workbench database")


def test_a_disk_that_fills_during_a_sweep_fails_the_run_with_the_reason(monkeypatch, capsys):
    def full_disk(self, *args, **kwargs):
        with self._write():
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(TuningDatabase, "record_trial", full_disk)
    assert main(TUNE) == 2
    _one_line_naming(capsys, str(Database().path), "disk is full")
    runs = Database().runs()
    assert runs["status"].tolist() == ["failed"] and "disk is full" in runs["meta"][0]["reason"]
    assert TuningDatabase().trials().empty


def test_export_into_a_directory_leaves_nothing_behind(tmp_path, capsys):
    TuningDatabase().runs()  # the default database exists
    target = tmp_path / "folder"
    target.mkdir()
    assert main(["export", "-o", str(target)]) == 2
    _one_line_naming(capsys, str(target), "is a directory")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "workbench.db"]


def test_an_export_that_fails_midway_leaves_neither_file(tmp_path, monkeypatch, capsys):
    TuningDatabase().runs()
    target = tmp_path / "best.json"
    monkeypatch.setattr(export.json, "dumps", lambda *args, **kwargs: "\udcff")  # not encodable: the write fails
    with pytest.raises(UnicodeEncodeError):
        main(["export", "-o", str(target)])
    assert not target.exists() and not list(tmp_path.glob("*partial*"))


def test_export_and_report_say_a_missing_db_does_not_exist_instead_of_creating_it(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    for command in (["export", "-o", str(tmp_path / "out.json")], ["report", "-o", str(tmp_path / "out.html")]):
        assert main([*command, "--db", str(missing)]) == 2
        _one_line_naming(capsys, str(missing), "does not exist")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_monitor_csv_into_a_missing_directory_is_refused_before_the_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    csv = tmp_path / "missing" / "trace.csv"
    marker = tmp_path / "ran"
    assert main(["monitor", "--csv", str(csv), "--", "touch", str(marker)]) == 2
    _one_line_naming(capsys, str(csv), "does not exist")
    assert not marker.exists() and Database().runs().empty


def test_import_of_a_directory_and_of_deeply_nested_json(tmp_path, capsys):
    assert main(["import", str(tmp_path)]) == 2
    _one_line_naming(capsys, str(tmp_path), "Is a directory")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["import", str(deep)]) == 2
    _one_line_naming(capsys, str(deep), "nested too deeply")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["import", str(binary)]) == 2
    _one_line_naming(capsys, str(binary))
    assert TuningDatabase().best_configs().empty


def test_an_interrupted_import_stores_nothing(tmp_path, monkeypatch):
    key = TuningKey.of(GEMM_SPEC, FP32_GEMM)
    config = GEMM_SPEC.default_config(FP32_GEMM)
    entries = [{"kernel": "gemm", "source_hash": key.source_hash, "problem": {**FP32_GEMM, "M": m},
                "device": key.device, "capability": key.capability, "triton_version": key.triton_version,
                "torch_version": key.torch_version, "config": config, "objective": "time", "value": 1.0,
                "time_ms": 1.0} for m in range(1, 101)]  # fmt: skip
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"format": "triton-workbench best configs", "version": 1, "configs": entries}))
    stored = []
    real_sql_value = results.sql_value

    def ctrl_c_after_forty_entries(value):
        stored.append(value)
        if len(stored) == 80:  # two numbers an entry
            raise KeyboardInterrupt
        return real_sql_value(value)

    monkeypatch.setattr(results, "sql_value", ctrl_c_after_forty_entries)
    with pytest.raises(KeyboardInterrupt):
        main(["import", str(path)])
    assert len(stored) == 80 and TuningDatabase().best_configs().empty
    monkeypatch.setattr(results, "sql_value", real_sql_value)
    assert main(["import", str(path)]) == 0
    assert len(TuningDatabase().best_configs()) == 100


def test_a_bug_shows_its_traceback_and_debug_shows_one_always(monkeypatch, capsys):
    from triton_workbench.workbench.commands import tune as tune_command

    def bug(*args, **kwargs):
        raise ValueError("an internal mistake, not the user's")

    monkeypatch.setattr(tune_command, "build_problem", bug)
    with pytest.raises(ValueError, match="an internal mistake"):  # not turned into a one-line usage error
        main(TUNE)
    assert main(["--debug", "tune", "nope"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and error.strip().splitlines()[-1].startswith("workbench tune: error: unknown kernel")
    assert issubclass(UsageError, ValueError)
