"""The quantized history of one layer's keys or values: a store.

A store owns the buffers of its packed tokens, writes tokens into them (quantizing), reads them
back dequantized for the plain-torch path, and is itself what the kernels read (its attributes
are the arguments of kernels/decode_attention.py and kernels/quantize.py). Two kinds:

    TokenStore    each token's channels quantized alone, in channel groups (SKVQ keys and values)
    LatentStore   keys in blocks of `token_group` tokens, each latent channel along the block (SVDq)

Every buffer, with its shape, dtype and bit order, is drawn in docs/layout.md. Row r of a
sequence's history holds position sinks + r (quant/kvspec.py Schedule).
"""
import torch

from kernels.quantize import quantize_tokens
from quant.svdq import KeyCovariance, LatentKeyQuantizer


class TokenStore:
    """Per-token packed codes, quant/skvq.py TokenQuantizer's layout, for `rows` tokens of each of
    `batch` sequences:
        codes [B, Hkv, rows, packed_size(D, bits)] uint8: a token's D channels of one head, packed
            along the last axis (quant/packing.py), channels in model order;
        scale, low [B, Hkv, rows, n_groups] fp16 or fp8 e4m3: one pair per channel group;
        group_index [Hkv, D] int32: each channel's group in its head;
        smoothing [Hkv, D] fp32: the static divisors of each channel (ones for none);
        rotation [D, D] fp32 or None: the orthogonal R every head's smoothed channels are
            multiplied by before quantizing (codes hold rotated channels; read back times R^T)."""

    def __init__(self, quantizer, batch: int, rows: int, device):
        Hkv, D, n_groups = quantizer.n_heads, quantizer.head_dim, quantizer.groups.n_groups
        self.quantizer, self.bits, self.clip = quantizer, quantizer.bits, quantizer.clip
        self.codes = torch.zeros(batch, Hkv, rows, quantizer.code_bytes, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(batch, Hkv, rows, n_groups, dtype=quantizer.meta_dtype, device=device)
        self.low = torch.zeros_like(self.scale)
        self.group_index = quantizer.groups.group_index.to(device, torch.int32).contiguous()
        smoothing = quantizer.smoothing if quantizer.smoothing is not None else torch.ones(Hkv, D)
        self.smoothing = smoothing.to(device, torch.float32).contiguous()
        rotation = quantizer.rotation
        self.rotation = None if rotation is None else rotation.to(device, torch.float32).contiguous()

    def observe_prompt(self, b: int, keys: torch.Tensor):
        """Nothing to learn from a prompt: the quantizer is fixed (see LatentStore)."""

    def write(self, x: torch.Tensor, batch, source, row, kernels: bool):
        """Quantizes x[batch[i], :, source[i]] (x [B, Hkv, T, D]) into row[i] of sequence batch[i],
        for every entry i with row[i] >= 0."""
        if kernels:
            quantize_tokens(x, batch, source, row, self)
            return
        keep = (row >= 0).nonzero()[:, 0]  # once, not once per boolean index: a decode step evicts one token
        batch, source, row = batch[keep], source[keep], row[keep]
        self.codes[batch, :, row], self.scale[batch, :, row], self.low[batch, :, row] = \
            self.quantizer.quantize(x[batch, :, source])

    def read(self, n_rows: int) -> torch.Tensor:
        """The first n_rows of every sequence, dequantized: [B, Hkv, n_rows, D] fp32."""
        stored = [t[:, :, :n_rows].transpose(1, 2) for t in (self.codes, self.scale, self.low)]
        return self.quantizer.dequantize(*stored).transpose(1, 2)

    def buffers(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.low]

    def bits_per_element(self, context: int) -> float:
        return self.quantizer.bits_per_element()


class LatentStore:
    """Keys as latent codes, quant/svdq.py LatentKeyQuantizer's layout, for `rows` tokens (whole
    blocks of G = token_group) of each of `batch` sequences:
        codes [B, Hkv, rows, row_bytes] uint8: a token's R latent codes as one little-endian bit
            stream, code c at bit_layout[0, c] with bit_layout[1, c] bits;
        scale, low [B, Hkv, rows / G, R] fp16: one pair per latent channel and block;
        basis_t [1 or B, Hkv, R, D], mean [1 or B, Hkv, D] fp16: the basis (transposed) and mean,
            the quantizer's for every sequence (1), or each sequence's own from its prompt (B);
        bit_layout [2, R] int32."""

    def __init__(self, quantizer, batch: int, rows: int, device):
        Hkv, D, R, G = quantizer.n_heads, quantizer.head_dim, quantizer.rank, quantizer.token_group
        self.quantizer, self.token_group = quantizer, G
        self.codes = torch.zeros(batch, Hkv, rows, quantizer.row_bytes, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(batch, Hkv, rows // G, R, dtype=quantizer.meta_dtype, device=device)
        self.low = torch.zeros_like(self.scale)
        self.per_prompt = quantizer.basis is None
        if self.per_prompt:  # filled as each prompt arrives
            self.basis_t = torch.zeros(batch, Hkv, R, D, device=device, dtype=quantizer.basis_dtype)
            self.mean = torch.zeros(batch, Hkv, D, device=device, dtype=quantizer.basis_dtype)
        else:
            basis_t = quantizer.basis[None, :, :, :R].transpose(-1, -2)
            self.basis_t = basis_t.to(device, quantizer.basis_dtype).contiguous()
            self.mean = quantizer.mean[None].to(device, quantizer.basis_dtype)
        self.bit_layout = quantizer.bit_layout.to(device)

    def observe_prompt(self, b: int, keys: torch.Tensor):
        """keys [Hkv, n, D]: sequence b's first prompt keys after the sinks, before any of them is
        written. With no fixed basis, they give the sequence its own (streamed covariance)."""
        if not self.per_prompt:
            return
        covariance = KeyCovariance()
        for start in range(0, keys.shape[1], 1 << 16):  # chunks keep the [N, D, D] products small
            covariance.add(keys[:, start:start + (1 << 16)].transpose(0, 1))
        if covariance.count:
            basis, mean = covariance.basis()
            self.basis_t[b] = basis[:, :, :self.quantizer.rank].transpose(-1, -2)
            self.mean[b] = mean

    def write(self, x: torch.Tensor, batch, source, row, kernels: bool):
        """As TokenStore.write; a sequence's entries come as whole blocks of consecutive rows
        (the cache evicts them so). In plain torch, with host syncs: a prefill's eviction, and
        every eviction without the kernels; a decode step through the kernels quantizes its block
        in kernels/quantize.py write_decode_token instead."""
        G = self.token_group
        keep = row >= 0
        batch, source, row = batch[keep], source[keep], row[keep]
        for b in batch.unique().tolist():
            mine = batch == b
            rows = row[mine]
            first, n_blocks = int(rows[0]) // G, len(rows) // G
            blocks = x[b, :, source[mine]].transpose(0, 1).unflatten(0, (n_blocks, G))   # (blocks, G, Hkv, D)
            codes, scale, low = self.quantizer.quantize(blocks, *self._basis(b))
            self.codes[b, :, first * G:(first + n_blocks) * G] = codes.flatten(0, 1).transpose(0, 1)
            self.scale[b, :, first:first + n_blocks] = scale.transpose(0, 1)
            self.low[b, :, first:first + n_blocks] = low.transpose(0, 1)

    def _basis(self, b: int):
        """basis [Hkv, D, R] and mean [Hkv, D] of sequence b, fp32."""
        i = b if self.per_prompt else 0
        return self.basis_t[i].transpose(-1, -2).float(), self.mean[i].float()

    def read(self, n_rows: int) -> torch.Tensor:
        """[B, Hkv, n_rows, D] pre-RoPE keys rebuilt from the first n_rows (whole blocks)."""
        G = self.token_group
        codes = self.codes[:, :, :n_rows].transpose(1, 2).unflatten(1, (n_rows // G, G))  # (B, blocks, G, Hkv, bytes)
        scale, low = (t[:, :, :n_rows // G].transpose(1, 2) for t in (self.scale, self.low))
        basis = self.basis_t.transpose(-1, -2).float()[:, None]                         # (1 or B, 1, Hkv, D, R)
        keys = self.quantizer.dequantize(codes, scale, low, basis, self.mean.float()[:, None])
        return keys.flatten(1, 2).transpose(1, 2)

    def buffers(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.low, self.basis_t, self.mean]

    def bits_per_element(self, context: int) -> float:
        """Codes and metadata; a per-sequence basis spread over the `context` tokens it serves."""
        return self.quantizer.bits_per_element(context=context if self.per_prompt else None)


def make_store(quantizer, batch: int, rows: int, device):
    """The store that holds what `quantizer` writes: per token, or in latent blocks."""
    kind = LatentStore if isinstance(quantizer, LatentKeyQuantizer) else TokenStore
    return kind(quantizer, batch, rows, device)
