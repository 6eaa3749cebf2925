"""Qwen2: ``use_sliding_window`` with ``max_window_layers``, resolved by Transformers into ``layer_types``."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(model_type="qwen2")
