"""Context parallelism captures as one graph (``torch.compile(fullgraph=True)``), like the
single-device path, on two threaded ranks (tests/threaded_ranks.py), whose collectives dynamo
traces: the gathered fallback and a decoder layer; the aot_eager backend (no C++ compiler needed),
outputs and gradients against eager. The op and a decoder layer on gloo processes (opaque
collectives) are tests/test_context_parallel_processes.py's; tests/test_gpu_context_parallel.py
compiles the op with inductor on a GPU."""

from __future__ import annotations

import pytest
import torch

from transformers import AutoModelForCausalLM

from helpers import tiny_config
from lighthouse_hf import apply_lighthouse
from lighthouse_hf.context_parallel import chunk_plan, lighthouse_attention_context_parallel
from lighthouse_hf.dispatch import LighthouseWarning
from context_parallel_checks import layer_eager_and_compiled
from threaded_ranks import run_ranks, shard, unshard


@pytest.mark.slow
def test_gathered_fallback_compiles_as_one_graph():
    """The fallback for lengths whose chunks miss tile boundaries compiles too (its warning is for
    eager calls: dynamo cannot trace ``warnings.warn``); 2 threaded ranks, outputs and gradients."""
    world, seq, settings = 2, 6000, dict(levels=3, pooling=2, topk=1024)
    assert chunk_plan(seq, 2 * world, **settings) is None
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, 8, generator=generator) for h in (2, 1, 1))

    def attention(q, k, v):
        return lighthouse_attention_context_parallel(q, k, v, **settings)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")

    def rank_main(rank):
        results = []
        for fn in (attention, compiled):
            inputs = [shard(x, world, rank, dim=2).requires_grad_() for x in (q, k, v)]
            out = fn(*inputs)
            results.append([out.detach(), *torch.autograd.grad(out.square().sum(), inputs)])
        return results

    with pytest.warns(LighthouseWarning, match="every rank gathers the whole sequence"):  # from the eager calls
        parts = run_ranks(world, rank_main)
    for i in range(4):
        torch.testing.assert_close(unshard([part[1][i] for part in parts], dim=2), unshard([part[0][i] for part in parts], dim=2))


@pytest.mark.slow
@pytest.mark.parametrize("dense", [False, True], ids=["lighthouse_layer", "dense_layer"])
def test_decoder_layer_under_context_parallelism_captures_as_one_graph(dense):
    """A Llama decoder layer called with ``lighthouse_cp_group`` (the attention function's
    context-parallel path: mask check, settings, dense-or-Lighthouse dispatch, the op) compiles
    with ``fullgraph=True`` on each of 2 ranks (threads of this process) and equals eager."""
    world, seq = 2, 6144
    config = tiny_config("llama", max_position_embeddings=seq)
    torch.manual_seed(0)
    model = apply_lighthouse(
        AutoModelForCausalLM.from_config(config), levels=3, pooling=2, topk=1024, dense_layers=[0] if dense else []
    )
    layer = model.model.layers[0]
    hidden = torch.randn(1, seq, config.hidden_size)
    positions = torch.arange(seq)[None]
    assert chunk_plan(seq, 2 * world, 3, 2, 1024) is not None

    parts = run_ranks(world, lambda rank: layer_eager_and_compiled(model, layer, hidden, positions, world, rank))
    eager, compiled = ([unshard([part[run][i] for part in parts], dim=1) for i in range(2)] for run in range(2))
    for mine, theirs in zip(compiled, eager):
        torch.testing.assert_close(mine, theirs)
    # the ranks ran context parallelism: together they are the layer on the whole sequence
    whole = hidden.clone().requires_grad_()
    out = layer(whole, attention_mask=None, position_ids=positions, position_embeddings=model.model.rotary_emb(whole, positions))
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(eager[0], out.detach())
