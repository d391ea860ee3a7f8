"""Accuracy of each cache setting: python -m quant.eval --model DIR --text FILE

Prints a markdown table, one row per setting: bits per element including metadata, perplexity on
the text with every token scored as decoding would score it (quant/methods.py), and the relative
error of attention outputs against full precision on K/V captured from the model. With
--synthetic, the same error on synthetic keys with a few outlier channels.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import UserError, read_text, run_cli
from kernels.reference import attention
from model import Llama, apply_rope, rope_cos_sin
from quant import kvspec
from quant.calibrate import (
    CALIBRATION_FILE,
    Calibration,
    calibration_from,
    capture,
    load_calibration,
    quantizers_for,
    token_major,
    window_tokens,
)
from quant.kivi import kivi_quantizers
from quant.methods import SimulatedCache, per_block, simulated_cache

SKVQ_BITS = [(4, 4), (2, 2), (2, 1.5)]
# Issue 21: the old default (unrotated, min-max) without a calibration file beside rotated caches,
# min-max and rms (the default; rms takes nothing from a calibration).
ROTATED = ["skvq-k2v1.5:rotation=none:scaling=minmax", "skvq-k2v1.5:rotation=hadamard-keys:scaling=minmax",
           "skvq-k2v1.5:scaling=minmax", "skvq-k2v1.5", "skvq-k3v1.5"]
KIVI_BITS = [(4, 4), (2, 2)]
# SKVQ settings compared, as quant/kvspec.py writes them after `skvq-kKvV`. The default group size is
# 128 (head_dim 128: one group per head, where equal, head_pairs and kmeans coincide).
SKVQ_VARIANTS = ["grouping=equal:metadata=fp16", "group-size=32:grouping=equal:metadata=fp16",
                 "group-size=32:grouping=head_pairs:metadata=fp16", "group-size=32:grouping=kmeans:metadata=fp16",
                 "group-size=64:grouping=kmeans:metadata=fp16", "group-size=32:metadata=fp16", "metadata=fp16",
                 "group-size=32:grouping=head_pairs:metadata=fp16:pre-rope-keys",
                 "group-size=32:grouping=kmeans:metadata=fp16:pre-rope-keys",
                 "grouping=equal", "", "group-size=64:grouping=kmeans", "group-size=32:grouping=kmeans",
                 "group-size=32:grouping=head_pairs"]


def perplexity(model, ids: list[int], seq_len: int, cache_factory=None) -> float:
    """exp(mean NLL per token) over the consecutive seq_len-token windows of `ids` (text tokens,
    no BOS); a tail shorter than seq_len is dropped unless it is all there is. Each window is fed
    as quant/calibrate.py window_tokens says: [BOS] + window[:-1], so every token is predicted once."""
    n_windows = max(1, len(ids) // seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            inputs, targets = (torch.tensor(x, device=model.inv_freq.device)
                               for x in window_tokens(ids, w, seq_len, model.config.bos_token_id))
            inputs = inputs[None]                                                   # (1, T)
            positions = torch.arange(inputs.shape[1], device=inputs.device)[None]
            cache = cache_factory() if cache_factory else None
            logits = model(inputs, positions if cache else None, cache)
            total += F.cross_entropy(logits[0], targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def setting_row(spec, shape, calibration=None, name=None, values_exact=False, context=None, **simulation):
    """(name, bits per element incl. metadata, cache factory) of the simulated cache `spec` for a
    model of shape (n_layers, n_kv_heads, head_dim). values_exact: only its keys are quantized (a
    keys-only row); context: tokens a per-sequence SVDq basis is counted over."""
    keys, values = quantizers_for(spec, *shape, calibration)
    key_bits = keys[0].bits_per_element(context) if context else keys[0].bits_per_element()
    bits = key_bits if values_exact else (key_bits + values[0].bits_per_element()) / 2
    values = None if values_exact else values
    return name or str(spec), bits, lambda: simulated_cache(spec, keys, values, **simulation)


def settings(calibration: Calibration | None, shape: tuple, n_sink: int, window: int, inv_freq) -> list:
    """(name, bits per element incl. metadata, cache factory or None for full precision)."""
    rows = [("fp16", 16.0, None)]
    around = dict(sinks=n_sink, window=window)
    for k_bits, v_bits in KIVI_BITS:
        rows.append(setting_row(kvspec.parse(f"kivi-k{k_bits}v{v_bits}").with_settings(window=window), shape,
                                inv_freq=None))
    for k_bits, v_bits in SKVQ_BITS:  # what the engine runs without a calibration file
        spec = kvspec.parse(f"skvq-k{k_bits}v{v_bits}:group-size=32:grouping=equal:metadata=fp16")
        spec = spec.with_settings(**around)
        rows.append(setting_row(spec, shape, name=f"{spec}, uncalibrated: no clipping", inv_freq=inv_freq))
    if calibration is None:
        return rows
    for k_bits, v_bits in SKVQ_BITS:
        for variant in SKVQ_VARIANTS:
            spec = kvspec.parse(f"skvq-k{k_bits}v{v_bits}" + (variant and f":{variant}")).with_settings(**around)
            rows.append(setting_row(spec, shape, calibration, inv_freq=inv_freq))
    return rows


def rotated_settings(calibration: Calibration | None, shape: tuple, n_sink: int, window: int, inv_freq) -> list:
    """(name, bits per element incl. metadata, cache factory or None) of issue 21's comparison: the
    old default as a new user first ran it (no calibration) beside rotated caches, uncalibrated
    and, for min-max where there is a calibration, with its clip factors searched on rotated
    channels."""
    rows = [("fp16", 16.0, None)]
    for text in ROTATED:
        spec = kvspec.parse(text).with_settings(sinks=n_sink, window=window)
        rows.append(setting_row(spec, shape, name=f"{spec}, uncalibrated", inv_freq=inv_freq))
        if calibration is not None and spec.rotation != "none" and spec.scaling == "minmax":
            rows.append(setting_row(spec, shape, calibration, inv_freq=inv_freq))
    return rows


def scored(rows: list, model, ids: list[int], seq_len: int, captured: list, first_query: int) -> list:
    """(name, bits, perplexity, attention error) of each (name, bits, cache factory)."""
    out = []
    for name, bits, factory in tqdm(rows, desc="settings", file=sys.stderr):
        ppl = perplexity(model, ids, seq_len, factory)
        err = attention_error(factory() if factory else None, captured, first_query)
        out.append((name, bits, f"{ppl:.3f}", f"{err:.4f}"))
    return out


def attention_error(cache, captured: list, first_query: int) -> float:
    """Mean over layers of ||o - o_exact|| / ||o_exact|| for queries at positions >= first_query
    (earlier ones see no history). captured: per layer (q, k_pre, k_post, v), each [1, heads, T, D]."""
    if cache is None:
        return 0.0
    errors = []
    for layer, (q, k_pre, k_post, v) in enumerate(captured):
        positions = torch.arange(q.shape[2])[None]
        exact = attention(q, k_post, v, positions)
        got = cache.attend(layer, q, k_pre if cache.keys_pre_rope else k_post, v, positions)
        diff, ref = got[:, :, first_query:] - exact[:, :, first_query:], exact[:, :, first_query:]
        errors.append((diff.norm() / ref.norm()).item())
    return sum(errors) / len(errors)


def svdq_settings(calibration: Calibration, shape: tuple, n_sink: int, window: int, inv_freq, seq_len: int):
    """(name, bits per element incl. metadata, cache factory) comparing keys: SVDq at 1.25 and 2
    bits with a calibration or a prompt basis, KIVI's per-channel 2-bit keys, per-channel 2-bit
    keys in SVDq's blocks without its basis, SKVQ 2-bit keys (the default grouping); values exact.
    Then SVDq with SKVQ's default ternary values. A prompt basis is stored per sequence: its bits
    count it over seq_len."""
    around = dict(sinks=n_sink, window=window)
    rows = [("fp16", 16.0, None)]
    for bits in (1.25, 2):
        for basis in ("calibration", "prompt"):
            spec = kvspec.parse(f"svdq-k{bits}v1.5:svdq-basis={basis}").with_settings(**around)
            rows.append(setting_row(spec, shape, calibration, f"svdq-k{bits} keys, {basis} basis, values exact", True,
                                    seq_len if basis == "prompt" else None, inv_freq=inv_freq,
                                    prompt_tokens=seq_len // 2))
    kivi = kvspec.parse("kivi-k2v2").with_settings(window=window)
    name = f"{kivi} keys (groups of {kivi.token_group} tokens, all {window} quantized once gathered), post-RoPE"
    rows.append(setting_row(kivi, shape, name=f"{name}, values exact", values_exact=True, inv_freq=None))
    # SVDq's blocks and schedule with an identity basis and 2 bits for every channel: what the SVD adds.
    blocks = kvspec.Schedule(n_sink, window, 128)
    identity, _ = kivi_quantizers(kvspec.parse("kivi-k2v2:token-group=128"), *shape)
    for pre_rope in (False, True):
        rows.append((f"per-channel 2-bit keys in SVDq's blocks of 128 tokens (no basis), "
                     f"{'pre' if pre_rope else 'post'}-RoPE, values exact", identity[0].bits_per_element(),
                     lambda pre=pre_rope: SimulatedCache(per_block(identity, n_sink, 0), lambda layer, x: x, blocks,
                                                         blocks, pre, inv_freq if pre else None)))
    default = kvspec.DEFAULT.with_settings(**around)
    rows.append(setting_row(default, shape, calibration, f"{default} keys, post-RoPE, values exact", True,
                            inv_freq=inv_freq))
    for bits in (1.25, 2):
        rows.append(setting_row(kvspec.parse(f"svdq-k{bits}v1.5").with_settings(**around), shape, calibration,
                                inv_freq=inv_freq))
    return rows


def chunked_settings(calibration: Calibration, shape: tuple, n_sink: int, window: int, inv_freq):
    """(name, bits, cache factory): the default SKVQ cache and SVDq-1.25 with its values, scored
    as a prompt prefilled whole (every token exact: fp16's perplexity), in chunks of 512, 256 and
    128 tokens, and token by token (decoding)."""
    rows = [("whole prompt in one forward (exact, as fp16)", 16.0, None)]
    for chunk in (512, 256, 128, None):
        how = f"chunks of {chunk}" if chunk else "token by token (decoding)"
        for spec in (kvspec.DEFAULT, kvspec.parse("svdq-k1.25v1.5")):
            spec = spec.with_settings(sinks=n_sink, window=window)
            rows.append(setting_row(spec, shape, calibration, f"{spec}, {how}", inv_freq=inv_freq,
                                    prefill_chunk=chunk))
    return rows


def key_errors(cache, captured: list, n_sink: int, window: int):
    """Mean over layers of three relative errors against full precision, over what decoding reads
    from the history: the keys themselves (in the space each method quantizes: pre-RoPE for SVDq,
    post-RoPE otherwise), the attention scores q.k of history keys, and the attention outputs."""
    key_err, score_err = [], []
    for layer, (q, k_pre, k_post, v) in enumerate(captured):
        T, D = q.shape[2], q.shape[3]
        k = k_pre if cache.keys_pre_rope else k_post
        k_hat = cache.fake_keys(layer, k)
        history = cache.key_mask(T).to(q.device)                                 # (T, T) query p reads key j quantized
        quantized = history.any(0)                                               # keys that ever enter the history
        key_err.append(((k_hat - k)[:, :, quantized].norm() / k[:, :, quantized].norm()).item())
        if cache.keys_pre_rope:
            cos_sin = rope_cos_sin(torch.arange(T)[None], cache.inv_freq)
            k_hat = apply_rope(k_hat, *cos_sin)
        B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
        qg = q.view(B, Hkv, H // Hkv, T, D)
        scores = qg @ k_post.unsqueeze(2).transpose(-1, -2)                      # (B, Hkv, G, T, T)
        scores_hat = qg @ k_hat.unsqueeze(2).transpose(-1, -2)
        score_err.append(((scores_hat - scores)[..., history].norm() / scores[..., history].norm()).item())
    mean = lambda xs: sum(xs) / len(xs)
    return mean(key_err), mean(score_err), attention_error(cache, captured, n_sink + window)


def synthetic_attention_inputs(n_layers=2, T=1024, n_heads=8, n_kv_heads=2, D=128, seed=0):
    """Keys with a few outlier channels 20-50x larger than the rest, as real Llama keys have.
    Which channels are outliers is a fixed property of the "model" (calibration and evaluation
    draws share it); `seed` draws the tokens. Each query looks for one earlier key (a whitened
    copy of it plus noise), so attention is peaked as in trained models, not a near-uniform
    average that hides every error."""
    structure, g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n_layers):
        scale = torch.ones(n_kv_heads, 1, D)
        for h in range(n_kv_heads):
            outliers = torch.randperm(D // 2, generator=structure)[:3]
            # Outliers come in RoPE pairs (c, c + D/2), as pre-RoPE outliers rotate into both.
            big = 20 + 30 * torch.rand(3, generator=structure)
            scale[h, 0, outliers], scale[h, 0, outliers + D // 2] = big, big
        offset = torch.randn(n_kv_heads, 1, D, generator=structure) * scale
        white = torch.randn(n_kv_heads, T, D, generator=g)
        k = white * scale + offset                                                   # (Hkv, T, D)
        v = torch.randn(n_kv_heads, T, D, generator=g)
        target = (torch.rand(T, generator=g) * (torch.arange(T) + 1)).long()          # an earlier key per query
        group = n_heads // n_kv_heads
        sought = white[:, target].repeat_interleave(group, 0)                         # (H, T, D)
        q = (2.0 * sought + torch.randn(n_heads, T, D, generator=g)) / scale.repeat_interleave(group, 0)
        records.append((q[None], k[None], k[None], v[None]))  # no RoPE: pre- and post-RoPE keys agree
    return records


def quanto_perplexity(model_dir: Path, ids: list[int], seq_len: int, nbits: int):
    """The peer row: transformers' LlamaForCausalLM decoding token by token with its QuantizedCache
    (optimum-quanto backend, its defaults: group 64, residual 128). Returns (perplexity, bits per
    element of its quantized keys as stored). Test/benchmark-only dependency."""
    from transformers import LlamaForCausalLM, QuantizedCache

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_windows = max(1, len(ids) // seq_len)
    total, count, bits = 0.0, 0, None
    with torch.no_grad():
        for w in tqdm(range(n_windows), desc=f"transformers QuantizedCache {nbits}-bit", file=sys.stderr):
            inputs, targets = map(torch.tensor, window_tokens(ids, w, seq_len, hf.config.bos_token_id))
            cache = QuantizedCache(backend="quanto", config=hf.config, nbits=nbits, q_group_size=64, residual_length=128)
            for t in range(len(inputs)):
                logits = hf(inputs[None, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                total += F.cross_entropy(logits[None], targets[t:t + 1]).item()
                count += 1
            stored = cache.layers[0]._quantized_keys
            data = stored._data._data if hasattr(stored._data, "_data") else stored._data  # packed codes
            bits = 8 * (data.nbytes + stored._scale.nbytes + stored._shift.nbytes) / stored.numel()
    return math.exp(total / count), bits


def table(rows, columns) -> str:
    head = "| setting | bits/element (incl. metadata) | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for name, bits, *values in rows:
        lines.append(f"| {name} | {bits:.3f} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True, help="held-out text")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--window", type=int, default=kvspec.DEFAULT.window, help="recent tokens kept exact (KIVI: R)")
    p.add_argument("--sinks", type=int, default=kvspec.DEFAULT.sinks, help="first tokens kept exact (not KIVI's)")
    p.add_argument("--tables", default="main", type=lambda t: t.split(","),
                   help="comma-separated: main (every cache setting), rotated (the default beside rotated caches), "
                        "synthetic (outlier keys), svdq (SVDq keys against per-channel and SKVQ keys), chunked "
                        "(prefill in chunks)")
    p.add_argument("--peer", action="store_true",
                   help="add transformers' QuantizedCache (optimum-quanto) rows: slow, token by token")
    args = p.parse_args(argv)
    from engine.tokenizer import load_tokenizer

    model = Llama.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    ids = load_tokenizer(args.model).encode(read_text(args.text, "text"), bos=False)
    ids = ids[:args.max_tokens]
    seq_len = args.seq_len or model.config.max_position_embeddings
    calibration = load_calibration(args.model)
    if calibration is None:
        print(f"note: no calibration in {args.model} (run python -m quant.calibrate): SKVQ rows skipped",
              file=sys.stderr)
    unknown = set(args.tables) - {"main", "rotated", "synthetic", "svdq", "chunked"}
    if unknown:
        raise UserError(f"--tables: unknown table(s) {', '.join(sorted(unknown))} "
                        "(main, rotated, synthetic, svdq, chunked)")
    if calibration is None and {"svdq", "chunked"} & set(args.tables):
        raise UserError(f"--tables svdq and chunked need {args.model}/{CALIBRATION_FILE} (python -m quant.calibrate)")
    captured = capture(model, ids, seq_len, max_windows=1).records  # one window's (q, k_pre, k_post, v) per layer
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    n_scored = min(len(ids), max(1, len(ids) // seq_len) * seq_len)
    heading = (f"Perplexity on {args.text.name} ({n_scored} tokens, windows of {seq_len}), "
               f"{args.sinks} sinks, window {args.window}")
    if "main" in args.tables:
        rows = scored(settings(calibration, shape, args.sinks, args.window, model.inv_freq), model, ids, seq_len,
                      captured, args.sinks + args.window)
        if args.peer:
            for nbits in (4, 2):
                ppl, bits = quanto_perplexity(args.model, ids, seq_len, nbits)
                rows.append((f"transformers QuantizedCache, quanto int{nbits} (group 64, residual 128)", bits,
                             f"{ppl:.3f}", "n/a"))
        print(f"{heading}:\n")
        print(table(rows, ["perplexity", "attention rel. error"]))
    if "rotated" in args.tables:
        rows = scored(rotated_settings(calibration, shape, args.sinks, args.window, model.inv_freq), model, ids,
                      seq_len, captured, args.sinks + args.window)
        print(f"\nRotated caches (issue 21). {heading}:\n")
        print(table(rows, ["perplexity", "attention rel. error"]))
    if "synthetic" in args.tables:
        print_synthetic(args.sinks, args.window)
    if "svdq" in args.tables:
        rows = []
        for name, bits, factory in tqdm(svdq_settings(calibration, shape, args.sinks, args.window,
                                                      model.inv_freq, seq_len), desc="svdq", file=sys.stderr):
            ppl = perplexity(model, ids, seq_len, factory)
            errors = key_errors(factory(), captured, args.sinks, args.window) if factory else (0.0, 0.0, 0.0)
            rows.append((name, bits, f"{ppl:.3f}", *(f"{e:.4f}" for e in errors)))
        print(f"\nSVDq keys against per-channel and SKVQ keys. {heading}:\n")
        print(table(rows, ["perplexity", "key rel. error", "score rel. error", "attention rel. error"]))
    if "chunked" in args.tables:
        rows = []
        for name, bits, factory in tqdm(chunked_settings(calibration, shape, args.sinks, args.window,
                                                         model.inv_freq), desc="chunked", file=sys.stderr):
            rows.append((name, bits, f"{perplexity(model, ids, seq_len, factory):.3f}"))
        print(f"\nPrefill in chunks: each chunk reads the history as stored and itself exactly. {heading}:\n")
        print(table(rows, ["perplexity"]))


def print_synthetic(n_sink, window):
    calib_records = synthetic_attention_inputs(seed=1)  # calibrate on other draws of the same law
    records = synthetic_attention_inputs(seed=0)
    _, n_kv_heads, T, D = records[0][1].shape
    calibration = calibration_from(token_major(calib_records, len(calib_records)), len(records), [32, 64, 128])
    rows = [(name, bits, f"{attention_error(f() if f else None, records, n_sink + window):.4f}")
            for name, bits, f in settings(calibration, (len(records), n_kv_heads, D), n_sink, window, inv_freq=None)
            if "pre-rope-keys" not in name]  # synthetic keys have no RoPE
    print(f"\nSynthetic keys ({len(records)} layers, {n_kv_heads} KV heads x {D} channels, "
          f"{records[0][0].shape[1]} query heads, {T} tokens; 3 RoPE-pair outlier channels per head at 20-50x):\n")
    print(table(rows, ["attention rel. error"]))

if __name__ == "__main__":
    run_cli(main)
