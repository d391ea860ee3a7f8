"""KV caches. A cache owns its storage *and* the attention over it, so model.py is the same for
every cache: `cache.attend(layer, q, k, v, positions)` stores the new tokens' K/V and returns the
attention output for the new queries.

Protocol for callers (engine/runner.py): `positions` [B, T] of a forward are
`cache.lengths[:, None] + arange(T)`; after the forward, `cache.advance(n_new)` records how many of
the T tokens of each sequence were real (prompts in a batch are right-padded).
"""
import math

import torch

from model import LlamaConfig, UserError


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


class KVCache:
    """The unquantized cache (`--kv fp16`): K/V of every position, stored in the model's dtype
    (fp16 or bf16 on a GPU; fp32 when the model runs in fp32), preallocated to max_context."""

    keys_pre_rope = False

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_context, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, max_context, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, Hkv, max_context, D)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens held per sequence
        self.max_context = max_context

    def attend(self, layer: int, q, k, v, positions):
        """q [B, H, T, D]; k, v [B, Hkv, T, D] of the new tokens at `positions` [B, T]."""
        B, Hkv, T, D = k.shape
        index = positions[:, None, :, None].expand(B, Hkv, T, D)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        # Attend over the stored prefix only, never over the whole preallocated capacity.
        S = int(positions.max()) + 1
        return attention(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], positions)

    def advance(self, n_new: torch.Tensor):
        self.lengths += n_new

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bytes_per_token(self) -> float:
        return self.nbytes() / (self.lengths.numel() * self.max_context)


CACHES = {"fp16": KVCache}


def make_cache(name: str, cfg: LlamaConfig, batch_size: int, max_context: int, device, dtype):
    if name not in CACHES:
        raise UserError(f"unknown --kv {name!r} (choose from: {', '.join(CACHES)})")
    return CACHES[name](cfg, batch_size, max_context, device, dtype)
