"""SentencePiece tokenizer as Llama uses it: BOS prepended, EOS ends generation."""
from pathlib import Path

from model import UserError


class Tokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})")
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.Encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)


class StreamDecoder:
    """Turns generated ids into text as they arrive.

    Decoding tokens one by one is wrong twice over: SentencePiece drops the leading space of the
    first piece of every decode, and a byte-fallback character spans several tokens. So each new
    id is decoded behind a context token whose text is then cut off, and text ending in an
    incomplete character is held back until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer, context_id: int):
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
