"""Per-family adapters (installed as ``lighthouse_hf.patches``).

Llama, Qwen2, Qwen3 and Mistral all dispatch attention through Transformers' registry, so no
modeling code is patched; an adapter only states what differs between families: how many layers
a model has, which layers run a sliding window, and whether each head's q and k are normalized
before attention (Qwen3 and Qwen3-MoE). Any other architecture gets the generic adapter, which reads the same
facts from the standard config fields.
"""

from __future__ import annotations

from .base import FamilyAdapter, generic
from .llama import ADAPTER as LLAMA
from .mistral import ADAPTER as MISTRAL
from .qwen2 import ADAPTER as QWEN2
from .qwen3 import ADAPTER as QWEN3
from .qwen3_moe import ADAPTER as QWEN3_MOE

ADAPTERS = {adapter.model_type: adapter for adapter in (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE)}


def adapter_for(config) -> FamilyAdapter:
    return ADAPTERS.get(getattr(config, "model_type", None), generic)


__all__ = ["FamilyAdapter", "ADAPTERS", "adapter_for"]
