"""Runs the fused Triton path on CPU tensors under Triton's interpreter against the PyTorch
reference: every method option, forward and backward. Run by tests/test_kernels_interpreted.py in
its own process (TRITON_INTERPRET must be set before the kernels are compiled) with every mode, or
by hand with one or more:

    TRITON_INTERPRET=1 python tests/interpreted_kernels.py float32
    TRITON_INTERPRET=1 python tests/interpreted_kernels.py bfloat16 selection
    TRITON_INTERPRET=1 python tests/interpreted_kernels.py means
    TRITON_INTERPRET=1 python tests/interpreted_kernels.py halo skip walk

Prints one JSON line per row, its mode under "mode". A dtype's rows, one per (shape, options): the
relative errors of the output and gradients and whether the selections are identical; ``selection``
one per (shape, scores, rule): whether the selection kernel equals the reference entry for entry
(ties included); ``means`` one per shape: the score pass's means against the reference pyramid's
level of their width, the gathered rows against the reference's, and whether rope="span_end"
selects as rope="pooled" (with no means from the score pass); ``halo`` one per (shape, combine):
the scatter over more positions than the plan's sequence (the context-parallel halo) against the
reference's; ``skip`` one per (shape, options) or halo scatter: whether the scatter kernel's two
ways to sum give the same bits (its check forced on and off); ``walk`` one per shape and RoPE: the
gather's gradient of q, k and v in float32 against the reference's, span-end RoPE or not, at pooling
32 too. The float32 rows say how many positions a program of the scatter kernel took (the wide and
the sparse cases take as many as on the GPU at D=128) and, at those blocks, what share of the
blocks meets a selected entry below the coarsest level.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from lighthouse_hf import lighthouse_attention  # noqa: E402
from lighthouse_hf.export.verify import same_bits  # noqa: E402
from lighthouse_hf.ops import LighthousePlan, fused, reference  # noqa: E402
from helpers import span_end_scores_apart  # noqa: E402

# Triton 3.6's interpreter converts a loop bound with int() on a 1-element array, which NumPy 2.4
# refuses (only 0-d arrays convert); the interpreter's own patch, repeated with the element taken.
_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_with_scalar_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_with_scalar_index


def side_by_side(compute: Callable, items: Collection) -> Iterator:
    """``compute(item)`` for every item, in order, each computed in one of a pool of forked
    processes, one per core (no more than items): the interpreter runs a program at a time on one
    core, and CI has two. ``compute`` must be a module-level function; a process computes one item
    at a time, with one thread (the pool's processes share the cores already). A process that dies
    fails the run (BrokenProcessPool) rather than leaving it waiting; a failed item cancels the
    items not started."""
    # At most 4: a container can list a host's cores it has no quota for, and each process holds ~0.5 GB.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ProcessPoolExecutor(min(cores, 4, len(items)), mp_context=multiprocessing.get_context("fork"),
                               initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield from pool.map(compute, items)
    finally:
        pool.shutdown(cancel_futures=True)


# (batch, heads, kv_heads, seq, dim, levels, pooling, topk). The last two: spans wider than one step of
# the entries kernel (512 and 256 positions), at levels listing far more entries than they have
# blocks (6 and 10 real coarsest entries of 128), so whole programs of padding entries; GQA in the first.
# Cases with several KV heads are laid out as Transformers hands q, k and v over ([B, S, H, D] seen as
# [B, H, S, D]), so that a head's stride is not a row's.
CASES = [(1, 2, 1, 2048, 16, 3, 4, 128), (2, 4, 2, 2051, 32, 3, 4, 128), (1, 2, 2, 1500, 16, 2, 8, 128),
         (1, 2, 1, 3000, 16, 4, 2, 256), (1, 2, 1, 3300, 16, 4, 8, 128), (1, 1, 1, 2600, 16, 5, 4, 128),
         (1, 2, 1, 8192, 16, 3, 4, 128)]
WIDE_CASES = CASES[4:6]
# A quarter of the coarsest entries refined: at the GPU's positions per program some blocks of the
# scatter kernel meet a finer entry and some only the coarsest, and its launches check which
# (fused._skips_finer_levels), so both of its ways to sum run (the other cases refine half or more).
SPARSE_CASE = CASES[6]
GPU_BLOCK_CASES = (*WIDE_CASES, SPARSE_CASE)
# Each option alone runs on the small narrow cases; the others (B = 2 with two KV heads, and the
# wide spans) run the published method and all options together, which passes every option's code.
# The interpreter is slow (CI's time): each option alone on those would add 2.5 minutes.
SINGLE_OPTION_CASES = [CASES[0], CASES[2], CASES[3]]
ALL_OPTIONS = {"rope": True, "scores": True, "combine": "mean", "selection": "causal"}
OPTIONS = [{}, {"combine": "mean"}, {"scores": True}, {"rope": True}, {"selection": "causal"}, ALL_OPTIONS]


def cases_for(dtype: torch.dtype) -> list[tuple]:
    """Every case in float32; in bfloat16 the single-option ones. Half precision adds the Triton score
    pass and its means (float32 takes ATen's norms), which the means mode checks on more shapes; the
    wide cases' own code, the loops over a span, is dtype-blind."""
    return CASES if dtype == torch.float32 else SINGLE_OPTION_CASES


def options_for(case: tuple, dtype: torch.dtype) -> list[dict]:
    """Every option alone and all together on the single-option cases in float32; elsewhere the
    published method and all options together."""
    return OPTIONS if dtype == torch.float32 and case in SINGLE_OPTION_CASES else [{}, ALL_OPTIONS]


def scatter_positions_per_program(block_d: int) -> int:
    """The scatter kernel's positions a program at ``block_d``, as ``fused._run_scatter`` takes them."""
    return fused._positions_per_program(block_d, fused._SCATTER_BLOCK_ELEMENTS)


# The wide cases run the scatter kernel with as many positions a program as at D=128 on the GPU: at
# their D of 16 it would otherwise take 256, wider than every level but the coarsest, so a block
# would never sit inside one entry's span nor start mid-span.
GPU_POSITIONS_PER_PROGRAM = scatter_positions_per_program(128)


@contextlib.contextmanager
def gpu_blocks(dim: int) -> Iterator[None]:
    """The scatter kernel at ``dim`` with as many positions a program as at D=128 on the GPU."""
    natural = fused._SCATTER_BLOCK_ELEMENTS
    fused._SCATTER_BLOCK_ELEMENTS = GPU_POSITIONS_PER_PROGRAM * dim
    try:
        yield
    finally:
        fused._SCATTER_BLOCK_ELEMENTS = natural


# The interpreter runs a program's operations one at a time in NumPy, so walk_kernel's unrolled walk
# costs it per program, not per row: 64 spans a program run the float32 cases 3x faster than the
# GPU's 8, and 256 keep GQA's dk and dv (spans narrower by the group since v26) from adding
# programs (every mode: 370 s at 64, 289 s at 256 on two cores). Every mode but ``walk`` walks 256
# (the rows are the same; only how many a program takes differs); ``walk`` keeps the GPU's.
INTERPRETED_WALKED_ROWS = 256


@contextlib.contextmanager
def walked_rows(rows: int) -> Iterator[None]:
    """``walk_kernel`` launched with ``rows`` spans a program."""
    natural = fused._WALKED_ROWS
    fused._WALKED_ROWS = rows
    try:
        yield
    finally:
        fused._WALKED_ROWS = natural


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def option_arguments(options: dict, case: tuple, g: torch.Generator) -> dict:
    """``lighthouse_attention``'s keyword arguments for ``options`` on ``case`` (given scores drawn
    from ``g``)."""
    batch, heads, kv_heads, seq, dim = case[:5]
    kwargs = {key: value for key, value in options.items() if key in ("combine", "selection")}
    if options.get("rope"):
        kwargs["rope_inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    if options.get("scores"):
        kwargs["q_scores"] = torch.rand(batch, heads, seq, generator=g)
        kwargs["k_scores"] = torch.rand(batch, kv_heads, seq, generator=g)
    return kwargs


def compare(case: tuple, options: dict, dtype: torch.dtype) -> dict:
    """The fused path against the reference on one case with one option set: relative errors of
    the output and of the gradients, and (float32) whether the two select the same entries."""
    batch, heads, kv_heads, seq, dim, levels, pooling, topk = case
    g = torch.Generator().manual_seed(seq)
    q, k, v = ((torch.randn(batch, seq, h, dim, generator=g).transpose(1, 2) if kv_heads > 1
                else torch.randn(batch, h, seq, dim, generator=g)).to(dtype) for h in (heads, kv_heads, kv_heads))
    kwargs = option_arguments(options, case, g)
    handles = fused.handles
    results = []
    for use_kernels in (True, False):
        fused.handles = (lambda x: x.dtype in fused.FUSED_DTYPES) if use_kernels else (lambda x: False)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = lighthouse_attention(*inputs, levels=levels, pooling=pooling, topk=topk, **kwargs)
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        results.append((out, grads))
    fused.handles = handles
    plan = LighthousePlan(seq, levels, pooling, topk)
    same_selection = None
    if dtype == torch.float32:
        chosen_by = dict(q_scores=kwargs.get("q_scores"), k_scores=kwargs.get("k_scores"),
                         causal=options.get("selection") == "causal")
        same_selection = torch.equal(fused.select(q, k, plan, **chosen_by).key,
                                     reference.select(q, k, plan, **chosen_by).key)
    (out, grads), (ref_out, ref_grads) = results
    chosen = reference.select(q, k, plan, q_scores=kwargs.get("q_scores"), k_scores=kwargs.get("k_scores"),
                              causal=options.get("selection") == "causal")
    return dict(case=case, options=options, out=rel(out, ref_out), grads=[rel(a, b) for a, b in zip(grads, ref_grads)],
                same_selection=same_selection,
                finer_blocks=blocks_meeting_finer_levels(chosen, GPU_POSITIONS_PER_PROGRAM))


def blocks_meeting_finer_levels(selection: reference.Selection, block: int) -> float:
    """The share of (batch, query head, block of ``block`` positions) of the scatter that some
    selected entry below the coarsest level reaches: entry j of width c reaches ``[j*c + c - 1,
    j*c + 2c - 1)``, and the scatter's blocks start one position early, so that in ``u = t + 1``
    the entry covers span ``j + 1`` and block b ``[b*block, (b+1)*block)``."""
    plan = selection.plan
    length = plan.padded_len + plan.coarse_width  # every entry's span, in u
    covered = torch.zeros(*selection.level.shape[:2], length, dtype=torch.bool)
    for level in range(plan.levels - 1):
        width = plan.pooling**level
        slots = length // width
        shifted = (selection.local + 1).masked_fill(selection.level != level, slots)
        spans = torch.zeros(*covered.shape[:2], slots + 1, dtype=torch.bool)
        spans.scatter_(-1, shifted, True)
        covered |= spans[..., :-1].repeat_interleave(width, dim=-1)
    launched = -(-(plan.seq_len + 1) // block) * block  # the blocks the scatter launches, in u
    covered = torch.nn.functional.pad(covered, (0, launched - length))  # cropped or padded to them
    return covered.unflatten(-1, (-1, block)).any(-1).float().mean().item()


def compare_row(item: tuple) -> dict:
    """:func:`compare` on one (case, options, dtype), a wide case at the GPU's positions per program,
    with the positions a program of the scatter kernel took."""
    case, options, dtype = item
    with gpu_blocks(case[4]) if case in GPU_BLOCK_CASES else contextlib.nullcontext():
        width = scatter_positions_per_program(fused._next_power_of_2(case[4]))  # what ran, not what was asked
        return dict(compare(case, options, dtype), positions_per_program=width, walked_rows=fused._WALKED_ROWS)


# (batch, heads, kv_heads, seq, dim, levels, pooling, topk). Tiles of more than 128 coarse entries
# (else the coarsest choice is forced whole) and more tiles than levels - 1 (else every program's
# run of earlier tiles starts at tile 0): 4 tiles of 256; padded, GQA, B = 2, L = 4; p = 8 with
# padded tiles of 313; 5 tiles of 225 at L = 4; one tile with a tail; L = 5; coarsest spans of 512
# positions, wider than the score pass's block (it writes levels 1-2, the host max-pools level 3,
# for the causal rule too).
SELECTION_CASES = [(1, 1, 1, 4096, 4, 3, 2, 512), (2, 2, 1, 3001, 8, 4, 2, 384), (1, 2, 2, 5000, 4, 2, 8, 256),
                   (1, 1, 1, 9000, 4, 4, 2, 640), (1, 1, 1, 2051, 4, 3, 4, 128), (1, 1, 1, 8192, 4, 5, 2, 256),
                   (1, 2, 1, 6000, 4, 4, 8, 128)]
# "norms": float32 q and k (their norms by ATen, as the reference); "integer": bfloat16 q and k of
# small integers (norms through the Triton score pass, exact, so equal to the reference's, and
# tied by the hundred); "given": given level-0 scores of 0..3 (ties everywhere, running means
# that scores equal exactly); "signed zeros": given scores mostly 0.0 and -0.0, which tie;
# "pre-norm layout": given scores as Qwen3's pre-norm hook hands them over, [B, S, h] seen as
# [B, h, S], q's in bfloat16 and k's in float32. Given scores come with bfloat16 q and k, so the
# Triton score pass reads them (float32 q and k take ATen's pyramid, which the float32 comparisons
# check).
SELECTION_SCORES = ["norms", "integer", "given", "signed zeros", "pre-norm layout"]


def _selection_inputs(case, scores):
    batch, heads, kv_heads, seq, dim = case[:5]
    g = torch.Generator().manual_seed(seq)
    if scores == "integer":
        q, k = (torch.randint(-2, 3, (batch, h, seq, dim), generator=g).bfloat16() for h in (heads, kv_heads))
    else:
        q, k = (torch.randn(batch, h, seq, dim, generator=g) for h in (heads, kv_heads))
        if scores != "norms":
            q, k = q.bfloat16(), k.bfloat16()
    given = {}
    for name, h in (("q_scores", heads), ("k_scores", kv_heads)):
        if scores == "given":
            given[name] = torch.randint(0, 4, (batch, h, seq), generator=g).float()
        elif scores == "signed zeros":
            ones = (torch.rand(batch, h, seq, generator=g) < 0.02).float()
            negative = torch.rand(batch, h, seq, generator=g) < 0.9
            given[name] = torch.where(negative & (ones == 0), -0.0, ones)
        elif scores == "pre-norm layout":
            given[name] = torch.rand(batch, seq, h, generator=g).transpose(1, 2)
            if name == "q_scores":
                given[name] = given[name].bfloat16()
    return q, k, given


def selection_row(item: tuple) -> dict:
    """The selection kernel against the reference on one (case, scores, causal)."""
    case, scores, causal = item
    plan = LighthousePlan(case[3], *case[5:])
    q, k, given = _selection_inputs(case, scores)
    got = fused.select(q, k, plan, causal=causal, **given)
    want = reference.select(q, k, plan, causal=causal, **given)
    fields = ("level", "local", "index", "key", "refined")
    return dict(case=case, scores=scores, causal=causal,
                score_pass_levels=fused._score_pass_levels(q.dtype, q.shape[-1], plan),
                equal={name: torch.equal(getattr(got, name), getattr(want, name)) for name in fields})


# The score pass's means (half precision only): spans of 2, 4, 8 and 16 positions, the coarsest or
# finer (L4 p4 and L3 p8: coarsest spans of 64, means of 16 and 8; L4 p8 at D=16: coarsest spans of
# 512 positions, wider than the pass's block, so its grid and its means cover the sequence only),
# padding entries past the sequence (S=1500 at width 16: 93 real coarse entries of 128), B = 2, GQA,
# D 16-64.
MEANS_CASES = [(1, 2, 1, 1500, 16, 3, 4, 128), (2, 4, 2, 2051, 32, 2, 8, 128), (1, 2, 2, 3000, 16, 4, 2, 256),
               (1, 1, 1, 1000, 16, 2, 2, 128), (1, 1, 1, 2048, 64, 2, 4, 128), (2, 2, 1, 3001, 16, 4, 4, 128),
               (1, 2, 2, 2500, 32, 3, 8, 128), (1, 2, 1, 5000, 16, 4, 8, 128)]


def means_row(case: tuple) -> dict:
    """rope="pooled": the score pass's means against the reference pyramid's level of their width,
    over the positions the pass covers, and the gathered q and k rows (copies or means of those
    means) against the reference's rows of the same listing. rope="span_end": the same listing
    and the same scores to the last bit, under both rules (they are the same norms); means only
    where the pooled ones are the coarsest level's, then at span end, against the reference's
    span-end pyramid, and its gathered q and k rows likewise; the gather's gradient of q, k and v
    (``gather_grad_error``)."""
    batch, heads, kv_heads, seq, dim = case[:5]
    plan = LighthousePlan(seq, *case[5:])
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    pooled, span_end = (fused.select_entries(q, k, plan, rope_inv_freq=rope) for rope in (None, inv_freq))
    width = fused.score_pass_means_width(q.dtype, dim, plan)
    level = round(math.log(width, plan.pooling))
    rows = fused.score_means_rows(plan, width)
    assert pooled.means.shape[1] == rows and fused.score_pass_positions(q.dtype, dim, plan) >= rows * width
    offset = plan.level_offset(level)
    want = torch.cat([reference.pyramid(x.float(), plan)[:, :, offset : offset + rows].flatten(0, 1) for x in (q, k)])
    selection = fused.selection_from_listing(pooled.entry_local, pooled.entry_row, plan)
    gathered = fused.gather_entries(pooled, q, k, v, plan)
    wants = (reference.gather_entries(reference.pyramid(x.float(), plan), selection.index) for x in (q, k, v))
    # relative to each row element (one bf16 step is 2**-8 to 2**-7 of it), so a wrong or missing mean shows
    gather_error = max(((got.float() - want).abs() / (want.abs() + 1e-3)).max().item() for got, want in zip(gathered, wants))
    span_end_error = span_end_gather_error = span_end_copies_means = None
    if span_end.means.numel():
        coarsest = plan.level_offset(plan.levels - 1)
        at_end = torch.cat([reference.pyramid(x.float(), plan, inv_freq)[:, :, coarsest : coarsest + rows].flatten(0, 1)
                            for x in (q, k)])
        span_end_error = (span_end.means.float() - at_end).abs().max().item()
        rotated = fused.gather_entries(span_end, q, k, v, plan)[:2]
        rotated_wants = (reference.gather_entries(reference.pyramid(x.float(), plan, inv_freq), selection.index)
                         for x in (q, k))
        span_end_gather_error = max(((got.float() - want).abs() / (want.abs() + 1e-3)).max().item()
                                    for got, want in zip(rotated, rotated_wants))
        # the gather copies those means (pooling the rows itself would give the same numbers): with the
        # means made NaN, the coarsest q and k rows, and only they, come out NaN
        poisoned = span_end._replace(means=torch.full_like(span_end.means, float("nan")))
        nan_rows = [x.isnan().any(-1) for x in fused.gather_entries(poisoned, q, k, v, plan)]
        from_means = (selection.level == plan.levels - 1) & (selection.local < rows)
        span_end_copies_means = bool(from_means.any() and torch.equal(nan_rows[0], from_means)
                                     and torch.equal(nan_rows[1], from_means) and not nan_rows[2].any())
    return dict(case=case, means_width=width, level=level, coarse_width=plan.coarse_width,
                span_end_grad_error=gather_grad_error(q, k, v, span_end, selection, plan, inv_freq),
                same_scores=not span_end_scores_apart(q, k, plan, inv_freq),
                means_dtype=str(pooled.means.dtype),
                max_error=(pooled.means.float() - want).abs().max().item(),
                gather_error=gather_error,
                same_listing=all(torch.equal(a, b) for a, b in zip(pooled[:3], span_end[:3])),
                span_end_means=span_end.means.numel(), span_end_error=span_end_error,
                span_end_gather_error=span_end_gather_error, span_end_copies_means=span_end_copies_means)


def gather_grad_error(q, k, v, listing, selection, plan, inv_freq=None) -> float:
    """The gather's gradient of q, k and v in q's dtype (summed over each span by ``walk_kernel``;
    turned back where ``inv_freq`` is given) against the reference's in float32 through the same
    listing: the largest error relative to each gradient's largest element."""
    g = torch.Generator().manual_seed(q.shape[2] + 1)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    got = fused.gather_entries(listing, *inputs, plan)
    cotangents = [torch.randn(x.shape, generator=g).to(q.dtype) for x in got]
    torch.autograd.backward(got, cotangents)
    wants = [x.detach().float().requires_grad_() for x in (q, k, v)]
    pyramids = [reference.pyramid(x, plan, inv_freq if index < 2 else None) for index, x in enumerate(wants)]
    torch.autograd.backward([reference.gather_entries(pyramid, selection.index) for pyramid in pyramids],
                            [c.float() for c in cotangents])
    return max(((x.grad.float() - want.grad).abs().max() / want.grad.abs().max()).item()
               for x, want in zip(inputs, wants))


# walk_kernel walks level 1's spans in a loop where pooling > 16 (no case above has one), and
# unrolled elsewhere: both, turned (span-end RoPE) and not, with GQA's sum over a group and wider
# levels entering at a span's end; and a head size that is no power of two (unturned: its halves
# are masked past D). The float32 mode's cases walk unrolled spans, GQA too.
WALK_CASES = [((1, 2, 1, 4100, 8, 2, 32, 128), True), ((1, 2, 2, 9000, 8, 3, 32, 128), True),
              ((1, 4, 2, 3300, 16, 4, 4, 128), True), ((1, 2, 1, 4100, 8, 2, 32, 128), False),
              ((1, 4, 2, 3000, 24, 4, 2, 256), False)]


def walk_row(item: tuple) -> dict:
    """The gather's gradient of q, k and v in float32 against the reference's through the same
    listing, on one case, span-end RoPE or not (``gather_grad_error``)."""
    case, span_end = item
    batch, heads, kv_heads, seq, dim = case[:5]
    plan = LighthousePlan(seq, *case[5:])
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim) if span_end else None
    listing = fused.select_entries(q, k, plan, rope_inv_freq=inv_freq)
    selection = fused.selection_from_listing(listing.entry_local, listing.entry_row, plan)
    span_levels = (fused._walked_span_level(plan, 1), fused._walked_span_level(plan, heads // kv_heads))  # dq; dk, dv
    return dict(case=case, span_end=span_end, span_levels=span_levels, rows=fused._WALKED_ROWS,
                grad_error=gather_grad_error(q, k, v, listing, selection, plan, inv_freq))


# Plans without padding, as the context-parallel op takes them (its chunks' plans are never
# padded); L = 3 and L = 4, GQA. A padded plan's scatter builds its plan from the output length,
# whose real entries then differ from the selection's, so the fused and reference scatters part
# there (not reached: nothing but the context-parallel op scatters past the sequence).
HALO_CASES = [(1, 2, 1, 2048, 16, 3, 4, 128), (1, 2, 2, 8192, 16, 4, 4, 128)]


def halo_row(item: tuple) -> dict:
    """The scatter of the kernels' listing over ``S + c - 1`` positions (``c`` the coarsest width;
    the context-parallel op scatters each chunk into the next chunk's first ``c - 1`` positions)
    against the reference's scatter of the same selection, on one case and combine (``mean``), float32."""
    case, mean = item
    batch, heads, kv_heads, seq, dim = case[:5]
    plan = LighthousePlan(seq, *case[5:])
    g = torch.Generator().manual_seed(seq)
    q, k = (torch.randn(batch, h, seq, dim, generator=g) for h in (heads, kv_heads))
    listing = fused.select_entries(q, k, plan)
    selection = fused.selection_from_listing(listing.entry_local, listing.entry_row, plan)
    out_sel = torch.randn(batch, heads, plan.compressed_len, dim, generator=g)
    length = seq + plan.coarse_width - 1
    got = fused.scatter_entries(listing, out_sel, length, plan, mean)
    want = reference.scatter_back(out_sel, selection, length, mean)
    return dict(case=case, mean=mean, length=length, error=rel(got, want))


# The scatter kernel's check (fused._skips_finer_levels) forced on and off: its two ways to sum must give
# the same bits. Half the coarsest entries refined, so that a quarter of the blocks of 32 positions
# skip: every option; the halo's scatter of the same plan (no padding).
SKIP_CASES = [((1, 2, 1, 4096, 16, 3, 4, 128), ALL_OPTIONS)]


def _with_check(on: bool, compute: Callable):
    """``compute()`` on the fused path (CPU tensors), every scatter-kernel launch checking for finer
    levels (``on``) or none."""
    natural = fused._skips_finer_levels, fused.handles
    fused._skips_finer_levels = lambda plan, block_p: on and plan.levels > 1
    fused.handles = lambda x: x.dtype in fused.FUSED_DTYPES
    try:
        return compute()
    finally:
        fused._skips_finer_levels, fused.handles = natural


def skip_row(item: tuple) -> dict:
    """Whether the fused path's output and gradients (``"attention"``) or the halo's scatter
    (``"halo"``) are bit for bit the same with the check on and off, in bfloat16 at the GPU's blocks."""
    kind, case, options = item
    batch, heads, kv_heads, seq, dim = case[:5]
    plan = LighthousePlan(seq, *case[5:])
    g = torch.Generator().manual_seed(seq)
    if kind == "halo":
        q, k = (torch.randn(batch, h, seq, dim, generator=g) for h in (heads, kv_heads))
        out_sel = torch.randn(batch, heads, plan.compressed_len, dim, generator=g).bfloat16()
        listing = fused.select_entries(q, k, plan)
        length = seq + plan.coarse_width - 1

        def compute():
            return (fused.scatter_entries(listing, out_sel, length, plan, options["mean"]),)
    else:
        q, k, v = (torch.randn(batch, seq, h, dim, generator=g).transpose(1, 2).bfloat16()
                   for h in (heads, kv_heads, kv_heads))
        kwargs = option_arguments(options, case, g)

        def compute():
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            out = lighthouse_attention(*inputs, levels=case[5], pooling=case[6], topk=case[7], **kwargs)
            return (out, *torch.autograd.grad(out.float().square().sum(), inputs))

    with gpu_blocks(dim):
        results = [_with_check(on, compute) for on in (True, False)]
    same = all(same_bits(a, b) for a, b in zip(*results))
    return dict(kind=kind, case=case, options=options, same_bits=same)


def mode_items(mode: str) -> list[tuple]:
    """``mode``'s work, one (mode, function, argument) per row: a dtype's cases and options, or
    selection, means or halo."""
    if mode == "selection":
        return [(mode, selection_row, (case, scores, causal))
                for case in SELECTION_CASES for scores in SELECTION_SCORES for causal in (False, True)]
    if mode == "means":
        return [(mode, means_row, case) for case in MEANS_CASES]
    if mode == "walk":
        return [(mode, walk_row, item) for item in WALK_CASES]
    if mode == "halo":
        return [(mode, halo_row, (case, mean)) for case in HALO_CASES for mean in (False, True)]
    if mode == "skip":
        return ([(mode, skip_row, ("attention", case, options)) for case, options in SKIP_CASES]
                + [(mode, skip_row, ("halo", SKIP_CASES[0][0], {"mean": mean})) for mean in (False, True)])
    dtype = getattr(torch, mode)
    return [(mode, compare_row, (case, options, dtype)) for case in cases_for(dtype) for options in options_for(case, dtype)]


def mode_row(item: tuple) -> dict:
    """One item of :func:`mode_items`: its row, tagged with its mode."""
    mode, row, argument = item
    with walked_rows(fused._WALKED_ROWS if mode == "walk" else INTERPRETED_WALKED_ROWS):
        return dict(row(argument), mode=mode)


if __name__ == "__main__":
    # Every mode asked for in one pool, so that one mode's last rows run beside the next mode's first.
    items = [item for mode in sys.argv[1:] or ["float32"] for item in mode_items(mode)]
    for row in side_by_side(mode_row, items):
        print(json.dumps(row), flush=True)
