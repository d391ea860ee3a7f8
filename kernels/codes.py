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
def metadata_to_float(x):
    """Loaded metadata -> fp32: uint8 holds e4m3 bits (see as_bytes), anything else is a float."""
    if x.dtype == tl.uint8:
        return e4m3_to_float(x)
    else:
        return x.to(tl.float32)


@triton.jit
def e4m3_to_float(byte):
    """e4m3 bits (uint8) -> fp32, exactly. e4m3's 7 magnitude bits shifted into fp16's exponent and
    mantissa are the value times 2^-8 (bias 7 against 15), subnormals included, which fp16, unlike
    fp32 on a GPU, never flushes."""
    b = byte.to(tl.int32)
    half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * 256.0


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
    """row_ptrs [R] uint8 pointers to packed rows, valid [R] -> words [R, WORDS_PAD] int32."""
    w = tl.arange(0, WORDS_PAD)
    words = tl.zeros([row_ptrs.shape[0], WORDS_PAD], tl.int32)
    for i in tl.static_range(WORD_BYTES):
        byte_index = w * WORD_BYTES + i
        byte = tl.load(row_ptrs[:, None] + byte_index[None, :],
                       mask=valid[:, None] & (byte_index < ROW_BYTES)[None, :], other=0)
        words = words | (byte.to(tl.int32) << (8 * i))
    return words


@triton.jit
def _to_half(lanes, WORD_BYTES: tl.constexpr):
    """Digits < 1024 (uint32 [R, W]) -> fp16 exactly: with one-byte words two digits sit in the
    16-bit lanes, lane 0 first in [R, 2 W]. A lane ORed with 0x6400 is the fp16 1024 + digit
    (the digit fills the mantissa), so one integer op and one subtraction per value, no
    integer-to-float conversion."""
    biased = lanes | 0x64006400
    low = (biased & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0
    if WORD_BYTES == 1:
        high = (biased >> 16).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0
        return tl.reshape(tl.join(low, high), [lanes.shape[0], 2 * lanes.shape[1]])
    else:
        return low


@triton.jit
def _digit(lanes, j: tl.constexpr, RADIX: tl.constexpr, PER_WORD: tl.constexpr, DIGIT_BITS: tl.constexpr,
           WORD_BYTES: tl.constexpr):
    """Digit j of every word of a power-of-two radix, fp16, in the words' own layout."""
    if j >= PER_WORD:
        return tl.zeros([lanes.shape[0], lanes.shape[1] * (2 if WORD_BYTES == 1 else 1)], tl.float16)
    else:
        lane_mask: tl.constexpr = (RADIX - 1) * (0x00010001 if WORD_BYTES == 1 else 1)
        return _to_half((lanes >> (j * DIGIT_BITS)) & lane_mask, WORD_BYTES)


@triton.jit
def unpack_words(words, RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                 PER_WORD_PAD: tl.constexpr):
    """words [R, WORDS_PAD] int32 -> codes [R, WORDS_PAD * PER_WORD_PAD] fp16 (exact small
    integers) in tile order. One-byte words are paired into the 16-bit lanes of a uint32, so each
    integer op below works on two words; each digit position is unpacked in the pairs' own
    layout and the positions joined along new minor axes, which stay within each thread: no word
    is fetched again per digit. tl.join appends the most minor axis, so the last join picks digit
    bit 0: join(join(d0, d2), join(d1, d3))."""
    B: tl.constexpr = 8 * WORD_BYTES // PER_WORD
    if WORD_BYTES == 1:  # two words in the 16-bit lanes of a uint32
        even, odd = tl.split(tl.reshape(words.to(tl.uint32), [words.shape[0], words.shape[1] // 2, 2]))
        lanes = even | (odd << 16)                                              # (R, WORDS_PAD / 2)
    else:  # 3-bit codes: 24-bit words, one a lane
        lanes = words.to(tl.uint32)
    if RADIX == 3:
        # Base 3, 5 digits a byte x < 243: x // 3 is (x * 171) >> 9, exact for x < 243 and under
        # 2^16, so both lanes divide at once; digit j is t_j - 3 t_(j+1). Digits 5-7 pad to 8.
        t1 = ((lanes * 171) >> 9) & 0x007F007F
        t2 = ((t1 * 171) >> 9) & 0x007F007F
        t3 = ((t2 * 171) >> 9) & 0x007F007F
        t4 = ((t3 * 171) >> 9) & 0x007F007F
        zero = tl.zeros(words.shape, tl.float16)
        digits = tl.join(tl.join(tl.join(_to_half(lanes - 3 * t1, 1), _to_half(t4, 1)),
                                 tl.join(_to_half(t2 - 3 * t3, 1), zero)),
                         tl.join(tl.join(_to_half(t1 - 3 * t2, 1), zero), tl.join(_to_half(t3 - 3 * t4, 1), zero)))
    elif PER_WORD_PAD == 1:
        digits = _to_half(lanes, WORD_BYTES)
    elif PER_WORD_PAD == 2:
        digits = tl.join(_digit(lanes, 0, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 1, RADIX, PER_WORD, B, WORD_BYTES))
    elif PER_WORD_PAD == 4:
        digits = tl.join(tl.join(_digit(lanes, 0, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 2, RADIX, PER_WORD, B, WORD_BYTES)),
                         tl.join(_digit(lanes, 1, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 3, RADIX, PER_WORD, B, WORD_BYTES)))
    else:
        digits = tl.join(tl.join(tl.join(_digit(lanes, 0, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 4, RADIX, PER_WORD, B, WORD_BYTES)),
                                 tl.join(_digit(lanes, 2, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 6, RADIX, PER_WORD, B, WORD_BYTES))),
                         tl.join(tl.join(_digit(lanes, 1, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 5, RADIX, PER_WORD, B, WORD_BYTES)),
                                 tl.join(_digit(lanes, 3, RADIX, PER_WORD, B, WORD_BYTES), _digit(lanes, 7, RADIX, PER_WORD, B, WORD_BYTES))))
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
