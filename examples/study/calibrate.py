"""Time a few optimizer steps of the study's model with each attention setting, before the arms.

    python examples/study/calibrate.py --data .study-data --out calibration.json

Each setting gets one untimed step (kernel compilation, cuDNN plans), then ``--steps`` timed
steps shaped like the study's (bf16 autocast, micro-batches of one sequence, fused AdamW), and the
peak GPU memory; also the time of one dense evaluation forward. The step times fix the token
budget that lets the dense arm, its evaluations included, finish inside one 10-minute command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lighthouse_hf
from study import Corpus, build_model, synchronize

SETTINGS = {
    "dense": None,
    "L3 p4 K512, dense 0 1 -2 -1": dict(levels=3, pooling=4, topk=512, dense_layers=[0, 1, -2, -1]),
    "L3 p4 K1024, dense 0 1 -2 -1": dict(levels=3, pooling=4, topk=1024, dense_layers=[0, 1, -2, -1]),
    "L3 p4 K512, dense 0 -1": dict(levels=3, pooling=4, topk=512, dense_layers=[0, -1]),
}


def compressed_length(seq_len: int, settings: dict | None) -> int:
    if settings is None:
        return seq_len
    return lighthouse_hf.compressed_length(seq_len, levels=settings["levels"], pooling=settings["pooling"], topk=settings["topk"])


def time_steps(model, blocks: torch.Tensor, steps: int, grad_accum: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for step in range(steps + 1):
        synchronize()
        started = time.perf_counter()
        for micro in range(grad_accum):
            ids = blocks[(step * grad_accum + micro) % len(blocks)][None]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step:  # the first step compiles and plans
            times.append(time.perf_counter() - started)
    return times


@torch.no_grad()
def time_eval(model, blocks: torch.Tensor, repeats: int = 3) -> float:
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=blocks[0][None])
        synchronize()
        started = time.perf_counter()
        for i in range(repeats):
            model(input_ids=blocks[i % len(blocks)][None]).logits[0, :-1].float()
        synchronize()
    model.train()
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args(argv)
    corpus = Corpus.load(args.data)
    blocks = torch.from_numpy(corpus.train_blocks(args.seq_len)[:8]).cuda()
    results = {"device": torch.cuda.get_device_name(), "seq_len": args.seq_len, "settings": {}}
    for name, settings in SETTINGS.items():
        model = build_model(corpus.meta["vocab_size"], args.seq_len, corpus.meta["eos_token_id"], 0, 512, 12, 8, 2048).cuda()
        if settings:
            lighthouse_hf.apply_lighthouse(model, **settings)
        torch.cuda.reset_peak_memory_stats()
        times = time_steps(model, blocks, args.steps, args.grad_accum)
        entry = dict(
            step_seconds=sorted(times)[len(times) // 2],
            tokens_per_s=args.grad_accum * args.seq_len / (sorted(times)[len(times) // 2]),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
            eval_forward_seconds=time_eval(model, blocks),
            compressed_length=compressed_length(args.seq_len, settings),
        )
        results["settings"][name] = entry
        print(f"{name}: {entry}", flush=True)
        del model
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
