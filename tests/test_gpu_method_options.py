"""The method options on a CUDA GPU: the fused kernels against the PyTorch reference (which the
CPU tests check against independent computations), and the causal selection's causality with the
GPU's SDPA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from lighthouse_hf import lighthouse_attention
from lighthouse_hf.ops import fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fused.TRITON_AVAILABLE, reason="needs Triton"),
]

# (batch, heads, kv_heads, seq_len, head_dim, levels, pooling, topk)
# The last: coarsest spans of 512 positions (the score pass writes levels 1-2, the host pools level 3;
# the gather sums 16 positions a step), 39 real coarsest entries of 128 listed.
SHAPES = [(1, 4, 2, 4096, 64, 3, 4, 256), (2, 4, 4, 3001, 128, 3, 2, 256), (1, 2, 1, 9000, 64, 4, 4, 128),
          (1, 2, 1, 20000, 64, 4, 8, 128)]
OPTIONS = {
    "span_end": dict(rope=True),
    "given_scores": dict(scores=True),
    "mean": dict(combine="mean"),
    "causal": dict(selection="causal"),
    "all": dict(rope=True, scores=True, combine="mean", selection="causal"),
}


def _arguments(options, shape, generator):
    batch, heads, kv_heads, seq_len, dim = shape[:5]
    arguments = dict(levels=shape[5], pooling=shape[6], topk=shape[7])
    arguments.update({key: options[key] for key in ("combine", "selection") if key in options})
    if options.get("rope"):
        arguments["rope_inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    if options.get("scores"):
        arguments["q_scores"] = torch.rand(batch, heads, seq_len, device="cuda", generator=generator)
        arguments["k_scores"] = torch.rand(batch, kv_heads, seq_len, device="cuda", generator=generator)
    return arguments


def _run(q, k, v, arguments, kernels):
    handles = fused.handles
    if not kernels:
        fused.handles = lambda x: False
    try:
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = lighthouse_attention(*inputs, **arguments)
        return out, torch.autograd.grad(out.float().square().sum(), inputs)
    finally:
        fused.handles = handles


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-S{}-D{}-L{}-p{}-K{}".format(*s))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_kernels_equal_the_reference(name, shape, dtype, tolerance):
    generator = torch.Generator(device="cuda").manual_seed(shape[3])
    q, k, v = (torch.randn(shape[0], h, shape[3], shape[4], device="cuda", generator=generator).to(dtype)
               for h in (shape[1], shape[2], shape[2]))
    arguments = _arguments(OPTIONS[name], shape, generator)
    out, grads = _run(q, k, v, arguments, kernels=True)
    ref_out, ref_grads = _run(q, k, v, arguments, kernels=False)
    assert rel_err(out, ref_out) < tolerance
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_selection_output_ignores_later_inputs_on_the_gpu(dtype):
    shape = (2, 4, 2, 8192, 64, 3, 4, 256)
    generator = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(shape[0], h, shape[3], shape[4], device="cuda", generator=generator).to(dtype)
               for h in (shape[1], shape[2], shape[2]))
    arguments = dict(levels=3, pooling=4, topk=256)
    changed_published = False
    for t in (0, 1023, 1024, 4095, 4096, 6000, 8190):
        later = slice(t + 1, None)
        perturbed = [x.clone() for x in (q, k, v)]
        for x in perturbed:
            x[:, :, later] = x[:, :, later].roll(7, dims=2) * 10
        causal = [lighthouse_attention(*inputs, selection="causal", **arguments) for inputs in ((q, k, v), perturbed)]
        assert torch.equal(causal[0][:, :, : t + 1], causal[1][:, :, : t + 1]), t
        published = [lighthouse_attention(*inputs, **arguments) for inputs in ((q, k, v), perturbed)]
        changed_published |= not torch.equal(published[0][:, :, : t + 1], published[1][:, :, : t + 1])
    assert changed_published  # the perturbations do reach earlier outputs under the published selection
