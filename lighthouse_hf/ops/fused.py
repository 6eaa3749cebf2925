"""The fused Lighthouse path for CUDA tensors: Triton selection, gather and scatter kernels around
PyTorch's SDPA on the compressed sequence.

Each Triton step is a ``torch.library.custom_op`` (namespace ``lighthouse_hf``) with a fake
implementation and, where it is differentiable, an autograd formula whose backward is again a
custom op; SDPA in between stays an ordinary PyTorch call, so ``torch.compile`` traces the whole
layer with ``fullgraph=True``. Eager calls reach the same kernels through
``torch.autograd.Function`` twins, which cost less host time than custom-op dispatch. Triton is
imported only when a kernel first runs.

Determinism: the Lighthouse kernels are gathers without atomics, bitwise reproducible; the SDPA
follows PyTorch's setting (its default cuDNN backward is not bitwise reproducible; under
``torch.use_deterministic_algorithms(True)`` PyTorch uses a deterministic backward and the whole
path is bitwise reproducible).

Data flow per call (shapes per (batch, query head); ``n`` is the compressed length):
``select`` -> ``entry_local``/``entry_row`` (level-major listing, [n] int32 each) and ``inverse``
([levels, seq_len] int32: the causal row of the entry at each slot that a position inside the
sequence reads, -1 where a slot is not an entry); ``gather_entries`` -> pooled
q/k/v rows in causal order; SDPA; ``scatter_entries`` -> the output over all positions.
"""

import functools
import importlib.util
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .plan import TILE, LighthousePlan, plan_for
from .reference import Selection, position_keys

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of one program's [positions, head dim] block. Chosen on the H100 at D=128 (S=256K, bf16):
# the score pass ran at 2.8 TB/s with 128 positions and 4 warps (64 positions: 2.3 TB/s). The
# scatter on the H200 (D=128, 128K-256K, NOTES-kernels.md "v11 and v12 outcomes"): 32 positions
# (16: up to +0.05 ms a launch; 64: up to +0.13 ms).
_SCORE_BLOCK_ELEMENTS = 16384
_SCATTER_BLOCK_ELEMENTS = 4096
_MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (heads, batch)


def handles(q: torch.Tensor) -> bool:
    """Whether the fused path runs for these inputs (CUDA, a dtype Triton accumulates exactly enough)."""
    return TRITON_AVAILABLE and q.is_cuda and q.dtype in FUSED_DTYPES


def handles_rope(q: torch.Tensor, rope_inv_freq: torch.Tensor) -> bool:
    """Whether the kernels pool at span end for this head size: every dimension rotated (no partial
    rotary) and a power-of-two head size, so each rotate_half half is one block of columns."""
    dim = q.shape[-1]
    return 2 * rope_inv_freq.shape[0] == dim and dim == _next_power_of_2(dim)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _positions_per_program(block_d: int, elements: int) -> int:
    """Sequence positions per program of a kernel that tiles [positions, head dim] in ``elements``."""
    return max(16, min(256, elements // block_d))


@functools.cache
def _kernels():
    """The Triton kernels module, imported on first use (the CPU path never imports Triton)."""
    from . import kernels

    return kernels


def _score_pass_levels(dtype: torch.dtype, dim: int, plan: LighthousePlan) -> int:
    """How many pyramid levels (level 0 included) ``scores_kernel`` computes: those whose spans fit
    one program's block of positions (half precision; 0 for float32, whose norms are ATen's). Wider
    levels are max-pooled by ATen from the last of them (``_finish_score_pyramid``)."""
    if dtype == torch.float32:
        return 0
    block_p = _positions_per_program(_next_power_of_2(dim), _SCORE_BLOCK_ELEMENTS)
    fitting = 1
    while fitting < plan.levels and plan.pooling**fitting <= block_p:
        fitting += 1
    return 0 if fitting == 1 else fitting


def score_pass_positions(dtype: torch.dtype, dim: int, plan: LighthousePlan) -> int:
    """Positions that ``scores_kernel`` covers, in whole blocks (0: ATen scores): the padded pyramid
    where it computes every level, else the sequence (the host pads and max-pools the rest)."""
    pass_levels = _score_pass_levels(dtype, dim, plan)
    if pass_levels == 0:
        return 0
    block_p = _positions_per_program(_next_power_of_2(dim), _SCORE_BLOCK_ELEMENTS)
    # A partial pass covers the sequence only: its padded pyramid can be far longer (at 128K, L5 p8
    # K1536 pads 131,072 positions to 6,291,456).
    return _cdiv(plan.padded_len if pass_levels == plan.levels else plan.seq_len, block_p) * block_p


def score_pass_means_width(
    dtype: torch.dtype, dim: int, plan: LighthousePlan, given_scores: bool = False, span_end_rope: bool = False
) -> int:
    """The width of the means of q and k that the score pass writes (0: none), for this dtype and
    head size: its widest level of at most 16 positions (wider spans made the compiler keep the
    block whole, 168-206 registers per thread at D=128). The gather takes the q and k rows of every
    level at least that wide from them. Not with given scores (the pass reads the scores, not q and
    k). With span-end RoPE only where that level is the coarsest: its means are then the coarsest
    rows, each position turned to its span's end first; a finer width's means would need turning
    again before they are averaged."""
    if given_scores or _score_pass_levels(dtype, dim, plan) == 0:
        return 0
    widths = [plan.pooling**level for level in range(1, plan.levels) if plan.pooling**level <= 16]
    width = max(widths, default=0)
    return 0 if span_end_rope and width != plan.coarse_width else width


def score_means_rows(plan: LighthousePlan, width: int) -> int:
    """Rows of the score pass's means of ``width`` positions per head: those holding a position of
    the sequence inside the padded pyramid (the gather reads zeros past them)."""
    return _cdiv(min(plan.seq_len, plan.padded_len), width)


def _score_means(q: torch.Tensor, rows: int, plan: LighthousePlan, width: int) -> torch.Tensor:
    """The buffer of the score pass's means: ``[rows, score_means_rows, D]``, in q's dtype where the
    gather copies them as rows (``width`` the coarsest), else float32, since it averages them."""
    if width == 0:
        return q.new_empty(0)
    dtype = q.dtype if width == plan.coarse_width else torch.float32
    return q.new_empty(rows, score_means_rows(plan, width), q.shape[-1], dtype=dtype)


def _score_pyramids(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: LighthousePlan,
    q_scores: torch.Tensor | None = None,
    k_scores: torch.Tensor | None = None,
    rotary: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max-pooled float32 L2 norms of levels 1..L-1 of q and of k: ``[B*h, L-1, padded_len // p]``
    each (levels end-padded), and the means of q and k that the gather reads (``_score_means``,
    query heads first, of ``score_pass_means_width`` positions, at span end with ``rotary``, the
    table of ``rotary_table``; else an empty tensor). ``causal``: two
    rows per level instead of one, ``[B*h, 2*(L-1), padded_len // p]`` (see ``scores_kernel``).

    float32 inputs go through ``torch.linalg.vector_norm`` like the reference, so their scores (and
    selections) are identical to it. Half-precision inputs take one Triton pass over q and k that
    also max-pools (the ATen reduction with an upcast ran at a third of the memory bandwidth, and
    the pyramid cost a dozen small launches); its float32 sums may differ from ATen's in the last bit.
    Given level-0 scores (``q_scores``, ``k_scores``) take the same pass beside half-precision q and k
    (the reference's pyramid, maxima of the scores as float32; equal as floats, the sign of tied zeros
    aside), and ATen's beside float32 ones.
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    stride = plan.padded_len // plan.pooling
    pass_levels = _score_pass_levels(q.dtype, dim, plan)
    given = q_scores is not None
    if pass_levels == 0:
        q_source, k_source = (q_scores, k_scores) if given else (q, k)
        pyramids = (_aten_score_pyramid(x, plan, stride, causal) for x in (q_source, k_source))
        return *pyramids, q.new_empty(0)
    block_d = _next_power_of_2(dim)
    block_p = _positions_per_program(block_d, _SCORE_BLOCK_ELEMENTS)
    rows = batch * (heads + kv_heads)
    score_rows = 2 * (plan.levels - 1) if causal else plan.levels - 1
    scores = torch.empty(rows, score_rows, stride, dtype=torch.float32, device=q.device)
    means_width = score_pass_means_width(q.dtype, dim, plan, given_scores=given, span_end_rope=rotary is not None)
    means = _score_means(q, rows, plan, means_width)
    if given and q_scores.dtype != k_scores.dtype:  # one program reads either: one element type
        q_scores, k_scores = q_scores.float(), k_scores.float()
    sources = (q_scores, k_scores) if given else (_last_axis_contiguous(q), _last_axis_contiguous(k))
    blocks = score_pass_positions(q.dtype, dim, plan) // block_p
    _kernels().scores_kernel[(blocks, heads + kv_heads, batch)](
        *sources, scores, means if means_width else q, scores if rotary is None else rotary, heads, kv_heads, dim,
        plan.seq_len, plan.real_len, plan.padded_len, stride, means.shape[1] if means_width else 0,
        *sources[0].stride()[:3], *sources[1].stride()[:3],
        LEVELS=plan.levels, POOL=plan.pooling, MEANS_WIDTH=means_width, CAUSAL=causal, BLOCK_P=block_p, BLOCK_D=block_d,
        PASS_LEVELS=pass_levels, GIVEN=given, ROPE_HALF=0 if rotary is None or not means_width else rotary.shape[-1],
        num_warps=4,
    )
    if pass_levels < plan.levels:
        _finish_score_pyramid(scores, plan, pass_levels, blocks * block_p, causal)
    return scores[: batch * heads], scores[batch * heads :], means


def _finish_score_pyramid(
    scores: torch.Tensor, plan: LighthousePlan, pass_levels: int, covered: int, causal: bool = False
) -> None:
    """Completes ``scores`` ``[rows, L-1 (causal: 2*(L-1)), stride]`` after a pass that wrote levels
    ``1 .. pass_levels-1`` for positions ``< covered``: -1 in their padding slots past that, and each
    wider level max-pooled from the one below over its real slots (-1 in the rest), as the ATen
    pyramid would have it. ``causal``: a block's first token is its first child's, and the maximum
    without it is that of its first child's rest and of its other children whole."""
    coarse = plan.levels - 1
    rows = (0, coarse) if causal else (0,)  # where the rest rows and the first-token rows start
    for level in range(1, pass_levels):
        for start in rows:
            scores[:, start + level - 1, covered // plan.pooling**level : plan.level_len(level)] = -1.0
    for level in range(pass_levels, plan.levels):
        real = plan.real_len // plan.pooling**level
        children = scores[:, level - 2, : real * plan.pooling].unflatten(-1, (real, plan.pooling))
        if causal:
            first = scores[:, coarse + level - 2, : real * plan.pooling].unflatten(-1, (real, plan.pooling))
            whole = torch.maximum(children[..., 1:], first[..., 1:]).amax(-1)
            scores[:, level - 1, :real] = torch.maximum(children[..., 0], whole)
            scores[:, coarse + level - 1, :real] = first[..., 0]
        else:
            scores[:, level - 1, :real] = children.amax(-1)
        for start in rows:
            scores[:, start + level - 1, real : plan.level_len(level)] = -1.0


def _aten_score_pyramid(x: torch.Tensor, plan: LighthousePlan, stride: int, causal: bool = False) -> torch.Tensor:
    """From ``x`` ``[B, h, S, D]`` (scores are its norms) or ``[B, h, S]`` (given level-0 scores);
    ``causal``: the score pass's two rows per level (see ``scores_kernel``)."""
    real = x[:, :, : plan.real_len]
    if x.dim() == 3:
        norms = real.float()
    elif x.dtype == torch.float32:
        norms = torch.linalg.vector_norm(real, dim=-1)
    else:
        norms = torch.linalg.vector_norm(real, dim=-1, dtype=torch.float32)
    norms = F.pad(norms.flatten(0, 1), (0, plan.padded_len - plan.real_len), value=-1.0)
    if causal:
        out = norms.new_empty(norms.shape[0], 2 * (plan.levels - 1), stride)
        for level in range(1, plan.levels):
            spans = norms.unflatten(-1, (-1, plan.pooling**level))
            out[:, level - 1, : spans.shape[1]] = spans[..., 1:].amax(-1)
            out[:, plan.levels - 2 + level, : spans.shape[1]] = spans[..., 0]
        return out
    out = norms.new_empty(norms.shape[0], plan.levels - 1, stride)
    for level in range(1, plan.levels):
        norms = norms.unflatten(-1, (-1, plan.pooling)).amax(-1)  # max of maxima: exact
        out[:, level - 1, : norms.shape[-1]] = norms
    return out


Tensor = torch.Tensor


def _select_impl(
    q: Tensor, k: Tensor, q_scores: Optional[Tensor], k_scores: Optional[Tensor], rotary: Optional[Tensor],
    levels: int, pooling: int, topk: int, causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels()
    plan = plan_for(q.shape[2], levels, pooling, topk)
    batch, heads = q.shape[:2]
    if batch > _MAX_GRID_YZ or heads + k.shape[1] > _MAX_GRID_YZ:
        raise ValueError(
            f"the CUDA kernels take batch <= {_MAX_GRID_YZ} and heads + kv_heads <= {_MAX_GRID_YZ}; got batch={batch}, "
            f"heads={heads}, kv_heads={k.shape[1]} (split the batch)"
        )
    n = plan.compressed_len
    entry_local = torch.empty(batch * heads, n, dtype=torch.int32, device=q.device)
    entry_row = torch.empty_like(entry_local)
    inverse = torch.full((batch * heads, levels, plan.seq_len), -1, dtype=torch.int32, device=q.device)
    coarse_block = _next_power_of_2(plan.tile_len)
    scratch_row = max(coarse_block, TILE * pooling)
    scratch = torch.empty(
        batch * heads * plan.tiles, levels, kernels.SCRATCH_KINDS, scratch_row, dtype=torch.int32, device=q.device
    )
    q_scores, k_scores, means = _score_pyramids(q, k, plan, q_scores, k_scores, rotary, causal)
    kernels.select_kernel[(plan.tiles, heads, batch)](
        q_scores,
        k_scores,
        entry_local,
        entry_row,
        inverse,
        scratch,
        heads,
        heads // k.shape[1],
        plan.seq_len,
        plan.tile_len,
        plan.padded_len // pooling,
        n,
        LEVELS=levels,
        POOL=pooling,
        COARSE_BLOCK=coarse_block,
        SCRATCH_ROW=scratch_row,
        CAUSAL=causal,
        LEVEL_LANES=_next_power_of_2(levels),
        num_warps=4,
    )
    return (
        entry_local.view(batch, heads, n),
        entry_row.view(batch, heads, n),
        inverse.view(batch, heads, levels, plan.seq_len),
        means,
    )


def _listing(plan: LighthousePlan) -> list[tuple[int, int, int]]:
    """(level, start, length) of each level's part of the level-major listing."""
    per_level = plan.pooling * plan.topk
    parts = [(level, level * per_level, per_level) for level in range(plan.levels - 1)]
    return parts + [(plan.levels - 1, (plan.levels - 1) * per_level, plan.n_coarse_padded)]


def _run_entries(sources, destinations, entry_local, entry_row, plan, *, shifted: bool, means=None, means_width=0,
                 rotary=None, counts=None):
    """Fill every compressed row from the spans of its entry (see ``entries_kernel``); ``means``:
    the score pass's means of q and k of ``means_width`` positions, when it wrote them; ``rotary``: span-end RoPE's
    table (:func:`rotary_table`); ``counts``: the scatter's contribution counts (the gradient of
    ``combine="mean"``)."""
    kernels = _kernels()
    src_q = sources[0]
    batch, heads, seq_len, dim = src_q.shape
    with_kv = len(sources) == 3
    group = heads // sources[1].shape[1] if with_kv else 1
    src_k, src_v = (sources[1], sources[2]) if with_kv else (src_q, src_q)
    dst_q, dst_k, dst_v = destinations if with_kv else (destinations[0],) * 3
    block_d = _next_power_of_2(dim)
    blocks = sum(_cdiv(length, kernels.entries_per_program(plan.pooling**level, block_d))
                 for level, _, length in _listing(plan))
    kernels.entries_kernel[(blocks, heads, batch)](
        src_q, src_k, src_v, dst_q, dst_k, dst_v, entry_local, entry_row, dst_q if means is None else means,
        dst_q if rotary is None else rotary, dst_q if counts is None else counts,
        heads, group, seq_len, dim, entry_local.shape[-1], plan.n_coarse_padded, plan.real_len,
        0 if means is None else means.shape[1],
        *src_q.stride()[:3], *src_k.stride()[:3], *src_v.stride()[:3],
        LEVELS=plan.levels,
        POOL=plan.pooling,
        TOPK=plan.topk,
        SHIFTED=shifted,
        WITH_KV=with_kv,
        MEANS_WIDTH=0 if means is None else means_width,
        BLOCK_D=block_d,
        ROPE_HALF=0 if rotary is None else rotary.shape[-1],
        MEAN=counts is not None,
        PADDED=_mostly_padding(plan),
        num_warps=4,
    )


def _mostly_padding(plan: LighthousePlan) -> bool:
    """Whether at least a quarter of the listed entries hold no real position, so that whole
    entries-kernel programs are padding worth skipping (at 128K: L5 p4 K1536 two thirds, L5 p8
    K1536 93%). The check costs the kernel 8 registers per thread (72 -> 80 at L5 p4): not taken
    where padding is rare (L4 p4 K1536 lists 4 padding entries of 20,484) or absent (the default)."""
    return 4 * (plan.compressed_len - sum(plan.real_entries)) >= plan.compressed_len


def _skips_finer_levels(plan: LighthousePlan, block_p: int) -> bool:
    """Whether a ``scatter_kernel`` launch of ``block_p`` positions a program first checks that an
    entry below the coarsest level reaches its block (``SKIP_FINER``). Each tile refines ``TILE`` of
    its ``tile_len`` coarsest entries and a block meets ``m = max(1, block_p // coarse_width)`` of
    them, so without structure in the inputs a share ``(1 - TILE / tile_len)**m`` of the blocks meets
    only coarsest entries. The check adds 40-60 instructions a thread (5-10%) to a block that sums
    every level: on the H200 it lost 7% where no block skips (256K L5 p4 K2048, every coarsest entry
    refined) and 7% in a scatter where a quarter skip (64K L5 p2 K2048), and gained 16-27% where more
    than half skip (NOTES-kernels.md, "C outcome"). So the check is made where at least a third are
    expected to."""
    met = max(1, block_p // plan.coarse_width)
    return plan.levels > 1 and (1 - TILE / plan.tile_len) ** met >= 1 / 3


def _run_scatter(source: Tensor, destination: Tensor, inverse: Tensor, plan: LighthousePlan,
                 counts: Tensor | None = None) -> None:
    """Fill every position from the real compressed rows covering it (see ``scatter_kernel``);
    ``counts``: average instead of sum and write the counts (``combine="mean"``)."""
    batch, heads, seq_len, dim = destination.shape
    block_d = _next_power_of_2(dim)
    block_p = _positions_per_program(block_d, _SCATTER_BLOCK_ELEMENTS)
    # a block starts one position early (see the kernel), so the last one may need one more
    _kernels().scatter_kernel[(_cdiv(seq_len + 1, block_p), heads, batch)](
        source, destination, inverse, inverse if counts is None else counts,
        seq_len, dim, source.shape[2], plan.real_len,
        inverse.shape[-1],  # the selection's sequence: the scatter may write past it (a halo)
        LEVELS=plan.levels,
        POOL=plan.pooling,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        MEAN=counts is not None,
        SKIP_FINER=_skips_finer_levels(plan, block_p),
        num_warps=4,
    )


# Spans a walking program takes side by side (``walk_kernel``): with 4, span-end RoPE's position
# kernels' fwd+bwd read 1% faster at 64K L3 p4 and 3-13% slower elsewhere, GQA included (H200;
# NOTES-kernels.md, "v24 outcome"); the unturned walks (v25) take 8 untimed against other counts.
_WALKED_ROWS = 8


def _walked_span_level(plan: LighthousePlan, group: int) -> int:
    """The level whose spans ``walk_kernel``'s programs walk for output heads of ``group`` query
    heads: the widest whose positions times ``group`` are at most 16, else level 1. The kernel
    unrolls a span (``pooling <= 16``) and a group's members, so its row loads grow with both: GQA
    32/8 at 128K L5 p2 with MHA's 16-position spans took about a minute to compile and ran slower
    than with 4-position spans (NOTES-kernels.md, "v26"). Plans that compress have ``levels >= 2``."""
    return max([1] + [level for level in range(1, plan.levels) if plan.pooling**level * group <= 16])


def walked_halves(dim: int) -> tuple[int, bool]:
    """(``HALF``, ``EVEN``) of a ``walk_kernel`` launch for rows of ``dim`` columns: a row as two
    halves of a power of two (rotate_half's halves where ``EVEN``, i.e. ``dim == 2 * HALF``)."""
    half = max(1, _next_power_of_2(dim) // 2)
    return half, dim == 2 * half


def _run_walk(sources: list[Tensor], destinations: list[Tensor], inverse: Tensor, plan: LighthousePlan,
              rotary: Tensor | None) -> None:
    """The gradient of the pooling (see ``walk_kernel``): every position from the compressed rows
    covering it, of one source (dq) or two (dk and dv) in one launch; with ``rotary`` (span-end RoPE)
    the first source's rows turned back from their spans' ends; over the KV heads, the sum of their
    query heads."""
    batch, heads_out, seq_len, dim = destinations[0].shape
    half, even = walked_halves(dim)
    group = sources[0].shape[1] // heads_out
    span_level = _walked_span_level(plan, group)
    positions = _WALKED_ROWS * plan.pooling**span_level
    _kernels().walk_kernel[(_cdiv(seq_len, positions), heads_out, batch)](
        sources[0], sources[-1], destinations[0], destinations[-1], inverse, inverse if rotary is None else rotary,
        seq_len, dim, sources[0].shape[2], plan.padded_len, inverse.shape[-1],
        GROUP=group,
        LEVELS=plan.levels,
        POOL=plan.pooling,
        SPAN_LEVEL=span_level,
        ROWS=_WALKED_ROWS,
        HALF=half,
        EVEN=even,
        TURN=rotary is not None,
        TWO=len(sources) == 2,
        num_warps=4,
    )


def rotary_table(rope_inv_freq: Tensor | None, plan: LighthousePlan) -> Tensor | None:
    """Span-end RoPE's angles for the kernels: rows ``o = 0..p**(L-1) - 1`` (the coarsest span)
    holding ``cos(o * inv_freq)`` then ``sin(o * inv_freq)``, ``[p**(L-1), 2, R]`` float32; every
    level reads its rows from row 0, since a turn by ``o`` positions is the same at every level.
    Computed as the reference computes its angles, so both rotate by the same float32 numbers."""
    if rope_inv_freq is None:
        return None
    inv_freq = rope_inv_freq.float()
    angles = torch.arange(plan.coarse_width, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _last_axis_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _gather_impl(
    q: Tensor, k: Tensor, v: Tensor, entry_local: Tensor, entry_row: Tensor, inverse: Tensor, means: Tensor,
    rotary: Optional[Tensor], levels: int, pooling: int, topk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    # inverse is not read here: it is an input so that the backward's setup can save it
    plan = plan_for(q.shape[2], levels, pooling, topk)
    batch, heads, _, dim = q.shape
    n = entry_local.shape[-1]
    out = [torch.empty(batch, heads, n, dim, dtype=q.dtype, device=q.device) for _ in range(3)]
    sources = [_last_axis_contiguous(x) for x in (q, k, v)]
    # means are written by the score pass of this plan, dtype and head size (see select_entries)
    means_width = score_pass_means_width(q.dtype, dim, plan, span_end_rope=rotary is not None) if means.numel() else 0
    _run_entries(sources, out, entry_local, entry_row, plan, shifted=False, means=means if means_width else None,
                 means_width=means_width, rotary=rotary)
    return tuple(out)


def _gather_backward_impl(
    dq_sel: Tensor, dk_sel: Tensor, dv_sel: Tensor, inverse: Tensor, rotary: Optional[Tensor], kv_heads: int,
    seq_len: int, levels: int, pooling: int, topk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = plan_for(seq_len, levels, pooling, topk)
    batch, heads, _, dim = dq_sel.shape
    dq = dq_sel.new_empty(batch, heads, seq_len, dim)
    dk = dk_sel.new_empty(batch, kv_heads, seq_len, dim)
    dv = dv_sel.new_empty(batch, kv_heads, seq_len, dim)
    _run_walk([dq_sel.contiguous()], [dq], inverse, plan, rotary)
    if rotary is None:
        _run_walk([dk_sel.contiguous(), dv_sel.contiguous()], [dk, dv], inverse, plan, None)
    else:  # dv beside the turned dk slows that walk more than dv's own launch costs (NOTES-kernels.md, "v25 outcome")
        _run_walk([dk_sel.contiguous()], [dk], inverse, plan, rotary)
        _run_walk([dv_sel.contiguous()], [dv], inverse, plan, None)
    return dq, dk, dv


def _scatter_impl(
    out_sel: Tensor, inverse: Tensor, entry_local: Tensor, entry_row: Tensor, seq_len: int, mean: bool, levels: int,
    pooling: int, topk: int,
) -> tuple[Tensor, Tensor]:
    """The output over positions and, with ``mean``, how many entries reach each position
    (``[B*H, S]`` float32, saved for the backward; else an empty tensor). ``entry_local`` and
    ``entry_row`` are not read here: they are inputs so that the backward's setup can save them."""
    plan = plan_for(seq_len, levels, pooling, topk)
    batch, heads, _, dim = out_sel.shape
    out = out_sel.new_empty(batch, heads, seq_len, dim)
    counts = out_sel.new_empty(batch * heads, seq_len, dtype=torch.float32) if mean else out_sel.new_empty(0, dtype=torch.float32)
    _run_scatter(out_sel.contiguous(), out, inverse, plan, counts=counts if mean else None)
    return out, counts


def _scatter_backward_impl(
    grad_out: Tensor, counts: Tensor, entry_local: Tensor, entry_row: Tensor, levels: int, pooling: int, topk: int
) -> Tensor:
    plan = plan_for(grad_out.shape[2], levels, pooling, topk)
    batch, heads, _, dim = grad_out.shape
    grad_sel = grad_out.new_empty(batch, heads, entry_local.shape[-1], dim)
    _run_entries([_last_axis_contiguous(grad_out)], [grad_sel], entry_local, entry_row, plan, shifted=True,
                 counts=counts if counts.numel() else None)
    return grad_sel


# ---- custom ops: what torch.compile sees ----

_select_op = torch.library.custom_op("lighthouse_hf::select", mutates_args=(), device_types="cuda")(_select_impl)
_gather_op = torch.library.custom_op("lighthouse_hf::gather_entries", mutates_args=(), device_types="cuda")(_gather_impl)
_gather_backward_op = torch.library.custom_op(
    "lighthouse_hf::gather_entries_backward", mutates_args=(), device_types="cuda"
)(_gather_backward_impl)
_scatter_op = torch.library.custom_op("lighthouse_hf::scatter_entries", mutates_args=(), device_types="cuda")(_scatter_impl)
_scatter_backward_op = torch.library.custom_op(
    "lighthouse_hf::scatter_entries_backward", mutates_args=(), device_types="cuda"
)(_scatter_backward_impl)


@_select_op.register_fake
def _(q, k, q_scores, k_scores, rotary, levels, pooling, topk, causal=False):
    plan = plan_for(q.shape[2], levels, pooling, topk)
    batch, heads = q.shape[:2]
    listing = q.new_empty(batch, heads, plan.compressed_len, dtype=torch.int32)
    inverse = q.new_empty(batch, heads, levels, plan.seq_len, dtype=torch.int32)
    rows = batch * (heads + k.shape[1])
    means = _score_means(
        q, rows, plan, score_pass_means_width(q.dtype, q.shape[-1], plan, q_scores is not None, rotary is not None)
    )
    return listing, torch.empty_like(listing), inverse, means


@_gather_op.register_fake
def _(q, k, v, entry_local, entry_row, inverse, means, rotary, levels, pooling, topk):
    shape = (*q.shape[:2], entry_local.shape[-1], q.shape[-1])
    return tuple(q.new_empty(shape) for _ in range(3))


@_gather_backward_op.register_fake
def _(dq_sel, dk_sel, dv_sel, inverse, rotary, kv_heads, seq_len, levels, pooling, topk):
    batch, heads, _, dim = dq_sel.shape
    return (
        dq_sel.new_empty(batch, heads, seq_len, dim),
        dk_sel.new_empty(batch, kv_heads, seq_len, dim),
        dv_sel.new_empty(batch, kv_heads, seq_len, dim),
    )


@_scatter_op.register_fake
def _(out_sel, inverse, entry_local, entry_row, seq_len, mean, levels, pooling, topk):
    batch, heads = out_sel.shape[:2]
    counts_shape = (batch * heads, seq_len) if mean else (0,)
    return out_sel.new_empty(batch, heads, seq_len, out_sel.shape[-1]), out_sel.new_empty(counts_shape, dtype=torch.float32)


@_scatter_backward_op.register_fake
def _(grad_out, counts, entry_local, entry_row, levels, pooling, topk):
    return grad_out.new_empty(*grad_out.shape[:2], entry_local.shape[-1], grad_out.shape[-1])


def _gather_backward_settings(q: Tensor, k: Tensor, levels: int, pooling: int, topk: int) -> tuple:
    """``_gather_backward_impl``'s arguments after the tensors (one place for the op and its eager twin)."""
    return k.shape[1], q.shape[2], levels, pooling, topk


def _gather_setup(ctx, inputs, output):
    q, k, _, _, _, inverse, _, rotary, levels, pooling, topk = inputs
    ctx.save_for_backward(inverse, rotary)
    ctx.settings = _gather_backward_settings(q, k, levels, pooling, topk)


def _gather_backward(ctx, dq_sel, dk_sel, dv_sel):
    inverse, rotary = ctx.saved_tensors
    dq, dk, dv = _gather_backward_op(dq_sel, dk_sel, dv_sel, inverse, rotary, *ctx.settings)
    return dq, dk, dv, *(None,) * 8


def _scatter_setup(ctx, inputs, output):
    _, _, entry_local, entry_row, _, _, levels, pooling, topk = inputs
    ctx.save_for_backward(output[1], entry_local, entry_row)
    ctx.settings = (levels, pooling, topk)


def _scatter_backward(ctx, grad_out, _grad_counts):
    counts, entry_local, entry_row = ctx.saved_tensors
    return _scatter_backward_op(grad_out, counts, entry_local, entry_row, *ctx.settings), *(None,) * 8


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


class _GatherEntries(torch.autograd.Function):
    """Eager twin of ``gather_entries`` (autograd.Function calls cost less host time than custom ops)."""

    @staticmethod
    def forward(ctx, q, k, v, entry_local, entry_row, inverse, means, rotary, levels, pooling, topk):
        ctx.save_for_backward(inverse, rotary)
        ctx.settings = _gather_backward_settings(q, k, levels, pooling, topk)
        return _gather_impl(q, k, v, entry_local, entry_row, inverse, means, rotary, levels, pooling, topk)

    @staticmethod
    def backward(ctx, dq_sel, dk_sel, dv_sel):
        inverse, rotary = ctx.saved_tensors
        return (*_gather_backward_impl(dq_sel, dk_sel, dv_sel, inverse, rotary, *ctx.settings), *(None,) * 8)


class _ScatterEntries(torch.autograd.Function):
    """Eager twin of ``scatter_entries``."""

    @staticmethod
    def forward(ctx, out_sel, inverse, entry_local, entry_row, seq_len, mean, levels, pooling, topk):
        out, counts = _scatter_impl(out_sel, inverse, entry_local, entry_row, seq_len, mean, levels, pooling, topk)
        ctx.save_for_backward(counts, entry_local, entry_row)
        ctx.settings = (levels, pooling, topk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        counts, entry_local, entry_row = ctx.saved_tensors
        return _scatter_backward_impl(grad_out, counts, entry_local, entry_row, *ctx.settings), *(None,) * 8


class Listing(NamedTuple):
    """What ``select_entries`` hands to the gather and the scatter (layout in the module docstring)."""

    entry_local: Tensor
    entry_row: Tensor
    inverse: Tensor
    means: Tensor
    """The score pass's means of q and k (``score_pass_means_width``), or an empty tensor where it
    did not write them."""
    rotary: Tensor | None
    """Span-end RoPE's table (``rotary_table``), built once for the score pass, the gather and its
    backward; ``None`` for pooled RoPE."""


def _settings(plan: LighthousePlan) -> tuple[int, int, int]:
    return plan.levels, plan.pooling, plan.topk


def select_entries(
    q: Tensor, k: Tensor, plan: LighthousePlan, q_scores: Tensor | None = None, k_scores: Tensor | None = None,
    rope_inv_freq: Tensor | None = None, causal: bool = False,
) -> Listing:
    """Steps 2-4 (gradient-free): the kernels' listing of the compressed sequence; ``q_scores`` and
    ``k_scores``: level-0 scores instead of the norms; ``rope_inv_freq``: span-end RoPE follows (the
    score pass's means, where it writes them, are at span end); ``causal``: the causal selection
    rule (``ops/causal.py``)."""
    select = _select_op if torch.compiler.is_compiling() else _select_impl
    rotary = rotary_table(rope_inv_freq, plan)
    return Listing(*select(q.detach(), k.detach(), q_scores, k_scores, rotary, *_settings(plan), causal), rotary)


def gather_entries(listing: Listing, q: Tensor, k: Tensor, v: Tensor, plan: LighthousePlan) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1 and 5's inputs: the pooled q, k and v rows of every entry in causal order (q and k at
    span end where the listing holds a rotary table); differentiable.

    Compiled code sees the custom op; eager calls take its ``autograd.Function`` twin, which runs
    the same kernels with less host time on the critical path."""
    gather = _gather_op if torch.compiler.is_compiling() else _GatherEntries.apply
    return gather(q, k, v, *listing, *_settings(plan))


def scatter_entries(listing: Listing, out_sel: Tensor, length: int, plan: LighthousePlan, mean: bool = False) -> Tensor:
    """Step 6: the compressed outputs summed (``mean``: averaged) back onto positions ``0..length-1``;
    differentiable."""
    if torch.compiler.is_compiling():
        return _scatter_op(out_sel, listing.inverse, listing.entry_local, listing.entry_row, length, mean, *_settings(plan))[0]
    return _ScatterEntries.apply(out_sel, listing.inverse, listing.entry_local, listing.entry_row, length, mean, *_settings(plan))


def selection_from_listing(entry_local: Tensor, entry_row: Tensor, plan: LighthousePlan) -> Selection:
    """The reference's :class:`Selection` (causal order, int64) from the kernels' listing."""
    batch, heads, n = entry_local.shape
    device = entry_local.device
    rows = entry_row.long()
    listed_level = torch.cat(
        [torch.full((length,), level, device=device) for level, _, length in _listing(plan)]
    ).expand(batch, heads, n)
    level = torch.empty(batch, heads, n, dtype=torch.long, device=device).scatter_(-1, rows, listed_level)
    local = torch.empty_like(level).scatter_(-1, rows, entry_local.long())
    # An entry at level >= 1 is refined exactly when its first child is an entry one level down
    # (looked up among the listed entries: ``inverse`` keeps no slots past the sequence).
    listed = torch.sort(level * plan.padded_len + local, dim=-1).values
    first_child = (level - 1) * plan.padded_len + local * plan.pooling
    found = torch.searchsorted(listed, first_child).clamp(max=n - 1)
    refined = (level > 0) & (listed.gather(-1, found) == first_child)
    key = position_keys(level, local, refined, plan)
    offsets = torch.tensor([plan.level_offset(m) for m in range(plan.levels)], device=device)
    return Selection(plan, level, local, offsets[level] + local, key, refined)


@torch.no_grad()
def select(
    q: Tensor, k: Tensor, plan: LighthousePlan, *, q_scores: Tensor | None = None, k_scores: Tensor | None = None,
    causal: bool = False,
) -> Selection:
    """Steps 2-4 with the selection kernel as the reference's :class:`Selection` (for comparing the
    two); equals ``reference.select`` with the same arguments on float32 inputs and given scores."""
    listing = select_entries(q, k, plan, q_scores, k_scores, causal=causal)
    return selection_from_listing(listing.entry_local, listing.entry_row, plan)
