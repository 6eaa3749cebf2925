"""Shapes of the Lighthouse cascade: everything that depends on the settings and S, not on the data."""

from __future__ import annotations

import math
from dataclasses import dataclass

TILE = 128
"""Entries selected per tile and level: half of them by query score, half by key score."""
HALF_TILE = TILE // 2


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_levels(levels: object) -> int:
    if not _is_int(levels) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    return levels


def check_pooling(pooling: object) -> int:
    if not _is_int(pooling) or pooling < 2 or pooling & (pooling - 1):
        raise ValueError(f"pooling must be a power of two >= 2 (2, 4, 8, ...), got {pooling!r}")
    return pooling


def check_topk(topk: object) -> int:
    if not _is_int(topk) or topk < TILE or topk % TILE:
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
    """

    seq_len: int
    levels: int
    pooling: int
    topk: int

    def __post_init__(self) -> None:
        check_settings(self.levels, self.pooling, self.topk)

    @property
    def coarse_width(self) -> int:
        return self.pooling ** (self.levels - 1)

    @property
    def n_coarse(self) -> int:
        return self.seq_len // self.coarse_width

    @property
    def real_len(self) -> int:
        return self.n_coarse * self.coarse_width

    @property
    def tiles(self) -> int:
        return self.topk // TILE

    @property
    def tile_len(self) -> int:
        return max(TILE, math.ceil(self.n_coarse / self.tiles))

    @property
    def n_coarse_padded(self) -> int:
        return self.tiles * self.tile_len

    @property
    def padded_len(self) -> int:
        return self.n_coarse_padded * self.coarse_width

    @property
    def is_padded(self) -> bool:
        """False exactly where the published method is defined (no padding needed)."""
        return self.n_coarse_padded != self.n_coarse

    @property
    def compressed_len(self) -> int:
        """Entries per (batch, head): ``S // p**(L-1) + (L-1) * p * K`` (padding included)."""
        return self.n_coarse_padded + (self.levels - 1) * self.pooling * self.topk

    @property
    def compresses(self) -> bool:
        return self.levels > 1 and self.compressed_len < self.seq_len

    def level_len(self, level: int) -> int:
        """Entries of ``level`` in the padded pyramid."""
        return self.padded_len // self.pooling**level

    def level_offset(self, level: int) -> int:
        """Where ``level`` starts in the concatenated pyramid."""
        return sum(self.level_len(m) for m in range(level))
