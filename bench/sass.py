"""Static GPU analysis of every kernel specialization the engine and the benchmarks launch, on any
machine, no GPU needed: python -m bench.sass

The engine's decode step and prefill chunk (engine/cache.py, one layer) and bench/attention.py's
settings run on the CPU at the real Llama-2-7B (32 query / 32 KV heads) and Llama-3-8B (32 / 8)
attention shapes with every Triton launch recorded instead of executed (small tensors: the
specialization depends on dtypes, constexprs and alignment, not on sizes). Each distinct
specialization is then compiled for sm_80, sm_89 and sm_90 through the JIT path a GPU takes
(`JITFunction.run(warmup=True)`), against a stand-in for the active driver so that no CUDA device
is touched, and its cubin is read with Triton's bundled cuobjdump: registers, spilled bytes (the
stack frame), shared memory, warps, stages, and the SASS of the main loop (the widest backward
branch), its instruction mix, bytes read per iteration and warp-instructions per byte read.

The budget: a GPU issues SMs x 4 schedulers x clock warp-instructions per second; a loop that
needs more warp-instructions per byte than that rate over the memory bandwidth is bound by issue,
not by memory, at bandwidth x budget / (warp-instructions per byte). H100 SXM: 132 x 4 x 1.755 GHz
= 9.3e11 against 3.0 TB/s, 0.31 per byte.

    python -m bench.sass                   # everything: JSON into bench/results/, a markdown table
    python -m bench.sass --quick           # the default cache, Llama-3-8B shape, sm_80 and sm_90 (tests/test_sass.py)
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels are compiled here, never interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said aloud to silence its warning

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from bench.attention import ROOT, SETTINGS, SHAPES, command_line, git_commit, make_inputs
from bench.decode import CONFIGS
from bench.dispatch import Launch, TorchOps, recorded_launches
from engine.cache import make_cache
from quant.kvspec import parse


@dataclass(frozen=True)
class Gpu:
    """A target and the GPU its budget is reckoned on."""
    capability: int
    name: str
    sms: int
    ghz: float            # boost clock
    tb_per_s: float       # memory bandwidth

    @property
    def budget(self) -> float:
        """Warp-instructions the GPU issues per byte it reads at full bandwidth."""
        return self.sms * 4 * self.ghz * 1e9 / (self.tb_per_s * 1e12)


GPUS = {"sm_80": Gpu(80, "A100-SXM4-80GB", 108, 1.41, 2.0),
        "sm_89": Gpu(89, "L40S", 142, 2.52, 0.864),
        "sm_90": Gpu(90, "H100-SXM5-80GB", 132, 1.755, 3.0)}
# bench/attention.py's settings and K3 with ternary values, the likely ~2.6-bit accurate setting
SASS_SETTINGS = SETTINGS + ["skvq-k3v1.5"]
QUICK = dict(models=["llama3-8b"], settings=["skvq-k2v1.5"], targets=["sm_80", "sm_90"])  # the default cache
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class StandInDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there. Each target is
    its own 'device', so that the per-device caches of compiled kernels never mix targets."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def engine_launches(model: str, kv: str) -> tuple[dict[str, list[Launch]], dict]:
    """The launches of one layer's prefill chunk and decode step of the engine's cache `kv`, and
    what a decode step dispatches: Triton launches and torch operations per layer, and the torch
    operations of the step's reserve (once per step, for every layer)."""
    cfg = replace(CONFIGS[model], num_hidden_layers=1)
    H, Hkv, D, chunk = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 256
    spec = parse(kv)
    cache = make_cache(spec, cfg, 1, 2048, "cpu", torch.float16, use_kernels=True)
    phases, step = {}, {}
    # A full window first (unrecorded), so that the recorded chunk and step evict into packed history.
    full = spec.sinks + spec.window if spec.quantized else chunk
    for phase, T in [("fill", full), ("prefill chunk", chunk), ("decode", 1)]:
        q = torch.randn(1, H, T, D, dtype=torch.float16)
        k, v = (torch.randn(1, Hkv, T, D, dtype=torch.float16) for _ in range(2))
        with recorded_launches() as launches:
            with TorchOps() as reserve_ops:
                positions = cache.reserve(torch.tensor([T]), T)
            with TorchOps() as layer_ops:
                cache.attend(0, q, k, v, positions)
        if phase != "fill":
            phases[phase] = launches
    step = dict(triton_launches_per_layer=len(phases["decode"]), torch_ops_per_layer=len(layer_ops.ops),
                torch_ops_per_step=len(reserve_ops.ops), host_syncs_per_layer=len(layer_ops.syncs))
    return phases, step


def bench_launches(model: str, setting: str) -> list[Launch]:
    """The launches of bench/attention.py's timed call for `setting` (its inputs' own quantize
    launches are the engine's too, and recorded there)."""
    generator = torch.Generator().manual_seed(0)
    with recorded_launches():
        call, _, _ = make_inputs(setting, 1, 2048, SHAPES[model], torch.device("cpu"), torch.float16, generator)
    with recorded_launches() as launches:
        call()
    return launches


def all_launches(models, settings) -> tuple[list[Launch], list[dict]]:
    """Every launch of the engine and bench/attention.py, each labelled by where it came from, and
    what each engine cache's decode step dispatches."""
    launches, steps = [], []
    for model in models:
        for setting in settings:
            if setting == "sdpa-fp16":
                continue
            phases, step = engine_launches(model, setting)
            steps.append(dict(model=model, kv=setting, **step))
            for phase, recorded in phases.items():
                launches += [replace(x, sources=[f"engine {phase} {model} {setting}"]) for x in recorded]
            launches += [replace(x, sources=[f"bench/attention {model} {setting}"])
                         for x in bench_launches(model, setting)]
    return launches, steps


def compile_for(launch: Launch, target: str):
    """The CompiledKernel of the launch's specialization for `target`, or the compiler's error."""
    driver.set_active(StandInDriver(GPUS[target].capability))
    try:
        return JITFunction.run(launch.kernel, *launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the compiler raises, its message is the result
        lines = [line for line in str(e).splitlines() if line.strip()]
        return next((line.strip() for line in lines if "error" in line.lower()), lines[-1] if lines else repr(e))


def cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([BIN / "cuobjdump", *flags, f.name], capture_output=True, text=True, check=True).stdout


def spill_stores(ptx: str, capability: int) -> int:
    """Bytes of registers spilled to the stack, as ptxas reports them (cuobjdump counts the frame)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(sass: str, packed: bool = False) -> list[tuple[str, str]] | None:
    """(opcode, operands) of the main loop: the instructions between the target and the address of
    the backward branch that spans the most (inner loops, such as a slow sin/cos path, sit inside it);
    for a kernel that reads packed codes, of the loops that convert them (the full-precision
    segments riding along have loops of their own, which can be the wider)."""
    instructions = [(int(a, 16), op, operands) for a, _, op, operands in SASS_LINE.findall(sass)]
    loops = []
    for address, op, operands in instructions:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if op.startswith("BRA") and target and int(target.group(1), 16) < address:  # not the final self-branch
            start = int(target.group(1), 16)
            loops.append([(op, operands) for a, op, operands in instructions if start <= a <= address and op != "NOP"])
    if packed:
        loops = [loop for loop, signs in ((loop, ptx_conversion(loop)) for loop in loops)
                 if signs["prmt_0x64"] or signs["lop3_and_or"]]
    return max(loops, key=len, default=None)


# Opcode families, by their base mnemonic.
FAMILIES = {"tensor core": "HMMA IMMA HGMMA WGMMA",
            "fp32": "FADD FMUL FFMA FMNMX FSETP FSEL MUFU FCHK FSET FRND",
            "fp16 pairs": "HADD2 HMUL2 HFMA2 HMNMX2 HSETP2 HSET2",
            "integer/bit": "IMAD IADD3 IADD LOP3 SHF SHL SHR PRMT ISETP SEL LEA IMNMX IABS LEA.HI BMSK POPC FLO "
                           "IMUL ISCADD VIADD VIMNMX",
            "conversion": "I2F F2I F2F F2FP I2FP F2IP FRND I2I",
            "global load": "LDG LDGSTS LDGDEPBAR UBLKCP",
            "shared memory": "LDS STS LDSM STSM",
            "local (spills)": "LDL STL",
            "store": "STG RED ATOM"}
FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops.split()}


def instruction_mix(opcodes: list[str]) -> dict:
    mix = {}
    for op in opcodes:
        family = FAMILY_OF.get(op.split(".")[0], "other")
        mix[family] = mix.get(family, 0) + 1
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]))


def ptx_conversion(loop: list[tuple[str, str]]) -> dict:
    """Signs in a loop of kernels/codes.py's PTX conversion of codes: PRMT under the exponent byte
    (PTX_DIGITS's selectors 0x5140, 0x7362), LOP3 (a & b) | c (PTX_DIGITS3's), HFMA2 (base 3);
    and integer-to-float conversions, of which it leaves none."""
    return dict(prmt_0x64=sum(op == "PRMT" and ("0x5140" in o or "0x7362" in o) for op, o in loop),
                lop3_and_or=sum(op.startswith("LOP3") and re.search(r"0xea,\s*!PT\s*$", o) is not None for op, o in loop),
                hfma2=sum(op.startswith("HFMA2") for op, _ in loop),
                int_to_float=sum(op.split(".")[0] in ("I2F", "I2FP") for op, _ in loop))


def packed(launch: Launch) -> bool:
    """Whether stage 1 reads codes through kernels/codes.py (keys or values; SVDq's latent keys not)."""
    kw = launch.kwargs
    return launch.kernel.__name__ == "_attend_stage1" and not (kw.get("K_FULL", True) and kw.get("V_FULL", True))


def bytes_per_iteration(launch: Launch) -> int | None:
    """Bytes of K and V (codes and metadata) one program reads per loop iteration of stage 1."""
    kw = launch.kwargs
    if launch.kernel.__name__ != "_attend_stage1":
        return None
    total = 0
    for side in "kv":
        rows = kw[f"{side}_ptr"]
        if kw.get(f"{side.upper()}_FULL", True) and not kw.get(f"{side.upper()}_SVD", False):
            total += kw["D"] * rows.element_size()
            continue
        total += rows.shape[-1]  # packed codes of one token
        scale = kw[f"{side}_scale_ptr"]
        per_tokens = kw.get("K_TOKEN_GROUP", 1) if side == "k" else 1
        total += 2 * scale.shape[-1] * scale.element_size() / per_tokens
    return round(kw["BLOCK_N"] * total)


def analyse(launch: Launch, kernel, target: str) -> dict:
    """What one compiled specialization costs; a string kernel is the compiler's error."""
    if isinstance(kernel, str):
        return dict(compiled=False, error=kernel)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", cuobjdump(kernel.asm["cubin"], "-res-usage")))
    row = dict(compiled=True, registers=int(usage["REG"]), stack_bytes=int(usage["STACK"]) + int(usage["LOCAL"]),
               spill_bytes=0, shared_bytes=kernel.metadata.shared, warps=kernel.metadata.num_warps,
               stages=kernel.metadata.num_stages)
    if row["stack_bytes"]:  # a stack frame: spilled registers, or a local array (sin/cos of large angles)
        row["spill_bytes"] = spill_stores(kernel.asm["ptx"], GPUS[target].capability)
    loop = main_loop(cuobjdump(kernel.asm["cubin"], "-sass"), packed(launch))
    if loop is None:
        return row
    row.update(loop_instructions=len(loop), loop_mix=instruction_mix([op for op, _ in loop]))
    if packed(launch):
        row["ptx_conversion"] = ptx_conversion(loop)
    nbytes = bytes_per_iteration(launch)
    if nbytes:
        gpu = GPUS[target]
        per_byte = len(loop) * row["warps"] / nbytes
        row.update(bytes_per_iteration=nbytes, warp_instructions_per_byte=per_byte,
                   ceiling_tb_per_s=min(gpu.tb_per_s, gpu.tb_per_s * gpu.budget / per_byte))
    return row


def describe(launch: Launch) -> str:
    """A short name of the specialization: kernel and what it reads."""
    kw, name = launch.kwargs, launch.kernel.__name__.strip("_")
    if name != "attend_stage1":
        if name == "quantize_tokens":
            meta = "fp8" if kw["META_FP8"] else "fp16"
            return f"quantize {kw['LEVELS']} levels, {kw['GROUPS']} group(s), {meta}" + (", rotated" * kw["ROTATE"])
        if name == "write_decode_token":
            def store(s):
                if kw.get(f"{s}_RANK"):
                    return f"{s} latent rank {kw[f'{s}_RANK']}"
                return (f"{s} {kw[f'{s}_LEVELS']} levels, {kw[f'{s}_GROUPS']} group(s), "
                        f"{'fp8' if kw[f'{s}_META_FP8'] else 'fp16'}" + (", rotated" * kw.get(f"{s}_ROTATE", False)))
            stores = [store(s) for s in "KV" if kw.get(f"EVICT_{s}")]
            return f"decode write, block {kw.get('BLOCK', 1)}: " + ("; ".join(stores) or "full precision")
        return name

    def side(s):
        if kw.get(f"{s.upper()}_SVD"):
            return f"svdq {8 * kw['k_ptr'].shape[-1] / kw['D']:.3g}b r{kw['K_RANK']}"
        if kw.get(f"{s.upper()}_FULL", True):
            return str(kw[f"{s}_ptr"].dtype).replace("torch.", "")
        meta = str(kw[f"{s}_scale_ptr"].dtype).replace("torch.", "").replace("uint8", "fp8")  # e4m3 as bytes
        rotated = "/rotated" * kw.get(f"{s.upper()}_ROTATE", False)
        return f"{8 * kw[f'{s}_ptr'].shape[-1] / kw['D']:.3g}b/{kw[f'{s.upper()}_GROUPS']}g/{meta}{rotated}"

    flags = [f for f in ("RING", "ROPE", "CAUSAL") if kw.get(f)]
    phase = "decode" if kw["Q_BLOCK"] == 1 else "prefill"
    return f"stage1 {phase} G={kw['G']} K {side('k')} V {side('v')} {' '.join(flags)}".strip()


def analyse_all(launches: list[Launch], targets: list[str]) -> list[dict]:
    """One row per target and specialization. Launches alike but for Triton's integer
    specializations (an argument equal to 1 or a multiple of 16) compile to variants: the row
    keeps the costliest and counts them."""
    rows, seen = {}, set()
    for target in targets:
        for i, launch in enumerate(launches):
            print(f"\r{target}: launch {i + 1} of {len(launches)}", end="", file=sys.stderr, flush=True)
            kernel = compile_for(launch, target)
            key = (target, describe(launch))
            variant = (key, kernel if isinstance(kernel, str) else kernel.hash)
            if variant not in seen:
                seen.add(variant)
                row = dict(target=target, specialization=key[1], kernel=launch.kernel.__name__, sources=[],
                           decode=launch.kernel.__name__ == "_attend_stage1" and launch.kwargs["Q_BLOCK"] == 1,
                           variants=1, **analyse(launch, kernel, target))
                if key in rows:
                    old = rows[key]
                    row["variants"] += old["variants"]
                    row["sources"] = old["sources"]
                    if cost(old) >= cost(row):
                        row = {**old, "variants": row["variants"]}
                rows[key] = row
            rows[key]["sources"] += [s for s in launch.sources if s not in rows[key]["sources"]]
        print(file=sys.stderr)
    return list(rows.values())


def cost(row: dict) -> tuple:
    """Failing to compile is worst, then spills, then loop instructions."""
    return (not row["compiled"], row.get("spill_bytes", 0), row.get("stack_bytes", 0), row.get("loop_instructions", 0))


def markdown(rows: list[dict]) -> str:
    """Two tables: decode stage-1 specializations with their loop costs, on every target; every
    other specialization, whether it compiled everywhere and whether it spills."""
    targets = sorted({r["target"] for r in rows}, reverse=True)
    by = {(r["specialization"], r["target"]): r for r in rows}

    def cell(r):
        if r is None:
            return "-"
        if not r["compiled"]:
            return "does not compile"
        per_byte = r.get("warp_instructions_per_byte")
        cost = f"{r['loop_instructions']} / {per_byte:.2f} / {r['ceiling_tb_per_s']:.2f}" if per_byte else ""
        return f"{r['registers']} / {r['spill_bytes']} ({r['stack_bytes']}) / {cost}"

    decode = sorted({r["specialization"] for r in rows if r["decode"]})
    lines = [("Decode stage 1, per target: registers / bytes of registers spilled (stack frame) / main-loop "
              "SASS instructions per warp / warp-instructions per byte read / issue-bound ceiling in TB/s; "
              "bytes/iteration: K and V codes and metadata of one iteration's tokens of one KV head.\n"),
             "| specialization | bytes/iteration | " + " | ".join(targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for name in decode:
        nbytes = next((r["bytes_per_iteration"] for t in targets if (r := by.get((name, t))) and
                       "bytes_per_iteration" in r), "")
        lines.append(f"| {name} | {nbytes} | " + " | ".join(cell(by.get((name, t))) for t in targets) + " |")
    lines += ["", "Every other specialization: targets it compiles for, most registers, most spilled bytes.\n",
              "| specialization | compiles for | registers | spilled bytes |", "|---|---|---|---|"]
    for name in sorted({r["specialization"] for r in rows if not r["decode"]}):
        mine = [by[(name, t)] for t in targets if (name, t) in by]
        ok = [r for r in mine if r["compiled"]]
        failed = [f"{r['target']}: {r['error'][:60]}" for r in mine if not r["compiled"]]
        lines.append(f"| {name} | {', '.join(r['target'] for r in ok) or 'none'}"
                     f"{' (not ' + '; '.join(failed) + ')' if failed else ''} | "
                     f"{max((r['registers'] for r in ok), default='')} | {max((r['spill_bytes'] for r in ok), default='')} |")
    return "\n".join(lines)


def before_after(before: list[dict], after: list[dict], target: str = "sm_90") -> str:
    """Decode stage-1 specializations of two runs side by side on one target (an older run's
    spilled bytes were its stack frame)."""
    old = {r["specialization"]: r for r in before if r["target"] == target and r["decode"]}

    def cell(r):
        if r is None:
            return "-"
        if not r["compiled"]:
            return "does not compile"
        return (f"{r['loop_instructions']} x {r['warps']} / {r.get('warp_instructions_per_byte', 0):.2f} / "
                f"{r.get('stack_bytes', r['spill_bytes'])}")

    lines = [(f"{target}: main-loop instructions per warp x warps / warp-instructions per byte read / stack "
              "frame bytes (spills, or sin/cos's local array), before and after.\n"),
             "| specialization | bytes/iteration | before | after |", "|---|---|---|---|"]
    for r in sorted((r for r in after if r["target"] == target and r["decode"]), key=lambda r: r["specialization"]):
        lines.append(f"| {r['specialization']} | {r.get('bytes_per_iteration', '')} | "
                     f"{cell(old.get(r['specialization']))} | {cell(r)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(SHAPES))
    p.add_argument("--settings", type=lambda s: s.split(","), default=SASS_SETTINGS)
    p.add_argument("--targets", type=lambda s: s.split(","), default=list(GPUS))
    p.add_argument("--quick", action="store_true", help="the default cache at the Llama-3-8B shape for sm_80 and "
                   "sm_90: its fp16 sinks and window, packed history, quantize and merge (a minute, cold)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sass.json")
    p.add_argument("--before", type=Path, help="an earlier run's JSON: print its decode costs beside these")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.settings, args.targets = QUICK["models"], QUICK["settings"], QUICK["targets"]
    bad = [t for t in args.targets if t not in GPUS] + [m for m in args.models if m not in SHAPES]
    if bad:
        p.error(f"unknown target or model: {', '.join(bad)} (targets: {', '.join(GPUS)}; models: {', '.join(SHAPES)})")
    torch.manual_seed(0)
    launches, steps = all_launches(args.models, args.settings)
    rows = analyse_all(launches, args.targets)
    result = dict(triton=triton.__version__, torch=torch.__version__, commit=git_commit(), command=command_line(),
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  budgets={t: dict(gpu=g.name, warp_instructions_per_byte=g.budget, tb_per_s=g.tb_per_s)
                           for t, g in GPUS.items()}, decode_step=steps, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows))
    if args.before:
        print("\n" + before_after(json.loads(args.before.read_text())["rows"], rows))
    print("\nA decode step on the CPU, per layer: Triton launches / torch operations / host syncs; and the "
          "torch operations of its reserve, once per step.\n\n| model | cache | launches | torch ops | host syncs "
          "| reserve ops |\n|---|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['model']} | {s['kv']} | {s['triton_launches_per_layer']} | {s['torch_ops_per_layer']} | "
              f"{s['host_syncs_per_layer']} | {s['torch_ops_per_step']} |")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
