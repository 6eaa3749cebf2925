"""Packed rows: every document of a row is a sequence of its own.

A packed batch ``[B, H, S, D]`` holds in each row several documents that must not see one
another; :class:`Documents` says where they lie. :func:`attend_documents` gives every document
what the single-sequence op gives it alone: Lighthouse where the settings compress its length,
dense causal SDPA where they do not. :func:`dense_documents` is dense causal attention inside
every document (the dense layers of a packed batch).

How, without an S x S mask: each row is split into its documents (views), the documents of one
length run as one batched call on ``[documents, heads, length, head_dim]`` (the steps of
:mod:`.steps`, which pick the fused kernels on CUDA as they do for one sequence, or dense SDPA; a
length held by one document reads it in place), and the outputs are concatenated back in order. On
CUDA in half precision the dense documents of all lengths instead go through one varlen flash call
(``torch.nn.attention.varlen``), whose block-diagonal causal structure is given by cumulative
lengths. So a row makes one launch sequence per distinct length of its compressed documents (at
most ``S`` over the shortest length the settings compress) and one dense call. Putting the
compressed sequences into the dense documents' varlen call too was measured slower on the H200
(flash against SDPA's cuDNN on the long compressed sequences; NOTES-kernels.md, "Packed
documents"). A :class:`Documents` keeps its grouping, so every layer of a forward reuses the first
layer's.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..validation import check_positive_int, is_int
from .plan import plan_for, shortest_compressed_length
from .steps import MethodOptions, compressed_attention, gather, scatter, select

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10: the dense documents run as batched SDPA per length
    varlen_attn = None

# torch 2.10 asks for causality as is_causal=True, later versions as the window (-1, 0).
if varlen_attn is None:
    _VARLEN_CAUSAL: dict = {}
elif "window_size" in inspect.signature(varlen_attn).parameters:
    _VARLEN_CAUSAL = {"window_size": (-1, 0)}
else:
    _VARLEN_CAUSAL = {"is_causal": True}
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
_VARLEN_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Documents:
    """The documents of each row of a packed batch: ``lengths[b]`` are row ``b``'s document
    lengths in order, each >= 1, summing to ``seq_len``.

    Build one with :meth:`from_lengths`, :meth:`from_cu_seqlens` (Flash-style cumulative lengths)
    or :meth:`from_position_ids` (positions that restart, Transformers' rule); a ValueError names
    what is inconsistent.
    """

    seq_len: int
    lengths: tuple[tuple[int, ...], ...]
    layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """The groupings built so far, by device, which lengths run Lighthouse and whether the dense
    documents are bundled."""

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len)
        if not isinstance(self.lengths, tuple) or not all(isinstance(row, tuple) for row in self.lengths):
            raise ValueError("lengths must be a tuple of tuples of document lengths (one tuple per row)")
        for row, lengths in enumerate(self.lengths):
            if not lengths or not all(is_int(n) and n >= 1 for n in lengths):
                raise ValueError(f"row {row}: document lengths must be integers >= 1, got {list(lengths)}")
            if sum(lengths) != self.seq_len:
                raise ValueError(
                    f"row {row}: document lengths {list(lengths)} sum to {sum(lengths)}, not to the row's length {self.seq_len}"
                )

    @classmethod
    def from_lengths(cls, lengths: Sequence[Sequence[int]], seq_len: int | None = None) -> "Documents":
        """From one sequence of document lengths per row (``seq_len``: every row's length, by
        default the first row's sum)."""
        if hasattr(lengths, "tolist"):  # a tensor's or an array's rows would hold 0-d values, not integers
            lengths = lengths.tolist()
        rows = tuple(tuple(row) for row in lengths)
        if not rows:
            raise ValueError("lengths must hold at least one row of document lengths")
        return cls(sum(rows[0]) if seq_len is None else seq_len, rows)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor | Sequence[int], batch: int, seq_len: int, *, name: str = "cu_seqlens") -> "Documents":
        """From cumulative lengths over the ``batch * seq_len`` tokens of the flattened batch
        (Flash-attention's ``cu_seqlens``: ``0``, then each document's end); no document may
        cross from one row into the next. ``name`` is the argument the errors name."""
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
                raise ValueError(f"{name} must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
            cu_seqlens = cu_seqlens.tolist()
        cu = list(cu_seqlens)
        check_positive_int("batch", batch)
        check_positive_int("seq_len", seq_len)
        total = batch * seq_len
        if len(cu) < 2 or not all(is_int(x) for x in cu) or cu[0] != 0:
            raise ValueError(f"{name} must start at 0 and hold each document's end, got {_clip(cu)}")
        steps = [b - a for a, b in zip(cu, cu[1:])]
        if min(steps) < 1:
            at = steps.index(min(steps))
            raise ValueError(f"{name} must be strictly increasing, but entry {at + 1} ({cu[at + 1]}) follows {cu[at]}")
        if cu[-1] != total:
            raise ValueError(
                f"{name} must end at the number of tokens, {total} ({batch} row(s) of {seq_len}), but ends at {cu[-1]}"
            )
        ends = set(cu)
        crossing = [row * seq_len for row in range(1, batch) if row * seq_len not in ends]
        if crossing:
            raise ValueError(f"{name}: a document crosses the row boundary at token {crossing[0]} (rows hold {seq_len} tokens)")
        rows: list[list[int]] = [[] for _ in range(batch)]
        for start, length in zip(cu, steps):
            rows[start // seq_len].append(length)
        return cls(seq_len, tuple(tuple(row) for row in rows))

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, batch: int) -> "Documents":
        """From ``position_ids`` ``[batch or 1, S]``: a document starts at every position that is
        not the previous one plus 1 (the rule Transformers uses to detect packed sequences)."""
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.dim() != 2
            or position_ids.is_floating_point()
            or position_ids.dtype == torch.bool
            or position_ids.shape[0] not in (1, batch)
            or position_ids.shape[1] < 1
        ):
            raise ValueError(
                f"position_ids must be an integer tensor [batch or 1, seq] with batch={batch}, got "
                f"{position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__} "
                f"of shape {tuple(getattr(position_ids, 'shape', ()))}"
            )
        seq_len = position_ids.shape[1]
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        found = starts.nonzero().tolist()  # the one host synchronization
        per_row: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
        for row, start in found:
            per_row[row].append(start)
        rows = tuple(tuple(b - a for a, b in zip(starts_, [*starts_[1:], seq_len])) for starts_ in per_row)
        if len(rows) != batch:
            rows = rows * batch
        return cls(seq_len, rows)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max((max(row) for row in self.lengths), default=0)

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """``(row, start, length)`` of every document."""
        for row, lengths in enumerate(self.lengths):
            start = 0
            for length in lengths:
                yield row, start, length
                start += length

    def distinct_lengths(self) -> frozenset[int]:
        return frozenset(length for row in self.lengths for length in row)


def _clip(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:12]))}, ...] ({len(values)} values)"


class _Group(NamedTuple):
    """The documents ``docs`` (indices in :meth:`Documents.spans` order), all of ``length`` tokens,
    run as one batched call."""

    length: int
    lighthouse: bool
    docs: tuple[int, ...]


class _Bundle(NamedTuple):
    """Dense documents of several lengths, run as one varlen call."""

    docs: tuple[int, ...]
    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_length: int


@dataclass(frozen=True)
class _Layout:
    groups: tuple[_Group, ...]
    bundle: _Bundle | None


def _on_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy is queued like a kernel; from pageable memory it may wait for the GPU.
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _build_layout(documents: Documents, lighthouse_lengths: frozenset[int], bundle_dense: bool, device: torch.device) -> _Layout:
    by_length: dict[int, list[int]] = defaultdict(list)
    for doc, (_, _, length) in enumerate(documents.spans()):
        by_length[length].append(doc)
    groups, bundled = [], []
    for length in sorted(by_length):
        docs = by_length[length]
        if bundle_dense and length not in lighthouse_lengths:
            bundled.extend((doc, length) for doc in docs)
        else:
            groups.append(_Group(length, length in lighthouse_lengths, tuple(docs)))
    bundle = None
    if bundled:
        lengths = tuple(length for _, length in bundled)
        ends = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        bundle = _Bundle(tuple(doc for doc, _ in bundled), lengths, _on_device(ends, device), max(lengths))
    return _Layout(tuple(groups), bundle)


def _layout(documents: Documents, lighthouse_lengths: frozenset[int], bundle_dense: bool, device: torch.device) -> _Layout:
    key = (device, lighthouse_lengths, bundle_dense)
    layout = documents.layouts.get(key)
    if layout is None:
        layout = documents.layouts[key] = _build_layout(documents, lighthouse_lengths, bundle_dense, device)
    return layout


def _bundles_dense(q: torch.Tensor, window: int | None, dropout: float) -> bool:
    """Whether the dense documents can go through one varlen flash call."""
    return (
        varlen_attn is not None
        and q.is_cuda
        and q.dtype in _VARLEN_DTYPES
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= _VARLEN_MAX_HEAD_DIM
        and window is None
        and not dropout
        and not torch.are_deterministic_algorithms_enabled()  # flash's backward accumulates with atomics
    )


def _window_that_matters(window: int | None, longest: int) -> int | None:
    """``window``, or None where no document is longer than it (so that the dense documents can
    still share one varlen call)."""
    return window if window is not None and window < longest else None


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """K or V with axis 1 holding KV heads, repeated to ``heads`` (grouped-query attention)."""
    group = heads // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _dense_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int | None, dropout: float) -> torch.Tensor:
    """Causal SDPA over ``[documents, heads, length, head_dim]`` (a ``window``: each query sees
    the ``window`` positions ending at it, Transformers' sliding window)."""
    heads, length = q.shape[1], q.shape[2]
    k, v = _expand_heads(k, heads), _expand_heads(v, heads)
    if window is None or window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    position = torch.arange(length, device=q.device)
    distance = position[:, None] - position[None, :]
    mask = (distance >= 0) & (distance < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)


def _dense_bundle(bundle: _Bundle, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Dense causal attention of the bundled documents, ``[tokens, heads, head_dim]`` each."""
    heads = q.shape[1]
    k, v = _expand_heads(k, heads), _expand_heads(v, heads)
    cu = bundle.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, bundle.max_length, bundle.max_length, scale=scale, **_VARLEN_CAUSAL)


def _run(
    layout: _Layout,
    documents: Documents,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: tuple[torch.Tensor, torch.Tensor] | None,
    attend_group: Callable[..., torch.Tensor],
    scale: float | None,
) -> torch.Tensor:
    """Run each group (``attend_group(group, q, k, v, scores)`` on ``[count, heads, length, ...]``)
    and the bundle, and put the outputs back in place: ``[B, H, S, D]``.

    Every document's rows are views (a split of each batch row), so a group of one document reads
    q, k and v where they are; only groups of several documents and the bundle copy theirs. The
    backward of the split writes each row's gradient once.
    """
    batch, heads, seq_len, dim = q.shape

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [doc for row, lengths in zip(x.unbind(0), documents.lengths) for doc in row.split(lengths, dim=1)]

    def batched(docs: list[torch.Tensor], group: _Group) -> torch.Tensor:
        if len(group.docs) == 1:
            return docs[group.docs[0]].unsqueeze(0)
        return torch.stack([docs[i] for i in group.docs])

    whole_rows = len(layout.groups) == 1 and layout.bundle is None and all(len(row) == 1 for row in documents.lengths)
    if whole_rows:  # one document per row, all of one length: the batch is the group
        return attend_group(layout.groups[0], q, k, v, scores)
    q_docs, k_docs, v_docs = split(q), split(k), split(v)
    score_docs = [split(s) for s in scores] if scores is not None else None
    out_docs: list[torch.Tensor | None] = [None] * len(q_docs)  # [length, heads, dim] each
    for group in layout.groups:
        group_scores = tuple(batched(s, group).contiguous() for s in score_docs) if score_docs is not None else None
        out = attend_group(group, batched(q_docs, group), batched(k_docs, group), batched(v_docs, group), group_scores)
        for doc, piece in zip(group.docs, out.unbind(0)):
            out_docs[doc] = piece.transpose(0, 1)
    if layout.bundle is not None:
        flat = [torch.cat([docs[i].transpose(0, 1) for i in layout.bundle.docs]) for docs in (q_docs, k_docs, v_docs)]
        out = _dense_bundle(layout.bundle, *flat, scale)
        for doc, piece in zip(layout.bundle.docs, out.split(layout.bundle.lengths)):
            out_docs[doc] = piece
    rows, first = [], 0
    for lengths in documents.lengths:
        pieces = out_docs[first : first + len(lengths)]
        rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        first += len(lengths)
    out = torch.stack(rows) if batch > 1 else rows[0].unsqueeze(0)  # [B, S, H, D]
    return out.transpose(1, 2)


def runs_lighthouse(length: int, levels: int, pooling: int, topk: int, min_seq_len: int | None) -> bool:
    """Whether a document of ``length`` tokens runs Lighthouse: the settings compress it and it is
    not shorter than ``min_seq_len`` (the single-sequence rules, per document)."""
    if min_seq_len is not None and length < min_seq_len:
        return False
    shortest = shortest_compressed_length(levels, pooling, topk)
    return shortest is not None and length >= shortest and plan_for(length, levels, pooling, topk).compresses


def attend_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    *,
    levels: int,
    pooling: int,
    topk: int,
    options: MethodOptions,
    scale: float | None,
    min_seq_len: int | None = None,
    dense_window: int | None = None,
) -> torch.Tensor:
    """Lighthouse on every document of ``documents`` that it compresses (and that is not shorter
    than ``min_seq_len``), dense causal SDPA on the others (within ``dense_window`` positions of
    each query, where given): ``[B, H, S, D]``. ``options`` hold whole-batch scores ``[B, h, S]``;
    each document's part goes with it."""
    lighthouse_lengths = frozenset(
        length for length in documents.distinct_lengths() if runs_lighthouse(length, levels, pooling, topk, min_seq_len)
    )
    longest_dense = max((n for n in documents.distinct_lengths() if n not in lighthouse_lengths), default=0)
    window = _window_that_matters(dense_window, longest_dense)
    layout = _layout(documents, lighthouse_lengths, _bundles_dense(q, window, 0.0), q.device)
    scores = None if options.q_scores is None else (options.q_scores, options.k_scores)

    def attend_group(group: _Group, q_g, k_g, v_g, group_scores) -> torch.Tensor:
        if not group.lighthouse:
            return _dense_group(q_g, k_g, v_g, scale, window, 0.0)
        plan = plan_for(group.length, levels, pooling, topk)
        group_options = options if group_scores is None else options._replace(q_scores=group_scores[0], k_scores=group_scores[1])
        entries = select(q_g, k_g, plan, group_options)
        return scatter(entries, compressed_attention(*gather(entries, q_g, k_g, v_g), scale), group.length)

    return _run(layout, documents, q, k, v, scores, attend_group, scale)


def dense_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    *,
    scale: float | None,
    window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Dense causal attention inside every document: ``[B, H, S, D]``. ``window``: each query sees
    only the ``window`` positions ending at it; ``dropout``: SDPA's attention dropout."""
    window = _window_that_matters(window, documents.max_length)
    layout = _layout(documents, frozenset(), _bundles_dense(q, window, dropout), q.device)

    def attend_group(group: _Group, q_g, k_g, v_g, _scores) -> torch.Tensor:
        return _dense_group(q_g, k_g, v_g, scale, window, dropout)

    return _run(layout, documents, q, k, v, None, attend_group, scale)
