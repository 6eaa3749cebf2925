"""``lighthouse-hf export``: round trips for the four families, LoRA merge, sharding, casting, bad input,
and interrupted writes. Sources are tiny models trained a few steps with Lighthouse actually running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import lighthouse_hf
from helpers import count_lighthouse_calls, write_tiny_llama_gguf
from lighthouse_hf.export import source as export_source
from lighthouse_hf.export import write as export_write
from lighthouse_hf.cli import main
from lighthouse_hf.export import ExportError, export_checkpoint

SEQ_LEN = 2048
VOCAB = 256
TOPK = 128
LIGHTHOUSE = dict(topk=TOPK, dense_layers=[])
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False),
}
TRAINER_FAMILY = "qwen2"  # saved through a Trainer checkpoint; the others with save_pretrained


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _lighthouse_model(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    return lighthouse_hf.apply_lighthouse(model, **LIGHTHOUSE)


def _train(model, steps: int, seed: int = 0) -> None:
    """A few AdamW steps at a length where Lighthouse compresses; asserts that it ran in every layer."""
    assert lighthouse_hf.compressed_length(SEQ_LEN, topk=TOPK) < SEQ_LEN
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with pytest.MonkeyPatch.context() as patch:
        calls = count_lighthouse_calls(patch.setattr)
        for step in range(steps):
            ids = _batch(seed + step)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert calls.single_device == steps * model.config.num_hidden_layers
    model.eval()


def _start_recovery(model, step: int) -> None:
    """What the training workflow does at the start of dense recovery: record it, switch to SDPA."""
    model.config.lighthouse["recovery_step"] = step
    model.set_attn_implementation("sdpa")


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2").save_pretrained(directory)


class _TokenDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        ids = _batch(index)[0]
        return {"input_ids": ids, "labels": ids}


class _RecoverAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            _start_recovery(model, step=1)


def _trainer_checkpoint(model, out: Path) -> Path:
    """Two Trainer steps, the first with Lighthouse and the second dense; returns checkpoint-2."""
    args = TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=1, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(), callbacks=[_RecoverAfterFirstStep()])
    with pytest.MonkeyPatch.context() as patch:
        calls = count_lighthouse_calls(patch.setattr)
        trainer.train()
    assert calls.single_device == model.config.num_hidden_layers
    return out / "checkpoint-2"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> SRC directory: Lighthouse steps, then the recovery marker."""
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for family in FAMILIES:
        model = _lighthouse_model(family)
        if family == TRAINER_FAMILY:
            paths[family] = _trainer_checkpoint(model, root / family)
            continue
        _train(model, steps=2)
        _start_recovery(model, step=2)
        model.save_pretrained(root / family)
        paths[family] = root / family
    _save_tokenizer(paths["llama"])
    return paths


@pytest.fixture(scope="module")
def adapter(sources, tmp_path_factory):
    """A LoRA adapter on the saved Llama, trained two steps with Lighthouse; saved with the base's path."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(sources["llama"])
    lighthouse_hf.apply_lighthouse(base, **LIGHTHOUSE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(model, steps=2, seed=10)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def _export(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _leftovers(dst: Path) -> list[str]:
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip(family, sources, tmp_path, capsys):
    src, dst = sources[family], tmp_path / "exported"
    code, out, err = _export(capsys, src, dst)
    assert code == 0, err
    assert "identical to the float32 source's under dense SDPA" in out
    assert "NEVER RAN" not in out and "recovery" not in err
    text = (dst / "config.json").read_text()
    assert "lighthouse" not in text.lower() and "attn_implementation" not in text
    assert json.loads(text)["model_type"] == family
    assert json.loads(text)["use_cache"] is True
    assert not (dst / "optimizer.pt").exists() and not (dst / "trainer_state.json").exists()
    assert not _leftovers(dst)

    source_tensors, exported = _tensors(src), _tensors(dst)
    assert exported.keys() == source_tensors.keys()
    assert all(torch.equal(exported[name], source_tensors[name]) for name in exported)
    tied = FAMILIES[family]().tie_word_embeddings
    assert ("lm_head.weight" in exported) != tied
    assert ("lm_head.weight tied" in out) == tied

    if family == "llama":
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert AutoTokenizer.from_pretrained(dst)("w5 w7")["input_ids"] == [5, 7]


def test_pytorch_bin_source(sources, tmp_path, capsys):
    """Checkpoints from before safetensors (pytorch_model.bin) export to safetensors too."""
    src, dst = tmp_path / "bin-source", tmp_path / "exported"
    src.mkdir()
    shutil.copy(sources["llama"] / "config.json", src)
    torch.save(_tensors(sources["llama"]), src / "pytorch_model.bin")
    code, out, err = _export(capsys, src, dst)
    assert code == 0, err
    assert "identical to the float32 source's" in out
    assert _tensors(dst).keys() == _tensors(sources["llama"]).keys()


def test_trainer_output_dir_is_not_a_model_but_names_its_checkpoint(sources, tmp_path, capsys):
    code, _, err = _export(capsys, sources[TRAINER_FAMILY].parent, tmp_path / "exported")
    assert code == 2
    assert "not a model directory" in err and "checkpoint-2" in err


def test_warns_when_never_recovered(sources, tmp_path, capsys):
    src = tmp_path / "unrecovered"
    shutil.copytree(sources["llama"], src)
    config = json.loads((src / "config.json").read_text())
    config["lighthouse"]["recovery_step"] = None
    (src / "config.json").write_text(json.dumps(config))

    code, out, err = _export(capsys, src, tmp_path / "warned", "--no-verify")
    assert code == 0 and (tmp_path / "warned" / "model.safetensors").exists()
    (warning,) = [line for line in err.splitlines() if "warning:" in line]
    assert f"exported {src}, which never ran dense recovery" in warning
    assert "--allow-unrecovered silences this warning" in warning and "export anyway" not in warning
    assert "NEVER RAN" in out and "verified   NO" in out
    code, _, err = _export(capsys, src, tmp_path / "silenced", "--no-verify", "--allow-unrecovered")
    assert code == 0 and "never ran dense recovery" not in err


def test_use_cache_gets_the_model_default(sources, tmp_path, capsys):
    """Trainer saves use_cache false (TrainingArguments.use_cache); the shipped model caches again."""
    assert json.loads((sources[TRAINER_FAMILY] / "config.json").read_text())["use_cache"] is False
    src = _copy_with_config(sources["llama"], tmp_path / "src", "config.json", use_cache=False)
    for source, dst in ((sources[TRAINER_FAMILY], tmp_path / "from-trainer"), (src, tmp_path / "from-llama")):
        code, _, err = _export(capsys, source, dst, "--no-verify")
        assert code == 0, err
        assert json.loads((dst / "config.json").read_text())["use_cache"] is True


def test_sharded(sources, tmp_path, capsys):
    dst = tmp_path / "sharded"
    code, out, err = _export(capsys, sources["mistral"], dst, "--max-shard-size", "100KB")
    assert code == 0, err
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 1 and not (dst / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    exported = _tensors(dst)
    assert index["weight_map"].keys() == exported.keys() == _tensors(sources["mistral"]).keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in exported.values())
    assert f"in {len(shards)} safetensors shards" in out
    assert "Writing model shards" in err and f"{len(shards)}/{len(shards)}" in err  # the progress bar

    # A sharded checkpoint is a valid SRC too: back to one file, read through the index.
    code, out, err = _export(capsys, dst, tmp_path / "one-file")
    assert code == 0, err
    assert "in 1 safetensors shard" in out
    assert all(torch.equal(t, exported[name]) for name, t in _tensors(tmp_path / "one-file").items())


def test_dtype_cast(sources, tmp_path, capsys):
    src, dst = sources["qwen3"], tmp_path / "bf16"
    code, out, err = _export(capsys, src, dst, "--dtype", "bfloat16")
    assert code == 0, err
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    source_tensors, exported = _tensors(src), _tensors(dst)
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(exported[name], source_tensors[name].bfloat16()) for name in exported)
    assert "float32 -> bfloat16" in out and "identical to the source's cast to bfloat16" in out
    assert "max abs diff" in out


def test_lora_merge(sources, adapter, tmp_path, capsys):
    from peft import PeftModel

    base_dir = sources["llama"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    dst = tmp_path / "merged"
    code, out, err = _export(capsys, adapter, dst)  # SRC is the adapter; its base is found locally
    assert code == 0, err
    assert "LoRA adapter" in out and "identical to the float32 source's" in out

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    expected, base_tensors, exported = reference.state_dict(), _tensors(base_dir), _tensors(dst)
    assert exported.keys() == base_tensors.keys()
    assert all(torch.equal(exported[name], expected[name]) for name in exported)
    changed = {name for name in exported if not torch.equal(exported[name], base_tensors[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}
    assert "lora" not in (dst / "config.json").read_text().lower()


def test_report_without_settings_says_where_an_adapter_keeps_them():
    from lighthouse_hf.export import ExportReport

    fields = dict(src=Path("src"), dst=Path("dst"), model_type="llama", model_class="LlamaForCausalLM",
                  source_dtype="float32", dtype="float32", tensors=1, bytes=4, shards=1, tied=[], copied_files=[],
                  recovery_step=None, lighthouse_settings_found=False, verified=False)
    plain = str(ExportReport(adapter=None, **fields))
    with_config = str(ExportReport(adapter=Path("adapter"), **fields))
    without_config = str(ExportReport(adapter=Path("adapter"), adapter_without_config=True, **fields))
    assert "  recovery   no Lighthouse settings in SRC's config\n" in plain and "  recovery   no Lighthouse settings in SRC's config\n" in with_config
    # Trainer saves a PEFT model without config.json: the export cannot see the recovery marker
    assert "no Lighthouse settings in SRC's config (Trainer saves a PEFT adapter without the model's config.json" in without_config


def test_lora_merge_with_adapter_option(sources, adapter, tmp_path, capsys):
    copy = tmp_path / "base-copy"  # the adapter's recorded base path is not needed with --adapter
    shutil.copytree(sources["llama"], copy)
    code, out, err = _export(capsys, copy, tmp_path / "merged", "--adapter", adapter, "--no-verify")
    assert code == 0, err
    merged, base = _tensors(tmp_path / "merged"), _tensors(copy)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], base[q_proj])


def test_lora_merge_keeps_the_config_the_adapter_was_trained_with(sources, adapter, tmp_path, capsys):
    # examples/pretrain.py --lora --rope-factor 2 saves the config it trained with beside the adapter
    trained = tmp_path / "adapter-with-config"
    shutil.copytree(adapter, trained)
    config = json.loads((sources["llama"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config["max_position_embeddings"] *= 2
    (trained / "config.json").write_text(json.dumps(config))
    code, out, err = _export(capsys, trained, tmp_path / "merged")
    assert code == 0, err
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_type"] == "linear" and exported["rope_parameters"]["factor"] == 2.0
    assert exported["max_position_embeddings"] == config["max_position_embeddings"]


# ---------------------------------------------------------------------------------------------
# A LoRA adapter trained on a GGUF base (examples/pretrain.py --gguf-file ... --lora)

GGUF_ROPE_FACTOR = 2


def _dequantized(base: Path, config=None):
    """The GGUF base loaded as examples/pretrain.py loads it: dequantized into a plain float32 model."""
    from transformers import AutoConfig

    gguf_file = next(base.glob("*.gguf")).name
    config = config or AutoConfig.from_pretrained(base, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(base, gguf_file=gguf_file, config=config, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    return plain


@pytest.fixture(scope="module")
def gguf_adapter(tmp_path_factory):
    """(GGUF base directory, LoRA adapter trained on it at twice its context with linear RoPE scaling,
    carrying the config it was trained with)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    base = write_tiny_llama_gguf(root / "base", SMALL, SEQ_LEN)
    config = AutoConfig.from_pretrained(base, gguf_file=next(base.glob("*.gguf")).name)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": GGUF_ROPE_FACTOR}
    config.max_position_embeddings *= GGUF_ROPE_FACTOR
    model = lighthouse_hf.apply_lighthouse(_dequantized(base, config), **LIGHTHOUSE)
    model.config.use_cache = False  # as Trainer leaves it
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(model, steps=2)
    _start_recovery(model.base_model.model, step=2)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    model.base_model.model.config.save_pretrained(adapter)
    adapter_config = export_source.ADAPTER_CONFIG
    _copy_with_config(adapter, root / "adapter-with-base", adapter_config, base_model_name_or_path=str(base))
    return base, root / "adapter-with-base"


def test_lora_on_a_gguf_base(gguf_adapter, tmp_path, capsys):
    from peft import PeftModel

    base, adapter = gguf_adapter
    dst = tmp_path / "merged"
    code, out, err = _export(capsys, adapter, dst)
    assert code == 0, err
    assert f"dequantized from {next(base.glob('*.gguf'))}" in out and "dense recovery began at step 2" in out
    assert "against the dequantized GGUF weights as loaded" in out and "identical to the float32 source's" in out

    config = json.loads((dst / "config.json").read_text())  # the adapter's training config, not the GGUF's
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2
    assert config["max_position_embeddings"] == SEQ_LEN * GGUF_ROPE_FACTOR and config["use_cache"] is True
    assert "lighthouse" not in json.dumps(config)

    dequantized = _dequantized(base)
    base_tensors = {name: tensor.clone() for name, tensor in dequantized.state_dict().items()}
    exported = _tensors(dst)
    reference = PeftModel.from_pretrained(dequantized, adapter).merge_and_unload().state_dict()
    assert exported.keys() == base_tensors.keys()
    assert all(torch.equal(exported[name], reference[name]) for name in exported)
    changed = {name for name in exported if not torch.equal(exported[name], base_tensors[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}


def test_gguf_base_alone_exports_as_safetensors(gguf_adapter, tmp_path, capsys):
    base, _ = gguf_adapter
    code, out, err = _export(capsys, base, tmp_path / "plain")
    assert code == 0, err
    assert "no Lighthouse settings" in out and "dequantized from" in out
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["max_position_embeddings"] == SEQ_LEN
    dequantized = _dequantized(base)
    expected, exported = dequantized.state_dict(), _tensors(tmp_path / "plain")
    tied = {"lm_head.weight"} if dequantized.config.tie_word_embeddings else set()
    assert exported.keys() == expected.keys() - tied
    assert all(torch.equal(t, expected[name]) for name, t in exported.items())


def test_gguf_base_among_other_ggufs_is_not_a_model(gguf_adapter, tmp_path, capsys):
    base, _ = gguf_adapter
    shutil.copytree(base, tmp_path / "two")
    shutil.copy(next(base.glob("*.gguf")), tmp_path / "two" / "other.gguf")
    code, _, err = _export(capsys, tmp_path / "two", tmp_path / "out")
    assert code == 2 and "and 2 .gguf files" in err


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one message, nothing written


def _save_untrained(config, directory: Path) -> Path:
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _copy_with_config(src: Path, out: Path, name: str, **changes) -> Path:
    shutil.copytree(src, out)
    config = json.loads((out / name).read_text())
    (out / name).write_text(json.dumps({**config, **changes}))
    return out


def _unknown_model_type(tmp_path, sources, adapter):
    return [_copy_with_config(sources["llama"], tmp_path / "src", "config.json", model_type="no-such-model")]


def _garbage_weights(tmp_path, sources, adapter):
    shutil.copytree(sources["llama"], tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x00not safetensors at all" * 100)
    return [tmp_path / "src"]


def _no_weights(tmp_path, sources, adapter):
    (tmp_path / "src").mkdir()
    shutil.copy(sources["llama"] / "config.json", tmp_path / "src")
    return [tmp_path / "src"]


def _empty_dir(tmp_path, sources, adapter):
    (tmp_path / "src").mkdir()
    return [tmp_path / "src"]


def _base_not_found(tmp_path, sources, adapter):
    moved = _copy_with_config(adapter, tmp_path / "src", "adapter_config.json", base_model_name_or_path="/no/such/base")
    return [moved]


def _narrower_base(tmp_path, sources, adapter):
    base = _save_untrained(LlamaConfig(**{**SMALL, "hidden_size": 32}), tmp_path / "narrow-llama")
    return [base, "--adapter", adapter]


def _base_without_targets(tmp_path, sources, adapter):
    base = _save_untrained(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2), tmp_path / "gpt2")
    return [base, "--adapter", adapter]


BAD_INPUTS = {
    "missing SRC": (lambda tmp_path, sources, adapter: [tmp_path / "nowhere"], "does not exist"),
    "SRC a file": (lambda tmp_path, sources, adapter: [sources["llama"] / "config.json"], "is not a directory"),
    "SRC not a model": (_empty_dir, "not a model directory"),
    "unknown model type": (_unknown_model_type, "no-such-model"),
    "unreadable weights": (_garbage_weights, "cannot read the weights"),
    "no weights": (_no_weights, "no weights"),
    "adapter base not found": (_base_not_found, "nor in the Hugging Face cache"),
    "adapter with other shapes": (_narrower_base, "does not match its base"),
    "adapter for absent modules": (_base_without_targets, "does not match its base"),
    "adapter option not an adapter": (
        lambda tmp_path, sources, adapter: [sources["llama"], "--adapter", sources["qwen3"]],
        "not a PEFT adapter directory",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, sources, adapter, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    src, *options = make_args(tmp_path, sources, adapter)
    dst = tmp_path / "exported"
    code, out, err = _export(capsys, src, dst, *options)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert out == "" and not dst.exists() and not _leftovers(dst)


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lighthouse_hf", "export", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"lighthouse-hf export: error: SRC {tmp_path / 'nowhere'} does not exist"]


def test_dst_overlapping_src_is_refused(sources, tmp_path, capsys):
    inside = sources["llama"] / "exported"
    code, _, err = _export(capsys, sources["llama"], inside)
    assert code == 2 and "overlaps the source" in err and not inside.exists()


def test_refuses_non_empty_dst_without_overwrite(sources, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = _export(capsys, sources["llama"], dst)
    assert code == 2 and "--overwrite" in err and (dst / "keep.txt").read_text() == "mine"
    code, _, err = _export(capsys, sources["llama"], dst, "--overwrite", "--no-verify")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert not _leftovers(dst)


def test_bad_shard_size_is_a_usage_error(sources, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(sources["llama"]), str(tmp_path / "x"), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2 and "max shard size" in capsys.readouterr().err
    with pytest.raises(ExportError, match="dtype"):
        export_checkpoint(sources["llama"], tmp_path / "x", dtype="int8")


# ---------------------------------------------------------------------------------------------
# Interrupted or failed writes leave no DST (and an existing DST as it was)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_no_dst(existing, sources, tmp_path, monkeypatch):
    dst = tmp_path / "exported"
    if existing:
        dst.mkdir()
        (dst / "old.txt").write_text("old")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_write, "copy_side_files", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(sources["llama"], dst, max_shard_size="100KB", overwrite=existing)
    if existing:
        assert os.listdir(dst) == ["old.txt"]
    else:
        assert not dst.exists()
    assert not _leftovers(dst)


def _killed_export(src: Path, dst: Path, at: str, *options: str) -> None:
    """Export in a subprocess that SIGKILLs itself at ``at``: "copy" (the weights are written, not yet
    verified) or "rename in" (a replacement between its two renames: DST moved aside)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from lighthouse_hf.export import export_checkpoint, write

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        if {at!r} == "copy":
            write.copy_side_files = die
        else:
            rename = os.rename
            write.os.rename = lambda a, b: die() if ".verified-" in str(a) else rename(a, b)
        export_checkpoint({str(src)!r}, {str(dst)!r}, max_shard_size="100KB", {", ".join(options)})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


@pytest.mark.slow
def test_killed_write_leaves_no_dst_and_the_next_export_cleans_up(sources, tmp_path, capsys):
    dst = tmp_path / "exported"
    _killed_export(sources["llama"], dst, "copy")
    assert not dst.exists()
    (staged,) = [tmp_path / name for name in _leftovers(dst)]  # only the hidden staging directory
    assert staged.name.startswith(".exported.export-") and list(staged.glob("model-*.safetensors"))

    code, out, err = _export(capsys, sources["llama"], dst, "--no-verify")
    assert code == 0, err
    assert f"warning: removed {staged}, left by an export (process" in err and "killed while writing" in err
    assert not _leftovers(dst) and (dst / "model.safetensors").exists()


@pytest.mark.slow
def test_replacement_killed_between_renames_is_finished_by_the_next_export(sources, tmp_path, capsys):
    dst = tmp_path / "exported"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    _killed_export(sources["llama"], dst, "rename in", "overwrite=True")
    assert not dst.exists()
    leftovers = sorted(name.split("-")[0] for name in _leftovers(dst))
    assert leftovers == [".exported.replaced", ".exported.verified"]

    # Any export to DST finishes the replacement first; this one then stops at the non-empty DST.
    code, _, err = _export(capsys, sources["qwen3"], dst)
    assert code == 2 and "pass --overwrite" in err
    assert "finished a replacement of DST" in err and "DST is its new, verified checkpoint" in err
    assert "removed" in err and "the previous DST replaced by an export" in err
    assert not (dst / "old.txt").exists() and not _leftovers(dst)
    assert _tensors(dst).keys() == _tensors(sources["llama"]).keys()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "dst_exists, expected",
    [
        # DST absent: a verified checkpoint is renamed in; without one the displaced old DST comes back.
        (False, {("verified", "replaced"): "new", ("replaced",): "old", ("export",): None}),
        # DST present (the old or the new one): every leftover of a dead export is removed.
        (True, {("verified", "replaced"): "present", ("replaced",): "present", ("export",): "present"}),
    ],
)
def test_recovery_after_killed_exports(dst_exists, expected, tmp_path):
    for stages, result in expected.items():
        dst = tmp_path / f"dst-{'-'.join(stages)}"
        if dst_exists:
            dst.mkdir()
            (dst / "content.txt").write_text("present")
        pid = _dead_pid()
        for stage, content in zip(("verified", "replaced", "export"), ("new", "old", "partial")):
            if stage in stages:
                folder = tmp_path / f".{dst.name}.{stage}-{pid}-0123abcd"
                folder.mkdir()
                (folder / "content.txt").write_text(content)
        live = tmp_path / f".{dst.name}.export-{os.getpid()}-0123abcd"  # a running export's: left alone
        live.mkdir()
        done = export_write.recover(dst)
        assert len(done) == len(stages) and all(str(pid) in line for line in done)
        assert (dst / "content.txt").read_text() == result if result else not dst.exists()
        assert _leftovers(dst) == [live.name]


def test_replacement_rolls_back_when_the_second_rename_raises(tmp_path, monkeypatch):
    dst = tmp_path / "exported"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    staged = export_write.create_staging(dst)
    (staged / "new.txt").write_text("new")
    rename = os.rename

    def interrupted(a, b):
        if ".verified-" in str(a):
            raise KeyboardInterrupt
        rename(a, b)

    monkeypatch.setattr(export_write.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_write.replace(staged, dst, overwrite=True)
    assert os.listdir(dst) == ["old.txt"] and not _leftovers(dst)


def test_dst_that_cannot_be_created_is_bad_input(sources, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    dst = tmp_path / "a-file" / "exported"
    code, out, err = _export(capsys, sources["llama"], dst)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"lighthouse-hf export: error: DST {dst} cannot be created: {tmp_path / 'a-file'} is a file, not a directory"
    ]


def test_dst_in_a_read_only_directory_is_bad_input(sources, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: the permission check is asked as an ordinary user would be
        access = os.access
        monkeypatch.setattr(export_write.os, "access", lambda path, mode: access(path, mode) and Path(path) != locked)
    code, _, err = _export(capsys, sources["llama"], locked / "exported")
    assert code == 2 and "cannot be created: no permission to write in" in err


def test_dst_written_to_during_the_export_is_kept_without_overwrite(sources, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "exported"
    load_model = export_source.load_model

    def meanwhile(source):  # someone writes into DST while the model loads
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
        return load_model(source)

    monkeypatch.setattr(export_source, "load_model", meanwhile)
    code, _, err = _export(capsys, sources["llama"], dst)
    assert code == 2 and f"DST {dst} was written to during the export" in err and "pass --overwrite" in err
    assert os.listdir(dst) == ["notes.txt"] and not _leftovers(dst)


def test_dst_that_is_a_symbolic_link_is_refused(sources, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, err = _export(capsys, sources["llama"], link, "--overwrite")
    assert code == 2 and f"DST {link} is a symbolic link; give the directory it points to, {target}" in err
    assert link.is_symlink() and not any(target.iterdir())


def test_failed_verification_writes_nothing(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_source, "strip_lighthouse", lambda config: None)
    dst = tmp_path / "exported"
    code, out, err = _export(capsys, sources["llama"], dst)
    assert code == 1 and "verification failed" in err and "config.lighthouse" in err
    assert out == "" and not dst.exists() and not _leftovers(dst)
