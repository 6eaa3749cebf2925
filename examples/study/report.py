"""Plots, table and goal check from the three arms' JSON files of study.py.

    python examples/study/report.py --results examples/study/results

Writes into the results folder: ``loss_vs_gpu_time.png``, ``loss_vs_tokens.png`` (held-out loss
with dense attention; arm 3 also with Lighthouse, dashed), ``results.md`` (the table) and
``summary.json`` (the goal: GPU time arm 2 needs to reach arm 1's final held-out loss, read off
its evaluation curve by linear interpolation, over arm 1's GPU time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "dense": "1: dense",
    "recovery": "2: Lighthouse + dense recovery",
    "lighthouse": "3: Lighthouse only",
}
COLORS = {"dense": "tab:gray", "recovery": "tab:blue", "lighthouse": "tab:orange"}


def time_to_reach(evals: list[dict], target: float, key: str = "loss") -> float | None:
    """GPU seconds at which the curve first reaches ``target`` (linear between evaluations)."""
    for before, after in zip(evals, evals[1:]):
        if after[key] <= target:
            if before[key] <= target:
                return before["gpu_seconds"]
            share = (before[key] - target) / (before[key] - after[key])
            return before["gpu_seconds"] + share * (after["gpu_seconds"] - before["gpu_seconds"])
    return None


def goal(arms: dict[str, dict]) -> dict:
    dense, recovery = arms["dense"], arms["recovery"]
    dense_time = dense["evals"][-1]["gpu_seconds"]
    dense_loss = dense["evals"][-1]["loss"]
    recovery_loss = recovery["evals"][-1]["loss"]
    reached = time_to_reach(recovery["evals"], dense_loss)
    dense_reached = time_to_reach(dense["evals"], recovery_loss)
    dense_retrieval = dense["final"]["retrieval"]["exact_match"]
    recovery_retrieval = recovery["final"]["retrieval"]["exact_match"]
    ratio = reached / dense_time if reached is not None else None
    return dict(
        dense_final_loss=dense_loss,
        dense_gpu_seconds=dense_time,
        recovery_final_loss=recovery_loss,
        recovery_gpu_seconds=recovery["evals"][-1]["gpu_seconds"],
        recovery_seconds_to_dense_loss=reached,
        time_ratio=ratio,
        loss_gap=recovery_loss - dense_loss,
        # When arm 2 never gets there: how far into its own run arm 1 was at arm 2's final loss.
        dense_seconds_to_recovery_loss=dense_reached,
        retrieval=dict(dense=dense_retrieval, recovery=recovery_retrieval),
        met=ratio is not None and ratio <= 0.7 and recovery_retrieval >= dense_retrieval,
    )


def plot(arms: dict[str, dict], x_key: str, x_label: str, scale: float, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for arm, record in arms.items():
        evals = record["evals"][1:]  # step 0 (about ln(vocab)) would flatten the interesting part
        xs = [e[x_key] / scale for e in evals]
        axis.plot(xs, [e["loss"] for e in evals], ".-", color=COLORS[arm], label=LABELS[arm] + " (dense eval)")
        if arm == "lighthouse":
            axis.plot(xs, [e["loss_lighthouse"] for e in evals], ".--", color=COLORS[arm], label=LABELS[arm] + " (Lighthouse eval: sees later tokens)")
        if record.get("recovery_step"):
            switch = next(e for e in evals if e["step"] == record["recovery_step"])
            axis.axvline(switch[x_key] / scale, color=COLORS[arm], linestyle=":", linewidth=1)
    dense_final = arms["dense"]["evals"][-1]["loss"]
    axis.axhline(dense_final, color=COLORS["dense"], linestyle=":", linewidth=1)
    axis.set_xlabel(x_label)
    axis.set_ylabel("held-out loss (nats/token)")
    axis.set_title("held-out books, dense attention at the training length", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _rate(record: dict, phase: str) -> str:
    summary = record["phases"].get(phase)
    return f"{summary['tokens_per_s'] / 1000:,.0f}K" if summary else "–"


def _buckets(final: dict) -> str:
    buckets = final["by_position"]
    return f"{buckets[0]['loss']:.3f} / {buckets[-1]['loss']:.3f}"


def _retrieval(final: dict) -> str:
    retrieval = final["retrieval"]
    return f"{retrieval['exact_match']:.2f} ({retrieval['digit_accuracy']:.2f})"


def _copy(final: dict) -> str:
    copy = final["copy"]
    return f"{copy['accuracy']:.2f} ({copy['control_accuracy']:.2f})"


def table(arms: dict[str, dict]) -> str:
    documents = list(arms["dense"]["final"]["by_document"])
    short = [name.split("/")[-1].removesuffix("_gut") for name in documents]
    head = (
        "| arm | GPU time (s) | tokens/s Lighthouse / dense | held-out loss | "
        + " | ".join(short)
        + " | loss first 1K / last 8K | pass key exact (digits) | copy accuracy (control) | eval time (s) |"
    )
    lines = [head, "|" + "---|" * (8 + len(short))]

    def row(label: str, record: dict, final: dict, gpu: str, rates: str, eval_time: str) -> str:
        per_doc = " | ".join(f"{final['by_document'][d]:.3f}" for d in documents)
        return (
            f"| {label} | {gpu} | {rates} | {final['loss']:.3f} | {per_doc} | {_buckets(final)} | "
            f"{_retrieval(final)} | {_copy(final)} | {eval_time} |"
        )

    for arm, record in arms.items():
        gpu = f"{record['gpu_seconds']:.0f}"
        rates = f"{_rate(record, 'lighthouse')} / {_rate(record, 'dense')}"
        eval_time = f"{record['eval_seconds'] + record['final_eval_seconds']:.0f}"
        lines.append(row(LABELS[arm] + (", dense eval" if arm == "lighthouse" else ""), record, record["final"], gpu, rates, eval_time))
        if "final_lighthouse" in record:
            lines.append(row(LABELS[arm] + ", Lighthouse eval", record, record["final_lighthouse"], "″", "″", "″"))
    return "\n".join(lines) + "\n"


def diagnostics(arms: dict[str, dict]) -> str:
    """Copy accuracy by depth, and the future-blind check: the loss at the same positions with and
    without the tokens after them."""
    finals = [(LABELS[arm] + (", dense eval" if "final_lighthouse" in r else ""), r["final"]) for arm, r in arms.items()]
    finals += [(LABELS[arm] + ", Lighthouse eval", r["final_lighthouse"]) for arm, r in arms.items() if "final_lighthouse" in r]
    bins = len(finals[0][1]["copy"]["by_depth"])
    lines = [
        f"| evaluation | copy accuracy by depth of the first copy ({bins} bins, shallow ... deep) "
        "| loss at sampled positions: full / future cut off |",
        "|---|---|---|",
    ]
    for label, final in finals:
        by_depth = " ".join(f"{b['accuracy']:.2f}" for b in final["copy"]["by_depth"])
        blind = final["future_blind"]
        lines.append(f"| {label} | {by_depth} | {blind['loss_full']:.3f} / {blind['loss_blind']:.3f} |")
    return "\n".join(lines) + "\n"


def describe_goal(result: dict) -> str:
    if result["time_ratio"] is not None:
        reached = (
            f"Arm 2 reached arm 1's final held-out loss ({result['dense_final_loss']:.3f}) after "
            f"{result['recovery_seconds_to_dense_loss']:.0f} s of GPU time, {result['time_ratio']:.2f}x arm 1's "
            f"{result['dense_gpu_seconds']:.0f} s."
        )
    else:
        at = result["dense_seconds_to_recovery_loss"]
        where = f"; arm 1 was at that loss after {at:.0f} s ({at / result['dense_gpu_seconds']:.2f}x of its run)" if at else ""
        reached = (
            f"Arm 2 did not reach arm 1's final held-out loss ({result['dense_final_loss']:.3f}): it ended "
            f"{result['loss_gap']:+.3f} above it at {result['recovery_final_loss']:.3f} after "
            f"{result['recovery_gpu_seconds']:.0f} s ({result['recovery_gpu_seconds'] / result['dense_gpu_seconds']:.2f}x arm 1's "
            f"{result['dense_gpu_seconds']:.0f} s){where}."
        )
    retrieval = result["retrieval"]
    verdict = "met" if result["met"] else "not met"
    return (
        f"{reached} Pass-key exact match: arm 2 {retrieval['recovery']:.2f}, arm 1 {retrieval['dense']:.2f}. "
        f"Goal (<= 0.7x and retrieval >= arm 1): {verdict}.\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="folder holding dense.json, recovery.json, lighthouse.json")
    args = parser.parse_args(argv)
    arms = {arm: json.loads((args.results / f"{arm}.json").read_text()) for arm in LABELS}
    plot(arms, "gpu_seconds", "GPU time of training steps (s)", 1.0, args.results / "loss_vs_gpu_time.png")
    plot(arms, "tokens", "training tokens (millions)", 1e6, args.results / "loss_vs_tokens.png")
    result = goal(arms)
    (args.results / "results.md").write_text(table(arms) + "\n" + describe_goal(result) + "\n" + diagnostics(arms))
    summary = dict(goal=result, arms={arm: dict(gpu_seconds=r["gpu_seconds"], phases=r["phases"]) for arm, r in arms.items()})
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(arms) + "\n" + describe_goal(result) + "\n" + diagnostics(arms))
    return summary


if __name__ == "__main__":
    main()
