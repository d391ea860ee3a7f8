"""SKVQ: per-token asymmetric group quantization along reordered channels, with clipping.

One token's K (or V) of one layer is a vector of C = n_kv_heads * head_dim channels, in the
model's order (head-major). A `ChannelGroups` says how those channels are grouped: a permutation
that puts channels of similar range side by side, then contiguous groups (possibly unequal) over
the permuted channels, each with its own (scale, low). Three ways to build one:
  - `equal_groups`: no reordering, groups of g consecutive channels (head-local when g | head_dim);
  - `head_pair_groups`: within each head, RoPE pairs (c, c + D/2) sorted by range and kept
    together, so a kernel can rotate pre-RoPE keys after dequantizing one group;
  - `kmeans_groups`: SKVQ's own: k-means on each channel's calibrated (min, max), across all KV
    heads of the layer, giving unequal groups.
The alternative to reordering is smoothing: divide each channel by a static factor before
quantizing (`smoothing_factors`) and multiply back after. For keys the factor folds into q_proj
(q . k = (q * s) . (k / s)), for values into o_proj's input columns, so a deployment pays nothing
for it; here the division and multiplication are explicit.
"""
from dataclasses import dataclass

import torch

from quant.packing import pack, packed_size, unpack
from quant.uniform import dequantize_groups, quantize_groups


@dataclass
class ChannelGroups:
    permutation: torch.Tensor  # [C] int64: permuted channel i is original channel permutation[i]
    group_index: torch.Tensor  # [C] int64: group of permuted channel i, non-decreasing
    n_groups: int

    @property
    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.permutation)


def equal_groups(n_channels: int, group_size: int) -> ChannelGroups:
    if n_channels % group_size:
        raise ValueError(f"group size {group_size} does not divide {n_channels} channels")
    return ChannelGroups(torch.arange(n_channels), torch.arange(n_channels) // group_size,
                         n_channels // group_size)


def head_pair_groups(channel_range: torch.Tensor, n_heads: int, group_size: int) -> ChannelGroups:
    """channel_range [C] calibrated max |x| per channel. Within each head of D channels, RoPE pairs
    (c, c + D/2) are sorted by their larger range and grouped group_size channels at a time."""
    C = channel_range.numel()
    D = C // n_heads
    if D % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} must be even and divide head_dim {D}")
    pair_range = torch.maximum(channel_range.view(n_heads, 2, D // 2)[:, 0],
                               channel_range.view(n_heads, 2, D // 2)[:, 1])     # (heads, D/2)
    order = pair_range.argsort(dim=-1)                                            # (heads, D/2)
    # Group j of a head holds pairs order[j*g/2 : (j+1)*g/2]: first their low channels, then high.
    pairs = order.view(n_heads, D // group_size, group_size // 2)
    head_base = (torch.arange(n_heads) * D)[:, None, None]
    permutation = torch.cat([pairs, pairs + D // 2], dim=-1) + head_base          # (heads, groups, g)
    return ChannelGroups(permutation.flatten(), torch.arange(C) // group_size, C // group_size)


def kmeans_groups(channel_min: torch.Tensor, channel_max: torch.Tensor, n_groups: int,
                  iters: int = 50) -> ChannelGroups:
    """SKVQ's reordering: cluster channels by (min, max) with k-means, one group per cluster."""
    points = torch.stack([channel_min, channel_max], dim=-1).double()            # (C, 2)
    # Deterministic init: centres at evenly spaced quantiles of the channel range.
    ranks = (points[:, 1] - points[:, 0]).argsort()
    centres = points[ranks[torch.linspace(0, len(points) - 1, n_groups).long()]]
    for _ in range(iters):
        labels = torch.cdist(points, centres).argmin(-1)
        for k in range(n_groups):
            if (labels == k).any():
                centres[k] = points[labels == k].mean(0)
    # Order clusters by range so neighbouring groups are alike, then channels by cluster.
    cluster_order = (centres[:, 1] - centres[:, 0]).argsort().argsort()
    group_of_channel = cluster_order[labels]
    permutation = group_of_channel.argsort(stable=True)
    used = group_of_channel[permutation].unique_consecutive(return_inverse=True)[1]
    return ChannelGroups(permutation, used, int(used.max()) + 1)


def smoothing_factors(channel_range: torch.Tensor, n_heads: int) -> torch.Tensor:
    """s [C] = sqrt(range), equal within each RoPE pair (c, c + D/2) so that it commutes with RoPE:
    x / s has the square root of x's range, which tames outlier channels."""
    pairs = channel_range.view(n_heads, 2, -1).amax(1, keepdim=True).expand(n_heads, 2, -1)
    return pairs.reshape(-1).clamp_min(1e-3).sqrt()


class TokenQuantizer:
    """Quantizes tokens [..., C] of one layer's K or V: smooth, permute, group, clip, pack.

    Stored per token: codes uint8 [..., packed_size(C, bits)], the permuted channels packed along
    the last axis (layout in quant/packing.py); scale and low [..., n_groups] in meta_dtype.
    """

    def __init__(self, bits, groups: ChannelGroups, clip: float = 1.0, meta_dtype=torch.float16,
                 smoothing: torch.Tensor | None = None):
        self.bits, self.groups, self.clip, self.meta_dtype = bits, groups, clip, meta_dtype
        self.smoothing = smoothing  # [C] static per-channel divisors, or None
        self.n_channels = groups.permutation.numel()
        self.inverse = groups.inverse

    @property
    def code_bytes(self) -> int:
        return packed_size(self.n_channels, self.bits)

    def bits_per_element(self) -> float:
        meta_bits = 2 * self.groups.n_groups * torch.finfo(self.meta_dtype).bits
        return (8 * self.code_bytes + meta_bits) / self.n_channels

    def quantize(self, x: torch.Tensor):
        g = self.groups
        if self.smoothing is not None:
            x = x / self.smoothing.to(x.device)
        permuted = x[..., g.permutation.to(x.device)]
        codes, scale, low = quantize_groups(permuted, self.bits, g.group_index, g.n_groups,
                                            self.clip, self.meta_dtype)
        return pack(codes, self.bits), scale, low

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        codes = unpack(packed, self.bits, self.n_channels)
        permuted = dequantize_groups(codes, scale, low, self.groups.group_index)
        x = permuted[..., self.inverse.to(packed.device)]
        return x if self.smoothing is None else x * self.smoothing.to(x.device)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize: what attention sees of x once it is in the history."""
        return self.dequantize(*self.quantize(x)).to(x.dtype)
