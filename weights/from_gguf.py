"""Import a Llama-architecture GGUF (llama.cpp's file) as the Hugging Face-layout checkpoint that
model.py and engine/tokenizer.py load: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json.

    python -m weights.from_gguf MODEL.gguf OUT_DIR

The file is read with the `gguf` package, llama.cpp's own reader and dequantizers; the importer
alone uses it, never the engine. What llama.cpp's converter (convert_hf_to_gguf.py) changed is
undone as transformers' GGUF loader undoes it: the tensor names, and the rows of q_proj and k_proj,
which it permutes so that its RoPE rotates pairs (2i, 2i + 1) instead of (i, i + D/2). Llama 3.1's
RoPE scaling, which it stores as one factor per frequency, becomes config.json's rope_scaling.

Weights are written in fp32, except tensors the GGUF holds as F16 or BF16, which keep that type:
both are exact (a quantized block dequantizes to d * q + m in fp32, which fp16 would round, and
transformers' loader gives the same fp32 values), and model.py casts each tensor to the dtype it
runs in. The file is written one tensor at a time, so memory holds one tensor, not the model.
"""
import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path

from cli import ArgumentParser, UserError, readable, run_cli

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")  # the tensor types read
KEPT_TYPES = ("F16", "BF16")  # written as stored; every other type as F32
BYTES_PER_ELEMENT = {"F32": 4, "F16": 2, "BF16": 2}
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' names -> torch's

# GGUF tensor names (llama.cpp's gguf-py tensor map for LLAMA; {} is the layer) -> Hugging Face's.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

REQUIRED_KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count",
                 "llama.feed_forward_length", "llama.attention.head_count",
                 "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens"]
INTEGER_KEYS = REQUIRED_KEYS[:5] + ["llama.attention.head_count_kv", "llama.attention.key_length",
                                    "llama.rope.dimension_count", "llama.vocab_size"]

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Byte-level BPE: how text is split before the merges, by tokenizer.ggml.pre, as llama.cpp splits
# it (llama-vocab.cpp): regexes isolated first, then ByteLevel, with GPT-2's regex or without one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPLITS = {"gpt2": ([], True), "smollm": ([r"\p{N}"], True), "llama-bpe": ([LLAMA3_SPLIT], False)}


def read_gguf(path: Path):
    """The GGUF's reader and its metadata as Python values, or one UserError for a file that is not one."""
    import gguf

    readable(path, "GGUF file")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
    except (ValueError, IndexError, OverflowError) as e:  # gguf's own errors: a bad magic, tensors past the end
        if "magic" in str(e):
            raise UserError(f"{path}: not a GGUF file (no GGUF magic number)")
        raise UserError(f"{path}: corrupt or truncated GGUF file ({e})")
    return reader, metadata


def llama_config(meta: dict, tensors: dict, path: Path) -> dict:
    """config.json's fields from the GGUF's llama.* metadata (and Llama 3.1's RoPE factors),
    checked as model.py checks a config. tensors: the GGUF's, by name."""
    import numpy as np

    from model import is_a, rope_inv_freq

    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise UserError(f"{path}: unsupported architecture {architecture!r} (this importer reads 'llama')")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise UserError(f"{path}: missing metadata {', '.join(missing)}")
    for key in INTEGER_KEYS:
        if key in meta and not is_a(meta[key], int):  # a list here: sizes per layer, not a Llama
            raise UserError(f"{path}: metadata {key} must be an integer, got {meta[key]!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise UserError(f"{path}: metadata tokenizer.ggml.tokens must be a list of strings")
    n_heads, hidden = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // max(n_heads, 1))  # validate refuses 0 heads
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{path}: RoPE on {meta['llama.rope.dimension_count']} of {head_dim} channels "
                        "(partial rotary) is not Llama")
    theta = meta.get("llama.rope.freq_base", 10000.0)
    scaling, inv_freq = rope_scaling(meta), None
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise UserError(f"{path}: both rope_freqs.weight and llama.rope.scaling.type {scaling['rope_type']!r}")
        scaling, inv_freq = llama3_scaling(tensors["rope_freqs.weight"], head_dim, theta, path)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in tensors,  # llama.cpp omits a tied lm_head
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
    cfg = as_llama_config(config)
    cfg.validate(path)
    if inv_freq is not None and not np.allclose(rope_inv_freq(cfg).double().numpy(), inv_freq, rtol=1e-5, atol=0):
        raise UserError(f"{path}: rope_freqs.weight holds RoPE factors that are not Llama 3.1's scaling")
    return config


def as_llama_config(config: dict):
    from model import LlamaConfig

    return LlamaConfig(**{f.name: config[f.name] for f in dataclasses.fields(LlamaConfig)})


def rope_scaling(meta: dict) -> dict | None:
    """llama.rope.scaling.* as config.json's rope_scaling; a type model.py lacks fails its validate."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": meta.get("llama.rope.scaling.factor")}
    if "llama.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = meta["llama.rope.scaling.original_context_length"]
    return scaling


def llama3_scaling(tensor, head_dim: int, theta: float, path: Path):
    """(rope_scaling, the frequencies [head_dim / 2] it must give) from the per-frequency factors
    llama.cpp stores for Llama 3.1 (rope_freqs.weight) instead of the parameters: 1 for wavelengths
    under old_context / high, `factor` past old_context / low, between them 1 / ((1 - s) / factor
    + s) with s = (old_context / wavelength - low) / (high - low). The band fixes only that line,
    so low is taken as 1 (Llama 3.1's): every other choice gives the same frequencies."""
    import gguf
    import numpy as np

    factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    base = 1.0 / theta ** (np.arange(head_dim // 2) / (head_dim // 2))
    factor = factors.max(initial=0.0)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factors.shape != base.shape or band.sum() < 2:
        raise UserError(f"{path}: rope_freqs.weight of shape {list(factors.shape)} is not Llama 3.1's RoPE scaling "
                        f"for head_dim {head_dim}")
    s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    # s = old / (high - 1) / wavelength - 1 / (high - 1), a line in 1 / wavelength
    slope, intercept = np.polyfit(base[band] / (2 * math.pi), s, 1)
    if intercept >= 0:
        raise UserError(f"{path}: rope_freqs.weight holds RoPE factors that are not Llama 3.1's scaling")
    high = 1 - 1 / intercept
    old = slope * (high - 1)
    scaling = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0, "high_freq_factor": float(high),
               "original_max_position_embeddings": round(old) if abs(old - round(old)) < 1e-3 else float(old)}
    return scaling, base / factors


def hf_name(gguf_name: str) -> str | None:
    layer = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    name = TENSOR_NAMES.get(f"blk.{{}}.{layer[2]}" if layer else gguf_name)
    return name.format(layer[1]) if name and layer else name


def unpermute(w, n_heads: int):
    """Undo convert_hf_to_gguf.py's permute of q_proj / k_proj rows [n_heads * D, ...]: within each
    head it interleaved the halves (i, i + D/2) as rows (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_plan(reader, config: dict, path: Path) -> list:
    """[(hf name, safetensors dtype, shape, gguf tensor)] for every weight, each checked against the
    shape the config implies, before anything is written."""
    import torch

    from model import Llama

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(as_llama_config(config)).state_dict().items()}
    if config["tie_word_embeddings"]:
        del expected["lm_head.weight"]
    plan = []
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # in config.json's rope_scaling (llama_config)
            continue
        name, kind = hf_name(tensor.name), tensor.tensor_type.name
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {tensor.name} (not a Llama weight)")
        if kind not in TYPES:
            raise UserError(f"{path}: tensor {tensor.name} is of type {kind} (supported: {', '.join(TYPES)})")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if shape != expected[name]:
            raise UserError(f"{path}: tensor {tensor.name} has shape {list(shape)}, the metadata implies "
                            f"{list(expected[name])}")
        plan.append((name, kind if kind in KEPT_TYPES else "F32", shape, tensor))
    missing = sorted(set(expected) - {name for name, *_ in plan})
    if missing:
        raise UserError(f"{path}: lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return plan


def weight(tensor, name: str, dtype: str, config: dict):
    """One GGUF tensor dequantized, un-permuted where llama.cpp permuted it, as a torch tensor of `dtype`."""
    import gguf
    import torch

    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # fp32, shaped [rows, columns]
    if name.endswith("q_proj.weight"):
        w = unpermute(w, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        w = unpermute(w, config["num_key_value_heads"])
    return torch.from_numpy(w.copy()).to(getattr(torch, TORCH_DTYPES[dtype]))


def write_safetensors(file: Path, plan: list, config: dict):
    """model.safetensors, tensor by tensor: the header (every offset known from the shapes) first,
    then each tensor's bytes as it is dequantized. Written beside and renamed, so an interrupted
    import leaves no file that looks whole."""
    import torch
    from tqdm import tqdm

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in plan:
        size = math.prod(shape) * BYTES_PER_ELEMENT[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header so that the data is 8-byte aligned
    partial = file.with_name(file.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape, tensor in tqdm(plan, desc="dequantizing", unit="tensor", leave=False):
            w = weight(tensor, name, dtype, config)
            f.write(w.contiguous().view(torch.uint8).numpy().data)
    os.replace(partial, file)


def build_tokenizer(meta: dict, path: Path):
    """The GGUF's vocabulary as a `tokenizers` Tokenizer (what tokenizer.json holds) and
    tokenizer_config.json's fields: byte-level BPE for tokenizer.ggml.model "gpt2", SentencePiece
    BPE with byte fallback for "llama"; control tokens special, user-defined ones whole; BOS and
    EOS added as tokenizer.ggml.add_bos_token / add_eos_token say (as transformers reads them:
    a "llama" vocabulary adds BOS unless told not to)."""
    from tokenizers import AddedToken, processors

    kind, tokens = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise UserError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = byte_level_bpe(meta, path)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe(meta, path)
    else:
        raise UserError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise UserError(f"{path}: tokenizer.ggml.{role}_token_id {token_id!r} is not a token id")
        special[role] = None if token_id is None else tokens[token_id]
    control = [t for t, token_type in zip(tokens, types) if token_type == CONTROL] + [t for t in special.values() if t]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(control)])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, token_type in zip(tokens, types)
                          if token_type == USER_DEFINED])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and special["bos"] is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and special["eos"] is not None
    bos, eos = [special["bos"]] * add_bos, [special["eos"]] * add_eos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(bos + ["$A:0"] + eos), pair=" ".join(bos + ["$A:0"] + eos + bos + ["$B:1"] + eos),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special["bos"],
              "eos_token": special["eos"], "unk_token": special["unknown"], "pad_token": special["padding"],
              "add_bos_token": bool(add_bos), "add_eos_token": bool(add_eos),
              "chat_template": meta.get("tokenizer.chat_template"), "clean_up_tokenization_spaces": False}
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def byte_level_bpe(meta: dict, path: Path):
    """GPT-2-style BPE over bytes spelled as printable characters; the GGUF stores the vocabulary
    and merges as tokenizer.json spelled them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in BYTE_LEVEL_SPLITS:
        raise UserError(f"{path}: unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(BYTE_LEVEL_SPLITS)})")
    if "tokenizer.ggml.merges" not in meta:
        raise UserError(f"{path}: missing metadata tokenizer.ggml.merges (a byte-level BPE needs its merges)")
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
    splits, gpt2_regex = BYTE_LEVEL_SPLITS[pre]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(meta: dict, path: Path):
    """SentencePiece BPE (Llama 1 and 2) as Hugging Face's converter builds it: spaces as "▁", one
    prepended unless tokenizer.ggml.add_space_prefix is false, unknown characters as <0xNN> byte
    tokens; the merges from the file, else derived from the pieces' scores."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    elif "tokenizer.ggml.scores" in meta:
        merges = sentencepiece_merges(tokens, meta["tokenizer.ggml.scores"])
    else:
        raise UserError(f"{path}: missing metadata tokenizer.ggml.scores (a SentencePiece vocabulary needs them)")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + [decoders.Strip(" ", 1, 0)] * prefix)
    return tokenizer


def sentencepiece_merges(tokens: list, scores: list) -> list:
    """Every split of a piece into two pieces, highest merged score first, ties by longer left then
    right piece, then by the pieces' ids (transformers' generate_merges order)."""
    ids = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (ids[p[0]], ids[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def generation_config(meta: dict) -> dict:
    """The ids that end generation: llama.cpp's EOS, end-of-turn and end-of-message tokens."""
    eos = [meta[f"tokenizer.ggml.{role}_token_id"] for role in ("eos", "eot", "eom")
           if f"tokenizer.ggml.{role}_token_id" in meta]
    eos = list(dict.fromkeys(eos))
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    return {k: v for k, v in config.items() if v is not None}


def import_gguf(gguf_path: Path, out_dir: Path):
    """Everything is read and checked before anything is written."""
    reader, meta = read_gguf(gguf_path)
    config = llama_config(meta, {t.name: t for t in reader.tensors}, gguf_path)
    plan = tensor_plan(reader, config, gguf_path)
    tokenizer, tokenizer_config = build_tokenizer(meta, gguf_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: not a directory (the checkpoint is written into OUT_DIR)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(out_dir / "model.safetensors", plan, config)
        tokenizer.save(str(out_dir / "tokenizer.json"))
        for name, content in [("tokenizer_config.json", tokenizer_config),
                              ("generation_config.json", generation_config(meta)), ("config.json", config)]:
            (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write the checkpoint ({e.strerror or e})")


def main(argv=None):
    p = ArgumentParser(prog="python -m weights.from_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path, help="a Llama-architecture GGUF file")
    p.add_argument("out_dir", type=Path, help="where to write the Hugging Face-layout checkpoint")
    args = p.parse_args(argv)
    import_gguf(args.gguf, args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
