"""The byte count of the fused kernels (``lighthouse_hf.ops.traffic``) that ``bench`` turns into floors."""

import re

import pytest
import torch

from lighthouse_hf.ops import plan_for, reference
from lighthouse_hf.ops.traffic import fused_traffic

ROW = 128 * 2  # one bf16 row of D=128
MB = 1e6


@pytest.mark.parametrize(
    "seq, levels, pooling, topk",
    [(2048, 3, 4, 128), (3000, 3, 2, 256), (8192, 5, 4, 256), (5000, 3, 8, 256), (4096, 4, 2, 128), (1999, 2, 8, 128)],
)
def test_real_entries_are_what_the_reference_selection_lists(seq, levels, pooling, topk):
    plan = plan_for(seq, levels, pooling, topk)
    generator = torch.Generator().manual_seed(seq)
    q, k = torch.randn(2, 2, seq, 8, generator=generator), torch.randn(2, 1, seq, 8, generator=generator)
    selection = reference.select(q, k, plan)
    real = selection.local * pooling**selection.level < plan.real_len
    for level, expected in enumerate(plan.real_entries):
        counts = ((selection.level == level) & real).sum(-1)
        assert (counts == expected).all(), (level, counts, expected)


def test_default_setting_at_128k_matches_a_count_by_hand():
    # L3 p4 K2048, S=128K, B=1, H=Hkv=8, D=128, bf16: no padding; 8192 entries of every level are real.
    seq, heads, n = 131072, 8, 24576
    traffic = fused_traffic(plan_for(seq, 3, 4, 2048), batch=1, heads=heads, kv_heads=heads, dim=128, dtype=torch.bfloat16)
    scores = 2 * heads * (seq // 4 + seq // 16) * 4
    assert traffic.score_pass == 2 * heads * seq * ROW + scores + 2 * heads * 8192 * ROW  # q, k; scores; coarsest means
    # q's and k's scores of 8192 coarsest and 8192 level-1 candidates per query head; inverse filled,
    # its slots and the listing written
    assert traffic.selection == heads * (2 * (8192 + 8192) * 4 + 4 * (3 * seq + 3 * n))
    # level 0 rows, level 1 spans of 4, v whole and the means of q and k for the coarsest level, 3n rows written
    assert traffic.gather == heads * ROW * (3 * 8192 + 3 * 8192 * 4 + seq + 2 * 8192 + 3 * n)
    inverse_slots = seq + seq // 4 + seq // 16
    assert traffic.scatter == heads * (n * ROW + 4 * inverse_slots + seq * ROW)
    assert traffic.scatter_backward == heads * ROW * (8192 + 8192 * 4 + seq + n)
    assert traffic.gather_backward == heads * (3 * n * ROW + 2 * 4 * inverse_slots + 3 * seq * ROW)
    assert traffic.forward / MB == pytest.approx(1617, abs=1)  # NOTES-kernels: 1.64 GB counted with 3S inverse reads


def test_padding_entries_are_written_but_never_read_back():
    # At 128K, L5 p4 K1536 lists 26112 entries per head of which 8704 hold real positions.
    plan = plan_for(131072, 5, 4, 1536)
    real, n = sum(plan.real_entries), plan.compressed_len
    assert (real, n) == (8704, 26112)
    sizes = dict(batch=1, heads=8, kv_heads=8, dim=128, dtype=torch.bfloat16)
    traffic = fused_traffic(plan, **sizes)
    slots = sum(-(-131072 // 4**level) for level in range(5))
    assert traffic.scatter == 8 * (real * ROW + 4 * slots + 131072 * ROW)
    assert traffic.gather_backward == 8 * (3 * real * ROW + 2 * 4 * slots + 131072 * ROW) + 2 * 8 * 131072 * ROW
    # span-end RoPE rotates dk back in a launch of its own: one more pass over inverse
    span_end = fused_traffic(plan, rope="span_end", **sizes)
    assert span_end.gather_backward - traffic.gather_backward == 8 * 4 * slots


def test_options_move_the_bytes_they_should():
    plan = plan_for(65536, 3, 4, 1024)
    sizes = dict(batch=2, heads=8, kv_heads=2, dim=128, dtype=torch.bfloat16)
    published = fused_traffic(plan, **sizes)
    seq, rows = 65536, 2 * 8

    mean = fused_traffic(plan, combine="mean", **sizes)
    assert mean.scatter - published.scatter == rows * seq * 4  # the counts written
    spans = sum(real * 4**level for level, real in enumerate(plan.real_entries[:-1]))
    assert mean.scatter_backward - published.scatter_backward == rows * (spans + seq) * 4  # read beside each row
    assert (mean.score_pass, mean.gather, mean.gather_backward) == (published.score_pass, published.gather, published.gather_backward)

    causal = fused_traffic(plan, selection="causal", **sizes)
    pyramid = 2 * (8 + 2) * (seq // 4 + seq // 16) * 4  # one float32 score per level entry, both batch rows
    candidates = plan.n_coarse_padded + 4 * 1024
    assert causal.score_pass - published.score_pass == pyramid
    assert causal.selection - published.selection == rows * 2 * candidates * 4  # a second score per candidate

    # span-end RoPE: the score pass's means are the coarsest level's rows, so they come at span end
    # from the same bytes; given scores: the coarsest q and k come from the sequence, not from means
    span_end = fused_traffic(plan, rope="span_end", **sizes)
    assert span_end.score_pass == published.score_pass and span_end.gather == published.gather
    given = fused_traffic(plan, scores="given", **sizes)
    coarse_means = plan.n_coarse_padded * ROW
    assert given.gather - published.gather == rows * (2 * seq * ROW - 2 * coarse_means)
    assert given.score_pass == 2 * (8 + 2) * seq * 4 + 2 * (8 + 2) * (seq // 4 + seq // 16) * 4
    for name, wrong in (("rope", "span-end"), ("scores", "pre_norm"), ("selection", "exact"), ("combine", "max")):
        with pytest.raises(ValueError, match=name):
            fused_traffic(plan, **{name: wrong}, **sizes)


def test_wide_levels_read_q_and_k_from_the_score_pass_means():
    # L4 p4: levels of 16 and 64 positions; the score pass writes float32 means of 16 positions, from
    # which the gather takes q and k of both (one mean per entry of 16, four per entry of 64).
    plan = plan_for(65536, 4, 4, 512)
    sizes = dict(batch=1, heads=4, kv_heads=4, dim=128, dtype=torch.bfloat16)
    published = fused_traffic(plan, **sizes)
    span_end = fused_traffic(plan, rope="span_end", **sizes)  # means finer than the coarsest: none at span end
    seq, means_row = 65536, 128 * 4
    means_written = (4 + 4) * -(-min(seq, plan.padded_len) // 16) * means_row  # those holding a position
    assert published.score_pass - span_end.score_pass == means_written
    wide = plan.real_entries[2] * 16  # positions of the listed 16-wide spans, and the coarsest level's
    saved = wide * ROW - plan.real_entries[2] * means_row + seq * ROW - -(-min(seq, plan.padded_len) // 16) * means_row
    assert span_end.gather - published.gather == 4 * 2 * saved


def test_gqa_and_float32_and_no_compression():
    plan = plan_for(32768, 3, 4, 512)
    mha = fused_traffic(plan, batch=1, heads=8, kv_heads=8, dim=64, dtype=torch.bfloat16)
    gqa = fused_traffic(plan, batch=1, heads=8, kv_heads=2, dim=64, dtype=torch.bfloat16)
    # fewer KV heads: k read and its scores written once per KV head, dk and dv written per KV head
    assert mha.score_pass > gqa.score_pass and mha.gather_backward - gqa.gather_backward == 2 * 6 * 32768 * 128
    assert mha.gather == gqa.gather  # the gather reads k and v once per query head
    fp32 = fused_traffic(plan, batch=1, heads=8, kv_heads=8, dim=64, dtype=torch.float32)
    # twice the row bytes, and the coarsest q and k read whole: float32's scores are ATen's, no means
    assert fp32.gather == 2 * mha.gather + 8 * (64 * 4) * 2 * (32768 - plan.n_coarse_padded)
    assert fused_traffic(plan_for(4096, 3, 4, 2048), batch=1, heads=8, kv_heads=8, dim=64, dtype=torch.bfloat16).forward == 0


def test_a_padded_pyramid_costs_the_selection_nothing_past_the_sequence():
    # At 128K, L5 p8 K1536 pads the pyramid to 6,291,456 positions; `inverse` keeps seq_len slots per level.
    plan = plan_for(131072, 5, 8, 1536)
    assert plan.padded_len == 48 * 131072
    traffic = fused_traffic(plan, batch=1, heads=8, kv_heads=8, dim=128, dtype=torch.bfloat16)
    candidates = plan.n_coarse_padded + 3 * 8 * 1536
    assert traffic.selection == 8 * (2 * candidates * 4 + 4 * (5 * 131072 + 3 * plan.compressed_len))


@pytest.mark.parametrize("argument, value, message", [
    ("batch", 0, "batch must be an integer >= 1, got 0"),
    ("kv_heads", 3, "heads must be a multiple of kv_heads, got heads=8, kv_heads=3"),
    ("dim", 64.0, "dim must be an integer >= 1, got 64.0"),
    ("dtype", torch.float64, "dtype must be one of torch.float16, torch.bfloat16, torch.float32"),
    ("dtype", "bfloat16", "dtype must be one of"),
    ("scores", "pre_norm", "scores must be one of 'norms', 'given', got 'pre_norm'"),
])
def test_bad_arguments_are_named(argument, value, message):
    settings = dict(batch=1, heads=8, kv_heads=8, dim=128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape(message)):
        fused_traffic(plan_for(131072, 3, 4, 2048), **{**settings, argument: value})
