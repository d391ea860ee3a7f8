"""Prefill and decode loop, in the gpt-fast way: free functions over a model and a cache; on a
GPU the decode step is a CUDA graph (`Decoder`)."""
import sys

import torch
from tqdm import tqdm

from cli import UserError
from engine.sampling import sample


PREFILL_CHUNK = 4096  # tokens per prefill forward: bounds activations and the chunk's fp16 K/V


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, prompt_lengths: torch.Tensor, cache,
            chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """tokens [B, T] right-padded prompts of prompt_lengths [B] -> logits [B, vocab] at each last token.

    A prompt longer than chunk_size goes in chunks: each chunk attends to what the cache holds so
    far (a quantized cache's history as stored) and exactly to itself, and memory is bounded by the
    chunk, not the prompt. A shorter prompt is one exact forward."""
    T = tokens.shape[1]
    if T <= chunk_size:
        positions = cache.reserve(prompt_lengths, T)  # (B, T)
        return model(tokens, positions, cache, logits_index=prompt_lengths - 1)[:, 0]
    logits = None
    starts = range(0, T, chunk_size)
    # Shown once a prefill has run a second: a bar that flashes past says nothing.
    for start in tqdm(starts, desc="prefill", unit="chunk", file=sys.stderr, delay=1.0):
        chunk = tokens[:, start:start + chunk_size]                                 # (B, C)
        positions = cache.reserve((prompt_lengths - start).clamp(0, chunk.shape[1]), chunk.shape[1])
        last = prompt_lengths - 1 - start                                          # each last token, in this chunk?
        out = model(chunk, positions, cache, logits_index=last.clamp(0, chunk.shape[1] - 1))[:, 0]
        here = ((last >= 0) & (last < chunk.shape[1]))[:, None]
        logits = out if logits is None else torch.where(here, out, logits)
    return logits


@torch.no_grad()
def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """token [B] -> logits [B, vocab] for the position after it."""
    cache.claim(1)
    return _decode(model, token, cache)


def _decode(model, token, cache):
    """decode_one_token's work on the device, without a host sync where cache.capturable."""
    positions = cache.advance(torch.ones_like(cache.lengths), 1)  # (B, 1)
    return model(token[:, None], positions, cache)[:, 0]


class Decoder:
    """decode_one_token, replayed from a CUDA graph (graph=None: on CUDA where cache.capturable).
    The first step runs eagerly on a side stream, which compiles the kernels; the second is
    captured, then replayed, and so is every later one, its token copied into a static buffer.
    The cache's capacity check runs on the host before every step, outside the graph. The
    logits it returns are overwritten by the next step."""

    def __init__(self, model, cache, graph: bool | None = None):
        self.model, self.cache = model, cache
        self.graph = cache.lengths.is_cuda and cache.capturable if graph is None else graph
        if self.graph and not cache.capturable:
            raise UserError("this cache decodes in plain torch, with host syncs, and cannot be captured as a "
                            "CUDA graph (caches capture through the kernels)")
        self.warm, self.captured = False, None

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.graph:
            return decode_one_token(self.model, token, self.cache)
        self.cache.claim(1)
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = _decode(self.model, token, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return logits
        if self.captured is None:  # capture records the step without running it: the replay below runs it
            self.token, self.captured = token.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.captured):
                self.logits = _decode(self.model, self.token, self.cache)
        self.token.copy_(token)
        self.captured.replay()
        return self.logits


def generate(model, cache, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
             temperature=0.0, top_k=None, top_p=1.0, generator=None, vocab_size=None):
    """Yields the next token of every sequence, [B], until all have produced an EOS or
    max_new_tokens are out. Tokens a sequence yields after its EOS are to be ignored.
    vocab_size: sample only ids below it (checkpoints may pad the embedding past the tokenizer).
    UserError where the logits are NaN or infinite (the weights overflow in the model's dtype)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = prefill(model, tokens, lengths, cache)
    decode = Decoder(model, cache)
    for step in range(max_new_tokens):
        if not logits.isfinite().all():  # a host sync, as finished.all() is: generation streams anyway
            raise UserError(f"the model's logits are NaN or infinite at new token {step + 1} "
                            "(its activations overflow)")
        token = sample(logits[:, :vocab_size], temperature, top_k, top_p, generator)
        yield token
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or finished.all():
            return
        logits = decode(token)
