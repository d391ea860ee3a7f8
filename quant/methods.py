"""Each cache setting as a whole-sequence simulation, for evaluation.

Decoding token by token, the token at position p attends to:
    sinks (j < n_sink) and the window (p - window < j <= p) in full precision,
    everything between (the history) as it was quantized when it left the window.
A token is quantized once, by rules that look only at itself (SKVQ: per token) or at its own
block (KIVI: per channel over G-token blocks), so what p sees of j is a fixed function of (p, j)
and one causal forward with a per-(p, j) choice between x and x_hat scores every token exactly
as decoding would (tests/test_eval.py checks it against the real cache, step by step).
"""
import math

import torch

from model import apply_rope, rope_cos_sin
from quant.uniform import dequantize_groups, quantize_groups


class SimulatedCache:
    """A cache-protocol object for `model(tokens, positions, cache)` over whole sequences.

    fake_keys, fake_values: [B, Hkv, T, D] -> what the history holds of them.
    quantized_mask: T -> bool [T, T], True where query p sees key j from the history.
    """

    def __init__(self, fake_keys, fake_values, quantized_mask, keys_pre_rope, inv_freq):
        self.fake_keys, self.fake_values, self.quantized_mask = fake_keys, fake_values, quantized_mask
        self.keys_pre_rope, self.inv_freq = keys_pre_rope, inv_freq
        self.captured = None  # set to a list to record (q, k, v) per layer, keys post-RoPE

    def attend(self, layer, q, k, v, positions):
        k_hat, v_hat = self.fake_keys(layer, k), self.fake_values(layer, v)
        if self.keys_pre_rope:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            k, k_hat = apply_rope(k, cos, sin), apply_rope(k_hat, cos, sin)
        if self.captured is not None:
            self.captured.append((q, k, v))
        return mixed_attention(q, k, v, k_hat, v_hat, self.quantized_mask(q.shape[2]).to(q.device))


def mixed_attention(q, k, v, k_hat, v_hat, quantized):
    """Causal attention where query p reads key/value j from (k_hat, v_hat) where quantized[p, j].
    q [B, H, T, D]; k, v, k_hat, v_hat [B, Hkv, T, D]; quantized [T, T] bool. Returns [B, H, T, D]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, T, D)                                 # (B, Hkv, G, T, D)
    exact = qg @ k.float().unsqueeze(2).transpose(-1, -2)                      # (B, Hkv, G, T, T)
    approx = qg @ k_hat.float().unsqueeze(2).transpose(-1, -2)
    scores = torch.where(quantized, approx, exact) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (probs * ~quantized) @ v.float().unsqueeze(2) + (probs * quantized) @ v_hat.float().unsqueeze(2)
    return out.view(B, H, T, D).to(q.dtype)


def sliding_window_mask(n_sink: int, window: int):
    """SKVQ: query p sees key j quantized iff j is past the sinks and out of the window."""
    def mask(T):
        p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j >= n_sink) & (j <= p - window)
    return mask


def chunked_prefill_mask(n_sink: int, window: int, block: int, chunk: int):
    """A prompt prefilled in chunks of `chunk` tokens (engine/runner.py): query p sees key j from
    the history iff j was there when p's chunk began, at c = p // chunk * chunk: the history then
    held the whole blocks of `block` tokens past the sinks that had left the window."""
    def mask(T):
        p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        start = p // chunk * chunk
        history = (start - n_sink - window).clamp_min(0) // block * block
        return (j >= n_sink) & (j < n_sink + history)
    return mask


def skvq_cache(key_quantizers, value_quantizers, n_sink, window, keys_pre_rope, inv_freq, prefill_chunk=None):
    """prefill_chunk None: every token scored as decoding scores it; else as a prompt prefilled in
    chunks of that many tokens."""
    # x [B, Hkv, T, D]; the quantizers take tokens [..., Hkv, D].
    per_token = lambda quantizers: lambda layer, x: quantizers[layer].fake_quantize(x.transpose(1, 2)).transpose(1, 2)
    return SimulatedCache(per_token(key_quantizers), per_token(value_quantizers),
                          sliding_window_mask(n_sink, window) if prefill_chunk is None else
                          chunked_prefill_mask(n_sink, window, 1, prefill_chunk), keys_pre_rope, inv_freq)
