"""Runs the packed (varlen) op with the fused Triton kernels on CPU tensors under Triton's
interpreter against the same op on the PyTorch reference: documents as strided views of rows laid
out as Transformers lays them out, several method options, forward and backward. Run by
tests/test_packed.py in its own process (the interpreter must be set up before the kernels are
compiled). Prints one JSON line per option with the relative errors of the output and gradients,
each option computed in one of a pool of processes (interpreted_kernels.side_by_side).
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, __file__.rpartition("/")[0])

import interpreted_kernels  # noqa: E402  (sets TRITON_INTERPRET and patches the interpreter)
import torch  # noqa: E402

from lighthouse_hf.ops import Documents, fused, lighthouse_attention_varlen  # noqa: E402

OPTIONS = {
    "published": {},
    "mean": {"combine": "mean"},
    "span_end": {"rope_inv_freq": 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)},
    "causal": {"selection": "causal"},
}


def packed_row(name: str) -> dict:
    """The packed op with the kernels against the same op on the reference, with option ``name``."""
    documents = Documents.from_lengths([[700, 5, 1200, 100, 1200], [1905, 1300]])
    g = torch.Generator().manual_seed(0)
    # [B, S, H, D] seen as [B, H, S, D], as the attention function receives q, k and v
    # GQA with one KV head (several, laid out as here, are the unpacked tests'): the interpreter is slow
    q, k, v = (torch.randn(2, 3205, h, 16, generator=g).transpose(1, 2) for h in (2, 1, 1))
    handles = fused.handles
    results = []
    for use_kernels in (True, False):
        fused.handles = (lambda x: x.dtype in fused.FUSED_DTYPES) if use_kernels else (lambda x: False)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = lighthouse_attention_varlen(*inputs, documents, levels=3, pooling=2, topk=128, **OPTIONS[name])
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    fused.handles = handles
    (out, grads), (ref_out, ref_grads) = results
    return dict(option=name, out=interpreted_kernels.rel(out, ref_out),
                grads=[interpreted_kernels.rel(a, b) for a, b in zip(grads, ref_grads)])


def main() -> None:
    for row in interpreted_kernels.side_by_side(packed_row, OPTIONS):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
