"""Training throughput and peak memory per GPU with Lighthouse on one GPU or one sequence split
across GPUs (context parallelism), and the longest sequence that trains.

The model is a 156M-parameter Llama (``common.MODELS["bench"]``: 8 layers, hidden 1024, 16 heads
of 64, 4 KV heads, vocabulary 32000) with float32 weights, bfloat16 autocast, activation
checkpointing, AdamW, and a cross-entropy computed in 16K-token chunks (so the logits do not
dominate the memory). A step is forward, backward, the sum of the gradients over the ranks (context
parallelism) and an optimizer step.

* Throughput: the paper's recipe (L=3, p=4, K=2048, layers 0, 1, -2, -1 dense) at ``--lengths``;
  tokens/s counts the whole sequence once per step.
* Longest sequence (``--search``): peak memory is linear in S, so the two throughput lengths
  predict the longest that fits; steps at the prediction (88%, then 96% of the GPU's memory)
  confirm it. These steps make every layer Lighthouse: dense layers cost O(S^2) time (their
  memory is O(S), like the rest), which would take minutes per step at millions of tokens.

    torchrun --nproc-per-node 1 examples/distributed/bench_cp.py --out DIR --search
    torchrun --nproc-per-node 2 examples/distributed/bench_cp.py --out DIR --search

Writes ``DIR/bench_world{N}.json`` after every measurement.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import MODELS, init_distributed, llama, peak_memory_gib, write_json
from torch.utils.checkpoint import checkpoint

from lighthouse_hf.distributed import IGNORE_INDEX, shard_batch
from lighthouse_hf.context_parallel import CONTEXT_PARALLEL_KWARG
from lighthouse_hf.training import enable_activation_checkpointing

PAPER = dict(levels=3, pooling=4, topk=2048)
LOSS_CHUNK = 16384
UNIT = 131072  # search granularity: chunks of a 2-rank split then fall on tiles


def _ce_sum(weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class Runner:
    def __init__(self, size: str, settings: dict, max_len: int, device: torch.device, world: int) -> None:
        self.device, self.world = device, world
        self.model = llama(size, max_len, settings).to(device)
        self.model.config.use_cache = False
        enable_activation_checkpointing(self.model, {"use_reentrant": False})
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(self, seq_len: int) -> None:
        ids = torch.randint(0, self.model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
        ids = ids.to(self.device)
        if self.world > 1:
            batch = shard_batch(self.model, {"input_ids": ids, "labels": ids})
        else:
            shift = F.pad(ids, (0, 1), value=IGNORE_INDEX)[:, 1:]
            batch = {"input_ids": ids, "position_ids": torch.arange(seq_len, device=self.device)[None], "shift_labels": shift}
        inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
        if self.world > 1:
            inputs[CONTEXT_PARALLEL_KWARG] = batch[CONTEXT_PARALLEL_KWARG]
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            hidden = self.model.model(**inputs).last_hidden_state
            loss = hidden.new_zeros((), dtype=torch.float32)
            for h, y in zip(hidden.split(LOSS_CHUNK, dim=1), batch["shift_labels"].split(LOSS_CHUNK, dim=1)):
                loss = loss + checkpoint(_ce_sum, self.model.lm_head.weight, h, y, use_reentrant=False)
        (loss / (seq_len - 1)).backward()
        if self.world > 1:
            for p in self.model.parameters():
                dist.all_reduce(p.grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, seq_len: int, steps: int) -> dict:
        self.step(seq_len)  # warm-up: kernels compile, the optimizer allocates its state
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(seq_len)
        self._sync()
        seconds = (time.perf_counter() - start) / steps
        return dict(seq_len=seq_len, step_s=round(seconds, 4), tokens_per_s=round(seq_len / seconds, 1))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _all_ranks(value: float | None) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _attempt(runner: Runner, seq_len: int) -> dict:
    """One step at ``seq_len``; a failure on any rank is a failed attempt for all."""
    reset_peak(runner.device)
    ok = torch.ones((), device=runner.device)
    error = None
    try:
        runner.step(seq_len)
        runner._sync()
    except Exception as failure:  # out of memory, or a kernel that does not build at this length
        ok.zero_()
        error = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        runner.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return dict(seq_len=seq_len, trained=bool(ok.item()), peak_gib=_all_ranks(peak_memory_gib(runner.device)), error=error)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up step)")
    parser.add_argument("--search", action="store_true", help="also find the longest sequence that trains")
    parser.add_argument("--model", choices=sorted(MODELS), default="bench", help="a smaller one for a quick try on a CPU")
    args = parser.parse_args()
    rank, world, device = init_distributed(timeout_s=180)
    path = f"{args.out}/bench_world{world}.json"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = dict(world=world, model=args.model, device=name, throughput=[])

    def save() -> None:
        if rank == 0:
            write_json(path, results)
            print(results, flush=True)

    runner = Runner(args.model, dict(PAPER), max(args.lengths), device, world)
    for seq_len in args.lengths:
        reset_peak(device)
        try:
            entry = runner.timed(seq_len, args.steps)
        except torch.OutOfMemoryError as oom:
            entry = dict(seq_len=seq_len, error=str(oom).splitlines()[0])
        entry["peak_gib_per_gpu"] = _all_ranks(peak_memory_gib(device))
        results["throughput"].append(entry)
        save()
    del runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fit = [(e["seq_len"], max(e["peak_gib_per_gpu"])) for e in results["throughput"] if "error" not in e and device.type == "cuda"]
    if args.search and len(fit) >= 2:
        (s1, m1), (s2, m2) = fit[0], fit[-1]
        per_token = (m2 - m1) / (s2 - s1)
        capacity = torch.cuda.mem_get_info(device)[1] / 2**30
        search = results["search"] = dict(
            capacity_gib=round(capacity, 2), gib_per_million_tokens=round(per_token * 2**20, 3), attempts=[]
        )
        runner = Runner(args.model, dict(PAPER, dense_layers=[]), 1 << 24, device, world)
        for fraction in (0.88, 0.96):
            seq_len = int((fraction * capacity - (m1 - per_token * s1)) / per_token) // UNIT * UNIT
            search["attempts"].append(_attempt(runner, seq_len))
            search["longest_trained"] = max([s2] + [a["seq_len"] for a in search["attempts"] if a["trained"]])
            save()
            if not search["attempts"][-1]["trained"]:
                break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
