"""Lighthouse attention for Hugging Face Transformers.

``import lighthouse_hf`` registers ``attn_implementation="lighthouse"`` (and its mask function)
with Transformers' registries, and nothing else. The training, data, context-parallel and export
APIs load on first use, so importing the package does not import ``Trainer`` or accelerate.
"""

import importlib

from .config import ATTN_IMPLEMENTATION, LighthouseConfig
from .dispatch import LighthouseWarning
from .integration import apply_lighthouse, register
from .ops import compressed_length, lighthouse_attention

from .version import __version__

register()

_LAZY = {
    "ContextParallelTrainer": "distributed",
    "shard_batch": "distributed",
    "RecoveryCallback": "training",
    "pack_dataset": "data",
    "pack_documents": "data",
    "ExportReport": "export",
    "export_checkpoint": "export",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "LighthouseConfig",
    "LighthouseWarning",
    "__version__",
    "apply_lighthouse",
    "compressed_length",
    "lighthouse_attention",
    *_LAZY,
]
