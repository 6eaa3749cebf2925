"""Multi-process training with Lighthouse: context parallelism through the model and Trainer, DDP
with checkpoints, resume and export. On a CPU the processes talk over gloo; the tests marked
``gpu`` run the same scripts on two GPUs (NCCL) with larger sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lighthouse_hf import ContextParallelTrainer, shard_batch
from lighthouse_hf.context_parallel import shard_sequence, unshard_sequence
from helpers import count_lighthouse_calls, free_port
from process_ranks import run_rank_processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "distributed"

WORLD = 2
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def torchrun(script: str, *args: str, nproc: int = WORLD, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(SCRIPTS / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture
def distributed_examples(monkeypatch) -> None:
    """examples/distributed on sys.path for this test and the processes it spawns (which copy the
    parent's sys.path): its scripts import one another as plain modules."""
    monkeypatch.syspath_prepend(str(SCRIPTS))


@pytest.mark.slow
def test_equality_script_two_processes_equal_one(tmp_path):
    """A Lighthouse layer, a dense layer, the gathered fallback, a tiny Llama (loss, logits,
    gradients) and the Llama under FSDP2: context parallelism over two gloo ranks equals one process."""
    assert_ran(torchrun("equality_check.py", "--out", str(tmp_path), "--preset", "cpu", "--dtypes", "float32"))
    report = json.loads((tmp_path / "equality_rank0.json").read_text())
    assert report["failures"] == []
    llama_report = report["llama/float32"]
    assert llama_report["loss"] <= 1e-5 and llama_report["grads"]["all"] <= 1e-5 and llama_report["fsdp2_grads"]["all"] <= 1e-5
    assert llama_report["paths"] == {"dense_attention_context_parallel": 1, "lighthouse_attention_context_parallel": 2}
    assert report["unaligned_layer/float32"]["gathered_fallback"]


@pytest.mark.slow
def test_trainer_ddp_recovery_checkpoints_resume_export(tmp_path):
    """DDP on gloo: both ranks switch to dense at the same step, a resumed run repeats the
    uninterrupted one, and the result exports as a plain checkpoint."""
    assert_ran(torchrun("trainer_check.py", "--mode", "ddp", "--out", str(tmp_path), "--preset", "cpu"))
    report = json.loads((tmp_path / "trainer_ddp.json").read_text())
    assert report["failures"] == [] and report["world"] == WORLD
    assert report["ranks"][0]["implementations"] == report["ranks"][1]["implementations"] == ["lighthouse"] * 3 + ["sdpa"]
    assert report["ranks"][0]["export"]["verified"]


def _trainer_worker(rank: int, out: str) -> None:
    # The group is process_ranks' (which also spares a finished rank the interpreter's teardown);
    # Accelerate takes an initialized group as it is, and these variables tell it the run is distributed.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from accelerate.parallelism_config import ParallelismConfig
    from common import llama
    from trainer_check import RandomBlocks
    from transformers import TrainingArguments

    seq, settings = 8192, dict(levels=3, pooling=4, topk=512, dense_layers=[0])
    model = llama("tiny", seq, settings)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = RandomBlocks(1, seq, model.config.vocab_size)
    with pytest.MonkeyPatch.context() as patch:
        # Accelerate accepts ParallelismConfig only for GPU processes (_validate_accelerator refuses
        # MULTI_CPU); lifting that check runs the same Trainer code path over gloo, with DDP in place of FSDP2.
        patch.setattr(ParallelismConfig, "_validate_accelerator", lambda self, accelerator: None)
        args = TrainingArguments(
            output_dir=out, max_steps=1, per_device_train_batch_size=1, learning_rate=1e-3, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, ddp_backend="gloo",
            dataloader_num_workers=0, parallelism_config=ParallelismConfig(cp_size=WORLD),
        )
        trainer = ContextParallelTrainer(model=model, args=args, train_dataset=data)
        calls = count_lighthouse_calls(patch.setattr)
        trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)

    reference = llama("tiny", seq, settings)
    reference.load_state_dict(initial)
    ids = data[0]["input_ids"][None]
    loss = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
    assert calls.context_parallel, "the Lighthouse layers did not run context-parallel"
    assert calls.single_device == 0, "a Lighthouse layer ran on the whole sequence in one process"
    assert abs(logged["loss"] - loss.item()) <= 1e-5 * loss.item()
    assert abs(logged["grad_norm"] - grad_norm) <= 1e-4 * grad_norm
    _check_shard_batch(rank)


@pytest.mark.slow
def test_context_parallel_trainer_equals_one_process(tmp_path, distributed_examples):
    """ContextParallelTrainer: the first step's loss and gradient norm over two ranks equal a single
    process's on the whole sequence. The same processes then check shard_batch's layout and errors."""
    run_rank_processes(WORLD, _trainer_worker, args=(str(tmp_path),))


def _check_shard_batch(rank: int) -> None:
    """shard_batch on two ranks: the head/tail layout, shifted labels, and a ValueError for each bad input."""
    from common import llama

    model = llama("tiny", 64, dict(topk=128, dense_layers=[]))
    ids = torch.arange(2 * 8).view(2, 8)
    sharded = shard_batch(model, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    # rank 0 holds chunks 0 and 3 of four, rank 1 chunks 1 and 2
    chunks = [[0, 1, 6, 7], [2, 3, 4, 5]][rank]
    assert sharded["position_ids"].tolist() == [chunks, chunks]
    assert sharded["input_ids"].tolist() == [chunks, [8 + c for c in chunks]]
    shifted = [c + 1 if c < 7 else -100 for c in chunks]
    assert sharded["shift_labels"].tolist() == [shifted, [8 + s if s >= 0 else -100 for s in shifted]]
    assert sharded["num_items_in_batch"].item() == 14
    assert sharded["lighthouse_cp_group"] is dist.group.WORLD and "attention_mask" not in sharded
    assert torch.equal(unshard_sequence(shard_sequence(ids)), ids)

    padded = torch.ones_like(ids)
    padded[0, -1] = 0
    bad = [
        ({"input_ids": ids, "attention_mask": padded}, "attention_mask must be all ones"),
        ({"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])}, "packed documents"),
        ({"input_ids": ids[:, :6]}, r"multiple of 2 \* group size"),
        ({"input_ids": ids, "token_type_ids": ids}, "cannot split batch keys"),
        ({"labels": ids}, "input_ids or inputs_embeds"),
        ({"input_ids": ids[0]}, r"must be \[batch, seq, ...\], got shape \(8,\)"),
        ({"input_ids": ids, "labels": ids[:, :4]}, r"labels must start with input_ids' \[batch, seq\] = \[2, 8\], got shape \(2, 4\)"),
    ]
    for batch, message in bad:
        with pytest.raises(ValueError, match=message):
            shard_batch(model, batch)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match='attn_implementation="lighthouse"'):
        shard_batch(model, {"input_ids": ids})


@pytest.mark.gpu
@pytest.mark.slow
@TWO_GPUS
def test_gpu_equality(tmp_path):
    assert_ran(torchrun("equality_check.py", "--out", str(tmp_path), "--preset", "gpu"))
    assert json.loads((tmp_path / "equality_rank0.json").read_text())["failures"] == []


@pytest.mark.gpu
@pytest.mark.slow
@TWO_GPUS
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "cp"])
def test_gpu_trainer(tmp_path, mode):
    assert_ran(torchrun("trainer_check.py", "--mode", mode, "--out", str(tmp_path), "--preset", "gpu"))
    assert json.loads((tmp_path / f"trainer_{mode}.json").read_text())["failures"] == []
