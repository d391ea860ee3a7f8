"""How far a simulated cache moves a model's next-token distribution from the unquantized one.

    python -m quant.agreement --model DIR --text A --text B --kv skvq-k2v1.5 --kv ... [--calibration FILE]

For each text, one window of --seq-len tokens (quant/calibrate.py window_tokens), scored once
with full-precision attention and once per cache (quant/methods.py simulation; without
--calibration as a model with no calibration file runs, with it as quant.calibrate's FILE sets it up):
perplexity and its change, the mean KL divergence KL(full || cache) per token in nats, and the
share of tokens whose most likely next token is the same.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import UserError, read_text, run_cli
from model import Llama
from quant import kvspec
from quant.calibrate import Calibration, window_tokens
from quant.eval import setting_row, table


@torch.no_grad()
def compare(model, ids: list[int], prefix: list[int], specs, calibration=None) -> list:
    """Rows (cache, bits per element, perplexity, its change, mean KL, top-1 agreement) of the text
    `ids` fed after `prefix` (engine/tokenizer.py prompt_prefix), as generate.py feeds a prompt."""
    inputs, targets = (torch.tensor(x) for x in window_tokens(ids, 0, len(ids), prefix))
    positions = torch.arange(inputs.shape[0])[None]
    full = F.log_softmax(model(inputs[None])[0].double(), -1)                     # (T, vocab)
    full_ppl = math.exp(F.nll_loss(full, targets).item())
    rows = [("fp16", 16.0, f"{full_ppl:.3f}", "", "", "")]
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim)
    for spec in specs:
        name, bits, cache = setting_row(spec, shape, calibration, inv_freq=model.inv_freq)
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
    p.add_argument("--calibration", type=Path, help="a quant.calibrate output (default: none)")
    args = p.parse_args(argv)
    from engine.tokenizer import load_tokenizer, prompt_prefix

    model = Llama.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    calibration = Calibration.load(args.calibration) if args.calibration else None
    for text in args.text:
        ids = tokenizer.encode(read_text(text, "text"), bos=False)[:args.seq_len]
        recent = max((spec.sinks + spec.window for spec in args.kv if spec.quantized), default=0)
        if len(ids) <= recent:
            raise UserError(f"{text}: {len(ids)} tokens, within the caches' {recent} sinks and window: "
                            "no token would read quantized history")
        print(f"\n{text.name}: {len(ids)} tokens, {calibration.name if calibration else 'no calibration'}\n")
        print(table(compare(model, ids, prompt_prefix(tokenizer), args.kv, calibration), ["perplexity", "change", "KL to full", "top-1 agree"]))


if __name__ == "__main__":
    run_cli(main)
