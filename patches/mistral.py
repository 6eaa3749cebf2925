"""Mistral: one ``sliding_window`` (4096 in Mistral-7B-v0.1, None in later releases) for every layer."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(
    model_type="mistral",
    sliding_window=lambda config, layer_idx: getattr(config, "sliding_window", None),
)
