"""Tokenize the long-book corpus once, on a CPU, into the token file the study trains on.

    python examples/study/prepare_data.py --corpus ../shared/data/corpus \
        --tokenizer ../shared/data/tokenizer-smollm2 --out .study-data

Writes ``tokens.npy`` (every document's tokens back to back, uint16: the SmolLM2 vocabulary has
49,152 entries) and ``meta.json`` (each document's name, span and split, the EOS id and the token
ids the pass-key probe is assembled from), and a copy of ``tokenizer.json`` for ``--eval-text``
files. The GPU machine gets no corpus: this folder is all it reads, so it stays well under the
64 MB a device run may carry.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

HELD_OUT = ("austen/persuasion", "shakespeare/hamlet_gut", "shakespeare/othello_gut")
"""Whole documents kept out of training: one Austen novel and two long plays (each play is longer
than one 32K window, so every held-out window is a single document)."""
HELD_OUT_64K = ("austen/persuasion", "austen/northanger_abbey", "austen/emma")
"""The decisive study's held-out books (``--held-out 64k``): three novels, each longer than one 64K window."""
HELD_OUT_SETS = {"32k": HELD_OUT, "64k": HELD_OUT_64K}

# Pieces of the pass-key probe. The key's digits follow a lone space token: the tokenizer splits
# " 48213" into " " and one token per digit, so five digit tokens are exactly the answer.
PASSKEY_TEXT = {
    "statement": "\nThe pass key is",
    "statement_end": ". Remember it.\n",
    "question": "\nWhat is the pass key? The pass key is",
    "space": " ",
}


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def documents(corpus: Path) -> list[tuple[str, Path]]:
    return [(f"{path.parent.name}/{path.stem}", path) for path in sorted(corpus.glob("*/*.txt"))]


def encode_pieces(tokenizer) -> dict:
    pieces = {name: tokenizer.encode(text, add_special_tokens=False).ids for name, text in PASSKEY_TEXT.items()}
    digits = [tokenizer.encode(str(d), add_special_tokens=False).ids for d in range(10)]
    if any(len(ids) != 1 for ids in digits) or len(pieces["space"]) != 1:
        raise ValueError("the pass-key probe needs single-token digits and a single-token space")
    spaced = tokenizer.encode(" 48213", add_special_tokens=False).ids
    if spaced != pieces["space"] + [digits[d][0] for d in (4, 8, 2, 1, 3)]:
        raise ValueError(f"the tokenizer does not split a spaced number into a space and its digits: {spaced}")
    return {**pieces, "space": pieces["space"][0], "digits": [ids[0] for ids in digits]}


def prepare(corpus: Path, tokenizer_path: Path, out: Path, held_out: tuple[str, ...] = HELD_OUT) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise ValueError("the tokenizer has no <|endoftext|> token")
    if tokenizer.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError("the vocabulary does not fit uint16 token ids")
    found = documents(corpus)
    missing = sorted(set(held_out) - {name for name, _ in found})
    if missing:
        raise ValueError(f"held-out documents not in the corpus: {missing}")
    arrays, docs, start = [], [], 0
    for name, path in found:
        ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids, dtype=np.uint16)
        arrays.append(ids)
        docs.append(dict(name=name, start=start, length=len(ids), split="heldout" if name in held_out else "train"))
        start += len(ids)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path / "tokenizer.json", out / "tokenizer.json")
    np.save(out / "tokens.npy", np.concatenate(arrays))
    meta = dict(
        tokenizer=str(tokenizer_path),
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=eos,
        documents=docs,
        passkey=encode_pieces(tokenizer),
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder of <collection>/<document>.txt files")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder holding tokenizer.json")
    parser.add_argument("--out", type=Path, default=Path(".study-data"))
    parser.add_argument(
        "--held-out", choices=sorted(HELD_OUT_SETS), default="32k", help="held-out books: the small study's (32k) or the decisive study's (64k)"
    )
    args = parser.parse_args(argv)
    meta = prepare(args.corpus, args.tokenizer, args.out, HELD_OUT_SETS[args.held_out])
    for split in ("train", "heldout"):
        tokens = sum(d["length"] for d in meta["documents"] if d["split"] == split)
        print(f"{split}: {sum(d['split'] == split for d in meta['documents'])} documents, {tokens:,} tokens")


if __name__ == "__main__":
    main()
