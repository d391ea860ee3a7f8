"""Accuracy of each cache setting: python -m quant.eval --model DIR --text FILE

Prints markdown tables. The main one has a row per cache the engine offers (calibrated and not),
KIVI's and, with --peer, transformers' quantized caches: bits per element including metadata
(for the model's own head_dim), and what a user feels: perplexity on the text with every token
scored as decoding would score it (quant/methods.py), the mean KL divergence of each next-token
distribution from the fp16 cache's (full vocabulary), how often its top token is fp16's, and the
relative error of attention outputs on K/V captured from the model. KL and top-1 come from the
same simulated forward as the perplexity, against one fp16 forward per window. `--tables
retrieval`: a pass key planted in the text, read back greedily through the engine's real cache
(engine/cache.py make_cache, engine/runner.py prefill and decode). Windows of text are fed after
the ids the tokenizer puts before a prompt, as generate.py feeds prompts. Other tables: synthetic
(outlier keys), svdq, chunked, groupings. Every flag is checked before the model loads.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import ArgumentParser, FlagError, UserError, comma_list, non_negative_int, positive_int, read_text, run_cli
from kernels.reference import attention
from model import Llama, apply_rope, rope_cos_sin
from quant import kvspec
from quant.calibrate import (
    CALIBRATION_FILE,
    Calibration,
    calibration_from,
    calibrated,
    capture,
    load_calibration,
    model_config,
    n_windows,
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
# The caches the engine offers besides its default (quant/kvspec.py DEFAULT), in the main table.
ENGINE_CACHES = ["skvq-k2v1.5", "svdq-k2v1.5", "skvq-k4v4", "svdq-k1.25v1.5", "skvq-k2v2"]
TABLES = ("main", "rotated", "retrieval", "synthetic", "svdq", "chunked", "groupings")
# SKVQ settings compared, as quant/kvspec.py writes them after `skvq-kKvV`. The default group size is
# 128 (head_dim 128: one group per head, where equal, head_pairs and kmeans coincide).
SKVQ_VARIANTS = ["grouping=equal:metadata=fp16", "group-size=32:grouping=equal:metadata=fp16",
                 "group-size=32:grouping=head_pairs:metadata=fp16", "group-size=32:grouping=kmeans:metadata=fp16",
                 "group-size=64:grouping=kmeans:metadata=fp16", "group-size=32:metadata=fp16", "metadata=fp16",
                 "group-size=32:grouping=head_pairs:metadata=fp16:pre-rope-keys",
                 "group-size=32:grouping=kmeans:metadata=fp16:pre-rope-keys",
                 "grouping=equal", "", "group-size=64:grouping=kmeans", "group-size=32:grouping=kmeans",
                 "group-size=32:grouping=head_pairs"]


class Scores:
    """Sums over scored tokens of the negative log-likelihood, the KL divergence of the next-token
    distribution from the reference's (fp16), and agreements of the top token with its."""

    def __init__(self):
        self.nll = self.kl = self.agree = 0.0
        self.count = 0

    def add(self, logits, targets, reference=None):
        """logits [T, V] predicting targets [T]; reference [T, V] fp16's log-probabilities."""
        logp = logits.float().log_softmax(-1)
        self.nll += F.nll_loss(logp, targets, reduction="sum").item()
        if reference is not None:
            self.kl += F.kl_div(logp, reference, log_target=True, reduction="sum").item()
            self.agree += (logp.argmax(-1) == reference.argmax(-1)).sum().item()
        self.count += targets.numel()

    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)

    def columns(self) -> list[str]:
        return [f"{self.perplexity():.3f}", f"{self.kl / self.count:.4f}", f"{self.agree / self.count:.3f}"]


def score(model, ids: list[int], seq_len: int, prefix: list[int], cache_factory=None, references=None) -> Scores:
    """Scores over the consecutive seq_len-token windows of `ids` (text tokens, no BOS; quant/calibrate.py
    n_windows), each fed after `prefix` as window_tokens says, so every token is predicted once;
    against references (one [T, V] log-probability tensor per window), if given."""
    scores = Scores()
    with torch.no_grad():
        for w in range(n_windows(len(ids), seq_len)):
            inputs, targets = (torch.tensor(x, device=model.inv_freq.device)
                               for x in window_tokens(ids, w, seq_len, prefix))
            inputs = inputs[None]                                                   # (1, T)
            positions = torch.arange(inputs.shape[1], device=inputs.device)[None]
            cache = cache_factory() if cache_factory else None
            logits = model(inputs, positions if cache else None, cache)[0]          # (T, V)
            scores.add(logits, targets, references and references[w])
    return scores


def perplexity(model, ids: list[int], seq_len: int, prefix: list[int], cache_factory=None) -> float:
    return score(model, ids, seq_len, prefix, cache_factory).perplexity()


def reference_logprobs(model, ids: list[int], seq_len: int, prefix: list[int]) -> list:
    """fp16's (the full-precision forward's) log-probabilities [T, V] per window: computed once, kept."""
    references = []
    with torch.no_grad():
        for w in range(n_windows(len(ids), seq_len)):
            inputs = torch.tensor(window_tokens(ids, w, seq_len, prefix)[0], device=model.inv_freq.device)[None]
            references.append(model(inputs)[0].float().log_softmax(-1))
    return references


def setting_row(spec, shape, calibration=None, name=None, values_exact=False, context=None, **simulation):
    """(name, bits per element incl. metadata, cache factory) of the simulated cache `spec` for a
    model of shape (n_layers, n_kv_heads, head_dim). values_exact: only its keys are quantized (a
    keys-only row); context: tokens a per-sequence SVDq basis is counted over."""
    keys, values = quantizers_for(spec, *shape, calibration)
    key_bits = keys[0].bits_per_element(context) if context else keys[0].bits_per_element()
    bits = key_bits if values_exact else (key_bits + values[0].bits_per_element()) / 2
    values = None if values_exact else values
    return name or str(spec), bits, lambda: simulated_cache(spec, keys, values, **simulation)


def engine_settings(calibration: Calibration | None, shape: tuple, n_sink: int, window: int, inv_freq,
                    seq_len: int) -> list:
    """(name, bits per element incl. metadata, cache factory or None for fp16): fp16, KIVI as its
    released code runs, and every cache the engine offers (its default first) as the engine runs
    it: with the calibration where it holds the cache's tables, and without (as the engine runs
    with no calibration file: equal groups, no smoothing or clipping; SVDq keys in each prompt's
    basis, stored per sequence: its bits count it over seq_len)."""
    rows = [("fp16", 16.0, None)]
    for k_bits, v_bits in KIVI_BITS:
        rows.append(setting_row(kvspec.parse(f"kivi-k{k_bits}v{v_bits}").with_settings(window=window), shape,
                                inv_freq=None))
    specs = [kvspec.DEFAULT] + [s for s in map(kvspec.parse, ENGINE_CACHES) if s != kvspec.DEFAULT]
    for spec in specs:
        spec = spec.with_settings(sinks=n_sink, window=window)
        if calibrated(spec, shape[2], calibration):
            rows.append(setting_row(spec, shape, calibration, inv_freq=inv_freq))
        context = seq_len if spec.method == "svdq" else None
        rows.append(setting_row(spec, shape, None, f"{spec}, uncalibrated", context=context, inv_freq=inv_freq))
    return rows


def grouping_settings(calibration: Calibration, shape: tuple, n_sink: int, window: int, inv_freq) -> list:
    """(name, bits, cache factory): SKVQ at each width of SKVQ_BITS, uncalibrated with groups of
    32 channels in order, then in each calibrated variant of SKVQ_VARIANTS whose tables the
    calibration holds (python -m quant.calibrate --groupings all --group-sizes 32,64,128)."""
    rows = [("fp16", 16.0, None)]
    around = dict(sinks=n_sink, window=window)
    for k_bits, v_bits in KIVI_BITS:
        rows.append(setting_row(kvspec.parse(f"kivi-k{k_bits}v{v_bits}").with_settings(window=window), shape,
                                inv_freq=None))
    for k_bits, v_bits in SKVQ_BITS:  # what the engine runs without a calibration file
        spec = kvspec.parse(f"skvq-k{k_bits}v{v_bits}:group-size=32:grouping=equal:metadata=fp16")
        spec = spec.with_settings(**around)
        rows.append(setting_row(spec, shape, name=f"{spec}, uncalibrated: no clipping", inv_freq=inv_freq))
    for k_bits, v_bits in SKVQ_BITS:
        for variant in SKVQ_VARIANTS:
            spec = kvspec.parse(f"skvq-k{k_bits}v{v_bits}" + (variant and f":{variant}")).with_settings(**around)
            if calibrated(spec, shape[2], calibration):
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


def quanto_scores(model_dir: Path, ids: list[int], seq_len: int, prefix: list[int], nbits: int, references):
    """The peer row: transformers' LlamaForCausalLM decoding token by token with its QuantizedCache
    (optimum-quanto backend, its defaults: group 64, residual 128), each window fed as `score`
    feeds it. Returns (Scores against fp16's references, bits per element of its quantized keys as
    stored). Test/benchmark-only dependency."""
    from transformers import LlamaForCausalLM, QuantizedCache

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores, bits = Scores(), None
    with torch.no_grad():
        for w in tqdm(range(n_windows(len(ids), seq_len)), desc=f"transformers QuantizedCache {nbits}-bit",
                      file=sys.stderr):
            inputs, targets = map(torch.tensor, window_tokens(ids, w, seq_len, prefix))
            cache = QuantizedCache(backend="quanto", config=hf.config, nbits=nbits, q_group_size=64, residual_length=128)
            logits = torch.cat([hf(inputs[None, t:t + 1], past_key_values=cache, use_cache=True).logits[0]
                                for t in range(len(inputs))])                         # (T, V)
            scores.add(logits, targets, references[w])
            stored = cache.layers[0]._quantized_keys
            data = stored._data._data if hasattr(stored._data, "_data") else stored._data  # packed codes
            bits = 8 * (data.nbytes + stored._scale.nbytes + stored._shift.nbytes) / stored.numel()
    return scores, bits


# The pass-key test (as in Landmark Attention and LongBench's passkey retrieval): a number said
# once somewhere in a long document of unrelated real text, then asked for.
INTRO = "There is a pass key hidden inside the text below. Find it and remember it.\n\n"
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


def passkey_prompt(tokenizer, filler: list[int], length: int, trial: int) -> tuple[list[int], list[int], str]:
    """(document ids, question ids, the key) of `length` tokens in all: the intro after the
    tokenizer's prompt prefix, filler text (cycled from a trial's offset) with the key planted
    at a random depth of 10-80% of it, then the question. Trial t is the same for every cache."""
    from engine.tokenizer import prompt_prefix

    g = torch.Generator().manual_seed(trial)
    key = str(int(torch.randint(10000, 100000, (), generator=g)))
    head = prompt_prefix(tokenizer) + tokenizer.encode(INTRO, bos=False)
    needle, question = (tokenizer.encode(t, bos=False) for t in (NEEDLE.format(key=key), QUESTION))
    n_filler = length - len(head) - len(needle) - len(question)
    offset = int(torch.randint(len(filler), (), generator=g))
    text = (filler * (1 + (offset + n_filler) // len(filler)))[offset:offset + n_filler]
    depth = int(n_filler * (0.1 + 0.7 * float(torch.rand((), generator=g))))
    return head + text[:depth] + needle + text[depth:], question, key


@torch.no_grad()
def read_back(model, cache, document: list[int], question: list[int]) -> list[int]:
    """Greedy answer through the engine's own prefill and decode (engine/runner.py): the document
    prefilled (in the engine's chunks when long), then the question as a second prefill that
    reads the document as the cache stores it, as a follow-up question in a chat does; then
    ANSWER_TOKENS decoded. Returns the answer's ids."""
    from engine.runner import decode_one_token, prefill

    device = model.inv_freq.device
    for ids in (document, question):
        logits = prefill(model, torch.tensor([ids], device=device), torch.tensor([len(ids)], device=device), cache)
    answer = logits.argmax(-1)                                                      # (1,)
    for _ in range(ANSWER_TOKENS - 1):
        answer = torch.cat([answer, decode_one_token(model, answer[-1:], cache).argmax(-1)])
    return answer.tolist()


def retrieval_settings(calibration: Calibration | None, head_dim: int, n_sink: int, window: int,
                       only=None) -> list:
    """(name, spec, calibration) of each cache the engine offers, as engine_settings names them:
    calibrated where the calibration holds its tables, and the default uncalibrated too (each
    trial is a long prefill, so the uncalibrated variants of the others are left out). `only`:
    these specs instead, each with its own sinks and window, calibrated where it can be."""
    rows = [("fp16", kvspec.parse("fp16"), None)]
    if only:
        return rows + [(str(spec) if calibrated(spec, head_dim, calibration) else f"{spec}, uncalibrated", spec,
                        calibration if calibrated(spec, head_dim, calibration) else None) for spec in only]
    specs = [kvspec.DEFAULT] + [s for s in map(kvspec.parse, ENGINE_CACHES) if s != kvspec.DEFAULT]
    for spec in specs:
        spec = spec.with_settings(sinks=n_sink, window=window)
        if calibrated(spec, head_dim, calibration):
            rows.append((str(spec), spec, calibration))
        if spec == kvspec.DEFAULT.with_settings(sinks=n_sink, window=window) or calibration is None:
            rows.append((f"{spec}, uncalibrated", spec, None))
    return rows


def retrieval_table(model, tokenizer, filler: list[int], lengths: list[int], trials: int, calibration,
                    n_sink: int, window: int, only=None):
    """Yields rows (name, bits per element, 'found/trials' per length) of the pass-key test through
    each engine cache (or fp16 and `only`), every cache on the same prompts."""
    from engine.cache import make_cache

    cfg = model.config
    settings = retrieval_settings(calibration, cfg.head_dim, n_sink, window, only)
    jobs = tqdm(total=len(settings) * len(lengths) * trials, desc="retrieval", file=sys.stderr)
    for name, spec, cal in settings:
        found, bits = [], 16.0
        for length in lengths:
            hits = 0
            for trial in range(trials):
                document, question, key = passkey_prompt(tokenizer, filler, length, trial)
                cache = make_cache(spec, cfg, 1, length + ANSWER_TOKENS, "cpu", torch.float32, cal)
                answer = tokenizer.decode(read_back(model, cache, document, question))
                hits += key in answer
                bits = cache.bits_per_element() if spec.quantized else 16.0
                jobs.update()
            found.append(f"{hits}/{trials}")
        yield name, bits, *found
    jobs.close()


def table_head(columns) -> str:
    return "| setting | bits/element (incl. metadata) | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2)


def table_row(name, bits, *values) -> str:
    return f"| {name} | {bits:.3f} | " + " | ".join(values) + " |"


def table(rows, columns) -> str:
    return "\n".join([table_head(columns)] + [table_row(*row) for row in rows])


def print_table(heading: str, columns, rows):
    """A table whose rows are printed as they come (long evaluations show what they have), then its time."""
    start = time.perf_counter()
    print(f"{heading}:\n\n{table_head(columns)}", flush=True)
    for row in rows:
        print(table_row(*row), flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU thread(s))", flush=True)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True, help="held-out text (the filler of the retrieval test too)")
    p.add_argument("--seq-len", type=positive_int, default=2048,
                   help="tokens per scored window (default 2048, or the model's context if shorter: the "
                        "simulation's attention is T x T per layer)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--window", type=positive_int, default=kvspec.DEFAULT.window,
                   help="recent tokens kept exact (KIVI: R)")
    p.add_argument("--sinks", type=non_negative_int, default=kvspec.DEFAULT.sinks,
                   help="first tokens kept exact (not KIVI's)")
    p.add_argument("--tables", default=["main"], type=comma_list(str, TABLES),
                   help="comma-separated: main (every cache: perplexity, KL, top-1), retrieval (a pass key "
                        "read back through the engine's caches), synthetic (outlier keys), svdq (SVDq keys against "
                        "per-channel and SKVQ keys), chunked (prefill in chunks), groupings (SKVQ's grouping "
                        "variants; needs quant.calibrate --groupings all --group-sizes 32,64,128)")
    p.add_argument("--lengths", type=comma_list(positive_int), default=[2048],
                   help="retrieval: prompt lengths in tokens, comma-separated (default 2048)")
    p.add_argument("--trials", type=positive_int, default=2, help="retrieval: pass keys per length (default 2)")
    p.add_argument("--kv", type=kvspec.parse, action="append",
                   help="retrieval: fp16 and this cache only, with its own sinks and window (repeatable; default: "
                        "every cache the engine offers, at --sinks and --window)")
    p.add_argument("--peer", action="store_true",
                   help="add transformers' QuantizedCache (optimum-quanto) rows: slow, token by token")
    return p.parse_args(argv)


def main(args):
    from engine.tokenizer import load_tokenizer, prompt_prefix

    cfg = model_config(args.model)
    context = cfg.max_position_embeddings
    lengths = args.lengths if "retrieval" in args.tables else []
    if longer := [n for n in lengths if n > context]:
        raise FlagError(f"--lengths {','.join(map(str, longer))}: past the model's context of {context}")
    recent = max(s.sinks + s.window for s in args.kv) if args.kv else args.sinks + args.window
    if shorter := [n for n in lengths if n <= 2 * recent]:
        raise FlagError(f"--lengths {','.join(map(str, shorter))}: a pass key needs a history to hide in, "
                        f"more than twice the {recent} sinks and window")
    if args.kv and "retrieval" not in args.tables:
        raise FlagError("--kv narrows --tables retrieval only")
    calibration = load_calibration(args.model)
    if calibration is None and {"svdq", "chunked", "groupings"} & set(args.tables):
        raise UserError(f"--tables svdq, chunked and groupings need {args.model}/{CALIBRATION_FILE} "
                        "(python -m quant.calibrate)")
    tokenizer = load_tokenizer(args.model)
    prefix = prompt_prefix(tokenizer)
    ids = tokenizer.encode(read_text(args.text, "text"), bos=False)[:args.max_tokens]
    if len(ids) <= args.sinks + args.window + 1:
        raise UserError(f"{args.text}: {len(ids)} tokens are too few to evaluate: every one would be read exactly "
                        f"({args.sinks} sinks and a {args.window}-token window)")
    seq_len = min(args.seq_len, context, len(ids))
    if calibration is None:
        print(f"note: no {CALIBRATION_FILE} in {args.model} (python -m quant.calibrate makes one): "
              "only uncalibrated rows", file=sys.stderr)

    model = Llama.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    windows = n_windows(len(ids), seq_len)
    heading = (f"{args.text.name}: {windows} window(s) of {seq_len} tokens, {args.sinks} sinks, window {args.window}, "
               f"head_dim {cfg.head_dim}")
    captured = capture(model, ids, seq_len, 1, prefix).records  # one window's (q, k_pre, k_post, v) per layer
    n_scored = sum(len(window_tokens(ids, w, seq_len, prefix)[1]) for w in range(windows))
    columns = ["perplexity", "KL from fp16", "top-1 = fp16", "attention rel. error"]
    references = []  # fp16's log-probabilities, computed once for every table that scores caches

    def scored_rows(settings, peer=False):
        references[:] = references or reference_logprobs(model, ids, seq_len, prefix)
        for name, bits, factory in tqdm(settings, desc="settings", file=sys.stderr):
            err = attention_error(factory() if factory else None, captured, args.sinks + args.window)
            yield name, bits, *score(model, ids, seq_len, prefix, factory, references).columns(), f"{err:.4f}"
        for nbits in (4, 2) if peer else ():
            scores, bits = quanto_scores(args.model, ids, seq_len, prefix, nbits, references)
            yield (f"transformers QuantizedCache, quanto int{nbits} (group 64, residual 128)", bits,
                   *scores.columns(), "n/a")

    if "main" in args.tables:
        print_table(f"Perplexity, KL divergence from fp16's next-token distribution and top-1 agreement with fp16 "
                    f"on {n_scored} tokens of {heading}", columns,
                    scored_rows(engine_settings(calibration, shape, args.sinks, args.window, model.inv_freq, seq_len),
                         args.peer))
    if "rotated" in args.tables:
        print_table(f"\nRotated caches on {n_scored} tokens of {heading}", columns,
                    scored_rows(rotated_settings(calibration, shape, args.sinks, args.window, model.inv_freq)))
    if "retrieval" in args.tables:
        print_table(f"\nPass keys read back greedily through the engine's caches: {args.trials} per length, planted "
                    f"in {args.text.name}", [f"found in {n} tokens" for n in args.lengths],
                    retrieval_table(model, tokenizer, ids, args.lengths, args.trials, calibration, args.sinks,
                                    args.window, args.kv))
    if "synthetic" in args.tables:
        print_synthetic(args.sinks, args.window)
    if "svdq" in args.tables:
        rows = []
        for name, bits, factory in tqdm(svdq_settings(calibration, shape, args.sinks, args.window,
                                                      model.inv_freq, seq_len), desc="svdq", file=sys.stderr):
            ppl = perplexity(model, ids, seq_len, prefix, factory)
            errors = key_errors(factory(), captured, args.sinks, args.window) if factory else (0.0, 0.0, 0.0)
            rows.append((name, bits, f"{ppl:.3f}", *(f"{e:.4f}" for e in errors)))
        print(f"\nSVDq keys against per-channel and SKVQ keys. {heading}:\n")
        print(table(rows, ["perplexity", "key rel. error", "score rel. error", "attention rel. error"]))
    if "chunked" in args.tables:
        rows = []
        for name, bits, factory in tqdm(chunked_settings(calibration, shape, args.sinks, args.window,
                                                         model.inv_freq), desc="chunked", file=sys.stderr):
            rows.append((name, bits, f"{perplexity(model, ids, seq_len, prefix, factory):.3f}"))
        print(f"\nPrefill in chunks: each chunk reads the history as stored and itself exactly. {heading}:\n")
        print(table(rows, ["perplexity"]))
    if "groupings" in args.tables:
        rows = []
        for name, bits, factory in tqdm(grouping_settings(calibration, shape, args.sinks, args.window,
                                                          model.inv_freq), desc="groupings", file=sys.stderr):
            ppl = perplexity(model, ids, seq_len, prefix, factory)
            err = attention_error(factory() if factory else None, captured, args.sinks + args.window)
            rows.append((name, bits, f"{ppl:.3f}", f"{err:.4f}"))
        print(f"\nSKVQ's channel groupings. {heading}:\n")
        print(table(rows, ["perplexity", "attention rel. error"]))


def print_synthetic(n_sink, window):
    calib_records = synthetic_attention_inputs(seed=1)  # calibrate on other draws of the same law
    records = synthetic_attention_inputs(seed=0)
    _, n_kv_heads, T, D = records[0][1].shape
    calibration = calibration_from(token_major(calib_records, len(calib_records)), len(records), [32, 64, 128])
    rows = [(name, bits, f"{attention_error(f() if f else None, records, n_sink + window):.4f}")
            for name, bits, f in grouping_settings(calibration, (len(records), n_kv_heads, D), n_sink, window, inv_freq=None)
            if "pre-rope-keys" not in name]  # synthetic keys have no RoPE
    print(f"\nSynthetic keys ({len(records)} layers, {n_kv_heads} KV heads x {D} channels, "
          f"{records[0][0].shape[1]} query heads, {T} tokens; 3 RoPE-pair outlier channels per head at 20-50x):\n")
    print(table(rows, ["attention rel. error"]))


if __name__ == "__main__":
    args = parse_args()
    run_cli(lambda: main(args))
