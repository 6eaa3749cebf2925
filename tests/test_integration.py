"""Transformers integration: registry entries, settings in config.json, four model families."""

import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sliding_window_causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import lighthouse_hf
from lighthouse_hf import LighthouseConfig, apply_lighthouse, compressed_length
from lighthouse_hf.dispatch import DeferredMask, LighthouseWarning, lighthouse_mask
from helpers import FAMILIES, TINY_SIZES, decoder_layer_step, tiny_config

SEQ = 2048  # with topk=128 Lighthouse compresses 2048 to 640 entries
SETTINGS = {"topk": 128, "dense_layers": [0]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved_model(request, tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(request.param)
    config.lighthouse = dict(SETTINGS)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def load(path, attn="lighthouse", **kwargs):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32, **kwargs)
    if attn == "lighthouse":
        with torch.no_grad():
            # A first (here: dense, too short) call readies Qwen3's pre-norm scores, so that every
            # Lighthouse call below scores the same way; test_first_call_* covers the first call itself.
            model(tokens(seq=16))
    return model


def tokens(batch=1, seq=SEQ, seed=0):
    return torch.randint(0, TINY_SIZES["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_registered_with_public_calls():
    assert ALL_ATTENTION_FUNCTIONS["lighthouse"] is lighthouse_hf.integration.lighthouse_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["lighthouse"] is lighthouse_mask


def test_family_trains_with_lighthouse(saved_model, lighthouse_calls):
    model = load(saved_model)
    assert model.config._attn_implementation == "lighthouse"
    dense = load(saved_model, "sdpa")
    x = tokens()
    model.train()
    out = model(x, labels=x)
    # once per layer outside dense_layers, and never context-parallel in one process
    lighthouse_layers = TINY_SIZES["num_hidden_layers"] - len(SETTINGS["dense_layers"])
    assert (lighthouse_calls.single_device, lighthouse_calls.context_parallel) == (lighthouse_layers, 0)
    # the first call checked the settings and recorded every key, defaults included
    assert model.config.lighthouse == LighthouseConfig(**SETTINGS).to_dict()
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Lighthouse really ran: the sparse model differs from the same weights under dense SDPA
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, dense(x).logits, atol=1e-3)


def test_dense_paths_equal_sdpa_exactly(saved_model, lighthouse_calls):
    model, dense = load(saved_model), load(saved_model, "sdpa")
    with torch.no_grad():
        short = tokens(seq=300)  # too short to compress
        torch.testing.assert_close(model(short).logits, dense(short).logits, rtol=0, atol=0)
        model.config.lighthouse["dense_layers"] = [0, 1, 2]
        x = tokens()
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=0)
    assert lighthouse_calls.total == 0


def test_eval_forward_uses_lighthouse_too(saved_model):
    model = load(saved_model).eval()
    x = tokens()
    with torch.no_grad():
        eval_logits = model(x).logits
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, eval_logits)


def test_generate_matches_sdpa(saved_model):
    model, dense = load(saved_model).eval(), load(saved_model, "sdpa").eval()
    prompt = tokens(batch=2, seq=12)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding in the second row
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(model.generate(prompt, **settings), dense.generate(prompt, **settings))


def test_save_load_round_trip_keeps_settings(saved_model, tmp_path):
    model = load(saved_model)
    model.config.lighthouse["topk"] = 256
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).lighthouse["topk"] == 256
    reloaded = load(tmp_path)
    assert LighthouseConfig.from_model_config(reloaded.config) == LighthouseConfig(**{**SETTINGS, "topk": 256})


def test_switch_to_sdpa_and_back(saved_model):
    model, dense = load(saved_model), load(saved_model, "sdpa")
    x = tokens()
    with torch.no_grad():
        sparse_logits = model(x).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=0)
        model.set_attn_implementation("lighthouse")
        torch.testing.assert_close(model(x).logits, sparse_logits, rtol=0, atol=0)


def test_padding_falls_back_to_dense_with_a_warning(saved_model):
    model, dense = load(saved_model), load(saved_model, "sdpa")
    x = tokens(batch=2)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with pytest.warns(LighthouseWarning, match="falls back to dense SDPA for inputs with padding"), torch.no_grad():
        logits = model(x, attention_mask=mask).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, dense(x, attention_mask=mask).logits, rtol=0, atol=0)


def test_packed_documents_attend_within_each_document(saved_model):
    # Both documents are too short to compress, so every layer runs dense inside each document, as
    # Transformers' packed-sequence mask does, without the dense fallback's warning
    # (tests/test_packed.py covers documents that compress).
    model, dense = load(saved_model), load(saved_model, "sdpa")
    x = tokens()
    position_ids = torch.cat([torch.arange(1000), torch.arange(SEQ - 1000)])[None]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", LighthouseWarning)
        logits = model(x, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(logits, dense(x, position_ids=position_ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_mistral_sliding_window(tmp_path):
    config = tiny_config("mistral", sliding_window=512)
    config.lighthouse = {"topk": 128, "dense_layers": [0]}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.warns(LighthouseWarning, match=r"mistral: layers \[1, 2\] have a 512-token sliding window"):
        model = load(tmp_path)  # the warning comes with the model's first call
    dense = load(tmp_path, "sdpa")
    x = tokens()
    with torch.no_grad():
        # with every layer dense the windowed masks must match Transformers' own exactly
        model.config.lighthouse["dense_layers"] = [0, 1, 2]
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=0)
        model.config.lighthouse["dense_layers"] = [0]
        assert not torch.allclose(model(x).logits, dense(x).logits, atol=1e-3)


def test_qwen2_sliding_layers(tmp_path):
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=256, max_window_layers=1)
    config.lighthouse = {"topk": 128, "dense_layers": [0, 1, 2]}
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert lighthouse_hf.patches.adapter_for(config).windowed_layers(config) == {1: 256, 2: 256}
    with torch.no_grad():
        x = tokens()
        torch.testing.assert_close(load(tmp_path)(x).logits, load(tmp_path, "sdpa")(x).logits, rtol=0, atol=0)


BAD_SETTINGS = [
    ({"topk": 100}, "config.lighthouse: topk must be a positive multiple of 128"),
    ({"levels": 0}, "config.lighthouse: levels must be an integer from 1 to 64"),
    ({"levels": 2**62}, "config.lighthouse: levels must be an integer from 1 to 64"),
    ({"pooling": 6}, "config.lighthouse: pooling must be a power of two"),
    ({"top_k": 128}, r"^config.lighthouse: unknown keys \['top_k'\]; allowed keys: levels, "),
    ({"dense_layers": [0, 7]}, r"config.lighthouse: dense_layers entries \[7\] lie outside a model of 3 layers"),
    ({"dense_layers": [0, 0]}, r"config.lighthouse: dense_layers lists \[0\] more than once"),
    ({"dense_layers": [2, -1]}, r"config.lighthouse: dense_layers entries \[2, -1\] name layers \[2\] twice"),
    ({"min_seq_len": 0}, "config.lighthouse: min_seq_len must be None or an integer >= 1"),
    ([1, 2], "config.lighthouse: settings must be a dict"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_bad_settings_fail_at_the_first_call(tmp_path, settings, message):
    config = tiny_config("llama")
    config.lighthouse = settings
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), attn_implementation="lighthouse")
    for _ in range(2):  # a failed check is not remembered as done
        with pytest.raises(ValueError, match=message) as raised:
            model(tokens(seq=16))
        assert str(raised.value).count("config.lighthouse") == 1


@pytest.mark.parametrize("settings, message", [case for case in BAD_SETTINGS if isinstance(case[0], dict)])
def test_bad_settings_fail_in_apply_lighthouse(settings, message):
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    message = message.removeprefix("^").removeprefix("config.lighthouse: ")
    with pytest.raises(ValueError, match=message):
        apply_lighthouse(model, **settings)
    assert model.config._attn_implementation == "sdpa"  # nothing switched


def test_missing_keys_take_defaults_and_are_written_back():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=6), attn_implementation="lighthouse")
    model(tokens(seq=16))
    assert model.config.lighthouse == LighthouseConfig().to_dict()


def test_import_modifies_no_transformers_class():
    from transformers import PreTrainedConfig, PreTrainedModel

    for cls in (PreTrainedModel, PreTrainedConfig):
        for name, attribute in vars(cls).items():
            function = getattr(attribute, "__func__", attribute)
            assert not str(getattr(function, "__module__", "")).startswith("lighthouse_hf"), name


def test_a_model_without_a_lighthouse_layer_warns():
    config = tiny_config("llama", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.warns(LighthouseWarning, match=r"covers all 4 layers, so no layer runs Lighthouse"):
        apply_lighthouse(model)  # the defaults keep layers 0, 1, -2 and -1 dense


def test_too_short_training_forward_warns_once_per_model():
    shortest = lighthouse_hf.ops.shortest_compressed_length(3, 4, 128)
    models = [AutoModelForCausalLM.from_config(tiny_config("llama")) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count what is issued, not what Python's filters show
        for model in models:
            apply_lighthouse(model, topk=128, dense_layers=[])
            model.train()
            for seq in (300, 400):
                model(tokens(seq=seq))
            model.eval()
            model(tokens(seq=300))
    short = [w for w in caught if "runs dense SDPA" in str(w.message)]
    assert len(short) == 2  # once per model, training only
    assert f"compresses sequences of {shortest} tokens or more" in str(short[0].message)
    assert compressed_length(shortest - 1, topk=128) == shortest - 1 < SEQ


@pytest.mark.parametrize("packed", [False, True])
def test_too_short_warning_with_one_level_says_nothing_compresses(packed):
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).train()
    apply_lighthouse(model, levels=1, pooling=2, topk=128, dense_layers=[])
    kwargs = dict(position_ids=torch.cat([torch.arange(200), torch.arange(100)])[None], use_cache=False) if packed else {}
    with pytest.warns(LighthouseWarning, match=r"levels=1 has no coarser level to select from, so no sequence compresses") as caught:
        model(tokens(seq=300), **kwargs)
    assert not any("None" in str(w.message) for w in caught)
    assert any(("packed documents" in str(w.message)) == packed for w in caught)


def test_non_causal_module_runs_sdpa_as_transformers_would(saved_model):
    model, dense = load(saved_model), load(saved_model, "sdpa")
    for m in (model, dense):
        for layer in m.model.layers:
            layer.self_attn.is_causal = False
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=0)


def test_apply_lighthouse_to_model_and_config():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert model.config._attn_implementation == "sdpa"
    apply_lighthouse(model, LighthouseConfig(topk=256), dense_layers=[])
    assert model.config._attn_implementation == "lighthouse"
    assert model.config.lighthouse["topk"] == 256 and model.config.lighthouse["dense_layers"] == []
    config = apply_lighthouse(tiny_config("llama"), topk=128, dense_layers=[0])
    assert AutoModelForCausalLM.from_config(config).config._attn_implementation == "lighthouse"
    with pytest.raises(ValueError, match="pooling must be a power of two"):
        apply_lighthouse(model, pooling=3)


def test_apply_lighthouse_switches_the_model_a_wrapper_holds():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config("llama")),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    assert apply_lighthouse(peft_model, topk=128, dense_layers=[0]) is peft_model
    inner = peft_model.get_base_model()
    assert inner.config._attn_implementation == "lighthouse" and inner.config.lighthouse["topk"] == 128
    two = torch.nn.ModuleList([AutoModelForCausalLM.from_config(tiny_config("llama")) for _ in range(2)])
    with pytest.raises(TypeError, match="target must be a Transformers model or config, or wrap exactly one model; "
                                        "got a ModuleList holding 2"):
        apply_lighthouse(two)
    with pytest.raises(TypeError, match="target must be a Transformers PreTrainedModel or PreTrainedConfig, got str"):
        apply_lighthouse("llama")


def test_a_rejected_apply_lighthouse_leaves_the_settings_as_they_were():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="dense_layers"):
        apply_lighthouse(model, topk=128, dense_layers=[10])
    assert not hasattr(model.config, "lighthouse") and model.config._attn_implementation == "sdpa"
    apply_lighthouse(model, topk=128, dense_layers=[0])
    with pytest.raises(ValueError, match="dense_layers"):
        apply_lighthouse(model, topk=256, dense_layers=[10])
    assert model.config.lighthouse["topk"] == 128 and model.config.lighthouse["dense_layers"] == [0]
    model(tokens(seq=16))  # still runs


def test_apply_lighthouse_warns_once_not_again_at_the_first_call():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lighthouse(model)  # the defaults keep all 4 layers dense
        model(tokens(seq=16))
    assert sum("so no layer runs Lighthouse" in str(w.message) for w in caught) == 1


def test_settings_dataclass_validates_when_set():
    settings = LighthouseConfig()
    settings.topk = 1024
    with pytest.raises(ValueError, match="topk must be a positive multiple of 128"):
        settings.topk = 1000
    with pytest.raises(AttributeError, match="no setting 'top_k'"):
        settings.top_k = 5
    assert settings.dense_layer_set(30) == {0, 1, 28, 29}


def test_mask_function_never_builds_a_square_mask():
    seq = 131072
    common = dict(batch_size=2, q_length=seq, kv_length=seq, device="cpu")
    assert lighthouse_mask(**common) is None
    assert lighthouse_mask(**common, attention_mask=torch.ones(2, seq, dtype=torch.long)) is None
    padding = torch.ones(2, seq, dtype=torch.long)
    padding[1, :7] = 0
    mask = lighthouse_mask(**common, attention_mask=padding)
    assert mask.shape == (2, seq) and mask.dtype == torch.bool and mask.sum() == 2 * seq - 7
    windowed = lighthouse_mask(**common, local_size=4096)
    assert isinstance(windowed, DeferredMask) and windowed.reason is None
    assert lighthouse_mask(batch_size=1, q_length=1, kv_length=seq, q_offset=seq - 1, device="cpu") is None


def test_deferred_mask_materializes_the_sliding_window():
    window = sliding_window_causal_mask_function(3)
    mask = lighthouse_mask(batch_size=1, q_length=6, kv_length=6, local_size=3, mask_function=window, device="cpu")
    expected = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    assert torch.equal(mask.materialize()[0, 0], expected)


@pytest.mark.slow
def test_other_registry_architectures(tmp_path):
    """Any model that dispatches through the registry works; Phi-3 and OLMo-2 were tried."""
    from transformers import Olmo2Config, Phi3Config

    for config in (Phi3Config(**TINY_SIZES, pad_token_id=0), Olmo2Config(**TINY_SIZES)):
        config.lighthouse = dict(SETTINGS)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="lighthouse")
        dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
        dense.load_state_dict(model.state_dict())
        x = tokens()
        out = model(x, labels=x)
        out.loss.backward()
        assert not torch.allclose(out.logits, dense(x).logits, atol=1e-3)


@pytest.mark.slow
def test_two_layer_model_at_16k_forward_backward():
    """The issue's CPU budget check: a 2-layer tiny model at S=16384 (timing is reported by
    `python examples/quickstart.py`, not asserted)."""
    seq = 16384
    assert compressed_length(seq, topk=256) == 3072
    config = tiny_config("llama", num_hidden_layers=2, max_position_embeddings=seq)
    config.lighthouse = {"topk": 256, "dense_layers": []}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="lighthouse")
    x = tokens(seq=seq)
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "flags, message",
    [(["--seq-len", "1000"], "--seq-len must be at least 2305, the shortest sequence that L=3 p=4 K=256 compresses"),
     (["--repeats", "0"], "--repeats must be >= 1, got 0")],
)
def test_quickstart_refuses_what_it_cannot_time(flags, message):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    done = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.slow
def test_decoder_layer_captures_as_one_graph():
    """torch.compile(fullgraph=True) of a Lighthouse decoder layer (graph capture is what can break;
    the aot_eager backend needs no C++ compiler; the GPU suite compiles with inductor)."""
    config = tiny_config("llama")
    config.lighthouse = {"topk": 128, "dense_layers": []}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="lighthouse")
    layer = model.model.layers[0]
    hidden = torch.randn(1, SEQ, TINY_SIZES["hidden_size"], requires_grad=True)
    position_ids = torch.arange(SEQ)[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)

    def run(layer_fn):
        return decoder_layer_step(layer_fn, hidden, position_ids, position_embeddings)

    eager_out, eager_grad = run(layer)
    out, grad = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(grad, eager_grad)
