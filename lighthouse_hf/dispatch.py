"""Which attention a ``"lighthouse"`` call runs, and why: the rules both attention functions share.

The single-device attention function (:mod:`lighthouse_hf.integration`) and the context-parallel
one (:mod:`lighthouse_hf.context_parallel`) ask this module the same questions:

* the model's settings (``config.lighthouse``), checked against the model on its first call;
* whether the call runs dense, and why: a dense layer, a non-causal module, decoding with a KV
  cache, a mask (padding, a custom mask), query offsets, or a sequence too short to compress
  (:func:`dense_reason`);
* the documents of a packed call (:func:`documents_of`), marked either by position ids that
  restart (Transformers' packed-sequence detection, which leaves a deferred mask) or by the
  Flash-style keywords ``cu_seq_lens_q/k`` and ``max_length_q/k``;
* the mask function's deferred mask and how the dense path materializes it;
* the autocast cast of q, k and v, and the warning for ignored attention dropout.

Warnings are :class:`LighthouseWarning`; the ones about a model (no Lighthouse layer, sequences too
short to compress in training) are given once per model config.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import patches, prenorm
from .config import CONFIG_KEY, LighthouseConfig
from .ops import Documents, runs_lighthouse, shortest_compressed_length
from .rotary import rope_inv_freq
from .validation import is_int


class LighthouseWarning(UserWarning):
    """Lighthouse does not run as configured somewhere."""


# ---- the mask function ----

PACKED_DOCUMENTS = "packed-document boundaries"
"""The mask reason of position ids that restart (Transformers' packed-sequence detection)."""
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""The keywords that mark documents the Flash way (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)."""


@dataclass(frozen=True)
class DeferredMask:
    """A mask the dense path builds on demand (Transformers' ``sdpa_mask`` with the same arguments).

    ``reason`` says why Lighthouse cannot run under it (padding, packed documents, a custom mask);
    None means the only thing it adds is an active sliding window, which Lighthouse layers ignore.
    """

    reason: str | None
    plain_shape: bool
    mask_kwargs: dict[str, Any] = field(repr=False)
    documents: dict[tuple, tuple[tuple, Documents]] = field(default_factory=dict, repr=False, compare=False)
    """The documents found for this forward's inputs (:func:`documents_of`): every layer shares
    the mask, so only the first pays the host synchronization that reading them takes."""
    checked: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Inputs a path has checked for this forward, by what it checked (for the same reason)."""

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
    """Mask function registered under ``"lighthouse"`` (same arguments as ``sdpa_mask``).

    Never builds an S x S mask: None when there is nothing to mask, the 2-D padding mask when
    padding is all there is, otherwise a :class:`DeferredMask` that only the dense path builds.
    """
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
        reason = PACKED_DOCUMENTS
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


def mask_reason(attention_mask: Any) -> str | None:
    """What in ``attention_mask`` Lighthouse cannot honour; None: plain causal (or a sliding window
    only, which Lighthouse layers ignore)."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, DeferredMask):
        return attention_mask.reason
    if isinstance(attention_mask, torch.Tensor):
        return "padding" if attention_mask.dim() == 2 else "an explicit 4-D attention mask"
    return f"an attention mask of type {type(attention_mask).__name__}"


def materialize_mask(attention_mask: Any, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The mask Transformers' SDPA function takes for what the mask function returned."""
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


# ---- settings ----


class _PerConfig:
    """Remembers model configs without keeping them alive (configs are unhashable, so by id,
    confirmed by identity: a new config that reuses a dead one's id is not mistaken for it)."""

    def __init__(self) -> None:
        self._seen: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def seen(self, config: Any) -> bool:
        return self._seen.get(id(config)) is config

    def add(self, config: Any) -> None:
        self._seen[id(config)] = config

    def first_time(self, config: Any) -> bool:
        """Whether ``config`` was not seen before; it is from now on."""
        if self.seen(config):
            return False
        self.add(config)
        return True


_CHECKED = _PerConfig()
_WARNED_SHORT = _PerConfig()


def check_model_settings(config: Any) -> LighthouseConfig:
    """Check ``config.lighthouse`` against the model, write it back with every key filled in (so a
    saved checkpoint records what it ran with) and warn about layers that will not run Lighthouse
    as configured. A ValueError names ``config.lighthouse`` and the bad key. Once passed, the
    model's calls do not check (or warn) again."""
    adapter = patches.adapter_for(config)
    settings = LighthouseConfig.from_model_config(config)
    num_layers = adapter.num_layers(config)
    try:
        dense_layers = settings.dense_layer_set(num_layers)
    except ValueError as error:
        raise ValueError(f"config.{CONFIG_KEY}: {error}") from None
    setattr(config, CONFIG_KEY, settings.to_dict())
    if num_layers is not None and len(dense_layers) == num_layers:
        warnings.warn(
            f"{adapter.model_type}: config.{CONFIG_KEY}['dense_layers'] = {settings.dense_layers} covers all "
            f"{num_layers} layers, so no layer runs Lighthouse; list fewer dense layers.",
            LighthouseWarning,
            stacklevel=3,
        )
    if settings.scores == "qk" and adapter.per_head_qk_norm is not None and (num_layers is None or len(dense_layers) < num_layers):
        warnings.warn(
            f"{adapter.model_type}: each head's q and k pass an RMSNorm ({', '.join(adapter.per_head_qk_norm)}) "
            "before attention, so with scores='qk' the norms Lighthouse selects by start out equal (every "
            "score ties at initialization, and the selection then follows tie order) and spread only as the "
            "norm weights train; scores='pre_norm' (the default) scores the norms before those RMSNorms.",
            LighthouseWarning,
            stacklevel=3,
        )
    windowed = sorted(set(adapter.windowed_layers(config)) - dense_layers)
    if windowed:
        window = adapter.windowed_layers(config)[windowed[0]]
        warnings.warn(
            f"{adapter.model_type}: layers {windowed} have a {window}-token sliding window. Lighthouse "
            "has no window: in those layers it attends over the whole causal prefix through its "
            "pyramid. Dense layers and dense fallbacks keep the window.",
            LighthouseWarning,
            stacklevel=3,
        )
    _CHECKED.add(config)  # only once the check passed: bad settings fail every call until fixed
    return settings


def settings_of(module: torch.nn.Module) -> LighthouseConfig:
    """The settings an attention call runs with. The first call of a model also checks them against
    the model (:func:`check_model_settings`); every eager call of a layer that runs Lighthouse (not
    a dense layer) readies its pre-norm scores (``scores="pre_norm"``), which from then on are
    recorded before each call."""
    config = module.config
    if torch.compiler.is_compiling():
        return LighthouseConfig.from_model_config(config)
    settings = LighthouseConfig.from_model_config(config) if _CHECKED.seen(config) else check_model_settings(config)
    norm_names = patches.adapter_for(config).per_head_qk_norm
    if settings.scores == "pre_norm" and norm_names is not None and layer_reason(module, settings, True) is None:
        prenorm.install(module, norm_names)
    return settings


# ---- dense or Lighthouse ----


def _length_reason(seq_len: int, settings: LighthouseConfig) -> str | None:
    if settings.min_seq_len is not None and seq_len < settings.min_seq_len:
        return "shorter than min_seq_len"
    if not runs_lighthouse(seq_len, settings.levels, settings.pooling, settings.topk, None):
        return TOO_SHORT
    return None


TOO_SHORT = "too short to compress"
NON_CAUSAL = "non-causal attention"
"""Lighthouse is causal only: a non-causal module (an encoder layer) runs Transformers' SDPA as it would."""


def layer_reason(module: torch.nn.Module, settings: LighthouseConfig, is_causal: bool) -> str | None:
    if not is_causal:
        return NON_CAUSAL
    layer_idx = getattr(module, "layer_idx", None)
    num_layers = patches.adapter_for(module.config).num_layers(module.config)
    if layer_idx is not None and layer_idx in settings.dense_layer_set(num_layers):
        return "dense layer"
    return None


def is_causal_call(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether Transformers' SDPA function would run this call causally (decided as it decides)."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def sequence_reason(module: torch.nn.Module, settings: LighthouseConfig, seq_len: int, is_causal: bool) -> str | None:
    """Why a whole, unmasked sequence of ``seq_len`` tokens runs dense in ``module``; None: Lighthouse."""
    return layer_reason(module, settings, is_causal) or _length_reason(seq_len, settings)


def dense_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    settings: LighthouseConfig,
    is_causal: bool,
) -> tuple[str, bool] | None:
    """Why this single-device call runs dense, and whether that comes from its inputs (which the
    user is told about); None: run Lighthouse."""
    reason = layer_reason(module, settings, is_causal)
    if reason is not None:
        return reason, False
    if query.shape[2] != key.shape[2]:
        return "decoding with a KV cache", False
    reason = mask_reason(attention_mask)
    if reason is not None:
        return reason, True
    if isinstance(attention_mask, DeferredMask) and not attention_mask.plain_shape:
        return "query offsets", False
    reason = _length_reason(query.shape[2], settings)
    return None if reason is None else (reason, False)


def report_dense(module: torch.nn.Module, settings: LighthouseConfig, reason: str, from_inputs: bool, seq_len: int) -> None:
    """Tell the user about a dense call they may not expect: inputs Lighthouse cannot run on, and
    (once per model) a training forward that runs dense only because the sequence is too short."""
    if from_inputs:
        warnings.warn(f"Lighthouse attention falls back to dense SDPA for inputs with {reason}.", LighthouseWarning)
    elif reason == TOO_SHORT and module.training and not torch.compiler.is_compiling() and _WARNED_SHORT.first_time(module.config):
        warnings.warn(f"a training forward of {seq_len} tokens runs dense SDPA: {_what_compresses(settings)}.", LighthouseWarning)


def _what_compresses(settings: LighthouseConfig) -> str:
    shortest = shortest_compressed_length(settings.levels, settings.pooling, settings.topk)
    if shortest is None:
        return "levels=1 has no coarser level to select from, so no sequence compresses (use levels >= 2)"
    return (
        f"with levels={settings.levels}, pooling={settings.pooling}, topk={settings.topk} Lighthouse compresses "
        f"sequences of {shortest} tokens or more (lower topk to compress shorter ones)"
    )


def dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Transformers' own SDPA function, with the mask the mask function deferred: bit-identical to
    ``attn_implementation="sdpa"``."""
    kwargs.pop("sliding_window", None)  # already part of the mask
    mask = materialize_mask(attention_mask, query, key)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


# ---- packed documents ----


def _flash_max_length(kwargs: dict[str, Any], name: str, documents: Documents) -> None:
    value = kwargs.get(name)
    if value is None:
        return
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if not is_int(value) or value < documents.max_length:
        raise ValueError(
            f"{name} must be an integer at least the longest document's length, {documents.max_length} "
            f"(from cu_seq_lens_q), got {value!r}"
        )


# Reading document lengths is a host read: under torch.compile one clean graph break here rather
# than data-dependent guards inside the trace (Transformers marks every compiled forward as packed).
@torch.compiler.disable
def _read_documents(attention_mask: Any, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any], by_positions: bool) -> Documents:
    batch, seq_len = query.shape[0], query.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    from_positions = Documents.from_position_ids(kwargs["position_ids"], batch) if by_positions else None
    if cu_q is None and cu_k is None:
        return from_positions
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together (or neither)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"cu_seq_lens_q marks documents of whole sequences, but this call's queries ({query.shape[2]}) and keys "
            f"({key.shape[2]}) differ in length (decoding with a KV cache); pass them only to training forwards"
        )
    reason = mask_reason(attention_mask)
    if reason not in (None, PACKED_DOCUMENTS):
        raise ValueError(f"cu_seq_lens_q marks the documents, and an attention mask with {reason} cannot be combined with it")
    documents = Documents.from_cu_seqlens(cu_q, batch, seq_len, name="cu_seq_lens_q")
    if cu_k is not cu_q and Documents.from_cu_seqlens(cu_k, batch, seq_len, name="cu_seq_lens_k") != documents:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal: Lighthouse attends within whole documents")
    for name in ("max_length_q", "max_length_k"):
        _flash_max_length(kwargs, name, documents)
    if from_positions is not None and from_positions != documents:
        raise ValueError(
            f"position_ids and cu_seq_lens_q mark different documents: {_lengths_text(from_positions)} from the "
            f"positions, {_lengths_text(documents)} from cu_seq_lens_q"
        )
    return documents


def _lengths_text(documents: Documents) -> str:
    rows = [list(row) if len(row) <= 8 else [*row[:8], "..."] for row in documents.lengths]
    return f"lengths {rows[0] if len(rows) == 1 else rows}"


def documents_of(attention_mask: Any, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> Documents | None:
    """The documents of a packed call, or None when the call has none to keep apart.

    Documents are marked by position ids that restart (Transformers detects them without a KV
    cache and an attention mask and leaves a deferred mask with :data:`PACKED_DOCUMENTS`), by
    the Flash-style keywords (``cu_seq_lens_q`` over the flattened batch, as
    ``DataCollatorWithFlattening`` gives them), or by both, which must agree. Inconsistent
    keywords are a ValueError naming them. The result is kept on the deferred mask, so the
    layers of one forward read the inputs once.
    """
    by_positions = (
        isinstance(attention_mask, DeferredMask)
        and attention_mask.reason == PACKED_DOCUMENTS
        and kwargs.get("position_ids") is not None
    )
    flash = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    if not by_positions and not flash:
        return None
    if not isinstance(attention_mask, DeferredMask):
        return _read_documents(attention_mask, query, key, kwargs, by_positions)
    inputs = (kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"))
    cache_key = (*map(id, inputs), query.shape[0], query.shape[2])
    known = attention_mask.documents.get(cache_key)
    if known is not None and all(a is b for a, b in zip(known[0], inputs)):
        documents = known[1]
        for name in ("max_length_q", "max_length_k"):
            _flash_max_length(kwargs, name, documents)
        return documents
    documents = _read_documents(attention_mask, query, key, kwargs, by_positions)
    attention_mask.documents[cache_key] = (inputs, documents)
    return documents


def report_short_documents(module: torch.nn.Module, settings: LighthouseConfig, documents: Documents) -> None:
    """Once per model: a training forward of packed documents none of which is long enough to compress."""
    longest = documents.max_length
    if (
        module.training
        and not torch.compiler.is_compiling()
        and not runs_lighthouse(longest, settings.levels, settings.pooling, settings.topk, None)
        and _WARNED_SHORT.first_time(module.config)
    ):
        warnings.warn(
            f"a training forward of packed documents runs dense SDPA: its longest document has {longest} tokens; "
            f"{_what_compresses(settings)}.",
            LighthouseWarning,
        )


# ---- what a Lighthouse call does to its inputs ----


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, rotary embeddings leave q and k in float32 while v is in the autocast dtype;
    SDPA (an autocast op) casts all three to that dtype, so Lighthouse does the same."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def op_arguments(module: torch.nn.Module, settings: LighthouseConfig, query: torch.Tensor, key: torch.Tensor, seq_len: int) -> dict[str, Any]:
    """The Lighthouse op's keyword arguments for a call of ``module`` (``seq_len``: the whole
    sequence's length, which a context-parallel call holds only part of)."""
    arguments: dict[str, Any] = dict(
        levels=settings.levels, pooling=settings.pooling, topk=settings.topk, selection=settings.selection,
        combine=settings.combine,
    )
    if settings.rope == "span_end":
        arguments["rope_inv_freq"] = rope_inv_freq(module.config, seq_len, query.device)
    norm_names = patches.adapter_for(module.config).per_head_qk_norm
    if settings.scores == "pre_norm" and norm_names is not None:
        recorded = prenorm.take(module, norm_names, query, key)
        if recorded is not None:
            arguments["q_scores"], arguments["k_scores"] = recorded
        elif torch.compiler.is_compiling():
            raise RuntimeError(
                f"layer {getattr(module, 'layer_idx', None)}: scores='pre_norm' records its scores with hooks that "
                "are installed outside compiled code; call lighthouse_hf.apply_lighthouse(model) (or run one eager "
                "forward) before torch.compile"
            )
        else:
            # Installed here too: a call run eagerly by a compiled model that broke its graph here
            # skipped settings_of's install (traced); the next call then records, or says why not.
            prenorm.install(module, norm_names)
            warnings.warn(
                f"layer {getattr(module, 'layer_idx', None)}: scores='pre_norm' found no recorded norms for this call, "
                "so it scores the normalized q and k; the recording starts with the next call (apply_lighthouse(model) "
                "starts it before the first).",
                LighthouseWarning,
            )
    return arguments


def record_pre_norm_scores(model: torch.nn.Module, settings: LighthouseConfig) -> None:
    """Install the pre-norm score hooks (``scores="pre_norm"``) on every Lighthouse layer of
    ``model`` whose family normalizes each head's q and k, so that even their first call has them."""
    adapter = patches.adapter_for(model.config)
    norm_names = adapter.per_head_qk_norm
    if settings.scores != "pre_norm" or norm_names is None:
        return
    dense = settings.dense_layer_set(adapter.num_layers(model.config))
    for module in model.modules():
        if getattr(module, "layer_idx", None) not in (None, *dense) and all(hasattr(module, n) for n in norm_names):
            prenorm.install(module, norm_names)


def warn_ignored_dropout(dropout: float) -> None:
    if dropout:
        warnings.warn("Lighthouse attention applies no attention dropout (attention_dropout is ignored).", LighthouseWarning)
