"""Fused quantize-and-pack into a packed history, in Triton.

One kernel serves both uses: at every decode step, the token that leaves each sequence's window
(one token per sequence per layer, read straight from the ring buffer); after prefill, every
prompt token that lands in the history. The arithmetic is quant/uniform.py's, operation for
operation (IEEE division, half-up rounding, codes against the metadata as stored), so the kernel
writes the same bytes as TokenQuantizer.quantize; tests/test_kernels.py checks it bit for bit.

Grid (entry, KV head): one program quantizes one token of one head: D channels, divided by the
smoothing factors, each group's (min, max) -> (scale, low) in the metadata dtype, codes packed.
"""
import torch
import triton
import triton.language as tl

from kernels.codes import as_bytes, code_layout, float_to_e4m3, store_codes, tile_codes
from quant.packing import n_levels


@triton.jit
def _round_to_e4m3(x):
    """x fp32 rounded to the nearest fp8 e4m3 value (ties to even), still in fp32, with integer
    operations (as kernels/codes.py stores e4m3: no fp8 type, which A100s lack)."""
    # Normal range: keep 3 of fp32's 23 mantissa bits, rounding on the 20 dropped.
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Subnormals (|x| < 2^-6) are multiples of 2^-9; adding 1.5 * 2^23 rounds to an integer.
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _quantize_tokens(x_ptr, smoothing_ptr, group_ptr, codes_ptr, scale_ptr, low_ptr,
                     batch_ptr, source_ptr, row_ptr,
                     stride_xb, stride_xh, stride_xt, stride_cb, stride_ch, stride_ct,
                     stride_mb, stride_mh, stride_mt, clip,
                     D: tl.constexpr, GROUPS: tl.constexpr, LEVELS: tl.constexpr, FLOOR: tl.constexpr,
                     META_FP8: tl.constexpr,
                     RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                     ROW_BYTES: tl.constexpr, WORDS_PAD: tl.constexpr, PER_WORD_PAD: tl.constexpr):
    entry, head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b = tl.load(batch_ptr + entry).to(tl.int64)
    source = tl.load(source_ptr + entry)
    row = tl.load(row_ptr + entry)
    keep = row >= 0  # a negative row: this entry writes nothing (a sequence that evicts no token)
    row = tl.maximum(row, 0)
    channel, is_code = tile_codes(D, PER_WORD, WORDS_PAD, PER_WORD_PAD)                 # (WORDS_PAD, PER_WORD_PAD)
    x = tl.load(x_ptr + b * stride_xb + head * stride_xh + source * stride_xt + channel, mask=is_code, other=0.0)
    x = tl.div_rn(x.to(tl.float32), tl.load(smoothing_ptr + head * D + channel, mask=is_code, other=1.0))
    group = tl.load(group_ptr + head * D + channel, mask=is_code, other=-1)
    meta = b * stride_mb + head * stride_mh + row * stride_mt
    scale_x = tl.full(x.shape, 1.0, tl.float32)
    low_x = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_group = group == g
        hi = tl.max(tl.max(tl.where(in_group, x, float("-inf")), 1), 0)
        lo = tl.min(tl.min(tl.where(in_group, x, float("inf")), 1), 0)
        empty = hi < lo
        hi, lo = tl.where(empty, 0.0, hi), tl.where(empty, 0.0, lo)
        scale = tl.maximum(tl.div_rn(clip * (hi - lo), LEVELS - 1.0), FLOOR)
        low = clip * lo
        if META_FP8:  # e4m3 bits into uint8 buffers (kernels/codes.py as_bytes)
            scale, low = _round_to_e4m3(scale), _round_to_e4m3(low)
            tl.store(scale_ptr + meta + g, float_to_e4m3(scale), mask=keep)
            tl.store(low_ptr + meta + g, float_to_e4m3(low), mask=keep)
        else:
            scale, low = scale.to(scale_ptr.dtype.element_ty), low.to(low_ptr.dtype.element_ty)
            tl.store(scale_ptr + meta + g, scale, mask=keep)
            tl.store(low_ptr + meta + g, low, mask=keep)
        scale_x = tl.where(in_group, scale.to(tl.float32), scale_x)
        low_x = tl.where(in_group, low.to(tl.float32), low_x)
    codes = tl.floor(tl.div_rn(x - low_x, scale_x) + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS - 1.0).to(tl.int32)
    store_codes(codes_ptr + b * stride_cb + head * stride_ch + row * stride_ct, codes, is_code, keep,
                RADIX, PER_WORD, WORD_BYTES, ROW_BYTES, WORDS_PAD, PER_WORD_PAD)


def quantize_tokens(x: torch.Tensor, batch: torch.Tensor, source: torch.Tensor, row: torch.Tensor, store):
    """For each entry i, quantizes token x[batch[i], :, source[i]] (all KV heads) into history row
    row[i] of sequence batch[i]; an entry with row[i] < 0 writes nothing.

    x [B, Hkv, T, D] float; batch, source, row [N] int32 or int64 on x's device. `store` is packed
    tokens (engine/stores.py TokenStore): codes [B, Hkv, T_hist, packed_size(D, bits)] uint8;
    scale, low [B, Hkv, T_hist, n_groups] in the metadata dtype; group_index [Hkv, D] int32;
    smoothing [Hkv, D] fp32 (ones for none); bits and clip, as its TokenQuantizer's.
    """
    n, (_, Hkv, _, D) = batch.shape[0], x.shape
    if n == 0:
        return
    codes, scale, low = store.codes, as_bytes(store.scale), as_bytes(store.low)
    assert x.stride(-1) == codes.stride(-1) == scale.stride(-1) == 1 and store.group_index.is_contiguous()
    batch, source, row = batch.contiguous(), source.contiguous(), row.contiguous()
    _quantize_tokens[(n, Hkv)](
        x, store.smoothing, store.group_index, codes, scale, low, batch, source, row,
        x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2), store.clip,
        D=D, GROUPS=scale.shape[-1], LEVELS=n_levels(store.bits),
        FLOOR=2.0 ** -9 if store.scale.dtype == torch.float8_e4m3fn else 1e-6,
        META_FP8=store.scale.dtype == torch.float8_e4m3fn, **code_layout(D, store.bits))
