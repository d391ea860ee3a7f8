"""The GPU path's inline PTX (kernels/codes.py PTX_ strings), without a GPU: an emulator
(tests/ptx_emulator.py) checked against the PTX ISA's definitions runs every asm string the
kernels contain, in place of Triton's interpreter (which cannot run PTX), and the PTX path must
equal the pure-Triton path bit for bit on every code value of every width; attention through
the PTX path (emulated) and through the biased pure path must match the plain-torch reference."""
import random
import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import ROOT
import test_kernels
from test_kernels import poison_empty  # noqa: F401 - NaN-poisoned outputs here too
from test_kernels import test_packed_decode_attention_matches_reference as packed_decode_matches_reference
from ptx_emulator import UnknownInstruction, elementwise, lop3, prmt, run
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, _get_np_dtype

from kernels import codes, decode_attention
from kernels.codes import code_bias, code_layout, load_words, unpack_words
from quant.packing import WIDTHS, packed_size, unpack

PTX_STRINGS = {name: value.value for name, value in vars(codes).items()
               if name.startswith("PTX_") and isinstance(value, tl.constexpr)}


def test_lop3_lut_is_the_isa_definition():
    # PTX ISA, lop3: immLut = F(0xF0, 0xCC, 0xAA) for the function F of a, b, c.
    assert all(lop3(0xF0, 0xCC, 0xAA, lut) & 0xFF == lut for lut in range(256))
    for _ in range(100):
        a, b, c = (random.getrandbits(32) for _ in range(3))
        assert lop3(a, b, c, (0xF0 & 0xCC) | 0xAA) == (a & b) | c
        assert lop3(a, b, c, 0xF0 ^ 0xCC ^ 0xAA) == a ^ b ^ c
        assert lop3(a, b, c, ~0xF0 & 0xFF) == ~a & 0xFFFFFFFF


def test_prmt_is_the_isa_definition():
    # PTX ISA, prmt default mode: selector nibbles index the bytes {b, a} (a = bytes 0-3); the
    # nibble's msb replicates the selected byte's sign.
    a, b = 0x83828180, 0x07060504
    assert prmt(a, b, 0x3210) == a and prmt(a, b, 0x7654) == b
    assert prmt(a, b, 0x0123) == 0x80818283
    assert prmt(a, b, 0x5140) == 0x05810480
    assert prmt(a, b, 0x8888) == 0xFFFFFFFF and prmt(a, b, 0xCCCC) == 0


def test_f16x2_rounds_once_to_nearest_even():
    def pair(lo, hi):
        return int(np.float16(lo).view(np.uint16)) | int(np.float16(hi).view(np.uint16)) << 16
    # ties to even: 1024.5 -> 1024, 1025.5 -> 1026
    assert run("add.f16x2 $0, $1, $2;", {"$1": pair(1024, 1025), "$2": pair(0.5, 0.5)})["$0"] == pair(1024, 1026)
    # fma rounds once: (1 + 2^-10) * 1.5 - 1.5 = 3 * 2^-11 exactly (rounding the product first gives 2^-9)
    out = run("fma.rn.f16x2 $0, $1, $2, $3;", {"$1": pair(1 + 2 ** -10, 3), "$2": pair(1.5, -3), "$3": pair(-1.5, 9)})
    assert out["$0"] == pair(3 * 2 ** -11, 0)
    assert run("sub.f16x2 $0, $1, $2;", {"$1": pair(1027, -2), "$2": pair(1024, 2046)})["$0"] == pair(3, -2048)


def test_an_unknown_instruction_is_refused():
    with pytest.raises(UnknownInstruction):
        run("cvt.rn.f16.f32 $0, $1;", {"$1": 0})
    with pytest.raises(UnknownInstruction):
        run("{ .reg .b16 h; mov.b16 h, 0; }", {})


def test_every_inline_asm_of_the_kernels_is_a_collected_string():
    """Each tl.inline_asm_elementwise in kernels/ names a PTX_ constant of kernels/codes.py (the
    strings the tests below run) and each of those runs in the emulator."""
    named = set()
    for source in (ROOT / "kernels").glob("*.py"):
        calls = re.findall(r"inline_asm_elementwise\(\s*(\w+)", source.read_text())
        assert set(calls) <= set(PTX_STRINGS), f"{source.name}: asm not taken from kernels/codes.py: {calls}"
        named |= set(calls)
    assert named == set(PTX_STRINGS), "a PTX_ string that no kernel uses"
    for asm in PTX_STRINGS.values():
        operands = {f"${i}": random.getrandbits(32) & 0x3FFF3FFF for i in range(12)}  # finite as fp16 too
        run(asm, operands)


@pytest.fixture
def emulated_ptx(monkeypatch):
    """Triton's interpreter runs tl.inline_asm_elementwise through the emulator. Each asm claims to
    be elementwise: the elements are shuffled before they are grouped into invocations, so an
    output that depends on its neighbours shows."""
    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        assert asm in PTX_STRINGS.values(), "an asm string that is not one of kernels/codes.py's"
        shape = values[0].data.shape
        order = np.random.permutation(values[0].data.size)
        args = [np.broadcast_to(v.data, shape).ravel()[order] for v in values]
        element_types = [getattr(t, "element_ty", t) for t in types]  # block types, or scalars
        outputs = elementwise(asm, constraints, args, [_get_np_dtype(t) for t in element_types], pack)
        results = []
        for out, element_type in zip(outputs, element_types):
            unshuffled = np.empty_like(out)
            unshuffled[order] = out
            results.append(TensorHandle(unshuffled.reshape(shape), element_type))

        class Call:
            def get_result(self, i):
                return results[i]
        return Call()

    monkeypatch.setattr(InterpreterBuilder, "create_inline_asm", create_inline_asm, raising=False)


@triton.jit
def _unpack_rows(packed_ptr, out_ptr, R: tl.constexpr, RADIX: tl.constexpr,
                 PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr,
                 WORDS_PAD: tl.constexpr, PER_WORD_PAD: tl.constexpr, BIAS: tl.constexpr, PTX: tl.constexpr,
                 FLOORS: tl.constexpr):
    """Rows [R, ROW_BYTES] of packed codes -> their tiles + BIAS [R, WORDS_PAD * PER_WORD_PAD] fp16
    (FLOORS: base-3 words' floors)."""
    rows = tl.arange(0, R)
    words = load_words(packed_ptr + rows * ROW_BYTES, rows < R, RADIX, WORD_BYTES, ROW_BYTES, WORDS_PAD)
    tile = unpack_words(words, RADIX, PER_WORD, WORD_BYTES, PER_WORD_PAD, BIAS, PTX, FLOORS)
    columns = tl.arange(0, WORDS_PAD * PER_WORD_PAD)
    tl.store(out_ptr + rows[:, None] * (WORDS_PAD * PER_WORD_PAD) + columns[None, :], tile)


def unpacked(packed_rows, n, bits, ptx, floors=False):
    layout = code_layout(n, bits)
    out = torch.empty(packed_rows.shape[0], layout["WORDS_PAD"] * layout["PER_WORD_PAD"], dtype=torch.float16)
    _unpack_rows[(1,)](packed_rows, out, R=packed_rows.shape[0], BIAS=code_bias(layout["RADIX"], True, floors),
                       PTX=ptx, FLOORS=floors, **layout)
    return out


def rows_of_every_byte(n, bits):
    """Packed rows [R, bytes] holding every byte value a row of `bits` codes can hold (so every code
    in every digit position), then random bytes; R a power of two."""
    radix, per_word, word_bytes = WIDTHS[bits]
    size = packed_size(n, bits)
    values = 243 if radix == 3 else 256
    R = triton.next_power_of_2(triton.cdiv(values, size) + 1)
    rows = torch.randint(values, (R * size,), dtype=torch.int32)
    rows[:values] = torch.arange(values)
    return rows.to(torch.uint8).reshape(R, size)


@pytest.mark.parametrize("bits", sorted(WIDTHS))
@pytest.mark.parametrize("n", [64, 128])
def test_ptx_path_equals_the_pure_path_bit_for_bit(emulated_ptx, bits, n):
    rows = rows_of_every_byte(n, bits)
    ptx, pure = unpacked(rows, n, bits, True), unpacked(rows, n, bits, False)
    assert torch.equal(ptx.view(torch.int16), pure.view(torch.int16))
    # both are quant/packing.py's codes plus the bias, 3-byte words' digit j times 2^(3 j - 8 floor(j / 3))
    radix, per_word, word_bytes = WIDTHS[bits]
    layout = code_layout(n, bits)
    real = torch.tensor([w * per_word + j < n and j < per_word for w in range(layout["WORDS_PAD"])
                         for j in range(layout["PER_WORD_PAD"])])
    j = torch.arange(layout["WORDS_PAD"] * layout["PER_WORD_PAD"]) % layout["PER_WORD_PAD"]
    weight = 2.0 ** -(3 * j - 8 * (j // 3)) if word_bytes == 3 else torch.ones(j.shape)
    codes = (pure.float() - code_bias(radix)) * weight
    assert torch.equal(codes[:, real].to(torch.uint8), unpack(rows, bits, n))


@pytest.mark.parametrize("n", [64, 128])
def test_ptx_floors_equal_the_pure_floors_bit_for_bit(emulated_ptx, n):
    """Base-3 words as floors (the decode kernel's values): position j of word w holds
    byte // 3^j + 1024, on both paths, for every byte value."""
    rows = rows_of_every_byte(n, 1.5)
    ptx, pure = unpacked(rows, n, 1.5, True, True), unpacked(rows, n, 1.5, False, True)
    assert torch.equal(ptx.view(torch.int16), pure.view(torch.int16))
    layout = code_layout(n, 1.5)
    words = torch.nn.functional.pad(rows.long(), (0, layout["WORDS_PAD"] - rows.shape[1]))     # (R, WORDS_PAD)
    powers = 3 ** torch.arange(layout["PER_WORD_PAD"]).clamp(max=layout["PER_WORD"])  # padded positions: 3^5 > byte
    expected = (words[:, :, None] // powers + 1024).flatten(1)
    assert torch.equal(pure.long(), expected)


def test_a_changed_asm_string_fails(emulated_ptx, monkeypatch):
    """The comparison above can fail: PTX_DIGITS with the bytes of its second register swapped."""
    wrong = codes.PTX_DIGITS.value.replace("0x7362", "0x6273")
    monkeypatch.setitem(PTX_STRINGS, "PTX_DIGITS", wrong)
    monkeypatch.setattr(codes, "PTX_DIGITS", tl.constexpr(wrong))
    rows = rows_of_every_byte(64, 2)
    assert not torch.equal(unpacked(rows, 64, 2, True).view(torch.int16), unpacked(rows, 64, 2, False).view(torch.int16))


@pytest.mark.parametrize("path", ["biased codes, pure Triton", "PTX, emulated"])
@pytest.mark.parametrize("k_bits, v_bits, variant", [(2, 1.5, "post-RoPE, one group, fp16 metadata"),
                                                     (3, 1.5, "post-RoPE, one group, fp16 metadata"),
                                                     (4, 4, "pre-RoPE, four groups, fp8 metadata"),
                                                     (1, 8, "post-RoPE, one group, fp16 metadata")])
def test_decode_attention_through_the_gpu_path_matches_reference(emulated_ptx, monkeypatch, path, k_bits, v_bits,
                                                                  variant):
    """tests/test_kernels.py's packed decode test with codes carrying code_bias, folded into each
    token's low: unpacked by the pure path, then by the emulated PTX. The fold costs precision:
    q . (code + 1024) sums terms 1024 times larger than q . code, so fp32 keeps about 10 bits
    fewer of the score (interpreter: errors up to about 5e-3 where unbiased codes give 1e-6), still
    a thousandth of a quantization step; a fold left out or wrong is off by O(1)."""
    monkeypatch.setattr(decode_attention, "code_path", lambda: dict(BIASED=True, PTX=path.startswith("PTX")))
    monkeypatch.setitem(test_kernels.TOLERANCE, torch.float32, dict(rtol=2e-2, atol=2e-2))
    packed_decode_matches_reference(k_bits, v_bits, 4, 64, variant)
