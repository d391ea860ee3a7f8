"""Pack and unpack low-bit integer codes: the one home for bit layout in the project.

Codes are uint8 [..., n] with values in [0, n_levels(bits)); they are packed along the LAST
axis, each row independently, into uint8 [..., packed_size(n, bits)]. Rows are zero-padded
internally to a whole number of words; padding never appears in unpacked output.

Widths (the `bits` argument):
  1, 2, 4, 8  A little-endian bit stream: code i sits in byte i // (8 // bits) at bit offset
              (i % (8 // bits)) * bits, lowest bits = earliest code.
              Unpack in a kernel: (byte >> offset) & (2**bits - 1).
  3           8 codes per 3-byte word, word = b0 | b1 << 8 | b2 << 16, code j of the 8 at bits
              3j..3j+2. This is the same little-endian bit stream (code i at stream bit 3i), so
              a row of n codes needs only ceil(3n / 8) bytes; the last word may be truncated.
              Unpack in a kernel: (word >> 3j) & 7.
  1.5         Ternary codes {0, 1, 2}, 5 trits per byte in base 3:
              byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 (max 242), 1.6 bits per element.
              Unpack in a kernel: (byte // 3**j) % 3. Base-3 digits cannot be read with masks
              (SKVQ's released code masked with 1 and lost every 2).

packed_size(n, bits) = ceil(n * bits / 8) for integer widths, ceil(n / 5) for ternary.

Mixed widths (`pack_mixed`, SVDq's latent channels): code i of a row has its own width w[i] in
{1, 2, 4, 8} and sits at bit offset w[0] + ... + w[i-1] of the same little-endian bit stream.
With widths that fall along the row in runs whose bit totals are whole multiples of the next
width (as SVDq's schedules do), no code straddles a byte: unpack in a kernel with
(byte[offset // 8] >> offset % 8) & (2**w - 1).

Every width is a word of `codes_per_word` base-`radix` digits, earliest code least significant,
stored little-endian in `bytes_per_word` bytes; for power-of-two radices the digit arithmetic
below is exactly the shifts and masks above.
"""
import math

import torch
import torch.nn.functional as F

# bits -> (radix, codes_per_word, bytes_per_word)
WIDTHS = {1: (2, 8, 1), 2: (4, 4, 1), 3: (8, 8, 3), 4: (16, 2, 1), 8: (256, 1, 1), 1.5: (3, 5, 1)}


def _width(bits):
    if bits not in WIDTHS:
        raise ValueError(f"unsupported code width {bits!r}; expected one of {sorted(WIDTHS)}")
    return WIDTHS[bits]


def n_levels(bits) -> int:
    """Number of distinct codes: 2**bits, or 3 for ternary (1.5)."""
    return _width(bits)[0]


def packed_size(n: int, bits) -> int:
    """Bytes needed for n codes along the packed axis."""
    _width(bits)
    return math.ceil(n / 5) if bits == 1.5 else math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits) -> torch.Tensor:
    """uint8 [..., n] codes -> uint8 [..., packed_size(n, bits)] packed along the last axis."""
    radix, per_word, word_bytes = _width(bits)
    assert codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}"
    assert codes.numel() == 0 or int(codes.max()) < radix, f"codes out of range for {bits}-bit"
    *lead, n = codes.shape
    n_words = math.ceil(n / per_word)
    digits = F.pad(codes, (0, n_words * per_word - n)).reshape(*lead, n_words, per_word)
    place = radix ** torch.arange(per_word, device=codes.device, dtype=torch.int32)
    words = (digits.to(torch.int32) * place).sum(-1, dtype=torch.int32)  # (..., n_words)
    byte_place = 256 ** torch.arange(word_bytes, device=codes.device, dtype=torch.int32)
    packed = (words[..., None] // byte_place % 256).to(torch.uint8)  # (..., n_words, word_bytes)
    return packed.reshape(*lead, n_words * word_bytes)[..., :packed_size(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits, n: int) -> torch.Tensor:
    """uint8 [..., packed_size(n, bits)] -> uint8 [..., n] codes; the inverse of pack."""
    radix, per_word, word_bytes = _width(bits)
    assert packed.dtype == torch.uint8, f"packed must be uint8, got {packed.dtype}"
    assert packed.shape[-1] == packed_size(n, bits), f"{packed.shape[-1]} bytes cannot hold {n} codes"
    *lead, size = packed.shape
    n_words = math.ceil(n / per_word)
    byte_groups = F.pad(packed, (0, n_words * word_bytes - size)).reshape(*lead, n_words, word_bytes)
    byte_place = 256 ** torch.arange(word_bytes, device=packed.device, dtype=torch.int32)
    words = (byte_groups.to(torch.int32) * byte_place).sum(-1, dtype=torch.int32)  # (..., n_words)
    place = radix ** torch.arange(per_word, device=packed.device, dtype=torch.int32)
    codes = (words[..., None] // place % radix).to(torch.uint8)  # (..., n_words, per_word)
    return codes.reshape(*lead, n_words * per_word)[..., :n].contiguous()


def pack_mixed(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] codes, code i of width widths[i] bits -> uint8 [..., ceil(sum(widths) / 8)]."""
    bit = torch.arange(8, device=codes.device)
    stream = (codes[..., None].to(torch.int32) >> bit) & 1                        # (..., n, 8)
    stream = stream[..., bit[None, :] < widths.to(codes.device)[:, None]]         # (..., sum(widths))
    return pack(stream.to(torch.uint8), 1)


def unpack_mixed(packed: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_mixed -> uint8 [..., len(widths)]."""
    widths = widths.to(packed.device)
    stream = unpack(packed, 1, int(widths.sum())).to(torch.int32)                 # (..., sum(widths))
    bit = torch.arange(8, device=packed.device)
    used = bit[None, :] < widths[:, None]                                          # (n, 8)
    bits = torch.zeros(*stream.shape[:-1], *used.shape, dtype=torch.int32, device=packed.device)
    bits[..., used] = stream
    return (bits << bit).sum(-1).to(torch.uint8)
