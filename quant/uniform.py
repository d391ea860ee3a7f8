"""Uniform asymmetric group quantization: the one formula every quantizer here uses.

A group is a set of elements sharing one (scale, low) pair; SKVQ groups channels of one token,
KIVI groups tokens of one channel. Following SKVQ's code, clipping shrinks the range by alpha:
    low = alpha * min,  scale = alpha * (max - min) / (levels - 1)
    code = clamp(floor((x - low) / scale + 1/2), 0, levels - 1),  x_hat = code * scale + low
Codes are computed against the metadata *as stored* (fp16 or fp8 e4m3), so the dequantized
value is exactly what a kernel reading the stored metadata reconstructs. Rounding is half-up and
the division IEEE, as in kernels/quantize.py, so that kernel writes the same codes bit for bit.
"""
import torch

from quant.packing import n_levels

META_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def quantize_groups(x: torch.Tensor, bits, group_index: torch.Tensor, n_groups: int,
                    clip: float = 1.0, meta_dtype=torch.float16):
    """x [..., C]; group_index int64, broadcastable to x, names each channel's group (0..n_groups-1).
    Returns codes uint8 [..., C], scale and low [..., n_groups] in meta_dtype (0 for an empty group).
    clip: a float, or candidates [K, 1, ..., 1] that broadcast ahead of x's dims: each result then
    has a leading axis of K, the extremes found once (quant/calibrate.py's clip search)."""
    levels = n_levels(bits)
    xf = x.float()
    shape = (*xf.shape[:-1], n_groups)
    if n_groups == 1:  # the extremes without scatters, the metadata without gathers: a decode step quantizes one token
        hi, lo = xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True)
        per_channel = lambda t: t.float()
    else:
        index = group_index.to(x.device).expand_as(xf)
        hi = torch.full(shape, -torch.inf, device=x.device).scatter_reduce(-1, index, xf, "amax")
        lo = torch.full(shape, torch.inf, device=x.device).scatter_reduce(-1, index, xf, "amin")
        per_channel = lambda t: t.float().gather(-1, index.expand(*t.shape[:-1], index.shape[-1]))
    empty = hi < lo
    hi, lo = hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)
    # A constant group has max == min: any positive scale reproduces it exactly (code 0). The
    # floor must survive the cast: 2^-9 is e4m3's smallest subnormal.
    floor = 2.0 ** -9 if meta_dtype == torch.float8_e4m3fn else 1e-6
    scale = (clip * (hi - lo) / (levels - 1)).clamp_min(floor).to(meta_dtype)
    low = (clip * lo).to(meta_dtype)
    codes = ((xf - per_channel(low)) / per_channel(scale) + 0.5).floor()
    return codes.clamp_(0, levels - 1).to(torch.uint8), scale, low


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                      group_index: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_groups -> fp32 [..., C]."""
    index = group_index.to(codes.device).expand(codes.shape)
    return codes.float() * scale.float().gather(-1, index) + low.float().gather(-1, index)
