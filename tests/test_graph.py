"""The decode step can be captured as a CUDA graph (engine/runner.py Decoder), checked without a
GPU: one step's device work (`_decode`) runs with its Triton launches recorded instead of run,
under a dispatch mode that sees every torch operation. Capturable means: no operation that makes
the host wait for the device or whose output shape depends on values (bench/dispatch.py
HOST_SYNCS, boolean indexing, copies to the host, .tolist()), and the same operations, output
shapes, grids and scalar launch arguments at every step, whatever the lengths."""
import pytest
import torch
from conftest import DEVICE

from bench.dispatch import TorchOps, recorded_launches
from cli import UserError
from engine.cache import make_cache
from engine.runner import Decoder, _decode
from model import Llama, LlamaConfig
from quant.kvspec import parse


def launch_signature(launch) -> tuple:
    """What a graph replays of a launch: its kernel, grid, scalars, and its tensors' layouts."""
    def value(x):
        return (tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x
    return (launch.kernel.__name__, launch.grid, tuple(map(value, launch.args)),
            tuple((k, value(x)) for k, x in sorted(launch.kwargs.items())))


def decode_steps(kv: str, steps: int, monkeypatch, use_kernels: bool = True) -> list[dict]:
    """`steps` decode steps of a 2-layer GQA model over two sequences of 13 and 6 tokens (3 sinks,
    a window of 8, SVDq blocks of 4): each step's operations, host syncs and launches."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = Llama(cfg).to(DEVICE)
    spec = parse(f"{kv}:sinks=3:window=8" if kv != "fp16" else kv)
    spec = spec.with_settings(token_group=4) if spec.method == "svdq" else spec
    cache = make_cache(spec, cfg, 2, 64, DEVICE, torch.float32, use_kernels=use_kernels)
    cache.lengths.copy_(torch.tensor([13, 6]))  # what a prefill leaves; contents do not matter here
    token = torch.tensor([5, 7], device=DEVICE)
    host_reads = []
    for method in ("tolist", "numpy", "cpu"):  # on a CPU tensor these reach no dispatch mode
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _real=real, _name=method, **k:
                            host_reads.append(_name) or _real(self, *a, **k))
    recorded = []
    for _ in range(steps):
        with torch.no_grad(), recorded_launches() as launches, TorchOps() as ops:
            _decode(model, token, cache)
        recorded.append(dict(ops=list(zip(ops.ops, ops.shapes)), syncs=ops.syncs + host_reads[:],
                             launches=[launch_signature(x) for x in launches]))
        host_reads.clear()
    return recorded, cache


@pytest.mark.parametrize("kv", ["fp16", "skvq-k2v1.5", "skvq-k4v4:metadata=fp16:rotation=none:pre-rope-keys", "svdq-k1.25v1.5",
                                "skvq-k2v1.5:rotation=none:scaling=minmax"])
def test_decode_step_is_capturable(kv, monkeypatch):
    """Ten steps: the first sequence evicts a token at each (SVDq: a block of 4 at every fourth),
    the second fills its window."""
    steps, cache = decode_steps(kv, 10, monkeypatch)
    assert cache.capturable
    assert [s["syncs"] for s in steps] == [[]] * 10
    assert all(s["ops"] == steps[0]["ops"] and s["launches"] == steps[0]["launches"] for s in steps)
    assert len(steps[0]["launches"]) == 2 * 3  # two layers: the write, stage 1 over every segment, the merge


@pytest.mark.parametrize("kv", ["skvq-k2v1.5", "svdq-k1.25v1.5"])
def test_plain_torch_decode_step_is_not_capturable_and_says_so(kv, monkeypatch):
    """Without the kernels (kernels/streaming.py, the torch stores' writes) a step syncs with the
    host: the check above sees it, the cache says so, and the runner refuses to capture it."""
    steps, cache = decode_steps(kv, 5, monkeypatch, use_kernels=False)
    assert not cache.capturable
    assert all(s["syncs"] for s in steps)
    with pytest.raises(UserError, match="cannot be captured"):
        Decoder(None, cache, graph=True)
    assert not Decoder(None, cache).graph
