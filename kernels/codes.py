"""Triton pack and unpack of quant/packing.py's layout, shared by the quantize and attention kernels.

A packed row of n codes is a run of words; each word holds PER_WORD base-RADIX digits, earliest
code least significant, in WORD_BYTES little-endian bytes (1 byte, or 3 for 3-bit codes). A
kernel holds a row as a tile [WORDS_PAD, PER_WORD_PAD] whose element (w, j) is code
w * PER_WORD + j. Both sizes are padded to powers of two, as Triton tiles must be: only ternary
(5 digits per byte) pads the digit axis, and for every power-of-two width the tile reshaped to
[WORDS_PAD * PER_WORD_PAD] is the n codes in order.
"""
import triton
import triton.language as tl

from quant.packing import WIDTHS, packed_size


def code_layout(n: int, bits) -> dict:
    """The constexpr arguments describing a row of n codes of width `bits` (see module doc)."""
    radix, per_word, word_bytes = WIDTHS[bits]
    words = triton.cdiv(n, per_word)
    return dict(RADIX=radix, PER_WORD=per_word, WORD_BYTES=word_bytes, ROW_BYTES=packed_size(n, bits),
                WORDS_PAD=triton.next_power_of_2(words), PER_WORD_PAD=triton.next_power_of_2(per_word))


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
def unpack_words(words, RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                 PER_WORD_PAD: tl.constexpr):
    """words [R, WORDS_PAD] int32 -> codes [R, WORDS_PAD * PER_WORD_PAD] fp32 in tile order."""
    j = tl.arange(0, PER_WORD_PAD)[None, None, :]
    if RADIX == 3:
        # Base-3 digits without integer division: for a byte x < 243, (x + 1/2) / 3**j lies at
        # least 1/162 from an integer, far beyond fp32 rounding, so floor() is exact; likewise t % 3.
        x = words[:, :, None].to(tl.float32) + 0.5
        t = tl.floor(x * (1.0 / _digit_place(j, RADIX, 0).to(tl.float32)))
        digits = t - 3.0 * tl.floor((t + 0.5) * (1.0 / 3.0))
    else:
        digits = ((words[:, :, None] >> (j * (8 * WORD_BYTES // PER_WORD))) & (RADIX - 1)).to(tl.float32)
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
