"""Runs the fused Triton path on CPU tensors under Triton's interpreter against the PyTorch
reference: every method option, forward and backward. Run by tests/test_kernels_interpreted.py in
its own process (TRITON_INTERPRET must be set before the kernels are compiled), or by hand:

    TRITON_INTERPRET=1 python tests/interpreted_kernels.py float32

Prints one JSON line per (shape, options) with the relative errors of the output and gradients and
whether the selections are identical.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from lighthouse_hf import lighthouse_attention  # noqa: E402
from lighthouse_hf.ops import LighthousePlan, fused, reference  # noqa: E402

# Triton 3.6's interpreter converts a loop bound with int() on a 1-element array, which NumPy 2.4
# refuses (only 0-d arrays convert); the interpreter's own patch, repeated with the element taken.
_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_with_scalar_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_with_scalar_index

CASES = [(1, 2, 1, 2048, 16, 3, 4, 128), (2, 4, 2, 2051, 32, 3, 4, 128), (1, 2, 2, 1500, 16, 2, 8, 128),
         (1, 2, 1, 3000, 16, 4, 2, 256)]
OPTIONS = [{}, {"combine": "mean"}, {"scores": True}, {"rope": True}, {"selection": "causal"},
           {"rope": True, "scores": True, "combine": "mean", "selection": "causal"}]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(dtype: torch.dtype) -> None:
    handles = fused.handles
    for case in CASES:
        batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
        g = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(batch, h, seq, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
        for options in OPTIONS:
            kwargs = {key: value for key, value in options.items() if key in ("combine", "selection")}
            if options.get("rope"):
                kwargs["rope_inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
            if options.get("scores"):
                kwargs["q_scores"] = torch.rand(batch, heads, seq, generator=g)
                kwargs["k_scores"] = torch.rand(batch, kv_heads, seq, generator=g)
            results = []
            for use_kernels in (True, False):
                fused.handles = (lambda x: x.dtype in fused.FUSED_DTYPES) if use_kernels else (lambda x: False)
                inputs = [x.clone().requires_grad_() for x in (q, k, v)]
                out = lighthouse_attention(*inputs, levels=levels, pooling=pooling, topk=topk, **kwargs)
                grads = torch.autograd.grad(out.float().square().sum(), inputs)
                results.append((out, grads))
            fused.handles = handles
            plan = LighthousePlan(seq, levels, pooling, topk)
            same_selection = None
            if not options.get("selection") and not options.get("scores") and dtype == torch.float32:
                same_selection = torch.equal(fused.select(q, k, plan).index, reference.select(q, k, plan).index)
            (out, grads), (ref_out, ref_grads) = results
            print(json.dumps(dict(case=case, options=options, out=rel(out, ref_out),
                                  grads=[rel(a, b) for a, b in zip(grads, ref_grads)], same_selection=same_selection)),
                  flush=True)


if __name__ == "__main__":
    run(getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32"))
