"""Writing DST: checking it can be made, staging beside it, replacing it, and recovering after a kill.

Every folder an export makes beside DST is named ``.DST.STAGE-PID-ID``, PID being the exporting
process, so a later export can tell an abandoned one (its process is gone) from one still running:

- ``export``: being written and verified; incomplete until renamed to ``verified``.
- ``verified``: complete and verified; renamed to DST next.
- ``replaced``: the previous DST, moved aside for ``verified`` to take its place; removed last.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import ExportError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)
GENERATION_CONFIG = "generation_config.json"
STAGING, VERIFIED, REPLACED = "export", "verified", "replaced"


def check_destination(dst: Path, source_dirs: list[Path], overwrite: bool) -> None:
    """Raise ExportError unless DST can be created (or, with ``overwrite``, replaced) by this export."""
    if dst.is_symlink():  # replacing DST would replace the link, not the folder it names
        raise ExportError(f"DST {dst} is a symbolic link; give the directory it points to, {dst.resolve()}")
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"DST {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ExportError(f"DST {dst} is not empty; pass --overwrite to replace it")
    existing = next(parent for parent in dst.parents if parent.exists())
    if not existing.is_dir():
        raise ExportError(f"DST {dst} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"DST {dst} cannot be created: no permission to write in {existing}")
    resolved = dst.resolve()
    for path in source_dirs:
        path = path.resolve()
        if resolved == path or resolved in path.parents or path in resolved.parents:
            raise ExportError(f"DST {dst} overlaps the source directory {path}")


def _sibling(dst: Path, stage: str, tag: str) -> Path:
    return dst.with_name(f".{dst.name}.{stage}-{tag}")


def create_staging(dst: Path) -> Path:
    """A new empty folder beside DST, owned by this process, to write the checkpoint into."""
    staged = _sibling(dst, STAGING, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # An ordinary new directory's permissions (umask applies), which DST keeps after the rename.
        staged.mkdir()
    except OSError as error:
        raise ExportError(f"DST {dst} cannot be created: {error.strerror} ({error.filename})") from None
    return staged


def replace(staged: Path, dst: Path, overwrite: bool) -> None:
    """Move the verified ``staged`` folder to DST, replacing what is there only with ``overwrite``.

    If the process is killed, DST is the old or the new checkpoint, except between the two renames
    of a replacement, where DST is absent and :func:`recover` (run by the next export to DST) renames
    the verified new checkpoint in. An exception rolls back to the old DST. Without ``overwrite``,
    DST must still be absent or empty (it was when the export began; something may have written
    there since), or this raises ExportError and DST is left as it is.
    """
    tag = staged.name.rpartition(f"{STAGING}-")[2]
    verified, displaced = _sibling(dst, VERIFIED, tag), _sibling(dst, REPLACED, tag)
    os.rename(staged, verified)
    if not overwrite:
        try:
            os.rename(verified, dst)  # onto an empty directory or none; a directory with files refuses
        except OSError as error:
            shutil.rmtree(verified, ignore_errors=True)
            raise ExportError(
                f"DST {dst} was written to during the export ({error.strerror}); pass --overwrite to replace it"
            ) from None
        return
    try:
        if dst.exists():
            os.rename(dst, displaced)
        os.rename(verified, dst)
    except BaseException:
        if displaced.exists() and not dst.exists():
            os.rename(displaced, dst)
        shutil.rmtree(verified, ignore_errors=True)
        raise
    shutil.rmtree(displaced, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(dst: Path) -> list[str]:
    """Clean up after exports to DST whose process is gone; returns what was done, one line each.

    A staging folder is removed; a verified checkpoint is renamed to DST when DST is absent (a
    replacement killed between its renames: it finishes) and removed otherwise; a displaced old DST
    is renamed back when DST is still absent, and removed otherwise. Folders of running exports
    (their PID exists on this machine) are left alone.
    """
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.({STAGING}|{VERIFIED}|{REPLACED})-((\d+)-[0-9a-f]+)")
    abandoned: dict[str, dict[str, Path]] = {}
    if dst.parent.is_dir():
        for entry in dst.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not _process_exists(int(match.group(3))):
                abandoned.setdefault(match.group(2), {})[match.group(1)] = entry
    done = []
    for tag, stages in sorted(abandoned.items()):
        pid = tag.split("-")[0]
        if STAGING in stages:
            shutil.rmtree(stages[STAGING])
            done.append(f"removed {stages[STAGING]}, left by an export (process {pid}) killed while writing")
        # The verified new checkpoint first: when DST is absent, it is what the killed export was moving in.
        for stage, renamed, removed in (
            (VERIFIED, "finished a replacement of DST {dst} killed halfway (process {pid}): DST is its new, "
             "verified checkpoint", "removed {folder}, the verified checkpoint of an export (process {pid}) "
             "killed before it replaced DST"),
            (REPLACED, "restored DST {dst} from {folder}, which an export (process {pid}) had moved aside",
             "removed {folder}, the previous DST replaced by an export (process {pid}) killed before removing it"),
        ):
            folder = stages.get(stage)
            if folder is None:
                continue
            if dst.exists():
                shutil.rmtree(folder)
                done.append(removed.format(folder=folder, pid=pid))
            else:
                os.rename(folder, dst)
                done.append(renamed.format(folder=folder, pid=pid, dst=dst))
    return done


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def copy_side_files(source_dirs: list[Path], out: Path) -> list[str]:
    """Copy tokenizer files and the generation config from the first of ``source_dirs`` that has them
    (an adapter's own before its base's)."""
    copied = []
    tokenizer_dir = next((d for d in source_dirs if any((d / name).is_file() for name in TOKENIZER_FILES)), None)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)
                copied.append(name)
        for name in TOKENIZER_DIRS:
            if (tokenizer_dir / name).is_dir():
                shutil.copytree(tokenizer_dir / name, out / name)
                copied.append(name + "/")
    generation_dir = next((d for d in source_dirs if (d / GENERATION_CONFIG).is_file()), None)
    if generation_dir is not None:
        # Replaces the one save_pretrained derived from the config: the source's own is what was tuned.
        shutil.copy2(generation_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
        copied.append(GENERATION_CONFIG)
    return copied
