"""Static ceilings of a compiled kernel: what its machine code, its launch and its problem allow at most,
found without running it (`workbench inspect`).

The tensor/issue model, per iteration of the innermost loop holding the MMA instructions (`sass.mma_loop`),
per CTA:

- tensor clocks = the loop's MMA multiply-adds (m*n*k of each MMA instruction, times the groups of a CTA that
  issue it: one per warpgroup of 4 warps for HGMMA, one per warp for HMMA) / the SM's dense tensor-core rate
  for the MMA's input type (`hardware.Architecture.tensor_fma_per_clock`);
- issue clocks = the loop's instructions x warps per CTA / schedulers per SM (4): each warp issues every
  instruction of the body once per iteration (predicated off or not), each scheduler one per clock;
- tensor/issue ceiling = tensor clocks / max(tensor clocks, issue clocks): the fraction of the tensor cores'
  peak the loop reaches at most when only the issue slots can hold it back.

With c CTAs resident per SM (`ctas_per_sm`) both clocks grow c-fold, so the ceiling is the same at any
occupancy. Not modelled: latencies (memory, the MMA pipeline, barriers), dual issue, bank conflicts and the
code outside the loop. An upper bound from instruction counts alone.

The memory ceiling is the roofline's: time at the GPU's peak FLOP/s over the larger of that and the time to
move the problem's minimum bytes at its memory bandwidth (`spec.flops`, `spec.bytes`; peaks from
`hardware.GPU`), a fraction of peak. The peak is the one the code can reach: its MMA instructions' tensor-core
peak for their input type, FP32 without any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from triton_workbench.kernels import hardware, sass
from triton_workbench.kernels.aot import Compiled, CompileResult, summary
from triton_workbench.kernels.hardware import GPU, Architecture
from triton_workbench.kernels.spec import Config, KernelSpec, Problem

REGISTER_ALLOCATION_UNIT = 256
"""Registers are allocated to a warp in blocks of this many (8 per thread)."""


def ctas_per_sm(arch: Architecture, registers: int, shared_bytes: int, warps: int) -> int:
    """CTAs one SM holds at once: the fewest that registers (per warp, in `REGISTER_ALLOCATION_UNIT`s), shared
    memory (plus the per-block reservation), warps and the block limit allow."""
    warp_registers = math.ceil(registers * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = [arch.max_blocks_per_sm, arch.max_warps_per_sm // warps]
    if warp_registers:
        limits.append(arch.registers_per_sm // (warp_registers * warps))
    if shared_bytes + arch.shared_bytes_reserved_per_block:
        limits.append(arch.shared_bytes_per_sm // (shared_bytes + arch.shared_bytes_reserved_per_block))
    return min(limits)


@dataclass(frozen=True)
class IssueCeiling:
    """The tensor/issue model of one MMA loop (see the module doc): clocks per iteration per CTA."""

    tensor_clocks: float
    issue_clocks: float

    @property
    def ceiling(self) -> float:
        return self.tensor_clocks / max(self.tensor_clocks, self.issue_clocks)


def tensor_issue(loop: sass.Loop, arch: Architecture, warps: int) -> IssueCeiling | None:
    """The tensor/issue model of `loop` run by CTAs of `warps` warps on `arch`; None when an MMA's shape or its
    input type's rate is not known."""
    tensor = 0.0
    for instruction in loop.mma:
        shape = sass.mma_shape(instruction)
        rate = arch.tensor_fma_per_clock.get(shape.input_type) if shape else None
        if rate is None:
            return None
        groups = max(1, warps // 4) if instruction.mnemonic == "HGMMA" else warps
        tensor += shape.fmas * groups / rate
    return IssueCeiling(tensor, len(loop.instructions) * warps / arch.schedulers_per_sm)


def memory_ceiling(flops: float, bytes_moved: float, peak_tflops: float, bandwidth_gbps: float) -> float:
    """The roofline's bound as a fraction of peak: compute time / max(compute time, memory time)."""
    compute_s = flops / (peak_tflops * 1e12)
    memory_s = bytes_moved / (bandwidth_gbps * 1e9)
    return compute_s / max(compute_s, memory_s) if compute_s or memory_s else math.nan


def inspect(spec: KernelSpec, problem: Problem, config: Config, arch: int, compiled: Compiled | CompileResult,
            gpu: GPU | None) -> dict[str, Any]:
    """What `workbench inspect` reports of one launch's compilation (from `aot.compile_kernels`), or of a failed
    compilation, JSON-serialisable: resources, grid and occupancy, the MMA and global load instructions, the MMA
    loop and its instruction mix, and the static ceilings (the memory ceiling against `gpu`'s peaks; None
    without one)."""
    report: dict[str, Any] = {"kernel": spec.name, "problem": problem, "config": config, "arch": arch,
                              "gpu": gpu.name if gpu else None}
    if isinstance(compiled, CompileResult):
        return report | {"ok": False, "reason": compiled.reason}
    result = summary([compiled], arch)
    known = hardware.architecture(arch)
    specialisation = compiled.specialisation
    warps = specialisation.options["num_warps"]
    instructions = sass.parse(sass.disassemble(compiled.cubin))
    loop = sass.mma_loop(instructions)
    issue = tensor_issue(loop, known, warps) if loop is not None and known is not None else None
    label = _peak_label(instructions)
    peak = gpu.compute_tflops.get(label) if gpu else None
    flops, bytes_moved = spec.flops(problem), spec.bytes(problem)
    return report | {
        "ok": result.ok, "reason": result.reason,
        "registers": compiled.registers, "spill_bytes": compiled.spills, "shared_bytes": compiled.shared_bytes,
        "num_warps": warps, "num_stages": specialisation.options["num_stages"],
        "grid": list(specialisation.grid), "ctas": math.prod(specialisation.grid),
        "ctas_per_sm": ctas_per_sm(known, compiled.registers, compiled.shared_bytes, warps) if known else None,
        "mma": _mma(instructions), "global_loads": sass.global_loads(instructions),
        "loop": None if loop is None else {
            "start": loop.start, "end": loop.end, "instructions": len(loop.instructions), "mma": _mma(loop.mma),
            "global_loads": sass.global_loads(loop.instructions),
            "categories": sass.counts(loop.instructions, "category"), "mnemonics": sass.counts(loop.instructions)},
        "tensor_clocks_per_iteration": issue.tensor_clocks if issue else None,
        "issue_clocks_per_iteration": issue.issue_clocks if issue else None,
        "tensor_issue_ceiling": issue.ceiling if issue else None,
        "flops": flops, "bytes": bytes_moved, "peak": label, "peak_tflops": peak,
        "bandwidth_gbps": gpu.bandwidth_gbps if gpu else None,
        "memory_ceiling": memory_ceiling(flops, bytes_moved, peak, gpu.bandwidth_gbps) if peak else None,
        "specialisation": specialisation.named(),
    }


def _peak_label(instructions: list[sass.Instruction]) -> str:
    """The FLOP peak the code can reach: its MMA instructions' tensor-core peak (fp16/bf16, TF32), else FP32."""
    types = {shape.input_type for i in instructions if (shape := sass.mma_shape(i)) is not None}
    if types & {"fp16", "bf16"}:
        return hardware.peak_label("fp16")
    return hardware.peak_label("fp32", tf32="tf32" in types)


def _mma(instructions: list[sass.Instruction]) -> list[dict[str, Any]]:
    """Each MMA opcode: how many, and its shape."""
    shapes = {i.opcode: sass.mma_shape(i) for i in instructions}
    return [{"opcode": opcode, "count": count, "shape": str(shapes[opcode]) if shapes[opcode] else None}
            for opcode, count in sass.mma_shapes(instructions).items()]


STATIC_CEILINGS = ("static_tensor_ceiling", "static_memory_ceiling", "static_peak_tflops")
"""What `static_ceilings` reports of one config's compilation (the tuner stores the first two with each trial)."""


def static_ceilings(spec: KernelSpec, problem: Problem, launches: Sequence[Compiled], arch: int) -> dict[str, float | None]:
    """The static ceilings of one config's compiled launches on sm_`arch`'s reference GPU
    (`hardware.reference_gpu`), cheap enough for every trial of a sweep: each distinct cubin is disassembled once.

    static_tensor_ceiling: the lowest `tensor_issue_ceiling` of the launches (None when none has an MMA loop
    the model knows); static_memory_ceiling: the lowest roofline `memory_ceiling` against the peak each
    launch's code can reach (None without a reference GPU or a known peak); static_peak_tflops: that peak
    (of the launch giving the memory ceiling), so that the fractions of different peaks can be compared in
    TFLOP/s (`static_bound_tflops`).
    """
    gpu = hardware.reference_gpu(arch)
    distinct = {compiled.specialisation.key: compiled for compiled in launches}.values()
    reports = [inspect(spec, problem, {}, arch, compiled, gpu) for compiled in distinct]
    tensor = [r["tensor_issue_ceiling"] for r in reports if r.get("tensor_issue_ceiling") is not None]
    memory = [(r["memory_ceiling"], r["peak_tflops"]) for r in reports
              if r.get("memory_ceiling") is not None and not math.isnan(r["memory_ceiling"])]  # (ceiling, peak)
    lowest = min(memory, default=None)
    return {"static_tensor_ceiling": min(tensor, default=None),
            "static_memory_ceiling": lowest[0] if lowest else None,
            "static_peak_tflops": lowest[1] if lowest else None}


def static_bound_tflops(tensor: float | None, memory: float | None, peak_tflops: float | None) -> float | None:
    """The one figure `tune --prune-static` compares: min(tensor/issue ceiling, memory ceiling) x the peak, in
    TFLOP/s on the reference GPU (the fraction itself when the peak is unknown); None when neither is known.

    The min, not the product: each ceiling is an upper bound on the same fraction of peak, so the tighter one
    is still a bound; their product would assume the issue-bound and memory-bound time add up, when they
    overlap. Times the peak, because configs whose code reaches different peaks (tensor cores or FP32) have
    fractions of different wholes."""
    known = [value for value in (tensor, memory) if value is not None and not math.isnan(value)]
    if not known:
        return None
    fraction = min(known)
    return fraction * peak_tflops if peak_tflops else fraction
