"""Verifying a written checkpoint: its config, its tensors bit for bit, and a plain load's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import CONFIG_KEY
from .errors import VerificationError
from .source import LoadedWeights, SourceWeights

PROBE_LENGTH = 32
PLAIN_LOAD_CHECK = Path(__file__).with_name("plain_load_check.py")


def probe(model: Any) -> torch.Tensor:
    """Token ids whose logits the plain load check compares."""
    vocab = model.get_input_embeddings().num_embeddings
    length = min(PROBE_LENGTH, getattr(model.config, "max_position_embeddings", None) or PROBE_LENGTH)
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def logits(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(token_ids).logits


def lighthouse_traces(node: Any, path: str = "config") -> list[str]:
    """Keys of a config.json that belong to lighthouse-hf or record an attention implementation."""
    traces = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == CONFIG_KEY or "attn_implementation" in key:
                traces.append(f"{path}.{key}")
            traces += lighthouse_traces(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            traces += lighthouse_traces(value, f"{path}[{i}]")
    return traces


def written_tensors(out: Path) -> dict[str, tuple[Path, int]]:
    """Name -> (file, bytes) of every tensor in the written safetensors files, from their headers."""
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        # The safetensors layout: an 8-byte little-endian header length, then a JSON header.
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                tensors[name] = (path, end - start)
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def tied(model: Any) -> dict[str, str]:
    """Parameter name -> the name of the parameter it is tied to (Transformers stores only the latter)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def expected_tensors(
    weights: SourceWeights | LoadedWeights, model: Any, changed_modules: set[str]
) -> dict[str, Callable[[], torch.Tensor]]:
    """What DST must hold: name -> the source tensor cast to the exported dtype, loaded on demand.

    Weights the adapter merge changed come from the merged model; all others from ``weights`` (the
    source files, read straight, so a load or save that altered a tensor is caught). A tensor the
    model ties to another is stored once, as Transformers does; the source may hold it only if
    equal to its twin.
    """
    state = model.state_dict()
    tied_to = tied(model)
    source_names = weights.names()
    unknown = sorted(source_names - set(state))
    if unknown:
        raise VerificationError(f"source tensors that match no model parameter (renamed on load?): {unknown}")
    for target, twin in tied_to.items():
        if {target, twin} <= source_names and not same_bits(weights.get(target), weights.get(twin)):
            raise VerificationError(f"the source stores {target} different from {twin}, which the model ties it to")
    changed = tuple(f"{module}." for module in changed_modules)

    def expected(name: str) -> Callable[[], torch.Tensor]:
        if name.startswith(changed):
            return lambda: state[name]
        return lambda: weights.get(name).to(state[name].dtype)

    names = (source_names | {name for name in state if name.startswith(changed)}) - tied_to.keys()
    return {name: expected(name) for name in sorted(names)}


def check_tensors(out: Path, expected: dict[str, Callable[[], torch.Tensor]]) -> None:
    from safetensors import safe_open

    written = written_tensors(out)
    dropped, added = sorted(expected.keys() - written.keys()), sorted(written.keys() - expected.keys())
    if dropped or added:
        raise VerificationError(f"the written checkpoint dropped tensors {dropped} and added tensors {added}")
    differing = []
    for path in sorted({path for path, _ in written.values()}):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if not same_bits(handle.get_tensor(name), expected[name]()):
                    differing.append(name)
    if differing:
        raise VerificationError(f"written tensors differ from the source: {differing}")


def check_config(out: Path) -> None:
    traces = lighthouse_traces(json.loads((out / "config.json").read_text()))
    if traces:
        raise VerificationError(f"the exported config.json still mentions lighthouse-hf: {traces}")


def plain_load_check(out: Path, token_ids: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Run plain_load_check.py in a fresh isolated interpreter and require its logits to equal
    ``reference`` bit for bit; returns them and what loaded them."""
    with tempfile.TemporaryDirectory(prefix="lighthouse-export-check-") as io:
        torch.save(token_ids, Path(io) / "probe.pt")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # -I: no user site, no PYTHON* variables, no script directory on sys.path.
        proc = subprocess.run(
            [sys.executable, "-I", str(PLAIN_LOAD_CHECK), str(out), io, str(torch.get_num_threads())],
            cwd=io,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise VerificationError(
                f"plain Transformers could not load the exported checkpoint:\n{proc.stderr[-4000:]}"
            )
        result = json.loads((Path(io) / "result.json").read_text())
        plain_logits = torch.load(Path(io) / "logits.pt", weights_only=True)
    problems = {key: value for key, value in result["loading_problems"].items() if value}
    if problems:
        raise VerificationError(f"plain Transformers loaded the exported checkpoint with problems: {problems}")
    if result["config_has_lighthouse"] or result["lighthouse_registered"] or result["lighthouse_modules"]:
        raise VerificationError(f"the plain load saw lighthouse-hf: {result}")
    if not same_bits(plain_logits, reference):
        diff = (plain_logits.double() - reference.double()).abs().max().item()
        raise VerificationError(
            f"plain Transformers' logits differ from the source's under dense SDPA in {reference.dtype} "
            f"(max abs diff {diff:.3e}; loaded as {result['dtype']} with {result['attn_implementation']})"
        )
    return plain_logits, f"transformers {result['transformers_version']}, {result['attn_implementation']}"
