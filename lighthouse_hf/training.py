"""Two-stage training with ``transformers.Trainer``: Lighthouse pre-training, then dense recovery.

The switch is a pure function of the global step: steps ``1..at`` run with Lighthouse and every
later step runs with dense SDPA. That is what makes resuming simple: a run resumed from any
checkpoint lands in the phase its global step belongs to, whatever the model object in memory
says, and the losses that follow equal those of an uninterrupted run.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .config import ATTN_IMPLEMENTATION, CONFIG_KEY, LighthouseConfig
from .dispatch import LighthouseWarning
from .hf_internals import attn_implementation
from .prenorm import uninstall as stop_recording_pre_norm_scores
from .validation import is_int

logger = logging.get_logger(__name__)

DENSE_IMPLEMENTATION = "sdpa"
"""What the recovery phase runs: the dense attention that Lighthouse layers fall back to."""


def activation_checkpointing(enabled: bool) -> dict[str, bool]:
    """The ``TrainingArguments`` keyword for activation checkpointing in the installed Transformers
    (``gradient_checkpointing`` became ``activation_checkpointing`` during 5.x; the old name warns)."""
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled}


def enable_activation_checkpointing(model: PreTrainedModel, checkpointing_kwargs: dict[str, Any] | None = None) -> None:
    """``model.activation_checkpointing_enable`` in the installed Transformers, else its older name
    ``gradient_checkpointing_enable`` (renamed during 5.x; the old name warns); ``checkpointing_kwargs``
    go to ``torch.utils.checkpoint`` (e.g. ``{"use_reentrant": False}``)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)


def lighthouse_models(model: torch.nn.Module) -> Iterator[PreTrainedModel]:
    """The outermost Transformers models inside ``model`` (a model, a PEFT wrapper, a DDP wrapper)
    that currently dispatch attention to Lighthouse."""
    seen_configs: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or id(module.config) in seen_configs:
            continue
        seen_configs.add(id(module.config))
        if attn_implementation(module.config) == ATTN_IMPLEMENTATION:
            yield module


def uses_lighthouse(model: torch.nn.Module) -> bool:
    """Whether any Transformers model inside ``model`` dispatches attention to Lighthouse."""
    return next(lighthouse_models(model), None) is not None


def switch_to_dense(model: torch.nn.Module, recovery_step: int) -> list[PreTrainedModel]:
    """Switch every Lighthouse model inside ``model`` to dense SDPA and record ``recovery_step`` in
    its ``config.lighthouse``; returns the models it switched."""
    switched = list(lighthouse_models(model))
    for pretrained in switched:
        settings = LighthouseConfig.from_model_config(pretrained.config)
        settings.recovery_step = recovery_step
        setattr(pretrained.config, CONFIG_KEY, settings.to_dict())
        pretrained.set_attn_implementation(DENSE_IMPLEMENTATION)
        stop_recording_pre_norm_scores(pretrained)
    return switched


def _check_at(at: object) -> int | float:
    if is_int(at) and at >= 0:
        return at
    if isinstance(at, float) and 0.0 < at < 1.0:
        return at
    raise ValueError(
        f"at must be an int >= 0 (the global step at which recovery begins) or a float in (0, 1) "
        f"(that fraction of max_steps), got {at!r}"
    )


class RecoveryCallback(TrainerCallback):
    """Switch Lighthouse models to dense SDPA ("recovery") once training reaches a chosen step.

    ``at`` is an int (the absolute global step) or a float in (0, 1) (a fraction of
    ``max_steps``, rounded to the nearest step). The first ``at`` optimizer steps run with
    Lighthouse, all later ones dense. The switch happens in ``on_step_end``, after an optimizer
    step and before the next forward, so it never separates a forward from its backward (nor the
    recomputed forwards of gradient checkpointing, nor the micro-batches of one accumulated step),
    and a checkpoint saved at step ``at`` already holds the dense model.

    Every switched model gets ``config.lighthouse["recovery_step"] = at`` (so saved checkpoints
    say which phase they are in), the switch is logged in one line at warning level (shown at
    Transformers' default verbosity), and ``state.log_history`` gets an entry
    ``{"lighthouse_recovery_step": at, "step": at}``. A run resumed from a checkpoint at or past
    ``at`` switches before its first step; one resumed from an earlier checkpoint stays on
    Lighthouse until ``at``.
    """

    def __init__(self, at: int | float) -> None:
        self.at = _check_at(at)
        self.recovery_step: int | None = None
        """The global step at which recovery begins; resolved when training starts."""

    def resolve(self, max_steps: int, *, warn: bool = True) -> int:
        """The global step at which recovery begins, for a run of ``max_steps`` steps; ``warn``: say
        so when a fraction leaves no recovery step (a callback passes it on the main process only)."""
        step = max(1, round(self.at * max_steps)) if isinstance(self.at, float) else self.at
        if step > max_steps:
            raise ValueError(
                f"at={self.at!r} puts recovery at step {step}, after the last step ({max_steps}); "
                "choose a step <= max_steps or a fraction in (0, 1)"
            )
        if warn and isinstance(self.at, float) and step == max_steps:
            # a fraction asks for a recovery phase; a run this short has none (a smoke run may mean it)
            warnings.warn(
                f"at={self.at!r} of max_steps={max_steps} puts recovery at step {step}, the last, so no step "
                "runs dense; choose a smaller fraction or more steps for a recovery phase",
                LighthouseWarning,
                stacklevel=2,
            )
        return step

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any
    ) -> None:
        self.recovery_step = self.resolve(state.max_steps, warn=state.is_world_process_zero)
        if state.global_step < self.recovery_step:
            if not uses_lighthouse(model) and state.is_world_process_zero:
                logger.warning(
                    "RecoveryCallback: the model does not use Lighthouse attention, so there is nothing to "
                    f'switch at step {self.recovery_step}; set attn_implementation="{ATTN_IMPLEMENTATION}" '
                    "(e.g. with lighthouse_hf.apply_lighthouse) to train with it."
                )
            return
        # A run resumed inside the recovery phase (or asked to recover from the start).
        if switch_to_dense(model, self.recovery_step) and state.is_world_process_zero:
            logger.warning(
                f"Lighthouse: step {state.global_step} is in the dense recovery phase that began at step "
                f"{self.recovery_step}; training continues with dense {DENSE_IMPLEMENTATION} attention."
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any
    ) -> None:
        if state.global_step != self.recovery_step:
            return
        switched = switch_to_dense(model, self.recovery_step)
        if switched:
            if state.is_world_process_zero:  # every rank switches its own replica; one line says so
                logger.warning(
                    f"Lighthouse: dense recovery begins after step {self.recovery_step} of {state.max_steps}; "
                    f"switched {len(switched)} model(s) to {DENSE_IMPLEMENTATION} attention."
                )
            state.log_history.append({"lighthouse_recovery_step": self.recovery_step, "step": state.global_step})
