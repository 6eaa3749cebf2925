"""Qwen3: as Qwen2 (windows from ``layer_types``); its per-head q/k RMSNorm runs before the attention
function, so Lighthouse scores the normalized q and k, as the specification asks."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(model_type="qwen3")
