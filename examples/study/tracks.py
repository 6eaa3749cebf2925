"""The decisive study's engine (issue 16, ``PLAN.md``): one arm of one track with one seed.

``scratch.py`` (track A, from scratch) and ``extend.py`` (track B, extending SmolLM2-135M) build
their model and call :func:`run`; everything else is shared, so the tracks differ only in the
model and its defaults. Every arm of a track sees the same initialization, the same sequences in
the same order and the same learning-rate schedule; a Lighthouse arm switches to dense attention
(``lighthouse_hf.RecoveryCallback``) where the schedule's decay begins, so the recovery phase is
the decay (warmup-stable-decay). ``--schedule constant`` is the paper's protocol instead: a
constant learning rate after warmup, the switch at the same step.

Writes ``<out>/<arm>[-<variant>]-seed<N>.json`` after every evaluation (a run cut short keeps its
curve): the settings, every optimizer step's loss, learning rate, phase and GPU seconds, the
held-out evaluations, and at the end the final evaluation with dense attention: loss overall, by
position bucket and by held-out book; the pass-key and copy probes by depth; each ``--eval-text``
file. The evaluation at the switch also runs with Lighthouse attention and reports the loss by
the predicting position's offset inside a ``pooling``-token block (the leak check: the last offset
cannot see its own block's future).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PrinterCallback, Trainer

import lighthouse_hf
from study import (
    PROBE_DEPTH_BINS,
    Corpus,
    Evaluator,
    PassKey,
    Probes,
    StudyLog,
    TrainStream,
    attention,
    copy_probes,
    retrieval_probes,
    run_description,
    synchronize,
    training_arguments,
    warm_up,
)

ARMS: dict[str, dict | None] = {
    "dense": None,
    "published": {},
    "span_end": {"rope": "span_end"},
    "causal": {"selection": "causal"},
    "mean": {"combine": "mean"},
    "all": {"rope": "span_end", "selection": "causal", "combine": "mean"},
}
"""Each arm's method options on top of the track's Lighthouse settings; ``None``: dense throughout."""
SCHEDULES = ("wsd", "constant")
LOSS_CHUNK = 8192
"""Positions per cross-entropy chunk: a 64K x 49K float32 logit matrix (12.9 GB) is never built."""


# ---------------------------------------------------------------------------------------------
# Data


class RepeatedSpans(torch.utils.data.IterableDataset):
    """Copies a span of each of a ``rate`` share of the sequences at least ``min_distance``
    positions later in the same sequence, so that long-range copying can be learnt (track A).
    Seeded, so every arm sees the same sequences."""

    def __init__(self, inner, seed: int, rate: float, lengths: tuple[int, int], min_distance: int) -> None:
        self.inner, self.seed, self.rate, self.lengths, self.min_distance = inner, seed, rate, lengths, min_distance

    def __iter__(self):
        rng = np.random.default_rng(self.seed + 7)
        for item in self.inner:
            ids = item["input_ids"]
            if rng.random() < self.rate:
                length = int(rng.integers(self.lengths[0], self.lengths[1] + 1))
                last_source = len(ids) - self.min_distance - 2 * length
                if last_source < 0:
                    raise ValueError(f"sequences of {len(ids)} tokens cannot hold a span of {length} repeated {self.min_distance} later")
                source = int(rng.integers(0, last_source + 1))
                target = int(rng.integers(source + length + self.min_distance, len(ids) - length + 1))
                ids = ids.clone()
                ids[target : target + length] = ids[source : source + length]
            yield {"input_ids": ids, "labels": ids}


def text_windows(path: Path, tokenizer_file: Path, seq_len: int) -> np.ndarray:
    """Windows of an ``--eval-text`` file, laid out like the held-out books' (every half window)."""
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_file(str(tokenizer_file)).encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids)
    if len(ids) < seq_len:
        raise ValueError(f"--eval-text {path} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    count = math.ceil((len(ids) - seq_len) / (seq_len // 2)) + 1
    starts = np.linspace(0, len(ids) - seq_len, count).round().astype(int)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Loss


def chunked_causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, the LM head and cross entropy recomputed per chunk in the backward
    (a track-A step would otherwise spend more memory traffic on logits than on attention)."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    weight = model.get_output_embeddings().weight

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ weight.T).float().flatten(0, 1), t.flatten(), reduction="sum")

    total = sum(
        checkpoint(chunk_loss, hidden[:, i : i + LOSS_CHUNK], targets[:, i : i + LOSS_CHUNK], use_reentrant=False)
        for i in range(0, hidden.shape[1], LOSS_CHUNK)
    )
    return total / targets.numel()


class ChunkedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accelerate puts bf16 autocast around the model's forward, which this loss does not call.
        device = inputs["input_ids"].device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.args.bf16):
            return chunked_causal_lm_loss(model, inputs["input_ids"])


# ---------------------------------------------------------------------------------------------
# Evaluation


def bucket_losses(losses: torch.Tensor, edges: list[int]) -> list[dict]:
    """Mean loss of the predicted tokens at positions ``[low, high)`` for consecutive edges
    (``losses[:, t]`` is the loss of token ``t + 1``)."""
    return [dict(first=low, last=high - 1, loss=losses[:, low - 1 : high - 1].mean().item()) for low, high in zip(edges, edges[1:])]


def offset_losses(losses: torch.Tensor, block: int) -> list[float]:
    """Mean loss by the predicting position's offset inside a ``block``-token block."""
    offsets = torch.arange(losses.shape[1]) % block
    return [losses[:, offsets == o].mean().item() for o in range(block)]


def by_depth(results: list[dict], score: Callable[[dict], float]) -> list[dict]:
    out = []
    for depth_bin in range(PROBE_DEPTH_BINS):
        group = [r for r in results if min(int(r["depth"] * PROBE_DEPTH_BINS), PROBE_DEPTH_BINS - 1) == depth_bin]
        if group:
            out.append(dict(bin=depth_bin, probes=len(group), score=float(np.mean([score(r) for r in group]))))
    return out


class TrackEvaluator:
    """Held-out loss by position bucket, the probes and the extra texts, on top of the small study's
    evaluator (which owns the model calls)."""

    def __init__(self, evaluator: Evaluator, edges: list[int], long_from: int, block: int, texts: dict[str, Evaluator]) -> None:
        self.evaluator, self.edges, self.long_from, self.block, self.texts = evaluator, edges, long_from, block, texts

    def losses(self, model) -> dict:
        """Mean losses, and per window (the unit the report's paired bootstrap resamples): overall
        and over the long positions (predicted tokens from ``long_from`` on)."""
        losses = self.evaluator.token_losses(model)
        return dict(
            loss=losses.mean().item(),
            long_loss=losses[:, self.long_from - 1 :].mean().item(),
            by_position=bucket_losses(losses, self.edges),
            by_window=losses.mean(1).tolist(),
            by_window_long=losses[:, self.long_from - 1 :].mean(1).tolist(),
            losses=losses,
        )

    def leak_check(self, model) -> dict:
        """Loss with Lighthouse attention, by offset inside a pooling block, beside dense's."""
        with attention(model, lighthouse_hf.ATTN_IMPLEMENTATION):
            losses = self.evaluator.token_losses(model)
        return dict(loss=losses.mean().item(), by_position=bucket_losses(losses, self.edges), by_offset=offset_losses(losses, self.block))

    def final(self, model) -> dict:
        with attention(model, "sdpa"):
            held_out = self.losses(model)
            losses = held_out.pop("losses")
            names = self.evaluator.names
            held_out["by_document"] = {n: losses[[i for i, m in enumerate(names) if m == n]].mean().item() for n in dict.fromkeys(names)}
            held_out["by_offset"] = offset_losses(losses, self.block)
            passkey = self.evaluator.retrieval(model)
            copies = self.evaluator.copying(model)
            texts = {}
            for name, evaluator in self.texts.items():
                text_losses = evaluator.token_losses(model)
                texts[name] = dict(
                    loss=text_losses.mean().item(),
                    long_loss=text_losses[:, self.long_from - 1 :].mean().item(),
                    by_position=bucket_losses(text_losses, self.edges),
                    windows=len(text_losses),
                )
        return dict(
            **held_out,
            passkey=dict(
                exact_match=float(np.mean([p["exact"] for p in passkey])),
                by_depth=by_depth(passkey, lambda p: float(p["exact"])),
                probes=passkey,
            ),
            copy=dict(
                accuracy=float(np.mean([c["with_source"]["accuracy"] for c in copies])),
                control_accuracy=float(np.mean([c["control"]["accuracy"] for c in copies])),
                by_depth=by_depth(copies, lambda c: c["with_source"]["accuracy"]),
                probes=copies,
            ),
            eval_text=texts,
        )


class TrackLog(StudyLog):
    """The small study's step clock and JSON record; its evaluations add the position buckets and,
    at ``leak_steps`` while the model is still on Lighthouse, the leak check: at the start (the loss
    that switching a pretrained model to Lighthouse costs before it trains) and at the switch (what
    the Lighthouse phase learned), not at every evaluation, since a whole-model Lighthouse
    evaluation costs as much as the dense one."""

    def __init__(self, record: dict, path: Path, evaluator: TrackEvaluator, eval_steps: set[int], tokens_per_step: int, leak_steps: set[int]) -> None:
        super().__init__(record, path, evaluator.evaluator, eval_steps, tokens_per_step, lighthouse_eval=False)
        self.track_evaluator, self.leak_steps = evaluator, leak_steps

    def measure(self, model, entry: dict) -> dict:
        with attention(model, "sdpa"):
            out = self.track_evaluator.losses(model)
        out.pop("losses")
        if entry["phase"] == "lighthouse" and entry["step"] in self.leak_steps:
            out["lighthouse"] = self.track_evaluator.leak_check(model)
            out["loss_lighthouse"] = out["lighthouse"]["loss"]
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs and "learning_rate" in logs and self.record["steps"] and self.record["steps"][-1]["step"] == state.global_step:
            self.record["steps"][-1]["learning_rate"] = logs["learning_rate"]


# ---------------------------------------------------------------------------------------------
# The run


def add_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The arguments every track takes; ``defaults`` are the track's."""
    parser.add_argument("--data", type=Path, required=True, help="folder written by prepare_data.py --held-out 64k")
    parser.add_argument("--arm", choices=list(ARMS), help="required unless --calibrate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=defaults["out"], help="results folder (default: %(default)s)")
    parser.add_argument("--eval-text", type=Path, nargs="*", default=[], metavar="FILE", help="extra held-out text files, evaluated like the held-out books")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps (default: %(default)s; another count names the run's variant)")
    parser.set_defaults(track_steps=defaults["steps"])
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"])
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="warm-up steps")
    parser.add_argument("--schedule", choices=SCHEDULES, default="wsd", help="wsd: warmup-stable-decay; constant: the paper's protocol")
    parser.add_argument("--recovery", type=float, default=0.25, help="share of the steps at the end run dense (and decayed, under wsd)")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--dense-layers", type=int, nargs="*", default=defaults["dense_layers"])
    parser.add_argument("--passkey-rate", type=float, default=defaults["passkey_rate"], help="share of training sequences carrying a pass key")
    parser.add_argument("--probes-per-bin", type=int, default=4, help=f"pass-key probes per depth bin ({PROBE_DEPTH_BINS} bins); half as many copy probes")
    parser.add_argument("--copy-length", type=int, default=64, help="tokens of the copied passage")
    parser.add_argument("--evals", type=int, default=8, help="held-out evaluations during training (plus step 0 and the switch)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--calibrate", type=int, default=0, metavar="STEPS", help="time STEPS optimizer steps of every arm instead of training; writes calibration.json")
    parser.add_argument("--overwrite", action="store_true", help="replace this run's results file if --out holds one")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.calibrate and args.arm is None:
        parser.error("--arm is required (one of " + ", ".join(ARMS) + ") unless --calibrate")
    if not 0 < args.recovery < 1:
        parser.error(f"--recovery must be a share of the steps in (0, 1), got {args.recovery}")
    if args.steps < 2 or args.warmup < 0 or args.warmup >= args.steps * (1 - args.recovery):
        parser.error(f"--warmup ({args.warmup}) must end before the recovery phase of --steps {args.steps} x (1 - --recovery {args.recovery})")
    switch = round(args.steps * (1 - args.recovery))
    if not args.warmup < switch < args.steps:
        parser.error(f"--recovery {args.recovery} of --steps {args.steps} puts the switch to dense at step {switch}: "
                     "a Lighthouse arm needs Lighthouse steps after the warm-up and dense steps after them")
    for flag, value, low in (("--seed", args.seed, 0), ("--probes-per-bin", args.probes_per_bin, 1),
                             ("--evals", args.evals, 1), ("--calibrate", args.calibrate, 0)):
        if value < low:
            parser.error(f"{flag} must be an integer >= {low}, got {value}")
    if not 0 <= args.passkey_rate <= 1:
        parser.error(f"--passkey-rate must be a share in [0, 1], got {args.passkey_rate}")
    if not 1 <= args.copy_length <= args.seq_len // 4:
        parser.error(f"--copy-length must be from 1 to a quarter of --seq-len ({args.seq_len // 4}), got {args.copy_length}")
    for path in args.eval_text:
        if not path.is_file():
            parser.error(f"--eval-text {path}: no such file")
    names = [path.name for path in args.eval_text]
    if len(set(names)) < len(names):
        parser.error(f"--eval-text: results are kept by file name, and {sorted(n for n in names if names.count(n) > 1)[0]} "
                     "is given twice")
    if args.arm is not None and not args.calibrate and not args.overwrite and (args.out / result_name(args)).exists():
        parser.error(f"--out {args.out} already holds {result_name(args)}; pass --overwrite to replace it")


def result_name(args: argparse.Namespace) -> str:
    """``<arm>[-<variant>]-seed<N>.json``: the variant names what differs from the track's plan, so
    that e.g. a shorter dense run never overwrites the planned one."""
    variant = [] if args.schedule == "wsd" else [args.schedule]
    if args.recovery != 0.25:
        variant.append(f"recovery{args.recovery:g}")
    if args.steps != args.track_steps:
        variant.append(f"steps{args.steps}")
    return "-".join([args.arm, *variant, f"seed{args.seed}"]) + ".json"


def lighthouse_settings(args: argparse.Namespace, arm: str) -> dict | None:
    options = ARMS[arm]
    if options is None:
        return None
    return dict(levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=args.dense_layers, **options)


def scheduler_arguments(args: argparse.Namespace, recovery_step: int) -> dict:
    if args.schedule == "constant":
        return dict(lr_scheduler_type="constant_with_warmup")
    return dict(
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs=dict(num_decay_steps=args.steps - recovery_step, decay_type="linear", min_lr_ratio=0.0),
    )


def calibrate(args: argparse.Namespace, corpus: Corpus, build_model: Callable, device: str) -> dict:
    """Median optimizer-step time and peak memory of every arm, shaped like training."""
    blocks = torch.from_numpy(corpus.train_blocks(args.seq_len)[: args.calibrate + 1]).to(device)
    out = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", seq_len=args.seq_len, arms={})
    for arm in ARMS:
        model = build_model(args).to(device)
        settings = lighthouse_settings(args, arm)
        if settings is not None:
            lighthouse_hf.apply_lighthouse(model, **settings)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step, ids in enumerate(blocks):
            synchronize()
            started = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                chunked_causal_lm_loss(model, ids[None]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            if step:  # the first step compiles kernels and builds cuDNN plans
                times.append(time.perf_counter() - started)
        out["arms"][arm] = dict(
            step_seconds=float(np.median(times)),
            tokens_per_s=args.seq_len / float(np.median(times)),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        )
        print(f"{arm}: {out['arms'][arm]}", flush=True)
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    dense = out["arms"]["dense"]["step_seconds"]
    for entry in out["arms"].values():
        entry["speedup_vs_dense"] = dense / entry["step_seconds"]
    return out


def run(track: str, args: argparse.Namespace, build_model: Callable, edges: list[int], long_from: int, repeat_rate: float) -> dict:
    """One arm (or, with ``--calibrate``, the step times of all arms). ``build_model(args)`` returns
    the track's model, the same for every arm of one seed; ``edges`` are the position buckets and
    ``long_from`` the first of the long positions that decide the study."""
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = Corpus.load(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        result = calibrate(args, corpus, build_model, device)
        (args.out / "calibration.json").write_text(json.dumps(result, indent=1))
        return result

    passkey = PassKey(corpus.meta["passkey"])
    blocks = corpus.train_blocks(args.seq_len)
    windows, names = corpus.heldout_windows(args.seq_len)
    probes = Probes(
        passkey=retrieval_probes(windows, passkey, args.seed, args.probes_per_bin),
        copies=copy_probes(windows, args.seed, max(1, args.probes_per_bin // 2), args.copy_length),
        copy_length=args.copy_length,
        blind=[],
        block=args.pooling,
        filler=corpus.meta["eos_token_id"],
    )
    bf16 = device == "cuda"
    texts = {}
    for path in args.eval_text:
        text = text_windows(path, args.data / "tokenizer.json", args.seq_len)
        texts[path.name] = Evaluator(text, [path.name] * len(text), passkey, probes, bf16, device)
    evaluator = TrackEvaluator(Evaluator(windows, names, passkey, probes, bf16, device), edges, long_from, args.pooling, texts)

    model = build_model(args).to(device)
    settings = lighthouse_settings(args, args.arm)
    recovery = None
    recovery_step = round(args.steps * (1 - args.recovery))
    if settings is not None:
        lighthouse_hf.apply_lighthouse(model, **settings)
        recovery = lighthouse_hf.RecoveryCallback(at=recovery_step)
    implementations = ["sdpa"] + ([lighthouse_hf.ATTN_IMPLEMENTATION] if settings else [])
    warm_up(model, torch.from_numpy(blocks[0]), implementations, bf16, loss=chunked_causal_lm_loss)

    tokens_per_step = args.seq_len
    eval_steps = {max(1, round(args.steps * (i + 1) / args.evals)) for i in range(args.evals)} | {recovery_step}
    record = dict(
        track=track,
        arm=args.arm,
        seed=args.seed,
        lighthouse=settings,
        recovery_step=recovery_step,
        long_from=long_from,
        compressed_length=lighthouse_hf.compressed_length(args.seq_len, levels=args.levels, pooling=args.pooling, topk=args.topk),
        **run_description(args, model, blocks, windows, names, device),
        tokens_per_step=tokens_per_step,
        steps=[],
        evals=[],
    )
    log = TrackLog(record, args.out / result_name(args), evaluator, eval_steps, tokens_per_step, leak_steps={0, recovery_step})
    callbacks = [log] + ([recovery] if recovery else [])  # the log first: its clock stops before other callbacks work

    with tempfile.TemporaryDirectory() as trainer_dir:
        training_args = training_arguments(
            trainer_dir, args, device, bf16, per_device_train_batch_size=1, **scheduler_arguments(args, recovery_step)
        )
        stream = TrainStream(blocks, passkey, args.seed, args.passkey_rate)
        if repeat_rate:
            stream = RepeatedSpans(stream, args.seed, repeat_rate, (64, 512), args.seq_len // 4)
        trainer = ChunkedLossTrainer(model=model, args=training_args, train_dataset=stream, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.train()

    synchronize()
    final_started = time.perf_counter()
    model.eval()
    record["final"] = evaluator.final(model)
    synchronize()
    record["final_eval_seconds"] = time.perf_counter() - final_started
    record["gpu_seconds_by_phase"] = {
        phase: sum(s["seconds"] for s in record["steps"] if s["phase"] == phase) for phase in ("lighthouse", "dense")
    }
    record["wall_seconds"] = time.perf_counter() - started
    if device == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.save()
    print(
        f"{track} {args.arm} seed {args.seed}: GPU {log.gpu_seconds:.1f} s, held-out loss {record['final']['loss']:.4f}, "
        f"by position {[round(b['loss'], 3) for b in record['final']['by_position']]}, pass key {record['final']['passkey']['exact_match']:.2f}, "
        f"copy {record['final']['copy']['accuracy']:.2f}",
        flush=True,
    )
    return record
