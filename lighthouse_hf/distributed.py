"""Lighthouse models across GPUs: data parallelism, FSDP2 and context parallelism.

Data parallelism (DDP) and FSDP2 need nothing from this module: Lighthouse has no parameters and
its selection is a pure function of each rank's own q and k, so ``Trainer`` under ``torchrun`` or
``accelerate launch`` trains a Lighthouse model like any other, and ``RecoveryCallback`` switches
every rank at the same global step.

Context parallelism (one sequence split across the ranks of a group) is what this module adds:

* :func:`shard_batch` gives a rank its head/tail part of a batch of whole sequences (token ids,
  global position ids for rotary embeddings, labels shifted before the split) and names the group
  in the forward call, so the ``"lighthouse"`` attention function runs the context-parallel ops of
  :mod:`lighthouse_hf.context_parallel` (collectives of ``torch.distributed`` only).
* :class:`ContextParallelTrainer` runs that path inside ``Trainer`` with accelerate's
  ``ParallelismConfig(cp_size=...)``. Trainer itself refuses context parallelism for any attention
  but SDPA: ``Trainer._prepare_context_parallel_inputs`` (``transformers/trainer.py``) raises
  ``ValueError("Context parallelism is supported only with SDPA attention ...")`` when
  ``model.config._attn_implementation != "sdpa"``, because its path,
  ``torch.distributed.tensor.experimental.context_parallel``, works by replacing
  ``torch.nn.functional.scaled_dot_product_attention`` process-wide with ring attention over
  DTensors. The subclass overrides exactly that method: Lighthouse batches are sharded here;
  a model already switched to dense SDPA (the recovery phase) takes Trainer's own path, which is
  what torch's ring attention is built for.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from transformers import Trainer

from .context_parallel import CONTEXT_PARALLEL_KWARG, shard_sequence
from .training import uses_lighthouse

IGNORE_INDEX = -100
"""Label value the Transformers losses skip."""

_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "labels", "shift_labels", "attention_mask", "position_ids")
_WHOLE_BATCH_KEYS = ("num_items_in_batch",)


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """Labels of the next token at every position, as Transformers' causal-LM loss shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def shard_batch(model: torch.nn.Module, batch: Mapping[str, Any], group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """This rank's share of a batch of whole sequences for ``model(**shard_batch(model, batch, group))``.

    ``batch`` holds ``input_ids`` (or ``inputs_embeds``) ``[B, S]`` and optionally ``labels``,
    ``shift_labels``, an all-ones ``attention_mask`` and ``position_ids`` equal to ``0..S-1``;
    every rank of ``group`` (default: the whole world) passes the same batch. ``S`` must be a
    multiple of ``2 * group size``. The result holds this rank's head/tail chunks of the token ids,
    the global position ids, ``shift_labels`` shifted before the split, ``num_items_in_batch`` (the
    number of predicted tokens in the whole batch) and ``lighthouse_cp_group``.

    The model's loss on a rank is then that rank's share of the whole-sequence loss: the sum over
    ranks (``all_reduce``) equals the single-device loss, and so do the summed gradients. Under
    DDP or FSDP2 over the same ranks, which average gradients, multiply the loss by the group size
    before ``backward`` (Trainer does this itself).
    """
    if not uses_lighthouse(model):
        raise ValueError(
            'shard_batch needs a model with attn_implementation="lighthouse"; for dense SDPA use '
            "torch.distributed.tensor.experimental.context_parallel (Trainer with accelerate's ParallelismConfig)"
        )
    allowed = _SEQUENCE_KEYS + _WHOLE_BATCH_KEYS
    unknown = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in allowed)
    if unknown:
        raise ValueError(f"shard_batch cannot split batch keys {unknown}; allowed tensor keys: {', '.join(allowed)}")
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    if tokens is None:
        raise ValueError("batch must hold input_ids or inputs_embeds")
    if tokens.dim() < 2:
        raise ValueError(f"input_ids (or inputs_embeds) must be [batch, seq, ...], got shape {tuple(tokens.shape)}")
    batch_size, seq_len = tokens.shape[:2]
    for key in _SEQUENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) != (batch_size, seq_len) and key != "position_ids":
            raise ValueError(
                f"{key} must start with input_ids' [batch, seq] = [{batch_size}, {seq_len}], got shape {tuple(value.shape)}"
            )
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError(
            "context parallelism splits whole, unpadded sequences: attention_mask must be all ones (or absent)"
        )
    positions = torch.arange(seq_len, device=tokens.device).expand(batch_size, -1)
    given = batch.get("position_ids")
    if given is not None and not torch.equal(given.expand(batch_size, -1), positions):
        raise ValueError(
            "position_ids must be absent or 0..S-1 in every row: packed documents (positions that restart) "
            "are not supported under context parallelism"
        )
    group = group if group is not None else dist.group.WORLD
    sharded: dict[str, Any] = {k: v for k, v in batch.items() if k not in _SEQUENCE_KEYS}
    for key in ("input_ids", "inputs_embeds", "labels"):
        if batch.get(key) is not None:
            sharded[key] = shard_sequence(batch[key], group, dim=1)
    sharded["position_ids"] = shard_sequence(positions, group, dim=1)
    shift_labels = batch.get("shift_labels")
    if shift_labels is None and batch.get("labels") is not None:
        shift_labels = _shift(batch["labels"])
    if shift_labels is not None:
        sharded["shift_labels"] = shard_sequence(shift_labels, group, dim=1)
        sharded.setdefault("num_items_in_batch", (shift_labels != IGNORE_INDEX).sum())
        # The model computes its loss only when labels are given; shift_labels say what it is.
        sharded.setdefault("labels", sharded["shift_labels"])
    sharded[CONTEXT_PARALLEL_KWARG] = group
    return sharded


class ContextParallelTrainer(Trainer):
    """``transformers.Trainer`` that trains Lighthouse models with context parallelism.

    Configure context parallelism as for any Trainer run, with accelerate's
    ``ParallelismConfig(cp_size=N)`` in ``TrainingArguments(parallelism_config=...)`` and FSDP2
    (``fsdp=True, fsdp_config={"version": 2, ...}``; accelerate requires FSDP2 for ``cp_size > 1``).
    Accelerate then hands every rank of a context-parallel group the same batch, shards the model
    over all ranks and scales the loss; this class splits each Lighthouse batch with
    :func:`shard_batch` instead of Trainer's SDPA-only path (see the module docstring). Mix it into
    another ``Trainer`` subclass by listing it first among the bases.
    """

    def _prepare_context_parallel_inputs(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[Callable[[], contextlib.AbstractContextManager], dict[str, Any]]:
        config = getattr(self.accelerator, "parallelism_config", None)
        if config is None or not config.cp_enabled or not uses_lighthouse(model):
            return super()._prepare_context_parallel_inputs(model, inputs)
        sharded = shard_batch(model, inputs, self.accelerator.torch_device_mesh["cp"].get_group())
        # Trainer counts the predicted tokens over the whole step (all micro-batches, all ranks).
        sharded.pop("num_items_in_batch", None)
        return contextlib.nullcontext, sharded
