"""Tokenizers as Llama checkpoints ship them, behind one interface (encode, decode, bos_id,
vocab_size): a SentencePiece `tokenizer.model` (Llama 1 and 2), else a Hugging Face
`tokenizer.json` (Llama 3: byte-level BPE with special tokens; its `original/tokenizer.model` is
tiktoken's format, not SentencePiece). Which ids end generation comes from generation_config.json,
as transformers' generate takes it (Llama 3.1 lists three), else from config.json.
"""
from pathlib import Path

from cli import UserError, read_file
from model import FIELD_TYPES, LlamaConfig, is_a, read_json


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.model").exists() or (model_dir / "tokenizer.json").exists()


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer: SentencePiece where tokenizer.model is one, else tokenizer.json."""
    model_dir = Path(model_dir)
    json_file = model_dir / "tokenizer.json"
    if not has_tokenizer(model_dir):
        raise UserError(f"{model_dir}: no tokenizer (tokenizer.model or tokenizer.json) found")
    try:
        return SentencePieceTokenizer(model_dir / "tokenizer.model")
    except UserError:
        if not json_file.exists():
            raise
    return JsonTokenizer(json_file, model_dir / "tokenizer_config.json")


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
    """SentencePiece, as Llama 1 and 2 use it: BOS prepended."""

    def __init__(self, path):
        import sentencepiece as spm

        data = read_file(path, "tokenizer.model")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})")
        self.bos_id = self.sp.bos_id()
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.Encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)


class JsonTokenizer:
    """A Hugging Face tokenizer.json (Llama 3), read by the `tokenizers` library. Its post-processor
    adds BOS (Llama 3's does), as transformers encodes; special tokens decode as their text."""

    def __init__(self, path: Path, config_path: Path):
        from tokenizers import Tokenizer as HuggingFaceTokenizer

        text = read_file(path, "tokenizer.json")
        try:
            self.tokenizer = HuggingFaceTokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file; bad UTF-8 too)
            raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})")
        config = read_json(config_path, "tokenizer_config.json") if config_path.exists() else {}
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos  # older files wrap it in an AddedToken
        self.bos_id = self.tokenizer.token_to_id(bos) if isinstance(bos, str) else None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


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
