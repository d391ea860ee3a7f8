"""Tensor and context parallelism (engine/parallel.py) on the CPU: gloo between processes that
each test spawns, as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or torchrun itself.
Every parallel run is checked against the same run in one process."""
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from engine.parallel import Parallel, merge
from kernels import decode_attention, streaming
from kernels.decode_attention import Segment
from quant.calibrate import CALIBRATION_FILE, calibration_from

TESTS = ROOT / "tests"
# MHA and GQA shapes with head_dim 32 (SVDq keys need 16 | head_dim); 4 query heads split by tp 2.
SHAPES = {"mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32),
          "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)}
# Small sinks and window and short SVDq blocks, so that a 90-token prompt puts history on every rank of 4.
CACHES = ["fp16", "skvq-k2v1.5:sinks=2:window=8", "svdq-k1.25v1.5:sinks=2:window=8:token-group=8"]
PROMPTS = [90, 77]     # tokens per prompt (a batch of two, right-padded)
CHUNK = 32             # prefill chunk: three chunks for the longer prompt
DECODE_STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun gives each process; one thread each, as torchrun sets."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}


def spawn(world: int, argv: list[str]) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env(rank, world, port), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(world)]


def finish(processes, timeout=240) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]


def write_calibration(path, n_layers, n_heads, head_dim):
    """A calibration whose tables differ head by head (channel ranges, SVD bases), so that a rank
    given another rank's tables would quantize differently."""
    g = torch.Generator().manual_seed(1)
    ranges = torch.rand(n_heads, head_dim, generator=g) * 4 + 0.1                  # (Hkv, D)
    captured = {(layer, kind): torch.randn(256, n_heads, head_dim, generator=g) * ranges
                for layer in range(n_layers) for kind in ("k_pre", "k_post", "v")}
    calibration = calibration_from(captured, n_layers, [head_dim])
    save_file({k: v.contiguous() for k, v in calibration.tensors.items()}, path / CALIBRATION_FILE,
              metadata={"settings": json.dumps(calibration.settings)})


def logits_through_cache(path, kv: str, parallel: Parallel, kernels: bool = False):
    """Chunked prefill of PROMPTS then DECODE_STEPS fixed tokens: logits [steps + 1, B, vocab] and
    the cache's bytes; `kernels`: attention and eviction through the Triton kernels (interpreted)."""
    from engine.cache import make_cache
    from engine.parallel import load_model
    from engine.runner import decode_one_token, prefill
    from quant.calibrate import load_calibration
    from quant.kvspec import parse

    model = load_model(path, "cpu", torch.float32, parallel)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (len(PROMPTS), max(PROMPTS) + DECODE_STEPS), generator=g)
    cache = make_cache(parse(kv), model.config, len(PROMPTS), max(PROMPTS) + DECODE_STEPS + 1, "cpu", torch.float32,
                       load_calibration(path), use_kernels=kernels, parallel=parallel)
    logits = [prefill(model, tokens[:, :max(PROMPTS)], torch.tensor(PROMPTS), cache, chunk_size=CHUNK)]
    for step in range(DECODE_STEPS):
        logits.append(decode_one_token(model, tokens[:, max(PROMPTS) + step], cache))
    return torch.stack(logits), cache.nbytes()


def worker(tp: int, cp: int, cases: list, out: str):
    """One rank of a spawned group: every case's logits, saved by rank 0."""
    from engine.parallel import start, stop

    parallel = start(tp, cp, torch.device("cpu"))
    results = {case: logits_through_cache(*case[:2], parallel, *case[2:]) for case in cases}
    if parallel.rank == 0:
        torch.save(results, out)
    stop(parallel)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An MHA random checkpoint with a calibration file, and a GQA one without (equal groups,
    SVDq bases from the prompt)."""
    from conftest import make_hf_model

    paths = {}
    for name, shape in SHAPES.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_model(seed=3, **shape).save_pretrained(path)
        if name == "mha":
            with one_thread():
                write_calibration(path, 2, shape["num_key_value_heads"], shape["head_dim"])
        paths[name] = path
    return paths


@contextlib.contextmanager
def one_thread():
    """Small models' many small ops: on two threads of this shared machine up to 30x slower than
    on one (measured: the calibration below, 20 s against 0.7 s); the spawned ranks run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def one_process(path: str, kv: str, kernels: bool = False):
    """logits_through_cache in this process, once per case for every layout's test."""
    with one_thread():
        return logits_through_cache(path, kv, Parallel(), kernels)


def compare_with_one_process(tmp_path, tp: int, cp: int, cases: list):
    """Runs `cases` (checkpoint, kv, kernels) on a spawned tp x cp group; its logits are one process's."""
    out = tmp_path / "logits.pt"
    code = f"from test_parallel import worker; worker({tp}, {cp}, {cases!r}, {str(out)!r})"
    for returncode, _, stderr in finish(spawn(tp * cp, ["-c", code])):
        assert returncode == 0, stderr[-3000:]
    parallel = torch.load(out)
    for case in cases:
        (expected, nbytes), (got, rank_bytes) = one_process(*case), parallel[case]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{case} tp {tp} cp {cp}")
        if cp == 1:  # heads split evenly: each rank holds 1/tp of the cache
            assert rank_bytes * tp == nbytes


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2), (1, 4), (2, 2)])
def test_parallel_logits_equal_one_process(models, tmp_path, tp, cp):
    """MHA and GQA, the fp16 (fp32 here) and two quantized caches, through prefill chunks and
    decode steps with history on every rank: the group's logits are one process's, to 1e-4."""
    compare_with_one_process(tmp_path, tp, cp, [(str(path), kv) for path in models.values() for kv in CACHES])


@pytest.mark.slow
@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2)])
def test_parallel_logits_through_the_kernels(models, tmp_path, tp, cp):
    """The GPU path, under Triton's interpreter: each rank's stage 1 and merged lse, the fused
    eviction writing only the rank's rows; the logits are one process's through the same kernels."""
    compare_with_one_process(tmp_path, tp, cp, [(str(models["mha"]), kv, True) for kv in CACHES[1:]])


def test_history_is_spread_over_every_rank():
    """Under cp 4 the 90-token prompts of the logits test leave history rows on every rank (for
    SVDq, in whole blocks), so each rank's share is exercised there."""
    from quant.kvspec import parse

    context = max(PROMPTS) + DECODE_STEPS + 1
    for kv in CACHES[1:]:
        schedule = parse(kv).key_schedule
        for rank in range(4):
            first, rows = Parallel(cp=4, rank=rank).token_range(schedule.history_length(context), schedule.block)
            assert first < schedule.history_length(max(PROMPTS)) and rows > 0, (kv, rank)


def greedy(argv: list[str], world: int = 1):
    """generate.py's stdout, alone or under torchrun with `world` processes."""
    launcher = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(free_port())]
    r = subprocess.run([*launcher, "generate.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, r.stderr


@pytest.mark.parametrize("flags", [["--tp", "2"], pytest.param(["--cp", "2"], marks=pytest.mark.slow)])
def test_greedy_generation_through_torchrun_is_one_process(checkpoint, tmp_path, flags):
    path, _ = checkpoint(num_key_value_heads=2)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the lord said unto moses and the light was day and night " * 3)
    argv = ["--model", str(path), "--prompt-file", str(prompt), "--max-new-tokens", "24", "--temperature", "0",
            "--kv", "skvq-k2v1.5:sinks=2:window=8"]
    alone, _ = greedy(argv)
    together, stats = greedy([*argv, *flags], world=2)
    assert together == alone and len(alone) > 10
    assert "per rank" in stats and "on 2 ranks" in stats


def test_a_world_that_does_not_match_is_one_flag_error():
    r = subprocess.run([sys.executable, "generate.py", "--tp", "2", "--prompt-tokens", "4"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "generate.py: error: --tp 2 --cp 1 needs 2 processes (torchrun --nproc-per-node 2 ...); one runs (no torchrun)"]


def test_kv_heads_that_do_not_split_are_one_error_from_rank_0(checkpoint):
    path, _ = checkpoint(num_key_value_heads=1)
    results = finish(spawn(2, ["generate.py", "--model", str(path), "--prompt-tokens", "8", "--tp", "2"]))
    assert [r[0] for r in results] == [2, 2]
    lines = [line for _, _, stderr in results for line in stderr.splitlines()]
    assert lines == ["error: --tp 2: the model's 1 KV heads do not split over 2 ranks"]


def test_a_rank_that_dies_ends_the_others_with_one_error(checkpoint):
    """Rank 1 is killed mid-generation: rank 0's next collective fails at once (no hang), and it
    exits non-zero with one error line."""
    path, _ = checkpoint(eos_token_id=None, max_position_embeddings=4096)
    ranks = spawn(2, ["generate.py", "--model", str(path), "--prompt-tokens", "16", "--max-new-tokens", "4000",
                      "--cp", "2", "--temperature", "0"])
    assert ranks[0].stdout.read(1)  # the first new token: both ranks are decoding
    ranks[1].send_signal(signal.SIGKILL)
    begin = time.monotonic()
    (returncode, _, stderr), _ = finish(ranks, timeout=60)
    assert time.monotonic() - begin < 30
    assert returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: a collective failed"), stderr[-2000:]


@pytest.mark.parametrize("Q", [1, 3])  # decode (streaming: the C kernel) and a prefill chunk
@pytest.mark.parametrize("attend", [streaming.attend, decode_attention.attend], ids=["streaming", "triton"])
def test_attention_over_parts_merges_to_attention_over_all(attend, Q):
    """Each part's (output, lse) merged by engine/parallel.py merge equals one attention over
    every segment: ring, rows and a causal chunk, split into parts as ranks split them, one part
    seeing no token at all."""
    torch.manual_seed(0)
    B, H, Hkv, D, T = 2, 4, 2, 32, 40
    q = torch.randn(B, Q, H, D)
    rows = lambda: (torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D))
    ring = Segment(*rows(), torch.tensor([17, 9]), torch.tensor([5, 30]), torch.tensor([100, 90]))
    history = Segment(*rows(), torch.tensor([40, 23]), None, torch.tensor([3, 3]))
    chunk = Segment(*rows(), torch.tensor([3, 2]), None, torch.tensor([120, 110]), causal=True)
    empty = Segment(*rows(), torch.tensor([0, 0]), None, torch.tensor([43, 26]))
    q_position = torch.tensor([120, 110])
    expected = attend(q, [ring, history, chunk], q_position)
    parts = [attend(q, segments, q_position, return_lse=True) for segments in ([history], [ring, chunk], [empty])]
    assert bool((parts[2][1] == -torch.inf).all()) and bool((parts[2][0] == 0).all())
    merged = merge(torch.stack([out.float() for out, _ in parts]), torch.stack([lse for _, lse in parts]))
    torch.testing.assert_close(merged, expected.float(), atol=1e-5, rtol=1e-5)
    # The lse is the log of the softmax's mass: here, over the history's tokens alone.
    keys = history.keys[:, torch.arange(H) // (H // Hkv)]                            # (B, H, T, D)
    lse = [torch.logsumexp(torch.einsum("qhd,htd->qht", q[b], keys[b, :, :n]) * D ** -0.5, -1)
           for b, n in enumerate(history.count.tolist())]
    torch.testing.assert_close(parts[0][1], torch.stack(lse), atol=1e-5, rtol=1e-5)


def test_the_group_holds_what_its_ranks_hold():
    """The planner on meta (bench/memory.py --plan-gib): cp 2 holds twice one GPU's context, less
    the gathered outputs' working memory; tp 2 more than twice (each rank also holds half the
    weights). Llama-2-7B, K2V1.5, 80 GiB GPUs."""
    from bench.memory import planned
    from quant.kvspec import parse

    # A 128-token window: each rank's fp16 sinks and window then cost under the bound's 1e-4.
    one, cp2, tp2 = (planned("llama2-7b", parse("skvq-k2v1.5:window=128"), 80 * 2 ** 30, tp, cp, 1)["planner_context"]
                     for tp, cp in [(1, 1), (1, 2), (2, 1)])
    assert 1_000_000 < one and 0.9999 * 2 * one < cp2 <= 2 * one and tp2 > 2.1 * one
