"""Decode attention over one layer's cache, fp16 against packed history: python bench/attention.py

For Llama-2-7B (32 query / 32 KV heads) and Llama-3-8B (32 / 8) attention shapes, at each context
and batch: median time (CUDA events, triton.testing.do_bench), the bytes the kernel must read
(packed codes + metadata + the fp16 sinks and window, or the fp16 K/V), achieved GB/s and its
fraction of the device-to-device copy bandwidth measured in the same process, against fp16 flash
decoding (torch SDPA and our fp16 kernel) at the same context, side by side. The K/V are random
(speed does not depend on their values); each setting is first checked against the plain-torch
reference on its smallest context. Prints a markdown table and writes JSON to bench/results/.

    python -m bench.attention                      # the whole sweep, on a GPU (a few minutes)
    python -m bench.attention --smoke              # tiny shapes on any device: checks the harness
"""
import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from engine.stores import LatentStore, TokenStore
from kernels.decode_attention import SPLIT_WAVES, Segment, decode_attention
from kernels.quantize import quantize_tokens
from kernels.reference import attention
from model import apply_rope, rope_cos_sin
from quant.kvspec import parse
from quant.skvq import TokenQuantizer, equal_groups, rotation_matrix
from quant.svdq import svdq_keys
from quant.uniform import META_DTYPES

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"llama2-7b": dict(n_heads=32, n_kv_heads=32, head_dim=128),
          "llama3-8b": dict(n_heads=32, n_kv_heads=8, head_dim=128)}
# sdpa-fp16: torch's SDPA over an fp16 cache; the rest are caches as quant/kvspec.py names them.
SETTINGS = ["sdpa-fp16", "fp16", "skvq-k2v1.5", "skvq-k2v2", "skvq-k4v4", "skvq-k2v1.5:pre-rope-keys:rotation=none",
            "skvq-k2v1.5:group-size=32", "skvq-k2v1.5:rotation=none:scaling=minmax", "svdq-k1.25v1.5", "svdq-k2v1.5"]
REFERENCE_TOKENS = 8192  # contexts up to this are checked against the plain-torch reference


def copy_bandwidth(device, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling a memory-bound kernel meets)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * src.numel() / seconds


def timed(fn, device) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_inputs(setting, B, T, shape, device, dtype, generator):
    """(call, bytes read, reference or None) for one copy of one setting's inputs."""
    H, Hkv, D = shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=generator)
    lengths = torch.full((B,), T, device=device)
    if setting in ("sdpa-fp16", "fp16"):
        k, v = (torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=generator) for _ in range(2))
        reference = None
        if T <= REFERENCE_TOKENS:
            reference = lambda: attention(q[:, :, None], k, v, torch.full((B, 1), T - 1, device=device))[:, :, 0]
        if setting == "sdpa-fp16":
            call = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
        else:
            call = lambda: decode_attention(q, [Segment(k, v, lengths)])
        return call, 2 * k.nbytes, reference
    # A quantized cache of T tokens: sinks and window in fp16, the rest packed, as engine/cache.py holds it.
    spec = parse(setting)
    schedule, meta = spec.key_schedule, META_DTYPES[spec.metadata]
    n_hist = schedule.history_length(T)
    segments, bytes_read, dequantized = [], 0, []
    for n, first in [(schedule.sinks, 0), (T - schedule.sinks - n_hist, schedule.sinks)]:
        k, v = (torch.randn(B, Hkv, n, D, device=device, dtype=dtype, generator=generator) for _ in range(2))
        segments.append(Segment(k, v, torch.full((B,), n, device=device), None, torch.full((B,), first, device=device)))
        bytes_read += 2 * k.nbytes
        dequantized.append((k, v))
    check = T <= REFERENCE_TOKENS  # small enough to dequantize for the reference
    group_size = spec.channel_group(D)
    rotations = [rotation_matrix(D, seed=0) if rotated else None for rotated in spec.rotates]
    stores = [latent_keys(spec, B, Hkv, D, n_hist, device, generator) if spec.method == "svdq" else
              packed_tokens(spec.key_bits, B, Hkv, D, group_size, meta, n_hist, device, dtype, generator, rotations[0]),
              packed_tokens(spec.value_bits, B, Hkv, D, group_size, meta, n_hist, device, dtype, generator,
                            rotations[1])]
    bytes_read += sum(t.nbytes for store in stores for t in store.buffers())
    segments.append(Segment(*stores, torch.full((B,), n_hist, device=device), None,
                            torch.full((B,), T - n_hist, device=device)))
    inv_freq = 1.0 / 10000 ** (torch.arange(D // 2, device=device) / (D // 2)) if spec.keys_pre_rope else None
    call = lambda: decode_attention(q, segments, inv_freq)
    reference = None
    if check:
        (sink_k, sink_v), (window_k, window_v) = dequantized
        # Position order: sinks, window, then the history.
        keys = torch.cat([sink_k, window_k, stores[0].read(n_hist).to(dtype)], 2)
        values = torch.cat([sink_v, window_v, stores[1].read(n_hist).to(dtype)], 2)
        if spec.keys_pre_rope:
            keys = apply_rope(keys, *rope_cos_sin(torch.arange(T, device=device).expand(B, T), inv_freq))
        reference = lambda: attention(q[:, :, None], keys, values, torch.full((B, 1), T - 1, device=device))[:, :, 0]
    return call, bytes_read, reference


def packed_tokens(bits, B, Hkv, D, group_size, meta_dtype, n, device, dtype, generator, rotation=None) -> TokenStore:
    """n random tokens per sequence quantized per token (SKVQ) by the fused kernel, in chunks;
    rotation [D, D]: their channels rotated first."""
    quantizer = TokenQuantizer(bits, equal_groups(Hkv, D, group_size), clip=0.95, meta_dtype=meta_dtype,
                               rotation=rotation)
    store = TokenStore(quantizer, B, n, device)
    chunk = 1 << 14
    for start in range(0, n, chunk):
        x = torch.randn(B, Hkv, min(chunk, n - start), D, device=device, dtype=dtype, generator=generator)
        batch = torch.arange(B, device=device).repeat_interleave(x.shape[2])
        source = torch.arange(x.shape[2], device=device).repeat(B)
        quantize_tokens(x, batch, source, source + start, store)
    return store


def latent_keys(spec, B, Hkv, D, n, device, generator) -> LatentStore:
    """n SVDq keys per sequence: random codes and metadata in one random orthonormal basis."""
    basis = torch.linalg.qr(torch.randn(Hkv, D, D, device=device, generator=generator))[0]
    mean = torch.randn(Hkv, D, device=device, generator=generator) * 0.1
    store = LatentStore(svdq_keys(spec.key_bits, Hkv, D, spec.token_group, basis, mean), B, n, device)
    store.codes.random_(256, generator=generator)
    store.scale.copy_(torch.rand(store.scale.shape, device=device, generator=generator) * 0.1)
    store.low.copy_(torch.randn(store.low.shape, device=device, generator=generator) * 0.1)
    return store


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    print(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", file=sys.stderr)
    rows = []
    for model in args.models:
        shape = SHAPES[model]
        for T in args.contexts:
            for B in args.batches:
                fp16_seconds = {}
                for setting in args.settings:
                    row = dict(model=model, context=T, batch=B, setting=setting)
                    try:
                        call, nbytes, reference = make_inputs(setting, B, T, shape, device, dtype, generator)
                    except torch.OutOfMemoryError:
                        rows.append({**row, "note": "does not fit"})
                        torch.cuda.empty_cache()
                        continue
                    if reference is not None:  # correct first
                        got, want = call().float(), reference().float()
                        row["rel_error"] = ((got - want).norm() / want.norm()).item()
                        assert row["rel_error"] < 1e-2, f"{setting} at {T}: relative error {row['rel_error']}"
                    # Cycle over copies of the inputs so that no run finds them in L2.
                    copies = [call] + [make_inputs(setting, B, T, shape, device, dtype, generator)[0]
                                       for _ in range(min(31, math.ceil(args.rotate_bytes / nbytes) - 1))]
                    turn = iter(range(1 << 62))
                    seconds = timed(lambda: copies[next(turn) % len(copies)](), device)
                    del copies, call, reference
                    flops = 4 * B * shape["n_heads"] * T * shape["head_dim"]
                    row.update(ms=seconds * 1e3, bytes=nbytes, gb_per_s=nbytes / seconds / 1e9,
                               of_copy_bandwidth=nbytes / seconds / bandwidth, tflops=flops / seconds / 1e12)
                    if setting in ("sdpa-fp16", "fp16"):
                        fp16_seconds[setting] = seconds
                    for base, seconds_base in fp16_seconds.items():
                        row[f"speedup_vs_{base}"] = seconds_base / seconds
                    rows.append(row)
                    print(format_row(row), file=sys.stderr)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), commit=git_commit(), command=command_line(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                copy_bandwidth_gb_per_s=bandwidth / 1e9, split_waves=SPLIT_WAVES,
                kv_values="random (speed does not depend on values)", rows=rows)


def format_row(row) -> str:
    if "ms" not in row:
        return f"| {row['model']} | {row['context']} | {row['batch']} | {row['setting']} | {row['note']} | | | | |"
    speedups = " / ".join(f"{row.get(f'speedup_vs_{b}', float('nan')):.2f}" for b in ("sdpa-fp16", "fp16"))
    return (f"| {row['model']} | {row['context']} | {row['batch']} | {row['setting']} | {row['ms']:.3f} | "
            f"{row['bytes'] / 2**20:.1f} | {row['gb_per_s']:.0f} | {100 * row['of_copy_bandwidth']:.0f}% | {speedups} |")


def markdown(result) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}; "
             f"copy bandwidth {result['copy_bandwidth_gb_per_s']:.0f} GB/s\n",
             "| model | context | batch | setting | ms | MiB read | GB/s | of copy bw | speedup vs SDPA / our fp16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [format_row(r) for r in result["rows"]])


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def command_line() -> str:
    """How this benchmark was run, as a reader would type it: `python -m bench.NAME ARGS`."""
    module = ".".join(Path(sys.argv[0]).resolve().relative_to(ROOT).with_suffix("").parts)
    return " ".join(["python -m", module, *sys.argv[1:]])


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(SHAPES))
    p.add_argument("--contexts", type=ints, default=[4096, 32768, 131072, 524288, 1048576])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--settings", type=lambda s: s.split(","), default=SETTINGS)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the harness on any device")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--rotate-bytes", type=int, default=256 << 20,
                   help="cycle over copies of the inputs spanning this many bytes, so L2 (50 MB) never holds them")
    p.add_argument("--copy-bytes", type=int, default=1 << 30, help="size of the copy that measures bandwidth")
    args = p.parse_args(argv)
    if args.smoke:
        SHAPES["tiny-gqa"] = dict(n_heads=4, n_kv_heads=2, head_dim=64)
        args.models, args.contexts, args.batches = ["tiny-gqa"], [400], [2]
        args.rotate_bytes, args.copy_bytes = 0, 1 << 20
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)} (models: {', '.join(SHAPES)})")
    for setting in args.settings:
        try:
            if setting != "sdpa-fp16" and parse(setting).method == "kivi":
                p.error("kivi is simulated only (python -m quant.eval): it has no kernel")
        except ValueError as e:
            p.error(f"--settings {setting}: {e}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "attention-smoke" if args.smoke else f"attention-{result['device'].replace(' ', '_')}"
    out = args.out / f"{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
