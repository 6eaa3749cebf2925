"""Times the packed op's routes for the compressed sequences against each other, in one process, on
a packed bf16 row of the bench's long-tailed mixture (CUDA only; not a test, a measurement for
NOTES-kernels.md, "Packed documents"):

* ``per_length``: each Lighthouse length its own SDPA call (SDPA picks its backend: cuDNN on
  Hopper), the dense documents one varlen flash call (the route before the joint call);
* ``joint``: the compressed sequences of every length and the dense documents in one varlen flash
  call (the package's route);
* ``padded``: the compressed sequences of every length padded at the end to the longest, one
  batched SDPA call (causal: a real row never sees the padding after it), the dense documents one
  varlen flash call. Built here from the package's pieces, not in the package: it is measured to
  decide between it and ``joint``.

Each route is first checked against ``per_length`` (outputs and gradients, bf16 rounding), then
timed fwd+bwd and fwd with the bench's interleaved timer. Prints one JSON line per (topk, mode).

    python tests/timed_packed_routes.py [TOTAL] [TOPK ...]     (defaults: 131072, 1024 2048)
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import lighthouse_hf.ops.varlen as varlen
from lighthouse_hf.bench import longtail_lengths, time_interleaved
from lighthouse_hf.ops import Documents, lighthouse_attention_varlen

HEADS, DIM, LEVELS, POOLING, SEED, INPUT_SETS = 8, 128, 3, 4, 0, 3


def padded_then_dense_varlen(call, compressed, bundled, scale):
    """Drop-in for the joint call: one padded batched SDPA over the compressed sequences, one varlen
    call over the dense documents."""
    longest = max(q.shape[2] for q, _, _ in compressed)
    q, k, v = (torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[2])) for x in xs]) for xs in zip(*compressed))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    group_outs, first = [], 0
    for q_group, _, _ in compressed:
        count, _, length, _ = q_group.shape
        group_outs.append(out[first : first + count, :, :length])
        first += count
    bundle_outs = None
    if bundled is not None:
        lengths = [doc.shape[1] for doc in bundled[0]]
        ends = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(q.device)
        bundle = SimpleNamespace(cu_seqlens=ends, max_length=max(lengths), lengths=lengths)
        bundle_outs = varlen._dense_bundle(bundle, bundled, scale)
    return group_outs, bundle_outs


@contextmanager
def route(name: str):
    joins, attend = varlen._joins_compressed, varlen._attend_jointly
    if name == "per_length":
        varlen._joins_compressed = lambda layout, bundle_dense: False
    elif name == "padded":
        varlen._attend_jointly = padded_then_dense_varlen
    try:
        yield
    finally:
        varlen._joins_compressed, varlen._attend_jointly = joins, attend


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    topks = [int(x) for x in sys.argv[2:]] or [1024, 2048]
    lengths = longtail_lengths(total, SEED)
    documents = Documents.from_lengths([lengths])
    g = torch.Generator(device="cuda").manual_seed(0)

    def draw(requires_grad=True):
        x = torch.randn(1, HEADS, total, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        return x.requires_grad_(requires_grad)

    sets = [(draw(), draw(), draw(), draw(False)) for _ in range(INPUT_SETS)]
    routes = ("per_length", "joint", "padded")
    for topk in topks:
        settings = dict(levels=LEVELS, pooling=POOLING, topk=topk)

        def step(name, backward):
            def run(i):
                q, k, v, grad = sets[i]
                with route(name):
                    if not backward:
                        with torch.no_grad():
                            return lighthouse_attention_varlen(q, k, v, documents, **settings)
                    out = lighthouse_attention_varlen(q, k, v, documents, **settings)
                    return torch.autograd.grad(out, (q, k, v), grad)

            return run

        q, k, v, grad = sets[0]
        results = {}
        for name in routes:
            with route(name):
                out = lighthouse_attention_varlen(q, k, v, documents, **settings)
                results[name] = [out, *torch.autograd.grad(out, (q, k, v), grad)]
        errors = {name: [rel(a, b) for a, b in zip(results[name], results["per_length"])] for name in routes[1:]}
        for mode, backward in (("fwd+bwd", True), ("fwd", False)):
            timed = time_interleaved({name: step(name, backward) for name in routes}, warmup=3, iters=12,
                                     input_sets=INPUT_SETS)
            print(json.dumps(dict(topk=topk, mode=mode, documents=len(lengths), longest=max(lengths),
                                  ms={name: round(timed[name]["ms"], 3) for name in routes},
                                  rel_err_to_per_length=errors)), flush=True)


if __name__ == "__main__":
    main()
