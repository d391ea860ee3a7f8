"""Attention streamed over a cache's segments in blocks of tokens, in plain torch: the CPU path.

It reads what kernels/decode_attention.py reads (the same `Segment`s, full-precision tensors and
engine/stores.py stores, in place) and computes what that kernel computes, block by block: a
block's codes are unpacked by table lookup, scored against the queries with one matmul, folded
into an fp32 online softmax, and its values accumulated with another. Never the whole history
in fp32, never K/V copied per query head (the G query heads of a KV head are rows of one
matrix), never a mask wider than a block; memory is bounded by `block_tokens`.

Dequantization is folded around the matmuls rather than done element by element. For a token t
with code vector c_t and, per channel group g, (scale, low):
    score(q, t)  = sum_g scale_tg * ((q * s) . (c_t on g)) + low_tg * sum((q * s) on g)
    sum_t p_t v_t = s * sum_g [ (p * scale_g) @ c + (p @ low_g) ] on g
with s the store's smoothing (keys': folded into q; values': applied to the block's output). A
store's rotation R (channels stored rotated, quant/skvq.py) goes the same ways: q s R once per
attend for the keys, and for the values each block's weighted sum times R^T before s; the C
kernel's whole packed segment is summed apart, rotated back, then merged by log-sum-exp.
Pre-RoPE keys must be rotated token by token, so they are dequantized in the block; SVDq keys are
rebuilt from their latent codes with a matmul against the basis, as in the Triton kernel.
The whole-sequence reference it is tested against is kernels/reference.py.

Decode (at most MAX_COMPILED_ROWS query rows per KV head) over a packed history or fp32 rows goes
through kernels/packed_history.c instead, compiled on first use with the system's C compiler
(`cc`, cached under ~/.cache/kvq): element-wise torch cannot unpack codes at memory speed, and
BLAS runs the thin q @ K^T well below it. Without a compiler, or for what the C does not cover
(several channel groups, pre-RoPE or latent keys, 3-bit values, prefill chunks), the torch block
step above runs.
"""
import ctypes
import functools
import math
import weakref

import torch

from kernels import native
from kernels.decode_attention import Segment
from model import apply_rope, rope_cos_sin
from quant.packing import WIDTHS, unpack
from quant.uniform import rms_steps

WORK_BYTES = 16 << 20  # fp32 bytes of one block's scores and unpacked K/V: sizes the block


def block_tokens(batch: int, kv_heads: int, rows: int, head_dim: int) -> int:
    """Tokens per block for `rows` query rows per KV head (queries x query heads of the group):
    the block's scores [B, Hkv, rows, N] and unpacked keys and values [B, Hkv, N, D] fit in
    WORK_BYTES, in multiples of 128 tokens (an SVDq block of keys never straddles two)."""
    per_token = 4 * batch * kv_heads * (rows + 2 * (head_dim + 8))
    return max(128, WORK_BYTES // per_token // 128 * 128)


def working_bytes(batch: int, kv_heads: int, rows: int, head_dim: int) -> int:
    """Peak transient bytes of attend for `rows` query rows per KV head: a block's scores,
    probabilities and masks [B, Hkv, rows, N], and about seven fp32 [B, Hkv, rows, D + 8]: the
    queries (as given, scaled, smoothed), the running output and a block's weighted values
    (measured on a 4096-token prefill chunk over a packed history, glibc's mmap threshold fixed:
    engine/planner.py return_freed_memory)."""
    n = block_tokens(batch, kv_heads, rows, head_dim)
    return 4 * batch * kv_heads * rows * (3 * n + 7 * (head_dim + 8))


def attend(q: torch.Tensor, segments: list[Segment], q_position: torch.Tensor | None = None,
           inv_freq: torch.Tensor | None = None, return_lse: bool = False):
    """As kernels/decode_attention.py attend: q [B, Q, H, D], Q queries per sequence, the i-th
    at position q_position[b] + i, attend to every token of every segment (a causal segment: to
    its tokens at or before them). inv_freq [D/2]: keys are pre-RoPE. Returns [B, Q, H, D]; with
    return_lse also the log-sum-exp of each row's scaled scores [B, Q, H] fp32 (-inf: no token)."""
    B, Q, H, D = q.shape
    Hkv = segments[0].rows.shape[1]
    G = H // Hkv
    # Rows of one KV head's query matrix: query head g of the group, query i -> row g * Q + i.
    queries = (q.float() * D ** -0.5).transpose(1, 2).reshape(B, Hkv, G * Q, D)       # (B, Hkv, M, D)
    row_position = None
    state = _Softmax(B, Hkv, G * Q, D)
    n = block_tokens(B, Hkv, G * Q, D)
    for segment in segments:
        if inv_freq is None and _compiled(queries, segment, state, q_position, Q):
            continue
        if q_position is not None and row_position is None:  # for causal masks in torch
            row_position = (q_position[:, None] + torch.arange(Q).repeat(G)).view(B, 1, G * Q, 1)  # (B, 1, M, 1)
        counts = segment.count.tolist()
        # Per sequence, the segment's token index of the first query: causality masks only before it.
        first_query = (q_position - segment.first_position).tolist() if segment.causal else None
        keys, values = _Operand(segment.keys, queries), _Operand(segment.values, queries)
        for start in range(0, max(counts), n):
            slots = _slots(segment, start, min(n, max(counts) - start))
            scores = keys.scores(slots, segment, start, inv_freq)                     # (B, Hkv, M, N)
            visible = _visible(segment, counts, first_query, start, scores.shape[-1], row_position)
            if visible is not None:
                scores.masked_fill_(~visible, -math.inf)
            state.add(scores, functools.partial(values.weighted_sum, slots=slots))
    out = state.output().view(B, H, Q, D).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    return out, (state.m + state.l.log()).view(B, H, Q).transpose(1, 2)


class _Softmax:
    """The online softmax over blocks: running max m, mass l and output acc per query row."""

    def __init__(self, B, Hkv, M, D):
        self.m = torch.full((B, Hkv, M, 1), -math.inf)
        self.l = torch.zeros(B, Hkv, M, 1)
        self.acc = torch.zeros(B, Hkv, M, D)

    def add(self, scores, weighted_sum):
        """scores [B, Hkv, M, N] of a block (overwritten); weighted_sum(p [B, Hkv, M, N]) -> [B, Hkv, M, D]."""
        m = torch.maximum(self.m, scores.amax(-1, keepdim=True))
        m.masked_fill_(m == -math.inf, 0.0)  # a row that has seen nothing yet: exp(-inf - 0) = 0
        p = scores.sub_(m).exp_()
        rescale = (self.m - m).exp_()
        self.l.mul_(rescale).add_(p.sum(-1, keepdim=True))
        self.acc.mul_(rescale).add_(weighted_sum(p))
        self.m = m

    def output(self):
        return self.acc / self.l.clamp_min(torch.finfo(torch.float32).tiny)


def _slots(segment: Segment, start: int, n: int):
    """Rows of tokens start .. start + n - 1: a slice, or for a ring [B, n] slot indices."""
    if segment.first_slot is None:
        return slice(start, start + n)
    return (segment.first_slot[:, None] + torch.arange(start, start + n)) % segment.rows.shape[2]


def _rows(x: torch.Tensor, slots) -> torch.Tensor:
    """x [B, Hkv, T, ...] at the block's slots -> [B, Hkv, N, ...] (a view for a slice)."""
    if isinstance(slots, slice):
        return x[:, :, slots]
    index = slots[:, None].expand(x.shape[0], x.shape[1], -1)
    return x.gather(2, index.reshape(*index.shape, *[1] * (x.dim() - 3)).expand(*index.shape, *x.shape[3:]))


def _visible(segment, counts, first_query, start, n, row_position):
    """[B, 1, M or 1, n] which tokens of the block each query row sees, or None for all."""
    causal = segment.causal and min(first_query) < start + n - 1
    if not causal and min(counts) >= start + n:
        return None
    token = torch.arange(start, start + n)
    visible = (token < segment.count[:, None]).view(-1, 1, 1, n)                       # (B, 1, 1, n)
    if causal:
        position = (segment.first_position[:, None] + token).view(-1, 1, 1, n)
        visible = visible & (position <= row_position)
    return visible


def _lookup_table(bits) -> torch.Tensor:
    """[256, codes per byte] fp32: the codes a byte holds (quant/packing.py order)."""
    radix, per_word, _ = WIDTHS[bits]
    return (torch.arange(256)[:, None] // radix ** torch.arange(per_word) % radix).float()


_TABLES = {bits: _lookup_table(bits) for bits, (_, _, word_bytes) in WIDTHS.items() if word_bytes == 1}


class _Operand:
    """The keys or the values of a segment, as a block step reads them: a full-precision tensor,
    a TokenStore or a LatentStore (kernels/decode_attention.py Segment)."""

    def __init__(self, x, queries):
        self.x, self.D, self.raw_queries = x, queries.shape[-1], queries
        self.full = isinstance(x, torch.Tensor)
        self.latent = hasattr(x, "basis_t")
        if self.full or self.latent:
            return
        n_groups = x.scale.shape[-1]
        width = self.D if x.bits not in _TABLES else x.codes.shape[-1] * _TABLES[x.bits].shape[1]
        # Each channel's group as a one-hot [Hkv, groups, width]; unpacked padding channels in none.
        one_hot = torch.zeros(x.group_index.shape[0], n_groups, width)
        one_hot[:, :, :self.D] = torch.nn.functional.one_hot(x.group_index.long(), n_groups).transpose(1, 2).float()
        self.one_hot, self.n_groups, self.width = one_hot, n_groups, width

    @functools.cached_property
    def queries(self) -> torch.Tensor:
        """[B, Hkv, M, width]: the queries as the keys' dot products take them (smoothing and
        rotation folded in)."""
        if self.full or self.latent:
            return self.raw_queries
        return torch.nn.functional.pad(stored_queries(self.raw_queries, self.x), (0, self.width - self.D))

    @functools.cached_property
    def group_queries(self) -> torch.Tensor:
        """[B, Hkv, groups * M, width]: per group, the queries restricted to its channels."""
        if self.n_groups == 1:
            return self.queries * self.one_hot[None, :, 0, None]
        return (self.queries[:, :, None] * self.one_hot[None, :, :, None]).flatten(2, 3)

    @functools.cached_property
    def group_sums(self) -> torch.Tensor:
        """[B, Hkv, groups, M, 1]: their sums, what each group's `low` multiplies."""
        return self.group_queries.sum(-1).unflatten(2, (self.n_groups, -1))[..., None]

    def _codes(self, slots) -> torch.Tensor:
        """The block's codes unpacked, fp32 [B, Hkv, N, width]: one table lookup per byte."""
        codes = _rows(self.x.codes, slots)
        if self.x.bits in _TABLES:
            return _TABLES[self.x.bits][codes.long()].flatten(-2)
        return unpack(codes, self.x.bits, self.D).float()

    def _meta(self, slots):
        """scale, low [B, Hkv, groups, 1, N] fp32."""
        return [_rows(t, slots).float().transpose(-1, -2)[:, :, :, None] for t in (self.x.scale, self.x.low)]

    def keys(self, slots, segment, start, inv_freq) -> torch.Tensor:
        """The block's keys, fp32 [B, Hkv, N, width] (latent: rebuilt; tokens: dequantized without
        smoothing), rotated at their positions when inv_freq is given."""
        if self.full:
            k = _rows(self.x, slots).float()
        elif self.latent:
            k = self._latent_keys(slots)
        else:
            scale, low = self._meta(slots)
            per_channel = lambda t: (t[:, :, :, 0].transpose(-1, -2) @ self.one_hot)          # (B, Hkv, N, width)
            k = self._codes(slots) * per_channel(scale) + per_channel(low)
        if inv_freq is not None:
            assert getattr(self.x, "rotation", None) is None, "RoPE does not commute with the rotation"
            positions = segment.first_position[:, None] + torch.arange(start, start + k.shape[2])  # (B, N)
            rotated = apply_rope(k[..., :self.D], *rope_cos_sin(positions, inv_freq))
            k = rotated if k.shape[-1] == self.D else torch.cat([rotated, k[..., self.D:]], -1)
        return k

    def _latent_keys(self, slots) -> torch.Tensor:
        """SVDq: codes -> latent channels (scale, low per block of token_group tokens) -> keys."""
        x = self.x
        assert isinstance(slots, slice) and slots.start % x.token_group == 0, "latent keys are read in whole blocks"
        rows = _rows(x.codes, slots)                                                     # (B, Hkv, N, bytes)
        offset, width = x.bit_layout.long()
        shift, mask = (offset % 8).to(torch.uint8), ((1 << width) - 1).to(torch.uint8)
        codes = (rows[..., offset // 8] >> shift) & mask                                  # (B, Hkv, N, R) uint8
        B, Hkv, N, R = codes.shape
        first = slots.start // x.token_group
        scale, low = (t[:, :, first:first + N // x.token_group, None].float() for t in (x.scale, x.low))
        latent = codes.float().view(B, Hkv, -1, x.token_group, R) * scale + low          # (B, Hkv, blocks, G, R)
        latent = latent.view(B, Hkv, N, R)
        return latent @ x.basis_t.float() + x.mean.float()[:, :, None]

    def scores(self, slots, segment, start, inv_freq) -> torch.Tensor:
        """[B, Hkv, M, N]: the queries against the block's keys."""
        if self.full or self.latent or inv_freq is not None:
            return self.queries @ self.keys(slots, segment, start, inv_freq).transpose(-1, -2)
        scale, low = self._meta(slots)
        dots = (self.group_queries @ self._codes(slots).transpose(-1, -2)).unflatten(2, (self.n_groups, -1))
        return (dots * scale + self.group_sums * low).sum(2)                            # (B, Hkv, M, N)

    def weighted_sum(self, p, slots) -> torch.Tensor:
        """[B, Hkv, M, D]: the block's values weighted by p [B, Hkv, M, N]."""
        if self.full:
            return p @ _rows(self.x, slots).float()
        scale, _ = self._meta(slots)
        lows = (p @ _rows(self.x.low, slots).float()) @ self.one_hot                      # (B, Hkv, M, width)
        if self.n_groups == 1:  # in place: these are the largest temporaries of a prefill chunk
            out = (p * scale[:, :, 0]) @ self._codes(slots)                              # (B, Hkv, M, width)
        else:
            weighted = (p[:, :, None] * scale).flatten(2, 3) @ self._codes(slots)        # (B, Hkv, gM, width)
            out = (weighted.unflatten(2, (self.n_groups, -1)) * self.one_hot[None, :, :, None]).sum(2)
        return from_stored(out.add_(lows)[..., :self.D], self.x)


def stored_queries(queries: torch.Tensor, store) -> torch.Tensor:
    """queries [B, Hkv, M, D] as a TokenStore's codes take them: times its smoothing [Hkv, D],
    then its rotation R (q . k = (q s R) . (k / s R))."""
    queries = queries * store.smoothing[None, :, None]
    return queries if store.rotation is None else queries @ store.rotation


def from_stored(out: torch.Tensor, store) -> torch.Tensor:
    """out [B, Hkv, M, D], a weighted sum of a TokenStore's values as stored, in the model's
    channels: times R^T (undoing its rotation), then its smoothing [Hkv, D]."""
    if store.rotation is not None:
        out = out @ store.rotation.T
    return out.mul_(store.smoothing[None, :, None])  # in place: a prefill chunk's largest temporaries


# ---------------------------------------------------------------------------------------------
# The compiled decode over a packed history (kernels/packed_history.c).

MAX_COMPILED_ROWS = 16  # query rows per KV head the C kernel takes: its tables grow with them
_META_KINDS = {torch.float16: 0, torch.float8_e4m3fn: 1}


class _PackedOperand(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64),
                ("scale", ctypes.c_void_p), ("low", ctypes.c_void_p),
                ("mb", ctypes.c_int64), ("mh", ctypes.c_int64), ("mt", ctypes.c_int64),
                ("row_bytes", ctypes.c_int), ("radix", ctypes.c_int), ("per_byte", ctypes.c_int),
                ("meta_kind", ctypes.c_int)]

    @classmethod
    def of(cls, store):
        """The store's operand, made once per store: its buffers are allocated once, never moved."""
        if store not in _OPERANDS:
            radix, per_word, word_bytes = WIDTHS[store.bits]
            per_byte = per_word if word_bytes == 1 else 0  # 3 bits: codes straddle bytes
            _OPERANDS[store] = cls(store.codes.data_ptr(), *store.codes.stride()[:3], store.scale.data_ptr(),
                                   store.low.data_ptr(), *store.scale.stride()[:3], store.codes.shape[-1], radix,
                                   per_byte, _META_KINDS[store.scale.dtype])
        return _OPERANDS[store]


_OPERANDS = weakref.WeakKeyDictionary()  # store -> _PackedOperand (a decode step asks 2 per layer and segment)


class _Quantizer(ctypes.Structure):
    """kernels/packed_history.c's Quantizer: how write_token quantizes a store's tokens."""
    _fields_ = [("smoothing", ctypes.c_void_p), ("rotation", ctypes.c_void_p), ("rms_steps", ctypes.c_void_p),
                ("clip", ctypes.c_float), ("n_steps", ctypes.c_int)]

    @classmethod
    def of(cls, store):
        """The store's quantizer, made once per store (its steps kept alive beside it)."""
        if store not in _QUANTIZERS:
            rms = store.quantizer.scaling == "rms"
            steps = torch.tensor(rms_steps(store.bits) if rms else [], dtype=torch.float32)
            rotation = None if store.rotation is None else store.rotation.data_ptr()
            _QUANTIZERS[store] = cls(store.smoothing.data_ptr(), rotation, steps.data_ptr(), store.clip, len(steps)), steps
        return _QUANTIZERS[store][0]


_QUANTIZERS = weakref.WeakKeyDictionary()  # store -> (_Quantizer, its steps tensor)


@functools.cache
def compiled_kernel():
    """kernels/packed_history.c's attend_packed, attend_full and write_token (kernels/native.py:
    built once per source and machine, and checked before it is loaded); None where there is no C
    compiler, or the build or the load fails: the torch path then runs."""
    library = native.kernels()
    if library is None:
        return None
    packed, full, write = library.attend_packed, library.attend_full, library.write_token
    packed.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2 + [_PackedOperand] * 2 + [ctypes.c_void_p] * 6 \
        + [ctypes.c_int]
    full.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 \
        + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    write.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 \
        + [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] \
        + [_PackedOperand] * 2 + [_Quantizer] * 2
    packed.restype = full.restype = write.restype = None
    return packed, full, write


# Code widths the C kernels read and write. Values: whole codes in every byte (sum_values adds a
# byte's codes as one vector). Keys also 3 bits, whose codes straddle bytes: a score is linear in
# the codes, so each byte's table entry is its bits' share of it.
_C_VALUE_BITS = set(_TABLES)
_C_KEY_BITS = _C_VALUE_BITS | {3}


def _compiles(x, bits: set) -> bool:
    """Whether the C kernels read this store or tensor: a TokenStore of codes of a width in
    `bits` (_C_KEY_BITS or _C_VALUE_BITS), one group per head; fp32 rows of a multiple of 8
    channels."""
    if isinstance(x, torch.Tensor):
        return x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[-1] % 8 == 0
    return (not hasattr(x, "basis_t") and x.bits in bits and x.scale.shape[-1] == 1
            and x.scale.dtype in _META_KINDS)


def _compiled(queries, segment, state, q_position, Q) -> bool:
    """The segment through a C kernel, folded into state in place, where one applies (a packed history or
    fp32 rows; post-RoPE keys; few query rows; a causal segment only where every query sees every
    token, as in decode); False otherwise."""
    B, Hkv, M, D = queries.shape
    keys, values = segment.keys, segment.values
    full = isinstance(keys, torch.Tensor)
    if M > MAX_COMPILED_ROWS or full != isinstance(values, torch.Tensor):
        return False
    if not (_compiles(keys, _C_KEY_BITS) and _compiles(values, _C_VALUE_BITS)):
        return False
    if segment.causal and not (Q == 1 and bool((q_position - segment.first_position >= segment.count - 1).all())):
        return False
    if (segment.first_slot is not None and not full) or compiled_kernel() is None:
        return False
    m, l, acc = state.m, state.l, state.acc  # updated in place by the kernel
    assert m.is_contiguous() and l.is_contiguous() and acc.is_contiguous()
    count = segment.count.to(torch.int64).contiguous()
    packed, full_rows, _ = compiled_kernel()
    if full:
        assert keys.stride() == values.stride()
        first_slot = None if segment.first_slot is None else segment.first_slot.to(torch.int64).contiguous()
        full_rows(B, Hkv, M, D, queries.contiguous().data_ptr(), count.data_ptr(),
                  None if first_slot is None else first_slot.data_ptr(), keys.shape[2], keys.data_ptr(),
                  values.data_ptr(), *keys.stride()[:3], m.data_ptr(), l.data_ptr(), acc.data_ptr(),
                  torch.get_num_threads())
    else:
        scaled = (queries * keys.smoothing[None, :, None]).contiguous()  # the C rotates q, and undoes V's R
        rotation = lambda store: None if store.rotation is None else store.rotation.data_ptr()
        packed(B, Hkv, M, D, scaled.data_ptr(), count.data_ptr(), _PackedOperand.of(keys), _PackedOperand.of(values),
               rotation(keys), values.smoothing.data_ptr(), rotation(values), m.data_ptr(), l.data_ptr(),
               acc.data_ptr(), torch.get_num_threads())
    return True


def write_token(k, v, position, sinks, window, evict_row, first_row: int, keys, values) -> bool:
    """A decode step's write of one layer through kernels/packed_history.c write_token (the CPU's
    kernels/quantize.py write_decode_token, bit for bit the torch quantizer's codes and metadata):
    k, v [B, Hkv, D] fp32, the new tokens at position [B], into sinks (sink_k, sink_v) [B, Hkv, S,
    D] or the ring window [B, Hkv, ring, D], after the token at history row evict_row[b] >= 0
    is quantized from its ring slot into the stores keys and values (rows from first_row). False,
    having written nothing, where the C does not apply (no compiler, stores it does not read)."""
    sink_k, sink_v = sinks
    window_k, window_v = window
    tensors = [k, v, sink_k, sink_v, window_k, window_v]
    if not (all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors) and k.stride() == v.stride()
            and sink_k.stride() == sink_v.stride() and window_k.stride() == window_v.stride()
            and _compiles(keys, _C_KEY_BITS) and _compiles(values, _C_VALUE_BITS)
            and compiled_kernel() is not None):
        return False
    B, Hkv, D = k.shape
    strides = torch.tensor([sink_k.stride()[:3], window_k.stride()[:3]])
    position, evict_row = position.to(torch.int64).contiguous(), evict_row.to(torch.int64).contiguous()
    compiled_kernel()[2](B, Hkv, D, k.data_ptr(), v.data_ptr(), *k.stride()[:2], position.data_ptr(),
                         sink_k.data_ptr(), sink_v.data_ptr(), sink_k.shape[2], strides[0].data_ptr(),
                         window_k.data_ptr(), window_v.data_ptr(), window_k.shape[2], strides[1].data_ptr(),
                         evict_row.data_ptr(), first_row, _PackedOperand.of(keys), _PackedOperand.of(values),
                         _Quantizer.of(keys), _Quantizer.of(values))
    return True
