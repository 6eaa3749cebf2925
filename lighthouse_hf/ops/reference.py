"""Plain PyTorch Lighthouse attention: the CPU path and the oracle for the fused kernels.

Vectorized over batch, heads and tiles; the only Python loops run over pyramid levels.
Step numbers refer to the specification (pyramid, scores, cascade, causal order, attention,
scatter back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import causal as causal_rule
from .plan import HALF_TILE, TILE, LighthousePlan

# Scores are L2 norms (>= 0): padding sits below every real entry, and entries already taken
# by the query half sit below padding, so the key half never takes an entry twice.
_PADDING_SCORE = -1.0
_TAKEN_SCORE = float("-inf")


@dataclass(frozen=True)
class Selection:
    """The compressed sequence of every (batch, query head), in causal order.

    All tensors are ``[B, H, compressed_len]`` int64.
    ``level`` and ``local`` say which pyramid entry each element is (entry ``local`` of ``level``);
    ``index`` is its row in the concatenated pyramid; ``key`` is the exact integer position key
    (the specification's key times ``2**(levels-1)``), strictly increasing along the last axis.
    """

    plan: LighthousePlan
    level: torch.Tensor
    local: torch.Tensor
    index: torch.Tensor
    key: torch.Tensor
    refined: torch.Tensor
    """True for entries selected at levels >= 1 (their children are entries one level down)."""


def level_scores(
    x: torch.Tensor, plan: LighthousePlan, scores: torch.Tensor | None = None, *, causal: bool = False
) -> list[torch.Tensor]:
    """Max-pooled float32 L2 norms of ``x`` ``[B, h, S, D]`` per level: ``[B, h, level_len]``;
    ``scores`` ``[B, h, S]`` (>= 0) replace the norms of level 0 when given.

    Published: over each entry's span. ``causal``: over the ``c`` tokens ending at its first token.
    """
    if scores is None:
        norms = torch.linalg.vector_norm(x[:, :, : plan.real_len].float(), dim=-1)
    else:
        norms = scores[:, :, : plan.real_len].float()
    norms = F.pad(norms, (0, plan.padded_len - plan.real_len), value=_PADDING_SCORE)
    if causal:
        return causal_rule.start_scores(norms, plan)
    return [norms.unflatten(-1, (-1, plan.pooling**level)).amax(-1) for level in range(plan.levels)]


def _choose_halves(query_score: torch.Tensor, key_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the 64 best candidates by query score and of the 64 best of the rest by key score.

    Ties go to the earlier candidate (stable sort), so the choice is defined for any input.
    """

    def best(score: torch.Tensor) -> torch.Tensor:
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :HALF_TILE]

    by_query = torch.zeros_like(query_score, dtype=torch.bool)
    by_query.scatter_(-1, best(query_score), True)
    by_key = torch.zeros_like(by_query)
    by_key.scatter_(-1, best(key_score.masked_fill(by_query, _TAKEN_SCORE)), True)
    return by_query, by_key


def _choose(query_score: torch.Tensor, key_score: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Mask of the 128 candidates each tile takes: the published top-k, or the causal rule
    (:mod:`.causal`), whose thresholds read the published choice on the previous tile."""
    by_query, by_key = _choose_halves(query_score, key_score)
    if causal:
        return causal_rule.choose(query_score, key_score, by_query, by_key)
    return by_query | by_key


def _children(parents: torch.Tensor, pooling: int) -> torch.Tensor:
    """``[..., n]`` sorted parent indices to ``[..., n * pooling]`` sorted child indices."""
    offsets = torch.arange(pooling, device=parents.device)
    return (parents.unsqueeze(-1) * pooling + offsets).flatten(-2)


@torch.no_grad()
def select(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: LighthousePlan,
    *,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    causal: bool = False,
) -> Selection:
    """Steps 2-4: scores, the top-k cascade per tile, and the causal order.

    ``q`` is ``[B, H, S, D]``, ``k`` is ``[B, Hkv, S, D]``; each query head selects on its own,
    with the key scores of its KV head (computed once per KV head). ``q_scores`` ``[B, H, S]`` and
    ``k_scores`` ``[B, Hkv, S]`` replace the norms of q and k as level-0 scores when given.
    ``causal`` selects by the rule of :mod:`.causal`, under which the output at t depends only on
    inputs at positions <= t.
    """
    batch, heads = q.shape[:2]
    group = heads // k.shape[1]
    levels, pooling = plan.levels, plan.pooling
    query_scores = level_scores(q, plan, q_scores, causal=causal)
    key_scores = [s.repeat_interleave(group, dim=1) for s in level_scores(k, plan, k_scores, causal=causal)]

    coarse = levels - 1
    candidates = torch.arange(plan.n_coarse_padded, device=q.device).view(plan.tiles, plan.tile_len)
    candidates = candidates.expand(batch, heads, -1, -1)
    parts = []  # (level, local index, refined) per level, each [B, H, tiles, n]
    for level in range(coarse, 0, -1):
        tiled = (batch, heads, plan.tiles, -1)
        chosen = _choose(
            query_scores[level].gather(-1, candidates.reshape(batch, heads, -1)).view(tiled),
            key_scores[level].gather(-1, candidates.reshape(batch, heads, -1)).view(tiled),
            causal=causal,
        )
        parts.append((level, candidates, chosen))
        parents = candidates.masked_select(chosen).view(batch, heads, plan.tiles, TILE)
        candidates = _children(parents, pooling)
    parts.append((0, candidates, torch.zeros_like(candidates, dtype=torch.bool)))

    level = torch.cat([torch.full_like(c, lv).flatten(2) for lv, c, _ in parts], dim=-1)
    local = torch.cat([c.flatten(2) for _, c, _ in parts], dim=-1)
    refined = torch.cat([r.flatten(2) for _, _, r in parts], dim=-1)
    key, order = torch.sort(position_keys(level, local, refined, plan), dim=-1)
    level, local, refined = (t.gather(-1, order) for t in (level, local, refined))
    offsets = torch.tensor([plan.level_offset(m) for m in range(levels)], device=q.device)
    return Selection(plan, level, local, offsets[level] + local, key, refined)


def position_keys(
    level: torch.Tensor, local: torch.Tensor, refined: torch.Tensor, plan: LighthousePlan
) -> torch.Tensor:
    """Step 4's position keys times ``2**(levels-1)``, which makes them exact int64 integers
    (the specification's ``-2**-l`` offsets become ``-2**(levels-1-l)``)."""
    coarse = plan.levels - 1
    width = plan.pooling**level
    unit = 2**coarse
    return torch.where(
        refined,
        (local + 1) * width * unit - 2 ** (coarse - level),  # just after the span's last token
        local * width * unit,  # the span's first token
    )


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary rotation in Transformers' rotate_half convention: with ``R = angles.shape[-1]``,
    dimension ``i < R`` pairs with ``i + R`` and turns by ``angles[..., i]``; dimensions from ``2R``
    on are not rotated (partial rotary)."""
    half = angles.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def pyramid(x: torch.Tensor, plan: LighthousePlan, rope_inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Step 1: level 0 then the mean-pooled levels, concatenated: ``[B, h, sum(level_len), D]``.

    ``rope_inv_freq`` (``rope="span_end"``): ``x`` is rotary-rotated at each position t, and every
    row of a pooled level is taken at the position of its span's last token ``end``: the mean over
    the span of each row rotated further by ``end - t``. Level 0 is unchanged.
    """
    x = x[:, :, : plan.padded_len]
    x = F.pad(x, (0, 0, 0, plan.padded_len - x.shape[2]))
    levels = [x]
    for level in range(1, plan.levels):
        spans = x.unflatten(2, (-1, plan.pooling**level))  # [B, h, entries, width, D]
        if rope_inv_freq is not None:
            width = plan.pooling**level
            to_end = torch.arange(width - 1, -1, -1, device=x.device, dtype=rope_inv_freq.dtype)
            compute = torch.promote_types(x.dtype, torch.float32)
            spans = rotate(spans.to(compute), to_end[:, None] * rope_inv_freq)
        levels.append(spans.mean(3).to(x.dtype))
    return torch.cat(levels, dim=2)


def gather_entries(pyramid_rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, H, n]`` of ``pyramid_rows`` ``[B, h, N, D]``, query head ``i`` reading
    from KV head ``i // (H // h)``: ``[B, H, n, D]``."""
    batch, heads, n = index.shape
    kv_heads, dim = pyramid_rows.shape[1], pyramid_rows.shape[-1]
    grouped = index.reshape(batch, kv_heads, -1, 1).expand(-1, -1, -1, dim)
    return pyramid_rows.gather(2, grouped).view(batch, heads, n, dim)


def scatter_back(out: torch.Tensor, selection: Selection, seq_len: int, mean: bool = False) -> torch.Tensor:
    """Step 6 as a gather: each position takes at most one entry per level.

    Entry ``j`` of level ``l`` (width ``c``) lands on positions ``[j*c + c - 1, j*c + 2c - 1)``;
    levels are summed in float32, or float64 for float64 outputs (``mean``: ``combine="mean"``,
    divided by how many levels reach the position); positions nothing reaches stay zero.
    """
    plan = selection.plan
    batch, heads, n, dim = out.shape
    with_zero_row = F.pad(out, (0, 0, 0, 1))  # row n stays zero for slots nothing fills
    result = out.new_zeros(batch, heads, seq_len, dim, dtype=torch.promote_types(out.dtype, torch.float32))
    reached = out.new_zeros(batch, heads, seq_len, 1, dtype=result.dtype) if mean else None
    position = torch.arange(n, device=out.device).expand(batch, heads, n)
    for level in range(plan.levels):
        width = plan.pooling**level
        slots = plan.level_len(level)
        # Where each slot of this level sits in the compressed sequence (n: nowhere). Entries of
        # other levels are parked in an extra slot that is cut off below.
        source = torch.full((batch, heads, slots + 1), n, device=out.device)
        target = torch.where(selection.level == level, selection.local, slots)
        source.scatter_(-1, target, position)
        real_slots = plan.real_len // width
        rows = gather_entries(with_zero_row, source[..., :real_slots])
        start = width - 1
        stop = min(seq_len, start + real_slots * width)
        if stop > start:
            spread = rows.repeat_interleave(width, dim=2)[:, :, : stop - start]
            result[:, :, start:stop] += spread
            if mean:
                found = (source[..., :real_slots] < n).to(result.dtype).repeat_interleave(width, dim=2)
                reached[:, :, start:stop] += found[:, :, : stop - start, None]
    if mean:
        result = result / reached.clamp(min=1)
    return result.to(out.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    scale: float | None,
    *,
    rope_inv_freq: torch.Tensor | None = None,
    mean: bool = False,
) -> torch.Tensor:
    """Steps 1, 5 and 6 for a given selection: differentiable in q, k and v. ``rope_inv_freq``
    pools q and k at span end (v has no rotation); ``mean`` combines the levels by their mean."""
    plan = selection.plan
    index = selection.index
    q_sel = gather_entries(pyramid(q, plan, rope_inv_freq), index)
    k_sel = gather_entries(pyramid(k, plan, rope_inv_freq), index)
    v_sel = gather_entries(pyramid(v, plan), index)
    out = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, scale=scale)
    return scatter_back(out, selection, q.shape[2], mean)


def lighthouse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LighthousePlan, scale: float | None
) -> torch.Tensor:
    return attend(q, k, v, select(q, k, plan), scale)
