"""Lighthouse as three steps on a :class:`LighthousePlan`: ``select`` (gradient-free), ``gather`` (the
pooled rows of the compressed sequence) and ``scatter`` (its outputs back onto positions), with
SDPA on the compressed sequence in between (``compressed_attention``).

``select`` chooses the implementation once per call, from q and the method options: the fused
Triton kernels for CUDA tensors they handle, the PyTorch reference everywhere else; ``gather`` and
``scatter`` follow the choice recorded in the :class:`SelectedEntries` they are given. The
single-device op (:func:`lighthouse_hf.ops.lighthouse_attention`) and the context-parallel op both
run on these steps, so neither reaches into an implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fused, reference
from .plan import LighthousePlan


ROPES = ("pooled", "span_end")
"""Allowed values of ``rope``: pooled q and k rows keep their children's mean rotation (the
published method), or are taken as rotated at their span's last token (``rope_inv_freq``)."""
SELECTIONS = ("published", "causal")
"""Allowed values of ``selection``: ``"published"`` is the specification's top-k cascade,
``"causal"`` the rule of :mod:`.causal` (the output at t depends on no input after t)."""
COMBINES = ("sum", "mean")
"""Allowed values of ``combine``: how a position joins the outputs of the levels that reach it."""


class MethodOptions(NamedTuple):
    """What a call changes beyond the published method; the defaults are the published method.

    - ``rope_inv_freq`` ``[R]`` (``rope="span_end"``): q and k arrive rotary-rotated (rotate_half
      convention, the first ``2R`` dimensions); pooled rows of q and k are taken at the position of
      their span's last token.
    - ``q_scores`` ``[B, H, S]``, ``k_scores`` ``[B, Hkv, S]`` (``scores="pre_norm"``): level-0
      scores used instead of the norms of q and k (>= 0, like norms).
    - ``mean`` (``combine="mean"``): a position's output is the mean, not the sum, of the levels'
      outputs that reach it.
    - ``causal`` (``selection="causal"``): the selection rule of :mod:`.causal`.
    """

    rope_inv_freq: torch.Tensor | None = None
    q_scores: torch.Tensor | None = None
    k_scores: torch.Tensor | None = None
    mean: bool = False
    causal: bool = False


PUBLISHED = MethodOptions()


class SelectedEntries(NamedTuple):
    """The compressed sequence chosen for every (batch, query head): exactly one of ``listing`` (the
    fused kernels' layout) and ``selection`` (the reference's) is set."""

    plan: LighthousePlan
    options: MethodOptions
    listing: fused.Listing | None
    selection: reference.Selection | None


def select(q: torch.Tensor, k: torch.Tensor, plan: LighthousePlan, options: MethodOptions = PUBLISHED) -> SelectedEntries:
    """Steps 2-4 for ``q`` ``[B, H, S, D]`` and ``k`` ``[B, Hkv, S, D]`` with ``S == plan.seq_len``."""
    rope = options.rope_inv_freq is not None
    use_kernels = fused.handles(q) and (not rope or fused.handles_rope(q, options.rope_inv_freq))
    if use_kernels:
        listing = fused.select_entries(q, k, plan, options.q_scores, options.k_scores, options.rope_inv_freq, options.causal)
        return SelectedEntries(plan, options, listing, None)
    selection = reference.select(q, k, plan, q_scores=options.q_scores, k_scores=options.k_scores, causal=options.causal)
    return SelectedEntries(plan, options, None, selection)


def gather(
    entries: SelectedEntries, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1 and the gather: ``[B, H, compressed_len, D]`` each, in causal order; differentiable."""
    if entries.listing is not None:
        return fused.gather_entries(entries.listing, q, k, v, entries.plan)
    index, rope = entries.selection.index, entries.options.rope_inv_freq
    return tuple(
        reference.gather_entries(reference.pyramid(x, entries.plan, rotary), index)
        for x, rotary in ((q, rope), (k, rope), (v, None))
    )


def compressed_attention(q_sel: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Step 5: causal SDPA over the compressed sequence (every query head has its own rows)."""
    return F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, scale=scale)


def scatter(entries: SelectedEntries, out_sel: torch.Tensor, length: int, *, combine_mean: bool | None = None) -> torch.Tensor:
    """Step 6: every position ``0..length-1`` gets the sum (``combine="mean"``: the mean) of the
    entries' outputs that reach it; ``length`` may exceed the plan's sequence by the scatter's shift
    (the context-parallel halo). ``combine_mean`` overrides the options' choice (the context-parallel
    op sums first and divides once the halo has arrived)."""
    mean = entries.options.mean if combine_mean is None else combine_mean
    if entries.listing is not None:
        return fused.scatter_entries(entries.listing, out_sel, length, entries.plan, mean)
    return reference.scatter_back(out_sel, entries.selection, length, mean)
