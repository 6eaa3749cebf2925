"""``lighthouse-hf demo`` end to end (shortened: a few steps at a 2048-byte context)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from lighthouse_hf import compressed_length
from lighthouse_hf.cli import main
from lighthouse_hf.demo import book_text


def test_the_book_ships_with_the_package():
    text = book_text()
    assert text.startswith("Persuasion") and len(text) > 400_000


@pytest.mark.slow
def test_demo_trains_both_phases_and_saves_the_dense_model(tmp_path, capsys):
    assert compressed_length(2048, topk=128) < 2048
    assert main(["demo", "--steps", "4", "--seq-len", "2048", "--recovery", "0.5", "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out, bars = captured.out, captured.err
    assert "attends over 1152 of 2048 positions" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    for phase in ("Lighthouse pre-training", "dense recovery"):
        fields = lines[phase].split()
        assert fields[-5] == "2" and fields[-3] == "->", lines[phase]  # steps, first -> last loss
        assert float(fields[-1].replace(",", "")) > 0  # tokens/s
    assert "recovered model, dense attention" in out
    # Each progress bar ends at its phase's step count showing that phase's last loss (no lag at the switch).
    for phase, bar in (("Lighthouse pre-training", "Lighthouse pre-training"), ("dense recovery", "Dense recovery")):
        last_loss = lines[phase].split()[-2]
        final = [state for state in bars.replace("\r", "\n").splitlines() if state.startswith(bar)][-1]
        assert "2/2" in final and f"loss={last_loss}" in final, final
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.lighthouse["recovery_step"] == 2
    assert model.config._attn_implementation != "lighthouse"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "1024"], "too short for Lighthouse"),
        (["--steps", "1"], "--steps must be"),
        (["--recovery", "1.0"], "--recovery must be"),
        (["--steps", "2", "--recovery", "0.9"], "leaves no dense recovery step"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--steps", "1000"], "lower --steps"),
    ],
)
def test_demo_bad_flags(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["demo", "--output-dir", str(tmp_path), *flags])
