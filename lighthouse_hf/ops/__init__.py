"""Lighthouse attention ops: the checked public op, and the steps it is made of (:mod:`.steps`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import TILE, LighthousePlan, check_settings, plan_for, shortest_compressed_length
from .steps import SelectedEntries, compressed_attention, gather, scatter, select

__all__ = [
    "TILE",
    "LighthousePlan",
    "SelectedEntries",
    "check_settings",
    "compressed_attention",
    "compressed_length",
    "dense_causal_attention",
    "gather",
    "lighthouse_attention",
    "plan_for",
    "scatter",
    "select",
    "shortest_compressed_length",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
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


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
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
) -> torch.Tensor:
    """Causal Lighthouse attention.

    ``q`` is ``[B, H, S, D]``, ``k`` and ``v`` are ``[B, Hkv, S, D]`` with ``H % Hkv == 0``; returns
    ``[B, H, S, D]`` in q's dtype and device. Where the setting does not compress the sequence
    (``compressed_length(S) >= S``, e.g. ``levels == 1``) this is dense causal SDPA, and so is an
    empty batch (``B == 0``).
    """
    check_settings(levels, pooling, topk)
    _check_inputs(q, k, v, scale)
    plan = plan_for(q.shape[2], levels, pooling, topk)
    if not plan.compresses or q.shape[0] == 0:
        return dense_causal_attention(q, k, v, scale)
    entries = select(q, k, plan)
    out_sel = compressed_attention(*gather(entries, q, k, v), scale)
    return scatter(entries, out_sel, plan.seq_len)
