"""Triton pack and unpack of quant/packing.py's layout, shared by the quantize and attention kernels.

A packed row of n codes is a run of words; each word holds PER_WORD base-RADIX digits, earliest
code least significant, in WORD_BYTES little-endian bytes (1 byte, or 3 for 3-bit codes). A
kernel holds a row as a tile [WORDS_PAD, PER_WORD_PAD] whose element (w, j) is code
w * PER_WORD + j. Both sizes are padded to powers of two, as Triton tiles must be: only ternary
(5 digits per byte) pads the digit axis, and for every power-of-two width the tile reshaped to
[WORDS_PAD * PER_WORD_PAD] is the n codes in order.

Metadata in fp8 e4m3 reaches the kernels as its raw bytes (`as_bytes`) and is converted with
integer operations (`e4m3_to_float`, `float_to_e4m3`): Triton's fp8 types need compute capability
8.9, and the default cache must run on an A100 with the same bytes.
"""
import torch
import triton
import triton.language as tl

from quant.packing import WIDTHS, packed_size


def code_layout(n: int, bits) -> dict:
    """The constexpr arguments describing a row of n codes of width `bits` (see module doc)."""
    radix, per_word, word_bytes = WIDTHS[bits]
    words = triton.cdiv(n, per_word)
    return dict(RADIX=radix, PER_WORD=per_word, WORD_BYTES=word_bytes, ROW_BYTES=packed_size(n, bits),
                WORDS_PAD=triton.next_power_of_2(words), PER_WORD_PAD=triton.next_power_of_2(per_word))


def as_bytes(meta: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 metadata as its raw bytes (the same memory, uint8); fp16 metadata as it is."""
    return meta.view(torch.uint8) if meta.dtype == torch.float8_e4m3fn else meta


@triton.jit
def metadata_to_float(x, factor=1.0):
    """Loaded metadata times factor -> fp32: uint8 holds e4m3 bits (see as_bytes), anything else is
    a float."""
    if x.dtype == tl.uint8:
        return e4m3_to_float(x, factor)
    else:
        return x.to(tl.float32) * factor


@triton.jit
def e4m3_to_float(byte, factor=1.0):
    """e4m3 bits (uint8) -> fp32 times factor, exactly for factor 1. e4m3's 7 magnitude bits
    shifted into fp16's exponent and mantissa are the value times 2^-8 (bias 7 against 15),
    subnormals included, which fp16, unlike fp32 on a GPU, never flushes; the 2^8 joins the factor
    in one multiply."""
    b = byte.to(tl.int32)
    half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * (256.0 * factor)


@triton.jit
def float_to_e4m3(x):
    """fp32 x that is an e4m3 value (kernels/quantize.py rounds to one first) -> its bits, uint8:
    e4m3_to_float's inverse (x * 2^-8 is exact in fp16)."""
    half = (x * (1.0 / 256.0)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return (((half >> 8) & 0x80) | ((half >> 7) & 0x7F)).to(tl.uint8)


@triton.jit
def tile_codes(N: tl.constexpr, PER_WORD: tl.constexpr, WORDS_PAD: tl.constexpr, PER_WORD_PAD: tl.constexpr):
    """Code index of each tile element [WORDS_PAD, PER_WORD_PAD], and whether it is a real code."""
    w = tl.arange(0, WORDS_PAD)[:, None]
    j = tl.arange(0, PER_WORD_PAD)[None, :]
    index = w * PER_WORD + j
    return index, (j < PER_WORD) & (index < N)


@triton.jit
def _digit_place(j, RADIX: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """RADIX ** j as int32 (j < 8); DIGIT_BITS = log2(RADIX) for power-of-two radices."""
    if RADIX == 3:
        return 1 + 2 * (j >= 1) + 6 * (j >= 2) + 18 * (j >= 3) + 54 * (j >= 4)
    else:
        return 1 << (j * DIGIT_BITS)


@triton.jit
def load_words(row_ptrs, valid, RADIX: tl.constexpr, WORD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr,
               WORDS_PAD: tl.constexpr):
    """row_ptrs [R] uint8 pointers to packed rows, valid [R] -> words [R, WORDS_PAD]: uint8 for
    one-byte words (the PTX conversion takes four a register), int32 for 3-byte words."""
    w = tl.arange(0, WORDS_PAD)
    if WORD_BYTES == 1:
        return tl.load(row_ptrs[:, None] + w[None, :], mask=valid[:, None] & (w < ROW_BYTES)[None, :], other=0)
    else:
        words = tl.zeros([row_ptrs.shape[0], WORDS_PAD], tl.int32)
        word_ptrs = row_ptrs[:, None] + (w * WORD_BYTES)[None, :]  # the word's bytes at constant offsets from it
        for i in tl.static_range(WORD_BYTES):
            byte = tl.load(word_ptrs + i, mask=valid[:, None] & (w * WORD_BYTES + i < ROW_BYTES)[None, :], other=0)
            words = words | (byte.to(tl.int32) << (8 * i))
        return words


@triton.constexpr_function
def code_bias(RADIX, BIASED=True, FLOORS=False):
    """What the PTX conversion adds to every code of a radix (see PTX_DIGITS, PTX_TRIT), or to
    every floor of base-3 words (FLOORS, see unpack_words), 0 for unbiased codes: the kernels fold
    it into each token's `low`, never subtract it per element."""
    return 0 if not BIASED else -2048 if RADIX == 3 and not FLOORS else 1024


# The GPU path's conversions, in PTX (tl.inline_asm_elementwise): Triton cannot reinterpret a
# uint32 as two fp16, the one step that makes a code an fp16 without a conversion instruction.
# Each string is one elementwise step; tests/test_ptx.py runs every PTX_ string of this module in
# an emulator against the pure-Triton path (the interpreter's), bit for bit.
# Digit (x >> $3) & $7 of four bytes x (pack=4: $2 holds them, $3-$6 the shift, $7-$10 the mask)
# -> two fp16x2 registers, 1024 + digit each: PRMT puts each byte under the exponent byte 0x64.
PTX_DIGITS = tl.constexpr("""{
.reg .b32 t;
shr.b32 t, $2, $3;
and.b32 t, t, $7;
prmt.b32 $0, t, 0x64646464, 0x5140;
prmt.b32 $1, t, 0x64646464, 0x7362;
}""")
# Digit j of two 3-byte words (pack=2: $1, $2; PRMT selector $3, mask $5) -> one fp16x2, 1024 +
# digit times 2^s_j (code_weight): PRMT pairs the words' bytes 0-1, 1-2 or 2-3 in the 16-bit
# lanes, where digit j lies whole within the 10 mantissa bits, then one LOP3, (x & mask) |
# 0x64006400, no shift: 2 instructions for 2 digits, where a shift each, a PRMT and a LOP3 take 4.
PTX_DIGITS3 = tl.constexpr("""{
.reg .b32 t;
prmt.b32 t, $1, $2, $3;
lop3.b32 $0, t, $5, 0x64006400, 0xEA;
}""")
# Base 3 in fp16 pairs, from T = 1024 + t (t < 243): 1024 + t // 3 = rn(T / 3 + 682.5 - 1024 / 3),
# one FMA: T * fp16(1/3) + 682.5 = 1024 + t / 3 - 1/4 - t 8e-5, within 0.42 of the integer.
PTX_THIRD = tl.constexpr("""{
.reg .b32 c, k;
mov.b32 c, 0x35553555;
mov.b32 k, 0x61556155;
fma.rn.f16x2 $0, $1, c, k;
}""")
# Digit j of base 3 from T_j = 1024 + t_j and T_(j+1): T_j - 3 T_(j+1) = t_j - 3 t_(j+1) - 2048,
# exact in fp16 (-2048 + digit): ternary codes carry code_bias -2048.
PTX_TRIT = tl.constexpr("""{
.reg .b32 m;
mov.b32 m, 0xC200C200;
fma.rn.f16x2 $0, $2, m, $1;
}""")


@triton.jit
def _to_half(lanes, WORD_BYTES: tl.constexpr, BIAS: tl.constexpr):
    """Digits < 1024 (uint32 [R, W]) -> fp16 digit + BIAS exactly: with one-byte words two digits
    sit in the 16-bit lanes, lane 0 first in [R, 2 W]. A lane ORed with 0x6400 is the fp16 1024 +
    digit (the digit fills the mantissa), so one integer op and one subtraction per value, no
    integer-to-float conversion."""
    biased = lanes | 0x64006400
    low = (biased & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 - BIAS)
    if WORD_BYTES == 1:
        high = (biased >> 16).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 - BIAS)
        return tl.reshape(tl.join(low, high), [lanes.shape[0], 2 * lanes.shape[1]])
    else:
        return low


@triton.jit
def small_to_half(x):
    """Integers 0 <= x < 1024 (int32) -> fp16 x exactly, through the mantissa (_to_half): no
    integer-to-float conversion (SVDq's latent codes)."""
    return _to_half(x.to(tl.uint32), 3, 0)


@triton.jit
def _third(t, PTX: tl.constexpr):
    """t // 3 of each value: fp16 1024 + t (PTX), or each 16-bit lane of uint32 pairs ((x * 171)
    >> 9 is x // 3 for x < 243, under 2^16, so both lanes divide at once)."""
    if PTX:
        return tl.inline_asm_elementwise(PTX_THIRD, "=r,r", [t], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return ((t * 171) >> 9) & 0x007F007F


@triton.jit
def _digit(x, j: tl.constexpr, RADIX: tl.constexpr, PER_WORD: tl.constexpr, DIGIT_BITS: tl.constexpr,
           WORD_BYTES: tl.constexpr, BIAS: tl.constexpr, PTX: tl.constexpr, FLOORS: tl.constexpr = False):
    """Digit j + BIAS of every word (FLOORS, base 3: the floor x // 3^j + BIAS), fp16 [R, W] in
    word order. x: on the PTX path the words (ternary: as fp16 1024 + byte), else the pure path's
    lanes (pairs of one-byte words in the 16-bit lanes of a uint32 [R, W / 2], or 3-byte words)."""
    pairs: tl.constexpr = 2 if WORD_BYTES == 1 and not PTX else 1
    if j >= PER_WORD:
        return tl.zeros([x.shape[0], x.shape[1] * pairs], tl.float16) + BIAS
    elif RADIX == 3:  # digit j = t_j - 3 t_(j+1), t_j = x // 3^j
        t = x
        for _ in tl.static_range(j):
            t = _third(t, PTX)
        if FLOORS:
            return t if PTX else _to_half(t, 1, BIAS)
        elif PTX:
            return tl.inline_asm_elementwise(PTX_TRIT, "=r,r,r", [t, _third(t, PTX)], dtype=tl.float16,
                                             is_pure=True, pack=2)
        else:
            return _to_half(t - 3 * _third(t, PTX), 1, BIAS)
    elif PTX and WORD_BYTES == 1:
        shift = tl.full(x.shape, j * DIGIT_BITS, tl.int32)
        mask = tl.full(x.shape, (RADIX - 1) * 0x01010101, tl.uint32)
        return tl.inline_asm_elementwise(PTX_DIGITS, "=r,=r,r,r,r,r,r,r,r,r,r", [x, shift, mask],
                                         dtype=tl.float16, is_pure=True, pack=4)
    elif PTX:  # 3-byte words: the byte pair holding digit j (bytes 0-1, 1-2, 2-3), masked in place
        pair = tl.full(x.shape, 0x5410 if j < 3 else 0x6521 if j < 6 else 0x7632, tl.int32)
        mask = tl.full(x.shape, (7 << _place3(j)) * 0x00010001, tl.int32)
        return tl.inline_asm_elementwise(PTX_DIGITS3, "=r,r,r,r,r,r,r", [x, pair, mask], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif WORD_BYTES == 3:  # digit j times 2^s_j, as PTX_DIGITS3 makes it
        return _to_half((x >> (8 * (j // 3))) & (7 << _place3(j)), 3, BIAS)
    else:
        return _to_half((x >> (j * DIGIT_BITS)) & ((RADIX - 1) * 0x00010001), 1, BIAS)


@triton.constexpr_function
def _place3(j):
    """Where digit j of a 3-byte word lies in the byte pair PTX_DIGITS3 takes it from (bytes j // 3
    and the next): bit 3 j - 8 floor(j / 3), so it comes times 2^that (code_weight)."""
    return 3 * j - 8 * (j // 3)


@triton.jit
def code_weight(position, WORD_BYTES: tl.constexpr):
    """What unpack_words's values at digit positions `position` (an int tensor) are to be weighed
    by, fp32: 3-byte words' digit j comes as digit * 2^s_j (s_j = 3 j - 8 floor(j / 3): where
    it lies in the bytes PTX_DIGITS3 pairs), so weight 2^-s_j; every other width 1. A kernel
    folds it into the other operand of its product (q), or into the sums after it."""
    if WORD_BYTES == 3:
        return 1.0 / (1 << (3 * position - 8 * (position // 3))).to(tl.float32)
    else:
        return tl.full(position.shape, 1.0, tl.float32)


@triton.jit
def _digit_source(words, RADIX: tl.constexpr, WORD_BYTES: tl.constexpr, BIAS: tl.constexpr, PTX: tl.constexpr,
                  FLOORS: tl.constexpr):
    """words [R, WORDS_PAD] as _digit takes them (see there)."""
    if PTX:
        tl.static_assert(BIAS == code_bias(RADIX, True, FLOORS))
        if RADIX == 3:  # the bytes as fp16 1024 + byte: PTX_DIGITS of all 8 bits
            return _digit(words, 0, 256, 1, 8, 1, 1024, PTX)
        else:
            return words
    elif WORD_BYTES == 1:  # two words in the 16-bit lanes of a uint32
        even, odd = tl.split(tl.reshape(words.to(tl.uint32), [words.shape[0], words.shape[1] // 2, 2]))
        return even | (odd << 16)                                               # (R, WORDS_PAD / 2)
    else:  # 3-bit codes: 24-bit words, one a lane
        return words.to(tl.uint32)


@triton.jit
def unpack_digit(words, j: tl.constexpr, RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                 BIAS: tl.constexpr = 0, PTX: tl.constexpr = False, FLOORS: tl.constexpr = False):
    """words [R, WORDS_PAD] (load_words) -> digit (or floor) j + BIAS of each, fp16 [R, WORDS_PAD]
    (as unpack_words)."""
    return _digit(_digit_source(words, RADIX, WORD_BYTES, BIAS, PTX, FLOORS), j, RADIX, PER_WORD,
                  8 * WORD_BYTES // PER_WORD, WORD_BYTES, BIAS, PTX, FLOORS)


@triton.jit
def unpack_words(words, RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                 PER_WORD_PAD: tl.constexpr, BIAS: tl.constexpr = 0, PTX: tl.constexpr = False,
                 FLOORS: tl.constexpr = False):
    """words [R, WORDS_PAD] (load_words) -> codes + BIAS [R, WORDS_PAD * PER_WORD_PAD] fp16 (exact
    small integers) in tile order, 3-byte words' digits weighted (times 1 / code_weight); padded
    digit positions hold BIAS (PER_WORD_PAD < PER_WORD: the first PER_WORD_PAD digits of each
    word). PTX: the conversions in
    inline PTX (a GPU; BIAS must then be code_bias), else pure Triton (the interpreter; any BIAS).
    FLOORS (base 3): position j holds the floor t_j = word // 3^j + BIAS, not the digit t_j - 3
    t_(j+1): one fp16 FMA a pair of words from the last (PTX_THIRD), where a digit takes two, and
    products are linear, so a kernel takes the differences of its sums instead (decode values).
    Pure path: one-byte words are paired into the 16-bit lanes of a uint32, so each integer op
    works on two words. Each digit position is unpacked in the words' own layout and the
    positions joined along new minor axes, which stay within each thread: no word is fetched
    again per digit. tl.join appends the most minor axis, so the last join picks digit bit 0:
    join(join(d0, d2), join(d1, d3))."""
    B: tl.constexpr = 8 * WORD_BYTES // PER_WORD
    x = _digit_source(words, RADIX, WORD_BYTES, BIAS, PTX, FLOORS)
    if PER_WORD_PAD == 1:
        digits = _digit(x, 0, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS)
    elif PER_WORD_PAD == 2:
        digits = tl.join(_digit(x, 0, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                         _digit(x, 1, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS))
    elif PER_WORD_PAD == 4:
        digits = tl.join(tl.join(_digit(x, 0, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                 _digit(x, 2, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS)),
                         tl.join(_digit(x, 1, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                 _digit(x, 3, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS)))
    else:
        digits = tl.join(tl.join(tl.join(_digit(x, 0, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                         _digit(x, 4, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS)),
                                 tl.join(_digit(x, 2, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                         _digit(x, 6, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS))),
                         tl.join(tl.join(_digit(x, 1, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                         _digit(x, 5, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS)),
                                 tl.join(_digit(x, 3, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS),
                                         _digit(x, 7, RADIX, PER_WORD, B, WORD_BYTES, BIAS, PTX, FLOORS))))
    return tl.reshape(digits, [words.shape[0], words.shape[1] * PER_WORD_PAD])


@triton.jit
def store_codes(row_ptr, codes, is_code, store_mask, RADIX: tl.constexpr, PER_WORD: tl.constexpr,
                WORD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr, WORDS_PAD: tl.constexpr,
                PER_WORD_PAD: tl.constexpr):
    """Packs codes [WORDS_PAD, PER_WORD_PAD] int32 (tile order; is_code marks real ones) into the
    row at row_ptr (uint8), stored where store_mask (a scalar) holds."""
    j = tl.arange(0, PER_WORD_PAD)[None, :]
    place = _digit_place(j, RADIX, 8 * WORD_BYTES // PER_WORD)
    words = tl.sum(tl.where(is_code, codes * place, 0), 1)                              # (WORDS_PAD,)
    w = tl.arange(0, WORDS_PAD)
    for i in tl.static_range(WORD_BYTES):
        byte_index = w * WORD_BYTES + i
        tl.store(row_ptr + byte_index, ((words >> (8 * i)) & 255).to(tl.uint8),
                 mask=tl.where(store_mask, byte_index < ROW_BYTES, False))
