"""Triton kernels against the plain-torch reference: odd lengths, GQA 1/4/8, head dims 64/128,
fresh random inputs each run, outputs poisoned with NaN before each run (the kernels allocate
their outputs with torch.empty, which the poisoning below makes visible if a lane is skipped)."""
import pytest
import torch

from conftest import DEVICE
from engine.cache import attention
from kernels.decode_attention import decode_attention_fp16

# fp32 accumulation over fp16 inputs: the tolerance is fp16's, not the kernel's.
TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty inside the kernels returns NaN-filled memory."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_fp16_decode_attention_matches_reference(group, D):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    B, Hkv, capacity = 3, 2, 300
    lengths = torch.tensor([1, 97, 300])  # one token; not a multiple of any block; full capacity
    q = torch.randn(B, Hkv * group, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=dtype)
    got = decode_attention_fp16(q, k, v, lengths.to(DEVICE), split_tokens=128)
    for b in range(B):
        n = int(lengths[b])
        expected = attention(q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], torch.tensor([[n - 1]], device=DEVICE))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE[dtype])
