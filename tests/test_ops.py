"""The reference path against the specification and an independent naive implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from lighthouse_hf import compressed_length, lighthouse_attention
from lighthouse_hf.ops import LighthousePlan, dense_causal_attention
from lighthouse_hf.ops import reference
from helpers import rel_err
from naive_lighthouse import naive_lighthouse


def rand_qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype)
    return q, k, v


# (batch, heads, kv_heads, seq, dim, levels, pooling, topk): published-defined sizes first,
# then sizes that need the documented padding (tail past the coarse grid, uneven tiles, short S).
NAIVE_CASES = [
    (2, 2, 1, 4096, 8, 3, 4, 256),
    (1, 2, 2, 2051, 4, 3, 4, 128),
    (1, 1, 1, 2048, 4, 2, 8, 128),
    (1, 2, 1, 1024, 4, 4, 2, 128),
    (1, 1, 1, 3000, 4, 3, 4, 256),
    (2, 1, 1, 1500, 4, 3, 4, 128),
]


@pytest.mark.parametrize("case", NAIVE_CASES, ids=lambda c: "B{}H{}Hkv{}S{}D{}L{}p{}K{}".format(*c))
def test_matches_naive_implementation(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = rand_qkv(batch, heads, kv_heads, seq, dim, seed=seq)
    plan = LighthousePlan(seq, levels, pooling, topk)
    assert plan.compresses
    selection = reference.select(q, k, plan)
    expected, entries = naive_lighthouse(q, k, v, levels, pooling, topk)
    unit = 2 ** (levels - 1)
    for b in range(batch):
        for h in range(heads):
            got = list(zip(selection.key[b, h].tolist(), selection.level[b, h].tolist(), selection.local[b, h].tolist()))
            want = [(int(key * unit), level, j) for key, level, j in entries[b][h]]
            assert got == want
    out = lighthouse_attention(q, k, v, levels=levels, pooling=pooling, topk=topk)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, expected) < 1e-5


def test_worked_example_and_length_formula():
    assert compressed_length(131072, levels=3, pooling=4, topk=2048) == 24576
    for levels, pooling, topk, seq in [(3, 4, 1536, 98304), (4, 2, 2048, 65536), (5, 8, 6144, 3 * 2**24), (3, 8, 128, 8192)]:
        plan = LighthousePlan(seq, levels, pooling, topk)
        assert not plan.is_padded
        assert plan.compressed_len == seq // pooling ** (levels - 1) + (levels - 1) * pooling * topk


def test_selection_length_and_order():
    q, k, _ = rand_qkv(2, 3, 3, 4096, 8)
    plan = LighthousePlan(4096, 3, 4, 256)
    selection = reference.select(q, k, plan)
    assert selection.index.shape == (2, 3, plan.compressed_len) == (2, 3, 4096 // 16 + 2 * 4 * 256)
    assert (selection.key.diff(dim=-1) > 0).all()
    # every refined entry's children are entries one level down
    for level in (1, 2):
        refined = selection.local[0, 0][(selection.level[0, 0] == level) & selection.refined[0, 0]]
        children = set(selection.local[0, 0][selection.level[0, 0] == level - 1].tolist())
        assert all(j * 4 + r in children for j in refined.tolist() for r in range(4))


def test_exact_integer_keys_beyond_float32_precision():
    """At 2**25 tokens float32 cannot tell the last token of a block from the block's summary
    (keys 2**25 - 1 and 2**25 - 1/2); the integer keys order them exactly."""
    plan = LighthousePlan(2**25, 2, 4, 128)
    level = torch.tensor([0, 1, 1])
    local = torch.tensor([2**25 - 1, 2**23 - 1, 2**23])
    refined = torch.tensor([False, True, False])
    keys = reference.position_keys(level, local, refined, plan)
    assert keys.dtype == torch.int64
    assert keys.tolist() == [2 * (2**25 - 1), 2 * 2**25 - 1, 2 * 2**25]
    as_float32 = (keys.double() / 2).float()
    assert as_float32[0] == as_float32[1]  # what float32 keys would have made of it


def test_levels_one_is_dense_sdpa():
    q, k, v = rand_qkv(2, 4, 2, 700, 16)
    out = lighthouse_attention(q, k, v, levels=1, pooling=4, topk=128)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, expected)


def test_uncompressible_setting_is_dense_sdpa():
    q, k, v = rand_qkv(1, 2, 2, 4096, 8)
    assert compressed_length(4096, topk=2048) == 4096  # 256 + 2*4*2048 >= 4096
    out = lighthouse_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


@pytest.mark.parametrize("seq", [4096, 3001])
def test_causal_with_selection_held_fixed(seq):
    q, k, v = rand_qkv(1, 2, 1, seq, 8, seed=1)
    plan = LighthousePlan(seq, 3, 4, 256)
    selection = reference.select(q, k, plan)
    before = reference.attend(q, k, v, selection, None)
    for t in (0, 15, 1000, seq - 17):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 5
        after = reference.attend(*changed, selection, None)
        torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, :, t + 1 :], before[:, :, t + 1 :])


def test_in_tile_selection_can_depend_on_later_positions():
    """The specification's caveat, kept on purpose: which blocks get refined is a top-k over the
    whole tile, so raising a later position's query norm can take refinement away from an earlier
    block and change the output there."""
    seq = 1024
    q = torch.zeros(1, 1, seq, 2)
    k = torch.zeros(1, 1, seq, 2)
    v = torch.randn(1, 1, seq, 2, generator=torch.Generator().manual_seed(0))
    settings = dict(levels=2, pooling=2, topk=128)
    before = lighthouse_attention(q, k, v, **settings)
    q_later = q.clone()
    q_later[0, 0, 1000] = 100.0  # block 500 now wins a query slot; block 127 loses its refinement
    after = lighthouse_attention(q_later, k, v, **settings)
    assert not torch.allclose(after[0, 0, 254], before[0, 0, 254])
    torch.testing.assert_close(after[0, 0, :254], before[0, 0, :254])


def test_hand_computed_example():
    """L=2, p=2, K=128, S=1024 with q = k = 0: every score ties, so the earliest blocks win (the
    stable tie rule): blocks 0..63 by query, 64..127 by key; positions 0..255 are refined.
    Attention is uniform over the causal prefix, so each entry's output is the running mean of the
    values before it, which we can write down for the first positions."""
    seq = 1024
    q = torch.zeros(1, 1, seq, 2, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.stack([torch.arange(seq, dtype=torch.float64), torch.ones(seq, dtype=torch.float64)], -1)[None, None]
    selection = reference.select(q, k, LighthousePlan(seq, 2, 2, 128))
    assert selection.index.shape[-1] == 512 + 256
    levels, local = selection.level[0, 0].tolist(), selection.local[0, 0].tolist()
    assert list(zip(levels, local))[:7] == [(0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (0, 4)]
    assert list(zip(levels, local))[383:385] == [(1, 127), (1, 128)]  # last refined block, first coarse one
    out = lighthouse_attention(q, k, v, levels=2, pooling=2, topk=128)[0, 0]
    # compressed sequence values: v0=0, v1=1, block0=0.5, v2=2, v3=3, block1=2.5, ...
    # position 0: level-0 entry 0 -> mean(0) = 0
    # position 1: level-0 entry 1 -> mean(0, 1) = 0.5; block 0 (span shifted to [1, 3)) -> mean(0, 1, .5) = 0.5
    # position 2: level-0 entry 2 -> mean(0, 1, .5, 2) = 0.875; block 0 again -> 0.5
    # position 3: level-0 entry 3 -> mean(0, 1, .5, 2, 3) = 1.3; block 1 (span [3, 5)) -> mean(.., 2.5) = 1.5
    torch.testing.assert_close(out[:4, 0], torch.tensor([0.0, 1.0, 1.375, 2.8], dtype=torch.float64))
    # the second channel counts the levels that reach each position
    expected_count = torch.ones(seq, dtype=torch.float64)
    expected_count[1:256] = 2
    torch.testing.assert_close(out[:, 1], expected_count)


def test_every_position_written_zero_only_where_nothing_reaches():
    seq = 3001
    q, k, v = rand_qkv(1, 2, 2, seq, 8, seed=3)
    plan = LighthousePlan(seq, 3, 4, 256)
    selection = reference.select(q, k, plan)
    reached = torch.zeros(2, seq, dtype=torch.bool)
    for h in range(2):
        for level, j in zip(selection.level[0, h].tolist(), selection.local[0, h].tolist()):
            width = 4**level
            if j * width < plan.real_len:
                reached[h, j * width + width - 1 : min(seq, j * width + 2 * width - 1)] = True
    out = lighthouse_attention(q, k, v, levels=3, pooling=4, topk=256)
    assert out.shape == (1, 2, seq, 8) and torch.isfinite(out).all()
    assert torch.equal(out[0].ne(0).any(-1), reached)
    assert not reached.all()  # some early positions are reached by nothing


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 2, 1, 600, 3, dtype=torch.float64, seed=5))

    def fn(q, k, v):
        return lighthouse_attention(q, k, v, levels=2, pooling=2, topk=128)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("case", NAIVE_CASES[:3], ids=lambda c: "B{}H{}Hkv{}S{}D{}L{}p{}K{}".format(*c))
def test_float64_keeps_float64_precision(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = rand_qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float64, seed=seq)
    expected, _ = naive_lighthouse(q, k, v, levels, pooling, topk)
    out = lighthouse_attention(q, k, v, levels=levels, pooling=pooling, topk=topk)
    assert out.dtype == torch.float64
    assert rel_err(out, expected) < 1e-12  # float32 anywhere on the way would leave ~1e-7


def test_finite_differences_match_gradients_in_float64():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 2, 1, 600, 3, dtype=torch.float64, seed=5))

    def fn(q, k, v):
        return lighthouse_attention(q, k, v, levels=2, pooling=2, topk=128)

    # Tolerances a float32 accumulation anywhere would fail (its rounding is ~1e-7 of the output).
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-9, rtol=1e-6, fast_mode=True)


def test_empty_batch_returns_the_empty_result():
    q, k, v = (t.requires_grad_() for t in rand_qkv(0, 2, 1, 2048, 8))
    assert compressed_length(2048, topk=128) < 2048  # a length that compresses
    out = lighthouse_attention(q, k, v, topk=128)
    assert out.shape == q.shape and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_levels_beyond_what_the_sequence_pools_run_dense():
    # 2**39-position coarse blocks: nothing to pool, so (as documented) dense causal SDPA
    q, k, v = rand_qkv(1, 2, 1, 4096, 8)
    out = lighthouse_attention(q, k, v, levels=40, pooling=2, topk=128)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True), rtol=0, atol=0)
    assert compressed_length(4096, levels=40, pooling=2, topk=128) == 4096


@pytest.mark.parametrize("seq_len", [-5, 0, 2.5, True, "4096", None])
def test_compressed_length_validates_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        compressed_length(seq_len)


@pytest.mark.parametrize("kwargs, message", [(dict(levels=2**62), "levels must be an integer from 1 to 64"), (dict(topk=100), "topk must be")])
def test_compressed_length_validates_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compressed_length(4096, **kwargs)


def test_shortest_compressed_length_is_exact():
    from lighthouse_hf.ops import shortest_compressed_length

    for levels, pooling, topk in [(3, 4, 2048), (2, 2, 128), (4, 8, 1536), (5, 2, 256)]:
        shortest = shortest_compressed_length(levels, pooling, topk)
        assert compressed_length(shortest, levels=levels, pooling=pooling, topk=topk) < shortest
        for seq_len in range(max(1, shortest - 2000), shortest):
            assert compressed_length(seq_len, levels=levels, pooling=pooling, topk=topk) == seq_len
    assert shortest_compressed_length(1, 4, 2048) is None


def test_gradients_reach_only_through_gather_and_pooling():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 1, 1, 2048, 4, seed=6))
    lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    # positions past the coarse grid (2048 = 128 * 16 has none) and rejected blocks still get
    # gradient through the pooled entries that contain them
    assert (v.grad[0, 0].abs().sum(-1) > 0).all()


def test_gqa_equals_expanded_heads():
    q, k, v = rand_qkv(2, 6, 2, 2500, 8, seed=7)
    grouped = lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128)
    expanded = lighthouse_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), levels=3, pooling=4, topk=128)
    torch.testing.assert_close(grouped, expanded, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_close_to_float32(dtype):
    # the same values in float32 give the same scores (they are float32 norms), so the same selection
    q, k, v = (t.to(dtype) for t in rand_qkv(1, 2, 1, 2048, 16, seed=8))
    settings = dict(levels=3, pooling=4, topk=128)
    expected = lighthouse_attention(q.float(), k.float(), v.float(), **settings)
    out = lighthouse_attention(q, k, v, **settings)
    assert out.dtype == dtype
    assert rel_err(out, expected) < (1e-6 if dtype == torch.float64 else 2e-2)


def test_batch_items_are_independent():
    q, k, v = rand_qkv(3, 2, 1, 2049, 8, seed=9)
    settings = dict(levels=3, pooling=4, topk=128)
    out = lighthouse_attention(q, k, v, **settings)
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], lighthouse_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], **settings))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(levels=0), "levels must be an integer from 1 to 64"),
        (dict(levels=2.0), "levels must be an integer from 1 to 64"),
        (dict(levels=2**62), "levels must be an integer from 1 to 64"),
        (dict(pooling=3), "pooling must be a power of two >= 2"),
        (dict(pooling=1), "pooling must be a power of two >= 2"),
        (dict(topk=100), "topk must be a positive multiple of 128"),
        (dict(topk=0), "topk must be a positive multiple of 128"),
        (dict(scale=-1.0), "scale must be None or a finite number > 0"),
    ],
)
def test_bad_parameters(kwargs, message):
    q, k, v = rand_qkv(1, 2, 1, 64, 8)
    with pytest.raises(ValueError, match=message):
        lighthouse_attention(q, k, v, **kwargs)


def test_bad_inputs():
    q, k, v = rand_qkv(1, 4, 2, 64, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        lighthouse_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        lighthouse_attention(q[0], k, v)
    with pytest.raises(ValueError, match="q must be float16, bfloat16, float32 or float64"):
        lighthouse_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="multiple of k's kv_heads"):
        lighthouse_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        lighthouse_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="k must be"):
        lighthouse_attention(q, k[:, :, :32], v[:, :, :32])


def test_dense_causal_attention_checks_as_lighthouse_attention_does():
    q, k, v = rand_qkv(1, 6, 4, 64, 8)
    with pytest.raises(ValueError, match=r"q's heads \(6\) must be a multiple of k's kv_heads \(4\)"):
        dense_causal_attention(q, k, v, None)
    with pytest.raises(ValueError, match="scale must be None or a finite number > 0"):
        dense_causal_attention(q[:, :4], k, v, 0.0)
