"""Train kjv-tiny, the demo model, from scratch: KJV Bible -> tokenizer -> Llama -> HF checkpoint.

    python -m weights.train_tiny --minutes 40

Needs the `bible` program (apt-get install bible-kjv bible-kjv-text). Writes the corpus split and
the log to weights/data/ (build artifacts) and the model to weights/kjv-tiny/.
"""
import argparse
import io
import json
import math
import re
import subprocess
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from engine.tokenizer import SentencePieceTokenizer
from model import Llama, LlamaConfig
from quant.eval import perplexity  # the definition the tests and quant/eval.py use

HERE = Path(__file__).resolve().parent

# 1 Thessalonians .. Revelation, the last 4.8% of the text, is held out and never trained on.
FIRST_VAL_BOOK = "1Th"
VAL_SAMPLE_CHARS = 32_000  # the committed slice of val that tests recompute perplexity on

CONFIG = LlamaConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,  # 4 heads * 128 != hidden_size 256: config.json must state it, loaders honour it
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,  # the embedding is 1M of the 7M parameters; do not pay for it twice
    bos_token_id=1,
    eos_token_id=2,
)


def make_corpus(data_dir: Path, sample_path: Path):
    """Write train.txt and val.txt: one verse per line without its reference, a blank line between
    chapters, so the text reads like a printed KJV. Also the first chapters of val to sample_path."""
    bible = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
    chapters = {}  # (book, chapter) -> verses, in Bible order
    for line in bible.stdout.splitlines():  # "Ge1:1 In the beginning God created ..."
        book, chapter, verse = re.fullmatch(r"(\d?[A-Za-z]+)(\d+):\d+ (.*)", line).groups()
        chapters.setdefault((book, chapter), []).append(verse)
    split = {"train": [], "val": []}
    in_val = False
    for (book, _), verses in chapters.items():
        in_val = in_val or book == FIRST_VAL_BOOK
        split["val" if in_val else "train"].append("\n".join(verses) + "\n")
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, texts in split.items():
        (data_dir / f"{name}.txt").write_text("\n".join(texts))
    n_sample = next(i for i in range(len(split["val"]))
                    if len("\n".join(split["val"][:i])) >= VAL_SAMPLE_CHARS)
    sample_path.write_text("\n".join(split["val"][:n_sample]))


def train_tokenizer(train_txt: Path, out_path: Path):
    """Byte-fallback BPE with Llama's settings and special ids. Sentences are passed by iterator,
    not file name, which the model would record: the output is byte-identical on every machine."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_txt.read_text().splitlines()), model_writer=model,
        model_type="bpe", vocab_size=CONFIG.vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    out_path.write_bytes(model.getvalue())


def init_weights(model: nn.Module):
    for p in model.parameters():  # the tied embedding / lm_head is one parameter, seen once
        if p.dim() == 1:
            nn.init.ones_(p)  # RMSNorm gains
        else:
            nn.init.normal_(p, std=0.02)


def export(model: Llama, out_dir: Path):
    """Hugging Face Llama layout in bf16: config.json and model.safetensors (lm_head is tied)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              **vars(model.config), "attention_bias": False, "attention_dropout": 0.0,
              "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: t.to(torch.bfloat16).contiguous()
             for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})


def lr_at(progress: float, lr: float, warmup: float = 0.02, min_ratio: float = 0.1) -> float:
    """Linear warmup over the first 2% of the run, then cosine decay to 10% of lr."""
    if progress < warmup:
        return lr * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


def train(args, train_ids: torch.Tensor, val_ids: list[int]):
    """Train from random init; the best model at the full context ends up exported in args.out."""
    torch.manual_seed(args.seed)
    model = Llama(CONFIG)
    init_weights(model)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],  # no decay on norms
        lr=args.lr, betas=(0.9, 0.95))
    # Most steps run at a short context, which is ~1.5x cheaper per token on a CPU; the last
    # long_fraction of the run is at the full seq_len so that every RoPE position is trained.
    # Tokens per step stay the same in both phases.
    tokens_per_step = args.batch_size * args.seq_len
    budget_s = args.minutes * 60 or math.inf
    start, seq_len, best, bad_evals = time.time(), 0, math.inf, 0

    def evaluate(step, train_loss) -> bool:
        """Log val loss, export the model if it is the best at this context; True: stop early."""
        nonlocal best, bad_evals
        val_loss = math.log(perplexity(model, val_ids, seq_len))
        improved = val_loss < best
        tqdm.write(f"step {step} T {seq_len} {time.time() - start:.0f}s train {train_loss:.3f} "
                   f"val {val_loss:.3f}{' (best, saved)' if improved else ''}")
        if improved:
            best, bad_evals = val_loss, 0
            export(model, args.out)
        else:
            bad_evals += 1
        return bad_evals >= args.patience and seq_len == args.seq_len

    bar = tqdm(range(1, args.steps + 1), mininterval=5)
    for step in bar:
        progress = max(step / args.steps, (time.time() - start) / budget_s)
        new_seq_len = args.seq_len if progress >= 1 - args.long_fraction else args.short_seq_len
        if new_seq_len != seq_len:  # val loss is measured at the training context: start afresh
            seq_len, best, bad_evals = new_seq_len, math.inf, 0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, args.lr)

        starts = torch.randint(0, len(train_ids) - seq_len, (tokens_per_step // seq_len, 1))
        chunks = train_ids[starts + torch.arange(seq_len + 1)]  # (B, T + 1)
        inputs, targets = chunks[:, :-1].clone(), chunks[:, 1:]  # (B, T) each
        # Half the windows start with <s>, as a prompt does at generation time; half start
        # mid-text, as the later windows of a perplexity evaluation do.
        inputs[: len(inputs) // 2, 0] = CONFIG.bos_token_id
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", T=seq_len,
                        lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)

        if progress >= 1 or step == args.steps:
            evaluate(step, loss.item())
            break
        if step % args.eval_every == 0 and evaluate(step, loss.item()):
            tqdm.write(f"validation loss has not improved for {bad_evals} evaluations: stopping")
            break
    bar.close()
    print(f"trained {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=40, help="training wall-time budget (0: none)")
    p.add_argument("--steps", type=int, default=100_000,
                   help="step budget; the schedule follows whichever budget runs out first")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step at --seq-len")
    p.add_argument("--seq-len", type=int, default=1024, help="final training context")
    p.add_argument("--short-seq-len", type=int, default=256, help="context for the first part of the run")
    p.add_argument("--long-fraction", type=float, default=0.25, help="part of the run trained at --seq-len")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-windows", type=int, default=16,
                   help="seq-len windows of val used to pick the checkpoint")
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "kjv-tiny")
    p.add_argument("--data", type=Path, default=HERE / "data")
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    make_corpus(args.data, args.out / "val_sample.txt")
    train_tokenizer(args.data / "train.txt", args.out / "tokenizer.model")
    tokenizer = SentencePieceTokenizer(args.out / "tokenizer.model")
    train_ids = tokenizer.encode((args.data / "train.txt").read_text())  # [<s>, ...]
    val_ids = tokenizer.encode((args.data / "val.txt").read_text(), bos=False)
    print(f"tokens: train {len(train_ids):,}, val {len(val_ids):,}", flush=True)
    # Checkpoints are picked on the end of val; val_sample.txt, its beginning, stays untouched.
    train(args, torch.tensor(train_ids), val_ids[-args.val_windows * args.seq_len:])

    model = Llama.from_pretrained(args.out, device="cpu", dtype=torch.float32)  # the bf16 export
    results = {name: perplexity(model, tokenizer.encode(text, bos=False), args.seq_len) for name, text in [
        ("train", (args.data / "train.txt").read_text()), ("val", (args.data / "val.txt").read_text()),
        ("val_sample", (args.out / "val_sample.txt").read_text())]}
    print("perplexity at seq_len", args.seq_len, json.dumps(results), flush=True)
    (args.data / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
