"""``lighthouse-hf export``'s run: the export, its warnings and exit codes (the parser is in cli.py)."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import ExportError, ExportWarning, VerificationError, export_checkpoint

PREFIX = "lighthouse-hf export"


def run(args: argparse.Namespace) -> int:
    """Exit code 0: exported; 1: verification failed (nothing written); 2: bad input (nothing written)."""
    show_warning = warnings.showwarning

    def show_export_warnings_plainly(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ExportWarning):
            print(f"{PREFIX}: warning: {message}", file=sys.stderr, flush=True)
        else:
            show_warning(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show_export_warnings_plainly
        try:
            report = export_checkpoint(
                args.src,
                args.dst,
                adapter=args.adapter,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                verify=args.verify,
                allow_unrecovered=args.allow_unrecovered,
                overwrite=args.overwrite,
            )
        except ExportError as error:
            print(f"{PREFIX}: error: {error}", file=sys.stderr)
            return 2
        except VerificationError as error:
            print(f"{PREFIX}: verification failed, nothing written: {error}", file=sys.stderr)
            return 1
    print(report)
    return 0
