"""The one place lighthouse-hf uses a Transformers name outside its public API.

A model's attention implementation lives in ``config._attn_implementation``: Transformers reads it
there, ``from_pretrained(..., attn_implementation=...)`` and ``model.set_attn_implementation``
write it, and no public accessor exists for a config (a model has ``set_attn_implementation``, which
lighthouse-hf uses wherever it has a model). ``tests/test_seams.py`` fails when Transformers renames it.
One reader sits outside this module on purpose: ``export/plain_load_check.py`` runs in a process
that must not import lighthouse-hf, so it reads the attribute itself; the same seam test covers it,
as the name is Transformers'.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

_ATTRIBUTE = "_attn_implementation"


def _check_available() -> None:
    if not isinstance(getattr(PreTrainedConfig, _ATTRIBUTE, None), property):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} has no PreTrainedConfig.{_ATTRIBUTE} property, which "
            "lighthouse-hf reads to know which attention a model runs; this lighthouse-hf needs an update"
        )


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a model built from ``config`` dispatches to."""
    _check_available()
    return getattr(config, _ATTRIBUTE)


def set_config_attn_implementation(config: Any, name: str) -> None:
    """Make models built from ``config`` (``from_config``) dispatch attention to ``name``."""
    _check_available()
    setattr(config, _ATTRIBUTE, name)
