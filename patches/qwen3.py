"""Qwen3: windows as Qwen2 (from ``layer_types``); each head's q and k pass an RMSNorm (``q_norm``,
``k_norm``) before the attention function, so the norms Lighthouse scores are the normalized ones:
exactly ``sqrt(head_dim)`` times the norm weight's RMS at initialization, where every score ties."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(model_type="qwen3", per_head_qk_norm=("q_norm", "k_norm"))
