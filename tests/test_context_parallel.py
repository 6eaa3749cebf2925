"""Context parallelism on the CPU: two gloo processes equal one process, outputs and gradients."""

import pytest
import torch

from lighthouse_hf import lighthouse_attention
from lighthouse_hf.context_parallel import chunk_plan, lighthouse_attention_context_parallel
from lighthouse_hf.ops import LighthousePlan, reference
from helpers import rel_err
from process_ranks import run_rank_processes

WORLD = 2


def local_chunks(x, rank):
    chunks = x.chunk(2 * WORLD, dim=2)
    return torch.cat([chunks[rank], chunks[2 * WORLD - 1 - rank]], dim=2)


ROTARY = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
# The published method, then span-end RoPE, mean combine and given scores (split with the sequence).
METHODS = [(dict(), False), (dict(rope_inv_freq=ROTARY, combine="mean"), True)]


def check_rank(rank, seq, settings, heads, kv_heads, options, given_scores):
    """This rank's part of the context-parallel op's output and gradients equals the same part of
    the op on the whole sequence in this process (B = 2)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, seq, 8, generator=g)
    k = torch.randn(2, kv_heads, seq, 8, generator=g)
    v = torch.randn(2, kv_heads, seq, 8, generator=g)
    weight = torch.randn(2, heads, seq, 8, generator=g)
    scores = [torch.rand(2, h, seq, generator=g) for h in (heads, kv_heads)] if given_scores else None
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    given = dict(q_scores=scores[0], k_scores=scores[1]) if scores else {}
    expected = lighthouse_attention(*full, **settings, **options, **given)
    (expected * weight).sum().backward()

    local = [local_chunks(x, rank).requires_grad_() for x in (q, k, v)]
    given = {name: local_chunks(x[..., None], rank)[..., 0] for name, x in given.items()}
    out = lighthouse_attention_context_parallel(*local, **settings, **options, **given)
    (out * local_chunks(weight, rank)).sum().backward()
    assert rel_err(out, local_chunks(expected, rank)) < 1e-5, options
    for mine, theirs in zip(local, full):
        assert rel_err(mine.grad, local_chunks(theirs.grad, rank)) < 1e-5, options


def worker(rank, seq, settings, heads, kv_heads):
    torch.set_num_threads(1)
    for options, given_scores in METHODS:  # one pair of processes for both: starting one costs seconds
        check_rank(rank, seq, settings, heads, kv_heads, options, given_scores)


@pytest.mark.slow
@pytest.mark.parametrize(
    "seq, settings, heads, kv_heads",
    [
        (8192, dict(levels=3, pooling=4, topk=512), 2, 1),  # chunk boundaries on tile boundaries
        (6000, dict(levels=3, pooling=4, topk=256), 2, 2),  # not aligned: gathered fallback
    ],
    ids=["aligned", "gathered"],
)
def test_two_ranks_equal_one(seq, settings, heads, kv_heads):
    run_rank_processes(WORLD, worker, args=(seq, settings, heads, kv_heads))


def test_chunk_local_selection_is_the_global_selection():
    seq, chunks = 8192, 4
    plan = LighthousePlan(seq, 3, 4, 512)
    local_plan = chunk_plan(seq, chunks, 3, 4, 512)
    assert local_plan is not None and local_plan.compressed_len * chunks == plan.compressed_len
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, seq, 8, generator=g), torch.randn(1, 2, seq, 8, generator=g)
    whole = reference.select(q, k, plan)
    unit = 2 ** (plan.levels - 1)
    per_chunk = []
    for i, (q_c, k_c) in enumerate(zip(q.chunk(chunks, 2), k.chunk(chunks, 2))):
        part = reference.select(q_c, k_c, local_plan)
        per_chunk.append(part.key + i * (seq // chunks) * unit)
    assert torch.equal(torch.cat(per_chunk, dim=-1), whole.key)
    assert chunk_plan(6000, chunks, 3, 4, 256) is None
    with pytest.raises(ValueError, match="chunks must be an integer >= 1, got 0"):
        chunk_plan(seq, 0, 3, 4, 512)
