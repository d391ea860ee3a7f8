"""A small emulator of the PTX the kernels inline (kernels/codes.py's PTX_ strings), so that the
GPU path is checked on a machine without one (tests/test_ptx.py).

Registers are 32-bit Python ints. Semantics are the PTX ISA's (docs.nvidia.com/cuda/
parallel-thread-execution): lop3.b32 d, a, b, c, immLut: each bit of d is bit
(a << 2 | b << 1 | c) of immLut, so immLut = F(0xF0, 0xCC, 0xAA) for the function F; prmt.b32
d, a, b, c (default mode): byte i of d is byte c[4i+2:4i] of the 8 bytes {b, a} (a bytes 0-3),
or, with c[4i+3] set, that byte's sign bit replicated; f16x2 arithmetic rounds each 16-bit half
once, to nearest even. An instruction outside this set raises UnknownInstruction: a new asm
string cannot pass untested.

Triton's packing of elements into registers for tl.inline_asm_elementwise(pack=N) follows
ElementwiseInlineAsmOpConversion in triton-lang/triton lib/Conversion/TritonGPUToLLVM/
ElementwiseOpToLLVM.cpp (packOperands, createDestOps; read at commit f646e549): each invocation
takes N consecutive elements of a thread; an operand or result narrower than 32 bits packs
min(32 / width, N) elements into one register, element k at lane k (insert_element k: bits
width * k up, little-endian); operands are numbered outputs first (each result's registers in
turn), then each input's registers in argument order.
"""
import re
from fractions import Fraction

import numpy as np


class UnknownInstruction(ValueError):
    pass


MASK = 0xFFFFFFFF


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def prmt(a: int, b: int, c: int) -> int:
    source = (b << 32) | a  # bytes 0-3 from a, 4-7 from b
    out = 0
    for i in range(4):
        selector = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (selector & 7))) & 0xFF
        if selector & 8:  # sign replication
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def round_half(x: Fraction) -> np.float16:
    """x rounded once to fp16, to nearest, ties to even (x inside fp16's range)."""
    guess = np.float16(float(x))
    candidates = [guess, np.nextafter(guess, np.float16(np.inf)), np.nextafter(guess, np.float16(-np.inf))]
    best = min(candidates, key=lambda h: (abs(Fraction(float(h)) - x), int(h.view(np.uint16)) & 1))
    return np.float16(best)


def halves(r: int) -> list[Fraction]:
    values = [float(np.uint16((r >> s) & 0xFFFF).view(np.float16)) for s in (0, 16)]
    assert all(np.isfinite(values)), "inf and NaN are not emulated: the kernels' conversions never meet them"
    return [Fraction(v) for v in values]


def from_halves(values: list[Fraction]) -> int:
    lo, hi = (int(round_half(v).view(np.uint16)) for v in values)
    return lo | hi << 16


def f16x2(op: str, *regs: int) -> int:
    lanes = list(zip(*(halves(r) for r in regs)))
    if op == "add":
        return from_halves([a + b for a, b in lanes])
    if op == "sub":
        return from_halves([a - b for a, b in lanes])
    if op == "mul":
        return from_halves([a * b for a, b in lanes])
    return from_halves([a * b + c for a, b, c in lanes])  # fma: one rounding


def execute(instruction: str, operands: list[int]) -> int:
    """The value an instruction writes, from its source operands' values."""
    parts = instruction.split(".")
    op, suffix = parts[0], ".".join(parts[1:])
    if (op, suffix) == ("mov", "b32"):
        return operands[0]
    if (op, suffix) in {("and", "b32"), ("or", "b32"), ("xor", "b32")}:
        a, b = operands
        return {"and": a & b, "or": a | b, "xor": a ^ b}[op]
    if (op, suffix) in {("shr", "b32"), ("shr", "u32"), ("shl", "b32")}:
        a, n = operands
        n = min(n, 32)  # PTX clamps shift amounts above 32
        return (a >> n if op == "shr" else a << n) & MASK
    if (op, suffix) == ("lop3", "b32"):
        return lop3(*operands)
    if (op, suffix) == ("prmt", "b32"):
        return prmt(*operands)
    if op == "shf" and suffix in {"l.wrap.b32", "r.wrap.b32", "l.clamp.b32", "r.clamp.b32"}:
        a, b, n = operands  # funnel of {b, a}: a low, b high
        n = n & 31 if "wrap" in suffix else min(n, 32)
        funnel = (b << 32) | a
        return ((funnel << n) >> 32) & MASK if suffix[0] == "l" else (funnel >> n) & MASK
    if (op, suffix) in {("add", "f16x2"), ("add", "rn.f16x2"), ("sub", "f16x2"), ("sub", "rn.f16x2"),
                        ("mul", "rn.f16x2"), ("fma", "rn.f16x2")}:
        return f16x2(op, *operands)
    raise UnknownInstruction(instruction)


def run(asm: str, registers: dict[str, int]) -> dict[str, int]:
    """Runs the asm on operand registers {"$0": value, ...}; returns every register after it."""
    registers = dict(registers)
    for statement in asm.replace("{", ";").replace("}", ";").split(";"):
        statement = statement.strip()
        if not statement or statement.startswith("//"):
            continue
        if statement.startswith(".reg"):
            kind, names = re.match(r"\.reg\s+\.(\w+)\s+(.*)", statement).groups()
            if kind != "b32":
                raise UnknownInstruction(statement)
            registers.update({name.strip(): 0 for name in names.split(",")})
            continue
        instruction, rest = statement.split(None, 1)
        destination, *sources = [x.strip() for x in rest.split(",")]
        values = [registers[s] if s in registers else int(s, 0) & MASK for s in sources]
        registers[destination] = execute(instruction, values)
    return registers


def _width(dtype: np.dtype) -> int:
    return np.dtype(dtype).itemsize * 8


def _to_lanes(elements: np.ndarray) -> list[int]:
    """One invocation's N elements of an operand -> its registers (see the module doc)."""
    width = _width(elements.dtype)
    per_reg = min(32 // width, len(elements)) if width < 32 else 1
    bits = elements.view({8: np.uint8, 16: np.uint16, 32: np.uint32}[width]).astype(np.int64)
    return [sum(int(bits[r + k]) << (width * k) for k in range(per_reg)) for r in range(0, len(elements), per_reg)]


def elementwise(asm: str, constraints: str, args: list[np.ndarray], dtypes: list, pack: int) -> list[np.ndarray]:
    """tl.inline_asm_elementwise(asm, constraints, args, dtypes, pack) on numpy arrays: the
    arguments broadcast together, consecutive groups of `pack` elements one invocation each."""
    shape = np.broadcast_shapes(*[a.shape for a in args])
    args = [a.ravel() for a in np.broadcast_arrays(*args)]
    n = args[0].size
    assert n % pack == 0
    out_regs = [pack // (min(32 // _width(d), pack) if _width(d) < 32 else 1) for d in dtypes]
    in_regs = [len(_to_lanes(a[:pack])) for a in args]
    kinds = constraints.split(",")
    assert kinds == ["=r"] * sum(out_regs) + ["r"] * sum(in_regs), f"constraints {constraints} do not match the packing"
    outputs = [np.zeros(n, dtype=d) for d in dtypes]
    for start in range(0, n, pack):
        operands = [reg for a in args for reg in _to_lanes(a[start:start + pack])]
        first_input = sum(out_regs)
        registers = run(asm, {f"${first_input + i}": v for i, v in enumerate(operands)})
        number = 0
        for out, count in zip(outputs, out_regs):
            width, per_reg = _width(out.dtype), pack // count
            bits = np.zeros(pack, dtype={8: np.uint8, 16: np.uint16, 32: np.uint32}[width])
            for r in range(count):
                reg = registers[f"${number}"]
                number += 1
                for k in range(per_reg):
                    bits[r * per_reg + k] = (reg >> (width * k)) & ((1 << width) - 1)
            out[start:start + pack] = bits.view(out.dtype)
    return [o.reshape(shape) for o in outputs]
