"""Next-token sampling: greedy at temperature 0, else temperature, top-k and top-p (nucleus)."""
import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]. No host sync, so it can run inside a CUDA graph."""
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted so that the largest is 0 before the division: any temperature > 0, however small
    # (1e-40), gives logits <= 0 with a 0 among them, never inf - inf (NaN) in the softmax. One
    # below fp32's smallest normal (1e-320) would round to 0 and make 0 / 0: it samples as that one
    # does, the largest logit alone.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, without torch.multinomial's sync.
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)
