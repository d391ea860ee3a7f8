"""Our Llama against transformers' LlamaForCausalLM on random small configs."""
import pytest
import torch

from engine.cache import KVCache
from engine.runner import decode_one_token, generate, prefill
from model import Llama

CONFIGS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2, num_attention_heads=8, head_dim=8),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=1024,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "tied": dict(tie_word_embeddings=True),
    "head_dim_not_hidden_over_heads": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(checkpoint, name):
    path, hf = checkpoint(**CONFIGS[name])
    ours = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, 300, (2, 50))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 50, 300)
    assert rel_err(got, expected) < 1e-4


def test_config_with_rope_scaling_in_llama_release_layout(checkpoint):
    """Released Llama 3.x configs carry rope_theta and rope_scaling, not transformers 5's rope_parameters."""
    import json

    path, hf = checkpoint(**CONFIGS["llama3_rope"])
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(raw))
    ours = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, 300, (1, 300))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4


def test_sharded_checkpoint(checkpoint):
    path, hf = checkpoint(max_shard_size="60KB", num_key_value_heads=2)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    ours = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4


def test_bf16_stored_weights(checkpoint):
    path, hf = checkpoint(dtype=torch.bfloat16, num_key_value_heads=2)
    ours = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert ours.lm_head.weight.dtype == torch.float32
    tokens = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        # transformers reads the same bf16 file in fp32 (hf.float() would keep a bf16-rounded RoPE table)
        from transformers import LlamaForCausalLM
        expected = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)(tokens).logits
        assert rel_err(ours(tokens), expected) < 1e-4


@pytest.mark.parametrize("name", ["mha", "gqa", "llama3_rope"])
def test_incremental_decoding_equals_full_forward(checkpoint, name):
    path, _ = checkpoint(**CONFIGS[name])
    model = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    # Two prompts of different lengths in one batch, right-padded; then token-by-token decode.
    T, lengths = 40, torch.tensor([23, 31])
    seqs = torch.randint(3, 300, (2, T))
    with torch.no_grad():
        full = model(seqs)                                    # (2, T, vocab)
        cache = KVCache(model.config, 2, T, "cpu", torch.float32)
        padded = seqs.clone()
        padded[0, 23:] = 0
        logits = prefill(model, padded[:, :31], lengths, cache)
        assert rel_err(logits, full[torch.arange(2), lengths - 1]) < 1e-5
        # Each sequence continues with its own next tokens from `seqs`.
        for step in range(T - 31):
            token = seqs[torch.arange(2), cache.lengths]
            logits = decode_one_token(model, token, cache)
            assert rel_err(logits, full[torch.arange(2), cache.lengths - 1]) < 1e-5, step


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_greedy_generation_equals_transformers(checkpoint, name):
    path, hf = checkpoint(**CONFIGS[name])
    model = Llama.from_pretrained(path, device="cpu", dtype=torch.float32)
    prompt = torch.randint(3, 300, (1, 12))
    n_new = 30
    with torch.no_grad():
        hf.generation_config.eos_token_id = None  # EOS is an ordinary token here, as in eos_ids=[]
        expected = hf.generate(prompt, max_new_tokens=n_new, do_sample=False)[0, 12:]
    cache = KVCache(model.config, 1, 12 + n_new, "cpu", torch.float32)
    got = torch.cat(list(generate(model, cache, [prompt[0].tolist()], n_new, eos_ids=[])))
    assert got.tolist() == expected.tolist()
