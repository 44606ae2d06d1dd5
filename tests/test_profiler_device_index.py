"""CUDA_VISIBLE_DEVICES and device selectors map onto the right NVML device."""

from __future__ import annotations

import sys

import pytest

from fake_pynvml import FakeClock, FakeGpu, make_pynvml
from triton_workbench.profiler import NvmlSampler
from triton_workbench.profiler.device_index import normalize_pci_bus_id, resolve_device

UUIDS = ["GPU-aaaa1111-0000-0000-0000-000000000000", "GPU-bbbb2222-0000-0000-0000-000000000000",
         "GPU-bbbb3333-0000-0000-0000-000000000000"]  # fmt: skip
BUS_IDS = ["00000000:1A:00.0", "00000000:3B:00.0", "00000001:C4:00.0"]


@pytest.fixture
def nvml(monkeypatch):
    clock = FakeClock()
    gpus = [FakeGpu(clock=clock, uuid=uuid, pci_bus_id=bus_id, power_w=100.0 * (index + 1))
            for index, (uuid, bus_id) in enumerate(zip(UUIDS, BUS_IDS))]  # fmt: skip
    module = make_pynvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    module.nvmlInit()
    yield module
    module.nvmlShutdown()


@pytest.mark.parametrize(
    "visible, device, nvml_index",
    [
        (None, 0, 0), (None, 2, 2),
        ("2,0", 0, 2), ("2,0", 1, 0),
        (f"{UUIDS[1]},{UUIDS[0]}", 0, 1), ("GPU-aaaa", 0, 0), ("GPU-BBBB3", 0, 2),  # full UUIDs and unique prefixes
        (" 1 , 2 ", 1, 2),
    ],
)  # fmt: skip
def test_cuda_visible_devices_picks_the_nvml_device(nvml, monkeypatch, visible, device, nvml_index):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = resolve_device(nvml, device)
    assert found.nvml_index == nvml_index and found.uuid == UUIDS[nvml_index]


@pytest.mark.parametrize(
    "selector, nvml_index",
    [(UUIDS[2], 2), ("0000:3b:00.0", 1), ("3B:00.0", 1), ("0001:c4:00.0", 2), ("00000000:1a:00.0", 0)],
)
def test_a_device_named_by_uuid_or_pci_bus_id_ignores_cuda_visible_devices(nvml, monkeypatch, selector, nvml_index):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert resolve_device(nvml, selector).nvml_index == nvml_index


@pytest.mark.parametrize(
    "visible, device, message",
    [
        ("", 0, "not visible"), ("1", 1, "not visible"), ("7", 0, "NVML sees 3"),
        ("GPU-bbbb", 0, "2 GPUs"), ("GPU-ffff", 0, "no GPU"),
        ("MIG-0f0f0f0f-0000-0000-0000-000000000000", 0, "MIG"), ("gpu0", 0, "expected an index"),
    ],
)  # fmt: skip
def test_unmatched_selectors_raise_value_error_naming_the_problem(nvml, monkeypatch, visible, device, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ValueError, match=message):
        resolve_device(nvml, device)


def test_bad_device_types_and_bus_ids(nvml):
    with pytest.raises(TypeError, match="device"):
        resolve_device(nvml, 1.0)
    with pytest.raises(ValueError, match="PCI bus id"):
        resolve_device(nvml, "0000:zz:00.0")
    assert normalize_pci_bus_id("00000000:3B:00.0") == normalize_pci_bus_id("3b:00.0") == "0000:3b:00.0"


def test_the_sampler_reads_the_visible_device(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
    sampler = NvmlSampler(device=1)
    sampler.sample()
    assert sampler.available and sampler.device.uuid == UUIDS[1]
    assert sampler.frame()["power_w"].tolist() == [200.0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0f0f0f0f-0000-0000-0000-000000000000")
    missing = NvmlSampler(device=0)
    assert not missing.available and "MIG" in missing.reason
