"""Per-kernel device time of the fused path beside the bytes `lighthouse_hf.ops.traffic` counts for
each kernel, so a slow setting shows which kernel is off its bandwidth. Needs CUDA and Triton.

    python benchmarks/profile_kernels.py                        # the grid's widest settings
    python benchmarks/profile_kernels.py --case 131072 5 2 1536 # one (S, L, p, K)
    python benchmarks/profile_kernels.py --rope span_end         # span-end RoPE (theta 10000)
    python benchmarks/profile_kernels.py --scores given --selection causal --combine mean
    python benchmarks/profile_kernels.py --heads 32 --kv-heads 8  # GQA: dk and dv sum 4 query heads

B=1, H=8 (``--heads``, ``--kv-heads`` for GQA), D=128, bf16, published options unless said
(``span_end``: the bench's frequencies; ``given``: the bench's random positive scores); 10 profiled
calls after 3 warm-up calls. "positions" is the position kernels, the forward's scatter
(`scatter_kernel`) and the gather's backward (`walk_kernel`); the gather and the scatter's backward
share `entries_kernel`; their fwd+bwd bytes are the sums.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lighthouse_hf import lighthouse_attention
from lighthouse_hf.bench import default_rope_inv_freq
from lighthouse_hf.ops.plan import plan_for
from lighthouse_hf.ops import COMBINES, ROPES, SELECTIONS
from lighthouse_hf.ops.traffic import SCORE_SOURCES, fused_traffic

WIDEST = [(131072, 3, 4, 2048), (131072, 4, 4, 1536), (262144, 4, 4, 1536), (131072, 5, 2, 1536),
          (262144, 5, 2, 2048), (131072, 5, 4, 1536), (262144, 5, 4, 1536), (131072, 4, 8, 1536),
          (131072, 5, 8, 1536)]
KERNELS = ("scores_kernel", "select_kernel", "entries_kernel", "scatter_kernel", "walk_kernel")


def kernel_ms(call) -> dict[str, float]:
    """Device ms per call of each Lighthouse kernel, of SDPA, and of everything else."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    ms: dict[str, float] = {}
    for event in prof.key_averages():
        key = next((name for name in KERNELS if name in event.key), None)
        if key is None:
            key = "sdpa" if "sdpa" in event.key or "flash" in event.key else "other"
        ms[key] = ms.get(key, 0.0) + event.device_time_total / 10 / 1000
    return ms


def profile_case(seq: int, levels: int, pooling: int, topk: int, options: dict[str, str], heads: int = 8,
                 kv_heads: int = 8) -> None:
    traffic = fused_traffic(plan_for(seq, levels, pooling, topk), batch=1, heads=heads, kv_heads=kv_heads, dim=128,
                            dtype=torch.bfloat16, **options)
    inv_freq = default_rope_inv_freq(128, "cuda") if options["rope"] == "span_end" else None
    q = torch.randn(1, heads, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    given = {}
    if options["scores"] == "given":
        given = {name: torch.rand(1, count, seq, device="cuda") + 1.0
                 for name, count in (("q_scores", heads), ("k_scores", kv_heads))}
    label = " ".join(options.values())
    for backward in (False, True):
        def call():
            out = lighthouse_attention(q, k, v, levels=levels, pooling=pooling, topk=topk, rope_inv_freq=inv_freq,
                                       selection=options["selection"], combine=options["combine"], **given)
            if backward:  # fresh gradients each call, as the bench takes them
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

        ms = kernel_ms(call)
        # the position kernels: the forward's scatter (scatter_kernel) and the gather's backward
        # (walk_kernel: dq; dk and dv), their time together against their bytes
        ms["positions"] = ms.pop("scatter_kernel", 0.0) + ms.pop("walk_kernel", 0.0)
        moved = {"scores_kernel": traffic.score_pass, "select_kernel": traffic.selection,
                 "entries_kernel": traffic.gather + (traffic.scatter_backward if backward else 0),
                 "positions": traffic.scatter + (traffic.gather_backward if backward else 0)}
        parts = [f"{name.split('_')[0]} {ms.get(name, 0.0):.3f} ms {gb / 1e9:.2f} GB "
                 f"{gb / 1e9 / max(ms.get(name, 0.0), 1e-9):.2f} TB/s" for name, gb in moved.items()]
        shape = "" if (heads, kv_heads) == (8, 8) else f" H{heads}/{kv_heads}"
        print(f"{seq // 1024}K L{levels} p{pooling} K{topk}{shape} {label} {'fwd+bwd' if backward else 'fwd'}: "
              f"sdpa {ms.get('sdpa', 0.0):.3f} other {ms.get('other', 0.0):.3f} | " + " | ".join(parts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, nargs=4, action="append", metavar=("S", "L", "P", "K"),
                        help="one setting to profile (repeatable); default: the grid's widest settings")
    parser.add_argument("--rope", choices=ROPES, default="pooled")
    parser.add_argument("--scores", choices=SCORE_SOURCES, default="norms")
    parser.add_argument("--selection", choices=SELECTIONS, default="published")
    parser.add_argument("--combine", choices=COMBINES, default="sum")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key and value heads (a divisor of --heads: GQA)")
    args = parser.parse_args()
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error(f"--kv-heads must divide --heads, both >= 1; got {args.heads} and {args.kv_heads}")
    options = dict(rope=args.rope, scores=args.scores, selection=args.selection, combine=args.combine)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA device (the fused kernels run only there)")
    for case in args.case or WIDEST:
        profile_case(*case, options, heads=args.heads, kv_heads=args.kv_heads)


if __name__ == "__main__":
    main()
