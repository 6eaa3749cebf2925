"""The causal selection kernel on a CUDA GPU (skipped without one): the selection equals the
reference's causal rule entry for entry (ties, signed zeros, padded plans, runs of earlier tiles),
and the output at t is unchanged bit for bit by any change of the inputs after t with the kernel
selecting."""

from __future__ import annotations

import pytest
import torch

from helpers import change_after, rel_err
from lighthouse_hf.ops import fused, lighthouse_attention, reference
from lighthouse_hf.ops.plan import LighthousePlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fused.TRITON_AVAILABLE, reason="needs Triton"),
]

# (batch, heads, kv_heads, seq_len, head_dim, levels, pooling, topk). Most have tiles of more than
# 128 coarse entries (else the coarsest choice is forced whole) and more tiles than levels - 1
# (so a program's run of earlier tiles does not start at tile 0).
SHAPES = [
    (1, 2, 2, 4096, 64, 3, 2, 512),  # 4 tiles of 256
    (2, 4, 2, 3001, 32, 4, 2, 384),  # padded, GQA, B = 2
    (1, 2, 1, 5000, 64, 2, 8, 256),  # p = 8, padded tiles of 313
    (1, 2, 2, 9000, 64, 4, 2, 640),  # 5 tiles of 225
    (3, 6, 3, 7777, 128, 3, 4, 384),
    (1, 2, 2, 9000, 64, 5, 2, 128),
    (1, 2, 1, 6000, 80, 3, 8, 128),  # head size not a power of two, padding entries
    (2, 2, 2, 20000, 128, 5, 4, 256),  # coarsest spans of 256: norms by ATen in every dtype
    (1, 4, 1, 65536, 128, 3, 4, 2048),  # the benchmark's setting at 64K: 16 tiles of 256
]
FIELDS = ("level", "local", "index", "key", "refined")


def _ids(shape):
    return "B{}-H{}-Hkv{}-S{}-D{}-L{}-p{}-K{}".format(*shape)


def _plan(shape):
    return LighthousePlan(shape[3], *shape[5:])


def _settings(shape):
    return dict(levels=shape[5], pooling=shape[6], topk=shape[7])


def _qk(shape, dtype, generator, integer=False):
    batch, heads, kv_heads, seq_len, dim = shape[:5]
    if integer:  # exact norms in any precision, tied by the hundred
        return (torch.randint(-2, 3, (batch, h, seq_len, dim), device="cuda", generator=generator).to(dtype)
                for h in (heads, kv_heads))
    return (torch.randn(batch, h, seq_len, dim, device="cuda", generator=generator).to(dtype) for h in (heads, kv_heads))


def _assert_same_selection(got, want):
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_selection_equals_the_reference_fp32(shape):
    generator = torch.Generator(device="cuda").manual_seed(shape[3])
    q, k = _qk(shape, torch.float32, generator)
    plan = _plan(shape)
    _assert_same_selection(fused.select(q, k, plan, causal=True), reference.select(q, k, plan, causal=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_selection_equals_the_reference_on_tied_half_precision_norms(shape, dtype):
    # Small integers: the Triton score pass's norms are exact, so they equal the reference's.
    generator = torch.Generator(device="cuda").manual_seed(shape[3] + 1)
    q, k = _qk(shape, dtype, generator, integer=True)
    plan = _plan(shape)
    # the Triton pass computes the whole pyramid where every coarsest span fits one program's block
    assert (fused._score_pass_levels(q.dtype, q.shape[-1], plan) == plan.levels) == (plan.coarse_width <= 128)
    _assert_same_selection(fused.select(q, k, plan, causal=True), reference.select(q, k, plan, causal=True))


@pytest.mark.parametrize("scores", ["integers", "signed zeros", "pre-norm layout"])
@pytest.mark.parametrize("causal", [False, True], ids=["published", "causal"])
@pytest.mark.parametrize("shape", SHAPES[:6], ids=_ids)
def test_selection_equals_the_reference_on_tied_given_scores(shape, causal, scores):
    # Signed zeros: -0.0 and 0.0 compare equal, so they tie, as in the reference's stable sort. The
    # pre-norm layout: as Qwen3's hook hands them over, [B, S, h] seen as [B, h, S], q's in bfloat16
    # beside k's in float32 (the score pass then reads both as float32).
    batch, heads, kv_heads, seq_len = shape[:4]
    generator = torch.Generator(device="cuda").manual_seed(shape[3] + 2)
    q, k = _qk(shape, torch.bfloat16, generator)
    given = {}
    for name, h in (("q_scores", heads), ("k_scores", kv_heads)):
        if scores == "integers":
            given[name] = torch.randint(0, 4, (batch, h, seq_len), device="cuda", generator=generator).float()
        elif scores == "pre-norm layout":
            given[name] = torch.rand(batch, seq_len, h, device="cuda", generator=generator).transpose(1, 2)
            if name == "q_scores":
                given[name] = given[name].bfloat16()
        else:
            ones = (torch.rand(batch, h, seq_len, device="cuda", generator=generator) < 0.02).float()
            negative = torch.rand(batch, h, seq_len, device="cuda", generator=generator) < 0.9
            given[name] = torch.where(negative & (ones == 0), -0.0, ones)
    plan = _plan(shape)
    _assert_same_selection(fused.select(q, k, plan, causal=causal, **given), reference.select(q, k, plan, causal=causal, **given))


@pytest.fixture
def kernels_only(monkeypatch):
    """The reference's selection refuses to run: what selects is the kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("the reference selection ran")

    monkeypatch.setattr(reference, "select", refuse)


def _probe_positions(plan):
    """t = 0, both sides of block boundaries of every level and of tile boundaries, the end of
    the coarse grid, the last positions."""
    positions = {0, plan.seq_len - 2, plan.seq_len - 1, plan.real_len - 1, plan.real_len}
    for level in range(1, plan.levels):
        width = plan.pooling**level
        positions |= {width - 1, width, 5 * width}
    for tile in range(1, plan.tiles):
        start = tile * plan.tile_len * plan.coarse_width
        positions |= {start - 1, start, start + plan.coarse_width}
    return sorted(t for t in positions if 0 <= t < plan.seq_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], (1, 2, 1, 8195, 64, 3, 4, 256)], ids=_ids)
def test_output_at_t_ignores_every_later_input_with_the_kernel(shape, dtype, kernels_only):
    generator = torch.Generator(device="cuda").manual_seed(shape[3] + 3)
    batch, heads, kv_heads, seq_len, dim = shape[:5]
    q, k, v = (torch.randn(batch, h, seq_len, dim, device="cuda", generator=generator).to(dtype)
               for h in (heads, kv_heads, kv_heads))
    before = lighthouse_attention(q, k, v, selection="causal", **_settings(shape))
    for t in _probe_positions(_plan(shape)):
        for how in ("scaled", "rolled", "random"):
            changed = [change_after(x, t, how, generator) for x in (q, k, v)]
            after = lighthouse_attention(*changed, selection="causal", **_settings(shape))
            assert torch.equal(after[:, :, : t + 1], before[:, :, : t + 1]), (t, how)


def test_the_same_changes_move_the_published_output():
    # The perturbations above are strong enough to reach earlier outputs through the published rule.
    shape = SHAPES[0]
    generator = torch.Generator(device="cuda").manual_seed(shape[3] + 3)
    q, k, v = (torch.randn(1, h, shape[3], shape[4], device="cuda", generator=generator) for h in (2, 2, 2))
    before = lighthouse_attention(q, k, v, **_settings(shape))
    moved = 0
    for t in _probe_positions(_plan(shape)):
        changed = [change_after(x, t, "scaled", generator) for x in (q, k, v)]
        moved += not torch.equal(lighthouse_attention(*changed, **_settings(shape))[:, :, : t + 1], before[:, :, : t + 1])
    assert moved > 0


def test_compiled_causal_selection_matches_eager():
    shape = (1, 4, 2, 4096, 64, 3, 2, 512)
    generator = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(1, h, shape[3], shape[4], device="cuda", generator=generator, dtype=torch.bfloat16)
               .requires_grad_() for h in (4, 2, 2))

    def attention(q, k, v):
        return lighthouse_attention(q, k, v, selection="causal", **_settings(shape))

    eager = attention(q, k, v)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    out = torch.compile(attention, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert rel_err(out, eager) < 1e-3
    for got, want in zip(grads, eager_grads):
        assert rel_err(got, want) < 1e-3
