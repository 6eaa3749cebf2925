"""``lighthouse-hf export``: a Lighthouse-trained model as a plain, verified Transformers checkpoint.

Lighthouse is a training-time attention; what users ship is the dense model. Export loads the
source with dense SDPA (merging a LoRA adapter first when given one), removes every lighthouse-hf
setting from the config, writes safetensors with Transformers' own ``save_pretrained`` into a
temporary directory beside DST, and renames it to DST only after verification passed:

- every tensor in DST equals the source tensor bit for bit after the requested cast, read straight
  from the source files (or from the merged model for the weights a LoRA adapter changed), with
  none dropped or added;
- a fresh Python process in which lighthouse_hf cannot be imported (``plain_load_check.py``) loads
  DST with ``AutoModelForCausalLM.from_pretrained`` and its logits on a probe sequence equal the
  source model's, run with dense SDPA and cast to the same dtype, exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import CONFIG_KEY

DEFAULT_MAX_SHARD_SIZE = "5GB"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_LENGTH = 32

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Decimal units as the Hugging Face Hub counts them ("5GB" is 5 * 10**9 bytes), binary ones by name.
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


class ExportError(ValueError):
    """Bad input (SRC, adapter, DST or an option); raised before anything is written."""


class VerificationError(RuntimeError):
    """The written checkpoint failed verification; it was removed and DST left untouched."""


class UnrecoveredCheckpointWarning(UserWarning):
    """The source was trained with Lighthouse but never ran the dense recovery phase."""


@dataclass
class ExportReport:
    """What ``export_checkpoint`` wrote and what verification found."""

    src: Path
    dst: Path
    adapter: Path | None
    model_type: str
    model_class: str
    source_dtype: str
    dtype: str
    tensors: int
    bytes: int
    shards: int
    tied: list[str]
    copied_files: list[str]
    recovery_step: int | None
    lighthouse_settings_found: bool
    verified: bool
    max_logit_diff: float | None = None
    """Max abs difference between DST's logits and the source's in the source dtype (dense SDPA)."""
    checked_with: str | None = None
    """Transformers version and attention implementation of the plain load check."""
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cast = self.source_dtype if self.dtype == self.source_dtype else f"{self.source_dtype} -> {self.dtype}"
        shard_word = "shard" if self.shards == 1 else "shards"
        lines = [
            f"exported {self.src} -> {self.dst}",
            f"  model      {self.model_type} ({self.model_class}), {cast}"
            + (f", LoRA adapter {self.adapter} merged" if self.adapter else ""),
            f"  tensors    {self.tensors}" + (f" ({', '.join(self.tied)} tied, stored once)" if self.tied else ""),
            f"  bytes      {self.bytes:,} in {self.shards} safetensors {shard_word}",
            f"  files      {', '.join(self.copied_files) or 'none copied (SRC has no tokenizer or generation config)'}",
        ]
        if not self.lighthouse_settings_found:
            lines.append("  recovery   no Lighthouse settings in SRC's config")
        elif self.recovery_step is None:
            lines.append("  recovery   NEVER RAN (config.lighthouse.recovery_step is None)")
        else:
            lines.append(f"  recovery   dense recovery began at step {self.recovery_step}")
        if self.verified:
            same = "identical to" if self.max_logit_diff == 0 else f"max abs diff {self.max_logit_diff:.3e} from"
            lines += [
                f"  logits     {same} the {self.source_dtype} source's under dense SDPA"
                + ("" if self.dtype == self.source_dtype else f"; identical to the source's cast to {self.dtype}"),
                f"  verified   every tensor bit for bit; plain load without lighthouse_hf ({self.checked_with})",
            ]
        else:
            lines.append("  verified   NO (--no-verify)")
        return "\n".join(lines)


def parse_size(value: str | int) -> int:
    """A shard size in bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise ExportError(f"max shard size must look like 5GB, 500MB, 2GiB or a number of bytes, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ExportError(f"max shard size must be at least 1 byte, got {value!r}")
    return size


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Reading the source


class SourceWeights:
    """The tensors of a checkpoint directory, read lazily from its safetensors or PyTorch files."""

    def __init__(self, model_dir: Path):
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for path in self._weight_files(model_dir):
            handle = self._open(path)
            for name in handle.keys():
                self.file_of[name] = path

    @staticmethod
    def _weight_files(model_dir: Path) -> list[Path]:
        # Transformers prefers safetensors over PyTorch pickles; so does export.
        for single, index in (
            ("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (model_dir / index).is_file():
                try:
                    weight_map = json.loads((model_dir / index).read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as error:
                    raise ExportError(f"cannot read the weight index {model_dir / index}: {error}") from None
                files = [model_dir / name for name in sorted(set(weight_map.values()))]
                missing = [str(path) for path in files if not path.is_file()]
                if missing:
                    raise ExportError(f"{model_dir / index} names weight files that do not exist: {', '.join(missing)}")
                return files
            if (model_dir / single).is_file():
                return [model_dir / single]
        raise ExportError(
            f"{model_dir} has a config.json but no weights (model.safetensors, pytorch_model.bin or a sharded index)"
        )

    def _open(self, path: Path) -> Any:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
            else:
                handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # safetensors and torch.load raise many types for a damaged file
            raise ExportError(f"cannot read the weights in {path}: {error}") from None
        self._handles[path] = handle
        return handle

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self.file_of[name]]
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]


@dataclass
class Source:
    model_dir: Path
    adapter_dir: Path | None
    config: dict
    weights: SourceWeights
    lighthouse_settings: dict | None


def _read_json(path: Path, what: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {what} {path}: {error}") from None
    if not isinstance(content, dict):
        raise ExportError(f"{what} {path} is not a JSON object")
    return content


def _resolve_base(adapter_dir: Path) -> Path:
    """The base model of a PEFT adapter directory, found on this machine (a directory or the HF cache)."""
    base = _read_json(adapter_dir / ADAPTER_CONFIG, "adapter config").get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass it: export BASE DST --adapter {adapter_dir}"
        )
    for candidate in (Path(base), adapter_dir / base):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not a repo id, or not in the local cache: both mean "not found here"
        raise ExportError(
            f"the base model {base!r} of the adapter {adapter_dir} is neither a local directory nor in the "
            f"Hugging Face cache; pass it: export BASE DST --adapter {adapter_dir}"
        ) from None


def _model_dir_error(path: Path) -> ExportError:
    steps = [p.name.removeprefix("checkpoint-") for p in path.glob("checkpoint-*")]
    steps = [int(step) for step in steps if step.isdigit()]
    latest = path / f"checkpoint-{max(steps)}" if steps else None
    hint = f" (a Trainer output directory? its latest checkpoint is {latest})" if latest else ""
    return ExportError(f"{path} is not a model directory: it has no config.json{hint}")


def inspect_source(src: str | os.PathLike, adapter: str | os.PathLike | None = None) -> Source:
    """Check SRC (and the adapter) without loading the model; raises ExportError on bad input."""
    src = Path(src)
    if not src.exists():
        raise ExportError(f"SRC {src} does not exist")
    if not src.is_dir():
        raise ExportError(f"SRC {src} is not a directory")
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None:
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ExportError(f"--adapter {adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        model_dir = src
    elif (src / ADAPTER_CONFIG).is_file():
        adapter_dir, model_dir = src, _resolve_base(src)
    else:
        model_dir = src
    if not (model_dir / "config.json").is_file():
        raise _model_dir_error(model_dir)
    if adapter_dir is not None and not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ExportError(f"the adapter directory {adapter_dir} has no {' or '.join(ADAPTER_WEIGHTS)}")
    config = _read_json(model_dir / "config.json", "model config")
    _check_model_type(model_dir, config)
    # An adapter directory that carries its own config.json (recovery marker included) outranks the base's.
    settings = None
    for config_dir in (adapter_dir, model_dir):
        if config_dir is not None and (config_dir / "config.json").is_file():
            settings = _read_json(config_dir / "config.json", "model config").get(CONFIG_KEY)
            if settings is not None:
                break
    settings = settings if isinstance(settings, dict) else None
    return Source(model_dir, adapter_dir, config, SourceWeights(model_dir), settings)


def _check_model_type(model_dir: Path, config: dict) -> None:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not model_type:
        raise ExportError(f"{model_dir / 'config.json'} has no model_type")
    try:
        AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as error:
        raise ExportError(
            f"Transformers {transformers.__version__} cannot load model type {model_type!r} from {model_dir}: {error}"
        ) from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"model type {model_type!r} ({model_dir}) has no causal-LM class in Transformers")


# ---------------------------------------------------------------------------------------------
# Loading the source model


def _load_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype="auto", output_loading_info=True
        )
    except Exception as error:  # whatever Transformers raises for a checkpoint it cannot load is bad input
        raise ExportError(f"Transformers cannot load {model_dir}: {type(error).__name__}: {error}") from None
    if info["missing_keys"]:
        raise ExportError(f"the weights in {model_dir} lack tensors the model needs: {sorted(info['missing_keys'])}")
    if info["unexpected_keys"]:
        raise ExportError(
            f"the weights in {model_dir} hold tensors the model does not use, which export would drop: "
            f"{sorted(info['unexpected_keys'])}"
        )
    return model.eval()


def _merge_adapter(model: Any, adapter_dir: Path) -> tuple[Any, set[str]]:
    """Merge the adapter into ``model``; returns the merged model and the modules the merge replaced."""
    try:
        from peft import PeftConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        raise ExportError("merging a LoRA adapter needs peft: pip install 'lighthouse-hf[peft]'") from None
    mismatch = f"the adapter {adapter_dir} does not match its base model"
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
        # The base was chosen on purpose (--adapter, or resolved from this very field): no rename warning.
        config.base_model_name_or_path = model.name_or_path
        peft_model = get_peft_model(model, config)
        result = peft_model.load_adapter(adapter_dir, adapter_name="default")
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ExportError(f"{mismatch}: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{mismatch}: missing adapter tensors {sorted(result.missing_keys)}, "
            f"tensors for modules the base lacks {sorted(result.unexpected_keys)}"
        )
    changed = {
        name
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
    }
    if not hasattr(peft_model, "merge_and_unload"):
        raise ExportError(f"the adapter {adapter_dir} is a {config.peft_type} adapter, which cannot be merged")
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as error:
        raise ExportError(f"merging the adapter {adapter_dir} failed: {error}") from None
    return merged.eval(), changed


def _probe(model: Any) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    length = min(PROBE_LENGTH, getattr(model.config, "max_position_embeddings", None) or PROBE_LENGTH)
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def _logits(model: Any, probe: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(probe).logits


def _cast(model: Any, dtype: torch.dtype) -> None:
    """Cast what a checkpoint stores, as loading it with ``dtype=`` would: buffers that the model
    computes itself and does not save (rotary ``inv_freq``) keep their dtype, as in a fresh load."""
    saved = model.state_dict().keys()
    computed = {name: buffer for name, buffer in model.named_buffers() if name not in saved}
    model.to(dtype)
    for name, buffer in computed.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)


def strip_lighthouse(config: Any) -> None:
    """Remove every lighthouse-hf setting from a Transformers config and its sub-configs."""
    for sub in [config] + [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]:
        if sub is not None and hasattr(sub, CONFIG_KEY):
            delattr(sub, CONFIG_KEY)


def _lighthouse_traces(node: Any, path: str = "config") -> list[str]:
    """Keys of a config.json that belong to lighthouse-hf or record an attention implementation."""
    traces = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == CONFIG_KEY or "attn_implementation" in key:
                traces.append(f"{path}.{key}")
            traces += _lighthouse_traces(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            traces += _lighthouse_traces(value, f"{path}[{i}]")
    return traces


# ---------------------------------------------------------------------------------------------
# Writing and verifying


def _copy_side_files(source: Source, out: Path) -> list[str]:
    """Copy tokenizer files and the generation config, preferring the adapter's own over its base's."""
    dirs = [d for d in (source.adapter_dir, source.model_dir) if d is not None]
    copied = []
    tokenizer_dir = next((d for d in dirs if any((d / name).is_file() for name in TOKENIZER_FILES)), None)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)
                copied.append(name)
        for name in TOKENIZER_DIRS:
            if (tokenizer_dir / name).is_dir():
                shutil.copytree(tokenizer_dir / name, out / name)
                copied.append(name + "/")
    generation_dir = next((d for d in dirs if (d / GENERATION_CONFIG).is_file()), None)
    if generation_dir is not None:
        # Replaces the one save_pretrained derived from the config: the source's own is what was tuned.
        shutil.copy2(generation_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
        copied.append(GENERATION_CONFIG)
    return copied


def _written_tensors(out: Path) -> dict[str, tuple[Path, int]]:
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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _expected_tensors(source: Source, model: Any, changed_modules: set[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """What DST must hold: name -> the source tensor cast to the exported dtype, loaded on demand.

    Weights the adapter merge changed come from the merged model; all others straight from the
    source files, so a load or save that altered a tensor is caught. A tensor the model ties to
    another is stored once, as Transformers does; the source may hold it only if equal to its twin.
    """
    state = model.state_dict()
    tied_to = _tied(model)
    source_names = source.weights.names()
    unknown = sorted(source_names - set(state))
    if unknown:
        raise VerificationError(f"source tensors that match no model parameter (renamed on load?): {unknown}")
    for target, twin in tied_to.items():
        if {target, twin} <= source_names and not _same_bits(source.weights.get(target), source.weights.get(twin)):
            raise VerificationError(f"the source stores {target} different from {twin}, which the model ties it to")
    changed = tuple(f"{module}." for module in changed_modules)

    def expected(name: str) -> Callable[[], torch.Tensor]:
        if name.startswith(changed):
            return lambda: state[name]
        return lambda: source.weights.get(name).to(state[name].dtype)

    names = (source_names | {name for name in state if name.startswith(changed)}) - tied_to.keys()
    return {name: expected(name) for name in sorted(names)}


def _tied(model: Any) -> dict[str, str]:
    """Parameter name -> the name of the parameter it is tied to (Transformers stores only the latter)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _check_tensors(out: Path, expected: dict[str, Callable[[], torch.Tensor]]) -> None:
    from safetensors import safe_open

    written = _written_tensors(out)
    dropped, added = sorted(expected.keys() - written.keys()), sorted(written.keys() - expected.keys())
    if dropped or added:
        raise VerificationError(f"the written checkpoint dropped tensors {dropped} and added tensors {added}")
    differing = []
    for path in sorted({path for path, _ in written.values()}):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if not _same_bits(handle.get_tensor(name), expected[name]()):
                    differing.append(name)
    if differing:
        raise VerificationError(f"written tensors differ from the source: {differing}")


def _plain_load_check(out: Path, probe: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Run plain_load_check.py in a fresh isolated interpreter and require its logits to equal
    ``reference`` bit for bit; returns them and what loaded them."""
    script = Path(__file__).with_name("plain_load_check.py")
    with tempfile.TemporaryDirectory(prefix="lighthouse-export-check-") as io:
        torch.save(probe, Path(io) / "probe.pt")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # -I: no user site, no PYTHON* variables, no script directory on sys.path.
        proc = subprocess.run(
            [sys.executable, "-I", str(script), str(out), io, str(torch.get_num_threads())],
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
        logits = torch.load(Path(io) / "logits.pt", weights_only=True)
    problems = {key: value for key, value in result["loading_problems"].items() if value}
    if problems:
        raise VerificationError(f"plain Transformers loaded the exported checkpoint with problems: {problems}")
    if result["config_has_lighthouse"] or result["lighthouse_registered"] or result["lighthouse_modules"]:
        raise VerificationError(f"the plain load saw lighthouse-hf: {result}")
    if not _same_bits(logits, reference):
        diff = (logits.double() - reference.double()).abs().max().item()
        raise VerificationError(
            f"plain Transformers' logits differ from the source's under dense SDPA in {reference.dtype} "
            f"(max abs diff {diff:.3e}; loaded as {result['dtype']} with {result['attn_implementation']})"
        )
    return logits, f"transformers {result['transformers_version']}, {result['attn_implementation']}"


def _check_destination(dst: Path, source: Source, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"DST {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ExportError(f"DST {dst} is not empty; pass --overwrite to replace it")
    resolved = dst.resolve()
    for path in (source.model_dir, source.adapter_dir):
        if path is None:
            continue
        path = path.resolve()
        if resolved == path or resolved in path.parents or path in resolved.parents:
            raise ExportError(f"DST {dst} overlaps the source directory {path}")


def _replace_directory(staged: Path, dst: Path) -> None:
    """Move ``staged`` to ``dst``, replacing what is there, so that DST is either the old or the new one."""
    if not dst.exists():
        os.rename(staged, dst)
        return
    displaced = dst.with_name(f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(dst, displaced)
    try:
        os.rename(staged, dst)
    except BaseException:
        os.rename(displaced, dst)
        raise
    shutil.rmtree(displaced)


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = True,
    allow_unrecovered: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Export SRC (a saved model, a Trainer checkpoint, or a PEFT adapter) to DST as a plain checkpoint.

    ``adapter``: a PEFT adapter directory to merge into SRC (SRC may itself be an adapter directory
    whose base model is found locally). ``dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"``
    to cast to (default: keep the source's). Raises :class:`ExportError` on bad input and
    :class:`VerificationError` when verification fails; DST is untouched in both cases. Warns with
    :class:`UnrecoveredCheckpointWarning` when SRC never ran dense recovery, unless ``allow_unrecovered``.
    """
    target_dtype = _parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    dst = Path(dst).absolute()
    source = inspect_source(src, adapter)
    _check_destination(dst, source, overwrite)

    report_warnings = []
    settings = source.lighthouse_settings
    recovery_step = settings.get("recovery_step") if settings else None
    if settings is not None and recovery_step is None and not allow_unrecovered:
        message = (
            f"{source.adapter_dir or source.model_dir} never ran dense recovery (config.{CONFIG_KEY}.recovery_step "
            "is None). A model trained with sparse Lighthouse attention needs a short dense recovery phase "
            "before it runs well with dense attention; export anyway with --allow-unrecovered."
        )
        warnings.warn(message, UnrecoveredCheckpointWarning, stacklevel=2)
        report_warnings.append(message)

    model = _load_model(source.model_dir)
    changed_modules: set[str] = set()
    if source.adapter_dir is not None:
        model, changed_modules = _merge_adapter(model, source.adapter_dir)
    source_dtype = model.dtype
    probe = _probe(model) if verify else None
    source_logits = _logits(model, probe) if verify else None
    strip_lighthouse(model.config)
    if target_dtype is not None and target_dtype != source_dtype:
        _cast(model, target_dtype)
    reference_logits = _logits(model, probe) if verify and model.dtype != source_dtype else source_logits

    dst.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dst.name}.export-", dir=dst.parent))
    try:
        # mkdtemp makes the directory private; DST gets the permissions of an ordinary new directory.
        umask = os.umask(0)
        os.umask(umask)
        staged.chmod(0o777 & ~umask)
        model.save_pretrained(staged, max_shard_size=shard_bytes)
        copied = _copy_side_files(source, staged)
        traces = _lighthouse_traces(_read_json(staged / "config.json", "exported config"))
        if traces:
            raise VerificationError(f"the exported config.json still mentions lighthouse-hf: {traces}")
        written = _written_tensors(staged)
        checked_with = max_logit_diff = None
        if verify:
            _check_tensors(staged, _expected_tensors(source, model, changed_modules))
            logits, checked_with = _plain_load_check(staged, probe, reference_logits)
            max_logit_diff = (logits.double() - source_logits.double()).abs().max().item()
        _replace_directory(staged, dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

    return ExportReport(
        src=Path(src).absolute(),
        dst=dst,
        adapter=source.adapter_dir,
        model_type=source.config["model_type"],
        model_class=type(model).__name__,
        source_dtype=_dtype_name(source_dtype),
        dtype=_dtype_name(model.dtype),
        tensors=len(written),
        bytes=sum(size for _, size in written.values()),
        shards=len({path for path, _ in written.values()}),
        tied=sorted(_tied(model)),
        copied_files=copied,
        recovery_step=recovery_step,
        lighthouse_settings_found=settings is not None,
        verified=verify,
        max_logit_diff=max_logit_diff,
        checked_with=checked_with,
        warnings=report_warnings,
    )


# ---------------------------------------------------------------------------------------------
# Command line


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a plain, verified Transformers checkpoint (no lighthouse-hf needed to load it)",
        description="Export a Lighthouse-trained model (a saved model directory, a Trainer checkpoint, or a "
        "PEFT adapter) as a plain Transformers checkpoint in safetensors, verified in a fresh process "
        "in which lighthouse_hf cannot be imported. Exit codes: 0 done, 1 verification failed, 2 bad input.",
    )
    parser.add_argument(
        "src", metavar="SRC", help="saved model directory, Trainer checkpoint, or PEFT adapter directory"
    )
    parser.add_argument("dst", metavar="DST", help="directory to create (must be absent or empty unless --overwrite)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT (LoRA) adapter directory to merge into SRC")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the source dtype)")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        type=_argparse_size,
        metavar="SIZE",
        help=f"largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    parser.add_argument(
        "--allow-unrecovered", action="store_true", help="do not warn when SRC never ran dense recovery"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.set_defaults(run=run)


def _argparse_size(value: str) -> int:
    try:
        return parse_size(value)
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    prefix = "lighthouse-hf export"
    show_warning = warnings.showwarning

    def show_unrecovered_plainly(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnrecoveredCheckpointWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)
        else:
            show_warning(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show_unrecovered_plainly
        try:
            report = export_checkpoint(
                args.src,
                args.dst,
                adapter=args.adapter,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                verify=args.verify,
                allow_unrecovered=args.allow_unrecovered,
                overwrite=args.overwrite,
            )
        except ExportError as error:
            print(f"{prefix}: error: {error}", file=sys.stderr)
            return 2
        except VerificationError as error:
            print(f"{prefix}: verification failed, nothing written: {error}", file=sys.stderr)
            return 1
    print(report)
    return 0
