"""End-to-end decode speed against context and batch: python bench/decode.py

Llama-2-7B and Llama-3-8B shapes with RANDOM weights (speed does not depend on weight values; no
accuracy is claimed from these runs), every layer through engine/cache.py and the kernels as
generate.py runs them. The history is filled SYNTHETICALLY with random K/V, codes and metadata, so
that a 1M-token decode can be timed without a 1M-token prefill; `--prefill N` also times one real
chunked prefill of N tokens. Reports, per (model, cache, context, batch): decode tokens/s, step
time (median over CUDA events), bytes read per step (weights + the cache's K/V as the kernels read
them), the fraction of the bandwidth ceiling (those bytes at the copy bandwidth measured in the
same process), peak memory; "max" as a batch is the largest that fits at that context (the memory
planner). Steps run eager and as replays of a CUDA graph (engine/runner.py Decoder, as generate.py
runs them). Writes JSON to bench/results/ and, with matplotlib, PNG plots of tokens/s and memory
against context.

    python -m bench.decode                                  # the sweep, on a GPU
    python -m bench.decode --prefill 131072 --kv skvq-k2v1.5 --contexts 131072 --batches 1
    python -m bench.decode --smoke                          # tiny shapes on any device
    torchrun --nproc-per-node 8 -m bench.decode --tp 2 --cp 4   # one rank per GPU (engine/parallel.py)

With --tp/--cp (under torchrun, one process per GPU) every rank runs its part (its heads, its
share of the history) and rank 0 reports; bytes per step and memory are per rank, the context
and the batch the group's.

On the CPU (`--device cpu`) it measures another table instead (`cpu_table`): the shipped model
(weights/kjv-tiny) at batch 1 over a synthetic history, milliseconds per decode token for our
caches through the streaming path generate.py runs ("after") and through the whole-sequence
reference ("before"), beside transformers' LlamaForCausalLM (SDPA) with its DynamicCache and
its QuantizedCache (quanto int2, residual 128), all in one process; JSON to bench/results/ and
the table into bench/RESULTS.md.

    python -m bench.decode --device cpu                     # 4K, 32K, 128K: about 10 minutes
    python -m bench.decode --device cpu --contexts 4096,32768

`--model DIR` takes any checkpoint instead (SmolLM2: weights/smollm2-135m), `--threads 1,2` both
thread counts, `--baselines none` leaves out the reference path and transformers, and with
`--llama-cpp PYTHON --gguf FILE` llama.cpp decodes the same checkpoint (converted by its own
script) in the same run, with its f16 / q8_0 / q4_0 K/V caches (bench/llama_cpp_decode.py, under
that Python, an environment of its own: llama.cpp is never the engine's dependency):

    python -m bench.decode --device cpu --model weights/smollm2-135m --kv fp16,skvq-k2v1.5,skvq-k3v1.5 \
        --contexts 0,4096,32768,131072 --threads 1,2 --baselines none --llama-cpp LLAMA_ENV/bin/python \
        --gguf smollm2-135m-f32.gguf
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from cli import (  # first: it sets OpenMP's wait policy
    ArgumentParser,
    UserError,
    add_parallel_flags,
    comma_list,
    non_negative_int,
    positive_int,
    positive_ints,
    run_cli,
    world_mismatch,
)

import torch

from bench.attention import ROOT, command_line, copy_bandwidth, device_name, git_commit
from engine.cache import KVCache, make_cache
from engine.parallel import Parallel, local_device, start, stop
from engine.planner import GiB, Request, longest, usable_bytes, working_bytes
from engine.runner import Decoder, prefill
from model import Llama, LlamaConfig, rope_inv_freq
from quant.kvspec import parse

CONFIGS = {
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                             max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
}
KV = ["fp16", "skvq-k2v1.5", "skvq-k4v4", "svdq-k1.25v1.5"]


def random_model(cfg: LlamaConfig, device, dtype) -> Llama:
    """Random weights, drawn on the device (a 7B model in seconds)."""
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def fill_synthetic(cache, context: int):
    """Random contents for every buffer and `context` tokens held per sequence: random K/V in
    the fp16 parts, random codes and metadata in the packed ones."""
    if isinstance(cache, KVCache):
        buffers = [cache.k, cache.v]
    else:
        buffers = [cache.sink_k, cache.sink_v, cache.window_k, cache.window_v]
        buffers += [t for store in cache.key_stores + cache.value_stores for t in store.buffers()]
    with torch.no_grad():
        for x in buffers:
            fill_random(x)
    hold(cache, context)


def hold(cache, context: int):
    """The cache holds `context` tokens of every sequence, as counted on the device and on the host."""
    cache.lengths.fill_(context)
    cache.reserved = context


def fill_random(x: torch.Tensor):
    if x.dtype == torch.uint8:
        x.random_(0, 243)  # < 3^5: valid for ternary bytes too
    else:
        x.copy_(torch.randn(x.shape, device=x.device).mul_(0.1).to(x.dtype))


def weight_bytes(model) -> int:
    """What a decode step reads of the weights: all but the embedding table (one row per token)."""
    return sum(p.nbytes for name, p in model.named_parameters() if "embed_tokens" not in name) + \
        (model.lm_head.weight.nbytes if model.lm_head.weight is model.model.embed_tokens.weight else 0)


def kv_bytes_read(cache, context: int) -> int:
    """Bytes of K/V the attention of one step reads, all layers: the held tokens, not the capacity
    (under context parallelism, the rank's share)."""
    if isinstance(cache, KVCache):
        return cache.k[:, :, :, :max(0, min(context - cache.first, cache.k.shape[3]))].nbytes * 2
    # Per history row: codes and metadata of every layer's key and value store.
    stores = cache.key_stores + cache.value_stores
    rows = max(stores[0].codes.shape[2], 1)
    per_token = sum(t.nbytes for store in stores for t in (store.codes, store.scale, store.low)) / rows
    recent = cache.sink_k.nbytes + cache.window_k.nbytes  # per K or V, all layers and sequences
    slots = cache.sink_k.shape[3] + cache.window_k.shape[3]  # fewer than sinks + ring for a short context
    held_recent = min(context, slots) / slots if cache.parallel.attends_recent else 0
    held_rows = max(0, min(cache.schedule.history_length(context) - cache.first_row, stores[0].codes.shape[2]))
    return int(per_token * held_rows + 2 * recent * held_recent)


def largest_batch(request: Request, context: int, budget: int, limit: int = 4096) -> int:
    return longest(lambda batch: replace(request, batch=batch).cache_bytes(context) <= budget, limit)


def time_steps(model, cache, batch: int, steps: int, graph: bool, device, warmup: int = 3) -> float:
    """Median seconds per decode step (eager, or replays of the runner's captured step), after
    `warmup` (a graph's first step is eager, its second captured)."""
    token = torch.zeros(batch, dtype=torch.long, device=device)
    decode = Decoder(model, cache, graph)
    step = lambda: decode(token)
    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            step()
            seconds = time.perf_counter() - begin
        if i >= warmup:  # warm-up steps compile kernels
            times.append(seconds)
    return sorted(times)[len(times) // 2]


def run(args, device, parallel: Parallel):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    log = (lambda text: print(text, file=sys.stderr)) if parallel.rank == 0 else (lambda text: None)
    log(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s"
        + (f"; {parallel.world} ranks: tp {parallel.tp} x cp {parallel.cp}, per-rank bytes and memory" * (parallel.world > 1)))
    rows = []
    for name in args.models:
        cfg = parallel.shard_config(CONFIGS[name])  # the rank's part of the model
        model = parallel.attach(random_model(cfg, device, dtype))
        weights = weight_bytes(model)
        for spec in args.kv:
            for context in args.contexts:
                free = parallel.smallest(usable_bytes(device))  # the group holds what its fullest rank holds
                budget = free - working_bytes(cfg, 1, 1, dtype, device.type == "cuda", parallel.cp)
                for batch_spec in args.batches:
                    capacity = context + args.steps + 3
                    request = Request(spec, cfg, 1, dtype, parallel=parallel)
                    batch = largest_batch(request, capacity, budget) if batch_spec == "max" else int(batch_spec)
                    row = dict(model=name, kv=str(spec), context=context, batch=batch, batch_asked=batch_spec,
                               tp=parallel.tp, cp=parallel.cp, weights="random", history="synthetic")
                    needed = batch and replace(request, batch=batch).cache_bytes(capacity)
                    if batch == 0 or needed > budget:
                        rows.append({**row, "note": f"does not fit in {budget / GiB:.1f} GiB"})
                        log(format_row(rows[-1]))
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    cache = make_cache(spec, cfg, batch, capacity, device, dtype, parallel=parallel)
                    fill_synthetic(cache, context)
                    per_step = weights + kv_bytes_read(cache, context)
                    for graph in ([False, True] if device.type == "cuda" else [False]):
                        try:
                            seconds = time_steps(model, cache, batch, args.steps, graph, device)
                        except UserError as e:  # a step with a host sync cannot be captured
                            rows.append({**row, "cuda_graph": graph, "note": f"not capturable: {e}"[:200]})
                            continue
                        finally:
                            hold(cache, context)
                        rows.append({**row, "cuda_graph": graph, "step_ms": seconds * 1e3,
                                     "tokens_per_s": batch / seconds, "bytes_per_step": per_step,
                                     "of_bandwidth_ceiling": per_step / seconds / bandwidth,
                                     "cache_gib": cache.nbytes() / GiB,
                                     "peak_gib": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                                                  else weights + cache.nbytes()) / GiB})
                        log(format_row(rows[-1]))
                    del cache
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if args.prefill:
                rows.append(real_prefill(model, name, spec, args, device, dtype, parallel))
        del model
    return dict(device=device_name(device), torch=torch.__version__, commit=git_commit(), command=command_line(),
                copy_bandwidth_gb_per_s=bandwidth / 1e9, weights="random", history="synthetic (random)", rows=rows)


def real_prefill(model, name, spec, args, device, dtype, parallel: Parallel) -> dict:
    """One real chunked prefill of args.prefill random tokens, then the decode speed after it."""
    n, cfg = args.prefill, model.config
    cache = make_cache(spec, cfg, 1, n + args.steps + 3, device, dtype, parallel=parallel)
    generator = torch.Generator(device).manual_seed(0)  # the same prompt on every rank
    tokens = torch.randint(3, cfg.vocab_size, (1, n), device=device, generator=generator)
    begin = time.perf_counter()
    prefill(model, tokens, torch.tensor([n], device=device), cache, chunk_size=args.prefill_chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    step = time_steps(model, cache, 1, args.steps, False, device)
    row = dict(model=name, kv=str(spec), context=n, batch=1, tp=parallel.tp, cp=parallel.cp, weights="random",
               history="real prefill", cuda_graph=False, prefill_s=seconds, prefill_tokens_per_s=n / seconds,
               step_ms=step * 1e3, tokens_per_s=1 / step)
    if parallel.rank:
        return row
    print(f"real prefill of {n} tokens ({name}, {spec}): {seconds:.1f} s, {n / seconds:.0f} tokens/s", file=sys.stderr)
    return row


CPU_CACHES = ["fp16", "skvq-k2v1.5", "svdq-k1.25v1.5"]
CPU_MODEL = ROOT / "weights" / "kjv-tiny"
BASELINES = ("reference", "transformers")  # beside ours: the whole-sequence reference path, transformers
LLAMA_CPP_KV = "f16,q8_0,q4_0"
LLAMA_CPP_DRIVER = ROOT / "bench" / "llama_cpp_decode.py"


def table_markers(model: str) -> tuple[str, str]:
    """The markers of a model's CPU table in RESULTS.md: one table per model."""
    return (f"<!-- cpu decode table, {model}: written by python -m bench.decode --device cpu -->",
            f"<!-- end of cpu decode table, {model} -->")


def cpu_name() -> str:
    """The machine, in words: CPU model, cores, memory."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "CPU")
    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0) if Path("/proc/meminfo").exists() else 0
    return f"{model}, {os.cpu_count()} cores, {memory / GiB:.0f} GiB"


def load_average() -> float | None:
    """The machine's load over the last minute: the other work that shares the cores."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def read_bandwidth(nbytes: int = GiB) -> float:
    """Bytes per second a reduction over an fp32 tensor reads, median of 5 (the CPU's read ceiling)."""
    x = torch.randn(nbytes // 4)
    times = []
    for _ in range(6):
        begin = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - begin)
    return nbytes / sorted(times[1:])[2]


def ours(model, spec, context: int, reference: bool, steps: int) -> dict:
    """One of our caches at `context` tokens of synthetic history, through the reference path or not."""
    cache = make_cache(spec, model.config, 1, context + steps + 1, "cpu", torch.float32, reference=reference)
    fill_synthetic(cache, context)
    seconds = time_steps(model, cache, 1, steps, False, torch.device("cpu"), warmup=1)
    return dict(engine="ours", kv=str(spec), path="reference" if reference else "streaming", context=context,
                step_ms=seconds * 1e3, kv_bytes=kv_bytes_read(cache, context), cache_gib=cache.nbytes() / GiB)


def transformers_cache(hf, kind: str, context: int, steps: int) -> dict:
    """transformers' LlamaForCausalLM (SDPA) decoding after `context` synthetic tokens in its
    DynamicCache (fp32; cropped back to `context` after each step) or its QuantizedCache (quanto
    int2, residual 128, as its own prefill would leave it: the history quantized whole)."""
    from transformers import DynamicCache, QuantizedCache

    cfg = hf.config
    if kind == "DynamicCache":
        cache = DynamicCache(config=cfg)
    else:
        cache = QuantizedCache("quanto", cfg, nbits=2, residual_length=128)
    shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape) * 0.1, torch.randn(shape) * 0.1, layer)
    token = torch.zeros(1, 1, dtype=torch.long)
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            begin = time.perf_counter()
            hf(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[context + i]]), use_cache=True)
            times.append(time.perf_counter() - begin)
            if kind == "DynamicCache":
                cache.crop(-1)  # back to `context` tokens
    return dict(engine="transformers", kv=kind, path="sdpa", context=context, step_ms=sorted(times[1:])[steps // 2] * 1e3)


def llama_cpp(python: str, gguf: Path, kv: str, context: int, threads: int, steps: int) -> list[dict]:
    """llama.cpp's rows (bench/llama_cpp_decode.py under `python`, a separate process and
    environment) for one GGUF, context and thread count, every K/V cache type in `kv`."""
    command = [python, str(LLAMA_CPP_DRIVER), str(gguf), "--threads", str(threads), "--kv", kv,
               "--contexts", str(context), "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise UserError(f"llama.cpp's run failed ({' '.join(command)}): {done.stderr.strip()[-300:]}")
    return [{**json.loads(line), "path": "llama.cpp"} for line in done.stdout.splitlines()]


def cpu_table(args) -> dict:
    """The CPU decode table: every cache at every context and thread count, beside the baselines
    and llama.cpp, interleaved per (threads, context) so that the machine's load meets them alike."""
    model = Llama.from_pretrained(args.model, "cpu", torch.float32)
    hf = None
    if "transformers" in args.baselines:
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    bandwidth = read_bandwidth()
    print(f"machine: {cpu_name()}; read bandwidth {bandwidth / 1e9:.1f} GB/s; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}", file=sys.stderr)
    if not args.llama_cpp:
        print("llama.cpp: not timed (no --llama-cpp PYTHON given, a Python that imports llama_cpp)", file=sys.stderr)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for context in args.contexts:
            timed = [(ours, (model, spec, context, reference, args.steps)) for spec in args.kv
                     for reference in [True] * ("reference" in args.baselines) + [False]]
            timed += [(transformers_cache, (hf, kind, context, args.steps)) for kind in ("DynamicCache", "QuantizedCache")
                      if hf is not None]
            for run_one, arguments in timed:
                rows.append({**run_one(*arguments), "threads": threads, "load_average": load_average()})
                print(f"{threads} threads, {context}: {rows[-1]['engine']} {rows[-1]['kv']} {rows[-1]['path']}: "
                      f"{rows[-1]['step_ms']:.1f} ms (load {rows[-1]['load_average']:.1f})", file=sys.stderr)
            for gguf in args.gguf if args.llama_cpp else []:
                for row in llama_cpp(args.llama_cpp, gguf, args.llama_kv, context, threads, args.steps):
                    rows.append({**row, "load_average": load_average()})
                    print(f"{threads} threads, {context}: llama.cpp {row['model']} {row['kv']}: {row['step_ms']:.1f} ms "
                          f"(load {rows[-1]['load_average']:.1f})", file=sys.stderr)
    return dict(device=cpu_name(), model=args.model.name, batch=1, torch=torch.__version__,
                commit=git_commit(), command=command_line(), read_bandwidth_gb_per_s=bandwidth / 1e9,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), history="synthetic (random)", steps=args.steps,
                llama_cpp=args.llama_cpp or "not timed (no --llama-cpp)", rows=rows)


def column_name(row) -> str:
    if row["engine"] == "ours":
        kv = "fp32 (--kv fp16)" if row["kv"] == "fp16" else row["kv"]  # the fp16 cache holds fp32 on the CPU
        return f"ours {kv}{', before' if row['path'] == 'reference' else ''}"
    if row["engine"] == "transformers":
        return {"DynamicCache": "transformers SDPA, DynamicCache fp32",
                "QuantizedCache": "transformers QuantizedCache (quanto int2, residual 128)"}[row["kv"]]
    return f"llama.cpp {row['model'].split()[-1]} weights, {row['kv']} K/V"


def cpu_markdown(result) -> str:
    """The table: ms per decode token, one row per (threads, context), one column per engine and
    cache; then how many times faster than ours the fastest llama.cpp row with our weights' bytes
    (F32) is (below 1: we are faster)."""
    columns = list(dict.fromkeys(column_name(r) for r in result["rows"]))
    cell = {(column_name(r), r["threads"], r["context"]): r for r in result["rows"]}
    same_bytes = [c for c in columns if c.startswith("llama.cpp F32 ")]
    compared = [c for c in columns if c.startswith("ours ") and not c.endswith("before")] if same_bytes else []
    names = columns + [f"fastest llama.cpp F32 / {c} (> 1: ours faster)" for c in compared] + ["load average"]
    lines = [f"| threads | context | {' | '.join(names)} |", "|---" * (len(names) + 2) + "|"]
    for threads, context in sorted({(r["threads"], r["context"]) for r in result["rows"]}):
        here = {c: cell[(c, threads, context)]["step_ms"] for c in columns if (c, threads, context) in cell}
        values = [f"{here[c]:,.1f}" if c in here else "—" for c in columns]
        fastest = min((here[c] for c in same_bytes if c in here), default=None)
        values += [f"{fastest / here[c]:.2f}" if fastest and c in here else "—" for c in compared]
        loads = [cell[(c, threads, context)]["load_average"] for c in columns if (c, threads, context) in cell]
        values.append(f"{min(loads):.1f}-{max(loads):.1f}")
        label = f"{context // 1024}K" if context and context % 1024 == 0 else str(context)
        lines.append(f"| {threads} | {label} | {' | '.join(values)} |")
    lines.append(f"\n{result['device']}; {result['model']}, batch 1, synthetic history, ms per decode token "
                 f"(median of {result['steps']}); ours with fp32 weights (the fp16 cache holds fp32 on the CPU), "
                 f"OMP_WAIT_POLICY={result['omp_wait_policy']}; read bandwidth {result['read_bandwidth_gb_per_s']:.1f} "
                 f"GB/s (a sum over 1 GiB); llama.cpp: {result['llama_cpp']}; load average (1 minute) over each "
                 f"row's runs; commit {result['commit']}: `{result['command']}`")
    return "\n".join(lines)


def write_markdown(table: str, path: Path, model: str):
    """Puts the table between the model's markers in `path` (appended with them where absent)."""
    start, end = table_markers(model)
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n{block}\n"
    path.write_text(text)


def check_cpu_flags(p, args):
    """The CPU table's flags, refused before any model loads (p.error: one line, exit 2)."""
    args.baselines = [] if args.baselines == "none" else args.baselines.split(",")
    if unknown := [b for b in args.baselines if b not in BASELINES]:
        p.error(f"--baselines: unknown {', '.join(unknown)} (any of {', '.join(BASELINES)}, or none)")
    if not (args.model / "config.json").is_file():
        p.error(f"--model: {args.model} holds no config.json (a Hugging Face-layout checkpoint)")
    if args.gguf and not args.llama_cpp:
        p.error("--gguf: llama.cpp is timed only with --llama-cpp PYTHON")
    if args.llama_cpp:
        if not args.gguf:
            p.error("--llama-cpp: give its model files with --gguf (convert_hf_to_gguf.py --outtype f32 on --model)")
        if missing := [str(g) for g in args.gguf if not g.is_file()]:
            p.error(f"--gguf: no such file: {', '.join(missing)}")
        found = subprocess.run([args.llama_cpp, "-c", "import llama_cpp"], capture_output=True, check=False) \
            if shutil.which(args.llama_cpp) else None
        if found is None or found.returncode:
            p.error(f"--llama-cpp: {args.llama_cpp} is not a Python that imports llama_cpp")


def format_row(r) -> str:
    head = f"| {r['model']} | {r['kv']} | {r['context']} | {r['batch']} |"
    if "step_ms" not in r:
        return f"{head} {'graph' if r.get('cuda_graph') else ''} | {r['note']} | | | |"
    if "prefill_s" in r:
        return f"{head} real prefill {r['prefill_s']:.1f} s | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | | |"
    return (f"{head} {'graph' if r['cuda_graph'] else 'eager'} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
            f"{100 * r['of_bandwidth_ceiling']:.0f}% | {r['peak_gib']:.1f} |")


def plot(result, out: Path):
    """tokens/s and peak memory against context, batch 1, one line per model and cache."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib here: no plots", file=sys.stderr)
        return
    rows = [r for r in result["rows"] if "tokens_per_s" in r and r["batch"] == 1 and not r.get("cuda_graph")
            and r.get("history") == "synthetic"]
    for key, label, name in [("tokens_per_s", "decode tokens/s (batch 1)", "decode-tokens-per-s.png"),
                             ("peak_gib", "peak memory, GiB", "decode-memory.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model, kv in sorted({(r["model"], r["kv"]) for r in rows}):
            points = sorted((r["context"], r[key]) for r in rows if r["model"] == model and r["kv"] == kv)
            ax.plot(*zip(*points), marker="o", label=f"{model} {kv}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{result['device']}, random weights, synthetic history")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["llama2-7b", "llama3-8b"])
    p.add_argument("--kv", type=lambda s: s.split(","), default=None,
                   help=f"caches, quant/kvspec.py syntax (default {','.join(KV)}; CPU table: {','.join(CPU_CACHES)})")
    p.add_argument("--contexts", type=comma_list(non_negative_int), default=[4096, 32768, 131072, 524288, 1048576])
    p.add_argument("--batches", type=lambda s: s.split(","), default=["1", "max"],
                   help="batch sizes; max: the largest that fits at each context")
    p.add_argument("--steps", type=positive_int, default=20, help="timed decode steps per row")
    p.add_argument("--prefill", type=positive_int, default=None, help="also time a real prefill of this many tokens")
    p.add_argument("--prefill-chunk", type=positive_int, default=4096)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--copy-bytes", type=positive_int, default=1 << 30)
    p.add_argument("--smoke", action="store_true", help="the tiny shape, a short context, any device")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--threads", type=positive_ints, default=[2], help="CPU table: torch threads, one or more (1,2)")
    p.add_argument("--model", type=Path, default=CPU_MODEL, help="CPU table: the checkpoint (Hugging Face layout)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="CPU table: beside ours, any of reference (the whole-sequence path) and transformers, or none")
    p.add_argument("--llama-cpp", metavar="PYTHON",
                   help="CPU table: a Python that imports llama_cpp (llama-cpp-python in an environment of its own), "
                        "to time llama.cpp on --gguf; without it llama.cpp is not timed")
    p.add_argument("--gguf", type=lambda s: [Path(x) for x in s.split(",")], default=[],
                   help="CPU table: llama.cpp's model files, the same checkpoint converted by llama.cpp's "
                        "convert_hf_to_gguf.py (--outtype f32: our weights' bytes; f16, q8_0: more rows)")
    p.add_argument("--llama-kv", default=LLAMA_CPP_KV, help="CPU table: llama.cpp's K/V cache types")
    add_parallel_flags(p)
    p.add_argument("--results-md", type=Path, default=ROOT / "bench" / "RESULTS.md",
                   help="CPU table: the markdown file it writes the table into")
    args = p.parse_args(argv)
    if args.smoke:
        # past the default 5 sinks + 512-token window, so that the quantized caches read packed history
        args.models, args.contexts, args.batches, args.steps = ["tiny"], [600], ["2"], 3
        args.copy_bytes = 1 << 20
        args.kv = [kv.replace("svdq-k1.25v1.5", "svdq-k1.25v1.5:token-group=32") for kv in KV]
    unknown = [m for m in args.models if m not in CONFIGS] + [
        b for b in args.batches if b != "max" and not (b.isdigit() and int(b) > 0)]
    if unknown:
        p.error(f"unknown model or batch: {', '.join(unknown)} (models: {', '.join(CONFIGS)}; batches: N or max)")
    cpu_table_run = args.device == "cpu" and not args.smoke
    try:
        args.kv = [parse(kv) for kv in args.kv or (CPU_CACHES if cpu_table_run else KV)]
    except ValueError as e:
        p.error(f"--kv: {e}")
    if mismatch := world_mismatch(args.tp, args.cp):
        p.error(mismatch)
    if cpu_table_run:
        if args.tp * args.cp > 1:
            p.error("--tp/--cp: the CPU table runs in one process (the GPU sweep and --smoke take them)")
        check_cpu_flags(p, args)
        if "--contexts" not in " ".join(argv if argv is not None else sys.argv):
            args.contexts = [4096, 32768, 131072]
        if "--steps" not in " ".join(argv if argv is not None else sys.argv):
            args.steps = 5
        result = cpu_table(args)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"decode-cpu-{platform.node() or 'cpu'}" + (f"-{args.model.name}" if args.model != CPU_MODEL else "")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        table = cpu_markdown(result)
        write_markdown(table, args.results_md, args.model.name)
        print(table)
        return
    if any(spec.method == "kivi" for spec in args.kv):
        p.error("--kv: kivi is simulated only (python -m quant.eval), not a cache the engine runs")
    device = local_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parallel = start(args.tp, args.cp, device)
    try:
        result = run(args, device, parallel)
    finally:
        stop(parallel)
    if parallel.rank:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    name = "decode-smoke" if args.smoke else f"decode-{result['device'].replace(' ', '_')}"
    if parallel.world > 1:
        name += f"-tp{parallel.tp}-cp{parallel.cp}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| model | cache | context | batch | step | tokens/s | ms/step | of bandwidth ceiling | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(format_row(r))
    if not args.smoke:
        plot(result, args.out)


if __name__ == "__main__":
    run_cli(main)
