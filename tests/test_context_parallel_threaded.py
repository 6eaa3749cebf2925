"""Context parallelism with CP=2 and CP=4 against one device, the ranks as threads of this process
(tests/threaded_ranks.py) on the CPU: the reference branch. tests/test_gpu_context_parallel.py runs
the same checks on one GPU (the CUDA branch, fused kernels).

Lengths: with levels=3, pooling=2, topk=1024 a 6144-token sequence splits into 4 or 8 chunks on
tile boundaries (``chunk_plan``), so both CP=2 and CP=4 take the chunk-local path; 6000 tokens do
not, and take the gathered fallback.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist

from context_parallel_checks import collectives_round_trip, layer_errors, model_errors
from helpers import tiny_config
from lighthouse_hf.context_parallel import chunk_plan
from lighthouse_hf.dispatch import LighthouseWarning
from threaded_ranks import run_ranks, shard, unshard

SEQ = 6144
UNALIGNED_SEQ = 6000
SETTINGS = dict(levels=3, pooling=2, topk=1024)
SHAPE = (2, 1, SEQ, 8)  # heads, kv_heads, seq, head_dim
FP32_TOL = 1e-5
# Where a test expects the chunk-local path, the gathered fallback's warning (raised on a rank) fails it.
NO_FALLBACK = pytest.mark.filterwarnings("error::lighthouse_hf.dispatch.LighthouseWarning")
OPTIONS = dict(rope=True, scores=True, combine="mean")


def test_the_lengths_take_the_paths_the_tests_name():
    for world in (2, 4):
        assert chunk_plan(SEQ, 2 * world, **SETTINGS) is not None
        assert chunk_plan(UNALIGNED_SEQ, 2 * world, **SETTINGS) is None


def test_threaded_ranks_exchange_data_forward_and_backward():
    world = 3
    factors = world * (world + 1) / 2  # sum of rank + 1
    for rank, (gathered, total, grad) in enumerate(collectives_round_trip(world, "cpu")):
        assert torch.equal(gathered, torch.arange(world).float()[:, None].expand(world, 2))
        # every rank's loss is the sum over ranks, so x's gradient on rank r is world * (r + 1)
        assert torch.equal(total, torch.full((2,), factors)) and torch.equal(grad, torch.full((2,), world * (rank + 1.0)))


def test_a_failing_rank_raises_and_wakes_the_others():
    def rank_main(rank):
        if rank == 1:
            raise ValueError("rank one is broken")
        dist.barrier()  # would wait forever for rank 1

    with pytest.raises(RuntimeError, match="rank 1 of 2 failed: ValueError: rank one is broken"):
        run_ranks(2, rank_main, timeout_s=60)


def test_a_stuck_rank_is_a_timeout_not_a_hang():
    def rank_main(rank):
        if rank == 1:
            time.sleep(1.0)  # rank 0 waits for it in the barrier past the timeout
        dist.barrier()

    with pytest.raises(TimeoutError, match="rank0, rank1 still running after 0.2 s"):
        run_ranks(2, rank_main, timeout_s=0.2)


def test_shard_and_unshard_are_the_head_tail_layout():
    x = torch.arange(16).view(1, 16)
    assert shard(x, 2, 0, dim=1).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard(x, 2, 1, dim=1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert torch.equal(unshard([shard(x, 4, rank, dim=1) for rank in range(4)], dim=1), x)


@NO_FALLBACK
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["published", "span_end-scores-mean"])
def test_lighthouse_layer_equals_one_device(world, options):
    report = layer_errors(world, SHAPE, SETTINGS, options, torch.float32, "cpu")
    assert max(report.values()) <= FP32_TOL, report


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "seq, options",
    [(SEQ, dict(selection="causal")), (UNALIGNED_SEQ, OPTIONS)],  # causal: its thresholds cross chunks
    ids=["causal", "unaligned"],
)
def test_gathered_fallback_equals_one_device(world, seq, options):
    with pytest.warns(LighthouseWarning, match="every rank gathers the whole sequence"):
        report = layer_errors(world, (*SHAPE[:2], seq, SHAPE[3]), SETTINGS, options, torch.float32, "cpu")
    assert max(report.values()) <= FP32_TOL, report


@pytest.mark.parametrize("world", [2, 4])
def test_dense_layer_equals_one_device(world):
    report = layer_errors(world, SHAPE, {}, {}, torch.float32, "cpu", dense=True)
    assert max(report.values()) <= FP32_TOL, report


@NO_FALLBACK
@pytest.mark.slow
def test_lighthouse_layer_in_bfloat16_is_as_accurate_as_one_device():
    report = layer_errors(2, SHAPE, SETTINGS, OPTIONS, torch.bfloat16, "cpu")
    for name in ("out", "dq", "dk", "dv"):
        assert report[name] <= 2e-2, report
        assert report["cp_vs_float32"][name] <= 1.25 * report["single_vs_float32"][name] + 5e-3, report


@NO_FALLBACK
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_llama_equals_one_device(world, lighthouse_calls):
    config = tiny_config("llama", max_position_embeddings=SEQ)
    report = model_errors(world, config, dict(SETTINGS, dense_layers=[0]), SEQ, torch.float32, "cpu")
    assert max(report["loss"], report["logits"], report["grads"]) <= FP32_TOL, report
    assert report["worst_param_grad"] <= 1e-4, report
    # two Lighthouse layers per rank ran context-parallel, none single-device but the reference's two
    assert (lighthouse_calls.context_parallel, lighthouse_calls.single_device) == (2 * world, 2)


@NO_FALLBACK
@pytest.mark.slow
def test_qwen3_with_method_options_equals_one_device():
    """span_end rotary pooling, mean combine and pre-norm scores (recorded by Qwen3's q/k norm
    hooks on each rank's part of the sequence) through the model."""
    config = tiny_config("qwen3", max_position_embeddings=SEQ)
    lighthouse = dict(SETTINGS, dense_layers=[0], rope="span_end", combine="mean", scores="pre_norm")
    report = model_errors(2, config, lighthouse, SEQ, torch.float32, "cpu")
    assert max(report["loss"], report["logits"], report["grads"]) <= FP32_TOL, report


def test_packed_position_ids_under_context_parallelism_are_refused():
    # Positions that restart mark packed documents, which the split's own head/tail jump would hide:
    # given past shard_batch's check, the model must refuse them rather than attend across documents.
    from transformers import AutoModelForCausalLM

    from lighthouse_hf import apply_lighthouse, shard_batch

    model = apply_lighthouse(AutoModelForCausalLM.from_config(tiny_config("llama")), **SETTINGS, dense_layers=[0])
    replicas = [model, copy.deepcopy(model)]
    ids = torch.randint(0, 128, (1, SEQ))
    two_documents = torch.arange(SEQ // 2).repeat(2)[None]

    def rank_main(rank: int) -> str:
        batch = shard_batch(replicas[rank], {"input_ids": ids})
        batch["position_ids"] = shard(two_documents, 2, rank, dim=1)
        with pytest.raises(ValueError, match="position_ids under context parallelism must be each rank's head and tail"):
            replicas[rank](**batch)
        return "refused"

    assert run_ranks(2, rank_main) == ["refused", "refused"]


def test_context_parallel_ops_check_their_inputs():
    from lighthouse_hf.context_parallel import dense_attention_context_parallel, lighthouse_attention_context_parallel

    q = torch.randn(1, 4, 64, 8)
    kv = torch.randn(1, 2, 64, 8)

    def rank_main(rank: int) -> str:
        for op in (dense_attention_context_parallel, lighthouse_attention_context_parallel):
            with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k's kv_heads \(3\)"):
                op(q, kv.repeat(1, 2, 1, 1)[:, :3], kv.repeat(1, 2, 1, 1)[:, :3])
            with pytest.raises(ValueError, match="k must be"):
                op(q, kv[:, :, :32], kv[:, :, :32])
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got -1"):
            dense_attention_context_parallel(q, kv, kv, dropout=-1)
        return "checked"

    assert run_ranks(2, rank_main) == ["checked", "checked"]
