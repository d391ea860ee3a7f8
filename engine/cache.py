"""KV caches. A cache owns its storage *and* the attention over it, so model.py is the same for
every cache: `cache.attend(layer, q, k, v, positions)` stores the new tokens' K/V and returns the
attention output for the new queries.

Protocol for callers (engine/runner.py): before a forward of T tokens per sequence, of which the
first n_new[b] are real (prompts in a batch are right-padded), `positions = cache.reserve(n_new, T)`
gives the tokens' positions [B, T] and counts the real ones in `cache.lengths`.
"""
import math

import torch

from kernels.decode_attention import LatentKeys, Segment, Stored, attend, decode_attention
from kernels.quantize import quantize_tokens
from model import LlamaConfig, UserError, apply_rope, rope_cos_sin, rope_inv_freq
from quant import kivi
from quant.packing import pack, packed_size, unpack
from quant.skvq import TokenQuantizer, equal_groups
from quant.svdq import SCHEDULES, KeyCovariance, SvdqKeyQuantizer
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
    `use_kernels`: attend through the Triton kernels (the default on CUDA) rather than plain torch.
    `chunked_prefill`: a prompt may arrive in several forwards (engine/runner.py prefill)."""

    keys_pre_rope = False
    chunked_prefill = False

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

    chunked_prefill = True

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
        if self.use_kernels:  # causal over the held tokens; the queries are at positions[:, 0] on
            segment = Segment(Stored(self.k[layer]), Stored(self.v[layer]), self.lengths, None,
                              torch.zeros_like(self.lengths), causal=True)
            return attend(q.transpose(1, 2), [segment], positions[:, 0]).transpose(1, 2)
        # Attend over the stored prefix only, never over the whole preallocated capacity.
        S = int(positions.max()) + 1
        return attention(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], positions)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bits_per_element(self) -> float:
        return 8 * self.k.element_size()


def kernel_tables(quantizer, device):
    """What the kernels read of a TokenQuantizer: its group table [Hkv, D] int32 and smoothing
    factors [Hkv, D] fp32 (ones for none), on the device."""
    smoothing = quantizer.smoothing if quantizer.smoothing is not None else torch.ones(quantizer.n_heads,
                                                                                     quantizer.head_dim)
    return (quantizer.groups.group_index.to(device, torch.int32).contiguous(),
            smoothing.to(device, torch.float32).contiguous())


class QuantizedCache(Cache):
    """SKVQ's sliding-window cache (DESIGN section 4), per layer and sequence:

        [ sinks: first n_sink tokens, full precision | history: packed low-bit | window: last W, full precision ]

    A token is quantized exactly once, when it leaves the window: each decode step writes the new
    token into the ring slot of the token W positions older and moves that one into history.
    (Subclasses whose keys are quantized in blocks of `block` tokens move a whole block once its
    last token has left the window, so W to W + block - 1 recent tokens stay exact in a ring of
    W + block - 1 slots.) Everything is preallocated to max_context: no torch.cat, no
    reallocation during decode. Storage is head-major ([layers, B, Hkv, tokens, ...]) so that the
    decode kernel's program for one KV head reads one contiguous run per token; channel groups
    never span heads (quant/skvq.py). With `use_kernels`, attention is kernels/decode_attention.py
    over three segments (sinks, window, history; a prefill chunk adds itself, causally) and
    eviction kernels/quantize.py, a decode step with no host sync; otherwise the history is
    dequantized in plain torch for `attention`, the reference.
    """

    calibrated = False  # whether the quantizers came from a calibration file (make_cache sets it)
    group_size = None   # channels per group, as make_cache chose them
    block = 1           # tokens that enter the history together
    chunked_prefill = True

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 key_quantizers, value_quantizers, n_sink: int = 5, window: int = 128,
                 keys_pre_rope: bool = False, use_kernels: bool | None = None):
        super().__init__(batch_size, max_context, device, use_kernels)
        L, B, Hkv, D = cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim
        self.n_sink, self.window, self.ring = n_sink, window, window + self.block - 1
        self.keys_pre_rope = keys_pre_rope
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.key_quantizers, self.value_quantizers = key_quantizers, value_quantizers
        self.sink_k = torch.zeros(L, B, Hkv, n_sink, D, device=device, dtype=dtype)  # (layers, B, Hkv, n_sink, D)
        self.sink_v = torch.zeros_like(self.sink_k)
        # Ring: the token at position p >= n_sink lives in slot (p - n_sink) % ring while it is recent.
        self.window_k = torch.zeros(L, B, Hkv, self.ring, D, device=device, dtype=dtype)  # (layers, B, Hkv, ring, D)
        self.window_v = torch.zeros_like(self.window_k)
        # History row of position p is p - n_sink; rows fill in order as tokens leave the window.
        n_history = max(max_context - n_sink - window, 0) // self.block * self.block
        self.history_k = self._allocate_key_history(L, B, n_history, device)
        self.history_v = self._history(value_quantizers[0], L, B, n_history, device)
        self.value_tables = [kernel_tables(qz, device) for qz in value_quantizers]

    def _allocate_key_history(self, L, B, T, device):
        self.key_tables = [kernel_tables(qz, device) for qz in self.key_quantizers]
        return self._history(self.key_quantizers[0], L, B, T, device)

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
        inv_freq = self.inv_freq if self.keys_pre_rope else None
        if T > 1:  # a prompt, or the next chunk of one: it attends to the cache so far and to itself exactly
            old = self.lengths - self.n_new
            if self.use_kernels:
                chunk = Segment(Stored(k), Stored(v), self.n_new, None, old, causal=True)
                segments = self._segments(layer, self.held_spans) + [chunk]
                out = attend(q.transpose(1, 2), segments, old, inv_freq).transpose(1, 2)
            else:
                out = attention(q, *self._with_chunk(layer, k, v, positions), positions)
            self._store_chunk(layer, k, v)
            return out
        self._append(layer, k[:, :, 0], v[:, :, 0], positions[:, 0])
        if self.use_kernels:
            return decode_attention(q[:, :, 0], self._segments(layer, self.spans), inv_freq)[:, :, None]
        keys, values = self._materialize(layer, positions[:, 0] + 1)
        return attention(q, keys, values, positions)

    def _history_length(self, n: torch.Tensor) -> torch.Tensor:
        """Tokens in the history of sequences of n [B] tokens: whole blocks out of the window."""
        return (n - self.n_sink - self.window).clamp_min(0) // self.block * self.block

    def _with_chunk(self, layer, k, v, positions):
        """Full-precision K, V [B, Hkv, n0 + T, D] that a chunk's queries read: what the cache holds
        of the first n0 = lengths - n_new positions (history dequantized), then the chunk's own
        K/V at its positions (later positions of a shorter sequence are masked by causality)."""
        old = self.lengths - self.n_new
        if self.keys_pre_rope:
            k = self._rope(k, positions)
        if int(old.max()) == 0:  # a whole prompt: it sees only itself
            return k, v
        keys, values = self._materialize(layer, old)
        B, Hkv, T, D = k.shape
        index = positions[:, None, :, None].expand(B, Hkv, T, D)
        out = []
        for held, new in [(keys, k), (values, v)]:
            x = torch.cat([held, torch.zeros_like(new)], 2)
            out.append(x.scatter(2, index, new.to(x.dtype)))
        return out

    def _store_chunk(self, layer, k, v):
        """k, v [B, Hkv, T, D]: the next tokens of each sequence, right-padded: sequence b's first
        n_new[b] are real and follow the n0 = lengths - n_new it holds. Positions that are now past
        the sinks and out of the window go to history, from the ring where they were recent, else
        straight from the chunk; the chunk's other tokens go to the sinks or the ring."""
        S = self.n_sink
        moving_k = torch.cat([self.window_k[layer], k], 2)  # token i < ring: ring slot i; else chunk token i - ring
        moving_v = torch.cat([self.window_v[layer], v], 2)
        entries, recent = [], []  # (b, token in moving_*, history row); (b, chunk token, ring slot)
        old = self.lengths - self.n_new
        spans = zip(old.tolist(), self.lengths.tolist(), (S + self._history_length(old)).tolist(),
                    (S + self._history_length(self.lengths)).tolist())
        for b, (n0, n1, history_end0, history_end1) in enumerate(spans):
            if n0 < min(n1, S):
                self.sink_k[layer, b, :, n0:min(n1, S)] = k[b, :, :min(n1, S) - n0]
                self.sink_v[layer, b, :, n0:min(n1, S)] = v[b, :, :min(n1, S) - n0]
            for p in range(history_end0, history_end1):
                entries.append((b, (p - S) % self.ring if p < n0 else self.ring + p - n0, p - S))
            recent += [(b, p - n0, (p - S) % self.ring) for p in range(max(n0, history_end1), n1)]
        if entries:  # before the ring takes the chunk's tokens into the slots these leave
            batch, token, row = torch.tensor(entries, device=k.device).T
            self._write_history(layer, moving_k, moving_v, batch, token, row)
        if recent:
            batch, token, slot = torch.tensor(recent, device=k.device).T
            self.window_k[layer, batch, :, slot] = k[batch, :, token]
            self.window_v[layer, batch, :, slot] = v[batch, :, token]

    def _append(self, layer, k, v, p):
        """k, v [B, Hkv, D]: one new token per sequence at positions p [B]."""
        S, W, G = self.n_sink, self.window, self.block
        b = torch.arange(k.shape[0], device=k.device)
        slot = (p - S).clamp_min(0) % self.ring
        # With p, the block of positions p + 1 - W - G ... p - W has left the window when p + 1 - S - W
        # is a positive multiple of G; its first token sits in the slot p takes: move it first.
        done = p + 1 - S - W
        completes = (done > 0) & (done % G == 0)
        first = p + 1 - W - G                                                         # (B,)
        positions = first[:, None] + torch.arange(G, device=k.device)                 # (B, G)
        rows = torch.where(completes[:, None], positions - S, -1)
        self._write_history(layer, self.window_k[layer], self.window_v[layer], b.repeat_interleave(G),
                            ((positions - S) % self.ring).flatten(), rows.flatten())
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
        # The same for every layer, so computed once per forward: what the cache holds after these
        # tokens (decode reads it), and before them (a prefill chunk reads that, then itself).
        self.spans = self._spans(self.lengths)
        self.held_spans = self._spans(self.lengths - n_new) if T > 1 else None
        return positions

    def _spans(self, n):
        """For sequences of n [B] tokens, per segment: how many tokens each holds, where its ring
        starts and the position of its first token."""
        S = self.n_sink
        n_hist = self._history_length(n)
        first_recent = (S + n_hist).clamp_max(n)  # first position in the window
        return dict(window=(n - first_recent, n_hist % self.ring, first_recent),
                    sinks=(n.clamp_max(S), None, torch.zeros_like(n)),
                    history=(n_hist, None, torch.full_like(n, S)))

    def _segments(self, layer, spans) -> list[Segment]:
        """The layer's window, sinks and history as the attention kernel reads them."""
        segments = [Segment(Stored(self.window_k[layer]), Stored(self.window_v[layer]), *spans["window"])]
        if self.n_sink:
            segments.append(Segment(Stored(self.sink_k[layer]), Stored(self.sink_v[layer]), *spans["sinks"]))
        if self.history_v["codes"].shape[3]:
            values = self._packed(self.history_v, self.value_quantizers[layer], self.value_tables[layer], layer)
            segments.append(Segment(self._kernel_keys(layer), values, *spans["history"]))
        return segments

    def _kernel_keys(self, layer):
        return self._packed(self.history_k, self.key_quantizers[layer], self.key_tables[layer], layer)

    @staticmethod
    def _packed(history, quantizer, tables, layer) -> Stored:
        return Stored(history["codes"][layer], quantizer.bits, history["scale"][layer], history["low"][layer], *tables)

    def _materialize(self, layer, n):
        """Full-precision K, V [B, Hkv, T, D] in position order, T = max(n); sequence b holds
        n[b] tokens (later positions are garbage, masked by attention's causality)."""
        S = self.n_sink
        T = int(n.max())
        pos = torch.arange(T, device=n.device)
        n_hist = self._history_length(n)                                             # (B,)
        longest = int(n_hist.max())
        out = []
        for dequantize, sink, ring in [(self._dequantize_keys, self.sink_k, self.window_k),
                                       (self._dequantize_values, self.sink_v, self.window_v)]:
            x = ring[layer][:, :, (pos - S).clamp_min(0) % self.ring]                  # (B, Hkv, T, D) window candidates
            if longest:
                hist = dequantize(layer, longest).to(x.dtype)                          # (B, Hkv, longest, D)
                hist_at = hist[:, :, (pos - S).clamp(0, longest - 1)]                   # (B, Hkv, T, D)
                in_history = (pos >= S) & (pos < S + n_hist[:, None])                  # (B, T)
                x = torch.where(in_history[:, None, :, None], hist_at, x)
            x[:, :, :min(S, T)] = sink[layer, :, :, :min(S, T)]
            out.append(x)
        keys, values = out
        if self.keys_pre_rope:
            keys = self._rope(keys, pos.expand(n.shape[0], T))
        return keys, values

    def _dequantize_keys(self, layer, n_rows):
        return self._dequantize_rows(self.history_k, self.key_quantizers[layer], layer, n_rows)

    def _dequantize_values(self, layer, n_rows):
        return self._dequantize_rows(self.history_v, self.value_quantizers[layer], layer, n_rows)

    @staticmethod
    def _dequantize_rows(history, quantizer, layer, n_rows):
        """The first n_rows history rows of every sequence, dequantized: [B, Hkv, n_rows, D]."""
        rows = [history[key][layer, :, :, :n_rows].transpose(1, 2) for key in ("codes", "scale", "low")]
        return quantizer.dequantize(*rows).transpose(1, 2)

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


class SvdqCache(QuantizedCache):
    """SVDq keys with SKVQ values (`--kv svdq-k1.25v1.5`), the same layout as QuantizedCache:

        [ sinks, full precision | history: keys as SVDq latent codes, values packed per token | window ]

    Keys are kept pre-RoPE and quantized in blocks of the key quantizer's token_group tokens
    (quant/svdq.py): tokens enter the history a block at a time, values with them. The basis is
    the calibration's, one for all sequences, or (bases=None) each sequence's own, from the keys
    after the sinks of its prompt's first prefill chunk (streamed covariance). Blocks are quantized in plain
    torch on every device; the decode kernel reads the latent codes directly.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype, key_quantizer,
                 bases, value_quantizers, n_sink: int = 5, window: int = 128, use_kernels: bool | None = None):
        self.block, self.bases = key_quantizer.token_group, bases
        super().__init__(cfg, batch_size, max_context, device, dtype, [key_quantizer] * cfg.num_hidden_layers,
                         value_quantizers, n_sink, window, keys_pre_rope=True, use_kernels=use_kernels)

    def _allocate_key_history(self, L, B, T, device):
        """codes [layers, B, Hkv, T, row_bytes] uint8: each token's latent codes (quant/svdq.py);
        scale, low [layers, B, Hkv, T / token_group, R]: per latent channel and block;
        basis_t [layers, 1 or B, Hkv, R, D]: the basis, transposed; mean [layers, 1 or B, Hkv, D], both
        in the quantizer's basis_dtype."""
        quantizer = self.key_quantizers[0]
        Hkv, D, R = self.sink_k.shape[2], quantizer.head_dim, quantizer.rank
        meta = (L, B, Hkv, T // quantizer.token_group, R)
        history = dict(codes=torch.zeros(L, B, Hkv, T, quantizer.row_bytes, dtype=torch.uint8, device=device),
                       scale=torch.zeros(meta, dtype=quantizer.meta_dtype, device=device),
                       low=torch.zeros(meta, dtype=quantizer.meta_dtype, device=device))
        if self.bases is None:  # filled per sequence at prefill
            history["basis_t"] = torch.zeros(L, B, Hkv, R, D, device=device, dtype=quantizer.basis_dtype)
            history["mean"] = torch.zeros(L, B, Hkv, D, device=device, dtype=quantizer.basis_dtype)
        else:
            history["basis_t"] = torch.stack([basis[None, :, :, :R].transpose(-1, -2) for basis, _ in self.bases])
            history["mean"] = torch.stack([mean[None] for _, mean in self.bases])
            for key in ("basis_t", "mean"):
                history[key] = history[key].to(device, quantizer.basis_dtype)
        self.bit_layout = quantizer.bit_layout.to(device)
        return history

    def _store_chunk(self, layer, k, v):
        if self.bases is None:  # a prompt's basis: from its first chunk, before any of it is quantized
            for b, (n0, n) in enumerate(zip((self.lengths - self.n_new).tolist(), self.n_new.tolist())):
                if n0:
                    continue
                covariance = KeyCovariance()
                for start in range(self.n_sink, n, 1 << 16):  # chunks keep the [N, D, D] products small
                    covariance.add(k[b, :, start:min(n, start + (1 << 16))].transpose(0, 1))
                if covariance.count:
                    basis, mean = covariance.basis()
                    self.history_k["basis_t"][layer, b] = basis[:, :, :self.key_quantizers[0].rank].transpose(-1, -2)
                    self.history_k["mean"][layer, b] = mean
        super()._store_chunk(layer, k, v)

    def _basis(self, layer, b):
        """basis [Hkv, D, R] and mean [Hkv, D] of sequence b."""
        h = self.history_k
        i = b if h["basis_t"].shape[1] > 1 else 0
        return h["basis_t"][layer, i].transpose(-1, -2).float(), h["mean"][layer, i].float()

    def _write_history(self, layer, k, v, batch, token, row):
        """Values token by token; keys a block at a time: the entries of a sequence come as whole
        blocks of consecutive rows (QuantizedCache._store_chunk and _append write them so)."""
        quantizer, G, h = self.key_quantizers[0], self.block, self.history_k
        keep = row >= 0
        batch, token, row = batch[keep], token[keep], row[keep]
        for b in batch.unique().tolist():
            mine = batch == b
            rows = row[mine]
            first, n_blocks = int(rows[0]) // G, len(rows) // G
            blocks = k[b, :, token[mine]].transpose(0, 1).unflatten(0, (n_blocks, G))   # (blocks, G, Hkv, D)
            codes, scale, low = quantizer.quantize(blocks, *self._basis(layer, b))
            h["codes"][layer, b, :, first * G:(first + n_blocks) * G] = codes.flatten(0, 1).transpose(0, 1)
            h["scale"][layer, b, :, first:first + n_blocks] = scale.transpose(0, 1)
            h["low"][layer, b, :, first:first + n_blocks] = low.transpose(0, 1)
        values, tables = self.value_quantizers[layer], self.value_tables[layer]
        history = [self.history_v[key][layer] for key in ("codes", "scale", "low")]
        if self.use_kernels:
            quantize_tokens(v, batch, token, row, *history, *tables, values.bits, values.clip)
        else:
            at = batch, slice(None), row
            history[0][at], history[1][at], history[2][at] = values.quantize(v[batch, :, token])

    def _kernel_keys(self, layer):
        h = self.history_k
        return LatentKeys(h["codes"][layer], h["scale"][layer], h["low"][layer], h["basis_t"][layer],
                          h["mean"][layer], self.bit_layout, self.block)

    def _dequantize_keys(self, layer, n_rows):
        """[B, Hkv, n_rows, D] pre-RoPE keys rebuilt from the first n_rows (whole blocks) of each sequence."""
        h, G = self.history_k, self.block
        codes = h["codes"][layer, :, :, :n_rows].transpose(1, 2).unflatten(1, (n_rows // G, G))  # (B, blocks, G, Hkv, bytes)
        scale, low = (h[key][layer, :, :, :n_rows // G].transpose(1, 2) for key in ("scale", "low"))
        basis = h["basis_t"][layer].transpose(-1, -2).float()[:, None]                 # (1 or B, 1, Hkv, D, R)
        mean = h["mean"][layer].float()[:, None]
        keys = self.key_quantizers[0].dequantize(codes, scale, low, basis, mean)        # (B, blocks, G, Hkv, D)
        return keys.flatten(1, 2).transpose(1, 2)

    def bits_per_element(self) -> float:
        """Of the history, metadata included; a per-sequence basis spread over max_context tokens."""
        keys = self.key_quantizers[0].bits_per_element(context=self.max_context if self.bases is None else None)
        return (keys + self.value_quantizers[0].bits_per_element()) / 2


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
DEFAULT_TOKEN_GROUP = 128  # SVDq: tokens per (scale, low) of a latent channel, 0.125 bits of fp16 metadata
KV_BITS = {1, 2, 3, 4, 8}
VALUE_BITS = KV_BITS | {1.5}


def parse_kv(name: str):
    """'fp16' -> None; 'skvq-k2v1.5' -> ('skvq', 2, 1.5); 'svdq-k1.25v1.5' -> ('svdq', 1.25, 1.5)."""
    if name == "fp16":
        return None
    method, _, bits = name.partition("-")
    k_bits, _, v_bits = bits.removeprefix("k").partition("v")
    try:
        k_bits, v_bits = float(k_bits), float(v_bits)
    except ValueError:
        k_bits = v_bits = None
    key_widths = set(SCHEDULES) if method == "svdq" else KV_BITS
    if (method not in ("skvq", "kivi", "svdq") or k_bits not in key_widths or v_bits not in VALUE_BITS
            or not bits.startswith("k")):
        raise UserError(f"unknown --kv {name!r} (fp16, or skvq-kKvV / kivi-kKvV with K in 1,2,3,4,8 and V "
                        "in 1,1.5,2,3,4,8 bits, e.g. skvq-k2v1.5, or svdq-kKvV with K in 1.25,2: SVDq keys)")
    as_width = lambda b: int(b) if b == int(b) else b
    return method, as_width(k_bits), as_width(v_bits)


def make_cache(name: str, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
               n_sink: int = 5, window: int = 128, group_size: int | None = None, keys_pre_rope: bool = False,
               meta_dtype=META_DTYPES[DEFAULT_METADATA], calibration=None, grouping: str = DEFAULT_GROUPING,
               use_kernels: bool | None = None, svdq_basis: str = "calibration",
               token_group: int = DEFAULT_TOKEN_GROUP):
    """The cache `name` names (see parse_kv). A quantized cache takes its channel groups and clip
    factors from `calibration` (quant/calibrate.py) when it has them for group_size; otherwise
    its groups are equal runs of channels with no reordering or clipping (`cache.calibrated`).
    SVDq keys (blocks of token_group tokens) take their basis from the calibration, or with
    svdq_basis="prompt" (or no calibration) from each prompt's keys (`cache.bases is None`)."""
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
    if method == "svdq" and cfg.head_dim % 16:
        raise UserError(f"SVDq keys need head_dim divisible by 16, the model has {cfg.head_dim}")
    calibrated = calibration is not None and group_size in calibration.settings["group_sizes"]
    groups = equal_groups(cfg.num_key_value_heads, cfg.head_dim, group_size)
    if calibrated:
        values = calibration.quantizers(grouping, group_size, "v", v_bits, meta_dtype)
    else:
        values = [TokenQuantizer(v_bits, groups, meta_dtype=meta_dtype) for _ in range(cfg.num_hidden_layers)]
    if method == "svdq":
        bases = calibration.svdq_bases() if calibration is not None and svdq_basis == "calibration" else None
        key_quantizer = SvdqKeyQuantizer(SCHEDULES[k_bits], cfg.head_dim, token_group)
        cache = SvdqCache(cfg, batch_size, max_context, device, dtype, key_quantizer, bases, values, n_sink, window,
                          use_kernels)
    else:
        if calibrated:
            keys = calibration.quantizers(grouping, group_size, "k_pre" if keys_pre_rope else "k_post", k_bits,
                                          meta_dtype)
        else:
            keys = [TokenQuantizer(k_bits, groups, meta_dtype=meta_dtype) for _ in range(cfg.num_hidden_layers)]
        cache = QuantizedCache(cfg, batch_size, max_context, device, dtype, keys, values, n_sink, window,
                               keys_pre_rope, use_kernels)
    cache.calibrated, cache.group_size = calibrated, group_size
    return cache
