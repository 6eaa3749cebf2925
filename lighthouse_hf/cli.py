"""The ``lighthouse-hf`` command."""

from __future__ import annotations

import argparse
import importlib

# Each module defines add_subcommand(subparsers), which sets ``run=`` (args -> exit code) as default.
_SUBCOMMAND_MODULES: tuple[str, ...] = ("bench", "demo", "export")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lighthouse-hf",
        description="Lighthouse attention for Hugging Face Transformers: training-only sparse "
        'attention registered as attn_implementation="lighthouse".',
    )
    parser.add_argument("--version", action="version", version=f"lighthouse-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(f"lighthouse_hf.{name}").add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)
