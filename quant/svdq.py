"""SVDq keys: pre-RoPE keys in an SVD basis, latent channels quantized with falling precision.

Per layer and KV head, keys (pre-RoPE) are centred on their mean and written in the basis of the
right singular vectors of the centred keys, ordered by singular value: latent channel c of a key
k is z_c = (k - mean) . basis[:, c]. The variance of the latent channels falls fast, so a
schedule gives the first ones many bits, later ones few, and the tail none at all (truncated):
    1.25 bits: (8, 4, 2, 2, 1, 1, 1, 1) bits for successive sixteenths of head_dim, 0 after,
i.e. for head_dim 128, 8 channels at 8 bits, 8 at 4, 16 at 2, 32 at 1, 64 dropped: 160 bits per
key, 1.25 per element. Each latent channel is quantized along tokens, in groups of
`token_group` tokens sharing one (scale, low) per channel (quant/uniform.py), as KIVI quantizes
keys per channel: `LatentKeyQuantizer` is both. Reconstruction: k_hat = z_hat @ basis[:, :R]^T + mean, then RoPE at the key's
position; the decode kernel does exactly this in registers.

The basis comes from calibration keys (`basis_from_keys`, stored by quant/calibrate.py) or from
each prompt's own keys at prefill; both reduce to the same streamed covariance, so a million
keys never need a [T, D] SVD.
"""
import torch

from quant.packing import pack_mixed, unpack_mixed
from quant.uniform import dequantize_groups, quantize_groups

# bits per sixteenth of head_dim, most significant latent channels first; the rest are dropped.
SCHEDULES = {1.25: (8, 4, 2, 2, 1, 1, 1, 1), 2: (8, 8, 4, 4, 2, 2, 2, 2)}


def svdq_keys(bits, n_heads: int, head_dim: int, token_group: int, basis=None, mean=None) -> "LatentKeyQuantizer":
    """SVDq's quantizer for keys at `bits` (SCHEDULES) in this basis (None: each prompt's own)."""
    return LatentKeyQuantizer(latent_widths(SCHEDULES[bits], head_dim), n_heads, head_dim, token_group, basis, mean)


def latent_widths(schedule, head_dim: int) -> torch.Tensor:
    """Bits of each kept latent channel [R], R = len(schedule) * head_dim / 16."""
    if head_dim % 16 or any(b not in (1, 2, 4, 8) for b in schedule):
        raise ValueError(f"schedule {schedule} needs head_dim divisible by 16 and widths in 1, 2, 4, 8")
    return torch.tensor(schedule).repeat_interleave(head_dim // 16)


class KeyCovariance:
    """Streamed first and second moments of keys [..., Hkv, D], in float64: add chunks, then
    `basis()`. One pass, memory D x D per head, whatever the number of keys."""

    def __init__(self):
        self.count, self.total, self.outer = 0, 0.0, 0.0

    def add(self, keys: torch.Tensor):
        x = keys.reshape(-1, *keys.shape[-2:]).double()                        # (N, Hkv, D)
        self.count += x.shape[0]
        self.total = self.total + x.sum(0)                                       # (Hkv, D)
        self.outer = self.outer + torch.einsum("nhc,nhd->hcd", x, x)            # (Hkv, D, D)

    def basis(self):
        """(basis [Hkv, D, D] fp32, columns = right singular vectors of the centred keys by
        falling singular value; mean [Hkv, D] fp32)."""
        mean = self.total / self.count
        covariance = self.outer / self.count - mean[:, :, None] * mean[:, None, :]
        _, vectors = torch.linalg.eigh(covariance)                               # ascending eigenvalues
        return vectors.flip(-1).float(), mean.float()


def basis_from_keys(keys: torch.Tensor):
    """keys [N, Hkv, D] -> (basis [Hkv, D, D], mean [Hkv, D]), see KeyCovariance.basis."""
    covariance = KeyCovariance()
    covariance.add(keys)
    return covariance.basis()


class LatentKeyQuantizer:
    """Quantizes blocks of keys [..., G, Hkv, D] (G = token_group consecutive tokens) in a basis.

    Latent channel c of a key k is z_c = (k - mean) . basis[:, c]; channel c is quantized along the
    block's G tokens at widths[c] bits (quant/uniform.py, one group per channel and block).
    SVDq: the basis of the layer's keys and a falling schedule (`svdq_keys`); KIVI's keys are
    the same with an identity basis and every channel at one width (quant/kivi.py).

    basis [Hkv, D, >= R] and mean [Hkv, D]: this layer's, shared by every sequence, or None:
    each sequence's own, from its prompt (the caller passes it). Stored per block:
      codes uint8 [..., G, Hkv, row_bytes]: each token's R latent codes, widths as given,
          packed as one bit stream (quant/packing.py pack_mixed), row_bytes = ceil(sum(widths) / 8);
      scale, low [..., Hkv, R] in meta_dtype: one pair per latent channel for the block's G tokens.
    """

    basis_dtype = torch.float16  # how caches store a basis and mean

    def __init__(self, widths: torch.Tensor, n_heads: int, head_dim: int, token_group: int, basis=None, mean=None,
                 meta_dtype=torch.float16):
        self.widths, self.token_group, self.meta_dtype = widths, token_group, meta_dtype
        self.n_heads, self.head_dim = n_heads, head_dim
        self.basis, self.mean = basis, mean
        self.rank = len(widths)
        self.row_bytes = -(-int(widths.sum()) // 8)  # whole bytes

    def as_stored(self, basis, mean):
        """basis and mean rounded as a cache stores them, in fp32."""
        return basis.to(self.basis_dtype).float(), mean.to(self.basis_dtype).float()

    @property
    def bit_layout(self) -> torch.Tensor:
        """[2, R] int32: each latent channel's bit offset in a packed row, and its width."""
        return torch.stack([self.widths.cumsum(0) - self.widths, self.widths]).int()

    def bits_per_element(self, context: int | None = None) -> float:
        """Codes and per-block metadata per key element; with `context`, also one basis [D, R] and
        mean [D] per head spread over that many tokens (a per-sequence basis)."""
        meta = 2 * self.rank * torch.finfo(self.meta_dtype).bits / self.token_group
        bits = (8 * self.row_bytes + meta) / self.head_dim
        if context:
            bits += (torch.finfo(self.basis_dtype).bits * (self.head_dim * self.rank + self.head_dim)
                     / (context * self.head_dim))
        return bits

    def project(self, keys, basis, mean):
        """keys [..., Hkv, D] -> latent [..., Hkv, R] fp32."""
        return torch.einsum("...hd,...hdr->...hr", keys.float() - mean, basis[..., :self.rank])

    def quantize(self, keys, basis, mean):
        """keys [..., G, Hkv, D] -> codes [..., G, Hkv, row_bytes], scale, low [..., Hkv, R]."""
        latent = self.project(keys, basis[..., None, :, :, :], mean[..., None, :, :]).movedim(-3, -1)  # (..., Hkv, R, G)
        codes = torch.empty(latent.shape, dtype=torch.uint8, device=keys.device)
        scale = torch.empty(latent.shape[:-1], dtype=self.meta_dtype, device=keys.device)
        low = torch.empty_like(scale)
        one_group = torch.zeros(latent.shape[-1], dtype=torch.long)
        for bits in self.widths.unique().tolist():
            channels = self.widths.to(keys.device) == bits
            c, s, l = quantize_groups(latent[..., channels, :], bits, one_group, 1, meta_dtype=self.meta_dtype)
            codes[..., channels, :], scale[..., channels], low[..., channels] = c, s[..., 0], l[..., 0]
        return pack_mixed(codes.movedim(-1, -3), self.widths), scale, low

    def dequantize(self, packed, scale, low, basis, mean):
        """The inverse of quantize -> keys [..., G, Hkv, D] fp32 (the tail's latent channels are 0)."""
        codes = unpack_mixed(packed, self.widths).movedim(-3, -1)                 # (..., Hkv, R, G)
        latent = dequantize_groups(codes, scale[..., None], low[..., None], torch.zeros(codes.shape[-1], dtype=torch.long))
        latent = latent.movedim(-1, -3)                                           # (..., G, Hkv, R)
        basis, mean = basis[..., None, :, :, :self.rank], mean[..., None, :, :]
        return torch.einsum("...hr,...hdr->...hd", latent, basis) + mean

    def fake_quantize(self, keys, basis, mean):
        """keys [..., T, Hkv, D]: every complete block of token_group tokens quantized and
        reconstructed, a trailing partial block left exact."""
        G = self.token_group
        T = keys.shape[-3]
        n = T // G * G
        blocks = keys[..., :n, :, :].unflatten(-3, (T // G, G))                  # (..., blocks, G, Hkv, D)
        basis, mean = basis[..., None, :, :, :], mean[..., None, :, :]
        k_hat = keys.clone()
        k_hat[..., :n, :, :] = self.dequantize(*self.quantize(blocks, basis, mean), basis, mean).flatten(-4, -3).to(keys.dtype)
        return k_hat
