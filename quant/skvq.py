"""SKVQ: per-token asymmetric group quantization of each KV head's channels, with clipping.

One token's K (or V) of one layer is [n_kv_heads, head_dim]. A `ChannelGroups` puts each channel
of each head into one of that head's n_groups groups; every group has its own (scale, low) per
token. Two choices shape everything downstream:
  - Groups never span heads. The decode kernel (kernels/decode_attention.py) works on one KV head
    per program, so it then reads only that head's codes and metadata. SKVQ's own k-means runs
    across all heads of a layer; with cross-head groups every head's program would have to read
    the metadata of every head.
  - Channels stay in the model's order: a group is a set of channels, not a run of them. Nothing
    is permuted in memory, RoPE pairs (c, c + D/2) stay where RoPE expects them (pre-RoPE keys
    are rotated right after dequantization), and the kernel maps each channel to its group with
    a [D] table loaded once.
Ways to build groups:
  - `equal_groups`: g consecutive channels;
  - `head_pair_groups`: RoPE pairs sorted by range, g/2 pairs of similar range per group;
  - `kmeans_groups`: SKVQ's reordering: k-means on each channel's calibrated (min, max), per
    head, giving unequal groups of channels of similar range.
The alternative to grouping by range is smoothing: divide each channel by a static factor before
quantizing (`smoothing_factors`) and multiply back after. For keys the factor folds into q_proj
(q . k = (q * s) . (k / s)), for values into o_proj's input columns, so a deployment pays nothing
for it; here the division and multiplication are explicit.
A rotation goes further (`rotation_matrix`): after smoothing, each head's D channels are multiplied
by an orthogonal R [D, D] before quantizing, and by R^T after. It spreads an outlier channel over
all D, so a token's range shrinks to that of sums of many channels. The keys' rotation folds into
q (q . k = (q R) . (k R)), the values' into the output, once per step, not per token.
"""
import math
from dataclasses import dataclass

import torch

from quant.packing import pack, packed_size, unpack
from quant.uniform import dequantize_groups, quantize_groups, rms_steps


@dataclass
class ChannelGroups:
    group_index: torch.Tensor  # [n_kv_heads, head_dim] int64: each channel's group within its head
    n_groups: int              # groups per head (a group may be empty; its metadata is stored anyway)


def equal_groups(n_heads: int, head_dim: int, group_size: int) -> ChannelGroups:
    if head_dim % group_size:
        raise ValueError(f"group size {group_size} does not divide head_dim {head_dim}")
    return ChannelGroups((torch.arange(head_dim) // group_size).expand(n_heads, head_dim).clone(),
                         head_dim // group_size)


def head_pair_groups(channel_range: torch.Tensor, group_size: int) -> ChannelGroups:
    """channel_range [heads, D] calibrated max |x| per channel. Within each head, RoPE pairs
    (c, c + D/2) are ranked by their larger range and grouped group_size / 2 pairs at a time."""
    n_heads, D = channel_range.shape
    if D % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} must be even and divide head_dim {D}")
    pair_range = torch.maximum(channel_range[:, :D // 2], channel_range[:, D // 2:])   # (heads, D/2)
    pair_group = pair_range.argsort(-1).argsort(-1) // (group_size // 2)               # rank -> group
    return ChannelGroups(torch.cat([pair_group, pair_group], -1), D // group_size)


def kmeans_groups(channel_min: torch.Tensor, channel_max: torch.Tensor, n_groups: int,
                  iters: int = 50) -> ChannelGroups:
    """SKVQ's reordering, per head: cluster the channels of each head by (min, max) [heads, D]
    with k-means; group ids ordered by range, so neighbouring groups are alike."""
    labels = [_kmeans(torch.stack([lo, hi], -1).double(), n_groups, iters)
              for lo, hi in zip(channel_min, channel_max)]
    return ChannelGroups(torch.stack(labels), n_groups)


def _kmeans(points: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """points [n, 2] -> cluster id [n] in 0..k-1, ids ordered by the cluster's range."""
    # Deterministic init: centres at evenly spaced quantiles of the channel range.
    ranks = (points[:, 1] - points[:, 0]).argsort()
    centres = points[ranks[torch.linspace(0, len(points) - 1, k).long()]]
    for _ in range(iters):
        labels = torch.cdist(points, centres).argmin(-1)
        for j in range(k):
            if (labels == j).any():
                centres[j] = points[labels == j].mean(0)
    return (centres[:, 1] - centres[:, 0]).argsort().argsort()[labels]


def smoothing_factors(channel_range: torch.Tensor) -> torch.Tensor:
    """s [heads, D] = sqrt(range), equal within each RoPE pair (c, c + D/2) so that it commutes
    with RoPE: x / s has the square root of x's range, which tames outlier channels."""
    D = channel_range.shape[-1]
    pair = torch.maximum(channel_range[..., :D // 2], channel_range[..., D // 2:])
    return torch.cat([pair, pair], -1).clamp_min(1e-3).sqrt()


def rotation_matrix(head_dim: int, seed: int) -> torch.Tensor:
    """R [D, D] fp32, orthogonal, from `seed` (the layer: see quant/calibrate.py quantizers_for).
    For D a power of two a randomised Hadamard rotation, diag(signs) H / sqrt(D), H Sylvester's
    and the signs seeded: every entry is +-1/sqrt(D), so each rotated channel mixes all D with
    equal weight (an exact sum for fp16 inputs, see TokenQuantizer.quantize). For other D a
    seeded random orthogonal matrix (QR of a Gaussian, signs fixed so that it is uniformly
    distributed): it spreads outliers as well, and the engine applies R as a product either way."""
    generator = torch.Generator().manual_seed(seed)
    if head_dim & (head_dim - 1) == 0:
        hadamard = torch.ones(1, 1, dtype=torch.float64)
        while hadamard.shape[0] < head_dim:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
        signs = torch.randint(0, 2, (head_dim, 1), generator=generator) * 2 - 1
        return (signs * hadamard / math.sqrt(head_dim)).float()
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class TokenQuantizer:
    """Quantizes tokens [..., heads, D] of one layer's K or V: smooth, rotate, group, clip, pack.

    Stored per token and head: codes uint8 [..., heads, packed_size(D, bits)], the head's D
    channels in model order packed along the last axis (layout in quant/packing.py); scale and
    low [..., heads, n_groups] in meta_dtype. With a rotation the codes are of x / smoothing @ R:
    channel c of the codes is rotated channel c, and groups are runs of rotated channels.
    """

    def __init__(self, bits, groups: ChannelGroups, clip: float = 1.0, meta_dtype=torch.float16,
                 smoothing: torch.Tensor | None = None, rotation: torch.Tensor | None = None,
                 scaling: str = "minmax"):
        self.bits, self.groups, self.clip, self.meta_dtype = bits, groups, clip, meta_dtype
        self.scaling = scaling      # quant/kvspec.py SCALINGS: how a group's (scale, low) is chosen
        if scaling == "rms":
            rms_steps(bits)         # ValueError at 8 bits, before any token is written
        self.smoothing = smoothing  # [heads, D] static per-channel divisors, or None
        self.rotation = rotation    # [D, D] fp32 orthogonal, the same for every head, or None
        self.n_heads, self.head_dim = groups.group_index.shape

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per token and head."""
        return packed_size(self.head_dim, self.bits)

    def bits_per_element(self) -> float:
        meta_bits = 2 * self.groups.n_groups * torch.finfo(self.meta_dtype).bits
        return (8 * self.code_bytes + meta_bits) / self.head_dim

    def quantize(self, x: torch.Tensor):
        if self.smoothing is not None:
            x = x / self.smoothing.to(x.device)
        if self.rotation is not None:
            # In fp64: the products of fp32 values are exact and so, almost always, are their sums,
            # whatever the order: kernels/quantize.py, summing in its own order, writes the same codes.
            x = (x.double() @ self.rotation.to(x.device, torch.float64)).float()
        codes, scale, low = quantize_groups(x, self.bits, self.groups.group_index, self.groups.n_groups,
                                            self.clip, self.meta_dtype, self.scaling)
        return pack(codes, self.bits), scale, low

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        codes = unpack(packed, self.bits, self.head_dim)
        x = dequantize_groups(codes, scale, low, self.groups.group_index)
        if self.rotation is not None:
            x = x @ self.rotation.to(x.device).T
        return x if self.smoothing is None else x * self.smoothing.to(x.device)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize: what attention sees of x once it is in the history."""
        return self.dequantize(*self.quantize(x)).to(x.dtype)
