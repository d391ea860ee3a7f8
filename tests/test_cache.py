"""The quantized cache: layout invariants, exactness without history, quantizer error bounds."""
import pytest
import torch

from cli import UserError
from engine.cache import KVCache, make_cache
from engine.runner import decode_one_token, generate, prefill
from model import Llama, LlamaConfig
from quant.kvspec import parse
from quant.packing import n_levels
from quant.skvq import TokenQuantizer, equal_groups, head_pair_groups, kmeans_groups
from quant.uniform import dequantize_groups, quantize_groups

WIDTHS = [1, 1.5, 2, 3, 4, 8]


def tiny_config(**kw):
    return LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512), **kw})


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("meta", [torch.float16, torch.float8_e4m3fn])
def test_group_quantization_error_bound(bits, meta):
    """|x - x_hat| <= scale / 2 against a float64 evaluation, scale as stored; clip=1 keeps every
    element inside [low, low + (levels - 1) * scale] up to the metadata's rounding."""
    x = torch.randn(64, 96) * torch.rand(1, 96) * 4 + torch.randn(1, 96)
    group_index = torch.arange(96) // 32
    codes, scale, low = quantize_groups(x, bits, group_index, 3, meta_dtype=meta)
    assert codes.dtype == torch.uint8 and int(codes.max()) < n_levels(bits)
    x_hat = dequantize_groups(codes, scale, low, group_index).double()
    s = scale.double().gather(-1, group_index.expand(64, 96))
    lo = low.double().gather(-1, group_index.expand(64, 96))
    x64 = x.double()
    # Elements that fall outside the stored range (rounding of low/scale) are clamped to its ends.
    top = lo + (n_levels(bits) - 1) * s
    reference = x64.clamp(lo, top)
    assert bool(((x_hat - reference).abs() <= s / 2 + 1e-6).all())
    overshoot = (x64 - reference).abs()
    rel_meta_error = 2 ** -10 if meta == torch.float16 else 2 ** -3
    span = (x64.view(64, 3, 32).amax(-1) - x64.view(64, 3, 32).amin(-1)).repeat_interleave(32, -1)
    assert bool((overshoot <= rel_meta_error * (span + lo.abs()) + 1e-6).all())


@pytest.mark.parametrize("meta", [torch.float16, torch.float8_e4m3fn])
def test_rms_scaling_beats_min_max_on_gaussian_groups_at_two_bits(meta):
    """After a rotation a token's channels are near-Gaussian: there rms's zero-centred grid must
    reconstruct with less squared error than min-max (0.11 against 0.20 per unit variance on 64
    channels of a unit Gaussian, fp16 metadata)."""
    x = torch.randn(2000, 128) * (torch.rand(2000, 1) * 3 + 0.1)
    group_index = torch.arange(128) // 64
    error = {scaling: (dequantize_groups(*quantize_groups(x, 2, group_index, 2, meta_dtype=meta, scaling=scaling),
                                         group_index) - x).pow(2).sum() / x.pow(2).sum()
             for scaling in ("minmax", "rms")}
    assert error["rms"] < 0.7 * error["minmax"]


@pytest.mark.parametrize("bits", [1, 1.5, 2, 3, 4])
@pytest.mark.parametrize("meta", [torch.float16, torch.float8_e4m3fn])
def test_rms_scaling_grid_is_zero_centred(bits, meta):
    """low = -(levels - 1) / 2 * scale before each is rounded to the metadata dtype: the stored
    pair agrees to that rounding (exactly for ternary, whose low is -scale), and the step is
    within the multipliers' range (0.8..1.2) of the Gaussian step times the group's RMS."""
    from quant.uniform import GAUSSIAN_STEP
    x = torch.randn(300, 96) * (torch.rand(300, 1) * 3 + 0.1)
    group_index = torch.arange(96) // 32
    codes, scale, low = quantize_groups(x, bits, group_index, 3, meta_dtype=meta, scaling="rms")
    half = (n_levels(bits) - 1) / 2
    rounding = 2 ** -10 if meta == torch.float16 else 2 ** -3
    assert torch.allclose(low.float(), -half * scale.float(), rtol=2.5 * rounding, atol=0)
    if bits == 1.5:
        assert torch.equal(low.float(), -scale.float())
    step = scale.float() / (GAUSSIAN_STEP[n_levels(bits)] * x.view(300, 3, 32).pow(2).mean(-1).sqrt())
    assert bool((step > 0.8 * (1 - rounding)).all() and (step < 1.2 * (1 + rounding)).all())


@pytest.mark.parametrize("make_groups", ["equal", "head_pairs", "kmeans"])
@pytest.mark.parametrize("bits", WIDTHS)
def test_token_quantizer_round_trip(make_groups, bits):
    Hkv, D = 2, 64
    x = torch.randn(3, 7, Hkv, D) * torch.linspace(0.1, 20, Hkv * D)[torch.randperm(Hkv * D)].view(Hkv, D)
    ranges = x.abs().amax((0, 1))
    groups = {"equal": lambda: equal_groups(Hkv, D, 32),
              "head_pairs": lambda: head_pair_groups(ranges, 32),
              "kmeans": lambda: kmeans_groups(x.amin((0, 1)), x.amax((0, 1)), 2)}[make_groups]()
    assert groups.group_index.shape == (Hkv, D) and groups.n_groups == 2
    assert int(groups.group_index.min()) >= 0 and int(groups.group_index.max()) < 2
    q = TokenQuantizer(bits, groups)
    packed, scale, low = q.quantize(x)
    assert packed.shape == (3, 7, Hkv, q.code_bytes) and scale.shape == (3, 7, Hkv, groups.n_groups)
    x_hat = q.dequantize(packed, scale, low)
    # Per channel, the error is at most half its group's step.
    step = scale.float().gather(-1, groups.group_index.expand(3, 7, Hkv, D))
    assert bool(((x_hat - x).abs() <= step / 2 + 1e-3 * x.abs() + 1e-5).all())
    if make_groups == "head_pairs":  # a pair (c, c + D/2) always shares a group, of D/2 channels
        assert torch.equal(groups.group_index[:, :D // 2], groups.group_index[:, D // 2:])
        assert bool((groups.group_index.sum(-1) == D // 2).all())


def fill(cache, cfg, lengths, n_decode):
    """Prefill random prompts of `lengths` then decode n_decode random tokens, through attend().
    Returns the true K, V per sequence [B, Hkv, T, D] in position order."""
    B, Hkv, H, D = len(lengths), cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    T = max(lengths) + n_decode
    k_all, v_all = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    positions = cache.reserve(torch.tensor(lengths), max(lengths))
    for layer in range(cfg.num_hidden_layers):
        cache.attend(layer, torch.randn(B, H, max(lengths), D), k_all[:, :, :max(lengths)],
                     v_all[:, :, :max(lengths)], positions)
    for _ in range(n_decode):  # each sequence's decode tokens follow its own prompt
        positions = cache.reserve(torch.ones(B, dtype=torch.long), 1)
        at = torch.arange(B), slice(None), positions[:, 0]
        for layer in range(cfg.num_hidden_layers):
            cache.attend(layer, torch.randn(B, H, 1, D), k_all[at][:, :, None], v_all[at][:, :, None], positions)
    return k_all, v_all


# Three random draws through torch; through the interpreted kernels one by default (minutes each).
@pytest.mark.parametrize("trial, use_kernels", [(trial, False) for trial in range(3)] + [(0, True)]
                         + [pytest.param(trial, True, marks=pytest.mark.slow) for trial in (1, 2)])
def test_cache_invariants(trial, use_kernels):
    """Sinks hold the first S tokens, the window exactly the last W, the history every token in
    between, in order, each quantized once; rows past the history stay untouched. The same with
    the Triton eviction kernels (under the interpreter on the CPU)."""
    cfg = tiny_config()
    S, W = int(torch.randint(0, 6, ())), int(torch.randint(1, 20, ()))
    B = int(torch.randint(1, 4, ()))
    lengths = torch.randint(1, 40, (B,)).tolist()
    n_decode = int(torch.randint(0, 30, ()))
    spec = parse(f"skvq-k2v1.5:sinks={S}:window={W}:group-size=8")
    cache = make_cache(spec, cfg, B, max(lengths) + n_decode, "cpu", torch.float32, use_kernels=use_kernels)
    k_all, v_all = fill(cache, cfg, lengths, n_decode)
    for b in range(B):
        n = lengths[b] + n_decode
        assert int(cache.lengths[b]) == n
        for layer in range(cfg.num_hidden_layers):
            assert torch.equal(cache.sink_k[layer, b, :, :min(S, n)], k_all[b, :, :min(S, n)])
            recent = torch.arange(min(n, max(S, n - W)), n)
            assert torch.equal(cache.window_v[layer, b, :, (recent - S) % W], v_all[b, :, recent])
            n_hist = max(n - W - S, 0)
            for store, x in [(cache.key_stores[layer], k_all), (cache.value_stores[layer], v_all)]:
                rows = [t[b, :, :n_hist].transpose(0, 1) for t in (store.codes, store.scale, store.low)]
                expected = store.quantizer.fake_quantize(x[b, :, S:S + n_hist].transpose(0, 1))  # (n_hist, Hkv, D)
                assert torch.equal(store.quantizer.dequantize(*rows), expected)
                assert int(store.codes[b, :, n_hist:].count_nonzero()) == 0


@pytest.mark.parametrize("pre_rope", [False, True])
def test_window_covering_everything_equals_fp16_cache(pre_rope):
    """With the window large enough that nothing is quantized, the quantized cache computes
    what the unquantized one does, to fp32 rounding (sinks and window are separate segments of
    the online softmax, the unquantized cache one)."""
    torch.manual_seed(int(torch.randint(1000, ())))
    cfg = tiny_config()
    model = Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    lengths, T = torch.tensor([9, 14]), 30
    tokens = torch.randint(0, 64, (2, 14))
    fp16 = KVCache(cfg, 2, T, "cpu", torch.float32)
    spec = parse(f"skvq-k2v2:sinks=3:window={T - 3}:group-size=8" + (":rotation=none:pre-rope-keys" if pre_rope else ""))
    quantized = make_cache(spec, cfg, 2, T, "cpu", torch.float32)
    a, b = prefill(model, tokens, lengths, fp16), prefill(model, tokens, lengths, quantized)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for _ in range(T - 14):
        token = a.argmax(-1)
        a, b = decode_one_token(model, token, fp16), decode_one_token(model, token, quantized)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_decode_attends_to_dequantized_history(pre_rope):
    """Past the window, attention sees sinks and window exactly and history dequantized."""
    cfg = tiny_config()
    S, W, lengths, n_decode = 2, 5, [17, 9], 6
    spec = parse(f"skvq-k3v2:sinks={S}:window={W}:group-size=8" + (":rotation=none:pre-rope-keys" if pre_rope else ""))
    cache = make_cache(spec, cfg, 2, 30, "cpu", torch.float32)
    k_all, v_all = fill(cache, cfg, lengths, n_decode)
    n = cache.lengths
    keys, values = cache._materialize(0, n)
    for b in range(2):
        T = int(n[b])
        hist = slice(S, T - W)
        for x_all, got, quantizer, rope in [(k_all, keys, cache.key_stores[0].quantizer, pre_rope),
                                            (v_all, values, cache.value_stores[0].quantizer, False)]:
            expected = x_all[b, :, :T].clone()                                  # (Hkv, T, D)
            expected[:, hist] = quantizer.fake_quantize(x_all[b, :, hist].transpose(0, 1)).transpose(0, 1)
            if rope:
                expected = cache._rope(expected[None], torch.arange(T)[None])[0]
            assert torch.allclose(got[b, :, :T], expected, atol=1e-6)


@pytest.mark.parametrize("bits", WIDTHS)
def test_smoothing_divides_before_and_multiplies_after(bits):
    from quant.skvq import smoothing_factors

    Hkv, D = 2, 64
    x = torch.randn(5, Hkv, D) * torch.linspace(0.1, 30, Hkv * D)[torch.randperm(Hkv * D)].view(Hkv, D)
    s = smoothing_factors(x.abs().amax(0))
    assert torch.equal(s[:, :D // 2], s[:, D // 2:])  # commutes with RoPE
    groups = equal_groups(Hkv, D, 32)
    smoothed = TokenQuantizer(bits, groups, smoothing=s)
    expected = TokenQuantizer(bits, groups).fake_quantize(x / s) * s
    torch.testing.assert_close(smoothed.fake_quantize(x), expected)


@pytest.mark.parametrize("D, gain", [(16, 1), (64, 1.5), (128, 1.5), (80, 0.9)])
def test_rotation_is_orthogonal_and_its_quantization_round_trips(D, gain):
    """R R^T = I to fp32 precision; for a power of two every entry +-1/sqrt(D) (a Hadamard matrix
    with signs), another layer's seed another matrix. Quantized with R: x_hat = (codes of x R) R^T,
    each rotated channel within half a step; and on keys with an outlier channel (as real keys have)
    the 2-bit error falls against the unrotated quantizer's: by a third or more where a Hadamard
    matrix spreads the outlier evenly over 64 channels or more (a random orthogonal one, for D = 80,
    spreads it as a Gaussian, whose extremes the range still sees: about the same error, within
    10% on fresh draws)."""
    from quant.skvq import rotation_matrix

    R = rotation_matrix(D, seed=3)
    torch.testing.assert_close(R @ R.T, torch.eye(D), rtol=0, atol=1e-6)
    assert not torch.equal(R, rotation_matrix(D, seed=4)) and torch.equal(R, rotation_matrix(D, seed=3))
    if D & (D - 1) == 0:
        assert torch.equal(R.abs(), torch.full((D, D), D ** -0.5))
    Hkv = 2
    x = torch.randn(50, Hkv, D)
    x[..., 5] *= 30  # an outlier channel
    for bits in WIDTHS:
        rotated = TokenQuantizer(bits, equal_groups(Hkv, D, D // 2), rotation=R)
        packed, scale, low = rotated.quantize(x)
        x_hat = rotated.dequantize(packed, scale, low)
        step = scale.float().repeat_interleave(D // 2, -1)                                # (50, Hkv, D)
        assert bool(((x_hat @ R - x @ R).abs() <= step / 2 + 1e-3 * (x @ R).abs() + 1e-4).all())
    plain_error = (TokenQuantizer(2, equal_groups(Hkv, D, D)).fake_quantize(x) - x).norm()
    rotated_error = (TokenQuantizer(2, equal_groups(Hkv, D, D), rotation=R).fake_quantize(x) - x).norm()
    assert rotated_error < plain_error / gain


def test_chunked_prefill_of_the_fp16_cache_is_exact():
    """Chunks of 8 give the logits of one forward, for a padded batch whose shorter prompt ends
    in an early chunk, and decoding goes on identically."""
    model = Llama(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    tokens, lengths = torch.randint(0, 64, (2, 30)), torch.tensor([30, 11])
    caches = [KVCache(model.config, 2, 40, "cpu", torch.float32) for _ in range(2)]
    chunked, whole = prefill(model, tokens, lengths, caches[0], chunk_size=8), prefill(model, tokens, lengths, caches[1])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for _ in range(5):
        token = whole.argmax(-1)
        chunked, whole = decode_one_token(model, token, caches[0]), decode_one_token(model, token, caches[1])
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", ["fp16", "skvq-k2v1.5:window=4:sinks=2:group-size=8", "svdq-k2v1.5:window=4:token-group=4"])
def test_generating_past_the_capacity_is_a_clear_error(kv):
    """The Python API's counterpart of generate.py's planning: a forward that would not fit."""
    model = Llama(tiny_config())
    cache = make_cache(parse(kv), model.config, 2, 20, "cpu", torch.float32)
    prompts = [list(range(1, 11)), list(range(1, 6))]
    tokens = generate(model, cache, prompts, 12, eos_ids=[])
    for _ in range(11):  # 10 prompt tokens and 10 new fill the 20; the 11th new one comes from their logits
        next(tokens)
    with pytest.raises(UserError, match="the cache holds 20 tokens per sequence .max_context.; 20 are reserved "
                                        "and this forward adds 1"):
        next(tokens)
    with pytest.raises(UserError, match="0 are reserved and this forward adds 21"):
        next(generate(model, make_cache(parse(kv), model.config, 1, 20, "cpu", torch.float32), [[1] * 21], 1, []))


def test_a_short_context_allocates_no_longer_ring_than_it_needs():
    """A 14-token context of the default cache (5 sinks, 128-token window): 5 sink and 9 ring
    slots, and the text of the fp16 cache (nothing is quantized)."""
    model = Llama(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    quantized = make_cache(parse("skvq-k2v1.5:group-size=8"), model.config, 1, 14, "cpu", torch.float32)
    assert quantized.sink_k.shape[3] == 5 and quantized.window_k.shape[3] == 9
    fp16 = KVCache(model.config, 1, 14, "cpu", torch.float32)
    assert quantized.nbytes() == fp16.nbytes()
    prompt = [[3, 9, 4, 1, 7]]
    assert [int(t) for t in generate(model, quantized, prompt, 10, [])] == \
        [int(t) for t in generate(model, fp16, prompt, 10, [])]
    every_sink = make_cache(parse("skvq-k2v1.5:sinks=100000000000:group-size=8"), model.config, 1, 14, "cpu",
                            torch.float32)
    assert every_sink.sink_k.shape[3] == 14 and every_sink.window_k.shape[3] == 1


def test_caches_refuse_what_they_cannot_run():
    cfg = tiny_config()
    with pytest.raises(UserError, match="kivi-k2v2 is simulated only"):
        make_cache(parse("kivi-k2v2"), cfg, 1, 20, "cpu", torch.float32)
    with pytest.raises(UserError, match="group-size 12 must divide head_dim 16"):
        make_cache(parse("skvq-k2v1.5:group-size=12"), cfg, 1, 20, "cpu", torch.float32)
