"""The KV cache specification: everything that defines a cache, parsed once, where the user types it.

    METHOD[-kKvV][:SETTING[=VALUE]]...

    fp16                   the unquantized cache (fp16 or bf16 on a GPU, fp32 on the CPU)
    skvq-k2v1.5            SKVQ: K-bit keys and V-bit values quantized per token (the default:
                           window 512, hadamard rotation, rms scaling; issue 21)
    svdq-k1.25v1.5         SVDq keys (1.25 or 2 bits, blocks of tokens in an SVD basis), SKVQ values
    kivi-k2v2              KIVI, the baseline: only `python -m quant.eval` simulates it

Settings, each also a generate.py flag of the same name (`--window 64`):

    sinks=N                first tokens kept in full precision                  skvq, svdq
    window=N               recent tokens kept in full precision (KIVI: its residual length R)
    group-size=N           channels per (scale, low) group of a token; default 128, or the whole
                           head where 128 does not divide head_dim (KIVI: value groups of 32, or
                           of the largest power of two up to 32 that divides head_dim)
    grouping=NAME          smooth | kmeans | head_pairs | equal (quant/skvq.py), from the
                           calibration file                                     skvq, svdq
    metadata=fp8|fp16      dtype of the per-token scales and lows               skvq, svdq
    rotation=NAME          none | hadamard (keys and values) | hadamard-keys: each head's channels
                           rotated by a seeded randomised Hadamard matrix before quantizing
                           (quant/skvq.py rotation_matrix); not with pre-rope-keys    skvq
    scaling=minmax|rms     how a token's group picks its (scale, low): its min and max, or a
                           zero-centred grid whose step is the best of 0.8..1.2 times a Gaussian's
                           MSE-optimal step at the group's RMS (quant/uniform.py); no clip with
                           rms; an 8-bit side keeps min-max                     skvq
    pre-rope-keys          quantize keys before RoPE (SVDq keys always are)     skvq
    svdq-basis=NAME        calibration | prompt: the SVD basis of SVDq keys     svdq
    token-group=N          tokens per key block (SVDq: 128; KIVI: 32)           svdq, kivi

`str(spec)` is the canonical form: the method and bits, then the settings that differ from the
method's defaults in the order above, e.g. `skvq-k2v1.5:window=64:group-size=64:grouping=kmeans`.
Stats lines, benchmark JSON and evaluation tables name caches by it.

This module imports nothing heavy, so that `generate.py` can reject a bad `--kv` before torch loads.
"""
import math
from dataclasses import dataclass, replace

METHODS = ("fp16", "skvq", "svdq", "kivi")
GROUPINGS = ("smooth", "kmeans", "head_pairs", "equal")
ROTATIONS = ("none", "hadamard", "hadamard-keys")
SCALINGS = ("minmax", "rms")      # quant/uniform.py's (not imported: it imports torch)
CODE_BITS = (1, 2, 3, 4, 8)         # widths of per-token codes (quant/packing.py)
VALUE_BITS = CODE_BITS + (1.5,)     # 1.5: ternary, 5 values per byte
SVDQ_KEY_BITS = (1.25, 2)           # quant/svdq.py SCHEDULES
KIVI_KEY_BITS = (1, 2, 4, 8)        # per-channel codes in a mixed-width row (quant/packing.py)
DEFAULT_GROUP_SIZE = 128
KIVI_GROUP_SIZE = 32                # KIVI's value groups, in channels
# The most tokens any setting (and generate.py's --max-context) may name: past every context a
# machine holds, and small enough that sums and products of them with a cache's sizes fit int64.
MAX_TOKENS = 2 ** 40


@dataclass(frozen=True)
class Schedule:
    """Where each position of a sequence is held: the first `sinks` in full precision; then,
    once whole blocks of `block` tokens have left the last `window` positions, in the quantized
    history; the rest in the full-precision ring window, which therefore needs window + block - 1
    slots. Caches, simulations and the kernels' spans all ask this one rule."""
    sinks: int
    window: int
    block: int = 1

    def history_length(self, n):
        """Tokens in the history of a sequence that holds n (an int or an integer tensor)."""
        left = n - self.sinks - self.window  # past the sinks and out of the window (if positive)
        return left // self.block * self.block * (left > 0)

    @property
    def ring(self) -> int:
        return self.window + self.block - 1


@dataclass(frozen=True)
class KvSpec:
    method: str = "skvq"
    key_bits: float = 2
    value_bits: float = 1.5
    sinks: int = 5
    window: int = 512                 # issue 21, SmolLM2, 2,048 tokens: +1.9-4.2% perplexity, +5-12% at 128
    group_size: int | None = None     # None: DEFAULT_GROUP_SIZE, or head_dim if that does not divide it
    grouping: str = "smooth"          # from quant/RESULTS.md: copes with outlier channels at one group per head
    metadata: str = "fp8"             # e4m3: 1.94 bits per element at K2V1.5, 1M tokens of a 7B model in 80 GB
    rotation: str = "hadamard"        # issue 21: with rms, no calibration; unrotated min-max: over +100%
    scaling: str = "rms"              # rotated channels are near-Gaussian: min-max spends levels on extremes
    pre_rope_keys: bool = False
    svdq_basis: str = "calibration"
    token_group: int = 128            # SVDq: 0.125 bits of fp16 metadata per latent channel

    def __str__(self) -> str:
        name = self.method
        if self.quantized:
            name += f"-k{_number(self.key_bits)}v{_number(self.value_bits)}"
        base = for_method(self.method, self.key_bits, self.value_bits)
        for field, setting in SETTINGS.items():
            value = getattr(self, field)
            if value != getattr(base, field):
                name += f":{setting}" if value is True else f":{setting}={value}"
        return name

    @property
    def quantized(self) -> bool:
        return self.method != "fp16"

    @property
    def rotates(self) -> tuple[bool, bool]:
        """Whether the keys, and the values, are stored rotated (quant/skvq.py rotation_matrix)."""
        return self.rotation != "none", self.rotation == "hadamard"

    @property
    def keys_pre_rope(self) -> bool:
        """Whether keys are stored before RoPE (and rotated at their positions when read)."""
        return self.pre_rope_keys or self.method == "svdq"

    def channel_group(self, head_dim: int) -> int:
        """Channels per group for a model of this head_dim."""
        if self.group_size is not None:
            return self.group_size
        if self.method == "kivi":  # KIVI's 32 channels, or fewer where 32 does not divide head_dim (80: 16)
            return math.gcd(KIVI_GROUP_SIZE, head_dim)
        return DEFAULT_GROUP_SIZE if head_dim % DEFAULT_GROUP_SIZE == 0 else head_dim

    def check(self, head_dim: int):
        """Raises ValueError where the spec cannot run on a model of this head_dim."""
        if not self.quantized:
            return
        if head_dim % self.channel_group(head_dim):
            raise ValueError(f"group-size {self.group_size} must divide head_dim {head_dim}")
        if self.method == "svdq" and head_dim % 16:
            raise ValueError(f"SVDq keys need head_dim divisible by 16, the model has {head_dim}")

    @property
    def key_schedule(self) -> Schedule:
        if self.method == "kivi":  # keys stay exact until `window` have gathered, then all are quantized
            return Schedule(0, 1, self.window)
        return Schedule(self.sinks, self.window, self.token_group if self.method == "svdq" else 1)

    @property
    def value_schedule(self) -> Schedule:
        if self.method == "kivi":  # values slide: the last `window` and the query's own stay exact
            return Schedule(0, self.window + 1)
        return self.key_schedule  # values enter the history with their keys

    def with_settings(self, **settings) -> "KvSpec":
        """This spec with settings changed (field names as keys); ValueError for a setting that
        does not apply to the method or a value out of range."""
        spec = replace(self, **settings)
        for field in settings:
            if SETTINGS[field] not in APPLIES[self.method]:
                raise ValueError(f"{SETTINGS[field]} does not apply to {self.method}")
        spec._validate()
        return spec

    def _validate(self):
        positive = {"window": self.window, "token-group": self.token_group,
                    "group-size": 1 if self.group_size is None else self.group_size}
        for setting, value in positive.items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{setting} must be a positive integer, got {value!r}")
        if not (isinstance(self.sinks, int) and self.sinks >= 0):
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        for setting, value in {**positive, "sinks": self.sinks}.items():
            if value > MAX_TOKENS:
                raise ValueError(f"{setting} must be at most 2^40 = {MAX_TOKENS}, got {value}")
        for setting, value, allowed in [("grouping", self.grouping, GROUPINGS),
                                        ("metadata", self.metadata, ("fp8", "fp16")),
                                        ("rotation", self.rotation, ROTATIONS),
                                        ("scaling", self.scaling, SCALINGS),
                                        ("svdq-basis", self.svdq_basis, ("calibration", "prompt"))]:
            if value not in allowed:
                raise ValueError(f"{setting} must be one of {', '.join(allowed)}, got {value!r}")
        if self.pre_rope_keys and self.rotation != "none":  # R would sit between RoPE's pairs
            raise ValueError(f"rotation={self.rotation} does not commute with RoPE: it needs post-RoPE keys, "
                             "not pre-rope-keys (or rotation=none)")
        if self.method == "kivi" and self.window % self.token_group:  # KIVI quantizes whole groups at a flush
            raise ValueError(f"kivi's window {self.window} must be a multiple of its token-group {self.token_group}")


SETTINGS = {"sinks": "sinks", "window": "window", "group_size": "group-size", "grouping": "grouping",
            "metadata": "metadata", "rotation": "rotation", "scaling": "scaling", "pre_rope_keys": "pre-rope-keys",
            "svdq_basis": "svdq-basis", "token_group": "token-group"}  # field -> its name in the string and as a flag
INTEGER_FIELDS = {"sinks", "window", "group_size", "token_group"}
APPLIES = {"fp16": set(),
           "skvq": {"sinks", "window", "group-size", "grouping", "metadata", "rotation", "scaling", "pre-rope-keys"},
           "svdq": {"sinks", "window", "group-size", "grouping", "metadata", "svdq-basis", "token-group"},
           "kivi": {"window", "group-size", "token-group"}}


def for_method(method: str, key_bits: float = 16, value_bits: float = 16) -> KvSpec:
    """The spec of a method at its defaults. KIVI's are its paper's: no sinks, residual 128,
    value groups of 32 channels, key groups of 32 tokens, fp16 metadata, no calibration. Only
    SKVQ rotates (SVDq's keys are pre-RoPE) or scales by RMS, whatever KvSpec's default; SVDq
    keeps the window of 128 it was measured with."""
    if method == "fp16":
        return KvSpec("fp16", 16, 16, rotation="none", scaling="minmax")
    if method == "kivi":
        return KvSpec("kivi", key_bits, value_bits, sinks=0, window=128, grouping="equal", metadata="fp16",
                      token_group=32, rotation="none", scaling="minmax")
    if method == "svdq":
        return KvSpec("svdq", key_bits, value_bits, window=128, rotation="none", scaling="minmax")
    return KvSpec(method, key_bits, value_bits)


DEFAULT = KvSpec()


def parse(text: str) -> KvSpec:
    """The spec `text` names (module doc); ValueError with a one-line reason otherwise."""
    name, *settings = text.split(":")
    method, _, bits = name.partition("-")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {text!r} (fp16, skvq, svdq or kivi, e.g. {DEFAULT})")
    if method == "fp16":
        if bits:
            raise ValueError(f"fp16 takes no bits, got {text!r}")
        spec = for_method("fp16")
    else:
        key_bits, value_bits = _bits(bits, text)
        key_widths = {"svdq": SVDQ_KEY_BITS, "kivi": KIVI_KEY_BITS}.get(method, CODE_BITS)
        if key_bits not in key_widths or value_bits not in VALUE_BITS:
            raise ValueError(f"{method} takes key bits in {', '.join(map(_number, key_widths))} and value bits in "
                             f"{', '.join(map(_number, VALUE_BITS))}, got {text!r}")
        spec = for_method(method, key_bits, value_bits)
    by_name = {setting: field for field, setting in SETTINGS.items()}
    changes = {}
    for setting in settings:
        key, has_value, value = setting.partition("=")
        if key not in by_name:
            raise ValueError(f"unknown setting {key!r} in {text!r} (settings: {', '.join(by_name)})")
        field = by_name[key]
        if field == "pre_rope_keys":
            if has_value:
                raise ValueError(f"pre-rope-keys takes no value, got {setting!r}")
            changes[field] = True
        elif not has_value:
            raise ValueError(f"{key} needs a value ({key}=...), in {text!r}")
        else:
            changes[field] = _int(value, key) if field in INTEGER_FIELDS else value
    return spec.with_settings(**changes)


def _bits(bits: str, text: str):
    key, _, value = bits.removeprefix("k").partition("v")
    try:
        if not bits.startswith("k"):
            raise ValueError
        return _width(key), _width(value)
    except (ValueError, OverflowError):
        raise ValueError(f"expected METHOD-kKvV such as {DEFAULT}, got {text!r}") from None


def _width(s: str):
    x = float(s)
    return int(x) if x == int(x) else x


def _int(s: str, setting: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"{setting} must be an integer, got {s!r}") from None


def _number(x) -> str:
    return f"{x:g}"
