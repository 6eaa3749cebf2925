"""Lighthouse attention for Hugging Face Transformers.

``import lighthouse_hf`` registers ``attn_implementation="lighthouse"`` with Transformers.
"""

from .config import ATTN_IMPLEMENTATION, LighthouseConfig
from .data import pack_dataset, pack_documents
from .distributed import ContextParallelTrainer, shard_batch
from .export import ExportReport, export_checkpoint
from .integration import apply_lighthouse, register
from .ops import compressed_length, lighthouse_attention
from .training import RecoveryCallback

__version__ = "0.1.0"

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ContextParallelTrainer",
    "ExportReport",
    "LighthouseConfig",
    "RecoveryCallback",
    "apply_lighthouse",
    "compressed_length",
    "export_checkpoint",
    "lighthouse_attention",
    "pack_dataset",
    "pack_documents",
    "shard_batch",
    "__version__",
]
