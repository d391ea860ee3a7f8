"""Generate text with a Llama checkpoint: python generate.py --model DIR --prompt-file FILE

stdout receives exactly the continuation, streamed, then a line break; statistics go to stderr.
`--prompt-tokens N` uses N random tokens instead of a prompt file (for benchmarks; no tokenizer
needed), `--max-context N|auto` sizes the
cache (auto: the longest context that fits); a request that cannot fit is refused before any
allocation, with the numbers. On several devices, under torchrun (engine/parallel.py):
`torchrun --nproc-per-node N generate.py --tp N ...` (heads split) or `--cp N` (history split);
rank 0 prints.
"""
import argparse
import math
import sys
import time
from pathlib import Path

from cli import (
    ArgumentParser,
    FlagError,
    UserError,
    add_parallel_flags,
    positive_int,
    read_text,
    run_cli,
    seed,
    world_mismatch,
)
from quant import kvspec

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "kjv-tiny"
DTYPES = {"float32", "float16", "bfloat16"}
# A prompt file larger than its context times this is refused unread: a token is a few bytes of
# text (4 on average in English; 3 per CJK character), never 64.
PROMPT_BYTES_PER_TOKEN = 64
AUTO_CONTEXT = 2 ** 22  # the longest prompt --max-context auto may take per GPU: past what one holds
# The flags that change one setting of --kv (quant/kvspec.py): flag -> KvSpec field.
KV_FLAGS = {f"--{setting}": field for field, setting in kvspec.SETTINGS.items()}


def context_size(s):
    if s == "auto":
        return s
    n = positive_int(s)
    if n > kvspec.MAX_TOKENS:  # 8 PiB of cache for Llama-3-8B even at 1 bit per element
        raise argparse.ArgumentTypeError(f"must be at most 2^40 = {kvspec.MAX_TOKENS} tokens, got {n}")
    return n


def engine_spec(text: str) -> kvspec.KvSpec:
    """--kv: a cache the engine runs (quant/kvspec.py)."""
    try:
        spec = kvspec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    if spec.method == "kivi":
        raise argparse.ArgumentTypeError("kivi is the evaluation baseline, simulated by python -m quant.eval; "
                                         "generate.py runs fp16, skvq and svdq caches")
    return spec


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="checkpoint directory: config.json, *.safetensors, tokenizer.model (default: the shipped kjv-tiny)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-file", type=Path)
    prompt.add_argument("--prompt-tokens", type=positive_int, help="a synthetic prompt of N random tokens")
    p.add_argument("--max-context", type=context_size, default=None,
                   help="tokens the cache holds per sequence, or auto: the longest that fits "
                        "(default: prompt + new tokens, within the model's context)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float16 on cuda, float32 on cpu")
    add_parallel_flags(p)
    kv = p.add_argument_group("KV cache", "--kv names the cache, settings included (quant/kvspec.py: "
                              "METHOD-kKvV[:SETTING=VALUE]...); each flag below changes one setting")
    kv.add_argument("--kv", type=engine_spec, default=kvspec.DEFAULT,
                    help=f"fp16, skvq-kKvV (K in 1,2,3,4,8, V also 1.5: ternary) or svdq-kKvV (K in 1.25, 2: "
                         f"SVDq keys); default {kvspec.DEFAULT}")
    kv.add_argument("--sinks", type=int, help=f"first tokens kept in full precision (default {kvspec.DEFAULT.sinks})")
    kv.add_argument("--window", type=positive_int,
                    help=f"recent tokens kept in full precision (default {kvspec.DEFAULT.window})")
    kv.add_argument("--group-size", type=positive_int,
                    help=f"channels per quantization group (default {kvspec.DEFAULT_GROUP_SIZE}, or head_dim if "
                         "that does not divide it)")
    kv.add_argument("--grouping", choices=kvspec.GROUPINGS,
                    help=f"channel grouping from the calibration file (default {kvspec.DEFAULT.grouping})")
    kv.add_argument("--metadata", choices=["fp8", "fp16"],
                    help=f"dtype of scales and zeros (default {kvspec.DEFAULT.metadata})")
    kv.add_argument("--rotation", choices=kvspec.ROTATIONS,
                    help=f"skvq: rotate each head's channels before quantizing (default {kvspec.DEFAULT.rotation})")
    kv.add_argument("--scaling", choices=kvspec.SCALINGS,
                    help=f"skvq: a group's (scale, low) from its min and max, or a zero-centred grid from "
                         f"its RMS (default {kvspec.DEFAULT.scaling})")
    kv.add_argument("--pre-rope-keys", action="store_true", default=None, help="skvq: quantize keys before RoPE")
    kv.add_argument("--svdq-basis", choices=["calibration", "prompt"],
                    help="svdq: the calibration's basis (default, where there is one) or each prompt's own")
    kv.add_argument("--token-group", type=positive_int,
                    help=f"svdq: tokens per key block (default {kvspec.DEFAULT.token_group})")
    args = p.parse_args(argv)
    if not 0 <= args.temperature < math.inf:
        p.error(f"argument --temperature: must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"argument --top-p: must be in (0, 1], got {args.top_p}")
    if mismatch := world_mismatch(args.tp, args.cp):
        p.error(mismatch)
    given = {field: getattr(args, field) for field in KV_FLAGS.values() if getattr(args, field) is not None}
    try:
        args.kv = args.kv.with_settings(**given)
    except ValueError as e:
        flags = " ".join(flag for flag, field in KV_FLAGS.items() if field in given)
        p.error(f"--kv {args.kv} with {flags}: {e}")
    return args


def read_prompt(path: Path, context: int) -> str:
    """The prompt file's text; one larger than `context` tokens could come from is refused before
    it is read whole (it may be /dev/zero)."""
    text = read_text(path, "prompt file", context * PROMPT_BYTES_PER_TOKEN,
                     f", more than a {context}-token context holds (--max-context N for a longer one)")
    if not text.strip():
        raise UserError(f"{path}: prompt file is empty")
    return text


def main(args):
    import torch

    from engine.parallel import local_device, start, stop

    if args.device == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda: no CUDA device is available")
    device = local_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parallel = start(args.tp, args.cp, device)
    try:
        run(args, parallel, device)
    finally:
        stop(parallel)


def load(args, parallel, device):
    """What every rank loads: the config, the prompt, the tokenizer and the ids that end
    generation, the model (under tensor parallelism the rank's part of it). Flags the model cannot
    take are refused before its weights load."""
    import torch

    from engine.parallel import load_model
    from engine.tokenizer import eos_ids, has_tokenizer, load_tokenizer
    from model import LlamaConfig

    if not args.model.is_dir():
        raise UserError(f"{args.model}: model directory not found")
    cfg = LlamaConfig.from_json(args.model / "config.json")
    try:  # before the weights load: a --kv the model cannot take is an error at once
        args.kv.check(cfg.head_dim)
    except ValueError as e:
        raise FlagError(f"--kv {args.kv}: {e}")
    parallel.shard_config(cfg)  # a --tp the model's heads cannot take, likewise
    # The longest prompt that can be held (auto: as long as the group's GPUs could hold).
    longest_prompt = {None: cfg.max_position_embeddings, "auto": AUTO_CONTEXT * parallel.world}.get(
        args.max_context, args.max_context)
    if (args.prompt_tokens or 0) >= longest_prompt:
        raise FlagError(f"--prompt-tokens {args.prompt_tokens}: " + (
            f"the model's context is {longest_prompt} (--max-context N for a longer one)" if args.max_context is None
            else f"leaves no room in a {longest_prompt}-token context"))
    prompt = read_prompt(args.prompt_file, longest_prompt) if args.prompt_file else None
    # --prompt-tokens needs no tokenizer: without one, stdout gets the new ids.
    tokenizer = load_tokenizer(args.model) if prompt is not None or has_tokenizer(args.model) else None
    end_ids = eos_ids(args.model, cfg)
    model = load_model(args.model, device, args.dtype and getattr(torch, args.dtype), parallel)
    if tokenizer and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{args.model}: tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    return cfg, prompt, tokenizer, end_ids, model


def run(args, parallel, device):
    import torch

    from engine.cache import make_cache
    from engine.planner import (
        Request,
        largest_context,
        plan,
        resident_bytes,
        return_freed_memory,
        usable_bytes,
    )
    from engine.runner import generate
    from engine.tokenizer import StreamDecoder
    from quant.calibrate import CALIBRATION_FILE, calibrated, load_calibration

    spec = args.kv
    # Every rank loads; one rank's error stops all alike, and rank 0 reports it.
    cfg, prompt, tokenizer, end_ids, model = parallel.agree(lambda: load(args, parallel, device))
    speaks = parallel.rank == 0  # every rank computes every token; rank 0 prints

    def note(text):
        if speaks:
            print(f"note: {text}", file=sys.stderr)

    # The cache's full-precision K/V: the model's dtype, but fp32 on the CPU, which streams fp32 in C
    # (kernels/packed_history.c) and bf16 in plain torch, 10x slower (bench/RESULTS.md).
    dtype = model.lm_head.weight.dtype if device.type != "cpu" else torch.float32
    if dtype != model.lm_head.weight.dtype:
        note(f"the cache holds fp32 K/V on the CPU (the model runs in {str(model.lm_head.weight.dtype)[6:]})")
    vocab_size = tokenizer.vocab_size if tokenizer else cfg.vocab_size
    prompt_ids = tokenizer.encode(prompt) if prompt is not None else None
    n_prompt = args.prompt_tokens or len(prompt_ids)
    calibration = load_calibration(args.model) if spec.quantized else None
    request = Request(spec, model.config, 1, dtype, calibration, parallel)  # one rank's part
    context = args.max_context
    if context is None:  # as much as the request needs, within the model's context
        if n_prompt >= cfg.max_position_embeddings:
            raise UserError(f"prompt is {n_prompt} tokens; the model's context is {cfg.max_position_embeddings} "
                            "(--max-context N for a longer one)")
        context = min(cfg.max_position_embeddings, n_prompt + args.max_new_tokens)
    # A group holds what its rank with the least free memory holds.
    memory = plan(request, n_prompt, context, device, parallel.smallest(usable_bytes(device)))
    if memory.context <= n_prompt:
        raise FlagError(f"--max-context {memory.context} leaves no room after the {n_prompt}-token prompt"
                        + (f" ({memory.explain()})" if context == "auto" else ""))
    if not memory.fits:
        longest = largest_context(request, memory.free - memory.working)
        where = f"each of {parallel.world} ranks" if parallel.world > 1 else str(device)
        raise UserError(f"cannot allocate the KV cache on {where}: {memory.explain()}; at most {longest} tokens fit")
    if prompt_ids is None:  # random ids past the special ones, reproducible with --seed, after the BOS
        bos = tokenizer.bos_id if tokenizer else cfg.bos_token_id
        if bos is not None and not 0 <= bos < vocab_size:
            raise UserError(f"{args.model / 'config.json'}: bos_token_id {bos} is outside the vocabulary "
                            f"(vocab_size {vocab_size})")
        bos = [] if bos is None else [bos]
        generator = torch.Generator().manual_seed(args.seed or 0)
        prompt_ids = bos + torch.randint(3, vocab_size, (n_prompt - len(bos),), generator=generator).tolist()
    max_new = min(args.max_new_tokens, memory.context - n_prompt)
    if max_new < args.max_new_tokens:
        note(f"generating at most {max_new} tokens, the rest of the {memory.context}-token context")
    if memory.context > cfg.max_position_embeddings:
        note(f"a {memory.context}-token context is past the model's trained {cfg.max_position_embeddings}")
    # A rotated rms cache takes nothing from a calibration (equal groups, no smoothing, no clip).
    needs_calibration = spec.quantized and not (all(spec.rotates) and spec.scaling == "rms")
    if needs_calibration and not calibrated(spec, cfg.head_dim, calibration):
        lost = "rotated channels run without clipping" if all(spec.rotates) else \
            "SKVQ runs with equal channel groups, no smoothing or clipping (on SmolLM2-135M, 2,048 tokens, " \
            "unrotated min-max 2-bit keys lost over +100% perplexity even calibrated; the default, which " \
            "needs no calibration, +2-4%)"
        note(f"no {CALIBRATION_FILE} for group size {spec.channel_group(cfg.head_dim)}, grouping {spec.grouping} "
             f"in {args.model}: {lost} (make one with python -m quant.calibrate)")
    if spec.method == "svdq" and spec.svdq_basis == "calibration" and calibration is None:
        note(f"no {CALIBRATION_FILE} in {args.model}: SVDq keys take the prompt's own basis")
    if tokenizer is None:
        note(f"no tokenizer in {args.model}: stdout gets the new token ids")
    if device.type == "cpu":
        return_freed_memory()
    cache = make_cache(spec, model.config, 1, memory.context, device, dtype, calibration, parallel=parallel)
    resident = resident_bytes()  # weights and cache: what the forwards' working memory comes on top of
    generator = torch.Generator(device=device)  # the same seed on every rank: the same tokens
    if args.seed is not None:
        generator.manual_seed(args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    stream = StreamDecoder(tokenizer, prompt_ids[-1]) if tokenizer else None

    def show(text):
        if speaks:
            sys.stdout.write(text)
            sys.stdout.flush()

    start = time.perf_counter()
    n_sampled, n_new = 0, 0
    try:
        for token in generate(model, cache, [prompt_ids], max_new, end_ids,
                              args.temperature, args.top_k, args.top_p, generator, vocab_size):
            token_id = int(token[0])
            n_sampled += 1
            if n_sampled == 1:
                sync()
                first = time.perf_counter()  # prefill done: the first token comes from its logits
            if token_id in end_ids:
                break
            n_new += 1
            show(stream.push(token_id) if stream else f"{' ' * (n_new > 1)}{token_id}")
    except RuntimeError as e:  # a collective failed: another rank stopped, or did not answer in time
        if parallel.world == 1:
            raise
        raise UserError(f"rank {parallel.rank}: a collective failed: another rank stopped or did not answer "
                        f"({str(e).splitlines()[0]})") from e
    # The end: bytes of a character that never completed, and a line break for the shell.
    show((stream.flush() if stream else "") + "\n")
    sync()
    end = time.perf_counter()
    if not speaks:
        return
    decode = f"{(n_sampled - 1) / (end - first):.1f} tokens/s" if n_sampled > 1 else "no decode steps"
    # The dtype the cache really stores its full-precision tokens in (fp16 runs as fp32 on the CPU).
    stored = str(dtype).removeprefix("torch.") + (" sinks and window" if spec.quantized else "")
    allocated = f"{cache.nbytes() / 2**20:.2f} MiB allocated, {cache.bytes_per_token():.0f} bytes/token"
    if parallel.world > 1:  # every rank holds an equal share
        allocated = (f"{cache.nbytes() / 2**20:.2f} MiB allocated per rank, {parallel.world * cache.nbytes() / 2**20:.2f} "
                     f"MiB on {parallel.world} ranks (tp {parallel.tp} x cp {parallel.cp}), "
                     f"{parallel.world * cache.bytes_per_token():.0f} bytes/token in total")
    print(f"prompt tokens: {n_prompt}, new tokens: {n_new}\n"
          f"prefill: {n_prompt / (first - start):.1f} tokens/s, decode: {decode}\n"
          f"KV cache ({spec}, {stored}): {cache.max_context} tokens, {allocated}, "
          f"{cache.bits_per_element():.3f} bits/element"
          + (" in the quantized history, metadata included" if spec.quantized else ""), file=sys.stderr)
    if device.type == "cpu":
        print(f"working memory: {(resident_bytes(peak=True) - resident) / 2**30:.2f} GiB at its peak "
              f"(resident memory over that of weights and cache{', rank 0' * (parallel.world > 1)}), planned {memory.working / 2**30:.2f} GiB",
              file=sys.stderr)


if __name__ == "__main__":
    args = parse_args()
    run_cli(lambda: main(args))
