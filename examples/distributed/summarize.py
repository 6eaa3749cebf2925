"""Collect the JSON reports of the 2-GPU run into one file and print the numbers that matter.

    python examples/distributed/summarize.py WORK_DIR RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"missing": f"{path.name}: {error}"}


def _fmt(value) -> str:
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def main(work: Path, results_path: Path) -> None:
    results = {
        "equality": _load(work / "equality" / "equality_rank0.json"),
        "trainer": {mode: _load(work / f"trainer_{mode}" / f"trainer_{mode}.json") for mode in ("ddp", "fsdp2", "cp")},
        "bench": {world: _load(work / "bench" / f"bench_world{world}.json") for world in (1, 2)},
    }
    results_path.write_text(json.dumps(results, indent=1))

    equality = results["equality"]
    print("== equality, CP=2 vs one GPU (relative error of the norm; failures: %s)" % equality.get("failures", equality))
    for key, report in equality.items():
        if isinstance(report, dict) and "passed" in report:
            shown = {k: _fmt(v) if not isinstance(v, dict) else {kk: _fmt(vv) for kk, vv in v.items()} for k, v in report.items()}
            print(f"  {key}: {shown}")
    print("== Trainer")
    for mode, report in results["trainer"].items():
        if "failures" in report:
            rank0 = report["ranks"][0]
            print(f"  {mode}: {'PASSED' if not report['failures'] else 'FAILED ' + str(report['failures'])}; "
                  f"phases {rank0['implementations']}; losses {rank0['losses']}; resumed {rank0['resumed_losses']}; "
                  f"export {rank0.get('export')}")
        else:
            print(f"  {mode}: {report}")
    print("== throughput and peak memory per GPU (small Llama, bf16 autocast, activation checkpointing)")
    for world, report in results["bench"].items():
        for entry in report.get("throughput", []):
            print(f"  GPUs={world} S={entry['seq_len']}: {entry.get('tokens_per_s')} tokens/s, step {entry.get('step_s')} s, "
                  f"peak GiB per GPU {entry.get('peak_gib_per_gpu')} {entry.get('error', '')}")
        search = report.get("search")
        if search:
            print(f"  GPUs={world} longest trained: {search.get('longest_trained')} tokens "
                  f"(GiB per 1M tokens {search.get('gib_per_million_tokens')}, capacity {search.get('capacity_gib')}; "
                  f"attempts {[(a['seq_len'], a['trained'], a['peak_gib']) for a in search.get('attempts', [])]})")
        if "missing" in report:
            print(f"  GPUs={world}: {report['missing']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
