"""Uniform asymmetric group quantization: the one formula every quantizer here uses.

A group is a set of elements sharing one (scale, low) pair; SKVQ groups channels of one token,
KIVI groups tokens of one channel. Following SKVQ's code, clipping shrinks the range by alpha:
    low = alpha * min,  scale = alpha * (max - min) / (levels - 1)
    code = clamp(floor((x - low) / scale + 1/2), 0, levels - 1),  x_hat = code * scale + low
Codes are computed against the metadata *as stored* (fp16 or fp8 e4m3), so the dequantized
value is exactly what a kernel reading the stored metadata reconstructs. Rounding is half-up and
the division IEEE, as in kernels/quantize.py, so that kernel writes the same codes bit for bit.

scaling="rms" (issue 21) keeps that stored format and read side but places a zero-centred grid:
    scale = m * c_levels * RMS(group),  low = -(levels - 1) / 2 * scale   (both then stored)
with c_levels the MSE-optimal uniform step of a unit Gaussian (GAUSSIAN_STEP) and m the one of
RMS_MULTIPLIERS that reconstructs the group best against its stored pair. After a rotation a
token's channels are near-Gaussian: min-max spends its levels on the two extremes, this on the
bulk. Its multiplier search is its clipping, so `clip` does not apply. Sums (of squares for the
RMS, of squared errors for m) are in fp64: a kernel summing in another order writes the same
bytes unless two sums differ in their last bits, which random data does not reach.
"""
import torch

from quant.packing import n_levels

META_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
# levels -> the uniform step, in standard deviations, of least squared error on a Gaussian (Max
# 1960); 256 levels (8 bits) has none here: min-max is already near-lossless there.
GAUSSIAN_STEP = {2: 1.5958, 3: 1.2240, 4: 0.9957, 8: 0.5860, 16: 0.3352}
RMS_MULTIPLIERS = (0.8, 0.9, 1.0, 1.1, 1.2)  # the best of these per group (quant/RESULTS.md, issue 21)


def rms_steps(bits) -> tuple:
    """The steps, in units of a group's RMS, that scaling=rms tries at `bits`, in order."""
    levels = n_levels(bits)
    if levels not in GAUSSIAN_STEP:
        raise ValueError(f"scaling=rms takes 1, 1.5, 2, 3 or 4 bits, not {bits}: 8 bits keeps min-max")
    return tuple(GAUSSIAN_STEP[levels] * m for m in RMS_MULTIPLIERS)


def quantize_groups(x: torch.Tensor, bits, group_index: torch.Tensor, n_groups: int,
                    clip: float = 1.0, meta_dtype=torch.float16, scaling: str = "minmax"):
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
        group_sum = lambda t: t.sum(-1, keepdim=True)
    else:
        index = group_index.to(x.device).expand_as(xf)
        hi = torch.full(shape, -torch.inf, device=x.device).scatter_reduce(-1, index, xf, "amax")
        lo = torch.full(shape, torch.inf, device=x.device).scatter_reduce(-1, index, xf, "amin")
        per_channel = lambda t: t.float().gather(-1, index.expand(*t.shape[:-1], index.shape[-1]))
        group_sum = lambda t: t.new_zeros(shape).scatter_add(-1, index, t)
    # A constant group has max == min: any positive scale reproduces it exactly (code 0). The
    # floor must survive the cast: 2^-9 is e4m3's smallest subnormal.
    floor = 2.0 ** -9 if meta_dtype == torch.float8_e4m3fn else 1e-6
    codes_for = lambda scale, low: ((xf - per_channel(low)) / per_channel(scale) + 0.5).floor().clamp_(0, levels - 1)
    if scaling == "rms":
        assert clip == 1.0, "rms scaling searches its own multiplier: no clip"
        x64 = xf.double()
        count = group_sum(torch.ones_like(x64)).clamp_min(1.0)
        rms = (group_sum(x64 * x64) / count).float().sqrt()
        best_error = torch.full(shape, torch.inf, dtype=torch.float64, device=x.device)
        scale = low = None
        for step in rms_steps(bits):
            scale_m = (step * rms).clamp_min(floor)
            scale_m, low_m = scale_m.to(meta_dtype), (-(levels - 1) / 2 * scale_m).to(meta_dtype)
            x_hat = codes_for(scale_m, low_m).double() * per_channel(scale_m).double() + per_channel(low_m).double()
            error = group_sum((x_hat - x64) ** 2)
            better = error < best_error  # strict: a tie keeps the earlier multiplier
            scale = scale_m if scale is None else torch.where(better, scale_m, scale)
            low = low_m if low is None else torch.where(better, low_m, low)
            best_error = torch.where(better, error, best_error)
    else:
        empty = hi < lo
        hi, lo = hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)
        scale = (clip * (hi - lo) / (levels - 1)).clamp_min(floor).to(meta_dtype)
        low = (clip * lo).to(meta_dtype)
    return codes_for(scale, low).to(torch.uint8), scale, low


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                      group_index: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_groups -> fp32 [..., C]."""
    index = group_index.to(codes.device).expand(codes.shape)
    return codes.float() * scale.float().gather(-1, index) + low.float().gather(-1, index)
