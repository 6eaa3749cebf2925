"""Causal selection: a cascade under which the output at position t depends only on inputs <= t.

The published selection sees the future in two ways: a block's score is the largest norm anywhere
in the block, its own later tokens included, and a tile keeps the 64 + 64 best candidates of the
whole tile, so a later candidate can take refinement away from an earlier one. This rule keeps
everything else of the published method (pyramid, candidates, 128 entries chosen per tile and
level, compressed length ``S // p**(L-1) + (L-1)*p*K``, entry kinds, position keys, causal SDPA,
scatter back) and changes only steps 2 and 3:

**Scores.** Entry j of level l >= 1 (width ``c = p**l``, first token ``j*c``) scores the largest
float32 L2 norm of q (query score) or of k (key score) over the ``c`` tokens ending at its first
token, positions ``max(0, j*c - c + 1) .. j*c``. (Padding blocks of the plan read norms past the
last full coarse block as -1.)

**Choice.** Per (batch, head, tile, level) the N candidates (every entry of the tile at the
coarsest level, the ``128*p`` children of the chosen entries one level up below it) are visited in
position order, each once, with two thresholds ``thr_q``, ``thr_k`` and the counts already taken
by the query half and by the key half. Candidate i (0-based):

1. if the candidates left, ``N - i``, equal the budget left, ``128 - taken``, it is taken (and so
   is every later one: the tile always takes exactly 128);
2. else if its query score is >= ``thr_q`` and the query half holds fewer than 64, the query half
   takes it;
3. else if its key score is >= ``thr_k`` and the key half holds fewer than 64, the key half takes
   it;
4. else it is rejected.

Thresholds of tile ``T >= 1`` at level l come from tile ``T-1``'s candidates at level l (their
scores as above): ``thr_q`` is the smallest query score among the 64 candidates the published
rule would take by query score there (its 64th largest query score), ``thr_k`` the smallest key
score among the 64 it would then take by key score. In tile 0 there is nothing before, so
candidate i compares against the running means of the query and key scores of candidates
``0 .. i-1`` of the same tile and level (summed in float64; candidate 0 has no threshold).
Taken candidates are the selected (refined) entries; the others are rejected, as published.

**Why the output at t cannot see inputs after t.** Write ``start(x)`` for the first token of entry
x. (a) The decision for a candidate x depends only on inputs at positions <= ``start(x)``: its
score does; so do the scores of the candidates before it in the tile (they start earlier); whether
those candidates (and x) exist at all is decided by their parents one level up, which start no
later, so this holds by induction from the coarsest level, whose candidates are fixed; the position
i and the forcing test use only the count of earlier candidates and the fixed N; the thresholds use
tile ``T-1``'s candidates, all before the tile, or the earlier candidates of tile 0. (b) Hence the
set of entries whose span ends at or before t, with their refined flags, is a function of the
inputs <= t: an entry's existence is its ancestors' decisions and its flag its own, and all of them
start at or before its first token. (c) The output at t is the sum, over levels, of the SDPA output
of the entry of that level whose span ends in ``(t - c, t]`` (zero if it is not an entry); such an
entry E ends at or before t. Every entry ordered before E (smaller position key) ends at or before
E's last token: the unrefined entries (rejected blocks and level-0 tokens) partition the sequence,
so one that starts before E's start, or at or before E's last token when E is refined, ends by then
(inside E's span or before it); a refined entry's key lies strictly between its last token and the
next position, so one ordered before E ends no later than E. So by (b) the number of rows before E,
and the content of those rows and of E's row (means over spans <= t), are functions of the inputs
<= t, and causal SDPA gives row r a value computed from rows 0..r only (bit for bit on PyTorch's
CPU kernel, which the tests check; a GPU kernel must keep that property). (d) Padding and the tail
past the last full coarse block change nothing: padding entries start at or after the real blocks'
end, come after every real candidate in scan order (so they decide nothing real: the forcing test
counts them, but that count is fixed by the plan), sort after every real entry, and are never
scattered; tail tokens are read by no score and by no real entry.

**Cost.** Per tile and level the reference computes the published top-k on these scores (for the
next tile's thresholds) and then a few prefix sums over the candidates, so selection costs a little
more than published; nothing changes in the pyramid, the SDPA on the compressed sequence or the
scatter. The fused path's ``select_kernel`` runs the rule with prefix sums too; a program for tile
T first recomputes the cascades of the L-1 tiles before it, on which its thresholds depend (about
L-1 times the published top-k work), and the score pass writes two rows per level, from which the
kernel forms the start-window scores. What the rule gives up against the published top-k: a block
is scored by the tokens up to its first one, so refinement follows the region just before a block
rather than the block's own content; a tile with more high scorers than the previous tile takes
only the earliest of them, and a tile with fewer gives the unused budget to its last candidates
whatever their scores; tile 0 takes the first candidates above the running mean, which fills its
budget early in the tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import HALF_TILE, TILE, LighthousePlan

_BEFORE_SEQUENCE_SCORE = -1.0  # below every norm: the clipped start of the first block's window


def start_scores(norms: torch.Tensor, plan: LighthousePlan) -> list[torch.Tensor]:
    """Per level, each entry's score: the largest of ``norms`` ``[B, h, padded_len]`` (float32
    token norms) over the ``c`` tokens ending at the entry's first token: ``[B, h, level_len]``."""
    scores = []
    for level in range(plan.levels):
        width = plan.pooling**level
        # Shifting right by width - 1 makes block j of the shifted row the window ending at j*width.
        window_rows = F.pad(norms, (width - 1, 0), value=_BEFORE_SEQUENCE_SCORE)[..., : plan.padded_len]
        scores.append(window_rows.unflatten(-1, (-1, width)).amax(-1))
    return scores


def choose(
    query_score: torch.Tensor,
    key_score: torch.Tensor,
    published_by_query: torch.Tensor,
    published_by_key: torch.Tensor,
) -> torch.Tensor:
    """Mask of the 128 candidates taken per tile by the causal rule (the module docstring).

    All arguments are ``[B, H, tiles, N]`` with candidates in position order; the published masks
    are the published rule's two halves on the same scores, read from each tile for the next one.
    """
    query_threshold = _thresholds(query_score, published_by_query)
    key_threshold = _thresholds(key_score, published_by_key)
    by_query = _first_up_to_half(query_score.double() >= query_threshold)
    by_key = _first_up_to_half(~by_query & (key_score.double() >= key_threshold))
    taken = by_query | by_key
    n = taken.shape[-1]
    left = n - torch.arange(n, device=taken.device)
    budget_left = TILE - _exclusive_cumsum(taken.long())
    # Candidates left minus budget left falls by 0 or 1 per candidate from N - 128 >= 0, so it
    # passes through 0 exactly where the rule starts taking everything, unless both halves fill.
    forced = (left == budget_left).cumsum(-1) > 0
    return taken | forced


def _thresholds(score: torch.Tensor, published_half: torch.Tensor) -> torch.Tensor:
    """Per candidate, in float64: the previous tile's smallest published pick, or in tile 0 the
    running mean of the earlier candidates' scores (-inf for the first: nothing to compare with)."""
    smallest_pick = score.masked_fill(~published_half, float("inf")).amin(-1, keepdim=True)
    threshold = torch.empty_like(score, dtype=torch.float64)
    threshold[:, :, 1:] = smallest_pick[:, :, :-1]
    first_tile = score[:, :, 0].double()
    seen = torch.arange(first_tile.shape[-1], device=score.device)
    running_mean = _exclusive_cumsum(first_tile) / seen.clamp(min=1)
    running_mean[..., 0] = float("-inf")
    threshold[:, :, 0] = running_mean
    return threshold


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.cumsum(-1)[..., :-1], (1, 0))


def _first_up_to_half(wants: torch.Tensor) -> torch.Tensor:
    """The first 64 candidates that ``wants`` per tile: a half takes candidates while it has room."""
    return wants & (_exclusive_cumsum(wants.long()) < HALF_TILE)
