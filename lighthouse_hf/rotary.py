"""The rotary inverse frequencies a model's attention inputs were rotated with (for ``rope="span_end"``).

Transformers rotates q and k before the attention function sees them, with frequencies from
``config.rope_parameters``: ``rope_type`` "default" is ``rope_theta ** (-2i / dim)``, every other
type comes from Transformers' own ``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn, longrope, llama3),
so the frequencies here are the ones the model's rotary embedding computes. ``dim`` is the rotated
part of a head: ``head_dim * partial_rotary_factor``. The dynamic and longrope types depend on the
sequence length, which is that of the call (position ids ``0..S-1`` in training). An attention
scaling factor (yarn) multiplies q and k but does not rotate them, so it plays no part.
"""

from __future__ import annotations

from typing import Any

import torch

_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _rope_parameters(config: Any) -> dict[str, Any]:
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict) or "rope_type" not in parameters:
        raise ValueError(
            f'config.lighthouse["rope"] = "span_end" needs the model\'s rotary settings in config.rope_parameters '
            f"(a dict with rope_type and rope_theta); {type(config).__name__} has {parameters!r}"
        )
    if any(isinstance(value, dict) for value in parameters.values()):
        raise ValueError(
            'config.lighthouse["rope"] = "span_end" supports one rotary setting for all layers; this model has '
            f"one per layer type ({sorted(parameters)})"
        )
    theta = parameters.get("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise ValueError(
            f'config.lighthouse["rope"] = "span_end" needs config.rope_parameters["rope_theta"], a number > 1; '
            f"got {theta!r}"
        )
    return parameters


def rope_inv_freq(config: Any, seq_len: int, device: torch.device) -> torch.Tensor:
    """float32 ``[dim / 2]`` inverse frequencies of the model built from ``config``, for a call of
    ``seq_len`` positions, computed on ``device`` (a few tiny kernels: no host-to-device copy,
    which would wait for the GPU's queue)."""
    parameters = _rope_parameters(config)
    rope_type = parameters["rope_type"]
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * parameters.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / parameters["rope_theta"] ** exponents
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f'config.lighthouse["rope"] = "span_end" does not know rope_type {rope_type!r}; known: default, '
            f"{', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    length = seq_len if rope_type in _LENGTH_DEPENDENT else None
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=length)
    return inv_freq.float()
