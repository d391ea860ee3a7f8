"""Generate text with a Llama checkpoint: python generate.py --model DIR --prompt-file FILE

stdout receives exactly the continuation, streamed; statistics go to stderr. `--prompt-tokens N`
uses N random tokens instead of a prompt file (for benchmarks), `--max-context N|auto` sizes the
cache (auto: the longest context that fits); a request that cannot fit is refused before any
allocation, with the numbers.
"""
import argparse
import sys
import time
from pathlib import Path

from engine.cache import DEFAULT_GROUP_SIZE, DEFAULT_GROUPING, DEFAULT_KV, DEFAULT_METADATA

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "kjv-tiny"
DTYPES = {"float32", "float16", "bfloat16"}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def context_size(s):
    return s if s == "auto" else positive_int(s)


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
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--kv", default=DEFAULT_KV,
                   help="KV cache: fp16, or skvq-kKvV / kivi-kKvV with K, V bits (V may be 1.5: ternary), or "
                        f"svdq-k1.25vV / svdq-k2vV (SVDq keys, SKVQ values); default {DEFAULT_KV}")
    p.add_argument("--window", type=positive_int, default=128, help="recent tokens kept in full precision")
    p.add_argument("--sinks", type=int, default=5, help="first tokens kept in full precision")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help=f"channels per quantization group (default {DEFAULT_GROUP_SIZE}, or head_dim if smaller)")
    p.add_argument("--grouping", choices=["kmeans", "head_pairs", "smooth", "equal"], default=DEFAULT_GROUPING,
                   help="SKVQ channel grouping from the calibration file (quant/skvq.py)")
    p.add_argument("--metadata", choices=["fp16", "fp8"], default=DEFAULT_METADATA, help="dtype of scales and zeros")
    p.add_argument("--pre-rope-keys", action="store_true", help="quantize keys before RoPE (SVDq keys always are)")
    p.add_argument("--svdq-basis", choices=["calibration", "prompt"], default="calibration",
                   help="SVDq keys: the calibration's basis, or each prompt's own (default: calibration when present)")
    args = p.parse_args(argv)
    if not args.temperature >= 0:
        p.error(f"argument --temperature: must be >= 0, got {args.temperature}")
    if args.sinks < 0:
        p.error(f"argument --sinks: must be >= 0, got {args.sinks}")
    if not 0 < args.top_p <= 1:
        p.error(f"argument --top-p: must be in (0, 1], got {args.top_p}")
    return args


def read_prompt(path: Path) -> str:
    from model import UserError

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found")
    except IsADirectoryError:
        raise UserError(f"{path}: prompt file is a directory")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: prompt file is not UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        raise UserError(f"{path}: prompt file is empty")
    return text


def main(args):
    import torch

    from engine.cache import QuantizedCache, SvdqCache, make_cache
    from engine.planner import largest_context, plan
    from engine.runner import generate
    from engine.tokenizer import StreamDecoder, Tokenizer
    from model import Llama, UserError
    from quant.calibrate import CALIBRATION_FILE, load_calibration
    from quant.uniform import META_DTYPES

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    prompt = read_prompt(args.prompt_file) if args.prompt_file else None
    if not args.model.is_dir():
        raise UserError(f"{args.model}: model directory not found")
    tokenizer = Tokenizer(args.model / "tokenizer.model")
    model = Llama.from_pretrained(args.model, args.device, args.dtype and getattr(torch, args.dtype))
    device, dtype, cfg = model.lm_head.weight.device, model.lm_head.weight.dtype, model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{args.model}: tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")

    if prompt is None:  # random ids past the special ones, reproducible with --seed
        generator = torch.Generator().manual_seed(args.seed or 0)
        prompt_ids = [cfg.bos_token_id] + torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens - 1,),
                                                        generator=generator).tolist()
    else:
        prompt_ids = tokenizer.encode(prompt)
    calibration = load_calibration(args.model)
    make = lambda context, on: make_cache(
        args.kv, cfg, 1, context, on, dtype, n_sink=args.sinks, window=args.window, group_size=args.group_size,
        keys_pre_rope=args.pre_rope_keys, meta_dtype=META_DTYPES[args.metadata], calibration=calibration,
        grouping=args.grouping, svdq_basis=args.svdq_basis)
    context = args.max_context
    if context is None:  # as much as the request needs, within the model's context
        if len(prompt_ids) >= cfg.max_position_embeddings:
            raise UserError(f"prompt is {len(prompt_ids)} tokens; the model's context is {cfg.max_position_embeddings}")
        context = min(cfg.max_position_embeddings, len(prompt_ids) + args.max_new_tokens)
    memory = plan(make, cfg, 1, len(prompt_ids), context, device, dtype)
    if memory.context <= len(prompt_ids):
        raise UserError(f"--max-context {memory.context} leaves no room after the {len(prompt_ids)}-token prompt"
                        + (f" ({memory.explain()})" if context == "auto" else ""))
    if not memory.fits:
        longest = largest_context(make, memory.free - memory.working)
        raise UserError(f"cannot allocate the KV cache on {device}: {memory.explain()}; "
                        f"at most {longest} tokens fit")
    max_new = min(args.max_new_tokens, memory.context - len(prompt_ids))
    if max_new < args.max_new_tokens:
        print(f"note: generating at most {max_new} tokens, the rest of the {memory.context}-token context",
              file=sys.stderr)
    if memory.context > cfg.max_position_embeddings:
        print(f"note: a {memory.context}-token context is past the model's trained {cfg.max_position_embeddings}",
              file=sys.stderr)
    cache = make(memory.context, device)
    if isinstance(cache, QuantizedCache) and not cache.calibrated:
        print(f"note: no {CALIBRATION_FILE} for group size {cache.group_size} in {args.model}: SKVQ runs with "
              "equal channel groups, no smoothing or clipping (make one with python -m quant.calibrate)",
              file=sys.stderr)
    if isinstance(cache, SvdqCache) and cache.bases is None and args.svdq_basis == "calibration":
        print(f"note: no {CALIBRATION_FILE} in {args.model}: SVDq keys take the prompt's own basis", file=sys.stderr)
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    stream = StreamDecoder(tokenizer, prompt_ids[-1])
    eos_ids = cfg.eos_ids
    start = time.perf_counter()
    n_sampled, n_new = 0, 0
    for token in generate(model, cache, [prompt_ids], max_new, eos_ids,
                          args.temperature, args.top_k, args.top_p, generator, tokenizer.vocab_size):
        token_id = int(token[0])
        n_sampled += 1
        if n_sampled == 1:
            sync()
            first = time.perf_counter()  # prefill done: the first token comes from its logits
        if token_id in eos_ids:
            break
        n_new += 1
        sys.stdout.write(stream.push(token_id))
        sys.stdout.flush()
    sync()
    end = time.perf_counter()
    decode = f"{(n_sampled - 1) / (end - first):.1f} tokens/s" if n_sampled > 1 else "no decode steps"
    # stdout holds exactly the continuation, so the line break before the stats goes to stderr.
    print(f"\nprompt tokens: {len(prompt_ids)}, new tokens: {n_new}\n"
          f"prefill: {len(prompt_ids) / (first - start):.1f} tokens/s, decode: {decode}\n"
          f"KV cache ({args.kv}): {cache.max_context} tokens, {cache.nbytes() / 2**20:.2f} MiB allocated, "
          f"{cache.bytes_per_token():.0f} bytes/token, {cache.bits_per_element():.3f} bits/element"
          + (" in the quantized history, metadata included" if args.kv != "fp16" else ""), file=sys.stderr)


if __name__ == "__main__":
    from model import run_cli

    args = parse_args()
    run_cli(lambda: main(args))
