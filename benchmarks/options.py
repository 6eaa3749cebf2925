"""Issue 15's option table: every combination of the four method options at 64K, 128K and 256K, one
or more bench runs per length, and the README's table made from them.

    python benchmarks/options.py run --out benchmarks/h200-options-DATE.json --seq 65536 131072   # needs CUDA
    python benchmarks/options.py run --out OPTIONS.json --update --seq 262144
    python benchmarks/options.py run --out OPTIONS.json --repeats 3
    python benchmarks/options.py table OPTIONS.json

``run`` times each length in its own ``lighthouse-hf bench --no-dense --json`` process holding all
16 combinations of ``--rope pooled span_end --scores norms given --selection published causal
--combine sum mean``, fwd+bwd and forward, at B=1, H=8, D=128, bf16, L=3 p=4 K=2048 (``--warmup 2
--iters 15 --input-sets 3``). Every ratio is to cuDNN SDPA on S_sel timed beside its own row.
``--out`` is rewritten after each length (a run cut short keeps what it measured and names what
is missing); a length counts as measured only when its report has every combination in both
modes; an existing file is refused unless ``--update``, which replaces only the lengths measured
again. ``--repeats N`` times each length in N processes one after another and keeps, per row, the
median process's row with the ratios' range over the processes, as ``benchmarks/grid.py`` does
(one process's rows have differed from another's at the same commit by up to 0.05x). Every
process's rows are kept under ``process_rows``.

``table`` prints the markdown table: per combination and length the ratio, its range over the
processes (one process: over the bench's rounds) and its floor (bold, as in the grid, where the
ratio is over the target and the floor is not); per mode, the largest excess over published, in
milliseconds over published's row of the same process, divided by that row's SDPA baseline (so
that the combination's own baseline timing adds no noise to it); and per mode the most peak memory
over published's. Below it, each option's cost: per mode, the mean over every pair of combinations
that differ in that option alone (8 pairs per length and process, both rows of a pair from one
process) of the time with it minus the time without, in published's SDPA baseline of that length
and process, with a 95% Student's t interval over the pairs, and the range of the pairs'
peak-memory differences. Within a process each row is in one pair per option, so those pairs share
no timing. Between the two tables, the rows counted as the grid counts them. Lengths without
``process_rows`` (recorded before the file kept them) pair their rows as they are. Intervals past
the tabulated degrees of freedom take t's Cornish-Fisher expansion (``t_975``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from grid import MODES, SEQS, TARGETS, bench_part, column_labels, commit, grid_row, median_rows, shown, write_atomically
from grid import counts as grid_counts  # options.py has a counts of its own

# Each option's values, the published method's first.
OPTIONS = {
    "rope": ("pooled", "span_end"),
    "scores": ("norms", "given"),
    "selection": ("published", "causal"),
    "combine": ("sum", "mean"),
}
PUBLISHED = tuple(values[0] for values in OPTIONS.values())
COMBINATIONS = list(itertools.product(*OPTIONS.values()))
SHAPE = ["--levels", "3", "--pooling", "4", "--topk", "2048"]
TIMING = ["--warmup", "2", "--iters", "15", "--input-sets", "3"]
BENCH = [sys.executable, "-m", "lighthouse_hf", "bench", "--no-dense", "--json", *SHAPE, *TIMING] + [
    argument for name, values in OPTIONS.items() for argument in (f"--{name}", *values)]


def option_row(result: dict) -> dict:
    """A grid row (``benchmarks/grid.py``) that also names its combination."""
    return dict(grid_row(result), **{name: result[name] for name in OPTIONS})


def option_rows(report: dict) -> list[dict]:
    """A bench report's rows; a ValueError unless it holds every combination in both modes."""
    rows = [option_row(result) for result in report["results"]]
    present = {(combination(row), row["mode"]) for row in rows}
    lacking = {(values, mode) for values in COMBINATIONS for mode in MODES} - present
    if lacking:
        raise ValueError(f"the report lacks {len(lacking)} of the {2 * len(COMBINATIONS)} (combination, mode) rows")
    return rows


def combination(row: dict) -> tuple[str, ...]:
    return tuple(row[name] for name in OPTIONS)


def label(values: tuple[str, ...]) -> str:
    """The options that differ from the published method, e.g. ``span_end + mean``."""
    changed = [value for value, published in zip(values, PUBLISHED) if value != published]
    if not changed:
        return "published"
    return "all four" if len(changed) == len(OPTIONS) else " + ".join(changed)


def new_document() -> dict:
    return dict(
        what="issue 15's option table: lighthouse-hf bench --no-dense, B=1, H=8, D=128, bf16, L=3 p=4 K=2048, "
             "the 16 combinations of rope, scores, selection and combine",
        date=datetime.date.today().isoformat(), device=None, commit=commit(),
        timing=" ".join(TIMING) + "; one bench run per length and process (--repeats), every combination in it",
        fields="as benchmarks/grid.py's rows, plus rope, scores, selection and combine",
        measured={}, missing=[], rows=[],
    )


def option_key(row: dict) -> tuple:
    return row["seq"], row["mode"], combination(row)


def run(out: Path, seqs: list[int], timeout: float, update: bool = False, repeats: int = 1) -> int:
    """Times every combination at each of ``seqs`` into ``out``, each length in ``repeats`` bench
    processes one after another (rows: ``grid.median_rows``); 0 when every length was measured."""
    if out.exists() and not update:
        raise SystemExit(f"--out {out} exists: pass --update to re-measure some of its lengths, or choose another file")
    document = json.loads(out.read_text()) if out.exists() else new_document()
    for seq in seqs:  # with --update, a length's rows are kept unless it is measured again
        if seq not in document["missing"] and not any(row["seq"] == seq for row in document["rows"]):
            document["missing"].append(seq)
    write_atomically(out, document)
    measured = 0
    for seq in seqs:
        name = f"{seq // 1024}K"
        outcomes = [bench_part(BENCH + ["--seq", str(seq)], name, timeout, option_rows) for _ in range(repeats)]
        outcomes = [outcome for outcome in outcomes if outcome is not None]
        if not outcomes:
            continue
        report = outcomes[0][0]
        parts = [[dict(row, process=process) for row in part_rows] for process, (_, part_rows) in enumerate(outcomes)]
        rows = median_rows(parts, key=option_key)
        document["device"] = f"{report['device']}, torch {report['torch']}"
        document["rows"] = [row for row in document["rows"] if row["seq"] != seq] + rows
        # every process's rows, so that excess and costs compare rows of one process
        document["process_rows"] = [row for row in document.get("process_rows", []) if row["seq"] != seq] + [
            row for part in parts for row in part]
        processes = f", median of {len(outcomes)} processes" if repeats > 1 else ""
        document["measured"][name] = f"{commit()} {datetime.date.today().isoformat()}{processes}"
        if seq in document["missing"]:
            document["missing"].remove(seq)
        write_atomically(out, document)
        measured += 1
        print(f"{name}: {len(rows)} rows", flush=True)
    return 0 if measured == len(seqs) else 1


def cell(row: dict | None, mode: str) -> str:
    """The ratio, its range over the processes (or, from one process, over its rounds) and its
    floor; bold, as in the grid, where it is over the target and the floor is not (the kernels, not
    their bytes, are what is missing)."""
    if row is None:
        return "n/a"
    ratio, floor = shown(row)
    spread = row.get("ratio_processes", row.get("ratio_rounds"))
    text = f"{ratio:.2f}" + (f" ({spread['low']:.2f}-{spread['high']:.2f})" if spread else "") + f", floor {floor:.2f}"
    return f"**{text}**" if ratio > TARGETS[mode] and floor <= TARGETS[mode] else text


def excess(row: dict, published: dict) -> float:
    """How much slower than published, in units of published's SDPA-on-S_sel time."""
    baseline_ms = published["lighthouse_ms"] / published["ratio_to_sdpa_sel_cudnn"]
    return (row["lighthouse_ms"] - published["lighthouse_ms"]) / baseline_ms


def worst(values: list[float], text: str) -> str:
    """The largest of ``values`` (over the lengths), formatted; "n/a" when there is none."""
    return "n/a" if not values else text.format(max(values))


def by_run(rows: list[dict], process_rows: list[dict] = ()) -> dict[tuple, dict]:
    """Rows by combination, length, mode and bench process, for pairing rows of one process: every
    process's rows (``process_rows``) where the file keeps them, elsewhere (lengths recorded before
    it kept them) the rows themselves, whose process is ``None``."""
    kept = {r["seq"] for r in process_rows}
    return {(combination(r), r["seq"], r["mode"], r.get("process")): r
            for r in [*process_rows, *(r for r in rows if r["seq"] not in kept)]}


def table(rows: list[dict], process_rows: list[dict] = ()) -> str:
    """The README's table of ``rows``; each row's excess over published against published's row of
    the same process (from ``process_rows``, every process's rows, where the run kept them)."""
    by_key = {(combination(r), r["seq"], r["mode"]): r for r in rows}
    same_run = by_run(rows, process_rows)
    lines = ["| options | " + " | ".join(column_labels(SEQS))
             + " | largest excess over published: fwd+bwd, forward"
             + " | largest peak GB over published: fwd+bwd, forward |",
             "|---" * (3 + len(MODES) * len(SEQS)) + "|"]
    for values in COMBINATIONS:
        cells = [cell(by_key.get((values, seq, mode)), mode) for mode in MODES for seq in SEQS]
        excess_texts, memory_texts = [], []
        for mode in MODES:
            measured = [by_key[(values, seq, mode)] for seq in SEQS if (values, seq, mode) in by_key]
            pairs = [(r, same_run[(PUBLISHED, r["seq"], mode, r.get("process"))]) for r in measured
                     if (PUBLISHED, r["seq"], mode, r.get("process")) in same_run]
            excess_texts.append(worst([excess(r, p) for r, p in pairs], "{:+.2f}x"))
            memory_texts.append(worst([r["lighthouse_peak_gb"] - p["lighthouse_peak_gb"] for r, p in pairs], "{:+.2f}"))
        if values == PUBLISHED:
            excess_texts, memory_texts = [], []
        lines.append(f"| {label(values)} | " + " | ".join(cells)
                     + f" | {', '.join(excess_texts)} | {', '.join(memory_texts)} |")
    return "\n".join(lines) + "\n"


# Student's t, 97.5% quantile, by degrees of freedom: an option's pairs number 8 per measured length
# and process.
T_975 = {7: 2.365, 15: 2.131, 23: 2.069, 47: 2.012, 71: 1.994}


def t_975(freedom: int) -> float:
    """Student's t 97.5% quantile: the table above, else its Cornish-Fisher expansion in 1/freedom
    (within 0.001 of the exact quantile from 7 degrees of freedom up)."""
    if freedom in T_975:
        return T_975[freedom]
    z = statistics.NormalDist().inv_cdf(0.975)
    terms = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384]
    return z + sum(term / freedom ** (power + 1) for power, term in enumerate(terms))


def option_costs(rows: list[dict], process_rows: list[dict] = ()) -> str:
    """Each option's cost (the mean over the pairs that differ in it alone, each pair from one bench
    process: ``process_rows`` where the run kept every process's rows) as a markdown table."""
    by_key = by_run(rows, process_rows)
    lines = ["| option | fwd+bwd: cost, 95% interval | forward: cost, 95% interval "
             "| peak GB, fwd+bwd | peak GB, forward |", "|---|---|---|---|---|"]
    for index, (name, values) in enumerate(OPTIONS.items()):
        times, memories = [], []
        for mode in MODES:
            costs, extra_gb = [], []
            for (values_with, seq, row_mode, process), row in by_key.items():
                if row_mode != mode or values_with[index] == values[0]:
                    continue
                without = by_key[(values_with[:index] + (values[0],) + values_with[index + 1:], seq, mode, process)]
                published = by_key[(PUBLISHED, seq, mode, process)]
                costs.append(excess(row, published) - excess(without, published))
                extra_gb.append(row["lighthouse_peak_gb"] - without["lighthouse_peak_gb"])
            half = t_975(len(costs) - 1) * statistics.stdev(costs) / len(costs) ** 0.5
            mean = statistics.fmean(costs)
            times.append(f"{mean:+.3f}x [{mean - half:+.3f}, {mean + half:+.3f}]")
            memories.append(f"{min(extra_gb):+.2f} to {max(extra_gb):+.2f}")
        lines.append(f"| `--{name} {values[1]}` | " + " | ".join(times + memories) + " |")
    return "\n".join(lines) + "\n"


def counts(rows: list[dict]) -> str:
    """Per mode, as the grid counts its rows (within the target; of the others, those whose floor is
    over it too; the median of measured minus floor), then published's own rows within the target."""
    lines = grid_counts(rows).splitlines()
    for index, mode in enumerate(MODES):
        published = [r for r in rows if r["mode"] == mode and combination(r) == PUBLISHED]
        within = sum(shown(r)[0] <= TARGETS[mode] for r in published)
        lines[index] += f" (published: {within} of {len(published)} within)"
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="time every combination on the GPU")
    run_parser.add_argument("--out", type=Path, required=True, help="the table's JSON (rewritten after each length)")
    run_parser.add_argument("--seq", type=int, nargs="+", default=list(SEQS), choices=SEQS)
    run_parser.add_argument("--update", action="store_true", help="re-measure these lengths in an existing --out")
    run_parser.add_argument("--timeout", type=float, default=280.0,
                            help="seconds per length, compiling the 16 combinations' kernels included")
    run_parser.add_argument("--repeats", type=int, default=1,
                            help="bench processes per length, one after another; each row is the median process's")
    table_parser = commands.add_parser("table", help="the README's table from an options JSON")
    table_parser.add_argument("options", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        if not torch.cuda.is_available():
            parser.error("run needs a CUDA GPU (the bench times the Triton kernels)")
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        return run(args.out, args.seq, args.timeout, args.update, args.repeats)
    document = json.loads(args.options.read_text())
    rows, process_rows = document["rows"], document.get("process_rows", [])
    print(table(rows, process_rows) + "\n" + counts(rows) + "\n" + option_costs(rows, process_rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
