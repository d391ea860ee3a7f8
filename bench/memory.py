"""The longest context that fits on the GPU, per cache setting, found by allocation:
python bench/memory.py

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.attention import device_name, git_commit  # noqa: E402
from bench.decode import CONFIGS, random_model  # noqa: E402
from engine.cache import make_cache  # noqa: E402
from engine.planner import HEADROOM, GiB, largest_context, longest, usable_bytes, working_bytes  # noqa: E402

KV = ["fp16", "skvq-k4v4", "skvq-k2v2", "skvq-k2v1.5", "svdq-k1.25v1.5"]


def allocates(make, device):
    """fits(context): whether a cache of that context really allocates next to what is there."""
    def fits(context: int) -> bool:
        try:
            make(context, device)  # allocated, then dropped
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return fits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["llama2-7b", "llama3-8b"])
    p.add_argument("--kv", type=lambda s: s.split(","), default=KV)
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
    device, rows = torch.device("cuda"), []
    for name in args.models:
        cfg = CONFIGS[name]
        model = random_model(cfg, device, torch.float16)
        for kv in args.kv:
            make = lambda n, on: make_cache(kv, cfg, args.batch, n, on, torch.float16)
            budget = usable_bytes(device) - working_bytes(cfg, args.batch, 1, torch.float16, True)
            predicted = largest_context(make, budget)
            found = longest(allocates(make, device), limit=2 * predicted + 1024)
            bytes_per_token = make(1 << 20, "meta").nbytes() / (1 << 20) / args.batch
            rows.append(dict(model=name, kv=kv, batch=args.batch, planner_context=predicted, allocated_context=found,
                             cache_gib=found * bytes_per_token * args.batch / GiB, bytes_per_token=bytes_per_token))
            print(rows[-1], file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    result = dict(device=device_name(device), torch=torch.__version__, commit=git_commit(), command=" ".join(sys.argv),
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
