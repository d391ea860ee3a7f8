"""The KV spec: one parse of --kv, a canonical name, one eviction schedule; and the import
layering it relies on (generate.py answers --help and bad flags without torch)."""
import ast

import pytest
import torch

from conftest import ROOT
from quant.kvspec import DEFAULT, KvSpec, Schedule, for_method, parse

SPECS = ["fp16", "skvq-k2v1.5", "skvq-k4v4:sinks=0:window=64:group-size=32:grouping=kmeans:metadata=fp16",
         "skvq-k3v1:rotation=none:pre-rope-keys", "skvq-k2v1.5:window=128:rotation=none:scaling=minmax", "skvq-k3v1.5:window=64:rotation=hadamard-keys",
         "skvq-k3v1.5:window=128:scaling=minmax",
         "svdq-k1.25v1.5:svdq-basis=prompt:token-group=64", "svdq-k2v2:group-size=64",
         "kivi-k2v2", "kivi-k4v2:window=64:group-size=16:token-group=16"]


@pytest.mark.parametrize("text", SPECS)
def test_canonical_name_parses_back_to_the_same_spec(text):
    spec = parse(text)
    assert str(spec) == text and parse(str(spec)) == spec


def test_settings_in_any_order_and_at_their_defaults_name_one_spec():
    spec = parse("skvq-k2v1.5:grouping=kmeans:window=64:sinks=5:metadata=fp8")
    assert str(spec) == "skvq-k2v1.5:window=64:grouping=kmeans"
    assert spec == KvSpec(window=64, grouping="kmeans") and parse("skvq-k2v1.5") == DEFAULT
    assert str(for_method("kivi", 2, 2)) == "kivi-k2v2" and for_method("kivi", 2, 2).sinks == 0


@pytest.mark.parametrize("text, message", [
    ("int3", "unknown method 'int3'"), ("skvq", "expected METHOD-kKvV"), ("skvq-k2", "expected METHOD-kKvV"),
    ("skvq-k2v1.7", "value bits in"), ("skvq-k1.5v2", "key bits in"), ("svdq-k3v2", "key bits in 1.25, 2"),
    ("kivi-k3v2", "key bits in 1, 2, 4, 8"), ("fp16-k2v2", "fp16 takes no bits"), ("skvq-kinfv2", "expected"),
    ("fp16:window=64", "window does not apply to fp16"), ("kivi-k2v2:sinks=4", "sinks does not apply to kivi"),
    ("svdq-k2v2:pre-rope-keys", "pre-rope-keys does not apply to svdq"),
    ("skvq-k2v2:token-group=64", "token-group does not apply to skvq"), ("skvq-k2v2:window=0", "positive integer"),
    ("skvq-k2v2:sinks=-1", "sinks must be an integer >= 0"), ("skvq-k2v2:window=1e3", "must be an integer"),
    ("skvq-k2v2:window", "needs a value"), ("skvq-k2v2:pre-rope-keys=yes", "takes no value"),
    ("skvq-k2v2:rotation=random", "rotation must be one of none, hadamard, hadamard-keys"),
    ("skvq-k2v2:pre-rope-keys:rotation=hadamard", "does not commute with RoPE"),
    ("svdq-k2v2:rotation=hadamard", "rotation does not apply to svdq"),
    ("skvq-k2v2:scaling=mse", "scaling must be one of minmax, rms"), ("kivi-k2v2:scaling=rms", "scaling does not"),
    ("skvq-k2v2:grouping=best", "grouping must be one of"), ("skvq-k2v2:metadata=fp4", "metadata must be one of"),
    ("kivi-k2v2:window=100", "multiple of its token-group 32"), ("skvq-k2v2:size=3", "unknown setting 'size'"),
])
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as e:
        parse(text)
    assert message in str(e.value)


def test_a_spec_the_model_cannot_take():
    parse("skvq-k2v2").check(80)  # 128 does not divide 80: one group of the whole head
    with pytest.raises(ValueError, match="group-size 64 must divide head_dim 80"):
        parse("skvq-k2v2:group-size=64").check(80)
    with pytest.raises(ValueError, match="divisible by 16"):
        parse("svdq-k2v2").check(72)
    assert parse("skvq-k2v2").channel_group(256) == 128 and parse("skvq-k2v2").channel_group(96) == 96


@pytest.mark.parametrize("sinks, window, block", [(0, 1, 1), (5, 128, 1), (3, 7, 4), (5, 128, 128), (0, 1, 32)])
def test_schedule_puts_every_position_in_one_place(sinks, window, block):
    """For every length n: positions < sinks are sinks, then the history (whole blocks that have
    all left the last `window` positions), then the rest in the ring, which never needs more than
    window + block - 1 slots; ints and tensors alike."""
    schedule = Schedule(sinks, window, block)
    n = torch.arange(400)
    history = schedule.history_length(n)
    assert history.tolist() == [schedule.history_length(int(x)) for x in n]
    for length, h in zip(n.tolist(), history.tolist()):
        recent = length - min(length, sinks) - h
        assert h % block == 0 and h >= 0
        # A block is in the history iff all of its tokens are out of the last `window` positions.
        next_block_end = sinks + h + block  # one past the next block's last token
        assert length - window < next_block_end                       # the next one is not yet out
        assert h == 0 or sinks + h <= length - window                 # every held block is out
        assert recent <= schedule.ring


def module_imports(path):
    """Top-level modules a file imports at module level (function bodies excluded)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_dependencies_point_one_way():
    """model.py <- engine <- generate.py; quant/ and kernels/ lie below the engine and never import
    it (the two programs in quant/ load the tokenizer from it inside their main()); nothing below
    the programs imports them or the benchmarks."""
    layers = {"model.py": {"engine", "quant", "kernels", "generate", "bench"},
              "kernels": {"engine", "generate", "bench"},
              "quant": {"engine", "generate", "bench"},
              "engine": {"generate", "bench"}}
    for where, forbidden in layers.items():
        for path in [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).glob("*.py")):
            assert not module_imports(path) & forbidden, f"{path.name} imports {module_imports(path) & forbidden}"


@pytest.mark.parametrize("path", ["cli.py", "quant/kvspec.py", "generate.py"])
def test_what_parses_flags_imports_no_torch(path):
    assert not module_imports(ROOT / path) & {"torch", "triton", "numpy"}


def test_an_8_bit_side_keeps_min_max_under_rms_scaling():
    """rms has no Gaussian step for 256 levels (quant/uniform.py): the quantizer refuses it, and
    the cache's 8-bit side keeps min-max while its low-bit side scales by RMS."""
    from quant.calibrate import quantizers_for
    from quant.skvq import TokenQuantizer, equal_groups
    with pytest.raises(ValueError, match="8 bits keeps min-max"):
        TokenQuantizer(8, equal_groups(2, 16, 16), scaling="rms")
    keys, values = quantizers_for(parse("skvq-k2v8:scaling=rms"), 2, 2, 16)
    assert [q.scaling for q in keys] == ["rms"] * 2 and [q.scaling for q in values] == ["minmax"] * 2
