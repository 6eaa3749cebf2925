"""Context parallelism against one device, and compiled against eager: the checks the CPU tests
(reference branch) and the GPU tests (CUDA branch, fused kernels) both run.

Every eager check computes the single-device result on the whole sequence, runs the
context-parallel path on ``world`` threaded ranks (tests/threaded_ranks.py), reassembles the
ranks' parts and returns relative errors (norm of the difference over the norm of the
single-device result). In bfloat16 it also returns both paths' errors against float32, so a test
can ask that context parallelism be no less accurate than one device rather than bit-equal to it
(the two paths round in different places).

The compile checks run their ranks as gloo processes (tests/process_ranks.py: torch 2.11's dynamo
cannot trace collectives on the threaded group) and return compiled-against-eager errors with the
operators of every graph each rank's ``torch.compile`` captured, so a test can tell that the
collectives and the branch it expects (the fused kernels' custom ops on a GPU) are inside the one
graph.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from helpers import rel_err
from lighthouse_hf import apply_lighthouse, lighthouse_attention, shard_batch
from lighthouse_hf.context_parallel import dense_attention_context_parallel, lighthouse_attention_context_parallel
from lighthouse_hf.dispatch import LighthouseWarning
from lighthouse_hf.ops import dense_causal_attention
from process_ranks import run_rank_processes
from threaded_ranks import run_ranks, shard, unshard

NAMES = ("out", "dq", "dk", "dv")
RANKS_TIMEOUT_S = 120
"""A check's ranks take seconds (a GPU) to tens of seconds (a busy CPU); a hang fails in two minutes."""


class _SumOverRanks(torch.autograd.Function):
    """All-reduce whose backward all-reduces too: a backward that waits on the other ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def collectives_round_trip(world: int, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank r: what an all-gather of every rank's ``[r, r]`` gave, the sum over ranks of
    ``(r + 1) * x`` at ``x = 1``, and x's gradient through a backward that all-reduces (on a GPU it
    hangs unless each rank runs its own backward)."""

    def rank_main(rank: int):
        mine = torch.full((2,), float(rank), device=device)
        gathered = [torch.empty(2, device=device) for _ in range(world)]
        dist.all_gather(gathered, mine)
        x = torch.ones(2, device=device, requires_grad=True)
        total = _SumOverRanks.apply((rank + 1) * x)
        total.sum().backward()
        return torch.stack(gathered).cpu(), total.detach().cpu(), x.grad.cpu()

    return run_ranks(world, rank_main, timeout_s=RANKS_TIMEOUT_S)


def options_arguments(options: dict[str, Any], heads: int, kv_heads: int, seq: int, dim: int, device) -> dict[str, Any]:
    """The op's keyword arguments for ``options``: ``rope`` (span_end with the usual frequencies),
    ``scores`` (given non-negative scores), ``combine`` and ``selection`` as given."""
    generator = torch.Generator().manual_seed(seq + 1)
    arguments = {key: options[key] for key in ("combine", "selection") if key in options}
    if options.get("rope"):
        arguments["rope_inv_freq"] = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).to(device)
    if options.get("scores"):
        arguments["q_scores"] = torch.rand(1, heads, seq, generator=generator).to(device)
        arguments["k_scores"] = torch.rand(1, kv_heads, seq, generator=generator).to(device)
    return arguments


def _split_arguments(arguments: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    """A rank's arguments: its head/tail part of the per-position scores."""
    return {
        name: shard(value, world, rank, dim=2) if name in ("q_scores", "k_scores") else value
        for name, value in arguments.items()
    }


def layer_errors(
    world: int,
    shape: tuple[int, int, int, int],
    settings: dict[str, Any],
    options: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device | str,
    dense: bool = False,
) -> dict[str, Any]:
    """Output and q/k/v gradient errors of the context-parallel op over ``world`` threaded ranks
    against the single-device op on the whole sequence; ``shape`` is (heads, kv_heads, seq,
    head_dim), batch 1. ``dense``: the dense causal op pair instead of Lighthouse."""
    heads, kv_heads, seq, dim = shape
    generator = torch.Generator().manual_seed(seq)
    q, k, v, weight = (
        torch.randn(1, h, seq, dim, generator=generator).to(device) for h in (heads, kv_heads, kv_heads, heads)
    )
    arguments = {} if dense else {**settings, **options_arguments(options, heads, kv_heads, seq, dim, device)}

    def single(dt: torch.dtype) -> list[torch.Tensor]:
        inputs = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = dense_causal_attention(*inputs, None) if dense else lighthouse_attention(*inputs, **arguments)
        grads = torch.autograd.grad((out.float() * weight).sum(), inputs)
        return [out.detach(), *grads]

    def rank_main(rank: int) -> list[torch.Tensor]:
        inputs = [shard(x, world, rank, dim=2).to(dtype).requires_grad_() for x in (q, k, v)]
        if dense:
            out = dense_attention_context_parallel(*inputs)
        else:
            out = lighthouse_attention_context_parallel(*inputs, **_split_arguments(arguments, world, rank))
        grads = torch.autograd.grad((out.float() * shard(weight, world, rank, dim=2)).sum(), inputs)
        return [out.detach(), *grads]

    # One device first: the first kernel launches (and compiles) come from one thread.
    reference = single(dtype)
    truth = reference if dtype == torch.float32 else single(torch.float32)
    parts = run_ranks(world, rank_main, timeout_s=RANKS_TIMEOUT_S)
    context_parallel = [unshard([part[i] for part in parts], dim=2) for i in range(len(NAMES))]
    report: dict[str, Any] = {name: rel_err(mine, theirs) for name, mine, theirs in zip(NAMES, context_parallel, reference)}
    if dtype != torch.float32:
        report["cp_vs_float32"] = {n: rel_err(m, t) for n, m, t in zip(NAMES, context_parallel, truth)}
        report["single_vs_float32"] = {n: rel_err(r, t) for n, r, t in zip(NAMES, reference, truth)}
    return report


def model_errors(world: int, config, lighthouse: dict[str, Any], seq: int, dtype: torch.dtype, device) -> dict[str, Any]:
    """Loss, logits and parameter-gradient errors of a causal LM built from ``config`` (float32
    weights, Lighthouse ``lighthouse`` settings) fed each rank's share of one sequence through
    ``shard_batch``, against the same model on the whole sequence (``dtype``: autocast's)."""
    torch.manual_seed(0)
    model = apply_lighthouse(AutoModelForCausalLM.from_config(config), **lighthouse).to(device)
    replicas = [copy.deepcopy(model) for _ in range(world)]
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def autocast(dt: torch.dtype):
        return torch.autocast(torch.device(device).type, dtype=dt, enabled=dt != torch.float32)

    def single(dt: torch.dtype) -> dict[str, Any]:
        reference = copy.deepcopy(model)
        with autocast(dt):
            out = reference(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in reference.named_parameters()}
        return dict(loss=out.loss.detach().float(), logits=out.logits.detach().float(), grads=grads)

    def rank_main(rank: int) -> dict[str, Any]:
        replica = replicas[rank]
        with autocast(dtype):  # autocast is per thread: each rank enters its own
            out = replica(**shard_batch(replica, {"input_ids": ids, "labels": ids}))
        out.loss.backward()
        return dict(loss=out.loss.detach().float(), logits=out.logits.detach().float())

    reference = single(dtype)  # one device first, as in layer_errors
    truth = reference if dtype == torch.float32 else single(torch.float32)
    parts = run_ranks(world, rank_main, timeout_s=RANKS_TIMEOUT_S)
    # Each rank's loss and gradients are its share of the whole sequence's: their sums are the whole.
    context_parallel = dict(
        loss=sum(part["loss"] for part in parts),
        logits=unshard([part["logits"] for part in parts], dim=1),
        grads={name: sum(replica.get_parameter(name).grad for replica in replicas) for name, _ in model.named_parameters()},
    )
    report = _model_report(context_parallel, reference)
    if dtype != torch.float32:
        report["cp_vs_float32"] = _model_report(context_parallel, truth)
        report["single_vs_float32"] = _model_report(reference, truth)
    return report


def _model_report(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    names = sorted(theirs["grads"])
    flat = [torch.cat([result["grads"][name].double().flatten() for name in names]) for result in (mine, theirs)]
    worst = max(names, key=lambda name: rel_err(mine["grads"][name], theirs["grads"][name]))
    return dict(
        loss=rel_err(mine["loss"], theirs["loss"]),
        logits=rel_err(mine["logits"], theirs["logits"]),
        grads=rel_err(*flat),
        worst_param=worst,
        worst_param_grad=rel_err(mine["grads"][worst], theirs["grads"][worst]),
    )


def layer_eager_and_compiled(
    model, layer, hidden: torch.Tensor, positions: torch.Tensor, world: int, rank: int, backend: str | Callable = "aot_eager"
) -> list[list[torch.Tensor]]:
    """This rank's chunk through a decoder layer under context parallelism, eager and then compiled
    (``fullgraph=True``, ``backend``): for each, the output and the gradient of its float32 squared
    sum with respect to the chunk."""
    local = shard(hidden, world, rank, dim=1).requires_grad_()
    local_positions = shard(positions, world, rank, dim=1)
    position_embeddings = model.model.rotary_emb(local, local_positions)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend=backend)):
        out = fn(local, attention_mask=None, position_ids=local_positions, position_embeddings=position_embeddings,
                 lighthouse_cp_group=dist.group.WORLD)
        out = out[0] if isinstance(out, tuple) else out
        results.append([out.detach(), torch.autograd.grad(out.float().square().sum(), local)[0]])
    return results


COMPILE_TIMEOUT_S = 150
"""A compile check's ranks start, compile their own graphs and run in about 30 s on a 2-core CPU
with aot_eager (inductor compiling the op for the CPU: 110 s); a hang fails in 150 s."""


class GraphRecorder:
    """A ``torch.compile`` backend that compiles every graph dynamo captures with the registered
    backend ``backend`` ("inductor", "aot_eager") and records, per graph, the names of the
    operators it calls, those of its nested graphs (an ``autograd.Function``'s forward and
    backward) included: ``"lighthouse_hf.gather_entries.default"``,
    ``"lighthouse_hf.gloo_all_gather.default"`` (gloo) or ``"_c10d_functional.all_gather_into_tensor"``."""

    def __init__(self, backend: str) -> None:
        self.compile = torch._dynamo.lookup_backend(backend)
        self.graphs: list[set[str]] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append({
            str(node.target)
            for module in graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function"
        })
        return self.compile(graph_module, example_inputs)


def _compiled_report(parts: list[dict[str, Any]], names: tuple[str, ...], dim: int) -> dict[str, Any]:
    eager, compiled = ([unshard([part[run][i] for part in parts], dim=dim) for i in range(len(names))] for run in ("eager", "compiled"))
    return dict(
        compiled_vs_eager={name: rel_err(mine, theirs) for name, mine, theirs in zip(names, compiled, eager)},
        eager=dict(zip(names, eager)),
        graphs=[part["graphs"] for part in parts],
    )


def op_eager_and_compiled(
    world: int, shape: tuple[int, int, int, int], settings: dict[str, Any], dtype: torch.dtype, device: str, backend: str
) -> dict[str, Any]:
    """The context-parallel Lighthouse op (the chunk-local path: a LighthouseWarning, such as the
    gathered fallback's, fails a rank) on ``world`` gloo processes, eager and ``torch.compile(fullgraph=True, backend=backend)``;
    ``shape`` as in :func:`layer_errors`. Returns the compiled op's errors against eager (output
    and q/k/v gradients of the float32 squared sum) and each rank's recorded graphs."""
    heads, kv_heads, seq, dim = shape
    generator = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, h, seq, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    parts = run_rank_processes(world, _op_rank, (world, q, k, v, settings, dtype, device, backend), timeout_s=COMPILE_TIMEOUT_S)
    return _compiled_report(parts, NAMES, dim=2)


def _op_rank(rank: int, world: int, q, k, v, settings, dtype, device, backend) -> dict[str, Any]:
    recorder = GraphRecorder(backend)

    def attention(q, k, v):
        return lighthouse_attention_context_parallel(q, k, v, **settings)

    results: dict[str, Any] = dict(graphs=recorder.graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        for run, fn in (("eager", attention), ("compiled", torch.compile(attention, fullgraph=True, backend=recorder))):
            inputs = [shard(x, world, rank, dim=2).to(device, dtype).requires_grad_() for x in (q, k, v)]
            out = fn(*inputs)
            results[run] = [out.detach(), *torch.autograd.grad(out.float().square().sum(), inputs)]
    return results


def decoder_model(config, lighthouse: dict[str, Any], dtype: torch.dtype, device: str):
    """The causal LM of ``config`` (seeded: the same weights in every process) with Lighthouse
    ``lighthouse`` settings, in ``dtype`` on ``device``."""
    torch.manual_seed(0)
    return apply_lighthouse(AutoModelForCausalLM.from_config(config), **lighthouse).to(device, dtype)


def decoder_layer_eager_and_compiled(
    world: int, config, lighthouse: dict[str, Any], seq: int, dtype: torch.dtype, device: str, backend: str
) -> dict[str, Any]:
    """The first decoder layer of :func:`decoder_model` called with ``lighthouse_cp_group`` on
    ``world`` gloo processes (a LighthouseWarning, such as the gathered fallback's, fails a rank),
    eager and compiled (:func:`layer_eager_and_compiled`): the compiled layer's errors against
    eager (``out``, and ``grad``, the input's gradient), each rank's recorded graphs, and
    ``eager_vs_one_device``: the eager ranks' output against the layer on the whole sequence in
    this process (the ranks did run context parallelism)."""
    hidden = torch.randn(1, seq, config.hidden_size, generator=torch.Generator().manual_seed(4))
    parts = run_rank_processes(world, _layer_rank, (world, config, lighthouse, hidden, dtype, device, backend), timeout_s=COMPILE_TIMEOUT_S)
    report = _compiled_report(parts, ("out", "grad"), dim=1)
    model = decoder_model(config, lighthouse, dtype, device)
    whole, positions = hidden.to(device, dtype), torch.arange(seq, device=device)[None]
    with torch.no_grad():
        out = model.model.layers[0](
            whole, attention_mask=None, position_ids=positions, position_embeddings=model.model.rotary_emb(whole, positions)
        )
    out = out[0] if isinstance(out, tuple) else out
    report["eager_vs_one_device"] = rel_err(report["eager"]["out"], out.cpu())
    return report


def _layer_rank(rank: int, world: int, config, lighthouse, hidden, dtype, device, backend) -> dict[str, Any]:
    recorder = GraphRecorder(backend)
    model = decoder_model(config, lighthouse, dtype, device)
    positions = torch.arange(hidden.shape[1], device=device)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        eager, compiled = layer_eager_and_compiled(model, model.model.layers[0], hidden.to(device, dtype), positions, world, rank, recorder)
    return dict(eager=eager, compiled=compiled, graphs=recorder.graphs)
