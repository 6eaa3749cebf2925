"""Lighthouse attention in a Transformers model, end to end on a CPU in about a minute.

Builds a tiny 2-layer Llama, saves it, loads it back with attn_implementation="lighthouse" and
times one training step (forward + backward) at 16K tokens against dense SDPA.

    python examples/quickstart.py [--seq-len 16384] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lighthouse_hf


def median_step_seconds(model, tokens, repeats):
    times = []
    for _ in range(repeats):
        model.zero_grad()
        start = time.perf_counter()
        model(tokens, labels=tokens).loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens of the training step (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each model (default: %(default)s)")
    args = parser.parse_args()

    settings = lighthouse_hf.LighthouseConfig(levels=3, pooling=4, topk=256, dense_layers=[])
    shortest = lighthouse_hf.ops.shortest_compressed_length(settings.levels, settings.pooling, settings.topk)
    if args.seq_len < shortest:
        parser.error(f"--seq-len must be at least {shortest}, the shortest sequence that L=3 p=4 K=256 compresses, "
                     f"got {args.seq_len}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
    )
    config.lighthouse = settings.to_dict()
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, args.seq_len))
    with tempfile.TemporaryDirectory() as path:
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        sparse = AutoModelForCausalLM.from_pretrained(path, attn_implementation="lighthouse")
        dense = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")

    kept = lighthouse_hf.compressed_length(args.seq_len, levels=settings.levels, pooling=settings.pooling, topk=settings.topk)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"S={args.seq_len}: Lighthouse attends over {kept} entries per head ({kept / args.seq_len:.0%})")
    print(f"settings saved in config.json: {sparse.config.lighthouse}")
    median_step_seconds(sparse, tokens, 1)  # warm-up
    sparse_time = median_step_seconds(sparse, tokens, args.repeats)
    dense_time = median_step_seconds(dense, tokens, args.repeats)
    print(f"2-layer forward+backward, median of {args.repeats}: lighthouse {sparse_time:.2f} s, "
          f"dense sdpa {dense_time:.2f} s ({dense_time / sparse_time:.2f}x)")


if __name__ == "__main__":
    main()
