"""Attention in plain torch: the reference every attention kernel here is tested against, and
what the caches run where the kernels do not (engine/cache.py on the CPU)."""
import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Causal attention over keys and values in position order.

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
