"""Where a stage writes: refuse unsafe output paths, skip finished work, and decide when to resume."""

import hashlib
import json
from pathlib import Path

from spp_cli.errors import BadInput
from spp_cli.io.checkpoint import read_manifest
from spp_cli.io.ownership import changed_files, read_record
from spp_cli.preflight import check_writable


def fingerprint(options: dict, parent_manifest_sha256: str | None) -> str:
    """What decides a stage's result: its resolved options and its parent's manifest (DESIGN.md, Resume)."""
    content = {"options": options, "parent": parent_manifest_sha256}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def check_output_path(out: Path, inputs: list[str | Path]) -> None:
    """An output must not be, or live inside, one of the stage's inputs (the user's files are never touched),
    and must be writable (checked now, not after the work)."""
    resolved = out.resolve()
    for item in inputs:
        source = Path(item)
        if not source.exists():
            continue
        source = source.resolve()
        if resolved == source or source in resolved.parents or (source.is_dir() and resolved in source.parents):
            raise BadInput(f"output '{out}' overlaps the input '{item}': choose an --out outside the input")
    check_writable(out)


def written_by_spp(out: Path) -> dict | None:
    """The record of an output spp wrote (a checkpoint dir's spp.json whose hash matches its content, or a
    results file spp wrote), else None: only such outputs may ever be replaced."""
    from spp_cli.io.checkpoint import manifest_sha256

    if out.is_dir():
        try:
            stored = read_manifest(out)
        except BadInput:
            return None
        if stored and stored.get("manifest_sha256") == manifest_sha256(stored):
            return stored
        return None
    if out.is_file() and out.suffix == ".json":
        try:
            stored = json.loads(out.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return stored if isinstance(stored, dict) and "fingerprint" in stored else None
    return None


def check_spp_output(out: Path) -> dict | None:
    """The record of what spp wrote at `out` (None: nothing there, or an empty folder). BadInput when `out` is
    something spp did not write, or an output of spp's changed since (its spp.json no longer describes it: it is
    neither finished nor spp's to replace). Added files are the caller's to judge."""
    if not out.exists() and not out.is_symlink():
        return None
    stored = written_by_spp(out)
    if stored is None:
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return None
        what = "a folder" if out.is_dir() else "a file"
        raise BadInput(
            f"output '{out}' is {what} that spp did not write, and spp never replaces those: choose another --out"
        )
    changed = changed_files(out)[0] if out.is_dir() else []
    if changed:
        raise BadInput(f"output '{out}' was changed after spp wrote it ({changed[0]}): spp never replaces or reuses "
                       "it; restore it, or move it away and rerun")
    return stored


def existing_output(out: Path, fingerprint_now: str, overwrite: bool) -> bool:
    """True when `out` already holds this exact result (skip the stage). Raises when it holds anything else.

    `--overwrite` replaces only what spp wrote; a folder or file of the user's is never replaced, with or
    without it (and the message does not suggest overwriting it). An empty folder counts as free.
    """
    stored = check_spp_output(out)
    if stored is None:
        return False
    if stored.get("fingerprint") == fingerprint_now:
        return True
    if out.is_dir() and read_record(out) is None:
        raise BadInput(f"output '{out}' was written by an older spp that kept no record of its files, so spp cannot "
                       "tell them from yours: delete it yourself, or choose another --out")
    added = changed_files(out)[1] if out.is_dir() else []
    if added:
        raise BadInput(f"output '{out}' holds {added[0]}, which spp did not write, and spp never deletes those: "
                       "move it away, or choose another --out")
    if overwrite:
        return False
    raise BadInput(f"output '{out}' holds a result made with other options: pass --overwrite to replace it")
