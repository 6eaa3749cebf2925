"""Trainer on several ranks with a Lighthouse model: DDP, FSDP2, or FSDP2 with context parallelism.

Trains 4 steps with ``RecoveryCallback(at=3)`` and a checkpoint every 2 steps, saves the final
model, resumes a fresh model from ``checkpoint-2`` and checks that steps 3-4 repeat the
uninterrupted run; rank 0 then exports the final model with ``lighthouse_hf.export_checkpoint``.

    torchrun --nproc-per-node 2 examples/distributed/trainer_check.py --mode ddp|fsdp2|cp --out DIR

``cp`` runs ``lighthouse_hf.ContextParallelTrainer`` with accelerate's ``ParallelismConfig(cp_size=2)``
(accelerate needs FSDP2 for it on GPUs): one sequence split across both ranks, Lighthouse through
``lighthouse_hf.context_parallel``, the dense recovery steps through Trainer's own context
parallelism (torch's ring attention). On a CPU only ``ddp`` runs (gloo); accelerate refuses
``ParallelismConfig`` there. Writes ``DIR/trainer_{mode}.json`` (rank 0, both ranks' records);
exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import MODELS, llama, write_json
from transformers import AttentionInterface, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

import lighthouse_hf
from lighthouse_hf import ContextParallelTrainer, RecoveryCallback
from lighthouse_hf.context_parallel import CONTEXT_PARALLEL_KWARG
from lighthouse_hf.integration import lighthouse_attention_forward

STEPS, RECOVERY_AT, SAVE_EVERY = 4, 3, 2
RESUME_TOL = 1e-3

PRESETS = {
    # model size, sequence length, Lighthouse settings (chunks of a 2-rank split fall on tiles)
    "gpu": ("small", 16384, dict(levels=3, pooling=4, topk=1024, dense_layers=[0])),
    "cpu": ("tiny", 2048, dict(levels=3, pooling=4, topk=128, dense_layers=[0])),
}


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, count: int, seq_len: int, vocab: int) -> None:
        self.blocks = torch.randint(0, vocab, (count, seq_len), generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class Probe(TrainerCallback):
    """Per optimizer step: the attention implementation, and how many ``"lighthouse"`` attention
    calls took the single-device path and the context-parallel path."""

    def __init__(self) -> None:
        self.implementations: list[str] = []
        self.calls: list[dict[str, int]] = []
        self._now = {"single": 0, "context_parallel": 0}

        def counting(*args, **kwargs):
            self._now["context_parallel" if kwargs.get(CONTEXT_PARALLEL_KWARG) is not None else "single"] += 1
            return lighthouse_attention_forward(*args, **kwargs)

        AttentionInterface.register(lighthouse_hf.ATTN_IMPLEMENTATION, counting)

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        self._now = {"single": 0, "context_parallel": 0}
        base = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
        self.implementations.append(base.config._attn_implementation)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.calls.append(dict(self._now))


def arguments(mode: str, output_dir: Path, world: int) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    if not torch.cuda.is_available():
        settings.update(use_cpu=True, ddp_backend="gloo")
    if mode == "ddp":
        settings.update(ddp_find_unused_parameters=False)
    else:
        settings.update(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "state_dict_type": "FULL_STATE_DICT",
                "reshard_after_forward": True,
            },
        )
    if mode == "cp":
        from accelerate.parallelism_config import ParallelismConfig

        settings.update(parallelism_config=ParallelismConfig(cp_size=world))
    return TrainingArguments(**settings)


def train(mode: str, preset, run_dir: Path, world: int, resume: Path | None = None, seed: int = 0):
    size, seq, settings = preset
    # Trainer's own context parallelism (the dense recovery steps) is tested with plain multi-head
    # attention: whether torch's ring attention takes grouped KV heads depends on the torch version.
    overrides = {"num_key_value_heads": MODELS[size]["num_attention_heads"]} if mode == "cp" else {}
    model = llama(size, seq, settings, seed=seed, **overrides)
    probe = Probe()
    trainer_class = ContextParallelTrainer if mode == "cp" else Trainer
    trainer = trainer_class(
        model=model,
        args=arguments(mode, run_dir, world),
        train_dataset=RandomBlocks(16, seq, model.config.vocab_size),
        callbacks=[RecoveryCallback(at=RECOVERY_AT), probe],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    return trainer, probe, losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "cp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    work = out / f"work_{args.mode}"
    preset = PRESETS[args.preset]

    # TrainingArguments joins the torchrun group; the world size is known once it exists.
    world = int(os.environ.get("WORLD_SIZE", 1))
    trainer, probe, losses = train(args.mode, preset, work / "run", world)
    rank = dist.get_rank()
    final = work / "final"
    trainer.save_model(str(final))  # every rank: FSDP2 gathers the full state dict collectively
    record = dict(
        rank=rank,
        implementations=probe.implementations,
        calls=probe.calls,
        losses=losses,
        checkpoint_recovery_steps={
            name: json.loads((work / "run" / name / "config.json").read_text())["lighthouse"]["recovery_step"]
            for name in ("checkpoint-2", "checkpoint-4")
        }
        if rank == 0
        else None,
    )
    del trainer

    resume = work / "run" / "checkpoint-2"
    resumed, resumed_probe, resumed_losses = train(args.mode, preset, work / "resumed", world, resume=resume, seed=99)
    record.update(
        resumed_implementations=resumed_probe.implementations, resumed_calls=resumed_probe.calls, resumed_losses=resumed_losses
    )
    del resumed

    if rank == 0:
        try:
            report = lighthouse_hf.export_checkpoint(final, work / "exported")
            record["export"] = {
                name: getattr(report, name)
                for name in ("verified", "max_logit_diff", "recovery_step", "checked_with", "tensors")
            }
        except Exception as error:  # reported as a failed check below
            record["export"] = {"error": f"{type(error).__name__}: {error}"}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    failures = check(args.mode, records)
    write_json(out / f"trainer_{args.mode}.json", dict(mode=args.mode, world=len(records), failures=failures, ranks=records))
    print(f"trainer {args.mode}: {'PASSED' if not failures else 'FAILED ' + '; '.join(failures)}", flush=True)
    first = records[0]
    print(json.dumps(dict(losses=first["losses"], resumed_losses=first["resumed_losses"], export=first.get("export"))), flush=True)
    return 1 if failures else 0


def check(mode: str, records: list[dict]) -> list[str]:
    failures = []
    lighthouse, dense = lighthouse_hf.ATTN_IMPLEMENTATION, "sdpa"
    path = "context_parallel" if mode == "cp" else "single"
    other = "single" if mode == "cp" else "context_parallel"
    for r in records:
        if r["implementations"] != [lighthouse] * RECOVERY_AT + [dense] * (STEPS - RECOVERY_AT):
            failures.append(f"rank {r['rank']}: phases {r['implementations']}")
        if r["resumed_implementations"] != [lighthouse] * (RECOVERY_AT - SAVE_EVERY) + [dense] * (STEPS - RECOVERY_AT):
            failures.append(f"rank {r['rank']}: resumed phases {r['resumed_implementations']}")
        for name in ("calls", "resumed_calls"):
            for step, calls in enumerate(r[name], start=1 if name == "calls" else SAVE_EVERY + 1):
                ran_lighthouse = step <= RECOVERY_AT
                if (calls[path] > 0) != ran_lighthouse or calls[other]:
                    failures.append(f"rank {r['rank']}: {name} at step {step}: {calls}")
        if any(not math.isfinite(v) for v in r["losses"].values()):
            failures.append(f"rank {r['rank']}: losses {r['losses']}")
        for step in range(SAVE_EVERY + 1, STEPS + 1):
            full, again = r["losses"].get(step), r["resumed_losses"].get(step)
            if full is None or again is None or abs(full - again) > RESUME_TOL * abs(full):
                failures.append(f"rank {r['rank']}: step {step} loss {full} resumed {again}")
    if any(r["losses"] != records[0]["losses"] for r in records):
        failures.append("ranks logged different losses")
    if records[0]["checkpoint_recovery_steps"] != {"checkpoint-2": None, "checkpoint-4": RECOVERY_AT}:
        failures.append(f"checkpoint recovery steps {records[0]['checkpoint_recovery_steps']}")
    export = records[0].get("export", {})
    if not export.get("verified") or export.get("recovery_step") != RECOVERY_AT:
        failures.append(f"export {export}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
