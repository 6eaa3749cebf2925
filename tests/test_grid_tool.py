"""benchmarks/grid.py: the README's grid table and counts from a grid JSON, and a run that keeps what it
measured when an (S, L) fails (the bench itself is replaced by a script that prints a report)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("grid", ROOT / "benchmarks" / "grid.py")
grid = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(grid)


def row(seq, levels, pooling, topk, mode, ratio, floor):
    return dict(seq=seq, levels=levels, pooling=pooling, topk=topk, mode=mode, ratio_to_sdpa_sel_cudnn=ratio,
                floor_ratio=floor, kernel_gb=1.0, lighthouse_ms=1.0, lighthouse_peak_gb=1.0)


def cells_of(table: str, settings: str) -> list[str]:
    """The cells of the table's row for ``settings`` ("L, p, K"), without the settings cell."""
    row_text = next(text for text in table.splitlines() if text.startswith(f"| {settings} |"))
    return [cell.strip() for cell in row_text.strip("|").split("|")][1:]


def test_cells_judge_the_targets_on_the_printed_values():
    rows = [
        row(65536, 3, 4, 2048, "fwd+bwd", 1.1049, 1.09),  # prints 1.10: within
        row(131072, 3, 4, 2048, "fwd+bwd", 1.1051, 1.09),  # prints 1.11, floor within: the kernels' miss
        row(262144, 3, 4, 2048, "fwd+bwd", 1.20, 1.16),  # floor over the target: the bytes' miss
        row(65536, 3, 4, 2048, "fwd", 1.16, 1.15),
    ]
    cells = cells_of(grid.table(rows, filled=set()), "3, 4, 2048")
    assert cells[:4] == ["1.10 (1.09)", "**1.11 (1.09)**", "1.20 (1.16)", "**1.16 (1.15)**"]
    # 128K and 256K forward were not measured although the setting compresses there
    assert cells[4:] == ["n/a", "n/a"]
    counts = grid.counts(rows)
    assert "fwd+bwd: 3 rows, 1 within 1.10x; of the 2 others 1 have a floor above it, 1 do not" in counts
    assert "fwd: 1 rows, 0 within 1.15x; of the 1 others 0 have a floor above it, 1 do not" in counts


def test_settings_that_do_not_compress_read_dense_and_filled_runs_carry_a_dagger():
    # L3 p8 K6144 at 64K lists 104448 entries for 65536 positions: the op runs dense SDPA there.
    text = grid.table([row(131072, 3, 8, 6144, "fwd", 0.86, 1.02)], filled={(131072, 3, 8)})
    assert cells_of(text, "3, 8, 6144")[3:5] == ["dense", "0.86 (1.02)&dagger;"]


def test_fill_takes_only_the_settings_a_grid_lacks_from_the_older_one_and_marks_them():
    newer = [row(65536, 3, 4, 2048, "fwd+bwd", 1.05, 1.08)]
    older = [row(65536, 3, 4, 2048, "fwd+bwd", 1.30, 1.08), row(131072, 3, 4, 2048, "fwd+bwd", 1.07, 1.09),
             row(65536, 3, 8, 2048, "fwd+bwd", 0.95, 1.03)]
    text = grid.filled_table(newer, older)
    assert cells_of(text, "3, 4, 2048")[:2] == ["1.05 (1.08)", "1.07 (1.09)&dagger;"]  # the newer row kept
    assert cells_of(text, "3, 8, 2048")[0] == "0.95 (1.03)&dagger;"


def test_the_recorded_first_grid_gives_the_counts_its_notes_state():
    rows = json.loads((ROOT / "benchmarks" / "h200-grid-2026-12-01.json").read_text())["rows"]
    counts = grid.counts(rows)
    assert "fwd+bwd: 120 rows, 95 within 1.10x; of the 25 others 15 have a floor above it, 10 do not" in counts
    assert "fwd: 120 rows, 77 within 1.15x; of the 43 others 32 have a floor above it, 11 do not" in counts


FAKE_BENCH = """
import json, sys
args = sys.argv[1:]
seq, levels = int(args[args.index("--seq") + 1]), int(args[args.index("--levels") + 1])
if levels == 5 and "--fake-levels-5-works" not in args:
    sys.exit("no GPU here")
after = args[args.index("--pooling") + 1:]
poolings = [int(value) for value in after[:next((i for i, value in enumerate(after) if value.startswith("--")), len(after))]]
results = [dict(seq=seq, levels=levels, pooling=pooling, topk=2048, mode="fwd", ratio_to_sdpa_sel_cudnn=1.2,
                floor_ratio=1.1, kernel_gb=1.0, copy_tb_per_s=4.2, lighthouse=dict(ms=2.0, peak_gb=1.5),
                ratio_rounds=dict(low=1.18123, high=1.23456, rounds=3, coverage=0.75) if pooling == 2 else None)
           for pooling in poolings]
print(json.dumps(dict(device="fake", torch="0", results=results)))
"""


def use_fake_bench(tmp_path, monkeypatch, script: str, *flags: str) -> None:
    """``grid.run`` runs ``script`` (with ``flags``) in place of the bench."""
    bench = tmp_path / "bench.py"
    bench.write_text(script)
    monkeypatch.setattr(grid, "BENCH", [sys.executable, str(bench), *flags])


def test_a_run_keeps_the_lengths_it_measured_and_names_the_missing_ones(tmp_path, monkeypatch):
    use_fake_bench(tmp_path, monkeypatch, FAKE_BENCH)
    out = tmp_path / "grid.json"
    assert grid.run(out, [65536], [3, 5, 4], timeout=60, compile_first=True) == 1
    document = json.loads(out.read_text())
    assert document["missing"] == ["64K L5"]
    assert [(r["seq"], r["levels"], r["pooling"]) for r in document["rows"]] == [
        (65536, level, pooling) for level in (3, 4) for pooling in (2, 4, 8)]
    assert not list(tmp_path.glob("*.partial"))
    ranges = {r["pooling"]: r.get("ratio_rounds") for r in document["rows"] if r["levels"] == 3}
    assert ranges == {2: dict(low=1.1812, high=1.2346, rounds=3), 4: None, 8: None}  # kept where the bench gave one

    # An existing file is never overwritten by accident; --update measures again only what it is asked to.
    with pytest.raises(SystemExit, match="--update"):
        grid.run(out, [131072], [3], timeout=60, compile_first=False)
    assert grid.run(out, [131072, 65536], [3], timeout=60, compile_first=False, update=True) == 0
    document = json.loads(out.read_text())
    assert document["missing"] == ["64K L5"]
    assert sorted({(r["seq"], r["levels"]) for r in document["rows"]}) == [(65536, 3), (65536, 4), (131072, 3)]

    # A run narrowed to some pool factors replaces only their rows; its (S, L) stays missing until
    # every factor has rows.
    use_fake_bench(tmp_path, monkeypatch, FAKE_BENCH, "--fake-levels-5-works")
    assert grid.run(out, [65536], [5], timeout=60, compile_first=False, update=True, poolings=[8]) == 0
    document = json.loads(out.read_text())
    assert document["missing"] == ["64K L5"]
    assert [r["pooling"] for r in document["rows"] if r["levels"] == 5] == [8]
    assert grid.run(out, [65536], [5, 3], timeout=60, compile_first=False, update=True, poolings=[2, 4]) == 0
    document = json.loads(out.read_text())
    assert document["missing"] == []
    assert set(document["measured"]) == {"64K L3", "64K L4", "128K L3", "64K L5 p8", "64K L3 p2,4", "64K L5 p2,4"}
    assert sorted(r["pooling"] for r in document["rows"] if r["seq"] == 65536 and r["levels"] in (3, 5)) == [2, 2, 4, 4, 8, 8]


def test_the_readme_grid_table_is_the_recorded_grid():
    # The README's table and counts are printed by the tool from the recorded run, not typed: no cell can drift.
    recorded = json.loads((ROOT / "benchmarks" / "h200-grid-2026-12-03.json").read_text())["rows"]
    readme = (ROOT / "README.md").read_text()
    assert grid.table(recorded, filled=set()) in readme and grid.counts(recorded) in readme


FLAKY_BENCH = """
import json, pathlib, sys
args = sys.argv[1:]
calls = pathlib.Path(sys.argv[0]).with_suffix(".calls")
call = int(calls.read_text()) if calls.exists() else 0
calls.write_text(str(call + 1))
if call == 1:
    sys.exit("a process that fails")
ratio = {0: 1.30, 2: 1.10, 3: 1.20}[call]  # processes 0, 2 and 3 report; their median is 1.20
results = [dict(seq=65536, levels=3, pooling=pooling, topk=2048, mode="fwd", ratio_to_sdpa_sel_cudnn=ratio,
                floor_ratio=1.0 + call / 100, kernel_gb=1.0, copy_tb_per_s=4.0 + call / 10,
                lighthouse=dict(ms=ratio, peak_gb=1.5)) for pooling in (2, 4, 8)]
print(json.dumps(dict(device="fake", torch="0", results=results)))
"""


def test_repeats_keep_the_median_process_row_and_the_range_over_processes(tmp_path, monkeypatch):
    use_fake_bench(tmp_path, monkeypatch, FLAKY_BENCH)
    out = tmp_path / "grid.json"
    assert grid.run(out, [65536], [3], timeout=60, compile_first=False, repeats=4) == 0
    document = json.loads(out.read_text())
    assert len(document["rows"]) == 3
    for row in document["rows"]:
        # the whole row of the median process (its floor too), and the range of the three that reported
        assert (row["ratio_to_sdpa_sel_cudnn"], row["floor_ratio"], row["lighthouse_ms"]) == (1.2, 1.03, 1.2)
        assert row["ratio_processes"] == dict(low=1.1, high=1.3, processes=3)
    assert document["copy_tb_per_s"]["64K L3"] == 4.2
    assert document["measured"]["64K L3"].endswith(", median of 3 processes")


def test_an_update_of_some_pool_factors_keeps_the_others_copy_bandwidth(tmp_path, monkeypatch):
    # Each part's rows were judged against the copy bandwidth measured in their own run: an update of
    # p 2 files its own beside the whole run's, and a whole run again replaces both.
    use_fake_bench(tmp_path, monkeypatch, FAKE_BENCH)
    out = tmp_path / "grid.json"
    assert grid.run(out, [65536], [3], timeout=60, compile_first=False) == 0
    use_fake_bench(tmp_path, monkeypatch, FAKE_BENCH.replace("copy_tb_per_s=4.2", "copy_tb_per_s=3.9"))
    assert grid.run(out, [65536], [3], timeout=60, compile_first=False, update=True, poolings=[2]) == 0
    document = json.loads(out.read_text())
    assert document["copy_tb_per_s"] == {"64K L3": 4.2, "64K L3 p2": 3.9}
    assert set(document["measured"]) == {"64K L3", "64K L3 p2"}
    assert grid.run(out, [65536], [3], timeout=60, compile_first=False, update=True) == 0
    document = json.loads(out.read_text())
    assert document["copy_tb_per_s"] == {"64K L3": 3.9} and set(document["measured"]) == {"64K L3"}


def test_repeats_of_zero_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        grid.main(["run", "--out", "unused.json", "--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("script, why", [
    ("import time; time.sleep(30)", "over --timeout"),
    ("import json; print(json.dumps(dict(device='fake', torch='0', results=[])))", "no results"),
    ("import json; print(json.dumps(dict(device='fake', torch='0', results=[dict(seq=1)])))", "KeyError"),
    ("import sys; sys.exit('no GPU here')", "exit code 1"),
])
def test_a_bench_part_that_cannot_be_read_is_none_and_says_why(tmp_path, capsys, script, why):
    bench = tmp_path / "bench.py"
    bench.write_text(script)
    assert grid.bench_part([sys.executable, str(bench)], "64K L3", timeout=5, convert=grid.grid_part) is None
    assert why in capsys.readouterr().out
