"""Llama 3 checkpoints: a byte-level BPE tokenizer.json with special tokens (no SentencePiece
model), EOS ids from generation_config.json, against transformers' tokenizer and greedy output."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_hf_model
from test_cli import run_cli

from engine.tokenizer import eos_ids, load_tokenizer
from model import LlamaConfig

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
TEXTS = ["the lord said unto moses", " leading space, and café Éden ! 😀 123456",
         "<|eot_id|> special tokens in the text <|end_of_text|>", "näïve\n\nnew lines\t tabs", ""]


def build_tokenizer_json(directory):
    """A Llama-3-style tokenizer: byte-level BPE trained on a small corpus, the special tokens
    added after the vocabulary (as Llama 3's 128000+), BOS added by the post-processor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    words = ["the", "lord", "said", "unto", "moses", "and", "light", "was", "day", "night", "heaven", "café"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(300)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens(SPECIALS)
    bos = tokenizer.token_to_id(SPECIALS[0])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B", special_tokens=[(SPECIALS[0], bos)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "tokenizer_class": "PreTrainedTokenizerFast",
         "clean_up_tokenization_spaces": False}))
    return tokenizer


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random Llama-3-shaped checkpoint (GQA, llama3 RoPE, several EOS ids) saved by transformers,
    with only tokenizer.json: (dir, hf model)."""
    path = tmp_path_factory.mktemp("llama3")
    tokenizer = build_tokenizer_json(path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {name: tokenizer.token_to_id(name) for name in SPECIALS}
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    hf = make_hf_model(vocab_size=vocab, num_key_value_heads=2, bos_token_id=ids[SPECIALS[0]],
                       eos_token_id=[ids[SPECIALS[1]], ids[SPECIALS[2]]], pad_token_id=None, rope_parameters=rope)
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_encodes_and_decodes_as_transformers(llama3, text):
    from transformers import AutoTokenizer

    path, _ = llama3
    assert not (path / "tokenizer.model").exists()
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ids[0] == ours.bos_id == theirs.convert_tokens_to_ids(SPECIALS[0])
    assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.vocab_size == len(theirs)


def test_eos_ids_come_from_generation_config(llama3):
    path, hf = llama3
    cfg = LlamaConfig.from_json(path / "config.json")
    assert eos_ids(path, cfg) == hf.generation_config.eos_token_id and len(eos_ids(path, cfg)) == 2
    gen = json.loads((path / "generation_config.json").read_text())
    other = path.parent / "other"
    shutil.copytree(path, other)
    (other / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 5}))
    assert eos_ids(other, cfg) == [5]
    (other / "generation_config.json").unlink()
    assert eos_ids(other, cfg) == cfg.eos_ids
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(Exception, match="eos_token_id must be an integer or a list of integers"):
        eos_ids(other, cfg)


def test_llama3_checkpoint_generates_transformers_greedy_text(llama3, tmp_path):
    from transformers import AutoTokenizer

    path, hf = llama3
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the lord said unto moses, café")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(prompt.read_text())
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0].tolist()
    new = out[len(ids):]
    for eos in hf.generation_config.eos_token_id:
        new = new[:new.index(eos)] if eos in new else new
    expected = tok.decode(ids + new)[len(tok.decode(ids)):]
    assert len(new) > 5  # a test of text, not of an immediate EOS

    # Bytes, not text mode: a random model emits "\r", which text mode would turn into "\n".
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(path), "--prompt-file", str(prompt),
                        "--max-new-tokens", "30", "--temperature", "0", "--device", "cpu", "--dtype", "float32",
                        "--kv", "fp16"], capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == expected + "\n"


def test_prompt_tokens_need_no_tokenizer(llama3, tmp_path):
    path, hf = llama3
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    r = run_cli("--model", bare, "--prompt-tokens", 12, "--max-new-tokens", 6, "--temperature", 0,
                "--device", "cpu", "--dtype", "float32", "--kv", "fp16", "--seed", 4)
    assert r.returncode == 0, r.stderr
    assert "no tokenizer" in r.stderr and "prompt tokens: 12" in r.stderr
    new = [int(t) for t in r.stdout.split()]
    # The same synthetic prompt (config.json's BOS, then random ids from the seed) through transformers.
    prompt = [hf.config.bos_token_id] + torch.randint(3, hf.config.vocab_size, (11,),
                                                      generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 12:].tolist()
    for eos in hf.generation_config.eos_token_id:
        out = out[:out.index(eos)] if eos in out else out
    assert new == out and r.stdout.endswith("\n")
