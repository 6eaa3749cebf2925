"""Transformers integration: the ``"lighthouse"`` attention function, its registration, and
:func:`apply_lighthouse`.

The attention function runs Lighthouse where it applies and Transformers' own SDPA function
everywhere else (so dense calls match ``attn_implementation="sdpa"`` exactly); the rules for which
is which are in :mod:`lighthouse_hf.dispatch`. A call that carries a context-parallel group runs
:mod:`lighthouse_hf.context_parallel` instead. Registering the attention and mask functions is all
that ``import lighthouse_hf`` does: no Transformers class is modified.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from . import dispatch
from .config import ATTN_IMPLEMENTATION, CONFIG_KEY, LighthouseConfig
from .context_parallel import CONTEXT_PARALLEL_KWARG, context_parallel_attention_forward
from .hf_internals import set_config_attn_implementation
from .ops import lighthouse_attention


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
        out = context_parallel_attention_forward(
            module, query, key, value, attention_mask, group=group, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    settings = dispatch.settings_of(module)
    dense = dispatch.dense_reason(module, query, key, attention_mask, settings, dispatch.is_causal_call(module, kwargs))
    if dense is not None:
        dispatch.report_dense(module, settings, *dense, seq_len=query.shape[2])
        return dispatch.dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dispatch.warn_ignored_dropout(dropout)
    query, key, value = dispatch.autocast_inputs(query, key, value)
    arguments = dispatch.op_arguments(module, settings, query, key, query.shape[2])
    out = lighthouse_attention(query, key, value, scale=scaling, **arguments)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"lighthouse"`` in Transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, lighthouse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dispatch.lighthouse_mask)


def apply_lighthouse(target: Any, settings: LighthouseConfig | dict | None = None, **overrides: Any) -> Any:
    """Write Lighthouse settings into a model or config and switch it to ``"lighthouse"`` attention.

    ``apply_lighthouse(model, topk=1024)`` or ``apply_lighthouse(config, LighthouseConfig(levels=4))``;
    returns ``target``. A config switched here builds Lighthouse models with ``from_config``. The
    settings are checked against the model now (a ValueError names ``config.lighthouse`` and the
    bad key), and a model in which no layer would run Lighthouse gets a ``LighthouseWarning``.
    """
    merged = LighthouseConfig.from_dict(settings).to_dict()
    merged.update(overrides)
    config = target.config if isinstance(target, PreTrainedModel) else target
    setattr(config, CONFIG_KEY, LighthouseConfig.from_dict(merged).to_dict())
    checked = dispatch.check_model_settings(config)
    if isinstance(target, PreTrainedModel):
        dispatch.record_pre_norm_scores(target, checked)
        target.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        set_config_attn_implementation(config, ATTN_IMPLEMENTATION)
    return target
