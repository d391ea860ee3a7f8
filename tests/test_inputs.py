"""Every bad input ends with one `error:` line naming the file or flag and the reason: exit 1 for a
bad file, 2 for a bad flag. generate.py runs in this process (parse_args, then main under
cli.run_cli, as its __main__ does) to keep the many cases fast; tests/test_cli.py runs it as a
subprocess. Unreadable files are links to /proc/self/mem, which no one (root included) can read
at offset 0."""
import json
import shutil

import pytest
import torch
from conftest import SMALL, make_hf_model
from safetensors.torch import load_file, save_file

import generate
from cli import run_cli
from quant.calibrate import (
    CALIBRATION_FILE,
    calibration_from,
    default_group_sizes,
    load_calibration,
)
from quant.calibrate import main as calibrate_main

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
    try:
        args = generate.parse_args([str(a) for a in args])
        run_cli(lambda: generate.main(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


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
    code, out, err = run(capsys, base, prompt, "--kv", "fp16", "--dtype", "bfloat16")
    assert "KV cache (fp16, bfloat16): " in err and "16.000 bits/element" in err


def test_help_shows_every_kv_default(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default smooth", "default fp8", "default 5)", "default 512)", "default hadamard)", "default rms)",
                    "default 128)", "default skvq-k2v1.5"):
        assert default in text


def test_calibrate_adapts_its_group_sizes_to_head_dim(capsys, tmp_path, tokenizer_path):
    assert default_group_sizes(128) == [32, 64, 128] and default_group_sizes(64) == [32, 64]
    assert default_group_sizes(80) == [80]
    path = tmp_path / "hd64"
    make_hf_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  num_hidden_layers=1, bos_token_id=None).save_pretrained(path)  # calibration needs no BOS
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    text = tmp_path / "text.txt"
    text.write_text("the lord said unto moses and the light was day " * 40)
    run_cli(lambda: calibrate_main(["--model", str(path), "--text", str(text), "--tokens", "128", "--seq-len", "64"]))
    assert load_calibration(path).settings["group_sizes"] == [32, 64]
