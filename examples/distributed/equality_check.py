"""Context parallelism equals one device: a Lighthouse layer, a small Llama, and the Llama under FSDP2.

Every rank computes the single-device result on the whole sequence, then its head/tail part of
the context-parallel result, and compares outputs and gradients (relative error of the norm).
float32 must agree within 1e-5; bfloat16 within ``--bf16-tol`` (its rounding differs between the
paths, so the report also gives both paths' errors against float32).

    torchrun --nproc-per-node 2 examples/distributed/equality_check.py --out DIR [--preset gpu|cpu]

Writes ``DIR/equality_rank{N}.json``; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
import torch.distributed as dist
from collections import Counter

import lighthouse_hf.context_parallel as cp_module
from common import init_distributed, llama, rel_err, write_json

from lighthouse_hf import lighthouse_attention
from lighthouse_hf.context_parallel import (
    chunk_plan,
    dense_attention_context_parallel,
    lighthouse_attention_context_parallel,
    shard_sequence,
)
from lighthouse_hf.distributed import shard_batch
from lighthouse_hf.dispatch import LighthouseWarning
from lighthouse_hf.ops import dense_causal_attention

FP32_TOL = 1e-5

PRESETS = {
    # layer: (seq, heads, kv heads, head dim, settings); unaligned: a length whose chunks miss tiles;
    # model: per dtype, (size, seq, settings)
    "gpu": dict(
        layer=(32768, 8, 2, 64, dict(levels=3, pooling=4, topk=2048)),
        unaligned=(40000, 8, 2, 64, dict(levels=3, pooling=4, topk=2048)),
        model=dict(
            # float32 at 16K, not 32K, for its single-GPU reference: without a mask Transformers
            # calls SDPA with enable_gqa=True, which float32 runs only in the math kernel, with score
            # and softmax matrices of 8 heads x S x S x 4 bytes. At 32K that is 32 GiB per matrix:
            # the two dense layers keep 64 GiB of softmax for backward and the second one's forward
            # and backward hold two or three matrices more, past the H200's 141 GB (it ran out of
            # memory). At 16K, 8 GiB per matrix, about 40 GiB at the peak. topk=1024 keeps 16K's
            # chunks on tile boundaries for 2 and 4 ranks: still the chunk-local path.
            float32=("small", 16384, dict(levels=3, pooling=4, topk=1024, dense_layers=[0, -1])),
            # bfloat16 takes the flash kernel (linear memory): the defaults at 32K.
            bfloat16=("small", 32768, dict(levels=3, pooling=4, topk=2048, dense_layers=[0, -1])),
        ),
        dtypes=("float32", "bfloat16"),
    ),
    "cpu": dict(
        layer=(8192, 2, 1, 8, dict(levels=3, pooling=4, topk=512)),
        unaligned=(6000, 2, 2, 8, dict(levels=3, pooling=4, topk=256)),
        model=dict(
            float32=("tiny", 8192, dict(levels=3, pooling=4, topk=512, dense_layers=[0])),
            bfloat16=("tiny", 8192, dict(levels=3, pooling=4, topk=512, dense_layers=[0])),
        ),
        dtypes=("float32",),
    ),
}


def random_inputs(shapes, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(device, dtype) for shape in shapes]


def layer_errors(op, cp_op, seq, heads, kv_heads, dim, settings, dtype, device, group):
    """Output and q/k/v gradient errors of ``cp_op`` on this rank's chunks against ``op`` on the
    whole sequence, plus both against the float32 result."""
    shapes = [(1, heads, seq, dim), (1, kv_heads, seq, dim), (1, kv_heads, seq, dim), (1, heads, seq, dim)]
    q, k, v, weight = random_inputs(shapes, device, torch.float32)

    def single(dt):
        full = [x.to(dt).clone().requires_grad_() for x in (q, k, v)]
        out = op(*full, **settings)
        (out.float() * weight).sum().backward()
        return [out] + [x.grad for x in full]

    truth = single(torch.float32)
    reference = truth if dtype == torch.float32 else single(dtype)
    local = [shard_sequence(x, group, dim=2).to(dtype).requires_grad_() for x in (q, k, v)]
    out = cp_op(*local, group=group, **settings)
    (out.float() * shard_sequence(weight, group, dim=2)).sum().backward()
    mine = [out] + [x.grad for x in local]
    names = ("out", "dq", "dk", "dv")
    report = {name: rel_err(m, shard_sequence(r, group, dim=2)) for name, m, r in zip(names, mine, reference)}
    if dtype != torch.float32:
        report["cp_vs_float32"] = {n: rel_err(m, shard_sequence(t, group, dim=2)) for n, m, t in zip(names, mine, truth)}
        report["single_vs_float32"] = {n: rel_err(r, t) for n, r, t in zip(names, reference, truth)}
    return report


def model_errors(size, seq, settings, dtype, device, group, world):
    """Loss, logits and parameter-gradient errors of a Llama fed this rank's share of one sequence
    (plain and under FSDP2 over the same ranks) against the model on the whole sequence."""
    model = llama(size, seq, settings).to(device)
    reference_model = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with autocast:
        full = reference_model(input_ids=ids, labels=ids)
    full.loss.backward()
    grads = {name: p.grad for name, p in reference_model.named_parameters()}

    batch = shard_batch(model, {"input_ids": ids, "labels": ids}, group)
    CALLS.clear()
    with autocast:
        out = model(**batch)
    paths = dict(CALLS)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    report = {
        "paths": paths,
        "loss_single": full.loss.item(),
        "loss_cp": loss.item(),
        "loss": rel_err(loss, full.loss),
        "logits": rel_err(out.logits, shard_sequence(full.logits, group, dim=1)),
        "grads": _grad_error({n: p.grad for n, p in model.named_parameters()}, grads),
    }

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = llama(size, seq, settings).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    with autocast:
        fsdp_out = sharded(**batch)
    (fsdp_out.loss * world).backward()  # FSDP2 averages gradients over the ranks
    report["fsdp2_grads"] = _grad_error({n: p.grad.full_tensor() for n, p in sharded.named_parameters()}, grads)
    return report


CALLS: Counter = Counter()
"""Calls of the context-parallel ops, by name: which path each layer of the model took."""


def _count_calls(name: str) -> None:
    original = getattr(cp_module, name)

    def counted(*args, **kwargs):
        CALLS[name] += 1
        return original(*args, **kwargs)

    setattr(cp_module, name, counted)


def _grad_error(mine: dict, theirs: dict) -> dict:
    names = sorted(theirs)
    flat_mine = torch.cat([mine[n].double().flatten() for n in names])
    flat_theirs = torch.cat([theirs[n].double().flatten() for n in names])
    worst = max(names, key=lambda n: rel_err(mine[n], theirs[n]))
    return {"all": rel_err(flat_mine, flat_theirs), "worst_param": worst, "worst": rel_err(mine[worst], theirs[worst])}


def _max_error(report) -> float:
    if isinstance(report, dict):
        informative = ("cp_vs_float32", "single_vs_float32", "loss_single", "loss_cp", "worst", "paths")
        return max((_max_error(v) for k, v in report.items() if k not in informative), default=0.0)
    return report if isinstance(report, float) else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16-tol", type=float, default=2e-2)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], help="default: the preset's")
    args = parser.parse_args()
    rank, world, device = init_distributed()
    for name in ("lighthouse_attention_context_parallel", "dense_attention_context_parallel"):
        _count_calls(name)
    group = dist.group.WORLD
    preset = PRESETS[args.preset]
    results: dict = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    failures = []
    for dtype_name in args.dtypes or preset["dtypes"]:
        dtype = getattr(torch, dtype_name)
        tol = FP32_TOL if dtype == torch.float32 else args.bf16_tol
        seq, heads, kv_heads, dim, settings = preset["layer"]
        _, model_seq, model_settings = preset["model"][dtype_name]
        for length, chosen in ((seq, settings), (model_seq, model_settings)):  # the chunk-local path, not the fallback
            assert chunk_plan(length, 2 * world, chosen["levels"], chosen["pooling"], chosen["topk"]) is not None
        checks = {
            "lighthouse_layer": lambda: layer_errors(
                lighthouse_attention, lighthouse_attention_context_parallel, seq, heads, kv_heads, dim, settings, dtype, device, group
            ),
            "dense_layer": lambda: layer_errors(
                lambda q, k, v: dense_causal_attention(q, k, v, None),
                lambda q, k, v, group: dense_attention_context_parallel(q, k, v, group=group),
                seq, heads, kv_heads, dim, {}, dtype, device, group,
            ),
            "unaligned_layer": lambda: _expect_fallback(
                lambda: layer_errors(
                    lighthouse_attention, lighthouse_attention_context_parallel, *preset["unaligned"], dtype, device, group
                )
            ),
            "llama": lambda: model_errors(*preset["model"][dtype_name], dtype, device, group, world),
        }
        for name, check in checks.items():
            key = f"{name}/{dtype_name}"
            start = time.perf_counter()
            try:
                report = check()
                report["passed"] = _max_error(report) <= tol and _paths_ok(report)
            except Exception as error:  # one failing check must not hide the others
                report = {"passed": False, "error": f"{type(error).__name__}: {error}"}
            report["seconds"] = round(time.perf_counter() - start, 2)
            results[key] = report
            if not report["passed"]:
                failures.append(key)
            if rank == 0:
                print(f"{key}: {report}", flush=True)
            write_json(f"{args.out}/equality_rank{rank}.json", results)
    results["failures"] = failures
    write_json(f"{args.out}/equality_rank{rank}.json", results)
    dist.destroy_process_group()
    return 1 if failures else 0


def _paths_ok(report: dict) -> bool:
    """A model check counts only if its Lighthouse and its dense layers both ran context-parallel."""
    paths = report.get("paths")
    names = ("lighthouse_attention_context_parallel", "dense_attention_context_parallel")
    return paths is None or all(paths.get(name, 0) > 0 for name in names)


def _expect_fallback(check):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LighthouseWarning)
        report = check()
    report["gathered_fallback"] = any(issubclass(w.category, LighthouseWarning) for w in caught)
    if not report["gathered_fallback"]:
        raise AssertionError("expected the gathered fallback's LighthouseWarning")
    return report


if __name__ == "__main__":
    sys.exit(main())
