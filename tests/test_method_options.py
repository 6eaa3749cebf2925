"""Options beyond the published method: RoPE at span end, given level-0 scores and levels averaged
instead of summed, each against an independent computation; then all four settings (the causal
selection has its own file) through Transformers models."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lighthouse_hf
from helpers import FAMILIES, decoder_layer_step, rel_err, tiny_config
from lighthouse_hf import lighthouse_attention
from lighthouse_hf.ops import LighthousePlan, reference
from lighthouse_hf.rotary import rope_inv_freq
from lighthouse_hf.training import enable_activation_checkpointing

# (batch, heads, kv_heads, seq, dim, levels, pooling, topk): defined lengths, GQA, padded lengths
CASES = [
    (1, 2, 1, 2048, 8, 3, 4, 128),
    (2, 4, 2, 2051, 16, 3, 4, 128),
    (1, 2, 2, 1500, 8, 2, 8, 128),
    (1, 3, 1, 3000, 8, 4, 2, 256),
]
IDS = ["B{}H{}Hkv{}S{}D{}L{}p{}K{}".format(*case) for case in CASES]


def _inputs(batch, heads, kv_heads, seq, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, seq, dim, generator=g, dtype=dtype) for h in (heads, kv_heads, kv_heads))


def _inv_freq(dim, base=10000.0, rotary_dim=None):
    rotary_dim = rotary_dim or dim
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _rotary(x, positions, inv_freq):
    """Transformers' apply_rotary_pos_emb on the first 2R dimensions, computed in float64."""
    half = inv_freq.shape[0]
    angle = positions.double()[:, None] * inv_freq.double()
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rot, rest = x[..., : 2 * half].double(), x[..., 2 * half :].double()
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated_half * sin, rest], -1)


def _span_end_pyramid(x_rotated, plan, inv_freq):
    """Un-rotate every position, mean-pool, rotate each pooled row at its span's last token."""
    seq = x_rotated.shape[2]
    positions = torch.arange(seq)
    raw = _rotary(x_rotated, -positions, inv_freq)
    raw = torch.nn.functional.pad(raw[:, :, : plan.padded_len], (0, 0, 0, max(0, plan.padded_len - seq)))
    rows = [x_rotated[:, :, : plan.padded_len].double()]
    rows[0] = torch.nn.functional.pad(rows[0], (0, 0, 0, plan.padded_len - rows[0].shape[2]))
    for level in range(1, plan.levels):
        width = plan.pooling**level
        pooled = raw.unflatten(2, (-1, width)).mean(3)
        ends = torch.arange(pooled.shape[2]) * width + width - 1
        rows.append(_rotary(pooled, ends, inv_freq))
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_span_end_rope_matches_unrotate_pool_rotate(case, rotary_fraction):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, dim, seed=seq)
    positions = torch.arange(seq)
    inv_freq = _inv_freq(dim, rotary_dim=int(dim * rotary_fraction))
    q, k = (_rotary(x, positions, inv_freq).float() for x in (q, k))
    plan = LighthousePlan(seq, levels, pooling, topk)
    for x in (q, k):
        got = reference.pyramid(x, plan, inv_freq.float())
        assert rel_err(got, _span_end_pyramid(x, plan, inv_freq)) < 1e-5
    # the whole op: the same selection (norms do not change under rotation), span-end pooled q and k
    selection = reference.select(q, k, plan)
    expected = reference.scatter_back(
        torch.nn.functional.scaled_dot_product_attention(
            *(reference.gather_entries(rows, selection.index) for rows in (
                _span_end_pyramid(q, plan, inv_freq).float(),
                _span_end_pyramid(k, plan, inv_freq).float(),
                reference.pyramid(v, plan),
            )),
            is_causal=True,
        ),
        selection,
        seq,
    )
    out = lighthouse_attention(q, k, v, levels=levels, pooling=pooling, topk=topk, rope_inv_freq=inv_freq.float())
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, lighthouse_attention(q, k, v, levels=levels, pooling=pooling, topk=topk)) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_given_scores_equal_the_norm_path_fed_the_same_numbers(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, dim, seed=seq + 1)
    settings = dict(levels=levels, pooling=pooling, topk=topk)
    norms = [torch.linalg.vector_norm(x, dim=-1) for x in (q, k)]
    torch.testing.assert_close(
        lighthouse_attention(q, k, v, **settings, q_scores=norms[0], k_scores=norms[1]),
        lighthouse_attention(q, k, v, **settings),
        rtol=0,
        atol=0,
    )
    # other scores select other entries: the selection follows the scores, not q and k
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(x.shape[:3], generator=g) for x in (q, k)]
    plan = LighthousePlan(seq, levels, pooling, topk)
    given = reference.select(q, k, plan, q_scores=scores[0], k_scores=scores[1])
    scaled = reference.select(q * 0 + 1, k * 0 + 1, plan, q_scores=scores[0], k_scores=scores[1])
    assert torch.equal(given.index, scaled.index)
    assert not torch.equal(given.index, reference.select(q, k, plan).index)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mean_combine_is_the_sum_over_the_contribution_count(case):
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    q, k, v = _inputs(batch, heads, kv_heads, seq, dim, seed=seq + 2)
    settings = dict(levels=levels, pooling=pooling, topk=topk)
    summed = lighthouse_attention(q, k, v, **settings)
    plan = LighthousePlan(seq, levels, pooling, topk)
    selection = reference.select(q, k, plan)
    # contributions per position: the published scatter of all-ones rows counts them
    count = reference.scatter_back(torch.ones(batch, heads, plan.compressed_len, 1), selection, seq)
    expected = torch.where(count > 0, summed / count.clamp(min=1), 0.0)
    out = lighthouse_attention(q, k, v, **settings, combine="mean")
    assert rel_err(out, expected) < 1e-6
    assert (count > 1).any()  # levels overlap, so mean and sum differ
    assert torch.equal(out[count[..., 0] == 0], torch.zeros_like(out[count[..., 0] == 0]))


def test_rope_frequencies_in_any_float_dtype_are_used_as_float32():
    q, k, v = _inputs(1, 2, 1, 2048, 8, seed=4)
    inv_freq = _inv_freq(8).float()
    settings = dict(levels=3, pooling=4, topk=128)
    expected = lighthouse_attention(q, k, v, **settings, rope_inv_freq=inv_freq)
    got = lighthouse_attention(q, k, v, **settings, rope_inv_freq=inv_freq.double())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_options_combine_and_differentiate_in_float64():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 600, 4, seed=5, dtype=torch.float64))
    inv_freq = _inv_freq(4)
    scores = [torch.linalg.vector_norm(x.detach(), dim=-1) + 1 for x in (q, k)]

    def fn(q, k, v):
        return lighthouse_attention(q, k, v, levels=2, pooling=2, topk=128, rope_inv_freq=inv_freq,
                                    q_scores=scores[0], k_scores=scores[1], combine="mean")

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-9, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(combine="avg"), "combine must be one of 'sum', 'mean', got 'avg'"),
        (dict(selection="future"), "selection must be one of 'published'"),
        (dict(rope_inv_freq=torch.ones(5)), "rope_inv_freq must be a 1-D floating-point tensor of 1 to head_dim // 2 = 4"),
        (dict(rope_inv_freq=torch.ones(2, 2)), "rope_inv_freq must be a 1-D"),
        (dict(q_scores=torch.ones(1, 2, 64)), "q_scores and k_scores must be given together"),
        (dict(q_scores=torch.ones(1, 2, 63), k_scores=torch.ones(1, 1, 64)), r"q_scores must be a floating-point tensor of shape \[1, 2, 64\]"),
        (dict(q_scores=torch.ones(1, 2, 64), k_scores=torch.ones(1, 2, 64)), r"k_scores must be a floating-point tensor of shape \[1, 1, 64\]"),
        (dict(q_scores=-torch.ones(1, 2, 64), k_scores=torch.ones(1, 1, 64)), "q_scores must be non-negative and not NaN"),
        (dict(q_scores=torch.ones(1, 2, 64), k_scores=torch.full((1, 1, 64), float("nan"))), "k_scores must be non-negative"),
    ],
)
def test_bad_options(kwargs, message):
    q, k, v = _inputs(1, 2, 1, 64, 8)
    with pytest.raises(ValueError, match=message):
        lighthouse_attention(q, k, v, **kwargs)


# ---- through Transformers: config.lighthouse settings, the four families ----

SEQ = 2048
ROPE_TYPES = {
    "default": None,
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
    "yarn": dict(rope_type="yarn", factor=4.0, rope_theta=10000.0, original_max_position_embeddings=512),
    "llama3": dict(rope_type="llama3", factor=8.0, rope_theta=500000.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256),
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
def test_rope_frequencies_are_the_models_own(rope_type):
    overrides = dict(max_position_embeddings=1024)  # dynamic then rescales at SEQ = 2048
    if ROPE_TYPES[rope_type] is not None:
        overrides["rope_parameters"] = ROPE_TYPES[rope_type]
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **overrides))
    positions = torch.arange(SEQ)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, SEQ, 1), positions)
    inv_freq = rope_inv_freq(model.config, SEQ, torch.device("cpu"))
    angle = positions[0, :, None].double() * inv_freq.double()
    scaling = model.model.rotary_emb.attention_scaling
    half = inv_freq.shape[0]
    assert half == cos.shape[-1] // 2
    torch.testing.assert_close(cos[0, :, :half].double(), angle.cos() * scaling, rtol=0, atol=2e-6 * SEQ)
    torch.testing.assert_close(sin[0, :, :half].double(), angle.sin() * scaling, rtol=0, atol=2e-6 * SEQ)


@pytest.mark.parametrize("theta", [None, "10000", 1.0])
def test_a_missing_or_bad_rope_theta_is_named(theta):
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "default"} | ({} if theta is None else {"rope_theta": theta})
    with pytest.raises(ValueError, match=r'needs config.rope_parameters\["rope_theta"\], a number > 1; got'):
        rope_inv_freq(config, SEQ, torch.device("cpu"))


def _calls_of_the_op(monkeypatch):
    """The keyword arguments of every single-device Lighthouse op call, with its q and k."""
    calls = []
    original = lighthouse_hf.integration.lighthouse_attention

    def recording(q, k, v, **kwargs):
        calls.append(dict(kwargs, q=q.detach(), k=k.detach()))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(lighthouse_hf.integration, "lighthouse_attention", recording)
    return calls


def test_llama_span_end_passes_the_models_frequencies(monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[0], rope="span_end")
    calls = _calls_of_the_op(monkeypatch)
    ids = torch.randint(0, 128, (1, SEQ))
    with torch.no_grad():
        span_end = model(ids).logits
        model.config.lighthouse["rope"] = "pooled"
        pooled = model(ids).logits
    assert len(calls) == 4  # layers 1 and 2, twice
    torch.testing.assert_close(calls[0]["rope_inv_freq"], model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert "rope_inv_freq" not in calls[2]
    assert not torch.allclose(span_end, pooled, atol=1e-4)


def test_qwen3_pre_norm_scores_select_by_content_at_initialization(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[0])
    calls = _calls_of_the_op(monkeypatch)
    attention = model.model.layers[1].self_attn
    inputs = {}
    attention.register_forward_pre_hook(lambda module, args, kwargs: inputs.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, SEQ)))
    call = calls[0]
    # independently: the norms of q and k as projected, before q_norm / k_norm
    hidden = inputs["hidden_states"]
    shape = (*hidden.shape[:2], -1, attention.head_dim)
    expected_q = torch.linalg.vector_norm(attention.q_proj(hidden).view(shape), dim=-1).transpose(1, 2)
    expected_k = torch.linalg.vector_norm(attention.k_proj(hidden).view(shape), dim=-1).transpose(1, 2)
    torch.testing.assert_close(call["q_scores"], expected_q)
    torch.testing.assert_close(call["k_scores"], expected_k)
    # the normalized q and k the published scores would use tie (sqrt(head_dim) everywhere at init)
    post_norm = torch.linalg.vector_norm(call["q"], dim=-1)
    assert (post_norm.max() - post_norm.min()) / post_norm.mean() < 1e-3
    plan = LighthousePlan(SEQ, 3, 4, 128)
    content = reference.select(call["q"], call["k"], plan, q_scores=call["q_scores"], k_scores=call["k_scores"])
    tie_break = reference.select(call["q"], call["k"], plan)
    assert not torch.equal(content.index, tie_break.index)
    # the op fed the pre-norm norms is what the layer ran
    out = lighthouse_attention(call["q"], call["k"], call["k"], levels=3, pooling=4, topk=128,
                               q_scores=call["q_scores"], k_scores=call["k_scores"])
    again = lighthouse_attention(call["q"], call["k"], call["k"], levels=3, pooling=4, topk=128)
    assert not torch.equal(out, again)


def test_first_call_without_recorded_norms_warns_and_scores_q_and_k(tmp_path, monkeypatch):
    config = tiny_config("qwen3")
    config.lighthouse = {"topk": 128, "dense_layers": [0]}
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lighthouse")
    calls = _calls_of_the_op(monkeypatch)
    ids = torch.randint(0, 128, (1, SEQ))
    with pytest.warns(lighthouse_hf.LighthouseWarning, match="found no recorded norms for this call"), torch.no_grad():
        model(ids)
    assert calls and all(call.get("q_scores") is None and call.get("k_scores") is None for call in calls)  # q's, k's norms
    first_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lighthouse_hf.LighthouseWarning)
        with torch.no_grad():
            model(ids)  # recorded from now on
    assert len(calls) > first_calls
    assert all(call.get("q_scores") is not None and call.get("k_scores") is not None for call in calls[first_calls:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_option_through_from_pretrained(family, tmp_path):
    config = tiny_config(family)
    options = dict(rope="span_end", scores="pre_norm", selection="causal", combine="mean")
    config.lighthouse = {"topk": 128, "dense_layers": [0], **options}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lighthouse")
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[0], **options)
    ids = torch.randint(0, 128, (1, SEQ))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert {key: model.config.lighthouse[key] for key in options} == options
    defaults = dict(rope="pooled", selection="published", combine="sum")  # pre_norm is qk outside Qwen3
    with torch.no_grad():
        for key, default in defaults.items():
            model.config.lighthouse.update(options, **{key: default})
            assert not torch.allclose(model(ids).logits, out.logits, atol=1e-4), key  # each option acts alone


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rope": "end"}, "config.lighthouse: rope must be one of 'pooled', 'span_end', got 'end'"),
        ({"scores": "norm"}, "config.lighthouse: scores must be one of 'pre_norm', 'qk'"),
        ({"combine": "max"}, "config.lighthouse: combine must be one of 'sum', 'mean'"),
        ({"selection": "random"}, "config.lighthouse: selection must be one of"),
    ],
)
def test_bad_option_settings(settings, message):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**tiny_config("llama").to_dict(), "lighthouse": settings}),
                                             attn_implementation="lighthouse")
    with pytest.raises(ValueError, match=message):
        model(torch.randint(0, 128, (1, 16)))


def test_dense_recovery_stops_recording_pre_norm_scores():
    from lighthouse_hf.training import switch_to_dense

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[0])
    norm = model.model.layers[1].self_attn.q_norm
    ids = torch.randint(0, 128, (1, 64))
    with torch.no_grad():
        model(ids)
    assert getattr(norm, "lighthouse_input_norms") is not None  # recorded (a short call runs dense)
    switch_to_dense(model, recovery_step=1)
    with torch.no_grad():
        model(ids)
    assert not norm._forward_pre_hooks and getattr(norm, "lighthouse_input_norms") is None


def test_qwen3_moe_scores_pre_norm_like_qwen3():
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    model = lighthouse_hf.apply_lighthouse(AutoModelForCausalLM.from_config(config), topk=128, dense_layers=[0])
    assert [bool(layer.self_attn.q_norm._forward_pre_hooks) for layer in model.model.layers] == [False, True]
    with pytest.warns(lighthouse_hf.LighthouseWarning, match="qwen3_moe: each head's q and k pass an RMSNorm"):
        lighthouse_hf.apply_lighthouse(AutoModelForCausalLM.from_config(config), topk=128, dense_layers=[0], scores="qk")


def test_dense_layers_record_no_pre_norm_scores():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", num_hidden_layers=4))
    model.set_attn_implementation("lighthouse")  # hooks installed by the calls, not by apply_lighthouse
    model.config.lighthouse = dict(topk=128, dense_layers=[0, 3])
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 64)))
    hooked = [bool(layer.self_attn.q_norm._forward_pre_hooks) for layer in model.model.layers]
    assert hooked == [False, True, True, False]


def test_pre_norm_scores_under_activation_checkpointing():
    # The recomputed forward must record its pre-norm scores again and select what the first forward
    # selected: the gradients then equal those of the same model without checkpointing.
    torch.manual_seed(0)
    models = []
    for reentrant in (None, False, True):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
        lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[0])
        if reentrant is not None:
            enable_activation_checkpointing(model, {"use_reentrant": reentrant})
        model.train()
        models.append(model)
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 128, (1, SEQ))
    losses, grads = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", lighthouse_hf.LighthouseWarning)  # no fallback to q's and k's norms
        for model in models:
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1] == losses[2]
    for checkpointed in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_model_compiled_before_its_hooks_records_from_its_second_call():
    # Loaded with attn_implementation="lighthouse" and compiled at once (graph breaks allowed, as
    # Trainer's torch_compile does): the first call warns and installs the hooks, the next ones
    # score the pre-norm norms exactly as an eager model with apply_lighthouse does.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3")).train()
    reference = AutoModelForCausalLM.from_config(tiny_config("qwen3")).train()
    reference.load_state_dict(model.state_dict())
    model.config.lighthouse = {"topk": 128, "dense_layers": []}
    model.set_attn_implementation("lighthouse")
    lighthouse_hf.apply_lighthouse(reference, topk=128, dense_layers=[])
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 128, (1, SEQ))
    try:
        with pytest.warns(lighthouse_hf.LighthouseWarning, match="found no recorded norms"):
            compiled(ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error", lighthouse_hf.LighthouseWarning)
            assert compiled(ids).logits.equal(reference(ids).logits)
    finally:
        torch._dynamo.reset()  # the next test compiles the same layer class afresh


def test_pre_norm_hooks_that_do_not_run_are_an_error():
    # Hooks installed and used, then left out of a forward (as compiled code that predates them
    # would): an error, not a silent fallback to the normalized q and k.
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3")).train()
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[])
    ids = torch.randint(0, 128, (1, SEQ))
    model(ids)
    norm = model.model.layers[1].self_attn.k_norm
    norm._forward_pre_hooks.clear()
    with pytest.raises(RuntimeError, match="layer 1: the forward pre-hook that records the input norms of k_norm .* did not run"):
        model(ids)


def test_pre_norm_hooks_under_data_parallel_replicas():
    # DataParallel replicates a module by a shallow copy each step: the replicas share the original's
    # hook dict but not its attributes. A hook one replica installed serves the next step's replicas
    # (no second hook, their recorded norms kept), and the original's recovery removes it.
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3")).train()
    model.config.lighthouse = {"topk": 128, "dense_layers": []}
    model.set_attn_implementation("lighthouse")
    attention = model.model.layers[1].self_attn

    def replica():
        copy = attention._replicate_for_data_parallel()
        for name in ("q_norm", "k_norm"):
            norm = getattr(attention, name)
            norm_copy = norm._replicate_for_data_parallel()
            norm_copy.weight = norm.weight  # replicate() hands each replica its parameters
            setattr(copy, name, norm_copy)
        return copy

    names = ("q_norm", "k_norm")
    first = replica()
    lighthouse_hf.prenorm.install(first, names)
    assert len(attention.q_norm._forward_pre_hooks) == 1  # the shared dict
    second = replica()
    x = torch.randn(1, SEQ, 4, 16)
    second.q_norm(x), second.k_norm(x[:, :, :2])
    lighthouse_hf.prenorm.install(second, names)
    assert len(attention.q_norm._forward_pre_hooks) == 1
    q, k = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, SEQ, 16)
    recorded = lighthouse_hf.prenorm.take(second, names, q, k)
    assert recorded is not None and torch.equal(recorded[0], x.norm(dim=-1).transpose(1, 2))
    lighthouse_hf.prenorm.uninstall(model)
    assert not attention.q_norm._forward_pre_hooks and not attention.k_norm._forward_pre_hooks


@pytest.mark.slow
def test_pre_norm_scores_compile_as_one_graph_and_need_their_hooks_first():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    layer = model.model.layers[0]
    hidden = torch.randn(1, SEQ, 64, requires_grad=True)
    positions = torch.arange(SEQ)[None]
    embeddings = model.model.rotary_emb(hidden, positions)

    def run(layer_fn):
        return decoder_layer_step(layer_fn, hidden, positions, embeddings)

    model.config.lighthouse = {"topk": 128, "dense_layers": []}
    model.set_attn_implementation("lighthouse")  # no hooks yet: compiled code cannot install them
    with pytest.raises(Exception, match="records its scores with hooks that are installed outside compiled code"):
        run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[])
    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
    lighthouse_hf.apply_lighthouse(model, topk=128, dense_layers=[], scores="qk")
    assert not torch.allclose(run(layer)[0], eager[0])  # the compiled run used the pre-norm scores
