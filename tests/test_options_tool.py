"""benchmarks/options.py: issue 15's option table from an options JSON, and a run that keeps what it
measured when a length fails (the bench itself is replaced by a script that prints a report)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # options.py imports grid.py beside it, as when run as a script
SPEC = importlib.util.spec_from_file_location("options", ROOT / "benchmarks" / "options.py")
options = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(options)

# The fake bench's milliseconds: published's SDPA baseline times (1.10 + each differing option's cost),
# costs that differ by mode and by length; every other combination's ratio is to a baseline of its
# own that read 5% slower, as a second timing of the same SDPA can.
FAKE_BENCH = """
import itertools, json, sys
args = sys.argv[1:]
seq = int(args[args.index("--seq") + 1])
if seq == 262144:
    sys.exit("out of memory")
def values(name):
    after = args[args.index(name) + 1:]
    return after[:next((i for i, value in enumerate(after) if value.startswith("--")), len(after))]
# --fake-process-count FILE: each process reads 0.01 slower per process before it (FILE counts them)
shift = 0.0
if "--fake-process-count" in args:
    import pathlib
    count_file = pathlib.Path(args[args.index("--fake-process-count") + 1])
    before = int(count_file.read_text()) if count_file.exists() else 0
    count_file.write_text(str(before + 1))
    shift = 0.01 * before
COST = {"fwd+bwd": {"span_end": 0.03, "given": -0.01, "causal": 0.02, "mean": 0.01},
        "fwd": {"span_end": 0.06, "given": 0.0, "causal": 0.04, "mean": 0.01}}
results = []
for rope, scores, selection, combine in itertools.product(*map(values, ["--rope", "--scores", "--selection", "--combine"])):
    if "--fake-incomplete-at-128k" in args and seq == 131072 and combine == "mean":
        continue
    for mode in ("fwd+bwd", "fwd"):
        base = (2.0 if mode == "fwd+bwd" else 1.0) * seq / 65536
        cost = sum(COST[mode].get(v, 0.0) for v in (rope, scores, selection, combine))
        cost += 0.01 * (rope == "span_end" and seq == 131072)
        ms = base * (1.10 + cost + shift)
        published = (rope, scores, selection, combine) == ("pooled", "norms", "published", "sum")
        ratio = ms / (base * (1.0 if published else 1.05))
        # the one fwd+bwd row over the target gets a floor over it too: the bytes' miss, not bold
        over_its_floor = mode == "fwd+bwd" and ratio > 1.105
        row = dict(seq=seq, levels=3, pooling=4, topk=2048, mode=mode, rope=rope, scores=scores,
                   selection=selection, combine=combine, ratio_to_sdpa_sel_cudnn=ratio,
                   floor_ratio=1.12 if over_its_floor else 1.05,
                   kernel_gb=1.0, copy_tb_per_s=4.2,
                   lighthouse=dict(ms=ms, peak_gb=1.5 + 0.25 * (selection == "causal" and mode == "fwd")
                                   + 0.125 * (combine == "mean" and mode == "fwd+bwd")),
                   ratio_rounds=dict(low=ratio - 0.01, high=ratio + 0.02, rounds=3, coverage=0.75))
        if "--fake-no-rope-at-64k" in args and seq == 65536:
            del row["rope"]
        results.append(row)
print(json.dumps(dict(device="fake", torch="0", results=results)))
"""


@pytest.fixture
def use_fake_bench(tmp_path, monkeypatch):
    bench = tmp_path / "bench.py"
    bench.write_text(FAKE_BENCH)
    arguments = options.BENCH[2:]  # the real bench's, after "python -m"

    def use(*flags):
        monkeypatch.setattr(options, "BENCH", [sys.executable, str(bench), *arguments, *flags])

    use()
    return use


def cells_of(table: str, label: str) -> list[str]:
    row_text = next(text for text in table.splitlines() if text.startswith(f"| {label} |"))
    return [cell.strip() for cell in row_text.strip("|").split("|")][1:]


def test_the_real_bench_accepts_the_command_and_times_every_combination():
    from lighthouse_hf.cli import build_parser

    parsed = build_parser().parse_args(options.BENCH[3:] + ["--seq", "65536"])
    assert (parsed.levels, parsed.pooling, parsed.topk, parsed.no_dense, parsed.json) == ([3], [4], [2048], True, True)
    assert {name: tuple(getattr(parsed, name)) for name in options.OPTIONS} == options.OPTIONS
    assert len(options.COMBINATIONS) == 16 and options.COMBINATIONS[0] == options.PUBLISHED


def test_a_run_keeps_the_lengths_it_measured_and_names_the_missing_ones(tmp_path, use_fake_bench):
    out = tmp_path / "options.json"
    assert options.run(out, [65536, 262144, 131072], timeout=60) == 1
    document = json.loads(out.read_text())
    assert document["missing"] == [262144]
    assert sorted({row["seq"] for row in document["rows"]}) == [65536, 131072]
    assert len(document["rows"]) == 2 * 16 * 2
    assert set(document["measured"]) == {"64K", "128K"}
    assert not list(tmp_path.glob("*.partial"))

    with pytest.raises(SystemExit, match="--update"):
        options.run(out, [131072], timeout=60)
    assert options.run(out, [131072], timeout=60, update=True) == 0
    again = json.loads(out.read_text())
    assert again["missing"] == [262144] and len(again["rows"]) == len(document["rows"])


def test_repeats_keep_each_rows_median_process_and_show_the_range_over_the_processes(tmp_path, use_fake_bench):
    out = tmp_path / "options.json"
    use_fake_bench("--fake-process-count", str(tmp_path / "processes"))
    assert options.run(out, [65536], timeout=60, repeats=3) == 0
    document = json.loads(out.read_text())
    assert (tmp_path / "processes").read_text() == "3"
    assert len(document["rows"]) == 2 * 16 and document["measured"]["64K"].endswith(", median of 3 processes")
    assert sorted(row["process"] for row in document["process_rows"]) == [0] * 32 + [1] * 32 + [2] * 32
    for row in document["rows"]:
        spread = row["ratio_processes"]
        assert spread["processes"] == 3 and spread["low"] < row["ratio_to_sdpa_sel_cudnn"] < spread["high"], row
    published = next(row for row in document["rows"] if options.combination(row) == options.PUBLISHED
                     and row["mode"] == "fwd+bwd")
    assert published["ratio_to_sdpa_sel_cudnn"] == pytest.approx(1.11)  # the second process: 0.01 slower
    assert options.cell(published, "fwd+bwd") == "1.11 (1.10-1.12), floor 1.12"  # not bold: its floor is over too


def test_a_report_missing_a_field_or_a_combination_leaves_that_length_and_the_run_goes_on(tmp_path, use_fake_bench):
    out = tmp_path / "options.json"
    use_fake_bench("--fake-no-rope-at-64k", "--fake-incomplete-at-128k")
    assert options.run(out, [65536, 131072], timeout=60) == 1
    assert json.loads(out.read_text())["missing"] == [65536, 131072]
    use_fake_bench("--fake-incomplete-at-128k")
    assert options.run(out, [65536, 131072], timeout=60, update=True) == 1
    document = json.loads(out.read_text())
    assert document["missing"] == [131072] and {row["seq"] for row in document["rows"]} == {65536}


def test_the_table_gives_each_combination_its_ratios_excess_and_memory(tmp_path, use_fake_bench):
    out = tmp_path / "options.json"
    options.run(out, [65536, 131072], timeout=60)
    rows = json.loads(out.read_text())["rows"]
    text = options.table(rows)
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 16
    # fwd+bwd 64K / 128K / 256K, forward 64K / 128K / 256K, excess, memory
    assert cells_of(text, "published") == ["1.10 (1.09-1.12), floor 1.05", "1.10 (1.09-1.12), floor 1.05", "n/a",
                                           "1.10 (1.09-1.12), floor 1.05", "1.10 (1.09-1.12), floor 1.05", "n/a", "", ""]
    # The excess is in published's baseline: +0.03 / +0.04 (128K) fwd+bwd, +0.06 / +0.07 forward, the
    # worst of the lengths, although the row's own ratio (to its own, slower baseline) reads lower.
    assert cells_of(text, "span_end")[:2] == ["1.08 (1.07-1.10), floor 1.05", "1.09 (1.08-1.11), floor 1.05"]
    # Over the target with the floor within it: bold, as in the grid (forward); with the floor over
    # the target too, not (fwd+bwd).
    assert cells_of(text, "span_end + causal + mean")[1] == "1.11 (1.10-1.13), floor 1.12"
    assert cells_of(text, "span_end + causal + mean")[4] == "**1.16 (1.15-1.18), floor 1.05**"
    assert cells_of(text, "span_end")[-2:] == ["+0.04x, +0.07x", "+0.00, +0.00"]
    assert cells_of(text, "causal + mean")[-2:] == ["+0.03x, +0.05x", "+0.12, +0.25"]
    assert cells_of(text, "given")[-2:] == ["-0.01x, +0.00x", "+0.00, +0.00"]
    assert cells_of(text, "all four")[-2:] == ["+0.06x, +0.12x", "+0.12, +0.25"]
    counts = options.counts(rows)
    # by the rows' own ratios, (1.10 + cost) / 1.05: over the targets only span_end + causal + mean at
    # 128K (1.11x fwd+bwd; 1.16x forward, with or without given)
    assert ("fwd+bwd: 32 rows, 31 within 1.10x; of the 1 others 1 have a floor above it, 0 do not; "
            "median measured minus floor +0.026x (published: 2 of 2 within)") in counts
    assert "fwd: 32 rows, 30 within 1.15x; of the 2 others 0 have a floor above it, 2 do not;" in counts


def test_each_options_cost_is_the_mean_over_the_pairs_that_differ_in_it_alone(tmp_path, use_fake_bench):
    out = tmp_path / "options.json"
    options.run(out, [65536, 131072], timeout=60)
    text = options.option_costs(json.loads(out.read_text())["rows"])
    # span_end costs 0.03 (64K) and 0.04 (128K) fwd+bwd in 8 pairs each: mean 0.035, t(15) interval
    assert cells_of(text, "`--rope span_end`") == ["+0.035x [+0.032, +0.038]", "+0.065x [+0.062, +0.068]",
                                                   "+0.00 to +0.00", "+0.00 to +0.00"]
    assert cells_of(text, "`--scores given`")[:2] == ["-0.010x [-0.010, -0.010]", "+0.000x [+0.000, +0.000]"]
    assert cells_of(text, "`--selection causal`")[1:] == ["+0.040x [+0.040, +0.040]", "+0.00 to +0.00", "+0.25 to +0.25"]
    assert cells_of(text, "`--combine mean`")[2:] == ["+0.12 to +0.12", "+0.00 to +0.00"]


def synthetic_rows(seq: int, process: int | None, span_end_cost: float, slower: float = 0.0) -> list[dict]:
    """Every combination's rows at ``seq`` from one bench process (``None``: a file that names none)."""
    rows = []
    for values in options.COMBINATIONS:
        for mode in ("fwd+bwd", "fwd"):
            ms = 1.10 + span_end_cost * (values[0] == "span_end") + slower
            row = dict(zip(options.OPTIONS, values), seq=seq, mode=mode, ratio_to_sdpa_sel_cudnn=ms, floor_ratio=1.05,
                       lighthouse_ms=ms, lighthouse_peak_gb=1.0)
            rows.append(row if process is None else dict(row, process=process))
    return rows


def test_with_every_process_kept_excess_and_costs_compare_rows_of_one_process():
    # Two processes, the second 0.05 slower in every row (as a process can be); the table's rows are
    # the second process's for span_end, the first's otherwise. Paired across processes, span_end
    # would cost 0.02 + 0.05; paired within each, exactly 0.02.
    process_rows = synthetic_rows(65536, 0, 0.02) + synthetic_rows(65536, 1, 0.02, slower=0.05)
    shown = [row for row in process_rows if (row["process"] == 1) == (row["rope"] == "span_end")]
    assert cells_of(options.option_costs(shown, process_rows), "`--rope span_end`")[:2] == [
        "+0.020x [+0.020, +0.020]", "+0.020x [+0.020, +0.020]"]
    assert cells_of(options.table(shown, process_rows), "span_end")[-2] == "+0.02x, +0.02x"
    assert cells_of(options.table(shown), "span_end")[-2] == "n/a, n/a"  # no published row of its process


def test_lengths_recorded_without_every_process_still_pair_their_own_rows():
    # A file from before the processes were kept, updated at one length: 64K's rows name no process
    # (span_end 0.05 there), 128K's two processes are kept (0.02). All 24 pairs count.
    rows = synthetic_rows(65536, None, 0.05) + synthetic_rows(131072, 0, 0.02)
    process_rows = synthetic_rows(131072, 0, 0.02) + synthetic_rows(131072, 1, 0.02, slower=0.05)
    assert cells_of(options.option_costs(rows, process_rows), "`--rope span_end`")[0].startswith("+0.030x [")
    assert cells_of(options.table(rows, process_rows), "span_end")[-2] == "+0.05x, +0.05x"


def test_t_quantiles_beyond_the_table_follow_the_expansion(monkeypatch):
    # --repeats 4 over one length gives 31 degrees of freedom. Exact 97.5% quantiles (4 decimals):
    exact = {7: 2.3646, 15: 2.1314, 23: 2.0687, 31: 2.0395, 47: 2.0117, 71: 1.9939, 95: 1.9853}
    assert [round(options.t_975(freedom), 3) for freedom in (31, 95)] == [2.040, 1.985]
    monkeypatch.setattr(options, "T_975", {})  # the expansion alone, at the tabulated freedoms too
    assert all(abs(options.t_975(freedom) - t) < 1e-3 for freedom, t in exact.items())


def test_the_readme_option_tables_are_the_recorded_run():
    # The README's option tables are printed by the tool from the recorded run, not typed.
    run = json.loads((ROOT / "benchmarks" / "h200-options-2026-12-04-v24.json").read_text())
    rows, process_rows = run["rows"], run["process_rows"]
    readme = (ROOT / "README.md").read_text()
    assert options.table(rows, process_rows) in readme and options.option_costs(rows, process_rows) in readme
    assert options.counts(rows) in readme


def test_the_readme_figures_of_the_partial_v24_run_are_the_recorded_ones():
    # The README compares one row of the partial run (64K and 128K, same kernels) with the full one.
    run = json.loads((ROOT / "benchmarks" / "h200-options-2026-12-04-v24-partial.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert run["missing"] == [262144]
    given_mean = cells_of(options.table(run["rows"], run["process_rows"]), "given + mean")
    assert given_mean[1].startswith("**1.11 ") and "given + mean at 128K read 1.11x in the partial v24 run" in readme
