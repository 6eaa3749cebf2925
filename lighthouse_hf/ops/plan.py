"""Shapes of the Lighthouse cascade: everything that depends on the settings and S, not on the data."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from ..validation import check_positive_int, is_int

TILE = 128
"""Entries selected per tile and level: half of them by query score, half by key score."""
HALF_TILE = TILE // 2
MAX_LEVELS = 64
"""With ``pooling >= 2`` a coarsest block of ``pooling**63`` positions is longer than any sequence
a machine can hold, so more levels could never compress (and ``pooling**levels`` would not fit)."""


def check_levels(levels: object) -> int:
    if not is_int(levels) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an integer from 1 to {MAX_LEVELS}, got {levels!r}")
    return levels


def check_pooling(pooling: object) -> int:
    if not is_int(pooling) or pooling < 2 or pooling & (pooling - 1):
        raise ValueError(f"pooling must be a power of two >= 2 (2, 4, 8, ...), got {pooling!r}")
    return pooling


def check_topk(topk: object) -> int:
    if not is_int(topk) or topk < TILE or topk % TILE:
        raise ValueError(f"topk must be a positive multiple of {TILE} (128, 256, ...), got {topk!r}")
    return topk


def check_settings(levels: object, pooling: object, topk: object) -> None:
    """Raise ValueError naming the first setting outside its allowed values."""
    check_levels(levels)
    check_pooling(pooling)
    check_topk(topk)


@dataclass(frozen=True)
class LighthousePlan:
    """The tile grid for one sequence length.

    The coarsest level has ``n_coarse = seq_len // coarse_width`` full blocks; positions past
    ``real_len = n_coarse * coarse_width`` are never candidates (as in the published method), they
    only receive the shifted outputs of the blocks before them. When ``n_coarse`` does not split into
    ``tiles`` tiles of at least 128 entries, the coarsest level is padded at the end to
    ``tiles * tile_len`` entries. Padding entries score below every real entry, sort after every
    real entry and their outputs are dropped, so real positions never see them.

    The derived sizes are plain attributes, computed once: the fused path reads them a few dozen
    times per call, on the host's critical path.
    """

    seq_len: int
    levels: int
    pooling: int
    topk: int
    coarse_width: int = field(init=False, repr=False, compare=False)
    n_coarse: int = field(init=False, repr=False, compare=False)
    real_len: int = field(init=False, repr=False, compare=False)
    tiles: int = field(init=False, repr=False, compare=False)
    tile_len: int = field(init=False, repr=False, compare=False)
    n_coarse_padded: int = field(init=False, repr=False, compare=False)
    padded_len: int = field(init=False, repr=False, compare=False)
    is_padded: bool = field(init=False, repr=False, compare=False)
    """False exactly where the published method is defined (no padding needed)."""
    compressed_len: int = field(init=False, repr=False, compare=False)
    """Entries per (batch, head): ``S // p**(L-1) + (L-1) * p * K`` (padding included)."""
    compresses: bool = field(init=False, repr=False, compare=False)
    real_entries: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Listed entries holding real positions, per level (level 0 first), under the published
    selection: every tile selects ``TILE`` of its entries, real ones first (padding scores below
    every real entry), and its candidates one level finer are their ``pooling`` children each, so
    each tile keeps its own count. (The causal rule can take a padding entry over a real one.)"""

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len)
        check_settings(self.levels, self.pooling, self.topk)
        coarse_width = self.pooling ** (self.levels - 1)
        n_coarse = self.seq_len // coarse_width
        tiles = self.topk // TILE
        tile_len = max(TILE, math.ceil(n_coarse / tiles))
        n_coarse_padded = tiles * tile_len
        compressed_len = n_coarse_padded + (self.levels - 1) * self.pooling * self.topk
        derived = dict(
            coarse_width=coarse_width,
            n_coarse=n_coarse,
            real_len=n_coarse * coarse_width,
            tiles=tiles,
            tile_len=tile_len,
            n_coarse_padded=n_coarse_padded,
            padded_len=n_coarse_padded * coarse_width,
            is_padded=n_coarse_padded != n_coarse,
            compressed_len=compressed_len,
            compresses=self.levels > 1 and compressed_len < self.seq_len,
            real_entries=_real_entries(n_coarse, tiles, tile_len, self.levels, self.pooling),
        )
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def level_len(self, level: int) -> int:
        """Entries of ``level`` in the padded pyramid."""
        return self.padded_len // self.pooling**level

    def level_offset(self, level: int) -> int:
        """Where ``level`` starts in the concatenated pyramid."""
        return sum(self.level_len(m) for m in range(level))


def _real_entries(n_coarse: int, tiles: int, tile_len: int, levels: int, pooling: int) -> tuple[int, ...]:
    per_tile = [min(tile_len, max(0, n_coarse - t * tile_len)) for t in range(tiles)]
    real = [sum(per_tile)]
    for _ in range(levels - 1):
        per_tile = [pooling * min(TILE, count) for count in per_tile]
        real.append(sum(per_tile))
    return tuple(real[::-1])


@functools.lru_cache(maxsize=256)
def _cached_plan(seq_len: int, levels: int, pooling: int, topk: int) -> LighthousePlan:
    return LighthousePlan(seq_len, levels, pooling, topk)


def plan_for(seq_len: int, levels: int, pooling: int, topk: int) -> LighthousePlan:
    """The plan for these sizes, built once per process: the dispatch rules, the op and the fused
    kernels' custom ops (whose arguments are plain sizes) all ask for it on every call. While
    ``torch.compile`` traces, it is built directly (Dynamo does not trace a cache faithfully); the
    compiled graph does not run this Python at all."""
    if torch.compiler.is_compiling():
        return LighthousePlan(seq_len, levels, pooling, topk)
    check_positive_int("seq_len", seq_len)  # before the cache, which needs hashable arguments
    check_settings(levels, pooling, topk)
    return _cached_plan(seq_len, levels, pooling, topk)


def shortest_compressed_length(levels: int, pooling: int, topk: int) -> int | None:
    """The shortest sequence that these settings compress (None: they never do, ``levels == 1``).

    Searched once per process; while ``torch.compile`` traces, searched directly, like
    :func:`plan_for`.
    """
    check_settings(levels, pooling, topk)
    if torch.compiler.is_compiling():
        return _search_shortest(levels, pooling, topk)
    return _cached_shortest(levels, pooling, topk)


@functools.lru_cache(maxsize=64)
def _cached_shortest(levels: int, pooling: int, topk: int) -> int | None:
    return _search_shortest(levels, pooling, topk)


def _search_shortest(levels: int, pooling: int, topk: int) -> int | None:
    """The compressed length never decreases as S grows, so from a length that does not compress no
    length below ``compressed_len + 1`` can: the search jumps there until a length compresses."""
    if levels == 1:
        return None
    seq_len = topk + (levels - 1) * pooling * topk + 1  # compressed_len is never below this - 1
    while True:
        plan = LighthousePlan(seq_len, levels, pooling, topk)
        if plan.compresses:
            return seq_len
        seq_len = plan.compressed_len + 1
