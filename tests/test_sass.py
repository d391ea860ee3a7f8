"""Ahead-of-time compilation (bench/sass.py, no GPU needed): every kernel specialization that the
engine and bench/attention.py launch compiles for A100 (sm_80) and H100 (sm_90), and no decode
loop spills registers."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def compiled(tmp_path, *flags) -> list[dict]:
    """bench/sass.py's rows, run apart: this process interprets the kernels, that one compiles them."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    run = subprocess.run([sys.executable, "-m", "bench.sass", *flags, "--out", str(out)], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def assert_compiled_without_decode_spills(rows):
    assert [(r["target"], r["specialization"], r["error"]) for r in rows if not r["compiled"]] == []
    assert [(r["target"], r["specialization"], r["spill_bytes"]) for r in rows
            if r["compiled"] and r["decode"] and r["spill_bytes"]] == []


def assert_codes_converted_in_ptx(rows):
    """Every loop over packed codes converts them with kernels/codes.py's PTX (PRMT under the
    exponent byte, or LOP3 (code & mask) | 0x64006400) and no integer-to-float instruction."""
    packed = [r for r in rows if r["compiled"] and "ptx_conversion" in r]
    assert packed
    assert [(r["target"], r["specialization"], r["ptx_conversion"]) for r in packed
            if r["ptx_conversion"]["int_to_float"] or not (r["ptx_conversion"]["prmt_0x64"]
                                                           or r["ptx_conversion"]["lop3_and_or"])] == []


def test_representative_specializations_compile_for_a100_and_h100_and_decode_does_not_spill(tmp_path):
    rows = compiled(tmp_path, "--quick")
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    kinds = {r["specialization"].split(" G=")[0] for r in rows}
    assert {"stage1 decode", "stage1 prefill", "merge_splits"} <= kinds and any("quantize" in k for k in kinds)
    assert_compiled_without_decode_spills(rows)
    assert_codes_converted_in_ptx(rows)


@pytest.mark.slow
def test_every_specialization_compiles_for_every_target_and_decode_does_not_spill(tmp_path):
    rows = compiled(tmp_path)
    assert {r["target"] for r in rows} == {"sm_80", "sm_89", "sm_90"}
    assert_compiled_without_decode_spills(rows)
    assert_codes_converted_in_ptx(rows)
