"""The streaming CPU attention (kernels/streaming.py) against the whole-sequence plain-torch
reference (kernels/reference.py): every code width for keys and values, one and several channel
groups, smoothing, fp16 and fp8 metadata, pre-RoPE keys, SVDq latent keys, a partly filled ring
window, empty and multi-block histories, batches of different lengths, GQA 1/4/8, head dims 64 and
128, prefill chunks (causal); and through the caches, generate.py's path against the reference
path on the same cache contents. Blocks are made 128 tokens so that every history spans several."""
import copy

import pytest
import torch
from test_kernels import BITS, packed, rope, write_all

from engine.cache import make_cache
from engine.stores import LatentStore
from kernels import streaming
from kernels.decode_attention import Segment
from kernels.reference import attention
from quant.calibrate import Calibration
from quant.kvspec import parse
from quant.svdq import basis_from_keys, svdq_keys

TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # fp32, sums in another order: as tests/test_kernels.py


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(streaming, "WORK_BYTES", 1)  # the smallest block: 128 tokens


def rotation(D):
    return 1.0 / 10000 ** (torch.arange(D // 2) / (D // 2))


VARIANTS = ["post-RoPE, one group, fp16 metadata, compiled", "post-RoPE, one group, fp8 metadata, torch",
            "pre-RoPE, four groups, smoothing, fp8 metadata", "post-RoPE, rotated, smoothing, fp8 metadata, compiled",
            "post-RoPE, rotated, smoothing, fp16 metadata, torch"]
# Ternary keys only post-RoPE: the Triton kernel refuses pre-RoPE ternary keys (attend asserts it),
# and no --kv spec makes ternary keys at all. 3-bit keys with ternary values: skvq-k3v1.5.
DECODE_CASES = [(k_bits, v_bits, variant) for k_bits, v_bits in BITS + [(1.5, 2), (3, 1.5)] for variant in VARIANTS
                if not (variant.startswith("pre") and k_bits == 1.5)]


@pytest.mark.parametrize("k_bits, v_bits, variant", DECODE_CASES)
@pytest.mark.parametrize("group, D", [(1, 64), (3, 64), (4, 128), (8, 64)])
def test_decode_matches_reference(k_bits, v_bits, group, D, variant, monkeypatch):
    """Packed history (empty; within one block; several blocks) and a ring window; a history in
    one group through kernels/packed_history.c (but for 3-bit values: torch), or through torch
    alone; its channels stored rotated or not."""
    pre_rope, rotate, smooth = variant.startswith("pre"), "rotated" in variant, "smoothing" in variant
    taken = []  # per segment, whether a C kernel read it
    if variant.endswith("torch"):
        monkeypatch.setattr(streaming, "compiled_kernel", lambda: None)
    elif variant.endswith("compiled"):
        assert streaming.compiled_kernel() is not None, "no C compiler here: the compiled path is untested"
        compiled = streaming._compiled
        monkeypatch.setattr(streaming, "_compiled", lambda *args: taken.append(compiled(*args)) or taken[-1])
    n_groups = 4 if pre_rope else 1
    meta = torch.float16 if "fp16" in variant else torch.float8_e4m3fn
    B, Hkv, capacity, W = 3, 2, 300, 16
    history_count, window_count = torch.tensor([0, 37, 300]), torch.tensor([5, 16, 16])
    first_slot = torch.randint(W, (B,))
    history_start = torch.randint(0, 10, (B,))
    q = torch.randn(B, Hkv * group, D)
    x = torch.randn(2, B, Hkv, capacity, D) * (torch.rand(2, 1, Hkv, 1, D) * 4)
    stored_k, k_hat = packed(x[0], k_bits, n_groups, meta, smooth, rotate)
    stored_v, v_hat = packed(x[1], v_bits, n_groups, meta, smooth, rotate)
    window_k, window_v = torch.randn(2, B, Hkv, W, D)
    inv_freq = rotation(D) if pre_rope else None
    segments = [Segment(window_k, window_v, window_count, first_slot, history_start + history_count),
                Segment(stored_k, stored_v, history_count, None, history_start)]
    got = streaming.attend(q[:, None], segments, None, inv_freq)[:, 0]
    if variant.endswith("compiled"):  # the window always; the history unless its values are 3-bit
        assert taken == [True, v_bits != 3]
    for b in range(B):
        h, w = int(history_count[b]), int(window_count[b])
        slots = (first_slot[b] + torch.arange(w)) % W
        keys = torch.cat([k_hat[b, :, :h], window_k[b, :, slots]], 1)
        values = torch.cat([v_hat[b, :, :h], window_v[b, :, slots]], 1)
        if pre_rope:
            keys = rope(keys, history_start[b] + torch.arange(h + w), inv_freq)
        expected = attention(q[b:b + 1, :, None], keys[None], values[None], torch.tensor([[h + w]]))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE)


@pytest.mark.parametrize("group, D", [(1, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize("bits, shared_basis", [(1.25, True), (2, False)])
def test_svdq_keys_match_reference(group, D, bits, shared_basis):
    """Latent keys rebuilt from their codes and basis, rotated, with ternary values: histories of
    0, 17 (inside a block of 32) and 320 tokens (three blocks of the stream)."""
    B, Hkv, G_tokens, capacity = 3, 2, 32, 320
    count = torch.tensor([0, 17, capacity])
    low_rank = torch.randn(Hkv, 8, D) * torch.logspace(1, -1, 8)[:, None]
    keys = torch.einsum("bthr,hrd->bhtd", torch.randn(B, capacity, Hkv, 8), low_rank)
    keys = keys + 0.1 * torch.randn_like(keys) + torch.randn(Hkv, 1, D)                 # (B, Hkv, T, D)
    basis = basis_from_keys(keys[0].transpose(0, 1)) if shared_basis else (None, None)
    latent_keys = LatentStore(svdq_keys(bits, Hkv, D, G_tokens, *basis), B, capacity, "cpu")
    for b in range(B):
        latent_keys.observe_prompt(b, keys[b])
    write_all(latent_keys, keys)
    k_hat = latent_keys.read(capacity)
    stored_v, v_hat = packed(torch.randn(B, Hkv, capacity, D), 1.5, 1, torch.float8_e4m3fn, smooth=True)
    q = torch.randn(B, Hkv * group, D)
    inv_freq, start = rotation(D), torch.randint(0, 10, (B,))
    got = streaming.attend(q[:, None], [Segment(latent_keys, stored_v, count, None, start)], None, inv_freq)[:, 0]
    for b in range(1, B):
        n = int(count[b])
        k_rot = rope(k_hat[b, :, :n], start[b] + torch.arange(n), inv_freq)
        expected = attention(q[b:b + 1, :, None], k_rot[None], v_hat[b:b + 1, :, :n], torch.tensor([[n]]))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE)


@pytest.mark.parametrize("group, D, pre_rope", [(1, 64, False), (4, 128, True), (8, 64, True)])
def test_prefill_chunk_matches_reference(group, D, pre_rope):
    """A chunk of queries over packed history, a ring window and itself causally (the chunk
    longer than a block, the second sequence's chunk shorter and its history empty)."""
    B, Hkv, capacity, W, Q = 2, 2, 200, 16, 150
    history_count, window_count, chunk_count = torch.tensor([200, 0]), torch.tensor([16, 5]), torch.tensor([150, 20])
    first_slot = torch.randint(W, (B,))
    history_start = torch.tensor([4, 4])
    chunk_start = history_start + history_count + window_count
    q = torch.randn(B, Q, Hkv * group, D)
    stored_k, k_hat = packed(torch.randn(B, Hkv, capacity, D), 2, 4, torch.float8_e4m3fn, smooth=pre_rope)
    stored_v, v_hat = packed(torch.randn(B, Hkv, capacity, D), 1.5, 1, torch.float16, smooth=False)
    window_k, window_v, chunk_k, chunk_v = (torch.randn(B, Hkv, n, D) for n in (W, W, Q, Q))
    inv_freq = rotation(D) if pre_rope else None
    segments = [Segment(stored_k, stored_v, history_count, None, history_start),
                Segment(window_k, window_v, window_count, first_slot, history_start + history_count),
                Segment(chunk_k, chunk_v, chunk_count, None, chunk_start, causal=True)]
    got = streaming.attend(q, segments, chunk_start, inv_freq)                          # (B, Q, H, D)
    for b in range(B):
        h, w, c = int(history_count[b]), int(window_count[b]), int(chunk_count[b])
        slots = (first_slot[b] + torch.arange(w)) % W
        keys = torch.cat([k_hat[b, :, :h], window_k[b, :, slots], chunk_k[b, :, :c]], 1)
        values = torch.cat([v_hat[b, :, :h], window_v[b, :, slots], chunk_v[b, :, :c]], 1)
        if pre_rope:
            keys = rope(keys, history_start[b] + torch.arange(h + w + c), inv_freq)
        expected = attention(q[b:b + 1, :c].transpose(1, 2), keys[None], values[None], (h + w + torch.arange(c))[None])
        torch.testing.assert_close(got[b, :c], expected[0].transpose(0, 1), **TOLERANCE)


@pytest.mark.parametrize("kv, heads, n_kv_heads, D",
                         [("fp16", 4, 4, 64), ("skvq-k2v1.5", 8, 1, 128), ("skvq-k2v1.5:rotation=none:pre-rope-keys", 8, 2, 64),
                          ("skvq-k3v2:metadata=fp16:group-size=32", 4, 4, 64), ("svdq-k1.25v1.5:token-group=16", 8, 2, 128),
                          ("skvq-k2v1.5:rotation=none:scaling=minmax", 8, 2, 64), ("skvq-k4v2:rotation=hadamard-keys", 4, 1, 128),
                          ("svdq-k2v1.5:svdq-basis=prompt:token-group=16", 4, 1, 64)])
def test_cache_streams_as_the_reference_attends(kv, heads, n_kv_heads, D):
    """Through engine/cache.py: a batch of prompts of 290 and 75 tokens prefilled in chunks of
    100, then decode steps; each layer's attention output of generate.py's path against the
    reference path's on the same cache contents (a copy of the cache attending with reference=True)."""
    from model import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=n_kv_heads, head_dim=D,
                      max_position_embeddings=512)
    calibration = None
    if kv.startswith("svdq") and "prompt" not in kv:
        bases = {}
        for layer in range(cfg.num_hidden_layers):
            bases[f"svdq.basis.{layer}"] = torch.linalg.qr(torch.randn(n_kv_heads, D, D))[0]
            bases[f"svdq.mean.{layer}"] = torch.randn(n_kv_heads, D)
        calibration = Calibration(bases, dict(layers=cfg.num_hidden_layers, group_sizes=[]))
    spec = parse(kv if kv == "fp16" else f"{kv}:sinks=3:window=20")
    lengths, n_decode = torch.tensor([290, 75]), 4
    cache = make_cache(spec, cfg, 2, 290 + n_decode, "cpu", torch.float32, calibration)
    forwards = [(lengths - start).clamp(0, 100) for start in range(0, 290, 100)] + [torch.ones(2, dtype=torch.long)] * n_decode
    for n_new in forwards:
        T = max(int(n_new.max()), 1)
        positions = cache.reserve(n_new, T)
        for layer in range(cfg.num_hidden_layers):
            q = torch.randn(2, heads, T, D)
            k, v = torch.randn(2, 2, n_kv_heads, T, D) * torch.rand(2, 1, n_kv_heads, 1, D) * 3
            reference = copy.deepcopy(cache)
            reference.reference = True
            got = cache.attend(layer, q, k, v, positions)
            expected = reference.attend(layer, q, k, v, positions)
            for b in range(2):  # the real queries of each sequence
                n = int(n_new[b])
                torch.testing.assert_close(got[b, :, :n], expected[b, :, :n], **TOLERANCE)


@pytest.mark.parametrize("kv", ["skvq-k2v1.5:window=16", "skvq-k4v4:metadata=fp16:window=16",
                                "skvq-k2v1.5:window=16:scaling=minmax", "skvq-k2v1.5:window=16:rotation=none",
                                "skvq-k4v4:metadata=fp16:window=16:rotation=none:scaling=minmax",
                                "skvq-k1v2:window=16:sinks=0:rotation=none:scaling=minmax",
                                "skvq-k3v1.5:window=16", "skvq-k3v1.5:window=16:rotation=none:scaling=minmax"])
def test_decode_write_in_c_equals_torch(kv, monkeypatch):
    """A decode step's write through kernels/packed_history.c write_token: every buffer of the
    cache (codes, fp8 or fp16 scales and lows, sinks, ring) bit for bit what the torch quantizer
    writes, rotated or not, min-max or rms, over smoothing and magnitudes from fp8's subnormals to
    past its largest value."""
    from model import LlamaConfig

    assert streaming.compiled_kernel() is not None, "no C compiler here: the compiled write is untested"
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=64, max_position_embeddings=512)
    smoothing = torch.rand(3, 64) + 0.5
    caches, written_in_c = [], []
    compiled_write = streaming.write_token
    monkeypatch.setattr(streaming, "write_token", lambda *args: written_in_c.append(compiled_write(*args)) or written_in_c[-1])
    for through_c in (True, False):
        if not through_c:
            assert written_in_c and all(written_in_c)
            monkeypatch.setattr(streaming, "write_token", lambda *args: False)
        cache = make_cache(parse(kv), cfg, 2, 300, "cpu", torch.float32)
        for store in cache.key_stores + cache.value_stores:
            store.quantizer.smoothing = store.smoothing = smoothing
        cache.reserve(torch.tensor([3, 7]), 7)
        torch.manual_seed(0)
        for step in range(200):
            positions = cache.reserve(torch.ones(2, dtype=torch.long), 1)
            for layer in range(cfg.num_hidden_layers):
                k, v = torch.randn(2, 2, 3, 64) * 10 ** (torch.rand(2, 1, 3, 1) * 7 - 4)
                cache._append(layer, k, v, positions[:, 0])
        caches.append(cache)
    as_bytes = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    c, plain = ([as_bytes(t) for t in [x.sink_k, x.sink_v, x.window_k, x.window_v]
                 + [t for store in x.key_stores + x.value_stores for t in store.buffers()]] for x in caches)
    assert all(torch.equal(a, b) for a, b in zip(c, plain))
