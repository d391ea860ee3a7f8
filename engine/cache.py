"""KV caches. A cache owns its storage *and* the attention over it, so model.py is the same for
every cache: `cache.attend(layer, q, k, v, positions)` stores the new tokens' K/V and returns the
attention output for the new queries.

Protocol for callers (engine/runner.py): before a forward of T tokens per sequence, of which the
first n_new[b] are real (prompts in a batch are right-padded), `positions = cache.reserve(n_new, T)`
gives the tokens' positions [B, T] and counts the real ones in `cache.lengths`.
"""
import math

import torch

from kernels.decode_attention import Segment, Stored, decode_attention
from kernels.quantize import quantize_tokens
from model import LlamaConfig, UserError, apply_rope, rope_cos_sin, rope_inv_freq
from quant import kivi
from quant.packing import pack, packed_size, unpack
from quant.skvq import TokenQuantizer, equal_groups
from quant.uniform import META_DTYPES, dequantize_groups, quantize_groups


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Causal attention in plain torch, the reference for every attention kernel.

    q [B, H, T, D]; k, v [B, Hkv, S, D] hold the keys of positions 0..S-1; q_positions [B, T].
    Query head h reads KV head h // (H / Hkv): grouped by a view, never by repeating K/V.
    Key j is visible to a query at position p when j <= p. Returns [B, H, T, D] in q's dtype.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, T, D)                                  # (B, Hkv, G, T, D)
    scores = qg @ k.float().unsqueeze(2).transpose(-1, -2) / math.sqrt(D)      # (B, Hkv, G, T, S)
    visible = torch.arange(S, device=q.device) <= q_positions[:, :, None]       # (B, T, S)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = scores.softmax(-1) @ v.float().unsqueeze(2)                           # (B, Hkv, G, T, D)
    return out.view(B, H, T, D).to(q.dtype)


class Cache:
    """What every cache shares: per-sequence lengths and the reserve step of the protocol.
    `use_kernels`: attend through the Triton kernels (the default on CUDA) rather than plain torch."""

    keys_pre_rope = False

    def __init__(self, batch_size: int, max_context: int, device, use_kernels: bool | None = None):
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens held per sequence
        self.n_new = torch.zeros_like(self.lengths)  # real tokens per sequence in the current forward
        self.max_context = max_context
        self.use_kernels = torch.device(device).type == "cuda" if use_kernels is None else use_kernels

    def reserve(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        """Announces a forward of T tokens per sequence, the first n_new [B] of them real.
        Returns their positions [B, T]."""
        positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        self.n_new = n_new
        self.lengths += n_new  # in place: a captured CUDA graph keeps reading the same tensor
        return positions

    def bytes_per_token(self) -> float:
        """Allocated bytes per token of capacity, all layers, K and V."""
        return self.nbytes() / (self.lengths.numel() * self.max_context)


class KVCache(Cache):
    """The unquantized cache (`--kv fp16`): K/V of every position, stored in the model's dtype
    (fp16 or bf16 on a GPU; fp32 when the model runs in fp32), preallocated to max_context."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 use_kernels: bool | None = None):
        super().__init__(batch_size, max_context, device, use_kernels)
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_context, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, max_context, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, max_context, D)

    def attend(self, layer: int, q, k, v, positions):
        """q [B, H, T, D]; k, v [B, Hkv, T, D] of the new tokens at `positions` [B, T]."""
        B, Hkv, T, D = k.shape
        # Padding tokens are written too, past each sequence's end: masked now, overwritten later.
        index = positions[:, None, :, None].expand(B, Hkv, T, D)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        if T == 1 and self.use_kernels:
            segment = Segment(Stored(self.k[layer]), Stored(self.v[layer]), self.lengths)
            return decode_attention(q[:, :, 0], [segment])[:, :, None]
        # Attend over the stored prefix only, never over the whole preallocated capacity.
        S = int(positions.max()) + 1
        return attention(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], positions)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bits_per_element(self) -> float:
        return 8 * self.k.element_size()


class QuantizedCache(Cache):
    """SKVQ's sliding-window cache (DESIGN section 4), per layer and sequence:

        [ sinks: first n_sink tokens, full precision | history: packed low-bit | window: last W, full precision ]

    A token is quantized exactly once, when it leaves the window: each decode step writes the new
    token into the ring slot of the token W positions older and moves that one into history.
    Everything is preallocated to max_context: no torch.cat, no reallocation during decode.
    Storage is head-major ([layers, B, Hkv, tokens, ...]) so that the decode kernel's program for
    one KV head reads one contiguous run per token; channel groups never span heads
    (quant/skvq.py). With `use_kernels`, decode attention is kernels/decode_attention.py over
    three segments (sinks, window, history) and eviction kernels/quantize.py, with no host sync;
    otherwise it dequantizes the history in plain torch and calls `attention`, the reference.
    """

    calibrated = False  # whether the quantizers came from a calibration file (make_cache sets it)
    group_size = None   # channels per group, as make_cache chose them

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 key_quantizers, value_quantizers, n_sink: int = 5, window: int = 128,
                 keys_pre_rope: bool = False, use_kernels: bool | None = None):
        super().__init__(batch_size, max_context, device, use_kernels)
        L, B, Hkv, D = cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim
        self.n_sink, self.window = n_sink, window
        self.keys_pre_rope = keys_pre_rope
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.key_quantizers, self.value_quantizers = key_quantizers, value_quantizers
        self.sink_k = torch.zeros(L, B, Hkv, n_sink, D, device=device, dtype=dtype)  # (layers, B, Hkv, n_sink, D)
        self.sink_v = torch.zeros_like(self.sink_k)
        # Ring: the token at position p >= n_sink lives in slot (p - n_sink) % window while it is recent.
        self.window_k = torch.zeros(L, B, Hkv, window, D, device=device, dtype=dtype)  # (layers, B, Hkv, W, D)
        self.window_v = torch.zeros_like(self.window_k)
        # History row of position p is p - n_sink; rows fill in order as tokens leave the window.
        n_history = max(max_context - n_sink - window, 0)
        self.history_k = self._history(key_quantizers[0], L, B, n_history, device)
        self.history_v = self._history(value_quantizers[0], L, B, n_history, device)
        # What the kernels read of each layer's quantizers: group tables and smoothing, on the device.
        as_tables = lambda qz: (qz.groups.group_index.to(device, torch.int32).contiguous(),
                                torch.ones(Hkv, D, device=device) if qz.smoothing is None
                                else qz.smoothing.to(device, torch.float32).contiguous())
        self.key_tables = [as_tables(qz) for qz in key_quantizers]
        self.value_tables = [as_tables(qz) for qz in value_quantizers]

    @staticmethod
    def _history(quantizer, L, B, T, device):
        """Packed history of one of K / V:
        codes [layers, B, Hkv, T, code_bytes] uint8: one token's D channels of one head, packed
            along the last axis as quant/packing.py lays out `quantizer.bits`-bit codes;
        scale, low [layers, B, Hkv, T, n_groups] in the quantizer's metadata dtype, one pair per
            channel group of the head (quant/skvq.py ChannelGroups)."""
        Hkv, n_groups = quantizer.n_heads, quantizer.groups.n_groups
        return dict(codes=torch.zeros(L, B, Hkv, T, quantizer.code_bytes, dtype=torch.uint8, device=device),
                    scale=torch.zeros(L, B, Hkv, T, n_groups, dtype=quantizer.meta_dtype, device=device),
                    low=torch.zeros(L, B, Hkv, T, n_groups, dtype=quantizer.meta_dtype, device=device))

    def attend(self, layer: int, q, k, v, positions):
        T = k.shape[2]
        if T > 1:
            assert bool((positions[:, 0] == 0).all()), "prefill into a non-empty cache is not supported"
            self._store_prompt(layer, k, v)
            # The prompt attends to itself in full precision, as an fp16 cache would.
            keys = self._rope(k, positions) if self.keys_pre_rope else k
            return attention(q, keys, v, positions)
        self._append(layer, k[:, :, 0], v[:, :, 0], positions[:, 0])
        if self.use_kernels:
            inv_freq = self.inv_freq if self.keys_pre_rope else None
            return decode_attention(q[:, :, 0], self._segments(layer), inv_freq)[:, :, None]
        keys, values = self._materialize(layer, positions[:, 0] + 1)
        return attention(q, keys, values, positions)

    def _store_prompt(self, layer, k, v):
        """k, v [B, Hkv, T, D]: right-padded prompts; sequence b's first n_new[b] tokens are real."""
        S, W = self.n_sink, self.window
        evicted = []  # (b, prompt token, history row) of every token that goes straight to history
        for b, n in enumerate(self.n_new.tolist()):
            self.sink_k[layer, b, :, :min(n, S)] = k[b, :, :min(n, S)]
            self.sink_v[layer, b, :, :min(n, S)] = v[b, :, :min(n, S)]
            first_recent = min(n, max(S, n - W))
            evicted += [(b, t, t - S) for t in range(S, first_recent)]
            slots = (torch.arange(first_recent, n, device=k.device) - S) % W
            self.window_k[layer, b, :, slots] = k[b, :, first_recent:n]
            self.window_v[layer, b, :, slots] = v[b, :, first_recent:n]
        if evicted:
            batch, token, row = torch.tensor(evicted, device=k.device).T
            self._write_history(layer, k, v, batch, token, row)

    def _append(self, layer, k, v, p):
        """k, v [B, Hkv, D]: one new token per sequence at positions p [B]."""
        S, W = self.n_sink, self.window
        b = torch.arange(k.shape[0], device=k.device)
        slot = (p - S).clamp_min(0) % W
        # The slot holds the token of position p - W, which now leaves the window: history row p - W - S.
        row = torch.where(p - S >= W, p - W - S, -1)
        self._write_history(layer, self.window_k[layer], self.window_v[layer], b, slot, row)
        # Then the new token takes its place, in the sinks or the window; static shapes, no host sync.
        if S:
            sink = p.clamp_max(S - 1)
            for store, x in [(self.sink_k, k), (self.sink_v, v)]:
                store[layer, b, :, sink] = torch.where((p < S)[:, None, None], x, store[layer, b, :, sink])
        for store, x in [(self.window_k, k), (self.window_v, v)]:
            store[layer, b, :, slot] = torch.where((p >= S)[:, None, None], x, store[layer, b, :, slot])

    def _write_history(self, layer, k, v, batch, token, row):
        """Quantize k, v [B, Hkv, T, D] at (batch[i], token[i]) into history row row[i] of sequence
        batch[i], for every entry i with row[i] >= 0."""
        for history, quantizers, tables, x in [(self.history_k, self.key_quantizers, self.key_tables, k),
                                               (self.history_v, self.value_quantizers, self.value_tables, v)]:
            quantizer = quantizers[layer]
            codes, scale, low = (history[key][layer] for key in ("codes", "scale", "low"))
            if self.use_kernels:
                quantize_tokens(x, batch, token, row, codes, scale, low, *tables[layer], quantizer.bits,
                                quantizer.clip)
            else:
                keep = row >= 0
                at = batch[keep], slice(None), row[keep]
                codes[at], scale[at], low[at] = quantizer.quantize(x[batch[keep], :, token[keep]])  # (n, Hkv, ...)

    def reserve(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        positions = super().reserve(n_new, T)
        # Per sequence, how many tokens each segment holds, where its ring starts and the position
        # of its first token: the same for every layer, so computed once per forward.
        S, W, n = self.n_sink, self.window, self.lengths
        first_recent = (n - W).clamp_min(S).clamp_max(n)  # first position in the window
        self.spans = dict(window=(n - first_recent, (first_recent - S) % W, first_recent),
                          sinks=(n.clamp_max(S), None, torch.zeros_like(n)),
                          history=((n - S - W).clamp_min(0), None, torch.full_like(n, S)))
        return positions

    def _segments(self, layer) -> list[Segment]:
        """The layer's window, sinks and history as the decode kernel reads them."""
        packed = lambda history, quantizer, tables: Stored(
            history["codes"][layer], quantizer.bits, history["scale"][layer], history["low"][layer], *tables)
        segments = [Segment(Stored(self.window_k[layer]), Stored(self.window_v[layer]), *self.spans["window"])]
        if self.n_sink:
            segments.append(Segment(Stored(self.sink_k[layer]), Stored(self.sink_v[layer]), *self.spans["sinks"]))
        if self.history_k["codes"].shape[3]:
            segments.append(Segment(packed(self.history_k, self.key_quantizers[layer], self.key_tables[layer]),
                                    packed(self.history_v, self.value_quantizers[layer], self.value_tables[layer]),
                                    *self.spans["history"]))
        return segments

    def _materialize(self, layer, n):
        """Full-precision K, V [B, Hkv, T, D] in position order, T = max(n); sequence b holds
        n[b] tokens (later positions are garbage, masked by attention's causality)."""
        S, W = self.n_sink, self.window
        T = int(n.max())
        pos = torch.arange(T, device=n.device)
        n_hist = int((n - S - W).clamp_min(0).max())
        out = []
        for history, quantizers, sink, ring in [(self.history_k, self.key_quantizers, self.sink_k, self.window_k),
                                               (self.history_v, self.value_quantizers, self.sink_v, self.window_v)]:
            x = ring[layer][:, :, (pos - S).clamp_min(0) % W]                      # (B, Hkv, T, D) window candidates
            if n_hist:
                rows = [history[key][layer, :, :, :n_hist].transpose(1, 2) for key in ("codes", "scale", "low")]
                hist = quantizers[layer].dequantize(*rows).transpose(1, 2).to(x.dtype)  # (B, Hkv, n_hist, D)
                hist_at = hist[:, :, (pos - S).clamp(0, n_hist - 1)]                 # (B, Hkv, T, D)
                in_history = (pos >= S) & (pos < (n - W)[:, None])                   # (B, T)
                x = torch.where(in_history[:, None, :, None], hist_at, x)
            x[:, :, :min(S, T)] = sink[layer, :, :, :min(S, T)]
            out.append(x)
        keys, values = out
        if self.keys_pre_rope:
            keys = self._rope(keys, pos.expand(n.shape[0], T))
        return keys, values

    def _rope(self, k, positions):
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return apply_rope(k, cos, sin)

    def bits_per_element(self) -> float:
        """Of the history, metadata included (sinks and window stay in the model's dtype)."""
        return (self.key_quantizers[0].bits_per_element() + self.value_quantizers[0].bits_per_element()) / 2

    def nbytes(self) -> int:
        buffers = [self.sink_k, self.sink_v, self.window_k, self.window_v,
                   *self.history_k.values(), *self.history_v.values()]
        return sum(t.nbytes for t in buffers)


class KiviCache(Cache):
    """KIVI, the baseline (`--kv kivi-kKvV`): keys quantized per channel over blocks of `block`
    tokens, post-RoPE; values per token over groups of channels; no sinks. A block is quantized
    once its last token leaves the W-token window, so W to W + block - 1 recent tokens stay in
    full precision, in a ring of W + block - 1 slots (position p in slot p % ring).
    Same arithmetic as quant/kivi.py's simulation, which the evaluation uses."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 k_bits, v_bits, window: int = 128, block: int = 32, group_size: int = 32):
        super().__init__(batch_size, max_context, device)
        L, B, C = cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads * cfg.head_dim
        self.n_kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.k_bits, self.v_bits, self.window, self.block, self.group_size = k_bits, v_bits, window, block, group_size
        self.ring = window + block - 1
        self.ring_k = torch.zeros(L, B, self.ring, C, device=device, dtype=dtype)  # (layers, B, ring, C)
        self.ring_v = torch.zeros_like(self.ring_k)
        n_blocks = max_context // block
        # Keys of block j, channel c: `block` codes packed along tokens, codes [layers, B, blocks, C,
        # packed_size(block, k_bits)]; one fp16 (scale, low) per channel per block [layers, B, blocks, C].
        self.key_codes = torch.zeros(L, B, n_blocks, C, packed_size(block, k_bits), dtype=torch.uint8, device=device)
        self.key_scale = torch.zeros(L, B, n_blocks, C, dtype=torch.float16, device=device)
        self.key_low = torch.zeros_like(self.key_scale)
        # Values per token: codes [layers, B, blocks * block, packed_size(C, v_bits)], channels packed;
        # one (scale, low) per group of group_size channels [layers, B, blocks * block, C / group_size].
        self.value_codes = torch.zeros(L, B, n_blocks * block, packed_size(C, v_bits), dtype=torch.uint8, device=device)
        self.value_scale = torch.zeros(L, B, n_blocks * block, C // group_size, dtype=torch.float16, device=device)
        self.value_low = torch.zeros_like(self.value_scale)
        self.value_groups = torch.arange(C) // group_size

    def attend(self, layer: int, q, k, v, positions):
        B, Hkv, T, D = k.shape
        k_tokens = k.transpose(1, 2).reshape(B, T, Hkv * D)  # (B, T, C)
        v_tokens = v.transpose(1, 2).reshape(B, T, Hkv * D)
        for b in range(B):
            for t in range(int(self.n_new[b])):  # a token at a time: blocks complete in order
                p = int(positions[b, t])
                # Position p leaves the window's block (p - W - block + 1 ...) behind: quantize it
                # before p takes the ring slot of its first token.
                if p - self.window + 1 > 0 and (p - self.window + 1) % self.block == 0:
                    self._quantize_block(layer, b, (p - self.window + 1) // self.block - 1)
                self.ring_k[layer, b, p % self.ring] = k_tokens[b, t]
                self.ring_v[layer, b, p % self.ring] = v_tokens[b, t]
        if T > 1:  # the prompt attends to itself in full precision
            return attention(q, k, v, positions)
        keys, values = self._materialize(layer, positions[:, 0] + 1)
        return attention(q, keys, values, positions)

    def _quantize_block(self, layer, b, j):
        slots = torch.arange(j * self.block, (j + 1) * self.block, device=self.ring_k.device) % self.ring
        keys = self.ring_k[layer, b, slots].T                                     # (C, block)
        codes, scale, low = quantize_groups(keys, self.k_bits, torch.zeros(self.block, dtype=torch.long), 1)
        self.key_codes[layer, b, j] = pack(codes, self.k_bits)
        self.key_scale[layer, b, j], self.key_low[layer, b, j] = scale[:, 0], low[:, 0]
        rows = slice(j * self.block, (j + 1) * self.block)
        codes, self.value_scale[layer, b, rows], self.value_low[layer, b, rows] = quantize_groups(
            self.ring_v[layer, b, slots], self.v_bits, self.value_groups, int(self.value_groups[-1]) + 1)
        self.value_codes[layer, b, rows] = pack(codes, self.v_bits)

    def _materialize(self, layer, n):
        """K, V [B, Hkv, T, D] in position order, T = max(n), history dequantized."""
        B, T = n.shape[0], int(n.max())
        pos = torch.arange(T, device=n.device)
        keys, values = self.ring_k[layer][:, pos % self.ring], self.ring_v[layer][:, pos % self.ring]  # (B, T, C)
        n_blocks = int(((n - self.window) // self.block).clamp_min(0).max())
        if n_blocks:
            one_group = torch.zeros(self.block, dtype=torch.long)
            codes = unpack(self.key_codes[layer, :, :n_blocks], self.k_bits, self.block)   # (B, blocks, C, block)
            k_hat = dequantize_groups(codes, self.key_scale[layer, :, :n_blocks, :, None],
                                      self.key_low[layer, :, :n_blocks, :, None], one_group)
            k_hat = k_hat.transpose(-1, -2).reshape(B, n_blocks * self.block, -1)
            rows = slice(0, n_blocks * self.block)
            codes = unpack(self.value_codes[layer, :, rows], self.v_bits, keys.shape[-1])
            v_hat = dequantize_groups(codes, self.value_scale[layer, :, rows], self.value_low[layer, :, rows],
                                      self.value_groups)
            quantized = (pos[:n_blocks * self.block] < ((n - self.window) // self.block * self.block)[:, None])[..., None]
            keys[:, rows] = torch.where(quantized, k_hat.to(keys.dtype), keys[:, rows])
            values[:, rows] = torch.where(quantized, v_hat.to(values.dtype), values[:, rows])
        as_heads = lambda x: x.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return as_heads(keys), as_heads(values)

    def bits_per_element(self) -> float:
        return kivi.bits_per_element(self.k_bits, self.v_bits, self.block, self.group_size)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in [self.ring_k, self.ring_v, self.key_codes, self.key_scale, self.key_low,
                                       self.value_codes, self.value_scale, self.value_low])


# The default cache, chosen from quant/RESULTS.md: 2-bit keys and ternary values, one group of
# 128 channels per head with static smoothing and fp8 metadata: 1.94 bits per element, the budget
# at which a 7B MHA model holds 1M tokens on 80 GB (DESIGN section 7), +0.13% perplexity on the
# shipped model, and of the one-group-per-head settings the one that copes with outlier channels
# (k-means groups of 64 do better still, at 2.06 bits).
DEFAULT_KV, DEFAULT_GROUP_SIZE, DEFAULT_GROUPING, DEFAULT_METADATA = "skvq-k2v1.5", 128, "smooth", "fp8"
KV_BITS = {1, 2, 3, 4, 8}
VALUE_BITS = KV_BITS | {1.5}


def parse_kv(name: str):
    """'fp16' -> None; 'skvq-k2v1.5' -> ('skvq', 2, 1.5)."""
    if name == "fp16":
        return None
    method, _, bits = name.partition("-")
    k_bits, _, v_bits = bits.removeprefix("k").partition("v")
    try:
        k_bits, v_bits = float(k_bits), float(v_bits)
    except ValueError:
        k_bits = v_bits = None
    if method not in ("skvq", "kivi") or k_bits not in KV_BITS or v_bits not in VALUE_BITS or not bits.startswith("k"):
        raise UserError(f"unknown --kv {name!r} (fp16, or skvq-kKvV / kivi-kKvV with K in 1,2,3,4,8 and V "
                        "in 1,1.5,2,3,4,8 bits, e.g. skvq-k2v1.5)")
    as_width = lambda b: int(b) if b == int(b) else b
    return method, as_width(k_bits), as_width(v_bits)


def make_cache(name: str, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
               n_sink: int = 5, window: int = 128, group_size: int | None = None, keys_pre_rope: bool = False,
               meta_dtype=META_DTYPES[DEFAULT_METADATA], calibration=None, grouping: str = DEFAULT_GROUPING,
               use_kernels: bool | None = None):
    """The cache `name` names (see parse_kv). A quantized cache takes its channel groups and clip
    factors from `calibration` (quant/calibrate.py) when it has them for group_size; otherwise
    its groups are equal runs of channels with no reordering or clipping (`cache.calibrated`)."""
    spec = parse_kv(name)
    if spec is None:
        return KVCache(cfg, batch_size, max_context, device, dtype, use_kernels)
    method, k_bits, v_bits = spec
    if method == "kivi":  # KIVI's own settings: block 32, group 32, no sinks
        return KiviCache(cfg, batch_size, max_context, device, dtype, k_bits, v_bits, window)
    if group_size is None:  # the default, or a whole head where heads are narrower
        group_size = DEFAULT_GROUP_SIZE if cfg.head_dim % DEFAULT_GROUP_SIZE == 0 else cfg.head_dim
    if group_size <= 0 or cfg.head_dim % group_size:
        raise UserError(f"--group-size {group_size} must divide head_dim {cfg.head_dim}")
    if n_sink < 0 or window <= 0:
        raise UserError(f"--sinks must be >= 0 and --window > 0 (got {n_sink}, {window})")
    calibrated = calibration is not None and group_size in calibration.settings["group_sizes"]
    if calibrated:
        key_kind = "k_pre" if keys_pre_rope else "k_post"
        keys = calibration.quantizers(grouping, group_size, key_kind, k_bits, meta_dtype)
        values = calibration.quantizers(grouping, group_size, "v", v_bits, meta_dtype)
    else:
        groups = equal_groups(cfg.num_key_value_heads, cfg.head_dim, group_size)
        keys = [TokenQuantizer(k_bits, groups, meta_dtype=meta_dtype) for _ in range(cfg.num_hidden_layers)]
        values = [TokenQuantizer(v_bits, groups, meta_dtype=meta_dtype) for _ in range(cfg.num_hidden_layers)]
    cache = QuantizedCache(cfg, batch_size, max_context, device, dtype, keys, values, n_sink, window, keys_pre_rope,
                           use_kernels)
    cache.calibrated, cache.group_size = calibrated, group_size
    return cache
