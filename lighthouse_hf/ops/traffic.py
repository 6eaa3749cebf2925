"""The bytes the fused path's kernels move through device memory around SDPA: the floor of its speed.

``lighthouse-hf bench`` divides these by the copy bandwidth it measures in the same run, so every
row says how close Lighthouse could come to SDPA on the compressed sequence with these kernels,
and a setting that misses a target shows whether bytes or the kernels are why.

Counted from the plan alone, per kernel, each tensor a kernel reads or writes once at its
element size (a row of the head dimension is ``dim * element_bytes``):

* ``score_pass``: q and k read whole; the float32 score pyramid written (levels 1..L-1, one row
  per level, two with the causal selection); the coarsest means of q and k written where the
  score pass computes them (half precision, spans of at most 16 positions, scores from the
  norms, RoPE pooled). With given scores the pass reads those instead of q and k.
* ``selection``: the score pyramid read; ``inverse`` filled (``levels * padded_len`` slots) and
  one slot per entry written; the listing (local index and row of every entry) written.
* ``gather``: for each query head, the q, k and v rows of its real entries: one row per level-0
  entry, ``p**l`` rows per entry of a pooled level below the coarsest; the coarsest level
  reads the whole sequence (v only, and the means of q and k, where the score pass wrote
  them); the compressed q, k and v written. k and v are read once per query head, as the
  kernel does (a GQA group's heads may share them through L2, which this does not count).
* ``scatter``: the compressed output read, one ``inverse`` slot per level and span read, the
  output over all positions written (and ``combine="mean"``'s float32 counts).
* ``scatter_backward``: the output gradient read over the spans the gather reads for q, the
  compressed gradient written; ``gather_backward``: the compressed gradients of q, k and v read,
  ``inverse`` read per launch, the gradients of q (query heads) and of k and v (KV heads)
  written.

A real entry holds real positions; the rest are padding that the kernels skip. The coarsest
level has ``n_coarse`` real entries of ``n_coarse_padded``; every tile selects ``TILE`` of its
entries, real ones first, and its candidates one level finer are their ``p`` children each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused import score_pass_writes_means
from .plan import TILE, LighthousePlan

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


def real_entries(plan: LighthousePlan) -> list[int]:
    """Listed entries holding real positions, per level (level 0 first). A tile's candidates below
    the coarsest level are the children of what it selected, so each tile keeps its own count."""
    per_tile = [min(plan.tile_len, max(0, plan.n_coarse - t * plan.tile_len)) for t in range(plan.tiles)]
    real = [sum(per_tile)]
    for _ in range(plan.levels - 1):
        per_tile = [plan.pooling * min(TILE, count) for count in per_tile]
        real.append(sum(per_tile))
    return real[::-1]


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
    if not plan.compresses:
        return Traffic(0, 0, 0, 0, 0, 0)
    row = dim * torch.empty(0, dtype=dtype).element_size()
    seq, n, p, levels = plan.seq_len, plan.compressed_len, plan.pooling, plan.levels
    means = score_pass_writes_means(dtype, dim, plan, given_scores=scores == "given", rope=rope == "span_end")
    real = real_entries(plan)
    score_rows = (2 if selection == "causal" else 1) * sum(plan.padded_len // p**level for level in range(1, levels))
    spans = sum(real[level] * p**level for level in range(levels - 1))  # positions read below the coarsest
    slots = sum(-(-seq // p**level) for level in range(levels))  # inverse slots the positions read
    count = FLOAT32_BYTES if combine == "mean" else 0  # per position, where the mean's counts are read or written

    if scores == "given":
        score_reads = (heads + kv_heads) * seq * FLOAT32_BYTES
    else:
        score_reads = (heads + kv_heads) * seq * row
    score_pass = score_reads + (heads + kv_heads) * (score_rows * FLOAT32_BYTES + (plan.n_coarse_padded * row if means else 0))
    selection_bytes = (heads + kv_heads) * score_rows * FLOAT32_BYTES + heads * INT32_BYTES * (levels * plan.padded_len + 3 * n)
    coarsest = (2 * plan.n_coarse_padded + seq) * row if means else 3 * seq * row
    gather = heads * (3 * spans * row + coarsest + 3 * n * row)
    scatter = heads * (n * row + slots * INT32_BYTES + seq * (row + count))
    scatter_backward = heads * ((spans + seq) * (row + count) + n * row)
    gather_backward = heads * (3 * n * row + 2 * slots * INT32_BYTES + seq * row) + 2 * kv_heads * seq * row
    return Traffic(*(batch * x for x in (score_pass, selection_bytes, gather, scatter, scatter_backward, gather_backward)))
