"""The memory planner prices caches exactly (on the meta device, by the code that allocates them)
and finds the longest context that fits a budget."""
import pytest
import torch

from engine.cache import make_cache
from engine.planner import Request, largest_context, plan, working_bytes
from model import LlamaConfig
from quant.kvspec import parse

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


@pytest.mark.parametrize("kv", ["fp16", "skvq-k2v1.5:window=16:group-size=16", "skvq-k4v4:window=16:group-size=16",
                                "svdq-k1.25v1.5:window=16:group-size=16:token-group=32"])
@pytest.mark.parametrize("context", [1, 200, 1000])
def test_meta_price_is_what_allocation_takes(kv, context):
    request = Request(parse(kv), CFG, 3, torch.float32)
    assert request.cache_bytes(context) == make_cache(parse(kv), CFG, 3, context, "cpu", torch.float32).nbytes()


def test_largest_context_is_the_longest_within_budget():
    request = Request(parse("skvq-k2v1.5:window=16:group-size=16"), CFG, 2, torch.float32)
    budget = request.cache_bytes(1234) + 10  # bytes grow with every token: 1235 tokens no longer fit
    assert request.cache_bytes(1235) > budget
    assert largest_context(request, budget) == 1234
    assert largest_context(request, request.cache_bytes(1) - 1) == 0


def test_plan_refuses_what_does_not_fit():
    request = Request(parse("fp16"), CFG, 1, torch.float32)
    small = plan(request, 100, 1000, "cpu")
    assert small.fits and small.cache == make_cache(parse("fp16"), CFG, 1, 1000, "cpu", torch.float32).nbytes()
    assert small.working == working_bytes(CFG, 1, 100, torch.float32, False)
    huge = plan(request, 100, 1 << 40, "cpu")
    assert not huge.fits and "GiB of KV cache" in huge.explain()
    auto = plan(request, 100, "auto", "cpu")
    assert auto.fits and request.cache_bytes(auto.context + 1) + auto.working > auto.free
