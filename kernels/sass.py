"""SASS, the GPU's machine code, read from a cubin: its instructions, the loop around its tensor-core
instructions, and what those instructions are (MMA shapes, global load paths).

`disassemble(cubin)` runs Triton's bundled nvdisasm; `parse(text)` reads its listing (or the one
`cuobjdump -sass` prints) into `Instruction`s, branch targets resolved to addresses; `mma_loop` finds the
innermost loop holding the MMA instructions. Reading needs no GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

MMA_MNEMONICS = frozenset({"HGMMA", "HMMA"})
"""Tensor-core instructions on floating-point inputs: HGMMA (sm_90 wgmma, one per warpgroup of 4 warps) and
HMMA (mma.sync, one per warp)."""

GLOBAL_LOADS = frozenset({"LDG", "LDGSTS", "UTMALDG"})
"""Loads from global memory: to registers (LDG), to shared memory by cp.async (LDGSTS) or by the TMA unit (UTMALDG)."""

CATEGORIES: dict[str, frozenset[str]] = {
    "mma": MMA_MNEMONICS,
    "global load": GLOBAL_LOADS,
    "global store": frozenset({"STG", "RED", "ATOM", "ATOMG", "UTMASTG"}),
    "shared": frozenset({"LDS", "LDSM", "STS", "STSM", "ATOMS"}),
    "sync": frozenset({"BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "WARPSYNC", "ARRIVES",
                       "FENCE", "ERRBAR", "CCTL"}),
    "float": frozenset({"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "HADD2", "HMUL2", "HFMA2", "HMNMX2",
                        "HSETP2", "MUFU", "F2F", "F2FP", "I2F", "F2I", "FRND", "FCHK", "DADD", "DMUL", "DFMA"}),
    "integer": frozenset({"IADD3", "IMAD", "IMUL", "LOP3", "SHF", "LEA", "ISETP", "IABS", "SEL", "IMNMX", "VIADD",
                          "VIMNMX", "PRMT", "SGXT", "BMSK", "POPC", "FLO", "BREV", "IDP", "IADD", "VIADDMNMX"}),
    "move": frozenset({"MOV", "CS2R", "S2R", "S2UR", "R2UR", "LDC", "SHFL", "P2R", "R2P", "PLOP3", "VOTE", "VOTEU",
                       "REDUX", "UPRMT"}),
    "control": frozenset({"BRA", "BRX", "JMP", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "NOP", "YIELD"}),
}
"""Instruction classes for a loop's mix. A uniform-datapath instruction (UIADD3, ULDC, UMOV...) counts as its
vector twin (U dropped); what no class names is "other"."""

_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*([.\w$]+):\s*$")
_LABEL_TARGET = re.compile(r"`\(([.\w$]+)\)")
_ADDRESS_TARGET = re.compile(r"^0x([0-9a-fA-F]+)$")
_WIDTH = re.compile(r"^[US]?(8|16|32|64|128)$")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4)}


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: `@predicate OPCODE operands ;` at `address`; `target` is a branch's destination."""

    address: int
    opcode: str  # with its modifiers: "HGMMA.64x128x16.F32", "LDGSTS.E.BYPASS.128"
    operands: str = ""
    predicate: str = ""  # "@P0", "@!PT", ... ("" when always executed)
    target: int | None = None

    @property
    def mnemonic(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> tuple[str, ...]:
        return tuple(self.opcode.split(".")[1:])

    @property
    def category(self) -> str:
        """The instruction's class in `CATEGORIES` ("other" when none)."""
        mnemonic = self.mnemonic
        for name in (mnemonic, mnemonic[1:] if mnemonic.startswith("U") else None):
            for category, members in CATEGORIES.items():
                if name in members:
                    return category
        return "other"


@dataclass(frozen=True)
class MmaShape:
    """The shape of one MMA instruction: m x n x k multiply-adds per issuing group, and its input type."""

    m: int
    n: int
    k: int
    input_type: str  # "fp16", "bf16" or "tf32"

    @property
    def fmas(self) -> int:
        return self.m * self.n * self.k

    def __str__(self) -> str:
        return f"m{self.m}n{self.n}k{self.k} {self.input_type}"


def disassemble(cubin: bytes) -> str:
    """The SASS listing of a cubin, by Triton's bundled nvdisasm (code sections only)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(cubin)
    try:
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", file.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(file.name)


def parse(text: str) -> list[Instruction]:
    """The instructions of a SASS listing, in address order, with branch targets resolved.

    Reads nvdisasm's listing (targets as labels, "`(.L_x_1)", a label line standing before the
    instruction it names) and cuobjdump's (targets as addresses, "0x16c0").
    """
    rows: list[tuple[int, str, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []  # labels waiting for the address of the next instruction
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            address = int(match.group(1), 16)
            labels.update((label, address) for label in pending)
            pending.clear()
            rows.append((address, match.group(3), match.group(4).strip(), (match.group(2) or "").strip()))
        elif label := _LABEL.match(line):
            pending.append(label.group(1))
    return [Instruction(address, opcode, operands, predicate, _branch_target(opcode, operands, labels))
            for address, opcode, operands, predicate in rows]


def _branch_target(opcode: str, operands: str, labels: dict[str, int]) -> int | None:
    if opcode.split(".", 1)[0] != "BRA":
        return None
    if label := _LABEL_TARGET.search(operands):
        return labels.get(label.group(1))
    address = _ADDRESS_TARGET.match(operands.strip())
    return int(address.group(1), 16) if address else None


def mma_shape(instruction: Instruction) -> MmaShape | None:
    """The shape of an HGMMA ("HGMMA.64x128x16.F32[.BF16|.TF32]") or HMMA ("HMMA.16816.F32[.BF16]",
    "HMMA.1688.F32.TF32"); None for any other instruction (or a shape not known)."""
    modifiers = instruction.modifiers
    if instruction.mnemonic not in MMA_MNEMONICS or not modifiers:
        return None
    input_type = "bf16" if "BF16" in modifiers else "tf32" if "TF32" in modifiers else "fp16"
    if instruction.mnemonic == "HGMMA":
        dims = re.fullmatch(r"(\d+)x(\d+)x(\d+)", modifiers[0])
        return MmaShape(*map(int, dims.groups()), input_type) if dims else None
    shape = _HMMA_SHAPES.get(modifiers[0])
    return MmaShape(*shape, input_type) if shape else None


def global_load(instruction: Instruction) -> str | None:
    """A global load as "LDG.128", "LDGSTS.64", "UTMALDG.2D" (its bits per thread, or a TMA copy's
    dimensions); None for any other instruction. A load with no width modifier moves 32 bits."""
    if instruction.mnemonic not in GLOBAL_LOADS:
        return None
    if instruction.mnemonic == "UTMALDG":
        dims = [m for m in instruction.modifiers if re.fullmatch(r"\dD", m)]
        return "UTMALDG" + (f".{dims[0]}" if dims else "")
    widths = [int(match.group(1)) for m in instruction.modifiers if (match := _WIDTH.match(m))]
    return f"{instruction.mnemonic}.{widths[-1] if widths else 32}"


@dataclass(frozen=True)
class Loop:
    """A loop body: the instructions from a back-edge branch's target to the branch itself."""

    instructions: tuple[Instruction, ...]

    @property
    def start(self) -> int:
        return self.instructions[0].address

    @property
    def end(self) -> int:
        return self.instructions[-1].address

    @property
    def mma(self) -> list[Instruction]:
        return [i for i in self.instructions if i.mnemonic in MMA_MNEMONICS]


def loops(instructions: Sequence[Instruction]) -> list[Loop]:
    """Every body closed by a backward branch (a branch to its own address or before), in address order."""
    index = {instruction.address: position for position, instruction in enumerate(instructions)}
    found = []
    for position, instruction in enumerate(instructions):
        if instruction.target is not None and instruction.target <= instruction.address and instruction.target in index:
            found.append(Loop(tuple(instructions[index[instruction.target]:position + 1])))
    return found


def mma_loop(instructions: Sequence[Instruction]) -> Loop | None:
    """The innermost loop holding MMA instructions: of the backward branches whose body holds some (and no
    EXIT: a branch back from code placed after the kernel's end, such as a barrier's retry, closes no loop of
    the kernel's flow), the one with the shortest body. None when no loop holds an MMA (or there is none)."""
    candidates = [loop for loop in loops(instructions)
                  if loop.mma and not any(i.mnemonic == "EXIT" for i in loop.instructions)]
    return min(candidates, key=lambda loop: len(loop.instructions), default=None)


def counts(instructions: Sequence[Instruction], key: str = "mnemonic") -> dict[str, int]:
    """How many instructions there are per mnemonic (or per `opcode`, or `category`), most frequent first."""
    return dict(Counter(getattr(instruction, key) for instruction in instructions).most_common())


def mma_shapes(instructions: Sequence[Instruction]) -> dict[str, int]:
    """MMA opcode ("HGMMA.64x128x16.F32") -> how many, most frequent first."""
    return counts([i for i in instructions if i.mnemonic in MMA_MNEMONICS], "opcode")


def global_loads(instructions: Sequence[Instruction]) -> dict[str, int]:
    """Global load kind ("LDGSTS.128", "LDG.32", "UTMALDG.2D") -> how many, most frequent first."""
    return dict(Counter(kind for i in instructions if (kind := global_load(i)) is not None).most_common())
