"""Summary, verdict and plots of the decisive study's runs (``tracks.py``), one track at a time.

    python examples/study/report_tracks.py --results examples/study/results/scratch

Reads every ``<arm>[-<variant>]-seed<N>.json`` there and writes ``summary.json``, ``results.md``,
``long_loss_vs_gpu_time.png``, ``loss_by_position.png`` and ``probes_by_depth.png``. Every arm is
compared with the dense arm on the seeds both have (same initialization, same data order): the
difference of the final held-out loss on the long positions, with a 95% paired bootstrap interval
that resamples held-out windows (the same windows for both arms, seeds pooled), and the GPU time
the arm needed against dense's, and dense's own long-position loss when it had spent the arm's GPU
time (read off its evaluation curve: still at its stable learning rate there, not decayed, so a
reference, not a verdict). ``PLAN.md`` fixed the verdict's rule before any run; a verdict on fewer
seeds than the plan's ``PLANNED_SEEDS`` is marked provisional.

A dense run of a variant no Lighthouse arm has (``dense-steps134``: dense on its own schedule for
the Lighthouse arms' GPU time; ``dense-recovery0.9-steps61``: dense for the recovery's steps only)
is a control outside the rule: every Lighthouse arm, of any schedule, is compared with it the same
way (``controls`` in the summary, a table of its own; a control's GPU time picks which arm it
matches), and it has no verdict.

``against_published`` compares each option arm of the default schedule with published the same
way (what the option buys: the evidence for the settings' defaults). ``lighthouse_phase`` says
what each Lighthouse arm's Lighthouse steps did: its long-position loss
with dense and with Lighthouse attention at the start and at the switch, against dense's own at
that step, and the leak check's loss by offset in a block. ``switch_cost`` is each switch's cost
in training loss: the arm's against dense's on the same steps (same data) for the
``SWITCH_STEPS`` steps after the switch to Lighthouse (the first steps) and for those before and
after the switch to dense.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from tracks import ARMS

GPU_TIME_GOAL = 0.75
PLANNED_SEEDS = 3  # for dense, published and the best arm (PLAN.md)
BOOTSTRAP_SAMPLES = 10_000
RUN_NAME = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)\.json$")
SWITCH_STEPS = 50
LONG_FROM = {"scratch": lambda seq_len: seq_len // 2, "extend": lambda seq_len: min(8192, seq_len // 8)}
"""Each track's first long position (``scratch.py``, ``extend.py``), for runs that did not record it."""
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t, 97.5% quantile, by degrees of freedom: the interval over seeds."""
ONE_SEED_NOTE = (
    "\n¹ One seed: the interval holds the spread between held-out windows only. The windows overlap and "
    "come from 3 books, and the spread between seeds of a paired difference is several times larger "
    "(the `over seeds` column, where there are seeds to measure it).\n"
)


def long_from(record: dict) -> int:
    return record.get("long_from") or LONG_FROM[record["track"]](record["settings"]["seq_len"])


def load_runs(folder: Path) -> dict[str, dict[int, dict]]:
    """``{arm (with its variant): {seed: record}}``."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(folder.glob("*-seed*.json")):
        match = RUN_NAME.match(path.name)
        record = json.loads(path.read_text())
        if match and "final" in record:  # a run cut short has no final evaluation
            runs[match["arm"]][int(match["seed"])] = record
    if not any(is_dense(name) for name in runs):
        raise ValueError(f"no finished dense run in {folder}: every arm is compared with dense")
    return dict(runs)


def long_loss(entry: dict, first: int) -> float:
    """Mean loss of the predicted tokens from position ``first`` on, from the position buckets (each
    window has the same positions, so weighting by bucket width is exact)."""
    buckets = [b for b in entry["by_position"] if b["first"] >= first]
    widths = np.array([b["last"] - b["first"] + 1 for b in buckets], dtype=float)
    return float(np.dot(widths, [b["loss"] for b in buckets]) / widths.sum())


def short_loss(entry: dict, first: int) -> float:
    """Mean loss of the predicted tokens before position ``first`` (what ``long_loss`` leaves out)."""
    buckets = [b for b in entry["by_position"] if b["last"] < first]
    widths = np.array([b["last"] - b["first"] + 1 for b in buckets], dtype=float)
    return float(np.dot(widths, [b["loss"] for b in buckets]) / widths.sum())


def long_loss_curve(record: dict) -> list[tuple[float, float]]:
    """(GPU seconds, long-position loss) at each of the run's evaluations."""
    return [(e["gpu_seconds"], long_loss(e, long_from(record))) for e in record["evals"]]


def time_to_reach(record: dict, target: float) -> float | None:
    """GPU seconds at which the run's long-position loss first reaches ``target`` (linear between
    evaluations), or None when it never does."""
    curve = long_loss_curve(record)
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 if l0 <= target else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def loss_at(record: dict, seconds: float) -> float:
    """The run's long-position loss after ``seconds`` of GPU time (linear between evaluations)."""
    times, losses = zip(*long_loss_curve(record))
    return float(np.interp(seconds, times, losses))


def paired_interval(arm: dict[int, dict], dense: dict[int, dict], seeds: list[int], seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of the mean difference (arm - dense) of the final long-position loss,
    paired by seed and window: each draw resamples the seeds, then the windows (the same windows
    for both arms of a seed), so the spread between seeds widens it as much as the text does.
    With one seed only the windows vary. None when a run predates per-window records."""
    try:
        differences = np.array([np.subtract(arm[s]["final"]["by_window_long"], dense[s]["final"]["by_window_long"]) for s in seeds])
    except KeyError:
        return None
    rng = np.random.default_rng(seed)
    count, windows = differences.shape
    seed_draws = rng.integers(0, count, size=(BOOTSTRAP_SAMPLES, count))
    window_draws = rng.integers(0, windows, size=(BOOTSTRAP_SAMPLES, count, windows))
    means = differences[seed_draws[:, :, None], window_draws].mean(axis=(1, 2))
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def interval_over_seeds(differences: list[float]) -> list[float] | None:
    """95% t interval of the mean of per-seed differences (None below two seeds): the seeds, not the
    windows, are the independent repeats; three of them make it wide, as it should be."""
    count = len(differences)
    if count < 2:
        return None
    half = T_975[count - 1] * float(np.std(differences, ddof=1)) / np.sqrt(count)
    mean = float(np.mean(differences))
    return [mean - half, mean + half]


def probe_scores(record: dict) -> dict[str, list[float]]:
    final = record["final"]
    return {probe: [b["score"] for b in final[probe]["by_depth"]] for probe in ("passkey", "copy")}


def variant(arm: str) -> str:
    """The schedule variant of a run name's arm: ``published-constant`` -> ``constant``, ``all`` -> ``""``."""
    base = next(a for a in sorted(ARMS, key=len, reverse=True) if arm == a or arm.startswith(a + "-"))
    return arm[len(base) + 1 :]


def probe_signal(name: str, seeds: dict[int, dict]) -> dict:
    """Whether the probes measure long-range use at all: pass key above zero, or copy accuracy
    above its control (the same passage scored without its earlier occurrence)."""
    finals = [seeds[s]["final"] for s in sorted(seeds)]
    return dict(
        arm=name,
        seeds=sorted(seeds),
        passkey=float(np.mean([f["passkey"]["exact_match"] for f in finals])),
        copy=float(np.mean([f["copy"]["accuracy"] for f in finals])),
        copy_control=float(np.mean([f["copy"]["control_accuracy"] for f in finals])),
    )


def probe_table(signals: list[dict]) -> str:
    lines = ["| arm | seeds | pass key | copy | copy without its source |", "|---|---|---|---|---|"]
    lines += [f"| {p['arm']} | {len(p['seeds'])} | {p['passkey']:.2f} | {p['copy']:.3f} | {p['copy_control']:.3f} |"
              for p in signals]
    return "\n".join(lines) + "\n"


def is_dense(arm: str) -> bool:
    return arm == "dense" or arm.startswith("dense-")


def baseline(arm: str) -> str:
    """The dense run an arm is compared with: the one of the same schedule variant."""
    return "-".join(filter(None, ["dense", variant(arm)]))


def compare(name: str, arm: dict[int, dict], dense: dict[int, dict]) -> dict:
    seeds = sorted(set(arm) & set(dense))
    if not seeds:
        return dict(arm=name, seeds=[], note="no seed shared with the dense arm")
    first = long_from(dense[seeds[0]])
    final = {s: long_loss(arm[s]["final"], first) for s in seeds}
    dense_final = {s: long_loss(dense[s]["final"], first) for s in seeds}
    differences = {s: final[s] - dense_final[s] for s in seeds}
    reached = {s: time_to_reach(arm[s], dense_final[s]) for s in seeds}
    dense_seconds = float(np.mean([dense[s]["gpu_seconds"] for s in seeds]))
    # Probes: the arm's accuracy at each depth against dense's minus the spread of dense's seeds.
    dense_probes = [probe_scores(dense[s]) for s in sorted(dense)]
    arm_probes = [probe_scores(arm[s]) for s in seeds]
    probes_below = []
    for probe in ("passkey", "copy"):
        dense_by_depth = np.array([p[probe] for p in dense_probes])
        floor = dense_by_depth.mean(0) - (dense_by_depth.max(0) - dense_by_depth.min(0))
        scores = np.mean([p[probe] for p in arm_probes], axis=0)
        probes_below += [f"{probe} at depth bin {b}: {scores[b]:.3f} < {floor[b]:.3f}"
                         for b in np.flatnonzero(scores < floor - 1e-12)]
    return dict(
        arm=name,
        seeds=seeds,
        final_long_loss=float(np.mean(list(final.values()))),
        dense_final_long_loss=float(np.mean(list(dense_final.values()))),
        difference_by_seed=differences,
        difference=float(np.mean(list(differences.values()))),
        interval=paired_interval(arm, dense, seeds),
        interval_over_seeds=interval_over_seeds(list(differences.values())),
        gpu_seconds=float(np.mean([arm[s]["gpu_seconds"] for s in seeds])),
        dense_gpu_seconds=dense_seconds,
        gpu_time_ratio=float(np.mean([arm[s]["gpu_seconds"] for s in seeds])) / dense_seconds,
        dense_long_loss_at_same_gpu_time=float(np.mean([loss_at(dense[s], arm[s]["gpu_seconds"]) for s in seeds])),
        seconds_to_dense_final_by_seed=reached,
        probes_ok=not probes_below,
        probes_below=probes_below,
    )


def verdict(comparisons: list[dict]) -> dict:
    """``PLAN.md``'s rule, over the Lighthouse arms of one schedule. Confirmed: an arm with its full
    GPU time at most 0.75x dense's whose interval is not wholly above zero (not worse) and whose
    probes hold. Refuted: every arm worse with the interval above zero, or below dense's probes
    (an arm's final loss comes at its own, shorter, GPU time: the runs do not go on to dense's).
    Otherwise inconclusive; also when an interval is missing. ``provisional`` while no arm has
    ``PLANNED_SEEDS`` seeds shared with dense: with one seed the interval holds only the windows'
    spread, not the seeds'."""
    judged = [c for c in comparisons if not is_dense(c["arm"]) and c.get("seeds")]
    if not judged:
        return dict(outcome="inconclusive", reason="no Lighthouse arm shares a seed with dense")
    if any(c["interval"] is None for c in judged):
        return dict(outcome="inconclusive", reason="some runs predate per-window records: no paired interval")
    seeds = max(len(c["seeds"]) for c in judged)
    planned = dict(provisional=seeds < PLANNED_SEEDS, seeds=seeds)
    # Not worse: the interval below zero (better) or containing it (equal), i.e. its lower end <= 0.
    confirming = [c["arm"] for c in judged if c["gpu_time_ratio"] <= GPU_TIME_GOAL and c["interval"][0] <= 0 and c["probes_ok"]]
    if confirming:
        return dict(outcome="confirmed", arms=confirming, **planned)
    if all(c["interval"][0] > 0 or not c["probes_ok"] for c in judged):
        why = {c["arm"]: ([f"worse: interval {c['interval'][0]:+.3f} to {c['interval'][1]:+.3f}"] if c["interval"][0] > 0 else [])
               + c["probes_below"] for c in judged}
        return dict(outcome="refuted", arms=[c["arm"] for c in judged], why=why, **planned)
    return dict(outcome="inconclusive", reason="no arm meets the rule and not every arm is worse", **planned)


def plot(runs: dict[str, dict[int, dict]], comparisons: list[dict], folder: Path) -> None:
    """The plots; on the loss curves, each arm's final loss against its dense run as the dense
    run's final loss plus the paired difference, with its 95% interval, at the arm's GPU time."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # tab20 holds each hue dark then light: the dark ten first, so that neighbours differ in hue
    tab20 = plt.get_cmap("tab20").colors
    palette = itertools.cycle(tab20[::2] + tab20[1::2])
    colors = dict(zip(sorted(set(runs) - {"dense"}), palette), dense="black")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, seeds in sorted(runs.items()):
        for seed, record in sorted(seeds.items()):
            curve = long_loss_curve(record)[1:]
            axis.plot(*zip(*curve), color=colors[name], alpha=0.8, label=name if seed == min(seeds) else None)
    for c in comparisons:
        if c.get("seeds") and c["interval"] is not None and not is_dense(c["arm"]):
            center = c["dense_final_long_loss"] + c["difference"]
            low, high = (c["dense_final_long_loss"] + end for end in c["interval"])
            axis.errorbar([c["gpu_seconds"]], [center], yerr=[[center - low], [high - center]], fmt="o",
                          color=colors[c["arm"]], capsize=4)
    axis.set(xlabel="GPU seconds (optimizer steps); points: final loss, 95% paired interval vs dense",
             ylabel="held-out loss, long positions (dense attention)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "long_loss_vs_gpu_time.png", dpi=120)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, seeds in sorted(runs.items()):
        buckets = [r["final"]["by_position"] for r in seeds.values()]
        labels = [f"{b['first']}-{b['last'] + 1}" for b in buckets[0]]
        axis.plot(labels, np.mean([[b["loss"] for b in bs] for bs in buckets], axis=0), "o-", color=colors[name], label=name)
    axis.set(xlabel="predicted token's position", ylabel="final held-out loss (mean over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss_by_position.png", dpi=120)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, probe in zip(axes, ("passkey", "copy")):
        for name, seeds in sorted(runs.items()):
            scores = np.mean([probe_scores(r)[probe] for r in seeds.values()], axis=0)
            axis.plot(range(len(scores)), scores, "o-", color=colors[name], label=name)
        axis.set(title=probe, xlabel="depth bin (0: first eighth of the text)", ylabel="accuracy")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(folder / "probes_by_depth.png", dpi=120)
    plt.close("all")


def lighthouse_phase(name: str, arm: dict[int, dict], dense: dict[int, dict]) -> dict:
    """What the Lighthouse phase did, mean over the arm's seeds: the long-position loss with dense
    attention and with Lighthouse attention at the start and at the switch (the last Lighthouse
    step), dense's own loss at the switch's step (same seeds), the same with dense attention for
    the positions before the long ones (``short_...``), and the Lighthouse loss at the
    switch by offset inside a pooling block (the leak check). The start's Lighthouse loss is the
    same model on the same windows whatever the seed, so it is the mean over the seeds that measured
    it (runs before the check did not); any other value some seed did not record is None."""
    rows = []
    for seed, record in sorted(arm.items()):
        first = long_from(record)
        at = {e["step"]: e for e in record["evals"]}
        start, switch = record["evals"][0], at.get(record.get("recovery_step"))
        if switch is None or switch.get("phase") != "lighthouse":
            continue
        dense_at = {e["step"]: e for e in dense[seed]["evals"]} if seed in dense else {}
        rows.append(dict(
            dense_attention=(long_loss(start, first), long_loss(switch, first)),
            short_dense_attention=(short_loss(start, first), short_loss(switch, first)),
            lighthouse_attention=tuple(long_loss(e["lighthouse"], first) if "lighthouse" in e else None for e in (start, switch)),
            dense_arm_at_switch=long_loss(dense_at[switch["step"]], first) if switch["step"] in dense_at else None,
            short_dense_arm_at_switch=short_loss(dense_at[switch["step"]], first) if switch["step"] in dense_at else None,
            by_offset_at_switch=switch["lighthouse"]["by_offset"] if "lighthouse" in switch else None,
        ))

    def mean(values):
        return None if not values or any(v is None for v in values) else float(np.mean(values, axis=0))

    def pair(key):
        return [mean([row[key][i] for row in rows]) for i in (0, 1)]

    measured_start = [row["lighthouse_attention"][0] for row in rows if row["lighthouse_attention"][0] is not None]

    by_offset = [row["by_offset_at_switch"] for row in rows]
    return dict(
        arm=name,
        seeds=len(rows),
        dense_attention=pair("dense_attention") if rows else None,
        short_dense_attention=pair("short_dense_attention") if rows else None,
        short_dense_arm_at_switch=mean([row["short_dense_arm_at_switch"] for row in rows]),
        lighthouse_attention=[mean(measured_start), mean([row["lighthouse_attention"][1] for row in rows])] if rows else None,
        lighthouse_start_seeds=len(measured_start),
        dense_arm_at_switch=mean([row["dense_arm_at_switch"] for row in rows]),
        by_offset_at_switch=None if not rows or None in by_offset else np.mean(by_offset, axis=0).tolist(),
    )


def switch_cost(name: str, arm: dict[int, dict], dense: dict[int, dict], steps: int = SWITCH_STEPS) -> dict:
    """Mean training loss of the arm minus dense's over the same steps (the same batches), mean over
    the seeds both have: the first ``steps`` steps (after the switch to Lighthouse), and the
    ``steps`` before and after the switch to dense (fewer where the phase is shorter). A window no
    seed has, or only some seeds have, is None."""
    seeds = [s for s in sorted(set(arm) & set(dense)) if arm[s].get("recovery_step") is not None]
    windows = defaultdict(list)
    for seed in seeds:
        switch = arm[seed]["recovery_step"]
        losses = {row["step"]: row["loss"] for row in arm[seed]["steps"]}
        dense_losses = {row["step"]: row["loss"] for row in dense[seed]["steps"]}
        ranges = dict(to_lighthouse=range(1, min(steps, switch) + 1),
                      before_dense=range(max(1, switch - steps + 1), switch + 1),
                      to_dense=range(switch + 1, switch + steps + 1))
        for key, window in ranges.items():
            shared = [s for s in window if s in losses and s in dense_losses]
            if shared:
                windows[key].append(float(np.mean([losses[s] - dense_losses[s] for s in shared])))
    return dict(arm=name, seeds=len(seeds), steps=steps,
                **{key: float(np.mean(windows[key])) if seeds and len(windows[key]) == len(seeds) else None
                   for key in ("to_lighthouse", "before_dense", "to_dense")})


def switch_table(costs: list[dict]) -> str:
    def value(x):
        return "n/a" if x is None else f"{x:+.3f}"

    steps = costs[0]["steps"] if costs else SWITCH_STEPS
    lines = [
        f"| arm | seeds | first {steps} steps (Lighthouse) | last {steps} Lighthouse steps | first {steps} dense steps |",
        "|---|---|---|---|---|",
    ]
    for c in costs:
        if c["seeds"]:
            lines.append(f"| {c['arm']} | {c['seeds']} | {value(c['to_lighthouse'])} | {value(c['before_dense'])} | {value(c['to_dense'])} |")
    return "\n".join(lines) + "\n"


def phase_table(phases: list[dict]) -> str:
    def value(x):
        return "n/a" if x is None else f"{x:.3f}"

    def start_seeds(p):
        measured = p["lighthouse_start_seeds"]
        return f" ({measured} of {p['seeds']} seeds)" if 0 < measured < p["seeds"] else ""

    lines = [
        "| arm | seeds | dense attention: start -> switch | dense arm at the switch | Lighthouse attention: start -> switch | Lighthouse loss at the switch by offset in a block (all positions) | short positions, dense attention: start -> switch (dense arm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        if not p["seeds"]:
            continue
        offsets = "n/a" if p["by_offset_at_switch"] is None else " / ".join(f"{x:.3f}" for x in p["by_offset_at_switch"])
        lines.append(
            f"| {p['arm']} | {p['seeds']} | {value(p['dense_attention'][0])} -> {value(p['dense_attention'][1])} | "
            f"{value(p['dense_arm_at_switch'])} | {value(p['lighthouse_attention'][0])}{start_seeds(p)} -> "
            f"{value(p['lighthouse_attention'][1])} | {offsets} | {value(p['short_dense_attention'][0])} -> "
            f"{value(p['short_dense_attention'][1])} ({value(p['short_dense_arm_at_switch'])}) |"
        )
    return "\n".join(lines) + "\n"


def table(comparisons: list[dict], against: str = "dense") -> str:
    lines = [
        f"| arm | seeds | final long loss | vs {against} (95% paired bootstrap) | over seeds (95% t) | GPU s | "
        f"x {against} | {against} at that GPU time | probes hold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    one_seed = False
    for c in comparisons:
        if not c.get("seeds"):
            continue
        interval = "n/a" if c["interval"] is None else f"[{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]"
        if c["interval"] is not None and len(c["seeds"]) == 1:
            interval, one_seed = interval + "¹", True
        over_seeds = c.get("interval_over_seeds")
        over_seeds = "n/a" if over_seeds is None else f"[{over_seeds[0]:+.3f}, {over_seeds[1]:+.3f}]"
        lines.append(
            f"| {c['arm']} | {len(c['seeds'])} | {c['final_long_loss']:.3f} | {c['difference']:+.3f} {interval} | "
            f"{over_seeds} | {c['gpu_seconds']:.0f} | {c['gpu_time_ratio']:.2f} | "
            f"{c['dense_long_loss_at_same_gpu_time']:.3f} | {'yes' if c['probes_ok'] else 'no'} |"
        )
    return "\n".join(lines) + "\n" + (ONE_SEED_NOTE if one_seed else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="one track's results folder")
    args = parser.parse_args(argv)
    runs = load_runs(args.results)
    comparisons, verdicts, controls = [], {}, {}
    default_arms = sorted(n for n in runs if variant(n) == "" and not is_dense(n))
    lighthouse_arms = sorted(n for n in runs if not is_dense(n))
    for schedule in sorted({variant(name) for name in runs}):
        names = sorted((n for n in runs if variant(n) == schedule), key=lambda n: (not is_dense(n), n))
        dense = baseline(names[0]) if names else "dense"
        if schedule and names == [dense]:  # a dense control: every Lighthouse arm against it
            controls[dense] = [compare(name, runs[name], runs[dense]) for name in lighthouse_arms]
            continue
        if dense not in runs:
            verdicts[schedule or "default"] = dict(outcome="inconclusive", reason=f"no {dense} run to compare with")
            continue
        group = [compare(name, runs[name], runs[dense]) for name in names]
        comparisons += group
        verdicts[schedule or "default"] = verdict(group)
    # What each option buys: the default schedule's option arms against published (the defaults' evidence)
    options = [compare(name, runs[name], runs["published"]) for name in default_arms if name != "published"] if "published" in runs else []
    phases = [lighthouse_phase(name, runs[name], runs.get(baseline(name), {})) for name in sorted(runs) if not is_dense(name)]
    costs = [switch_cost(name, runs[name], runs.get(baseline(name), {})) for name in sorted(runs) if not is_dense(name)]
    signals = [probe_signal(name, runs[name]) for name in sorted(runs)]
    summary = dict(comparisons=comparisons, verdict=verdicts, controls=controls, against_published=options,
                   lighthouse_phase=phases, switch_cost=costs, probe_signal=signals)
    text = table(comparisons) + "".join(f"\nVerdict ({schedule} schedule): {v}\n" for schedule, v in verdicts.items())
    text += "\nThe probes (final, mean over seeds): they measure long-range use only where the pass key is above zero or copy beats its control:\n\n" + probe_table(signals)
    if options:
        text += "\nWhat each option buys: against published on the seeds both have (outside the rule):\n\n" + table(options, against="published")
    text += "\nThe Lighthouse phase (long-position loss unless said; the switch is the last Lighthouse step):\n\n" + phase_table(phases)
    text += "\nThe switches' cost (training loss minus dense's on the same steps and batches, all positions):\n\n" + switch_table(costs)
    for control, group in controls.items():
        text += f"\nAgainst the dense control {control} (outside the rule):\n\n" + table(group, against=control)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.results / "results.md").write_text(text)
    plot(runs, comparisons, args.results)
    print(text)
    return summary


if __name__ == "__main__":
    main()
