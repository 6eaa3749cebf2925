"""The fused Triton kernels against the reference on a CPU, under Triton's interpreter: every
method option, forward and backward (skipped where Triton is not installed, as on CI's CPU wheel)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from lighthouse_hf.ops import LighthousePlan, fused  # noqa: E402

SCRIPT = pathlib.Path(__file__).with_name("interpreted_kernels.py")


# In the order run: float32's heaviest rows come last and the other modes' run beside them.
MODES = ("float32", "bfloat16", "selection", "means", "halo", "skip", "walk")
# interpreted_kernels.SPARSE_CASE (not imported: importing it turns the interpreter on in this process)
SPARSE_CASE = (1, 2, 1, 8192, 16, 3, 4, 128)


@pytest.fixture(scope="module")
def interpreted_rows() -> dict[str, list[dict]]:
    """The JSON rows that ``interpreted_kernels.py`` prints, by mode: every mode in one process of
    its own (the interpreter must be on before the kernels are compiled), one start and one pool
    that keeps every core busy to the last row. One mode by hand: ``interpreted_kernels.py MODE``."""
    run = subprocess.run([sys.executable, str(SCRIPT), *MODES], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = {mode: [] for mode in MODES}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row.pop("mode")].append(row)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 3e-2)])
def test_fused_kernels_equal_the_reference_under_the_interpreter(dtype, tolerance, interpreted_rows):
    rows = interpreted_rows[dtype]
    # float32: 3 single-option cases x 6 option sets + 4 cases x 2; bfloat16: 3 cases x 2
    # (interpreted_kernels.cases_for and options_for)
    assert len(rows) == {"float32": 26, "bfloat16": 6}[dtype]
    assert {tuple(sorted(row["options"])) for row in rows} >= {(), ("combine", "rope", "scores", "selection")}
    for row in rows:
        assert row["out"] < tolerance and max(row["grads"]) < tolerance, row
        assert row["same_selection"] is (True if dtype == "float32" else None), row
        # walk_kernel at more spans a program than the GPU's (interpreted_kernels.INTERPRETED_WALKED_ROWS)
        assert row["walked_rows"] > fused._WALKED_ROWS, row
    # The wide spans with the scatter kernel's programs as wide (in positions) as at D=128 on the GPU:
    # blocks inside one entry's span, and blocks starting mid-span.
    def width(dim):
        return fused._positions_per_program(dim, fused._SCATTER_BLOCK_ELEMENTS)

    wide = [row["case"][6] ** (row["case"][5] - 1) >= 256 for row in rows]  # the coarsest span
    assert sum(wide) == {"float32": 4, "bfloat16": 0}[dtype]
    # The sparse case (interpreted_kernels.SPARSE_CASE), at the GPU's blocks: blocks that meet an entry
    # below the coarsest level sum every level, the others only the coarsest; both kinds, else one way
    # to sum goes untested.
    sparse = [tuple(row["case"]) == SPARSE_CASE for row in rows]
    assert sum(sparse) == {"float32": 2, "bfloat16": 0}[dtype]
    assert all(0.0 < row["finer_blocks"] < 1.0 for row, is_sparse in zip(rows, sparse) if is_sparse)
    sparse_plan = LighthousePlan(SPARSE_CASE[3], *SPARSE_CASE[5:])
    assert fused._skips_finer_levels(sparse_plan, width(128))
    for row, gpu_blocks in zip(rows, map(max, wide, sparse)):
        assert row["positions_per_program"] == width(128 if gpu_blocks else row["case"][4]), row
        assert gpu_blocks or row["positions_per_program"] != width(128), row  # else the override tests nothing


@pytest.mark.slow
def test_selection_kernel_equals_the_reference_with_ties_under_the_interpreter(interpreted_rows):
    # Both rules (the causal one above all), on scores with ties, signed zeros, padded plans, and
    # tiles whose causal thresholds come from a run of earlier tiles that does not start at tile 0.
    rows = interpreted_rows["selection"]
    assert len(rows) == 70
    for row in rows:
        assert all(row["equal"].values()), row
        assert (row["score_pass_levels"] > 0) == (row["scores"] != "norms"), row  # the Triton pass ran where meant to
    # and for part of a pyramid only (the host max-pooled the rest), under both rules
    assert {row["causal"] for row in rows if 0 < row["score_pass_levels"] < row["case"][5]} == {False, True}


@pytest.mark.slow
def test_score_pass_means_and_the_span_end_selection_under_the_interpreter(interpreted_rows):
    # The gather takes q and k rows of every level at least as wide as these means from them (a copy
    # of the coarsest level's in q's dtype, else the mean of float32 means), for every batch row
    # (bfloat16's fused comparison has no B = 2 case). rope="span_end" selects as the pooled one
    # (its scores are the same norms, bit for bit, under both rules); its score pass writes the
    # coarsest level's means at span end where the pooled means are the coarsest level's, and none
    # elsewhere (the gather pools those rows rotated itself). The gather's gradient of q and k turns
    # back in walk_kernel, span by span.
    rows = interpreted_rows["means"]
    assert len(rows) == 8
    # finer than the coarsest level, and from a pass that covers the sequence only
    assert any(row["means_width"] < row["coarse_width"] for row in rows)
    assert any(row["coarse_width"] > 256 for row in rows)
    for row in rows:
        coarsest = row["means_width"] == row["coarse_width"]
        assert row["means_width"] > 1 and row["same_listing"] and row["same_scores"], row
        assert row["means_dtype"] == ("torch.bfloat16" if coarsest else "torch.float32")
        assert row["max_error"] < (0.05 if coarsest else 1e-5), row
        assert row["gather_error"] < 0.02, row  # bf16 rounding: up to 2**-7 of an element; a wrong mean: O(1)
        assert (row["span_end_means"] > 0) == coarsest, row
        # bf16 rounding: up to 2**-7; rows turned by the angles of other columns: 0.069-0.17
        assert row["span_end_grad_error"] < 0.02, row
        if coarsest:
            assert row["span_end_error"] < 0.05 and row["span_end_gather_error"] < 0.02, row
            assert row["span_end_copies_means"], row


@pytest.mark.slow
def test_scatter_past_the_sequence_under_the_interpreter(interpreted_rows):
    # The context-parallel halo: the scatter writes S + c - 1 positions, while `inverse` holds the
    # plan's S slots per level (once it held the padded pyramid's: its rows must keep that stride).
    rows = interpreted_rows["halo"]
    assert len(rows) == 4
    for row in rows:
        assert row["error"] < 1e-6, row


@pytest.mark.slow
def test_the_scatter_kernels_two_ways_to_sum_give_the_same_bits_under_the_interpreter(interpreted_rows):
    # A block that no entry below the coarsest level reaches sums the coarsest alone; with the check
    # forced on and off, the output and gradients (every option) and the halo's scatter must be bit
    # for bit the same, else a causal comparison could see a block change its way to sum.
    rows = interpreted_rows["skip"]
    assert len(rows) == 3 and {row["kind"] for row in rows} == {"attention", "halo"}
    for row in rows:
        assert row["same_bits"], row


@pytest.mark.slow
def test_the_gathers_gradient_walks_spans_under_the_interpreter(interpreted_rows):
    # pooling 32: walk_kernel walks level 1's 32 positions in a loop (16 or fewer: unrolled), turned
    # back (span-end RoPE) or not; under GQA dk and dv walk narrower spans than dq (positions times
    # group at most 16). A turn of the wrong angle, a span entered at the wrong end or a level's row
    # given to the wrong span is an O(1) error, a float32 rounding 1e-7.
    rows = interpreted_rows["walk"]
    assert sorted((row["case"][6], row["span_end"]) for row in rows) == [
        (2, False), (4, True), (32, False), (32, True), (32, True)]
    for row in rows:
        pooling, group = row["case"][6], row["case"][1] // row["case"][2]
        dq_level = {32: 1, 4: 2, 2: 3}[pooling]  # L4 p4: level 3 enters at the span's end
        dkv_level = {(32, 1): 1, (32, 2): 1, (4, 2): 1, (2, 2): 3}[pooling, group]  # L4 p4 GQA: level 1
        assert row["span_levels"] == [dq_level, dkv_level], row
        assert row["rows"] == fused._WALKED_ROWS, row  # the GPU's spans a program, not the other modes' 256
        assert row["grad_error"] < 1e-6, row
