"""weights/from_gguf.py against transformers' own GGUF loader, on small GGUFs written here with
gguf.GGUFWriter as llama.cpp's converter writes them (q/k rows permuted, every tensor type the
importer reads, both vocabulary kinds); and every file it refuses."""
import ast
import itertools
import json
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from cli import run_cli
from conftest import ROOT, make_hf_model
from engine.tokenizer import load_tokenizer
from model import Llama
from test_inputs import assert_error
from weights import from_gguf

# A model whose rows suit every block size (K-quants pack 256 values a block).
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Hello world",
    "def f(x):\n\treturn x ** 2  # squares 12345\n\n\n    pass\n",
    "   leading and trailing runs of whitespace   \n \n",
    "emoji 🙂🙃👍🏽 and accents: naïve café, 日本語",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "light was day and night was heaven unto the earth",
    "",
]
CORPUS = [
    "In the beginning God created the heaven and the earth. 2024 was 1999 + 25.",
    "def main(argv):\n    return [x * 2 for x in range(10)]  # comprehension\n",
    "The quick brown fox jumps over the lazy dog; the dog sleeps. 🙂 café naïve",
] * 20


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute of q_proj / k_proj rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, kind: str, rng) -> np.ndarray:
    """w in GGUF type `kind`. gguf-py reads K-quants but cannot write them: those get random
    blocks, whose fp16 scales are set to small values so that the weights stay finite and small."""
    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in ("Q4_K", "Q5_K", "Q6_K"):
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for at in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[kind]:  # d (and dmin) in each block
        data[..., at:at + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return data.reshape(w.shape[0], -1)


def gguf_names(n_layers: int) -> dict:
    """Hugging Face name -> GGUF name."""
    names = {}
    for gguf_name, hf_name in from_gguf.TENSOR_NAMES.items():
        for layer in range(n_layers) if "{}" in gguf_name else [None]:
            names[hf_name.format(layer)] = gguf_name.format(layer)
    return names


def sentencepiece_vocab(tokenizer_path) -> dict:
    """tokenizer.ggml.* of a SentencePiece model, as llama.cpp's converter writes them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    n = sp.GetPieceSize()
    types = [from_gguf.UNKNOWN if sp.IsUnknown(i) else from_gguf.CONTROL if sp.IsControl(i)
             else from_gguf.BYTE if sp.IsByte(i) else from_gguf.NORMAL for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}


def byte_level_vocab(pre: str, digits_merged=True) -> dict:
    """tokenizer.ggml.* of a byte-level BPE trained here (ChatML specials, as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert digits_merged and any(re.fullmatch(r"\d\d+", t) for t in tokens)  # what the smollm split changes
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [from_gguf.CONTROL if t in SPECIALS else from_gguf.NORMAL for t in tokens],
            "tokenizer.ggml.merges": [" ".join(m) for m in model["merges"]],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False}


def llama_metadata(hf, vocab: dict) -> dict:
    cfg = hf.config
    return {"llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
            "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_attention_heads,
            "llama.attention.head_count_kv": cfg.num_key_value_heads,
            "llama.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "llama.rope.freq_base": 10000.0,
            "llama.rope.dimension_count": cfg.head_dim, **vocab}


def write_gguf(path, hf, metadata: dict, types=from_gguf.TYPES, architecture="llama", tied=False, rope_freqs=None):
    """hf's weights as a GGUF: norms in F32, the 2-D weights in `types` in turn; rope_freqs: Llama
    3.1's RoPE factors, as llama.cpp stores them."""
    cfg, rng = hf.config, np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}
            add[type(value)](key, value)
    names, kinds = gguf_names(cfg.num_hidden_layers), itertools.cycle(types)
    for name, w in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        w = w.float().numpy()
        if "q_proj" in name or "k_proj" in name:
            w = permute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        kind = next(kinds) if w.ndim == 2 else "F32"
        writer.add_tensor(names[name], encode(w, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_from_gguf(path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def cli(capsys, *args):
    """python -m weights.from_gguf with these arguments: (exit status, stdout, stderr)."""
    try:
        run_cli(lambda: from_gguf.main([str(a) for a in args]))
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("tied", [False, True])
def test_every_tensor_type_imports_as_transformers_loads_it(capsys, tmp_path, tokenizer_path, tied):
    """Tensors equal transformers' GGUF loader's, q/k rows included (each q and k in two types);
    fp32-stored weights equal the model they were written from, so the un-permute is checked
    against more than transformers; F16 and BF16 tensors keep their type; logits agree."""
    hf = make_hf_model(vocab_size=300, tie_word_embeddings=tied, **SHAPE)
    types = ["F32", "Q4_K", "Q6_K", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_K"]
    path = write_gguf(tmp_path / "model.gguf", hf, llama_metadata(hf, sentencepiece_vocab(tokenizer_path)),
                      types, tied=tied)
    assert cli(capsys, path, tmp_path / "out")[0] == 0
    reference, _ = transformers_from_gguf(path)
    expected = reference.state_dict()
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    names = gguf_names(2)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected) - ({"lm_head.weight"} if tied else set())
        for name in f.keys():
            ours, kind = f.get_tensor(name), kinds[names[name]]
            assert str(ours.dtype) == {"F16": "torch.float16", "BF16": "torch.bfloat16"}.get(kind, "torch.float32")
            assert torch.equal(ours.float(), expected[name]), name
            if kind == "F32":
                assert torch.equal(ours, hf.state_dict()[name]), name
    assert set(kinds.values()) == set(from_gguf.TYPES)
    assert any(kinds[names[f"model.layers.{i}.self_attn.{p}_proj.weight"]] == "F32" for i in (0, 1) for p in "qk")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied and config["head_dim"] == 64 and config["num_key_value_heads"] == 2
    ours = Llama.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        got, want = ours(tokens), reference(tokens).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def llama3_rope_factors(head_dim, theta, factor, low, high, old):
    """convert_hf_to_gguf.py's rope_freqs.weight for rope_type llama3."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelength = 2 * np.pi / freq
        if wavelength < old / high:
            factors.append(1)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("low, high, old", [(1.0, 4.0, 64), (2.0, 8.0, 256)])
def test_llama3_rope_factors_become_its_rope_scaling(capsys, tmp_path, tokenizer_path, low, high, old):
    """Llama 3.1's GGUFs hold RoPE factors per frequency, not the scaling's parameters: the
    import recovers parameters that give the same frequencies (low taken as 1: the same band),
    and the logits match transformers' model with the original scaling, far past `old` tokens."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=old)
    hf = make_hf_model(vocab_size=300, rope_theta=500000.0, max_position_embeddings=1024, rope_scaling=scaling,
                       **SHAPE)
    meta = {**llama_metadata(hf, sentencepiece_vocab(tokenizer_path)), "llama.rope.freq_base": 500000.0,
            "llama.context_length": 1024}
    factors = llama3_rope_factors(64, 500000.0, 8.0, low, high, old)
    write_gguf(tmp_path / "model.gguf", hf, meta, ["F32"], rope_freqs=factors)
    assert cli(capsys, tmp_path / "model.gguf", tmp_path / "out")[0] == 0
    rope = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert rope["factor"] == 8.0 and rope["low_freq_factor"] == 1.0
    assert rope["high_freq_factor"] == pytest.approx(high / low) and rope["original_max_position_embeddings"] == old / low
    ours = Llama.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, 300, (1, 400))
    with torch.no_grad():
        got, want = ours(tokens), hf(tokens).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    factors[3] *= 1.1  # no longer one llama3 scaling
    write_gguf(tmp_path / "bad.gguf", hf, meta, ["F32"], rope_freqs=factors)
    assert_error(cli(capsys, tmp_path / "bad.gguf", tmp_path / "bad"), 1, "not Llama 3.1's scaling")


@pytest.mark.parametrize("vocabulary", ["sentencepiece", "gpt2", "llama-bpe"])
def test_token_ids_equal_transformers(capsys, tmp_path, tokenizer_path, vocabulary):
    """The engine's tokenizer of the import encodes and decodes as transformers' tokenizer of the
    GGUF, BOS as the file says (added for the SentencePiece one, not for the byte-level ones),
    special tokens whole."""
    vocab = sentencepiece_vocab(tokenizer_path) if vocabulary == "sentencepiece" else byte_level_vocab(vocabulary)
    hf = make_hf_model(vocab_size=len(vocab["tokenizer.ggml.tokens"]), **SHAPE)
    path = write_gguf(tmp_path / "model.gguf", hf, llama_metadata(hf, vocab), ["F32"])
    assert cli(capsys, path, tmp_path / "out")[0] == 0
    ours = load_tokenizer(tmp_path / "out")
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids, text
        assert ids == [1] * (vocabulary == "sentencepiece") + ours.encode(text, bos=False)
        assert ours.decode(ids) == reference.decode(ids)
        if vocabulary != "sentencepiece":  # bytes decode back exactly
            assert ours.decode(ids) == text
    if vocabulary != "sentencepiece":
        assert ours.encode("<|im_start|>") == [1]
    else:  # and as SentencePiece itself encodes, where this model's whitespace folding (which a GGUF
        # does not record, and Llama's own tokenizer does not do) leaves the text alone
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        unfolded = [text for text in TEXTS if not re.search(r"\s\s|^\s|\s$", text)]
        assert len(unfolded) >= 4 and all(ours.encode(text) == [1] + sp.Encode(text) for text in unfolded)


def test_add_bos_and_add_eos_are_honoured(capsys, tmp_path, tokenizer_path):
    """A SentencePiece vocabulary whose file says no BOS but EOS: encoded so, as transformers does."""
    from transformers import AutoTokenizer

    vocab = {**sentencepiece_vocab(tokenizer_path), "tokenizer.ggml.add_bos_token": False,
             "tokenizer.ggml.add_eos_token": True}
    hf = make_hf_model(vocab_size=300, **SHAPE)
    path = write_gguf(tmp_path / "model.gguf", hf, llama_metadata(hf, vocab), ["F32"])
    assert cli(capsys, path, tmp_path / "out")[0] == 0
    ours, reference = load_tokenizer(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids == ours.encode(text, bos=False) + [2] and ids[:1] != [1], text
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, True)


def test_smollm_split_puts_each_digit_apart(capsys, tmp_path):
    """tokenizer.ggml.pre "smollm" splits digits one by one before the merges, as llama.cpp and
    SmolLM's own tokenizer.json do; "gpt2" merges them (this vocabulary has multi-digit tokens)."""
    tokens = {}
    for pre in ("gpt2", "smollm"):
        vocab = byte_level_vocab(pre)
        hf = make_hf_model(vocab_size=len(vocab["tokenizer.ggml.tokens"]), **SHAPE)
        write_gguf(tmp_path / f"{pre}.gguf", hf, llama_metadata(hf, vocab), ["F32"])
        assert cli(capsys, tmp_path / f"{pre}.gguf", tmp_path / pre)[0] == 0
        tokenizer = load_tokenizer(tmp_path / pre)
        tokens[pre] = [tokenizer.decode([i]) for i in tokenizer.encode("in 2024 and 1999")]
    assert tokens["smollm"] == ["in", " ", "2", "0", "2", "4", " and", " ", "1", "9", "9", "9"]
    assert len(tokens["gpt2"]) < len(tokens["smollm"])


@pytest.fixture
def small(tmp_path, tokenizer_path):
    """(model, metadata) of a valid small GGUF, for the tests that break one thing in it."""
    hf = make_hf_model(vocab_size=300, **SHAPE)
    return hf, llama_metadata(hf, sentencepiece_vocab(tokenizer_path))


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("llama.context_length"), "missing metadata llama.context_length"),
    (lambda meta: meta.update({"llama.attention.head_count_kv": 3}),
     "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (lambda meta: meta.update({"llama.rope.dimension_count": 32}), "RoPE on 32 of 64 channels"),
    (lambda meta: meta.update({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}),
     "unsupported rope_scaling type 'yarn'"),
    (lambda meta: meta.update({"tokenizer.ggml.model": "bert"}), "unsupported tokenizer.ggml.model 'bert'"),
    (lambda meta: meta.update({"llama.feed_forward_length": 1024}),
     "tensor blk.0.ffn_gate.weight has shape [512, 256], the metadata implies [1024, 256]"),
    (lambda meta: meta.update({"llama.feed_forward_length": [512, 512]}), "metadata llama.feed_forward_length must be an"),
    (lambda meta: meta.update({"tokenizer.ggml.eos_token_id": 5000}), "tokenizer.ggml.eos_token_id 5000 is not a token id"),
])
def test_bad_metadata_is_refused(capsys, tmp_path, small, change, message):
    hf, meta = small
    change(meta)
    path = write_gguf(tmp_path / "model.gguf", hf, meta, ["F32"])
    assert_error(cli(capsys, path, tmp_path / "out"), 1, f"{path}: {message}")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_other_architectures_and_tensor_types_are_refused(capsys, tmp_path, small):
    hf, meta = small
    path = write_gguf(tmp_path / "qwen.gguf", hf, meta, ["F32"], architecture="qwen2")
    assert_error(cli(capsys, path, tmp_path / "out"), 1, "unsupported architecture 'qwen2'")
    path = write_gguf(tmp_path / "q5.gguf", hf, meta, ["F32", "Q5_0"])
    assert_error(cli(capsys, path, tmp_path / "out"), 1, "is of type Q5_0 (supported: F32, F16")


def test_files_that_are_not_whole_ggufs_are_refused(capsys, tmp_path, small):
    hf, meta = small
    path = write_gguf(tmp_path / "model.gguf", hf, meta, ["Q8_0"])
    data = path.read_bytes()
    for cut in (len(data) - 100, 2000, 10):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        assert_error(cli(capsys, tmp_path / "cut.gguf", tmp_path / "out"), 1, "corrupt or truncated GGUF file")
    (tmp_path / "text.gguf").write_text("not a model")
    assert_error(cli(capsys, tmp_path / "text.gguf", tmp_path / "out"), 1, "not a GGUF file")
    assert_error(cli(capsys, tmp_path / "absent.gguf", tmp_path / "out"), 1, "GGUF file not found")
    assert not (tmp_path / "out").exists()
    assert_error(cli(capsys, path, tmp_path / "text.gguf"), 1, "text.gguf: not a directory")


def test_bad_arguments_exit_2(capsys, tmp_path):
    for args in ([], [tmp_path / "a.gguf"], [tmp_path / "a.gguf", tmp_path, "extra"], ["--bogus", "a", "b"]):
        code, out, err = cli(capsys, *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "error:" in err, args


def test_only_the_importer_imports_gguf():
    """gguf is the importer's alone: the engine, quant/, kernels/ and the programs never import it,
    at module level or inside a function."""
    importers = set()
    for path in ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(name.split(".")[0] == "gguf" for name in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"weights/from_gguf.py"}
