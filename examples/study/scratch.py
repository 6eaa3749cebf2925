"""Track A of the decisive study: pre-training from scratch where attention dominates.

    python examples/study/scratch.py --data .study-data --arm published --seed 0
    python examples/study/scratch.py --data .study-data --calibrate 4

A Llama of hidden size 512 with 12 layers of 4 heads of 128 (tied embeddings, chunked cross
entropy) at 64K context; Lighthouse on every layer but the first and the last, L=3 p=4 K=1024.
About 10% of the training sequences carry a span repeated at least 16K positions later, so that
copying can form. ``PLAN.md`` says why, and what would confirm or refute the promise;
``tracks.py`` holds the arms, the schedule and what each run writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import tracks
from study import Corpus

DEFAULTS = dict(
    out=Path(__file__).resolve().parent / "results" / "scratch",
    steps=360,
    learning_rate=1e-3,
    warmup=36,
    dense_layers=[0, -1],
    passkey_rate=0.05,
)
REPEAT_RATE = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tracks.add_arguments(parser, DEFAULTS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=2048)
    args = parser.parse_args(argv)
    tracks.check_arguments(parser, args)
    return args


def build_model(args: argparse.Namespace):
    """The same initialization for every arm of a seed."""
    meta = Corpus.load(args.data).meta
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.seq_len,
        # Llama 3's base keeps 64K positions apart in the slowest rotary frequencies.
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=meta["eos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["eos_token_id"],
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Position buckets: the first and the last half of each window, and the last eighth.
    edges = [1, args.seq_len // 2, 7 * args.seq_len // 8, args.seq_len]
    return tracks.run("scratch", args, build_model, edges, args.seq_len // 2, REPEAT_RATE)


if __name__ == "__main__":
    main()
