"""The longest context that fits on the GPU, per cache setting, found by allocation:
python -m bench.memory

For each model shape (random fp16 weights on the device first, as generate.py would hold them) and
cache setting: the memory planner's prediction (engine/planner.py: caches priced on the meta
device against the free memory, with its headroom) beside the longest context whose cache really
allocates, found by a binary search of allocations. Batch 1 unless --batch. Writes JSON to
bench/results/ and prints a table. Needs a CUDA device: on the CPU there is no allocation failure
to find, only the host's swap.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from bench.attention import ROOT, command_line, device_name, git_commit
from bench.decode import CONFIGS, random_model
from engine.cache import make_cache
from engine.planner import HEADROOM, GiB, Request, largest_context, longest, usable_bytes, working_bytes
from quant.kvspec import parse

KV = ["fp16", "skvq-k4v4", "skvq-k2v2", "skvq-k2v1.5", "svdq-k1.25v1.5"]


def allocates(request: Request, device):
    """fits(context): whether a cache of that context really allocates next to what is there."""
    def fits(context: int) -> bool:
        try:
            # allocated, then dropped
            make_cache(request.spec, request.cfg, request.batch, context, device, request.dtype)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return fits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["llama2-7b", "llama3-8b"])
    p.add_argument("--kv", type=lambda s: s.split(","), default=KV, help="caches, quant/kvspec.py syntax")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/memory.py finds the longest context by allocating on a GPU, and no CUDA device is "
              "available", file=sys.stderr)
        sys.exit(1)
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)} (models: {', '.join(CONFIGS)})")
    try:
        specs = [parse(kv) for kv in args.kv]
    except ValueError as e:
        p.error(f"--kv: {e}")
    if any(spec.method == "kivi" for spec in specs):
        p.error("--kv: kivi is simulated only (python -m quant.eval), not a cache the engine runs")
    device, rows = torch.device("cuda"), []
    for name in args.models:
        cfg = CONFIGS[name]
        model = random_model(cfg, device, torch.float16)
        for spec in specs:
            request = Request(spec, cfg, args.batch, torch.float16)
            budget = usable_bytes(device) - working_bytes(cfg, args.batch, 1, torch.float16, True)
            predicted = largest_context(request, budget)
            found = longest(allocates(request, device), limit=2 * predicted + 1024)
            bytes_per_token = request.cache_bytes(1 << 20) / (1 << 20) / args.batch
            rows.append(dict(model=name, kv=str(spec), batch=args.batch, planner_context=predicted, allocated_context=found,
                             cache_gib=found * bytes_per_token * args.batch / GiB, bytes_per_token=bytes_per_token))
            print(rows[-1], file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    result = dict(device=device_name(device), torch=torch.__version__, commit=git_commit(), command=command_line(),
                  weights="random fp16, on the device", headroom=HEADROOM, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"memory-{result['device'].replace(' ', '_')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | cache | batch | planner's longest context | longest that allocates | cache GiB | bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv']} | {r['batch']} | {r['planner_context']:,} | {r['allocated_context']:,} | "
              f"{r['cache_gib']:.1f} | {r['bytes_per_token']:.0f} |")


if __name__ == "__main__":
    main()
