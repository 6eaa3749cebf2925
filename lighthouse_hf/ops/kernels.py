"""Triton kernels of the fused Lighthouse path (imported only when a CUDA tensor needs them).

Besides the score pass (``scores_kernel``), four kernels, each a gather (no atomics anywhere, so every
result is bitwise reproducible):

* ``select_kernel``: one program per (batch, query head, tile) runs the top-k cascade of its tile
  (or the causal rule of ``ops/causal.py``) and writes every entry straight to its causal
  position. A tile owns a contiguous span of positions and a data-independent number of entries,
  so its entries start at ``tile * per_tile`` in the compressed sequence; inside the tile the
  causal order is the post-order of the refinement tree (children before the selected entry that
  summarises them), so each entry's position follows from subtree sizes, without a sort.
* ``entries_kernel``: for every entry of every level, reads its span (the mean of its positions,
  or for the scatter's backward the sum of the output gradient over the positions it reaches) and
  writes the row where the entry sits in the compressed sequence.
* ``scatter_kernel``: for every sequence position, sums over levels the one compressed output
  row per level that covers it (shifted spans), found through the inverse map
  ``slot -> compressed row`` that ``select_kernel`` writes: the scatter back.
* ``walk_kernel``: the gradient of the pooled gather, the same inverse map read span by span
  (plain spans, scaled by 1/width; summed over the query heads of a KV head; with span-end RoPE,
  turned back from each span's end).

``scores_kernel`` covers q and k in one launch and ``entries_kernel`` all levels in one: the
forward waits on the host until SDPA is queued, and every launch costs the host tens of
microseconds, more than the GPU work of a short step.

The compressed sequence also has a *level-major* listing (level 0 entries first, tile by tile,
then level 1, ..., the coarsest level last) holding each entry's local index and its causal row;
that is what ``entries_kernel`` walks.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The selection kernel's scratch holds, per level, five rows of SCRATCH_ROW int32 (the second
# index in ``(level * 5 + kind) * SCRATCH_ROW``): 0 selected entries by rank, 1 chosen flags by
# candidate, 2 subtree sizes by candidate, 3 child-subtree totals by rank, 4 first rows by rank.
SCRATCH_KINDS = 5


@triton.jit
def _store_level_scores(norm, scores, block, padded_len, score_stride, LEVEL: tl.constexpr, LEVELS: tl.constexpr,
                        POOL: tl.constexpr, SPAN: tl.constexpr, BLOCK_P: tl.constexpr, CAUSAL: tl.constexpr):
    """One level's max-pooled norms (see ``scores_kernel``) from the block's ``norm`` [BLOCK_P // SPAN,
    SPAN]: the level's spans in GROUPS rows of PER, one row per loaded span, or one row across the
    block when the level is wider than SPAN."""
    C: tl.constexpr = POOL**LEVEL
    GROUPS: tl.constexpr = BLOCK_P // SPAN if C <= SPAN else 1
    PER: tl.constexpr = BLOCK_P // (GROUPS * C)
    spans = tl.reshape(norm, (GROUPS, PER, C))
    slot = (block * GROUPS + tl.arange(0, GROUPS))[:, None] * PER + tl.arange(0, PER)[None, :]
    in_level = slot < padded_len // C
    if CAUSAL:
        first = (tl.arange(0, C) == 0)[None, None, :]
        rest = tl.max(tl.where(first, float("-inf"), spans), axis=2)
        first_norm = tl.max(tl.where(first, spans, float("-inf")), axis=2)
        tl.store(scores + (LEVEL - 1) * score_stride + slot, rest, mask=in_level)
        tl.store(scores + (LEVELS - 2 + LEVEL) * score_stride + slot, first_norm, mask=in_level)
    else:
        tl.store(scores + (LEVEL - 1) * score_stride + slot, tl.max(spans, axis=2), mask=in_level)


@triton.jit
def scores_kernel(
    src_q, src_k,  # [B, H, S, D] and [B, Hkv, S, D] (any strides with a contiguous last axis), half precision;
                   # GIVEN: the level-0 scores [B, H, S] and [B, Hkv, S] (any strides), floating point
    scores,  # out [B*H + B*Hkv, LEVELS-1 (CAUSAL: 2*(LEVELS-1)), score_stride] float32 (see below)
    means,  # out with MEANS_WIDTH > 0: [B*H + B*Hkv, means_len, D], means of MEANS_WIDTH positions
    rotary,  # with ROPE_HALF > 0: the rotary table (see ``rotary_table`` in fused.py)
    heads_q, heads_k, dim, seq_len, real_len, padded_len, score_stride, means_len,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    LEVELS: tl.constexpr,
    POOL: tl.constexpr,
    MEANS_WIDTH: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PASS_LEVELS: tl.constexpr,
    GIVEN: tl.constexpr,
    ROPE_HALF: tl.constexpr,
):
    """Norms and their max-pooled levels in one pass over q and k (grid: blocks, H + Hkv, B): the
    L2 norm of every real position in float32 (correctly rounded square root), -1 for padding
    positions (below every real score), then per level the maximum over each entry's span. Query
    heads' rows come first in ``scores`` and ``means``, then the key heads'. ``MEANS_WIDTH > 0``
    (a level's width, at most 16): the same pass writes the means of every ``MEANS_WIDTH``
    consecutive positions (the first ``means_len``: those that hold a position of the sequence),
    from which the gather takes the rows of q and k of every level at least that wide (a copy, or
    the mean of a few means) instead of reading q and k a second time.
    Needs ``POOL**(LEVELS-1) <= BLOCK_P`` so that every span lies inside one program's block; wider
    pyramids set ``PASS_LEVELS < LEVELS``: the pass writes levels ``1 .. PASS_LEVELS-1``
    (``POOL**(PASS_LEVELS-1) <= BLOCK_P``) into the rows of the whole pyramid, and the host
    max-pools the rest from the last of them; its grid then covers the sequence only.

    ``CAUSAL`` (``selection="causal"``, whose score of entry j is the maximum over the window
    ``j*c - c + 1 .. j*c``, which straddles two blocks): per level two rows instead of the maximum,
    the maximum over each block without its first token (rows ``0 .. LEVELS-2``) and the norm of
    its first token (rows ``LEVELS-1 ..``); the selection kernel joins entry j's first token with
    entry j-1's rest (``_start_scores``).

    ``GIVEN`` (level-0 scores given to the op): the sources are those scores, taken as the norms
    (exactly, in float32), and no means are written; the same positions per program, so the host
    finishes a partial pass as for norms.

    ``ROPE_HALF > 0`` (span-end RoPE; needs ``MEANS_WIDTH == POOL**(LEVELS-1)`` and ``dim == BLOCK_D
    == 2 * ROPE_HALF``): the means are the coarsest level's rows at span end, each position turned
    by ``end - t`` first. The norms, and so the scores, are those of ``rope="pooled"`` bit for bit."""
    tl.static_assert(not GIVEN or MEANS_WIDTH == 0)
    tl.static_assert(ROPE_HALF == 0 or (MEANS_WIDTH == POOL ** (LEVELS - 1) and BLOCK_D == 2 * ROPE_HALF))
    SPAN: tl.constexpr = MEANS_WIDTH if MEANS_WIDTH > 0 else POOL ** (PASS_LEVELS - 1)
    ENTRIES: tl.constexpr = BLOCK_P // SPAN
    block = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    if head < heads_q:
        row = b * heads_q + head
        src = src_q + b.to(tl.int64) * q_stride_b + head.to(tl.int64) * q_stride_h
        stride_s = q_stride_s
    else:
        row = tl.num_programs(2) * heads_q + b * heads_k + head - heads_q
        src = src_k + b.to(tl.int64) * k_stride_b + (head - heads_q).to(tl.int64) * k_stride_h
        stride_s = k_stride_s
    SCORE_ROWS: tl.constexpr = 2 * (LEVELS - 1) if CAUSAL else LEVELS - 1
    scores += row.to(tl.int64) * (SCORE_ROWS * score_stride)
    # The block is loaded as [spans, their SPAN positions, D]: norms reduce the last axis and the
    # means the middle one, both in the layout of the load (a 2-D load reshaped for the means went
    # through shared memory and ran at a quarter of the bandwidth; spans of 64 positions made the
    # compiler keep the whole block, 168-206 registers per thread at D=128). Levels wider than
    # SPAN max-pool the norms across spans, a small conversion.
    entry = block * ENTRIES + tl.arange(0, ENTRIES)
    position = entry[:, None] * SPAN + tl.arange(0, SPAN)[None, :]
    if GIVEN:
        given = tl.load(src + position.to(tl.int64) * stride_s, mask=position < seq_len, other=0.0).to(tl.float32)
        norm = tl.where(position < real_len, given, -1.0)
    else:
        d = tl.arange(0, BLOCK_D)
        d_mask = d < dim
        rows = tl.load(src + position.to(tl.int64)[:, :, None] * stride_s + d[None, None, :],
                       mask=(position < seq_len)[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
        norm = tl.where(position < real_len, tl.sqrt_rn(tl.sum(rows * rows, axis=2)), -1.0)
    for level in tl.static_range(1, PASS_LEVELS):
        _store_level_scores(norm, scores, block, padded_len, score_stride, level, LEVELS, POOL, SPAN, BLOCK_P, CAUSAL)
    if MEANS_WIDTH > 0:
        means += row.to(tl.int64) * means_len * dim
        if ROPE_HALF > 0:
            _store_span_end_means(src, stride_s, seq_len, means, block * ENTRIES, means_len, rotary, ENTRIES, SPAN,
                                  ROPE_HALF)
        else:
            mean = tl.sum(rows, axis=1) * (1.0 / SPAN)
            tl.store(means + entry.to(tl.int64)[:, None] * dim + d[None, :], mean.to(means.dtype.element_ty),
                     mask=(entry < means_len)[:, None] & d_mask[None, :])


@triton.jit
def _store_span_end_means(src, stride_s, seq_len, means, first_entry, means_len, rotary, ENTRIES: tl.constexpr,
                          SPAN: tl.constexpr, HALF: tl.constexpr):
    """``scores_kernel``'s means with span-end RoPE: the mean over each span of ``src``'s rows turned
    by ``end - t``, for the block's ``ENTRIES`` entries from ``first_entry``. Turning by angle a is
    ``x cos a + rot(x) sin a`` with ``rot(x) = [-x_hi, x_lo]``, so a span's sum follows Horner's
    rule in the turn by one position, ``sum = turn(sum) + x_t`` from the span's first position on:
    the table's row ``o = 1`` and, per element, two products and an add (sums over angles turned at
    each step took six operations), each rotate_half half loaded on its own so that a column and its
    partner share a thread. The block is read again (from cache) one position of 8 entries at a
    time: a sum along the positions of the block's [entries, positions, D] load went through shared
    memory (v8, NOTES-kernels.md). At D=128 that takes 86-90 registers against the pooled pass's 60-70, and is
    faster than 4 entries at a time at 57 (v23: 0.169 against 0.189 ms at 128K L3 p4, H=8; the
    pooled pass 0.166). The turn applied ``o`` times is within about ``o`` float32 roundings of the
    table's angle ``o * inv_freq`` (relative 1e-6 at SPAN = 16), for means stored in half precision."""
    ROWS: tl.constexpr = min(ENTRIES, 8)
    f = tl.arange(0, HALF)
    turn = tl.broadcast_to(rotary + 2 * HALF + f[None, :], (ROWS, HALF))  # row o = 1
    cos = tl.load(turn)
    sin = tl.load(turn + HALF)
    for first in tl.static_range(0, ENTRIES, ROWS):
        entry = first_entry + first + tl.arange(0, ROWS)
        for t in tl.static_range(SPAN):
            position = entry * SPAN + t
            row = src + position.to(tl.int64)[:, None] * stride_s + f[None, :]
            real = (position < seq_len)[:, None]
            row_lo = tl.load(row, mask=real, other=0.0).to(tl.float32)
            row_hi = tl.load(row + HALF, mask=real, other=0.0).to(tl.float32)
            if t == 0:
                lo, hi = row_lo, row_hi
            else:
                lo, hi = lo * cos - hi * sin + row_lo, lo * sin + hi * cos + row_hi
        out = means + entry.to(tl.int64)[:, None] * (2 * HALF) + f[None, :]
        written = (entry < means_len)[:, None]
        tl.store(out, (lo * (1.0 / SPAN)).to(means.dtype.element_ty), mask=written)
        tl.store(out + HALF, (hi * (1.0 / SPAN)).to(means.dtype.element_ty), mask=written)


@triton.jit
def _ordered(score):
    """float32 -> int32 with the same order (for non-NaN scores; -0.0 and 0.0 tie, as they compare)."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _unordered(key):
    """The float32 whose ``_ordered`` key is ``key``."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest(key, COUNT: tl.constexpr):
    """The COUNT-th largest of the int32 keys, found bit by bit (32 counting passes). A runtime
    loop: unrolled, the causal select kernel took 3-6x longer to compile and spilled registers."""
    threshold = tl.where(tl.sum((key >= 0).to(tl.int32), axis=0) >= COUNT, 0, -2147483648)
    for step in range(31):
        trial = threshold | (1 << (30 - step))
        threshold = tl.where(tl.sum((key >= trial).to(tl.int32), axis=0) >= COUNT, trial, threshold)
    return threshold


@triton.jit
def _take_best(key, COUNT: tl.constexpr):
    """Mask of the COUNT largest keys; among equal keys the lower lane wins (a stable sort's choice)."""
    return _take_from(key, _kth_largest(key, COUNT), COUNT)


@triton.jit
def _take_from(key, threshold, COUNT: tl.constexpr):
    """``_take_best`` given the COUNT-th largest key: every key above it, then the first ties in lane order."""
    above = key > threshold
    room = COUNT - tl.sum(above.to(tl.int32), axis=0)
    tie = key == threshold
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))


@triton.jit
def _choose(q_scores, k_scores, candidates, valid):
    """The cascade's choice among one tile's candidates: 64 by query score, then 64 of the rest by key score."""
    q_key = tl.where(valid, _ordered(tl.load(q_scores + candidates, mask=valid, other=0.0)), -2147483648)
    chosen = _take_best(q_key, 64)
    # Entries already taken, and lanes past the tile, sit below every score (the reference's -inf).
    k_key = tl.where(valid & ~chosen, _ordered(tl.load(k_scores + candidates, mask=valid, other=0.0)), -2147483648)
    return chosen | _take_best(k_key, 64)


@triton.jit
def _start_scores(scores, level, coarse, score_stride, candidates, valid):
    """selection="causal": each candidate's score, the maximum over the ``c`` tokens ending at its
    first token: its first token's norm and the rest of the entry before it (-1 before the
    sequence), from the score pass's two rows of the level (see ``scores_kernel``)."""
    first = tl.load(scores + (coarse + level - 1) * score_stride + candidates, mask=valid, other=0.0)
    rest_before = tl.load(scores + (level - 1) * score_stride + candidates - 1, mask=valid & (candidates > 0), other=-1.0)
    return tl.maximum(first, rest_before)


@triton.jit
def _exclusive_count(flags):
    as_int = flags.to(tl.int32)
    return tl.cumsum(as_int, axis=0) - as_int


@triton.jit
def _first_come(wants_q, wants_k, valid, count):
    """selection="causal": the mask of candidates taken in position order (``ops/causal.py``):
    into the query half while it holds fewer than 64 and the candidate reaches the query
    threshold (``wants_q``), else into the key half likewise (``wants_k``), and every candidate
    from the one where the candidates left (of ``count``) equal the budget left."""
    lane = tl.arange(0, wants_q.shape[0])
    by_q = wants_q & (_exclusive_count(wants_q) < 64)
    wants_k = wants_k & ~by_q
    taken = by_q | (wants_k & (_exclusive_count(wants_k) < 64))
    budget_left = 128 - _exclusive_count(taken)
    forced = tl.cumsum((valid & (count - lane == budget_left)).to(tl.int32), axis=0) > 0
    return valid & (taken | forced)


@triton.jit
def _reaches_running_mean(score, valid):
    """Tile 0's test: whether each lane's score reaches the mean of the valid lanes' scores before
    it (float64, as the reference; lane 0 always does). The reference sums in another order: both
    are exact, so equal, while (largest / smallest nonzero score) x candidates < 2**29 (float64
    then holds every partial sum of float32 scores)."""
    lane = tl.arange(0, score.shape[0])
    wide = tl.where(valid, score.to(tl.float64), 0.0)
    seen = tl.maximum(lane, 1).to(tl.float64)
    return valid & ((lane == 0) | (wide >= (tl.cumsum(wide, axis=0) - wide) / seen))


@triton.jit
def _reaching(q_score, k_score, valid, tile, this_level, q_thresholds, k_thresholds):
    """Which candidates reach the query and the key threshold: in tile 0 the running means, else
    the thresholds handed on for this level (lane ``this_level``). The float64 means live in
    their branch only (as per-lane thresholds they spilled registers)."""
    if tile == 0:
        wants_q = _reaches_running_mean(q_score, valid)
        wants_k = _reaches_running_mean(k_score, valid)
    else:
        wants_q = valid & (q_score >= tl.max(tl.where(this_level, q_thresholds, float("-inf")), axis=0))
        wants_k = valid & (k_score >= tl.max(tl.where(this_level, k_thresholds, float("-inf")), axis=0))
    return wants_q, wants_k


@triton.jit
def _causal_tile(
    q_scores, k_scores, scratch, tile, tile_len, score_stride, q_thresholds, k_thresholds,
    LEVELS: tl.constexpr, POOL: tl.constexpr, COARSE_BLOCK: tl.constexpr, SCRATCH_ROW: tl.constexpr,
    HANDS_ON: tl.constexpr,
):
    """selection="causal": phase 1 of ``select_kernel`` for ``tile`` (its choice per level, into the
    scratch rows 0 and 1), with the thresholds that the tile before handed on (``[LEVEL_LANES]``
    float32, lane = level; tile 0 uses running means instead). ``HANDS_ON``: also returns the
    thresholds this tile hands to the next one, the smallest scores of the published top-k halves
    of its candidates."""
    COARSE: tl.constexpr = LEVELS - 1
    CHILDREN: tl.constexpr = 128 * POOL
    level_lane = tl.arange(0, q_thresholds.shape[0])
    q_next = q_thresholds
    k_next = k_thresholds
    for level in tl.static_range(COARSE, 0, -1):
        if level == COARSE:
            lane = tl.arange(0, COARSE_BLOCK)
            valid = lane < tile_len
            candidates = tile * tile_len + lane
            count = tile_len
        else:
            lane = tl.arange(0, CHILDREN)
            valid = lane < CHILDREN
            parent = tl.load(scratch + ((level + 1) * 5 + 0) * SCRATCH_ROW + lane // POOL)
            candidates = parent * POOL + lane % POOL
            count = CHILDREN
        q_score = _start_scores(q_scores, level, COARSE, score_stride, candidates, valid)
        k_score = _start_scores(k_scores, level, COARSE, score_stride, candidates, valid)
        if HANDS_ON:
            q_key = tl.where(valid, _ordered(q_score), -2147483648)
            q_floor = _kth_largest(q_key, 64)
            k_key = tl.where(valid & ~_take_from(q_key, q_floor, 64), _ordered(k_score), -2147483648)
            q_next = tl.where(level_lane == level, _unordered(q_floor), q_next)
            k_next = tl.where(level_lane == level, _unordered(_kth_largest(k_key, 64)), k_next)
        wants_q, wants_k = _reaching(q_score, k_score, valid, tile, level_lane == level, q_thresholds, k_thresholds)
        chosen = _first_come(wants_q, wants_k, valid, count)
        rank = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(scratch + (level * 5 + 0) * SCRATCH_ROW + rank, candidates, mask=chosen)
        tl.store(scratch + (level * 5 + 1) * SCRATCH_ROW + lane, chosen.to(tl.int32))
        tl.debug_barrier()
    return q_next, k_next


@triton.jit
def select_kernel(
    q_scores,  # [B*H, LEVELS-1 (CAUSAL: 2*(LEVELS-1)), score_stride] float32: the score pass's rows
    k_scores,  # [B*Hkv, LEVELS-1 (CAUSAL: 2*(LEVELS-1)), score_stride] float32
    entry_local,  # out [B*H, selected_len] int32, level-major: the entry's index inside its level
    entry_row,  # out [B*H, selected_len] int32, level-major: the entry's causal row
    inverse,  # out [B*H, LEVELS, seq_len] int32, pre-filled with -1: slot -> causal row
    scratch,  # [B*H*tiles, LEVELS, SCRATCH_KINDS, SCRATCH_ROW] int32
    heads,
    group,
    seq_len,
    tile_len,
    score_stride,
    selected_len,
    LEVELS: tl.constexpr,
    POOL: tl.constexpr,
    COARSE_BLOCK: tl.constexpr,
    SCRATCH_ROW: tl.constexpr,
    CAUSAL: tl.constexpr,
    LEVEL_LANES: tl.constexpr,
):
    """One program per (tile, query head, batch). ``CAUSAL`` (``selection="causal"``; the scores
    then hold two rows per level, see ``scores_kernel``): tile T's thresholds at level l are read
    from tile T-1's candidates at level l, the children of tile T-1's choice at level l+1, whose
    thresholds were read from tile T-2's candidates at level l+1, and so on up to the coarsest
    level (L-1), whose candidates are fixed. So the program runs the cascades of tiles
    max(0, T-L+1) .. T-1 before its own, each handing its thresholds on to the next. The first of
    them, unless it is tile 0, starts from made-up thresholds (zeros); by induction tile T-j then
    chooses right at levels > j and hands on right thresholds at levels >= j, so tile T chooses
    right at every level. About L tiles' cascades per program, no grid-wide synchronisation.
    ``LEVEL_LANES``: a power of two >= LEVELS (the thresholds, one lane per level).

    ``inverse`` keeps the slots of a level that positions inside the sequence read, fewer than
    ``seq_len`` (a padded pyramid can be far longer: 6,291,456 positions at 128K, L5 p8 K1536,
    whose table of every slot took 1.0 GB); slots of entries past the sequence are not stored."""
    TILE: tl.constexpr = 128
    CHILDREN: tl.constexpr = 128 * POOL
    COARSE: tl.constexpr = LEVELS - 1
    tile = tl.program_id(0)
    tiles = tl.num_programs(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * heads + h
    kv_bh = b * (heads // group) + h // group
    SCORE_ROWS: tl.constexpr = 2 * COARSE if CAUSAL else COARSE
    q_scores += bh.to(tl.int64) * (SCORE_ROWS * score_stride)
    k_scores += kv_bh.to(tl.int64) * (SCORE_ROWS * score_stride)
    entry_local += bh.to(tl.int64) * selected_len
    entry_row += bh.to(tl.int64) * selected_len
    inverse += bh.to(tl.int64) * (LEVELS * seq_len)
    scratch += (bh.to(tl.int64) * tiles + tile) * (LEVELS * 5 * SCRATCH_ROW)
    per_tile = tile_len + COARSE * CHILDREN
    ranks = tl.arange(0, TILE)
    children = tl.arange(0, CHILDREN)
    coarse = tl.arange(0, COARSE_BLOCK)
    in_tile = coarse < tile_len
    coarse_local = tile * tile_len + coarse

    # Phase 1, top-down: the cascade. Selected entries are kept by rank (their order in the tile).
    if CAUSAL:
        q_thresholds = tl.zeros((LEVEL_LANES,), dtype=tl.float32)
        k_thresholds = tl.zeros((LEVEL_LANES,), dtype=tl.float32)
        for earlier in range(tl.maximum(tile - COARSE, 0), tile):
            q_thresholds, k_thresholds = _causal_tile(
                q_scores, k_scores, scratch, earlier, tile_len, score_stride, q_thresholds, k_thresholds,
                LEVELS, POOL, COARSE_BLOCK, SCRATCH_ROW, True,
            )
        _causal_tile(q_scores, k_scores, scratch, tile, tile_len, score_stride, q_thresholds, k_thresholds,
                     LEVELS, POOL, COARSE_BLOCK, SCRATCH_ROW, False)
    else:
        chosen = _choose(q_scores + (COARSE - 1) * score_stride, k_scores + (COARSE - 1) * score_stride, coarse_local,
                         in_tile)
        rank = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(scratch + (COARSE * 5 + 0) * SCRATCH_ROW + rank, coarse_local, mask=chosen)
        tl.store(scratch + (COARSE * 5 + 1) * SCRATCH_ROW + coarse, chosen.to(tl.int32))
        tl.debug_barrier()
        for level in tl.static_range(COARSE - 1, 0, -1):
            parent = tl.load(scratch + ((level + 1) * 5 + 0) * SCRATCH_ROW + children // POOL)
            local = parent * POOL + children % POOL
            chosen = _choose(q_scores + (level - 1) * score_stride, k_scores + (level - 1) * score_stride, local,
                             children < CHILDREN)
            rank = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(scratch + (level * 5 + 0) * SCRATCH_ROW + rank, local, mask=chosen)
            tl.store(scratch + (level * 5 + 1) * SCRATCH_ROW + children, chosen.to(tl.int32))
            tl.debug_barrier()

    # Phase 2, bottom-up: subtree sizes (an entry plus, when selected, everything below it).
    for level in tl.static_range(1, COARSE):
        chosen_flag = tl.load(scratch + (level * 5 + 1) * SCRATCH_ROW + children)
        rank = tl.cumsum(chosen_flag, axis=0) - 1
        if level == 1:
            size = 1 + chosen_flag * POOL
        else:
            below = tl.load(scratch + (level * 5 + 3) * SCRATCH_ROW + rank, mask=chosen_flag > 0, other=0)
            size = 1 + below
        tl.store(scratch + (level * 5 + 2) * SCRATCH_ROW + children, size)
        tl.store(scratch + ((level + 1) * 5 + 3) * SCRATCH_ROW + ranks, tl.sum(tl.reshape(size, (TILE, POOL)), axis=1))
        tl.debug_barrier()
    chosen_flag = tl.load(scratch + (COARSE * 5 + 1) * SCRATCH_ROW + coarse, mask=in_tile, other=0)
    rank = tl.cumsum(chosen_flag, axis=0) - 1
    if COARSE == 1:
        size = 1 + chosen_flag * POOL
    else:
        size = 1 + tl.load(scratch + (COARSE * 5 + 3) * SCRATCH_ROW + rank, mask=chosen_flag > 0, other=0)
    size = tl.where(in_tile, size, 0)

    # Phase 3, top-down: causal rows. A subtree occupies a contiguous run of rows that ends with its root.
    start = tile * per_tile + tl.cumsum(size, axis=0) - size
    row = start + size - 1
    listed = COARSE * tiles * CHILDREN + coarse_local
    tl.store(entry_local + listed, coarse_local, mask=in_tile)
    tl.store(entry_row + listed, row, mask=in_tile)
    tl.store(inverse + COARSE * seq_len + coarse_local, row, mask=in_tile & (coarse_local < seq_len))
    tl.store(scratch + (COARSE * 5 + 4) * SCRATCH_ROW + rank, start, mask=chosen_flag > 0)
    tl.debug_barrier()
    for level in tl.static_range(COARSE - 1, 0, -1):
        parent = tl.load(scratch + ((level + 1) * 5 + 0) * SCRATCH_ROW + children // POOL)
        local = parent * POOL + children % POOL
        chosen_flag = tl.load(scratch + (level * 5 + 1) * SCRATCH_ROW + children)
        size = tl.load(scratch + (level * 5 + 2) * SCRATCH_ROW + children)
        sizes = tl.reshape(size, (TILE, POOL))
        before = tl.reshape(tl.cumsum(sizes, axis=1) - sizes, (CHILDREN,))
        start = tl.load(scratch + ((level + 1) * 5 + 4) * SCRATCH_ROW + children // POOL) + before
        row = start + size - 1
        listed = level * tiles * CHILDREN + tile * CHILDREN + children
        tl.store(entry_local + listed, local)
        tl.store(entry_row + listed, row)
        tl.store(inverse + level * seq_len + local, row, mask=local < seq_len)
        rank = tl.cumsum(chosen_flag, axis=0) - 1
        tl.store(scratch + (level * 5 + 4) * SCRATCH_ROW + rank, start, mask=chosen_flag > 0)
        tl.debug_barrier()
    parent = tl.load(scratch + (1 * 5 + 0) * SCRATCH_ROW + children // POOL)
    local = parent * POOL + children % POOL
    row = tl.load(scratch + (1 * 5 + 4) * SCRATCH_ROW + children // POOL) + children % POOL
    listed = tile * CHILDREN + children
    tl.store(entry_local + listed, local)
    tl.store(entry_row + listed, row)
    tl.store(inverse + local, row, mask=local < seq_len)


@triton.jit
def _span_stop(first, use, seq_len, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """Where a program's loop over the spans of its entries (from ``first``, where ``use``) can stop:
    past the last position inside the sequence. Levels whose listed entries outnumber the level's
    blocks list padding entries whose spans lie wholly past it (at 128K, L5 p8 K1536 lists 1536
    coarsest entries of 4096 positions, 32 of them real), and their programs now skip the loop.
    The loop adds only zeros past the sequence, to totals that start at +0.0, so stopping early
    changes no bit. Spans of one step (up to 4 positions) keep a constant loop."""
    if WIDTH > CHUNK:
        stop = tl.max(tl.where(use, tl.minimum(seq_len - first, WIDTH), 0), axis=0)
    else:
        stop = WIDTH
    return stop


@triton.jit
def _entry_rows(src, b, head, stride_b, stride_h, stride_s, first, use, seq_len, d, d_mask, counts,
                WIDTH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                DIVIDE: tl.constexpr, TILE: tl.constexpr):
    """Sum over ``WIDTH`` consecutive positions from ``first`` of one head of ``src``: [BLOCK_R, BLOCK_D] fp32.

    One position of every entry at a time, ``CHUNK`` of them unrolled per loop step, added in
    position order: the [BLOCK_R, BLOCK_D] tiles add inside each thread. Summed as [BLOCK_R,
    CHUNK, BLOCK_D] tiles, a chunk axis of 16 or more lay across warps and every step's sum went
    through shared memory behind barriers, which bound the launch on L1 (NOTES-kernels.md, v17).
    ``TILE`` (chunks of at most 4, whose axis stays inside a warp): sums such tiles instead, for
    v beside span-end RoPE's rotated rows of q and k, where the unrolled loop took the launch from
    95 to 114 registers per thread (a level whose q and k are the score pass's means rotates none,
    and sums v as published does).
    ``DIVIDE`` (``combine="mean"``): each position's row is multiplied by ``1 / counts[position]``
    (``counts`` >= 1 where any entry reaches it; ``counts`` points at this head's row of them)."""
    tl.static_assert(not TILE or (CHUNK <= 4 and not DIVIDE))
    base = src + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for step in range(0, _span_stop(first, use, seq_len, WIDTH, CHUNK), CHUNK):
        if TILE:
            position = first[:, None] + step + tl.arange(0, CHUNK)[None, :]
            live = use[:, None] & (position < seq_len)
            offsets = position.to(tl.int64)[:, :, None] * stride_s + d[None, None, :]
            rows = tl.load(base + offsets, mask=live[:, :, None] & d_mask[None, None, :], other=0.0)
            total += tl.sum(rows.to(tl.float32), axis=1)
        else:
            for offset in tl.static_range(CHUNK):
                position = first + step + offset
                live = use & (position < seq_len)
                offsets = position.to(tl.int64)[:, None] * stride_s + d[None, :]
                rows = tl.load(base + offsets, mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                if DIVIDE:  # one reciprocal per row, not a division per element (NOTES-kernels.md, "v21")
                    rows = rows * (1.0 / tl.maximum(tl.load(counts + position, mask=live, other=1.0), 1.0))[:, None]
                total += rows
    return total


@triton.jit
def _rotated_entry_rows(src, b, head, stride_b, stride_h, stride_s, first, use, seq_len, rotary,
                        WIDTH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, HALF: tl.constexpr):
    """``_entry_rows`` for span-end RoPE: the sum over the span of each position's row rotated by
    ``end - t`` (``end = first + WIDTH - 1``), as its two rotate_half halves [BLOCK_R, HALF] fp32.
    ``rotary``: the table (``rotary_table`` in fused.py), row ``o`` cos then sin of ``o * inv_freq``.

    The same loop as ``_entry_rows``; the table row (the same for every entry) broadcasts along
    the rows' 2-D tiles, so nothing is reduced across threads."""
    base = src + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    f = tl.arange(0, HALF)
    total_lo = tl.zeros((BLOCK_R, HALF), dtype=tl.float32)
    total_hi = tl.zeros((BLOCK_R, HALF), dtype=tl.float32)
    for step in range(0, _span_stop(first, use, seq_len, WIDTH, CHUNK), CHUNK):
        for offset in tl.static_range(CHUNK):
            position = first + step + offset
            mask = (use & (position < seq_len))[:, None]
            offsets = position.to(tl.int64)[:, None] * stride_s + f[None, :]
            lo = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
            hi = tl.load(base + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
            to_end = (WIDTH - 1 - offset - step) * (2 * HALF) + f
            cos = tl.load(rotary + to_end)[None, :]
            sin = tl.load(rotary + to_end + HALF)[None, :]
            total_lo += lo * cos - hi * sin
            total_hi += hi * cos + lo * sin
    return total_lo, total_hi


def positions_per_step(width: int) -> int:
    """Positions of a span that ``entries_kernel`` sums per loop step (unrolled, one position of
    every entry at a time): up to 4 for spans up to 16, so that a program holds 16 entries at
    D=128; 16 for wider spans, which keeps their programs many and their dependent steps few (4 a
    step would leave 16 programs with real coarsest entries at 128K, L5 p8, each running 3072
    dependent steps)."""
    return min(width, 4) if width <= 16 else 16


def entries_per_program(width: int, block_d: int) -> int:
    """Entries of ``width`` positions that one ``entries_kernel`` program fills: about 8192 elements
    in flight (16-32 KB), summed ``positions_per_step(width)`` positions at a time.
    ``_level_entries`` repeats both formulas at compile time; the host uses this one for the grid."""
    return max(1, min(64, 8192 // (positions_per_step(width) * block_d)))


@triton.jit
def _level_entries(
    src_q, src_k, src_v, dst_q, dst_k, dst_v, entry_local, entry_row, means, rotary, counts,
    block, level_first_block, b, h, bh, group, seq_len, dim, selected_len, coarse_len, real_len, means_len,
    q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s,
    LEVEL: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr, TOPK: tl.constexpr,
    SHIFTED: tl.constexpr, WITH_KV: tl.constexpr, MEANS_WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
    ROPE_HALF: tl.constexpr, MEAN: tl.constexpr, PADDED: tl.constexpr,
):
    """The entries of one level, when program ``block`` falls in the level's blocks (which start at
    ``level_first_block``); returns where the next level's blocks start."""
    WIDTH: tl.constexpr = POOL**LEVEL
    ROTATE: tl.constexpr = ROPE_HALF > 0 and LEVEL > 0 and not SHIFTED  # q and k rows only
    CHUNK: tl.constexpr = min(WIDTH, 4) if WIDTH <= 16 else 16  # positions_per_step's formula
    BLOCK_R: tl.constexpr = max(1, min(64, 8192 // (CHUNK * BLOCK_D)))
    SHIFT: tl.constexpr = WIDTH - 1 if SHIFTED else 0
    SCALE: tl.constexpr = 1.0 if SHIFTED else 1.0 / WIDTH
    DIVIDE: tl.constexpr = MEAN and SHIFTED
    # q and k from the score pass's means: MEANS per entry (with span-end RoPE the coarsest level's rows)
    FROM_MEANS: tl.constexpr = WITH_KV and not SHIFTED and MEANS_WIDTH > 0 and WIDTH >= MEANS_WIDTH
    MEANS: tl.constexpr = WIDTH // MEANS_WIDTH if FROM_MEANS else 0
    tl.static_assert(ROPE_HALF == 0 or MEANS <= 1)  # span-end means are copies, never averaged
    MEANS_CHUNK: tl.constexpr = min(MEANS, 4) if MEANS <= 16 else 16
    if LEVEL < LEVELS - 1:
        listed_len = POOL * TOPK
    else:
        listed_len = coarse_len
    level_blocks = (listed_len + BLOCK_R - 1) // BLOCK_R
    if (block >= level_first_block) & (block < level_first_block + level_blocks):
        r = (block - level_first_block) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < listed_len
        listed = bh.to(tl.int64) * selected_len + LEVEL * POOL * TOPK + r
        local = tl.load(entry_local + listed, mask=r_mask, other=0)
        row = tl.load(entry_row + listed, mask=r_mask, other=0)
        use = r_mask & (local < real_len // WIDTH) if SHIFTED else r_mask
        first = local * WIDTH + SHIFT
        d = tl.arange(0, BLOCK_D)
        d_mask = d < dim
        out = (bh.to(tl.int64) * selected_len + row)[:, None] * dim + d[None, :]
        out_mask = r_mask[:, None] & d_mask[None, :]
        padding_only = False
        if PADDED:
            # A padded plan lists far more entries than it has (at 128K, L5 p4 K1536: 2048 real of
            # 6144 per level): programs holding padding entries only write their zero rows and stop,
            # instead of summing masked loads.
            padding_only = tl.max(tl.where(use & (first < seq_len), 1, 0), axis=0) == 0
        if padding_only:
            zeros = tl.zeros((BLOCK_R, BLOCK_D), dtype=dst_q.dtype.element_ty)
            tl.store(dst_q + out, zeros, mask=out_mask)
            if WITH_KV:
                tl.store(dst_k + out, zeros, mask=out_mask)
                tl.store(dst_v + out, zeros, mask=out_mask)
        else:
            if FROM_MEANS:
                # [B*H + B*Hkv, means_len, D], query heads first: the means that hold a position of
                # the sequence (those past it would be zero)
                kv_row = tl.num_programs(2) * tl.num_programs(1) + b * (tl.num_programs(1) // group) + h // group
                if MEANS == 1:
                    written = out_mask & (local < means_len)[:, None]
                    q_mean = (bh.to(tl.int64) * means_len + local)[:, None] * dim + d[None, :]
                    k_mean = (kv_row.to(tl.int64) * means_len + local)[:, None] * dim + d[None, :]
                    tl.store(dst_q + out, tl.load(means + q_mean, mask=written, other=0.0).to(dst_q.dtype.element_ty),
                             mask=out_mask)
                    tl.store(dst_k + out, tl.load(means + k_mean, mask=written, other=0.0).to(dst_k.dtype.element_ty),
                             mask=out_mask)
                else:
                    total = _entry_rows(means, b, bh, 0, means_len * dim, dim, local * MEANS, use, means_len, d, d_mask,
                                        counts, MEANS, MEANS_CHUNK, BLOCK_R, BLOCK_D, False, False)
                    tl.store(dst_q + out, (total * (1.0 / MEANS)).to(dst_q.dtype.element_ty), mask=out_mask)
                    total = _entry_rows(means, b, kv_row, 0, means_len * dim, dim, local * MEANS, use, means_len, d,
                                        d_mask, counts, MEANS, MEANS_CHUNK, BLOCK_R, BLOCK_D, False, False)
                    tl.store(dst_k + out, (total * (1.0 / MEANS)).to(dst_k.dtype.element_ty), mask=out_mask)
            elif ROTATE:
                # q and k at span end (rope="span_end"): each rotate_half half stored on its own
                f = tl.arange(0, ROPE_HALF)
                half_out = (bh.to(tl.int64) * selected_len + row)[:, None] * dim + f[None, :]
                half_mask = r_mask[:, None]
                lo, hi = _rotated_entry_rows(src_q, b, h, q_stride_b, q_stride_h, q_stride_s, first, use, seq_len, rotary,
                                             WIDTH, CHUNK, BLOCK_R, ROPE_HALF)
                tl.store(dst_q + half_out, (lo * SCALE).to(dst_q.dtype.element_ty), mask=half_mask)
                tl.store(dst_q + half_out + ROPE_HALF, (hi * SCALE).to(dst_q.dtype.element_ty), mask=half_mask)
                lo, hi = _rotated_entry_rows(src_k, b, h // group, k_stride_b, k_stride_h, k_stride_s, first, use, seq_len,
                                             rotary, WIDTH, CHUNK, BLOCK_R, ROPE_HALF)
                tl.store(dst_k + half_out, (lo * SCALE).to(dst_k.dtype.element_ty), mask=half_mask)
                tl.store(dst_k + half_out + ROPE_HALF, (hi * SCALE).to(dst_k.dtype.element_ty), mask=half_mask)
            else:
                total = _entry_rows(src_q, b, h, q_stride_b, q_stride_h, q_stride_s, first, use, seq_len, d, d_mask,
                                    counts + bh.to(tl.int64) * seq_len, WIDTH, CHUNK, BLOCK_R, BLOCK_D, DIVIDE,
                                    False)
                tl.store(dst_q + out, (total * SCALE).to(dst_q.dtype.element_ty), mask=out_mask)
                if WITH_KV:
                    total = _entry_rows(src_k, b, h // group, k_stride_b, k_stride_h, k_stride_s, first, use, seq_len, d,
                                        d_mask, counts, WIDTH, CHUNK, BLOCK_R, BLOCK_D, False, False)
                    tl.store(dst_k + out, (total * SCALE).to(dst_k.dtype.element_ty), mask=out_mask)
            if WITH_KV:
                total = _entry_rows(src_v, b, h // group, v_stride_b, v_stride_h, v_stride_s, first, use, seq_len, d,
                                    d_mask, counts, WIDTH, CHUNK, BLOCK_R, BLOCK_D, False,
                                    ROTATE and not FROM_MEANS and WIDTH <= 16)
                tl.store(dst_v + out, (total * SCALE).to(dst_v.dtype.element_ty), mask=out_mask)
    return level_first_block + level_blocks


@triton.jit
def entries_kernel(
    src_q, src_k, src_v,  # [B, h, S, D] (any strides with a contiguous last axis)
    dst_q, dst_k, dst_v,  # [B*H, selected_len, D] contiguous
    entry_local, entry_row,  # [B*H, selected_len] int32, level-major
    means,  # with MEANS_WIDTH > 0: [B*H + B*Hkv, means_len, D], the score pass's means of q and k
    rotary,  # with ROPE_HALF > 0: the rotary table (see ``rotary_table`` in fused.py)
    counts,  # with MEAN and SHIFTED: [B*H, S] float32, how many entries reach each position
    heads, group, seq_len, dim, selected_len, coarse_len, real_len, means_len,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    LEVELS: tl.constexpr,
    POOL: tl.constexpr,
    TOPK: tl.constexpr,
    SHIFTED: tl.constexpr,
    WITH_KV: tl.constexpr,
    MEANS_WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE_HALF: tl.constexpr,
    MEAN: tl.constexpr,
    PADDED: tl.constexpr,
):
    """Rows of every entry: for an entry of width ``c = POOL**level`` and local index ``j``, the mean
    of the source over positions ``[j*c, (j+1)*c)``, or with ``SHIFTED`` the sum over
    ``[j*c + c - 1, j*c + 2c - 1)`` (< seq_len; entries past ``real_len`` get zero rows), written to
    the entry's causal row. q is read from query head h, k and v (when ``WITH_KV``) from KV head
    h // group. Grid: blocks, H, B. Programs along axis 0 take the levels one after another (the coarsest first), each
    level in blocks of ``entries_per_program(c, BLOCK_D)`` entries; levels below the coarsest list
    ``POOL * TOPK`` entries, the coarsest ``coarse_len``. ``MEANS_WIDTH > 0`` (with ``WITH_KV``): q
    and k rows of levels at least that wide are the mean of ``c / MEANS_WIDTH`` of the means that
    ``scores_kernel`` wrote (a copy where ``c == MEANS_WIDTH``). ``ROPE_HALF > 0``
    (``rope="span_end"``, not with ``SHIFTED``; needs ``dim == BLOCK_D == 2 * ROPE_HALF``): pooled
    q and k rows rotate each position to the span's last token first; means, if any, are the
    coarsest level's rows already so turned. ``MEAN`` with ``SHIFTED`` (the gradient of ``combine="mean"``): each
    position's gradient is divided by its ``counts``. ``PADDED``: the plan lists many padding
    entries (``fused._mostly_padding``), so a program may hold padding entries only; it writes
    their zero rows and skips the sums."""
    block = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * heads + h
    level_first_block = 0
    # coarsest level first: its programs sum the widest spans, so they should not start last
    for level in tl.static_range(LEVELS - 1, -1, -1):
        level_first_block = _level_entries(
            src_q, src_k, src_v, dst_q, dst_k, dst_v, entry_local, entry_row, means, rotary, counts,
            block, level_first_block, b, h, bh, group, seq_len, dim, selected_len, coarse_len, real_len, means_len,
            q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s,
            level, LEVELS, POOL, TOPK, SHIFTED, WITH_KV, MEANS_WIDTH, BLOCK_D, ROPE_HALF, MEAN, PADDED,
        )


@triton.jit
def _over_positions(rows, SLOTS: tl.constexpr, WIDTH: tl.constexpr, COLUMNS: tl.constexpr):
    """[SLOTS * WIDTH, COLUMNS]: each of ``rows`` ([SLOTS, COLUMNS]) repeated over the ``WIDTH``
    positions its entry covers (entries of width 1 already hold one row per position)."""
    if WIDTH == 1:
        return rows
    return tl.reshape(tl.broadcast_to(rows[:, None, :], (SLOTS, WIDTH, COLUMNS)), (SLOTS * WIDTH, COLUMNS))


@triton.jit
def _covering_rows(inverse, bx, member, group, slot, covered, selected_len, dim, inverse_len,
                   LEVEL: tl.constexpr, LEVELS: tl.constexpr):
    """For query head ``member`` of the output head's group: which ``slot``s of the level hold a
    selected entry, and where each one's row starts (``[slots, 1]``, elements)."""
    head = bx.to(tl.int64) * group + member
    row = tl.load(inverse + head * (LEVELS * inverse_len) + LEVEL * inverse_len + slot, mask=covered, other=-1)
    found = covered & (row >= 0)
    return found, (head * selected_len + row)[:, None] * dim


@triton.jit
def _real_slots(slot, width, real_len):
    """Which entries ``slot`` of width ``width`` the scatter reads: real entries only."""
    return (slot >= 0) & (slot < real_len // width)


@triton.jit
def _finer_levels_reached(inverse, bx, position, real_len, inverse_len, LEVELS: tl.constexpr, POOL: tl.constexpr):
    """Whether (a scalar) a selected entry of a level below the coarsest covers any of ``position``,
    at the slots and conditions that ``_scatter_levels`` takes. Most blocks meet only coarsest
    entries (256K L5 p2 K2048: over three quarters), and there every finer level's load, widening
    and add would add zeros."""
    reached = tl.zeros(position.shape, dtype=tl.int32)
    for level in tl.static_range(LEVELS):
        width = POOL**level
        slot = (position + 1) // width - 1  # entry j covers [j*c + c - 1, j*c + 2c - 1)
        row = tl.load(inverse + bx.to(tl.int64) * (LEVELS * inverse_len) + level * inverse_len + slot,
                      mask=_real_slots(slot, width, real_len), other=-1)
        if level + 1 < LEVELS:
            reached |= (row >= 0).to(tl.int32)
        else:  # never true: it keeps the coarsest level's load, so that the coarse-only sum's own load
            # of it hits L1 (as measured in the A/B; not timed without it)
            reached |= (row < -1).to(tl.int32)
    return tl.max(reached, axis=0) > 0


@triton.jit
def _scatter_levels(
    src, inverse, total, reached, bx, first, d, d_mask, dim, selected_len, real_len, inverse_len,
    LEVEL: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    MEAN: tl.constexpr,
):
    """Levels ``LEVEL`` and up of ``scatter_kernel``. A level's entries have width ``c = POOL**LEVEL``
    (a compile-time constant, so divisions are shifts); the block's positions meet ``SLOTS`` of
    them, ``WIDTH`` positions each, so each entry's row is loaded once and broadcast over its
    positions. The broadcast passes through shared memory behind barriers, which no load is issued
    across, so every level's rows are loaded (recursing to the coarser levels) before any level is
    broadcast: the program waits for one round of row loads, not one per level. The coarsest level
    is added first."""
    C: tl.constexpr = POOL**LEVEL
    WIDTH: tl.constexpr = C if C < BLOCK_P else BLOCK_P
    SLOTS: tl.constexpr = BLOCK_P // WIDTH
    slot = first // C - 1 + tl.arange(0, SLOTS)  # entry j covers [j*c + c - 1, j*c + 2c - 1); the block starts at first - 1
    covered = _real_slots(slot, C, real_len)
    # the output has a head per query head: member 0 of a group of 1
    found, row_start = _covering_rows(inverse, bx, 0, 1, slot, covered, selected_len, dim, inverse_len, LEVEL, LEVELS)
    rows = tl.load(src + row_start + d[None, :], mask=found[:, None] & d_mask[None, :], other=0.0)
    if LEVEL + 1 < LEVELS:
        total, reached = _scatter_levels(
            src, inverse, total, reached, bx, first, d, d_mask, dim, selected_len, real_len, inverse_len,
            LEVEL + 1, LEVELS, POOL, BLOCK_P, BLOCK_D, MEAN,
        )
    total += _over_positions(rows.to(tl.float32), SLOTS, WIDTH, BLOCK_D)
    if MEAN:
        reached += _over_positions(found.to(tl.float32)[:, None], SLOTS, WIDTH, 1)
    return total, reached


@triton.jit
def scatter_kernel(
    src,  # [B*H, selected_len, D] contiguous: SDPA's output on the compressed sequence
    dst,  # out [B, H, S, D] contiguous
    inverse,  # [B*H, LEVELS, inverse_len] int32 (see ``select_kernel``; inverse_len: the plan's sequence)
    counts,  # with MEAN: out [B*H, S] float32, how many entries reach each position
    seq_len, dim, selected_len, real_len, inverse_len,
    LEVELS: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MEAN: tl.constexpr,
    SKIP_FINER: tl.constexpr,
):
    """The scatter back (grid: blocks, heads, B): per position, the sum over levels of the output
    row of the real selected entry covering it, entry j of width c covering
    ``[j*c + c - 1, j*c + 2c - 1)``. A program loads each covering entry's row once and broadcasts
    it over the positions it covers (``_scatter_levels``), and starts one position early
    (``cdiv(seq_len + 1, BLOCK_P)`` programs), so that every level's spans align with its block.

    ``MEAN`` (``combine="mean"``): the sum is divided by how many levels reach the position (times
    one reciprocal per row), which is written to ``counts``. ``SKIP_FINER`` (needs ``LEVELS > 1``):
    a block that no selected entry below the coarsest level reaches (``_finer_levels_reached``)
    sums the coarsest level alone, by the same code: the same numbers bit for bit, since the finer
    levels would add +0.0 or -0.0 to a total that is +0.0 or nonzero."""
    tl.static_assert(not SKIP_FINER or LEVELS > 1)
    first = tl.program_id(0) * BLOCK_P
    bx = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    position = first - 1 + tl.arange(0, BLOCK_P)
    p_mask = (position >= 0) & (position < seq_len)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    total = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    reached = tl.zeros((BLOCK_P, 1), dtype=tl.float32)  # with MEAN
    finer = True
    if SKIP_FINER:
        finer = _finer_levels_reached(inverse, bx, position, real_len, inverse_len, LEVELS, POOL)
    if finer:
        total, reached = _scatter_levels(src, inverse, total, reached, bx, first, d, d_mask, dim, selected_len,
                                         real_len, inverse_len, 0, LEVELS, POOL, BLOCK_P, BLOCK_D, MEAN)
    else:  # the same sums, less the finer levels' zeros
        total, reached = _scatter_levels(src, inverse, total, reached, bx, first, d, d_mask, dim, selected_len,
                                         real_len, inverse_len, LEVELS - 1, LEVELS, POOL, BLOCK_P, BLOCK_D, MEAN)
    if MEAN:
        total = total * (1.0 / tl.maximum(reached, 1.0))  # one reciprocal per row (NOTES-kernels.md, "v21")
        tl.store(counts + bx.to(tl.int64) * seq_len + position[:, None], reached, mask=p_mask[:, None])
    out_start = (bx.to(tl.int64) * seq_len + position)[:, None] * dim
    tl.store(dst + out_start + d[None, :], total.to(dst.dtype.element_ty), mask=p_mask[:, None] & d_mask[None, :])


@triton.jit
def _turn_back(lo, hi, cos, sin):
    """Rotate rows, held as their rotate_half halves, back by the angles whose cosines and sines are given."""
    return lo * cos + hi * sin, hi * cos - lo * sin


@triton.jit
def _group_rows(src_a, src_b, inverse, bx, end, seq_len, dim, selected_len, padded_len, inverse_len, f,
                GROUP: tl.constexpr, LEVEL: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr,
                HALF: tl.constexpr, EVEN: tl.constexpr, TWO: tl.constexpr):
    """The sum over the output head's ``GROUP`` query heads of the selected rows of the ``LEVEL``
    entries that cover positions ``end`` (``[rows]``), zero where none is selected, as float32 halves
    (columns ``[0, HALF)`` and ``[HALF, 2 HALF)``; columns past ``dim``, only where not ``EVEN``,
    are zero): of ``src_a``, and with ``TWO`` of ``src_b`` too, from the same lookups."""
    C: tl.constexpr = POOL**LEVEL
    slot = end // C
    valid = (slot * C < seq_len) & (slot < padded_len // C)
    a_lo = tl.zeros((slot.shape[0], HALF), dtype=tl.float32)
    a_hi = tl.zeros((slot.shape[0], HALF), dtype=tl.float32)
    b_lo = tl.zeros((slot.shape[0], HALF), dtype=tl.float32)
    b_hi = tl.zeros((slot.shape[0], HALF), dtype=tl.float32)
    for member in tl.static_range(GROUP):
        found, row_start = _covering_rows(inverse, bx, member, GROUP, slot, valid, selected_len,
                                          2 * HALF if EVEN else dim, inverse_len, LEVEL, LEVELS)
        lo_mask, hi_mask = _half_masks(found, f, dim, HALF, EVEN)
        a_lo = _add_after(a_lo, tl.load(src_a + row_start + f[None, :], mask=lo_mask, other=0.0), member)
        a_hi = _add_after(a_hi, tl.load(src_a + row_start + HALF + f[None, :], mask=hi_mask, other=0.0), member)
        if TWO:
            b_lo = _add_after(b_lo, tl.load(src_b + row_start + f[None, :], mask=lo_mask, other=0.0), member)
            b_hi = _add_after(b_hi, tl.load(src_b + row_start + HALF + f[None, :], mask=hi_mask, other=0.0), member)
    return a_lo, a_hi, b_lo, b_hi


@triton.jit
def _half_masks(rows, f, dim, HALF: tl.constexpr, EVEN: tl.constexpr):
    """The masks of a row's two halves (columns ``f`` and ``HALF + f``) for the rows ``rows``
    (``[rows]`` bool): columns past ``dim`` too where not ``EVEN``."""
    lo_mask = rows[:, None]
    hi_mask = rows[:, None]
    if not EVEN:
        lo_mask = lo_mask & (f < dim)[None, :]
        hi_mask = hi_mask & (f + HALF < dim)[None, :]
    return lo_mask, hi_mask


@triton.jit
def _add_after(total, rows, member: tl.constexpr):
    """``rows`` in float32, added to ``total`` after the first member (0.0 + x is not x for x = -0.0,
    so the compiler keeps an add that starting from zeros would cost every element)."""
    if member == 0:
        return rows.to(tl.float32)
    return total + rows.to(tl.float32)


@triton.jit
def _store_halves(dst, lo, hi, bx, end, f, seq_len, dim, HALF: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``lo``, ``hi`` (two halves) at positions ``end`` of ``dst``, none past the sequence or ``dim``."""
    out = dst + ((bx.to(tl.int64) * seq_len + end) * (2 * HALF if EVEN else dim))[:, None] + f[None, :]
    lo_mask, hi_mask = _half_masks(end < seq_len, f, dim, HALF, EVEN)
    tl.store(out, lo.to(dst.dtype.element_ty), mask=lo_mask)
    tl.store(out + HALF, hi.to(dst.dtype.element_ty), mask=hi_mask)


@triton.jit
def _walked_spans(
    src_a, src_b, dst_a, dst_b, inverse, rotary, a_lo, a_hi, b_lo, b_hi, one_cos, one_sin, bx, end, f,
    seq_len, dim, selected_len, padded_len, inverse_len,
    GROUP: tl.constexpr, LEVEL: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr, HALF: tl.constexpr,
    EVEN: tl.constexpr, TURN: tl.constexpr, TWO: tl.constexpr,
):
    """Every position of the spans of ``LEVEL`` that end at ``end`` (``[rows]``), given the coarser
    levels' sums at ``end`` (``a_lo``, ``a_hi``: turned back to ``end`` where ``TURN``; ``b_lo``,
    ``b_hi``: never turned): this level's rows join them, and each child span (last first) receives
    the sums, ``a``'s turned back by the children's width from the previous child."""
    C: tl.constexpr = POOL**LEVEL
    rows_a_lo, rows_a_hi, rows_b_lo, rows_b_hi = _group_rows(
        src_a, src_b, inverse, bx, end, seq_len, dim, selected_len, padded_len, inverse_len, f,
        GROUP, LEVEL, LEVELS, POOL, HALF, EVEN, TWO)
    a_lo += rows_a_lo * (1.0 / C)
    a_hi += rows_a_hi * (1.0 / C)
    if TWO:
        b_lo += rows_b_lo * (1.0 / C)
        b_hi += rows_b_hi * (1.0 / C)
    if LEVEL == 0:
        _store_halves(dst_a, a_lo, a_hi, bx, end, f, seq_len, dim, HALF, EVEN)
        if TWO:
            _store_halves(dst_b, b_lo, b_hi, bx, end, f, seq_len, dim, HALF, EVEN)
    else:
        CHILD: tl.constexpr = C // POOL
        cos = one_cos
        sin = one_sin
        if TURN and CHILD > 1:
            cos = tl.load(rotary + CHILD * (2 * HALF) + f)[None, :]
            sin = tl.load(rotary + CHILD * (2 * HALF) + HALF + f)[None, :]
        if POOL <= 16:  # unrolled, so that the children's loads are issued together
            for child in tl.static_range(POOL):
                _walked_spans(src_a, src_b, dst_a, dst_b, inverse, rotary, a_lo, a_hi, b_lo, b_hi, one_cos, one_sin,
                              bx, end - child * CHILD, f, seq_len, dim, selected_len, padded_len, inverse_len,
                              GROUP, LEVEL - 1, LEVELS, POOL, HALF, EVEN, TURN, TWO)
                if TURN and child + 1 < POOL:
                    a_lo, a_hi = _turn_back(a_lo, a_hi, cos, sin)
        else:
            for child in range(POOL):
                _walked_spans(src_a, src_b, dst_a, dst_b, inverse, rotary, a_lo, a_hi, b_lo, b_hi, one_cos, one_sin,
                              bx, end - child * CHILD, f, seq_len, dim, selected_len, padded_len, inverse_len,
                              GROUP, LEVEL - 1, LEVELS, POOL, HALF, EVEN, TURN, TWO)
                if TURN:
                    a_lo, a_hi = _turn_back(a_lo, a_hi, cos, sin)


@triton.jit
def walk_kernel(
    src_a, src_b,  # [B*H, selected_len, D] contiguous: the gradients of the gathered rows (q; or k and v)
    dst_a, dst_b,  # out [B, heads_out, S, D] contiguous
    inverse,  # [B*H, LEVELS, inverse_len] int32 (see ``select_kernel``)
    rotary,  # with TURN: the rotary table (``rotary_table`` in fused.py): [POOL**(LEVELS-1), 2, HALF] float32
    seq_len, dim, selected_len, padded_len, inverse_len,
    GROUP: tl.constexpr,
    LEVELS: tl.constexpr,
    POOL: tl.constexpr,
    SPAN_LEVEL: tl.constexpr,
    ROWS: tl.constexpr,
    HALF: tl.constexpr,
    EVEN: tl.constexpr,
    TURN: tl.constexpr,
    TWO: tl.constexpr,
):
    """The gradient of the pooling (grid: blocks, output heads, B): per position ``t``, the sum over
    levels and over the ``GROUP`` query heads of the output head of the selected row covering it, a
    level-l row weighted ``1/c`` (``c = POOL**l``), from ``src_a`` into ``dst_a`` and, with ``TWO``,
    from ``src_b`` into ``dst_b``. ``TURN`` turns ``src_a``'s rows only (never ``src_b``'s) back by
    ``end - t`` positions (``end`` the last position of its span); span-end RoPE launches dq and dk
    with it and dv without.
    Rows are read and written as two halves of ``HALF`` columns (``D <= 2 * HALF``; ``EVEN``: equal),
    so that under ``TURN`` (which needs ``EVEN``) a column and its rotate_half partner share a thread.

    Each program takes ``ROWS`` spans of level ``SPAN_LEVEL`` (``fused._walked_span_level``: at most
    16 positions times ``GROUP`` where ``POOL * GROUP <= 16``), side by side, and walks each from
    its end back. The coarser levels' rows enter at the span's end (turned by the table's angles);
    inside it, the sums of the levels from l up pass from one child span of level l-1 to the next
    (``a``'s turned back by the children's width, the table's row for it), so each distinct row is
    loaded once a program and a position costs one add (and one turn) per source, rather than a load
    and an add per level (NOTES-kernels.md, "v24" and "v25"). A turned row reaches position t
    through at most ``POOL - 1`` turns per level, each one float32 rounding from the table's angle,
    for gradients stored in q's dtype."""
    tl.static_assert(not TURN or EVEN)  # a column and its rotate_half partner in one thread
    W: tl.constexpr = POOL**SPAN_LEVEL
    bx = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    end = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)) * W + (W - 1)
    f = tl.arange(0, HALF)
    a_lo = tl.zeros((ROWS, HALF), dtype=tl.float32)
    a_hi = tl.zeros((ROWS, HALF), dtype=tl.float32)
    b_lo = tl.zeros((ROWS, HALF), dtype=tl.float32)
    b_hi = tl.zeros((ROWS, HALF), dtype=tl.float32)
    for level in tl.static_range(SPAN_LEVEL + 1, LEVELS):
        width = POOL**level
        rows_a_lo, rows_a_hi, rows_b_lo, rows_b_hi = _group_rows(
            src_a, src_b, inverse, bx, end, seq_len, dim, selected_len, padded_len, inverse_len, f,
            GROUP, level, LEVELS, POOL, HALF, EVEN, TWO)
        if TURN:
            angle = rotary + (width - 1 - end % width)[:, None] * (2 * HALF) + f[None, :]
            rows_a_lo, rows_a_hi = _turn_back(rows_a_lo, rows_a_hi, tl.load(angle), tl.load(angle + HALF))
        a_lo += rows_a_lo * (1.0 / width)
        a_hi += rows_a_hi * (1.0 / width)
        if TWO:
            b_lo += rows_b_lo * (1.0 / width)
            b_hi += rows_b_hi * (1.0 / width)
    one_cos = tl.zeros((1, HALF), dtype=tl.float32)
    one_sin = tl.zeros((1, HALF), dtype=tl.float32)
    if TURN:
        one_cos = tl.load(rotary + 2 * HALF + f)[None, :]
        one_sin = tl.load(rotary + 3 * HALF + f)[None, :]
    _walked_spans(src_a, src_b, dst_a, dst_b, inverse, rotary, a_lo, a_hi, b_lo, b_hi, one_cos, one_sin, bx, end, f,
                  seq_len, dim, selected_len, padded_len, inverse_len, GROUP, SPAN_LEVEL, LEVELS, POOL, HALF, EVEN, TURN,
                  TWO)
