"""Split-K attention straight over packed history and fp16 K/V, in Triton: decode and prefill.

A cache is read as segments (`Segment`): the fp16 cache is one; the quantized cache is three (sinks
and ring window in full precision, the packed history), and a prefill chunk adds itself as a causal
fourth. Stage 1, grid (batch x query blocks, KV head, split) per segment: a block of queries times
the G query heads that share a KV head form one tile of as many rows (a power of two), and the
score and output products run on tensor cores (tl.dot, which pads the tile to the instruction's 16
rows itself, while the softmax works on the tile's own rows only); the split's tokens stream
through in BLOCK_N blocks (whole blocks without masks, then the last, partial one with them):
packed codes are loaded and unpacked with shifts and masks, two bytes a uint32 (base 3 by integer
multiply-and-shift), each thread its own bytes, into fp16 through the mantissa (kernels/codes.py),
and enter the products as small integers, each token's group scale and low folded in around them
(q . (c s + l) = s (q . c) + l sum(q), and p @ (c s + l) = (p s) @ c + p @ l), so nothing is
dequantized per element (on a GPU ternary values enter as floors byte // 3^j, their digits the
differences of the sums after the loop; sums over tokens, as the softmax mass, are kept per token
and reduced after it: see _attend_split); pre-RoPE keys are dequantized and rotated at their
positions (angles built from rotations made before the loop); SVDq keys are rebuilt from latent
codes with a tl.dot against the basis; then an fp32 online softmax; each split writes its partial
output and log-sum-exp. The instructions this costs per byte read, per GPU target, are measured
without a GPU by bench/sass.py.
Stage 2, grid (batch x queries, query head), merges every split of every segment, weighting each
by its share of the softmax mass. Decode (one query per sequence) gives each segment a fixed
number of splits, about two waves of the SMs (`decode_splits`), and each split an equal share
of the live tokens, found from the count on the device: one sequence of 1M tokens still fills
every SM, the grid is the same at every step (a CUDA graph replays it), and the partial outputs
are small. Prefill (a chunk of queries) fills the GPU with query blocks and reads each segment
once per block, flash-attention style. Only each sequence's valid tokens are read, never the
capacity.

Smoothing factors (quant/skvq.py) cost nothing here: the keys' fold into q (for pre-RoPE keys
too, as the factors are equal within each RoPE pair), the values' scale the output. So does a
rotation R of the channels (quant/skvq.py rotation_matrix; post-RoPE keys only): a packed
segment's program multiplies its q tile by R once before the loop (q . k = (q R) . (k R)) and
its output by R^T once after it, so the loop over tokens is the unrotated one. The
plain-torch reference is kernels/reference.py over dequantized K/V.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.codes import (
    as_bytes,
    code_bias,
    code_layout,
    code_weight,
    load_words,
    metadata_to_float,
    small_to_half,
    tile_codes,
    unpack_digit,
    unpack_words,
)

SPLIT_WAVES = 2  # decode programs: about two waves of the GPU's SMs, so that no SM idles for long
CPU_SMS = 4      # SMs reckoned without a GPU (the interpreter, bench/sass.py): still several splits
BLOCK_N = 64     # tokens per inner step (_tile halves or doubles it): K and V tiles of [64, D] stay in registers
LOG2E, LN2 = tl.constexpr(1.4426950408889634), tl.constexpr(0.6931471805599453)  # stage 1 scores in base 2
ROTATION_ROWS = tl.constexpr(32)  # rows of a rotation in registers at a time (q's before the loop, the output's after)
DECODE_REGISTERS = 255  # decode's cap: left to itself ptxas caps at 168 for a third program per SM, and spills


@dataclass
class Segment:
    """A stretch of every sequence's tokens held one way. Sequence b has count[b] tokens here;
    token i sits in slot (first_slot[b] + i) % T of its K/V rows (first_slot None: slot i), and
    is at position first_position[b] + i (needed only to rotate pre-RoPE keys).

    keys and values are each one of (docs/layout.md draws every buffer):
      - a tensor [B, Hkv, T, D] of full-precision rows;
      - packed tokens (engine/stores.py TokenStore): `codes` [B, Hkv, T, packed_size(D, bits)]
        uint8, `scale`, `low` [B, Hkv, T, n_groups], `group_index` [Hkv, D] int32, `smoothing`
        [Hkv, D] fp32, `bits`;
      - latent keys (engine/stores.py LatentStore): `codes` [B, Hkv, T, row_bytes] uint8, `scale`,
        `low` [B, Hkv, T / token_group, R], `basis_t` [1 or B, Hkv, R, D], `mean` [1 or B, Hkv, D],
        `bit_layout` [2, R] int32, `token_group`; each key is rebuilt as latent @ basis_t + mean.
    """
    keys: object
    values: object
    count: torch.Tensor                         # [B] int
    first_slot: torch.Tensor | None = None      # [B] int, for a ring buffer
    first_position: torch.Tensor | None = None  # [B] int, for pre-RoPE keys and causal segments
    causal: bool = False                        # a query sees only tokens at or before its position

    @property
    def rows(self) -> torch.Tensor:
        """The keys' rows [B, Hkv, T, ...]: T is the segment's capacity."""
        return self.keys if isinstance(self.keys, torch.Tensor) else self.keys.codes


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """t's strides over batch, head and token, as stage 1 names them: {prefix}b, {prefix}h, {prefix}t."""
    return dict(zip([f"{prefix}b", f"{prefix}h", f"{prefix}t"], t.stride()))


def _operand(x, side: str, D: int) -> dict:
    """Stage-1 arguments for the keys (side "k") or values ("v") of a segment (see Segment)."""
    P = side.upper()
    rows = x if isinstance(x, torch.Tensor) else x.codes
    args = {f"{side}_ptr": rows, **_strides(f"stride_{side}", rows)}
    if isinstance(x, torch.Tensor):
        return args  # the kernel's defaults describe full-precision rows
    args.update({f"{side}_scale_ptr": as_bytes(x.scale), f"{side}_low_ptr": as_bytes(x.low),
                 **_strides(f"stride_{side}m", x.scale)})
    if hasattr(x, "basis_t"):  # latent keys, rebuilt in-kernel as full-precision rows of D channels
        one_basis = x.basis_t.shape[0] == 1  # shared by every sequence: batch stride 0
        return {**args, "k_basis_ptr": x.basis_t, "stride_kbb": 0 if one_basis else x.basis_t.stride(0),
                "stride_kbh": x.basis_t.stride(1), "k_mean_ptr": x.mean,
                "stride_kub": 0 if one_basis else x.mean.stride(0), "stride_kuh": x.mean.stride(1),
                "k_bits_ptr": x.bit_layout, "K_SVD": True, "K_RANK": x.basis_t.shape[2],
                "K_TOKEN_GROUP": x.token_group}
    layout = {f"{P}_{name}": value for name, value in code_layout(D, x.bits).items()}
    if x.rotation is not None:
        args.update({f"{side}_rotation_ptr": x.rotation, f"{P}_ROTATE": True})
    return {**args, f"{side}_group_ptr": x.group_index, f"{side}_smoothing_ptr": x.smoothing,
            f"{P}_FULL": False, f"{P}_GROUPS": x.scale.shape[-1], **layout}


@triton.jit
def _channels(D: tl.constexpr, FULL: tl.constexpr, PER_WORD: tl.constexpr, WORDS_PAD: tl.constexpr,
              PER_WORD_PAD: tl.constexpr):
    """Channel of each column of a tile and whether it is real: [D] for full precision, the code
    layout's [WORDS_PAD * PER_WORD_PAD] for packed rows (kernels/codes.py)."""
    if FULL:
        channel = tl.arange(0, D)
        return channel, channel < D
    else:
        channel, is_code = tile_codes(D, PER_WORD, WORDS_PAD, PER_WORD_PAD)
        width: tl.constexpr = WORDS_PAD * PER_WORD_PAD
        return tl.reshape(channel, [width]), tl.reshape(is_code, [width])


@triton.jit
def _digit_major(x, WORDS_PAD: tl.constexpr, PER_WORD_PAD: tl.constexpr):
    """[R, WORDS_PAD * PER_WORD_PAD] in tile order (word, digit) -> (digit, word): neighbouring
    columns are then one digit of neighbouring words, the pairs the PTX conversion puts in one
    register, which are the pairs a tensor-core operand holds along its K axis."""
    return tl.reshape(tl.permute(tl.reshape(x, [x.shape[0], WORDS_PAD, PER_WORD_PAD]), (0, 2, 1)),
                      [x.shape[0], WORDS_PAD * PER_WORD_PAD])


@triton.jit
def _load_codes(ptr, rows, valid, RADIX: tl.constexpr, PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                ROW_BYTES: tl.constexpr, WORDS_PAD: tl.constexpr, PER_WORD_PAD: tl.constexpr,
                BIASED: tl.constexpr, PTX: tl.constexpr):
    """Packed codes of BLOCK_N tokens of one head, + code_bias(RADIX, BIASED), fp16 [BLOCK_N,
    WORDS_PAD * PER_WORD_PAD] in tile order (kernels/codes.py). rows [BLOCK_N]: element offset of
    each token's row."""
    return unpack_words(load_words(ptr + rows, valid, RADIX, WORD_BYTES, ROW_BYTES, WORDS_PAD),
                        RADIX, PER_WORD, WORD_BYTES, PER_WORD_PAD, code_bias(RADIX, BIASED), PTX)


@triton.jit
def _floor(words, j: tl.constexpr, BIAS: tl.constexpr, PTX: tl.constexpr, dtype: tl.constexpr):
    """Floor j of one-byte base-3 words [BLOCK_N, WORDS_PAD]: byte // 3^j + BIAS in dtype."""
    return unpack_digit(words, j, 3, 5, 1, BIAS, PTX, True).to(dtype)


@triton.jit
def _token_sums(x, SUM_N: tl.constexpr):
    """x [M_PAD, BLOCK_N] as a running sum over tokens keeps it: decode (SUM_N = BLOCK_N) as it
    is, reduced once after the loop (a sum in the loop crosses the warps through shared memory);
    prefill (SUM_N = 1) summed now, [M_PAD, 1] (a [64, BLOCK_N] tile kept per sum spills)."""
    if SUM_N == 1:
        return tl.sum(x, 1, keep_dims=True)
    else:
        return x


@triton.jit
def _metadata(ptr, meta_rows, valid, g, factor=1.0):
    """Scale or low of channel group g of BLOCK_N tokens times factor, fp32 [BLOCK_N]."""
    return metadata_to_float(tl.load(ptr + meta_rows + g, mask=valid, other=0), factor)


@triton.jit
def _dequantize(codes, scale_ptr, low_ptr, meta_rows, valid, group, weight, GROUPS: tl.constexpr,
                BIAS: tl.constexpr):
    """codes / weight + BIAS [BLOCK_N, DX] (weight [DX]: code_weight) -> code * scale + low of each
    channel's group, fp32. Only pre-RoPE keys need this: elsewhere scale and low fold into the
    products (see stage 1)."""
    scale = tl.zeros(codes.shape, tl.float32)
    low = tl.zeros(codes.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_group = (group == g)[None, :]
        scale = tl.where(in_group, _metadata(scale_ptr, meta_rows, valid, g)[:, None], scale)
        low = tl.where(in_group, _metadata(low_ptr, meta_rows, valid, g)[:, None], low)
    return (codes.to(tl.float32) - BIAS) * (weight[None, :] * scale) + low


@triton.jit
def _attend_split(
        # this program's split of the segment, of n_splits
        split, n_splits,
        # queries [B, Q, H, D]; each split's partial output [B, Q, H, splits, D] and lse [B, Q, H, splits]
        q_ptr, stride_qb, stride_qq, stride_qh,
        out_ptr, stride_ob, stride_oq, stride_oh, stride_os,
        lse_ptr, stride_lb, stride_lq, stride_lh,
        n_queries, q_blocks, first_split, sm_scale,
        # the segment: tokens per sequence [B]; rows of its K/V, the ring's size when it is one
        count_ptr, ring,
        # keys and values: full-precision rows, or codes [B, Hkv, T, row bytes]
        k_ptr, stride_kb, stride_kh, stride_kt,
        v_ptr, stride_vb, stride_vh, stride_vt,
        # the tile: Q_BLOCK queries x G heads padded to M_PAD rows; BLOCK_N tokens per step
        G: tl.constexpr, Q_BLOCK: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        # where the tokens are: ring start [B]; first token's position [B]; the queries' first
        # position [B] (a causal segment); RoPE inverse frequencies [D/2] (pre-RoPE keys)
        first_slot_ptr=None, first_position_ptr=None, q_position_ptr=None, inv_freq_ptr=None,
        RING: tl.constexpr = False, ROPE: tl.constexpr = False, CAUSAL: tl.constexpr = False,
        # packed keys: scale, low [B, Hkv, T, groups]; group of each channel [Hkv, D]; smoothing [Hkv, D];
        # rotation [D, D] (K_ROTATE: codes of rotated channels)
        k_scale_ptr=None, k_low_ptr=None, stride_kmb=0, stride_kmh=0, stride_kmt=0,
        k_group_ptr=None, k_smoothing_ptr=None, k_rotation_ptr=None,
        K_FULL: tl.constexpr = True, K_GROUPS: tl.constexpr = 1, K_RADIX: tl.constexpr = 1,
        K_PER_WORD: tl.constexpr = 1, K_WORD_BYTES: tl.constexpr = 1, K_ROW_BYTES: tl.constexpr = 1,
        K_WORDS_PAD: tl.constexpr = 1, K_PER_WORD_PAD: tl.constexpr = 1, K_ROTATE: tl.constexpr = False,
        # latent keys: scale, low above per block [B, Hkv, T / K_TOKEN_GROUP, R]; basis_t [1 or B, Hkv, R, D];
        # mean [1 or B, Hkv, D]; bit layout [2, R]
        k_basis_ptr=None, stride_kbb=0, stride_kbh=0, k_mean_ptr=None, stride_kub=0, stride_kuh=0,
        k_bits_ptr=None,
        K_SVD: tl.constexpr = False, K_RANK: tl.constexpr = 1, K_TOKEN_GROUP: tl.constexpr = 1,
        # packed values, as packed keys
        v_scale_ptr=None, v_low_ptr=None, stride_vmb=0, stride_vmh=0, stride_vmt=0,
        v_group_ptr=None, v_smoothing_ptr=None, v_rotation_ptr=None,
        V_FULL: tl.constexpr = True, V_GROUPS: tl.constexpr = 1, V_RADIX: tl.constexpr = 1,
        V_PER_WORD: tl.constexpr = 1, V_WORD_BYTES: tl.constexpr = 1, V_ROW_BYTES: tl.constexpr = 1,
        V_WORDS_PAD: tl.constexpr = 1, V_PER_WORD_PAD: tl.constexpr = 1, V_ROTATE: tl.constexpr = False,
        # codes carry code_bias (the GPU's conversion), unpacked by inline PTX (kernels/codes.py)
        BIASED: tl.constexpr = False, PTX: tl.constexpr = False):
    pid, kv_head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, q_block = (pid // q_blocks).to(tl.int64), pid % q_blocks
    count = tl.load(count_ptr + b)
    if Q_BLOCK > 1:  # prefill: one split per segment (attend), its range known without arithmetic
        start, end = 0, count
    else:  # the splits share the live tokens in whole blocks: none is empty unless count is short
        per_split = tl.cdiv(tl.cdiv(count, n_splits), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, count)
    # Tile rows: Q_BLOCK queries x the G query heads of this KV head, padded to M_PAD.
    rows = tl.arange(0, M_PAD)
    query = q_block * Q_BLOCK + rows // G
    heads = kv_head * G + rows % G
    real_row = (rows < Q_BLOCK * G) & (query < n_queries)
    k_channel, k_real = _channels(D, K_FULL, K_PER_WORD, K_WORDS_PAD, K_PER_WORD_PAD)
    # Packed keys' columns digit-major (q and the codes alike): the products' operand pairs are the
    # conversion's register pairs, not regrouped (pre-RoPE keys keep channel order for the rotation)
    K_DIGIT_MAJOR: tl.constexpr = not K_FULL and not ROPE and K_PER_WORD_PAD > 1 and K_WORD_BYTES == 1
    if K_DIGIT_MAJOR:
        k_channel = tl.reshape(_digit_major(k_channel[None, :], K_WORDS_PAD, K_PER_WORD_PAD), [k_channel.shape[0]])
        k_real = tl.reshape(_digit_major(k_real[None, :], K_WORDS_PAD, K_PER_WORD_PAD), [k_real.shape[0]])
    v_channel, v_real = _channels(D, V_FULL, V_PER_WORD, V_WORDS_PAD, V_PER_WORD_PAD)
    k_group = k_channel  # each channel's group: only packed rows with several groups use it
    k_weight = code_weight(k_channel % K_PER_WORD, K_WORD_BYTES)  # packed keys: what their digits are weighed by
    if not K_FULL:
        k_group = tl.load(k_group_ptr + kv_head * D + k_channel, mask=k_real, other=-1)
    # Ternary values: digits 0-3 of each byte in one product, digit 4 in another, so no column
    # pads 5 digits to 8 (V_TILE_DIGITS: the first product's digits a word). With one channel
    # group and biased codes, in decode (V_FLOORS), five products [BLOCK_N, WORDS_PAD] take the
    # floors t_j = byte // 3^j instead, each unpacked in the operand's own layout (a tile joined
    # from them would cross shared memory), one fp16 FMA a pair of bytes from the last, where a
    # digit costs two; the digits t_j - 3 t_(j+1) are the sums' differences, taken once after the
    # loop. Their rounding is that of sums of 1024 + t_j, as biased digits' is of sums of digit -
    # 2048; unbiased codes (the interpreter) keep the digits, whose fp32 sums floors up to 242
    # would make a hundred times less exact, and prefill's 64-row tiles too (five [64, WORDS_PAD]
    # sums spill there).
    V_SPLIT: tl.constexpr = not V_FULL and V_PER_WORD == 5
    V_FLOORS: tl.constexpr = V_SPLIT and V_GROUPS == 1 and BIASED and Q_BLOCK == 1
    V_BIAS: tl.constexpr = code_bias(V_RADIX, BIASED and not V_FULL, V_FLOORS)
    # a bias summed apart, subtracted before the floors' differences or the digits' weight; else
    # with p @ low
    V_BIAS_APART: tl.constexpr = V_BIAS != 0 and (V_FLOORS or V_WORD_BYTES == 3)
    V_TILE_DIGITS: tl.constexpr = 4 if V_SPLIT else V_PER_WORD_PAD
    v_tile_channel, v_tile_real = _channels(D, V_FULL, V_PER_WORD, V_WORDS_PAD, V_TILE_DIGITS)
    v_last_channel = tl.arange(0, V_WORDS_PAD) * V_PER_WORD + 4                 # digit 4 of each byte
    v_group = v_tile_channel
    v_last_group = v_last_channel
    v_weight = code_weight(v_tile_channel % V_PER_WORD, V_WORD_BYTES)  # packed values: their digits' weight
    if not V_FULL:
        v_group = tl.load(v_group_ptr + kv_head * D + v_tile_channel, mask=v_tile_real, other=-1)
    if V_SPLIT and V_GROUPS > 1:
        v_last_group = tl.load(v_group_ptr + kv_head * D + v_last_channel, mask=v_last_channel < D, other=-1)
    q_rows = q_ptr + b * stride_qb + query[:, None] * stride_qq + heads[:, None] * stride_qh
    if ROPE or CAUSAL:
        first_position = tl.load(first_position_ptr + b)
    if CAUSAL:  # this segment's token i at first_position + i is visible to queries at or after it
        q_position = tl.load(q_position_ptr + b) + query
    if ROPE:  # keys are rotated per token below: q stays in the two RoPE halves [M_PAD, D/2]
        half = tl.arange(0, D // 2)
        q_lo = tl.load(q_rows + half[None, :], mask=real_row[:, None], other=0.0)
        q_hi = tl.load(q_rows + D // 2 + half[None, :], mask=real_row[:, None], other=0.0)
        if not K_FULL:
            q_lo = (q_lo * tl.load(k_smoothing_ptr + kv_head * D + half)[None, :]).to(q_ptr.dtype.element_ty)
            q_hi = (q_hi * tl.load(k_smoothing_ptr + kv_head * D + D // 2 + half)[None, :]).to(q_ptr.dtype.element_ty)
        inv_freq = tl.load(inv_freq_ptr + half)
        # Angles position * inv_freq without a sin/cos per token: the block's first position
        # (carried from block to block by a rotation of BLOCK_N positions) and, for its token
        # 8a + b, rotations by 8a and by b positions. sin/cos run here only, before the loop.
        a_angle = (8 * tl.arange(0, BLOCK_N // 8)).to(tl.float32)[:, None] * inv_freq[None, :]  # (BLOCK_N / 8, D/2)
        b_angle = tl.arange(0, 8).to(tl.float32)[:, None] * inv_freq[None, :]                  # (8, D/2)
        cos_a, sin_a, cos_b, sin_b = tl.cos(a_angle), tl.sin(a_angle), tl.cos(b_angle), tl.sin(b_angle)
        cos_step, sin_step = tl.cos(BLOCK_N * inv_freq), tl.sin(BLOCK_N * inv_freq)
        block_angle = (first_position + start).to(tl.float32) * inv_freq
        cos_block, sin_block = tl.cos(block_angle), tl.sin(block_angle)
    elif K_ROTATE:  # keys stored rotated: q . k = (q s R) . (k / s R), q s R once here, into the codes' order
        # On tensor cores in q's dtype, R's rows ROTATION_ROWS at a time: fp32 FMAs over [D, DX]
        # tiles, or R whole in registers, spill (measured: bench/sass.py).
        q = tl.zeros([M_PAD, k_channel.shape[0]], tl.float32)
        for first in tl.static_range(0, D, ROTATION_ROWS):
            channel = first + tl.arange(0, ROTATION_ROWS)
            q_part = tl.load(q_rows + channel[None, :], mask=real_row[:, None], other=0.0).to(tl.float32)
            q_part = q_part * tl.load(k_smoothing_ptr + kv_head * D + channel)[None, :]    # (M_PAD, ROWS)
            rotation = tl.load(k_rotation_ptr + channel[:, None] * D + k_channel[None, :], mask=k_real[None, :],
                               other=0.0)                                               # (ROWS, DX): R's rows
            q = tl.dot(q_part.to(q_ptr.dtype.element_ty), rotation.to(q_ptr.dtype.element_ty), q)
        q = (q * k_weight[None, :]).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_rows + k_channel[None, :], mask=real_row[:, None] & k_real[None, :], other=0.0)
        if not K_FULL:
            k_smoothing = tl.load(k_smoothing_ptr + kv_head * D + k_channel, mask=k_real, other=0.0)
            q = (q * (k_smoothing * k_weight)[None, :]).to(q_ptr.dtype.element_ty)
    first_slot = 0
    if RING:
        first_slot = tl.load(first_slot_ptr + b)
    if K_SVD:  # the head's basis [R, D] and mean, and where each latent code sits in a row
        latent = tl.arange(0, K_RANK)
        basis_t = tl.load(k_basis_ptr + b * stride_kbb + kv_head * stride_kbh + latent[:, None] * D + k_channel[None, :])
        basis_t = basis_t.to(q_ptr.dtype.element_ty)
        k_mean = tl.load(k_mean_ptr + b * stride_kub + kv_head * stride_kuh + k_channel).to(tl.float32)
        bit_offset = tl.load(k_bits_ptr + latent)
        bit_mask = (1 << tl.load(k_bits_ptr + K_RANK + latent)) - 1
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    k_meta = b * stride_kmb + kv_head * stride_kmh
    v_meta = b * stride_vmb + kv_head * stride_vmh
    # Scores in base 2 (times log2(e)): exp2 is one MUFU.EX2, where exp adds a multiply and a
    # range check around it; packed keys take the factor with their scale and low.
    qk_scale = sm_scale * LOG2E
    m = tl.full([M_PAD], float("-inf"), tl.float32)
    # Sums over tokens: the softmax mass; packed values, one group: p @ low, less the p @ bias
    # that the codes' bias added to the products, or that apart (see _token_sums).
    SUM_N: tl.constexpr = BLOCK_N if Q_BLOCK == 1 else 1
    l_tokens = tl.zeros([M_PAD, SUM_N], tl.float32)
    low_tokens = tl.zeros([M_PAD, SUM_N], tl.float32)
    bias_tokens = tl.zeros([M_PAD, SUM_N], tl.float32)
    acc = tl.zeros([M_PAD, v_tile_channel.shape[0]], tl.float32)
    acc_last = tl.zeros([M_PAD, V_WORDS_PAD], tl.float32)  # ternary values: digit (or floor) 4's product
    acc_floor0 = tl.zeros([M_PAD, V_WORDS_PAD], tl.float32)  # V_FLOORS: floors 0-3's products
    acc_floor1 = tl.zeros([M_PAD, V_WORDS_PAD], tl.float32)
    acc_floor2 = tl.zeros([M_PAD, V_WORDS_PAD], tl.float32)
    acc_floor3 = tl.zeros([M_PAD, V_WORDS_PAD], tl.float32)
    # Whole blocks without masks, then the last, partial block, if any, with them: the body is
    # written once, and the second phase's loop of one iteration is no loop once compiled.
    whole = tl.maximum(end - start, 0) // BLOCK_N  # a split past the sequence's end ends before it starts
    for MASKED in tl.static_range(2):
        first = start + whole * BLOCK_N if MASKED else start
        if first < end:
            for i in range(0, 1 if MASKED else whole):
                block_start = first + i * BLOCK_N
                tokens = block_start + tl.arange(0, BLOCK_N)
                valid = (tokens < end) if MASKED else tl.full([BLOCK_N], True, tl.int1)  # constant: no masks
                slots = tokens
                if RING:
                    slots = (first_slot + tokens) % ring
                if K_SVD:  # latent codes -> latent channels -> keys, by tl.dot with the basis
                    byte = tl.load(k_base + slots[:, None] * stride_kt + (bit_offset // 8)[None, :],
                                   mask=valid[:, None], other=0)
                    codes = small_to_half((byte.to(tl.int32) >> (bit_offset % 8)[None, :]) & bit_mask[None, :])
                    meta = k_meta + (slots // K_TOKEN_GROUP)[:, None] * stride_kmt + latent[None, :]   # (BLOCK_N, R)
                    scale = tl.load(k_scale_ptr + meta, mask=valid[:, None], other=0.0).to(tl.float32)
                    z = (codes.to(tl.float32) * scale
                         + tl.load(k_low_ptr + meta, mask=valid[:, None], other=0.0).to(tl.float32))
                    k = tl.dot(z.to(basis_t.dtype), basis_t) + k_mean[None, :]                # (BLOCK_N, D) fp32
                elif K_FULL:
                    k = tl.load(k_base + slots[:, None] * stride_kt + k_channel[None, :], mask=valid[:, None],
                                other=0.0)
                else:
                    k = _load_codes(k_base, slots * stride_kt, valid, K_RADIX, K_PER_WORD, K_WORD_BYTES, K_ROW_BYTES,
                                    K_WORDS_PAD, K_PER_WORD_PAD, BIASED, PTX)                 # (BLOCK_N, DX) fp16
                    if ROPE:
                        k = _dequantize(k, k_scale_ptr, k_low_ptr, k_meta + slots * stride_kmt, valid, k_group,
                                        k_weight, K_GROUPS, code_bias(K_RADIX, BIASED))
                if ROPE:
                    cos_a8 = cos_block[None, :] * cos_a - sin_block[None, :] * sin_a              # (BLOCK_N / 8, D/2)
                    sin_a8 = sin_block[None, :] * cos_a + cos_block[None, :] * sin_a
                    cos = tl.reshape(cos_a8[:, None, :] * cos_b[None, :, :] - sin_a8[:, None, :] * sin_b[None, :, :],
                                     [BLOCK_N, D // 2])
                    sin = tl.reshape(sin_a8[:, None, :] * cos_b[None, :, :] + cos_a8[:, None, :] * sin_b[None, :, :],
                                     [BLOCK_N, D // 2])
                    cos_block, sin_block = (cos_block * cos_step - sin_block * sin_step,
                                            sin_block * cos_step + cos_block * sin_step)
                    k_lo, k_hi = tl.split(tl.permute(tl.reshape(k.to(tl.float32), [BLOCK_N, 2, D // 2]), (0, 2, 1)))
                    s = tl.dot(q_lo, tl.trans((k_lo * cos - k_hi * sin).to(q_lo.dtype)))
                    s = (s + tl.dot(q_hi, tl.trans((k_hi * cos + k_lo * sin).to(q_hi.dtype)))) * qk_scale
                elif K_FULL or K_SVD:
                    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale                          # (M_PAD, BLOCK_N) fp32
                else:  # q . (code * scale + low) = scale * (q . code) + low * sum(q), per channel group; codes
                    # carrying a bias b: scale * (q . (code + b)) + (low - b * scale) * sum(q)
                    if K_DIGIT_MAJOR:
                        k = _digit_major(k, K_WORDS_PAD, K_PER_WORD_PAD)
                    k = k.to(q.dtype)  # small integers: exact
                    for g in tl.static_range(K_GROUPS):
                        q_g = q if K_GROUPS == 1 else tl.where((k_group == g)[None, :], q, 0.0)
                        scale = _metadata(k_scale_ptr, k_meta + slots * stride_kmt, valid, g, qk_scale)
                        low = _metadata(k_low_ptr, k_meta + slots * stride_kmt, valid, g, qk_scale)
                        if K_WORD_BYTES == 3:  # q carries the digits' weight: the bias takes q as it is, low
                            # q unweighted: scale * (q . (code / w + b) - b sum(q)) + low * sum(q / w)
                            s_g = ((tl.dot(q_g, tl.trans(k)) - code_bias(K_RADIX, BIASED)
                                    * tl.sum(q_g.to(tl.float32), 1)[:, None]) * scale[None, :]
                                   + tl.sum(q_g.to(tl.float32) / k_weight[None, :], 1)[:, None] * low[None, :])
                        else:
                            s_g = (tl.dot(q_g, tl.trans(k)) * scale[None, :] + tl.sum(q_g.to(tl.float32), 1)[:, None]
                                   * (low - code_bias(K_RADIX, BIASED) * scale)[None, :])
                        if g == 0:  # not zeros plus the first group: x + 0 is an instruction (x may be -0)
                            s = s_g
                        else:
                            s += s_g
                visible = valid[None, :]
                if CAUSAL:
                    visible = visible & ((first_position + tokens)[None, :] <= q_position[:, None])
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = m_new  # finite: every block holds a token for every row, unless a causal mask hides it
                if CAUSAL:
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m - m_safe)
                l_tokens = l_tokens * alpha[:, None] + _token_sums(p, SUM_N)
                # the products below accumulate into the tiles in place: no zeroed tile
                if V_FLOORS:
                    acc_floor0, acc_floor1 = acc_floor0 * alpha[:, None], acc_floor1 * alpha[:, None]
                    acc_floor2, acc_floor3 = acc_floor2 * alpha[:, None], acc_floor3 * alpha[:, None]
                else:
                    acc = acc * alpha[:, None]
                if V_SPLIT:
                    acc_last = acc_last * alpha[:, None]
                if V_FULL:
                    v = tl.load(v_base + slots[:, None] * stride_vt + v_channel[None, :], mask=valid[:, None],
                                other=0.0)
                    acc = tl.dot(p.to(q_ptr.dtype.element_ty), v.to(q_ptr.dtype.element_ty), acc)
                else:  # p @ (code * scale + low) = (p * scale) @ code + p @ low, per channel group; codes
                    # carrying a bias b: less b * sum(p * scale), summed as the product rounded it
                    v_words = load_words(v_base + slots * stride_vt, valid, V_RADIX, V_WORD_BYTES, V_ROW_BYTES,
                                         V_WORDS_PAD)
                    v_last = unpack_digit(v_words, 4, V_RADIX, V_PER_WORD, V_WORD_BYTES, V_BIAS, PTX,
                                          V_FLOORS).to(q_ptr.dtype.element_ty)                # (BLOCK_N, V_WORDS_PAD)
                    if not V_FLOORS:
                        v = unpack_words(v_words, V_RADIX, V_PER_WORD, V_WORD_BYTES, V_TILE_DIGITS, V_BIAS,
                                         PTX).to(q_ptr.dtype.element_ty)                      # (BLOCK_N, DX)
                    for g in tl.static_range(V_GROUPS):
                        scale = _metadata(v_scale_ptr, v_meta + slots * stride_vmt, valid, g)
                        low = _metadata(v_low_ptr, v_meta + slots * stride_vmt, valid, g)
                        p_scale = (p * scale[None, :]).to(q_ptr.dtype.element_ty)
                        if V_FLOORS:
                            acc_floor0 = tl.dot(p_scale, _floor(v_words, 0, V_BIAS, PTX, p_scale.dtype), acc_floor0)
                            acc_floor1 = tl.dot(p_scale, _floor(v_words, 1, V_BIAS, PTX, p_scale.dtype), acc_floor1)
                            acc_floor2 = tl.dot(p_scale, _floor(v_words, 2, V_BIAS, PTX, p_scale.dtype), acc_floor2)
                            acc_floor3 = tl.dot(p_scale, _floor(v_words, 3, V_BIAS, PTX, p_scale.dtype), acc_floor3)
                            acc_last = tl.dot(p_scale, v_last, acc_last)
                        elif V_GROUPS == 1:
                            acc = tl.dot(p_scale, v, acc)
                            if V_SPLIT:
                                acc_last = tl.dot(p_scale, v_last, acc_last)
                        if V_GROUPS == 1:
                            if V_BIAS_APART:  # the bias times p_scale as the product rounded it
                                low_tokens = low_tokens * alpha[:, None] + _token_sums(p * low[None, :], SUM_N)
                                bias_tokens = (bias_tokens * alpha[:, None]
                                               + _token_sums(p_scale.to(tl.float32), SUM_N))
                            else:
                                low_tokens = low_tokens * alpha[:, None] + _token_sums(
                                    p * low[None, :] - V_BIAS * p_scale.to(tl.float32), SUM_N)
                        elif V_WORD_BYTES == 3:  # weighted digits: the bias leaves the sum before the weight
                            p_bias = V_BIAS * tl.sum(p_scale.to(tl.float32), 1)
                            acc += tl.where((v_group == g)[None, :], (tl.dot(p_scale, v) - p_bias[:, None])
                                            * v_weight[None, :] + tl.sum(p * low[None, :], 1)[:, None], 0.0)
                        else:
                            p_low = tl.sum(p * low[None, :] - V_BIAS * p_scale.to(tl.float32), 1)
                            acc += tl.where((v_group == g)[None, :], tl.dot(p_scale, v) + p_low[:, None], 0.0)
                            if V_SPLIT:
                                acc_last += tl.where((v_last_group == g)[None, :],
                                                     tl.dot(p_scale, v_last) + p_low[:, None], 0.0)
                m = m_new
    l = tl.sum(l_tokens, 1)
    if V_BIAS_APART:  # what the codes' bias added to the products
        bias = V_BIAS * tl.sum(bias_tokens, 1)[:, None]
        if V_FLOORS:
            acc_floor0, acc_floor1, acc_floor2, acc_floor3 = (acc_floor0 - bias, acc_floor1 - bias,
                                                              acc_floor2 - bias, acc_floor3 - bias)
        else:
            acc -= bias
        acc_last -= bias
    if V_GROUPS == 1 and V_WORD_BYTES == 3:  # the digits' weight, once (several groups: in the loop)
        acc = acc * v_weight[None, :]
    if V_FLOORS:  # p @ digit j = p @ t_j - 3 p @ t_(j+1) (t_5 = 0), in tile order (word, j = 2 b1 + b0)
        acc = tl.reshape(tl.join(tl.join(acc_floor0 - 3 * acc_floor1, acc_floor2 - 3 * acc_floor3),
                                 tl.join(acc_floor1 - 3 * acc_floor2, acc_floor3 - 3 * acc_last)),
                         [M_PAD, v_tile_channel.shape[0]])
    if V_SPLIT:  # back to the tile of 8 digits a byte: (word, digit 4 b2 + 2 b1 + b0)
        zero = tl.zeros_like(acc_last)
        rest = tl.reshape(tl.join(tl.join(acc_last, zero), tl.join(zero, zero)), [M_PAD, V_WORDS_PAD, 4])
        acc = tl.reshape(tl.permute(tl.join(tl.reshape(acc, [M_PAD, V_WORDS_PAD, 4]), rest), (0, 1, 3, 2)),
                         [M_PAD, v_channel.shape[0]])
    # An empty split (past this sequence's end) leaves l = 0: its lse is -inf and stage 2 drops it.
    has_tokens = l > 0
    out = (acc + tl.sum(low_tokens, 1)[:, None]) / tl.where(has_tokens, l, 1.0)[:, None]
    out_rows = out_ptr + b * stride_ob + query[:, None] * stride_oq + heads[:, None] * stride_oh
    out_rows += (first_split + split) * stride_os
    # Only a split that saw tokens writes its output: stage 2 never reads the others' (weight 0); a
    # split is empty only for a sequence shorter than the splits' blocks. (The test is the split's,
    # not each row's l > 0, which costs registers; [M_PAD] for the interpreter.)
    live = (rows * 0 + start) < end
    if V_ROTATE:  # values stored rotated: the split's output times R^T, once, back in the model's
        # channels, ROTATION_ROWS of them at a time (a whole [DX, D] tile spills, as for q)
        out = out.to(q_ptr.dtype.element_ty)
        for first in tl.static_range(0, D, ROTATION_ROWS):
            out_channel = first + tl.arange(0, ROTATION_ROWS)
            rotation_t = tl.load(v_rotation_ptr + out_channel[None, :] * D + v_channel[:, None],
                                 mask=v_real[:, None], other=0.0)                      # (DX, ROWS): R^T's columns
            out_part = tl.dot(out, rotation_t.to(q_ptr.dtype.element_ty))              # (M_PAD, ROWS)
            out_part = out_part * tl.load(v_smoothing_ptr + kv_head * D + out_channel)[None, :]
            tl.store(out_rows + out_channel[None, :], out_part, mask=(real_row & live)[:, None])
    else:
        if not V_FULL:
            out = out * tl.load(v_smoothing_ptr + kv_head * D + v_channel, mask=v_real, other=0.0)[None, :]
        tl.store(out_rows + v_channel[None, :], out, mask=(real_row & live)[:, None] & v_real[None, :])
    lse = tl.where(has_tokens, (m + tl.log2(tl.where(has_tokens, l, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + b * stride_lb + query * stride_lq + heads * stride_lh + first_split + split, lse, mask=real_row)


@triton.jit
def _attend_stage1(
        # the arguments of _attend_split, which says what each is, less the split
        q_ptr, stride_qb, stride_qq, stride_qh,
        out_ptr, stride_ob, stride_oq, stride_oh, stride_os,
        lse_ptr, stride_lb, stride_lq, stride_lh,
        n_queries, q_blocks, first_split, sm_scale,
        count_ptr, ring,
        k_ptr, stride_kb, stride_kh, stride_kt,
        v_ptr, stride_vb, stride_vh, stride_vt,
        G: tl.constexpr, Q_BLOCK: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        first_slot_ptr=None, first_position_ptr=None, q_position_ptr=None, inv_freq_ptr=None,
        RING: tl.constexpr = False, ROPE: tl.constexpr = False, CAUSAL: tl.constexpr = False,
        k_scale_ptr=None, k_low_ptr=None, stride_kmb=0, stride_kmh=0, stride_kmt=0,
        k_group_ptr=None, k_smoothing_ptr=None, k_rotation_ptr=None,
        K_FULL: tl.constexpr = True, K_GROUPS: tl.constexpr = 1, K_RADIX: tl.constexpr = 1,
        K_PER_WORD: tl.constexpr = 1, K_WORD_BYTES: tl.constexpr = 1, K_ROW_BYTES: tl.constexpr = 1,
        K_WORDS_PAD: tl.constexpr = 1, K_PER_WORD_PAD: tl.constexpr = 1, K_ROTATE: tl.constexpr = False,
        k_basis_ptr=None, stride_kbb=0, stride_kbh=0, k_mean_ptr=None, stride_kub=0, stride_kuh=0,
        k_bits_ptr=None,
        K_SVD: tl.constexpr = False, K_RANK: tl.constexpr = 1, K_TOKEN_GROUP: tl.constexpr = 1,
        v_scale_ptr=None, v_low_ptr=None, stride_vmb=0, stride_vmh=0, stride_vmt=0,
        v_group_ptr=None, v_smoothing_ptr=None, v_rotation_ptr=None,
        V_FULL: tl.constexpr = True, V_GROUPS: tl.constexpr = 1, V_RADIX: tl.constexpr = 1,
        V_PER_WORD: tl.constexpr = 1, V_WORD_BYTES: tl.constexpr = 1, V_ROW_BYTES: tl.constexpr = 1,
        V_WORDS_PAD: tl.constexpr = 1, V_PER_WORD_PAD: tl.constexpr = 1, V_ROTATE: tl.constexpr = False,
        BIASED: tl.constexpr = False, PTX: tl.constexpr = False,
        # decode: up to EXTRA full-precision segments (sinks, window), each one more program after
        # the segment's splits: rows [B, Hkv, T, D] as k_ptr's, tokens [B], ring start [B] (A_RING),
        # first token's position [B] (pre-RoPE keys)
        a_k_ptr=None, a_v_ptr=None, stride_akb=0, stride_akh=0, stride_akt=0, stride_avb=0, stride_avh=0,
        stride_avt=0, a_count_ptr=None, a_ring=1, a_first_slot_ptr=None, a_first_position_ptr=None,
        A_RING: tl.constexpr = False,
        b_k_ptr=None, b_v_ptr=None, stride_bkb=0, stride_bkh=0, stride_bkt=0, stride_bvb=0, stride_bvh=0,
        stride_bvt=0, b_count_ptr=None, b_ring=1, b_first_slot_ptr=None, b_first_position_ptr=None,
        B_RING: tl.constexpr = False,
        EXTRA: tl.constexpr = 0):
    """Grid (batch x query blocks, KV head, splits + EXTRA): the segment's splits, then one
    program for each full-precision segment riding along (a decode step's sinks and window), so
    that a step reads all its segments in one launch. Each program writes its partial column."""
    split, n_splits = tl.program_id(2), tl.num_programs(2) - EXTRA
    if EXTRA == 0 or split < n_splits:  # constexpr without riders: no branch (prefill spills less)
        _attend_split(split, n_splits, q_ptr, stride_qb, stride_qq, stride_qh, out_ptr, stride_ob, stride_oq,
                      stride_oh, stride_os, lse_ptr, stride_lb, stride_lq, stride_lh, n_queries,
                      q_blocks, first_split, sm_scale, count_ptr, ring, k_ptr, stride_kb, stride_kh,
                      stride_kt, v_ptr, stride_vb, stride_vh, stride_vt, G, Q_BLOCK, M_PAD, D,
                      BLOCK_N, first_slot_ptr, first_position_ptr, q_position_ptr, inv_freq_ptr,
                      RING, ROPE, CAUSAL, k_scale_ptr, k_low_ptr, stride_kmb, stride_kmh,
                      stride_kmt, k_group_ptr, k_smoothing_ptr, k_rotation_ptr, K_FULL, K_GROUPS, K_RADIX,
                      K_PER_WORD, K_WORD_BYTES, K_ROW_BYTES, K_WORDS_PAD, K_PER_WORD_PAD, K_ROTATE,
                      k_basis_ptr, stride_kbb, stride_kbh, k_mean_ptr, stride_kub, stride_kuh,
                      k_bits_ptr, K_SVD, K_RANK, K_TOKEN_GROUP, v_scale_ptr, v_low_ptr, stride_vmb,
                      stride_vmh, stride_vmt, v_group_ptr, v_smoothing_ptr, v_rotation_ptr, V_FULL, V_GROUPS,
                      V_RADIX, V_PER_WORD, V_WORD_BYTES, V_ROW_BYTES, V_WORDS_PAD, V_PER_WORD_PAD, V_ROTATE,
                      BIASED, PTX)
    elif EXTRA > 0:  # a full-precision segment: one program, one split
        if split == n_splits:
            _attend_split(0, 1, q_ptr, stride_qb, stride_qq, stride_qh, out_ptr, stride_ob, stride_oq, stride_oh,
                          stride_os, lse_ptr, stride_lb, stride_lq, stride_lh, n_queries, q_blocks,
                          first_split + split, sm_scale, a_count_ptr, a_ring, a_k_ptr, stride_akb, stride_akh,
                          stride_akt, a_v_ptr, stride_avb, stride_avh, stride_avt, G, Q_BLOCK, M_PAD, D, BLOCK_N,
                          first_slot_ptr=a_first_slot_ptr, first_position_ptr=a_first_position_ptr,
                          inv_freq_ptr=inv_freq_ptr, RING=A_RING, ROPE=ROPE)
        elif EXTRA > 1:
            _attend_split(0, 1, q_ptr, stride_qb, stride_qq, stride_qh, out_ptr, stride_ob, stride_oq, stride_oh,
                          stride_os, lse_ptr, stride_lb, stride_lq, stride_lh, n_queries, q_blocks,
                          first_split + split, sm_scale, b_count_ptr, b_ring, b_k_ptr, stride_bkb, stride_bkh,
                          stride_bkt, b_v_ptr, stride_bvb, stride_bvh, stride_bvt, G, Q_BLOCK, M_PAD, D, BLOCK_N,
                          first_slot_ptr=b_first_slot_ptr, first_position_ptr=b_first_position_ptr,
                          inv_freq_ptr=inv_freq_ptr, RING=B_RING, ROPE=ROPE)


@triton.jit
def _merge_splits(partial_ptr, lse_ptr, out_ptr, merged_lse_ptr, n_splits,
                   stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                   D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (batch, query head): out = sum over splits of softmax(lse)[s] * partial[s]; splits
    that saw no token (lse = -inf) weigh nothing. The merged lse goes to merged_lse [batch, heads]
    (engine/parallel.py merges ranks' outputs by it); a row no split saw gets 0 and lse -inf."""
    b, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    lse_row = lse_ptr + b * stride_lb + head * stride_lh
    partial_row = partial_ptr + b * stride_pb + head * stride_ph
    lse_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for start in range(0, n_splits, BLOCK_S):
        splits = start + tl.arange(0, BLOCK_S)
        lse_max = tl.maximum(lse_max, tl.load(lse_row + splits, mask=splits < n_splits, other=float("-inf")))
    lse_max = tl.max(lse_max, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split saw a token: every weight 0
    total = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([D], tl.float32)
    channels = tl.arange(0, D)
    for start in range(0, n_splits, BLOCK_S):
        splits = start + tl.arange(0, BLOCK_S)
        weight = tl.exp(tl.load(lse_row + splits, mask=splits < n_splits, other=float("-inf")) - lse_max)
        partial = tl.load(partial_row + splits[:, None] * stride_ps + channels[None, :],
                          mask=(weight > 0)[:, None], other=0.0)                       # (BLOCK_S, D)
        total += weight
        acc += tl.sum(weight[:, None] * partial, 0)
    total = tl.sum(total, 0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + channels, acc / tl.where(total > 0, total, 1.0))
    merged_lse = tl.where(total > 0, lse_max + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(merged_lse_ptr + b * tl.num_programs(1) + head, merged_lse)  # [batch, heads], contiguous


def _tile(segment: Segment, Q: int, rope: bool) -> tuple[int, int]:
    """(tokens per step, warps) of a segment's stage 1: BLOCK_N and 4 warps, but where that spills
    registers (measured: python -m bench.sass) 8 warps, for prefill's 64-row query tiles, SVDq
    keys rebuilt in-kernel, several channel groups per head and pre-RoPE packed keys (rotated
    per token), and half blocks for SVDq keys and for packed history under prefill's tiles.
    Decode over post-RoPE packed history with one group takes double blocks: the loop's fixed
    cost (the running max across warps, the loop itself) over twice the bytes (measured: 0.60
    -> 0.47 warp-instructions a byte, the default cache on sm_90)."""
    packed = [x for x in (segment.keys, segment.values) if not isinstance(x, torch.Tensor)]
    latent = hasattr(segment.keys, "basis_t")
    several_groups = any(x.scale.shape[-1] > 1 for x in packed if hasattr(x, "bits"))
    if latent or (packed and Q > 1):
        block = BLOCK_N // 2
    elif packed and not several_groups and not rope:
        block = 2 * BLOCK_N
    else:
        block = BLOCK_N
    return block, 8 if Q > 1 or latent or several_groups or (packed and rope) else 4


def _launches(segments: list[Segment], Q: int) -> list[tuple[Segment, list[Segment]]]:
    """Stage 1's launches: each a segment, and the full-precision segments that ride along as one
    more program each. Decode: up to two ride with the first packed segment, so a quantized
    cache's step (sinks, window, history) is one launch; prefill: every segment its own."""
    full = [s for s in segments if isinstance(s.keys, torch.Tensor) and isinstance(s.values, torch.Tensor)
            and not s.causal]
    if Q > 1 or not full:
        return [(s, []) for s in segments]
    others = [s for s in segments if all(s is not f for f in full)] or full[:1]
    riders = [s for s in full if s is not others[0]]
    return [(others[0], riders[:2])] + [(s, []) for s in others[1:] + riders[2:]]


def _rider(segment: Segment, letter: str) -> dict:
    """Stage-1 arguments of a full-precision segment riding along as extra program `letter` (a, b)."""
    assert segment.keys.shape == segment.values.shape
    args = {f"{letter}_k_ptr": segment.keys, **_strides(f"stride_{letter}k", segment.keys),
            f"{letter}_v_ptr": segment.values, **_strides(f"stride_{letter}v", segment.values),
            f"{letter}_count_ptr": segment.count.contiguous(), f"{letter}_ring": segment.rows.shape[2]}
    if segment.first_slot is not None:
        args.update({f"{letter}_first_slot_ptr": segment.first_slot.contiguous(), f"{letter.upper()}_RING": True})
    if segment.first_position is not None:
        args[f"{letter}_first_position_ptr"] = segment.first_position.contiguous()
    return args


def code_path() -> dict:
    """Stage 1's conversion of codes: inline PTX where the kernel is compiled, codes carrying
    code_bias; the interpreter cannot run PTX and keeps the pure-Triton path, unbiased
    (tests/test_ptx.py runs it biased too, and proves the PTX equal to it)."""
    compiled = not triton.knobs.runtime.interpret
    return dict(BIASED=compiled, PTX=compiled)


def decode_splits(programs: int, capacity: int, device: torch.device) -> int:
    """Splits of a decode segment of `capacity` slots over `programs` (batch x KV heads) programs:
    about SPLIT_WAVES waves of the SMs, none shorter than a block. Fixed for a cache, so a CUDA
    graph replays the grid; each program finds its tokens from the live count on the device."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SMS
    return max(1, min(triton.cdiv(SPLIT_WAVES * sms, programs), triton.cdiv(capacity, BLOCK_N)))


def attend(q: torch.Tensor, segments: list[Segment], q_position: torch.Tensor | None = None,
           inv_freq: torch.Tensor | None = None, n_splits: int | None = None, return_lse: bool = False):
    """q [B, Q, H, D]: Q queries per sequence, the i-th at position q_position[b] + i, attend to
    every token of every segment (a causal segment: to its tokens at or before them). inv_freq
    [D/2] fp32: the segments' keys are pre-RoPE, rotated in-kernel at their positions.
    n_splits: for one query per sequence (decode), programs per (sequence, KV head) and segment,
    each over an equal share of the live tokens (default decode_splits: splits fill the GPU); more
    queries (prefill) take one per segment (query blocks fill the GPU, and partial outputs stay
    [B, Q, H, segments, D]).
    Returns [B, Q, H, D] in q's dtype; with return_lse also each row's log-sum-exp [B, Q, H] fp32
    (-inf where no token was seen)."""
    B, Q, H, D = q.shape
    assert q.stride(-1) == 1
    launches = _launches(segments, Q)
    split_counts = [1 if Q > 1 else n_splits or decode_splits(B * s.rows.shape[1], s.rows.shape[2], q.device)
                    for s, _ in launches]
    columns = sum(split_counts) + sum(len(riders) for _, riders in launches)  # partial outputs per query and head
    partial_out = torch.empty(B, Q, H, columns, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Q, H, columns, device=q.device, dtype=torch.float32)
    first_split = 0
    for (segment, riders), splits in zip(launches, split_counts):
        Hkv = segment.rows.shape[1]
        assert inv_freq is None or getattr(segment.keys, "bits", None) != 1.5, "pre-RoPE keys cannot be ternary"
        assert inv_freq is None or getattr(segment.keys, "rotation", None) is None, "RoPE does not commute with R"
        assert q_position is not None or not segment.causal, "a causal segment needs the queries' positions"
        G = H // Hkv
        block_n, num_warps = _tile(segment, Q, inv_freq is not None)
        q_block = 1 if Q == 1 else max(1, 64 // G)  # queries per program: 64 tile rows (of G heads each)
        where = {}
        if segment.first_slot is not None:
            where.update(first_slot_ptr=segment.first_slot.contiguous(), RING=True)
        if segment.first_position is not None:
            where.update(first_position_ptr=segment.first_position.contiguous())
            if inv_freq is not None:
                where.update(inv_freq_ptr=inv_freq, ROPE=True)
        if segment.causal:
            where.update(q_position_ptr=q_position.contiguous(), CAUSAL=True)
        for letter, rider in zip("ab", riders):
            where.update(_rider(rider, letter))
        _attend_stage1[(B * triton.cdiv(Q, q_block), Hkv, splits + len(riders))](
            q_ptr=q, **dict(zip(["stride_qb", "stride_qq", "stride_qh"], q.stride())),
            out_ptr=partial_out, **dict(zip(["stride_ob", "stride_oq", "stride_oh", "stride_os"], partial_out.stride())),
            lse_ptr=lse, **dict(zip(["stride_lb", "stride_lq", "stride_lh"], lse.stride())),
            n_queries=Q, q_blocks=triton.cdiv(Q, q_block), first_split=first_split, sm_scale=D ** -0.5,
            count_ptr=segment.count.contiguous(), ring=segment.rows.shape[2],
            **_operand(segment.keys, "k", D), **_operand(segment.values, "v", D),
            G=G, Q_BLOCK=q_block, M_PAD=triton.next_power_of_2(q_block * G), D=D,
            BLOCK_N=block_n, num_warps=num_warps, EXTRA=len(riders), maxnreg=DECODE_REGISTERS if Q == 1 else None,
            **code_path(), **where)
        first_split += splits + len(riders)
    out = torch.empty(B, Q, H, D, device=q.device, dtype=q.dtype)
    merged_lse = torch.empty(B, Q, H, device=q.device, dtype=torch.float32)
    partial_out, lse, merged = partial_out.flatten(0, 1), lse.flatten(0, 1), out.view(B * Q, H, D)  # (B * Q, H, ...)
    _merge_splits[(B * Q, H)](partial_out, lse, merged, merged_lse, first_split, *partial_out.stride()[:3],
                               *lse.stride()[:2], *merged.stride()[:2], D=D, BLOCK_S=32)
    return (out, merged_lse) if return_lse else out


def decode_attention(q: torch.Tensor, segments: list[Segment], inv_freq: torch.Tensor | None = None,
                     n_splits: int | None = None) -> torch.Tensor:
    """q [B, H, D], one query per sequence, after every token of every segment -> [B, H, D]."""
    return attend(q[:, None], segments, None, inv_freq, n_splits)[:, 0]
