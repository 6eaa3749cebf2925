"""Helpers shared by the multi-GPU scripts in this folder (each runs under torchrun, on CUDA with
NCCL or on a CPU with gloo)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import lighthouse_hf

# Llama sizes: "tiny" keeps the CPU runs of these scripts (and CI) to seconds, "small" the GPU checks.
MODELS = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1376, vocab_size=4096
    ),
    # the benchmark model: 156M parameters, head_dim 64
    "bench": dict(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2816,
        vocab_size=32000,
    ),
}


def init_distributed(timeout_s: int = 300) -> tuple[int, int, torch.device]:
    """Join the torchrun group: NCCL on CUDA (one GPU per local rank), gloo on a CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        torch.set_num_threads(1)  # two ranks share a small CPU
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def llama(size: str, seq_len: int, settings: dict, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``size`` (config ``overrides`` applied) with Lighthouse
    ``settings`` (float32 weights)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**MODELS[size], **overrides}, max_position_embeddings=seq_len, tie_word_embeddings=False)
    return lighthouse_hf.apply_lighthouse(LlamaForCausalLM(config), **settings)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
