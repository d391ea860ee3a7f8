"""How far a simulated cache moves a model's next-token distribution from the unquantized one.

    python -m quant.agreement --model DIR --text A --text B --kv skvq-k2v1.5 --kv ...

For each text, one window of --seq-len tokens (quant/calibrate.py window_tokens), scored once
with full-precision attention and once per cache (quant/methods.py simulation, no calibration):
perplexity and its change, the mean KL divergence KL(full || cache) per token in nats, and the
share of tokens whose most likely next token is the same.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import read_text, run_cli
from model import Llama
from quant import kvspec
from quant.calibrate import window_tokens
from quant.eval import setting_row, table


@torch.no_grad()
def compare(model, ids: list[int], seq_len: int, specs) -> list:
    """Rows (cache, bits per element, perplexity, its change, mean KL, top-1 agreement)."""
    inputs, targets = (torch.tensor(x) for x in window_tokens(ids, 0, seq_len, model.config.bos_token_id))
    positions = torch.arange(inputs.shape[0])[None]
    full = F.log_softmax(model(inputs[None])[0].double(), -1)                     # (T, vocab)
    full_ppl = math.exp(F.nll_loss(full, targets).item())
    rows = [("fp16", 16.0, f"{full_ppl:.3f}", "", "", "")]
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim)
    for spec in specs:
        name, bits, cache = setting_row(spec, shape, inv_freq=model.inv_freq)
        logp = F.log_softmax(model(inputs[None], positions, cache())[0].double(), -1)
        ppl = math.exp(F.nll_loss(logp, targets).item())
        kl = (full.exp() * (full - logp)).sum(-1).mean().item()
        top1 = (full.argmax(-1) == logp.argmax(-1)).double().mean().item()
        rows.append((name, bits, f"{ppl:.3f}", f"{100 * (ppl / full_ppl - 1):+.1f}%", f"{kl:.4f}", f"{top1:.3f}"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--text", type=Path, action="append", required=True, help="held-out text (repeatable)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens of each text scored")
    p.add_argument("--kv", type=kvspec.parse, action="append", required=True, help="a cache (repeatable)")
    args = p.parse_args(argv)
    from engine.tokenizer import load_tokenizer

    model = Llama.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    for text in args.text:
        ids = tokenizer.encode(read_text(text, "text"), bos=False)[:args.seq_len]
        print(f"\n{text.name}: {len(ids)} tokens, no calibration\n")
        print(table(compare(model, ids, len(ids), args.kv), ["perplexity", "change", "KL to full", "top-1 agree"]))


if __name__ == "__main__":
    run_cli(main)
