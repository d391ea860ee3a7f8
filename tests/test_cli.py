"""generate.py end to end: the happy path against transformers, and every bad input -> one line, exit != 0."""
import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

from conftest import ROOT


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def prompt(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("In the beginning God created the heaven and the earth")
    return f


def test_greedy_stdout_is_exactly_the_continuation(checkpoint, prompt, tokenizer_path):
    from transformers import LlamaForCausalLM

    path, _ = checkpoint(num_key_value_heads=2)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = [1] + sp.Encode(prompt.read_text())
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=25, do_sample=False, eos_token_id=2)[0].tolist()
    new = out[len(ids):]
    if 2 in new:
        new = new[:new.index(2)]
    expected = sp.Decode(ids + new)[len(sp.Decode(ids)):]

    r = run_cli("--model", path, "--prompt-file", prompt, "--max-new-tokens", 25,
                "--temperature", 0, "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"  # the continuation, then a line break for the shell
    assert "prompt tokens" in r.stderr and "decode:" in r.stderr and "KV cache" in r.stderr


def test_sampling_is_reproducible_with_a_seed(checkpoint, prompt):
    path, _ = checkpoint()
    args = ["--model", path, "--prompt-file", prompt, "--max-new-tokens", 20, "--temperature", 1.0,
            "--top-k", 50, "--top-p", 0.9, "--device", "cpu"]
    a, b = run_cli(*args, "--seed", 3), run_cli(*args, "--seed", 3)
    assert a.returncode == 0 and a.stdout == b.stdout


def corrupt(path, what):
    if what == "missing dir":
        return path / "nope"
    if what == "no config":
        (path / "config.json").unlink()
    elif what == "config not json":
        (path / "config.json").write_text("{not json")
    elif what == "config lacks field":
        raw = json.loads((path / "config.json").read_text())
        del raw["hidden_size"]
        (path / "config.json").write_text(json.dumps(raw))
    elif what == "shape mismatch":
        raw = json.loads((path / "config.json").read_text())
        raw["intermediate_size"] = 128
        (path / "config.json").write_text(json.dumps(raw))
    elif what == "no weights":
        (path / "model.safetensors").unlink()
    elif what == "truncated weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "garbage weights":
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}")
    elif what == "no tokenizer":
        (path / "tokenizer.model").unlink()
    elif what == "corrupt tokenizer":
        (path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    return path


BAD_CHECKPOINTS = {
    "missing dir": "model directory not found",
    "no config": "config.json not found",
    "config not json": "not valid JSON",
    "config lacks field": "missing field(s) hidden_size",
    "shape mismatch": "has shape",
    "no weights": "weights file not found",
    "truncated weights": "corrupt or truncated",
    "garbage weights": "corrupt or truncated",
    "no tokenizer": "no tokenizer (tokenizer.model or tokenizer.json) found",
    "corrupt tokenizer": "not a valid SentencePiece model",
}


def assert_one_line_error(r, message):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("what", BAD_CHECKPOINTS)
def test_bad_checkpoint(checkpoint, prompt, what):
    path, _ = checkpoint()
    r = run_cli("--model", corrupt(path, what), "--prompt-file", prompt, "--device", "cpu")
    assert_one_line_error(r, BAD_CHECKPOINTS[what])


@pytest.mark.parametrize("content, message", [
    (None, "prompt file not found"),
    (b"", "prompt file is empty"),
    (b"  \n\t\n", "prompt file is empty"),
    (b"caf\xe9 latin-1", "not UTF-8"),
    ("the lord said unto moses " * 200, "the model's context is 256 (--max-context N for a longer one)"),
])
def test_bad_prompt(checkpoint, tmp_path, content, message):
    path, _ = checkpoint()
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content.encode() if isinstance(content, str) else content)
    assert_one_line_error(run_cli("--model", path, "--prompt-file", f, "--device", "cpu"), message)


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be positive"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be positive"),
    (["--max-new-tokens", "ten"], "is not an integer"),
    (["--temperature", "-0.1"], "--temperature: must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--top-k", "0"], "--top-k: must be positive"),
    (["--kv", "int3"], "argument --kv: unknown method 'int3'"),
    (["--kv", "svdq-k3v2"], "svdq takes key bits in 1.25, 2"),
    (["--max-context", "big"], "--max-context: 'big' is not an integer"),
    (["--max-context", "5"], "--max-context 5 leaves no room after the"),
    (["--max-context", str(1 << 39)], "cannot allocate the KV cache on cpu: a 549755813888-token context needs"),
    (["--prompt-tokens", "10"], "not allowed with argument --prompt-file"),
    (["--svdq-basis", "random"], "invalid choice"),
    (["--dtype", "float8"], "invalid choice"),
])
def test_bad_flags(checkpoint, prompt, flags, message):
    path, _ = checkpoint()
    assert_one_line_error(run_cli("--model", path, "--prompt-file", prompt, "--device", "cpu", *flags), message)


@pytest.mark.parametrize("flags, message", [
    (["--kv", "fp16", "--sinks", "3", "--window", "7", "--grouping", "kmeans", "--pre-rope-keys"],
     "--kv fp16 with --sinks --window --grouping --pre-rope-keys: sinks does not apply to fp16"),
    (["--kv", "kivi-k2v2"], "kivi is the evaluation baseline"),
    (["--kv", "svdq-k1.25v1.5", "--pre-rope-keys"], "pre-rope-keys does not apply to svdq"),
    (["--svdq-basis", "prompt"], "svdq-basis does not apply to skvq"),
    (["--token-group", "64"], "token-group does not apply to skvq"),
    (["--sinks", "-1"], "sinks must be an integer >= 0, got -1"),
    (["--window", "0"], "--window: must be positive"),
    (["--kv", "skvq-k2v1.5:window=0"], "window must be a positive integer, got 0"),
    (["--kv", "skvq-k2v1.5:colour=red"], "unknown setting 'colour'"),
    (["--kv", "skvq-k2v1.5:grouping=kmeans", "--grouping", "best"], "invalid choice: 'best'"),
    (["--pre-rope-keys", "--rotation", "hadamard"], "rotation=hadamard does not commute with RoPE"),
    (["--kv", "svdq-k2v1.5", "--rotation", "hadamard"], "rotation does not apply to svdq"),
])
def test_kv_flags_are_checked_before_anything_loads(flags, message):
    """A bad --kv, or a setting the chosen cache does not have, exits 2 with one line, before any
    file is read: the model directory named here does not exist."""
    r = run_cli("--model", "/nonexistent", "--prompt-file", "/nonexistent.txt", *flags)
    assert_one_line_error(r, message)
    assert r.returncode == 2


def test_kv_settings_by_flag_or_in_the_spec_are_one_cache(checkpoint, prompt):
    path, _ = checkpoint(num_key_value_heads=2)
    common = ["--model", path, "--prompt-file", prompt, "--max-new-tokens", 20, "--temperature", 0,
              "--device", "cpu", "--dtype", "float32"]
    by_flags = run_cli(*common, "--kv", "skvq-k2v2", "--window", 4, "--sinks", 2, "--group-size", 8, "--rotation", "none",
                       "--pre-rope-keys")
    in_spec = run_cli(*common, "--kv", "skvq-k2v2:pre-rope-keys:group-size=8:sinks=2:window=4:rotation=none")
    assert by_flags.returncode == 0 and by_flags.stdout == in_spec.stdout
    assert "KV cache (skvq-k2v2:sinks=2:window=4:group-size=8:rotation=none:pre-rope-keys, float32" in by_flags.stderr


def test_kv_the_model_cannot_take_is_refused_before_its_weights_load(checkpoint, prompt):
    path, _ = checkpoint()  # head_dim 16
    (path / "model.safetensors").unlink()  # were the weights read, this would be the error
    r = run_cli("--model", path, "--prompt-file", prompt, "--group-size", 48, "--device", "cpu")
    assert_one_line_error(r, "--kv skvq-k2v1.5:group-size=48: group-size 48 must divide head_dim 16")


def test_help_loads_no_torch():
    """--help and flag errors answer at once: generate.py imports torch only to run."""
    r = subprocess.run([sys.executable, "-c", "import sys, generate; generate.parse_args(['--prompt-tokens', '5']); "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_missing_prompt_flag():
    assert_one_line_error(run_cli(), "--prompt-file")


def test_quantized_cache_through_the_cli(checkpoint, prompt):
    path, _ = checkpoint(num_key_value_heads=2)
    common = ["--model", path, "--prompt-file", prompt, "--max-new-tokens", 30, "--temperature", 0,
              "--device", "cpu", "--dtype", "float32"]
    fp16 = run_cli(*common, "--kv", "fp16")
    # A window holding prompt and continuation quantizes nothing: the text is the fp16 cache's.
    for kv in ("skvq-k2v1.5", "svdq-k1.25v1.5"):
        wide = run_cli(*common, "--kv", kv, "--group-size", 8)
        assert wide.returncode == 0 and wide.stdout == fp16.stdout, (kv, wide.stderr)
        # The default (rotated, rms) takes nothing from a calibration: no note that one is missing.
        assert ("no kv_calibration.safetensors" in wide.stderr) == (kv != "skvq-k2v1.5")
    narrow = run_cli(*common, "--kv", "skvq-k2v1.5", "--window", 4, "--sinks", 2, "--group-size", 8,
                     "--rotation", "none", "--scaling", "minmax")
    assert narrow.returncode == 0, narrow.stderr
    assert "no kv_calibration.safetensors" in narrow.stderr and "bits/element" in narrow.stderr
    assert len(narrow.stdout) > 0
    svdq = run_cli(*common, "--kv", "svdq-k1.25v1.5", "--window", 4, "--sinks", 2, "--group-size", 8)
    assert svdq.returncode == 0, svdq.stderr
    assert "SVDq keys take the prompt's own basis" in svdq.stderr and len(svdq.stdout) > 0


def test_synthetic_prompt_and_explicit_context(checkpoint):
    path, _ = checkpoint(num_key_value_heads=2)
    r = run_cli("--model", path, "--prompt-tokens", 40, "--max-new-tokens", 5, "--max-context", 200,
                "--temperature", 0, "--device", "cpu", "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert "prompt tokens: 40, new tokens: 5" in r.stderr and "KV cache (skvq-k2v1.5, float32 sinks and window): 200 tokens" in r.stderr
    again = run_cli("--model", path, "--prompt-tokens", 40, "--max-new-tokens", 5, "--temperature", 0,
                    "--device", "cpu", "--seed", 1)
    assert again.stdout == r.stdout  # the same synthetic prompt for the same seed
