"""Lighthouse settings: a validated dataclass stored as the plain dict ``config.lighthouse``."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from .ops import COMBINES, ROPES, SELECTIONS
from .ops.plan import check_levels, check_pooling, check_topk
from .validation import check_choice, is_int

CONFIG_KEY = "lighthouse"
"""The attribute of a Transformers config (and key of ``config.json``) holding the settings."""

ATTN_IMPLEMENTATION = "lighthouse"
"""The name registered in Transformers' attention and mask registries."""


def _check_dense_layers(value: object) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"dense_layers must be a list of layer indices (negative counts from the end), got {value!r}")
    layers = list(value)
    if not all(is_int(layer) for layer in layers):
        raise ValueError(f"dense_layers must hold integers (negative counts from the end), got {value!r}")
    repeated = _repeated(layers)
    if repeated:
        raise ValueError(f"dense_layers lists {repeated} more than once, got {value!r}")
    return layers


def _check_min_seq_len(value: object) -> int | None:
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"min_seq_len must be None or an integer >= 1, got {value!r}")
    return value


def _check_recovery_step(value: object) -> int | None:
    if value is not None and (not is_int(value) or value < 0):
        raise ValueError(f"recovery_step must be None or an integer >= 0, got {value!r}")
    return value


SCORES = ("pre_norm", "qk")


def _choice(name: str, allowed: tuple[str, ...]):
    return functools.partial(check_choice, name, allowed=allowed)


def _repeated(layers: list[int]) -> list[int]:
    return sorted({layer for layer in layers if layers.count(layer) > 1})


_CHECKS = {
    "levels": check_levels,
    "pooling": check_pooling,
    "topk": check_topk,
    "dense_layers": _check_dense_layers,
    "min_seq_len": _check_min_seq_len,
    "recovery_step": _check_recovery_step,
    "rope": _choice("rope", ROPES),
    "scores": _choice("scores", SCORES),
    "selection": _choice("selection", SELECTIONS),
    "combine": _choice("combine", COMBINES),
}


@dataclass
class LighthouseConfig:
    """Where and how a model uses Lighthouse attention. Every field is checked when set.

    - ``levels``, ``pooling``, ``topk``: the pyramid depth L, the pooling factor p (a power of two)
      and the selection budget K (a multiple of 128).
    - ``dense_layers``: layers that always use dense SDPA; negative indices count from the end
      (the paper keeps the first two and last two layers dense).
    - ``min_seq_len``: below this length use dense SDPA; None uses Lighthouse whenever it compresses.
    - ``recovery_step``: the global training step at which dense recovery began (None: never);
      written by the training workflow so that a checkpoint says which phase it is in.

    Beyond the published method (README, "Method options"; the defaults reproduce it):

    - ``rope``: ``"pooled"`` pools q and k as rotated (the published method); ``"span_end"`` takes
      each pooled row of q and k at the position of its span's last token.
    - ``scores``: ``"pre_norm"`` scores q and k before a family's per-head q/k norm (Qwen3), which
      for families without one is ``"qk"``: the norms of q and k as attention receives them.
    - ``selection``: ``"published"``, the specification's top-k cascade; ``"causal"`` selects so
      that the output at position t depends on no input after t.
    - ``combine``: ``"sum"`` adds the outputs of the levels that reach a position (the published
      method); ``"mean"`` averages them.
    """

    levels: int = 3
    pooling: int = 4
    topk: int = 2048
    dense_layers: list[int] = field(default_factory=lambda: [0, 1, -2, -1])
    min_seq_len: int | None = None
    recovery_step: int | None = None
    rope: str = "pooled"
    scores: str = "pre_norm"
    selection: str = "published"
    combine: str = "sum"

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _CHECKS:
            raise AttributeError(f"LighthouseConfig has no setting {name!r}; settings: {', '.join(_CHECKS)}")
        super().__setattr__(name, _CHECKS[name](value))

    @classmethod
    def from_dict(cls, settings: Any) -> "LighthouseConfig":
        """Settings from ``config.lighthouse``: missing keys take the defaults, unknown keys raise."""
        if settings is None:
            return cls()
        if isinstance(settings, LighthouseConfig):
            return cls(**settings.to_dict())
        if not isinstance(settings, dict):
            raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
        unknown = sorted(set(settings) - set(_CHECKS))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed keys: {', '.join(_CHECKS)}")
        return cls(**settings)

    @classmethod
    def from_model_config(cls, config: Any) -> "LighthouseConfig":
        """The settings in ``config.lighthouse``; a ValueError names ``config.lighthouse`` and the bad key."""
        try:
            return cls.from_dict(getattr(config, CONFIG_KEY, None))
        except ValueError as error:
            raise ValueError(f"config.{CONFIG_KEY}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dense_layer_set(self, num_layers: int | None) -> frozenset[int]:
        """The dense layers as non-negative indices; raises if one lies outside the model or two
        entries name the same layer (``[1, -3]`` in 4 layers)."""
        if num_layers is None:
            if any(layer < 0 for layer in self.dense_layers):
                raise ValueError("dense_layers has negative entries but the model config has no num_hidden_layers")
            return frozenset(self.dense_layers)
        out_of_range = [layer for layer in self.dense_layers if not -num_layers <= layer < num_layers]
        if out_of_range:
            raise ValueError(
                f"dense_layers entries {out_of_range} lie outside a model of {num_layers} layers "
                f"(allowed: {-num_layers}..{num_layers - 1})"
            )
        layers = [layer % num_layers for layer in self.dense_layers]
        repeated = _repeated(layers)
        if repeated:
            raise ValueError(
                f"dense_layers entries {self.dense_layers} name layers {repeated} twice in a model of {num_layers} layers"
            )
        return frozenset(layers)
