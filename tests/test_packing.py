"""quant.packing: round trips, sizes and the exact byte layout that the Triton kernels unpack."""
import math

import pytest
import torch

from quant.packing import WIDTHS, n_levels, pack, packed_size, unpack

ODD_N = [1, 3, 5, 7, 8, 9, 13, 127, 128, 129]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_codes(bits, n, device="cpu"):
    lead = [(), (3,), (2, 5)][torch.randint(3, ()).item()]
    return torch.randint(n_levels(bits), (*lead, n), dtype=torch.uint8, device=device)


def bit_stream_reference(codes, bits):
    """Integer widths: concatenate each code's bits, lowest first, then cut into bytes lowest first."""
    *lead, n = codes.shape
    stream = (codes[..., None].long() >> torch.arange(bits)) & 1  # (..., n, bits)
    stream = stream.reshape(*lead, n * bits)
    stream = torch.nn.functional.pad(stream, (0, -(n * bits) % 8)).reshape(*lead, -1, 8)
    return (stream << torch.arange(8)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", ODD_N)
@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip(bits, n, device):
    codes = random_codes(bits, n, device)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.device == codes.device
    assert packed.shape == (*codes.shape[:-1], packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)
    # Rows are packed independently: packing one row alone gives the same bytes.
    first_row = codes.reshape(-1, n)[0]
    assert torch.equal(pack(first_row, bits), packed.reshape(-1, packed.shape[-1])[0])


@pytest.mark.parametrize("n", ODD_N)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_integer_widths_are_a_little_endian_bit_stream(bits, n):
    codes = random_codes(bits, n)
    assert torch.equal(pack(codes, bits), bit_stream_reference(codes, bits))


@pytest.mark.parametrize("n", ODD_N)
def test_ternary_is_base_3_five_per_byte(n):
    codes = random_codes(1.5, n)
    digits = torch.nn.functional.pad(codes.long(), (0, -n % 5)).reshape(*codes.shape[:-1], -1, 5)
    expected = (digits * torch.tensor([1, 3, 9, 27, 81])).sum(-1).to(torch.uint8)
    assert torch.equal(pack(codes, 1.5), expected)


# Hand-computed bytes. 3-bit: word = 001 | 010<<3 | ... | 111<<18 | 000<<21 = 0x1F58D1.
LAYOUT_EXAMPLES = [
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b10001101, 1]),
    (2, [1, 2, 3, 0, 2], [0b00111001, 2]),
    (3, [1, 2, 3, 4, 5, 6, 7, 0, 5], [0xD1, 0x58, 0x1F, 5]),
    (4, [0xA, 0x3, 0x5], [0x3A, 0x05]),
    (8, [0, 255, 7], [0, 255, 7]),
    (1.5, [2, 1, 0, 0, 1, 1, 2], [2 + 3 + 81, 1 + 6]),
    (1.5, [2, 2, 2, 2, 2], [242]),
]


@pytest.mark.parametrize("bits, codes, expected", LAYOUT_EXAMPLES)
def test_exact_byte_layout(bits, codes, expected):
    codes = torch.tensor(codes, dtype=torch.uint8)
    assert pack(codes, bits).tolist() == expected
    assert torch.equal(unpack(torch.tensor(expected, dtype=torch.uint8), bits, len(codes)), codes)


def test_packed_size_rule():
    # Integer widths: ceil(n * bits / 8) bytes. Ternary: ceil(n / 5) bytes.
    for bits in [1, 2, 3, 4, 8]:
        for n in range(0, 300):
            assert packed_size(n, bits) == math.ceil(n * bits / 8)
    for n in range(0, 300):
        assert packed_size(n, 1.5) == math.ceil(n / 5)
    assert packed_size(7, 1.5) == 2 and packed_size(9, 3) == 4 and packed_size(9, 1) == 2


@pytest.mark.parametrize("bits, bits_per_element", [(1, 1), (2, 2), (3, 3), (4, 4), (8, 8), (1.5, 1.6)])
def test_bits_per_element(bits, bits_per_element):
    n = 40_000  # a multiple of every word size, so no padding byte
    assert packed_size(n, bits) * 8 / n == pytest.approx(bits_per_element, abs=1e-12)


def test_n_levels():
    assert [n_levels(b) for b in [1, 2, 3, 4, 8, 1.5]] == [2, 4, 8, 16, 256, 3]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 1.5])
def test_out_of_range_codes_rejected(bits):
    codes = random_codes(bits, 13)
    codes.view(-1)[torch.randint(codes.numel(), ())] = n_levels(bits)
    with pytest.raises(AssertionError):
        pack(codes, bits)


def test_wrong_dtype_and_size_rejected():
    with pytest.raises(AssertionError):
        pack(torch.zeros(8, dtype=torch.int32), 2)
    with pytest.raises(AssertionError):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 8)  # 8 two-bit codes fill 2 bytes, not 3


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, 1.6, 2.5, "ternary", None])
def test_unsupported_widths_rejected(bits):
    codes = torch.zeros(8, dtype=torch.uint8)
    for call in [lambda: n_levels(bits), lambda: packed_size(8, bits),
                 lambda: pack(codes, bits), lambda: unpack(codes, bits, 8)]:
        with pytest.raises(ValueError, match="unsupported code width"):
            call()
