"""Registers and spills of the gather's and scatter's kernels (``entries_kernel``,
``scatter_kernel``, ``walk_kernel``) as specialized for a setting, without a GPU: each is
compiled for sm_90 (Triton's own compiler and its bundled ptxas, as the JIT would on an H100/H200),
and ptxas ``-v`` reports registers per thread and spill bytes. Run by hand, in a Triton-enabled venv:

    python tests/kernel_registers.py            # D = 64 and 128, L3 p4 K2048 at S = 128K
    python tests/kernel_registers.py --ptx DIR  # also keep each specialization's PTX in DIR

Arguments are specialized as the JIT specializes a bf16 call: pointers and integers divisible by 16
marked so, integers equal to 1 (``entries_kernel``'s ``group`` under MHA) folded into constants. A
launch takes the registers of its heaviest level at every level (one kernel covers all levels),
which is why the table lists whole launches, not levels; it also counts barriers and shared-memory
stores (a reduction across warps). A few seconds per specialization; tests/test_kernel_registers.py uses the
same compile for what must hold.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from lighthouse_hf.ops import fused, kernels
from lighthouse_hf.ops.plan import LighthousePlan

TARGET = GPUTarget("cuda", 90, 32)


def _int_type(value: int) -> str:
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def sm90_ptx(kernel, values: dict, constexprs: dict, pointers: dict, stage: str = "ptx") -> str:
    """The PTX (or another ``stage`` of the compiler, e.g. ``"ttgir"``) of ``kernel`` for sm_90, 4
    warps, specialized as the JIT specializes a launch with these arguments: ``pointers`` (name:
    type) and integers divisible by 16 marked so, integers equal to 1 folded into constants."""
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif values[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = _int_type(values[name])
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=4)).asm[stage]


def _check_dim(dim: int) -> None:
    if dim & (dim - 1):
        raise ValueError(f"dim must be a power of two (the kernel's BLOCK_D), got {dim}")


def entries_ptx(plan: LighthousePlan, heads: int, dim: int, *, rope: bool, shifted: bool, means_width: int,
                mean: bool = False) -> str:
    """The PTX of the ``entries_kernel`` launch that ``fused._run_entries`` makes for bf16 q, k, v of
    shape [1, heads, S, dim] (MHA) under ``plan``, reading the score pass's means of ``means_width``
    positions (0: none); ``dim`` a power of two."""
    _check_dim(dim)
    stride_s, stride_h = dim, plan.seq_len * dim
    selected_len = (plan.levels - 1) * plan.pooling * plan.topk + plan.n_coarse_padded
    values = dict(heads=heads, group=1, seq_len=plan.seq_len, dim=dim, selected_len=selected_len,
                  coarse_len=plan.n_coarse_padded, real_len=plan.real_len,
                  means_len=fused.score_means_rows(plan, means_width) if means_width else 0)
    for name in "qkv":
        values.update({f"{name}_stride_b": heads * stride_h, f"{name}_stride_h": stride_h,
                       f"{name}_stride_s": stride_s})
    constexprs = dict(LEVELS=plan.levels, POOL=plan.pooling, TOPK=plan.topk, SHIFTED=shifted, WITH_KV=not shifted,
                      MEANS_WIDTH=means_width, BLOCK_D=dim, ROPE_HALF=dim // 2 if rope else 0, MEAN=mean,
                      PADDED=fused._mostly_padding(plan))
    pointers = dict(src_q="*bf16", src_k="*bf16", src_v="*bf16", dst_q="*bf16", dst_k="*bf16", dst_v="*bf16",
                    entry_local="*i32", entry_row="*i32",
                    means="*bf16" if means_width in (0, plan.coarse_width) else "*fp32", rotary="*fp32" if rope else "*bf16",
                    counts="*fp32" if mean else "*bf16")
    return sm90_ptx(kernels.entries_kernel, values, constexprs, pointers)


def scatter_ptx(plan: LighthousePlan, dim: int, *, mean: bool = False, stage: str = "ptx") -> str:
    """The PTX (or ``stage``) of a ``scatter_kernel`` launch as ``fused._run_scatter`` makes it for
    bf16 rows under ``plan``; ``dim`` a power of two."""
    _check_dim(dim)
    values = dict(seq_len=plan.seq_len, dim=dim, selected_len=plan.compressed_len, real_len=plan.real_len,
                  inverse_len=plan.seq_len)
    block_p = fused._positions_per_program(dim, fused._SCATTER_BLOCK_ELEMENTS)
    constexprs = dict(LEVELS=plan.levels, POOL=plan.pooling, BLOCK_P=block_p, BLOCK_D=dim, MEAN=mean,
                      SKIP_FINER=fused._skips_finer_levels(plan, block_p))
    pointers = dict(src="*bf16", dst="*bf16", inverse="*i32", counts="*fp32" if mean else "*i32")
    return sm90_ptx(kernels.scatter_kernel, values, constexprs, pointers, stage)


def walk_ptx(plan: LighthousePlan, dim: int, *, turn: bool, two: bool, group: int = 1, rows: int | None = None) -> str:
    """The PTX of a ``walk_kernel`` launch as ``fused._run_walk`` makes it for bf16 rows of ``group``
    query heads per output head (1: MHA) under ``plan``: ``turn`` span-end RoPE's, ``two`` dk and dv
    (``rows``: spans a program, if not the launch's); ``dim`` a power of two."""
    _check_dim(dim)
    values = dict(seq_len=plan.seq_len, dim=dim, selected_len=plan.compressed_len, padded_len=plan.padded_len,
                  inverse_len=plan.seq_len)
    half, even = fused.walked_halves(dim)
    constexprs = dict(GROUP=group, LEVELS=plan.levels, POOL=plan.pooling, SPAN_LEVEL=fused._walked_span_level(plan, group),
                      ROWS=rows or fused._WALKED_ROWS, HALF=half, EVEN=even, TURN=turn, TWO=two)
    pointers = dict(src_a="*bf16", src_b="*bf16", dst_a="*bf16", dst_b="*bf16", inverse="*i32",
                    rotary="*fp32" if turn else "*i32")
    return sm90_ptx(kernels.walk_kernel, values, constexprs, pointers)


def scores_ptx(plan: LighthousePlan, heads: int, dim: int, *, given: bool, causal: bool, rope: bool = False) -> str:
    """The PTX of ``scores_kernel`` for bf16 q and k (``given``: float32 level-0 scores instead, as
    Qwen3's pre-norm scores; ``rope``: span-end RoPE) of shape [1, heads, S, dim] under ``plan``, as
    ``fused._score_pyramids`` launches it."""
    _check_dim(dim)
    block_p = fused._positions_per_program(dim, fused._SCORE_BLOCK_ELEMENTS)
    means_width = fused.score_pass_means_width(torch.bfloat16, dim, plan, given_scores=given, span_end_rope=rope)
    seq = plan.seq_len
    strides = (heads * seq, seq, 1) if given else (heads * seq * dim, seq * dim, dim)
    values = dict(heads_q=heads, heads_k=heads, dim=dim, seq_len=seq, real_len=plan.real_len, padded_len=plan.padded_len,
                  score_stride=plan.padded_len // plan.pooling,
                  means_len=fused.score_means_rows(plan, means_width) if means_width else 0,
                  q_stride_b=strides[0], q_stride_h=strides[1], q_stride_s=strides[2],
                  k_stride_b=strides[0], k_stride_h=strides[1], k_stride_s=strides[2])
    constexprs = dict(LEVELS=plan.levels, POOL=plan.pooling, MEANS_WIDTH=means_width, CAUSAL=causal, BLOCK_P=block_p,
                      BLOCK_D=dim, PASS_LEVELS=fused._score_pass_levels(torch.bfloat16, dim, plan), GIVEN=given,
                      ROPE_HALF=dim // 2 if rope and means_width else 0)
    source = "*fp32" if given else "*bf16"
    means = "*fp32" if means_width and means_width != plan.coarse_width else "*bf16"  # fused._score_means's dtype
    pointers = dict(src_q=source, src_k=source, scores="*fp32", means=means, rotary="*fp32")
    return sm90_ptx(kernels.scores_kernel, values, constexprs, pointers)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill stores + loads in bytes) that Triton's ptxas reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        command = [triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(src),
                   "-o", str(src.with_suffix(".o"))]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def cross_thread_traffic(ptx: str) -> dict[str, int]:
    """Barriers and shared-memory stores in ``ptx``: what a reduction across warps (or a layout
    conversion) costs inside a program."""
    return {name: len(re.findall(rf"\b{re.escape(name)}\b", ptx)) for name in ("bar.sync", "st.shared")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seq", type=int, default=128 * 1024)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ptx", type=pathlib.Path, help="folder to keep each specialization's PTX in")
    args = parser.parse_args()
    if any(dim < 1 or dim & (dim - 1) for dim in args.dims):
        parser.error(f"--dims: each must be a power of two (the kernel's BLOCK_D), got {args.dims}")
    plan = LighthousePlan(args.seq, args.levels, args.pooling, args.topk)
    variants = [
        ("pooled gather", dict(rope=False, shifted=False)),  # with the score pass's means, as at this D
        ("span_end gather", dict(rope=True, shifted=False)),  # with span-end means where they are the coarsest
        ("scatter backward (SHIFTED)", dict(rope=False, shifted=True, means_width=0)),
        ("scatter backward, combine=mean", dict(rope=False, shifted=True, means_width=0, mean=True)),
    ]
    print(f"entries_kernel, bf16, sm_90, 4 warps, L{args.levels} p{args.pooling} K{args.topk}, S={args.seq}")
    print("| variant | D | registers | spill bytes | bar.sync | st.shared |")
    print("|---|---|---|---|---|---|")
    if args.ptx is not None:
        args.ptx.mkdir(parents=True, exist_ok=True)
    for dim in args.dims:
        for name, options in variants:
            means_width = fused.score_pass_means_width(torch.bfloat16, dim, plan, span_end_rope=options["rope"])
            options = {"means_width": means_width, **options}
            ptx = entries_ptx(plan, args.heads, dim, **options)
            if args.ptx is not None:
                (args.ptx / f"{re.sub(r'[^a-z0-9]+', '_', name).strip('_')}_d{dim}.ptx").write_text(ptx)
            regs, spills = ptxas_usage(ptx)
            traffic = cross_thread_traffic(ptx)
            print(f"| {name} | {dim} | {regs} | {spills} | {traffic['bar.sync']} | {traffic['st.shared']} |",
                  flush=True)
    print("\nscatter_kernel, same setting (ld.global: load instructions in the PTX, each counted once)")
    print("| launch | D | positions a program | registers | spill bytes | ld.global | bar.sync | st.shared |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for name, mean in (("scatter", False), ("scatter, combine=mean", True)):
            ptx = scatter_ptx(plan, dim, mean=mean)
            if args.ptx is not None:
                (args.ptx / f"{re.sub(r'[^a-z0-9]+', '_', name).strip('_')}_d{dim}.ptx").write_text(ptx)
            regs, spills = ptxas_usage(ptx)
            traffic = cross_thread_traffic(ptx)
            loads = len(re.findall(r"\bld\.global", ptx))
            block_p = fused._positions_per_program(dim, fused._SCATTER_BLOCK_ELEMENTS)
            print(f"| {name} | {dim} | {block_p} | {regs} | {spills} | {loads} | {traffic['bar.sync']} | "
                  f"{traffic['st.shared']} |", flush=True)
    print(f"\nwalk_kernel (the gather's backward), same setting: {fused._WALKED_ROWS} spans of "
          f"{args.pooling ** fused._walked_span_level(plan, 1)} positions a program "
          f"(4 query heads a KV head: {args.pooling ** fused._walked_span_level(plan, 4)})")
    print("| output | D | registers | spill bytes | ld.global | bar.sync | st.shared |")
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for name, options in (("dq; span-end dv", dict(turn=False, two=False)), ("dk+dv", dict(turn=False, two=True)),
                              ("dk+dv, 4 query heads a KV head", dict(turn=False, two=True, group=4)),
                              ("span-end dq or dk", dict(turn=True, two=False)),
                              ("span-end dk, 4 query heads a KV head", dict(turn=True, two=False, group=4)),
                              ("span-end dv, 4 query heads a KV head", dict(turn=False, two=False, group=4))):
            ptx = walk_ptx(plan, dim, **options)
            regs, spills = ptxas_usage(ptx)
            traffic = cross_thread_traffic(ptx)
            loads = len(re.findall(r"\bld\.global", ptx))
            print(f"| {name} | {dim} | {regs} | {spills} | {loads} | {traffic['bar.sync']} | {traffic['st.shared']} |",
                  flush=True)


if __name__ == "__main__":
    main()
