"""Level-0 scores from before a family's per-head q/k norm (``scores="pre_norm"``).

Qwen3 passes each head's q and k through an RMSNorm (``q_norm``, ``k_norm``) before the attention
function sees them, so their norms are ``sqrt(head_dim)`` times the norm weight's RMS at every
position: all scores tie at initialization. The norms *entering* those RMSNorms carry the content.
A forward pre-hook on each norm records them, ``[B, H, S]`` float32, on the norm module; the
attention call that follows in the same layer takes them (and clears them). The hook runs again
wherever the layer's forward does (activation checkpointing's recomputation included), so a call
always reads the norms of its own inputs. The hooks are installed by ``apply_lighthouse`` or by a
layer's first Lighthouse call (not a dense layer's), and removed when training switches to dense
recovery; a Lighthouse call that finds no recorded norms (the very first call of a layer loaded
with ``attn_implementation="lighthouse"``, or compiled before any hook existed) scores the norms of q
and k as given, warns and installs them; hooks that were installed and then did not run in a
forward are an error, not that silent fallback.
Because the norms wait on the module between the hook and the call, one model must not run
forwards in two threads at once (DataParallel's replicas are separate modules, and are fine).
"""

from __future__ import annotations

import torch

RECORDED = "lighthouse_input_norms"
"""Attribute of a q/k norm module holding the norms of its last input, until an attention call takes them."""
_FRESH = "awaiting its first forward"
"""``RECORDED`` of a norm whose hook was installed after its last forward: nothing recorded yet, as expected."""
_HOOK = "lighthouse_input_norms_hooked"
"""Attribute of a q/k norm module: True once its recording hook is installed."""


def _record_input_norms(norm: torch.nn.Module, args: tuple) -> None:
    # The norm's input is [B, S, heads, head_dim]; attention works in [B, heads, S]. Scores take no
    # gradient, and a graph hanging off the norm module would upset checkpointing's recomputation.
    norms = torch.linalg.vector_norm(args[0].detach(), dim=-1, dtype=torch.float32)
    setattr(norm, RECORDED, norms.transpose(1, 2))


def install(attention: torch.nn.Module, norm_names: tuple[str, str]) -> None:
    """Record the input norms of ``attention``'s per-head q and k norms from now on (idempotent)."""
    for name in norm_names:
        norm = getattr(attention, name, None)
        if not isinstance(norm, torch.nn.Module):
            raise ValueError(
                f"{type(attention).__name__} has no module {name!r}, which its family adapter names as a per-head "
                'q/k norm; set config.lighthouse["scores"] = "qk"'
            )
        if getattr(norm, _HOOK, False):
            continue
        # A DataParallel replica shares its original's hook dict (a shallow copy), so an earlier
        # step's replica may have installed the hook already, and it may have recorded this call.
        if _record_input_norms not in norm._forward_pre_hooks.values():
            norm.register_forward_pre_hook(_record_input_norms)
        setattr(norm, _HOOK, True)
        if not isinstance(getattr(norm, RECORDED, None), torch.Tensor):
            setattr(norm, RECORDED, _FRESH)


def uninstall(model: torch.nn.Module) -> None:
    """Stop recording in every q/k norm of ``model`` (a model switched to dense attention would
    only pay for the norms; a later Lighthouse call installs the hooks again)."""
    for module in model.modules():
        # by value, not by handle: a DataParallel replica may have added the hook to this module's dict
        hooks = module._forward_pre_hooks
        for key in [key for key, hook in hooks.items() if hook is _record_input_norms]:
            del hooks[key]
        if getattr(module, _HOOK, False):
            setattr(module, _HOOK, False)
            setattr(module, RECORDED, None)


def take(attention: torch.nn.Module, norm_names: tuple[str, str], query: torch.Tensor, key: torch.Tensor):
    """The recorded norms of this call's q and k (``[B, H, S]``, ``[B, Hkv, S]``), or None where
    the hooks are not installed or were installed after this forward's norms ran. A RuntimeError
    where they were installed before and still recorded nothing: they did not run, as in a model
    compiled before they existed, whose compiled code leaves them out."""
    recorded = []
    for name, x in zip(norm_names, (query, key)):
        norm = getattr(attention, name)
        scores = getattr(norm, RECORDED, None)
        setattr(norm, RECORDED, None)
        if scores is None and getattr(norm, _HOOK, False):
            raise RuntimeError(
                f"layer {getattr(attention, 'layer_idx', None)}: the forward pre-hook that records the input norms of "
                f"{name} (scores='pre_norm') did not run in this forward: something called the norm without its "
                "module's hooks (a patched attention forward, a cleared hook dict, or compiled code built without "
                "them). Call lighthouse_hf.apply_lighthouse(model) after such patches and before torch.compile, or "
                "set config.lighthouse['scores'] = 'qk'"
            )
        recorded.append(scores if isinstance(scores, torch.Tensor) and scores.shape == x.shape[:3] else None)
    return None if any(scores is None for scores in recorded) else tuple(recorded)
