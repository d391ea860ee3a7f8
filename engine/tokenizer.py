"""Tokenizers as Llama checkpoints ship them, behind one interface (encode, decode, bos_id,
vocab_size): a Hugging Face `tokenizer.json` (Llama 3: byte-level BPE with special tokens; its
`original/tokenizer.model` is tiktoken's format, not SentencePiece), else a SentencePiece
`tokenizer.model` (Llama 1 and 2), as transformers chooses when both are there.
tokenizer_config.json's add_bos_token and add_eos_token say what encode adds, for either kind, as
transformers reads them. Which ids end generation comes from generation_config.json,
as transformers' generate takes it (Llama 3.1 lists three), else from config.json.
"""
from pathlib import Path

from cli import JSON_BYTES, UserError, read_file, read_json
from model import FIELD_TYPES, LlamaConfig, is_a


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.model").exists() or (model_dir / "tokenizer.json").exists()


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer: tokenizer.json where there is one, else SentencePiece."""
    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        raise UserError(f"{model_dir}: no tokenizer (tokenizer.model or tokenizer.json) found")
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer_config.json") if config_path.exists() else {}
    for key in ("add_bos_token", "add_eos_token"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise UserError(f"{config_path}: {key} must be true or false, got {config[key]!r}")
    if (model_dir / "tokenizer.json").exists():
        return JsonTokenizer(model_dir / "tokenizer.json", config, config_path)
    return SentencePieceTokenizer(model_dir / "tokenizer.model", config, config_path)


def prompt_prefix(tokenizer) -> list[int]:
    """The ids `encode(text)` puts before a prompt's text, as generate.py encodes prompts: BOS
    where the tokenizer adds one (SentencePiece's; a tokenizer.json's post-processor may add one,
    SmolLM2's adds none). quant.calibrate and quant.eval feed every window of text after them."""
    text, prompt = tokenizer.encode("a", bos=False), tokenizer.encode("a", bos=True)
    return prompt[:prompt.index(text[0])]


def eos_ids(model_dir: Path, cfg: LlamaConfig) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id, else config.json's."""
    path = Path(model_dir) / "generation_config.json"
    eos = read_json(path, "generation_config.json").get("eos_token_id") if path.exists() else None
    if eos is None:
        return cfg.eos_ids
    if not is_a(eos, FIELD_TYPES["eos_token_id"]):
        raise UserError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return eos if isinstance(eos, list) else [eos]


class SentencePieceTokenizer:
    """SentencePiece, as Llama 1 and 2 use it: BOS prepended (unless add_bos_token is false), EOS
    appended where add_eos_token is true."""

    def __init__(self, path, config: dict, config_path: Path):
        import sentencepiece as spm

        data = read_file(path, "tokenizer.model", regular=True)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})")
        self.vocab_size = self.sp.GetPieceSize()
        self.add_bos, self.add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        for added, token_id, what in ((self.add_bos, self.bos_id, "BOS"), (self.add_eos, self.eos_id, "EOS")):
            if added and token_id < 0:
                raise UserError(f"{path}: the SentencePiece model has no {what} token, and "
                                f"{config_path.name} does not say add_{what.lower()}_token: false")
        self.bos_id = self.bos_id if self.bos_id >= 0 else None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """The ids of `text`, BOS and EOS added as the tokenizer's configuration says (bos=False: neither)."""
        return [self.bos_id] * (bos and self.add_bos) + self.sp.Encode(text) + [self.eos_id] * (bos and self.add_eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)


class JsonTokenizer:
    """A Hugging Face tokenizer.json (Llama 3), read by the `tokenizers` library. Its post-processor
    adds BOS (Llama 3's does), as transformers encodes, unless tokenizer_config.json sets
    add_bos_token or add_eos_token: then, as in transformers, BOS and EOS are added as those say
    and nothing else; special tokens decode as their text."""

    def __init__(self, path: Path, config: dict, config_path: Path):
        from tokenizers import Tokenizer as HuggingFaceTokenizer
        from tokenizers.processors import TemplateProcessing

        text = read_file(path, "tokenizer.json", JSON_BYTES, regular=True)
        try:
            self.tokenizer = HuggingFaceTokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file; bad UTF-8 too)
            raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})")
        # Ids run up to the largest one: added tokens may leave gaps, and an id is an embedding row.
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        bos, eos = (special_token(config, key) for key in ("bos_token", "eos_token"))
        self.bos_id = self._token_id(bos, "bos_token", config_path)
        if "add_bos_token" in config or "add_eos_token" in config:  # transformers' update_post_processor
            added = {key: (token, self._token_id(token, key, config_path)) for key, token in
                     (("bos_token", bos), ("eos_token", eos)) if token is not None and config.get(f"add_{key}")}
            template = [token for token, _ in added.values()]
            template.insert(1 if "bos_token" in added else 0, "$A")
            self.tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=list(added.values()))

    def _token_id(self, token: str | None, key: str, config_path: Path) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"{config_path}: {key} {token!r} is not in tokenizer.json's vocabulary")
        return token_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def special_token(config: dict, key: str) -> str | None:
    """tokenizer_config.json's bos_token or eos_token: its text, or None where it names none."""
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token  # older files wrap it in an AddedToken
    return token if isinstance(token, str) else None


class StreamDecoder:
    """Turns generated ids into text as they arrive.

    Decoding tokens one by one is wrong twice over: SentencePiece drops the leading space of the
    first piece of every decode, and a byte-fallback character spans several tokens. So each new
    id is decoded behind a context token whose text is then cut off, and text ending in an
    incomplete character is held back until the character completes (or the stream ends: flush).
    """

    def __init__(self, tokenizer, context_id: int):
        self.tokenizer = tokenizer
        self._reset([context_id])

    def _reset(self, ids):
        self.ids = ids
        self.emitted = len(self.tokenizer.decode(ids))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        # Keep the context short so decoding stays O(1) per token; a lone continuation byte
        # would not decode as a prefix of what follows, so never restart on one.
        if "\ufffd" not in self.tokenizer.decode([token_id]):
            self._reset([token_id])
        return new

    def flush(self) -> str:
        """At the end of the stream: what was held back for a character that never completed."""
        return self.tokenizer.decode(self.ids)[self.emitted:]
