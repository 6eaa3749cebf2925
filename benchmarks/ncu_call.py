"""One Lighthouse fwd+bwd call for Nsight Compute, after two warm-up calls, inside
``torch.cuda.profiler.start()``/``stop()`` so that ``--profile-from-start off`` sees only its
kernels. B=1, H=8, D=128, bf16; published options unless ``--rope span_end`` (the bench's
frequencies). Needs CUDA and Triton.

    ncu --clock-control none --profile-from-start off \\
        -k regex:"entries_kernel|scatter_kernel|walk_kernel|scores_kernel" \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        python benchmarks/ncu_call.py 262144 5 4 2048
"""

from __future__ import annotations

import argparse

import torch

from lighthouse_hf import lighthouse_attention
from lighthouse_hf.bench import default_rope_inv_freq
from lighthouse_hf.ops import ROPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("seq", "levels", "pooling", "topk"):
        parser.add_argument(name, type=int)
    parser.add_argument("--rope", choices=ROPES, default="pooled")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_call.py needs a CUDA device (the fused kernels run only there)")
    inv_freq = default_rope_inv_freq(128, "cuda") if args.rope == "span_end" else None
    q, k, v = (torch.randn(1, 8, args.seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def call():
        out = lighthouse_attention(q, k, v, levels=args.levels, pooling=args.pooling, topk=args.topk,
                                   rope_inv_freq=inv_freq)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
