"""The causal selection (``reference.select(..., causal=True)``): the output at t ignores every input
after t bit for bit, the selection keeps the published shape, follows the stated rule exactly,
and refines where the norms are large."""

import pytest
import torch

from helpers import change_after
from lighthouse_hf.ops import LighthousePlan
from lighthouse_hf.ops import reference


def rand_qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    return q, k, v


def causal_output(q, k, v, plan):
    return reference.attend(q, k, v, reference.select(q, k, plan, causal=True), None)


def published_output(q, k, v, plan):
    return reference.attend(q, k, v, reference.select(q, k, plan), None)


def probe_positions(plan, seed):
    """t = 0, the last positions, both sides of block boundaries of every level and of every tile
    boundary, the end of the coarse grid, and a few random positions."""
    seq, coarse_width = plan.seq_len, plan.coarse_width
    positions = {0, 1, seq - 2, seq - 1, plan.real_len - 1, plan.real_len}
    for level in range(plan.levels):
        width = plan.pooling**level
        positions |= {width - 1, width, 5 * width - 1, 5 * width}
    for tile in range(1, plan.tiles):
        start = tile * plan.tile_len * coarse_width
        positions |= {start - 1, start, start + coarse_width}
    g = torch.Generator().manual_seed(seed)
    positions |= set(torch.randint(0, seq, (4,), generator=g).tolist())
    return sorted(t for t in positions if 0 <= t < seq)


# (batch, heads, kv_heads, seq, dim, levels, pooling, topk): odd lengths, padded plans (lengths the
# published method does not define), tails past the coarse grid, several tiles, GQA, B > 1.
CASES = [
    (2, 2, 1, 1203, 8, 2, 2, 256),  # two tiles of 301 coarse blocks, padded, GQA, B = 2
    (1, 2, 2, 2051, 4, 3, 4, 128),  # published-defined grid with a 3-token tail
    (1, 1, 1, 3000, 4, 3, 4, 256),  # coarse level padded to two tiles of 128
    (1, 2, 1, 1024, 4, 4, 2, 128),
    (1, 1, 1, 5000, 4, 2, 8, 256),  # p = 8, padded tiles of 313
    (1, 2, 1, 4099, 4, 3, 2, 384),  # three tiles, GQA
    (1, 1, 1, 9000, 4, 4, 4, 128),
    (1, 1, 1, 10000, 4, 3, 8, 128),
]
SLOW_CASES = [(2, 4, 2, 8192, 8, 3, 4, 256)]


def case_id(case):
    return "B{}H{}Hkv{}S{}D{}L{}p{}K{}".format(*case)


def check_later_inputs_change_nothing(case, dtype=torch.float32):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = rand_qkv(batch, heads, kv_heads, seq, dim, dtype, seed=seq)
    plan = LighthousePlan(seq, levels, pooling, topk)
    assert plan.compresses
    before = causal_output(q, k, v, plan)
    published_before = published_output(q, k, v, plan)
    published_moved = 0
    g = torch.Generator().manual_seed(seq + 1)
    for t in probe_positions(plan, seed=seq):
        for how in ("scaled", "rolled", "random"):
            changed = [change_after(x, t, how, g) for x in (q, k, v)]
            after = causal_output(*changed, plan)
            assert torch.equal(after[:, :, : t + 1], before[:, :, : t + 1]), (t, how)
            published_after = published_output(*changed, plan)
            published_moved += not torch.equal(published_after[:, :, : t + 1], published_before[:, :, : t + 1])
    # the same changes do reach earlier outputs through the published selection
    assert published_moved > 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_at_t_ignores_every_later_input(case):
    check_later_inputs_change_nothing(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_output_at_t_ignores_every_later_input_long(case):
    check_later_inputs_change_nothing(case)


def test_output_at_t_ignores_every_later_input_bfloat16():
    check_later_inputs_change_nothing((1, 2, 1, 1203, 8, 2, 2, 256), dtype=torch.bfloat16)


def test_later_high_norm_token_moves_published_selection_not_causal():
    """The published caveat's example (test_ops): a later large query norm takes refinement away
    from block 127 under the published rule; the causal rule keeps every earlier output."""
    seq = 1024
    q = torch.zeros(1, 1, seq, 2)
    k = torch.zeros(1, 1, seq, 2)
    v = torch.randn(1, 1, seq, 2, generator=torch.Generator().manual_seed(0))
    plan = LighthousePlan(seq, 2, 2, 128)
    q_later = q.clone()
    q_later[0, 0, 1000] = 100.0
    assert not torch.equal(published_output(q_later, k, v, plan)[0, 0, :1000], published_output(q, k, v, plan)[0, 0, :1000])
    assert torch.equal(causal_output(q_later, k, v, plan)[0, 0, :1000], causal_output(q, k, v, plan)[0, 0, :1000])


STRUCTURE_CASES = CASES + [(1, 1, 1, 700, 4, 2, 4, 128), (1, 1, 1, 5000, 4, 3, 4, 512)]


@pytest.mark.parametrize("case", STRUCTURE_CASES, ids=case_id)
def test_selection_has_the_published_shape(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, _ = rand_qkv(batch, heads, kv_heads, seq, dim, seed=seq)
    plan = LighthousePlan(seq, levels, pooling, topk)
    selection = reference.select(q, k, plan, causal=True)
    for name in ("level", "local", "index", "key", "refined"):
        assert getattr(selection, name).shape == (batch, heads, plan.compressed_len), name
    assert (selection.key.diff(dim=-1) > 0).all()
    assert torch.equal(selection.key, reference.position_keys(selection.level, selection.local, selection.refined, plan))
    offsets = torch.tensor([plan.level_offset(m) for m in range(levels)])
    assert torch.equal(selection.index, offsets[selection.level] + selection.local)
    coarse = levels - 1
    for b in range(batch):
        for h in range(heads):
            entries = set(zip(selection.level[b, h].tolist(), selection.local[b, h].tolist()))
            assert len(entries) == plan.compressed_len
            flags = selection.refined[b, h].tolist()
            refined = {entry for entry, flag in zip(entries_in_order(selection, b, h), flags) if flag}
            assert all(lv >= 1 for lv, _ in refined)
            for level in range(1, levels):
                width_in_coarse = pooling ** (coarse - level)
                per_tile = [0] * plan.tiles
                for lv, j in refined:
                    if lv == level:
                        per_tile[j // width_in_coarse // plan.tile_len] += 1
                assert per_tile == [128] * plan.tiles, (level, per_tile)
            for lv, j in refined:
                assert all((lv - 1, j * pooling + r) in entries for r in range(pooling))
            for lv, j in entries:
                if lv < coarse:
                    assert (lv + 1, j // pooling) in refined
            # the unrefined entries (rejected blocks and tokens) tile the padded sequence exactly
            covered = sorted((j * pooling**lv, (j + 1) * pooling**lv) for lv, j in entries if (lv, j) not in refined)
            assert covered[0][0] == 0 and covered[-1][1] == plan.padded_len
            assert all(left[1] == right[0] for left, right in zip(covered, covered[1:]))


def entries_in_order(selection, b, h):
    return list(zip(selection.level[b, h].tolist(), selection.local[b, h].tolist()))


def naive_causal_entries(q, k, levels, pooling, topk):
    """The rule as ops/causal.py's docstring states it, one candidate at a time in plain Python:
    ``entries[b][h]`` is the set of (level, local index, refined)."""
    batch, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    coarse_width = pooling ** (levels - 1)
    real_len = seq // coarse_width * coarse_width
    tiles = topk // 128
    tile_len = max(128, -(-(seq // coarse_width) // tiles))

    def score(norms, level, j):
        width = pooling**level
        return max(norms[t] if t < real_len else -1.0 for t in range(max(0, j * width - width + 1), j * width + 1))

    def published_thresholds(sq, sk):
        by_query = sorted(range(len(sq)), key=lambda i: -sq[i])[:64]
        rest = [i for i in range(len(sq)) if i not in set(by_query)]
        by_key = sorted(rest, key=lambda i: -sk[i])[:64]
        return min(sq[i] for i in by_query), min(sk[i] for i in by_key)

    result = []
    for b in range(batch):
        result.append([])
        for h in range(heads):
            qn = q[b, h].float().norm(dim=-1).tolist()
            kn = k[b, h // group].float().norm(dim=-1).tolist()
            entries = set()
            previous = {}
            for tile in range(tiles):
                candidates = list(range(tile * tile_len, (tile + 1) * tile_len))
                for level in range(levels - 1, 0, -1):
                    sq = [score(qn, level, j) for j in candidates]
                    sk = [score(kn, level, j) for j in candidates]
                    if tile > 0:
                        fixed = published_thresholds(*previous[level])
                    chosen, taken_q, taken_k, taken = set(), 0, 0, 0
                    sum_q = sum_k = 0.0
                    for i, j in enumerate(candidates):
                        if tile > 0:
                            thr_q, thr_k = fixed
                        else:
                            thr_q, thr_k = (sum_q / i, sum_k / i) if i else (float("-inf"), float("-inf"))
                            sum_q, sum_k = sum_q + sq[i], sum_k + sk[i]
                        if len(candidates) - i == 128 - taken:
                            chosen.add(j)
                            taken += 1
                        elif sq[i] >= thr_q and taken_q < 64:
                            chosen.add(j)
                            taken_q, taken = taken_q + 1, taken + 1
                        elif sk[i] >= thr_k and taken_k < 64:
                            chosen.add(j)
                            taken_k, taken = taken_k + 1, taken + 1
                    assert taken == 128
                    previous[level] = (sq, sk)
                    entries |= {(level, j, j in chosen) for j in candidates}
                    candidates = sorted(j * pooling + r for j in chosen for r in range(pooling))
                entries |= {(0, i, False) for i in candidates}
            result[b].append(entries)
    return result


@pytest.mark.parametrize(
    "case",
    [(2, 2, 1, 1203, 8, 2, 2, 256), (1, 1, 1, 3000, 4, 3, 4, 256), (1, 2, 1, 4099, 4, 3, 2, 384), (1, 1, 1, 5000, 4, 2, 8, 256)],
    ids=case_id,
)
def test_matches_the_stated_rule_one_candidate_at_a_time(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, _ = rand_qkv(batch, heads, kv_heads, seq, dim, seed=seq + 5)
    selection = reference.select(q, k, LighthousePlan(seq, levels, pooling, topk), causal=True)
    expected = naive_causal_entries(q, k, levels, pooling, topk)
    for b in range(batch):
        for h in range(heads):
            got = set(zip(selection.level[b, h].tolist(), selection.local[b, h].tolist(), selection.refined[b, h].tolist()))
            assert got == expected[b][h]


def refined_blocks(selection, level):
    mask = (selection.level[0, 0] == level) & selection.refined[0, 0]
    return set(selection.local[0, 0][mask].tolist())


def first_unrefined(selection, level, candidates):
    refined = refined_blocks(selection, level)
    return next(j for j in candidates if j not in refined)


@pytest.mark.parametrize("tile", [0, 1])
@pytest.mark.parametrize("half", ["query", "key"])
def test_blocks_after_large_norms_are_refined(tile, half):
    """Two tiles of 512 coarse blocks (tile 0: running-mean thresholds, tile 1: thresholds from
    tile 0). A block that was rejected becomes refined when a large q (or k) norm is planted on
    its first token, or on the last token of the block before it."""
    seq = 2048
    plan = LighthousePlan(seq, 2, 2, 256)
    q, k, _ = rand_qkv(1, 1, 1, seq, 8, seed=3)
    planted_on = q if half == "query" else k
    baseline = reference.select(q, k, plan, causal=True)
    tile_start = tile * plan.tile_len
    first = first_unrefined(baseline, 1, range(tile_start + 8, tile_start + plan.tile_len))
    second = first_unrefined(baseline, 1, range(first + 2, tile_start + plan.tile_len))
    planted_on[0, 0, 2 * first] *= 100  # the block's first token
    planted_on[0, 0, 2 * second - 1] *= 100  # the last token of the block before it
    refined = refined_blocks(reference.select(q, k, plan, causal=True), 1)
    assert {first, second} <= refined


def test_children_after_large_norms_are_refined():
    """Below the coarsest level the candidates are the children of the chosen blocks: a rejected
    child becomes refined when a large query norm is planted on its first token."""
    seq = 2048
    plan = LighthousePlan(seq, 3, 2, 128)
    q, k, _ = rand_qkv(1, 1, 1, seq, 8, seed=4)
    baseline = reference.select(q, k, plan, causal=True)
    candidates = sorted(j for lv, j in entries_in_order(baseline, 0, 0) if lv == 1)
    child = first_unrefined(baseline, 1, candidates[4:])
    q[0, 0, 2 * child] *= 100
    assert child in refined_blocks(reference.select(q, k, plan, causal=True), 1)
