import subprocess
import sys

import pytest
import torch

import lighthouse_hf


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_version_and_help():
    for command in (["lighthouse-hf"], [sys.executable, "-m", "lighthouse_hf"]):
        version = run(*command, "--version")
        assert version.returncode == 0 and version.stdout.strip() == f"lighthouse-hf {lighthouse_hf.__version__}"
        help_text = run(*command, "--help")
        assert help_text.returncode == 0 and "usage: lighthouse-hf" in help_text.stdout


def test_patches_live_inside_the_package():
    import lighthouse_hf.patches

    assert set(lighthouse_hf.patches.ADAPTERS) == {"llama", "qwen2", "qwen3", "mistral"}
    assert run(sys.executable, "-I", "-c", "import patches").returncode != 0


def test_bench_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA (tests/test_gpu_kernels.py runs the bench)")
    result = run("lighthouse-hf", "bench", "--seq", "4096")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
