"""The package's seams: what ``import lighthouse_hf`` does and does not do, the one helper for a
Transformers-private name, and the layering of the modules."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lighthouse_hf
from lighthouse_hf import hf_internals

PACKAGE = pathlib.Path(lighthouse_hf.__file__).parent


@pytest.mark.slow
def test_import_loads_neither_trainer_nor_export_nor_more_than_the_registry_needs():
    # One fresh interpreter: the modules Transformers' registry needs, then those of lighthouse_hf
    # on top (it imports the registry itself, so the second set is what ``import lighthouse_hf`` loads).
    script = """
import json, sys
import transformers.modeling_utils, transformers.masking_utils
registry_only = sorted(sys.modules)
import lighthouse_hf
print(json.dumps([registry_only, sorted(sys.modules)]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    registry_only, loaded = map(set, json.loads(out.stdout.splitlines()[-1]))
    for module in ("transformers.trainer", "lighthouse_hf.export", "lighthouse_hf.distributed", "lighthouse_hf.training", "datasets"):
        assert module not in loaded, module
    # accelerate only as far as Transformers' own modeling_utils (where the attention registry lives) loads it
    assert ("accelerate" in loaded) == ("accelerate" in registry_only)


def test_lazy_names_resolve():
    for name in ("RecoveryCallback", "pack_dataset", "pack_documents", "shard_batch", "ContextParallelTrainer",
                 "export_checkpoint", "ExportReport"):
        assert getattr(lighthouse_hf, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lighthouse_hf.nothing


def test_attn_implementation_helper_reads_and_writes_what_transformers_uses():
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    hf_internals.set_config_attn_implementation(config, "eager")
    model = AutoModelForCausalLM.from_config(config)
    assert hf_internals.attn_implementation(model.config) == "eager"
    model.set_attn_implementation("sdpa")
    assert hf_internals.attn_implementation(model.config) == "sdpa"


def test_attn_implementation_helper_fails_loudly_when_transformers_renames_it(monkeypatch):
    from transformers import PreTrainedConfig

    monkeypatch.delattr(PreTrainedConfig, "_attn_implementation")
    with pytest.raises(RuntimeError, match="has no PreTrainedConfig._attn_implementation property"):
        hf_internals.attn_implementation(LlamaConfig())


def _package_imports() -> dict[str, set[str]]:
    """Module -> the lighthouse_hf modules it imports (relative imports resolved)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                imported.add(target)
                imported.update(f"{target}.{alias.name}" for alias in node.names)
            if isinstance(node, ast.ImportFrom) and node.level and any(
                alias.name.startswith("_") and not alias.name.startswith("__") for alias in node.names
            ):
                raise AssertionError(f"{module} imports a private name from {node.module}")
        graph[module] = imported
    return {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_cycle_and_no_private_imports_inside_the_package():
    graph = _package_imports()
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done:
            return
        active.append(module)
        for dependency in graph[module]:
            visit(dependency)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)
    assert "lighthouse_hf.context_parallel" not in graph["lighthouse_hf.dispatch"]
    assert "lighthouse_hf.integration" not in graph["lighthouse_hf.context_parallel"]


def test_family_adapters_state_the_per_head_qk_norm():
    from transformers import Qwen2Config, Qwen3Config

    from lighthouse_hf import LighthouseWarning, apply_lighthouse, patches

    sizes = dict(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**sizes))
    names = patches.adapter_for(qwen3.config).per_head_qk_norm
    attention = qwen3.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, name), torch.nn.Module) for name in names)
    with pytest.warns(LighthouseWarning, match=r"qwen3: each head's q and k pass an RMSNorm \(q_norm, k_norm\)"):
        apply_lighthouse(qwen3, topk=128, dense_layers=[0], scores="qk")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        apply_lighthouse(qwen3, topk=128, dense_layers=[0])  # scores="pre_norm": nothing ties
    assert patches.adapter_for(Qwen2Config(**sizes)).per_head_qk_norm is None
