"""Prefill and decode loop, in the gpt-fast way: free functions over a model and a cache."""
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
    positions = cache.reserve(torch.ones_like(cache.lengths), 1)  # (B, 1)
    return model(token[:, None], positions, cache)[:, 0]


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
    for step in range(max_new_tokens):
        if not logits.isfinite().all():  # a host sync, as finished.all() is: generation streams anyway
            raise UserError(f"the model's logits are NaN or infinite at new token {step + 1} "
                            "(its activations overflow)")
        token = sample(logits[:, :vocab_size], temperature, top_k, top_p, generator)
        yield token
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or finished.all():
            return
        logits = decode_one_token(model, token, cache)
