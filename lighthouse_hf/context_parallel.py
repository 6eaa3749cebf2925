"""Lighthouse attention with the sequence split across the ranks of a process group.

Layout: with ``world`` ranks the sequence is cut into ``2 * world`` equal chunks and rank ``r``
holds chunks ``r`` and ``2 * world - 1 - r`` concatenated (the head/tail load balancing of causal
context parallelism, the same layout as ``torch.distributed.tensor.experimental.context_parallel``),
for token ids, positions, q, k, v and the output alike.

Why this is exact: tiles own contiguous position ranges and every tile's compressed length is
fixed, so when chunk boundaries fall on tile boundaries, selecting inside a chunk with
``topk / (2 * world)`` is the global selection restricted to that chunk, and the compressed chunks
concatenated in order are the global compressed sequence. Each rank attends its compressed queries
to the all-gathered compressed keys and values (a fifth of the tokens with the default settings)
with a lower-right causal mask. The one cross-chunk effect is the scatter's right shift: an
entry's output lands up to ``pooling**(levels-1) - 1`` positions past its span, so each chunk hands
that halo to the next chunk. When chunk boundaries do not fall on tile boundaries (or the setting
pads the coarsest level), the ranks all-gather q, k and v and each computes its own chunks of the
single-device result: still exact, with the memory of one device (a ``LighthouseWarning`` says so
in eager calls; compiled code cannot warn). Both paths compile with ``fullgraph=True`` (on gloo
with the collectives as two opaque ops: see ``_gloo_all_gather``).

Dense layers (and every other call that runs dense) all-gather k and v and attend each local query
chunk to its causal prefix. Only ``torch.distributed`` collectives are used: all-gather forward,
reduce-scatter backward on NCCL (all-reduce on other backends: gloo, the tests' threaded group).

In a Transformers model the attention function takes this path when the forward call carries
``lighthouse_cp_group=<process group>`` (see ``lighthouse_hf.distributed.shard_batch``); the
group travels with the call, so two models in one process never share context-parallel state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import dispatch
from .dispatch import LighthouseWarning
from .validation import check_dropout, check_positive_int
from .ops import (
    LighthousePlan,
    MethodOptions,
    check_inputs,
    check_settings,
    gather,
    lighthouse_attention,
    method_options,
    scatter,
    select,
)

CONTEXT_PARALLEL_KWARG = "lighthouse_cp_group"
"""Forward keyword naming the process group a sharded sequence is split across (context parallelism)."""


def chunk_plan(seq_len: int, chunks: int, levels: int, pooling: int, topk: int) -> LighthousePlan | None:
    """The per-chunk plan when chunk-local selection equals the global one, else None."""
    check_positive_int("chunks", chunks)
    plan = LighthousePlan(seq_len, levels, pooling, topk)
    if not plan.compresses or plan.is_padded or plan.real_len != seq_len or plan.tiles % chunks:
        return None
    local = LighthousePlan(seq_len // chunks, levels, pooling, topk // chunks)
    return local if local.tile_len == plan.tile_len and not local.is_padded else None


def _global_chunks(world: int, rank: int) -> tuple[int, int]:
    return rank, 2 * world - 1 - rank


def _group_shape(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); torch >= 2.4 has the old one
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _eager_all_gather(local: torch.Tensor, group, world: int) -> torch.Tensor:
    gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
    _all_gather_single(gathered, local.contiguous(), group=group)
    return gathered


def _eager_all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    total = x.clone()
    dist.all_reduce(total, group=group)
    return total


# Compiled code on a gloo group calls its collectives through these opaque ops, which run the
# eager ``torch.distributed`` calls: dynamo would otherwise trace them into functional
# collectives, which crashed gloo ranks with SIGSEGV in torch 2.11 on the H200 (a functional
# all-gather of CUDA tensors crashed uncompiled too, and compiled ones crashed with the tensors
# staged through host memory; eager gloo all-gather and all-reduce of the same CUDA tensors work).
# Other backends keep the traced collectives, which inductor can schedule. The group travels by
# name; torch has no public lookup from a name back to its group.
@torch.library.custom_op("lighthouse_hf::gloo_all_gather", mutates_args=())
def _gloo_all_gather(local: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    return _eager_all_gather(local, dist.distributed_c10d._resolve_process_group(group_name), world)


@_gloo_all_gather.register_fake
def _(local: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    return local.new_empty((world * local.shape[0], *local.shape[1:]))


@torch.library.custom_op("lighthouse_hf::gloo_all_reduce", mutates_args=())
def _gloo_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _eager_all_reduce(x, dist.distributed_c10d._resolve_process_group(group_name))


@_gloo_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _opaque_name(group) -> str | None:
    """The group's name where its collectives must go through the opaque ops (compiled code on
    gloo), else None; ``None`` as the group is the default group."""
    if torch.compiler.is_compiling() and dist.get_backend(group) == dist.Backend.GLOO:
        return (group if group is not None else dist.group.WORLD).group_name
    return None


def _all_gather(local: torch.Tensor, group, opaque_name: str | None) -> torch.Tensor:
    """Every rank's ``local`` concatenated along dim 0, in rank order."""
    world = dist.get_world_size(group)
    if opaque_name is not None:
        return _gloo_all_gather(local, opaque_name, world)
    return _eager_all_gather(local, group, world)


def _all_reduce(x: torch.Tensor, group, opaque_name: str | None) -> torch.Tensor:
    """The sum of every rank's ``x`` (a new tensor)."""
    if opaque_name is not None:
        return _gloo_all_reduce(x, opaque_name)
    return _eager_all_reduce(x, group)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> torch.Tensor:
    """This rank's head and tail chunks of ``x`` along ``dim`` (whose length must be a multiple of
    ``2 * world``)."""
    world, rank = _group_shape(group)
    if x.shape[dim] % (2 * world):
        raise ValueError(
            f"the sequence length ({x.shape[dim]}) must be a multiple of 2 * group size ({2 * world}) "
            "to split it into head/tail chunks"
        )
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[c] for c in _global_chunks(world, rank)], dim=dim)


def _in_global_order(halves: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Rank r's (head, tail) pieces, r = 0..world-1, as the 2 * world chunks in sequence order
    (rank r holds chunks r and 2 * world - 1 - r)."""
    return [head for head, _ in halves] + [tail for _, tail in reversed(halves)]


def unshard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's head/tail part along ``dim`` (not differentiable)."""
    world, _ = _group_shape(group)
    gathered = _all_gather(x.detach().movedim(dim, 0), group, _opaque_name(group))
    halves = [part.chunk(2, dim=0) for part in gathered.chunk(world, dim=0)]
    return torch.cat(_in_global_order(halves), dim=0).movedim(0, dim)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of this rank's slice
    (reduce-scatter where the backend has it, all-reduce otherwise, e.g. on gloo)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, opaque_name: str | None) -> torch.Tensor:
        ctx.group, ctx.opaque_name = group, opaque_name
        gathered = _all_gather(local, group, opaque_name)
        if torch.compiler.is_compiling() and opaque_name is None:
            # torch 2.11 compiled the gradient of an output that a traced collective wrote in place
            # to zeros when the backward issued a collective too (torch 2.13 does not; measured on
            # gloo before its collectives became opaque ops). A copy is an ordinary output.
            return gathered.clone()
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(local, grad, group=group)
            return local, None, None
        return _all_reduce(grad, group, ctx.opaque_name).chunk(world, dim=0)[rank], None, None


def _gather_chunks(local: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    """All-gather every rank's ``[head chunk, tail chunk]`` (along dim 2; differentiable) and
    return the chunks in global order."""
    gathered = _AllGather.apply(local, group, _opaque_name(group))
    return _in_global_order([t.chunk(2, dim=2) for t in gathered.chunk(world, dim=0)])


def _causal_prefix_attention(q_part, keys, values, chunk, scale, dropout=0.0):
    """``q_part`` is global chunk ``chunk`` of equal-length chunks; ``keys``/``values`` hold the
    whole sequence in global order. Causal attention of the chunk to its prefix (lower-right mask)."""
    length = q_part.shape[2]
    prefix_k, prefix_v = keys[:, :, : (chunk + 1) * length], values[:, :, : (chunk + 1) * length]
    if torch.compiler.is_compiling():
        # Dynamo cannot build torch's CausalBias tensor subclass; the explicit mask is the same mask
        # (at the cost of SDPA's mask-free kernels inside compiled code).
        mask = torch.ones(length, prefix_k.shape[2], dtype=torch.bool, device=q_part.device).tril(prefix_k.shape[2] - length)
    else:
        mask = causal_lower_right(length, prefix_k.shape[2])
    return F.scaled_dot_product_attention(q_part, prefix_k, prefix_v, attn_mask=mask, dropout_p=dropout, scale=scale)


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
    rope_inv_freq: torch.Tensor | None = None,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    selection: str = "published",
    combine: str = "sum",
) -> torch.Tensor:
    """This rank's part of ``lighthouse_attention`` over the whole sequence (layout above), with
    the same method options; ``q_scores`` and ``k_scores`` are this rank's parts like q and k.

    ``q`` is ``[B, H, 2 * chunk, D]``, ``k`` and ``v`` ``[B, Hkv, 2 * chunk, D]``; differentiable.
    """
    check_settings(levels, pooling, topk)
    check_inputs(q, k, v, scale)
    options = method_options(
        q, k, rope_inv_freq=rope_inv_freq, q_scores=q_scores, k_scores=k_scores, selection=selection, combine=combine
    )
    world, rank = _group_shape(group)
    if q.shape[2] % 2:
        raise ValueError(f"q must hold two equal chunks along the sequence, got length {q.shape[2]}")
    chunk_len = q.shape[2] // 2
    seq_len = 2 * world * chunk_len
    plan = chunk_plan(seq_len, 2 * world, levels, pooling, topk)
    if plan is None or options.causal:
        why = (
            "the causal selection's thresholds cross chunk boundaries"
            if options.causal
            else "chunk boundaries do not fall on Lighthouse tile boundaries "
            "(lighthouse_hf.context_parallel.chunk_plan tells which lengths split)"
        )
        if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn: eager calls tell
            warnings.warn(
                f"context parallelism at {seq_len} tokens over {world} ranks: {why}, so every rank gathers the whole "
                "sequence (exact, but with one device's memory).",
                LighthouseWarning,
            )
        arguments = dict(levels=levels, pooling=pooling, topk=topk, scale=scale, rope_inv_freq=rope_inv_freq,
                         q_scores=q_scores, k_scores=k_scores, selection=selection, combine=combine)
        return _gathered_attention(q, k, v, group, world, arguments)

    parts = (slice(0, chunk_len), slice(chunk_len, None))
    selected = [select(q[:, :, part], k[:, :, part], plan, _part_of(options, part)) for part in parts]
    compressed = [gather(entries, q[:, :, part], k[:, :, part], v[:, :, part]) for entries, part in zip(selected, parts)]
    keys = torch.cat(_gather_chunks(torch.cat([c[1] for c in compressed], dim=2), group, world), dim=2)
    values = torch.cat(_gather_chunks(torch.cat([c[2] for c in compressed], dim=2), group, world), dim=2)

    width = plan.coarse_width
    outputs, halos = [], []
    for chunk, entries, (q_sel, _, _) in zip(_global_chunks(world, rank), selected, compressed):
        out_sel = _causal_prefix_attention(q_sel, keys, values, chunk, scale)
        if options.mean:
            # float32 sums and their contribution counts (a column of ones) travel together through
            # the halo, and are divided once complete, as the single-device scatter divides
            out_sel = torch.cat([out_sel.float(), out_sel.new_ones(*out_sel.shape[:-1], 1, dtype=torch.float32)], dim=-1)
        # positions chunk_len .. chunk_len + width - 2 belong to the next chunk: the halo
        spread = scatter(entries, out_sel, chunk_len + width - 1, combine_mean=False)
        outputs.append(spread[:, :, :chunk_len])
        halos.append(spread[:, :, chunk_len:])
    incoming = _gather_chunks(torch.cat(halos, dim=2), group, world)
    for i, chunk in enumerate(_global_chunks(world, rank)):
        if chunk > 0 and width > 1:
            outputs[i] = torch.cat([outputs[i][:, :, : width - 1] + incoming[chunk - 1], outputs[i][:, :, width - 1 :]], dim=2)
    out = torch.cat(outputs, dim=2)
    if options.mean:
        out = (out[..., :-1] / out[..., -1:].clamp(min=1)).to(q.dtype)
    return out


def _part_of(options: MethodOptions, part: slice) -> MethodOptions:
    """The options of one chunk: its slice of the given scores."""
    if options.q_scores is None:
        return options
    return options._replace(q_scores=options.q_scores[:, :, part], k_scores=options.k_scores[:, :, part])


def _gathered_attention(q, k, v, group, world, arguments):
    full = [torch.cat(_gather_chunks(x, group, world), dim=2) for x in (q, k, v)]
    for name in ("q_scores", "k_scores"):
        if arguments[name] is not None:
            arguments[name] = torch.cat(_gather_chunks(arguments[name].unsqueeze(-1), group, world), dim=2).squeeze(-1)
    out = lighthouse_attention(*full, **arguments)
    return shard_sequence(out, group, dim=2)


def dense_attention_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """This rank's part of dense causal attention over the whole sequence (same layout and shapes
    as :func:`lighthouse_attention_context_parallel`); differentiable."""
    check_inputs(q, k, v, scale)
    check_dropout(dropout)
    world, rank = _group_shape(group)
    if q.shape[2] % 2:
        raise ValueError(f"q must hold two equal chunks along the sequence, got length {q.shape[2]}")
    repeat = q.shape[1] // k.shape[1]
    keys, values = (torch.cat(_gather_chunks(x, group, world), dim=2) for x in (k, v))
    if repeat > 1:
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    q_chunks = q.chunk(2, dim=2)
    outputs = [
        _causal_prefix_attention(q_part, keys, values, chunk, scale, dropout)
        for q_part, chunk in zip(q_chunks, _global_chunks(world, rank))
    ]
    return torch.cat(outputs, dim=2)


def _check_head_tail_positions(attention_mask: Any, positions: torch.Tensor | None, seq_len: int,
                               group: dist.ProcessGroup) -> None:
    """Position ids that are not this rank's head and tail chunks of ``0..S-1`` mean packed documents
    (or a wrong split), which the mask here cannot tell from the split's own jump: a ValueError,
    checked once per forward (one host synchronization), not under torch.compile."""
    if positions is None or torch.compiler.is_compiling():
        return
    if isinstance(attention_mask, dispatch.DeferredMask) and attention_mask.checked.get("head/tail positions") is positions:
        return
    expected = shard_sequence(torch.arange(seq_len, device=positions.device), group, dim=0)
    if positions.shape[-1] != expected.shape[0] or not bool((positions == expected).all()):
        raise ValueError(
            "position_ids under context parallelism must be each rank's head and tail chunks of 0..S-1 in every row "
            "(lighthouse_hf.distributed.shard_batch makes them); packed documents (positions that restart) are not "
            "supported"
        )
    if isinstance(attention_mask, dispatch.DeferredMask):
        attention_mask.checked["head/tail positions"] = positions


def context_parallel_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    group: dist.ProcessGroup,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The ``"lighthouse"`` attention function's path when the sequence is split across ``group``:
    ``[B, H, S_local, D]`` in, ``[B, S_local, H, D]`` out. Lighthouse layers run
    :func:`lighthouse_attention_context_parallel`, dense layers and sequences Lighthouse does not
    shorten run :func:`dense_attention_context_parallel`."""
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            "context parallelism splits whole sequences: query and key lengths must match "
            f"(got {query.shape[2]} and {key.shape[2]}); decode without {CONTEXT_PARALLEL_KWARG}"
        )
    # Head/tail position ids jump between a rank's two chunks, which Transformers reads as packed
    # documents: that mask is expected here and stands for plain causal attention.
    problem = dispatch.mask_reason(attention_mask)
    if problem not in (None, dispatch.PACKED_DOCUMENTS):
        raise ValueError(
            f"context parallelism needs plain causal attention over whole sequences, but the inputs have {problem}; "
            "pass unpadded sequences without an attention_mask (lighthouse_hf.distributed.shard_batch does)"
        )
    world, _ = _group_shape(group)
    seq_len = query.shape[2] * world
    _check_head_tail_positions(attention_mask, kwargs.get("position_ids"), seq_len, group)
    settings = dispatch.settings_of(module)
    query, key, value = dispatch.autocast_inputs(query, key, value)
    dense = dispatch.sequence_reason(module, settings, seq_len, dispatch.is_causal_call(module, kwargs))
    if dense == dispatch.NON_CAUSAL:
        raise ValueError(f"context parallelism runs causal attention only; layer {getattr(module, 'layer_idx', None)} is not causal")
    if dense is not None:
        if sliding_window is not None and sliding_window < seq_len:
            raise ValueError(
                f"layer {getattr(module, 'layer_idx', None)} has a {sliding_window}-token sliding window, which context-parallel dense "
                "attention does not apply; list it outside dense_layers or train it without context parallelism"
            )
        out = dense_attention_context_parallel(query, key, value, group=group, scale=scaling, dropout=dropout)
    else:
        dispatch.warn_ignored_dropout(dropout)
        arguments = dispatch.op_arguments(module, settings, query, key, seq_len)
        out = lighthouse_attention_context_parallel(query, key, value, group=group, scale=scaling, **arguments)
    return out.transpose(1, 2).contiguous()
