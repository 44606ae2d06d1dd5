"""The device knobs (profiler.device_settings, profiler.settings_record) on a fake GPU that enforces what it is
given: candidates, applying, permissions refused, the settings put back on every way out (a kill included),
one owner per GPU, and other code's signal handlers left working."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_pynvml import FakeGpu, make_pynvml
from triton_workbench.database.store import this_host
from triton_workbench.profiler import device_settings
from triton_workbench.profiler.device_settings import DeviceKnobs
from triton_workbench.profiler.settings_record import DeviceSettingsBusy, DeviceSettingsStuck, restore_leftover
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
    assert gpu.settings == DEFAULTS and not records(tmp_path)


def records(directory: Path) -> list[Path]:
    """The records of settings to put back (the lock files stay: removing one would make a second lock)."""
    return list(Path(directory).glob("*.json"))


def test_the_record_is_written_before_the_first_change_not_before(gpu, tmp_path):
    with DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path) as knobs:
        knobs.apply({"power_limit_w": 700})  # the limit as found: no change
        assert not records(tmp_path)
        knobs.apply({"power_limit_w": 200})
        assert json.loads(records(tmp_path)[0].read_text())["power_limit_mw"] == 700_000
    assert gpu.settings == DEFAULTS and not records(tmp_path)


def test_power_limit_candidates_stay_inside_fractional_constraints(monkeypatch, tmp_path):
    gpu = FakeGpu(power_limit_range_w=(100.5, 437.5), default_power_limit_w=437.5)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with DeviceKnobs(power_limits=3, sm_clocks=0, record_dir=tmp_path) as knobs:
        assert knobs.params == {"power_limit_w": [101, 269, 437, 437.5]} and knobs.default == {"power_limit_w": 437.5}
        for limit_w in knobs.params["power_limit_w"]:
            knobs.apply({"power_limit_w": limit_w})  # every candidate is one the GPU takes
            assert gpu.settings["power_limit_mw"] == round(limit_w * 1000)
    assert gpu.settings["power_limit_mw"] == 437_500


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
    assert gpu.settings == DEFAULTS and not records(tmp_path)
    if way_out == "sigterm":
        assert raised.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back too


def test_refused_permission_is_said_once_and_the_knobs_are_left_out(gpu, tmp_path, caplog):
    gpu.refuse = {"power_limit", "locked_clocks", "applications_clocks"}
    with caplog.at_level("WARNING", logger="triton_workbench.profiler"):
        with DeviceKnobs(power_limits=3, sm_clocks=3, record_dir=tmp_path) as knobs:
            assert knobs.params == {} and knobs.default == {}
            assert not records(tmp_path)  # nothing changed, nothing to put back
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


def test_application_clocks_are_set_back_as_found_not_reset(gpu, tmp_path):
    gpu.refuse = {"locked_clocks"}
    gpu.change("applications_clocks", (2619, 1305))  # the owner's own setting, not the default
    with DeviceKnobs(power_limits=0, sm_clocks=2, record_dir=tmp_path) as knobs:
        knobs.apply({"sm_clock_mhz": 855})
        knobs.apply({"sm_clock_mhz": None})  # "not locked": the clocks as found
        assert gpu.settings["applications_clocks"] == (2619, 1305)
        knobs.apply({"sm_clock_mhz": 1980})
    assert gpu.settings["applications_clocks"] == (2619, 1305)


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
    assert len(list(records.glob("*.json"))) == 1
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with DeviceKnobs(power_limits=0, sm_clocks=0, record_dir=records) as knobs:
        assert gpu.settings == DEFAULTS  # restored on entering, before anything else
        assert knobs.params == {}
    assert not list(records.glob("*.json"))


OWNER = """
import fcntl, json, sys, time
lock = open({lock!r}, "a")
fcntl.flock(lock, fcntl.LOCK_EX)
open({record!r}, "w").write(json.dumps({{"pid": 1, "host": "elsewhere", "power_limit_mw": 700000}}))
print("holding", flush=True)
time.sleep(30)
"""


def test_a_live_owner_keeps_its_settings(gpu, tmp_path):
    import pynvml

    pynvml.nvmlInit()
    device = resolve_device(pynvml, 0)
    path = tmp_path / f"{gpu.uuid}.json"
    script = OWNER.format(lock=str(path.with_suffix(".lock")), record=str(path))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "holding"
        with pytest.raises(DeviceSettingsBusy, match=str(path)):
            restore_leftover(pynvml, device, tmp_path)
        with pytest.raises(DeviceSettingsBusy, match=str(path)):
            DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path).__enter__()
    finally:
        owner.kill()
        owner.wait()
    assert restore_leftover(pynvml, device, tmp_path) is True  # its owner gone: put back, record removed
    assert not records(tmp_path)


def test_a_reused_pid_is_not_a_live_owner(gpu, tmp_path):
    import pynvml

    pynvml.nvmlInit()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # started after the record
    try:
        record = {"uuid": gpu.uuid, "pid": stranger.pid, "host": this_host(), "created_at": "2020-01-01T00:00:00+00:00",
                  "power_limit_mw": 700_000, "clock_mode": None}  # fmt: skip
        (tmp_path / f"{gpu.uuid}.json").write_text(json.dumps(record))
        gpu.change("power_limit", 300_000)
        assert restore_leftover(pynvml, resolve_device(pynvml, 0), tmp_path) is True
    finally:
        stranger.kill()
        stranger.wait()
    assert gpu.settings == DEFAULTS and not records(tmp_path)


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_leftover_that_cannot_be_put_back_stops_and_is_kept(gpu, tmp_path):
    import pynvml

    path = tmp_path / f"{gpu.uuid}.json"
    record = {"uuid": gpu.uuid, "pid": dead_pid(), "host": this_host(), "created_at": "2020-01-01T00:00:00+00:00",
              "power_limit_mw": 700_000, "clock_mode": None}  # fmt: skip
    path.write_text(json.dumps(record))
    gpu.change("power_limit", 300_000)
    gpu.refuse = {"power_limit"}  # not root
    with pytest.raises(DeviceSettingsStuck, match=f"needs root.*{path}"):
        DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path).__enter__()
    assert json.loads(path.read_text()) == record  # the only note of the GPU's own limit is not overwritten
    assert gpu.settings["power_limit_mw"] == 300_000
    assert pynvml.state["initialised"] == 0  # NVML shut down again on the way out


def test_nvml_is_shut_down_when_entering_fails(gpu, tmp_path):
    import pynvml

    with pytest.raises(Exception, match="3"):
        DeviceKnobs(device=3, record_dir=tmp_path).__enter__()  # no such GPU
    assert pynvml.state["initialised"] == 0 and pynvml.state["shutdowns"] == 1


def test_other_signal_handlers_are_kept_ignored_or_chained(gpu, tmp_path):
    seen = []

    def on_term(signum, frame):
        seen.append(signum)

    previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}  # fmt: skip
    try:
        with pytest.raises(SystemExit):
            with DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path) as knobs:
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # ignored on purpose: left so
                knobs.apply({"power_limit_w": 200})
                os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and gpu.settings == DEFAULTS  # chained, then unwound and put back
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is on_term
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_a_handler_installed_outside_python_is_left_alone(gpu, tmp_path, monkeypatch):
    real = signal.getsignal
    monkeypatch.setattr(device_settings.signal, "getsignal",
                        lambda number: None if number == signal.SIGHUP else real(number))  # fmt: skip
    installed = []
    real_signal = signal.signal
    monkeypatch.setattr(device_settings.signal, "signal",
                        lambda number, handler: installed.append(number) or real_signal(number, handler))  # fmt: skip
    with DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path):
        pass  # leaving must not try to put back a handler it cannot (signal.signal(n, None) is a TypeError)
    assert signal.SIGHUP not in installed and signal.SIGTERM in installed


def test_a_second_signal_waits_until_the_settings_are_back(gpu, tmp_path):
    original = gpu.change

    def change(setting, value):
        if setting == "locked_clocks" and value is None:  # putting back has begun: the user presses again
            os.kill(os.getpid(), signal.SIGTERM)
        original(setting, value)

    with pytest.raises(SystemExit):
        with DeviceKnobs(power_limits=2, sm_clocks=2, record_dir=tmp_path) as knobs:
            knobs.apply({"power_limit_w": 200, "sm_clock_mhz": 855})
            gpu.change = change
            raise KeyboardInterrupt
    assert gpu.settings == DEFAULTS and not records(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failed_restore_keeps_the_exit_hook_and_the_record(gpu, tmp_path, monkeypatch):
    hooks = []
    unregister = lambda hook: hook in hooks and hooks.remove(hook)  # noqa: E731
    monkeypatch.setattr(device_settings, "atexit", SimpleNamespace(register=hooks.append, unregister=unregister))
    with DeviceKnobs(power_limits=2, sm_clocks=0, record_dir=tmp_path) as knobs:
        knobs.apply({"power_limit_w": 200})
        gpu.refuse = {"power_limit"}  # lost the permission meanwhile
    assert hooks == [knobs.restore] and records(tmp_path)  # at exit it tries again; else the next start does
    gpu.refuse = set()
    hooks[0]()  # interpreter exit
    assert gpu.settings == DEFAULTS and not records(tmp_path)
    knobs.__exit__(None, None, None)
    assert hooks == []
