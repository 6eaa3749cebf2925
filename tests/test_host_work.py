"""The host's work in one fused forward call, counted on the CPU: Triton launches and ATen ops.

Where a call starts from an idle GPU, the GPU waits for the host until the first long kernel
(SDPA) is queued; each launch costs the host about 35 us and each ATen op 5-10 us (NOTES-kernels,
v4). The Triton kernels are replaced by launch counters and the fused path is forced on CPU
tensors, so what is counted is exactly the Python and ATen work around the launches. A change that
adds a launch or a handful of small ops to the forward fails here before it costs host time.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lighthouse_hf import lighthouse_attention
from lighthouse_hf.ops import fused

pytest.importorskip("triton")


class _Recorder:
    """``kernel[grid](...)`` that hands the launch's positional arguments to ``record`` instead of running."""

    def __init__(self, record) -> None:
        self.record = record

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record(args)


class _Launches:
    """Stands in for ``lighthouse_hf.ops.kernels``: its host-side helpers, and kernels that count."""

    def __init__(self, kernels) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.SCRATCH_KINDS = kernels.SCRATCH_KINDS
        self.entries_per_program = kernels.entries_per_program

    def __getattr__(self, name: str):
        if not name.endswith("_kernel"):
            raise AttributeError(name)
        return _Recorder(lambda args: self.counts.update([name]))


class _AtenOps(TorchDispatchMode):
    """Counts ATen ops by name, and keeps the sizes of the tensors ``aten.full`` fills."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.filled: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.full:
            self.filled.append(tuple(out.shape))
        return out


def _counted_fused_path(monkeypatch) -> _Launches:
    """The fused path forced on CPU tensors, its kernels replaced by launch counters."""
    launches = _Launches(fused._kernels())
    monkeypatch.setattr(fused, "_kernels", lambda: launches)
    monkeypatch.setattr(fused, "handles", lambda q: True)
    return launches


def _forward_host_work(monkeypatch, seq: int, **settings) -> tuple[dict[str, int], collections.Counter]:
    launches = _counted_fused_path(monkeypatch)
    q, k, v = (torch.randn(1, 2, seq, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with _AtenOps() as aten:
        lighthouse_attention(q, k, v, **settings)
    return dict(launches.counts), aten.ops


@pytest.mark.parametrize("settings, most_ops", [
    (dict(levels=3, pooling=4, topk=128), 20),  # the published default's shape: the whole pyramid in the score pass
    (dict(levels=5, pooling=8, topk=128), 50),  # spans past the score pass's block: ATen finishes two levels
])
def test_the_fused_forward_is_four_launches_and_few_aten_ops(monkeypatch, settings, most_ops):
    launches, ops = _forward_host_work(monkeypatch, 65536, **settings)
    assert launches == {"scores_kernel": 1, "select_kernel": 1, "entries_kernel": 1, "scatter_kernel": 1}
    assert sum(ops.values()) <= most_ops, ops
    if settings["levels"] == 3:
        # Besides allocations and views, one memset (the scatter's inverse table) and SDPA.
        assert ops["aten.full"] == 1 and not {"aten.fill_", "aten.copy_", "aten.amax"} & set(ops), ops


def test_given_scores_are_pooled_by_the_score_pass_not_by_aten(monkeypatch):
    # Qwen3's default (scores="pre_norm") gives every call its scores: the pass reads them instead of
    # q and k, so the pyramid costs no ATen pads, maxima and copies (about 20 small kernels).
    launches = _counted_fused_path(monkeypatch)
    q, k, v = (torch.randn(1, 2, 65536, 64, dtype=torch.bfloat16) for _ in range(3))
    given = dict(q_scores=torch.rand(1, 2, 65536) + 1, k_scores=torch.rand(1, 2, 65536) + 1)
    with _AtenOps() as aten:
        lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128, selection="causal", **given)
    assert launches.counts == {"scores_kernel": 1, "select_kernel": 1, "entries_kernel": 1, "scatter_kernel": 1}
    assert not {"aten.amax", "aten.constant_pad_nd", "aten.copy_"} & set(aten.ops), aten.ops


def test_given_scores_of_two_dtypes_reach_the_score_pass_as_one(monkeypatch):
    # A program of the pass reads q's or k's scores through one pointer: the compiled kernel needs
    # one element type (the interpreter would not notice two).
    launches = _counted_fused_path(monkeypatch)
    read = []
    launches.scores_kernel = _Recorder(lambda args: read.append((args[0].dtype, args[1].dtype)))
    q, k, v = (torch.randn(1, 2, 4096, 64, dtype=torch.bfloat16) for _ in range(3))
    given = dict(q_scores=torch.rand(1, 4096, 2).transpose(1, 2).bfloat16(), k_scores=torch.rand(1, 2, 4096))
    lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128, **given)
    assert read == [(torch.float32, torch.float32)]


def test_the_inverse_table_spans_the_sequence_not_the_padded_pyramid(monkeypatch):
    # L5 p8 K128 at 8K pads the pyramid to 128 coarsest entries of 4096 positions (524,288); the
    # scatter reads only slots of positions inside the sequence (at 128K, L5 p8 K1536 filled 1.0 GB).
    _counted_fused_path(monkeypatch)
    q, k, v = (torch.randn(1, 2, 8192, 64, dtype=torch.bfloat16) for _ in range(3))
    with _AtenOps() as aten:
        lighthouse_attention(q, k, v, levels=5, pooling=8, topk=128)
    assert aten.filled == [(2, 5, 8192)]


def test_the_published_backward_walks_dq_then_dk_and_dv_together(monkeypatch):
    # v25 (NOTES-kernels.md): dk and dv share one walk's lookups; dq has its own (query heads).
    launches = _counted_fused_path(monkeypatch)
    q, k, v = (torch.randn(1, 2, 65536, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128)
    out.backward(torch.ones_like(out))
    assert launches.counts["walk_kernel"] == 2 and launches.counts["scatter_kernel"] == 1, launches.counts


def test_the_span_end_backward_reuses_the_forwards_rotary_table(monkeypatch):
    launches = _counted_fused_path(monkeypatch)
    q, k, v = (torch.randn(1, 2, 65536, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    with _AtenOps() as forward:
        out = lighthouse_attention(q, k, v, levels=3, pooling=4, topk=128, rope_inv_freq=inv_freq)
    with _AtenOps() as backward:
        out.backward(torch.ones_like(out))
    assert forward.ops["aten.cos"] == forward.ops["aten.sin"] == 1, forward.ops
    assert not {"aten.cos", "aten.sin", "aten.arange"} & set(backward.ops), backward.ops
    # the gather's backward: dq and dk turned back, and dv, as three walks
    assert launches.counts["walk_kernel"] == 3 and launches.counts["scatter_kernel"] == 1, launches.counts
