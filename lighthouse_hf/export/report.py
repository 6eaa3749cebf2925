"""``ExportReport``: what an export wrote and what its verification found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    adapter_without_config: bool = False
    """The adapter directory has no config.json of its own (as Trainer saves a PEFT model)."""
    gguf_file: Path | None = None
    """The GGUF file the base weights were dequantized from (no safetensors to compare against)."""
    max_logit_diff: float | None = None
    """Max abs difference between DST's logits and the source's in the source dtype (dense SDPA)."""
    checked_with: str | None = None
    """Transformers version and attention implementation of the plain load check."""
    warnings: list[str] = field(default_factory=list)
    """Every warning issued (an unrecovered source, the cleanup after an interrupted export)."""

    def __str__(self) -> str:
        cast = self.source_dtype if self.dtype == self.source_dtype else f"{self.source_dtype} -> {self.dtype}"
        shard_word = "shard" if self.shards == 1 else "shards"
        lines = [
            f"exported {self.src} -> {self.dst}",
            f"  model      {self.model_type} ({self.model_class}), {cast}"
            + (f", LoRA adapter {self.adapter} merged" if self.adapter else ""),
        ]
        if self.gguf_file is not None:
            lines.append(f"  base       dequantized from {self.gguf_file}")
        lines += [
            f"  tensors    {self.tensors}" + (f" ({', '.join(self.tied)} tied, stored once)" if self.tied else ""),
            f"  bytes      {self.bytes:,} in {self.shards} safetensors {shard_word}",
            f"  files      {', '.join(self.copied_files) or 'none copied (SRC has no tokenizer or generation config)'}",
        ]
        if not self.lighthouse_settings_found:
            lines.append(
                "  recovery   no Lighthouse settings in SRC's config"
                + (
                    " (Trainer saves a PEFT adapter without the model's config.json: save model.config beside "
                    "the adapter, as examples/pretrain.py does, and the export checks that recovery ran)"
                    if self.adapter_without_config
                    else ""
                )
            )
        elif self.recovery_step is None:
            lines.append("  recovery   NEVER RAN (config.lighthouse.recovery_step is None)")
        else:
            lines.append(f"  recovery   dense recovery began at step {self.recovery_step}")
        if self.verified:
            same = "identical to" if self.max_logit_diff == 0 else f"max abs diff {self.max_logit_diff:.3e} from"
            against = (
                "the dequantized GGUF weights as loaded (a GGUF has no safetensors to read)"
                if self.gguf_file is not None
                else "the source files"
            )
            lines += [
                f"  logits     {same} the {self.source_dtype} source's under dense SDPA"
                + ("" if self.dtype == self.source_dtype else f"; identical to the source's cast to {self.dtype}"),
                f"  verified   every tensor bit for bit against {against}; "
                f"plain load without lighthouse_hf ({self.checked_with})",
            ]
        else:
            lines.append("  verified   NO (--no-verify)")
        return "\n".join(lines)
