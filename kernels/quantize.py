"""Fused quantize-and-pack into a packed history, in Triton.

Two kernels: `write_decode_token`, a decode step's whole write of one layer in one launch (each
sequence's new token into its sink or ring slot, and first the block that leaves the window,
quantized from the ring into the key and value stores: token stores by `_quantize_row`, SVDq's
latent keys a block at a time by `_quantize_latent_block`); and `quantize_tokens`, any tokens
into one token store (a prefill's eviction, bulk quantization). The arithmetic is
quant/uniform.py's, operation for operation (IEEE division, half-up rounding, codes against the
metadata as stored; a rotation, and scaling=rms's sums of squares, in fp64), so they write the
same bytes as TokenQuantizer.quantize and LatentKeyQuantizer.quantize; tests/test_kernels.py
checks it bit for bit. (SVDq's projection onto its basis is a tl.dot in fp32: on a GPU its summation order may
differ from torch's in the last bit, and a latent value at a rounding boundary then takes the
neighbouring code.)
"""
import torch
import triton
import triton.language as tl

from kernels.codes import as_bytes, code_layout, float_to_e4m3, store_codes, tile_codes
from quant.packing import n_levels
from quant.uniform import rms_steps


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
def _as_stored(x, meta_row, META_FP8: tl.constexpr):
    """x fp32 rounded to the metadata dtype of meta_row (fp8 e4m3 in uint8, or fp16), in fp32."""
    if META_FP8:
        return _round_to_e4m3(x)
    return x.to(meta_row.dtype.element_ty).to(tl.float32)


ROTATE_CHUNK = tl.constexpr(16)  # input channels a rotation step takes: [16, tile] fp64 products in registers


@triton.jit
def _quantize_row(x_row, smoothing_row, rotation, group_row, codes_row, scale_row, low_row, keep, clip,
                  D: tl.constexpr, GROUPS: tl.constexpr, LEVELS: tl.constexpr, FLOOR: tl.constexpr,
                  META_FP8: tl.constexpr, RADIX: tl.constexpr, PER_WORD: tl.constexpr,
                  WORD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr, WORDS_PAD: tl.constexpr,
                  PER_WORD_PAD: tl.constexpr, ROTATE: tl.constexpr = False, RMS_STEPS: tl.constexpr = ()):
    """One token of one head: the D channels at x_row, divided by the head's smoothing factors
    (smoothing_row [D]) and, where ROTATE, multiplied by the rotation [D, D]; each channel group's
    (min, max), or with RMS_STEPS (quant/uniform.py rms_steps) its RMS, -> (scale, low) stored at
    scale_row[g], low_row[g] in the metadata dtype, codes packed into codes_row; stored only
    where keep (a scalar)."""
    channel, is_code = tile_codes(D, PER_WORD, WORDS_PAD, PER_WORD_PAD)                 # (WORDS_PAD, PER_WORD_PAD)
    if ROTATE:  # x @ R straight into the tile's order, in fp64 as TokenQuantizer.quantize: the same fp32 result
        rotated = tl.zeros(channel.shape, tl.float64)
        for start in range(0, D, ROTATE_CHUNK):  # ROTATE_CHUNK input channels a step: rows of R in tile order
            d = start + tl.arange(0, ROTATE_CHUNK)
            x_d = tl.div_rn(tl.load(x_row + d).to(tl.float32), tl.load(smoothing_row + d)).to(tl.float64)
            rows = tl.load(rotation + d[:, None, None] * D + channel[None, :, :], mask=is_code[None, :, :], other=0.0)
            rotated += tl.sum(x_d[:, None, None] * rows.to(tl.float64), 0)
        x = rotated.to(tl.float32)
    else:
        x = tl.load(x_row + channel, mask=is_code, other=0.0)
        x = tl.div_rn(x.to(tl.float32), tl.load(smoothing_row + channel, mask=is_code, other=1.0))
    group = tl.load(group_row + channel, mask=is_code, other=-1)
    scale_x = tl.full(x.shape, 1.0, tl.float32)
    low_x = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_group = group == g
        if len(RMS_STEPS) > 0:  # scaling=rms: the multiplier whose stored pair reconstructs best
            x64 = tl.where(in_group, x, 0.0).to(tl.float64)
            count = tl.maximum(tl.sum(tl.sum(in_group.to(tl.float64), 1), 0), 1.0)
            rms = tl.sqrt_rn((tl.sum(tl.sum(x64 * x64, 1), 0) / count).to(tl.float32))
            best_error = float("inf")
            for m in tl.static_range(len(RMS_STEPS)):
                step = tl.maximum(RMS_STEPS[m] * rms, FLOOR)
                scale_m = _as_stored(step, scale_row, META_FP8)
                low_m = _as_stored(-(LEVELS - 1) / 2 * step, low_row, META_FP8)
                codes = tl.floor(tl.div_rn(x - low_m, scale_m) + 0.5)
                codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS - 1.0)
                error = codes.to(tl.float64) * scale_m.to(tl.float64) + low_m.to(tl.float64) - x64
                error = tl.sum(tl.sum(tl.where(in_group, error * error, 0.0), 1), 0)
                better = error < best_error  # strict: a tie keeps the earlier multiplier
                scale = scale_m if m == 0 else tl.where(better, scale_m, scale)
                low = low_m if m == 0 else tl.where(better, low_m, low)
                best_error = tl.where(better, error, best_error)
        else:
            hi = tl.max(tl.max(tl.where(in_group, x, float("-inf")), 1), 0)
            lo = tl.min(tl.min(tl.where(in_group, x, float("inf")), 1), 0)
            empty = hi < lo
            hi, lo = tl.where(empty, 0.0, hi), tl.where(empty, 0.0, lo)
            scale = _as_stored(tl.maximum(tl.div_rn(clip * (hi - lo), LEVELS - 1.0), FLOOR), scale_row, META_FP8)
            low = _as_stored(clip * lo, low_row, META_FP8)
        if META_FP8:  # e4m3 bits into uint8 buffers (kernels/codes.py as_bytes)
            tl.store(scale_row + g, float_to_e4m3(scale), mask=keep)
            tl.store(low_row + g, float_to_e4m3(low), mask=keep)
        else:
            tl.store(scale_row + g, scale.to(scale_row.dtype.element_ty), mask=keep)
            tl.store(low_row + g, low.to(low_row.dtype.element_ty), mask=keep)
        scale_x = tl.where(in_group, scale, scale_x)
        low_x = tl.where(in_group, low, low_x)
    codes = tl.floor(tl.div_rn(x - low_x, scale_x) + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS - 1.0).to(tl.int32)
    store_codes(codes_row, codes, is_code, keep, RADIX, PER_WORD, WORD_BYTES, ROW_BYTES, WORDS_PAD, PER_WORD_PAD)


@triton.jit
def _latent_chunk(window, stride_wt, first_slot, ring, basis, mean, start, G: tl.constexpr, D: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Latent channels [CHUNK, R_PAD] fp32 of the block's tokens start.. start + CHUNK (rows past
    G are zero and masked by the caller), and which tokens are real [CHUNK]."""
    token = start + tl.arange(0, CHUNK)
    real = token < G
    channel = tl.arange(0, D)
    k = tl.load(window + ((first_slot + token) % ring)[:, None] * stride_wt + channel[None, :],
                mask=real[:, None], other=0.0)
    return tl.dot(k.to(tl.float32) - mean[None, :], basis, input_precision="ieee"), real


@triton.jit
def _quantize_latent_block(window, stride_wt, first_slot, ring, basis_t, mean_ptr, bits_ptr, codes_block, stride_ct,
                           scale_row, low_row, D: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr,
                           R: tl.constexpr, R_PAD: tl.constexpr, ROW_BYTES: tl.constexpr):
    """A block of G keys of one head, recent in ring slots (first_slot + i) % ring of `window`
    (rows D apart by stride_wt), in the head's basis (basis_t [R, D], mean [D]): latent channel c
    of each, along the block, at bits_ptr[R + c] bits -> fp16 scale_row[c], low_row[c], and each
    token's R codes as one little-endian bit stream of ROW_BYTES bytes (code c at bit
    bits_ptr[c]) at codes_block + i * stride_ct. quant/svdq.py LatentKeyQuantizer's arithmetic.
    Two passes over CHUNK tokens at a time (the extremes, then the codes), which keeps the tiles
    in registers; the second recomputes the projection rather than holding [G, R] latents."""
    channel = tl.arange(0, D)
    latent = tl.arange(0, R_PAD)
    real_latent = latent < R
    mean = tl.load(mean_ptr + channel).to(tl.float32)
    basis = tl.load(basis_t + latent[None, :] * D + channel[:, None], mask=real_latent[None, :], other=0.0)
    basis = basis.to(tl.float32)                                                         # (D, R_PAD)
    hi = tl.full([R_PAD], float("-inf"), tl.float32)
    lo = tl.full([R_PAD], float("inf"), tl.float32)
    for start in range(0, G, CHUNK):
        z, real = _latent_chunk(window, stride_wt, first_slot, ring, basis, mean, start, G, D, CHUNK)
        hi = tl.maximum(hi, tl.max(tl.where(real[:, None], z, float("-inf")), 0))
        lo = tl.minimum(lo, tl.min(tl.where(real[:, None], z, float("inf")), 0))
    offset = tl.load(bits_ptr + latent, mask=real_latent, other=0)
    width = tl.load(bits_ptr + R + latent, mask=real_latent, other=1)
    levels = (1 << width).to(tl.float32)
    scale = tl.maximum(tl.div_rn(hi - lo, levels - 1.0), 1e-6).to(tl.float16)
    low = lo.to(tl.float16)
    tl.store(scale_row + latent, scale, mask=real_latent)
    tl.store(low_row + latent, low, mask=real_latent)
    for start in range(0, G, CHUNK):
        z, real = _latent_chunk(window, stride_wt, first_slot, ring, basis, mean, start, G, D, CHUNK)
        codes = tl.floor(tl.div_rn(z - low.to(tl.float32)[None, :], scale.to(tl.float32)[None, :]) + 0.5)
        codes = tl.minimum(tl.maximum(codes, 0.0), levels[None, :] - 1.0).to(tl.int32)  # (CHUNK, R_PAD)
        token = start + tl.arange(0, CHUNK)
        for j in range(ROW_BYTES):  # byte j holds the bits [8j, 8j + 8) of the codes that cross them
            shift = offset - 8 * j
            part = tl.where(shift >= 0, codes << tl.minimum(tl.maximum(shift, 0), 31)[None, :],
                            codes >> tl.minimum(tl.maximum(-shift, 0), 31)[None, :]) & 255
            crosses = real_latent & (offset < 8 * j + 8) & (offset + width > 8 * j)
            byte = tl.sum(tl.where(crosses[None, :], part, 0), 1)                      # disjoint bits: sum = or
            tl.store(codes_block + token * stride_ct + j, byte.to(tl.uint8), mask=real)


@triton.jit
def _quantize_tokens(x_ptr, batch_ptr, source_ptr, row_ptr, stride_xb, stride_xh, stride_xt,
                     codes_ptr, scale_ptr, low_ptr, group_ptr, smoothing_ptr, rotation_ptr,
                     stride_cb, stride_ch, stride_ct, stride_mb, stride_mh, stride_mt, clip,
                     D: tl.constexpr, GROUPS: tl.constexpr, LEVELS: tl.constexpr, FLOOR: tl.constexpr,
                     META_FP8: tl.constexpr, RADIX: tl.constexpr, PER_WORD: tl.constexpr,
                     WORD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr, WORDS_PAD: tl.constexpr,
                     PER_WORD_PAD: tl.constexpr, ROTATE: tl.constexpr, RMS_STEPS: tl.constexpr):
    """Grid (entry, KV head): token source[entry] of sequence batch[entry] into its history row
    row[entry] (none where negative)."""
    entry, head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b = tl.load(batch_ptr + entry).to(tl.int64)
    row = tl.load(row_ptr + entry)
    keep = row >= 0
    row = tl.maximum(row, 0)
    meta = b * stride_mb + head * stride_mh + row * stride_mt
    _quantize_row(x_ptr + b * stride_xb + head * stride_xh + tl.load(source_ptr + entry) * stride_xt,
                  smoothing_ptr + head * D, rotation_ptr, group_ptr + head * D,
                  codes_ptr + b * stride_cb + head * stride_ch + row * stride_ct, scale_ptr + meta, low_ptr + meta,
                  keep, clip, D, GROUPS, LEVELS, FLOOR, META_FP8, RADIX, PER_WORD, WORD_BYTES, ROW_BYTES,
                  WORDS_PAD, PER_WORD_PAD, ROTATE, RMS_STEPS)


@triton.jit
def _write_decode_token(
        # the new token's keys and values [B, Hkv, D], at positions [B]
        k_ptr, stride_kb, stride_kh, v_ptr, stride_vb, stride_vh, position_ptr,
        # full-precision rows, keys and values alike: sinks [B, Hkv, SINKS, D], the ring [B, Hkv, ring, D]
        sink_k_ptr, sink_v_ptr, stride_sb, stride_sh, stride_st,
        window_k_ptr, window_v_ptr, stride_wb, stride_wh, stride_wt, ring,
        D: tl.constexpr, SINKS: tl.constexpr,
        # the first history row [B] of the block of BLOCK tokens that leaves the window (-1: none);
        # the stores' first row (context parallel: a rank's stores hold rows first_row, ...)
        evict_row_ptr=None, BLOCK: tl.constexpr = 1, first_row=0,
        # the key store, quantized into where EVICT_K (as _store_arguments names it), and the value store
        k_codes_ptr=None, k_scale_ptr=None, k_low_ptr=None, k_group_ptr=None, k_smoothing_ptr=None,
        k_rotation_ptr=None,
        k_stride_cb=0, k_stride_ch=0, k_stride_ct=0, k_stride_mb=0, k_stride_mh=0, k_stride_mt=0, k_clip=1.0,
        EVICT_K: tl.constexpr = False, K_GROUPS: tl.constexpr = 1, K_LEVELS: tl.constexpr = 1,
        K_FLOOR: tl.constexpr = 1.0, K_META_FP8: tl.constexpr = False, K_RADIX: tl.constexpr = 1,
        K_PER_WORD: tl.constexpr = 1, K_WORD_BYTES: tl.constexpr = 1, K_ROW_BYTES: tl.constexpr = 1,
        K_WORDS_PAD: tl.constexpr = 1, K_PER_WORD_PAD: tl.constexpr = 1, K_ROTATE: tl.constexpr = False,
        K_RMS_STEPS: tl.constexpr = (),
        # latent keys (K_RANK > 0: a LatentStore, BLOCK = its token_group): basis_t [1 or B, Hkv, R, D],
        # mean [1 or B, Hkv, D], bit layout [2, R]; codes as above, scale and low one row per block
        k_basis_ptr=None, stride_kbb=0, stride_kbh=0, k_mean_ptr=None, stride_kub=0, stride_kuh=0,
        k_bits_ptr=None, K_RANK: tl.constexpr = 0, K_RANK_PAD: tl.constexpr = 16, LATENT_CHUNK: tl.constexpr = 16,
        v_codes_ptr=None, v_scale_ptr=None, v_low_ptr=None, v_group_ptr=None, v_smoothing_ptr=None,
        v_rotation_ptr=None,
        v_stride_cb=0, v_stride_ch=0, v_stride_ct=0, v_stride_mb=0, v_stride_mh=0, v_stride_mt=0, v_clip=1.0,
        EVICT_V: tl.constexpr = False, V_GROUPS: tl.constexpr = 1, V_LEVELS: tl.constexpr = 1,
        V_FLOOR: tl.constexpr = 1.0, V_META_FP8: tl.constexpr = False, V_RADIX: tl.constexpr = 1,
        V_PER_WORD: tl.constexpr = 1, V_WORD_BYTES: tl.constexpr = 1, V_ROW_BYTES: tl.constexpr = 1,
        V_WORDS_PAD: tl.constexpr = 1, V_PER_WORD_PAD: tl.constexpr = 1, V_ROTATE: tl.constexpr = False,
        V_RMS_STEPS: tl.constexpr = ()):
    """Grid (batch, KV head)."""
    b, head = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    position = tl.load(position_ptr + b)
    window = b * stride_wb + head * stride_wh
    row = tl.load(evict_row_ptr + b) if EVICT_K or EVICT_V else -1
    keep = row >= 0
    stored = row - first_row  # the row in this rank's stores
    if keep:  # a block leaves the window (SVDq: at one step in BLOCK); the other steps skip this
        # Position S + r, while recent, sat in ring slot r % ring: the block's first token in the
        # slot the new token takes.
        if K_RANK > 0:
            meta = b * k_stride_mb + head * k_stride_mh + (stored // BLOCK) * k_stride_mt
            _quantize_latent_block(window_k_ptr + window, stride_wt, row, ring,
                                   k_basis_ptr + b * stride_kbb + head * stride_kbh,
                                   k_mean_ptr + b * stride_kub + head * stride_kuh, k_bits_ptr,
                                   k_codes_ptr + b * k_stride_cb + head * k_stride_ch + stored * k_stride_ct,
                                   k_stride_ct, k_scale_ptr + meta, k_low_ptr + meta,
                                   D, BLOCK, LATENT_CHUNK, K_RANK, K_RANK_PAD, K_ROW_BYTES)
        for i in range(BLOCK):  # a loop, not unrolled: SVDq's blocks are 128 tokens
            slot = (row + i) % ring
            if EVICT_K and K_RANK == 0:
                meta = b * k_stride_mb + head * k_stride_mh + (stored + i) * k_stride_mt
                _quantize_row(window_k_ptr + window + slot * stride_wt, k_smoothing_ptr + head * D,
                              k_rotation_ptr, k_group_ptr + head * D,
                              k_codes_ptr + b * k_stride_cb + head * k_stride_ch + (stored + i) * k_stride_ct,
                              k_scale_ptr + meta, k_low_ptr + meta, keep, k_clip, D,
                              K_GROUPS, K_LEVELS, K_FLOOR, K_META_FP8, K_RADIX, K_PER_WORD, K_WORD_BYTES,
                              K_ROW_BYTES, K_WORDS_PAD, K_PER_WORD_PAD, K_ROTATE, K_RMS_STEPS)
            if EVICT_V:
                meta = b * v_stride_mb + head * v_stride_mh + (stored + i) * v_stride_mt
                _quantize_row(window_v_ptr + window + slot * stride_wt, v_smoothing_ptr + head * D,
                              v_rotation_ptr, v_group_ptr + head * D,
                              v_codes_ptr + b * v_stride_cb + head * v_stride_ch + (stored + i) * v_stride_ct,
                              v_scale_ptr + meta, v_low_ptr + meta, keep, v_clip, D,
                              V_GROUPS, V_LEVELS, V_FLOOR, V_META_FP8, V_RADIX, V_PER_WORD, V_WORD_BYTES,
                              V_ROW_BYTES, V_WORDS_PAD, V_PER_WORD_PAD, V_ROTATE, V_RMS_STEPS)
    tl.debug_barrier()  # every thread has read the evicted block before any overwrites its slot
    channel = tl.arange(0, D)
    k = tl.load(k_ptr + b * stride_kb + head * stride_kh + channel)
    v = tl.load(v_ptr + b * stride_vb + head * stride_vh + channel)
    recent = (channel * 0 + position) >= SINKS  # (D,): a store's mask is a tensor of its shape
    slot = window + (tl.maximum(position - SINKS, 0) % ring) * stride_wt + channel
    tl.store(window_k_ptr + slot, k, mask=recent)
    tl.store(window_v_ptr + slot, v, mask=recent)
    if SINKS > 0:
        not_recent = (channel * 0 + position) < SINKS
        sink = b * stride_sb + head * stride_sh + tl.minimum(position, SINKS - 1) * stride_st + channel
        tl.store(sink_k_ptr + sink, k, mask=not_recent)
        tl.store(sink_v_ptr + sink, v, mask=not_recent)


def _store_arguments(store, prefix: str = "", constexpr_prefix: str = "") -> dict:
    """A TokenStore's buffers, strides and code layout, as the kernels above name them (the
    decode write's with prefixes k_ and K_, or v_ and V_)."""
    codes, scale, low = store.codes, as_bytes(store.scale), as_bytes(store.low)
    assert codes.stride(-1) == scale.stride(-1) == 1 and store.group_index.is_contiguous()
    fp8 = store.scale.dtype == torch.float8_e4m3fn
    pointers = dict(codes_ptr=codes, scale_ptr=scale, low_ptr=low, group_ptr=store.group_index,
                    smoothing_ptr=store.smoothing, rotation_ptr=store.rotation,
                    **dict(zip(["stride_cb", "stride_ch", "stride_ct"], codes.stride())),
                    **dict(zip(["stride_mb", "stride_mh", "stride_mt"], scale.stride())), clip=store.clip)
    constants = dict(GROUPS=scale.shape[-1], LEVELS=n_levels(store.bits), FLOOR=2.0 ** -9 if fp8 else 1e-6,
                     META_FP8=fp8, ROTATE=store.rotation is not None,
                     RMS_STEPS=rms_steps(store.bits) if store.quantizer.scaling == "rms" else (),
                     **code_layout(store.quantizer.head_dim, store.bits))
    return {**{prefix + name: x for name, x in pointers.items()},
            **{constexpr_prefix + name: x for name, x in constants.items()}}


def _latent_arguments(store, block: int) -> dict:
    """A LatentStore's buffers as the decode write reads them (keys only; fp16 metadata)."""
    codes, scale = store.codes, store.scale
    assert scale.dtype == torch.float16 and store.token_group == block and codes.stride(-1) == scale.stride(-1) == 1
    one_basis = store.basis_t.shape[0] == 1  # shared by every sequence: batch stride 0
    return dict(k_codes_ptr=codes, k_scale_ptr=scale, k_low_ptr=store.low,
                **dict(zip(["k_stride_cb", "k_stride_ch", "k_stride_ct"], codes.stride())),
                **dict(zip(["k_stride_mb", "k_stride_mh", "k_stride_mt"], scale.stride())),
                k_basis_ptr=store.basis_t, stride_kbb=0 if one_basis else store.basis_t.stride(0),
                stride_kbh=store.basis_t.stride(1), k_mean_ptr=store.mean,
                stride_kub=0 if one_basis else store.mean.stride(0), stride_kuh=store.mean.stride(1),
                k_bits_ptr=store.bit_layout, K_RANK=store.basis_t.shape[2],
                K_RANK_PAD=max(16, triton.next_power_of_2(store.basis_t.shape[2])),
                LATENT_CHUNK=16, K_ROW_BYTES=codes.shape[-1])


def quantize_tokens(x: torch.Tensor, batch: torch.Tensor, source: torch.Tensor, row: torch.Tensor, store):
    """For each entry i, quantizes token x[batch[i], :, source[i]] (all KV heads) into history row
    row[i] of sequence batch[i]; an entry with row[i] < 0 writes nothing.

    x [B, Hkv, T, D] float; batch, source, row [N] int32 or int64 on x's device. `store` is packed
    tokens (engine/stores.py TokenStore): codes [B, Hkv, T_hist, packed_size(D, bits)] uint8;
    scale, low [B, Hkv, T_hist, n_groups] in the metadata dtype; group_index [Hkv, D] int32;
    smoothing [Hkv, D] fp32 (ones for none); rotation [D, D] fp32 or None; bits, clip and
    scaling, as its TokenQuantizer's.
    """
    n, (_, Hkv, _, D) = batch.shape[0], x.shape
    if n == 0:
        return
    assert x.stride(-1) == 1
    _quantize_tokens[(n, Hkv)](x, batch.contiguous(), source.contiguous(), row.contiguous(), *x.stride()[:3],
                               D=D, **_store_arguments(store))


def write_decode_token(k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, sinks, window,
                       evict_row: torch.Tensor | None = None, key_store=None, value_store=None, block: int = 1,
                       first_row: int = 0):
    """One decode step's write of one layer, in one launch: k, v [B, Hkv, D], the new token of each
    sequence at position [B], go into sink slot position (position < S) or else into ring slot
    (position - S) % ring; first, where evict_row[b] >= 0, the `block` tokens at history rows
    evict_row[b] + i, recent until now in ring slots (evict_row[b] + i) % ring, are quantized
    into key_store and value_store (TokenStores; None: that side is written elsewhere), whose
    rows start at history row first_row (a context-parallel rank's share).

    sinks: (sink_k, sink_v) [B, Hkv, S, D] or None; window: (window_k, window_v) [B, Hkv, ring, D],
    all four alike in shape and strides, in k's dtype (the fp16 cache is a ring of its capacity)."""
    B, Hkv, D = k.shape
    window_k, window_v = window
    sink_k, sink_v = sinks if sinks is not None else window
    assert k.stride(-1) == v.stride(-1) == 1 and window_k.stride() == window_v.stride()
    assert sink_k.stride() == sink_v.stride() and window_k.stride(-1) == sink_k.stride(-1) == 1
    stores = {}
    for side, store in (("k", key_store), ("v", value_store)):
        if store is not None:
            arguments = _latent_arguments(store, block) if hasattr(store, "basis_t") else \
                _store_arguments(store, f"{side}_", f"{side.upper()}_")
            stores.update(arguments, **{f"EVICT_{side.upper()}": True})
    _write_decode_token[(B, Hkv)](
        k, *k.stride()[:2], v, *v.stride()[:2], position, sink_k, sink_v, *sink_k.stride()[:3],
        window_k, window_v, *window_k.stride()[:3], window_k.shape[2],
        D=D, SINKS=sink_k.shape[2] if sinks is not None else 0, evict_row_ptr=evict_row, BLOCK=block,
        first_row=first_row, **stores)
