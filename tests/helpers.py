"""Plain helpers shared by the test modules and by the worker scripts they spawn (which cannot use
fixtures); the fixtures built on them live in conftest.py."""

from __future__ import annotations

import socket
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config, Qwen3Config

import lighthouse_hf.context_parallel
import lighthouse_hf.integration
from lighthouse_hf.ops import fused
from lighthouse_hf.ops.plan import LighthousePlan

# Sizes of the tiny models: every family gets the same ones, so only the architecture differs.
TINY_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
# The config class of each family and what it needs beyond TINY_SIZES to build the plain
# (full-attention, head_dim = hidden / heads) variant.
FAMILIES: dict[str, tuple[type[PreTrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, dict(head_dim=16)),
    "mistral": (MistralConfig, dict(sliding_window=None)),
}


def tiny_config(family: str, **overrides: Any) -> PreTrainedConfig:
    """A fresh tiny config of ``family`` (a key of FAMILIES); ``overrides`` win over the defaults."""
    config_class, extras = FAMILIES[family]
    return config_class(**{**TINY_SIZES, **extras, **overrides})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The norm of ``a - b`` over the norm of ``b``, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LighthouseCalls:
    """How many times the Lighthouse paths ran: ``single_device`` counts the registered attention
    function's calls of ``lighthouse_attention``, ``context_parallel`` its context-parallel path's
    calls of ``lighthouse_attention_context_parallel``. Dense layers and dense fallbacks count in neither."""

    def __init__(self) -> None:
        self.single_device = 0
        self.context_parallel = 0

    @property
    def total(self) -> int:
        return self.single_device + self.context_parallel


def count_lighthouse_calls(setattr_: Callable[[object, str, object], None]) -> LighthouseCalls:
    """Wraps both Lighthouse entry points with counters and returns the counts.

    ``setattr_`` installs the wrappers: ``monkeypatch.setattr`` (the ``lighthouse_calls`` fixture,
    or ``pytest.MonkeyPatch.context()`` in a worker process), so that they are removed afterwards.
    """
    calls = LighthouseCalls()
    single_device = lighthouse_hf.integration.lighthouse_attention
    context_parallel = lighthouse_hf.context_parallel.lighthouse_attention_context_parallel

    def counted_single_device(*args, **kwargs):
        calls.single_device += 1
        return single_device(*args, **kwargs)

    def counted_context_parallel(*args, **kwargs):
        calls.context_parallel += 1
        return context_parallel(*args, **kwargs)

    setattr_(lighthouse_hf.integration, "lighthouse_attention", counted_single_device)
    setattr_(lighthouse_hf.context_parallel, "lighthouse_attention_context_parallel", counted_context_parallel)
    return calls


def decoder_layer_step(layer, hidden, position_ids, position_embeddings):
    """A decoder layer's output on ``hidden`` (no mask) and the gradient of its mean square with
    respect to ``hidden``: what the compile tests compare between eager and compiled layers."""
    out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
    out = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(out.float().square().mean(), hidden)[0]


def write_tiny_llama_gguf(directory: Path, sizes: dict[str, int], context: int) -> Path:
    """A small Llama of ``sizes`` (LlamaConfig keys; K/V heads half the heads) as GGUF in a new
    ``directory``, its matrices quantized to Q8_0 (what a downloaded GGUF holds)."""
    import gguf
    import numpy as np

    directory.mkdir()
    hidden, kv_width, ffn = sizes["hidden_size"], sizes["hidden_size"] // 2, sizes["intermediate_size"]
    writer = gguf.GGUFWriter(str(directory / "tiny-llama.Q8_0.gguf"), "llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(sizes["num_hidden_layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(sizes["num_attention_heads"])
    writer.add_head_count_kv(sizes["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hidden // sizes["num_attention_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([bytes([i]).hex() for i in range(sizes["vocab_size"])])
    writer.add_token_types([1] * sizes["vocab_size"])
    writer.add_token_merges([])
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, values)
            return
        quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    tensor("token_embd.weight", sizes["vocab_size"], hidden)
    for i in range(sizes["num_hidden_layers"]):
        for name, shape in (
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_width, hidden)), ("attn_v", (kv_width, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)),
        ):
            tensor(f"blk.{i}.{name}.weight", *shape)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", sizes["vocab_size"], hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return directory


def change_after(x: torch.Tensor, t: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` ``[B, H, S, D]`` with every position after t changed: scaled by 10, replaced by values
    from elsewhere in the sequence (rolled), or replaced by large random values drawn with
    ``generator`` (on its device)."""
    changed = x.clone()
    if how == "scaled":
        changed[:, :, t + 1 :] *= 10
    elif how == "rolled":
        changed[:, :, t + 1 :] = x.roll(97, dims=2)[:, :, t + 1 :] * 3
    else:
        later = changed[:, :, t + 1 :]
        changed[:, :, t + 1 :] = (torch.randn(later.shape, device=generator.device, generator=generator) * 5).to(x.dtype)
    return changed


def span_end_scores_apart(q: torch.Tensor, k: torch.Tensor, plan: LighthousePlan,
                          inv_freq: torch.Tensor) -> list[tuple[bool, int, int]]:
    """(causal, level, row) of every score row that the score pass writes otherwise with span-end
    RoPE than with pooled RoPE, to the last bit, under both selection rules; empty where all agree.
    A span-end pass that computed its norms apart from the pooled pass's could sum them in another
    order, and move a selection."""
    rotary = fused.rotary_table(inv_freq, plan)
    apart = []
    for causal in (False, True):
        pooled, span_end = (fused._score_pyramids(q, k, plan, rotary=table, causal=causal)[:2] for table in (None, rotary))
        for level in range(1, plan.levels):
            slots = plan.padded_len // plan.pooling**level
            for row in (level - 1, plan.levels - 2 + level) if causal else (level - 1,):
                if not all(torch.equal(a[:, row, :slots], b[:, row, :slots]) for a, b in zip(pooled, span_end)):
                    apart.append((causal, level, row))
    return apart
