"""``lighthouse-hf demo``: the whole workflow in about a minute on a CPU, with no network.

A tiny byte-level Llama (256 byte values plus BOS and EOS, no tokenizer file) learns from a
bundled Austen novel with ``transformers.Trainer``: most steps with Lighthouse attention at a
context where it really compresses, then a short dense recovery switched by
:class:`~lighthouse_hf.RecoveryCallback`; the recovered dense model is saved.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from importlib import resources
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as transformers_logging

from .data import pack_documents
from .dispatch import LighthouseWarning
from .integration import apply_lighthouse
from .ops import compressed_length
from .training import RecoveryCallback

BOOK = "persuasion.txt"
BOOK_TITLE = "Persuasion (Jane Austen, 1818)"
BOS_ID, EOS_ID = 256, 257
VOCAB_SIZE = 258
"""Every byte value, then BOS and EOS: text needs no tokenizer file."""
HELD_OUT_FRACTION = 0.1
"""The end of the book, never trained on, for the held-out loss."""
HELD_OUT_BLOCKS = 2


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def book_text() -> str:
    return resources.files("lighthouse_hf").joinpath("books", BOOK).read_text(encoding="utf-8")


def tiny_llama_config(seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,  # untied, a byte model learns next-byte statistics in fewer steps
    )


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = torch.tensor(blocks, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor) -> float:
    """Mean next-byte loss (nats) over ``blocks`` with the model's current attention."""
    was_training = model.training
    model.eval()
    losses = [model(input_ids=block[None], labels=block[None]).loss.item() for block in blocks]
    model.train(was_training)
    return sum(losses) / len(losses)


class _PhaseReport(TrainerCallback):
    """Progress bars, losses, throughput and held-out losses of both phases.

    It must run before the RecoveryCallback so that it sees the Lighthouse model at the switch.
    """

    def __init__(self, recovery: RecoveryCallback, held_out: torch.Tensor, tokens_per_step: int) -> None:
        self.recovery = recovery
        self.held_out = held_out
        self.tokens_per_step = tokens_per_step
        self.losses: dict[str, list[float]] = {"lighthouse": [], "dense": []}
        self.seconds = {"lighthouse": 0.0, "dense": 0.0}
        self.held_out_losses: dict[str, float] = {}
        self.bar = None
        self.phase_start = 0.0

    def phase(self, step: int) -> str:
        return "lighthouse" if step <= self.recovery.recovery_step else "dense"

    def _open_bar(self, name: str, steps: int) -> None:
        from tqdm.auto import tqdm

        label = "Lighthouse pre-training" if name == "lighthouse" else "Dense recovery"
        self.bar = tqdm(total=steps, desc=f"{label:<23}", unit="step", dynamic_ncols=True)
        self.phase_start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._open_bar("lighthouse", self.recovery.resolve(state.max_steps))

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        # Here, before the RecoveryCallback switches the model to dense: the Lighthouse model's losses.
        if state.global_step == self.recovery.recovery_step:
            self.seconds["lighthouse"] = time.perf_counter() - self.phase_start
            self.held_out_losses["lighthouse model, Lighthouse attention"] = held_out_loss(model, self.held_out)
            model.set_attn_implementation("sdpa")
            self.held_out_losses["lighthouse model, dense attention"] = held_out_loss(model, self.held_out)
            model.set_attn_implementation("lighthouse")

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        # Trainer logs a step after its on_step_end, and the demo logs every step: the bar advances
        # here, so that it shows the loss of the step it counts, and the switch comes after that step.
        if not logs or "loss" not in logs:
            return
        self.losses[self.phase(state.global_step)].append(logs["loss"])
        self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)
        self.bar.update(1)
        if state.global_step == self.recovery.recovery_step:
            self.bar.close()
            self._open_bar("dense", state.max_steps - state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.seconds["dense"] = time.perf_counter() - self.phase_start
        self.bar.close()
        self.held_out_losses["recovered model, dense attention"] = held_out_loss(model, self.held_out)

    def throughput(self, name: str) -> float:
        steps = len(self.losses[name])
        return steps * self.tokens_per_step / self.seconds[name] if self.seconds[name] else float("nan")


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (one Lighthouse and one recovery step at least), got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 < args.recovery < 1.0:
        raise ValueError(f"--recovery must be a fraction in (0, 1), got {args.recovery}")
    with warnings.catch_warnings():  # the error below says it in the demo's own flags
        warnings.simplefilter("ignore", LighthouseWarning)
        recovery_step = RecoveryCallback(at=args.recovery).resolve(args.steps)
    if recovery_step >= args.steps:
        raise ValueError(f"--recovery {args.recovery} of {args.steps} steps leaves no dense recovery step; lower it")
    kept = compressed_length(args.seq_len, levels=args.levels, pooling=args.pooling, topk=args.topk)
    if kept >= args.seq_len:
        raise ValueError(
            f"--seq-len {args.seq_len} is too short for Lighthouse (levels={args.levels}, pooling={args.pooling}, "
            f"topk={args.topk}) to compress; use a longer one (e.g. 4096)"
        )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    wall_start = time.perf_counter()
    transformers_logging.set_verbosity_error()  # the demo prints its own report
    set_seed(args.seed)

    text = book_text()
    split = int(len(text) * (1 - HELD_OUT_FRACTION))
    train_blocks = list(pack_documents([encode(text[:split])], args.seq_len, EOS_ID))
    held_out = torch.tensor(list(pack_documents([encode(text[split:])], args.seq_len, EOS_ID))[:HELD_OUT_BLOCKS])
    if len(train_blocks) < args.steps * args.batch_size or len(held_out) == 0:
        raise ValueError(
            f"the book gives {len(train_blocks)} training blocks of {args.seq_len} bytes: lower --steps, "
            "--batch-size or --seq-len"
        )

    model = LlamaForCausalLM(tiny_llama_config(args.seq_len))
    apply_lighthouse(model, levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=[0, -1])
    params = sum(p.numel() for p in model.parameters())
    kept = compressed_length(args.seq_len, levels=args.levels, pooling=args.pooling, topk=args.topk)
    print(f"Lighthouse demo: byte-level Llama ({params / 1e6:.2f}M parameters, 4 layers) on {BOOK_TITLE}")
    print(
        f"  {args.seq_len}-byte context; Lighthouse (levels={args.levels}, pooling={args.pooling}, topk={args.topk}) "
        f"in layers 1-2 attends over {kept} of {args.seq_len} positions ({kept / args.seq_len:.0%}); "
        "layers 0 and 3 stay dense"
    )

    recovery = RecoveryCallback(at=args.recovery)
    report = _PhaseReport(recovery, held_out, args.batch_size * args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.1,
        adam_beta2=0.95,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=_Blocks(train_blocks),
        callbacks=[report, recovery],
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.train()

    print(f"\n{'phase':<24}{'steps':>6}  {'train loss: first -> last':<27}{'tokens/s':>9}")
    for name, label in (("lighthouse", "Lighthouse pre-training"), ("dense", "dense recovery")):
        losses = report.losses[name]
        print(f"{label:<24}{len(losses):>6}  {losses[0]:>8.3f} -> {losses[-1]:<15.3f}{report.throughput(name):>9,.0f}")
    print(f"held-out loss (last {HELD_OUT_FRACTION:.0%} of the book, nats per byte):")
    for label, loss in report.held_out_losses.items():
        print(f"  {label:<40}{loss:.3f}  ({loss / math.log(2):.2f} bits/byte)")

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    print(
        f"saved the recovered dense model to {output_dir} "
        f"(config.lighthouse.recovery_step = {model.config.lighthouse['recovery_step']}); "
        f"total {time.perf_counter() - wall_start:.0f} s"
    )
    return 0
