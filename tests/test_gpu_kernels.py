"""The fused Triton path against the reference path, on a CUDA GPU (skipped without one).

Every test draws fresh random inputs. Shapes cover odd S (the padded tile grid), B > 1, GQA,
L = 2..5, p = 2/4/8 and head sizes that are not powers of two.
"""

from __future__ import annotations

import math

import pytest
import torch

from lighthouse_hf.export.verify import same_bits
from lighthouse_hf.ops import fused, lighthouse_attention, reference
from lighthouse_hf.ops.plan import LighthousePlan
from helpers import decoder_layer_step, rel_err, span_end_scores_apart, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fused.TRITON_AVAILABLE, reason="needs Triton"),
]

# (batch, heads, kv_heads, seq_len, head_dim, levels, pooling, topk)
SHAPES = [
    (1, 2, 2, 2048, 64, 3, 4, 128),
    (2, 4, 2, 1000, 32, 2, 2, 128),
    (1, 4, 1, 3001, 64, 3, 2, 256),
    (1, 2, 2, 5000, 128, 4, 2, 128),
    (2, 8, 2, 4096, 64, 3, 4, 256),
    (1, 2, 1, 1500, 80, 3, 2, 256),  # one padding entry in the coarsest level
    (1, 2, 2, 9000, 64, 5, 2, 128),
    (1, 2, 2, 6000, 64, 3, 8, 128),  # 35 padding entries, some selected; 48 tail positions
    (3, 6, 3, 7777, 128, 3, 4, 384),
    (1, 4, 4, 16384, 128, 3, 4, 512),
]
FIELDS = ("level", "local", "index", "key", "refined")


def _ids(shape):
    return "B{}-H{}-Hkv{}-S{}-D{}-L{}-p{}-K{}".format(*shape)


def _inputs(shape, dtype, seed, requires_grad=False):
    batch, heads, kv_heads, seq_len, dim, *_ = shape
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def draw(h):
        x = torch.randn(batch, h, seq_len, dim, device="cuda", generator=generator, dtype=torch.float32)
        return x.to(dtype).requires_grad_(requires_grad)

    return draw(heads), draw(kv_heads), draw(kv_heads)


def _settings(shape):
    levels, pooling, topk = shape[5:]
    return dict(levels=levels, pooling=pooling, topk=topk)


def _plan(shape):
    return LighthousePlan(shape[3], *shape[5:])


def _fused_and_reference(shape, dtype, seed):
    """Outputs and gradients of the fused path (in ``dtype``) and of the reference in float32 with
    the fused path's selection (so that the comparison is about numerics, not tie-breaking)."""
    q, k, v = _inputs(shape, dtype, seed, requires_grad=True)
    plan = _plan(shape)
    out = lighthouse_attention(q, k, v, **_settings(shape))
    grad = torch.randn_like(out)
    out.backward(grad)
    selection = fused.select(q.detach(), k.detach(), plan)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = reference.attend(q32, k32, v32, selection, None)
    expected.backward(grad.float())
    return (out, q.grad, k.grad, v.grad), (expected, q32.grad, k32.grad, v32.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_selection_equals_reference_fp32(shape):
    assert _plan(shape).compresses
    q, k, _ = _inputs(shape, torch.float32, seed=shape[3])
    expected = reference.select(q, k, _plan(shape))
    got = fused.select(q, k, _plan(shape))
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("shape", SHAPES[:6], ids=_ids)
def test_selection_nearly_equals_reference_on_bf16_inputs(shape):
    # Half-precision norms come from a Triton reduction whose float32 rounding can differ from
    # the reference's in the last bit, which can only flip near-ties: allow 1% of entries to move.
    q, k, _ = _inputs(shape, torch.bfloat16, seed=shape[3] + 1)
    expected = reference.select(q, k, _plan(shape))
    got = fused.select(q, k, _plan(shape))
    assert (got.key != expected.key).float().mean().item() < 0.01


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_fp32_outputs_and_gradients(shape):
    # The full reference (its own selection, pyramid and SDPA) against the dispatched public function.
    q, k, v = _inputs(shape, torch.float32, seed=shape[3] + 2, requires_grad=True)
    out = lighthouse_attention(q, k, v, **_settings(shape))
    grad = torch.randn_like(out)
    out.backward(grad)
    q_ref, k_ref, v_ref = (x.detach().clone().requires_grad_() for x in (q, k, v))
    expected = reference.lighthouse_attention(q_ref, k_ref, v_ref, _plan(shape), None)
    expected.backward(grad)
    assert out.dtype == q.dtype and out.shape == q.shape
    for got, want in ((out, expected), (q.grad, q_ref.grad), (k.grad, k_ref.grad), (v.grad, v_ref.grad)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_half_precision_outputs_and_gradients(shape, dtype):
    got, expected = _fused_and_reference(shape, dtype, seed=shape[3] + 3)
    assert got[0].dtype == dtype
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        assert rel_err(g, e) < 1e-2


# One padding entry in the coarsest level and 7 positions past real_len, whose means it holds.
PADDED_TAIL = (1, 2, 2, 6007, 64, 3, 4, 256)


# Means finer than the coarsest level (float32, averaged by the gather): coarsest spans of 64 (means
# of 16, L4 p4; of 8, L3 p8) and of 512 (L4 p8 at D=128: a pass over the sequence only).
WIDE_MEANS = [(1, 2, 1, 8192, 128, 4, 4, 256), (2, 4, 2, 6000, 64, 3, 8, 128), (1, 2, 2, 9000, 128, 4, 8, 128)]


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5], SHAPES[8], PADDED_TAIL, *WIDE_MEANS], ids=_ids)
def test_score_pass_means_equal_reference_pyramid(shape):
    # The gather copies or averages q and k rows of every level at least as wide from these means.
    q, k, _ = _inputs(shape, torch.bfloat16, seed=8)
    plan = _plan(shape)
    width = fused.score_pass_means_width(q.dtype, q.shape[-1], plan)
    assert width > 1
    means = fused._score_pyramids(q, k, plan)[2]
    assert means.dtype == (q.dtype if width == plan.coarse_width else torch.float32)
    covered = fused.score_means_rows(plan, width)
    assert means.shape[1] == covered
    offset = plan.level_offset(round(math.log(width, plan.pooling)))
    batch, heads = q.shape[:2]
    for rows, x in ((means[: batch * heads], q), (means[batch * heads :], k)):
        want = reference.pyramid(x.float(), plan)[:, :, offset : offset + covered].flatten(0, 1).to(means.dtype)
        torch.testing.assert_close(rows, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[8], PADDED_TAIL, WIDE_MEANS[0]], ids=_ids)
def test_span_end_selects_as_pooled_and_writes_the_coarsest_means_at_span_end(shape):
    # rope="span_end": the scores are the same norms, every score equal to the last bit under both
    # rules, so the same listing as rope="pooled". Where the pooled means are the coarsest level's
    # rows, the span-end ones are too, each position turned to its span's end first; elsewhere (L4
    # p4: means of 16, spans of 64) none, and the gather pools the coarsest level rotated itself.
    q, k, _ = _inputs(shape, torch.bfloat16, seed=9)
    plan = _plan(shape)
    dim = q.shape[-1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    rotary = fused.rotary_table(inv_freq, plan)
    assert span_end_scores_apart(q, k, plan, inv_freq) == []
    *listing, means = fused._select_impl(q, k, None, None, rotary, *shape[5:])
    *pooled_listing, pooled_means = fused._select_impl(q, k, None, None, None, *shape[5:])
    for got, want in zip(listing, pooled_listing):
        assert torch.equal(got, want)
    assert pooled_means.numel() > 0
    if fused.score_pass_means_width(q.dtype, dim, plan) != plan.coarse_width:
        assert means.numel() == 0
        return
    coarsest, rows = plan.level_offset(plan.levels - 1), fused.score_means_rows(plan, plan.coarse_width)
    batch, heads = q.shape[:2]
    for got, x in ((means[: batch * heads], q), (means[batch * heads :], k)):
        want = reference.pyramid(x.float(), plan, inv_freq)[:, :, coarsest : coarsest + rows].flatten(0, 1)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["published", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 9000, 64, 4, 8, 128), (2, 4, 2, 70000, 128, 5, 4, 256)], ids=_ids)
def test_partial_score_pass_equals_the_aten_pyramid(shape, causal):
    # Coarsest spans wider than the score pass's block: it writes the levels that fit, the host
    # max-pools the rest and fills the padding slots; the maxima are the ATen pyramid's (norms to
    # the last bit, which the two compute in different orders). causal: two rows per level.
    q, k, _ = _inputs(shape, torch.bfloat16, seed=10)
    plan = _plan(shape)
    assert 1 < fused._score_pass_levels(q.dtype, q.shape[-1], plan) < plan.levels
    got = fused._score_pyramids(q, k, plan, causal=causal)[:2]
    stride = plan.padded_len // plan.pooling
    coarse = plan.levels - 1
    for pyramid, x in zip(got, (q, k)):
        want = fused._aten_score_pyramid(x, plan, stride, causal)
        for level in range(1, plan.levels):
            slots = slice(0, plan.level_len(level))
            for row in (level - 1, coarse + level - 1) if causal else (level - 1,):
                torch.testing.assert_close(pyramid[:, row, slots], want[:, row, slots], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_bench_reports_every_variant():
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "lighthouse_hf", "bench", "--seq", "4096", "--heads", "2", "--topk", "256",
               "--iters", "2", "--input-sets", "2", "--warmup", "1", "--json",
               "--rope", "pooled", "span_end", "--scores", "norms", "given", "--combine", "sum", "mean"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    # Every combination of the options (the first one the published method), each in both modes.
    assert [(row["rope"], row["scores"], row["selection"], row["combine"], row["mode"]) for row in rows] == [
        (rope, scores, "published", combine, mode)
        for rope in ("pooled", "span_end") for scores in ("norms", "given") for combine in ("sum", "mean")
        for mode in ("fwd+bwd", "fwd")
    ]
    for row in rows:
        for variant in ("lighthouse", "sdpa_sel", "sdpa_sel_cudnn", "dense_cudnn"):
            assert row[variant]["ms"] > 0 and row[variant]["latency_ms"] > 0 and row[variant]["peak_gb"] > 0
        assert row["ratio_to_sdpa_sel_cudnn"] == pytest.approx(row["lighthouse"]["ms"] / row["sdpa_sel_cudnn"]["ms"])


def test_batch_past_the_grid_limit_is_a_clear_error():
    # An expanded view: 65536 sequences without the memory (the check comes before any launch).
    q = torch.zeros(1, 1, 4096, 16, device="cuda", dtype=torch.bfloat16).expand(65536, -1, -1, -1)
    with pytest.raises(ValueError, match="batch <= 65535"):
        lighthouse_attention(q, q, q, topk=128)


def test_unreached_positions_are_zero():
    # The first level-1 block (positions 0-3) has tiny norms, so it is rejected and stays coarse:
    # it reaches positions 3-6 only, and no entry reaches positions 0-2.
    shape = (1, 1, 1, 2048, 64, 3, 4, 128)
    q, k, v = _inputs(shape, torch.float32, seed=11)
    q[:, :, :4] *= 1e-3
    k[:, :, :4] *= 1e-3
    out = lighthouse_attention(q, k, v, **_settings(shape))
    expected = reference.lighthouse_attention(q, k, v, _plan(shape), None)
    assert (expected[:, :, :3] == 0).all() and (expected[:, :, 3] != 0).all()
    assert (out[:, :, :3] == 0).all()
    assert rel_err(out, expected) < 1e-5


def _run_twice(shape, dtype):
    runs = []
    for _ in range(2):
        q, k, v = _inputs(shape, dtype, seed=5, requires_grad=True)
        out = lighthouse_attention(q, k, v, **_settings(shape))
        out.backward(torch.ones_like(out))
        runs.append((out, q.grad, k.grad, v.grad))
    return runs


@pytest.fixture
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4], SHAPES[8]], ids=_ids)
def test_bitwise_deterministic_under_deterministic_algorithms(shape, dtype, deterministic_algorithms):
    # The Lighthouse kernels are gathers (always reproducible); PyTorch's SDPA backward is
    # reproducible only in this mode, where PyTorch picks a deterministic attention backward.
    for first, second in zip(*_run_twice(shape, dtype)):
        assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[8]], ids=_ids)
def test_lighthouse_kernels_bitwise_deterministic_by_default(shape):
    q, k, v = _inputs(shape, torch.bfloat16, seed=6)
    settings = tuple(shape[5:])
    runs = []
    for _ in range(2):
        entry_local, entry_row, inverse, means = fused._select_impl(q, k, None, None, None, *settings)
        gathered = fused._gather_impl(q, k, v, entry_local, entry_row, inverse, means, None, *settings)
        scattered, _ = fused._scatter_impl(gathered[2], inverse, entry_local, entry_row, shape[3], False, *settings)
        grad_sel = fused._scatter_backward_impl(q, q.new_empty(0, dtype=torch.float32), entry_local, entry_row, *settings)
        grads = fused._gather_backward_impl(*gathered, inverse, None, shape[2], shape[3], *settings)
        runs.append((entry_local, entry_row, inverse, means, *gathered, scattered, grad_sel, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("rope", [False, True], ids=["pooled", "span_end"])
def test_compiled_function_matches_eager(rope):
    # span_end: the rotary table goes through the select op (its span-end means) and the gather
    shape = (1, 4, 2, 4096, 64, 3, 4, 256)
    q, k, v = _inputs(shape, torch.bfloat16, seed=7, requires_grad=True)
    options = dict(rope_inv_freq=1.0 / 10000 ** (torch.arange(0, 64, 2, device="cuda").float() / 64)) if rope else {}

    def attention(q, k, v):
        return lighthouse_attention(q, k, v, **_settings(shape), **options)

    compiled = torch.compile(attention, fullgraph=True)
    eager_out = attention(q, k, v)
    eager_grads = torch.autograd.grad(eager_out.sum(), (q, k, v))
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert rel_err(out, eager_out) < 1e-3
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-3


def test_compiled_llama_decoder_layer():
    from transformers import AutoModelForCausalLM

    import lighthouse_hf

    seq_len = 4096
    config = tiny_config(
        "llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, max_position_embeddings=seq_len
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
    lighthouse_hf.apply_lighthouse(model, topk=256, dense_layers=[])
    layer = model.model.layers[0]
    hidden = torch.randn(1, seq_len, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(seq_len, device="cuda")[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)

    def run(layer_fn):
        return decoder_layer_step(layer_fn, hidden, position_ids, position_embeddings)

    eager_out, eager_grad = run(layer)
    out, grad = run(torch.compile(layer, fullgraph=True))
    assert rel_err(out, eager_out) < 1e-2
    assert rel_err(grad, eager_grad) < 1e-2


# A sixteenth of the coarsest entries refined: most blocks of the scatter kernel skip the finer levels,
# some do not (L5 p2 and L3 p4).
SPARSE_SHAPES = [(1, 8, 2, 65536, 128, 5, 2, 256), (1, 4, 4, 131072, 128, 3, 4, 512)]


@pytest.mark.parametrize("mean", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=_ids)
def test_the_scatter_kernels_two_ways_to_sum_give_the_same_bits(shape, mean, monkeypatch):
    # A block that no entry below the coarsest level reaches sums the coarsest alone (the check of
    # fused._skips_finer_levels); forced on and off, the scatter and its counts must be the same bits,
    # as compiled for this GPU (FMA contraction included).
    batch, heads, _, seq_len, dim = shape[:5]
    settings = tuple(shape[5:])
    q, k, _ = _inputs(shape, torch.bfloat16, seed=7)
    entry_local, entry_row, inverse, _ = fused._select_impl(q, k, None, None, None, *settings)
    generator = torch.Generator(device="cuda").manual_seed(8)
    rows = torch.randn(batch, heads, entry_local.shape[-1], dim, device="cuda", generator=generator).bfloat16()
    runs = []
    for check in (True, False):
        monkeypatch.setattr(fused, "_skips_finer_levels", lambda plan, block_p, check=check: check and plan.levels > 1)
        runs.append(fused._scatter_impl(rows, inverse, entry_local, entry_row, seq_len, mean, *settings))
    for on, off in zip(*runs):
        assert same_bits(on, off)
