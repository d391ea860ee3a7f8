"""KV caches. A cache owns its storage *and* the attention over it, so model.py is the same for
every cache: `cache.attend(layer, q, k, v, positions)` stores the new tokens' K/V and returns the
attention output for the new queries.

Protocol for callers (engine/runner.py): before a forward of T tokens per sequence, of which the
first n_new[b] are real (prompts in a batch are right-padded), `positions = cache.reserve(n_new, T)`
gives the tokens' positions [B, T] and counts the real ones in `cache.lengths`.

`make_cache(spec, ...)` builds the cache a quant/kvspec.py KvSpec names. On CUDA the caches attend
through kernels/decode_attention.py; elsewhere through kernels/streaming.py in plain torch, over
the same segments. `reference=True` keeps the whole-sequence kernels/reference.py path (history
dequantized whole, then one attention), what the tests and bench/decode.py compare against.

Under context parallelism (`parallel`, engine/parallel.py) a cache holds this rank's range of
tokens: the fp16 cache a range of positions, the quantized cache a range of history rows (its
sinks and window whole, attended by one rank); attention over its own segments is merged with
the other ranks' by log-sum-exp. Under tensor parallelism `cfg` is already the rank's (its KV
heads), and the calibration is cut to them here.
"""
import torch

from cli import UserError
from engine.parallel import Parallel
from engine.stores import make_store
import model
from kernels import decode_attention, rows, streaming
from kernels.decode_attention import Segment
from kernels.quantize import write_decode_token
from kernels.reference import attention
from model import LlamaConfig, apply_rope, rope_cos_sin, rope_inv_freq
from quant.calibrate import quantizers_for

# The model's decode-step products and norms of a few rows through kernels/rows.py's C on the CPU.
model.few_rows = rows


class Cache:
    """What every cache shares: per-sequence lengths and the reserve step of the protocol.
    `use_kernels`: attend through the Triton kernels (the default on CUDA) rather than plain torch;
    `reference`: in plain torch, through the whole-sequence reference rather than streaming;
    `parallel`: the rank's place in a context-parallel group (its share of the tokens)."""

    keys_pre_rope = False

    def __init__(self, batch_size: int, max_context: int, device, use_kernels: bool | None = None,
                 reference: bool = False, parallel: Parallel | None = None):
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens held per sequence
        self.n_new = torch.zeros_like(self.lengths)  # real tokens per sequence in the current forward
        self.max_context = max_context
        # At least the tokens of the longest sequence, counted on the host: checking the capacity
        # against it costs no device sync (lengths may live on the GPU, and a decode step has none).
        self.reserved = 0
        self.use_kernels = torch.device(device).type == "cuda" if use_kernels is None else use_kernels
        self.reference = reference and not self.use_kernels
        self.parallel = parallel or Parallel()
        assert not (self.reference and self.parallel.cp > 1), "the whole-sequence reference reads one rank's tokens"

    def _attend(self, q, segments, q_position=None, inv_freq=None):
        """q [B, H, T, D] over segments: the Triton kernels or their streaming torch twin; under
        context parallelism, merged with the other ranks' segments."""
        attend = decode_attention.attend if self.use_kernels else streaming.attend
        q = q.transpose(1, 2)                                                        # (B, T, H, D)
        if self.parallel.cp == 1:
            return attend(q, segments, q_position, inv_freq).transpose(1, 2)
        if segments:
            out, lse = attend(q, segments, q_position, inv_freq, return_lse=True)
        else:  # this rank holds no history (yet): it adds nothing to the merge
            out, lse = torch.zeros_like(q), torch.full(q.shape[:3], -torch.inf, device=q.device)
        return self.parallel.merge_attention(out, lse).transpose(1, 2)

    def reserve(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        """Announces a forward of T tokens per sequence, the first n_new [B] of them real.
        Returns their positions [B, T]. UserError where they might not fit: a sequence's padding
        tokens are written too, so every sequence needs room for T more."""
        self.claim(T)
        return self.advance(n_new, T)

    def claim(self, T: int):
        """reserve's check, on the host: a captured decode step (engine/runner.py) runs it before
        every replay of the graph, which holds `advance`."""
        if self.reserved + T > self.max_context:
            raise UserError(f"the cache holds {self.max_context} tokens per sequence (max_context); "
                            f"{self.reserved} are reserved and this forward adds {T}")
        self.reserved += T

    def advance(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        """reserve's work on the device, without a host sync: positions [B, T], lengths counted."""
        positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        self.n_new = n_new
        self.lengths += n_new  # in place: a captured CUDA graph keeps reading the same tensor
        return positions

    @property
    def capturable(self) -> bool:
        """Whether a decode step runs without a host sync, at static shapes and launch arguments,
        so that a CUDA graph can replay it (engine/runner.py Decoder): through the kernels, in one
        process (a step's collectives under --tp/--cp stay eager: never run under capture here)."""
        return self.use_kernels and self.parallel.world == 1

    def bytes_per_token(self) -> float:
        """Allocated bytes per token of capacity, all layers, K and V."""
        return self.nbytes() / (self.lengths.numel() * self.max_context)


class KVCache(Cache):
    """The unquantized cache (`--kv fp16`): K/V of every position, stored in the model's dtype
    (fp16 or bf16 on a GPU; fp32 when the model runs in fp32), preallocated to max_context.
    Under context parallelism, positions first ... first + slots - 1 only."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 use_kernels: bool | None = None, reference: bool = False, parallel: Parallel | None = None):
        super().__init__(batch_size, max_context, device, use_kernels, reference, parallel)
        self.first, slots = self.parallel.token_range(max_context)
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, slots, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, slots, D): position first + i at i
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, slots, D)
        self.first_position = torch.full_like(self.lengths, self.first)  # of every sequence's first token here

    def advance(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        positions = super().advance(n_new, T)
        self.count = (self.lengths - self.first).clamp(0, self.k.shape[3])  # tokens held here, once per forward
        return positions

    def attend(self, layer: int, q, k, v, positions):
        """q [B, H, T, D]; k, v [B, Hkv, T, D] of the new tokens at `positions` [B, T], stored in
        the cache's dtype (which may be wider than the model's: generate.py on the CPU)."""
        k, v = k.to(self.k.dtype), v.to(self.k.dtype)
        B, Hkv, T, D = k.shape
        slots = self.k.shape[3]
        if T == 1 and self.use_kernels and self.parallel.cp == 1:  # a ring of max_context slots, no sinks: slot = position
            write_decode_token(k[:, :, 0], v[:, :, 0], positions[:, 0], None, (self.k[layer], self.v[layer]))
        else:  # padding tokens are written too, past each sequence's end: masked now, overwritten later
            # Under context parallelism, positions outside this rank's range write back what their
            # slot holds; up to `slots` consecutive positions at a time, their slots are distinct.
            for start in range(0, T, slots):
                p = positions[:, start:start + slots]                                      # (B, n)
                index = ((p - self.first) % slots)[:, None, :, None].expand(B, Hkv, -1, D)
                mine = ((p >= self.first) & (p < self.first + slots))[:, None, :, None] if self.parallel.cp > 1 else None
                for held, new in [(self.k[layer], k), (self.v[layer], v)]:
                    new = new[:, :, start:start + slots]
                    held.scatter_(2, index, new if mine is None else torch.where(mine, new, held.gather(2, index)))
        if not self.reference:  # causal over the held tokens; the queries are at positions[:, 0] on
            segment = Segment(self.k[layer], self.v[layer], self.count, None, self.first_position, causal=True)
            return self._attend(q, [segment], positions[:, 0])
        # Attend over the stored prefix only, never over the whole preallocated capacity.
        S = int(positions.max()) + 1
        return attention(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], positions)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bits_per_element(self) -> float:
        return 8 * self.k.element_size()


class QuantizedCache(Cache):
    """The sliding-window quantized cache, per layer and sequence:

        [ sinks: first S tokens, exact | history: key store + value store | window: recent tokens, exact ]

    `spec` (quant/kvspec.py) names it; its schedule says which positions are where, and the
    quantizers (one per layer, quant/calibrate.py quantizers_for) what the stores write. A token
    is quantized once, when it leaves the window: each decode step writes the new token into the
    ring slot of the oldest recent one and, when a whole block of `schedule.block` tokens has left
    the window, moves that block into the stores first (SKVQ: a block is one token; SVDq keys:
    token_group).
    Everything is preallocated to max_context: no torch.cat, no reallocation during decode.
    With `use_kernels`, attention is kernels/decode_attention.py over three segments (sinks,
    window, history, read by one launch; a prefill chunk adds itself, causally) and a decode
    step writes and evicts through one kernels/quantize.py launch, with no host sync (a CUDA
    graph replays it: engine/runner.py Decoder); otherwise kernels/streaming.py reads the
    same segments block by block in plain torch (or, with `reference`, the history is dequantized
    whole for kernels/reference.py).
    """

    def __init__(self, spec, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype,
                 key_quantizers: list, value_quantizers: list, use_kernels: bool | None = None,
                 reference: bool = False, parallel: Parallel | None = None):
        super().__init__(batch_size, max_context, device, use_kernels, reference, parallel)
        assert spec.key_schedule == spec.value_schedule, f"{spec.method} is simulated only (quant/eval.py)"
        L, B, Hkv, D = cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim
        self.spec, self.schedule, self.keys_pre_rope = spec, spec.key_schedule, spec.keys_pre_rope
        # The history's capacity, in whole blocks; this rank's rows of it: history rows first_row ...
        # first_row + rows - 1, at rows 0 ... rows - 1 of its stores.
        self.first_row, self.rows = self.parallel.token_range(self.schedule.history_length(max_context),
                                                              self.schedule.block)
        self.key_stores = [make_store(quantizer, B, self.rows, device) for quantizer in key_quantizers]
        self.value_stores = [make_store(quantizer, B, self.rows, device) for quantizer in value_quantizers]
        self.inv_freq = rope_inv_freq(cfg).to(device)
        # A context shorter than sinks + ring needs no more slots than it has positions, and
        # evicts nothing (rows == 0), so a ring of fewer slots holds position p in slot p - S.
        S = min(self.schedule.sinks, max_context)
        ring = max(1, min(self.schedule.ring, max_context - S))
        self.sink_k = torch.zeros(L, B, Hkv, S, D, device=device, dtype=dtype)  # (layers, B, Hkv, sinks, D)
        self.sink_v = torch.zeros_like(self.sink_k)
        # Ring: the token at position p >= S lives in slot (p - S) % ring while it is recent.
        self.window_k = torch.zeros(L, B, Hkv, ring, D, device=device, dtype=dtype)  # (layers, B, Hkv, ring, D)
        self.window_v = torch.zeros_like(self.window_k)
        # The sinks' and the history's first positions [B]: the same at every step.
        self.first_positions = torch.tensor([0, self.schedule.sinks + self.first_row], device=device)[:, None].repeat(1, B)

    def attend(self, layer: int, q, k, v, positions):
        k, v = k.to(self.window_k.dtype), v.to(self.window_k.dtype)  # as KVCache.attend
        inv_freq = self.inv_freq if self.keys_pre_rope else None
        if k.shape[2] > 1:  # a prompt, or the next chunk of one: it attends to the cache so far and to itself exactly
            old = self.lengths - self.n_new
            if self.reference:
                out = attention(q, *self._with_chunk(layer, k, v, positions), positions)
            else:
                chunk = [Segment(k, v, self.n_new, None, old, causal=True)] if self.parallel.attends_recent else []
                out = self._attend(q, self._segments(layer, self.held_spans) + chunk, old, inv_freq)
            self._store_chunk(layer, k, v)
            return out
        self._append(layer, k[:, :, 0], v[:, :, 0], positions[:, 0])
        if not self.reference:
            return self._attend(q, self._segments(layer, self.spans), None, inv_freq)
        keys, values = self._materialize(layer, positions[:, 0] + 1)
        return attention(q, keys, values, positions)

    def advance(self, n_new: torch.Tensor, T: int) -> torch.Tensor:
        positions = super().advance(n_new, T)
        # The same for every layer, so computed once per forward: what the cache holds after these
        # tokens (decode reads it), and before them (a prefill chunk reads that, then itself).
        h = self.schedule.history_length
        held = self.lengths - n_new
        n_hist, held_hist = h(self.lengths), h(held)
        self.spans = self._spans(self.lengths, n_hist)
        self.held_spans = self._spans(held, held_hist) if T > 1 else None
        if T == 1:  # the block a decode step moves to history: its first row, -1 for none or
            # (context parallel) for a row another rank holds
            row = torch.where(n_hist > held_hist, held_hist, -1)                                  # (B,)
            mine = (row >= self.first_row) & (row < self.first_row + self.rows)
            self.evict_row = torch.where(mine, row, -1)
            if not self.use_kernels:  # as entries (b, ring slot, row of this rank's stores) of each of its tokens
                # A block longer than the ring as allocated (a context too short to fill one, such as
                # SVDq's token-group 10^12) never leaves it: its entries are all -1, as many as ring slots.
                G = min(self.schedule.block, self.window_k.shape[3])
                rows = torch.where(self.evict_row[:, None] >= 0, self.evict_row[:, None] + torch.arange(
                    G, device=held.device), -1)                                                 # (B, G)
                batch = torch.arange(len(held), device=held.device).repeat_interleave(G)
                # Slots modulo the ring as allocated: the same ring, or for a short context a smaller
                # one that evicts nothing, whose entries (rows -1) must still point inside it.
                stored = torch.where(rows >= 0, rows - self.first_row, -1)
                self.evicted = batch, (rows % self.window_k.shape[3]).flatten(), stored.flatten()
        return positions

    def _spans(self, n, n_hist):
        """For sequences of n [B] tokens, n_hist [B] of them in history, per segment: how many
        tokens each holds, where its ring starts and the position of its first token (the history:
        this rank's rows of it)."""
        S = self.schedule.sinks
        first_recent = (S + n_hist).clamp_max(n)  # first position in the window
        return dict(window=(n - first_recent, n_hist % self.schedule.ring, first_recent),
                    sinks=(n.clamp_max(S), None, self.first_positions[0]),
                    history=((n_hist - self.first_row).clamp(0, self.rows), None, self.first_positions[1]))

    def _segments(self, layer, spans) -> list[Segment]:
        """The layer's window, sinks and history as the attention kernel reads them (under
        context parallelism: this rank's history rows, and the window and sinks on one rank)."""
        segments = []
        if self.parallel.attends_recent:
            segments.append(Segment(self.window_k[layer], self.window_v[layer], *spans["window"]))
        if self.schedule.sinks and self.parallel.attends_recent:
            segments.append(Segment(self.sink_k[layer], self.sink_v[layer], *spans["sinks"]))
        if self.rows:
            segments.append(Segment(self.key_stores[layer], self.value_stores[layer], *spans["history"]))
        return segments

    def _append(self, layer, k, v, p):
        """k, v [B, Hkv, D]: one new token per sequence at positions p [B]. Static shapes, no host
        sync; through the kernels one launch (kernels/quantize.py write_decode_token)."""
        S, keys, values = self.sink_k.shape[3], self.key_stores[layer], self.value_stores[layer]
        window = self.window_k[layer], self.window_v[layer]
        if self.use_kernels:
            sinks = (self.sink_k[layer], self.sink_v[layer]) if S else None
            write_decode_token(k, v, p, sinks, window, self.evict_row, keys, values, self.schedule.block,
                               self.first_row)
            return
        if streaming.write_token(k, v, p, (self.sink_k[layer], self.sink_v[layer]), window, self.evict_row,
                                 self.first_row, keys, values):
            return
        # The block that leaves the window goes first: its first token sits in the slot p takes.
        self._write_history(layer, *window, *self.evicted)
        b = torch.arange(k.shape[0], device=k.device)
        if S:
            sink = p.clamp_max(S - 1)
            for store, x in [(self.sink_k, k), (self.sink_v, v)]:
                store[layer, b, :, sink] = torch.where((p < S)[:, None, None], x, store[layer, b, :, sink])
        slot = (p - S).clamp_min(0) % self.window_k.shape[3]
        for store, x in [(self.window_k, k), (self.window_v, v)]:
            store[layer, b, :, slot] = torch.where((p >= S)[:, None, None], x, store[layer, b, :, slot])

    def _store_chunk(self, layer, k, v):
        """k, v [B, Hkv, T, D]: the next tokens of each sequence, right-padded: sequence b's first
        n_new[b] are real and follow the n0 = lengths - n_new it holds. Positions that are now past
        the sinks and out of the window go to history, from the ring where they were recent, else
        straight from the chunk; the chunk's other tokens go to the sinks or the ring."""
        S, ring, h = self.schedule.sinks, self.schedule.ring, self.schedule.history_length
        moving_k = torch.cat([self.window_k[layer], k], 2)  # token i < ring: ring slot i; else chunk token i - ring
        moving_v = torch.cat([self.window_v[layer], v], 2)
        entries, recent = [], []  # (b, token in moving_*, row of this rank's stores); (b, chunk token, ring slot)
        mine_first, mine_end = S + self.first_row, S + self.first_row + self.rows  # positions this rank holds
        old = self.lengths - self.n_new
        spans = zip(old.tolist(), self.lengths.tolist(), (S + h(old)).tolist(), (S + h(self.lengths)).tolist())
        for b, (n0, n1, history_end0, history_end1) in enumerate(spans):
            if n0 < min(n1, S):
                self.sink_k[layer, b, :, n0:min(n1, S)] = k[b, :, :min(n1, S) - n0]
                self.sink_v[layer, b, :, n0:min(n1, S)] = v[b, :, :min(n1, S) - n0]
            if n0 == 0:  # a new prompt: what the stores may learn from it, before any of it is quantized
                self.key_stores[layer].observe_prompt(b, k[b, :, S:n1])
            for p in range(max(history_end0, mine_first), min(history_end1, mine_end)):
                entries.append((b, (p - S) % ring if p < n0 else ring + p - n0, p - mine_first))
            recent += [(b, p - n0, (p - S) % ring) for p in range(max(n0, history_end1), n1)]
        if entries:  # before the ring takes the chunk's tokens into the slots these leave
            batch, token, row = torch.tensor(entries, device=k.device).T
            self._write_history(layer, moving_k, moving_v, batch, token, row)
        if recent:
            batch, token, slot = torch.tensor(recent, device=k.device).T
            self.window_k[layer, batch, :, slot] = k[batch, :, token]
            self.window_v[layer, batch, :, slot] = v[batch, :, token]

    def _write_history(self, layer, k, v, batch, token, row):
        """Quantize k, v [B, Hkv, T, D] at (batch[i], token[i]) into row row[i] of this rank's
        stores of sequence batch[i], for every entry i with row[i] >= 0."""
        self.key_stores[layer].write(k, batch, token, row, self.use_kernels)
        self.value_stores[layer].write(v, batch, token, row, self.use_kernels)

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

    def _materialize(self, layer, n):
        """Full-precision K, V [B, Hkv, T, D] in position order, T = max(n); sequence b holds
        n[b] tokens (later positions are garbage, masked by attention's causality)."""
        S, ring = self.schedule.sinks, self.schedule.ring
        T = int(n.max())
        pos = torch.arange(T, device=n.device)
        n_hist = self.schedule.history_length(n)                                    # (B,)
        longest = int(n_hist.max())
        out = []
        for store, sink, window in [(self.key_stores[layer], self.sink_k, self.window_k),
                                    (self.value_stores[layer], self.sink_v, self.window_v)]:
            x = window[layer][:, :, (pos - S).clamp_min(0) % ring]                   # (B, Hkv, T, D) window candidates
            if longest:
                hist = store.read(longest).to(x.dtype)                               # (B, Hkv, longest, D)
                hist_at = hist[:, :, (pos - S).clamp(0, longest - 1)]                 # (B, Hkv, T, D)
                in_history = (pos >= S) & (pos < S + n_hist[:, None])                # (B, T)
                x = torch.where(in_history[:, None, :, None], hist_at, x)
            x[:, :, :min(S, T)] = sink[layer, :, :, :min(S, T)]
            out.append(x)
        keys, values = out
        if self.keys_pre_rope:
            keys = self._rope(keys, pos.expand(n.shape[0], T))
        return keys, values

    def _rope(self, k, positions):
        return apply_rope(k, *rope_cos_sin(positions, self.inv_freq))

    def bits_per_element(self) -> float:
        """Of the history, metadata included (sinks and window stay in the model's dtype)."""
        keys, values = self.key_stores[0], self.value_stores[0]
        return (keys.bits_per_element(self.max_context) + values.bits_per_element(self.max_context)) / 2

    def nbytes(self) -> int:
        buffers = [self.sink_k, self.sink_v, self.window_k, self.window_v]
        buffers += [t for store in self.key_stores + self.value_stores for t in store.buffers()]
        return sum(t.nbytes for t in buffers)


def make_cache(spec, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype, calibration=None,
               use_kernels: bool | None = None, reference: bool = False, parallel: Parallel | None = None) -> Cache:
    """The cache quant/kvspec.py `spec` names, for batch_size sequences of up to max_context
    tokens, its quantizers from `calibration` (quant/calibrate.py quantizers_for). `parallel`:
    this rank's share (cfg is then the rank's own, engine/parallel.py shard_config)."""
    parallel = parallel or Parallel()
    if not spec.quantized:
        return KVCache(cfg, batch_size, max_context, device, dtype, use_kernels, reference, parallel)
    if spec.key_schedule != spec.value_schedule:
        raise UserError(f"{spec} is simulated only (quant/methods.py simulated_cache); caches run fp16, skvq and svdq")
    try:
        spec.check(cfg.head_dim)
    except ValueError as e:
        raise UserError(f"{spec}: {e}")
    Hkv = cfg.num_key_value_heads
    if calibration is not None and parallel.tp > 1:  # the tables of this rank's KV heads
        calibration.check(cfg.num_hidden_layers, Hkv * parallel.tp, cfg.head_dim)
        calibration = calibration.heads(parallel.tp_rank * Hkv, Hkv)
    quantizers = quantizers_for(spec, cfg.num_hidden_layers, Hkv, cfg.head_dim, calibration)
    return QuantizedCache(spec, cfg, batch_size, max_context, device, dtype, *quantizers, use_kernels, reference,
                          parallel)
