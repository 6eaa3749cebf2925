"""The entries kernel as compiled for sm_90 on a CPU (no GPU; tests/kernel_registers.py): what its
span-end gather must not do, whatever the timing says."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from kernel_registers import cross_thread_traffic, entries_ptx, ptxas_usage  # noqa: E402

from lighthouse_hf.ops.plan import LighthousePlan  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("levels, pooling, topk", [(3, 4, 2048), (5, 4, 1536)])
def test_span_end_gather_reduces_nothing_across_warps(dim, levels, pooling, topk):
    # Summed as [entries, 16 positions, D/2] tiles the positions lay across the warps: 24 barriers and
    # 80 shared-memory stores per program at L3 p4 (D=128), and the gather ran at ~1 TB/s on the H200.
    ptx = entries_ptx(LighthousePlan(128 * 1024, levels, pooling, topk), 8, dim, rope=True, shifted=False,
                      coarse_means=False)
    assert cross_thread_traffic(ptx) == {"bar.sync": 0, "st.shared": 0}
    assert ptxas_usage(ptx)[1] == 0  # no spills
