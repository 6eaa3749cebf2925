"""Qwen3-MoE: Qwen3's attention (an RMSNorm on each head's q and k before the attention function)
with mixture-of-experts MLPs, which Lighthouse does not touch."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(model_type="qwen3_moe", per_head_qk_norm=("q_norm", "k_norm"))
