"""``lighthouse-hf export``: a Lighthouse-trained model as a plain, verified Transformers checkpoint.

Lighthouse is a training-time attention; what users ship is the dense model. Export loads the
source with dense SDPA (merging a LoRA adapter first when given one; a GGUF base is dequantized),
removes every lighthouse-hf setting from the config, gives ``use_cache`` back its model default,
writes safetensors with Transformers' own ``save_pretrained`` into a folder beside DST, and renames
it to DST only after verification passed:

- every tensor in DST equals the source tensor bit for bit after the requested cast, read straight
  from the source files (or from the merged model for the weights a LoRA adapter changed, or from
  the dequantized weights as loaded for a GGUF base), with none dropped or added;
- a fresh Python process in which lighthouse_hf cannot be imported (``plain_load_check.py``) loads
  DST with ``AutoModelForCausalLM.from_pretrained`` and its logits on a probe sequence equal the
  source model's, run with dense SDPA and cast to the same dtype, exactly.

What DST is at every instant, even if the process is killed: the old checkpoint (or nothing, if
there was none) or the new, verified one. The one exception is a replacement (``overwrite``, or an
empty DST) killed between its two renames: DST is then absent, the new checkpoint lies complete
and verified beside it, and the next export to the same DST (any SRC) first renames it to DST,
finishing the replacement. Each export also removes what killed exports to its DST left beside
it (folders whose process no longer exists); see ``write.py``.

Importing this package needs no torch (the command line reads its options from here); the
modules that do are imported when an export runs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    ExportError,
    ExportWarning,
    InterruptedExportWarning,
    UnrecoveredCheckpointWarning,
    VerificationError,
)
from .options import DEFAULT_MAX_SHARD_SIZE, DTYPE_NAMES, parse_size
from .report import ExportReport

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPE_NAMES",
    "ExportError",
    "ExportReport",
    "ExportWarning",
    "InterruptedExportWarning",
    "UnrecoveredCheckpointWarning",
    "VerificationError",
    "export_checkpoint",
    "parse_size",
]


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
    whose base model is found locally; the base may be a directory holding one GGUF file).
    ``dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to cast to (default: keep the
    source's). Raises :class:`ExportError` on bad input and :class:`VerificationError` when
    verification fails; DST is untouched in both cases. Warns with
    :class:`InterruptedExportWarning` for what it cleaned up after killed exports to DST, and with
    :class:`UnrecoveredCheckpointWarning` when it exported a SRC that never ran dense recovery,
    unless ``allow_unrecovered``.
    """
    # Imported here, not above: they need torch, which the command line's option parsing does not.
    from ..config import CONFIG_KEY
    from . import source as sources
    from . import verify as checks
    from . import write

    target_dtype = sources.torch_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    dst = Path(dst).absolute()
    report_warnings = []
    for done in write.recover(dst):
        warnings.warn(done, InterruptedExportWarning, stacklevel=2)
        report_warnings.append(done)
    source = sources.inspect_source(src, adapter)
    source_dirs = [d for d in (source.adapter_dir, source.model_dir) if d is not None]
    write.check_destination(dst, source_dirs, overwrite)

    model = sources.load_model(source)
    weights = sources.source_weights(source, model)
    changed_modules: set[str] = set()
    if source.adapter_dir is not None:
        model, changed_modules = sources.merge_adapter(model, source.adapter_dir)
    source_dtype = model.dtype
    probe = checks.probe(model) if verify else None
    source_logits = checks.logits(model, probe) if verify else None
    sources.strip_lighthouse(model.config)
    sources.restore_use_cache(model.config)
    if target_dtype is not None and target_dtype != source_dtype:
        sources.cast(model, target_dtype)
    reference_logits = checks.logits(model, probe) if verify and model.dtype != source_dtype else source_logits

    staged = write.create_staging(dst)
    try:
        model.save_pretrained(staged, max_shard_size=shard_bytes)
        copied = write.copy_side_files(source_dirs, staged)
        checks.check_config(staged)
        written = checks.written_tensors(staged)
        checked_with = max_logit_diff = None
        if verify:
            checks.check_tensors(staged, checks.expected_tensors(weights, model, changed_modules))
            logits, checked_with = checks.plain_load_check(staged, probe, reference_logits)
            max_logit_diff = (logits.double() - source_logits.double()).abs().max().item()
        write.replace(staged, dst, overwrite)
    except BaseException:
        write.discard(staged)
        raise

    settings = source.lighthouse_settings
    recovery_step = settings.get("recovery_step") if settings else None
    if settings is not None and recovery_step is None and not allow_unrecovered:
        message = (
            f"exported {source.adapter_dir or source.model_dir}, which never ran dense recovery "
            f"(config.{CONFIG_KEY}.recovery_step is None): a model trained with sparse Lighthouse attention "
            "needs a short dense recovery phase before it runs well with dense attention. "
            "(--allow-unrecovered silences this warning.)"
        )
        warnings.warn(message, UnrecoveredCheckpointWarning, stacklevel=2)
        report_warnings.append(message)

    return ExportReport(
        src=Path(src).absolute(),
        dst=dst,
        adapter=source.adapter_dir,
        model_type=source.model_type,
        model_class=type(model).__name__,
        source_dtype=sources.dtype_name(source_dtype),
        dtype=sources.dtype_name(model.dtype),
        tensors=len(written),
        bytes=sum(size for _, size in written.values()),
        shards=len({path for path, _ in written.values()}),
        tied=sorted(checks.tied(model)),
        copied_files=copied,
        recovery_step=recovery_step,
        lighthouse_settings_found=settings is not None,
        adapter_without_config=source.adapter_dir is not None and source.config_dir != source.adapter_dir,
        verified=verify,
        gguf_file=source.gguf_file,
        max_logit_diff=max_logit_diff,
        checked_with=checked_with,
        warnings=report_warnings,
    )
