"""Lighthouse attention ops: the checked public op, and the steps it is made of (:mod:`.steps`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..validation import check_choice, check_dropout, check_positive_int, is_int
from .plan import LighthousePlan, check_settings, plan_for, shortest_compressed_length
from .steps import (
    COMBINES,
    ROPES,
    SELECTIONS,
    MethodOptions,
    SelectedEntries,
    compressed_attention,
    gather,
    scatter,
    select,
)
from .varlen import Documents, attend_documents, dense_documents, runs_lighthouse

__all__ = [
    "COMBINES",
    "Documents",
    "ROPES",
    "SELECTIONS",
    "LighthousePlan",
    "MethodOptions",
    "SelectedEntries",
    "check_inputs",
    "check_settings",
    "compressed_attention",
    "compressed_length",
    "dense_causal_attention",
    "dense_causal_attention_varlen",
    "gather",
    "lighthouse_attention",
    "lighthouse_attention_varlen",
    "method_options",
    "plan_for",
    "runs_lighthouse",
    "scatter",
    "select",
    "shortest_compressed_length",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """The op's input checks (q ``[B, H, S, D]``, k and v ``[B, Hkv, S, D]``, one dtype and device,
    ``H`` a multiple of ``Hkv``, ``scale`` None or > 0): a ValueError naming what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {_describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads, seq, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, dim):
        raise ValueError(
            f"k must be [batch, kv_heads, seq, head_dim] with q's batch={batch}, seq={seq}, "
            f"head_dim={dim}; got k of shape {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or heads % k.shape[1]:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's kv_heads ({k.shape[1]})")
    if seq < 1 or dim < 1:
        raise ValueError(f"q must have seq >= 1 and head_dim >= 1, got shape {tuple(q.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")


def _check_scores(name: str, scores: object, x: torch.Tensor) -> None:
    expected = (*x.shape[:3],)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected or not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {list(expected)} (batch, heads, seq), got {_describe(scores)}")
    if scores.device != x.device:
        raise ValueError(f"{name} must be on {x.device}, got {scores.device}")
    # Values are checked where that is free; on a GPU the check would stall the host until the
    # GPU catches up, on every call (the attention function's own scores are norms).
    if scores.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((scores >= 0).all()):
        raise ValueError(f"{name} must be non-negative and not NaN (scores rank like norms)")


def method_options(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    rope_inv_freq: torch.Tensor | None = None,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    selection: str = "published",
    combine: str = "sum",
) -> MethodOptions:
    """The checked :class:`MethodOptions` of a call (ValueError naming the argument otherwise)."""
    check_choice("selection", selection, SELECTIONS)
    check_choice("combine", combine, COMBINES)
    if rope_inv_freq is not None:
        half = q.shape[-1] // 2
        if (
            not isinstance(rope_inv_freq, torch.Tensor)
            or rope_inv_freq.dim() != 1
            or not 1 <= rope_inv_freq.shape[0] <= half
            or not rope_inv_freq.is_floating_point()
        ):
            raise ValueError(
                f"rope_inv_freq must be a 1-D floating-point tensor of 1 to head_dim // 2 = {half} rotary inverse "
                f"frequencies, got {_describe(rope_inv_freq)}"
            )
        if rope_inv_freq.device != q.device:
            raise ValueError(f"rope_inv_freq must be on {q.device}, got {rope_inv_freq.device}")
        rope_inv_freq = rope_inv_freq.float()  # the angles are float32 numbers in every implementation
    if (q_scores is None) != (k_scores is None):
        raise ValueError("q_scores and k_scores must be given together (or neither)")
    if q_scores is not None:
        _check_scores("q_scores", q_scores, q)
        _check_scores("k_scores", k_scores, k)
    return MethodOptions(rope_inv_freq, q_scores, k_scores, combine == "mean", selection == "causal")


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal SDPA over the whole sequence, with :func:`lighthouse_attention`'s arguments and checks
    (q ``[B, H, S, D]``, k and v ``[B, Hkv, S, D]``): what Lighthouse runs where it does not compress."""
    check_inputs(q, k, v, scale)
    return _dense_causal(q, k, v, scale)


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def compressed_length(seq_len: int, *, levels: int = 3, pooling: int = 4, topk: int = 2048) -> int:
    """Length of the sequence Lighthouse attends over, or ``seq_len`` when it would not compress.

    Raises ValueError naming the argument when ``seq_len`` is not an integer >= 1 or a setting is
    outside its allowed values (as :func:`lighthouse_attention` does)."""
    plan = plan_for(seq_len, levels, pooling, topk)
    return plan.compressed_len if plan.compresses else seq_len


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    levels: int = 3,
    pooling: int = 4,
    topk: int = 2048,
    scale: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    selection: str = "published",
    combine: str = "sum",
) -> torch.Tensor:
    """Causal Lighthouse attention.

    ``q`` is ``[B, H, S, D]``, ``k`` and ``v`` are ``[B, Hkv, S, D]`` with ``H % Hkv == 0``; returns
    ``[B, H, S, D]`` in q's dtype and device. Where the setting does not compress the sequence
    (``compressed_length(S) >= S``, e.g. ``levels == 1``) this is dense causal SDPA, and so is an
    empty batch (``B == 0``).

    Beyond the published method (the defaults reproduce it): ``rope_inv_freq`` ``[R]`` pools the
    rotary-rotated q and k at each span's last token; ``q_scores`` ``[B, H, S]`` and ``k_scores``
    ``[B, Hkv, S]`` (>= 0) are the level-0 scores instead of the norms; ``selection="causal"``
    selects so that the output at t depends on no input after t; ``combine="mean"`` averages the
    levels that reach a position instead of summing them. See the README's "Method options".
    """
    check_settings(levels, pooling, topk)
    check_inputs(q, k, v, scale)
    options = method_options(
        q, k, rope_inv_freq=rope_inv_freq, q_scores=q_scores, k_scores=k_scores, selection=selection, combine=combine
    )
    plan = plan_for(q.shape[2], levels, pooling, topk)
    if not plan.compresses or q.shape[0] == 0:
        return _dense_causal(q, k, v, scale)
    entries = select(q, k, plan, options)
    out_sel = compressed_attention(*gather(entries, q, k, v), scale)
    return scatter(entries, out_sel, plan.seq_len)


def _check_documents(documents: object, q: torch.Tensor) -> None:
    if not isinstance(documents, Documents):
        raise ValueError(f"documents must be a lighthouse_hf.ops.Documents, got {type(documents).__name__}")
    if (documents.batch, documents.seq_len) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"documents describe {documents.batch} row(s) of {documents.seq_len} tokens, but q has batch={q.shape[0]} "
            f"and seq={q.shape[2]}"
        )


def _check_window(window: object) -> None:
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")


def lighthouse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    *,
    levels: int = 3,
    pooling: int = 4,
    topk: int = 2048,
    scale: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    selection: str = "published",
    combine: str = "sum",
    min_seq_len: int | None = None,
    dense_window: int | None = None,
) -> torch.Tensor:
    """Causal Lighthouse attention over packed rows: every document of ``documents`` is a sequence
    of its own (no position attends to another document).

    Shapes, dtypes and options as :func:`lighthouse_attention` (``q_scores`` and ``k_scores`` cover
    the whole rows); the result at each document equals :func:`lighthouse_attention` on that
    document alone, so a document the settings do not compress runs dense causal SDPA, and so does
    one shorter than ``min_seq_len`` (``config.lighthouse["min_seq_len"]``). ``dense_window``: those
    dense documents let each query see only the ``dense_window`` positions ending at it, as a
    layer's sliding window does where a single sequence falls back to dense (Lighthouse itself has
    no window). Documents of one length run as one batched call; see :mod:`lighthouse_hf.ops.varlen`.
    """
    check_settings(levels, pooling, topk)
    check_inputs(q, k, v, scale)
    _check_documents(documents, q)
    if min_seq_len is not None:
        check_positive_int("min_seq_len", min_seq_len)
    if dense_window is not None:
        check_positive_int("dense_window", dense_window)
    options = method_options(
        q, k, rope_inv_freq=rope_inv_freq, q_scores=q_scores, k_scores=k_scores, selection=selection, combine=combine
    )
    if q.shape[0] == 0:
        return _dense_causal(q, k, v, scale)
    return attend_documents(
        q, k, v, documents, levels=levels, pooling=pooling, topk=topk, options=options, scale=scale,
        min_seq_len=min_seq_len, dense_window=dense_window,
    )


def dense_causal_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    *,
    scale: float | None = None,
    window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Dense causal SDPA inside every document of ``documents``, without an S x S mask (shapes as
    :func:`lighthouse_attention`). ``window``: each query sees only the ``window`` positions ending
    at it (Transformers' ``sliding_window``); ``dropout``: attention dropout probability."""
    check_inputs(q, k, v, scale)
    _check_documents(documents, q)
    _check_window(window)
    check_dropout(dropout)
    if q.shape[0] == 0:
        return _dense_causal(q, k, v, scale)
    return dense_documents(q, k, v, documents, scale=scale, window=window, dropout=dropout)
