"""KIVI, the baseline, as its released code runs it (evaluation only: `python -m quant.eval`).

Keys per channel, post-RoPE, in groups of `token_group` (32) tokens along the sequence: the block
quantizer of quant/svdq.py with an identity basis and every channel at one width. Keys stay in
full precision until R = `window` (128) have gathered, then all R are quantized at once: a query
reads 1 to R exact keys (its own included). Values per token, in groups of `group_size` (32)
channels; the R most recent stay exact, and each older one is quantized as it leaves: a query
reads R + 1 exact values. fp16 metadata, no sinks, no calibration. quant/kvspec.py gives both
schedules (KvSpec.key_schedule, value_schedule).
"""
import torch

from quant.skvq import TokenQuantizer, equal_groups
from quant.svdq import LatentKeyQuantizer


def kivi_quantizers(spec, n_layers: int, n_heads: int, head_dim: int):
    """(key quantizers, value quantizers), one per layer, for a `kivi-kKvV` spec."""
    identity = torch.eye(head_dim).expand(n_heads, head_dim, head_dim)
    keys = LatentKeyQuantizer(torch.full((head_dim,), spec.key_bits), n_heads, head_dim, spec.token_group, identity,
                              torch.zeros(n_heads, head_dim))
    values = TokenQuantizer(spec.value_bits, equal_groups(n_heads, head_dim, spec.channel_group(head_dim)))
    return [keys] * n_layers, [values] * n_layers
