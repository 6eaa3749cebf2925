"""The recovery switch is visible at Transformers' default verbosity (one line)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow
def test_switch_line_shows_at_default_verbosity():
    # A fresh interpreter: logging exactly as a user's script has it, nothing configured.
    script = textwrap.dedent(
        """
        from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState, TrainingArguments
        import lighthouse_hf

        config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                             num_attention_heads=2)
        model = lighthouse_hf.apply_lighthouse(LlamaForCausalLM(config), topk=128, dense_layers=[0])
        callback = lighthouse_hf.RecoveryCallback(at=2)
        state = TrainerState(max_steps=4, global_step=0)
        args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        state.global_step = 2
        callback.on_step_end(args, state, TrainerControl(), model=model)
        print("implementation:", model.config._attn_implementation)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    switch_lines = [line for line in run.stderr.splitlines() if "dense recovery begins" in line]
    assert len(switch_lines) == 1, run.stderr
    assert "after step 2 of 4" in switch_lines[0]
    assert "implementation: sdpa" in run.stdout


def tiny_lighthouse_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import lighthouse_hf

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2)
    return lighthouse_hf.apply_lighthouse(LlamaForCausalLM(config), topk=128, dense_layers=[0])


def test_switch_is_logged_at_warning_level(caplog):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import lighthouse_hf
    from lighthouse_hf import training

    model = tiny_lighthouse_llama()
    callback = lighthouse_hf.RecoveryCallback(at=2)
    state = TrainerState(max_steps=4, global_step=0)
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    with caplog.at_level(logging.DEBUG, logger=training.__name__):
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        state.global_step = 2
        callback.on_step_end(args, state, TrainerControl(), model=model)
    switches = [record for record in caplog.records if "dense recovery begins" in record.getMessage()]
    assert [(record.name, record.levelno) for record in switches] == [(training.__name__, logging.WARNING)]


@pytest.mark.parametrize("resumed", [False, True], ids=["switch", "resumed_in_recovery"])
def test_only_the_main_process_logs_the_switch(caplog, resumed):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import lighthouse_hf
    from lighthouse_hf import training

    model = tiny_lighthouse_llama()
    callback = lighthouse_hf.RecoveryCallback(at=2)
    state = TrainerState(max_steps=4, global_step=3 if resumed else 0, is_world_process_zero=False)
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    with caplog.at_level(logging.DEBUG, logger=training.__name__):
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        if not resumed:
            state.global_step = 2
            callback.on_step_end(args, state, TrainerControl(), model=model)
    assert not [record for record in caplog.records if "dense recovery" in record.getMessage()]
    # The replica still switches (and records the step where it switches), as on the main process.
    assert model.config._attn_implementation == "sdpa"
    if not resumed:
        assert {"lighthouse_recovery_step": 2, "step": 2} in state.log_history


@pytest.mark.parametrize("main_process", [True, False], ids=["main", "other_rank"])
def test_only_the_main_process_warns_that_a_fraction_leaves_no_recovery_step(main_process):
    import warnings

    from transformers import TrainerControl, TrainerState, TrainingArguments

    import lighthouse_hf

    callback = lighthouse_hf.RecoveryCallback(at=0.99)  # step 4 of 4: no step runs dense
    state = TrainerState(max_steps=4, global_step=0, is_world_process_zero=main_process)
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, TrainerControl(), model=tiny_lighthouse_llama())
    no_recovery = [w for w in caught if "so no step runs dense" in str(w.message)]
    assert len(no_recovery) == (1 if main_process else 0)
    assert callback.recovery_step == 4
