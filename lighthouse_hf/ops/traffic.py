"""The bytes the fused path's kernels move through device memory around SDPA: the floor of their time.

``lighthouse-hf bench`` divides these by the copy bandwidth it measures in the same run, so every
row says how close Lighthouse could come to SDPA on the compressed sequence with these kernels,
and a setting that misses a target shows whether bytes or the kernels are why.

Counted from the plan alone, per kernel, each tensor a kernel must read or write counted once at
its element size (a row of the head dimension is ``dim * element_bytes``):

* ``score_pass``: q and k read whole; the float32 score pyramid written (levels 1..L-1, one row
  per level, two with the causal selection); the means of q and k written where the score pass
  computes them (``fused.score_pass_means_width``: half precision, scores from the norms, with
  span-end RoPE only where they are the coarsest level's rows; float32 unless they are the
  coarsest level's rows), over the positions it covers. With
  given scores, the given scores read instead of q and k, as float32 (``scores="pre_norm"``'s and
  the bench's).
* ``selection``: the scores of each tile's candidates read (q's and k's, for every query head;
  twice with the causal selection); ``inverse`` filled (``levels * seq_len`` slots) and one slot
  per entry written; the listing (local index and row of every entry) written.
* ``gather``: for each query head, the q, k and v rows of its real entries: one row per level-0
  entry, ``p**l`` rows per entry of a pooled level below the coarsest; the coarsest level
  reads the whole sequence; q and k of a level at least as wide as the score pass's means read
  ``p**l / width`` means per entry instead (the coarsest: the sequence's means); the compressed
  q, k and v written, padding entries included. k and v are read once per
  query head, as the kernel does (a GQA group's heads may share them through L2, which this
  does not count).
* ``scatter``: the compressed output rows of the real entries read, one ``inverse`` slot per
  level and span read, the output over all positions written (and ``combine="mean"``'s float32
  counts).
* ``scatter_backward``: the output gradient read over the spans the gather reads for q, the
  compressed gradient written; ``gather_backward``: the compressed gradients of q, k and v of
  the real entries read, ``inverse`` read per launch (two, three with span-end RoPE), the
  gradients of q (query heads) and of k and v (KV heads) written.

Left out, each small against these at the settings the bench sweeps: the listing that the gather
and the scatter's backward read, the selection kernel's scratch, span-end RoPE's table and the
score pass's second read of its block for span-end means (from cache), the
causal selection's re-reads of earlier tiles' scores (from cache), and the ATen intermediates of
score pyramids the Triton pass does not build (float32 inputs, with or without given scores, and
levels wider than its block).

A real entry holds real positions; the rest are padding that the kernels skip. Real entries per
level are the plan's ``real_entries`` (the published selection's; the causal rule can take a
padding entry over a real one, so there the counts are an upper bound by a few entries per tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice, check_positive_int
from .fused import FUSED_DTYPES, score_means_rows, score_pass_means_width, score_pass_positions
from .plan import LighthousePlan
from .steps import COMBINES, ROPES, SELECTIONS

SCORE_SOURCES = ("norms", "given")
"""``scores`` here: the norms of q and k, or level-0 scores given to the op (``q_scores``,
``k_scores``, as ``config.lighthouse["scores"] = "pre_norm"`` passes them)."""

FLOAT32_BYTES = 4
INT32_BYTES = 4


@dataclass(frozen=True)
class Traffic:
    """Bytes per kernel of one call (all batch rows and heads)."""

    score_pass: int
    selection: int
    gather: int
    scatter: int
    scatter_backward: int
    gather_backward: int

    @property
    def forward(self) -> int:
        return self.score_pass + self.selection + self.gather + self.scatter

    @property
    def backward(self) -> int:
        return self.scatter_backward + self.gather_backward


def fused_traffic(
    plan: LighthousePlan,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    rope: str = "pooled",
    scores: str = "norms",
    selection: str = "published",
    combine: str = "sum",
) -> Traffic:
    """The bytes of one call of the fused path (module docstring); the options as the op's
    settings (``rope`` "pooled" or "span_end", ``scores`` "norms" or "given", ``selection``
    "published" or "causal", ``combine`` "sum" or "mean"). A plan that does not compress runs
    dense attention, no kernels: zero bytes."""
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("dim", dim)):
        check_positive_int(name, value)
    if heads % kv_heads:
        raise ValueError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
    if dtype not in FUSED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FUSED_DTYPES))} (the fused path's), got {dtype!r}")
    check_choice("rope", rope, ROPES)
    check_choice("scores", scores, SCORE_SOURCES)
    check_choice("selection", selection, SELECTIONS)
    check_choice("combine", combine, COMBINES)
    if not plan.compresses:
        return Traffic(0, 0, 0, 0, 0, 0)
    row_bytes = dim * dtype.itemsize
    seq, n, p, levels = plan.seq_len, plan.compressed_len, plan.pooling, plan.levels
    means_width = score_pass_means_width(
        dtype, dim, plan, given_scores=scores == "given", span_end_rope=rope == "span_end"
    )
    means_bytes = 0 if means_width == 0 else dim * (dtype.itemsize if means_width == plan.coarse_width else FLOAT32_BYTES)
    real = plan.real_entries
    real_rows = sum(real)  # the compressed rows that positions inside the sequence read back
    score_copies = 2 if selection == "causal" else 1
    score_rows = score_copies * sum(plan.padded_len // p**level for level in range(1, levels))
    candidates = plan.n_coarse_padded + (levels - 2) * p * plan.topk  # scored per query head
    span_positions = sum(real[level] * p**level for level in range(levels - 1))  # read below the coarsest

    def qk_entry_bytes(width: int) -> int:  # one entry's q (or k) row: its span's positions or means
        return width // means_width * means_bytes if means_width and width >= means_width else width * row_bytes

    qk_reads = sum(real[level] * qk_entry_bytes(p**level) for level in range(levels - 1))
    means_rows = score_means_rows(plan, means_width) if means_width else 0
    qk_reads += means_rows * means_bytes if means_width else seq * row_bytes  # the coarsest level
    slots = sum(-(-seq // p**level) for level in range(levels))  # inverse slots the positions read
    count_bytes = FLOAT32_BYTES if combine == "mean" else 0  # per position read or written, the mean's counts
    inverse_reads = 3 if rope == "span_end" else 2  # one per launch of the gather's backward

    score_reads = (heads + kv_heads) * seq * (FLOAT32_BYTES if scores == "given" else row_bytes)
    means_written = min(score_pass_positions(dtype, dim, plan) // means_width, means_rows) * means_bytes if means_width else 0
    score_pass = score_reads + (heads + kv_heads) * (score_rows * FLOAT32_BYTES + means_written)
    selection_bytes = heads * (2 * score_copies * candidates * FLOAT32_BYTES + INT32_BYTES * (levels * seq + 3 * n))
    gather = heads * (2 * qk_reads + (span_positions + seq) * row_bytes + 3 * n * row_bytes)
    scatter = heads * (real_rows * row_bytes + slots * INT32_BYTES + seq * (row_bytes + count_bytes))
    scatter_backward = heads * ((span_positions + seq) * (row_bytes + count_bytes) + n * row_bytes)
    gather_backward = (heads * (3 * real_rows * row_bytes + inverse_reads * slots * INT32_BYTES + seq * row_bytes)
                       + 2 * kv_heads * seq * row_bytes)
    return Traffic(*(batch * x for x in (score_pass, selection_bytes, gather, scatter, scatter_backward, gather_backward)))
