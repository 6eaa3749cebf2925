"""The kernels as compiled for sm_90 on a CPU (no GPU; tests/kernel_registers.py): what the entries
kernel's span-end gather must not do, whatever the timing says, what the score pass over given
scores costs, where the scatter kernel's broadcasts may come and that it skips the finer levels
where only the coarsest reaches, and that the gather's backward walk unrolls a GQA group and adds
(and turns) each position once."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")


def _ptxas() -> str | None:
    try:
        return triton.knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError, FileNotFoundError):  # a Triton without its NVIDIA backend
        return None


pytestmark = pytest.mark.skipif(not _ptxas(), reason="needs Triton's bundled ptxas (the NVIDIA backend)")

from kernel_registers import (  # noqa: E402
    cross_thread_traffic, entries_ptx, ptxas_usage, scatter_ptx, scores_ptx, walk_ptx,
)
from lighthouse_hf.ops import fused  # noqa: E402
from lighthouse_hf.ops.plan import LighthousePlan  # noqa: E402

SEQ = 128 * 1024


def _span_end_gather(dim: int, levels: int, pooling: int, topk: int) -> str:
    plan = LighthousePlan(SEQ, levels, pooling, topk)
    means_width = fused.score_pass_means_width(torch.bfloat16, dim, plan, span_end_rope=True)  # as launched
    return entries_ptx(plan, 8, dim, rope=True, shifted=False, means_width=means_width)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [64, 128])
def test_span_end_gather_at_the_default_reduces_nothing_across_warps(dim):
    # Summed as [entries, 16 positions, D/2] tiles, the positions lay across the warps: 24 barriers and
    # 86 shared-memory stores per program at L3 p4, and the gather ran at ~1 TB/s on the H200.
    ptx = _span_end_gather(dim, 3, 4, 2048)
    assert cross_thread_traffic(ptx) == {"bar.sync": 0, "st.shared": 0}
    assert ptxas_usage(ptx)[1] == 0  # no spills


@pytest.mark.slow
@pytest.mark.parametrize("levels, pooling, topk", [(4, 4, 2048), (5, 4, 1536)])
def test_span_end_gather_with_wide_spans_keeps_registers_low(levels, pooling, topk):
    # Every level of the launch pays its heaviest level's registers: the rotated [4, 16, D/2] tiles
    # took 168 per thread (3 programs of 4 warps per SM) wherever a span was wider than 16. D=128,
    # the H200 rows' head size; L5 p8 (spans of 64, 512 and 4096, the same wide-span code as L5
    # p4's 64 and 256) and D=64 took another 93 s of CI's 15 minutes and are checked by hand:
    # `python tests/kernel_registers.py --levels 5 --pooling 8`.
    registers, spills = ptxas_usage(_span_end_gather(128, levels, pooling, topk))
    assert registers <= 96 and spills == 0


@pytest.mark.parametrize("causal", [False, True])
def test_the_score_pass_over_given_scores_loads_only_them(causal):
    # One float32 load per position instead of a row of q or k: no D axis, half the registers of the
    # norms' pass (48-68 at D=128), and nothing kept across warps.
    plan = LighthousePlan(SEQ, 5, 4, 1536)  # a partial pass: the host max-pools the coarsest level
    ptx = scores_ptx(plan, 8, 128, given=True, causal=causal)
    registers, spills = ptxas_usage(ptx)
    assert ptx.count("ld.global") == 1 and registers <= 40 and spills == 0


@pytest.mark.parametrize("levels, pooling, topk", [(3, 4, 2048), (4, 2, 1536), (5, 2, 2048)])
def test_the_score_pass_turns_its_span_end_means_inside_each_thread(levels, pooling, topk):
    # Span-end means from the block's [entries, 16 positions, D] tile and a table at that shape took
    # 179-255 registers per thread and 16-20 more barriers. One position of 8 entries at a time, by
    # Horner's rule in the turn by one position, adds no barrier to the pooled pass, 86-90 registers
    # against its 60-70, and two float32 multiplies or multiply-adds per element of the block
    # (16384 elements over 128 threads); angles turned at each step took 5.6 (v23, NOTES-kernels.md).
    plan = LighthousePlan(SEQ, levels, pooling, topk)
    pooled, span_end = (scores_ptx(plan, 8, 128, given=False, causal=False, rope=rope) for rope in (False, True))
    assert span_end.count("ld.global") > pooled.count("ld.global")  # it reads the block again
    assert cross_thread_traffic(span_end) == cross_thread_traffic(pooled)
    registers, spills = ptxas_usage(span_end)
    assert registers <= 96 and spills == 0
    assert _float32_products(span_end) - _float32_products(pooled) <= 2 * 16384 // 128


def _basic_blocks(ptx: str) -> list[str]:
    """``ptx``'s code split at its labels: straight-line runs, each entered at its top."""
    return re.split(r"^\$L__BB\d+_\d+:", ptx, flags=re.MULTILINE)


@pytest.mark.parametrize("levels, pooling", [(3, 4), (5, 2)])
def test_the_scatter_kernel_loads_every_level_before_it_broadcasts_one(levels, pooling):
    # A level's broadcast over its positions passes through shared memory behind barriers, and no load
    # is issued across one: loaded level by level, a program waited for a round of loads per level
    # (256K L5 p4 K2048: the scatter 0.262 -> 0.192 ms once it did not; NOTES-kernels.md, "v18").
    # Two ways to sum (every level, or the coarsest alone), each a block of its own.
    ptx = scatter_ptx(LighthousePlan(SEQ, levels, pooling, 2048), 128)
    sums = [block for block in _basic_blocks(ptx) if "bar.sync" in block]
    assert len(sums) == 2 and all(block.rindex("ld.global") < block.index("bar.sync") for block in sums)


def test_the_scatter_kernel_sums_only_the_coarsest_level_where_no_finer_entry_reaches():
    # Most blocks meet only coarsest entries, and their finer levels' loads, unpacks and adds of zeros
    # were most of the instructions that bound the L5 p2 launches (NOTES-kernels.md, "candidate C").
    # So the kernel has two ways to sum (a branch, then a jump over the other way): every level, whose
    # loads grow with the levels, and the coarsest alone, whose loads do not.
    loads = {}
    for levels, pooling in ((3, 4), (5, 2)):
        ptx = scatter_ptx(LighthousePlan(SEQ, levels, pooling, 2048), 128)
        assert len(re.findall(r"\bbra(?:\.uni)?\s", ptx)) == 2
        every_level, coarsest = (block.count("ld.global") for block in _basic_blocks(ptx)[:2])
        loads[levels] = every_level, coarsest
    assert loads[5][0] > loads[3][0] > loads[3][1] == loads[5][1]


def test_the_scatter_kernel_does_not_check_where_every_block_meets_a_finer_level():
    # L5 p4 K2048 at 128K refines every coarsest entry (4 tiles of 128): the check would only cost
    # (256K L5 p4 K2048 on the H200: the position kernels fwd+bwd +7% with it).
    ptx = scatter_ptx(LighthousePlan(SEQ, 5, 4, 2048), 128)
    assert not re.search(r"\bbra(?:\.uni)?\s", ptx)


def _float32_products(ptx: str) -> int:
    """Float32 multiplies and multiply-adds in ``ptx`` (each instruction counted once, as written)."""
    return len(re.findall(r"\b(?:fma\.rn|mul(?:\.rn)?)\.f32", ptx))


def _loops(ptx: str) -> int:
    """Backward branches in ``ptx``: a branch to a label defined before it is a loop."""
    defined, loops = set(), 0
    for line in ptx.splitlines():
        label = re.match(r"\s*(\$L__BB\d+_\d+):", line)
        if label:
            defined.add(label.group(1))
        target = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        loops += bool(target and target.group(1) in defined)
    return loops


@pytest.mark.parametrize("turn, two", [(False, True), (True, False)], ids=["dk+dv", "span_end dk"])
@pytest.mark.parametrize("levels, pooling", [(3, 4), (4, 2)])
def test_the_gathers_backward_unrolls_a_gqa_group(levels, pooling, turn, two):
    # GQA's dk and dv sum the group's query heads; in a loop over a runtime count, each member's loads
    # waited for the previous member's (GQA 32/8 at 64K L3 p4 K2048: the by-position launch fwd+bwd
    # 0.806 -> 0.723 ms unrolled; NOTES-kernels.md, "R and R2 outcomes").
    ptx = walk_ptx(LighthousePlan(SEQ, levels, pooling, 2048), 128, turn=turn, two=two, group=4)
    assert _loops(ptx) == 0 and ptxas_usage(ptx)[1] == 0


WALKED_SETTINGS = [(3, 4), (5, 2), (4, 8), (5, 4)]


def _elements_per_thread(plan: LighthousePlan, group: int) -> int:
    """Element-positions a thread of a ``walk_kernel`` program stores per source (4 warps, D = 128)."""
    return plan.pooling ** fused._walked_span_level(plan, group) * fused._WALKED_ROWS * 128 // (4 * 32)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("levels, pooling", WALKED_SETTINGS)
def test_the_span_end_walk_turns_each_position_once(levels, pooling, group):
    # v24 (NOTES-kernels.md): span-end RoPE's dq and dk walk each span from its end, the sum of the
    # levels turned once per position by the table's row for one position (the by-position launch
    # before v24 turned every level's row by angles loaded per position: 9 float32 products per
    # element at L3 p4, 15 at L5 p2, as counted here; 0.411 -> 0.358 ms fwd+bwd at 128K L3 p4 on the
    # H200). At most 3 products per element and position (a turn is 2, the levels' weights and wider
    # levels' turns the rest), no shared memory, no spills, and the walk unrolled so that its loads
    # are issued together. Where GQA's spans are narrower than MHA's (v26), each level wider than
    # the span enters once a span with a turn and a weight: 3 more products per element and span.
    plan = LighthousePlan(SEQ, levels, pooling, 1536)
    ptx = walk_ptx(plan, 128, turn=True, two=False, group=group)
    products, elements = _float32_products(ptx), _elements_per_thread(plan, group)
    span_level = fused._walked_span_level(plan, group)
    per_position = 3
    if span_level < fused._walked_span_level(plan, 1):
        per_position += 3 * (levels - 1 - span_level) / pooling**span_level
    assert products <= per_position * elements, (products, elements, per_position)
    assert cross_thread_traffic(ptx) == {"bar.sync": 0, "st.shared": 0} and ptxas_usage(ptx)[1] == 0
    assert _loops(ptx) == 0


@pytest.mark.parametrize("levels, pooling", [(3, 4), (5, 2)])
def test_a_gqa_walk_unrolls_about_as_many_loads_as_an_mha_walk(levels, pooling):
    # v26 (NOTES-kernels.md): a walk unrolls its span's positions and the group's members, so GQA's
    # dk and dv walk spans narrower by the group (positions times group at most 16). With MHA's
    # 16-position spans, GQA 32/8 at 128K L5 p2 unrolled 4x the loads, took about a minute to compile
    # on the GPU's host and ran 1.445 ms fwd+bwd against 1.340 with 4-position spans.
    plan = LighthousePlan(SEQ, levels, pooling, 2048)
    mha, gqa = (len(re.findall(r"\bld\.global", walk_ptx(plan, 128, turn=False, two=True, group=group)))
                for group in (1, 4))
    assert gqa <= 1.25 * mha, (gqa, mha)


@pytest.mark.parametrize("levels, pooling", WALKED_SETTINGS)
def test_the_unturned_walk_adds_each_position_once(levels, pooling):
    # v25 (NOTES-kernels.md): published's dk and dv walk their spans together, the levels' sums
    # passed from one child span to the next, so a position costs one float32 add per source (the
    # by-position launch it replaced: one per level; 128K L5 p2 0.462 -> 0.412 ms fwd+bwd with dq's),
    # and a level's weight one product (a multiply-add) per span of that level: 1/p + 1/p**2 + ... per
    # position for the levels inside a program's span, 1/W for each level wider than it (entered
    # once at the span's end). No shared memory, spills or loops.
    plan = LighthousePlan(SEQ, levels, pooling, 1536)
    ptx = walk_ptx(plan, 128, turn=False, two=True, group=1)
    elements = 2 * _elements_per_thread(plan, 1)
    span_level = fused._walked_span_level(plan, 1)
    weights = sum(pooling**-level for level in range(1, span_level + 1))
    weights += (levels - 1 - span_level) / pooling**span_level
    adds = len(re.findall(r"\badd(?:\.rn)?\.f32", ptx))
    assert adds <= elements and _float32_products(ptx) <= weights * elements, (adds, _float32_products(ptx), elements)
    assert cross_thread_traffic(ptx) == {"bar.sync": 0, "st.shared": 0} and ptxas_usage(ptx)[1] == 0
    assert _loops(ptx) == 0
