"""Reading the source: SRC, the adapter and its base model, their weights, and the model itself."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_KEY
from .errors import ExportError
from .options import DTYPE_NAMES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype for a ``--dtype`` name (None: keep the source's)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype_name(dtype) in DTYPE_NAMES:
        return dtype
    if dtype in DTYPE_NAMES:
        return getattr(torch, dtype)
    raise ExportError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


class LoadedWeights:
    """The tensors of a model as loaded: the reference for a GGUF source, which has no safetensors."""

    def __init__(self, model: Any):
        self._state = dict(model.state_dict())

    def names(self) -> set[str]:
        return set(self._state)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


@dataclass
class Source:
    model_dir: Path
    adapter_dir: Path | None
    config_dir: Path | None
    """Where the model's config.json is: an adapter's own when it has one (the config it was trained
    with), else the base's (None: in the base GGUF)."""
    gguf_file: Path | None
    model_type: str
    lighthouse_settings: dict | None
    weights: SourceWeights | None
    """The source files' tensors (None for a GGUF base: see :func:`source_weights`)."""


def read_json(path: Path, what: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {what} {path}: {error}") from None
    if not isinstance(content, dict):
        raise ExportError(f"{what} {path} is not a JSON object")
    return content


def _gguf_file(directory: Path) -> Path | None:
    """The one GGUF file of a directory without a config.json (a GGUF base model), else None."""
    if (directory / "config.json").is_file() or not directory.is_dir():
        return None
    files = sorted(directory.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _is_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() or _gguf_file(directory) is not None


def _resolve_base(adapter_dir: Path) -> Path:
    """The base model of a PEFT adapter directory, found on this machine (a directory or the HF cache)."""
    base = read_json(adapter_dir / ADAPTER_CONFIG, "adapter config").get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass it: export BASE DST --adapter {adapter_dir}"
        )
    for candidate in (Path(base), adapter_dir / base):
        if _is_model_dir(candidate):
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not a repo id, or not in the local cache: both mean "not found here"
        raise ExportError(
            f"the base model {base!r} of the adapter {adapter_dir} is neither a local directory (with a "
            f"config.json or one .gguf file) nor in the Hugging Face cache; pass it: export BASE DST --adapter "
            f"{adapter_dir}"
        ) from None


def _model_dir_error(path: Path) -> ExportError:
    steps = [p.name.removeprefix("checkpoint-") for p in path.glob("checkpoint-*")]
    steps = [int(step) for step in steps if step.isdigit()]
    latest = path / f"checkpoint-{max(steps)}" if steps else None
    hint = f" (a Trainer output directory? its latest checkpoint is {latest})" if latest else ""
    ggufs = len(list(path.glob("*.gguf")))
    if ggufs > 1:
        hint = f" and {ggufs} .gguf files (a GGUF base must be the only one in its directory)"
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
    if not _is_model_dir(model_dir):
        raise _model_dir_error(model_dir)
    if adapter_dir is not None and not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ExportError(f"the adapter directory {adapter_dir} has no {' or '.join(ADAPTER_WEIGHTS)}")
    gguf_file = _gguf_file(model_dir)
    adapter_config = adapter_dir / "config.json" if adapter_dir is not None else None
    has_adapter_config = adapter_config is not None and adapter_config.is_file()
    # The config the adapter was trained with (RoPE scaling, positions, the recovery marker) is the
    # model that was trained: it outranks the base's, and a GGUF's own.
    if has_adapter_config:
        config_dir = adapter_dir
    else:
        config_dir = model_dir if gguf_file is None else None
    model_type = _check_model_type(config_dir or model_dir, gguf_file if config_dir is None else None)
    # The Lighthouse settings (recovery marker included) are that same config's.
    settings = read_json(config_dir / "config.json", "model config").get(CONFIG_KEY) if config_dir is not None else None
    settings = settings if isinstance(settings, dict) else None
    weights = SourceWeights(model_dir) if gguf_file is None else None
    return Source(model_dir, adapter_dir, config_dir, gguf_file, model_type, settings, weights)


def _check_model_type(config_dir: Path, gguf_file: Path | None) -> str:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = gguf_file or config_dir / "config.json"
    if gguf_file is None:
        model_type = read_json(config_dir / "config.json", "model config").get("model_type")
        if not model_type:
            raise ExportError(f"{where} has no model_type")
    try:
        config = AutoConfig.from_pretrained(config_dir, gguf_file=gguf_file.name if gguf_file else None)
    except (ValueError, KeyError, OSError) as error:
        raise ExportError(
            f"Transformers {transformers.__version__} cannot load the config in {where}: {error}"
        ) from None
    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"model type {model_type!r} ({where}) has no causal-LM class in Transformers")
    return model_type


def source_weights(source: Source, model: Any) -> SourceWeights | LoadedWeights:
    """What verification compares the written tensors with: the source files, or for a GGUF base the
    dequantized weights as loaded (call this before merging an adapter into ``model``)."""
    return source.weights or LoadedWeights(model)


# ---------------------------------------------------------------------------------------------
# Loading the model


def load_model(source: Source) -> Any:
    """The source model with dense SDPA, in its own dtype (float32 for a dequantized GGUF)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if source.gguf_file is None:
            model, info = AutoModelForCausalLM.from_pretrained(
                source.model_dir, config=AutoConfig.from_pretrained(source.config_dir), attn_implementation="sdpa",
                dtype="auto", output_loading_info=True,
            )
        else:
            gguf = source.gguf_file.name
            if source.config_dir is not None:
                config = AutoConfig.from_pretrained(source.config_dir)
            else:
                config = AutoConfig.from_pretrained(source.model_dir, gguf_file=gguf)
            loaded, info = AutoModelForCausalLM.from_pretrained(
                source.model_dir, gguf_file=gguf, config=config, dtype=torch.float32, output_loading_info=True
            )
            # Transformers dequantizes GGUF weights on load but still marks the model quantized (which
            # neither training nor save_pretrained accept): the weights move into a plain model, as
            # examples/pretrain.py does when it trains on a GGUF base.
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            model.load_state_dict(loaded.state_dict())
    except Exception as error:  # whatever Transformers raises for a checkpoint it cannot load is bad input
        where = source.gguf_file or source.model_dir
        raise ExportError(f"Transformers cannot load {where}: {type(error).__name__}: {error}") from None
    if info["missing_keys"]:
        raise ExportError(
            f"the weights in {source.model_dir} lack tensors the model needs: {sorted(info['missing_keys'])}"
        )
    if info["unexpected_keys"]:
        raise ExportError(
            f"the weights in {source.model_dir} hold tensors the model does not use, which export would drop: "
            f"{sorted(info['unexpected_keys'])}"
        )
    return model.eval()


def merge_adapter(model: Any, adapter_dir: Path) -> tuple[Any, set[str]]:
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


# ---------------------------------------------------------------------------------------------
# Turning the trained model into the one to ship


def configs(config: Any) -> list[Any]:
    """A Transformers config and its sub-configs."""
    subs = [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]
    return [config] + [sub for sub in subs if sub is not None]


def strip_lighthouse(config: Any) -> None:
    """Remove every lighthouse-hf setting from a Transformers config and its sub-configs."""
    for sub in configs(config):
        if hasattr(sub, CONFIG_KEY):
            delattr(sub, CONFIG_KEY)


def restore_use_cache(config: Any) -> None:
    """Give ``use_cache`` its model default: Trainer sets it to False for training (its own
    ``use_cache`` argument), and a shipped model that never caches generates slowly."""
    for sub in configs(config):
        if hasattr(sub, "use_cache"):
            sub.use_cache = type(sub)().use_cache


def cast(model: Any, dtype: torch.dtype) -> None:
    """Cast what a checkpoint stores, as loading it with ``dtype=`` would: buffers that the model
    computes itself and does not save (rotary ``inv_freq``) keep their dtype, as in a fresh load."""
    saved = model.state_dict().keys()
    computed = {name: buffer for name, buffer in model.named_buffers() if name not in saved}
    model.to(dtype)
    for name, buffer in computed.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
