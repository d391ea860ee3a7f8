"""Every bad input ends with one `error:` line naming the file or flag and the reason: exit 1 for a
bad file, 2 for a bad flag. generate.py runs in this process (parse_args, then main under
cli.run_cli, as its __main__ does) to keep the many cases fast; tests/test_cli.py runs it as a
subprocess. Unreadable files are links to /proc/self/mem, which no one (root included) can read
at offset 0."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMALL, make_hf_model, run_main
from safetensors.torch import load_file, save_file

import generate
from cli import JSON_BYTES
from engine.sampling import sample
from engine.tokenizer import load_tokenizer
from quant.calibrate import CALIBRATION_FILE, calibration_from

UNREADABLE = "/proc/self/mem"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    path = tmp_path_factory.mktemp("base") / "ckpt"
    make_hf_model().save_pretrained(path)
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    return path


@pytest.fixture
def ckpt(base, tmp_path):
    """A fresh copy of the module's checkpoint, to break."""
    return shutil.copytree(base, tmp_path / "ckpt")


@pytest.fixture
def prompt(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("In the beginning God created the heaven and the earth")
    return f


def cli(capsys, *args):
    """generate.py with these arguments: (exit status, stdout, stderr)."""
    return run_main(capsys, generate, *args)


def assert_error(result, status, message):
    code, out, err = result
    assert code == status, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], err
    assert message in lines[0], lines[0]


def edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **changes}))


def edit_weights(path, change):
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def run(capsys, path, prompt, *flags):
    return cli(capsys, "--model", path, "--prompt-file", prompt, "--device", "cpu", "--max-new-tokens", 5, *flags)


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8}},
     "rope_scaling of type llama3 needs low_freq_factor, a positive number, got null"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "unsupported rope_scaling type 'yarn'"),
    ({"rope_theta": "10000"}, 'rope_theta must be a number, got "10000"'),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number, got None"),
    ({"num_key_value_heads": "2"}, 'num_key_value_heads must be an integer, got "2"'),
    ({"tie_word_embeddings": "yes"}, 'tie_word_embeddings must be true or false, got "yes"'),
    ({"eos_token_id": [2, "x"]}, "eos_token_id must be an integer or a list of integers"),
    ({"model_type": "mistral"}, "unsupported model_type='mistral' (this engine runs Llama: 'llama')"),
    ({"sliding_window": 4096}, "unsupported sliding_window=4096"),
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architectures ['MistralForCausalLM']"),
])
def test_config_fields_are_checked_by_name(capsys, ckpt, prompt, changes, message):
    edit_config(ckpt, **changes)
    assert_error(run(capsys, ckpt, prompt), 1, f"config.json: {message}")


def test_null_bos_and_eos_generate(capsys, ckpt, prompt):
    """transformers allows them null: nothing ends generation early, every new token comes."""
    edit_config(ckpt, bos_token_id=None, eos_token_id=None)
    (ckpt / "generation_config.json").unlink()
    code, _, err = run(capsys, ckpt, prompt, "--temperature", 0)
    assert code == 0 and "new tokens: 5" in err
    code, _, err = cli(capsys, "--model", ckpt, "--prompt-tokens", 7, "--device", "cpu", "--max-new-tokens", 3)
    assert code == 0 and "prompt tokens: 7, new tokens: 3" in err


@pytest.mark.parametrize("dtype, stored", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_floating_weights_are_refused(capsys, ckpt, prompt, dtype, stored):
    edit_weights(ckpt, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(dtype)}))
    assert_error(run(capsys, ckpt, prompt), 1, f"tensor model.norm.weight is {stored}; a Llama checkpoint stores "
                                               "floating-point weights")


@pytest.mark.parametrize("value, dtype", [(float("nan"), "float32"), (float("inf"), "float32"), (1e6, "float16")])
def test_non_finite_weights_are_refused_at_load(capsys, ckpt, prompt, value, dtype):
    """NaN, inf, or a value past the range of the dtype the model runs in (1e6 in fp16)."""
    edit_weights(ckpt, lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 5), value))
    assert_error(run(capsys, ckpt, prompt, "--dtype", dtype), 1,
                 f"tensor model.layers.1.mlp.up_proj.weight holds NaN or infinite values (in {dtype})")


def test_non_finite_logits_end_generation_with_an_error(capsys, ckpt, prompt):
    """Finite weights whose attention scores overflow fp32: NaN logits, not text of NaN argmaxes."""
    def overflow(state):
        for name in ("q_proj", "k_proj"):
            state[f"model.layers.0.self_attn.{name}.weight"] *= 1e20
    edit_weights(ckpt, overflow)
    assert_error(run(capsys, ckpt, prompt, "--kv", "fp16"), 1, "the model's logits are NaN or infinite at new token 1")


def test_missing_lm_head_is_refused_unless_tied(capsys, ckpt, prompt):
    edit_weights(ckpt, lambda s: s.pop("lm_head.weight"))
    assert_error(run(capsys, ckpt, prompt), 1, "checkpoint lacks 1 tensor(s), e.g. lm_head.weight "
                                               "(tie_word_embeddings is false)")
    edit_config(ckpt, tie_word_embeddings=True)
    assert run(capsys, ckpt, prompt)[0] == 0


@pytest.mark.parametrize("name, what", [("config.json", "config.json"), ("model.safetensors", "weights file"),
                                        ("tokenizer.model", "tokenizer.model"), (CALIBRATION_FILE, "calibration file")])
def test_unreadable_checkpoint_files(capsys, ckpt, prompt, name, what):
    (ckpt / name).unlink(missing_ok=True)
    (ckpt / name).symlink_to(UNREADABLE)
    assert_error(run(capsys, ckpt, prompt), 1, f"{ckpt / name}: cannot read {what} (Input/output error)")


def test_bad_tokenizer_json(capsys, ckpt, prompt):
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").write_text('{"model": 3}')
    assert_error(run(capsys, ckpt, prompt), 1, "tokenizer.json: not a valid tokenizer.json")


def test_unreadable_and_endless_prompt_files(capsys, ckpt, tmp_path):
    link = tmp_path / "p.txt"
    link.symlink_to(UNREADABLE)
    assert_error(run(capsys, ckpt, link), 1, f"{link}: cannot read prompt file (Input/output error)")
    # Past the model's 256 tokens at 64 bytes a token: refused after reading at most that much.
    limit = SMALL["max_position_embeddings"] * generate.PROMPT_BYTES_PER_TOKEN
    message = f"prompt file is over {limit} bytes, more than a 256-token context holds (--max-context N"
    assert_error(run(capsys, ckpt, "/dev/zero"), 1, message)
    big = tmp_path / "big.txt"
    big.write_text("a" * (limit + 1))
    assert_error(run(capsys, ckpt, big), 1, message)


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999999"], "argument --seed: must be in 0 ... 2^64 - 1"),
    (["--seed", "-1"], "argument --seed: must be in 0 ... 2^64 - 1"),
    (["--prompt-tokens", "1000000000000"],
     "--prompt-tokens 1000000000000: the model's context is 256 (--max-context N for a longer one)"),
    (["--prompt-tokens", "300", "--max-context", "300"], "--prompt-tokens 300: leaves no room in a 300-token context"),
])
def test_bad_flags_exit_2(capsys, base, flags, message):
    prompt = [] if "--prompt-tokens" in flags else ["--prompt-file", "/nonexistent"]
    assert_error(cli(capsys, "--model", base, "--device", "cpu", *prompt, *flags), 2, message)


def calibration_file(capsys, path, n_layers, n_heads, head_dim):
    captured = {(layer, kind): torch.randn(16, n_heads, head_dim) for layer in range(n_layers)
                for kind in ("k_pre", "k_post", "v")}
    calibration = calibration_from(captured, n_layers, [head_dim])
    save_file({k: v.contiguous() for k, v in calibration.tensors.items()}, path / CALIBRATION_FILE,
              metadata={"settings": json.dumps(calibration.settings)})
    capsys.readouterr()  # its progress bar


@pytest.mark.parametrize("shape, kv", [((3, 4, 16), "skvq-k2v1.5"), ((2, 4, 32), "skvq-k2v1.5"),
                                       ((2, 2, 16), "svdq-k1.25v1.5")])
def test_calibration_of_another_model_is_refused(capsys, ckpt, prompt, shape, kv):
    calibration_file(capsys, ckpt, *shape)
    assert_error(run(capsys, ckpt, prompt, "--kv", kv), 1,
                 "made for {} layers of {} KV heads of head_dim {}, the model has 2 of 4 of 16".format(*shape))
    calibration_file(capsys, ckpt, 2, 4, 16)
    assert run(capsys, ckpt, prompt, "--kv", kv)[0] == 0


def test_sinks_and_window_past_the_context_hold_it_all(capsys, base, prompt):
    """--sinks or --window longer than the context: every token stays exact, as in the fp16 cache
    (the cache allocates no more sink or ring slots than the context has)."""
    common = ["--temperature", 0, "--dtype", "float32", "--max-new-tokens", 12]
    fp16 = run(capsys, base, prompt, *common, "--kv", "fp16")
    for flags in (["--sinks", 100000000000], ["--window", 100000000000]):
        code, out, err = run(capsys, base, prompt, *common, *flags)
        assert code == 0 and out == fp16[1], err


def test_stats_line_names_the_cache_dtype_and_stdout_ends_with_a_newline(capsys, base, prompt):
    code, out, err = run(capsys, base, prompt, "--kv", "fp16", "--dtype", "float32")
    assert code == 0 and out.endswith("\n")
    assert "KV cache (fp16, float32): " in err and "32.000 bits/element" in err
    # A bf16 model's cache stays fp32 on the CPU, which streams fp32 rows in C (generate.py), and says so.
    code, out, err = run(capsys, base, prompt, "--kv", "fp16", "--dtype", "bfloat16")
    assert "KV cache (fp16, float32): " in err and "32.000 bits/element" in err
    assert "note: the cache holds fp32 K/V on the CPU (the model runs in bfloat16)" in err


def test_help_shows_every_kv_default(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default smooth", "default fp8", "default 5)", "default 512)", "default hadamard)", "default rms)",
                    "default 128)", "default skvq-k2v1.5"):
        assert default in text


# -- a checkpoint is its folder --------------------------------------------------------------------

def shard(path):
    """Splits the checkpoint's model.safetensors into a.safetensors and b.safetensors with an index,
    as transformers writes a sharded checkpoint. Returns the names in each."""
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, path / file, metadata={"format": "pt"})
    write_index(path, {n: file for file, part in halves.items() for n in part})
    return halves


def write_index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("place", ["/abs", "../base/ckpt/model.safetensors", "sub/b.safetensors", "..", ""])
def test_weight_map_names_only_files_in_the_model_folder(capsys, base, ckpt, prompt, place):
    """An absolute path (another checkpoint's weights) or one that leaves the folder is refused
    before any file it names is opened."""
    halves = shard(ckpt)
    place = str(base / "model.safetensors") if place == "/abs" else place
    write_index(ckpt, {n: place if file == "b.safetensors" else file for file, part in halves.items() for n in part})
    assert_error(run(capsys, ckpt, prompt), 1, f"in {place!r}, not a file name in the model folder")


def test_sharded_checkpoint_reads_what_weight_map_places(capsys, base, ckpt, prompt, tmp_path):
    """Shards as symlinks to files elsewhere (the Hub cache's layout) load; a tensor also present in
    another shard, or in a shard the index does not place it in, is refused."""
    greedy = ["--temperature", 0, "--kv", "fp16"]
    expected = run(capsys, base, prompt, *greedy)
    halves = shard(ckpt)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for file in halves:
        (ckpt / file).rename(blobs / file)
        (ckpt / file).symlink_to(blobs / file)
    assert run(capsys, ckpt, prompt, *greedy)[:2] == expected[:2]
    a = load_file(blobs / "a.safetensors")
    moved = halves["a.safetensors"][0]
    save_file({**load_file(blobs / "b.safetensors"), moved: a[moved] * 0 + 5}, blobs / "b.safetensors")
    assert_error(run(capsys, ckpt, prompt), 1, f"b.safetensors: tensor {moved} is also in a.safetensors")
    (ckpt / "a.safetensors").unlink()  # now only in b, and weight_map places it nowhere
    save_file({k: v for k, v in a.items() if k != moved}, ckpt / "a.safetensors")
    write_index(ckpt, {n: file for file, part in halves.items() for n in part if n != moved})
    assert_error(run(capsys, ckpt, prompt), 1, f"b.safetensors: tensor {moved} is not placed in this file")
    write_index(ckpt, {n: file for file, part in halves.items() for n in part})
    assert_error(run(capsys, ckpt, prompt), 1, f"a.safetensors: lacks tensor {moved}, which the index's weight_map")


@contextlib.contextmanager
def deadline(seconds):
    """Fails the test instead of hanging on a blocking open."""
    def hang(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name, what", [("model.safetensors", "weights file"), ("config.json", "config.json"),
                                        ("tokenizer.model", "tokenizer.model"), ("c.safetensors", "weights file")])
def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(capsys, ckpt, prompt, name, what):
    if name == "c.safetensors":  # named by weight_map
        halves = shard(ckpt)
        write_index(ckpt, {n: "c.safetensors" if file == "b.safetensors" else file
                           for file, part in halves.items() for n in part})
    (ckpt / name).unlink(missing_ok=True)
    os.mkfifo(ckpt / name)
    with deadline(30):
        assert_error(run(capsys, ckpt, prompt), 1, f"{ckpt / name}: {what} is not a regular file")


def test_a_prompt_fifo_without_a_writer_reads_as_empty(capsys, ckpt, tmp_path):
    os.mkfifo(tmp_path / "prompt")
    with deadline(30):
        assert_error(run(capsys, ckpt, tmp_path / "prompt"), 1, "prompt file is empty")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_endless_or_deeply_nested_json_is_refused(capsys, ckpt, prompt, name):
    (ckpt / name).unlink(missing_ok=True)
    (ckpt / name).symlink_to("/dev/zero")  # not a regular file
    assert_error(run(capsys, ckpt, prompt), 1, f"{name} is not a regular file")
    (ckpt / name).unlink()
    (ckpt / name).write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    assert_error(run(capsys, ckpt, prompt), 1, f"{name} is nested too deeply")
    (ckpt / name).write_text(" " * (JSON_BYTES + 1))
    assert_error(run(capsys, ckpt, prompt), 1, f"{name} is over {JSON_BYTES} bytes")


def test_layer_count_is_checked_before_the_model_is_built(capsys, ckpt, prompt):
    """config.json's 100000 layers against a checkpoint of 2: refused from the headers, at once
    (building the model first took minutes)."""
    edit_config(ckpt, num_hidden_layers=100000)
    start = time.monotonic()
    assert_error(run(capsys, ckpt, prompt), 1, "checkpoint lacks 899982 tensor(s), e.g. model.layers.2.")
    assert time.monotonic() - start < 30


# -- tokenizers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, bos, eos", [({}, True, False), ({"add_bos_token": False}, False, False),
                                              ({"add_bos_token": True, "add_eos_token": True}, True, True),
                                              ({"add_bos_token": False, "add_eos_token": True}, False, True)])
def test_sentencepiece_adds_bos_and_eos_as_tokenizer_config_says(ckpt, tokenizer_path, config, bos, eos):
    import sentencepiece as spm

    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    text = "In the beginning, café"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    assert load_tokenizer(ckpt).encode(text) == [1] * bos + sp.Encode(text) + [2] * eos


def test_tokenizer_json_is_preferred_to_tokenizer_model(ckpt):
    """As transformers chooses: a tokenizer.json beside a tokenizer.model that disagrees with it."""
    from test_llama3 import build_tokenizer_json
    from transformers import AutoTokenizer

    build_tokenizer_json(ckpt)
    text = "the lord said unto moses"
    assert load_tokenizer(ckpt).encode(text) == AutoTokenizer.from_pretrained(ckpt).encode(text)


def test_sentencepiece_without_bos(capsys, ckpt, prompt, tmp_path):
    import sentencepiece as spm

    (tmp_path / "text.txt").write_text("\n".join(["the lord said unto moses and light was day"] * 100))
    spm.SentencePieceTrainer.Train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=20, bos_id=-1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    shutil.copy(tmp_path / "nobos.model", ckpt / "tokenizer.model")
    assert_error(run(capsys, ckpt, prompt), 1, "the SentencePiece model has no BOS token, and tokenizer_config.json "
                                               "does not say add_bos_token: false")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    code, out, err = run(capsys, ckpt, prompt, "--temperature", 0)
    assert code == 0 and out, err


@pytest.mark.parametrize("bos", [300, 10 ** 12, -1])
def test_bos_outside_the_vocabulary(capsys, ckpt, bos):
    (ckpt / "tokenizer.model").unlink()
    edit_config(ckpt, bos_token_id=bos)
    assert_error(cli(capsys, "--model", ckpt, "--prompt-tokens", 5, "--device", "cpu"), 1,
                 f"bos_token_id {bos} is outside the vocabulary (vocab_size 300)")


def test_tokenizer_ids_past_the_model_vocabulary(capsys, ckpt, prompt):
    """A token of id 5000 in a tokenizer.json of a few hundred: ids run to 5000, the model has 300."""
    from test_llama3 import build_tokenizer_json

    build_tokenizer_json(ckpt)
    raw = json.loads((ckpt / "tokenizer.json").read_text())
    raw["model"]["vocab"]["zzz"] = 5000
    (ckpt / "tokenizer.json").write_text(json.dumps(raw))
    assert_error(run(capsys, ckpt, prompt), 1, "tokenizer has 5001 tokens, the model only 300")


# -- flags -------------------------------------------------------------------------------------------

def test_tiny_temperatures_sample_the_largest_logit():
    """A temperature of 1e-40 (or one fp32 cannot hold) once divided the logits into inf - inf."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    for temperature in (1e-40, 1e-320):
        for top_k, top_p in ((None, 1.0), (5, 0.9)):
            ids = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
            assert ids.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "inf"], "--temperature: must be a finite number >= 0, got inf"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0, got nan"),
    (["--max-context", str(2 ** 63 - 1)], "--max-context: must be at most 2^40"),
    (["--max-context", str(10 ** 30)], "--max-context: must be at most 2^40"),
    (["--max-context", "1e30"], "--max-context: '1e30' is not an integer"),
    (["--sinks", str(10 ** 30)], "sinks must be at most 2^40"),
    (["--window", str(10 ** 30)], "window must be at most 2^40"),
    (["--kv", "svdq-k1.25v1.5", "--token-group", str(10 ** 30)], "token-group must be at most 2^40"),
])
def test_huge_or_non_finite_flags_exit_2(capsys, base, prompt, flags, message):
    assert_error(run(capsys, base, prompt, *flags), 2, message)


@pytest.mark.parametrize("module, flags, message", [
    ("decode", ["--threads", "0"], "--threads: must be positive, got 0"),
    ("decode", ["--contexts", "4096,-1"], "--contexts: must be >= 0, got -1"),
    ("decode", ["--batches", "0"], "unknown model or batch: 0"),
    ("decode", ["--steps", "-1"], "--steps: must be positive, got -1"),
    ("memory", ["--plan-gib", "-1"], "--plan-gib: must be a positive finite number, got -1"),
    ("memory", ["--plan-gib", "nan"], "--plan-gib: must be a positive finite number, got nan"),
    ("memory", ["--plan-gib", "80", "--batch", "0"], "--batch: must be positive, got 0"),
    ("memory", ["--plan-gib", "80", "--gpus", "1,0"], "--gpus: must be positive, got 0"),
])
def test_bench_flags_are_checked(capsys, module, flags, message):
    from bench import decode, memory

    main = {"decode": decode.main, "memory": memory.main}[module]
    with pytest.raises(SystemExit) as e:
        main([*flags, "--device", "cpu"] if module == "decode" else flags)
    assert e.value.code == 2
    assert_error((2, *capsys.readouterr()), 2, message)


def test_the_planner_keeps_within_ulimit_v():
    """Free memory on the CPU is MemAvailable within the address space RLIMIT_AS leaves."""
    code = ("import resource; from engine.planner import free_bytes, status_bytes; "
            "resource.setrlimit(resource.RLIMIT_AS, (status_bytes('VmSize:') + 2 ** 30, resource.RLIM_INFINITY)); "
            "print(free_bytes('cpu'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 0 < int(r.stdout) <= 2 ** 30


def test_a_token_group_past_the_context_quantizes_nothing(capsys, base, prompt):
    """SVDq blocks of 10^12 tokens: none fills, every key stays exact, the text is the fp16 cache's
    (a decode step once built indices for a whole block: 8 TB)."""
    greedy = ["--temperature", 0, "--dtype", "float32"]
    fp16 = run(capsys, base, prompt, *greedy, "--kv", "fp16")
    code, out, err = run(capsys, base, prompt, *greedy, "--kv", "svdq-k1.25v1.5", "--token-group", 10 ** 12)
    assert code == 0 and out == fp16[1], err
