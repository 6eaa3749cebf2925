"""Llama: full causal attention in every layer; ``num_key_value_heads`` may be unset (MHA)."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(model_type="llama", sliding_window=lambda config, layer_idx: None)
