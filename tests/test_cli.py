import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import lighthouse_hf
from lighthouse_hf.cli import build_parser, main


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_version():
    # each entry point once (a process that imports torch takes ~6 s of CI's time): the console
    # script here, ``python -m lighthouse_hf`` in test_export.py::test_module_entry_point_exit_code
    version = run("lighthouse-hf", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"lighthouse-hf {lighthouse_hf.__version__}"


HEAVY_MODULES = (
    "torch", "transformers.trainer", "lighthouse_hf.bench", "lighthouse_hf.demo", "lighthouse_hf.export.source"
)


def _modules_after_parsing(argv: list[str], package_init: bool) -> set[str]:
    """The modules a fresh interpreter holds after build_parser().parse_args(argv); without
    ``package_init`` lighthouse_hf's __init__ does not run, so only cli.py's own imports count."""
    script = textwrap.dedent(
        f"""
        import contextlib, importlib.util, io, json, sys, types
        if not {package_init}:
            package = types.ModuleType("lighthouse_hf")
            package.__path__ = list(importlib.util.find_spec("lighthouse_hf").submodule_search_locations)
            sys.modules["lighthouse_hf"] = package
        from lighthouse_hf.cli import build_parser
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args({argv!r})
        print(json.dumps(sorted(sys.modules)))
        """
    )
    result = run(sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["demo", "--help"], ["bench", "--help"]])
def test_help_imports_neither_torch_nor_a_subcommand(argv):
    loaded = _modules_after_parsing(argv, package_init=False)
    assert "lighthouse_hf.cli" in loaded
    assert not loaded & set(HEAVY_MODULES)


def test_help_through_the_package_imports_only_what_registration_needs():
    # ``import lighthouse_hf`` registers the attention function, which needs torch and Transformers'
    # modeling_utils; nothing a subcommand or the training API needs may load on top of that.
    loaded = _modules_after_parsing(["--help"], package_init=True)
    assert not loaded & {"transformers.trainer", "datasets", *HEAVY_MODULES[2:]}


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_demo_help_shows_every_default(capsys):
    help_text = _help(capsys, "demo")
    assert "--output-dir OUTPUT_DIR where the recovered model is saved (default: lighthouse-demo)" in help_text
    defaults = vars(build_parser().parse_args(["demo"]))
    shown = {name: value for name, value in defaults.items() if name not in ("command", "run_module")}
    assert len(shown) == 10
    for name, value in shown.items():
        assert f"(default: {value})" in help_text, name


def test_export_help_shows_the_defaults(capsys):
    help_text = _help(capsys, "export")
    assert "(default: 5GB)" in help_text and "(default: keep the source dtype)" in help_text


def test_bad_sequence_length_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--seq", "lots"])
    assert exit_info.value.code == 2 and "looks like 32768 or 32K" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "--seq", "32K", "4096"]).seq == [32768, 4096]


def test_patches_live_inside_the_package():
    import lighthouse_hf.patches

    assert set(lighthouse_hf.patches.ADAPTERS) == {"llama", "qwen2", "qwen3", "qwen3_moe", "mistral"}
    assert run(sys.executable, "-I", "-c", "import patches").returncode != 0


def test_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA (tests/test_gpu_kernels.py runs the bench)")
    assert main(["bench", "--seq", "4096"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _bench_args(*flags: str):
    return build_parser().parse_args(["bench", *flags])


@pytest.mark.parametrize(
    "flag, value, message",
    [("--iters", "0", "must be a whole number >= 1, got '0'"), ("--input-sets", "0", "must be a whole number >= 1"),
     ("--batch", "-1", "must be a whole number >= 1"), ("--warmup", "-1", "must be a whole number >= 0"),
     ("--heads", "2.5", "must be a whole number >= 1, got '2.5'"), ("--seq", "0", "a length must be at least 1 token"),
     ("--e2e-layers", "0", "must be a whole number >= 1")],
)
def test_bench_counts_are_checked_when_parsed(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        _bench_args(flag, value)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: {message}" in error


@pytest.mark.parametrize(
    "flag, value, allowed",
    [("--rope", "at_end", "pooled, span_end"), ("--selection", "greedy", "published"), ("--combine", "max", "sum, mean")],
)
def test_bad_method_option_is_a_usage_error_naming_the_flag(capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        _bench_args(flag, value)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: must be one of {allowed}" in error and repr(value) in error


def test_bad_scores_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_args("--scores", "pre_norm")
    assert exit_info.value.code == 2 and "argument --scores: must be one of norms, given, got 'pre_norm'" in capsys.readouterr().err


def test_bench_method_options_take_the_packages_allowed_values():
    from lighthouse_hf.ops import COMBINES, ROPES, SELECTIONS
    from lighthouse_hf.ops.traffic import SCORE_SOURCES

    args = _bench_args("--rope", *ROPES, "--selection", *SELECTIONS, "--combine", *COMBINES, "--scores", *SCORE_SOURCES)
    assert (args.rope, args.selection, args.combine, args.scores) == (list(ROPES), list(SELECTIONS), list(COMBINES),
                                                                      list(SCORE_SOURCES))
    defaults = _bench_args()
    assert (defaults.rope, defaults.scores, defaults.selection, defaults.combine) == (["pooled"], ["norms"], ["published"], ["sum"])


@pytest.fixture
def bench_on_cpu(monkeypatch):
    """``lighthouse_hf.bench`` (``.bench``) with its timing, peak memory and copy bandwidth faked (2 ms
    a call, 1 GB, 4 TB/s); the Lighthouse step of each row really runs once, its arguments recorded
    in ``.calls``."""
    from lighthouse_hf import bench
    from lighthouse_hf.ops import lighthouse_attention

    calls = []

    def recording(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return lighthouse_attention(q, k, v, **kwargs)

    def fake_timing(steps, **_):
        steps["lighthouse"](0)
        return {name: {"ms": 2.0, "latency_ms": 3.0, "host_ms": 0.5, "round_ms": [2.0, 1.9, 2.1]} for name in steps}

    monkeypatch.setattr(bench, "lighthouse_attention", recording)
    monkeypatch.setattr(bench, "time_interleaved", fake_timing)
    monkeypatch.setattr(bench, "peak_memory", lambda fn, make_inputs: 1.0)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 4e12)
    return SimpleNamespace(bench=bench, calls=calls)


def test_bench_sweeps_method_options_into_the_op(bench_on_cpu):
    from lighthouse_hf.ops import compressed_length, plan_for
    from lighthouse_hf.ops.traffic import fused_traffic

    bench, calls = bench_on_cpu.bench, bench_on_cpu.calls
    args = _bench_args("--seq", "2048", "--heads", "4", "--kv-heads", "2", "--dim", "16", "--topk", "128",
                       "--dtype", "float32", "--modes", "fwd", "--no-dense", "--input-sets", "1",
                       "--rope", "pooled", "span_end", "--scores", "norms", "given", "--combine", "sum", "mean")
    rows = bench.operators(args, device="cpu")

    expected_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    combos = [(rope, scores, combine) for rope in ("pooled", "span_end") for scores in ("norms", "given")
              for combine in ("sum", "mean")]
    assert [(row["rope"], row["scores"], row["combine"]) for row in rows] == combos
    assert len(calls) == len(combos)
    for row, (q_shape, k_shape, kwargs) in zip(rows, calls):
        assert row["selection"] == kwargs["selection"] == "published" and row["combine"] == kwargs["combine"]
        assert row["seq_sel"] == compressed_length(2048, levels=3, pooling=4, topk=128)
        assert (kwargs["levels"], kwargs["pooling"], kwargs["topk"]) == (3, 4, 128)
        if row["rope"] == "span_end":
            torch.testing.assert_close(kwargs["rope_inv_freq"], expected_freq)
        else:
            assert kwargs["rope_inv_freq"] is None
        if row["scores"] == "given":
            assert kwargs["q_scores"].shape == q_shape[:3] and kwargs["k_scores"].shape == k_shape[:3] == (1, 2, 2048)
            assert (kwargs["q_scores"] > 0).all() and (kwargs["k_scores"] > 0).all()
        else:
            assert "q_scores" not in kwargs and "k_scores" not in kwargs
        assert row["ratio_to_sdpa_sel_cudnn"] == 1.0 and row["lighthouse"]["peak_gb"] == 1.0
        assert row["ratio_rounds"] == dict(low=1.0, high=1.0, rounds=3, coverage=0.75)
        # the floor: the forward's bytes for this row's options at the measured bandwidth, over SDPA(S_sel)'s 2 ms
        traffic = fused_traffic(plan_for(2048, 3, 4, 128), batch=1, heads=4, kv_heads=2, dim=16, dtype=torch.float32,
                                rope=row["rope"], scores=row["scores"], selection="published", combine=row["combine"])
        assert row["kernel_gb"] * 1e9 == pytest.approx(traffic.forward) and traffic.forward > 0
        assert row["floor_ratio"] == pytest.approx(1 + traffic.forward / 4e12 * 1e3 / 2.0)
    assert len({row["kernel_gb"] for row in rows}) > 1  # the options move bytes


def test_bench_floor_of_forward_and_backward_counts_both(bench_on_cpu, capsys):
    from lighthouse_hf.ops import plan_for
    from lighthouse_hf.ops.traffic import fused_traffic

    args = _bench_args("--seq", "2048", "--heads", "2", "--dim", "16", "--topk", "128", "--dtype", "float32",
                       "--modes", "fwd+bwd", "fwd", "--no-dense", "--input-sets", "1")
    both, forward = bench_on_cpu.bench.operators(args, device="cpu")
    traffic = fused_traffic(plan_for(2048, 3, 4, 128), batch=1, heads=2, kv_heads=2, dim=16, dtype=torch.float32)
    assert (both["mode"], forward["mode"]) == ("fwd+bwd", "fwd") and traffic.backward > 0
    assert both["kernel_gb"] * 1e9 == pytest.approx(traffic.forward + traffic.backward)
    assert forward["kernel_gb"] * 1e9 == pytest.approx(traffic.forward)
    assert both["copy_tb_per_s"] == 4.0 and both["floor_ms"] == pytest.approx(2.0 + both["kernel_gb"] / 4.0)
    assert "ratio 1.00x (rounds 1.00-1.00x, 75% for the median round; to own backend 1.00x;" in capsys.readouterr().out


def test_bench_skips_settings_that_do_not_compress(bench_on_cpu, capsys):
    # K=1024 at S=2048 lists more entries than positions: lighthouse_attention would run dense SDPA
    args = _bench_args("--seq", "2048", "--heads", "2", "--dim", "16", "--topk", "128", "1024", "--dtype", "float32",
                       "--modes", "fwd", "--no-dense", "--input-sets", "1")
    rows = bench_on_cpu.bench.operators(args, device="cpu")
    assert [row["topk"] for row in rows] == [128] and len(bench_on_cpu.calls) == 1
    assert "S=2048 L3 p4 K1024: does not compress (9216 entries for 2048 positions), skipped" in capsys.readouterr().err


def test_bench_e2e_rejects_given_scores(capsys):
    from lighthouse_hf import bench

    assert bench.run(_bench_args("--e2e", "--scores", "given")) == 2  # before any CUDA check
    assert "--scores given is for operator mode" in capsys.readouterr().err


def test_timing_reports_the_hosts_own_time_per_queued_call():
    # On the CPU every call is synchronous, so the host's time is the call's: at least a 3 ms sleep.
    import time

    from lighthouse_hf import bench

    calls = []
    timed = bench.time_interleaved({"sleep": lambda i: (calls.append(i), time.sleep(0.003))}, warmup=1, iters=4,
                                   input_sets=2, device="cpu")["sleep"]
    assert calls == [0] + [0, 1, 0] * 2  # a warm-up call, then per round one call from idle and two queued
    assert timed["host_ms"] >= 3.0 and timed["ms"] >= 3.0 and timed["latency_ms"] >= 3.0
    assert len(timed["round_ms"]) == 2 and min(timed["round_ms"]) >= 3.0


def test_ratio_range_over_rounds_pairs_the_rounds():
    from lighthouse_hf import bench

    spread = bench.ratio_over_rounds([2.2, 1.8, 2.0, 3.0], [2.0, 2.0, 1.6, 3.0])
    assert spread == dict(low=0.9, high=1.25, rounds=4, coverage=0.875)  # round by round, not min over max
    assert bench.ratio_over_rounds([2.0], [1.0]) is None  # one round: no range
    with pytest.raises(ValueError, match="round counts differ: 2 and 3"):
        bench.ratio_over_rounds([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bench_layer_mode_times_an_sdpa_and_a_lighthouse_layer(lighthouse_calls):
    # On CPU with the host clock: both layers really run, every mode, and only one of them is Lighthouse.
    from lighthouse_hf import bench

    args = _bench_args("--layer", "--seq", "2048", "--heads", "2", "--dim", "16", "--topk", "128", "--dtype", "float32",
                       "--warmup", "1", "--iters", "2", "--input-sets", "2", "--combine", "mean")
    rows = bench.decoder_layers(args, device="cpu")
    assert [(row["seq"], row["mode"]) for row in rows] == [(2048, "fwd+bwd"), (2048, "fwd")]
    for row in rows:
        assert (row["levels"], row["pooling"], row["topk"], row["combine"]) == (3, 4, 128, "mean")
        for name in ("sdpa", "lighthouse"):
            assert row[name]["ms"] > 0 and row[name]["waited_ms"] == row[name]["latency_ms"] - row[name]["ms"]
            assert row[name]["host_ms"] > 0
    # Per mode: 1 warm-up call, then one round (2 iters over 2 input sets) of 1 call from idle + 2
    # queued; the SDPA layer's calls do not count (its model must not share the Lighthouse config).
    assert lighthouse_calls.single_device == 2 * (1 + 3)


@pytest.mark.parametrize("flags, message", [
    (["--layer", "--e2e"], "--e2e and --layer are two modes"),
    (["--layer", "--packed", "4096"], "leave out --layer"),
    (["--layer", "--scores", "given"], "the --layer Llama scores the norms"),
])
def test_bench_layer_mode_refuses_what_it_cannot_time(flags, message, capsys):
    from lighthouse_hf import bench

    assert bench.run(_bench_args(*flags)) == 2  # before any CUDA check: the same on every machine
    assert message in capsys.readouterr().err
