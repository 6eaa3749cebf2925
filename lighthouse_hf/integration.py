"""Transformers integration: the ``"lighthouse"`` attention function and mask function.

The mask function never builds an S x S mask: it returns None when there is nothing to mask, the
2-D padding mask when padding is the only thing to mask, and otherwise a :class:`DeferredMask`
that only the dense path turns into a 4-D mask. The attention function runs Lighthouse where it
applies and Transformers' own SDPA function everywhere else, so dense calls match
``attn_implementation="sdpa"`` exactly.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import patches
from .config import ATTN_IMPLEMENTATION, CONFIG_KEY, LighthouseConfig
from .ops import LighthousePlan, lighthouse_attention

CONTEXT_PARALLEL_KWARG = "lighthouse_cp_group"
"""Forward keyword naming the process group a sharded sequence is split across (context parallelism)."""


class LighthouseWarning(UserWarning):
    """Lighthouse does not run as configured somewhere (Python shows each message once by default)."""


@dataclass(frozen=True)
class DeferredMask:
    """A mask the dense path builds on demand (Transformers' ``sdpa_mask`` with the same arguments).

    ``reason`` says why Lighthouse cannot run under it (padding, packed documents, a custom mask);
    None means the only thing it adds is an active sliding window, which Lighthouse layers ignore.
    """

    reason: str | None
    plain_shape: bool
    mask_kwargs: dict[str, Any] = field(repr=False)

    def materialize(self) -> torch.Tensor:
        return sdpa_mask(**{**self.mask_kwargs, "allow_is_causal_skip": False})


def lighthouse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | DeferredMask | None:
    """Mask function registered under ``"lighthouse"`` (same arguments as ``sdpa_mask``)."""
    padding = None
    if attention_mask is not None:
        padding = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
        if padding.shape[-1] < kv_length:  # a cache longer than the mask: the rest is real
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=True)
        if padding.all():
            padding = None
    # A custom mask function (use_vmap) or a packed-sequence mask (no causal skip) is something
    # only the full mask can express.
    custom = use_vmap or not allow_is_causal_skip
    window_active = local_size is not None and q_offset + q_length - kv_offset > local_size
    plain_shape = q_length == kv_length and q_offset == 0 and kv_offset == 0
    if not custom and not window_active:
        if padding is None and (plain_shape or q_length == 1):
            return None
        if padding is not None and plain_shape:
            return padding
    if use_vmap:
        reason = "a custom attention mask"
    elif custom and q_length > 1:
        reason = "packed-document boundaries"
    elif padding is not None:
        reason = "padding"
    else:
        reason = None
    mask_kwargs = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )
    return DeferredMask(reason, plain_shape, mask_kwargs)


def _dense_mask(
    attention_mask: torch.Tensor | DeferredMask | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    if isinstance(attention_mask, DeferredMask):
        return attention_mask.materialize()
    if attention_mask is not None and attention_mask.dim() == 2:
        return sdpa_mask(
            batch_size=query.shape[0],
            q_length=query.shape[2],
            kv_length=key.shape[2],
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            device=query.device,
        )
    return attention_mask


def _is_dense_layer(module: torch.nn.Module, settings: LighthouseConfig) -> bool:
    layer_idx = getattr(module, "layer_idx", None)
    num_layers = patches.adapter_for(module.config).num_layers(module.config)
    return layer_idx is not None and layer_idx in settings.dense_layer_set(num_layers)


def _length_reason(seq_len: int, settings: LighthouseConfig) -> str | None:
    """Why a sequence of ``seq_len`` runs dense whatever its inputs; None: long enough for Lighthouse."""
    if settings.min_seq_len is not None and seq_len < settings.min_seq_len:
        return "shorter than min_seq_len"
    if not LighthousePlan(seq_len, settings.levels, settings.pooling, settings.topk).compresses:
        return "too short to compress"
    return None


def _dense_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    settings: LighthouseConfig,
) -> tuple[str, bool] | None:
    """Why this call runs dense, and whether the user should hear about it; None: run Lighthouse."""
    if _is_dense_layer(module, settings):
        return "dense layer", False
    seq_len = query.shape[2]
    if seq_len != key.shape[2]:
        return "decoding with a KV cache", False
    if isinstance(attention_mask, DeferredMask):
        if attention_mask.reason is not None:
            return attention_mask.reason, True
        if not attention_mask.plain_shape:
            return "query offsets", False
    elif isinstance(attention_mask, torch.Tensor):
        return ("padding" if attention_mask.dim() == 2 else "an explicit 4-D attention mask"), True
    length = _length_reason(seq_len, settings)
    return None if length is None else (length, False)


def _autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, rotary embeddings leave q and k in float32 while v is in the autocast dtype;
    SDPA (an autocast op) casts all three to that dtype, so Lighthouse does the same."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def lighthouse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | DeferredMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered under ``"lighthouse"``: ``[B, H, S, D]`` in, ``[B, S, H, D]`` out."""
    group = kwargs.pop(CONTEXT_PARALLEL_KWARG, None)
    if group is not None:
        # imported here: context_parallel builds on this module
        from .context_parallel import context_parallel_attention_forward

        out = context_parallel_attention_forward(
            module, query, key, value, attention_mask, group=group, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    settings = LighthouseConfig.from_model_config(module.config)
    dense = _dense_reason(module, query, key, attention_mask, settings)
    if dense is None:
        if dropout:
            warnings.warn("Lighthouse attention applies no attention dropout (attention_dropout is ignored).", LighthouseWarning)
        query, key, value = _autocast_dtype(query, key, value)
        out = lighthouse_attention(
            query, key, value, levels=settings.levels, pooling=settings.pooling, topk=settings.topk, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    reason, tell = dense
    if tell:
        warnings.warn(f"Lighthouse attention falls back to dense SDPA for inputs with {reason}.", LighthouseWarning)
    kwargs.pop("sliding_window", None)  # already part of the mask
    mask = _dense_mask(attention_mask, query, key)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def prepare_config(config: Any) -> LighthouseConfig:
    """Validate ``config.lighthouse`` against the model and write it back with every key filled in."""
    adapter = patches.adapter_for(config)
    try:
        settings = LighthouseConfig.from_model_config(config)
        dense_layers = settings.dense_layer_set(adapter.num_layers(config))
    except ValueError as error:
        raise ValueError(f"config.{CONFIG_KEY}: {error}") from None
    setattr(config, CONFIG_KEY, settings.to_dict())
    windowed = sorted(set(adapter.windowed_layers(config)) - dense_layers)
    if windowed:
        window = adapter.windowed_layers(config)[windowed[0]]
        warnings.warn(
            f"{adapter.model_type}: layers {windowed} have a {window}-token sliding window. Lighthouse "
            "has no window: in those layers it attends over the whole causal prefix through its "
            "pyramid. Dense layers and dense fallbacks keep the window.",
            LighthouseWarning,
        )
    return settings


def _check_at_load(original):
    """Wrap ``PreTrainedModel.get_correct_attn_implementation``, which Transformers calls when a model
    is built or loaded and on ``set_attn_implementation``, so bad settings fail at load time."""

    @functools.wraps(original)
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        implementation = original(self, requested_attention, *args, **kwargs)
        if implementation == ATTN_IMPLEMENTATION:
            prepare_config(self.config)
        return implementation

    get_correct_attn_implementation.lighthouse_wrapped = True
    return get_correct_attn_implementation


def register() -> None:
    """Register ``"lighthouse"`` with Transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, lighthouse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lighthouse_mask)
    current = PreTrainedModel.get_correct_attn_implementation
    if not getattr(current, "lighthouse_wrapped", False):
        PreTrainedModel.get_correct_attn_implementation = _check_at_load(current)


def apply_lighthouse(target: Any, settings: LighthouseConfig | dict | None = None, **overrides: Any) -> Any:
    """Write Lighthouse settings into a model or config and switch it to ``"lighthouse"`` attention.

    ``apply_lighthouse(model, topk=1024)`` or ``apply_lighthouse(config, LighthouseConfig(levels=4))``;
    returns ``target``. A config switched here builds Lighthouse models with ``from_config``.
    """
    merged = LighthouseConfig.from_dict(settings).to_dict()
    merged.update(overrides)
    config = target.config if isinstance(target, PreTrainedModel) else target
    setattr(config, CONFIG_KEY, LighthouseConfig.from_dict(merged).to_dict())
    prepare_config(config)
    if isinstance(target, PreTrainedModel):
        target.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        config._attn_implementation = ATTN_IMPLEMENTATION
    return target
