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
