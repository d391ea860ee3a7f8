"""Calibration: python -m quant.calibrate --model DIR --text FILE [--kv SPEC]

Runs the model in full precision over calibration text, records every layer's keys (pre- and
post-RoPE) and values past the sinks, and derives for each layer, each of K-pre / K-post / V and
each channel grouping and group size asked for (quant/skvq.py): each head's channel groups, and
a clip factor per bit width searched on the data (the alpha minimising the mean squared
reconstruction error, every candidate in one batched tensor operation); for rotated caches
(rotation=hadamard) a clip factor per bit width of K-post and V in equal groups, searched on the
rotated channels; and for each layer the SVD basis and mean of its pre-RoPE keys (quant/svdq.py). Writes them to
DIR/kv_calibration.safetensors with the settings in its metadata.

By default it calibrates what the cache `--kv` names will use (the engine's default cache: its
grouping and group size for the model's head_dim); --groupings and --group-sizes search more.
Every flag, the output's writability and the text's length are checked before the model loads.
"""
import argparse
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cli import ArgumentParser, FlagError, UserError, positive_int, read_text, readable, run_cli
from kernels.reference import attention
from model import Llama, apply_rope, rope_cos_sin
from quant import kvspec
from quant.kivi import kivi_quantizers
from quant.skvq import (
    ChannelGroups,
    TokenQuantizer,
    equal_groups,
    head_pair_groups,
    kmeans_groups,
    rotation_matrix,
    smoothing_factors,
)
from quant.svdq import basis_from_keys, svdq_keys
from quant.uniform import META_DTYPES, dequantize_groups, quantize_groups

CALIBRATION_FILE = "kv_calibration.safetensors"
BITS = (1, 1.5, 2, 3, 4, 8)
# 1.00 ... 0.50. SKVQ's found factors lie near 0.92-0.96 at 4 bits; at 1-2 bits the error keeps
# falling below 0.80 (on SmolLM2-135M the search stopped at the old grid's end, 0.80, for every layer).
CLIPS = [1.0 - 0.02 * i for i in range(26)]
KINDS = ("k_pre", "k_post", "v")
GROUPINGS = ("equal", "head_pairs", "kmeans", "smooth")  # smooth: equal groups after smoothing (quant/kvspec.py)
ROTATED_KINDS = ("k_post", "v")  # rotation needs post-RoPE keys (quant/kvspec.py)
# Tokens past the sinks and the window a text must have: what the clip search fits (subsampled to
# at most 1024 tokens) and k-means clusters; fewer leave channel ranges and clip factors to chance.
MIN_TOKENS = 256


class CaptureCache:
    """Exact attention over whole sequences that records, per call, (q, k_pre, k_post, v), each
    [B, heads, T, D]: calls come layer by layer, window by window."""

    keys_pre_rope = True

    def __init__(self, inv_freq):
        self.inv_freq = inv_freq
        self.records = []

    def attend(self, layer, q, k_pre, v, positions):
        k = apply_rope(k_pre, *rope_cos_sin(positions, self.inv_freq))
        self.records.append((q, k_pre, k, v))
        return attention(q, k, v, positions)


def token_major(records: list, n_layers: int, n_sink: int = 0) -> dict:
    """CaptureCache records -> {(layer, kind): [N, Hkv, D]}, one row per token, the first n_sink
    positions of each window left out: the cache holds them in full precision, and their keys
    and values (the attention sink's above all) are outliers that would stretch every range."""
    chunks = {}
    for i, (q, *kvs) in enumerate(records):
        for kind, x in zip(KINDS, kvs):
            chunks.setdefault((i % n_layers, kind), []).append(x[:, :, n_sink:].transpose(1, 2).flatten(0, 1).float())
    return {key: torch.cat(xs) for key, xs in chunks.items()}


def window_tokens(ids: list[int], w: int, seq_len: int, prefix: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of window w of seq_len tokens of `ids` (text tokens, no BOS), fed as a
    prompt is at generation time: after `prefix`, the ids the tokenizer puts before a prompt's
    text (engine/tokenizer.py prompt_prefix). With a BOS, [BOS] + window[:-1] predicts the whole
    window; with none (SmolLM2's tokenizer adds none), window[:-1] predicts window[1:]."""
    window = ids[w * seq_len:(w + 1) * seq_len]
    return (prefix + window[:-1], window) if prefix else (window[:-1], window[1:])


def n_windows(n_ids: int, seq_len: int) -> int:
    """Windows of seq_len tokens in n_ids: a tail shorter than seq_len is dropped unless it is all there is."""
    return max(1, n_ids // seq_len)


@torch.no_grad()
def capture(model, ids: list[int], seq_len: int, max_windows: int, prefix: list[int]) -> CaptureCache:
    """A full-precision forward over up to max_windows windows of seq_len tokens of `ids`, each
    fed as perplexity feeds it (window_tokens), recorded by a CaptureCache."""
    cache = CaptureCache(model.inv_freq)
    count = min(n_windows(len(ids), seq_len), max_windows)
    for w in tqdm(range(count), desc="capturing K/V", file=sys.stderr, disable=count == 1):
        window = torch.tensor(window_tokens(ids, w, seq_len, prefix)[0], device=model.inv_freq.device)[None]
        model(window, torch.arange(window.shape[1], device=window.device)[None], cache)
    return cache


def make_groups(grouping: str, x: torch.Tensor, group_size: int) -> ChannelGroups:
    """x [N, Hkv, D] calibration tokens."""
    _, n_heads, D = x.shape
    if grouping in ("equal", "smooth"):
        return equal_groups(n_heads, D, group_size)
    if grouping == "head_pairs":
        return head_pair_groups(x.abs().amax(0), group_size)
    return kmeans_groups(x.amin(0), x.amax(0), D // group_size)


def layer_rotation(layer: int, head_dim: int) -> torch.Tensor:
    """The rotation of layer `layer`'s rotated keys and values: one per layer, seeded by its index."""
    return rotation_matrix(head_dim, seed=layer)


def clip_errors(x: torch.Tensor, bits, groups: ChannelGroups, smoothing=None, rotation=None) -> torch.Tensor:
    """Mean squared error [len(CLIPS)] of x [N, Hkv, D] quantized as TokenQuantizer(bits, groups,
    clip, fp16 metadata, smoothing, rotation) quantizes it, for every clip of CLIPS in one batched
    quantize-dequantize (packing is lossless, so it is skipped)."""
    xs = x if smoothing is None else x / smoothing
    if rotation is not None:
        xs = xs @ rotation
    clip = torch.tensor(CLIPS)[:, None, None, None]                              # (C, 1, 1, 1)
    codes, scale, low = quantize_groups(xs, bits, groups.group_index, groups.n_groups, clip)  # codes (C, N, Hkv, D)
    x_hat = dequantize_groups(codes, scale, low, groups.group_index)
    if rotation is not None:
        x_hat = x_hat @ rotation.T
    if smoothing is not None:
        x_hat = x_hat * smoothing
    return (x_hat - x).pow(2).mean((1, 2, 3))


def search_clip(x: torch.Tensor, bits, groups: ChannelGroups, smoothing=None, rotation=None,
                max_tokens: int = 1024) -> float:
    """The clip factor of CLIPS with the least mean squared error on x [N, Hkv, D] (the first of equals)."""
    x = x[::max(1, x.shape[0] // max_tokens)]  # an even subsample keeps the search quick
    return CLIPS[int(clip_errors(x, bits, groups, smoothing, rotation).argmin())]


def calibrate(captured: dict, n_layers: int, groupings, group_sizes) -> dict:
    tensors = {}
    jobs = [(layer, kind, grouping, g) for layer in range(n_layers) for kind in KINDS
            for grouping in groupings for g in group_sizes]
    for layer, kind, grouping, group_size in tqdm(jobs, desc="calibrating", file=sys.stderr):
        x = captured[(layer, kind)]
        groups = make_groups(grouping, x, group_size)
        smoothing = smoothing_factors(x.abs().amax(0)) if grouping == "smooth" else None
        name = f"{grouping}.g{group_size}.{kind}.{layer}"
        tensors[f"{name}.group_index"] = groups.group_index
        tensors[f"{name}.clip"] = torch.tensor([search_clip(x, bits, groups, smoothing) for bits in BITS])
        if smoothing is not None:
            tensors[f"{name}.smoothing"] = smoothing
    rotated_jobs = [(layer, kind, g) for layer in range(n_layers) for kind in ROTATED_KINDS for g in group_sizes]
    for layer, kind, group_size in tqdm(rotated_jobs, desc="calibrating rotated", file=sys.stderr):
        x = captured[(layer, kind)]
        groups, rotation = equal_groups(x.shape[1], x.shape[2], group_size), layer_rotation(layer, x.shape[2])
        tensors[f"rotated.g{group_size}.{kind}.{layer}.clip"] = torch.tensor(
            [search_clip(x, bits, groups, rotation=rotation) for bits in BITS])
    for layer in range(n_layers):  # SVDq's basis of the pre-RoPE keys (quant/svdq.py)
        tensors[f"svdq.basis.{layer}"], tensors[f"svdq.mean.{layer}"] = basis_from_keys(captured[(layer, "k_pre")])
    return tensors


class Calibration:
    """Calibrated channel groups and clip factors: quantizers per layer for (grouping, kind, bits);
    and SVDq's key bases per layer."""

    def __init__(self, tensors: dict, settings: dict, name: str = "the calibration"):
        self.tensors, self.settings, self.name = tensors, settings, name

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        from safetensors import safe_open

        readable(path, "calibration file")
        try:
            with safe_open(path, "pt") as f:
                settings = json.loads(f.metadata()["settings"])
            calibration = cls(load_file(path), settings, str(path))
            calibration.shape()
        except Exception as e:  # safetensors raises several types for bad files
            raise UserError(f"{path}: not a valid calibration file ({e!r})")
        return calibration

    def shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head_dim) of the model it calibrates."""
        n_heads, head_dim = self.tensors["svdq.mean.0"].shape  # (Hkv, D)
        return self.settings["layers"], n_heads, head_dim

    def heads(self, first: int, count: int) -> "Calibration":
        """The tables of KV heads first ... first + count - 1 only (a tensor-parallel rank's):
        channel groups, smoothing and SVDq bases are per head [Hkv, ...]; clip factors per layer."""
        per_head = lambda name: name.endswith((".group_index", ".smoothing")) or name.startswith("svdq.")
        tensors = {name: t[first:first + count] if per_head(name) else t for name, t in self.tensors.items()}
        return Calibration(tensors, self.settings, f"{self.name} (KV heads {first}-{first + count - 1})")

    def check(self, n_layers: int, n_heads: int, head_dim: int):
        """Refuses a calibration made on a model of another shape."""
        if self.shape() != (n_layers, n_heads, head_dim):
            raise UserError("{}: made for {} layers of {} KV heads of head_dim {}, the model has {} of {} of {}"
                            .format(self.name, *self.shape(), n_layers, n_heads, head_dim))

    def quantizers(self, grouping: str, group_size: int, kind: str, bits,
                   meta_dtype=torch.float16, scaling: str = "minmax") -> list[TokenQuantizer]:
        """Per layer, the TokenQuantizer of K-pre, K-post or V (`kind`) at `bits`: the clip
        factor is min-max's, none for rms (its multiplier search is its clipping)."""
        if grouping not in self.settings["groupings"]:
            raise UserError(f"{self.name} has groupings {', '.join(self.settings['groupings'])}, not {grouping} "
                            f"(python -m quant.calibrate --groupings {grouping} makes it)")
        if group_size not in self.settings["group_sizes"]:
            raise UserError(f"{self.name} has group sizes {self.settings['group_sizes']}, not {group_size} "
                            f"(python -m quant.calibrate --group-sizes {group_size} makes it)")
        out = []
        for layer in range(self.settings["layers"]):
            name = f"{grouping}.g{group_size}.{kind}.{layer}"
            group_index = self.tensors[f"{name}.group_index"]  # (Hkv, D)
            groups = ChannelGroups(group_index, group_index.shape[1] // group_size)
            clip = float(self.tensors[f"{name}.clip"][BITS.index(bits)]) if scaling == "minmax" else 1.0
            out.append(TokenQuantizer(bits, groups, clip, meta_dtype, self.tensors.get(f"{name}.smoothing"),
                                      scaling=scaling))
        return out

    def rotated_clips(self, group_size: int, kind: str, bits) -> list[float] | None:
        """Per layer, the clip factor of rotated K-post or V (`kind`) at `bits`; None where the
        file has none (made before rotation, or for other group sizes)."""
        names = [f"rotated.g{group_size}.{kind}.{layer}.clip" for layer in range(self.settings["layers"])]
        if not all(name in self.tensors for name in names):
            return None
        return [float(self.tensors[name][BITS.index(bits)]) for name in names]

    def svdq_bases(self) -> list:
        """Per layer (basis [Hkv, D, D], mean [Hkv, D]) of the pre-RoPE keys."""
        return [(self.tensors[f"svdq.basis.{layer}"], self.tensors[f"svdq.mean.{layer}"])
                for layer in range(self.settings["layers"])]


def calibrated(spec, head_dim: int, calibration: Calibration | None) -> bool:
    """Whether the calibration holds SKVQ's tables for the channel groups `spec` asks for: its
    group size and grouping (a calibration holds those it was asked for, quant.calibrate --kv)."""
    return (calibration is not None and spec.channel_group(head_dim) in calibration.settings["group_sizes"]
            and spec.grouping in calibration.settings["groupings"])


def quantizers_for(spec, n_layers: int, n_heads: int, head_dim: int, calibration: Calibration | None = None):
    """(key quantizers, value quantizers), one per layer, for the quantized cache `spec`
    (quant/kvspec.py) names on a model of n_layers layers of n_heads KV heads of head_dim. SKVQ's
    channel groups, smoothing and clip factors come from the calibration when it has them for the
    spec's group size; otherwise the groups are equal runs of channels with no smoothing or
    clipping. SVDq keys take the calibration's bases, or (svdq-basis=prompt, or no calibration)
    each prompt's own; their values are SKVQ's. KIVI's are its own (quant/kivi.py).
    A rotated side (spec.rotates) takes layer_rotation, keys and values alike: one matrix per
    layer, so a sign draw that happens to suit some outliers badly is one layer's, and every head
    shares it (a tensor-parallel rank needs no slice of it). It needs no calibration: equal groups,
    no smoothing (the calibration's groups and factors describe unrotated channels), and the
    calibration's clip factors searched on rotated channels where it has them, else none."""
    L, Hkv, D = n_layers, n_heads, head_dim
    if calibration is not None:
        calibration.check(L, Hkv, D)
    if spec.method == "kivi":
        return kivi_quantizers(spec, L, Hkv, D)
    meta, group_size = META_DTYPES[spec.metadata], spec.channel_group(D)

    def skvq(kind, bits, rotated=False):
        # The calibration's clip factors are min-max's: rms searches its own multiplier per group.
        # 8 bits keeps min-max (quant/uniform.py GAUSSIAN_STEP has no step for 256 levels).
        scaling = "minmax" if bits == 8 else spec.scaling
        if rotated:
            clips = calibration.rotated_clips(group_size, kind, bits) if calibration is not None else None
            clips = clips if clips and scaling == "minmax" else [1.0] * L
            return [TokenQuantizer(bits, equal_groups(Hkv, D, group_size), clips[layer], meta,
                                   rotation=layer_rotation(layer, D), scaling=scaling) for layer in range(L)]
        if calibrated(spec, D, calibration):
            return calibration.quantizers(spec.grouping, group_size, kind, bits, meta, scaling)
        return [TokenQuantizer(bits, equal_groups(Hkv, D, group_size), meta_dtype=meta, scaling=scaling)
                for _ in range(L)]

    rotate_keys, rotate_values = spec.rotates
    values = skvq("v", spec.value_bits, rotate_values)
    if spec.method == "svdq":
        if calibration is not None and spec.svdq_basis == "calibration":
            keys = [svdq_keys(spec.key_bits, Hkv, D, spec.token_group, basis, mean)
                    for basis, mean in calibration.svdq_bases()]
        else:
            keys = [svdq_keys(spec.key_bits, Hkv, D, spec.token_group)] * L
        return keys, values
    return skvq("k_pre" if spec.pre_rope_keys else "k_post", spec.key_bits, rotate_keys), values


def load_calibration(model_dir) -> Calibration | None:
    path = Path(model_dir) / CALIBRATION_FILE
    return Calibration.load(path) if path.exists() else None


def calibration_from(captured: dict, n_layers: int, group_sizes, groupings=GROUPINGS, **settings) -> Calibration:
    tensors = calibrate(captured, n_layers, groupings, group_sizes)
    n_tokens = next(iter(captured.values())).shape[0]
    return Calibration(tensors, dict(layers=n_layers, group_sizes=list(group_sizes), bits=list(BITS), clip_grid=CLIPS,
                                     kinds=list(KINDS), groupings=list(groupings), tokens=n_tokens, **settings))


def calibrated_spec(text: str) -> kvspec.KvSpec:
    """--kv: a cache that reads a calibration (skvq, svdq)."""
    try:
        spec = kvspec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    if spec.method not in ("skvq", "svdq"):
        raise argparse.ArgumentTypeError(f"{spec.method} reads no calibration (skvq and svdq caches do)")
    return spec


def choices(allowed):
    """A comma-separated list of names from `allowed`, or all of them."""
    def parse(text: str) -> list[str]:
        names = list(allowed) if text == "all" else text.split(",")
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (all, or from {', '.join(allowed)})")
        return names
    return parse


def group_sizes(text: str) -> list[int]:
    try:
        sizes = [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")
    if any(g <= 0 or g % 2 for g in sizes):
        raise argparse.ArgumentTypeError(f"{text}: each must be positive and even")
    return sizes


def writable(path: Path) -> Path:
    """`path`, once a file has been made beside it: the folder's writability is known before any
    work, not after it (a read-only folder, or a read-only filesystem, where even root cannot write)."""
    if path.is_dir():
        raise UserError(f"{path}: the calibration file would replace a directory")
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as e:
        raise UserError(f"{path}: cannot write the calibration there ({e.strerror or e}; --out FILE writes it elsewhere)")
    return path


def parse_args(argv=None):
    p = ArgumentParser(description="Calibrate SKVQ channel groups and clip factors, and SVDq key bases.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True, help="calibration text (not the evaluation text)")
    p.add_argument("--kv", type=calibrated_spec, default=kvspec.DEFAULT,
                   help=f"the cache to calibrate for: its grouping, group size and sinks (default {kvspec.DEFAULT})")
    p.add_argument("--groupings", type=choices(GROUPINGS), default=None,
                   help="channel groupings to calibrate, comma-separated, or all (default: the --kv cache's)")
    p.add_argument("--group-sizes", type=group_sizes, default=None,
                   help="channel group sizes to calibrate, comma-separated (default: the --kv cache's for the "
                        "model's head_dim)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="calibration tokens to use (default 4096)")
    p.add_argument("--seq-len", type=positive_int, default=2048,
                   help="tokens per forward (default 2048, or the model's context if shorter)")
    p.add_argument("--out", type=Path, default=None, help=f"default: MODEL/{CALIBRATION_FILE}")
    return p.parse_args(argv)


def model_config(model_dir: Path):
    """The checkpoint's config.json, read before its weights: the flags are checked against it."""
    from model import LlamaConfig

    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    return LlamaConfig.from_json(model_dir / "config.json")


def main(args):
    from engine.tokenizer import load_tokenizer, prompt_prefix

    cfg = model_config(args.model)
    spec = args.kv
    try:
        spec.check(cfg.head_dim)
    except ValueError as e:
        raise FlagError(f"--kv {spec}: {e}")
    sizes = args.group_sizes or [spec.channel_group(cfg.head_dim)]
    if any(cfg.head_dim % g for g in sizes):
        raise FlagError(f"--group-sizes {','.join(map(str, sizes))}: each must divide head_dim {cfg.head_dim}")
    groupings = args.groupings or [spec.grouping]
    out = writable(args.out or args.model / CALIBRATION_FILE)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(read_text(args.text, "calibration text"), bos=False)[:args.tokens]
    needed = spec.sinks + spec.window + MIN_TOKENS
    if len(ids) < needed:
        raise UserError(f"{args.text}: {len(ids)} tokens (of at most --tokens {args.tokens}) are too few to calibrate: "
                        f"it takes {needed}, the {spec.sinks} sinks and {spec.window}-token window kept exact "
                        f"and {MIN_TOKENS} more")
    seq_len = min(args.seq_len, cfg.max_position_embeddings, len(ids))

    torch.manual_seed(0)  # k-means and nothing else is random; keep the file reproducible
    model = Llama.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    records = capture(model, ids, seq_len, len(ids) // seq_len, prompt_prefix(tokenizer)).records
    captured = token_major(records, cfg.num_hidden_layers, spec.sinks)
    calibration = calibration_from(captured, cfg.num_hidden_layers, sizes, groupings, seq_len=seq_len,
                                   sinks=spec.sinks, text=args.text.name)
    save_file({k: v.contiguous() for k, v in calibration.tensors.items()}, out,
              metadata={"settings": json.dumps(calibration.settings)})
    print(f"wrote {out}: {len(calibration.tensors)} tensors from {calibration.settings['tokens']} tokens",
          file=sys.stderr)


if __name__ == "__main__":
    args = parse_args()
    run_cli(lambda: main(args))
