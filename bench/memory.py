"""The longest context that fits on the GPU, per cache setting, found by allocation:
python -m bench.memory

For each model shape (random fp16 weights on the device first, as generate.py would hold them) and
cache setting: the memory planner's prediction (engine/planner.py: caches priced on the meta
device against the free memory, with its headroom) beside the longest context whose cache really
allocates, found by a binary search of allocations. Batch 1 unless --batch. Writes JSON to
bench/results/ and prints a table. Needs a CUDA device: on the CPU there is no allocation failure
to find, only the host's swap. With --tp/--cp, under torchrun (one process per GPU), each rank
holds its part (engine/parallel.py) and the group's longest context is its fullest rank's.

    torchrun --nproc-per-node 4 -m bench.memory --tp 2 --cp 2

`--plan-gib G` needs no GPU: the planner's arithmetic alone, on the meta device, for GPUs of G
GiB each (weights of each rank's part priced on meta, fp16), under every layout of --gpus GPUs:
tensor parallel, context parallel and both.

    python -m bench.memory --plan-gib 80 --gpus 1,2,4,8 --kv skvq-k2v1.5
"""
import json
import sys
from pathlib import Path

import torch

from bench.attention import ROOT, command_line, device_name, git_commit
from bench.decode import CONFIGS, random_model
from cli import (
    ArgumentParser,
    FlagError,
    UserError,
    add_parallel_flags,
    positive_int,
    positive_ints,
    positive_number,
    run_cli,
    world_mismatch,
)
from engine.cache import make_cache
from engine.parallel import Parallel, local_device, start, stop
from engine.planner import (
    HEADROOM,
    GiB,
    Request,
    longest,
    plan,
    usable_bytes,
)
from model import Llama
from quant.kvspec import parse

KV = ["fp16", "skvq-k4v4", "skvq-k2v2", "skvq-k2v1.5", "svdq-k1.25v1.5"]


def allocates(request: Request, device):
    """fits(context): whether a cache of that context really allocates next to what is there."""
    def fits(context: int) -> bool:
        try:
            # allocated, then dropped
            make_cache(request.spec, request.cfg, request.batch, context, device, request.dtype,
                       parallel=request.parallel)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return fits


def layouts(gpus: int) -> list[tuple[int, int]]:
    """(tp, cp) of every way to run on `gpus` GPUs: tensor parallel, context parallel, both."""
    return [(tp, gpus // tp) for tp in range(gpus, 0, -1) if gpus % tp == 0]


def planned(name: str, spec, gpu_bytes: int, tp: int, cp: int, batch: int) -> dict | None:
    """The planner's longest context for a group of tp x cp GPUs of gpu_bytes each, priced on
    meta: each rank's weights (its part of the model, fp16), HEADROOM and a decode's working
    memory come off each GPU; None where the model's heads do not split over tp."""
    parallel = Parallel(tp, cp)  # rank 0; every rank holds as much
    try:
        cfg = parallel.shard_config(CONFIGS[name])
    except FlagError:
        return None
    with torch.device("meta"):
        weights = sum(p.numel() for p in Llama(cfg).parameters()) * 2
    request = Request(spec, cfg, batch, torch.float16, parallel=parallel)
    context = plan(request, 1, "auto", torch.device("cuda"), free=gpu_bytes - weights - HEADROOM).context
    return dict(model=name, kv=str(spec), gpus=tp * cp, tp=tp, cp=cp, batch=batch, weights_gib_per_rank=weights / GiB,
                planner_context=context)


def plan_table(args, specs) -> list[dict]:
    rows = [row for name in args.models for spec in specs for gpus in args.gpus for tp, cp in layouts(gpus)
            if (row := planned(name, spec, int(args.plan_gib * GiB), tp, cp, args.batch))]
    print(f"| model | cache | GPUs of {args.plan_gib:g} GiB | tp | cp | weights per rank (GiB) | planner's longest context |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv']} | {r['gpus']} | {r['tp']} | {r['cp']} | {r['weights_gib_per_rank']:.2f} | "
              f"{r['planner_context']:,} |")
    return rows


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["llama2-7b", "llama3-8b"])
    p.add_argument("--kv", type=lambda s: s.split(","), default=KV, help="caches, quant/kvspec.py syntax")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    add_parallel_flags(p)
    p.add_argument("--plan-gib", type=positive_number, default=None,
                   help="no GPU: the planner's longest context on GPUs of this many GiB, every layout of --gpus")
    p.add_argument("--gpus", type=positive_ints, default=[1, 2, 4, 8])
    args = p.parse_args(argv)
    if mismatch := world_mismatch(args.tp, args.cp):
        p.error(mismatch)
    if args.plan_gib is None and not torch.cuda.is_available():
        raise UserError("bench/memory.py finds the longest context by allocating on a GPU, and no CUDA device is "
                        "available (--plan-gib G: the planner's arithmetic alone)")
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)} (models: {', '.join(CONFIGS)})")
    try:
        specs = [parse(kv) for kv in args.kv]
    except ValueError as e:
        p.error(f"--kv: {e}")
    if any(spec.method == "kivi" for spec in specs):
        p.error("--kv: kivi is simulated only (python -m quant.eval), not a cache the engine runs")
    if args.plan_gib is not None:
        rows = plan_table(args, specs)
        result = dict(device=f"planner arithmetic on meta: GPUs of {args.plan_gib:g} GiB", torch=torch.__version__,
                      commit=git_commit(), command=command_line(), weights="fp16, priced on meta", headroom=HEADROOM,
                      rows=rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"memory-planner-{args.plan_gib:g}gib.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    device = local_device("cuda")
    parallel = start(args.tp, args.cp, device)
    try:
        rows = allocated_table(args, specs, device, parallel)
    finally:
        stop(parallel)
    if parallel.rank:
        return
    result = dict(device=device_name(device), torch=torch.__version__, commit=git_commit(), command=command_line(),
                  weights="random fp16, on the device", headroom=HEADROOM, tp=parallel.tp, cp=parallel.cp, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = f"-tp{parallel.tp}-cp{parallel.cp}" if parallel.world > 1 else ""
    out = args.out / f"memory-{result['device'].replace(' ', '_')}{ranks}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | cache | batch | planner's longest context | longest that allocates | cache GiB | bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv']} | {r['batch']} | {r['planner_context']:,} | {r['allocated_context']:,} | "
              f"{r['cache_gib']:.1f} | {r['bytes_per_token']:.0f} |")


def allocated_table(args, specs, device, parallel: Parallel) -> list[dict]:
    """Per model and cache: the planner's longest context beside the longest that allocates, on
    every rank (the group's: the least of its ranks')."""
    rows = []
    for name in args.models:
        cfg = parallel.shard_config(CONFIGS[name])  # the rank's part of the model
        model = random_model(cfg, device, torch.float16)
        for spec in specs:
            request = Request(spec, cfg, args.batch, torch.float16, parallel=parallel)
            predicted = plan(request, 1, "auto", device, free=parallel.smallest(usable_bytes(device))).context
            found = parallel.smallest(longest(allocates(request, device), limit=2 * predicted + 1024))
            bytes_per_token = request.cache_bytes(1 << 20) / (1 << 20) / args.batch  # per rank
            rows.append(dict(model=name, kv=str(spec), batch=args.batch, tp=parallel.tp, cp=parallel.cp,
                             planner_context=predicted, allocated_context=found,
                             cache_gib=found * bytes_per_token * args.batch / GiB, bytes_per_token=bytes_per_token))
            if parallel.rank == 0:
                print(rows[-1], file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    run_cli(main)
