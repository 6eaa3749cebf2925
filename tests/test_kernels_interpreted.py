"""The fused Triton kernels against the reference on a CPU, under Triton's interpreter: every
method option, forward and backward (skipped where Triton is not installed, as on CI's CPU wheel)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).with_name("interpreted_kernels.py")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 3e-2)])
def test_fused_kernels_equal_the_reference_under_the_interpreter(dtype, tolerance):
    run = subprocess.run([sys.executable, str(SCRIPT), dtype], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 24
    for row in rows:
        assert row["out"] < tolerance and max(row["grads"]) < tolerance, row
        assert row["same_selection"] in (None, True), row
