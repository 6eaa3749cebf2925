"""Packed documents: every document of a packed row gets what it would get alone, in Lighthouse
layers and dense layers alike, by both ways Transformers marks documents, without the dense
fallback; the op against a loop over documents of the single-sequence op; the Documents checks."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import lighthouse_hf.ops.varlen
from helpers import FAMILIES, rel_err, tiny_config
from lighthouse_hf import LighthouseWarning, apply_lighthouse, compressed_length, lighthouse_attention
from lighthouse_hf.dispatch import DeferredMask
from lighthouse_hf.integration import lighthouse_attention_forward
from lighthouse_hf.ops import (
    Documents,
    dense_causal_attention,
    dense_causal_attention_varlen,
    lighthouse_attention_varlen,
    shortest_compressed_length,
)

OP_SETTINGS = dict(levels=3, pooling=2, topk=128)
SHORTEST = shortest_compressed_length(**OP_SETTINGS)  # 683: shorter documents run dense
# One token, shorter than a tile, exactly a tile (128 entries), one short of compressing, the shortest
# that compresses, and one whose coarsest level is exactly two full tiles (no padding, 1024 / 4 = 256).
SPECIAL_LENGTHS = [1, 100, 128, SHORTEST - 1, SHORTEST, 1024]


def random_lengths(seed: int, total: int, specials=SPECIAL_LENGTHS) -> list[int]:
    """The special lengths and random ones (1..1100) in random order, the last cut to fill ``total``."""
    rng = random.Random(seed)
    lengths = list(specials)
    while sum(lengths) < total:
        lengths.append(rng.randint(1, 1100))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] == 0:
        lengths.pop()
    rng.shuffle(lengths)
    return lengths


def per_document(fn, documents: Documents, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` on every document alone (the loop the varlen op must match), placed back in its row."""
    pieces = []
    for row, start, length in documents.spans():
        pieces.append((row, start, length, fn(*(t[row : row + 1, :, start : start + length] for t in tensors))))
    out = torch.zeros_like(pieces[0][3]).new_zeros(tensors[0].shape)
    for row, start, length, piece in pieces:
        out[row : row + 1, :, start : start + length] = piece
    return out


def _qkv(batch, heads, kv_heads, seq, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, seq, dim, generator=g).requires_grad_() for h in (heads, kv_heads, kv_heads)]


# ---- the ops ----

OPTIONS = {
    "published": {},
    "causal": dict(selection="causal"),
    "mean": dict(combine="mean"),
    "span_end": dict(rope_inv_freq=1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)),
    "given_scores": "scores",
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_varlen_op_equals_each_document_alone(option):
    seq = 3000
    documents = Documents.from_lengths([random_lengths(1, seq), random_lengths(2, seq, specials=[1, 2048])])
    q, k, v = _qkv(2, 4, 2, seq, 16, seed=3)
    extra = OPTIONS[option]
    scored = extra == "scores"
    tensors = [q, k, v]
    if scored:
        g = torch.Generator().manual_seed(4)
        tensors += [torch.rand(2, 4, seq, generator=g), torch.rand(2, 2, seq, generator=g)]
        extra = {}

    def alone(*parts):
        scores = dict(q_scores=parts[3], k_scores=parts[4]) if scored else {}
        return lighthouse_attention(*parts[:3], **OP_SETTINGS, **extra, **scores)

    scores = dict(q_scores=tensors[3], k_scores=tensors[4]) if scored else {}
    out = lighthouse_attention_varlen(q, k, v, documents, **OP_SETTINGS, **extra, **scores)
    expected = per_document(alone, documents, *tensors)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - expected).abs().max() <= 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g_, w_ in zip(got, want):
        assert (g_ - w_).abs().max() <= 1e-5


def test_one_document_per_row_is_the_single_sequence_op():
    q, k, v = _qkv(2, 4, 2, 1500, 8)
    with torch.no_grad():
        out = lighthouse_attention_varlen(q, k, v, Documents.from_lengths([[1500], [1500]]), **OP_SETTINGS)
        assert torch.equal(out, lighthouse_attention(q, k, v, **OP_SETTINGS))


def test_bundled_dense_documents_split_and_join_in_order(monkeypatch):
    # The varlen flash path runs on CUDA only; here a per-document stand-in checks what is handed to
    # it (every dense document, in order, causal) and how its output is put back.
    calls = []

    def varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **causal):
        assert causal in ({"window_size": (-1, 0)}, {"is_causal": True}) and torch.equal(cu_q, cu_k)
        calls.append(cu_q.tolist())
        bounds = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        pieces = [
            dense_causal_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), scale)[0].transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(pieces)

    monkeypatch.setattr(lighthouse_hf.ops.varlen, "varlen_attn", varlen_stand_in)
    monkeypatch.setattr(lighthouse_hf.ops.varlen, "_bundles_dense", lambda q, window, dropout: True)
    documents = Documents.from_lengths([[5, 700, 3, 100, 5], [800, 13]])
    q, k, v = _qkv(2, 4, 2, 813, 8)
    out = lighthouse_attention_varlen(q, k, v, documents, **OP_SETTINGS)
    expected = per_document(lambda *t: lighthouse_attention(*t, **OP_SETTINGS), documents, q, k, v)
    assert calls == [[0, 3, 8, 13, 26, 126]]  # the dense documents, shortest first
    assert (out - expected).abs().max() <= 1e-5
    grad = torch.randn_like(out)
    for g_, w_ in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert (g_ - w_).abs().max() <= 1e-5


def test_varlen_op_runs_lighthouse_exactly_on_the_documents_that_compress(monkeypatch):
    ran = spy_lighthouse_documents(monkeypatch)
    lengths = random_lengths(5, 4000)
    q, k, v = _qkv(1, 2, 2, 4000, 8)
    with torch.no_grad():
        lighthouse_attention_varlen(q, k, v, Documents.from_lengths([lengths]), **OP_SETTINGS)
    assert sorted(ran) == sorted(n for n in lengths if compressed_length(n, **OP_SETTINGS) < n)


def test_varlen_op_min_seq_len_runs_shorter_documents_dense():
    lengths = [SHORTEST, 1200, 800]
    documents = Documents.from_lengths([lengths])
    q, k, v = _qkv(1, 2, 1, sum(lengths), 8)
    with torch.no_grad():
        out = lighthouse_attention_varlen(q, k, v, documents, **OP_SETTINGS, min_seq_len=1000)
        expected = per_document(
            lambda *t: lighthouse_attention(*t, **OP_SETTINGS) if t[0].shape[2] >= 1000 else dense_causal_attention(*t, None),
            documents, q, k, v,
        )
    assert (out - expected).abs().max() <= 1e-5
    assert (out - lighthouse_attention_varlen(q, k, v, documents, **OP_SETTINGS)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 50])
def test_dense_varlen_op_equals_each_document_alone(window):
    documents = Documents.from_lengths([[1, 127, 300, 72], [500]])
    q, k, v = _qkv(2, 4, 2, 500, 8)
    out = dense_causal_attention_varlen(q, k, v, documents, window=window)

    def alone(q_, k_, v_):
        k_, v_ = k_.repeat_interleave(2, 1), v_.repeat_interleave(2, 1)
        length = q_.shape[2]
        i = torch.arange(length)
        mask = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < window) if window else True)
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)

    expected = per_document(alone, documents, q, k, v)
    assert (out - expected).abs().max() <= 1e-5
    grad = torch.randn_like(out)
    for g_, w_ in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert (g_ - w_).abs().max() <= 1e-5


def test_varlen_ops_check_their_arguments():
    q, k, v = _qkv(1, 2, 2, 10, 8)
    with pytest.raises(ValueError, match="documents must be a lighthouse_hf.ops.Documents"):
        lighthouse_attention_varlen(q, k, v, [[10]])
    with pytest.raises(ValueError, match=r"documents describe 2 row\(s\) of 5 tokens, but q has batch=1 and seq=10"):
        lighthouse_attention_varlen(q, k, v, Documents.from_lengths([[5], [5]]))
    with pytest.raises(ValueError, match="min_seq_len must be an integer >= 1"):
        lighthouse_attention_varlen(q, k, v, Documents.from_lengths([[10]]), min_seq_len=0)
    with pytest.raises(ValueError, match="dense_window must be an integer >= 1, got 0"):
        lighthouse_attention_varlen(q, k, v, Documents.from_lengths([[10]]), dense_window=0)
    with pytest.raises(ValueError, match="window must be None or an integer >= 1"):
        dense_causal_attention_varlen(q, k, v, Documents.from_lengths([[10]]), window=0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        dense_causal_attention_varlen(q, k, v, Documents.from_lengths([[10]]), dropout=1.0)


def test_documents_from_lengths_cu_seqlens_and_position_ids():
    assert Documents.from_lengths([[3, 4], [7]]).lengths == ((3, 4), (7,))
    assert Documents.from_cu_seqlens(torch.tensor([0, 3, 7, 9, 14], dtype=torch.int32), 2, 7).lengths == ((3, 4), (2, 5))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [5, 6, 7, 8, 9, 10, 11]])
    assert Documents.from_position_ids(positions, 2).lengths == ((3, 2, 2), (7,))
    assert Documents.from_position_ids(positions[:1], 3).lengths == ((3, 2, 2),) * 3  # [1, S] broadcast to the batch
    assert Documents.from_lengths([[1, 2]]).max_length == 2
    assert list(Documents.from_lengths([[1, 2], [3]]).spans()) == [(0, 0, 1), (0, 1, 2), (1, 0, 3)]


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 4, 7], "must start at 0"),
        ([0, 4, 4, 7], r"strictly increasing, but entry 2 \(4\) follows 4"),
        ([0, 5, 3, 7], r"strictly increasing, but entry 2 \(3\) follows 5"),
        ([0, 4, 6], r"must end at the number of tokens, 7 \(1 row\(s\) of 7\), but ends at 6"),
        ([0], "must start at 0 and hold each document's end"),
        (torch.tensor([0.0, 7.0]), "must be a 1-D integer tensor"),
    ],
)
def test_documents_from_cu_seqlens_rejects_inconsistent_input(cu, message):
    with pytest.raises(ValueError, match=message):
        Documents.from_cu_seqlens(cu, 1, 7, name="cu_seq_lens_q")


def test_documents_reject_a_document_across_rows_and_bad_lengths():
    with pytest.raises(ValueError, match="a document crosses the row boundary at token 4"):
        Documents.from_cu_seqlens([0, 3, 5, 8], 2, 4)
    with pytest.raises(ValueError, match=r"row 1: document lengths \[2, 1\] sum to 3, not to the row's length 4"):
        Documents.from_lengths([[4], [2, 1]])
    with pytest.raises(ValueError, match="document lengths must be integers >= 1"):
        Documents.from_lengths([[4, 0]])
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        Documents.from_position_ids(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        Documents.from_position_ids(torch.ones(1, 3, dtype=torch.bool), 1)  # not a document per token
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 1.0"):
        Documents.from_cu_seqlens([0, 4], 1.0, 4)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got -4"):
        Documents.from_cu_seqlens([0, 4], 1, -4)
    with pytest.raises(ValueError, match="lengths must hold at least one row of document lengths"):
        Documents.from_lengths([], seq_len=5)
    assert Documents.from_lengths(torch.tensor([[3, 4]])).lengths == ((3, 4),)  # a tensor of lengths reads as integers


# ---- Transformers models ----

MODEL_SETTINGS = dict(OP_SETTINGS, dense_layers=[0])
LIGHTHOUSE_LAYERS = 2  # of the tiny models' 3


def spy_lighthouse_documents(monkeypatch) -> list[int]:
    """The length of every document that runs Lighthouse in a packed call (one entry per document
    and layer), seen where the varlen op hands each group of equal lengths to the steps."""
    ran: list[int] = []
    select = lighthouse_hf.ops.varlen.select

    def counted(q, k, plan, options):
        ran.extend([plan.seq_len] * q.shape[0])
        return select(q, k, plan, options)

    monkeypatch.setattr(lighthouse_hf.ops.varlen, "select", counted)
    return ran


def tiny_model(family: str, **settings):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LighthouseWarning)  # e.g. "no layer runs Lighthouse" when all are dense
        apply_lighthouse(model, **{**MODEL_SETTINGS, **settings})
    return model


def packed_inputs(rows: list[list[int]], route: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids ``[len(rows), S]`` and the keywords that mark the documents: ``position_ids``
    restarting per document, or ``flash``: what DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    gives (restarting position ids and cu_seq_lens_q/k, max_length_q/k; one row)."""
    seq = sum(rows[0])
    ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(seed))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    kwargs = dict(position_ids=positions, use_cache=False)
    if route == "flash":
        assert len(rows) == 1
        cu = torch.tensor([0, *torch.tensor(rows[0]).cumsum(0).tolist()], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(rows[0]), max_length_k=max(rows[0]))
    return ids, kwargs


def check_packed_equals_documents_alone(model, rows, route, monkeypatch, *, tol=1e-5):
    """Logits and parameter gradients of the packed batch against each document run alone; no
    LighthouseWarning; Lighthouse ran on every document it compresses, in every Lighthouse layer."""
    ids, kwargs = packed_inputs(rows, route)
    weights = torch.randn(*ids.shape, 128, generator=torch.Generator().manual_seed(1))
    ran = spy_lighthouse_documents(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        logits = model(ids, **kwargs).logits
        packed_grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()), allow_unused=True)
    long_documents = [n for row in rows for n in row if compressed_length(n, **OP_SETTINGS) < n]
    assert long_documents and sorted(ran) == sorted(long_documents * LIGHTHOUSE_LAYERS)

    alone_grads = [torch.zeros_like(p) for p in model.parameters()]
    for row, start, length in Documents.from_lengths(rows).spans():
        piece = model(ids[row : row + 1, start : start + length], use_cache=False).logits
        assert (logits[row : row + 1, start : start + length] - piece).abs().max() <= tol
        loss = (piece * weights[row : row + 1, start : start + length]).sum()
        for total, g in zip(alone_grads, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)):
            if g is not None:
                total += g
    for p_grad, a_grad in zip(packed_grads, alone_grads):
        if p_grad is not None:
            assert rel_err(p_grad, a_grad) <= tol


@pytest.mark.parametrize("route", ["position_ids", "flash"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_row_equals_each_document_alone(family, route, monkeypatch):
    seed = sorted(FAMILIES).index(family)
    check_packed_equals_documents_alone(tiny_model(family), [random_lengths(seed, 3500)], route, monkeypatch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_with_restarting_positions_equal_each_document_alone(family, monkeypatch):
    rows = [random_lengths(10, 2500), random_lengths(11, 2500, specials=[2500 - 700, 700])]
    check_packed_equals_documents_alone(tiny_model(family), rows, "position_ids", monkeypatch)


def test_dense_layers_keep_documents_apart_as_transformers_does():
    # Every layer dense: the packed batch matches Transformers' own SDPA with its packed-sequence
    # mask, which this path never builds (an S x S mask).
    rows = [[300, 1, 99, 624], [1024]]
    ids, kwargs = packed_inputs(rows, "position_ids")
    model = tiny_model("llama", dense_layers=[0, 1, 2])
    sdpa = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", LighthouseWarning)  # no layer runs Lighthouse
        patch.setattr(DeferredMask, "materialize", lambda self: pytest.fail("built an S x S mask"))
        logits = model(ids, **kwargs).logits
    with torch.no_grad():
        assert (logits - sdpa(ids, **kwargs).logits).abs().max() <= 1e-5


def test_sliding_window_dense_layers_keep_their_window_inside_each_document():
    def mistral(attn, window):
        config = tiny_config("mistral", sliding_window=window)
        config.lighthouse = dict(MODEL_SETTINGS, dense_layers=[0, 1, 2])
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()

    ids, kwargs = packed_inputs([[30, 200, 1, 281]], "flash")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", LighthouseWarning)  # no Lighthouse layer; the sliding-window note
        logits = mistral("lighthouse", 64)(ids, **kwargs).logits
        sdpa = mistral("sdpa", 64)
        assert (logits - sdpa(ids, **kwargs).logits).abs().max() <= 1e-5
        # both the window and the documents matter here
        assert (logits - mistral("sdpa", None)(ids, **kwargs).logits).abs().max() > 1e-3
        assert (logits - sdpa(ids, use_cache=False).logits).abs().max() > 1e-3


@pytest.mark.parametrize("route", ["position_ids", "flash"])
def test_sliding_window_lighthouse_layers_keep_it_for_documents_that_run_dense(route, monkeypatch):
    # Run alone, a document too short to compress falls back to dense SDPA with the layer's window;
    # packed, it must too (Lighthouse documents have no window either way).
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=64), dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LighthouseWarning)  # the sliding-window note
        apply_lighthouse(model, **MODEL_SETTINGS)
    rows = [[700, 300, 1024, 100]]
    ids, kwargs = packed_inputs(rows, route)
    ran = spy_lighthouse_documents(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", LighthouseWarning)  # a training-free call; short documents are expected
        logits = model(ids, **kwargs).logits
        assert sorted(ran) == [700, 700, 1024, 1024]  # both Lighthouse layers, the two documents that compress
        for row, start, length in Documents.from_lengths(rows).spans():
            alone = model(ids[row : row + 1, start : start + length], use_cache=False).logits
            assert (logits[row : row + 1, start : start + length] - alone).abs().max() <= 1e-5, (start, length)
        # the window matters for the dense documents: without it the 300-token one differs
        monkeypatch.setattr(model.config, "sliding_window", None)
        assert (model(ids, **kwargs).logits[:, 700:1000] - logits[:, 700:1000]).abs().max() > 1e-3


def test_flash_keywords_alone_keep_documents_apart_in_every_layer(monkeypatch):
    # cu_seq_lens_q/k without restarting positions (return_position_ids=False): Transformers' SDPA
    # ignores them; here every layer keeps the documents apart. Positions run on, so each document
    # is compared with itself alone at its own positions.
    lengths = [700, 1, 1024, 275]
    model = tiny_model("qwen3")
    ids, kwargs = packed_inputs([lengths], "flash")
    del kwargs["position_ids"]
    ran = spy_lighthouse_documents(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        logits = model(ids, **kwargs).logits
        assert sorted(ran) == [700, 700, 1024, 1024]
        for _, start, length in Documents.from_lengths([lengths]).spans():
            positions = torch.arange(start, start + length)[None]
            alone = model(ids[:, start : start + length], position_ids=positions, use_cache=False).logits
            assert (logits[:, start : start + length] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cu_seq_lens_q=torch.tensor([0, 100, 1999], dtype=torch.int32)), "cu_seq_lens_q must end at the number of tokens, 2000"),
        (dict(cu_seq_lens_q=torch.tensor([0, 1200, 1100, 2000], dtype=torch.int32)), "cu_seq_lens_q must be strictly increasing"),
        (dict(cu_seq_lens_k=torch.tensor([0, 1000, 2000], dtype=torch.int32)), "cu_seq_lens_q and cu_seq_lens_k must be equal"),
        (dict(cu_seq_lens_k=None), "cu_seq_lens_q and cu_seq_lens_k must be given together"),
        (dict(max_length_q=1000), "max_length_q must be an integer at least the longest document's length, 1200"),
        (dict(position_ids=torch.arange(2000)[None] % 1000), "position_ids and cu_seq_lens_q mark different documents"),
        (dict(attention_mask=torch.ones(1, 2000, dtype=torch.long).index_fill(1, torch.tensor([0]), 0)),
         "an attention mask with padding cannot be combined with it"),
    ],
)
def test_inconsistent_flash_keywords_are_clear_errors(change, message):
    model = tiny_model("llama")
    ids, kwargs = packed_inputs([[1200, 800]], "flash")
    kwargs.update(change)
    if "attention_mask" in change:
        del kwargs["position_ids"]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(ids, **kwargs)


def test_flash_keywords_with_context_parallelism_are_a_clear_error():
    model = tiny_model("llama")
    attention = model.model.layers[1].self_attn
    q, k, v = _qkv(1, 4, 2, 64, 16)
    cu = torch.tensor([0, 32, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="context parallelism does not support packed documents, but the call has cu_seq_lens_q"):
        lighthouse_attention_forward(attention, q, k, v, None, lighthouse_cp_group=object(), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_a_forward_reads_the_documents_once(monkeypatch):
    reads = []
    from_position_ids = Documents.from_position_ids.__func__

    def counted(cls, position_ids, batch):
        reads.append(batch)
        return from_position_ids(cls, position_ids, batch)

    monkeypatch.setattr(Documents, "from_position_ids", classmethod(counted))
    ids, kwargs = packed_inputs([[700, 300]], "position_ids")
    with torch.no_grad():
        tiny_model("llama")(ids, **kwargs)
    assert reads == [1]  # three layers, one read


@pytest.mark.slow
def test_trainer_with_flattening_collator_runs_lighthouse_on_every_long_document(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    lengths = [900, 40, 1, 700, 300]
    rng = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict({"input_ids": [torch.randint(0, 128, (n,), generator=rng).tolist() for n in lengths]})
    model = tiny_model("llama")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    ran = spy_lighthouse_documents(monkeypatch)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(lengths), max_steps=2, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        trainer.train()
    # every step: each document that compresses, in each Lighthouse layer
    assert sorted(ran) == sorted([900, 700] * LIGHTHOUSE_LAYERS * 2)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.slow
def test_trainer_on_pack_dataset_document_positions_runs_lighthouse_on_every_long_document(tmp_path, monkeypatch):
    # pack_dataset(..., document_positions=True) and Trainer's default collator: rows of B=2 with
    # restarting position ids.
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lighthouse_hf import pack_dataset

    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh") for _ in range(n)) for n in (899, 39, 699, 299, 899, 699, 500)]
    train = pack_dataset(Dataset.from_dict({"text": texts}), lambda batch: [list(t.encode()) for t in batch], 1700,
                         eos_token_id=0, document_positions=True)
    rows = [Documents.from_position_ids(torch.tensor([row["position_ids"]]), 1).lengths[0] for row in train]
    long_documents = [n for row in rows for n in row if compressed_length(n, **OP_SETTINGS) < n]
    assert len(rows) == 2 and len(long_documents) >= 3
    model = tiny_model("llama")
    model.train()
    ran = spy_lighthouse_documents(monkeypatch)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        Trainer(model=model, args=args, train_dataset=train).train()
    assert sorted(ran) == sorted(long_documents * LIGHTHOUSE_LAYERS)


@pytest.mark.slow
def test_fused_kernels_on_packed_rows_equal_the_reference_under_the_interpreter():
    import json
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = pathlib.Path(__file__).with_name("interpreted_packed.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [row["option"] for row in rows] == ["published", "mean", "span_end", "causal"]
    for row in rows:
        assert row["out"] < 1e-6 and max(row["grads"]) < 1e-6, row


# ---- lighthouse-hf bench --packed ----


def test_bench_packed_runs_on_the_cpu_at_tiny_sizes(capsys):
    import json

    from lighthouse_hf.cli import main

    flags = ["--heads", "2", "--kv-heads", "1", "--dim", "8", "--levels", "3", "--pooling", "2", "--topk", "128",
             "--dtype", "float32", "--warmup", "0", "--iters", "1", "--input-sets", "1", "--json"]
    assert main(["bench", "--packed", "1200", "100", "1", "700", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["document_lengths"] == [[1200, 100, 1, 700]]
    assert [row["mode"] for row in report["results"]] == ["fwd+bwd", "fwd"]
    for row in report["results"]:
        assert (row["seq"], row["documents"], row["compressed_documents"], row["longest"]) == (2001, 4, 2, 1200)
        assert row["seq_sel"] == compressed_length(1200, **OP_SETTINGS) + 100 + 1 + compressed_length(700, **OP_SETTINGS)
        for name in ("lighthouse", "sdpa_sel", "dense_documents", "lighthouse_unpacked"):
            assert row[name]["ms"] > 0
        assert row["ratio_to_sdpa_sel"] == row["lighthouse"]["ms"] / row["sdpa_sel"]["ms"]
        assert row["ratio_rounds"] is None and len(row["lighthouse"]["round_ms"]) == 1  # one round: no range
    for seed in ("0", "1", "2"):  # rows whose compressed totals differ: the floor puts them in one row
        assert main(["bench", "--packed-longtail", "4K", "--modes", "fwd", "--batch", "2", "--packed-seed", seed, *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [sum(row) for row in report["document_lengths"]] == [4096, 4096]
        compressed = [compressed_length(n, **OP_SETTINGS) for row in report["document_lengths"] for n in row]
        assert report["results"][0]["seq_sel"] == sum(compressed)


def test_longtail_lengths_are_a_seeded_mixture_filling_the_row():
    from lighthouse_hf.bench import longtail_lengths

    lengths = longtail_lengths(1 << 24, seed=3)
    assert sum(lengths) == 1 << 24 and min(lengths) >= 1
    assert lengths == longtail_lengths(1 << 24, seed=3) and lengths != longtail_lengths(1 << 24, seed=4)
    # Half the tokens from the long part (median 32K, nearly all its tokens in documents >= 8K), half
    # from the short one (median 1K sigma 1.5: 54% of its tokens in documents >= 8K): 77% in all.
    long_tokens = sum(n for n in lengths if n >= 8192) / (1 << 24)
    assert 0.72 < long_tokens < 0.82
    assert sorted(lengths)[len(lengths) // 2] < 2048


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--packed", "0"], "a length must be at least 1 token"),
        (["--packed", "100", "--packed-longtail", "4K"], "not allowed with argument"),
    ],
)
def test_bench_packed_usage_errors(argv, message, capsys):
    from lighthouse_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", *argv])
    assert message in capsys.readouterr().err


def test_bench_packed_refuses_e2e(capsys):
    from lighthouse_hf.cli import main

    assert main(["bench", "--packed", "100", "--e2e"]) == 2
    assert "leave out --e2e" in capsys.readouterr().err


def test_bench_packed_refuses_a_sweep_of_a_method_option(capsys):
    from lighthouse_hf.cli import main

    assert main(["bench", "--packed", "100", "--combine", "sum", "mean", "--rope", "span_end"]) == 2
    assert "one value of each method option; give one to --combine" in capsys.readouterr().err


# ---- on a GPU ----

GPU = dict(seq=24000, settings=dict(levels=3, pooling=4, topk=256), specials=[1, 100, 128, 2304, 4096, 9000])


def _gpu_case(option: str):
    """Packed rows, q/k/v on the CPU in float32, and the option's keywords (CPU tensors)."""
    seq = GPU["seq"]
    documents = Documents.from_lengths([random_lengths(7, seq, specials=GPU["specials"]),
                                        random_lengths(8, seq, specials=[seq - 20000, 20000])])
    q, k, v = (x.detach() for x in _qkv(2, 8, 2, seq, 64, seed=9))
    extra = {}
    if option in ("causal", "mean"):
        extra = dict(OPTIONS[option])
    if option == "span_end":
        extra["rope_inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)
    if option == "given_scores":
        g = torch.Generator().manual_seed(10)
        extra.update(q_scores=torch.rand(2, 8, seq, generator=g), k_scores=torch.rand(2, 2, seq, generator=g))
    return documents, (q, k, v), extra


def _packed_op(documents):
    """``lighthouse_attention_varlen`` over ``documents`` with the GPU tests' settings."""

    def packed(*args, **options):
        return lighthouse_attention_varlen(*args, documents, **GPU["settings"], **options)

    return packed


def _run_on(fn, inputs, extra, grad, device, dtype):
    moved = [x.to(device, dtype).requires_grad_() for x in inputs]
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in extra.items()}
    out = fn(*moved, **options)
    grads = torch.autograd.grad(out, moved, grad.to(device, dtype))
    return [t.float().cpu() for t in (out, *grads)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_gpu_fused_packed_equals_reference_packed(option):
    # float32: the fused path on CUDA (one call of the kernels per document length) against the
    # reference path on the CPU, outputs and gradients.
    documents, inputs, extra = _gpu_case(option)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(11))

    packed = _packed_op(documents)

    got = _run_on(packed, inputs, extra, grad, "cuda", torch.float32)
    expected = _run_on(packed, inputs, extra, grad, "cpu", torch.float32)
    for g_, e_ in zip(got, expected):
        assert torch.isfinite(g_).all()
        assert rel_err(g_, e_) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("option", ["published", "causal"])
def test_gpu_bfloat16_packed_equals_each_document_alone(option):
    # bfloat16: the dense documents go through one varlen flash call; each document against the
    # single-sequence op on it alone, same kernels, same selection.
    documents, inputs, extra = _gpu_case(option)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(12))

    packed = _packed_op(documents)

    def alone(*args, **options):
        return per_document(lambda *t: lighthouse_attention(*t, **GPU["settings"], **options), documents, *args)

    got = _run_on(packed, inputs, extra, grad, "cuda", torch.bfloat16)
    expected = _run_on(alone, inputs, extra, grad, "cuda", torch.bfloat16)
    for g_, e_ in zip(got, expected):
        assert torch.isfinite(g_).all()
        assert rel_err(g_, e_) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_packed_model_equals_each_document_alone():
    model = tiny_model("llama").cuda()
    rows = [random_lengths(12, 3500)]
    ids, kwargs = packed_inputs(rows, "flash")
    ids = ids.cuda()
    kwargs = {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        logits = model(ids, **kwargs).logits
        for _, start, length in Documents.from_lengths(rows).spans():
            alone = model(ids[:, start : start + length], use_cache=False).logits
            assert rel_err(logits[:, start : start + length], alone) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("route", ["single", "position_ids"])
def test_a_compiled_whole_model_runs_lighthouse_per_document_like_eager(route):
    """Under torch.compile Transformers marks every forward without a cache as packed; the lengths
    are read in one graph break (fullgraph=False, as Trainer compiles), not by falling back to dense."""
    model = tiny_model("llama")
    rows = [[1500]] if route == "single" else [[700, 1, 799]]
    ids, kwargs = packed_inputs(rows, "position_ids")
    eager = model(ids, **kwargs).logits
    dense = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32, attn_implementation="sdpa").eval()
    dense.load_state_dict(model.state_dict())
    assert rel_err(eager, dense(ids, **kwargs).logits) > 1e-3  # Lighthouse ran in eager
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)  # no dense fallback
        assert rel_err(compiled(ids, **kwargs).logits, eager) <= 1e-6
