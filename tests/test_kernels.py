"""Triton kernels against the plain-torch reference: every code width and metadata dtype, one and
several channel groups, smoothing, pre-RoPE keys, odd lengths (empty history, history shorter
than a block, several splits), a partly filled ring window, GQA 1/4/8, head dims 64/128, batches
of different lengths; fresh random inputs each run; kernel outputs poisoned with NaN before each
run (the kernels allocate their outputs with torch.empty, which the fixture below NaN-fills, so a
skipped lane shows). On the CPU the kernels run in Triton's interpreter (tests/conftest.py)."""
import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from engine.cache import make_cache
from engine.runner import decode_one_token, prefill
from engine.stores import LatentStore, TokenStore
from kernels.codes import e4m3_to_float, float_to_e4m3
from kernels.decode_attention import Segment, attend, decode_attention
from kernels.quantize import quantize_tokens
from kernels.reference import attention
from model import Llama, LlamaConfig, apply_rope, rope_cos_sin
from quant.calibrate import Calibration
from quant.kvspec import parse
from quant.packing import WIDTHS
from quant.skvq import ChannelGroups, TokenQuantizer, equal_groups, rotation_matrix
from quant.svdq import basis_from_keys, svdq_keys

# fp32 accumulation over fp16 inputs: the tolerance is fp16's, not the kernel's. On the CPU the
# interpreter computes in fp32 throughout.
TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled memory (integers: their largest value)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", poisoned)


def random_groups(n_heads, D, n_groups):
    """Unequal groups, as k-means makes them: each channel a random group of its head."""
    if n_groups == 1:
        return equal_groups(n_heads, D, D)
    return ChannelGroups(torch.randint(n_groups, (n_heads, D)), n_groups)


def write_all(store, x):
    """Every token of x [B, Hkv, T, D] into rows 0..T-1 of its sequence, in plain torch."""
    B, _, T, _ = x.shape
    source = torch.arange(T, device=x.device).repeat(B)
    store.write(x, torch.arange(B, device=x.device).repeat_interleave(T), source, source, kernels=False)


def packed(x, bits, n_groups, meta_dtype, smooth, rotate=False):
    """x [B, Hkv, T, D] quantized into a TokenStore: (the store, x as it reads back). rotate: its
    channels rotated (quant/skvq.py rotation_matrix, a random layer's)."""
    B, Hkv, T, D = x.shape
    # Equal within RoPE pairs (c, c + D/2), as quant/skvq.py's factors are, so they commute with RoPE.
    smoothing = (torch.rand(Hkv, D // 2, device=x.device) + 0.5).repeat(1, 2) if smooth else None
    rotation = rotation_matrix(D, seed=int(torch.randint(100, ()))) if rotate else None
    quantizer = TokenQuantizer(bits, random_groups(Hkv, D, n_groups), clip=0.95, meta_dtype=meta_dtype,
                               smoothing=smoothing, rotation=rotation)
    store = TokenStore(quantizer, B, T, x.device)
    write_all(store, x)
    return store, store.read(T).to(x.dtype)


def rope(x, positions, inv_freq):
    """x [Hkv, T, D] at positions [T]."""
    return apply_rope(x[None], *rope_cos_sin(positions[None], inv_freq))[0]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_fp16_decode_attention_matches_reference(group, D):
    B, Hkv, capacity = 3, 2, 300
    lengths = torch.tensor([1, 97, 300])  # one token; not a multiple of any block; full capacity
    q = torch.randn(B, Hkv * group, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=DTYPE)
    got = decode_attention(q, [Segment(k, v, lengths.to(DEVICE))], n_splits=3)
    for b in range(B):
        n = int(lengths[b])
        expected = attention(q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], torch.tensor([[n - 1]], device=DEVICE))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE[DTYPE])


# Every key width with every value width at least once, ternary values included.
BITS = [(1, 1.5), (2, 1.5), (2, 1), (3, 2), (4, 3), (8, 4), (2, 8), (4, 1.5)]


@pytest.mark.parametrize("k_bits, v_bits", BITS)
@pytest.mark.parametrize("group, D", [(1, 64), (4, 128), (8, 64), (4, 64)])
@pytest.mark.parametrize("variant", ["post-RoPE, one group, fp16 metadata",
                                     "pre-RoPE, four groups, smoothing, fp8 metadata",
                                     "post-RoPE, rotated, two groups, smoothing, fp8 metadata"])
def test_packed_decode_attention_matches_reference(k_bits, v_bits, group, D, variant):
    """A packed history plus an fp16 ring window, merged by stage 2, against attention over the
    dequantized history and the window, keys rotated at their positions when pre-RoPE; keys and
    values stored with their channels rotated (q rotated before the loop, the output after)."""
    pre_rope, rotate, smooth = variant.startswith("pre"), "rotated" in variant, "smoothing" in variant
    n_groups = next(n for word, n in [("one", 1), ("two", 2), ("four", 4)] if f"{word} group" in variant)
    meta = torch.float16 if variant.endswith("fp16 metadata") else torch.float8_e4m3fn
    B, Hkv, capacity, W = 3, 2, 150, 16
    history_count = torch.tensor([0, 37, 150])   # empty; shorter than a block; several splits
    window_count = torch.tensor([5, 16, 16])     # partly filled; full
    first_slot = torch.randint(W, (B,))
    history_start = torch.randint(0, 10, (B,))   # position of history row 0
    window_start = history_start + history_count
    q = torch.randn(B, Hkv * group, D, device=DEVICE, dtype=DTYPE)
    x = torch.randn(2, B, Hkv, capacity, D, device=DEVICE) * (torch.rand(2, 1, Hkv, 1, D, device=DEVICE) * 4)
    stored_k, k_hat = packed(x[0].to(DTYPE), k_bits, n_groups, meta, smooth, rotate)
    stored_v, v_hat = packed(x[1].to(DTYPE), v_bits, n_groups, meta, smooth, rotate)
    window_k = torch.randn(B, Hkv, W, D, device=DEVICE, dtype=DTYPE)
    window_v = torch.randn(B, Hkv, W, D, device=DEVICE, dtype=DTYPE)
    inv_freq = 1.0 / 10000 ** (torch.arange(D // 2, device=DEVICE) / (D // 2)) if pre_rope else None
    to = lambda t: t.to(DEVICE)
    segments = [Segment(window_k, window_v, to(window_count), to(first_slot), to(window_start)),
                Segment(stored_k, stored_v, to(history_count), None, to(history_start))]
    got = decode_attention(q, segments, inv_freq, n_splits=5)
    for b in range(B):
        h, w = int(history_count[b]), int(window_count[b])
        slots = (first_slot[b] + torch.arange(w)) % W                          # window tokens in position order
        keys = torch.cat([k_hat[b, :, :h], window_k[b, :, slots]], 1)         # (Hkv, h + w, D)
        values = torch.cat([v_hat[b, :, :h], window_v[b, :, slots]], 1)
        if pre_rope:
            keys = rope(keys, history_start[b] + torch.arange(h + w, device=DEVICE), inv_freq)
        expected = attention(q[b:b + 1, :, None], keys[None], values[None], torch.tensor([[h + w]], device=DEVICE))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE[DTYPE])


@pytest.mark.parametrize("meta", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits, scaling, n_groups", [(bits, "minmax", 4) for bits in WIDTHS] +
                         [(bits, "rms", n) for bits in WIDTHS if bits != 8 for n in (1, 3)])
def test_quantize_kernel_writes_what_token_quantizer_writes(bits, meta, D, rotate, scaling, n_groups):
    """Bit for bit: codes, scales and lows of the chosen rows; every other row untouched; with
    smoothing and, rotated, each token times a rotation after it; min-max with a clip, or rms
    (quant/uniform.py: no clip, no 8 bits) over one group and several."""
    B, Hkv, T, rows = 3, 2, 9, 6
    x = (torch.randn(B, Hkv, T, D, device=DEVICE) * torch.rand(Hkv, 1, D, device=DEVICE) * 3).to(DTYPE)
    smoothing = torch.rand(Hkv, D, device=DEVICE) + 0.5
    rotation = rotation_matrix(D, seed=int(torch.randint(100, ()))) if rotate else None
    quantizer = TokenQuantizer(bits, random_groups(Hkv, D, n_groups), clip=0.93 if scaling == "minmax" else 1.0,
                               meta_dtype=meta, smoothing=smoothing, rotation=rotation, scaling=scaling)
    store = TokenStore(quantizer, B, rows, DEVICE)
    codes, scale, low = store.codes, store.scale, store.low
    codes.random_(256)
    scale.copy_(torch.randn(B, Hkv, rows, n_groups, device=DEVICE))
    low.copy_(torch.randn(B, Hkv, rows, n_groups, device=DEVICE))
    before = [t.clone() for t in (codes, scale, low)]
    batch, source, row = (torch.tensor(v, device=DEVICE) for v in ([0, 2, 1, 2], [3, 8, 0, 5], [4, 0, -1, 5]))
    quantize_tokens(x, batch, source, row, store)
    expected = quantizer.quantize(x.transpose(1, 2))                       # each (B, T, Hkv, ...)
    written = torch.zeros(B, rows, dtype=torch.bool)
    for b, t, r in zip(batch.tolist(), source.tolist(), row.tolist()):
        if r >= 0:
            written[b, r] = True
            for got, want in zip((codes, scale, low), expected):
                assert torch.equal(got[b, :, r].view(torch.uint8), want[b, t].view(torch.uint8))
    for got, old in zip((codes, scale, low), before):
        assert torch.equal(got.transpose(1, 2)[~written].view(torch.uint8), old.transpose(1, 2)[~written].view(torch.uint8))


def cache_buffers(cache):
    if not hasattr(cache, "spec"):  # the fp16 cache
        return [cache.k, cache.v]
    stores = cache.key_stores + cache.value_stores
    return [cache.sink_k, cache.sink_v, cache.window_k, cache.window_v] + [t for s in stores for t in s.buffers()]


@pytest.mark.parametrize("kv", ["fp16", "skvq-k2v1.5", "skvq-k4v3:metadata=fp16", "skvq-k1v8:group-size=16",
                                "skvq-k3v2:rotation=none:pre-rope-keys", "svdq-k1.25v1.5",
                                "skvq-k2v1.5:rotation=hadamard:scaling=minmax",
                                "skvq-k3v2:group-size=32:rotation=hadamard-keys",
                                "skvq-k2v1.5:rotation=none:scaling=minmax", "skvq-k1v3:group-size=32:rotation=none"])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_write_kernel_writes_what_torch_writes(kv, D):
    """A decode step's write of one layer in one launch (kernels/quantize.py write_decode_token):
    bit for bit the sinks, ring and stores that the plain-torch step writes, for sequences whose
    new token lands in the sinks, in the window, and at each step that evicts a token (a block
    of 4 for SVDq) into the key and value stores, from random contents."""
    B, Hkv, max_context = 8, 2, 40
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=Hkv, head_dim=D, max_position_embeddings=64)
    spec = parse(f"{kv}:sinks=3:window=8" if kv != "fp16" else kv)
    spec = spec.with_settings(token_group=4) if spec.method == "svdq" else spec
    held = torch.tensor([0, 2, 3, 10, 11, 14, 18, 25], device=DEVICE)  # sinks, window, evictions (SVDq: 14, 18)
    k, v = (torch.randn(B, Hkv, D, device=DEVICE, dtype=DTYPE) * 3 for _ in range(2))
    caches = [make_cache(spec, cfg, B, max_context, DEVICE, DTYPE, use_kernels=use) for use in (True, False)]
    for buffers in zip(*map(cache_buffers, caches)):
        random = torch.randint(0, 256, buffers[0].shape, device=DEVICE, dtype=torch.uint8)
        value = random if buffers[0].dtype == torch.uint8 else torch.randn(buffers[0].shape, device=DEVICE) * 2
        for t in buffers:
            t.copy_(value)
    for cache in caches:
        cache.lengths.copy_(held)
        positions = cache.reserve(torch.ones_like(held), 1)
        if spec.quantized:
            cache._append(0, k, v, positions[:, 0])
        else:
            q = torch.zeros(B, 4, 1, D, device=DEVICE, dtype=DTYPE)
            cache.attend(0, q, k[:, :, None], v[:, :, None], positions)
    for got, want in zip(*map(cache_buffers, caches)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@triton.jit
def _e4m3_round_trip(bytes_ptr, values_ptr, again_ptr, n):
    i = tl.arange(0, 256)
    value = e4m3_to_float(tl.load(bytes_ptr + i, mask=i < n))
    tl.store(values_ptr + i, value, mask=i < n)
    tl.store(again_ptr + i, float_to_e4m3(value), mask=i < n)


def test_e4m3_bytes_convert_exactly_with_integer_operations():
    """Every e4m3 value but NaN, subnormals and -0 included: bits -> fp32 as torch reads them,
    and back to the same bits."""
    e4m3 = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8, device=DEVICE)
    values = torch.empty(len(e4m3), device=DEVICE)
    again = torch.empty_like(e4m3)
    _e4m3_round_trip[(1,)](e4m3, values, again, len(e4m3))
    assert torch.equal(values, e4m3.view(torch.float8_e4m3fn).float())
    assert torch.equal(again, e4m3)


def random_model(n_kv_heads, head_dim):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=head_dim,
                      max_position_embeddings=256)
    model = Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return model.to(DEVICE, DTYPE)


# The default, SVDq and fp16 by default; head_dim 128 and pre-RoPE SKVQ keys (minutes each under
# the interpreter) with --slow: the kernels' own tests above cover them on smaller shapes.
@pytest.mark.parametrize("kv, pre_rope, n_kv_heads, head_dim",
                         [("fp16", False, 4, 64), ("skvq-k2v1.5", False, 1, 64), ("svdq-k1.25v1.5", True, 2, 64)]
                         + [pytest.param(*case, marks=pytest.mark.slow) for case in
                            [("skvq-k2v1.5", True, 2, 128), ("skvq-k3v2", True, 1, 128),
                             ("skvq-k2v1.5:rotation=none:scaling=minmax", False, 2, 128)]])
def test_cache_decodes_through_kernels_as_through_torch(kv, pre_rope, n_kv_heads, head_dim):
    """A batch of prompts of different lengths, prefilled in chunks of 8 and decoded past the
    window: the kernel path (prefill attention over the held segments plus the causal chunk,
    fused eviction, decode over three segments, stage 2) gives the logits of the plain-torch
    path. SVDq keys here in blocks of 16 tokens."""
    # The two paths' K/V differ in the last float bits, so now and then a value at a rounding
    # boundary (of a code, or of an fp8 scale) quantizes differently and the logits move by ~1e-2
    # (seen once in about a dozen draws). The kernels' own tests above are exact on shared inputs;
    # this one checks the plumbing, from a fixed seed.
    torch.manual_seed(0)
    model = random_model(n_kv_heads, head_dim)
    cfg, lengths, n_decode = model.config, torch.tensor([23, 9]), 20
    tokens = torch.randint(0, 64, (2, 23 + n_decode), device=DEVICE)

    # SVDq keys in a fixed random basis, given as a calibration's: a prompt's own basis from an 8-token
    # chunk is degenerate, and its arbitrary null-space directions would differ between two float paths.
    # The calibration has no SKVQ tables, so every cache's channel groups are equal runs of 32.
    bases = {}
    for layer in range(cfg.num_hidden_layers):
        bases[f"svdq.basis.{layer}"] = torch.linalg.qr(torch.randn(n_kv_heads, head_dim, head_dim))[0]
        bases[f"svdq.mean.{layer}"] = torch.randn(n_kv_heads, head_dim)
    calibration = Calibration(bases, dict(layers=cfg.num_hidden_layers, group_sizes=[]))
    spec = parse(f"{kv}:sinks=3:window=8:group-size=32" if kv != "fp16" else kv)
    spec = spec.with_settings(token_group=16) if spec.method == "svdq" else spec
    spec = spec.with_settings(pre_rope_keys=True, rotation="none") if pre_rope and spec.method == "skvq" else spec

    def run(use_kernels):
        cache = make_cache(spec, cfg, 2, 23 + n_decode, DEVICE, DTYPE, calibration, use_kernels)
        logits = [prefill(model, tokens[:, :23], lengths.to(DEVICE), cache, chunk_size=8)]
        for _ in range(n_decode):
            next_token = tokens[torch.arange(2), cache.lengths]
            logits.append(decode_one_token(model, next_token, cache))
        return torch.stack(logits, 1)

    with torch.no_grad():
        torch.testing.assert_close(run(True), run(False), **TOLERANCE[DTYPE])


@pytest.mark.parametrize("group, D", [(1, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize("bits", [1.25, 2])
@pytest.mark.parametrize("shared_basis", [True, False])
def test_svdq_keys_decode_attention_matches_reference(group, D, bits, shared_basis):
    """SVDq latent keys rebuilt in-kernel (tl.dot with the basis, + mean, RoPE) with SKVQ values,
    against attention over the dequantized, rotated keys: history lengths 0, within a block and
    over several splits and blocks; one basis for all sequences or one each."""
    B, Hkv, G_tokens = 3, 2, 32
    capacity = 5 * G_tokens
    count = torch.tensor([0, 17, capacity])
    low_rank = torch.randn(Hkv, 8, D, device=DEVICE) * torch.logspace(1, -1, 8, device=DEVICE)[:, None]
    keys = torch.einsum("bthr,hrd->bhtd", torch.randn(B, capacity, Hkv, 8, device=DEVICE), low_rank)
    keys = (keys + 0.1 * torch.randn_like(keys) + torch.randn(Hkv, 1, D, device=DEVICE)).to(DTYPE)  # (B, Hkv, T, D)
    # One basis for every sequence, from the first one's keys; or each sequence's own.
    basis = basis_from_keys(keys[0].transpose(0, 1)) if shared_basis else (None, None)
    quantizer = svdq_keys(bits, Hkv, D, G_tokens, *basis)
    latent_keys = LatentStore(quantizer, B, capacity, DEVICE)
    for b in range(B):  # each sequence's own basis (no effect where the basis is shared)
        latent_keys.observe_prompt(b, keys[b])
    write_all(latent_keys, keys)
    k_hat = latent_keys.read(capacity)                                                  # (B, Hkv, T, D)
    stored_v, v_hat = packed(torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=DTYPE), 1.5, 1,
                             torch.float8_e4m3fn, smooth=True)
    q = torch.randn(B, Hkv * group, D, device=DEVICE, dtype=DTYPE)
    inv_freq = 1.0 / 10000 ** (torch.arange(D // 2, device=DEVICE) / (D // 2))
    start = torch.randint(0, 10, (B,))                                                   # position of row 0
    got = decode_attention(q, [Segment(latent_keys, stored_v, count.to(DEVICE), None, start.to(DEVICE))], inv_freq,
                           n_splits=5)
    for b in range(1, B):  # sequence 0 holds no token: nothing to compare
        n = int(count[b])
        k_rot = rope(k_hat[b, :, :n].to(DTYPE), start[b] + torch.arange(n, device=DEVICE), inv_freq)
        expected = attention(q[b:b + 1, :, None], k_rot[None], v_hat[b:b + 1, :, :n], torch.tensor([[n]], device=DEVICE))
        torch.testing.assert_close(got[b], expected[0, :, 0], **TOLERANCE[DTYPE])


@pytest.mark.parametrize("group, D, pre_rope, rotate", [(1, 64, False, False), (4, 128, True, False),
                                                       (8, 64, True, False), (4, 64, False, False),
                                                       (4, 128, False, True)])
def test_prefill_attention_matches_reference(group, D, pre_rope, rotate):
    """A chunk of queries (37 per sequence: not a whole number of query blocks; the second
    sequence's chunk shorter) over packed history (its channels rotated, or not), a ring window
    and itself, causally, against attention over the dequantized history, the window and the
    chunk's earlier tokens."""
    B, Hkv, capacity, W, Q = 2, 2, 70, 16, 37
    history_count, window_count, chunk_count = torch.tensor([70, 0]), torch.tensor([16, 5]), torch.tensor([37, 20])
    first_slot = torch.randint(W, (B,))
    history_start = torch.tensor([4, 4])
    window_start = history_start + history_count
    chunk_start = window_start + window_count                                   # the queries' positions
    q = torch.randn(B, Q, Hkv * group, D, device=DEVICE, dtype=DTYPE)
    stored_k, k_hat = packed(torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=DTYPE), 2, 4, torch.float8_e4m3fn,
                             smooth=pre_rope, rotate=rotate)
    stored_v, v_hat = packed(torch.randn(B, Hkv, capacity, D, device=DEVICE, dtype=DTYPE), 1.5, 1, torch.float16,
                             smooth=False, rotate=rotate)
    window_k, window_v, chunk_k, chunk_v = (torch.randn(B, Hkv, n, D, device=DEVICE, dtype=DTYPE) for n in (W, W, Q, Q))
    inv_freq = 1.0 / 10000 ** (torch.arange(D // 2, device=DEVICE) / (D // 2)) if pre_rope else None
    to = lambda t: t.to(DEVICE)
    segments = [Segment(stored_k, stored_v, to(history_count), None, to(history_start)),
                Segment(window_k, window_v, to(window_count), to(first_slot), to(window_start)),
                Segment(chunk_k, chunk_v, to(chunk_count), None, to(chunk_start), causal=True)]
    got = attend(q, segments, to(chunk_start), inv_freq)                         # (B, Q, H, D)
    for b in range(B):
        h, w, c = int(history_count[b]), int(window_count[b]), int(chunk_count[b])
        slots = (first_slot[b] + torch.arange(w)) % W
        keys = torch.cat([k_hat[b, :, :h], window_k[b, :, slots], chunk_k[b, :, :c]], 1)     # (Hkv, h + w + c, D)
        values = torch.cat([v_hat[b, :, :h], window_v[b, :, slots], chunk_v[b, :, :c]], 1)
        if pre_rope:
            keys = rope(keys, history_start[b] + torch.arange(h + w + c, device=DEVICE), inv_freq)
        # Key j (in this order) is at position history_start + j: the chunk's query i sees keys up to h + w + i.
        expected = attention(q[b:b + 1, :c].transpose(1, 2), keys[None], values[None],
                             (h + w + torch.arange(c, device=DEVICE))[None])              # (1, H, c, D)
        torch.testing.assert_close(got[b, :c], expected[0].transpose(0, 1), **TOLERANCE[DTYPE])
