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
call (inputs, outputs and gradients included). Times are per call with calls queued back to back,
as in training, where the host runs ahead of the GPU; ``latency`` is one call from an idle GPU,
which adds the host's time before the first kernel (the ratios use the former). ``--e2e`` instead
times whole bf16 training steps (gradient checkpointing, AdamW) of a 30-layer Llama with hidden
1024 under ``sdpa`` and ``lighthouse`` attention and reports tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .ops import compressed_attention, compressed_length, lighthouse_attention

GB = 1e9


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("lighthouse-hf bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    results = _e2e(args) if args.e2e else _operators(args)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"device: {report['device']}, torch {report['torch']}")
        _print_e2e(results) if args.e2e else _print_operators(results)
    return 0


@contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def time_interleaved(steps: dict[str, Callable[[int], object]], *, warmup: int, iters: int, input_sets: int) -> dict:
    """Median milliseconds per call of each ``steps[name](i)``, input set ``i`` rotating.

    The variants take turns, one round each at a time, so clock and temperature drift reach all of
    them alike. A round starts from an idle GPU: the first call's time (``latency_ms``) includes
    the host's work before its first kernel; while it runs, the host queues ``input_sets`` more
    calls back to back, as a training loop does, and their times (``ms``) are device time per
    call. ``iters`` such calls per variant are taken.
    """
    for name, step in steps.items():
        for i in range(warmup):
            step(i % input_sets)
    times = {name: [] for name in steps}
    latencies = {name: [] for name in steps}
    for _ in range(-(-iters // input_sets)):
        for name, step in steps.items():
            torch.cuda.synchronize()
            events = []
            for i in range(input_sets + 1):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(i % input_sets)
                stop.record()
                events.append((start, stop))
            torch.cuda.synchronize()
            latencies[name].append(events[0][0].elapsed_time(events[0][1]))
            times[name].extend(start.elapsed_time(stop) for start, stop in events[1:])
    return {name: {"ms": statistics.median(times[name]), "latency_ms": statistics.median(latencies[name])} for name in steps}


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


def _in_context(context: Callable, fn: Callable[[int], object]) -> Callable[[int], object]:
    def call(i):
        with context():
            return fn(i)

    return call


def _attention_step(attend: Callable, backward: bool) -> Callable:
    """``step(i, sets)``: run ``attend`` on input set ``i`` (and its backward, with fresh gradients)."""

    def step(i, sets):
        q, k, v, grad = sets[i]
        if not backward:
            with torch.no_grad():
                return attend(q, k, v)
        out = attend(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)

    return step


def _operators(args: argparse.Namespace) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, args.dtype)
    kv_heads = args.kv_heads or args.heads
    results = []

    def draw(batch, heads, seq, requires_grad):
        return torch.randn(batch, heads, seq, args.dim, device="cuda", dtype=dtype, requires_grad=requires_grad)

    def make_sets(seq, heads_kv, count, backward):
        return [
            (draw(args.batch, args.heads, seq, backward), draw(args.batch, heads_kv, seq, backward),
             draw(args.batch, heads_kv, seq, backward), draw(args.batch, args.heads, seq, False))
            for _ in range(count)
        ]

    def measure(variants: dict, backward: bool) -> dict:
        """``variants``: name -> (attend, seq, kv heads, context); timed in turns, then each one's peak."""
        steps = {
            name: _in_context(
                context, partial(_attention_step(attend, backward), sets=make_sets(seq, heads_kv, args.input_sets, backward))
            )
            for name, (attend, seq, heads_kv, context) in variants.items()
        }
        timed = time_interleaved(steps, warmup=args.warmup, iters=args.iters, input_sets=args.input_sets)
        del steps  # frees the input sets before the peak-memory runs
        for name, (attend, seq, heads_kv, context) in variants.items():
            with context():
                timed[name]["peak_gb"] = peak_memory(
                    _attention_step(attend, backward), lambda: make_sets(seq, heads_kv, 1, backward)[0]
                )
        return timed

    @contextmanager
    def cudnn():
        with deterministic_algorithms(False), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            yield

    def own():
        return deterministic_algorithms(args.deterministic)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for seq in args.seq:
        for levels in args.levels:
            for pooling in args.pooling:
                for topk in args.topk:
                    n_sel = compressed_length(seq, levels=levels, pooling=pooling, topk=topk)
                    settings = dict(levels=levels, pooling=pooling, topk=topk)

                    def lighthouse(q, k, v, settings=settings):
                        return lighthouse_attention(q, k, v, **settings)

                    for mode in args.modes:
                        backward = mode == "fwd+bwd"
                        row = {"seq": seq, "batch": args.batch, "heads": args.heads, "kv_heads": kv_heads,
                               "dim": args.dim, "dtype": args.dtype, "mode": mode, **settings, "seq_sel": n_sel,
                               "deterministic": args.deterministic}
                        variants = {
                            "lighthouse": (lighthouse, seq, kv_heads, own),
                            "sdpa_sel": (lambda q, k, v: compressed_attention(q, k, v, None), n_sel, args.heads, own),
                            "sdpa_sel_cudnn": (dense, n_sel, args.heads, cudnn),
                        }
                        if not args.no_dense:
                            variants["dense_cudnn"] = (dense, seq, args.heads, cudnn)
                        row.update(measure(variants, backward))
                        base = row["sdpa_sel_cudnn"]["ms"]
                        row["ratio_to_sdpa_sel_cudnn"] = row["lighthouse"]["ms"] / base
                        row["ratio_to_sdpa_sel"] = row["lighthouse"]["ms"] / row["sdpa_sel"]["ms"]
                        if "dense_cudnn" in row:
                            row["speedup_over_dense"] = row["dense_cudnn"]["ms"] / row["lighthouse"]["ms"]
                            row["memory_vs_dense"] = row["lighthouse"]["peak_gb"] / row["dense_cudnn"]["peak_gb"]
                        row["ms_per_head"] = row["lighthouse"]["ms"] / args.heads
                        results.append(row)
                        if not args.json:
                            print(_operator_line(row), flush=True)
    return results


def _operator_line(row: dict) -> str:
    dense = row.get("dense_cudnn")
    return (
        f"S={row['seq']:>7} L{row['levels']} p{row['pooling']} K{row['topk']} H{row['heads']}/{row['kv_heads']} "
        f"{row['mode']:>7}{' det' if row['deterministic'] else ''}: lighthouse {row['lighthouse']['ms']:8.2f} ms ({row['lighthouse']['peak_gb']:.2f} GB) | "
        f"sdpa S_sel={row['seq_sel']} {row['sdpa_sel']['ms']:7.2f} ms, cuDNN {row['sdpa_sel_cudnn']['ms']:7.2f} ms | "
        + (f"dense cuDNN {dense['ms']:8.2f} ms ({dense['peak_gb']:.2f} GB) | " if dense else "")
        + f"ratio {row['ratio_to_sdpa_sel_cudnn']:.2f}x (to own backend {row['ratio_to_sdpa_sel']:.2f}x) | "
        f"latency {row['lighthouse']['latency_ms']:.2f} ms vs {row['sdpa_sel_cudnn']['latency_ms']:.2f}"
    )


def _print_operators(results: list[dict]) -> None:
    print()
    print("| S | mode | L/p/K | H/Hkv | S_sel | dense cuDNN ms | Lighthouse ms | SDPA(S_sel) cuDNN ms | "
          "SDPA(S_sel) own ms | ratio | Lighthouse GB | dense GB | latency: Lighthouse, SDPA(S_sel) cuDNN ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        dense = row.get("dense_cudnn", {"ms": float("nan"), "peak_gb": float("nan")})
        print(f"| {row['seq']} | {row['mode']} | {row['levels']}/{row['pooling']}/{row['topk']} | "
              f"{row['heads']}/{row['kv_heads']} | {row['seq_sel']} | {dense['ms']:.2f} | {row['lighthouse']['ms']:.2f} | "
              f"{row['sdpa_sel_cudnn']['ms']:.2f} | {row['sdpa_sel']['ms']:.2f} | {row['ratio_to_sdpa_sel_cudnn']:.2f} | "
              f"{row['lighthouse']['peak_gb']:.2f} | {dense['peak_gb']:.2f} | "
              f"{row['lighthouse']['latency_ms']:.2f}, {row['sdpa_sel_cudnn']['latency_ms']:.2f} |")


def _e2e(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .integration import apply_lighthouse

    results = []
    for seq in args.e2e_seq:
        row = {"seq": seq, "layers": args.e2e_layers}
        for implementation in ("sdpa", "lighthouse"):
            config = LlamaConfig(
                vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=args.e2e_layers,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16)
            if implementation == "lighthouse":
                apply_lighthouse(model, levels=args.levels[0], pooling=args.pooling[0], topk=args.topk[0],
                                 dense_layers=args.e2e_dense_layers)
            model.gradient_checkpointing_enable()
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
            print(f"S={seq}: sdpa {row['sdpa']['tokens_per_s']:.0f} tok/s, lighthouse "
                  f"{row['lighthouse']['tokens_per_s']:.0f} tok/s, {row['speedup']:.2f}x", flush=True)
    return results


def _print_e2e(results: list[dict]) -> None:
    print()
    print("| S | sdpa tok/s | lighthouse tok/s | speedup | sdpa GB | lighthouse GB |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['seq']} | {row['sdpa']['tokens_per_s']:.0f} | {row['lighthouse']['tokens_per_s']:.0f} | "
              f"{row['speedup']:.2f} | {row['sdpa']['peak_gb']:.1f} | {row['lighthouse']['peak_gb']:.1f} |")
