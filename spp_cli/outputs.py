"""Where a stage writes: refuse unsafe output paths, skip finished work, and decide when to resume."""

import hashlib
import json
from pathlib import Path

from spp_cli.checkpoint import read_manifest
from spp_cli.errors import BadInput


def fingerprint(options: dict, parent_manifest_sha256: str | None) -> str:
    """What decides a stage's result: its resolved options and its parent's manifest (DESIGN.md, Resume)."""
    content = {"options": options, "parent": parent_manifest_sha256}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def check_output_path(out: Path, inputs: list[str | Path]) -> None:
    """An output must not be, or live inside, one of the stage's inputs (the user's files are never touched)."""
    resolved = out.resolve()
    for item in inputs:
        source = Path(item)
        if not source.exists():
            continue
        source = source.resolve()
        if resolved == source or source in resolved.parents or (source.is_dir() and resolved in source.parents):
            raise BadInput(f"output '{out}' overlaps the input '{item}': choose an --out outside the input")


def existing_output(out: Path, fingerprint_now: str, overwrite: bool, stored: dict | None = None) -> bool:
    """True when `out` already holds this exact result (skip the stage). Raises when it holds something else.

    `stored` is the finished output's record (its spp.json or results.json); read from `out/spp.json` if None.
    """
    if not out.exists():
        return False
    if stored is None and out.is_dir():
        stored = read_manifest(out)
    if stored is None:
        if out.is_dir() and not any(out.iterdir()):
            return False
        if overwrite:
            return False
        raise BadInput(f"output '{out}' exists and is not an spp output: choose another --out or pass --overwrite")
    if stored.get("fingerprint") == fingerprint_now:
        return True
    if overwrite:
        return False
    raise BadInput(f"output '{out}' holds a result made with other options: pass --overwrite to replace it")
