"""The gloo-process ranks of tests/process_ranks.py (what the compile checks run on), and the
compile checks of tests/context_parallel_checks.py on the CPU with aot_eager: the reference branch,
its collectives inside the one graph. tests/test_gpu_context_parallel.py runs the same checks on
one GPU (the CUDA branch; inductor for the op)."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch
import torch.distributed as dist

from context_parallel_checks import decoder_layer_eager_and_compiled, op_eager_and_compiled
from helpers import tiny_config
from lighthouse_hf.context_parallel import chunk_plan, shard_sequence, unshard_sequence
from process_ranks import run_rank_processes

SEQ = 6144  # splits on tile boundaries into 4 chunks with these settings: the chunk-local path
SETTINGS = dict(levels=3, pooling=2, topk=1024)
FP32_TOL = 1e-5


def _gather_ranks(rank: int, scale: float) -> torch.Tensor:
    gathered = torch.empty(dist.get_world_size())
    dist.all_gather_into_tensor(gathered, torch.tensor([scale * rank]))
    return gathered


def _compiled_unshard(rank: int, world: int) -> torch.Tensor:
    full = torch.arange(2 * 4 * world * 3, dtype=torch.float32).reshape(2, 4 * world, 3)
    local = shard_sequence(full, dim=1).requires_grad_()  # a part of the model's graph, as in training
    unshard = torch.compile(lambda x: unshard_sequence(x * 2.0, dim=1), fullgraph=True, backend="aot_eager")
    return unshard(local) - 2.0 * full


def _rank_one_fails(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # would wait for rank 1 until the group's timeout


def _rank_one_crashes(rank: int) -> None:
    if rank == 1:
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a crash inside a collective would
    dist.barrier()


def _rank_one_sleeps(rank: int) -> None:
    if rank == 1:
        time.sleep(60.0)
    dist.barrier()


@pytest.mark.slow
def test_process_ranks_exchange_data_and_return_in_rank_order():
    results = run_rank_processes(3, _gather_ranks, (2.0,), timeout_s=120)
    assert [result.tolist() for result in results] == [[0.0, 2.0, 4.0]] * 3


@pytest.mark.slow
def test_unshard_sequence_compiles_on_an_input_that_requires_grad():
    # It gathers the detached values (it is not differentiable): the opaque gloo all-gather has no
    # gradient formula for autograd to trace through.
    for difference in run_rank_processes(2, _compiled_unshard, (2,), timeout_s=120):
        assert torch.equal(difference, torch.zeros_like(difference))


@pytest.mark.slow
def test_a_failing_process_rank_raises_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed: .*ValueError: rank one is broken"):
        run_rank_processes(2, _rank_one_fails, timeout_s=120)
    assert time.monotonic() - start < 60  # not the timeout: rank 0, stuck in the barrier, was stopped


@pytest.mark.slow
def test_a_crashed_process_rank_names_the_signal_and_where_it_was():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed: Fatal Python error: Segmentation fault.*in _rank_one_crashes"):
        run_rank_processes(2, _rank_one_crashes, timeout_s=120)


@pytest.mark.slow
def test_a_stuck_process_rank_is_a_timeout_not_a_hang():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="rank0, rank1 still running after 10 s"):
        run_rank_processes(2, _rank_one_sleeps, timeout_s=10)
    assert time.monotonic() - start < 40


def _assert_one_graph_on_the_reference_branch(graphs):
    for rank_graphs in graphs:
        assert len(rank_graphs) == 1, rank_graphs
        (graph,) = rank_graphs
        # gloo's collectives stay opaque in compiled code (lighthouse_hf.context_parallel says why)
        assert {"lighthouse_hf.gloo_all_gather.default", "lighthouse_hf.gloo_all_reduce.default"} <= graph, graph
        assert not any(name.startswith("_c10d_functional.") for name in graph), graph
        assert not any(name.startswith(("lighthouse_hf.select", "lighthouse_hf.gather", "lighthouse_hf.scatter")) for name in graph), graph  # no fused kernels on a CPU


@pytest.mark.slow
def test_context_parallel_op_compiles_as_one_graph_on_processes():
    assert chunk_plan(SEQ, 4, **SETTINGS) is not None
    # GQA over two KV heads: the compiled op's collectives gather every KV head's chunks
    report = op_eager_and_compiled(2, (4, 2, SEQ, 8), SETTINGS, torch.float32, "cpu", "aot_eager")
    assert max(report["compiled_vs_eager"].values()) <= FP32_TOL, report["compiled_vs_eager"]
    _assert_one_graph_on_the_reference_branch(report["graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("dense", [False, True], ids=["lighthouse_layer", "dense_layer"])
def test_decoder_layer_compiles_as_one_graph_on_processes(dense):
    config = tiny_config("llama", max_position_embeddings=SEQ)
    lighthouse = dict(SETTINGS, dense_layers=[0] if dense else [])
    report = decoder_layer_eager_and_compiled(2, config, lighthouse, SEQ, torch.float32, "cpu", "aot_eager")
    assert max(report["compiled_vs_eager"].values()) <= FP32_TOL, report["compiled_vs_eager"]
    assert report["eager_vs_one_device"] <= FP32_TOL, report["eager_vs_one_device"]
    _assert_one_graph_on_the_reference_branch(report["graphs"])
