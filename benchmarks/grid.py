"""Issue 18's settings grid (L 3/4/5, p 2/4/8, K 1536-6144 at 64K/128K/256K) in one command, and the
README's table made from it.

    python benchmarks/grid.py run --out benchmarks/h200-grid-DATE.json        # needs CUDA
    python benchmarks/grid.py run --out GRID.json --update --seq 262144 --levels 4 5
    python benchmarks/grid.py run --out GRID.json --update --seq 262144 --levels 5 --pooling 8
    python benchmarks/grid.py run --out GRID.json --update --seq 65536 131072 --levels 4 5 --pooling 2 --repeats 3
    python benchmarks/grid.py table benchmarks/h200-grid-DATE.json [--fill OLDER.json]

``run`` times each (S, L) in its own ``lighthouse-hf bench --no-dense --json`` process, the three pool
factors and five budgets in it (64K-128K: ``--warmup 2 --iters 8``; 256K: ``--warmup 1 --iters 4
--input-sets 2``, as the first grid). It first compiles every specialization in parallel processes
(Triton's cache is shared on disk), so the timed runs one after the other hold no compile. It
rewrites ``--out`` after each (S, L), so a run cut short keeps what it measured, and names what is
missing in the file. An existing ``--out`` is refused unless ``--update``, which replaces only the
(S, L) runs measured again; ``--pooling`` narrows a run to some pool factors (a 256K run whose
budgets approach S takes minutes per factor), and an (S, L) stays missing until each factor has
its rows; ``measured`` records the commit and date of each run, since an update may come later
than the file. ``--repeats N`` times each (S, L) in N processes one after another and keeps, per
row, the median process's row with the ratios' range (``ratio_processes``): one process's rows
have differed from another's, minutes apart at the same commit, by up to 0.05x (2026-12-03), more
than the rounds inside a process show. ``table`` prints the markdown table and the counts against
the targets; ``--fill`` takes the (S, L, p) rows missing from the file from an older one, marked
with a dagger.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from lighthouse_hf.ops.plan import plan_for

T = TypeVar("T")

SEQS = (65536, 131072, 262144)
LEVELS = (3, 4, 5)
POOLINGS = (2, 4, 8)
TOPKS = (1536, 2048, 3072, 4096, 6144)
MODES = ("fwd+bwd", "fwd")
TARGETS = {"fwd+bwd": 1.10, "fwd": 1.15}
BENCH = [sys.executable, "-m", "lighthouse_hf", "bench", "--no-dense", "--json", "--topk", *map(str, TOPKS)]


def timing(seq: int) -> list[str]:
    if seq >= 262144:
        return ["--warmup", "1", "--iters", "4", "--input-sets", "2"]
    return ["--warmup", "2", "--iters", "8"]


def grid_row(result: dict) -> dict:
    """The fields of a bench result that the table and the notes use, rounded as the first grid's;
    the ratio's range over rounds where the bench gives one (rows from 2026-12-02 on)."""
    row = dict(
        seq=result["seq"], levels=result["levels"], pooling=result["pooling"], topk=result["topk"],
        mode=result["mode"], ratio_to_sdpa_sel_cudnn=round(result["ratio_to_sdpa_sel_cudnn"], 4),
        floor_ratio=round(result["floor_ratio"], 4), kernel_gb=round(result["kernel_gb"], 3),
        lighthouse_ms=round(result["lighthouse"]["ms"], 3), lighthouse_peak_gb=round(result["lighthouse"]["peak_gb"], 3),
    )
    spread = result.get("ratio_rounds")
    if spread is not None:
        row["ratio_rounds"] = dict(low=round(spread["low"], 4), high=round(spread["high"], 4), rounds=spread["rounds"])
    return row


def bench_part(command: list[str], name: str, timeout: float, convert: Callable[[dict], T]) -> tuple[dict, T] | None:
    """One bench process's JSON report and ``convert(report)``, or None (saying why) when the bench
    timed out, failed, or printed a report that ``convert`` cannot read (a missing field, no
    results): the caller then leaves that part of its file as it was and goes on to the next."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: over --timeout {timeout:g} s, not measured", flush=True)
        return None
    try:
        if done.returncode != 0:
            raise ValueError(f"exit code {done.returncode}: {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        if not report["results"]:
            raise ValueError("the report holds no results")
        return report, convert(report)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        print(f"{name}: no rows ({error!r})", flush=True)
        return None


def grid_part(report: dict) -> tuple[list[dict], float]:
    """A bench report's grid rows and its copy bandwidth (TB/s)."""
    return [grid_row(result) for result in report["results"]], round(report["results"][0]["copy_tb_per_s"], 2)


def write_atomically(path: Path, document: dict) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(staging, path)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def new_document() -> dict:
    return dict(
        what="issue 18's settings grid: lighthouse-hf bench --no-dense, B=1, H=8, D=128, bf16, rope pooled, "
             "published selection, sum",
        date=datetime.date.today().isoformat(), device=None, commit=commit(),
        timing="64K and 128K: --warmup 2 --iters 8 (3 input sets); 256K: --warmup 1 --iters 4 --input-sets 2; "
               "one bench run per (S, L), the three pool factors and five K in it",
        fields="ratio_to_sdpa_sel_cudnn and floor_ratio as in the bench's JSON (floor: SDPA(S_sel) cuDNN time plus "
               "kernel_gb at the measured copy bandwidth); lighthouse_ms and lighthouse_peak_gb: the lighthouse "
               "variant's median per call and peak",
        copy_tb_per_s={}, missing=[], rows=[],
    )


def setting_args(seq: int, level: int, poolings: Sequence[int]) -> list[str]:
    return ["--seq", str(seq), "--levels", str(level), "--pooling", *map(str, poolings)]


def compile_all(runs: list[tuple[int, int]], poolings: Sequence[int], timeout: float) -> None:
    """One untimed bench per (S, L), all at once: Triton compiles each specialization once, on disk."""
    compiling = {(seq, level): subprocess.Popen(
        BENCH + setting_args(seq, level, poolings) + ["--warmup", "1", "--iters", "1", "--input-sets", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seq, level in runs}
    for (seq, level), process in compiling.items():
        try:
            _, errors = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            print(f"{seq // 1024}K L{level}: compile pass over {timeout:g} s, killed", flush=True)
            continue
        if process.returncode != 0:
            print(f"{seq // 1024}K L{level}: compile pass failed ({process.returncode}): {errors[-2000:]}", flush=True)


def setting_key(row: dict) -> tuple:
    return row["seq"], row["levels"], row["pooling"], row["topk"], row["mode"]


def median_rows(parts: list[list[dict]], key: Callable[[dict], tuple] = setting_key) -> list[dict]:
    """One row per ``key`` (setting and mode) from the rows of several bench processes: the row (with
    its floor, times and rounds) of the process whose ratio is the median (the lower of the middle
    two for an even count), and the ratios' range over the processes as ``ratio_processes``."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in parts:
        for row in rows:
            by_key.setdefault(key(row), []).append(row)
    combined = []
    for rows in by_key.values():
        ratios = [row["ratio_to_sdpa_sel_cudnn"] for row in rows]
        middle = statistics.median_low(ratios)
        chosen = dict(next(row for row in rows if row["ratio_to_sdpa_sel_cudnn"] == middle))
        if len(rows) > 1:
            chosen["ratio_processes"] = dict(low=min(ratios), high=max(ratios), processes=len(rows))
        combined.append(chosen)
    return combined


def run(out: Path, seqs: list[int], levels: list[int], timeout: float, compile_first: bool, update: bool = False,
        poolings: Sequence[int] = POOLINGS, repeats: int = 1) -> int:
    """Times the grid's (S, L) runs, at ``poolings``, into ``out``, each in ``repeats`` bench processes
    one after another (rows: ``median_rows``); 0 when every one of them was measured."""
    if out.exists() and not update:
        raise SystemExit(f"--out {out} exists: pass --update to re-measure some of its runs, or choose another file")
    runs = [(seq, level) for seq in seqs for level in levels]
    document = json.loads(out.read_text()) if out.exists() else new_document()
    names = [f"{seq // 1024}K L{level}" for seq, level in runs]
    mark_missing(document, runs, names)  # with --update, rows are kept unless measured again
    write_atomically(out, document)
    measured = 0
    if compile_first:
        compile_all(runs, poolings, timeout)
    for (seq, level), name in zip(runs, names):
        outcomes = [bench_part(BENCH + setting_args(seq, level, poolings) + timing(seq), name, timeout, grid_part)
                    for _ in range(repeats)]
        outcomes = [outcome for outcome in outcomes if outcome is not None]
        if not outcomes:
            continue
        report = outcomes[0][0]
        rows = median_rows([part_rows for _, (part_rows, _) in outcomes])
        copy = statistics.median_low([part_copy for _, (_, part_copy) in outcomes])
        document["device"] = f"{report['device']}, torch {report['torch']}"
        document["rows"] = [r for r in document["rows"]
                            if (r["seq"], r["levels"]) != (seq, level) or r["pooling"] not in poolings] + rows
        processes = f", median of {len(outcomes)} processes" if repeats > 1 else ""
        record_part(document, name, poolings, copy, f"{commit()} {datetime.date.today().isoformat()}{processes}")
        mark_missing(document, [(seq, level)], [name])
        write_atomically(out, document)
        measured += 1
        print(f"{name}: {len(rows)} rows", flush=True)
    return 0 if measured == len(runs) else 1


def record_part(document: dict, name: str, poolings: Sequence[int], copy: float, measured: str) -> None:
    """Files a run's copy bandwidth (TB/s) and where it was measured (``--update`` may come at a later
    commit than the file's) under the part it measured: ``name`` ("128K L5"), or with some pool
    factors "128K L5 p2". A run of some pool factors leaves the others' records alone; a run drops
    the records of earlier parts whose rows it measured again."""
    part = name if tuple(poolings) == POOLINGS else f"{name} p{','.join(map(str, poolings))}"

    def remeasured(key: str) -> bool:
        if key == name:
            return tuple(poolings) == POOLINGS
        if not key.startswith(f"{name} p"):
            return False
        return set(map(int, key[len(name) + 2:].split(","))) <= set(poolings)

    for record, value in (("copy_tb_per_s", copy), ("measured", measured)):
        records = document.setdefault(record, {})
        for key in [key for key in records if remeasured(key)]:
            del records[key]
        records[part] = value


def mark_missing(document: dict, runs: list[tuple[int, int]], names: list[str]) -> None:
    """Names each of ``runs`` in ``document["missing"]`` while some pool factor has no rows for it."""
    have = {(r["seq"], r["levels"], r["pooling"]) for r in document["rows"]}
    for (seq, level), name in zip(runs, names):
        complete = all((seq, level, pooling) in have for pooling in POOLINGS)
        if complete and name in document["missing"]:
            document["missing"].remove(name)
        elif not complete and name not in document["missing"]:
            document["missing"].append(name)


def shown(row: dict) -> tuple[float, float]:
    """The ratio and its floor as the table prints them: the targets are judged on these."""
    return round(row["ratio_to_sdpa_sel_cudnn"], 2), round(row["floor_ratio"], 2)


def cell(row: dict | None, mode: str, compresses: bool, dagger: bool) -> str:
    if row is None:
        return "dense" if not compresses else "n/a"
    ratio, floor = shown(row)
    text = f"{ratio:.2f} ({floor:.2f})" + ("&dagger;" if dagger else "")
    # Bold: over the target where the bytes alone would allow it, i.e. the kernels are what is missing.
    return f"**{text}**" if ratio > TARGETS[mode] and floor <= TARGETS[mode] else text


def column_labels(seqs: Sequence[int]) -> list[str]:
    """One column per mode and length: "fwd+bwd 64K", "128K", ..., "forward 64K", ..."""
    return [(f"{'fwd+bwd' if mode == 'fwd+bwd' else 'forward'} " if index == 0 else "") + f"{seq // 1024}K"
            for mode in MODES for index, seq in enumerate(seqs)]


def table(rows: list[dict], filled: set[tuple[int, int, int]]) -> str:
    by_key = {(r["seq"], r["levels"], r["pooling"], r["topk"], r["mode"]): r for r in rows}
    lines = ["| L, p, K | " + " | ".join(column_labels(SEQS)) + " |",
             "|---" * (1 + len(MODES) * len(SEQS)) + "|"]
    for level in LEVELS:
        for pooling in POOLINGS:
            for topk in TOPKS:
                cells = [cell(by_key.get((seq, level, pooling, topk, mode)), mode,
                              plan_for(seq, level, pooling, topk).compresses, (seq, level, pooling) in filled)
                         for mode in MODES for seq in SEQS]
                lines.append(f"| {level}, {pooling}, {topk} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def filled_table(rows: list[dict], older: list[dict]) -> str:
    """``table`` of ``rows``, with the (S, L, p) settings they lack taken from ``older`` and marked."""
    have = {(r["seq"], r["levels"], r["pooling"]) for r in rows}
    filling = [r for r in older if (r["seq"], r["levels"], r["pooling"]) not in have]
    return table(rows + filling, {(r["seq"], r["levels"], r["pooling"]) for r in filling})


def counts(rows: list[dict]) -> str:
    """Per mode, the rows within the target and, of the others, those whose floor is over it too. The
    table's caller passes the file's own rows only (not those ``--fill`` adds)."""
    lines = []
    for mode in MODES:
        of_mode = [r for r in rows if r["mode"] == mode]
        target = TARGETS[mode]
        within = sum(shown(r)[0] <= target for r in of_mode)
        bytes_bound = sum(shown(r)[0] > target and shown(r)[1] > target for r in of_mode)
        excess = statistics.median(r["ratio_to_sdpa_sel_cudnn"] - r["floor_ratio"] for r in of_mode)
        lines.append(f"{mode}: {len(of_mode)} rows, {within} within {target:.2f}x; of the {len(of_mode) - within} others "
                     f"{bytes_bound} have a floor above it, {len(of_mode) - within - bytes_bound} do not; "
                     f"median measured minus floor {excess:+.3f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="time the grid on the GPU")
    run_parser.add_argument("--out", type=Path, required=True, help="the grid's JSON (rewritten after each (S, L))")
    run_parser.add_argument("--seq", type=int, nargs="+", default=list(SEQS), choices=SEQS)
    run_parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), choices=LEVELS)
    run_parser.add_argument("--pooling", type=int, nargs="+", default=list(POOLINGS), choices=POOLINGS,
                            help="measure only these pool factors (an (S, L) stays missing until each has rows)")
    run_parser.add_argument("--update", action="store_true", help="re-measure these (S, L) runs in an existing --out")
    run_parser.add_argument("--timeout", type=float, default=240.0, help="seconds per (S, L) run, compiling or timed")
    run_parser.add_argument("--repeats", type=int, default=1,
                            help="bench processes per (S, L), one after another; each row is the median process's")
    run_parser.add_argument("--no-compile-first", dest="compile_first", action="store_false",
                            help="skip the parallel compile pass (Triton's cache already holds the kernels)")
    table_parser = commands.add_parser("table", help="the README's table from a grid JSON")
    table_parser.add_argument("grid", type=Path)
    table_parser.add_argument("--fill", type=Path, help="an older grid JSON for the (S, L) runs missing from GRID")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        if not torch.cuda.is_available():
            parser.error("run needs a CUDA GPU (the bench times the Triton kernels)")
        return run(args.out, args.seq, args.levels, args.timeout, args.compile_first, args.update, args.pooling,
                   args.repeats)
    document = json.loads(args.grid.read_text())
    older = [] if args.fill is None else json.loads(args.fill.read_text())["rows"]
    print(filled_table(document["rows"], older) + "\n" + counts(document["rows"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
