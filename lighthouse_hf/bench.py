"""``lighthouse-hf bench``: Lighthouse against dense SDPA and SDPA on the compressed sequence.

Operator mode (default): for each sequence length and setting, medians over CUDA-event timings
(after warm-up, rotating through several independently drawn input sets so no run reuses the
last one's cache, the variants taking turns) of

* ``dense``: causal SDPA over all S positions, cuDNN backend where it runs (K/V expanded to the
  query heads beforehand, outside the timed region, so every backend sees plain MHA);
* ``lighthouse``: the public ``lighthouse_attention`` (the fused path on CUDA);
* ``sdpa_sel``: causal SDPA alone on random [B, H, S_sel, D] tensors, once with the cuDNN backend
  and once with the backend Lighthouse uses inside (``compressed_attention``);

forward+backward and forward only, the ratios, and each variant's peak allocated memory over one
call (inputs, outputs and gradients included). A row's ratio also comes with its range over the
rounds in which the variants took turns (``ratio_rounds``: each round's median against the other
variant's in the same round; with n rounds it holds the median of the round ratios with probability
``1 - 2**(1 - n)``, e.g. ``--iters 18 --input-sets 3``: 6 rounds, 97%; the row's ratio itself is of
the pooled medians, close to it but not the same statistic). It holds the spread within a row only;
rows of one run have differed by more. Each row also gives the floor of the fused
path's kernels: the bytes they move around SDPA (``kernel_gb``, from ``lighthouse_hf.ops.traffic``:
the forward's, or the forward's and the backward's) at the device-to-device copy bandwidth
measured at the start of the run (``copy_tb_per_s``), added to SDPA(S_sel)'s cuDNN time
(``floor_ms``, ``floor_ratio``): how close these kernels could come, so a ratio above its target
says whether the bytes or the kernels are why. Settings that do not compress are skipped (the op
runs dense SDPA there). Times are per call with calls queued back to back, as in training, where
the host runs ahead of the GPU; ``latency`` is one call from an idle GPU, which adds the host's
time before the first kernel (the ratios use the former). ``--e2e`` instead
times whole bf16 training steps (gradient checkpointing, AdamW) of a 30-layer Llama with hidden
1024 under ``sdpa`` and ``lighthouse`` attention and reports tokens per second. ``--layer`` times
one Llama decoder layer (hidden ``--heads`` x ``--dim``, MLP 1.5x hidden, bf16) under ``sdpa`` and
``lighthouse`` attention, forward+backward and forward only: per call queued back to back (``ms``)
and from an idle GPU (``latency_ms``). Their difference is the host time the GPU waited for; a
Lighthouse layer whose difference is no larger than the SDPA layer's is device-bound. Its table
(and the JSON of the operator and packed modes) also reports ``host_ms``, the host's own time for a
queued call (Python, ATen and launches), which bounds the host time before a call's first kernel
from above.

Method options (``--rope``, ``--scores``, ``--selection``, ``--combine``; README, "Method options")
are swept like the settings, every combination a row. ``span_end`` passes default RoPE
frequencies (theta 10000) over the whole head; ``given`` scores are random positive level-0
scores drawn with each input set, outside the timed region. The compressed length does not depend
on the options, so neither do the SDPA(S_sel) baselines. ``--e2e`` takes the first value of each
setting and option (its Llama has no per-head q/k norm, so its scores are the norms).

Packed mode (``--packed LENGTH ...`` or ``--packed-longtail TOTAL``): each row of the batch packs
documents of those lengths (or of lengths drawn from the long-tailed distribution below, until
the row holds TOTAL tokens; the last one cut to fit), and the rows are timed as

* ``lighthouse``: ``lighthouse_attention_varlen``, Lighthouse on each document alone (documents
  too short to compress run dense);
* ``sdpa_sel``: what that leaves when pooling, selection, gathering and scattering cost nothing:
  dense causal attention per document over each compressed document's compressed length and each
  other document's own length (the per-document compressed attention alone);
* ``dense_documents``: document-masked dense attention (``dense_causal_attention_varlen``: one
  varlen flash call on CUDA in half precision);
* ``lighthouse_unpacked``: ``lighthouse_attention`` on one sequence of the row's whole length,
  documents not kept apart.

The long-tailed distribution (``--packed-longtail``), a long-context pre-training mixture by
token share: half of each row's tokens are long documents (lengths log-normal, median 32768
tokens, sigma 1.0: books, code repositories), the other half short ones (log-normal, median 1024,
sigma 1.5: web pages; mean about 3.1K, one in 40 longer than 18K); every document at least 16
tokens, the last of each half cut to fit, the documents of a row shuffled; row ``r`` drawn with
seed ``--packed-seed + r``. The bench prints what it drew (documents, the longest, how many the
settings compress and their share of the tokens).

Packed mode also runs on the CPU (times with the host clock; no memory figures) for small sizes.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .ops import (
    Documents,
    compressed_attention,
    compressed_length,
    dense_causal_attention_varlen,
    lighthouse_attention,
    lighthouse_attention_varlen,
    plan_for,
    runs_lighthouse,
)
from .ops.traffic import fused_traffic
from .rotary import rope_inv_freq

GB = 1e9


def run(args: argparse.Namespace) -> int:
    packed_mode = args.packed is not None or args.packed_longtail is not None
    mode = "e2e" if args.e2e else "layer" if args.layer else "operators"
    if packed_mode:
        if mode != "operators":
            print(f"lighthouse-hf bench: --packed and --packed-longtail time the operator; leave out --{mode}",
                  file=sys.stderr)
            return 2
        swept = [f"--{name}" for name in ("rope", "scores", "selection", "combine") if len(getattr(args, name)) > 1]
        if swept:
            print(f"lighthouse-hf bench: packed mode times one value of each method option; give one to {', '.join(swept)}",
                  file=sys.stderr)
            return 2
        return _run_packed(args)
    if args.e2e and args.layer:
        print("lighthouse-hf bench: --e2e and --layer are two modes; give one", file=sys.stderr)
        return 2
    if mode != "operators" and "given" in args.scores:
        print(f"lighthouse-hf bench: --scores given is for operator mode; the --{mode} Llama scores the norms of q and k",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("lighthouse-hf bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {"e2e": _e2e, "layer": decoder_layers, "operators": operators}[mode](args)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"device: {report['device']}, torch {report['torch']}")
        {"e2e": _print_e2e, "layer": _print_layers, "operators": _print_operators}[mode](results)
    return 0


@contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


class _HostTimer:
    """A stand-in for ``torch.cuda.Event`` on the CPU: the host clock, the ops being synchronous there."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: "_HostTimer") -> float:
        return (end.at - self.at) * 1e3


def time_interleaved(
    steps: dict[str, Callable[[int], object]], *, warmup: int, iters: int, input_sets: int, device: str = "cuda"
) -> dict:
    """Median milliseconds per call of each ``steps[name](i)``, input set ``i`` rotating.

    The variants take turns, one round each at a time, so clock and temperature drift reach all of
    them alike. A round starts from an idle GPU: the first call's time (``latency_ms``) includes
    the host's work before its first kernel; while it runs, the host queues ``input_sets`` more
    calls back to back, as a training loop does, and their times (``ms``) are device time per
    call. ``iters`` such calls per variant are taken; ``round_ms`` holds each round's median of them.
    ``host_ms``: the host clock around the first
    queued call of each round, while the GPU runs the call from idle and CUDA's launch queue is
    short, so launches return at once: the call's Python, ATen and launch work (a call that
    synchronizes would show its device time). A variant whose ``host_ms`` is below its ``ms``
    keeps the GPU busy when calls are queued.
    """
    cuda = device == "cuda"
    event = torch.cuda.Event if cuda else _HostTimer
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    for name, step in steps.items():
        for i in range(warmup):
            step(i % input_sets)
    times = {name: [] for name in steps}
    rounds = {name: [] for name in steps}
    latencies = {name: [] for name in steps}
    host_times = {name: [] for name in steps}
    for _ in range(-(-iters // input_sets)):
        for name, step in steps.items():
            synchronize()
            events = []
            for i in range(input_sets + 1):
                start, stop = event(enable_timing=True), event(enable_timing=True)
                start.record()
                begun = time.perf_counter()
                step(i % input_sets)
                if i == 1:
                    host_times[name].append((time.perf_counter() - begun) * 1e3)
                stop.record()
                events.append((start, stop))
            synchronize()
            latencies[name].append(events[0][0].elapsed_time(events[0][1]))
            queued = [start.elapsed_time(stop) for start, stop in events[1:]]
            times[name].extend(queued)
            rounds[name].append(statistics.median(queued))
    return {name: {"ms": statistics.median(times[name]), "latency_ms": statistics.median(latencies[name]),
                   "host_ms": statistics.median(host_times[name]), "round_ms": rounds[name]} for name in steps}


def ratio_over_rounds(numerator: list[float], denominator: list[float]) -> dict | None:
    """The range of the per-round ratios of two variants timed in the same rounds (``round_ms``):
    a distribution-free interval for the median round ratio, which misses it only when every round
    falls on one side, so its coverage is ``1 - 2**(1 - rounds)`` (75% at 3 rounds, 94% at 5, 97%
    at 6). None below two rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"round counts differ: {len(numerator)} and {len(denominator)}")
    if len(numerator) < 2:
        return None
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return {"low": min(ratios), "high": max(ratios), "rounds": len(ratios), "coverage": 1 - 2.0 ** (1 - len(ratios))}


def peak_memory(fn: Callable[[int], object], make_inputs: Callable[[], object]) -> float:
    """Peak allocated GB over one call with a single input set allocated."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    inputs = make_inputs()
    fn_inputs = [inputs]
    fn(0, fn_inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GB
    del inputs, fn_inputs
    return peak


def copy_bandwidth(device: str, gigabytes: float = 1.0, iters: int = 20) -> float:
    """Bytes per second of a device-to-device copy (bytes read plus bytes written), median of
    ``iters`` copies of ``gigabytes`` after one warm-up copy: the bandwidth memory-bound kernels
    can reach on this device."""
    # random, not zeros: METHOD's caution (a product ran faster on zeros); a copy should not care
    source = torch.empty(int(gigabytes * GB) // torch.bfloat16.itemsize, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    timed = time_interleaved({"copy": lambda i: target.copy_(source)}, warmup=1, iters=iters, input_sets=1, device=device)
    return 2 * source.nbytes / (timed["copy"]["ms"] / 1e3)


def _in_context(context: Callable, fn: Callable[[int], object]) -> Callable[[int], object]:
    def call(i):
        with context():
            return fn(i)

    return call


class Variant(NamedTuple):
    """One timed variant of a row: ``attend(q, k, v, **given)`` on inputs of ``seq`` positions."""

    attend: Callable
    seq: int
    kv_heads: int
    context: Callable
    given_scores: bool = False
    """Whether each input set also holds level-0 scores, passed as ``q_scores`` and ``k_scores``."""
    batch: int | None = None
    """Rows of the inputs; ``None``: ``--batch``."""


def _attention_step(attend: Callable, backward: bool) -> Callable:
    """``step(i, sets)``: run ``attend`` on input set ``i`` (and its backward, with fresh gradients)."""

    def step(i, sets):
        q, k, v, grad, given = sets[i]
        if not backward:
            with torch.no_grad():
                return attend(q, k, v, **given)
        out = attend(q, k, v, **given)
        return torch.autograd.grad(out, (q, k, v), grad)

    return step


LONGTAIL_PARTS = ((0.5, 32768, 1.0), (0.5, 1024, 1.5))
"""The long-tailed mixture: (share of the row's tokens, median length, sigma of the log length)."""
LONGTAIL_SHORTEST = 16


def longtail_lengths(total: int, seed: int) -> list[int]:
    """Document lengths filling ``total`` tokens from the long-tailed mixture (module docstring)."""
    rng = random.Random(seed)
    lengths: list[int] = []
    left_over = total
    for index, (share, median, sigma) in enumerate(LONGTAIL_PARTS):
        budget = left_over if index == len(LONGTAIL_PARTS) - 1 else round(total * share)
        left_over -= budget
        while budget > 0:
            length = min(budget, max(LONGTAIL_SHORTEST, round(rng.lognormvariate(math.log(median), sigma))))
            lengths.append(length)
            budget -= length
    rng.shuffle(lengths)
    return lengths


def default_rope_inv_freq(dim: int, device: str) -> torch.Tensor:
    """The inverse frequencies of default RoPE (theta 10000) over a whole head of ``dim``, on ``device``."""
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=dim)
    return rope_inv_freq(config, seq_len=0, device=torch.device(device))


def _input_sets(args: argparse.Namespace, device: str, variant: Variant, count: int, backward: bool) -> list[tuple]:
    """``count`` independently drawn input sets of ``variant``: q, k, v, the output gradient, and
    the given scores when it takes them."""
    dtype = getattr(torch, args.dtype)

    def draw(heads, requires_grad):
        return torch.randn(variant.batch or args.batch, heads, variant.seq, args.dim, device=device, dtype=dtype, requires_grad=requires_grad)

    def draw_scores(heads):
        # Positive like norms, float32 like the recorded pre-norm norms; selection only ranks them.
        return torch.rand(variant.batch or args.batch, heads, variant.seq, device=device, dtype=torch.float32) + 1.0

    return [
        (draw(args.heads, backward), draw(variant.kv_heads, backward), draw(variant.kv_heads, backward),
         draw(args.heads, False),
         dict(q_scores=draw_scores(args.heads), k_scores=draw_scores(variant.kv_heads)) if variant.given_scores else {})
        for _ in range(count)
    ]


def _measure(args: argparse.Namespace, device: str, variants: dict[str, Variant], backward: bool, memory: bool) -> dict:
    """The variants timed in turns, then (``memory``) each one's peak."""
    steps = {
        name: _in_context(
            variant.context,
            partial(_attention_step(variant.attend, backward), sets=_input_sets(args, device, variant, args.input_sets, backward)),
        )
        for name, variant in variants.items()
    }
    timed = time_interleaved(steps, warmup=args.warmup, iters=args.iters, input_sets=args.input_sets, device=device)
    del steps  # frees the input sets before the peak-memory runs
    if memory:
        for name, variant in variants.items():
            with variant.context():
                timed[name]["peak_gb"] = peak_memory(
                    _attention_step(variant.attend, backward), lambda: _input_sets(args, device, variant, 1, backward)[0]
                )
    return timed


def operators(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """Every operator-mode row: each sequence length, setting and method option, each mode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_heads = args.kv_heads or args.heads
    results = []

    def measure(variants: dict[str, Variant], backward: bool) -> dict:
        return _measure(args, device, variants, backward, memory=True)

    @contextmanager
    def cudnn():
        with deterministic_algorithms(False), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            yield

    def own():
        return deterministic_algorithms(args.deterministic)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    span_end_freq = default_rope_inv_freq(args.dim, device) if "span_end" in args.rope else None
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    grid = itertools.product(
        args.seq, args.levels, args.pooling, args.topk, args.rope, args.scores, args.selection, args.combine
    )
    for seq, levels, pooling, topk, rope, scores, selection, combine in grid:
        settings = dict(levels=levels, pooling=pooling, topk=topk)
        plan = plan_for(seq, **settings)
        if not plan.compresses:
            # lighthouse_attention runs dense SDPA there: nothing of Lighthouse to time
            print(f"S={seq} L{levels} p{pooling} K{topk}: does not compress ({plan.compressed_len} entries for "
                  f"{seq} positions), skipped", file=sys.stderr, flush=True)
            continue
        # The options leave the compressed length, and so the SDPA(S_sel) baselines, unchanged.
        n_sel = plan.compressed_len
        options = dict(rope=rope, scores=scores, selection=selection, combine=combine)
        traffic = fused_traffic(plan, batch=args.batch, heads=args.heads, kv_heads=kv_heads, dim=args.dim, dtype=dtype,
                                **options)
        op_options = dict(
            rope_inv_freq=span_end_freq if rope == "span_end" else None, selection=selection, combine=combine
        )

        lighthouse = partial(lighthouse_attention, **settings, **op_options)
        for mode in args.modes:
            backward = mode == "fwd+bwd"
            row = {"seq": seq, "batch": args.batch, "heads": args.heads, "kv_heads": kv_heads,
                   "dim": args.dim, "dtype": args.dtype, "mode": mode, **settings, **options, "seq_sel": n_sel,
                   "deterministic": args.deterministic}
            variants = {
                "lighthouse": Variant(lighthouse, seq, kv_heads, own, given_scores=scores == "given"),
                "sdpa_sel": Variant(lambda q, k, v: compressed_attention(q, k, v, None), n_sel, args.heads, own),
                "sdpa_sel_cudnn": Variant(dense, n_sel, args.heads, cudnn),
            }
            if not args.no_dense:
                variants["dense_cudnn"] = Variant(dense, seq, args.heads, cudnn)
            row.update(measure(variants, backward))
            base = row["sdpa_sel_cudnn"]["ms"]
            row["ratio_to_sdpa_sel_cudnn"] = row["lighthouse"]["ms"] / base
            row["ratio_rounds"] = ratio_over_rounds(row["lighthouse"]["round_ms"], row["sdpa_sel_cudnn"]["round_ms"])
            row["kernel_gb"] = (traffic.forward + traffic.backward if backward else traffic.forward) / GB
            row["copy_tb_per_s"] = bandwidth / 1e12
            row["floor_ms"] = base + row["kernel_gb"] * GB / bandwidth * 1e3
            row["floor_ratio"] = row["floor_ms"] / base
            row["ratio_to_sdpa_sel"] = row["lighthouse"]["ms"] / row["sdpa_sel"]["ms"]
            if "dense_cudnn" in row:
                row["speedup_over_dense"] = row["dense_cudnn"]["ms"] / row["lighthouse"]["ms"]
                row["memory_vs_dense"] = row["lighthouse"]["peak_gb"] / row["dense_cudnn"]["peak_gb"]
            row["ms_per_head"] = row["lighthouse"]["ms"] / args.heads
            results.append(row)
            if not args.json:
                print(_operator_line(row), flush=True)
    return results


def _options(row: dict) -> str:
    return "/".join(row[key] for key in ("rope", "scores", "selection", "combine"))


def _operator_line(row: dict) -> str:
    spread = _ratio_range(row)
    dense = row.get("dense_cudnn")
    return (
        f"S={row['seq']:>7} L{row['levels']} p{row['pooling']} K{row['topk']} {_options(row)} "
        f"H{row['heads']}/{row['kv_heads']} "
        f"{row['mode']:>7}{' det' if row['deterministic'] else ''}: lighthouse {row['lighthouse']['ms']:8.2f} ms ({row['lighthouse']['peak_gb']:.2f} GB) | "
        f"sdpa S_sel={row['seq_sel']} {row['sdpa_sel']['ms']:7.2f} ms, cuDNN {row['sdpa_sel_cudnn']['ms']:7.2f} ms | "
        + (f"dense cuDNN {dense['ms']:8.2f} ms ({dense['peak_gb']:.2f} GB) | " if dense else "")
        + f"ratio {row['ratio_to_sdpa_sel_cudnn']:.2f}x ({spread}{'; ' * bool(spread)}to own backend {row['ratio_to_sdpa_sel']:.2f}x; "
        f"floor {row['floor_ratio']:.2f}x: {row['kernel_gb']:.2f} GB at {row['copy_tb_per_s']:.2f} TB/s) | "
        f"latency {row['lighthouse']['latency_ms']:.2f} ms vs {row['sdpa_sel_cudnn']['latency_ms']:.2f}"
    )


def _ratio_range(row: dict) -> str:
    """The ratio's range over rounds for a printed line ("" with fewer than two rounds)."""
    spread = row["ratio_rounds"]
    if spread is None:
        return ""
    return f"rounds {spread['low']:.2f}-{spread['high']:.2f}x, {spread['coverage']:.0%} for the median round"


def _print_operators(results: list[dict]) -> None:
    print()
    print("| S | mode | L/p/K | rope/scores/selection/combine | H/Hkv | S_sel | dense cuDNN ms | Lighthouse ms | "
          "SDPA(S_sel) cuDNN ms | "
          "SDPA(S_sel) own ms | ratio | ratio's range over rounds | kernels' bytes GB | floor ratio | Lighthouse GB | dense GB | "
          "latency: Lighthouse, SDPA(S_sel) cuDNN ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        dense = row.get("dense_cudnn", {"ms": float("nan"), "peak_gb": float("nan")})
        spread = row["ratio_rounds"]
        spread = "" if spread is None else f"{spread['low']:.2f}-{spread['high']:.2f} ({spread['rounds']} rounds)"
        print(f"| {row['seq']} | {row['mode']} | {row['levels']}/{row['pooling']}/{row['topk']} | "
              f"{_options(row)} | {row['heads']}/{row['kv_heads']} | {row['seq_sel']} | {dense['ms']:.2f} | {row['lighthouse']['ms']:.2f} | "
              f"{row['sdpa_sel_cudnn']['ms']:.2f} | {row['sdpa_sel']['ms']:.2f} | {row['ratio_to_sdpa_sel_cudnn']:.2f} | {spread} | "
              f"{row['kernel_gb']:.2f} | {row['floor_ratio']:.2f} | {row['lighthouse']['peak_gb']:.2f} | {dense['peak_gb']:.2f} | "
              f"{row['lighthouse']['latency_ms']:.2f}, {row['sdpa_sel_cudnn']['latency_ms']:.2f} |")


def packed_rows(args: argparse.Namespace) -> list[list[int]]:
    """The document lengths of each row in packed mode: ``--packed`` in every row, or each row
    drawn from the long-tailed mixture."""
    if args.packed is not None:
        return [list(args.packed)] * args.batch
    return [longtail_lengths(args.packed_longtail, args.packed_seed + row) for row in range(args.batch)]


def packed_operators(args: argparse.Namespace, device: str) -> list[dict]:
    """Every packed-mode row: each setting, each mode (``run`` allows one value of each method option)."""
    rows = packed_rows(args)
    documents = Documents.from_lengths(rows)
    kv_heads = args.kv_heads or args.heads
    given = args.scores[0] == "given"
    rope = args.rope[0]
    op_options = dict(
        rope_inv_freq=default_rope_inv_freq(args.dim, device) if rope == "span_end" else None,
        selection=args.selection[0], combine=args.combine[0],
    )

    def own():
        return deterministic_algorithms(args.deterministic)

    results = []
    for levels, pooling, topk in itertools.product(args.levels, args.pooling, args.topk):
        settings = dict(levels=levels, pooling=pooling, topk=topk)

        def compresses(length: int) -> bool:
            return runs_lighthouse(length, levels, pooling, topk, None)

        # Each document as long as the sequence SDPA sees for it: compressed, or its own length. The
        # rows' compressed totals differ, so every document goes into one row: the same work.
        floor = Documents.from_lengths([[compressed_length(n, **settings) for row in rows for n in row]])
        compressed = [n for row in rows for n in row if compresses(n)]
        described = {
            "documents": sum(map(len, rows)), "longest": documents.max_length, "compressed_documents": len(compressed),
            "compressed_token_share": sum(compressed) / (documents.batch * documents.seq_len),
        }
        for mode in args.modes:
            backward = mode == "fwd+bwd"
            row = {"seq": documents.seq_len, "batch": args.batch, "heads": args.heads, "kv_heads": kv_heads,
                   "dim": args.dim, "dtype": args.dtype, "mode": mode, **settings, "rope": rope, "scores": args.scores[0],
                   "selection": args.selection[0], "combine": args.combine[0], **described, "seq_sel": floor.seq_len,
                   "deterministic": args.deterministic}
            variants = {
                "lighthouse": Variant(partial(lighthouse_attention_varlen, documents=documents, **settings, **op_options),
                                      documents.seq_len, kv_heads, own, given_scores=given),
                "sdpa_sel": Variant(partial(dense_causal_attention_varlen, documents=floor), floor.seq_len, args.heads, own, batch=1),
                "lighthouse_unpacked": Variant(partial(lighthouse_attention, **settings, **op_options), documents.seq_len,
                                               kv_heads, own, given_scores=given),
            }
            if not args.no_dense:
                variants["dense_documents"] = Variant(
                    partial(dense_causal_attention_varlen, documents=documents), documents.seq_len, kv_heads, own
                )
            row.update(_measure(args, device, variants, backward, memory=device == "cuda"))
            row["ratio_to_sdpa_sel"] = row["lighthouse"]["ms"] / row["sdpa_sel"]["ms"]
            row["ratio_rounds"] = ratio_over_rounds(row["lighthouse"]["round_ms"], row["sdpa_sel"]["round_ms"])
            row["ratio_to_unpacked"] = row["lighthouse"]["ms"] / row["lighthouse_unpacked"]["ms"]
            if "dense_documents" in row:
                row["speedup_over_dense_documents"] = row["dense_documents"]["ms"] / row["lighthouse"]["ms"]
            results.append(row)
            if not args.json:
                print(_packed_line(row), flush=True)
    return results


def _packed_line(row: dict) -> str:
    spread = _ratio_range(row)
    dense = row.get("dense_documents")
    return (
        f"packed S={row['seq']} B={row['batch']} ({row['documents']} documents, longest {row['longest']}, "
        f"{row['compressed_documents']} compressed = {row['compressed_token_share']:.0%} of the tokens) "
        f"L{row['levels']} p{row['pooling']} K{row['topk']} {row['mode']}: lighthouse {row['lighthouse']['ms']:.2f} ms | "
        f"sdpa per document at S_sel {row['sdpa_sel']['ms']:.2f} ms (ratio {row['ratio_to_sdpa_sel']:.2f}x{'; ' * bool(spread)}{spread}) | "
        + (f"dense per document {dense['ms']:.2f} ms ({row['speedup_over_dense_documents']:.2f}x) | " if dense else "")
        + f"unpacked lighthouse {row['lighthouse_unpacked']['ms']:.2f} ms ({row['ratio_to_unpacked']:.2f}x)"
    )


def _print_packed(results: list[dict]) -> None:
    print()
    print("| S x B | documents (compressed, token share) | L/p/K | mode | Lighthouse ms | SDPA per document at S_sel ms | "
          "ratio | dense per document ms | speedup | unpacked Lighthouse ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        dense = row.get("dense_documents", {"ms": float("nan")})
        print(f"| {row['seq']} x {row['batch']} | {row['documents']} ({row['compressed_documents']}, "
              f"{row['compressed_token_share']:.0%}) | {row['levels']}/{row['pooling']}/{row['topk']} | {row['mode']} | "
              f"{row['lighthouse']['ms']:.2f} | {row['sdpa_sel']['ms']:.2f} | {row['ratio_to_sdpa_sel']:.2f} | "
              f"{dense['ms']:.2f} | {row.get('speedup_over_dense_documents', float('nan')):.2f} | "
              f"{row['lighthouse_unpacked']['ms']:.2f} |")


def _run_packed(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = packed_operators(args, device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "document_lengths": packed_rows(args), "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"device: {report['device']}, torch {report['torch']}")
        _print_packed(results)
    return 0


def _e2e(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .integration import apply_lighthouse
    from .training import enable_activation_checkpointing

    results = []
    for seq in args.e2e_seq:
        options = dict(rope=args.rope[0], selection=args.selection[0], combine=args.combine[0])
        row = {"seq": seq, "layers": args.e2e_layers, **options}
        for implementation in ("sdpa", "lighthouse"):
            config = LlamaConfig(
                vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=args.e2e_layers,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16)
            if implementation == "lighthouse":
                apply_lighthouse(model, levels=args.levels[0], pooling=args.pooling[0], topk=args.topk[0],
                                 dense_layers=args.e2e_dense_layers, **options)
            enable_activation_checkpointing(model)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            batches = [torch.randint(0, 32000, (1, seq), device="cuda") for _ in range(2)]

            def step(i):
                loss = model(input_ids=batches[i % 2], labels=batches[i % 2]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            ms = time_interleaved({"step": step}, warmup=1, iters=args.e2e_steps, input_sets=args.e2e_steps)["step"]["ms"]
            row[implementation] = {"ms": ms, "tokens_per_s": seq / (ms / 1e3),
                                   "peak_gb": torch.cuda.max_memory_allocated() / GB}
            del model, optimizer, batches
            torch.cuda.empty_cache()
        row["speedup"] = row["sdpa"]["ms"] / row["lighthouse"]["ms"]
        results.append(row)
        if not args.json:
            print(f"S={seq} {row['rope']}/{row['selection']}/{row['combine']}: "
                  f"sdpa {row['sdpa']['tokens_per_s']:.0f} tok/s, lighthouse "
                  f"{row['lighthouse']['tokens_per_s']:.0f} tok/s, {row['speedup']:.2f}x", flush=True)
    return results


def decoder_layers(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """``--layer``: one Llama decoder layer under ``sdpa`` and under ``lighthouse`` attention (the
    first value of each setting and option), each sequence length and mode, timed in turns."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .integration import apply_lighthouse

    dtype = getattr(torch, args.dtype)
    kv_heads = args.kv_heads or args.heads
    hidden = args.heads * args.dim
    settings = dict(levels=args.levels[0], pooling=args.pooling[0], topk=args.topk[0])
    options = dict(rope=args.rope[0], selection=args.selection[0], combine=args.combine[0])
    results = []
    for seq in args.seq:
        config = LlamaConfig(
            vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=1,
            num_attention_heads=args.heads, num_key_value_heads=kv_heads, head_dim=args.dim, max_position_embeddings=seq,
        )
        models = {}
        for implementation in ("sdpa", "lighthouse"):
            torch.manual_seed(0)
            # A config of its own: apply_lighthouse switches the attention its model's config names.
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").to(device, dtype)
            if implementation == "lighthouse":
                apply_lighthouse(model, **settings, dense_layers=[], **options)
            models[implementation] = model
        positions = torch.arange(seq, device=device)[None]
        inputs = [torch.randn(args.batch, seq, hidden, device=device, dtype=dtype) for _ in range(args.input_sets)]
        for mode in args.modes:
            backward = mode == "fwd+bwd"
            steps = {name: _layer_step(model, inputs, positions, backward) for name, model in models.items()}
            timed = time_interleaved(steps, warmup=args.warmup, iters=args.iters, input_sets=args.input_sets, device=device)
            row = {"seq": seq, "batch": args.batch, "heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
                   "dtype": args.dtype, "mode": mode, **settings, **options, **timed}
            for name in models:
                row[name]["waited_ms"] = row[name]["latency_ms"] - row[name]["ms"]
            results.append(row)
            if not args.json:
                print(_layer_line(row), flush=True)
        del models, inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def _layer_step(model, inputs: list[torch.Tensor], positions: torch.Tensor, backward: bool) -> Callable[[int], object]:
    """``step(i)``: the model's decoder layer on input ``i`` as its model calls it (and, with
    ``backward``, the gradient of the output's sum with respect to the layer's input and weights).
    The rotary cos/sin are computed once here: a model computes them once per forward for all its
    layers, so they are not a layer's work."""
    layer = model.model.layers[0]
    with torch.no_grad():
        position_embeddings = model.model.rotary_emb(inputs[0], positions)

    def step(i):
        hidden = inputs[i].requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.sum().backward()
        return out

    return step


def _layer_line(row: dict) -> str:
    sdpa, lighthouse = row["sdpa"], row["lighthouse"]
    return (
        f"S={row['seq']:>7} L{row['levels']} p{row['pooling']} K{row['topk']} {row['mode']:>7}: "
        f"sdpa layer {sdpa['ms']:8.2f} ms (idle GPU {sdpa['latency_ms']:.2f}, waited {sdpa['waited_ms']:.2f}, "
        f"host {sdpa['host_ms']:.2f}) | lighthouse layer {lighthouse['ms']:8.2f} ms (idle GPU "
        f"{lighthouse['latency_ms']:.2f}, waited {lighthouse['waited_ms']:.2f}, host {lighthouse['host_ms']:.2f})"
    )


def _print_layers(results: list[dict]) -> None:
    print()
    print("| S | mode | L/p/K | sdpa layer ms | from idle | waited | host | lighthouse layer ms | from idle | waited | host |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        sdpa, lighthouse = row["sdpa"], row["lighthouse"]
        print(f"| {row['seq']} | {row['mode']} | {row['levels']}/{row['pooling']}/{row['topk']} | "
              f"{sdpa['ms']:.2f} | {sdpa['latency_ms']:.2f} | {sdpa['waited_ms']:.2f} | {sdpa['host_ms']:.2f} | "
              f"{lighthouse['ms']:.2f} | {lighthouse['latency_ms']:.2f} | {lighthouse['waited_ms']:.2f} | "
              f"{lighthouse['host_ms']:.2f} |")


def _print_e2e(results: list[dict]) -> None:
    print()
    print("| S | sdpa tok/s | lighthouse tok/s | speedup | sdpa GB | lighthouse GB |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['seq']} | {row['sdpa']['tokens_per_s']:.0f} | {row['lighthouse']['tokens_per_s']:.0f} | "
              f"{row['speedup']:.2f} | {row['sdpa']['peak_gb']:.1f} | {row['lighthouse']['peak_gb']:.1f} |")
