"""Transformers integration: the ``"lighthouse"`` attention function, its registration, and
:func:`apply_lighthouse`.

The attention function runs Lighthouse where it applies and Transformers' own SDPA function
everywhere else (so dense calls match ``attn_implementation="sdpa"`` exactly); the rules for which
is which are in :mod:`lighthouse_hf.dispatch`. A packed call (documents marked by restarting
position ids or by ``cu_seq_lens_q/k``) keeps its documents apart in every layer: Lighthouse layers
run Lighthouse per document, dense layers dense attention per document, neither with an S x S mask
(:mod:`lighthouse_hf.ops.varlen`). A call that carries a context-parallel group runs
:mod:`lighthouse_hf.context_parallel` instead. Registering the attention and mask functions is all
that ``import lighthouse_hf`` does: no Transformers class is modified.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from . import dispatch
from .config import ATTN_IMPLEMENTATION, CONFIG_KEY, LighthouseConfig
from .context_parallel import CONTEXT_PARALLEL_KWARG, context_parallel_attention_forward
from .hf_internals import set_config_attn_implementation
from .ops import Documents, dense_causal_attention_varlen, lighthouse_attention, lighthouse_attention_varlen


def lighthouse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | dispatch.DeferredMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered under ``"lighthouse"``: ``[B, H, S, D]`` in, ``[B, S, H, D]`` out."""
    group = kwargs.pop(CONTEXT_PARALLEL_KWARG, None)
    if group is not None:
        flash = [name for name in dispatch.FLASH_VARLEN_KWARGS if kwargs.get(name) is not None]
        if flash:
            raise ValueError(
                f"context parallelism does not support packed documents, but the call has {', '.join(flash)}; "
                "train packed batches without lighthouse_cp_group"
            )
        out = context_parallel_attention_forward(
            module, query, key, value, attention_mask, group=group, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    settings = dispatch.settings_of(module)
    documents = dispatch.documents_of(attention_mask, query, key, kwargs)
    if documents is not None:
        return _packed_attention(module, settings, query, key, value, attention_mask, documents, dropout, scaling, kwargs)
    dense = dispatch.dense_reason(module, query, key, attention_mask, settings, dispatch.is_causal_call(module, kwargs))
    if dense is not None:
        dispatch.report_dense(module, settings, *dense, seq_len=query.shape[2])
        return dispatch.dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dispatch.warn_ignored_dropout(dropout)
    query, key, value = dispatch.autocast_inputs(query, key, value)
    arguments = dispatch.op_arguments(module, settings, query, key, query.shape[2])
    out = lighthouse_attention(query, key, value, scale=scaling, **arguments)
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(
    module: torch.nn.Module,
    settings: LighthouseConfig,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    documents: Documents,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """A packed call: every document attends only within itself, in dense layers (with their
    sliding window and dropout) and Lighthouse layers alike."""
    reason = dispatch.layer_reason(module, settings, dispatch.is_causal_call(module, kwargs))
    if reason == dispatch.NON_CAUSAL:
        if isinstance(attention_mask, dispatch.DeferredMask) and kwargs.get("cu_seq_lens_q") is None:
            # Transformers' own packed mask keeps the documents of a non-causal module apart.
            return dispatch.dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        raise ValueError(f"layer {getattr(module, 'layer_idx', None)} is not causal; cu_seq_lens_q marks documents for causal layers only")
    query, key, value = dispatch.autocast_inputs(query, key, value)
    if reason is not None:
        out = dense_causal_attention_varlen(
            query, key, value, documents, scale=scaling, window=kwargs.get("sliding_window"), dropout=dropout
        )
    else:
        dispatch.warn_ignored_dropout(dropout)
        dispatch.report_short_documents(module, settings, documents)
        # A length-dependent RoPE (dynamic, longrope) for the longest document: the longest range of
        # positions that restart at 0, as the rotary embedding saw them.
        arguments = dispatch.op_arguments(module, settings, query, key, documents.max_length)
        out = lighthouse_attention_varlen(
            query, key, value, documents, scale=scaling, min_seq_len=settings.min_seq_len,
            dense_window=kwargs.get("sliding_window"), **arguments
        )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"lighthouse"`` in Transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, lighthouse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dispatch.lighthouse_mask)


def apply_lighthouse(target: Any, settings: LighthouseConfig | dict | None = None, **overrides: Any) -> Any:
    """Write Lighthouse settings into a model or config and switch it to ``"lighthouse"`` attention.

    ``apply_lighthouse(model, topk=1024)`` or ``apply_lighthouse(config, LighthouseConfig(levels=4))``;
    returns ``target``. ``target`` may also wrap one Transformers model (a PEFT model, DDP), which
    is then the one switched. A config switched here builds Lighthouse models with ``from_config``.
    The settings are checked now (a ValueError names the bad key, prefixed ``config.lighthouse:``
    where the check is against the model, and leaves the config as it was), and a model in which
    no layer would run Lighthouse gets a ``LighthouseWarning``.
    """
    model = _transformers_model(target)
    config = target if model is None else model.config
    merged = LighthouseConfig.from_dict(settings).to_dict()
    merged.update(overrides)
    had_settings, before = hasattr(config, CONFIG_KEY), getattr(config, CONFIG_KEY, None)
    setattr(config, CONFIG_KEY, LighthouseConfig.from_dict(merged).to_dict())
    try:
        checked = dispatch.check_model_settings(config)
    except ValueError:
        if had_settings:
            setattr(config, CONFIG_KEY, before)
        else:
            delattr(config, CONFIG_KEY)
        raise
    if model is not None:
        dispatch.record_pre_norm_scores(model, checked)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        set_config_attn_implementation(config, ATTN_IMPLEMENTATION)
    return target


def _transformers_model(target: Any) -> PreTrainedModel | None:
    """The model ``apply_lighthouse`` switches: ``target`` itself, or the one Transformers model a
    wrapper holds; None for a config. Anything else is a TypeError naming ``target``."""
    if isinstance(target, PreTrainedModel):
        return target
    if isinstance(target, PreTrainedConfig):
        return None
    if isinstance(target, torch.nn.Module):
        outermost: dict[int, PreTrainedModel] = {}
        for module in target.modules():  # outer modules first; a model and its base share a config
            if isinstance(module, PreTrainedModel):
                outermost.setdefault(id(module.config), module)
        if len(outermost) == 1:
            return next(iter(outermost.values()))
        raise TypeError(
            f"target must be a Transformers model or config, or wrap exactly one model; got a "
            f"{type(target).__name__} holding {len(outermost)}"
        )
    raise TypeError(f"target must be a Transformers PreTrainedModel or PreTrainedConfig, got {type(target).__name__}")
