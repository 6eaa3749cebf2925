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

# One ratio per combination: published 1.10, and each option that differs from it adds its own cost.
COST = {"span_end": 0.03, "given": -0.01, "causal": 0.02, "mean": 0.01}
FAKE_BENCH = """
import itertools, json, sys
args = sys.argv[1:]
seq = int(args[args.index("--seq") + 1])
if seq == 262144:
    sys.exit("out of memory")
def values(name):
    after = args[args.index(name) + 1:]
    return after[:next((i for i, value in enumerate(after) if value.startswith("--")), len(after))]
COST = %r
results = []
for rope, scores, selection, combine in itertools.product(*map(values, ["--rope", "--scores", "--selection", "--combine"])):
    for mode in ("fwd+bwd", "fwd"):
        ratio = 1.10 + (0.1 if mode == "fwd" else 0.0) + sum(COST.get(v, 0.0) for v in (rope, scores, selection, combine))
        results.append(dict(seq=seq, levels=3, pooling=4, topk=2048, mode=mode, rope=rope, scores=scores,
                            selection=selection, combine=combine, ratio_to_sdpa_sel_cudnn=ratio, floor_ratio=1.05,
                            kernel_gb=1.0, copy_tb_per_s=4.2,
                            lighthouse=dict(ms=2.0, peak_gb=1.5 + (0.25 if selection == "causal" else 0.0)),
                            ratio_rounds=dict(low=ratio - 0.01, high=ratio + 0.02, rounds=3, coverage=0.75)))
print(json.dumps(dict(device="fake", torch="0", results=results)))
""" % (COST,)


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    bench = tmp_path / "bench.py"
    bench.write_text(FAKE_BENCH)
    monkeypatch.setattr(options, "BENCH", [sys.executable, str(bench), *options.BENCH[2:]])


def cells_of(table: str, label: str) -> list[str]:
    row_text = next(text for text in table.splitlines() if text.startswith(f"| {label} |"))
    return [cell.strip() for cell in row_text.strip("|").split("|")][1:]


def test_the_bench_is_asked_for_every_combination():
    arguments = options.BENCH
    for name, values in options.OPTIONS.items():
        start = arguments.index(f"--{name}") + 1
        assert tuple(arguments[start:start + len(values)]) == values
    assert len(options.COMBINATIONS) == 16 and options.COMBINATIONS[0] == options.PUBLISHED


def test_a_run_keeps_the_lengths_it_measured_and_names_the_missing_ones(tmp_path, fake_bench):
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


def test_the_table_gives_each_combination_its_ratios_and_its_excess_over_published(tmp_path, fake_bench):
    out = tmp_path / "options.json"
    options.run(out, [65536, 131072], timeout=60)
    rows = json.loads(out.read_text())["rows"]
    text = options.table(rows)
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 16
    # fwd+bwd 64K / 128K / 256K, forward 64K / 128K / 256K, excess, memory
    assert cells_of(text, "published") == ["1.10 (1.09-1.12)", "1.10 (1.09-1.12)", "n/a",
                                           "1.20 (1.19-1.22)", "1.20 (1.19-1.22)", "n/a", "", ""]
    assert cells_of(text, "span_end + causal")[0] == "1.15 (1.14-1.17)"
    assert cells_of(text, "span_end + causal")[-2:] == ["+0.05x, +0.05x", "+0.25"]
    assert cells_of(text, "given")[-2:] == ["-0.01x, -0.01x", "+0.00"]
    assert cells_of(text, "all four")[-2] == "+0.05x, +0.05x"
    counts = options.counts(rows)
    # fwd+bwd within 1.10: published, given, given + mean (1.10), 3 combinations x 2 lengths
    assert "fwd+bwd: 6 of 32 rows within 1.10x (published: 2 of 2)" in counts
    assert "fwd: 0 of 32 rows within 1.15x (published: 0 of 2)" in counts
