"""The ``lighthouse-hf`` command: every subcommand's parser.

A subcommand's module is imported only when that subcommand runs, and this module imports no
torch itself: ``lighthouse-hf --help`` and ``lighthouse-hf COMMAND --help`` load only what
``import lighthouse_hf`` needs to register the attention function (torch and Transformers' modeling
code, a few seconds), never a subcommand's module or the Trainer. Each module has
``run(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path
from typing import Any, Callable

from .export.errors import ExportError
from .export.options import DEFAULT_MAX_SHARD_SIZE, DTYPE_NAMES, parse_size
from .version import __version__

DEMO_OUTPUT_DIR = Path("lighthouse-demo")


def _docstring(module_file: str) -> str:
    """A sibling module's docstring, read without importing the module (nor torch with it)."""
    return ast.get_docstring(ast.parse(Path(__file__).with_name(module_file).read_text(encoding="utf-8")))


def _option(parser: argparse.ArgumentParser, *flags: str, help: str, **kwargs: Any) -> None:
    """``add_argument`` with the default, when there is one, shown at the end of the help."""
    default = kwargs.get("default")
    if default is not None and kwargs.get("action") not in ("store_true", "store_false"):
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help = f"{help} (default: {shown})"
    parser.add_argument(*flags, help=help, **kwargs)


def _sequence_length(text: str) -> int:
    """``32768``, ``32K`` or ``32k``."""
    try:
        text = text.strip().lower()
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a sequence length looks like 32768 or 32K, got {text!r}") from None


def _positive_length(text: str) -> int:
    """A sequence length (``_sequence_length``) of at least one token."""
    length = _sequence_length(text)
    if length < 1:
        raise argparse.ArgumentTypeError(f"a length must be at least 1 token, got {text!r}")
    return length


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum``."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return check


def _shard_size(value: str) -> int:
    try:
        return parse_size(value)
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _package_choice(module: str, constant: str) -> Callable[[str], str]:
    """An argparse ``type`` accepting the values of ``module.constant``, imported only when a value is
    parsed (the package's lists of allowed settings live in modules that import torch)."""

    def check(value: str) -> str:
        allowed = getattr(importlib.import_module(module), constant)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return check


def _add_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time Lighthouse against dense SDPA and SDPA on the compressed sequence (needs CUDA)",
        description=_docstring("bench.py"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _option(parser, "--seq", type=_positive_length, nargs="+", default=[32768, 65536, 131072, 262144],
            help="sequence lengths (32K, 64k and 131072 all work)")
    _option(parser, "--batch", type=_count(1), default=1, help="batch size")
    _option(parser, "--heads", type=_count(1), default=8, help="query heads")
    _option(parser, "--kv-heads", type=_count(1), default=None, help="KV heads (default: --heads)")
    _option(parser, "--dim", type=_count(1), default=128, help="head dimension")
    _option(parser, "--levels", type=int, nargs="+", default=[3], help="Lighthouse pyramid levels")
    _option(parser, "--pooling", type=int, nargs="+", default=[4], help="Lighthouse pooling factors")
    _option(parser, "--topk", type=int, nargs="+", default=[2048], help="Lighthouse selection budgets")
    _option(parser, "--rope", type=_package_choice("lighthouse_hf.ops", "ROPES"), nargs="+", default=["pooled"],
            metavar="ROPE", help="RoPE handling of pooled q and k, as config.lighthouse['rope']: pooled (published) "
            "or span_end (q and k taken as rotated at span end, with RoPE theta 10000 over all of --dim)")
    _option(parser, "--scores", type=_package_choice("lighthouse_hf.ops.traffic", "SCORE_SOURCES"), nargs="+",
            default=["norms"], metavar="SCORES",
            help="level-0 scores: the norms of q and k (published), or given ones (random, positive, drawn with "
            "the inputs) as scores='pre_norm' passes them")
    _option(parser, "--selection", type=_package_choice("lighthouse_hf.ops", "SELECTIONS"), nargs="+",
            default=["published"], metavar="SELECTION",
            help="selection rules, as config.lighthouse['selection'] (lighthouse_hf.ops.SELECTIONS)")
    _option(parser, "--combine", type=_package_choice("lighthouse_hf.ops", "COMBINES"), nargs="+", default=["sum"],
            metavar="COMBINE", help="how a position joins its levels' outputs, as config.lighthouse['combine']: "
            "sum (published) or mean")
    _option(parser, "--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="input dtype")
    _option(parser, "--modes", nargs="+", choices=["fwd+bwd", "fwd"], default=["fwd+bwd", "fwd"], help="what to time")
    _option(parser, "--no-dense", action="store_true", help="skip dense SDPA (slow at long S)")
    _option(parser, "--deterministic", action="store_true",
            help="run Lighthouse and its own SDPA under torch.use_deterministic_algorithms(True), where "
            "PyTorch's attention backward is bitwise reproducible (the cuDNN baselines run as usual)")
    _option(parser, "--warmup", type=_count(0), default=3, help="untimed calls per variant")
    _option(parser, "--iters", type=_count(1), default=10, help="timed calls per variant")
    _option(parser, "--input-sets", type=_count(1), default=3, help="input sets rotated through")
    _option(parser, "--e2e", action="store_true",
            help="end-to-end training-step mode instead (the first value of each Lighthouse setting and option)")
    _option(parser, "--layer", action="store_true",
            help="decoder-layer mode instead: one Llama layer (hidden --heads x --dim) under sdpa and lighthouse "
            "attention, queued and from an idle GPU (the first value of each Lighthouse setting and option)")
    _option(parser, "--e2e-seq", type=_positive_length, nargs="+", default=[32768, 65536, 131072],
            help="sequence lengths of --e2e")
    _option(parser, "--e2e-layers", type=_count(1), default=30, help="layers of the --e2e model")
    _option(parser, "--e2e-steps", type=_count(1), default=3, help="timed training steps per setting")
    _option(parser, "--e2e-dense-layers", type=int, nargs="*", default=[0, 1, -2, -1],
            help="layers kept dense in the Lighthouse model (the paper's first and last two)")
    packed = parser.add_mutually_exclusive_group()
    _option(packed, "--packed", type=_positive_length, nargs="+", metavar="LENGTH",
            help="packed mode: each row (--batch) packs documents of these lengths (e.g. 64K 32K 16K 4096 4096 8192), "
            "for each Lighthouse setting and one value of each method option (--seq is not used); also runs on the CPU")
    _option(packed, "--packed-longtail", type=_positive_length, metavar="TOTAL",
            help="packed mode with rows of TOTAL tokens (e.g. 128K) of documents drawn from the long-tailed mixture "
            "described above")
    _option(parser, "--packed-seed", type=int, default=0, help="seed of --packed-longtail's first row")
    _option(parser, "--json", action="store_true", help="print one JSON document instead of tables")
    parser.set_defaults(run_module="lighthouse_hf.bench")


def _add_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny byte-level Llama on a bundled novel: Lighthouse, then dense recovery (CPU, ~1 min)",
        description=_docstring("demo.py").split("\n\n")[1],
    )
    _option(parser, "--output-dir", type=Path, default=DEMO_OUTPUT_DIR, help="where the recovered model is saved")
    _option(parser, "--seq-len", type=int, default=4096, help="context length in bytes")
    _option(parser, "--steps", type=int, default=60, help="optimizer steps in all")
    _option(parser, "--recovery", type=float, default=0.8,
            help="fraction of the steps after which dense recovery begins")
    _option(parser, "--batch-size", type=int, default=1, help="blocks per step")
    _option(parser, "--learning-rate", type=float, default=1e-2, help="peak learning rate")
    _option(parser, "--levels", type=int, default=3, help="Lighthouse pyramid levels")
    _option(parser, "--pooling", type=int, default=4, help="Lighthouse pooling factor")
    _option(parser, "--topk", type=int, default=128, help="Lighthouse selection budget")
    _option(parser, "--seed", type=int, default=0, help="random seed")
    parser.set_defaults(run_module="lighthouse_hf.demo")


def _add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a plain, verified Transformers checkpoint (no lighthouse-hf needed to load it)",
        description="Export a Lighthouse-trained model (a saved model directory, a Trainer checkpoint, or a "
        "PEFT adapter, whose base may be a directory holding one GGUF file) as a plain Transformers checkpoint "
        "in safetensors, verified in a fresh process in which lighthouse_hf cannot be imported. "
        "Exit codes: 0 done, 1 verification failed, 2 bad input.",
    )
    parser.add_argument(
        "src", metavar="SRC", help="saved model directory, Trainer checkpoint, or PEFT adapter directory"
    )
    parser.add_argument("dst", metavar="DST", help="directory to create (must be absent or empty unless --overwrite)")
    _option(parser, "--adapter", metavar="DIR", help="PEFT (LoRA) adapter directory to merge into SRC")
    _option(parser, "--dtype", choices=DTYPE_NAMES, help="cast the weights (default: keep the source dtype)")
    _option(parser, "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, type=_shard_size, metavar="SIZE",
            help="largest safetensors file, e.g. 5GB, 500MB, 2GiB")
    _option(parser, "--no-verify", dest="verify", action="store_false", help="skip verification")
    _option(parser, "--allow-unrecovered", action="store_true", help="do not warn when SRC never ran dense recovery")
    _option(parser, "--overwrite", action="store_true", help="replace a non-empty DST")
    parser.set_defaults(run_module="lighthouse_hf.export.command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighthouse-hf",
        description="Lighthouse attention for Hugging Face Transformers: training-only sparse "
        'attention registered as attn_implementation="lighthouse".',
    )
    parser.add_argument("--version", action="version", version=f"lighthouse-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_bench, _add_demo, _add_export):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return importlib.import_module(args.run_module).run(args)
