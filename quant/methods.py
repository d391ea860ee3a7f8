"""Each cache setting as a whole-sequence simulation, for evaluation.

Decoding token by token, the token at position p attends to the keys and values the cache holds
after p's own step: the sinks and the window exact, the history (quant/kvspec.py Schedule) as it
was quantized. A token is quantized once, by rules that look only at itself (per token) or at
its own block of tokens (SVDq and KIVI keys), so what p sees of j is a fixed function of (p, j),
and one causal forward with a per-(p, j) choice between x and x_hat scores every token exactly as
decoding would (tests/test_eval.py checks it against the real cache, step by step).
"""
import math

import torch

from model import apply_rope, rope_cos_sin
from quant.svdq import basis_from_keys


def quantized_mask(schedule, T: int, prefill_chunk: int | None = None) -> torch.Tensor:
    """bool [T, T]: True where query p reads key j from the history. Decoding, p's step holds
    p + 1 tokens; a prompt prefilled in chunks of `prefill_chunk` (engine/runner.py) reads the
    history as it stood when p's chunk began, holding c = p // prefill_chunk * prefill_chunk."""
    p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    held = p + 1 if prefill_chunk is None else p // prefill_chunk * prefill_chunk
    return (j >= schedule.sinks) & (j < schedule.sinks + schedule.history_length(held))


class SimulatedCache:
    """A cache-protocol object for `model(tokens, positions, cache)` over whole sequences.

    fake_keys, fake_values: (layer, x [B, Hkv, T, D]) -> what the history holds of x.
    key_schedule, value_schedule: which positions each reads from the history (they differ only
    for KIVI). prefill_chunk: None scores every token as decoding would; else as a prompt
    prefilled in chunks of that many tokens.
    """

    def __init__(self, fake_keys, fake_values, key_schedule, value_schedule, keys_pre_rope: bool, inv_freq,
                 prefill_chunk: int | None = None):
        self.fake_keys, self.fake_values = fake_keys, fake_values
        self.key_schedule, self.value_schedule = key_schedule, value_schedule
        self.keys_pre_rope, self.inv_freq, self.prefill_chunk = keys_pre_rope, inv_freq, prefill_chunk

    def key_mask(self, T: int) -> torch.Tensor:
        return quantized_mask(self.key_schedule, T, self.prefill_chunk)

    def attend(self, layer, q, k, v, positions):
        k_hat, v_hat = self.fake_keys(layer, k), self.fake_values(layer, v)
        if self.keys_pre_rope:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            k, k_hat = apply_rope(k, cos, sin), apply_rope(k_hat, cos, sin)
        T = q.shape[2]
        key_mask = self.key_mask(T).to(q.device)
        value_mask = key_mask if self.value_schedule == self.key_schedule else \
            quantized_mask(self.value_schedule, T, self.prefill_chunk).to(q.device)
        return mixed_attention(q, k, v, k_hat, v_hat, key_mask, value_mask)


def mixed_attention(q, k, v, k_hat, v_hat, key_quantized, value_quantized):
    """Causal attention where query p reads key j from k_hat where key_quantized[p, j], value j
    from v_hat where value_quantized[p, j]. q [B, H, T, D]; k, v, k_hat, v_hat [B, Hkv, T, D];
    the masks [T, T] bool. Returns [B, H, T, D]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, T, D)                                 # (B, Hkv, G, T, D)
    exact = qg @ k.float().unsqueeze(2).transpose(-1, -2)                      # (B, Hkv, G, T, T)
    approx = qg @ k_hat.float().unsqueeze(2).transpose(-1, -2)
    scores = torch.where(key_quantized, approx, exact) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (probs * ~value_quantized) @ v.float().unsqueeze(2) + (probs * value_quantized) @ v_hat.float().unsqueeze(2)
    return out.view(B, H, T, D).to(q.dtype)


def per_token(quantizers):
    """fake_* for per-token quantizers (quant/skvq.py TokenQuantizer), one per layer."""
    return lambda layer, x: quantizers[layer].fake_quantize(x.transpose(1, 2)).transpose(1, 2)


def per_block(quantizers, n_sink: int, prompt_tokens: int):
    """fake_keys for block quantizers (quant/svdq.py LatentKeyQuantizer), one per layer: the
    blocks counted from the first token after the sinks, in the layer's basis or, where it has
    none, each sequence's own from its keys n_sink..prompt_tokens (as the cache takes a
    prompt's at prefill)."""
    def fake_keys(layer, k):                                                      # k (B, Hkv, T, D)
        quantizer = quantizers[layer]
        x = k.transpose(1, 2)                                                     # (B, T, Hkv, D)
        if quantizer.basis is None:
            basis, mean = (torch.stack(t) for t in zip(*[basis_from_keys(xb[n_sink:prompt_tokens]) for xb in x]))
        else:
            basis, mean = quantizer.basis.to(k.device), quantizer.mean.to(k.device)
        basis, mean = quantizer.as_stored(basis, mean)
        x_hat = x.clone()
        x_hat[:, n_sink:] = quantizer.fake_quantize(x[:, n_sink:], basis, mean)
        return x_hat.transpose(1, 2)
    return fake_keys


def simulated_cache(spec, key_quantizers, value_quantizers, inv_freq, prefill_chunk: int | None = None,
                    prompt_tokens: int = 512) -> SimulatedCache:
    """The cache `spec` (quant/kvspec.py) names as a simulation, with these quantizers per layer
    (quant/calibrate.py quantizers_for); value_quantizers None keeps values exact (a keys-only row)."""
    block_keys = spec.method in ("svdq", "kivi")
    fake_keys = per_block(key_quantizers, spec.sinks, prompt_tokens) if block_keys else per_token(key_quantizers)
    fake_values = (lambda layer, v: v) if value_quantizers is None else per_token(value_quantizers)
    return SimulatedCache(fake_keys, fake_values, spec.key_schedule, spec.value_schedule, spec.keys_pre_rope,
                          inv_freq if spec.keys_pre_rope else None, prefill_chunk)
