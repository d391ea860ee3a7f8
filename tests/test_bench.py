"""The benchmarks' harness, on tiny shapes: each runs, checks its kernels against the reference
before timing them, and records what a result needs (device, versions, commit, command)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_attention_benchmark_smoke_run(tmp_path):
    settings = "sdpa-fp16,fp16,skvq-k2v1.5:window=128,svdq-k1.25v1.5"
    r = subprocess.run([sys.executable, "-m", "bench.attention", "--smoke", "--settings", settings,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "attention-smoke.json").read_text())
    assert {"device", "torch", "triton", "commit", "command", "copy_bandwidth_gb_per_s"} <= result.keys()
    rows = result["rows"]
    assert [row["setting"] for row in rows] == settings.split(",")
    for row in rows:
        assert row["rel_error"] < 1e-2 and row["ms"] > 0 and row["bytes"] > 0
    # Packed history reads fewer bytes than the fp16 cache of the same context.
    assert rows[3]["bytes"] < rows[1]["bytes"] == rows[0]["bytes"] and rows[2]["bytes"] < rows[1]["bytes"]
    assert "| tiny-gqa | 400 | 2 | skvq-k2v1.5:window=128 |" in r.stdout


def test_decode_benchmark_smoke_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.decode", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "decode-smoke.json").read_text())
    assert result["weights"] == "random" and result["history"].startswith("synthetic")
    assert [row["kv"] for row in result["rows"]] == ["fp16", "skvq-k2v1.5", "skvq-k4v4", "svdq-k1.25v1.5:token-group=32"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["bytes_per_step"] > 0 and row["context"] == 600
    # The quantized caches read fewer bytes per step than the fp16 cache at the same context.
    fp16, *quantized = [row["bytes_per_step"] for row in result["rows"]]
    assert all(b < fp16 for b in quantized)


def test_cpu_decode_table_smoke_run(tmp_path):
    """The CPU table on a short context: every cell measured, the table written between its markers."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# before\n")
    r = subprocess.run([sys.executable, "-m", "bench.decode", "--device", "cpu", "--contexts", "300", "--steps", "1",
                        "--out", str(tmp_path), "--results-md", str(results)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads(next(tmp_path.glob("decode-cpu-*.json")).read_text())
    assert result["read_bandwidth_gb_per_s"] > 0 and result["model"] == "kjv-tiny"
    cells = {(row["kv"], row["path"]) for row in result["rows"]}
    assert cells == {(kv, path) for kv in ["fp16", "skvq-k2v1.5", "svdq-k1.25v1.5"] for path in ["reference", "streaming"]} \
        | {("DynamicCache", "sdpa"), ("QuantizedCache", "sdpa")}
    assert all(row["step_ms"] > 0 and row["context"] == 300 for row in result["rows"])
    assert all(row["threads"] == 2 and row["load_average"] >= 0 for row in result["rows"])
    text = results.read_text()
    assert text.startswith("# before\n") and "| 2 | 300 |" in text and "<!-- end of cpu decode table, kjv-tiny -->" in text
    assert "llama.cpp: not timed (no --llama-cpp" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--baselines", "reference,tea"], "--baselines: unknown tea"),
    (["--model", "no-such-dir"], "--model: no-such-dir holds no config.json"),
    (["--threads", "0"], "--threads: must be positive, got 0"),
    (["--gguf", "x.gguf"], "--gguf: llama.cpp is timed only with --llama-cpp PYTHON"),
    (["--llama-cpp", sys.executable], "--llama-cpp: give its model files with --gguf"),
    (["--llama-cpp", sys.executable, "--gguf", "no-such.gguf"], "--gguf: no such file: no-such.gguf"),
    (["--llama-cpp", sys.executable, "--gguf", __file__], "is not a Python that imports llama_cpp"),
])
def test_cpu_table_refuses_bad_flags(flags, message):
    """One error line, exit status 2, before any model loads."""
    r = subprocess.run([sys.executable, "-m", "bench.decode", "--device", "cpu", *flags],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "error:" in r.stderr.strip().splitlines()[-1]
