"""The memory planner prices caches exactly (on the meta device, by the code that allocates them)
and finds the longest context that fits a budget."""
import pytest
import torch

from engine.cache import make_cache
from engine.planner import cache_bytes, largest_context, plan, working_bytes
from model import LlamaConfig

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


@pytest.mark.parametrize("kv", ["fp16", "skvq-k2v1.5", "skvq-k4v4", "svdq-k1.25v1.5", "kivi-k2v2"])
@pytest.mark.parametrize("context", [1, 200, 1000])
def test_meta_price_is_what_allocation_takes(kv, context):
    make = lambda n, device: make_cache(kv, CFG, 3, n, device, torch.float32, n_sink=5, window=16, group_size=16,
                                        token_group=32)
    assert cache_bytes(make, context) == make(context, "cpu").nbytes()


def test_largest_context_is_the_longest_within_budget():
    make = lambda n, device: make_cache("skvq-k2v1.5", CFG, 2, n, device, torch.float32, window=16, group_size=16)
    budget = cache_bytes(make, 1234) + 10  # bytes grow with every token: 1235 tokens no longer fit
    assert cache_bytes(make, 1235) > budget
    assert largest_context(make, budget) == 1234
    assert largest_context(make, cache_bytes(make, 1) - 1) == 0


def test_plan_refuses_what_does_not_fit():
    make = lambda n, device: make_cache("fp16", CFG, 1, n, device, torch.float32)
    small = plan(make, CFG, 1, 100, 1000, "cpu", torch.float32)
    assert small.fits and small.cache == make(1000, "cpu").nbytes()
    assert small.working == working_bytes(CFG, 1, 100, torch.float32, False)
    huge = plan(make, CFG, 1, 100, 1 << 40, "cpu", torch.float32)
    assert not huge.fits and "GiB of KV cache" in huge.explain()
    auto = plan(make, CFG, 1, 100, "auto", "cpu", torch.float32)
    assert auto.fits and cache_bytes(make, auto.context + 1) + auto.working > auto.free
