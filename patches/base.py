from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _layer_types_window(config: Any, layer_idx: int) -> int | None:
    """Transformers 5 marks windowed layers in ``config.layer_types``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


@dataclass(frozen=True)
class FamilyAdapter:
    """What lighthouse-hf needs to know about one model family beyond the attention registry."""

    model_type: str
    sliding_window: Callable[[Any, int], int | None] = _layer_types_window
    """The sliding window of layer ``layer_idx`` (None: full causal attention)."""
    per_head_qk_norm: tuple[str, str] | None = None
    """Names of the attention module's per-head RMSNorms of q and k, for families that normalize
    each head's q and k before the attention function sees them (None: no such norm)."""

    def num_layers(self, config: Any) -> int | None:
        return getattr(config, "num_hidden_layers", None)

    def windowed_layers(self, config: Any) -> dict[int, int]:
        """Layer index -> window, for every layer that has one."""
        layers = self.num_layers(config) or 0
        windows = {i: self.sliding_window(config, i) for i in range(layers)}
        return {i: w for i, w in windows.items() if w is not None}


generic = FamilyAdapter(model_type="generic")
