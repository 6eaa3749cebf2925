"""benchmarks/bandwidth.py: its kernels move what torch would (under Triton's interpreter on a CPU), and
on a GPU every stream gets a row."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bandwidth.py"
sys.path.insert(0, str(SCRIPT.parent))  # bandwidth.py imports grid.py beside it, as when run as a script


def test_the_kernels_copy_store_and_load_as_torch_does():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bandwidth kernels: copy, store, load as torch computes them" in run.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_stream_is_timed_on_the_gpu():
    spec = importlib.util.spec_from_file_location("bandwidth", SCRIPT)
    bandwidth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bandwidth)
    rows = bandwidth.measure(gigabytes=0.25, iters=3)
    assert [row["stream"] for row in rows] == ["copy, torch", "copy, Triton", "store only, torch fill_",
                                               "store only, Triton", "store only, Triton .cs", "load only, torch sum",
                                               "load only, Triton"]
    assert all(row["ms"] > 0 and row["tb_per_s"] > 0 for row in rows)
