"""Lighthouse as three steps on a :class:`LighthousePlan`: ``select`` (gradient-free), ``gather`` (the
pooled rows of the compressed sequence) and ``scatter`` (its outputs back onto positions), with
SDPA on the compressed sequence in between (``compressed_attention``).

``select`` chooses the implementation once per call, from q: the fused Triton kernels for CUDA
tensors they handle, the PyTorch reference everywhere else; ``gather`` and ``scatter`` follow the
choice recorded in the :class:`SelectedEntries` they are given. The single-device op
(:func:`lighthouse_hf.ops.lighthouse_attention`) and the context-parallel op both run on these
steps, so neither reaches into an implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fused, reference
from .plan import LighthousePlan


class SelectedEntries(NamedTuple):
    """The compressed sequence chosen for every (batch, query head): exactly one of ``listing`` (the
    fused kernels' layout) and ``selection`` (the reference's) is set."""

    plan: LighthousePlan
    listing: fused.Listing | None
    selection: reference.Selection | None


def select(q: torch.Tensor, k: torch.Tensor, plan: LighthousePlan) -> SelectedEntries:
    """Steps 2-4 for ``q`` ``[B, H, S, D]`` and ``k`` ``[B, Hkv, S, D]`` with ``S == plan.seq_len``."""
    if fused.handles(q):
        return SelectedEntries(plan, fused.select_entries(q, k, plan), None)
    return SelectedEntries(plan, None, reference.select(q, k, plan))


def gather(
    entries: SelectedEntries, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1 and the gather: ``[B, H, compressed_len, D]`` each, in causal order; differentiable."""
    if entries.listing is not None:
        return fused.gather_entries(entries.listing, q, k, v, entries.plan)
    index = entries.selection.index
    return tuple(reference.gather_entries(reference.pyramid(x, entries.plan), index) for x in (q, k, v))


def compressed_attention(q_sel: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Step 5: causal SDPA over the compressed sequence (every query head has its own rows)."""
    return F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, scale=scale)


def scatter(entries: SelectedEntries, out_sel: torch.Tensor, length: int) -> torch.Tensor:
    """Step 6: every position ``0..length-1`` gets the sum of the entries' outputs that reach it;
    ``length`` may exceed the plan's sequence by the scatter's shift (the context-parallel halo)."""
    if entries.listing is not None:
        return fused.scatter_entries(entries.listing, out_sel, length, entries.plan)
    return reference.scatter_back(out_sel, entries.selection, length)
