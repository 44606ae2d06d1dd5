"""A kernel's time and power on a fake GPU as a simple model of its settings (power limit, SM clock cap).

Dynamic power grows with the cube of the SM clock (voltage follows frequency); the compute part of a call
takes cycles / clock, its memory part does not depend on the clock. The clock is the lower of the cap the
settings give (locked or application clocks, else the highest supported) and the clock at which power
reaches the power limit: a low limit throttles (NVML's SW power cap reason is set meanwhile).

    model = Workload(gpu, clock)
    model.call(block=64)                # advances the fake clock by the call's time, power drawn meanwhile
    model.predict(64, limit_w, cap_mhz) # (time_s, power_w) the model gives, for checking what was measured
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fake_pynvml import FakeClock, FakeGpu

SW_POWER_CAP = 0x4


@dataclass(frozen=True)
class Shape:
    """What a config of the fake kernel costs: compute cycles, clock-independent memory time, activity."""

    cycles: float
    memory_s: float
    activity: float  # share of the dynamic power at the top clock


SHAPES = {  # block size -> cost: 64 computes fastest, 128 draws least power per cycle
    32: Shape(cycles=2.0e6, memory_s=0.4e-3, activity=0.8),
    64: Shape(cycles=1.4e6, memory_s=0.3e-3, activity=1.0),
    128: Shape(cycles=1.7e6, memory_s=0.3e-3, activity=0.6),
}


@dataclass
class Workload:
    gpu: FakeGpu
    clock: FakeClock
    idle_w: float = 60.0
    dynamic_w: float = 600.0  # at the top clock and activity 1
    shapes: dict[int, Shape] = field(default_factory=lambda: dict(SHAPES))

    def __post_init__(self) -> None:
        self.top_mhz = float(max(self.gpu.graphics_clocks_mhz))
        self.gpu.sm_clock_mhz = lambda t: self._clock_mhz
        self.gpu.clock_events = lambda t: self._reasons
        self._clock_mhz, self._reasons = self.top_mhz, 0

    def power_w(self, block: int, clock_mhz: float) -> float:
        return self.idle_w + self.dynamic_w * self.shapes[block].activity * (clock_mhz / self.top_mhz) ** 3

    def predict(self, block: int, limit_w: float, cap_mhz: float) -> tuple[float, float]:
        """(seconds per call, watts while it runs) under a power limit and a clock cap."""
        shape = self.shapes[block]
        clock_mhz = cap_mhz
        if self.power_w(block, cap_mhz) > limit_w:  # the limit holds the clock down to where power meets it
            clock_mhz = self.top_mhz * ((limit_w - self.idle_w) / (self.dynamic_w * shape.activity)) ** (1 / 3)
        return shape.cycles / (clock_mhz * 1e6) + shape.memory_s, self.power_w(block, clock_mhz)

    def call(self, block: int) -> None:
        """One call under the fake GPU's current settings: power drawn and the clock advanced exactly."""
        cap_mhz = self.gpu.clock_cap_mhz()
        seconds, power_w = self.predict(block, self.gpu.power_limit_w, cap_mhz)
        capped = power_w < self.power_w(block, cap_mhz) - 1e-9
        self.gpu.set_power(power_w)
        self._clock_mhz = cap_mhz if not capped else self.top_mhz * ((power_w - self.idle_w) / (
            self.dynamic_w * self.shapes[block].activity)) ** (1 / 3)
        self._reasons = SW_POWER_CAP if capped else 0
        self.clock.advance(seconds)
        self.gpu.set_power(self.idle_w)  # the clock and reasons stay as the last call left them, as read after it


def best(model: Workload, blocks, limits_w, caps_mhz, cost) -> tuple:
    """The (block, limit, cap) minimising cost(seconds, joules, watts) by the model (None caps: unlocked)."""
    ranked = []
    for block in blocks:
        for limit_w in limits_w:
            for cap in caps_mhz:
                seconds, power_w = model.predict(block, limit_w, model.top_mhz if cap is None else cap)
                value = cost(seconds, seconds * power_w, power_w)
                if math.isfinite(value):
                    ranked.append((value, block, limit_w, cap))
    return min(ranked, key=lambda r: r[0])[1:]


def workload_spec(model: Workload):
    """A KernelSpec whose launch runs `model` (BLOCK picks the shape) and returns x * factor on the CPU:
    the tuner's whole path (check, time, energy, knobs) with time and power set by the model."""
    import triton

    from tiny_spec import SPEC, make_inputs, scale_kernel
    from triton_workbench.kernels.spec import KernelSpec

    def launch(inputs, config):
        model.call(config["BLOCK"])
        return inputs["x"] * inputs["factor"]

    return KernelSpec(name="fake_workload", kernel=scale_kernel, params={"BLOCK": sorted(model.shapes)},
                      constraints=(), default_config=lambda problem: {"BLOCK": 64}, make_inputs=make_inputs,
                      launch=launch, reference=SPEC.reference, flops=SPEC.flops, bytes=SPEC.bytes,
                      grid=lambda problem, config: (triton.cdiv(problem["n"], config["BLOCK"]),),
                      example_problems=SPEC.example_problems, shape_keys=("n",))  # fmt: skip


def clock_timer(clock: FakeClock):
    """A tuner `timer`: one call timed on the fake clock (the model's time, exactly)."""
    from triton_workbench.autotune.timing import Timing

    def timer(fn) -> Timing:
        start = clock.now
        fn()
        time_ms = (clock.now - start) * 1e3
        return Timing(time_ms, time_ms, time_ms, "fake clock")

    return timer
