"""quant.calibrate: the vectorised clip search, what it calibrates by default, and its refusals
(bad flags exit 2 and short texts, unwritable outputs exit 1, all before the model loads)."""
import os
import shutil

import pytest
import torch
from conftest import make_hf_model, run_main

import quant.calibrate
from quant import kvspec
from quant.calibrate import (
    BITS,
    CLIPS,
    MIN_TOKENS,
    Calibration,
    make_groups,
    quantizers_for,
    search_clip,
)
from quant.skvq import TokenQuantizer, smoothing_factors

TEXT = "the lord said unto moses and the light was day and night in the beginning "


def calibrate(capsys, *argv):
    status, _, err = run_main(capsys, quant.calibrate, *argv)
    return status, err


@pytest.fixture(scope="module")
def head_dim_64(tmp_path_factory, tokenizer_path):
    """A one-layer checkpoint of head_dim 64 (the default cache's group size is then 64)."""
    path = tmp_path_factory.mktemp("hd64") / "ckpt"
    make_hf_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  num_hidden_layers=1).save_pretrained(path)
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    return path


@pytest.fixture
def unloadable(head_dim_64, tmp_path):
    """The checkpoint with weights that cannot load: an error about them means the model was loaded."""
    path = shutil.copytree(head_dim_64, tmp_path / "unloadable")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    return path


@pytest.mark.parametrize("grouping", ["equal", "kmeans", "smooth"])
def test_vectorised_clip_search_picks_the_loops_clip(grouping):
    """Every candidate at once picks what quantizing at each candidate in turn picks."""
    x = torch.randn(200, 2, 32) * torch.rand(2, 32) * 4 + torch.randn(2, 32)
    x[:, :, 3] *= 12  # an outlier channel, as real keys have
    groups = make_groups(grouping, x, 16)
    smoothing = smoothing_factors(x.abs().amax(0)) if grouping == "smooth" else None
    for bits in BITS:
        errors = []
        for clip in CLIPS:  # the search as a plain loop: quantize, dequantize, mean squared error
            x_hat = TokenQuantizer(bits, groups, clip, smoothing=smoothing).fake_quantize(x)
            errors.append((x_hat - x).pow(2).mean().item())
        assert search_clip(x, bits, groups, smoothing) == CLIPS[errors.index(min(errors))], bits


def test_default_calibrates_the_default_cache_and_flags_search_more(capsys, head_dim_64, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 60)
    out = tmp_path / "calibration.safetensors"
    code, err = calibrate(capsys, "--model", head_dim_64, "--text", text, "--out", out, "--seq-len", 300)
    assert code == 0, err
    calibration = Calibration.load(out)
    assert calibration.settings["groupings"] == [kvspec.DEFAULT.grouping] and calibration.settings["group_sizes"] == [64]
    assert calibration.settings["sinks"] == kvspec.DEFAULT.sinks
    # The default (rotated, rms) takes nothing from it; its unrotated min-max twin takes all.
    assert_calibrated(kvspec.DEFAULT.with_settings(rotation="none", scaling="minmax"), calibration)
    code, err = calibrate(capsys, "--model", head_dim_64, "--text", text, "--out", out, "--seq-len", 300,
                          "--groupings", "kmeans,equal", "--group-sizes", "32", "--kv", "skvq-k2v1.5:sinks=2:window=16")
    assert code == 0, err
    calibration = Calibration.load(out)
    assert calibration.settings["groupings"] == ["kmeans", "equal"] and calibration.settings["group_sizes"] == [32]
    assert calibration.settings["sinks"] == 2
    assert_calibrated(kvspec.parse("skvq-k2v1.5:grouping=kmeans:group-size=32"), calibration)


def assert_calibrated(spec, calibration):
    """The engine's cache `spec` takes its quantizers from the calibration, clip factors searched."""
    keys, values = quantizers_for(spec, 1, 1, 64, calibration)
    assert min(abs(keys[0].clip - clip) for clip in CLIPS) < 1e-6
    assert (keys[0].smoothing is not None) == (spec.grouping == "smooth")
    assert keys[0].groups.n_groups == 64 // spec.channel_group(64)


@pytest.mark.parametrize("words", [0, 1, 14, 40])
def test_a_text_too_short_is_refused_before_the_model_loads(capsys, unloadable, tmp_path, words):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXT.split()[i % 15] for i in range(words)))
    code, err = calibrate(capsys, "--model", unloadable, "--text", text)
    needed = kvspec.DEFAULT.sinks + kvspec.DEFAULT.window + MIN_TOKENS
    assert code == 1 and err.count("\n") == 1 and f"too few to calibrate: it takes {needed}" in err, err
    assert not (unloadable / "kv_calibration.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "-1"], "argument --seq-len: must be positive, got -1"),
    (["--tokens", "0"], "argument --tokens: must be positive, got 0"),
    (["--kv", "skvq-k9v2"], "argument --kv: skvq takes key bits"),
    (["--kv", "fp16"], "argument --kv: fp16 reads no calibration"),
    (["--groupings", "smooth,bogus"], "argument --groupings: unknown bogus"),
    (["--group-sizes", "32,x"], "argument --group-sizes: '32,x': expected comma-separated integers"),
    (["--group-sizes", "3"], "argument --group-sizes: 3: each must be positive and even"),
])
def test_bad_flags_exit_2_before_anything_loads(capsys, flags, message):
    code, err = calibrate(capsys, "--model", "/nonexistent", "--text", "/nonexistent", *flags)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_flags_the_model_cannot_take_exit_2_before_its_weights_load(capsys, unloadable):
    code, err = calibrate(capsys, "--model", unloadable, "--text", "/nonexistent", "--group-sizes", "48")
    assert code == 2 and "--group-sizes 48: each must divide head_dim 64" in err, err
    code, err = calibrate(capsys, "--model", unloadable, "--text", "/nonexistent", "--kv", "skvq-k2v1.5:group-size=48")
    assert code == 2 and "group-size 48 must divide head_dim 64" in err, err


def test_an_unwritable_output_is_refused_before_any_work(capsys, unloadable, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 60)
    if os.geteuid() == 0:  # root writes through permission bits: a read-only filesystem stops it
        out = "/sys/kv_calibration.safetensors"
    else:
        os.chmod(unloadable, 0o555)
        out = unloadable / "kv_calibration.safetensors"
    code, err = calibrate(capsys, "--model", unloadable, "--text", text, "--out", out)
    assert code == 1 and err.count("\n") == 1 and "cannot write the calibration there" in err, err
    code, err = calibrate(capsys, "--model", unloadable, "--text", text, "--out", tmp_path)
    assert code == 1 and "would replace a directory" in err, err
