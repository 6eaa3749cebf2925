"""Tiny Lighthouse models, data and probes shared by the training tests and the DDP worker script."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, TrainerCallback, TrainingArguments

import lighthouse_hf
from helpers import LighthouseCalls

SEQ_LEN = 2048
SETTINGS = dict(levels=3, pooling=4, topk=128, dense_layers=[])
NUM_LAYERS = 2


def tiny_lighthouse_model(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama whose every layer runs Lighthouse at SEQ_LEN (1152 of 2048 positions)."""
    assert lighthouse_hf.compressed_length(SEQ_LEN, **{k: SETTINGS[k] for k in ("levels", "pooling", "topk")}) < SEQ_LEN
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ_LEN,
    )
    return lighthouse_hf.apply_lighthouse(LlamaForCausalLM(config), **SETTINGS)


class RandomBlocks(torch.utils.data.Dataset):
    """Fixed random token blocks: a different but reproducible block per index."""

    def __init__(self, count: int, seq_len: int = SEQ_LEN, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.blocks = torch.randint(0, vocab, (count, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class PhaseProbe(TrainerCallback):
    """Per optimizer step: the attention implementation it ran with and how many Lighthouse calls
    it made (forwards, micro-batches and gradient-checkpointing recomputes included), read from
    ``calls`` (the ``lighthouse_calls`` fixture, or ``helpers.count_lighthouse_calls`` in a worker)."""

    def __init__(self, calls: LighthouseCalls) -> None:
        self.implementations: list[str] = []
        self.lighthouse_calls: list[int] = []
        self.calls = calls
        self.calls_before_step = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.calls_before_step = self.calls.total
        base = next(module for module in model.modules() if isinstance(module, PreTrainedModel))
        self.implementations.append(base.config._attn_implementation)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.lighthouse_calls.append(self.calls.total - self.calls_before_step)


def step_losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}
