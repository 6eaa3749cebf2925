"""Lighthouse attention with the sequence split across the ranks of a process group.

Layout: with ``world`` ranks the sequence is cut into ``2 * world`` equal chunks and rank ``r``
holds chunks ``r`` and ``2 * world - 1 - r`` concatenated (the head/tail load balancing of causal
context parallelism), for q, k, v and the output alike.

Why this is exact: tiles own contiguous position ranges and every tile's compressed length is
fixed, so when chunk boundaries fall on tile boundaries, selecting inside a chunk with
``topk / (2 * world)`` is the global selection restricted to that chunk, and the compressed chunks
concatenated in order are the global compressed sequence. Each rank attends its compressed queries
to the all-gathered compressed keys and values (a fifth of the tokens with the default settings)
with a lower-right causal mask. The one cross-chunk effect is the scatter's right shift: an
entry's output lands up to ``pooling**(levels-1) - 1`` positions past its span, so each chunk hands
that halo to the next chunk. When chunk boundaries do not fall on tile boundaries (or the setting
pads the coarsest level), the ranks all-gather q, k and v and each computes its own chunks of the
single-device result: still exact, with the memory of one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


from .ops import LighthousePlan, check_settings, lighthouse_attention
from .ops import reference


def chunk_plan(seq_len: int, chunks: int, levels: int, pooling: int, topk: int) -> LighthousePlan | None:
    """The per-chunk plan when chunk-local selection equals the global one, else None."""
    plan = LighthousePlan(seq_len, levels, pooling, topk)
    if not plan.compresses or plan.is_padded or plan.real_len != seq_len or plan.tiles % chunks:
        return None
    local = LighthousePlan(seq_len // chunks, levels, pooling, topk // chunks)
    return local if local.tile_len == plan.tile_len and not local.is_padded else None


def _global_chunks(world: int, rank: int) -> tuple[int, int]:
    return rank, 2 * world - 1 - rank


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of this rank's slice
    (reduce-scatter where the backend has it, all-reduce otherwise, e.g. on gloo)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(local, grad, group=group)
            return local, None
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad.chunk(world, dim=0)[rank], None


def _gather_chunks(local: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    """All-gather every rank's ``[head chunk, tail chunk]`` (along dim 2; differentiable) and
    return the chunks in global order."""
    gathered = _AllGather.apply(local, group)
    halves = [t.chunk(2, dim=2) for t in gathered.chunk(world, dim=0)]
    return [halves[i][0] for i in range(world)] + [halves[world - 1 - i][1] for i in range(world)]


def lighthouse_attention_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    levels: int = 3,
    pooling: int = 4,
    topk: int = 2048,
    scale: float | None = None,
) -> torch.Tensor:
    """This rank's part of ``lighthouse_attention`` over the whole sequence (layout above).

    ``q`` is ``[B, H, 2 * chunk, D]``, ``k`` and ``v`` ``[B, Hkv, 2 * chunk, D]``; differentiable.
    """
    check_settings(levels, pooling, topk)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if q.shape[2] % 2:
        raise ValueError(f"q must hold two equal chunks along the sequence, got length {q.shape[2]}")
    chunk_len = q.shape[2] // 2
    seq_len = 2 * world * chunk_len
    plan = chunk_plan(seq_len, 2 * world, levels, pooling, topk)
    if plan is None:
        return _gathered_attention(q, k, v, group, world, rank, levels, pooling, topk, scale)

    compressed = []
    for part in (slice(0, chunk_len), slice(chunk_len, None)):
        q_part, k_part, v_part = q[:, :, part], k[:, :, part], v[:, :, part]
        selection = reference.select(q_part, k_part, plan)
        q_sel, k_sel, v_sel = (reference.gather_entries(reference.pyramid(x, plan), selection.index) for x in (q_part, k_part, v_part))
        compressed.append((selection, q_sel, k_sel, v_sel))
    keys = _gather_chunks(torch.cat([c[2] for c in compressed], dim=2), group, world)
    values = _gather_chunks(torch.cat([c[3] for c in compressed], dim=2), group, world)

    width = plan.coarse_width
    outputs, halos = [], []
    for chunk, (selection, q_sel, _, _) in zip(_global_chunks(world, rank), compressed):
        prefix_k, prefix_v = torch.cat(keys[: chunk + 1], dim=2), torch.cat(values[: chunk + 1], dim=2)
        mask = causal_lower_right(q_sel.shape[2], prefix_k.shape[2])
        out_sel = F.scaled_dot_product_attention(q_sel, prefix_k, prefix_v, attn_mask=mask, scale=scale)
        # positions chunk_len .. chunk_len + width - 2 belong to the next chunk: the halo
        spread = reference.scatter_back(out_sel, selection, chunk_len + width - 1)
        outputs.append(spread[:, :, :chunk_len])
        halos.append(spread[:, :, chunk_len:])
    incoming = _gather_chunks(torch.cat(halos, dim=2), group, world)
    for i, chunk in enumerate(_global_chunks(world, rank)):
        if chunk > 0 and width > 1:
            outputs[i] = torch.cat([outputs[i][:, :, : width - 1] + incoming[chunk - 1], outputs[i][:, :, width - 1 :]], dim=2)
    return torch.cat(outputs, dim=2)


def _gathered_attention(q, k, v, group, world, rank, levels, pooling, topk, scale):
    full = [torch.cat(_gather_chunks(x, group, world), dim=2) for x in (q, k, v)]
    out = lighthouse_attention(*full, levels=levels, pooling=pooling, topk=topk, scale=scale)
    chunks = out.chunk(2 * world, dim=2)
    return torch.cat([chunks[c] for c in _global_chunks(world, rank)], dim=2)
