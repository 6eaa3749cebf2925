"""Issue 15's option table: every combination of the four method options at 64K, 128K and 256K, one
bench run per length, and the README's table made from it.

    python benchmarks/options.py run --out benchmarks/h200-options-DATE.json --seq 65536 131072   # needs CUDA
    python benchmarks/options.py run --out OPTIONS.json --update --seq 262144
    python benchmarks/options.py table OPTIONS.json

``run`` times each length in its own ``lighthouse-hf bench --no-dense --json`` process holding all
16 combinations of ``--rope pooled span_end --scores norms given --selection published causal
--combine sum mean``, fwd+bwd and forward, at the bench's default shape (B=1, H=8, D=128, bf16,
L=3 p=4 K=2048; ``--warmup 2 --iters 15 --input-sets 3``). Every ratio is to cuDNN SDPA on S_sel
timed beside its own row, and the published combination runs in the same process as the others,
so each combination's excess over published compares rows of one run. ``--out`` is rewritten after
each length (a run cut short keeps what it measured and names what is missing); an existing file
is refused unless ``--update``, which replaces only the lengths measured again. ``table`` prints
the markdown table: per combination and length the ratio and its range over the bench's rounds,
the largest excess over published's ratio in the same run, and the largest difference in peak
memory from published's.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

from grid import MODES, TARGETS, bench_report, commit, grid_row, write_atomically

SEQS = (65536, 131072, 262144)
# Each option's values, the published method's first.
OPTIONS = {
    "rope": ("pooled", "span_end"),
    "scores": ("norms", "given"),
    "selection": ("published", "causal"),
    "combine": ("sum", "mean"),
}
PUBLISHED = tuple(values[0] for values in OPTIONS.values())
COMBINATIONS = list(itertools.product(*OPTIONS.values()))
TIMING = ["--warmup", "2", "--iters", "15", "--input-sets", "3"]
BENCH = [sys.executable, "-m", "lighthouse_hf", "bench", "--no-dense", "--json", *TIMING] + [
    argument for name, values in OPTIONS.items() for argument in (f"--{name}", *values)]


def option_row(result: dict) -> dict:
    """A grid row (``benchmarks/grid.py``) that also names its combination."""
    return dict(grid_row(result), **{name: result[name] for name in OPTIONS})


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
        timing=" ".join(TIMING) + "; one bench run per length, every combination in it",
        fields="as benchmarks/grid.py's rows, plus rope, scores, selection and combine",
        measured={}, missing=[], rows=[],
    )


def run(out: Path, seqs: list[int], timeout: float, update: bool = False) -> int:
    """Times every combination at each of ``seqs`` into ``out``; 0 when every length was measured."""
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
        report = bench_report(BENCH + ["--seq", str(seq)], name, timeout)
        if report is None:
            continue
        rows = [option_row(result) for result in report["results"]]
        document["device"] = f"{report['device']}, torch {report['torch']}"
        document["rows"] = [row for row in document["rows"] if row["seq"] != seq] + rows
        document["measured"][name] = f"{commit()} {datetime.date.today().isoformat()}"
        if seq in document["missing"]:
            document["missing"].remove(seq)
        write_atomically(out, document)
        measured += 1
        print(f"{name}: {len(rows)} rows", flush=True)
    return 0 if measured == len(seqs) else 1


def cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    spread = row.get("ratio_rounds")
    text = f"{row['ratio_to_sdpa_sel_cudnn']:.2f}"
    return text + (f" ({spread['low']:.2f}-{spread['high']:.2f})" if spread else "")


def table(rows: list[dict]) -> str:
    by_key = {(combination(r), r["seq"], r["mode"]): r for r in rows}
    labels = [(f"{'fwd+bwd' if mode == 'fwd+bwd' else 'forward'} " if index == 0 else "") + f"{seq // 1024}K"
              for mode in MODES for index, seq in enumerate(SEQS)]
    lines = ["| options | " + " | ".join(labels) + " | excess over published: fwd+bwd, forward | peak GB vs published |",
             "|---" * (3 + len(MODES) * len(SEQS)) + "|"]
    for values in COMBINATIONS:
        cells = [cell(by_key.get((values, seq, mode))) for mode in MODES for seq in SEQS]
        excess, memory = [], []
        for mode in MODES:
            pairs = [(by_key[(values, seq, mode)], by_key[(PUBLISHED, seq, mode)]) for seq in SEQS
                     if (values, seq, mode) in by_key and (PUBLISHED, seq, mode) in by_key]
            excess.append(max((r["ratio_to_sdpa_sel_cudnn"] - p["ratio_to_sdpa_sel_cudnn"] for r, p in pairs),
                              default=None))
            memory += [r["lighthouse_peak_gb"] - p["lighthouse_peak_gb"] for r, p in pairs]
        shown = ", ".join("n/a" if value is None else f"{value:+.2f}x" for value in excess)
        peak = "n/a" if not memory else f"{max(memory, key=abs):+.2f}"
        if values == PUBLISHED:
            shown, peak = "", ""
        lines.append(f"| {label(values)} | " + " | ".join(cells) + f" | {shown} | {peak} |")
    return "\n".join(lines) + "\n"


def counts(rows: list[dict]) -> str:
    """Per mode, the rows within issue 18's target, and published's own."""
    lines = []
    for mode in MODES:
        of_mode = [r for r in rows if r["mode"] == mode]
        published = [r for r in of_mode if combination(r) == PUBLISHED]
        within = sum(round(r["ratio_to_sdpa_sel_cudnn"], 2) <= TARGETS[mode] for r in of_mode)
        published_within = sum(round(r["ratio_to_sdpa_sel_cudnn"], 2) <= TARGETS[mode] for r in published)
        lines.append(f"{mode}: {within} of {len(of_mode)} rows within {TARGETS[mode]:.2f}x "
                     f"(published: {published_within} of {len(published)})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="time every combination on the GPU")
    run_parser.add_argument("--out", type=Path, required=True, help="the table's JSON (rewritten after each length)")
    run_parser.add_argument("--seq", type=int, nargs="+", default=list(SEQS), choices=SEQS)
    run_parser.add_argument("--update", action="store_true", help="re-measure these lengths in an existing --out")
    run_parser.add_argument("--timeout", type=float, default=280.0, help="seconds per length")
    table_parser = commands.add_parser("table", help="the README's table from an options JSON")
    table_parser.add_argument("options", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        if not torch.cuda.is_available():
            parser.error("run needs a CUDA GPU (the bench times the Triton kernels)")
        return run(args.out, args.seq, args.timeout, args.update)
    rows = json.loads(args.options.read_text())["rows"]
    print(table(rows) + "\n" + counts(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
