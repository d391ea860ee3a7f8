"""The whole Llama in one file: config, RMSNorm, RoPE, attention, SwiGLU MLP, loading.

Module and parameter names equal Hugging Face's LlamaForCausalLM, so a checkpoint's tensors load
by name. Attention over past tokens is delegated to a cache object (engine/cache.py): this file
knows nothing of bits or kernels: the engine may hand it faster products and norms of a few
rows (`few_rows` below), and without them it is plain torch.
"""
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, read_json, readable


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1       # None (null in config.json): no BOS token
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_json(cls, path: Path) -> "LlamaConfig":
        raw = read_json(path, "config.json")
        missing = [k for k in REQUIRED_FIELDS if raw.get(k) is None]
        if missing:
            raise UserError(f"{path}: missing field(s) {', '.join(missing)}")
        refuse_unsupported(raw, path)
        for field, kind in FIELD_TYPES.items():
            if raw.get(field) is not None and not is_a(raw[field], kind):
                raise UserError(f"{path}: {field} must be {KIND_NAMES[kind]}, got {json.dumps(raw[field])}")
        n_heads = raw["num_attention_heads"]
        # transformers >= 5 writes rope_parameters (rope_theta inside); older configs, like the
        # released Llama checkpoints, write rope_theta and rope_scaling.
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        # head_dim is explicit in newer configs and may differ from hidden_size / n_heads.
        cfg = cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // n_heads,
            max_position_embeddings=raw["max_position_embeddings"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id", 1),  # transformers' defaults when absent; null: none
            eos_token_id=raw.get("eos_token_id", 2),
        )
        cfg.validate(path)
        return cfg

    def validate(self, where="config"):
        ints = [self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                self.max_position_embeddings]
        if not all(isinstance(x, int) and x > 0 for x in ints):
            raise UserError(f"{where}: sizes must be positive integers")
        for field in ("rms_norm_eps", "rope_theta"):
            if not (is_a(getattr(self, field), float) and getattr(self, field) > 0):
                raise UserError(f"{where}: {field} must be a positive number, got {getattr(self, field)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{where}: num_attention_heads={self.num_attention_heads} is not a "
                            f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UserError(f"{where}: head_dim={self.head_dim} must be even for RoPE")
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_KEYS:
            raise UserError(f"{where}: unsupported rope_scaling type {rope_type!r} "
                            f"(supported: {', '.join(ROPE_KEYS)})")
        for key in ROPE_KEYS[rope_type]:
            if not is_a(scaling.get(key), float) or not scaling[key] > 0:
                raise UserError(f"{where}: rope_scaling of type {rope_type} needs {key}, a positive number, "
                                f"got {json.dumps(scaling.get(key))}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]


REQUIRED_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings"]
# config.json fields and the JSON type each must have when present and not null.
FIELD_TYPES = {**dict.fromkeys(REQUIRED_FIELDS + ["num_key_value_heads", "head_dim"], int),
               "rms_norm_eps": float, "rope_theta": float, "tie_word_embeddings": bool,
               "rope_scaling": dict, "rope_parameters": dict, "bos_token_id": int, "eos_token_id": list}
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", dict: "an object",
              list: "an integer or a list of integers"}
ROPE_KEYS = {"default": [], "linear": ["factor"],  # rope_scaling types and the keys each needs
             "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
# What a Llama config may not change: a model with other values is another architecture.
LLAMA = {"model_type": "llama", "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
         "sliding_window": None}


def is_a(value, kind) -> bool:
    """Whether a JSON value is of `kind` (FIELD_TYPES): bools are not numbers, ints are floats,
    and an EOS id may be an integer or a list of integers."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return all(is_a(x, int) for x in (value if isinstance(value, list) else [value]))
    return isinstance(value, kind)


def refuse_unsupported(raw: dict, path: Path):
    """A config of another architecture, or with a feature this Llama does not implement."""
    for key, llama in LLAMA.items():
        if raw.get(key, llama) != llama:
            raise UserError(f"{path}: unsupported {key}={raw[key]!r} (this engine runs Llama: {llama!r})")
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if not all(str(name).lower() == "llamaforcausallm" for name in architectures):  # early conversions: LLaMA...
        raise UserError(f"{path}: unsupported architectures {architectures} (this engine runs LlamaForCausalLM)")


# ---------------------------------------------------------------------------------------------
# RoPE. Angles are computed in fp32 from positions on every call: a precomputed bf16 table over
# all positions loses the angle entirely at position 1e6.

def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with the checkpoint's rope_scaling applied."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        inv_freq = torch.where(is_mid, interpolated, inv_freq)
    return inv_freq.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions [B, T] int -> cos, sin [B, 1, T, head_dim] fp32, as apply_rope takes them: each
    angle at both channels of its pair, sin negated at the first."""
    angles = positions.float()[:, None, :, None] * inv_freq.to(positions.device)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]. Channels c and c + D/2 form a rotation pair (Hugging Face's layout):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as x * cos + (x2, x1) * sin in four operations
    (the same products and sums, bit for bit)."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------

# The products and RMS norms of a decode step's few fp32 rows on the CPU, where the engine sets it
# (engine/cache.py: kernels/rows.py, which reads the weights at the memory's speed, a third faster
# than MKL's one-row products): a module with linear_rows(x, weight_t) and rms_norm_rows(x, weight,
# eps), each returning None where it does not apply. None: torch everywhere.
few_rows = None


def linear(x, weight_t):
    """x @ weight_t, weight_t [in, out]: through few_rows where it applies, torch elsewhere."""
    out = few_rows.linear_rows(x, weight_t) if few_rows else None
    return x @ weight_t if out is None else out


class Linear(nn.Linear):
    """nn.Linear, its product through `linear` (its weight stored [in, out] on the CPU: fuse_projections)."""

    def forward(self, x):
        return linear(x, self.weight.t())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = few_rows.rms_norm_rows(x, self.weight, self.eps) if few_rows else None  # one C call
        if out is not None:
            return out
        # Normalise in fp32 as the reference does (fp16 sums of squares overflow), rounded to x's
        # dtype before the weight as there; one fused operation.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv = None  # q, k and v's weights joined (fuse_projections), or None

    def forward(self, x, cos, sin, positions, cache=None):
        B, T, _ = x.shape
        q, k, v = project(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q = apply_rope(q, cos, sin)
        if cache is None:
            k = apply_rope(k, cos, sin)
            # Training / full-sequence path. enable_gqa maps query head h to KV head h // group.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if not cache.keys_pre_rope:
                k = apply_rope(k, cos, sin)
            out = cache.attend(self.layer_idx, q, k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up = None  # gate and up's weights joined (fuse_projections), or None

    def forward(self, x):
        gate, up = project(x, self.gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


def project(x, joined, *linears):
    """x through each of `linears`: one product with their weights joined, transposed, where
    fuse_projections made `joined` [in, sum of outs]; else one product each."""
    if joined is None:
        return [module(x) for module in linears]
    return linear(x, joined).split([module.out_features for module in linears], -1)


def fuse_projections(model: nn.Module):
    """The CPU's decode layout, after loading: every linear weight stored transposed ([in, out]
    contiguous: MKL's one-row product reads [out, in] at 60% of that speed on the AMD EPYC
    measured, bench/RESULTS.md), and q, k, v (gate, up) joined into one matrix, one product in
    place of three (two). The modules' weights become views of the new storage: names, shapes,
    values and state_dict are unchanged."""
    with torch.no_grad():
        for module in model.modules():
            joined = {Attention: ("qkv", ("q_proj", "k_proj", "v_proj")),
                      MLP: ("gate_up", ("gate_proj", "up_proj"))}.get(type(module))
            if joined:
                name, parts = joined
                linears = [getattr(module, part) for part in parts]
                weight = torch.cat([linear.weight for linear in linears]).t().contiguous()    # (in, sum of outs)
                setattr(module, name, weight)
                for linear, columns in zip(linears, weight.split([l.out_features for l in linears], 1)):
                    linear.weight = nn.Parameter(columns.t(), requires_grad=False)
        shared = {}  # a tied embedding and lm_head stay one tensor
        for module in [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]:
            w = module.weight
            if w.is_contiguous():
                if id(w) not in shared:
                    shared[id(w)] = nn.Parameter(w.t().contiguous().t(), requires_grad=False)
                module.weight = shared[id(w)]


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, tokens, positions=None, cache=None, logits_index=None):
        """tokens [B, T] -> logits [B, T, vocab] in fp32.

        Without a cache: a causal forward over the whole sequence (training, evaluation).
        With a cache: `positions` [B, T] are the tokens' absolute positions; the cache stores
        their K/V and attends over everything it holds (engine/cache.py).
        logits_index [B]: compute logits only at that token of each sequence -> [B, 1, vocab]
        (a prefill needs only the last prompt token's).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, cache)
        if logits_index is not None:
            x = x[torch.arange(B, device=x.device), logits_index][:, None]
        return self.lm_head(self.model.norm(x)).float()

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, shard=None) -> "Llama":
        """Load a Hugging Face-layout checkpoint, streaming each tensor straight to the target.
        shard: one rank's part of a tensor-parallel model (engine/parallel.py Parallel): its
        config (shard_config) and the slice of each tensor it reads alone (full_shape, index).
        Every tensor's name, shape and dtype is checked against config.json from the files'
        headers before any weight is read or any module built."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: model directory not found")
        cfg = LlamaConfig.from_json(path / "config.json")
        if shard is not None:
            cfg = shard.shard_config(cfg)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        reads = check_tensors(path, cfg, checkpoint_shards(path), shard)
        with torch.device("meta"):
            model = cls(cfg)
        state, sums = {}, {}
        for file, names in reads.items():
            state.update(read_safetensors(file, names, device, dtype, sums, shard))
        # A cheap check for NaN or inf weights (or weights past the range of `dtype`): one fp32
        # sum per tensor, no copy, one host sync for the whole checkpoint.
        finite = torch.isfinite(torch.stack(list(sums.values())).cpu()) if sums else torch.ones(0, dtype=torch.bool)
        if not finite.all():
            name, file = list(sums)[int((~finite).nonzero()[0])]
            raise UserError(f"{file}: tensor {name} holds NaN or infinite values (in {str(dtype).removeprefix('torch.')})")
        if cfg.tie_word_embeddings:  # the checkpoint may omit lm_head.weight, or carry a copy we do not need
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        if device.type == "cpu":
            fuse_projections(model)
        return model.eval()


def checkpoint_shards(path: Path) -> dict[Path, list[str]]:
    """The checkpoint's safetensors files and the tensors to read from each: model.safetensors
    and all it holds, or the shards model.safetensors.index.json's weight_map names, each for the
    tensors weight_map places in it. A shard is a plain file name in the model folder (a symlink
    there, as in the Hub's cache, is fine); only regular files are opened."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        file = readable(path / "model.safetensors", "weights file")
        return {file: safetensors_header(file)[0]}
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
        raise UserError(f"{index}: not a valid safetensors index (no weight_map of file names)")
    shards = {}
    for name, file in weight_map.items():
        if Path(file).name != file or file in ("", ".", "..") or "\0" in file:
            raise UserError(f"{index}: weight_map places {name} in {file!r}, not a file name in the model folder")
        shards.setdefault(path / file, []).append(name)
    return {readable(file, "weights file"): names for file, names in sorted(shards.items())}


def safetensors_header(file: Path) -> tuple[list[str], dict]:
    """The names of the tensors a safetensors file holds and, by name, (shape, dtype) read from
    its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
            return names, {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in names}
    except SafetensorError as e:
        raise UserError(f"{file}: corrupt or truncated safetensors file ({e})")


def layer_shapes(cfg: LlamaConfig) -> dict:
    """Name -> shape of every parameter of a one-layer model of `cfg`, built on the meta device:
    with parameter_names and parameter_shape, a config of 100000 layers costs no more than one."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Llama(replace(cfg, num_hidden_layers=1)).state_dict().items()}


def parameter_names(cfg: LlamaConfig, shapes: dict):
    """Every parameter's name (lazily), from layer_shapes."""
    yield from (name for name in shapes if not LAYER.fullmatch(name))
    for i in range(cfg.num_hidden_layers):
        yield from (f"model.layers.{i}.{m[2]}" for name in shapes if (m := LAYER.fullmatch(name)))


def parameter_shape(cfg: LlamaConfig, name: str, shapes: dict):
    """The shape config.json implies for parameter `name` (shapes: layer_shapes), None for a name
    that is not one of its Llama's parameters."""
    if m := LAYER.fullmatch(name):
        layer = int(m[1])
        if m[1] != str(layer) or layer >= cfg.num_hidden_layers:
            return None
        name = f"model.layers.0.{m[2]}"
    return shapes.get(name)


LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def check_tensors(path: Path, cfg: LlamaConfig, shards: dict, shard=None) -> dict[Path, list[str]]:
    """Every tensor of the checkpoint (from the headers alone) is where the index places it, in
    one file, a Llama parameter of the shape config.json implies and floating point; none lacks.
    Returns the tensors to read from each file."""
    shapes = layer_shapes(cfg)
    where, reads = {}, {}
    for file, names in shards.items():
        held, header, placed = *safetensors_header(file), set(names)
        for name in held:
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints store it; we recompute
                continue
            if name in where:
                raise UserError(f"{file}: tensor {name} is also in {where[name].name} (a tensor belongs to one shard)")
            if name not in placed:
                raise UserError(f"{file}: tensor {name} is not placed in this file by the index's weight_map")
            expected = parameter_shape(cfg, name, shapes)
            if expected is None:
                raise UserError(f"{file}: unexpected tensor {name} (not a Llama parameter)")
            shape, dtype = header[name]
            full = tuple(expected) if shard is None else shard.full_shape(name, expected)
            if shape != full:
                raise UserError(f"{file}: tensor {name} has shape {list(shape)}, config.json implies {list(full)}")
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{file}: tensor {name} is {dtype}; a Llama checkpoint stores "
                                f"floating-point weights ({', '.join(sorted(FLOAT_DTYPES))})")
            where[name] = file
            reads.setdefault(file, []).append(name)
        lacking = [name for name in names if name not in header]
        if lacking:
            raise UserError(f"{file}: lacks tensor {lacking[0]}, which the index's weight_map places in it")
    # Every tensor held is a distinct parameter: a count tells whether any lacks, without listing them.
    tied = cfg.tie_word_embeddings
    per_layer = sum(bool(LAYER.fullmatch(name)) for name in shapes)
    needed = len(shapes) + per_layer * (cfg.num_hidden_layers - 1) - tied
    have = len(where) - (tied and "lm_head.weight" in where)
    if have < needed:
        missing = next(name for name in parameter_names(cfg, shapes)
                       if name not in where and not (tied and name == "lm_head.weight"))
        hint = " (tie_word_embeddings is false)" if missing == "lm_head.weight" and needed - have == 1 else ""
        raise UserError(f"{path}: checkpoint lacks {needed - have} tensor(s), e.g. {missing}{hint}")
    return reads


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of what casts to the model dtype faithfully


def read_safetensors(file: Path, names: list[str], device, dtype, sums: dict, shard=None) -> dict:
    """The tensors `names` of one safetensors file (checked: check_tensors), each read to
    `device` and cast; each tensor's fp32 sum into sums[(name, file)]. With a `shard`, only its
    slice of each tensor is read (Llama.from_pretrained)."""
    from safetensors import SafetensorError, safe_open

    state = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                if shard is None:
                    tensor = f.get_tensor(name)
                else:
                    stored = f.get_slice(name)
                    tensor = stored[shard.index(name, tuple(stored.get_shape()))]
                state[name] = tensor.to(device=device, dtype=dtype)
                sums[name, file] = state[name].sum(dtype=torch.float32)
    except SafetensorError as e:
        raise UserError(f"{file}: corrupt or truncated safetensors file ({e})")
    return state
