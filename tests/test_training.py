"""RecoveryCallback with transformers.Trainer on CPU: switch step, resume, accumulation, checkpointing, bf16, LoRA, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import lighthouse_hf
from lighthouse_hf import RecoveryCallback
from lighthouse_hf.training import activation_checkpointing, enable_activation_checkpointing
from helpers import free_port
from training_helpers import NUM_LAYERS, PhaseProbe, RandomBlocks, step_losses, tiny_lighthouse_model, training_args

LIGHTHOUSE, DENSE = "lighthouse", "sdpa"


def train(tmp_path, at, probe, model=None, steps=4, **overrides) -> tuple[Trainer, RecoveryCallback]:
    model = model if model is not None else tiny_lighthouse_model()
    recovery = RecoveryCallback(at=at)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=steps, **overrides),
        train_dataset=RandomBlocks(8),
        callbacks=[recovery, probe],
    )
    trainer.train()
    return trainer, recovery


@pytest.mark.parametrize(
    "at, recovery_step",
    [(2, 2), pytest.param(0.75, 3, marks=pytest.mark.slow), pytest.param(0.5, 2, marks=pytest.mark.slow)],
)
def test_switch_at_absolute_step_and_fraction(tmp_path, lighthouse_calls, at, recovery_step):
    probe = PhaseProbe(lighthouse_calls)
    trainer, recovery = train(tmp_path, at, probe)
    assert recovery.recovery_step == recovery_step
    assert probe.implementations == [LIGHTHOUSE] * recovery_step + [DENSE] * (4 - recovery_step)
    # Lighthouse really ran in every layer of the first phase and never after it.
    assert probe.lighthouse_calls == [NUM_LAYERS] * recovery_step + [0] * (4 - recovery_step)
    assert trainer.model.config.lighthouse["recovery_step"] == recovery_step
    marks = [entry for entry in trainer.state.log_history if "lighthouse_recovery_step" in entry]
    assert marks == [{"lighthouse_recovery_step": recovery_step, "step": recovery_step}]


def test_at_zero_recovers_from_the_start(tmp_path, lighthouse_calls):
    probe = PhaseProbe(lighthouse_calls)
    train(tmp_path, 0, probe, steps=2)
    assert probe.implementations == [DENSE, DENSE]
    assert probe.lighthouse_calls == [0, 0]


@pytest.mark.parametrize("at", [-1, 1.0, 0.0, 1.5, True, "0.5", None])
def test_bad_at_raises(at):
    with pytest.raises(ValueError, match="at must be"):
        RecoveryCallback(at=at)


def test_a_fraction_that_rounds_to_the_last_step_warns():
    assert RecoveryCallback(at=0.9).resolve(10) == 9  # one dense step
    for at in (0.95, 0.99):
        with pytest.warns(lighthouse_hf.LighthouseWarning, match=f"at={at} of max_steps=10 puts recovery at step 10, "
                                                                 "the last, so no step runs dense"):
            assert RecoveryCallback(at=at).resolve(10) == 10
    assert RecoveryCallback(at=10).resolve(10) == 10  # a step is taken as given


def test_recovery_after_the_last_step_raises(tmp_path, lighthouse_calls):
    with pytest.raises(ValueError, match="at=5 puts recovery at step 5, after the last step"):
        train(tmp_path, 5, PhaseProbe(lighthouse_calls))


@pytest.mark.slow
def test_accumulation_checkpointing_bf16_switch_between_optimizer_steps(tmp_path, lighthouse_calls):
    probe = PhaseProbe(lighthouse_calls)
    trainer, _ = train(
        tmp_path, 2, probe, steps=3, gradient_accumulation_steps=2, bf16=True, **activation_checkpointing(True)
    )
    # 2 micro-batches x 2 layers x (forward + recomputed forward): all of a step or none of it.
    assert probe.lighthouse_calls == [8, 8, 0]
    assert probe.implementations == [LIGHTHOUSE, LIGHTHOUSE, DENSE]
    losses = step_losses(trainer.state.log_history)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))


@pytest.mark.slow
def test_resume_before_and_after_the_switch_matches_an_uninterrupted_run(tmp_path, lighthouse_calls):
    checkpoints = dict(save_strategy="steps", save_steps=2)
    full_probe = PhaseProbe(lighthouse_calls)
    full, _ = train(tmp_path, 3, full_probe, steps=6, **checkpoints)
    full_losses = step_losses(full.state.log_history)
    assert full_probe.implementations == [LIGHTHOUSE] * 3 + [DENSE] * 3
    run_dir = tmp_path / "run"
    before, after = run_dir / "checkpoint-2", run_dir / "checkpoint-4"
    assert json.loads((before / "config.json").read_text())["lighthouse"]["recovery_step"] is None
    assert json.loads((after / "config.json").read_text())["lighthouse"]["recovery_step"] == 3
    final_weights = {name: p.detach().clone() for name, p in full.model.named_parameters()}

    for checkpoint, phases in ((before, [LIGHTHOUSE, DENSE, DENSE, DENSE]), (after, [DENSE, DENSE])):
        probe = PhaseProbe(lighthouse_calls)
        recovery = RecoveryCallback(at=3)
        # A fresh Lighthouse model: the step alone decides the phase.
        trainer = Trainer(
            model=tiny_lighthouse_model(seed=99),
            args=training_args(tmp_path / "resumed", max_steps=6),
            train_dataset=RandomBlocks(8),
            callbacks=[recovery, probe],
        )
        trainer.train(resume_from_checkpoint=str(checkpoint))
        assert probe.implementations == phases, checkpoint.name
        resumed_losses = step_losses(trainer.state.log_history)
        first = 7 - len(phases)
        assert {step: resumed_losses[step] for step in range(first, 7)} == {
            step: full_losses[step] for step in range(first, 7)
        }, checkpoint.name
        for name, parameter in trainer.model.named_parameters():
            assert torch.equal(parameter, final_weights[name]), (checkpoint.name, name)
        assert trainer.model.config.lighthouse["recovery_step"] == 3


@pytest.mark.slow
def test_lora_keeps_lighthouse_trains_only_adapters_and_switches(tmp_path, lighthouse_calls):
    from peft import LoraConfig, get_peft_model

    base = tiny_lighthouse_model()
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert model.config._attn_implementation == LIGHTHOUSE
    probe = PhaseProbe(lighthouse_calls)
    trainer, _ = train(tmp_path, 2, probe, model=model, learning_rate=1e-2)
    assert probe.lighthouse_calls == [NUM_LAYERS, NUM_LAYERS, 0, 0]
    assert probe.implementations == [LIGHTHOUSE, LIGHTHOUSE, DENSE, DENSE]
    assert base.config._attn_implementation == DENSE
    assert base.config.lighthouse["recovery_step"] == 2
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        original = frozen[name.replace(".base_layer", "")]
        assert torch.equal(p, original), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for name, p in model.named_parameters() if "lora_B" in name)


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tmp_path):
    script = Path(__file__).with_name("ddp_recovery_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["implementations"] == [LIGHTHOUSE, LIGHTHOUSE, DENSE]
        assert report["lighthouse_calls"] == [NUM_LAYERS, NUM_LAYERS, 0]
        assert report["recovery_step"] == 2
    # Data parallel: both ranks hold the same weights after every step.
    assert reports[0]["weight_checksum"] == reports[1]["weight_checksum"]


def test_lighthouse_models_sees_through_wrappers():
    model = tiny_lighthouse_model()
    wrapper = torch.nn.ModuleDict({"inner": model})
    assert list(lighthouse_hf.training.lighthouse_models(wrapper)) == [model]
    model.set_attn_implementation(DENSE)
    assert list(lighthouse_hf.training.lighthouse_models(wrapper)) == []


def test_activation_checkpointing_is_enabled_under_the_installed_transformers_name():
    """The model method's newer name where it exists (the older one warns), else the older one."""
    calls = []

    class OlderTransformers:
        def gradient_checkpointing_enable(self, kwargs=None):
            calls.append(("gradient_checkpointing_enable", kwargs))

    class NewerTransformers(OlderTransformers):
        def activation_checkpointing_enable(self, kwargs=None):
            calls.append(("activation_checkpointing_enable", kwargs))

    enable_activation_checkpointing(OlderTransformers(), {"use_reentrant": False})
    enable_activation_checkpointing(NewerTransformers())
    assert calls == [("gradient_checkpointing_enable", {"use_reentrant": False}), ("activation_checkpointing_enable", None)]
