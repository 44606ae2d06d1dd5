"""The device knobs (profiler.device_settings) on a fake GPU that enforces what it is given: candidates,
applying, permissions refused, and the settings put back on every way out, a kill included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fake_pynvml import FakeGpu, make_pynvml
from triton_workbench.database.store import this_host
from triton_workbench.profiler.device_settings import DeviceKnobs, DeviceSettingsBusy, restore_leftover
from triton_workbench.profiler.device_index import resolve_device

TESTS = Path(__file__).parent
DEFAULTS = {"power_limit_mw": 700_000, "locked_clocks": None, "applications_clocks": None}


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    gpu = FakeGpu()
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return gpu


def test_candidates_come_from_the_gpu_and_apply_sets_them(gpu, tmp_path):
    with DeviceKnobs(power_limits=3, sm_clocks=3, record_dir=tmp_path) as knobs:
        assert knobs.params == {"power_limit_w": [200, 450, 700], "sm_clock_mhz": [None, 1980, 1530, 855]}
        assert knobs.default == {"power_limit_w": 700, "sm_clock_mhz": None} and knobs.clock_mode == "locked"
        assert gpu.settings == DEFAULTS  # the probes changed nothing that stayed
        knobs.apply({"power_limit_w": 450, "sm_clock_mhz": 1530})
        assert gpu.settings["power_limit_mw"] == 450_000 and gpu.settings["locked_clocks"] == (1530, 1530)
        record = json.loads((tmp_path / f"{gpu.uuid}.json").read_text())
        assert record["power_limit_mw"] == 700_000 and record["clock_mode"] == "locked" and record["pid"] == os.getpid()
        with pytest.raises(ValueError, match="mem_clock"):
            knobs.apply({"mem_clock_mhz": 1})
    assert gpu.settings == DEFAULTS and not list(tmp_path.iterdir())


def test_out_of_range_setting_is_refused_by_the_gpu(gpu, tmp_path):
    import pynvml

    with DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path) as knobs:
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            knobs.apply({"power_limit_w": 900})
    assert gpu.settings == DEFAULTS


@pytest.mark.parametrize("way_out", ["exception", "ctrl-c", "sigterm"])
def test_settings_are_restored_on_every_way_out(gpu, tmp_path, way_out):
    with pytest.raises((RuntimeError, KeyboardInterrupt, SystemExit)) as raised:
        with DeviceKnobs(power_limits=2, sm_clocks=2, record_dir=tmp_path) as knobs:
            knobs.apply({"power_limit_w": 200, "sm_clock_mhz": 855})
            assert gpu.settings != DEFAULTS
            if way_out == "exception":
                raise RuntimeError("boom")
            if way_out == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
    assert gpu.settings == DEFAULTS and not list(tmp_path.iterdir())
    if way_out == "sigterm":
        assert raised.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back too


def test_refused_permission_is_said_once_and_the_knobs_are_left_out(gpu, tmp_path, caplog):
    gpu.refuse = {"power_limit", "locked_clocks", "applications_clocks"}
    with caplog.at_level("WARNING", logger="triton_workbench.profiler"):
        with DeviceKnobs(power_limits=3, sm_clocks=3, record_dir=tmp_path) as knobs:
            assert knobs.params == {} and knobs.default == {}
            knobs.apply({})
    assert len(knobs.notes) == 2 and all("permission refused" in note for note in knobs.notes)
    assert [r.getMessage() for r in caplog.records] == knobs.notes
    assert gpu.settings == DEFAULTS and gpu.settings_log == []


def test_application_clocks_where_locking_is_refused(gpu, tmp_path):
    gpu.refuse = {"locked_clocks"}
    with DeviceKnobs(power_limits=0, sm_clocks=2, record_dir=tmp_path) as knobs:
        assert knobs.clock_mode == "applications" and knobs.params == {"sm_clock_mhz": [None, 1980, 855]}
        knobs.apply({"sm_clock_mhz": 855})
        assert gpu.settings["applications_clocks"] == (2619, 855) and gpu.clock_cap_mhz() == 855
    assert gpu.settings == DEFAULTS


def test_bad_candidate_counts_name_the_argument():
    with pytest.raises(ValueError, match="power_limits"):
        DeviceKnobs(power_limits=1)
    with pytest.raises(ValueError, match="sm_clocks"):
        DeviceKnobs(sm_clocks=-2)


KILLED_SWEEP = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from fake_pynvml import FakeGpu, make_pynvml
sys.modules["pynvml"] = make_pynvml([FakeGpu(state_path={state!r})])
from triton_workbench.database.store import this_host
from triton_workbench.profiler.device_settings import DeviceKnobs
with DeviceKnobs(power_limits=3, sm_clocks=3, record_dir={records!r}) as knobs:
    knobs.apply({{"power_limit_w": 450, "sm_clock_mhz": 855}})
    os.kill(os.getpid(), signal.SIGKILL)  # nothing runs after this: no finally, no atexit
"""


def test_a_killed_process_leaves_a_record_and_the_next_start_restores(monkeypatch, tmp_path):
    state, records = tmp_path / "gpu.json", tmp_path / "records"
    script = KILLED_SWEEP.format(tests=str(TESTS), state=str(state), records=str(records))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert done.returncode == -signal.SIGKILL
    gpu = FakeGpu(state_path=state)  # the same GPU, as the next process finds it
    assert gpu.settings["power_limit_mw"] == 450_000 and gpu.settings["locked_clocks"] == (855, 855)
    assert len(list(records.iterdir())) == 1
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with DeviceKnobs(power_limits=0, sm_clocks=0, record_dir=records) as knobs:
        assert gpu.settings == DEFAULTS  # restored on entering, before anything else
        assert knobs.params == {}
    assert not list(records.iterdir())


def test_a_live_owner_keeps_its_settings(gpu, tmp_path):
    import pynvml

    pynvml.nvmlInit()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        device = resolve_device(pynvml, 0)
        record = {"uuid": gpu.uuid, "pid": owner.pid, "host": this_host(),
                  "power_limit_mw": 700_000, "clock_mode": "locked"}  # fmt: skip
        (tmp_path / f"{gpu.uuid}.json").write_text(json.dumps(record))
        with pytest.raises(DeviceSettingsBusy, match=str(owner.pid)):
            restore_leftover(pynvml, device, tmp_path)
    finally:
        owner.kill()
        owner.wait()
    assert restore_leftover(pynvml, device, tmp_path) is True  # its owner gone: put back, record removed
    assert not list(tmp_path.iterdir())
