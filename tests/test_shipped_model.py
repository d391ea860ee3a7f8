"""The shipped demo model, weights/kjv-tiny: golden output, perplexity as documented, HF loadable."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from engine.tokenizer import load_tokenizer, prompt_prefix
from model import Llama
from quant.eval import perplexity

MODEL = ROOT / "weights" / "kjv-tiny"
GOLDEN_PROMPT = "And God said, Let there be light: and there was light."
GOLDEN_CONTINUATION = ("\nAnd he said, I will not go into the morning, and will not go out of the land, nor I "
                       "will make it a man of his people, and the people shall be a")


def test_golden_greedy_continuation(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(GOLDEN_PROMPT)
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt-file", str(prompt),
                        "--max-new-tokens", "40", "--temperature", "0", "--device", "cpu", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == GOLDEN_CONTINUATION + "\n"  # the continuation, then a line break


def test_validation_perplexity_matches_readme():
    # The perplexity table's row for val_sample.txt; its last cell is the perplexity.
    documented = re.search(r"^\| val_sample\.txt.*\|\s*([\d.]+)\s*\|$", (MODEL / "README.md").read_text(), re.M)
    assert documented, "README.md states no val_sample.txt perplexity"
    model = Llama.from_pretrained(MODEL, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(MODEL)
    ids = tokenizer.encode((MODEL / "val_sample.txt").read_text(), bos=False)
    ppl = perplexity(model, ids, model.config.max_position_embeddings, prompt_prefix(tokenizer))
    assert ppl == pytest.approx(float(documented.group(1)), rel=0.01)


def test_loads_in_transformers_unchanged():
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(MODEL, device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, ours.config.vocab_size, (1, 200))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
