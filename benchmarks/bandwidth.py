"""The device's memory ceilings beside the one the byte floor uses: a copy (the bench prices every
byte at its rate), a store-only stream and a load-only stream, each as torch runs it and as a plain
Triton kernel does. The position kernels (the scatter and the gather's backward) move mostly writes
(2.15 of 2.46 GB at 256K L5 p2 K2048), so whether writes alone reach the copy's rate decides how
far above their floor those kernels can be made to run. Needs CUDA and Triton.

    python benchmarks/bandwidth.py                   # 1 GB per stream, median of 20
    python benchmarks/bandwidth.py --json FILE       # the rows as JSON too
    TRITON_INTERPRET=1 python benchmarks/bandwidth.py --check   # the kernels' results, on a CPU

Each row: bytes moved per call (read plus written), the median time of ``--iters`` calls (CUDA
events, after a warm-up call, as ``lighthouse-hf bench`` times) and their rate. ``.cs`` stores are
streaming stores (evict first), which a kernel that writes what nothing reads soon could use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from grid import write_atomically  # beside this file, as options.py takes it
from lighthouse_hf.bench import time_interleaved

GB = 1e9
BLOCK = 4096  # elements a program moves: 32 bf16 per thread at 4 warps, four 16-byte accesses


@triton.jit
def store_kernel(dst, n, value, BLOCK: tl.constexpr, STREAMING: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = tl.full((BLOCK,), value, tl.float32).to(dst.dtype.element_ty)
    if STREAMING:
        tl.store(dst + offsets, values, mask=offsets < n, cache_modifier=".cs")
    else:
        tl.store(dst + offsets, values, mask=offsets < n)


@triton.jit
def load_kernel(src, sums, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(src + offsets, mask=offsets < n, other=0.0)
    tl.store(sums + tl.program_id(0), tl.sum(values.to(tl.float32)))  # 4 bytes a program: the load is kept


@triton.jit
def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)


def triton_store(dst: torch.Tensor, value: float, streaming: bool = False) -> None:
    store_kernel[(triton.cdiv(dst.numel(), BLOCK),)](dst, dst.numel(), value, BLOCK=BLOCK, STREAMING=streaming)


def triton_load(src: torch.Tensor, sums: torch.Tensor) -> None:
    load_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, sums, src.numel(), BLOCK=BLOCK)


def triton_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    copy_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, dst, src.numel(), BLOCK=BLOCK)


def measure(gigabytes: float, iters: int, device: str = "cuda") -> list[dict]:
    """Every stream's row, all timed in one interleaved run (the variants take turns)."""
    elements = int(gigabytes * GB) // torch.bfloat16.itemsize
    source = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    sums = torch.empty(triton.cdiv(elements, BLOCK), dtype=torch.float32, device=device)
    size = source.nbytes
    streams = {  # name: (call, bytes moved per call)
        "copy, torch": (lambda i: target.copy_(source), 2 * size),
        "copy, Triton": (lambda i: triton_copy(source, target), 2 * size),
        "store only, torch fill_": (lambda i: target.fill_(1.0), size),
        "store only, Triton": (lambda i: triton_store(target, 1.0), size),
        "store only, Triton .cs": (lambda i: triton_store(target, 1.0, streaming=True), size),
        "load only, torch sum": (lambda i: source.sum(dtype=torch.float32), size),
        "load only, Triton": (lambda i: triton_load(source, sums), size + sums.nbytes),
    }
    timed = time_interleaved({name: call for name, (call, _) in streams.items()}, warmup=1, iters=iters,
                             input_sets=1, device=device)
    return [dict(stream=name, gb=moved / GB, ms=timed[name]["ms"], tb_per_s=moved / GB / timed[name]["ms"])
            for name, (_, moved) in streams.items()]


def check(device: str) -> None:
    """Each kernel on a small tensor whose length is no multiple of BLOCK, against torch."""
    source = torch.randn(3 * BLOCK + 5, device=device).to(torch.bfloat16)
    target = torch.zeros_like(source)
    triton_copy(source, target)
    assert torch.equal(target, source), "copy"
    for streaming in (False, True):
        target.zero_()
        triton_store(target, 1.5, streaming)
        assert torch.equal(target, torch.full_like(source, 1.5)), f"store, streaming={streaming}"
    sums = torch.empty(triton.cdiv(source.numel(), BLOCK), device=device)
    triton_load(source, sums)
    torch.testing.assert_close(sums.sum(), source.float().sum(), rtol=1e-5, atol=1e-3)
    print("bandwidth kernels: copy, store, load as torch computes them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of each stream's tensor")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--check", action="store_true", help="check the kernels' results on small tensors and stop")
    args = parser.parse_args(argv)
    if args.check:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--check without a CUDA GPU needs Triton's interpreter: set TRITON_INTERPRET=1")
        check("cuda" if torch.cuda.is_available() else "cpu")
        return 0
    if not torch.cuda.is_available():
        parser.error("timing needs a CUDA GPU (--check runs anywhere Triton does)")
    if args.gigabytes <= 0 or args.iters < 1:
        parser.error(f"--gigabytes must be > 0 and --iters >= 1, got {args.gigabytes} and {args.iters}")
    rows = measure(args.gigabytes, args.iters)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    print("| stream | GB per call | ms (median) | TB/s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['stream']} | {row['gb']:.2f} | {row['ms']:.3f} | {row['tb_per_s']:.2f} |")
    if args.json is not None:
        write_atomically(args.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
