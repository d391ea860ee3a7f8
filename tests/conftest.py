"""Shared fixtures: random small Llama checkpoints written by transformers itself, and a tokenizer."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under pytest-xdist (make test), the workers share the cores: torch threads of one each are not
# oversubscribed (and tests that set their own thread counts still do).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the long sweeps marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long sweep, skipped unless pytest runs with --slow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="a long sweep: pytest --slow runs it"))


SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(seed=0, dtype=torch.float32, **overrides):
    """A transformers LlamaForCausalLM with a random small config. Weights are drawn with a
    larger std than the default 0.02 so that logits differ clearly between tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return hf.to(dtype)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A small byte-fallback BPE SentencePiece model with Llama's special ids."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    text = d / "text.txt"
    words = ["the", "lord", "said", "unto", "moses", "and", "light", "was", "day", "night",
             "heaven", "earth", "water", "spirit", "God", "created", "beginning", "in", "of"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(400)]
    text.write_text("\n".join(lines) + "\nÉden café naïve 123 456\n")
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=300,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", minloglevel=2)
    return d / "tokenizer.model"


@pytest.fixture
def checkpoint(tmp_path, tokenizer_path):
    """Factory: writes a random HF checkpoint (with tokenizer) and returns (dir, hf_model)."""
    import shutil

    def make(seed=0, dtype=torch.float32, max_shard_size=None, **overrides):
        hf = make_hf_model(seed, dtype, **overrides)
        out = tmp_path / f"ckpt{seed}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        hf.save_pretrained(out, **kwargs)
        shutil.copy(tokenizer_path, out / "tokenizer.model")
        return out, hf

    return make


def run_main(capsys, module, *argv):
    """(exit status, stdout, stderr) of a command-line module with parse_args and main (generate,
    quant.calibrate, quant.eval) given ARGV, run in this process as its __main__ runs it."""
    from cli import run_cli

    try:
        args = module.parse_args([str(a) for a in argv])
        run_cli(lambda: module.main(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err
