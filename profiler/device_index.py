"""Which NVML device a process means: CUDA's device numbering mapped onto NVML handles.

CUDA numbers the devices a process sees after `CUDA_VISIBLE_DEVICES`; NVML numbers every GPU in
the machine in PCI bus order. So device 0 of a process started with `CUDA_VISIBLE_DEVICES=2,3`
is NVML's GPU 2, and with `CUDA_VISIBLE_DEVICES=GPU-8f3a...` it is whichever GPU carries that
UUID. Entries in `CUDA_VISIBLE_DEVICES` may be integers (taken as PCI-ordered indices, which is
what CUDA uses when `CUDA_DEVICE_ORDER=PCI_BUS_ID`; CUDA's default "fastest first" order can differ
on machines with mixed GPUs) or `GPU-` UUIDs, which CUDA also accepts as unique prefixes. A device
may also be named directly by UUID or PCI bus id ("0000:3b:00.0"). MIG instances ("MIG-...") are
out of scope: NVML reports power, energy and temperature for the whole GPU, not per instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class NvmlDevice:
    """An NVML device handle with what identifies it."""

    handle: Any
    nvml_index: int
    uuid: str
    pci_bus_id: str
    name: str


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def normalize_pci_bus_id(bus_id: str) -> str:
    """'0000:3B:00.0' and NVML's '00000000:3b:00.0' both become '0000:3b:00.0'."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) == 2:  # "3b:00.0": domain 0
        parts = ["0", *parts]
    if len(parts) != 3 or "." not in parts[2]:
        raise ValueError(f"a PCI bus id looks like '0000:3b:00.0', got {bus_id!r}")
    domain, bus, device_function = parts
    device, function = device_function.split(".", 1)
    try:
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16)}"
    except ValueError:
        raise ValueError(f"a PCI bus id looks like '0000:3b:00.0', got {bus_id!r}") from None


def list_devices(nvml: ModuleType) -> list[NvmlDevice]:
    """Every GPU NVML sees, in NVML (PCI) order. NVML must be initialised."""
    devices = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        bus_id = normalize_pci_bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        devices.append(NvmlDevice(handle, index, _text(nvml.nvmlDeviceGetUUID(handle)), bus_id,
                                  _text(nvml.nvmlDeviceGetName(handle))))  # fmt: skip
    return devices


def _match(devices: list[NvmlDevice], selector: str, source: str) -> NvmlDevice:
    """The one device a UUID (or unique UUID prefix), PCI bus id or NVML index names."""
    if selector.upper().startswith("MIG-"):
        raise ValueError(f"{source} names a MIG instance ({selector}); MIG is not supported, name the whole GPU")
    if selector.upper().startswith("GPU-"):
        found = [d for d in devices if d.uuid.lower().startswith(selector.lower())]
        if len(found) != 1:
            what = "no GPU" if not found else f"{len(found)} GPUs"
            raise ValueError(f"{source} = {selector!r}: {what} with that UUID among {[d.uuid for d in devices]}")
        return found[0]
    if ":" in selector:
        bus_id = normalize_pci_bus_id(selector)
        found = [d for d in devices if d.pci_bus_id == bus_id]
        if not found:
            known = [d.pci_bus_id for d in devices]
            raise ValueError(f"{source} = {selector!r}: no GPU at that PCI bus id among {known}")
        return found[0]
    try:
        index = int(selector)
    except ValueError:
        raise ValueError(f"{source} = {selector!r}: expected an index, a GPU-... UUID or a PCI bus id") from None
    if not 0 <= index < len(devices):
        raise ValueError(f"{source} = {index}: NVML sees {len(devices)} GPU(s)")
    return devices[index]


def resolve_device(nvml: ModuleType, device: int | str = 0) -> NvmlDevice:
    """The NVML device for CUDA device `device` of this process (honouring CUDA_VISIBLE_DEVICES).

    `device` is the CUDA ordinal as the process sees it, or a string UUID / PCI bus id naming a GPU
    directly. Raises ValueError when nothing matches.
    """
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise TypeError(f"device must be a CUDA ordinal (int) or a UUID / PCI bus id (str), got {device!r}")
    devices = list_devices(nvml)
    if isinstance(device, str):
        return _match(devices, device, "device")
    if device < 0:
        raise ValueError(f"device must be >= 0, got {device}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return _match(devices, str(device), "device")
    entries = [entry.strip() for entry in visible.split(",")]
    # CUDA stops at the first entry that is invalid; an empty variable hides every GPU.
    if device >= len(entries) or not entries[device]:
        raise ValueError(f"device {device} is not visible with CUDA_VISIBLE_DEVICES={visible!r}")
    return _match(devices, entries[device], f"CUDA_VISIBLE_DEVICES[{device}]")
