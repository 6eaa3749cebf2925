"""Export options that the command line validates too; importing this needs no torch."""

from __future__ import annotations

import re

from .errors import ExportError

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Decimal units as the Hugging Face Hub counts them ("5GB" is 5 * 10**9 bytes), binary ones by name.
SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: str | int) -> int:
    """A shard size in bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in SIZE_UNITS:
            raise ExportError(f"max shard size must look like 5GB, 500MB, 2GiB or a number of bytes, got {value!r}")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise ExportError(f"max shard size must be at least 1 byte, got {value!r}")
    return size
