"""The context-parallel op captures as one graph (``torch.compile(fullgraph=True)``), like the
single-device op: two gloo ranks, the aot_eager backend (no C++ compiler needed), outputs and
gradients against eager."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from lighthouse_hf.context_parallel import chunk_plan, lighthouse_attention_context_parallel, shard_sequence

WORLD = 2
SEQ = 16384
SETTINGS = dict(levels=3, pooling=4, topk=512)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, SEQ, 16), torch.randn(1, 2, SEQ, 16)

    def run(fn):
        parts = [shard_sequence(x, None, dim=2).requires_grad_() for x in (q, k, v)]
        out = fn(*parts)
        return out, torch.autograd.grad(out.square().sum(), parts)

    def attention(q, k, v):
        return lighthouse_attention_context_parallel(q, k, v, **SETTINGS)

    eager_out, eager_grads = run(attention)
    out, grads = run(torch.compile(attention, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_op_compiles_as_one_graph():
    assert chunk_plan(SEQ, 2 * WORLD, **SETTINGS) is not None  # the chunk-local path, not the gathered fallback
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD)
