"""KIVI, the baseline: keys quantized per channel over blocks of G tokens (post-RoPE), values per
token over groups of channels; fp16 metadata.

Here a block is quantized once all its tokens have left the full-precision window, so KIVI keeps
between W and W + G - 1 recent tokens exact (its own code flushes the residual every R tokens,
keeping 0..R-1): the comparison with SKVQ at the same window is, if anything, generous to KIVI.
"""
import torch

from quant.methods import SimulatedCache
from quant.uniform import dequantize_groups, quantize_groups


def fake_quantize_keys(k: torch.Tensor, bits, block: int, meta_dtype=torch.float16) -> torch.Tensor:
    """k [B, Hkv, T, D]: each complete block of `block` tokens gets one (scale, low) per channel."""
    B, Hkv, T, D = k.shape
    n = T // block * block
    blocks = k[:, :, :n].reshape(B, Hkv, n // block, block, D).transpose(-1, -2)   # (B, Hkv, nb, D, G)
    one_group = torch.zeros(block, dtype=torch.long)
    codes, scale, low = quantize_groups(blocks, bits, one_group, 1, meta_dtype=meta_dtype)
    k_hat = k.clone()
    k_hat[:, :, :n] = dequantize_groups(codes, scale, low, one_group).transpose(-1, -2).reshape(B, Hkv, n, D).to(k.dtype)
    return k_hat


def fake_quantize_values(v: torch.Tensor, bits, group_size: int, meta_dtype=torch.float16) -> torch.Tensor:
    """v [B, Hkv, T, D]: per token, groups of group_size consecutive channels."""
    group_index = torch.arange(v.shape[-1]) // group_size
    codes, scale, low = quantize_groups(v, bits, group_index, int(group_index[-1]) + 1, meta_dtype=meta_dtype)
    return dequantize_groups(codes, scale, low, group_index).to(v.dtype)


def block_mask(block: int, window: int):
    """Query p sees key j quantized once j's whole block has left the window."""
    def mask(T):
        p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        block_end = (j // block + 1) * block - 1
        return block_end <= p - window
    return mask


def kivi_cache(k_bits, v_bits, block=32, group_size=32, window=128, meta_dtype=torch.float16):
    return SimulatedCache(lambda layer, k: fake_quantize_keys(k, k_bits, block, meta_dtype),
                          lambda layer, v: fake_quantize_values(v, v_bits, group_size, meta_dtype),
                          block_mask(block, window), keys_pre_rope=False, inv_freq=None)


def bits_per_element(k_bits, v_bits, block=32, group_size=32, meta_bits=16) -> float:
    return (k_bits + 2 * meta_bits / block + v_bits + 2 * meta_bits / group_size) / 2
